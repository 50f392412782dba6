"""Suite ``attention``: the cost of attention versus sequence length, for every implementation at hand.

For head_dim 64 and 128, causal and not, over sequence lengths (on GPU doubling up to 131072 or until
memory runs out; small on CPU), each backend's forward and backward time, peak memory, FLOPs and
achieved TFLOP/s with the share of the matmul rate this run measured on the device:

* ours: ``transformer_kernels.scaled_dot_product_attention`` (the Triton kernels; timed only on CUDA, since on a
  CPU they run in Triton's interpreter);
* every ``torch.nn.functional.scaled_dot_product_attention`` backend that exists here (math,
  efficient, flash, cuDNN), each forced with ``torch.nn.attention.sdpa_kernel``;
* FlexAttention (``torch.nn.attention.flex_attention``, compiled) where it runs;
* naive eager attention (softmax(Q K^T) V, the score matrix materialized) until it runs out of memory.

Past one device (``context_parallel``, :mod:`benchmarks.context_parallel`): per-rank FLOPs, bytes each rank
sends and per-rank memory of context-parallel attention (ring and all-to-all) by world size, counted in
spawned gloo groups, and the longest sequence whose attention fits a device's memory for each.

With ``trace_dir`` set (``python -m benchmarks attention --trace``) one causal forward+backward of every
backend that ran, at the second sequence length and the largest head_dim, is recorded with
``torch.profiler`` and exported as a Chrome trace (``trace-<backend>.json``, open in Perfetto).

FLOPs follow DESIGN.md: forward 4 * batch * heads * seqlen^2 * head_dim, halved when causal, backward
2.5x forward; the run checks the forward formula against ``torch.utils.flop_counter`` once.
The total token count per step is held near 16k (batch = 16384 // seqlen), heads * head_dim = 2048.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import transformer_kernels as tk

from .measure import device_limits, is_oom, peak_memory, sync, time_fn


@dataclass(frozen=True)
class Config:
    seqlens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
    head_dims: tuple[int, ...] = (64, 128)
    causal: tuple[bool, ...] = (False, True)
    tokens: int = 16384
    width: int = 2048  # heads * head_dim
    dtype: str = "bfloat16"
    backward: bool = True
    trace_dir: str | None = None  # where to write torch.profiler Chrome traces; None: no traces
    context_parallel: str | None = "full"  # "full", "quick" or None: the section past one device

    @classmethod
    def for_device(cls, device: str, quick: bool = False, **overrides) -> "Config":
        if device == "cuda":
            base = dict(seqlens=(1024, 4096), context_parallel="quick") if quick else {}
        else:  # the CPU sweep: small, float32, ours not timed
            base = dict(seqlens=(64, 128) if quick else (128, 256, 512, 1024), head_dims=(64,), tokens=1024,
                        width=256, dtype="float32", context_parallel="quick" if quick else "full")
        return cls(**{**base, **overrides})


def attention_flops(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of attention: two (seqlen x seqlen x head_dim) products per head, halved when causal."""
    flops = 4.0 * batch * heads * seqlen * seqlen * head_dim
    return flops / 2 if causal else flops


def check_flop_formula(device: str) -> dict:
    """``torch.utils.flop_counter`` on the math backend against :func:`attention_flops` (non-causal)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.randn(2, 4, 128, 64, device=device) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, k, v)
    counted = counter.get_total_flops()
    formula = attention_flops(2, 4, 128, 64, False)
    return {"counted": counted, "formula": formula, "ratio": counted / formula}


def _naive(q, k, v, causal):
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def backends(device: str) -> dict:
    """name -> (callable(q, k, v, causal) or None, why it is not timed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    found = {}
    if device == "cuda":
        found["ours (Triton)"] = (lambda q, k, v, c: tk.scaled_dot_product_attention(q, k, v, is_causal=c), None)
    else:
        found["ours (Triton)"] = (None, "not timed: no CUDA device (on a CPU the kernels run in Triton's "
                                        "interpreter, so a timing would not be the kernel's)")
    for label, backend in (("torch math", SDPBackend.MATH), ("torch efficient", SDPBackend.EFFICIENT_ATTENTION),
                           ("torch flash", SDPBackend.FLASH_ATTENTION), ("torch cuDNN", SDPBackend.CUDNN_ATTENTION)):
        def run(q, k, v, c, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=c)
        found[label] = (run, _probe(run, device))
    found["FlexAttention"] = _flex(device) if device == "cuda" else (
        None, "not timed on CPU: compiled anew for every shape, minutes per sweep; runs on CUDA")
    found["naive eager"] = (lambda q, k, v, c: _naive(q, k, v, c), None)
    return {name: (fn if why is None else None, why) for name, (fn, why) in found.items()}


def _probe(fn, device: str) -> str | None:
    """None if ``fn`` runs on a small bf16/fp32 problem here, else why not."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(1, 2, 64, 64, device=device, dtype=dtype)
    try:
        fn(q, q, q, True)
        return None
    except Exception as error:  # noqa: BLE001 - every reason a backend is unavailable is reported
        return f"not available here: {type(error).__name__}: {str(error).splitlines()[0][:160]}"


def _flex(device: str):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        return None, f"not available: {error}"
    compiled = torch.compile(flex_attention, dynamic=False)
    masks: dict[tuple, object] = {}

    def run(q, k, v, causal):
        block_mask = None
        if causal:
            key = (q.shape[-2], q.device)
            if key not in masks:
                masks[key] = create_block_mask(lambda b, h, i, j: j <= i, None, None, q.shape[-2], q.shape[-2],
                                               device=q.device)
            block_mask = masks[key]
        return compiled(q, k, v, block_mask=block_mask)

    return run, _probe(run, device)


def _measure(fn, q, k, v, causal, device, backward) -> dict:
    fwd = lambda: fn(q, k, v, causal)  # noqa: E731
    row = {"forward": time_fn(fwd, device), "peak_bytes_forward": peak_memory(fwd, device)}
    if backward:
        out = fwd()
        dout = torch.randn_like(out)

        def bwd():
            for t in (q, k, v):
                t.grad = None
            out.backward(dout, retain_graph=True)

        row["backward"] = time_fn(bwd, device)
        row["peak_bytes_forward_backward"] = peak_memory(lambda: fwd().backward(dout), device)
        del out
    return row


def run(cfg: Config, device: str, progress: bool = True) -> dict:
    dtype = getattr(torch, cfg.dtype)
    limits = device_limits(device, dtype)
    found = backends(device)
    rows, stopped = [], set()
    cases = [(d, c, n, name) for d in cfg.head_dims for c in cfg.causal for n in cfg.seqlens for name in found]
    interrupted = None
    try:
        for head_dim, causal, seqlen, name in tqdm(cases, desc="attention cost", disable=not progress, unit="case"):
            fn, why = found[name]
            heads, batch = cfg.width // head_dim, max(1, cfg.tokens // seqlen)
            row = dict(backend=name, head_dim=head_dim, causal=causal, seqlen=seqlen, batch=batch, heads=heads,
                       dtype=cfg.dtype, flops_forward=attention_flops(batch, heads, seqlen, head_dim, causal))
            row["flops_backward"] = 2.5 * row["flops_forward"]
            if fn is None or (name, head_dim, causal) in stopped:
                row["status"] = why or "skipped: ran out of memory at a shorter sequence"
                rows.append(row)
                continue
            try:
                q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=dtype,
                                       requires_grad=cfg.backward) for _ in range(3))
                row.update(_measure(fn, q, k, v, causal, device, cfg.backward), status="measured")
            except Exception as error:  # noqa: BLE001 - out of memory ends this backend's sweep; others are reported
                row["status"] = ("out of memory" if is_oom(error) else f"failed: {type(error).__name__}: "
                                 f"{str(error).splitlines()[0][:160]}")
                stopped.add((name, head_dim, causal))
            finally:
                q = k = v = None
                if device == "cuda":
                    torch.cuda.empty_cache()
            if row["status"] == "measured":
                _rates(row, limits)
            rows.append(row)
    except KeyboardInterrupt:  # a lease that runs out (timeout -s INT) still leaves what was measured
        interrupted = f"stopped by SIGINT after {len(rows)} of {len(cases)} cases"
    results = {"suite": "attention", "config": {**asdict(cfg), "device": device}, "device_limits": limits,
               "rows": rows}
    if interrupted:  # the run's limit is near: no traces, no projections
        return {**results, "interrupted": interrupted, "traces": {}}
    sync(device)
    results.update(flop_formula_check=check_flop_formula(device),
                   traces=export_traces(found, cfg, device, dtype) if cfg.trace_dir else {})
    if cfg.context_parallel:
        import tempfile

        from . import context_parallel

        cp_cfg = context_parallel.Config.quick() if cfg.context_parallel == "quick" else context_parallel.Config()
        with tempfile.TemporaryDirectory() as work:
            results["context_parallel"] = context_parallel.run(cp_cfg, Path(work))
    return results


def export_traces(found: dict, cfg: Config, device: str, dtype: torch.dtype) -> dict:
    """backend -> Chrome trace file name (or why none): one causal forward+backward under torch.profiler,
    after one untraced warm-up call so compilation stays out of the trace."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    seqlen, head_dim = cfg.seqlens[min(1, len(cfg.seqlens) - 1)], max(cfg.head_dims)
    heads, batch = cfg.width // head_dim, max(1, cfg.tokens // seqlen)
    out_dir = Path(cfg.trace_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    traces = {}
    for name, (fn, why) in found.items():
        if fn is None:
            traces[name] = why
            continue
        try:
            q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            fn(q, k, v, True).sum().backward()
            with profile(activities=activities, record_shapes=True) as prof:
                fn(q, k, v, True).sum().backward()
                sync(device)
            path = out_dir / f"trace-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.json"
            prof.export_chrome_trace(str(path))
            traces[name] = path.name
        except Exception as error:  # noqa: BLE001 - a backend that fails here is reported, the others traced
            traces[name] = f"not traced: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return traces


def _rates(row: dict, limits: dict) -> None:
    row["tflop_per_s_forward"] = row["flops_forward"] / row["forward"]["median_s"] / 1e12
    row["pct_of_matmul_peak_forward"] = 100 * row["tflop_per_s_forward"] / limits["matmul_tflop_per_s"]
    if "backward" in row:
        row["tflop_per_s_backward"] = row["flops_backward"] / row["backward"]["median_s"] / 1e12
        row["pct_of_matmul_peak_backward"] = 100 * row["tflop_per_s_backward"] / limits["matmul_tflop_per_s"]
