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
    "gru": "nn.GRU",
    "conv": "nn.Conv1d",
    "separable": "separable nn.Conv1d",
    "restricted": "restricted self-attention layer",
    "restricted_core": "restricted self-attention core",
}
MARKERS = ("o", "s", "^", "v", "D", "x", "*")
STYLES = ("-", "--", "-.", ":")


def save(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out, write the PNG and free the figure; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _log_log(ax) -> None:
    """Sizes on a base-2 log axis, costs on a log axis, with a grid on both."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)


def _series(rows: list[dict], key: str, value: str, **match) -> tuple[list, list]:
    sel = [r for r in rows if r.get(key) is not None and all(r.get(k) == v for k, v in match.items())]
    return [r["n"] for r in sel], [r[value] for r in sel]


def _label(layer: str, impl: str) -> str:
    return f"{LABELS[layer]}, {impl}" if layer.startswith("attention") else impl


def _tokens_per_s(ax, sel: list[dict], x: str, **style) -> None:
    """Median tokens/s with the interquartile range as error bars."""
    tps = [r["tokens_per_s"] for r in sel]
    tokens = [r["batch"] * r["n"] for r in sel]
    lo = [tp - tok / r["p75_s"] for tp, tok, r in zip(tps, tokens, sel)]
    hi = [tok / r["p25_s"] - tp for tp, tok, r in zip(tps, tokens, sel)]
    ax.errorbar([r[x] for r in sel], tps, yerr=[lo, hi], capsize=3, **style)


def throughput(results: dict, path: Path) -> Path:
    """Tokens/s: forward and forward+backward against n, and both against batch size; log-log."""
    t, cfg = results["timing"], results["config"]
    rows = [r for r in t["rows"] if r["status"] == "measured" and r["d_model"] == cfg["d_model"]]
    impls = list(dict.fromkeys((r["layer"], r["implementation"]) for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(18, 6))
    for i, (layer, impl) in enumerate(impls):
        style = dict(marker=MARKERS[i % len(MARKERS)], color=f"C{i}")
        for ax, mode in zip(axes[:2], ("forward", "forward+backward")):
            sel = [r for r in rows if (r["layer"], r["implementation"]) == (layer, impl) and r["mode"] == mode
                   and r["batch"] == cfg["batch"]]
            _tokens_per_s(ax, sorted(sel, key=lambda r: r["n"]), "n", label=_label(layer, impl), **style)
        for mode, line in (("forward", "-"), ("forward+backward", "--")):
            sel = [r for r in rows if (r["layer"], r["implementation"]) == (layer, impl) and r["mode"] == mode
                   and r["n"] == cfg["batch_sweep_seqlen"]]
            _tokens_per_s(axes[2], sorted(sel, key=lambda r: r["batch"]), "batch", linestyle=line, **style)
    for ax, mode in zip(axes[:2], ("forward", "forward+backward")):
        ax.set_title(f"{mode}, batch {cfg['batch']}", fontsize=10)
        ax.set_xlabel("sequence length n")
    axes[2].set_title(f"over batch size at n = {cfg['batch_sweep_seqlen']} (solid: forward, dashed: +backward)",
                      fontsize=10)
    axes[2].set_xlabel("batch size")
    for ax in axes:
        _log_log(ax)
        ax.set_ylabel("tokens / s")
    axes[0].legend(fontsize=8)
    title = f"Throughput, d_model={cfg['d_model']}, {cfg['dtype']} on {cfg['device']}"
    if t["triton_not_timed_reason"]:
        title += " (Triton kernels not timed: no CUDA device)"
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def crossover(results: dict, path: Path) -> Path:
    """Forward time of the attention layer over the recurrence's against n/d, one line per d; the
    counted-FLOP crossover n*/d marked on each line, the paper's n = d as a vertical line."""
    c = results["crossover"]
    recurrents = list(dict.fromkeys(r["recurrent"] for r in c["by_time"])) or ["rnn", "lstm", "gru"]
    fig, axes = plt.subplots(1, len(recurrents), figsize=(6 * len(recurrents), 5), squeeze=False)
    for ax, rec in zip(axes[0], recurrents):
        for i, row in enumerate(r for r in c["by_time"] if r["recurrent"] == rec):
            d = row["d_model"]
            line = "-" if row["attention_implementation"] == "torch SDPA" else "--"
            ax.plot([n / d for n in row["n"]], row["time_ratio"], marker=MARKERS[i % len(MARKERS)], linestyle=line,
                    color=f"C{c['d_values'].index(d)}", label=f"d={d}, {row['attention_implementation']}")
            flop = next((f for f in c["by_flops"] if f["attention"] == "attention" and f["recurrent"] == rec
                         and f["d_model"] == d and f["n_star"]), None)
            if flop:
                ax.axvline(flop["n_star_over_d"], color=f"C{c['d_values'].index(d)}", alpha=0.3, linestyle=":")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="-.")
        _log_log(ax)
        ax.set_xlabel("n / d  (dash-dot: the paper's n = d; dotted: counted-FLOP n*/d)")
        ax.set_ylabel(f"time(self-attention layer) / time({LABELS[rec]})")
        ax.set_title(f"Self-attention layer vs {LABELS[rec]}, forward", fontsize=10)
        ax.legend(fontsize=7)
    return save(fig, path)


def flops(results: dict, path: Path) -> Path:
    """Counted FLOPs per layer against n (log-log), with the fitted exponent in the legend."""
    f = results["flops"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for key in f["fits"]:
        ns, ys = _series(f["vs_n"], "flops", "flops", layer=key)
        ax.plot(ns, ys, marker="o", label=f"{LABELS[key]}: ∝ n^{f['fits'][key]['exponent_n']:.2f}")
    _log_log(ax)
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("FLOPs per layer, one sequence (FlopCounterMode)")
    ax.set_title(f"FLOPs per layer, d_model={results['config']['d_model']}", fontsize=10)
    ax.legend(fontsize=8)
    return save(fig, path, dpi=120)


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
        _log_log(ax)
        ax.set_xlabel("sequence length n")
        ax.legend(fontsize=8)
    return save(fig, path, dpi=120)


def write_all(results: dict, out_dir: Path) -> list[Path]:
    return [throughput(results, out_dir / "throughput.png"), flops(results, out_dir / "flops.png"),
            table1(results, out_dir / "table1.png"), crossover(results, out_dir / "crossover.png")]
