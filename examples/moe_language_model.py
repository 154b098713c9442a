"""A byte-level MoE language model from keras-hub parts, against a dense one.

A small decoder-only language model: keras-hub's `ByteTokenizer` and
`TokenAndPositionEmbedding`, a stack of `keras_moe.layers.MoETransformerDecoder`
blocks (8 experts, top-2) and a byte classifier, trained with `model.fit`.
The baseline is the same model with keras-hub's dense `TransformerDecoder`,
whose feed-forward is as wide as the two active experts together: equal
active parameters per token, 4x fewer parameters in all.

The text needs no download. It mixes five "domains" whose bytes look nothing
alike, so that experts can specialize:

- `english`: docstrings of the installed Python standard library;
- `python`: source code of standard-library modules;
- `arithmetic`: `417+38=455; 12*9=108; ...`;
- `dna`: a random A/C/G/T sequence with recurring motifs (`TATAAA`, ...);
- `logs`: synthetic server log lines.

The script prints each model's validation perplexity (per byte) as training
goes, against its training time, and per domain at the end; draws the curves
and, for every MoE block, a heatmap of the share of each domain's tokens each
expert gets; and samples text from both models from a prompt per domain.

Needs keras-hub (`pip install -e ".[jax,examples]"`). Runs on JAX by
default; choose another backend with `KERAS_BACKEND`:

    nice python examples/moe_language_model.py          # full run (see the docs page)
    KERAS_BACKEND=torch python examples/moe_language_model.py --smoke   # seconds

Figures go to `--out-dir` (default `docs/assets/`; a temporary directory in
smoke mode).
"""

import argparse
import inspect
import os
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_moe  # noqa: E402

DOMAINS = ("english", "python", "arithmetic", "dna", "logs")
PROMPTS = {
    "english": "Return the ",
    "python": "def ",
    "arithmetic": "25+17=",
    "dna": "GATTACA",
    "logs": "2024-05-17 ",
}
# Pure-Python standard-library modules: their docstrings and source.
STDLIB_MODULES = (
    "argparse", "bisect", "calendar", "collections", "csv", "dataclasses", "datetime",
    "difflib", "email.message", "fractions", "functools", "heapq", "inspect", "json",
    "logging", "pathlib", "pprint", "random", "shlex", "statistics", "string",
    "tempfile", "textwrap", "typing", "unittest.case", "urllib.parse", "uuid", "zipfile",
)

FULL = dict(
    seq=128, hidden=128, heads=4, layers=4, experts=8, top_k=2, expert_width=256,
    batch=16, steps=800, eval_every=80, eval_windows=64, learning_rate=2e-3,
    sample_bytes=80, domain_bytes=400_000,
)
SMOKE = dict(
    seq=32, hidden=32, heads=2, layers=1, experts=4, top_k=2, expert_width=32,
    batch=8, steps=6, eval_every=3, eval_windows=4, learning_rate=2e-3,
    sample_bytes=8, domain_bytes=20_000,
)


# ----------------------------------------------------------------------------
# Text of five domains, generated or read from the installed standard library.


def stdlib_text(kind, limit):
    """Docstrings (`english`) or source code (`python`) of stdlib modules."""
    import importlib

    pieces = []
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if kind == "python":
            try:
                pieces.append(inspect.getsource(module))
            except (OSError, TypeError):
                continue
        else:
            for _, obj in sorted(vars(module).items()):
                if getattr(obj, "__module__", None) == module.__name__:
                    doc = inspect.getdoc(obj)
                    if doc and len(doc) > 40:
                        pieces.append(doc)
    text = "\n\n".join(pieces).encode("ascii", "ignore").decode("ascii")
    return text[:limit]


def arithmetic_text(rng, limit):
    pieces, size = [], 0
    while size < limit:
        a, b = rng.integers(0, 1000, 2)
        op = "+-*"[rng.integers(3)]
        if op == "*":
            a, b = a % 100, b % 100
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        piece = f"{a}{op}{b}={value}; "
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)[:limit]


def dna_text(rng, limit):
    motifs = ("TATAAA", "GATTACA", "CCGCGG", "AAGCTT", "TTGACA")
    pieces, size = [], 0
    while size < limit:
        if rng.random() < 0.3:
            piece = motifs[rng.integers(len(motifs))]
        else:
            piece = "".join(rng.choice(list("ACGT"), rng.integers(3, 12)))
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)[:limit]


def logs_text(rng, limit):
    levels = ("INFO", "INFO", "INFO", "WARN", "ERROR", "DEBUG")
    services = ("auth", "db", "api", "cache", "scheduler")
    messages = (
        "request {n} served in {ms}ms",
        "user {n} logged in from 10.0.{a}.{b}",
        "user {n} failed login from 10.0.{a}.{b}",
        "cache miss for key item:{n}",
        "job {n} finished with status {s}",
        "connection pool at {p}% capacity",
    )
    lines, size = [], 0
    while size < limit:
        message = messages[rng.integers(len(messages))].format(
            n=rng.integers(1, 10000), ms=rng.integers(1, 900), a=rng.integers(256),
            b=rng.integers(256), s=rng.choice(["ok", "failed", "retry"]), p=rng.integers(100),
        )
        line = (
            f"2024-05-{rng.integers(1, 29):02d} {rng.integers(24):02d}:{rng.integers(60):02d}:"
            f"{rng.integers(60):02d} {levels[rng.integers(len(levels))]} "
            f"{services[rng.integers(len(services))]}: {message}\n"
        )
        lines.append(line)
        size += len(line)
    return "".join(lines)[:limit]


def domain_streams(tokenizer, config, seed=0):
    """Each domain's text as byte ids, split 90/10 into train and validation."""
    rng = np.random.default_rng(seed)
    limit = config["domain_bytes"]
    texts = {
        "english": stdlib_text("english", limit),
        "python": stdlib_text("python", limit),
        "arithmetic": arithmetic_text(rng, limit),
        "dna": dna_text(rng, limit),
        "logs": logs_text(rng, limit),
    }
    streams = {}
    for domain, text in texts.items():
        ids = np.asarray(keras.ops.convert_to_numpy(tokenizer(text)), "int32")
        cut = int(0.9 * len(ids))
        streams[domain] = (ids[:cut], ids[cut:])
    return streams


def windows(streams, split, count, seq, rng, domain=None):
    """`count` random windows of `seq + 1` bytes, balanced over the domains."""
    domains = DOMAINS if domain is None else (domain,)
    picks = rng.integers(len(domains), size=count)
    out = np.empty((count, seq + 1), "int32")
    for i, d in enumerate(picks):
        ids = streams[domains[d]][0 if split == "train" else 1]
        start = rng.integers(len(ids) - seq - 1)
        out[i] = ids[start : start + seq + 1]
    return out[:, :-1], out[:, 1:]


# ----------------------------------------------------------------------------
# Models


def language_model(config, moe):
    """Byte LM: embedding, `layers` pre-norm decoder blocks, byte classifier."""
    import keras_hub

    tokens = keras.Input((config["seq"],), dtype="int32", name="tokens")
    x = keras_hub.layers.TokenAndPositionEmbedding(
        vocabulary_size=256, sequence_length=config["seq"], embedding_dim=config["hidden"]
    )(tokens)
    for i in range(config["layers"]):
        if moe:
            x = keras_moe.layers.MoETransformerDecoder(
                intermediate_dim=config["expert_width"],
                num_heads=config["heads"],
                activation="gelu",
                normalize_first=True,
                moe={
                    "num_experts": config["experts"],
                    "top_k": config["top_k"],
                    "load_balance_loss_weight": 1e-2,
                },
                name=f"moe_decoder_{i}",
            )(x)
        else:
            x = keras_hub.layers.TransformerDecoder(
                intermediate_dim=config["top_k"] * config["expert_width"],
                num_heads=config["heads"],
                activation="gelu",
                normalize_first=True,
                name=f"dense_decoder_{i}",
            )(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras.layers.Dense(256, name="byte_logits")(x)
    return keras.Model(tokens, logits, name="moe_lm" if moe else "dense_lm")


def active_parameters(model, config):
    """Parameters one token uses: all but the experts it is not routed to."""
    total = model.count_params()
    for layer in model.layers:
        moe = getattr(layer, "moe", None)
        if moe is not None:
            per_expert = sum(int(np.prod(v.shape)) for v in moe.experts.weights) // config["experts"]
            total -= (config["experts"] - config["top_k"]) * per_expert
    return total


class Tracker(keras.callbacks.Callback):
    """Validation perplexity every `every` steps, against training time."""

    def __init__(self, validation, every, steps, label):
        super().__init__()
        self.validation, self.every, self.steps, self.label = validation, every, steps, label
        self.train_seconds, self.history, self.step_times = 0.0, [], []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        elapsed = time.perf_counter() - self._start
        self.train_seconds += elapsed
        self.step_times.append(elapsed)
        step = batch + 1
        if step % self.every == 0 or step == self.steps:
            loss = self.model.evaluate(*self.validation, verbose=0, batch_size=32)
            loss = loss[0] if isinstance(loss, list) else loss
            self.history.append((step, self.train_seconds, float(np.exp(loss))))
            print(
                f"  {self.label:5s} step {step:5d}  train {self.train_seconds:7.1f}s  "
                f"validation perplexity {np.exp(loss):6.3f}",
                flush=True,
            )


def train(model, config, streams, seed, label):
    rng = np.random.default_rng(seed)
    x, y = windows(streams, "train", config["steps"] * config["batch"], config["seq"], rng)
    validation = windows(
        streams, "validation", config["eval_windows"] * len(DOMAINS), config["seq"],
        np.random.default_rng(1000),
    )
    schedule = keras.optimizers.schedules.CosineDecay(
        config["learning_rate"], config["steps"], warmup_target=None, alpha=0.1
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    tracker = Tracker(validation, config["eval_every"], config["steps"], label)
    model.fit(x, y, batch_size=config["batch"], epochs=1, shuffle=False, verbose=0, callbacks=[tracker])
    return tracker


def interleaved_step_times(models, config, streams, rounds):
    """Median training-step time of each model, measured in turns.

    The training curves time each model while it trains, one after the
    other; on a shared machine the load can change in between. Here every
    round runs a few steps of each model in turn (A B A B ...), so both see
    the same load.
    """
    rng = np.random.default_rng(3000)
    x, y = windows(streams, "train", config["batch"], config["seq"], rng)
    times = {label: [] for label in models}
    for _ in range(rounds):
        for label, model in models.items():
            start = time.perf_counter()
            for _ in range(3):
                model.train_on_batch(x, y)
            times[label].append((time.perf_counter() - start) / 3)
    return {label: 1e3 * float(np.median(t)) for label, t in times.items()}


def per_domain(model, config, streams):
    """Validation perplexity per domain, and each MoE block's expert shares."""
    perplexity, usage = {}, {}
    rng = np.random.default_rng(2000)
    moe_layers = [layer for layer in model.layers if hasattr(layer, "moe")]
    for domain in DOMAINS:
        x, y = windows(streams, "validation", config["eval_windows"], config["seq"], rng, domain)
        # One batch: afterwards each MoE layer's `expert_counts` holds its routing.
        logits = model.predict_on_batch(x)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
        perplexity[domain] = float(np.exp(keras.ops.convert_to_numpy(loss)))
        if moe_layers:
            counts = [keras.ops.convert_to_numpy(l.moe.expert_counts) for l in moe_layers]
            usage[domain] = [c / c.sum() for c in counts]
    return perplexity, usage


def sample(model, tokenizer, config, rng):
    """Sampled continuations (temperature 0.7) of one prompt per domain."""
    seq = config["seq"]
    prompts = [np.asarray(keras.ops.convert_to_numpy(tokenizer(PROMPTS[d])), "int32") for d in DOMAINS]
    ids = np.zeros((len(DOMAINS), seq), "int32")
    lengths = np.array([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    for _ in range(config["sample_bytes"]):
        window_start = np.maximum(lengths - seq, 0)
        batch = np.stack([np.roll(ids[i], -window_start[i]) for i in range(len(ids))])
        logits = keras.ops.convert_to_numpy(model.predict_on_batch(batch))
        positions = np.minimum(lengths, seq) - 1
        step = logits[np.arange(len(ids)), positions] / 0.7
        probs = np.exp(step - step.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        nxt = np.array([rng.choice(256, p=p) for p in probs], "int32")
        for i in range(len(ids)):
            if lengths[i] >= seq:
                ids[i] = np.roll(ids[i], -1)
                ids[i, -1] = nxt[i]
            else:
                ids[i, lengths[i]] = nxt[i]
            lengths[i] += 1
    out = {}
    for i, domain in enumerate(DOMAINS):
        n = min(lengths[i], seq)
        text = tokenizer.detokenize(ids[i, :n])
        text = text.numpy().decode("utf-8", "replace") if hasattr(text, "numpy") else str(text)
        out[domain] = text
    return out


# ----------------------------------------------------------------------------
# Figures


def plot(trackers, usage, config, out_dir, suffix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, tracker in trackers.items():
        steps, seconds, ppl = zip(*tracker.history)
        axes[0].plot(seconds, ppl, marker="o", ms=3, label=label)
        axes[1].plot(steps, ppl, marker="o", ms=3, label=label)
    axes[0].set_xlabel("training time (s)")
    axes[1].set_xlabel("training step")
    for ax in axes:
        ax.set_ylabel("validation perplexity (per byte)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Byte LM, MoE (E={config['experts']}, top-{config['top_k']}) vs dense at equal active parameters{suffix}")
    fig.tight_layout()
    curves = os.path.join(out_dir, "moe_lm_curves.png")
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    layers = len(next(iter(usage.values())))
    fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers + 1, 3.2), squeeze=False)
    for j in range(layers):
        grid = np.stack([usage[d][j] for d in DOMAINS])
        ax = axes[0, j]
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(0.5, grid.max()))
        ax.set_title(f"MoE block {j}")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(DOMAINS)))
        ax.set_yticklabels(DOMAINS if j == 0 else [])
    fig.colorbar(image, ax=axes[0, :].tolist(), label="share of the domain's assignments")
    fig.suptitle(f"Expert usage per domain (validation){suffix}")
    heatmap = os.path.join(out_dir, "moe_lm_experts.png")
    fig.savefig(heatmap, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return curves, heatmap


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and data, a few steps (CI)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-dir",
        default=None,
        help="directory of the figures (default: docs/assets; with --smoke, a temporary directory)",
    )
    args = parser.parse_args()
    config = dict(SMOKE if args.smoke else FULL)
    if args.steps:
        config["steps"] = args.steps
    out_dir = args.out_dir or (tempfile.mkdtemp() if args.smoke else "docs/assets")
    os.makedirs(out_dir, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    start = time.time()

    import keras_hub

    tokenizer = keras_hub.tokenizers.ByteTokenizer(lowercase=False)
    streams = domain_streams(tokenizer, config, args.seed)
    print(
        f"backend {keras.backend.backend()}; {config['layers']} blocks, hidden {config['hidden']}, "
        f"{config['steps']} steps of {config['batch']}x{config['seq']} bytes"
        f"{' (smoke mode)' if args.smoke else ''}"
    )
    print("domains (train bytes): " + ", ".join(f"{d} {len(streams[d][0])}" for d in DOMAINS))

    trackers, results, samples, sizes, models = {}, {}, {}, {}, {}
    for label, moe in (("MoE", True), ("dense", False)):
        keras.utils.set_random_seed(args.seed)
        model = models[label] = language_model(config, moe)
        sizes[label] = (model.count_params(), active_parameters(model, config))
        print(f"{label}: {sizes[label][0]:,} parameters, {sizes[label][1]:,} active per token")
        trackers[label] = train(model, config, streams, args.seed, label)
        results[label] = per_domain(model, config, streams)
        samples[label] = sample(model, tokenizer, config, np.random.default_rng(args.seed))

    step_ms = interleaved_step_times(models, config, streams, 1 if args.smoke else 7)
    print(
        "\nValidation perplexity per byte; step ms: median while training (the first, "
        "compiling step left out) / interleaved after training (same load for both)."
    )
    print("\n| model | parameters (active) | step ms | train s | "
          + " | ".join(DOMAINS) + " | all |")
    print("|---" * (len(DOMAINS) + 5) + "|")
    for label, tracker in trackers.items():
        model_ppl = results[label][0]
        print(
            f"| {label} | {sizes[label][0]:,} ({sizes[label][1]:,}) | "
            f"{1e3 * np.median(tracker.step_times[1:] or tracker.step_times):.0f} / "
            f"{step_ms[label]:.0f} | {tracker.train_seconds:.0f} | "
            + " | ".join(f"{model_ppl[d]:.3f}" for d in DOMAINS)
            + f" | {tracker.history[-1][2]:.3f} |"
        )
    print("\nSamples (prompt, then 0.7-temperature sampling):")
    for label in samples:
        for domain, text in samples[label].items():
            print(f"  {label:5s} {domain:10s} {text!r}")

    suffix = " - smoke run" if args.smoke else ""
    curves, heatmap = plot(trackers, results["MoE"][1], config, out_dir, suffix)
    print(f"\nfigures: {curves}, {heatmap}; wall time {time.time() - start:.0f}s")
    ok = all(np.isfinite(t.history[-1][2]) for t in trackers.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
