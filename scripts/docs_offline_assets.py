"""MkDocs hook: the site ships the JavaScript it needs, so it works offline.

The docs render their math with MathJax, and Material's `offline` plugin needs
the `iframe-worker` shim for search on pages opened from disk. Both are taken
from the npm registry at build time (`npm pack`, pinned version, checked
against a pinned SHA-512), cached under `~/.cache/keras-moe-docs`, and copied
into the built site: a reader's browser never fetches anything from a CDN.

Building needs `npm` (Node.js) the first time; later builds use the cache.
`KERAS_MOE_DOCS_CACHE` moves the cache.
"""

import base64
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tarfile
import tempfile

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.offline_assets")

# name -> (version, npm `dist.integrity`); `npm view NAME@VERSION dist.integrity`.
PACKAGES = {
    "mathjax": (
        "3.2.2",
        "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==",
    ),
    "iframe-worker": (
        "1.0.4",
        "sha512-roeaaI+Lg1LJNfgpCjoRe/+WzEjy9+Z08LoEvu85MCPbBjwm+qXz8Ag5U05lHa6V1CysZyGzE0SOkAtSUA5q7Q==",
    ),
}

# What the site takes from each package (paths inside the package), and where
# it puts them. MathJax: the TeX-to-SVG bundle (SVG needs no web fonts, which
# browsers may refuse to load from file:// pages) and the components it loads
# on demand (TeX extensions, the accessibility menu's explorer and speech).
MATHJAX_DIR = "javascripts/vendor/mathjax"
SHIPPED = {
    "mathjax": (MATHJAX_DIR, ["es5/tex-svg.js", "es5/input/", "es5/a11y/", "es5/sre/", "es5/ui/", "LICENSE"]),
    "iframe-worker": ("javascripts/vendor/iframe-worker", ["shim/index.js", "LICENSE"]),
}
IFRAME_WORKER_SHIM = "javascripts/vendor/iframe-worker/shim/index.js"


def _cache_root():
    default = (
        pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "keras-moe-docs"
    )
    return pathlib.Path(os.environ.get("KERAS_MOE_DOCS_CACHE", default))


def _check_integrity(path, integrity):
    algorithm, expected = integrity.split("-", 1)
    digest = base64.b64encode(hashlib.new(algorithm, path.read_bytes()).digest()).decode()
    if digest != expected:
        raise PluginError(f"{path.name}: {algorithm} {digest} does not match the pinned {expected}.")


def _package_dir(name):
    """The unpacked npm package (its `package/` folder), fetched once."""
    version, integrity = PACKAGES[name]
    target = _cache_root() / f"{name}-{version}"
    if (target / "package" / "package.json").is_file():
        return target / "package"
    npm = shutil.which("npm")
    if npm is None:
        raise PluginError(
            f"The docs ship {name} {version} from the npm registry and need `npm` (Node.js) "
            f"to fetch it once, e.g. `apt-get install npm`; it is then cached in {target.parent}."
        )
    log.info("Fetching %s@%s from the npm registry into %s", name, version, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = pathlib.Path(tmp)
        try:
            out = subprocess.run(
                [npm, "pack", f"{name}@{version}", "--pack-destination", str(tmp), "--silent"],
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            raise PluginError(f"`npm pack {name}@{version}` failed: {getattr(e, 'stderr', '') or e}") from e
        tarball = tmp / out.stdout.strip().splitlines()[-1]
        _check_integrity(tarball, integrity)
        unpacked = tmp / "unpacked"
        with tarfile.open(tarball) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(unpacked, filter="data")
            else:  # Python < 3.10.12 / 3.11.4: the archive's hash was checked above.
                tar.extractall(unpacked)
        if (target / "package" / "package.json").is_file():  # a concurrent build was first
            return target / "package"
        if target.exists():  # a partial unpack from an interrupted build
            shutil.rmtree(target)
        unpacked.rename(target)
    return target / "package"


def _shipped_files(name):
    dest, parts = SHIPPED[name]
    root = _package_dir(name)
    for part in parts:
        source = root / part
        paths = sorted(p for p in source.rglob("*") if p.is_file()) if part.endswith("/") else [source]
        for path in paths:
            rel = path.relative_to(root / "es5") if part.startswith("es5/") else path.relative_to(root)
            yield f"{dest}/{rel.as_posix()}", path


def on_config(config):
    # Material's offline plugin would load the shim from a CDN; use the copy
    # shipped with the site instead.
    polyfills = [p for p in config.extra.get("polyfills", []) if "iframe-worker" not in str(p)]
    config.extra["polyfills"] = [*polyfills, IFRAME_WORKER_SHIM]
    return config


def on_files(files, config):
    for name in SHIPPED:
        for uri, path in _shipped_files(name):
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
