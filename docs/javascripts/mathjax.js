// MathJax 3 configuration for the `pymdownx.arithmatex` (generic) output.
// Only elements with the `arithmatex` class are typeset. MathJax itself ships
// with the site (javascripts/vendor/mathjax, see scripts/docs_offline_assets.py)
// and loads its extensions from there.
window.MathJax = {
  loader: {
    // `\_` and other text-mode macros inside `\texttt{...}` / `\text{...}`.
    load: ["[tex]/textmacros"],
  },
  tex: {
    packages: { "[+]": ["textmacros"] },
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// Material's instant navigation swaps pages without a reload: typeset again.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && MathJax.typesetPromise) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
