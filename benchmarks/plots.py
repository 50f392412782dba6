"""PNG plots of a table1 run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "attention": "self-attention layer",
    "attention_core": "self-attention core (SDPA)",
    "rnn": "nn.RNN",
    "lstm": "nn.LSTM",
    "conv": "nn.Conv1d",
    "restricted": "restricted self-attention layer",
    "restricted_core": "restricted self-attention core",
}
MARKERS = ("o", "s", "^", "v", "D", "x", "*")
STYLES = ("-", "--", "-.", ":")


def _series(rows: list[dict], key: str, value: str, **match) -> tuple[list, list]:
    sel = [r for r in rows if r.get(key) is not None and all(r.get(k) == v for k, v in match.items())]
    return [r["n"] for r in sel], [r[value] for r in sel]


def throughput(results: dict, path: Path) -> Path:
    """Tokens/s against sequence length, log-log, one line per measured (layer, implementation)."""
    t = results["timing"]
    rows = [r for r in t["rows"] if r["status"] == "measured"]
    cfg = results["config"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for layer, impl in dict.fromkeys((r["layer"], r["implementation"]) for r in rows):
        sel = [r for r in rows if r["layer"] == layer and r["implementation"] == impl]
        ns = [r["n"] for r in sel]
        tps = [r["tokens_per_s"] for r in sel]
        tokens = [r["batch"] * r["n"] for r in sel]
        lo = [tp - tok / r["p75_s"] for tp, tok, r in zip(tps, tokens, sel)]
        hi = [tok / r["p25_s"] - tp for tp, tok, r in zip(tps, tokens, sel)]
        label = f"{LABELS[layer]}, {impl}" if layer.startswith("attention") else impl
        ax.errorbar(ns, tps, yerr=[lo, hi], marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("tokens / s (forward)")
    title = f"Forward throughput, d_model={cfg['d_model']}, batch={cfg['batch']}, {cfg['dtype']} on {cfg['device']}"
    if t["triton_not_timed_reason"]:
        title += "\n(Triton kernels not timed: no CUDA device)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def flops(results: dict, path: Path) -> Path:
    """Counted FLOPs per layer against n (log-log), with the fitted exponent in the legend."""
    f = results["flops"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for key in f["fits"]:
        ns, ys = _series(f["vs_n"], "flops", "flops", layer=key)
        ax.plot(ns, ys, marker="o", label=f"{LABELS[key]}: ∝ n^{f['fits'][key]['exponent_n']:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("FLOPs per layer, one sequence (FlopCounterMode)")
    ax.set_title(f"FLOPs per layer, d_model={results['config']['d_model']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table1(results: dict, path: Path) -> Path:
    """Sequential operations and maximum path length against n, the two growth columns of Table 1."""
    seq, paths = results["sequential_ops"], results["max_path_length"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for i, key in enumerate(seq["fits"]):
        ns, ys = _series(seq["rows"], "sequential_ops", "sequential_ops", layer=key)
        left.plot(ns, ys, marker=MARKERS[i % len(MARKERS)], linestyle=STYLES[i % len(STYLES)],
                  label=key.replace("_", " "))
    left.set_title("Sequential operations (longest autograd chain)", fontsize=10)
    left.set_ylabel("operations on the longest chain")
    for i, key in enumerate(dict.fromkeys(r["layer"] for r in paths["rows"])):
        ns, ys = _series(paths["rows"], "layers", "layers", layer=key)
        right.plot(ns, ys, marker=MARKERS[i % len(MARKERS)], linestyle=STYLES[i % len(STYLES)],
                   label=key.replace("_", " "))
    right.set_title(f"Maximum path length (Jacobian reachability, width {paths['width']})", fontsize=10)
    right.set_ylabel("layers (recurrence: steps) from input 0 to output n-1")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(results: dict, out_dir: Path) -> list[Path]:
    return [throughput(results, out_dir / "throughput.png"), flops(results, out_dir / "flops.png"),
            table1(results, out_dir / "table1.png")]
