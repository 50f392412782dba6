"""Write a table1 run to a folder: ``results.json``, ``report.md`` and the PNG plots.

Every figure in the report is read from the results of the run; the only text typed in here is the
paper's Table 1 itself (the claims under test) and the prose that explains how each figure was made.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import plots
from .suite_report import _write_csv

TIMED_LABELS = {
    "attention": "attention layer",
    "attention_core": "attention core",
    "rnn": "RNN",
    "lstm": "LSTM",
    "gru": "GRU",
    "conv": "Conv1d",
    "separable": "separable Conv1d",
}
TIME_SUBJECT = {  # Table 1 row -> the timed layer whose growth stands for it (torch's implementation)
    "self_attention": "attention_core", "recurrent_rnn": "rnn", "recurrent_lstm": "lstm", "recurrent_gru": "gru",
    "convolutional": "conv", "convolutional_separable": "separable",
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
    formula = f"({formula})" if "+" in formula else formula
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


def _time_cell(results: dict, row: dict) -> str:
    layer = TIME_SUBJECT.get(row["key"])
    fits = results["timing"].get("fits", {})
    fit = next((f for f in fits.values() if f["layer"] == layer and f["implementation"].startswith("torch")), None)
    if fit is None:
        return "— (not timed)"
    text = f"∝ n^{_f(fit['exponent_n'])}·d^{_f(fit['exponent_d'])}"
    if row["key"] == "self_attention" and "attention|torch SDPA" in fits:
        whole = fits["attention|torch SDPA"]
        text = (f"attention alone: {text}; whole layer: ∝ n^{_f(whole['exponent_n'])}·d^{_f(whole['exponent_d'])}")
    return text


def table1_markdown(results: dict) -> str:
    """Table 1 of the paper, each column's stated value beside what this run measured or counted."""
    paths = results["max_path_length"]
    ns = " / ".join(str(n) for n in dict.fromkeys(r["n"] for r in paths["rows"]))
    rows = []
    for row in results["table1_rows"]:
        claims = row["paper_claims"]
        path_paper, path_measured = _path_cells(results, row)
        rows.append([row["label"], claims["complexity"], _complexity_cell(results, row), _time_cell(results, row),
                     claims["sequential"], _sequential_cell(results, row), path_paper, path_measured])
    cfg = results["config"]
    header = ["Layer type", "Complexity per layer (paper)", "FLOPs counted (fit over n and d)",
              f"Forward time measured (fit over n and d, {cfg['device']})",
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
def _cell_text(results: dict, r: dict | None) -> str:
    if r is None:
        return "—"
    if r["status"] == "measured":
        return _si(r["tokens_per_s"])
    if r["status"] == "failed":
        return "failed (reason in results.json)"
    return "not timed (no CUDA device)" if results["config"]["device"] != "cuda" else "not timed"


def throughput_markdown(results: dict, mode: str, over: str = "n") -> str:
    """Tokens/s of every (layer, implementation) in ``mode``, over n (at batch ``cfg.batch``) or over batch
    size (at n = ``batch_sweep_seqlen``), at d_model."""
    cfg, t = results["config"], results["timing"]
    fixed = {"n": ("batch", cfg["batch"]), "batch": ("n", cfg["batch_sweep_seqlen"])}[over]
    rows_ = [r for r in t["rows"] if r["mode"] == mode and r["d_model"] == cfg["d_model"] and r[fixed[0]] == fixed[1]]
    # implementations never timed here (Triton off CUDA) are left out; the report's header says why
    impls = list(dict.fromkeys((r["layer"], r["implementation"]) for r in rows_ if r["status"] == "measured"))
    header = [over] + [f"{TIMED_LABELS[layer]}, {impl}" for layer, impl in impls]
    table = []
    for x in sorted({r[over] for r in rows_}):
        table.append([str(x)] + [_cell_text(results, next((r for r in rows_ if r[over] == x and r["layer"] == layer
                                                           and r["implementation"] == impl), None))
                                 for layer, impl in impls])
    return _table(header, table)


def time_fits_markdown(results: dict) -> str:
    cfg, fits = results["config"], results["timing"].get("fits", {})
    header = ["layer", "implementation", f"time exponent in n (d = {cfg['d_model']})",
              f"time exponent in d (n = {cfg['d_sweep_seqlen']})"]
    return _table(header, [[TIMED_LABELS[f["layer"]], f["implementation"], _f(f["exponent_n"]), _f(f["exponent_d"])]
                           for f in fits.values()])


def crossover_markdown(results: dict) -> str:
    """n* per d: by counted FLOPs (exact) and by forward time (interpolated on the grid)."""
    c = results["crossover"]
    pairs = list(dict.fromkeys((f["attention"], f["recurrent"]) for f in c["by_flops"]))
    flop_rows = []
    for d in dict.fromkeys(f["d_model"] for f in c["by_flops"]):
        cells = [d]
        for a, rec in pairs:
            f = next(f for f in c["by_flops"] if (f["attention"], f["recurrent"], f["d_model"]) == (a, rec, d))
            cells.append(f"{f['n_star']} ({_f(f['n_star_over_d'])}·d)" if f["n_star"] else f["status"])
        flop_rows.append(cells)
    flops_table = _table(["d"] + [f"{TIMED_LABELS[a]} vs {TIMED_LABELS[rec]}: n*" for a, rec in pairs], flop_rows)
    time_rows = [[t["d_model"], f"attention layer ({t['attention_implementation']}) vs {TIMED_LABELS[t['recurrent']]}",
                  f"{t['n_star']:.0f}" if t["n_star"] else t["status"], _f(t["n_star_over_d"]) if t["n_star"] else "—",
                  " / ".join(f"{x:.2g}" for x in t["time_ratio"])]
                 for t in c["by_time"]]
    ns = " / ".join(str(n) for n in c["by_time"][0]["n"]) if c["by_time"] else ""
    time_table = _table(["d", "attention vs recurrence", "n* (forward time)", "n*/d", f"time ratio at n = {ns}"],
                        time_rows)
    return ("By counted FLOPs (one sequence; the smallest n at which the attention count exceeds the "
            "recurrence's):\n\n" + flops_table + "\n\nBy forward time on this device (batch "
            f"{results['config']['batch']}):\n\n" + time_table)


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
    header = ["layer", "implementation", "mode", "n", "d", "batch", "median ms", "IQR ms", "min–max ms", "runs", "median of each round ms",
              "tokens/s", "GFLOP/s"]
    rows = []
    for r in results["timing"]["rows"]:
        if r["status"] != "measured":
            continue
        rows.append([TIMED_LABELS[r["layer"]], r["implementation"], r["mode"], r["n"], r["d_model"], r["batch"],
                     _ms(r["median_s"]),
                     f"{_ms(r['p25_s'])}–{_ms(r['p75_s'])}", f"{_ms(r['min_s'])}–{_ms(r['max_s'])}", r["repeats"],
                     ", ".join(_ms(m) for m in r["round_medians_s"]), _si(r["tokens_per_s"]),
                     f"{r['flops_per_s'] / 1e9:.3g}" if "flops_per_s" in r else "—"])
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
        f"- **Time**: in {cfg['dtype']} on {cfg['device']}, forward passes under `torch.inference_mode` and "
        "forward+backward steps (`torch.autograd.grad` of the output, with a fixed random cotangent, with respect "
        "to the input and every parameter). Grid: every layer over n at batch "
        f"{cfg['batch']} and over batch sizes {', '.join(map(str, cfg['batch_sweep']))} at n = "
        f"{cfg['batch_sweep_seqlen']}, both modes, at d = {cfg['d_model']}; forward over d = "
        f"{', '.join(map(str, cfg['d_sweep']))} at n = {cfg['d_sweep_seqlen']}; the attention layer and the "
        f"recurrences forward over n at d = {', '.join(map(str, cfg['crossover_d']))} for the crossover. "
        f"{timing}. Tokens/s = batch·n / median. GFLOP/s (forward only) = batch × counted FLOPs / median. Time "
        "exponents are least-squares slopes of log median time on log n and on log d. "
        f"On this device `transformer_kernels.scaled_dot_product_attention` took the `{probe['last_path']}` path "
        "(`transformer_kernels.last_path`). Restricted self-attention is counted, not timed.",
        f"- **Crossover n\***: by FLOPs, the recurrence unrolled cell by cell is counted once over n = 1 … "
        f"{results['crossover']['max_ratio']}·d on the `meta` device (shapes only, nothing computed), reading the "
        "running count after every time step, and the attention layer's count (also on `meta`) is bisected over n "
        "against it: n\* is the smallest n at which attention counts more FLOPs. By time, n\* is where the ratio of "
        "forward medians crosses 1, interpolated linearly in log n against log ratio between the two grid lengths "
        "around it. Sec. 4 of the paper states self-attention is faster than recurrence when n < d, comparing "
        "n²·d against n·d² (our `attention core vs RNN` row).",
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
        "## Crossover: where self-attention becomes costlier than recurrence",
        "![crossover](crossover.png)",
        crossover_markdown(results),
        f"## Throughput (tokens/s, d_model = {cfg['d_model']}, {cfg['dtype']}, {cfg['device']})",
        "![throughput](throughput.png)",
        f"### Forward, batch {cfg['batch']}",
        throughput_markdown(results, "forward"),
        f"### Forward+backward, batch {cfg['batch']}",
        throughput_markdown(results, "forward+backward"),
        f"### Over batch size at n = {cfg['batch_sweep_seqlen']}, forward",
        throughput_markdown(results, "forward", over="batch"),
        f"### Over batch size at n = {cfg['batch_sweep_seqlen']}, forward+backward",
        throughput_markdown(results, "forward+backward", over="batch"),
        "### Growth of forward time",
        time_fits_markdown(results),
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


def write_csv(results: dict, out_dir: Path) -> list[Path]:
    """results.csv (every timing), flops.csv, crossover.csv, sequential_ops.csv and max_path_length.csv."""
    tables = {
        "results.csv": results["timing"]["rows"],
        "flops.csv": [dict(sweep=s, **r) for s in ("vs_n", "vs_d") for r in results["flops"][s]],
        "crossover.csv": [dict(by=b, **r) for b in ("by_flops", "by_time") for r in results["crossover"][b]],
        "sequential_ops.csv": results["sequential_ops"]["rows"],
        "max_path_length.csv": results["max_path_length"]["rows"] + results["max_path_length"]["by_kernel_size"],
    }
    for name, rows in tables.items():
        _write_csv(rows, out_dir / name)
    return [out_dir / name for name in tables]


def write(results: dict, out_dir: Path, write_json: bool = True) -> list[Path]:
    """Write results.json, the CSVs, the plots and report.md into ``out_dir``; return the paths written.

    ``write_json=False`` re-renders the rest from a stored results.json (``python -m benchmarks report``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    if write_json:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    written = [json_path, *write_csv(results, out_dir), *plots.write_all(results, out_dir)]
    md_path = out_dir / "report.md"
    md_path.write_text(markdown(results))
    return [*written, md_path]
