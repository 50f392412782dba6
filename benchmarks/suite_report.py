"""Reports of the ``attention`` and ``kernels`` suites: ``results.json``, ``results.csv``, ``report.md``, PNGs.

Every number in the Markdown comes from the run's results; rows that were not measured say why.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .plots import plt, save


def _fmt(x, digits=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _ms(row: dict, key: str) -> str:
    t = row.get(key)
    return "—" if t is None else f"{t['median_s'] * 1e3:.3g} ({t['p25_s'] * 1e3:.3g}–{t['p75_s'] * 1e3:.3g})"


def _mib(x) -> str:
    return "—" if x is None else f"{x / 2**20:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _flat(row: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _write_csv(rows: list[dict], path: Path) -> None:
    flat = [_flat(r) for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)


def _header(results: dict, title: str) -> list[str]:
    env, limits = results["environment"], results["device_limits"]
    return [f"# {title}", "",
            f"{env['date_utc']}, {env['device_name']}, torch {env['versions']['torch']}, triton "
            f"{env['versions']['triton']}, CUDA {(env['cuda'] or {}).get('cuda_runtime')}, driver "
            f"{(env['cuda'] or {}).get('driver')}, commit {env['git']['commit']}"
            f"{' (uncommitted changes)' if env['git']['dirty'] else ''}. Command: `{env['command']}`.", "",
            f"Device limits measured by this run ({limits['dtype']}): copy {limits['copy_gb_per_s']:.4g} GB/s "
            f"(bytes read + written), matmul {limits['matmul_tflop_per_s']:.4g} TFLOP/s "
            f"({'x'.join(map(str, limits['matmul_shape']))}). Times are medians with the interquartile range.", ""] + (
            [f"**Interrupted: {results['interrupted']}.** What follows is what was measured before.", ""]
            if results.get("interrupted") else [])


# --------------------------------------------------------------------------------------------------
def write_attention(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = results["rows"]
    check = results.get("flop_formula_check")  # an interrupted run has none
    lines = _header(results, "Attention cost versus sequence length") + [
        "FLOPs: forward 4·B·H·N²·d (halved when causal), backward 2.5× forward" + (
            f"; torch.utils.flop_counter counted {check['counted']:.4g} where the formula gives "
            f"{check['formula']:.4g} (ratio {check['ratio']:.3g}) on the math backend." if check else "."), ""]
    table = [[r["backend"], r["head_dim"], "yes" if r["causal"] else "no", r["seqlen"], r["batch"], r["heads"],
              _ms(r, "forward"), _ms(r, "backward"), _fmt(r.get("tflop_per_s_forward")),
              _fmt(r.get("tflop_per_s_backward")), _fmt(r.get("pct_of_matmul_peak_forward")),
              _mib(r.get("peak_bytes_forward")), _mib(r.get("peak_bytes_forward_backward")), r["status"]]
             for r in rows]
    lines.append(_table(["backend", "head_dim", "causal", "seqlen", "batch", "heads", "forward ms",
                         "backward ms", "fwd TFLOP/s", "bwd TFLOP/s", "fwd % of matmul peak", "peak MiB fwd",
                         "peak MiB fwd+bwd", "status"], table))
    lines += ["", "![time](attention_time.png)", "", "![memory](attention_memory.png)", ""]
    if results.get("traces"):
        lines += ["torch.profiler Chrome traces (one causal forward+backward each; open in Perfetto):", ""]
        lines += [f"- {name}: `{what}`" for name, what in results["traces"].items()] + [""]
    extra = []
    if results.get("context_parallel"):
        lines += _context_parallel_lines(results["context_parallel"])
        extra.append(_context_parallel_plot(results["context_parallel"], out / "context_parallel_memory.png"))
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _write_csv(rows, out / "results.csv")
    paths = [out / "report.md", out / "results.json", out / "results.csv"]
    paths.append(_attention_plot(rows, "forward", out / "attention_time.png", "forward time (ms)"))
    paths.append(_attention_plot(rows, "peak_bytes_forward_backward", out / "attention_memory.png",
                                 "peak memory, forward + backward (MiB)"))
    return paths + extra


def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def _context_parallel_lines(cp: dict) -> list[str]:
    """The section past one device: counted bytes (checked against the formula), measured memory per
    local token, and what they project at long sequences."""
    c = cp["config"]
    lines = ["## Past one device: context-parallel attention", "",
             f"One causal attention call, forward + backward, {c['heads']} heads ({c['heads_k']} key/value heads), "
             f"head_dim {c['head_dim']}, 2-byte elements, {c['layout']} layout. Bytes sent are counted at the "
             "communication calls in spawned gloo groups; memory is what the call allocates per rank beyond "
             "its inputs (torch's MemTracker), measured at two local lengths (exactly linear in them: no "
             "seqlen² tensor exists) and projected from there. Nothing here is timed.", ""]
    checks = cp["send_checks"]
    ok = all(r["counted_forward"] == r["formula_forward"] and r["counted_backward"] == r["formula_backward"]
             for r in checks)
    lines += [f"Bytes counted at the calls {'equal' if ok else 'DIFFER FROM'} `communication_volume`'s formula in "
              f"all {len(checks)} measured cases.", ""]
    per = [[key.split("|")[1], key.split("|")[0], f"{v['bytes_per_token']:,.0f}", f"{v['intercept_bytes']:,.0f}"]
           for key, v in cp["per_token"].items()]
    lines += ["Measured memory per local token (largest rank):", "",
              _table(["strategy", "world", "bytes / local token", "constant bytes"], per), ""]
    volume = cp["volume_case"]
    lines += ["Bytes each rank sends per attention layer at the issue's reference point (counted from the code):", "",
              _table(["strategy", "seqlen", "heads", "head_dim", "world", "forward GiB", "backward GiB", "total GiB",
                      "calls in the forward"],
                     [[s, v["seqlen"], v["num_heads"], v["head_dim"], v["world"], _gib(v["forward_bytes"]),
                       _gib(v["backward_bytes"]), _gib(v["total_bytes"]), v["steps"]] for s, v in volume.items()]), ""]
    fits = cp["longest_fitting"]
    layers = c.get("layers", 32)
    lines += ["Longest sequence that fits each device's memory: one attention call alone (inputs q, k, v, dO "
              f"plus the call's peak), and the attention share of a {layers}-layer model (each layer's saved "
              "q, k, v and output plus one call's peak). MLPs, norms and weights need more, so read both as "
              "upper bounds; a world size beyond those measured uses the largest measured one's bytes per token:",
              "", _table(["world", "strategy", "memory GiB", "one call: longest seqlen",
                          f"{layers} layers: longest seqlen", "memory measured at world"],
                         [[f["world"], f["strategy"], f"{f['memory_gib']:g}", f"{f['max_seqlen']:,}",
                           f"{f['max_seqlen_model']:,}" if "max_seqlen_model" in f else "-",
                           f["memory_from_world"]] for f in fits]), ""]
    proj = [r for r in cp["projected"] if r["seqlen"] in (2**17, 2**20)]
    lines += ["Per rank at 128k and 1M tokens:", "",
              _table(["world", "strategy", "seqlen", "TFLOP per rank (fwd+bwd)", "GiB sent fwd", "GiB sent bwd",
                      "GiB memory per rank"],
                     [[r["world"], r["strategy"], r["seqlen"], f"{r['flops_per_rank'] / 1e12:.1f}",
                       _gib(r.get("bytes_sent_forward")), _gib(r.get("bytes_sent_backward")),
                       _gib(r.get("memory_per_rank"))] for r in proj]), "",
              "![context-parallel memory](context_parallel_memory.png)", ""]
    return lines


def _context_parallel_plot(cp: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    series = dict.fromkeys((r["world"], r["strategy"]) for r in cp["projected"] if r.get("memory_per_rank"))
    for world, strategy in series:
        pts = [(r["seqlen"], r["memory_per_rank"] / 2**30) for r in cp["projected"]
               if (r["world"], r["strategy"]) == (world, strategy) and r.get("memory_per_rank")]
        ax.plot(*zip(*pts), marker="o", label=f"{strategy}, world {world}")
    for gib in cp["config"]["memory_gib"]:
        ax.axhline(gib, ls="--", c="gray", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="attention memory per rank (GiB)",
           title="one attention layer, forward + backward")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


def _attention_plot(rows: list[dict], key: str, path: Path, ylabel: str) -> Path:
    panels = sorted({(r["head_dim"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (head_dim, causal) in zip(axes[0], panels):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            pts = [(r["seqlen"], r[key]) for r in rows if r["backend"] == backend and r["head_dim"] == head_dim
                   and r["causal"] == causal and r["status"] == "measured" and r.get(key) is not None]
            if pts:
                ys = [y["median_s"] * 1e3 if isinstance(y, dict) else y / 2**20 for _, y in pts]
                ax.plot([x for x, _ in pts], ys, marker="o", label=backend)
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=ylabel,
               title=f"head_dim {head_dim}, {'causal' if causal else 'not causal'}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return save(fig, path)


# --------------------------------------------------------------------------------------------------
def write_kernels(results: dict, out: Path) -> list[Path]:
    """The report of the sections the run has (an interrupted or ``--sections`` run has fewer), in run order."""
    out.mkdir(parents=True, exist_ok=True)
    lines = _header(results, "Kernels against PyTorch eager and torch.compile")
    for name in results["config"].get("sections", KERNEL_SECTIONS):
        if results.get(name):
            title, columns = KERNEL_SECTIONS[name]
            lines += [f"## {title}", "", _table([c for c, _ in columns],
                                                 [[cell(r) for _, cell in columns] for r in results[name]]), ""]
    written = [out / "report.md", out / "results.json", out / "results.csv"]
    if results.get("layer_norm"):
        lines += ["![layer norm](layer_norm.png)", ""]
        written.append(_layer_norm_plot(results["layer_norm"], out / "layer_norm.png"))
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _write_csv([dict(section=s, **r) for s in KERNEL_SECTIONS for r in results.get(s, [])], out / "results.csv")
    return written


def _col(key: str, fmt=None):
    """A table cell: the row's value, as is or through ``fmt``."""
    return lambda r: r.get(key, "—") if fmt is None else fmt(r.get(key))


_PEER, _STATUS, _MS = ("peer", _col("peer")), ("status", _col("status")), ("ms", lambda r: _ms(r, "time"))
_TFLOPS = [("TFLOP/s", _col("tflop_per_s", _fmt)), ("% of matmul peak", _col("pct_of_matmul_peak", _fmt))]
_ATTN = [_PEER] + [(c, _col(c)) for c in ("batch", "heads", "seqlen", "head_dim", "causal")] + [_MS] + _TFLOPS
# section -> (title, [(column, cell of a row)]); runs before issue 22 have no FP8 sections
KERNEL_SECTIONS = {
    "layer_norm": ("LayerNorm, forward + backward",
                   [_PEER, ("rows", _col("rows")), ("width", _col("width")), _MS, ("GB/s", _col("gb_per_s", _fmt)),
                    ("% of copy bandwidth", _col("pct_of_copy_bandwidth", _fmt)), _STATUS]),
    "ffn": ("FFN, forward + backward (d_ff = 4 d_model)",
            [_PEER, ("activation", _col("activation")), ("d_model", _col("d_model")), ("tokens", _col("tokens")),
             _MS, *_TFLOPS, ("activation memory MiB", lambda r: _mib(r.get("activation_bytes"))), _STATUS]),
    "attention": ("Attention, forward + backward", _ATTN + [_STATUS]),
    "attention_fp8": ("Attention forward for inference: FP8 (e4m3) against bf16 (% of the bf16 matmul peak)",
                      _ATTN + [_STATUS]),
    "ffn_fp8": ("FFN forward for inference: FP8 (e4m3) against bf16 (% of the bf16 matmul peak)",
                [_PEER, ("activation", _col("activation")), ("d_model", _col("d_model")), ("tokens", _col("tokens")),
                 _MS, *_TFLOPS, _STATUS]),
    "training_step": ("Training step of the base Transformer (forward, label-smoothed loss, backward, Adam)",
                      [_PEER, ("sentences x length", lambda r: f"{r.get('sentences', '—')} x {r.get('length', '—')}"),
                       ("d_model", _col("d_model")), _MS, ("tokens/s", _col("tokens_per_s", _fmt)), _STATUS]),
}


def _layer_norm_plot(rows: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    rows_m = max(r["rows"] for r in rows)
    for peer in dict.fromkeys(r["peer"] for r in rows):
        pts = [(r["width"], r["gb_per_s"]) for r in rows if r["peer"] == peer and r["rows"] == rows_m
               and r["status"] == "measured"]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=peer)
    ax.set(xscale="log", xlabel="hidden size", ylabel="GB/s (forward + backward)",
           title=f"LayerNorm, {rows_m} rows")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)
