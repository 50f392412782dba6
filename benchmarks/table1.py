"""The ``table1`` suite: measure what Table 1 of Vaswani et al. (2017) only states.

Table 1 ("Maximum path lengths, per-layer complexity and minimum number of sequential operations for
different layer types") and Sec. 4 ("Why Self-Attention") compare self-attention, recurrent and
convolutional layers on three counts. For one layer of each kind (self-attention, restricted
self-attention, nn.RNN, nn.LSTM, nn.GRU, contiguous, dilated and depthwise-separable nn.Conv1d) at the
paper's base size (d_model 512, 8 heads, convolution kernel width 3) this suite

* counts FLOPs per layer with ``torch.utils.flop_counter`` beside the Table 1 formula, over n and
  over d, and fits the exponents (:func:`measure_flops`);
* counts sequential operations as the longest dependency chain of the autograd graph
  (:func:`measure_sequential`);
* measures the maximum path length by Jacobian reachability through stacks of layers
  (:func:`measure_paths`);
* times forward and forward+backward passes over n, batch size and d (tokens/s, time exponents), with
  the Triton kernels of this library beside torch's SDPA when a CUDA device is present
  (:func:`measure_timing`);
* finds, per d, the length n* above which a self-attention layer costs more than a recurrent one, by
  counted FLOPs and by time (:func:`measure_crossover`; Sec. 4 claims n* = d).

:func:`run` does all five and returns one JSON-ready dict; :mod:`benchmarks.report` writes it out.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import stats
from .flops import count_flops, cumulative_flops, math_sdpa
from .graph import sequential_ops
from .layers import (AttentionCore, Convolution, Recurrent, RestrictedSelfAttention, SelfAttention,
                     SeparableConvolution, UnrolledRecurrence)
from .paths import layer_stack, path_length
from .timing import METHODS, MODES, TimingPlan, forward_backward, sample

# Table 1 as printed in the paper: the claims this suite tests (not results).
PAPER = {
    "self_attention": {"layer": "Self-Attention", "complexity": "O(n²·d)", "sequential": "O(1)", "max_path": "O(1)"},
    "recurrent": {"layer": "Recurrent", "complexity": "O(n·d²)", "sequential": "O(n)", "max_path": "O(n)"},
    "convolutional": {"layer": "Convolutional", "complexity": "O(k·n·d²)", "sequential": "O(1)",
                      "max_path": "O(log_k(n)) dilated, O(n/k) contiguous"},
    "restricted": {"layer": "Self-Attention (restricted)", "complexity": "O(r·n·d)", "sequential": "O(1)",
                   "max_path": "O(n/r)"},
    # Not a row of Table 1: Sec. 4 gives its complexity only; sequential ops and path are a contiguous
    # convolution's, since the pointwise part does not mix positions.
    "separable": {"layer": "Separable convolution (Sec. 4)", "complexity": "O(k·n·d + n·d²)",
                  "sequential": "O(1) (as convolutional)", "max_path": "O(n/k) (as contiguous convolutional)"},
}


@dataclass(frozen=True)
class Config:
    """Sizes of one run. The defaults are the full CPU run; :meth:`quick` is the smoke-test run."""

    d_model: int = 512  # the paper's base model (Table 3)
    num_heads: int = 8
    kernel_size: int = 3
    restricted_r: int = 16  # neighbourhood size r of restricted self-attention (the paper fixes none)
    batch: int = 4
    seqlens: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
    d_sweep: tuple[int, ...] = (64, 128, 256, 512, 1024)  # FLOPs and forward time over d, at n = d_sweep_seqlen
    d_sweep_seqlen: int = 256
    batch_sweep: tuple[int, ...] = (1, 4, 16)  # throughput over batch size, at n = batch_sweep_seqlen
    batch_sweep_seqlen: int = 256
    crossover_d: tuple[int, ...] = (64, 128, 256, 512)  # n* where attention overtakes a recurrence, per d
    crossover_max_ratio: int = 3  # FLOP crossover searched for n up to this multiple of d
    path_width: int = 8  # path lengths need no width, so they are measured on narrow layers
    path_heads: int = 2
    path_seqlens: tuple[int, ...] = (16, 32, 64, 128)
    path_kernel_sizes: tuple[int, ...] = (3, 5, 7)
    timing: TimingPlan = field(default_factory=TimingPlan)
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> Config:
        """A reduced sweep (3 lengths, one round of few runs) for the smoke test: well under a minute."""
        small = dict(seqlens=(16, 64, 256), d_sweep=(64, 128, 256), d_sweep_seqlen=64, batch_sweep=(1, 4),
                     batch_sweep_seqlen=64, crossover_d=(32, 64), path_seqlens=(16, 32), path_kernel_sizes=(3, 5),
                     timing=TimingPlan(rounds=1, warmup=1, min_repeats=3, max_repeats=5, budget_s=0.2, rep_ms=20))
        return cls(**{**small, **overrides})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# What is measured: layers, their countable equivalents, and the paper's formula for each
# --------------------------------------------------------------------------------------------------
def _as_is(layer: nn.Module) -> Callable:
    return layer


def _with_math_sdpa(layer: nn.Module) -> Callable:
    def run(x):
        with math_sdpa():
            return layer(x)

    return run


@dataclass(frozen=True)
class Subject:
    """One layer kind: how to build it at width d, how to count it, and Table 1's term for it."""

    key: str
    label: str
    row: str  # key of PAPER
    build: Callable[[Config, int], nn.Module]
    countable: Callable[[nn.Module], Callable]  # the same function in a form FlopCounterMode sees
    count_method: str
    formula: str
    formula_value: Callable[[Config, int, int], float]  # (cfg, n, d) -> the paper's term


def _recurrent(kind: str, label: str, note: str = "") -> Subject:
    """A recurrent layer, counted through its cell-by-cell unrolling (Table 1's n·d² row)."""
    return Subject(kind, label, "recurrent", lambda c, d: Recurrent(kind, d), UnrolledRecurrence,
                   "FlopCounterMode over the cell-by-cell unrolling with the module's weights" + note,
                   "n·d²", lambda c, n, d: n * d * d)


SUBJECTS = {s.key: s for s in (
    Subject("attention", "self-attention layer (q/k/v/out projections + SDPA)", "self_attention",
            lambda c, d: SelfAttention(d, c.num_heads), _with_math_sdpa,
            "FlopCounterMode over the layer with SDPA on torch's MATH backend (plain matmuls); "
            "the CPU flash kernel has no FLOP formula in torch.utils.flop_counter",
            "n²·d", lambda c, n, d: n * n * d),
    Subject("attention_core", "self-attention core (SDPA alone, no projections)", "self_attention",
            lambda c, d: AttentionCore(d, c.num_heads), _with_math_sdpa,
            "FlopCounterMode over F.scaled_dot_product_attention on the MATH backend",
            "n²·d", lambda c, n, d: n * n * d),
    _recurrent("rnn", "nn.RNN(d, d), tanh"),
    _recurrent("lstm", "nn.LSTM(d, d)", " (the fused nn.LSTM kernel has no FLOP formula)"),
    _recurrent("gru", "nn.GRU(d, d)", " (the fused nn.GRU kernel has no FLOP formula)"),
    Subject("conv", "nn.Conv1d(d, d, k), same padding", "convolutional",
            lambda c, d: Convolution(d, c.kernel_size), _as_is,
            "FlopCounterMode over the layer (aten.convolution)",
            "k·n·d²", lambda c, n, d: c.kernel_size * n * d * d),
    Subject("separable", "depthwise nn.Conv1d(d, d, k, groups=d) then pointwise nn.Conv1d(d, d, 1)", "separable",
            lambda c, d: SeparableConvolution(d, c.kernel_size), _as_is,
            "FlopCounterMode over the layer (two aten.convolution)",
            "k·n·d + n·d²", lambda c, n, d: c.kernel_size * n * d + n * d * d),
    Subject("restricted", "restricted self-attention layer (projections + windowed attention)", "restricted",
            lambda c, d: RestrictedSelfAttention(d, c.num_heads, c.restricted_r), _as_is,
            "FlopCounterMode over the layer (windows gathered with unfold, products as einsum/bmm)",
            "r·n·d", lambda c, n, d: c.restricted_r * n * d),
    Subject("restricted_core", "restricted self-attention core (windowed attention alone)", "restricted",
            lambda c, d: AttentionCore(d, c.num_heads, window=c.restricted_r), _as_is,
            "FlopCounterMode over the windowed attention", "r·n·d", lambda c, n, d: c.restricted_r * n * d),
)}


def _build(cfg: Config, key: str, d: int, salt: int = 0) -> nn.Module:
    torch.manual_seed(cfg.seed + salt)
    return SUBJECTS[key].build(cfg, d).eval()


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=True, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# FLOPs (Table 1, "Complexity per Layer")
# --------------------------------------------------------------------------------------------------
def count_subject(cfg: Config, key: str, n: int, d: int) -> dict:
    """FLOPs of one forward pass of one sequence (batch 1), as run and through the countable form."""
    subject = SUBJECTS[key]
    layer = _build(cfg, key, d)
    x = torch.randn(1, n, d)
    direct = count_flops(lambda: layer(x))
    counted = count_flops(lambda: subject.countable(layer)(x))
    formula_value = subject.formula_value(cfg, n, d)
    return {
        "layer": key, "n": n, "d_model": d, "batch": 1,
        "direct_flops": direct["total"], "direct_by_op": direct["by_op"],
        "flops": counted["total"], "by_op": counted["by_op"],
        "formula": subject.formula, "formula_value": formula_value,
        "flops_per_formula_unit": counted["total"] / formula_value,
    }


def measure_flops(cfg: Config, progress: bool = True) -> dict:
    """Counts over n at d_model and over d at d_sweep_seqlen, with the fitted exponents of each."""
    keys = list(SUBJECTS)
    vs_n, vs_d = [], []
    with _bar(len(keys) * (len(cfg.seqlens) + len(cfg.d_sweep)), "FLOPs", progress) as bar:
        for key in keys:
            for n in cfg.seqlens:
                vs_n.append(count_subject(cfg, key, n, cfg.d_model))
                bar.update()
            for d in cfg.d_sweep:
                vs_d.append(count_subject(cfg, key, cfg.d_sweep_seqlen, d))
                bar.update()
    fits = {}
    for key in keys:
        rn = [r for r in vs_n if r["layer"] == key]
        rd = [r for r in vs_d if r["layer"] == key]
        ratios = [r["flops_per_formula_unit"] for r in rn + rd]
        fits[key] = {
            "exponent_n": stats.loglog_exponent([r["n"] for r in rn], [r["flops"] for r in rn]),
            "exponent_d": stats.loglog_exponent([r["d_model"] for r in rd], [r["flops"] for r in rd]),
            "formula_exponent_n": stats.loglog_exponent([r["n"] for r in rn], [r["formula_value"] for r in rn]),
            "formula_exponent_d": stats.loglog_exponent([r["d_model"] for r in rd], [r["formula_value"] for r in rd]),
            "flops_per_formula_unit_min": min(ratios),
            "flops_per_formula_unit_max": max(ratios),
            "direct_count_matches": all(r["direct_flops"] == r["flops"] for r in rn + rd),
            "direct_flops_at_max_n": rn[-1]["direct_flops"],
            "method": SUBJECTS[key].count_method,
        }
    return {"vs_n": vs_n, "vs_d": vs_d, "fits": fits, "d_sweep_seqlen": cfg.d_sweep_seqlen}


# --------------------------------------------------------------------------------------------------
# Sequential operations (Table 1, "Sequential Operations")
# --------------------------------------------------------------------------------------------------
SEQUENTIAL = {  # key -> (subject, wrap, how the graph was obtained)
    "attention": ("attention", _as_is, "autograd graph of the layer as it runs (torch SDPA)"),
    "conv": ("conv", _as_is, "autograd graph of the layer as it runs"),
    "restricted": ("restricted", _as_is, "autograd graph of the layer as it runs"),
    "rnn_module": ("rnn", _as_is, "autograd graph of nn.RNN as it runs on CPU (aten unrolls it step by step)"),
    "rnn_unrolled": ("rnn", UnrolledRecurrence, "autograd graph of the cell-by-cell unrolling"),
    "lstm_module": ("lstm", _as_is, "autograd graph of nn.LSTM as it runs on CPU: one fused node hides the loop"),
    "lstm_unrolled": ("lstm", UnrolledRecurrence, "autograd graph of the cell-by-cell unrolling"),
    "gru_module": ("gru", _as_is, "autograd graph of nn.GRU as it runs on CPU: one fused node hides the loop"),
    "gru_unrolled": ("gru", UnrolledRecurrence, "autograd graph of the cell-by-cell unrolling"),
    "separable": ("separable", _as_is, "autograd graph of the layer as it runs"),
}


def measure_sequential(cfg: Config, progress: bool = True) -> dict:
    """Longest dependency chain of one forward pass, per layer and n, with linear and log-log fits."""
    rows = []
    with _bar(len(SEQUENTIAL) * len(cfg.seqlens), "sequential ops", progress) as bar:
        for key, (subject, wrap, method) in SEQUENTIAL.items():
            layer = wrap(_build(cfg, subject, cfg.d_model))
            for n in cfg.seqlens:
                ops = sequential_ops(layer, torch.randn(1, n, cfg.d_model))
                rows.append({"layer": key, "n": n, "d_model": cfg.d_model, "sequential_ops": ops, "method": method})
                bar.update()
    fits = {}
    for key in SEQUENTIAL:
        ns = [r["n"] for r in rows if r["layer"] == key]
        ops = [r["sequential_ops"] for r in rows if r["layer"] == key]
        fits[key] = {**stats.linear_fit(ns, ops), "exponent_n": stats.loglog_exponent(ns, ops)}
    return {"rows": rows, "fits": fits}


# --------------------------------------------------------------------------------------------------
# Maximum path length (Table 1, "Maximum Path Length")
# --------------------------------------------------------------------------------------------------
def _path_subjects(cfg: Config) -> dict:
    """key -> (label, steps factory, paper formula, paper value at n)."""
    w, h, k, r = cfg.path_width, cfg.path_heads, cfg.kernel_size, cfg.restricted_r
    return {
        "attention": ("stack of self-attention layers",
                      lambda: layer_stack(lambda i: SelfAttention(w, h).double()), "1", lambda n: 1.0),
        "rnn": ("nn.RNN recurrence, one time step per application",
                lambda: UnrolledRecurrence(Recurrent("rnn", w).double()).iterations, "n", float),
        "lstm": ("nn.LSTM recurrence, one time step per application",
                 lambda: UnrolledRecurrence(Recurrent("lstm", w).double()).iterations, "n", float),
        "gru": ("nn.GRU recurrence, one time step per application",
                lambda: UnrolledRecurrence(Recurrent("gru", w).double()).iterations, "n", float),
        "conv": (f"stack of contiguous convolutions, k={k}, centred",
                 lambda: layer_stack(lambda i: Convolution(w, k).double()), "n/k", lambda n: n / k),
        "conv_dilated": (f"stack of causal dilated convolutions, k={k}, dilation k^i",
                         lambda: layer_stack(lambda i: Convolution(w, k, k**i, causal=True).double()),
                         "log_k(n)", lambda n: math.log(n, k)),
        "separable": (f"stack of depthwise-separable convolutions, k={k}, centred",
                      lambda: layer_stack(lambda i: SeparableConvolution(w, k).double()), "n/k", lambda n: n / k),
        "restricted": (f"stack of restricted self-attention layers, r={r}",
                       lambda: layer_stack(lambda i: RestrictedSelfAttention(w, h, r).double()),
                       "n/r", lambda n: n / r),
    }


def _path_row(cfg: Config, key: str, label: str, steps, formula: str, paper: float, n: int, **extra) -> dict:
    torch.manual_seed(cfg.seed)
    layers = path_length(steps, n, cfg.path_width, max_steps=2 * n + 16, seed=cfg.seed)
    return {"layer": key, "label": label, "n": n, "d_model": cfg.path_width, "layers": layers,
            "paper_formula": formula, "paper_value": paper, **extra}


def measure_paths(cfg: Config, progress: bool = True) -> dict:
    """Fewest layers (or recurrence steps) connecting input 0 to output n-1, per layer kind and n."""
    subjects = _path_subjects(cfg)
    n_max = max(cfg.path_seqlens)
    rows, by_kernel = [], []
    with _bar(len(subjects) * len(cfg.path_seqlens) + len(cfg.path_kernel_sizes), "path length", progress) as bar:
        for key, (label, make_steps, formula, paper) in subjects.items():
            for n in cfg.path_seqlens:
                rows.append(_path_row(cfg, key, label, make_steps(), formula, paper(n), n))
                bar.update()
        for k in cfg.path_kernel_sizes:
            w = cfg.path_width
            steps = layer_stack(lambda i, k=k: Convolution(w, k).double())
            by_kernel.append(_path_row(cfg, "conv", f"contiguous convolutions, k={k}", steps, "n/k", n_max / k,
                                       n_max, kernel_size=k))
            bar.update()
    fits = {}
    for key in subjects:
        sel = [r for r in rows if r["layer"] == key and r["layers"] is not None]
        if len(sel) >= 2:
            ns, ls = [r["n"] for r in sel], [r["layers"] for r in sel]
            fits[key] = {**stats.linear_fit(ns, ls), "exponent_n": stats.loglog_exponent(ns, ls)}
            paper = [r["paper_value"] for r in sel]
            if len(set(paper)) > 1:  # measured = a * paper value + b
                fits[key]["vs_paper"] = stats.linear_fit(paper, ls)
    return {"rows": rows, "by_kernel_size": by_kernel, "fits": fits, "width": cfg.path_width}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
TIMED = (  # (layer, implementation, SDPA backend or None)
    ("attention", "torch SDPA", "torch"),
    ("attention", "Triton SDPA (kernels)", "triton"),
    ("attention_core", "torch SDPA", "torch"),
    ("attention_core", "Triton SDPA (kernels)", "triton"),
    ("rnn", "torch nn.RNN", None),
    ("lstm", "torch nn.LSTM", None),
    ("gru", "torch nn.GRU", None),
    ("conv", "torch nn.Conv1d", None),
    ("separable", "torch nn.Conv1d depthwise + pointwise", None),
)
RECURRENT = ("rnn", "lstm", "gru")


@dataclass(frozen=True)
class Cell:
    """One timing: a layer and implementation at sequence length n, width d, batch size and mode."""

    layer: str
    impl: str
    backend: str | None
    n: int
    d: int
    batch: int
    mode: str  # one of timing.MODES


def timing_cells(cfg: Config) -> list[Cell]:
    """The timing grid, without repeats: every layer over n (both modes) and over batch size (both modes)
    at d_model; over d at ``d_sweep_seqlen`` (forward); attention and the recurrences over n at each
    ``crossover_d`` (forward), for the crossover in time."""
    cells = []
    for mode in MODES:
        cells += [Cell(k, i, b, n, cfg.d_model, cfg.batch, mode) for n in cfg.seqlens for k, i, b in TIMED]
        cells += [Cell(k, i, b, cfg.batch_sweep_seqlen, cfg.d_model, batch, mode)
                  for batch in cfg.batch_sweep for k, i, b in TIMED]
    cells += [Cell(k, i, b, cfg.d_sweep_seqlen, d, cfg.batch, "forward") for d in cfg.d_sweep for k, i, b in TIMED]
    cells += [Cell(k, i, b, n, d, cfg.batch, "forward") for d in cfg.crossover_d for n in cfg.seqlens
              for k, i, b in TIMED if k == "attention" or k in RECURRENT]
    return list(dict.fromkeys(cells))


def probe_kernels(device: str, dtype: torch.dtype) -> dict:
    """Which path ``transformer_kernels.scaled_dot_product_attention`` takes on this device (transformer_kernels.last_path)."""
    import transformer_kernels as tk
    from transformer_kernels import dispatch

    q = torch.randn(1, 1, 16, 16, device=device, dtype=dtype)
    tk.scaled_dot_product_attention(q, q, q)
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "last_path": tk.last_path("attention"),
            "interpreter": bool(dispatch.INTERPRETER)}


def triton_timed(device: str, probe: dict) -> str | None:
    """None when the Triton rows are timed; otherwise the plain reason why not."""
    if device != "cuda":
        path = "the Triton interpreter" if probe["interpreter"] else f"its {probe['last_path']} path"
        return (f"not timed: no CUDA device. The Triton kernels run compiled only on CUDA; on this {device} "
                f"transformer_kernels.scaled_dot_product_attention takes {path} (transformer_kernels.last_path), "
                "so a timing here would not be the Triton kernel's.")
    if probe["last_path"] != "triton":
        return f"not timed: transformer_kernels.scaled_dot_product_attention took the {probe['last_path']} path on CUDA"
    return None


def _call(layer: nn.Module, x: torch.Tensor, backend: str | None, mode: str) -> Callable[[], object]:
    """The call to time: the layer (with the Triton SDPA swapped in for backend "triton"), forward only
    or forward+backward (:func:`benchmarks.timing.forward_backward`)."""
    if backend == "triton":
        import transformer_kernels as tk

        def call(t):
            return layer(t, sdpa=tk.scaled_dot_product_attention)
    else:
        call = layer
    if mode == "forward":
        return lambda: call(x)
    return forward_backward(call, layer, x)


DISAGREE = 1.5  # round medians further apart than this factor mark a disturbed measurement


class _FlopCache:
    """Counted forward FLOPs of one sequence, by (layer, n, d), counted on the meta device when first asked."""

    def __init__(self, cfg: Config, known: list[dict]):
        self.cfg = cfg
        self.counts = {(r["layer"], r["n"], r["d_model"]): r["flops"] for r in known}

    def __call__(self, key: str, n: int, d: int) -> int:
        if (key, n, d) not in self.counts:
            self.counts[key, n, d] = count_on_meta(self.cfg, key, n, d)
        return self.counts[key, n, d]


def count_on_meta(cfg: Config, key: str, n: int, d: int) -> int:
    """FLOPs of one sequence through the countable form of ``key``, on the meta device (shapes only)."""
    subject = SUBJECTS[key]
    layer = subject.build(cfg, d).to("meta")
    x = torch.empty(1, n, d, device="meta")
    return count_flops(lambda: subject.countable(layer)(x))["total"]


def _timed_row(cell: Cell, x: torch.Tensor, rounds: list[list[float]], flops_per_seq: int | None,
               path_ran: str | None) -> dict:
    """Summary of one cell: the least-disturbed round (lowest median) is the headline, pooled runs beside."""
    per_round = [stats.summarize(runs) for runs in rounds]
    best = min(per_round, key=lambda r: r["median_s"])
    medians = [r["median_s"] for r in per_round]
    row = {**_cell_json(cell, x), "status": "measured", **best, "round_medians_s": medians,
           "rounds_disagree": max(medians) > DISAGREE * min(medians),
           "pooled": stats.summarize([t for runs in rounds for t in runs]), "method": METHODS[x.device.type]}
    if path_ran:
        row["path_ran"] = path_ran
    row["tokens_per_s"] = cell.batch * cell.n / row["median_s"]
    if flops_per_seq is not None:  # forward only: the counter counts forward passes
        row.update(flops=cell.batch * flops_per_seq, flops_per_s=cell.batch * flops_per_seq / row["median_s"])
    return row


def _cell_json(cell: Cell, x: torch.Tensor) -> dict:
    return {"layer": cell.layer, "implementation": cell.impl, "n": cell.n, "d_model": cell.d, "batch": cell.batch,
            "mode": cell.mode, "input_shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", ""),
            "device": x.device.type}


def measure_timing(cfg: Config, device: str, dtype: torch.dtype, flops: list[dict], progress: bool = True) -> dict:
    """Time of every cell of :func:`timing_cells`, or why it was not timed (the Triton rows off CUDA).

    The whole grid is swept ``cfg.timing.rounds`` times; see :func:`_timed_row` for how rounds combine.
    """
    import transformer_kernels as tk

    probe = probe_kernels(device, dtype)
    skip_triton = triton_timed(device, probe)
    cells = timing_cells(cfg)
    todo = [c for c in cells if not (c.backend == "triton" and skip_triton)]
    layers = {(k, d): _build(cfg, k, d).to(device=device, dtype=dtype) for k, d in {(c.layer, c.d) for c in cells}}
    inputs = {}
    for batch, n, d in sorted({(c.batch, c.n, c.d) for c in cells}):
        torch.manual_seed(cfg.seed)
        inputs[batch, n, d] = torch.randn(batch, n, d, device=device, dtype=dtype)
    times: dict[Cell, list[list[float]]] = {c: [] for c in todo}  # one list of runs per round
    paths: dict[Cell, str] = {}
    failed: dict[Cell, str] = {}
    with _bar(cfg.timing.rounds * len(todo), f"timing on {device}", progress) as bar:
        for _ in range(cfg.timing.rounds):
            for c in todo:
                x, layer = inputs[c.batch, c.n, c.d], layers[c.layer, c.d]
                layer.train(c.mode != "forward")  # cuDNN's RNN backward refuses eval mode; no layer has dropout
                try:
                    times[c].append(sample(_call(layer, x, c.backend, c.mode), device, cfg.timing,
                                           grad=c.mode != "forward"))
                except Exception as error:  # noqa: BLE001 - a cell that fails is reported, the grid goes on
                    failed[c] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
                if c.backend:
                    paths[c] = tk.last_path("attention") if c.backend == "triton" else "torch"
                bar.update()
                if device == "cuda":
                    torch.cuda.empty_cache()
    count = _FlopCache(cfg, flops["vs_n"] + flops["vs_d"])
    rows = []
    for c in cells:
        x = inputs[c.batch, c.n, c.d]
        if c in failed:
            rows.append({**_cell_json(c, x), "status": "failed", "reason": failed[c]})
        elif c in times:
            per_seq = count(c.layer, c.n, c.d) if c.mode == "forward" else None
            rows.append(_timed_row(c, x, times[c], per_seq, paths.get(c)))
        else:
            rows.append({**_cell_json(c, x), "status": "not timed", "reason": skip_triton})
    disturbed = sum(r.get("rounds_disagree", False) for r in rows)
    return {"rows": rows, "kernels_probe": probe, "triton_not_timed_reason": skip_triton,
            "rounds_disagree_factor": DISAGREE, "cells_with_disagreeing_rounds": disturbed,
            "fits": timing_fits(cfg, rows)}


def timing_fits(cfg: Config, rows: list[dict]) -> dict:
    """Exponents of forward time: in n at d_model and batch ``cfg.batch``, in d at ``d_sweep_seqlen``."""
    fits = {}
    for key, impl, _ in TIMED:
        mine = [r for r in rows if r["layer"] == key and r["implementation"] == impl and r["status"] == "measured"
                and r["mode"] == "forward" and r["batch"] == cfg.batch]
        over_n = sorted((r["n"], r["median_s"]) for r in mine if r["d_model"] == cfg.d_model)
        over_d = sorted((r["d_model"], r["median_s"]) for r in mine
                        if r["n"] == cfg.d_sweep_seqlen and r["d_model"] in cfg.d_sweep)
        if len(over_n) >= 2 and len(over_d) >= 2:
            fits[f"{key}|{impl}"] = {"layer": key, "implementation": impl,
                                     "exponent_n": stats.loglog_exponent(*zip(*over_n)),
                                     "exponent_d": stats.loglog_exponent(*zip(*over_d))}
    return fits


# --------------------------------------------------------------------------------------------------
# Crossover: the n* above which a self-attention layer costs more than a recurrent one (Sec. 4)
# --------------------------------------------------------------------------------------------------
CROSSOVER_PAIRS = (  # (attention subject, recurrent subject)
    ("attention_core", "rnn"),  # the paper's comparison: n²·d against n·d²
    ("attention", "rnn"),
    ("attention", "lstm"),
    ("attention", "gru"),
)


def flop_crossover(cfg: Config, attention: str, recurrent: str, d: int, recurrent_counts: list[int]) -> dict:
    """Smallest n with more counted FLOPs in ``attention`` than in ``recurrent`` at width d.

    ``recurrent_counts[n - 1]`` is the recurrence's count at length n (:func:`recurrent_flops`); the
    attention count grows with n, so n* is found by bisection over lengths 1..len(recurrent_counts).
    """
    n_max = len(recurrent_counts)
    attention_count = functools.cache(lambda n: count_on_meta(cfg, attention, n, d))

    def attention_costlier(n: int) -> bool:
        return attention_count(n) > recurrent_counts[n - 1]

    row = {"attention": attention, "recurrent": recurrent, "d_model": d, "searched_up_to_n": n_max}
    if not attention_costlier(n_max):
        return {**row, "n_star": None, "status": f"attention cheaper at every n <= {n_max}"}
    lo, hi = 0, n_max  # attention_costlier(hi) holds; lo is 0 or a length where it does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if attention_costlier(mid) else (mid, hi)
    return {**row, "n_star": hi, "n_star_over_d": hi / d, "status": "crossed",
            "attention_flops_at_n_star": attention_count(hi),
            "recurrent_flops_at_n_star": recurrent_counts[hi - 1]}


def recurrent_flops(cfg: Config, key: str, d: int, n_max: int) -> list[int]:
    """Counted FLOPs of the unrolled recurrence at every length 1..n_max, in one pass on the meta device."""
    layer = UnrolledRecurrence(SUBJECTS[key].build(cfg, d).to("meta"))
    return cumulative_flops(layer.stepwise(torch.empty(1, n_max, d, device="meta")))


def time_crossover(rows: list[dict], attention_impl: str, recurrent: str, d: int, batch: int) -> dict | None:
    """The n above which the attention layer's forward time stays above the recurrence's, on the grid.

    Between the last grid length where the time ratio is <= 1 and the next, n* is interpolated
    linearly in log n against log(ratio). None when either series was not timed.
    """
    def series(layer, impl=None):
        return {r["n"]: r["median_s"] for r in rows if r["layer"] == layer and r["d_model"] == d and
                r["batch"] == batch and r["mode"] == "forward" and r["status"] == "measured" and
                (impl is None or r["implementation"] == impl)}

    att, rec = series("attention", attention_impl), series(recurrent)
    ns = sorted(set(att) & set(rec))
    if len(ns) < 2:
        return None
    ratio = [att[n] / rec[n] for n in ns]
    row = {"attention_implementation": attention_impl, "recurrent": recurrent, "d_model": d, "batch": batch,
           "n": ns, "time_ratio": ratio}
    below = [i for i, r in enumerate(ratio) if r <= 1]
    if not below:
        return {**row, "n_star": None, "status": f"attention slower at every n (from n = {ns[0]})"}
    i = below[-1]  # n* is where attention becomes, and on the grid stays, the costlier one
    if i < len(ns) - 1:
        (n0, r0), (n1, r1) = (ns[i], ratio[i]), (ns[i + 1], ratio[i + 1])
        frac = -math.log(r0) / (math.log(r1) - math.log(r0))  # r0 <= 1 < r1
        n_star = math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0)))
        return {**row, "n_star": n_star, "n_star_over_d": n_star / d, "status": "crossed"}
    return {**row, "n_star": None, "status": f"attention not slower at the longest n = {ns[-1]}"}


def measure_crossover(cfg: Config, timing_rows: list[dict], progress: bool = True) -> dict:
    """n* by counted FLOPs (exact, one sequence) and by forward time (interpolated), per d."""
    ds = sorted(set(cfg.crossover_d) | {cfg.d_model})  # the timing grid has every layer at d_model too
    by_flops = []
    with _bar(len(cfg.crossover_d) * len(RECURRENT), "crossover (FLOPs)", progress) as bar:
        for d in cfg.crossover_d:
            n_max = cfg.crossover_max_ratio * d
            for recurrent in RECURRENT:
                counts = recurrent_flops(cfg, recurrent, d, n_max)
                by_flops += [flop_crossover(cfg, a, r, d, counts) for a, r in CROSSOVER_PAIRS if r == recurrent]
                bar.update()
    impls = [i for k, i, _ in TIMED if k == "attention"]
    by_time = [t for d in ds for impl in impls for rec in RECURRENT
               if (t := time_crossover(timing_rows, impl, rec, d, cfg.batch)) is not None]
    return {"by_flops": by_flops, "by_time": by_time, "d_values": ds, "max_ratio": cfg.crossover_max_ratio}


# --------------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------------
TABLE1_ROWS = (  # Table 1 row -> which measurements stand for it
    {"key": "self_attention", "paper": "self_attention", "label": "Self-Attention",
     "flops": "attention_core", "flops_layer": "attention", "sequential": "attention", "path": "attention"},
    {"key": "recurrent_rnn", "paper": "recurrent", "label": "Recurrent (nn.RNN)",
     "flops": "rnn", "sequential": "rnn_unrolled", "path": "rnn"},
    {"key": "recurrent_lstm", "paper": "recurrent", "label": "Recurrent (nn.LSTM)",
     "flops": "lstm", "sequential": "lstm_unrolled", "path": "lstm"},
    {"key": "recurrent_gru", "paper": "recurrent", "label": "Recurrent (nn.GRU)",
     "flops": "gru", "sequential": "gru_unrolled", "path": "gru"},
    {"key": "convolutional", "paper": "convolutional", "label": "Convolutional (contiguous, k={k})",
     "flops": "conv", "sequential": "conv", "path": "conv"},
    {"key": "convolutional_dilated", "paper": "convolutional", "label": "Convolutional (dilated, k={k})",
     "flops": None, "sequential": None, "path": "conv_dilated"},
    {"key": "convolutional_separable", "paper": "separable", "label": "Convolutional (separable, k={k})",
     "flops": "separable", "sequential": "separable", "path": "separable"},
    {"key": "restricted", "paper": "restricted", "label": "Self-Attention (restricted, r={r})",
     "flops": "restricted_core", "flops_layer": "restricted", "sequential": "restricted", "path": "restricted"},
)


def run(cfg: Config, device: str = "cpu", progress: bool = True) -> dict:
    """Run the whole table1 suite; returns a JSON-ready dict (see :mod:`benchmarks.report`)."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    flops = measure_flops(cfg, progress)
    sequential = measure_sequential(cfg, progress)
    paths = measure_paths(cfg, progress)
    timing = measure_timing(cfg, device, dtype, flops, progress)
    crossover = measure_crossover(cfg, timing["rows"], progress)
    rows = [{**r, "label": r["label"].format(k=cfg.kernel_size, r=cfg.restricted_r), "paper_claims": PAPER[r["paper"]]}
            for r in TABLE1_ROWS]
    return {
        "suite": "table1",
        "config": {**cfg.to_json(), "device": device, "dtype": str(dtype).replace("torch.", "")},
        "paper": PAPER,
        "table1_rows": rows,
        "subjects": {k: {"label": s.label, "count_method": s.count_method, "formula": s.formula}
                     for k, s in SUBJECTS.items()},
        "flops": flops,
        "sequential_ops": sequential,
        "max_path_length": paths,
        "timing": timing,
        "crossover": crossover,
    }
