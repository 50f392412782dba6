"""Write a table1 run to a folder: ``results.json``, ``report.md`` and the PNG plots.

Every figure in the report is read from the results of the run; the only text typed in here is the
paper's Table 1 itself (the claims under test) and the prose that explains how each figure was made.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import plots

TIMED_LABELS = {
    "attention": "attention layer",
    "attention_core": "attention core",
    "rnn": "RNN",
    "lstm": "LSTM",
    "conv": "Conv1d",
}


# --------------------------------------------------------------------------------------------------
# Number formatting
# --------------------------------------------------------------------------------------------------
def _si(x: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _f(x: float, digits: int = 2) -> str:
    """Fixed-point without a '-0.00'."""
    s = f"{x:.{digits}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def _signed(x: float, digits: int = 1) -> str:
    s = _f(x, digits)
    return f"− {s[1:]}" if s.startswith("-") else f"+ {s}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Table 1
# --------------------------------------------------------------------------------------------------
def _complexity_cell(results: dict, row: dict) -> str:
    if row["flops"] is None:
        return "— (same layer as the row above; only the path length is measured here)"
    fits, subjects = results["flops"]["fits"], results["subjects"]
    fit = fits[row["flops"]]
    formula = subjects[row["flops"]]["formula"]
    lo, hi = fit["flops_per_formula_unit_min"], fit["flops_per_formula_unit_max"]
    const = f"= {lo:.4g}·{formula}" if lo == hi else f"{lo:.3g}–{hi:.3g} × {formula}"
    text = f"∝ n^{_f(fit['exponent_n'])}·d^{_f(fit['exponent_d'])} ({const} FLOPs)"
    if row.get("flops_layer"):
        layer = fits[row["flops_layer"]]
        text = (f"attention alone: {text}; whole layer with its n·d² projections: "
                f"∝ n^{_f(layer['exponent_n'])}·d^{_f(layer['exponent_d'])}")
    return text


def _sequential_cell(results: dict, row: dict) -> str:
    if row["sequential"] is None:
        return "— (as above)"
    seq = results["sequential_ops"]
    sel = [r for r in seq["rows"] if r["layer"] == row["sequential"]]
    fit = seq["fits"][row["sequential"]]
    first, last = sel[0], sel[-1]
    return (f"{first['sequential_ops']} at n={first['n']} → {last['sequential_ops']} at n={last['n']}: "
            f"{_f(fit['slope'])}·n {_signed(fit['intercept'])} (∝ n^{_f(fit['exponent_n'])})")


def _path_cells(results: dict, row: dict) -> tuple[str, str]:
    paths = results["max_path_length"]
    sel = [r for r in paths["rows"] if r["layer"] == row["path"]]
    formula = sel[0]["paper_formula"]
    paper = f"O({formula}): " + " / ".join(f"{r['paper_value']:.3g}" for r in sel)
    measured = " / ".join("not reached" if r["layers"] is None else str(r["layers"]) for r in sel)
    fit = paths["fits"].get(row["path"], {})
    if "vs_paper" in fit:
        measured += f" = {_f(fit['vs_paper']['slope'])}·({formula}) {_signed(fit['vs_paper']['intercept'])}"
    elif fit:
        measured += f" (∝ n^{_f(fit['exponent_n'])})"
    return paper, measured


def table1_markdown(results: dict) -> str:
    """Table 1 of the paper, each column's stated value beside what this run measured or counted."""
    paths = results["max_path_length"]
    ns = " / ".join(str(n) for n in dict.fromkeys(r["n"] for r in paths["rows"]))
    rows = []
    for row in results["table1_rows"]:
        claims = row["paper_claims"]
        path_paper, path_measured = _path_cells(results, row)
        rows.append([row["label"], claims["complexity"], _complexity_cell(results, row), claims["sequential"],
                     _sequential_cell(results, row), path_paper, path_measured])
    header = ["Layer type", "Complexity per layer (paper)", "FLOPs counted (fit over n and d)",
              "Sequential ops (paper)", "Sequential ops counted (longest autograd chain)",
              f"Max path length (paper, n = {ns})", f"Max path length measured (layers, n = {ns})"]
    return _table(header, rows)


def _attention_notes(results: dict) -> list[str]:
    """Where the attention term overtakes the projections, read from the counts."""
    vs_n = results["flops"]["vs_n"]
    d = results["config"]["d_model"]
    core = {r["n"]: r["flops"] for r in vs_n if r["layer"] == "attention_core" and r["d_model"] == d}
    layer = {r["n"]: r["flops"] for r in vs_n if r["layer"] == "attention" and r["d_model"] == d}
    over = [n for n in sorted(core) if core[n] >= layer[n] - core[n]]
    n_max = max(core)
    share = core[n_max] / layer[n_max]
    where = f"from n = {over[0]} on" if over else f"at no n up to {n_max}"
    return [f"- Self-attention layer at d_model = {d}: the attention itself (QKᵀ and PV) is "
            f"{share:.0%} of the layer's counted FLOPs at n = {n_max}; it reaches the projections' share "
            f"{where}. So the whole layer's exponent in n lies between 1 and 2, while the attention alone "
            f"shows the n² term of Table 1 (exponent {_f(results['flops']['fits']['attention_core']['exponent_n'])})."]


# --------------------------------------------------------------------------------------------------
# Other sections
# --------------------------------------------------------------------------------------------------
def throughput_markdown(results: dict) -> str:
    t = results["timing"]
    impls = list(dict.fromkeys((r["layer"], r["implementation"]) for r in t["rows"]))
    header = ["n"] + [f"{TIMED_LABELS[layer]}, {impl}" for layer, impl in impls]
    rows = []
    for n in dict.fromkeys(r["n"] for r in t["rows"]):
        cells = [str(n)]
        for layer, impl in impls:
            r = next(r for r in t["rows"] if r["n"] == n and r["layer"] == layer and r["implementation"] == impl)
            cells.append(_si(r["tokens_per_s"]) if r["status"] == "measured" else "not timed (no CUDA device)"
                         if results["config"]["device"] != "cuda" else "not timed")
        rows.append(cells)
    return _table(header, rows)


def disturbance_note(results: dict) -> str:
    """Says how many timings had rounds that disagree, i.e. were disturbed by other work on the machine."""
    t = results["timing"]
    measured = [r for r in t["rows"] if r["status"] == "measured"]
    if results["config"]["timing"]["rounds"] < 2:
        return "Each timing is a single round, so disturbances by other work cannot be told apart."
    return (f"{t['cells_with_disagreeing_rounds']} of {len(measured)} timings had round medians more than "
            f"{t['rounds_disagree_factor']}× apart (other work on the machine disturbed them); the least-disturbed "
            "round is reported.")


def timing_detail_markdown(results: dict) -> str:
    header = ["layer", "implementation", "n", "median ms", "IQR ms", "min–max ms", "runs", "median of each round ms",
              "tokens/s", "GFLOP/s"]
    rows = []
    for r in results["timing"]["rows"]:
        if r["status"] != "measured":
            continue
        rows.append([TIMED_LABELS[r["layer"]], r["implementation"], r["n"], _ms(r["median_s"]),
                     f"{_ms(r['p25_s'])}–{_ms(r['p75_s'])}", f"{_ms(r['min_s'])}–{_ms(r['max_s'])}", r["repeats"],
                     ", ".join(_ms(m) for m in r["round_medians_s"]), _si(r["tokens_per_s"]),
                     f"{r['flops_per_s'] / 1e9:.3g}"])
    return _table(header, rows)


def flops_markdown(results: dict) -> str:
    f = results["flops"]
    d = results["config"]["d_model"]
    header = ["layer", "n", "FLOPs counted", "paper's term", "its value", "counted / term",
              "FlopCounterMode on the module as it runs"]
    rows = [[r["layer"], r["n"], f"{r['flops']:,}", r["formula"], f"{r['formula_value']:,.0f}",
             f"{r['flops_per_formula_unit']:.4g}", f"{r['direct_flops']:,}"]
            for r in f["vs_n"] if r["d_model"] == d]
    return _table(header, rows)


def flops_fits_markdown(results: dict) -> str:
    f = results["flops"]
    header = ["layer", "exponent in n (counted / paper's term)", "exponent in d (counted / paper's term)",
              "counted / paper's term", "module count as run equals it", "how counted"]
    rows = []
    for key, fit in f["fits"].items():
        lo, hi = fit["flops_per_formula_unit_min"], fit["flops_per_formula_unit_max"]
        rows.append([key, f"{_f(fit['exponent_n'])} / {_f(fit['formula_exponent_n'])}",
                     f"{_f(fit['exponent_d'])} / {_f(fit['formula_exponent_d'])}",
                     f"{lo:.4g}" if lo == hi else f"{lo:.3g}–{hi:.3g}",
                     "yes" if fit["direct_count_matches"]
                     else f"no ({fit['direct_flops_at_max_n']:,} at the largest n)", fit["method"]])
    return _table(header, rows)


def sequential_markdown(results: dict) -> str:
    seq = results["sequential_ops"]
    keys = list(seq["fits"])
    rows = []
    for n in dict.fromkeys(r["n"] for r in seq["rows"]):
        rows.append([n] + [next(r["sequential_ops"] for r in seq["rows"] if r["n"] == n and r["layer"] == k)
                           for k in keys])
    rows.append(["fit"] + [f"{_f(seq['fits'][k]['slope'])}·n {_signed(seq['fits'][k]['intercept'])}" for k in keys])
    return _table(["n"] + keys, rows)


def paths_markdown(results: dict) -> str:
    p = results["max_path_length"]
    keys = list(dict.fromkeys(r["layer"] for r in p["rows"]))
    rows = []
    for n in dict.fromkeys(r["n"] for r in p["rows"]):
        cells = [n]
        for k in keys:
            r = next(r for r in p["rows"] if r["n"] == n and r["layer"] == k)
            cells.append(f"{r['layers']} ({r['paper_formula']} = {r['paper_value']:.3g})")
        rows.append(cells)
    main = _table(["n"] + keys, rows)
    by_k = _table(["kernel width k", "n", "layers measured", "paper n/k"],
                  [[r["kernel_size"], r["n"], r["layers"], f"{r['paper_value']:.3g}"] for r in p["by_kernel_size"]])
    return main + "\n\nContiguous convolutions of different widths:\n\n" + by_k


def environment_markdown(results: dict) -> str:
    env = results["environment"]
    cuda = env["cuda"]
    lines = [
        f"- Date (UTC): {env['date_utc']}",
        f"- Command: `{env['command']}`",
        f"- Wall time of the run: {results['wall_time_s']:.0f} s",
        f"- CPU: {env['cpu']} ({env['cpu_count']} logical cores, torch uses {env['torch_threads']} threads)",
        f"- GPU: {cuda['name']} (sm {cuda['capability']}, {cuda['memory_gib']} GiB), CUDA {cuda['cuda_runtime']}, "
        f"driver {cuda['driver']}" if cuda else "- GPU: none (no CUDA device visible to torch)",
        f"- Python {env['python']} on {env['platform']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- Git commit: {env['git']['commit']}" + (" (tracked files modified)" if env["git"]["dirty"] else ""),
        "- Environment variables: " + ", ".join(f"{k}={v}" for k, v in env["env"].items()),
        f"- Load average (1 min) at the start / end of the run: {env['load_average_start']} / "
        f"{env['load_average_end']} (other work on the machine competes with the timings)",
    ]
    return "\n".join(lines)


def methods_markdown(results: dict) -> str:
    cfg = results["config"]
    t = results["timing"]
    plan = cfg["timing"]
    probe = t["kernels_probe"]
    per_round = (f"`triton.testing.do_bench` (warm-up {plan['warmup_ms']} ms, {plan['rep_ms']} ms of runs, L2 "
                 "cache flushed before each run), every run kept" if cfg["device"] == "cuda" else
                 f"{plan['warmup']} untimed warm-up call(s), then `time.perf_counter` around each call for at "
                 f"least {plan['min_repeats']} and at most {plan['max_repeats']} calls or {plan['budget_s']} s")
    timing = (f"the whole grid of layers and lengths is swept {plan['rounds']} time(s); per cell and round: "
              f"{per_round}. The figures reported are those of the cell's least-disturbed round (the one with the "
              "lowest median): its median, interquartile range and min–max. The median of every round, and in "
              "results.json the statistics of all runs pooled, are given beside it")
    return "\n".join([
        f"- **Layers** (d_model = {cfg['d_model']}, {cfg['num_heads']} heads, kernel width k = {cfg['kernel_size']}, "
        f"restricted neighbourhood r = {cfg['restricted_r']}): see `benchmarks/layers.py`. The self-attention layer is "
        "q/k/v/out projections around SDPA; the attention core is SDPA alone on the input split into heads.",
        f"- **Time**: forward passes under `torch.inference_mode` on batch {cfg['batch']} in {cfg['dtype']} on "
        f"{cfg['device']}: {timing}. Tokens/s = batch·n / median. GFLOP/s = batch × counted FLOPs / median. "
        f"On this device `kernels.scaled_dot_product_attention` took the `{probe['last_path']}` path "
        "(`kernels.last_path`). Restricted self-attention is counted, not timed.",
        "- **FLOPs**: `torch.utils.flop_counter.FlopCounterMode` on CPU in float32, one sequence (batch 1); it counts "
        "matrix products and convolutions at 2 FLOPs per multiply-add, not elementwise work. Where it cannot see "
        "inside a fused kernel (it reports 0 for `nn.LSTM` and for torch's CPU flash-attention kernel; the counts "
        "of the modules as they run are in the FLOPs table), the layer is counted through an equivalent that "
        "computes the same function: SDPA on its MATH backend, and the recurrence unrolled cell by cell with the "
        "module's own weights (the tests check it reproduces `nn.RNN`/`nn.LSTM`). The paper's term is the "
        "expression inside Table 1's O(·); `counted / term` is then the hidden constant. Exponents are "
        f"least-squares slopes of log FLOPs on log n (d = {cfg['d_model']}) and on log d "
        f"(n = {cfg['d_sweep_seqlen']}).",
        "- **Sequential operations**: the number of autograd nodes on the longest dependency chain of one forward "
        "pass (grad enabled), i.e. the steps that must run one after another however many processors there are. "
        "Each node (one aten op: a matmul, a softmax, a tanh) counts as one step, as in the paper; the logarithmic "
        "depth of the reductions inside an op is not counted. "
        "For the recurrences the chain of the cell-by-cell unrolling is used; `nn.LSTM` as it runs on CPU is a "
        "single fused node whose chain is constant because it hides its loop (column `lstm_module`), while "
        "`nn.RNN` on CPU is unrolled by aten itself (column `rnn_module`).",
        f"- **Maximum path length**: layers of width {results['max_path_length']['width']} in float64 are stacked, "
        "fresh weights per layer, and the fewest layers after which output n−1 depends on input 0 is found with "
        "forward-mode AD (the Jacobian block d out[n−1]/d in[0] becomes nonzero). The recurrences are applied as an "
        "iterated map, one time step per application (each application runs the cell at every position on the "
        "state the previous application left at the position before), which reproduces the sequential result "
        "after n applications. Contiguous convolutions use centred padding, so a layer reaches (k−1)/2 positions "
        "back; the dilated stack is causal with dilations 1, k, k², … (ByteNet/WaveNet style); the restricted "
        "self-attention window is centred too, so a layer reaches r/2 positions back. The paper's "
        "O(·) expressions are evaluated at each n beside the count, and `a·(term) + b` is the least-squares line "
        "of the counts on them.",
    ])


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    cfg, env, t = results["config"], results["environment"], results["timing"]
    device = env["cuda"]["name"] if env["cuda"] else env["cpu"]
    parts = [
        '# Table 1 of "Attention Is All You Need", measured',
        f"Suite `table1`, {env['date_utc']}, {cfg['device']} ({device}), "
        f"{'quick' if results['quick'] else 'full'} run, wall time {results['wall_time_s']:.0f} s, "
        f"commit {env['git']['commit'] or 'unknown'}.",
    ]
    if t["triton_not_timed_reason"]:
        parts.append(f"**Triton kernels: {t['triton_not_timed_reason']}**")
    parts += [
        "## Table 1: stated vs measured",
        "Vaswani et al. (2017), Table 1 and Sec. 4, beside what this run counted. "
        "n: sequence length, d: representation width, k: kernel width, r: neighbourhood size.",
        table1_markdown(results),
        "\n".join(_attention_notes(results)),
        f"## Throughput (tokens/s, forward, batch {cfg['batch']}, {cfg['dtype']}, {cfg['device']})",
        "![throughput](throughput.png)",
        throughput_markdown(results),
        disturbance_note(results),
        "### Timings in detail",
        timing_detail_markdown(results),
        f"## FLOPs per layer (one sequence, d_model = {cfg['d_model']})",
        "![flops](flops.png)",
        flops_fits_markdown(results),
        "### Counts at each n",
        flops_markdown(results),
        "## Sequential operations (longest autograd chain)",
        "![table1](table1.png)",
        sequential_markdown(results),
        "## Maximum path length (layers from input 0 to output n−1; the paper's term in parentheses)",
        paths_markdown(results),
        "## How each figure was obtained",
        methods_markdown(results),
        "## Environment",
        environment_markdown(results),
    ]
    return "\n\n".join(parts) + "\n"


def write(results: dict, out_dir: Path) -> list[Path]:
    """Write results.json, the plots and report.md into ``out_dir``; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    written = [json_path, *plots.write_all(results, out_dir)]
    md_path = out_dir / "report.md"
    md_path.write_text(markdown(results))
    return [*written, md_path]
