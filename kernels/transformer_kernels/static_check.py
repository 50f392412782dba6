"""GPU health without a GPU: compile every shipped kernel config for sm_80 and sm_90a and read the SASS.

Each launcher is called on ``meta`` tensors (shapes and strides, no data) with the kernels swapped for
recorders, so the exact arguments, constexprs and launch options a real call would use are captured.
Each recorded launch is then compiled ahead of time (``triton.compile`` with a ``GPUTarget``, no GPU
needed) and the cubin is read with the ``cuobjdump`` shipped inside the Triton wheel:

* registers per thread and local-memory spills (``LDL``/``STL`` in the SASS, local bytes in the
  resource usage);
* tensor-core instructions for the matmul-bearing kernels in half precision: ``HMMA`` (mma.sync)
  on sm_80; on sm_90a ``HGMMA`` (warpgroup MMA, the fast path) or, where Triton could not use it,
  ``HMMA``. Both count as tensor-core use; the HGMMA count is reported on its own, with the number of
  warpgroup waits (``WARPGROUP.DEPBAR``): HGMMA is asynchronous, and a wait after every one of them
  means the kernel serializes its MMAs (seen when a runtime branch sat in the attention backward's loop).

Run ``python -m transformer_kernels.static_check`` (without ``TRITON_INTERPRET``) for a table; ``tests/test_static_check.py``
runs it in a subprocess and fails on any spill or missing tensor-core instruction.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import autotune, static_model

# The package re-exports functions named ffn and layer_norm, which shadow these modules as attributes.
attention = importlib.import_module("transformer_kernels.attention")
ffn = importlib.import_module("transformer_kernels.ffn")
ffn_fp8 = importlib.import_module("transformer_kernels.ffn_fp8")
dispatch = importlib.import_module("transformer_kernels.dispatch")
layer_norm = importlib.import_module("transformer_kernels.layer_norm")
rotary = importlib.import_module("transformer_kernels.rotary")

ARCHS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90a": GPUTarget("cuda", 90, 32)}
# Compiled on request only (``--arch sm_100a``, to keep the test suite's time): data-centre Blackwell
# (B200, compute capability 10.0; dispatch.target_arch). Its tensor-core instructions (tcgen05: UTCHMMA,
# UTCQMMA) keep their shapes in descriptors: the model reads them from Triton's TTGIR
# (static_model.attach_tcgen05) and rates them at B200's figures (issue 22, item 4).
EXPERIMENTAL_ARCHS = {"sm_100a": GPUTarget("cuda", 100, 32)}
_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@dataclass
class Launch:
    case: str
    kernel: str
    fn: object
    args: tuple
    kwargs: dict
    needs_mma: bool


@dataclass
class Report:
    case: str
    kernel: str
    arch: str
    registers: int
    spill_instructions: int
    stack_bytes: int
    local_bytes: int
    mma_instructions: int
    wgmma_instructions: int
    wgmma_waits: int
    needs_mma: bool
    heavy: bool = False  # attention with a score modifier (dropout, mask, ALiBi, soft-cap)
    # The steady-state loop (kernels/transformer_kernels/static_model.py), per warp and iteration unless said otherwise.
    num_warps: int = 0
    shared_bytes: int = 0
    head_dim: int = 0
    head_dim_v: int = 0
    has_loop: bool = False
    loop_instructions: int = 0
    mma_shapes: str = ""
    executed_flops: float = 0.0  # tensor-core FLOPs one CTA runs per iteration
    useful_flops: float = 0.0    # FLOPs the algorithm needs per CTA-iteration
    mufu: int = 0
    fmul: int = 0
    ffma: int = 0
    loop_waits: int = 0
    loop_loads: int = 0
    global_bytes: int = 0        # per CTA, per iteration (or for the whole program without a loop)
    t_tensor: float = 0.0        # clocks per CTA-iteration on one SM
    t_issue: float = 0.0
    t_mufu: float = 0.0
    serial_tflops: float = 0.0
    overlap_tflops: float = 0.0

    @property
    def ok(self) -> bool:
        no_spill = self.spill_instructions == 0 and self.stack_bytes == 0 and self.local_bytes == 0
        return no_spill and (self.mma_instructions > 0 or not self.needs_mma)


_MMA_KERNELS = {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_matmul_kernel"}


def _needs_mma(name: str, args: tuple, kwargs: dict) -> bool:
    """Dot-bearing kernels must use tensor cores for half types, and for fp32 when tf32 is allowed."""
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
    return name in _MMA_KERNELS and (dtype != torch.float32 or kwargs.get("PRECISION") == "tf32")


@contextlib.contextmanager
def _recording(module, names, sink, case):
    """Swap ``module.<name>`` kernels for objects that record ``kernel[grid](*args, **kwargs)``."""

    class Recorder:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                sink.append(Launch(case, self.name, self.fn, args, kwargs, _needs_mma(self.name, args, kwargs)))
            return record

    saved = {n: getattr(module, n) for n in names}
    try:
        for n, fn in saved.items():
            setattr(module, n, Recorder(n, fn))
        yield
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


# The longest candidate list a launcher offers (kernels/transformer_kernels/autotune.py); the static check compiles each.
_MAX_CANDIDATES = 5


def shipped_launches(arch: str = "sm_90a") -> list[Launch]:
    """One launch per shipped config for ``arch`` (the launchers pick configs per arch): each (dtype,
    head_dim bucket) of attention, each row-width bucket of LayerNorm, each (dtype, activation,
    epilogue) of the FFN matmul; and each of their run-time candidates, as cases named ``"... [candidate
    i]"`` (a candidate that compiles to the default's binary is not repeated)."""
    launches = []
    with dispatch.assume_arch(arch):
        for index in range(_MAX_CANDIDATES):
            with autotune.forced(index):
                batch = _record_launches()
            for launch in batch:
                launch.case += f" [candidate {index}]" if index else ""
            launches += batch
    return launches


def _record_launches() -> list[Launch]:
    launches: list[Launch] = []
    meta = dict(device="meta")
    attn_kernels = ["_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                    "_attn_combine_kernel", "_dropout_mask_kernel"]

    def attn(case, q, k, v, backward=True, dmask=None, **kw):
        # fp32 training keeps the row stats for its backward (transformer_kernels.attention.ops.attention_op)
        stats = q.new_empty((2, *q.shape[:3]), dtype=torch.float32) if backward and q.dtype == torch.float32 else None
        with _recording(attention._kernels, attn_kernels, launches, case):
            out, lse = attention.attention_forward(q, k, v, scale=0.1, **kw, stats=stats)
            if backward:
                kw.pop("num_splits", None)
                kw.pop("sinks", None)  # the backward kernels read the sinks through the logsumexp
                attention.attention_backward(out, q, k, v, out, lse, **kw, scale=0.1, stats=stats, dmask=dmask)

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        name = str(dtype)[6:]
        for head_dim in (32, 64, 128, 256):
            q = torch.empty(4, 16, 1024, head_dim, dtype=dtype, **meta)
            attn(f"attention {name} d={head_dim} causal", q, q, q, window=(-1, 0))
            if head_dim >= 64:  # decoding: 1..16 query rows, a KV cache of 8192, keys split 4 ways
                kv = torch.empty(4, 8, 8192, head_dim, dtype=dtype, **meta)
                attn(f"attention {name} d={head_dim} decode", q[:, :, :4], kv, kv, backward=False, bottom_right=True,
                     window=(-1, 0), seqused_k=torch.empty(4, dtype=torch.int32, **meta), num_splits=4)
            if dtype != torch.bfloat16 and head_dim >= 64:  # every score modifier at once bounds register use
                mask = torch.empty(4, 1, 1024, 1024, dtype=dtype, **meta).expand(4, 16, 1024, 1024)
                kv = torch.empty(4, 4, 1024, head_dim, dtype=dtype, **meta)
                attn(f"attention {name} d={head_dim} all-modifiers", q, kv, kv, window=(256, 0), softcap=30.0,
                     alibi_slopes=torch.empty(16, dtype=torch.float32, **meta), attn_mask=mask, dropout_p=0.1)
                if head_dim <= 128 and dtype == torch.float16:  # serving: pages of 64 rows, left padding, sinks
                    pool = torch.empty(512, 8, 64, head_dim, dtype=dtype, **meta)
                    attn(f"attention {name} d={head_dim} paged-sinks decode", q[:, :, :4], pool, pool, backward=False,
                         bottom_right=True, window=(-1, 0), seqused_k=torch.empty(4, dtype=torch.int32, **meta),
                         num_splits=4, block_table=torch.empty(4, 128, dtype=torch.int32, **meta),
                         leftpad=torch.empty(4, dtype=torch.int32, **meta),
                         sinks=torch.empty(16, dtype=torch.float32, **meta))
                    attn(f"attention {name} d={head_dim} paged decode", q[:, :, :4], pool, pool, backward=False,
                         bottom_right=True, window=(-1, 0), seqused_k=torch.empty(4, dtype=torch.int32, **meta),
                         num_splits=4, block_table=torch.empty(4, 128, dtype=torch.int32, **meta))
                    attn(f"attention {name} d={head_dim} sinks causal", q, q, q, window=(-1, 0),
                         sinks=torch.empty(16, dtype=torch.float32, **meta))
                if head_dim <= 128:  # a learned bias (T5): its gradient written by the dQ kernel
                    attn(f"attention {name} d={head_dim} learned-bias", q, q, q, attn_mask=mask,
                         dmask=torch.empty(4, 16, 1024, 1024, dtype=dtype, **meta))
        if dtype == torch.float16:
            for head_dim in (64, 128):
                padding = torch.empty(4, 1, 1, 1024, dtype=torch.bool, **meta).expand(4, 16, 1024, 1024)
                qp = torch.empty(4, 16, 1024, head_dim, dtype=dtype, **meta)
                attn(f"attention {name} d={head_dim} key-padding", qp, qp, qp, attn_mask=padding)
                packed = torch.empty(1, 16, 8192, head_dim, dtype=dtype, **meta)
                cu = torch.empty(9, dtype=torch.int32, **meta)
                attn(f"attention {name} d={head_dim} varlen causal", packed, packed, packed, window=(-1, 0),
                     bottom_right=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=2048, max_seqlen_k=2048)
    if dispatch.target_arch(torch.device("meta")) != "sm_80":  # FP8 tensor cores (inference forward)
        fp8 = torch.float8_e4m3fn
        for head_dim in (64, 128, 256):
            q = torch.empty(4, 16, 1024, head_dim, dtype=fp8, **meta)
            attn(f"attention float8_e4m3fn d={head_dim} causal", q, q, q, backward=False, window=(-1, 0),
                 descale=torch.empty(3, 4, 16, dtype=torch.float32, **meta))
            if head_dim <= 128:  # decoding from an FP8 cache, keys split 4 ways
                kv = torch.empty(4, 8, 8192, head_dim, dtype=fp8, **meta)
                attn(f"attention float8_e4m3fn d={head_dim} decode", q[:, :, :4], kv, kv, backward=False,
                     bottom_right=True, window=(-1, 0), seqused_k=torch.empty(4, dtype=torch.int32, **meta),
                     num_splits=4, descale=torch.empty(3, 4, 8, dtype=torch.float32, **meta))
    with _recording(attention._kernels, attn_kernels, launches, "attention dropout mask"):
        attention.dropout_keep_mask(4, 16, 1024, 1024, 0.1, 0, "meta")

    norm_kernels = ["_norm_fwd_kernel", "_norm_bwd_stats_kernel", "_norm_bwd_kernel"]
    for dtype in (torch.float16, torch.float32):
        name = str(dtype)[6:]
        for cols in (256, 1024, 4096, layer_norm.MAX_SINGLE_PASS_N, 4 * layer_norm.MAX_SINGLE_PASS_N):
            x = torch.empty(4096, cols, dtype=dtype, **meta)
            w = torch.empty(cols, dtype=dtype, **meta)
            with _recording(layer_norm, norm_kernels, launches, f"layer_norm {name} N={cols}"):
                y, _, mean, rstd = layer_norm.norm_forward(x, None, w, w, 1e-5, is_rms=False)
                layer_norm.norm_backward(y, x, w, w, mean, rstd, is_rms=False)
            # the heaviest variant: residual add, in-kernel dropout, pre-norm residual gradient
            with _recording(layer_norm, norm_kernels, launches, f"add_layer_norm+dropout {name} N={cols}"):
                y, z, mean, rstd = layer_norm.norm_forward(x, x, w, w, 1e-5, is_rms=False, dropout_p=0.1)
                layer_norm.norm_backward(y, z, w, w, mean, rstd, is_rms=False, dz_out=y, dropout_p=0.1)
            if cols in (4096, 4 * layer_norm.MAX_SINGLE_PASS_N):
                with _recording(layer_norm, norm_kernels, launches, f"rms_norm {name} N={cols}"):
                    y, _, _, rstd = layer_norm.norm_forward(x, None, w, None, 1e-5, is_rms=True)
                    layer_norm.norm_backward(y, x, w, None, None, rstd, is_rms=True)

    ffn_kernels = ["_matmul_kernel", "_ffn_elementwise_kernel"]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        activations = ffn.ACTIVATIONS if dtype == torch.float16 else ("gelu", "swiglu")
        for activation in activations:
            gated = activation in ffn.GATED_ACTIVATIONS
            x = torch.empty(4096, 1024, dtype=dtype, **meta)
            w1, w2 = torch.empty(4096, 1024, dtype=dtype, **meta), torch.empty(1024, 4096, dtype=dtype, **meta)
            b1, b2 = w1[:, 0], w2[:, 0]
            wg, bg = (w1, b1) if gated else (None, None)
            for torch_gemm in (False, True) if dtype == torch.float16 else (False,):
                route = "cublas+fused" if torch_gemm else "triton"
                with _recording(ffn, ffn_kernels, launches, f"ffn {str(dtype)[6:]} {activation} {route}"):
                    y, h, aux = ffn.ffn_forward(x, w1, b1, w2, b2, activation=activation, wg=wg, bg=bg, residual=x,
                                                use_torch_gemm=torch_gemm)
                    ffn.ffn_backward(y, x, w1, b1, w2, wg, bg, h, aux, activation=activation, needs=[True] * 7,
                                     use_torch_gemm=torch_gemm)
    # FP8 inference (sm_80 has no FP8 tensor cores: the FFN refuses there): e4m3 weights, a bf16 input
    # quantized inside the first GEMM, or an e4m3 one with its per-token scale
    if dispatch.target_arch(torch.device("meta")) != "sm_80":
        for activation in ("gelu", "swiglu"):
            gated = activation in ffn.GATED_ACTIVATIONS
            w1, w2 = (torch.empty(4096, 1024, dtype=torch.float8_e4m3fn, **meta),
                      torch.empty(1024, 4096, dtype=torch.float8_e4m3fn, **meta))
            s1, s2 = torch.empty(4096, **meta), torch.empty(1024, **meta)
            b1, b2 = torch.empty(4096, dtype=torch.bfloat16, **meta), torch.empty(1024, dtype=torch.bfloat16, **meta)
            x16 = torch.empty(4096, 1024, dtype=torch.bfloat16, **meta)
            if activation == "gelu":  # the norm that hands the FFN its e4m3 input (transformer_kernels.norm_fp8)
                with _recording(layer_norm, norm_kernels, launches, "norm_fp8 bfloat16 N=1024"):
                    layer_norm.norm_forward(x16, x16, b2, b2, 1e-5, is_rms=False, y_scale=s1)
                wide = torch.empty(64, 4 * layer_norm.MAX_SINGLE_PASS_N, dtype=torch.bfloat16, **meta)
                with _recording(layer_norm, norm_kernels, launches, f"norm_fp8 bfloat16 N={wide.shape[1]}"):
                    layer_norm.norm_forward(wide, None, wide[0], None, 1e-5, is_rms=True, y_scale=s1[:64])
            for name, x in (("bfloat16", x16),
                            ("float8_e4m3fn", torch.empty(4096, 1024, dtype=torch.float8_e4m3fn, **meta))):
                sx = torch.empty(4096, **meta) if x.dtype == torch.float8_e4m3fn else None
                case = f"ffn fp8 {activation} input={name}"
                with _recording(ffn, ffn_kernels, launches, case), \
                        _recording(ffn_fp8, ["_quantize_rows_kernel"], launches, case):
                    ffn_fp8.ffn_fp8_forward(x, w1, s1, b1, w2, s2, b2, activation=activation,
                                            wg=w1 if gated else None, sg=s1 if gated else None,
                                            bg=b1 if gated else None, residual=b2.expand(4096, 1024),
                                            input_scale=sx, out_dtype=torch.bfloat16)

    # transformers' rotary form (kernelize's rotary_pos_emb): q as transformers hands it, (b, h, s, d) viewed
    # from (b, s, h, d); cos/sin (b, s, d) broadcast over heads; forward and the conjugate (backward)
    for dtype in (torch.bfloat16, torch.float32):
        for head_dim in (64, 128):
            q = torch.empty(4, 4096, 32, head_dim, dtype=dtype, **meta).transpose(1, 2)
            table = torch.empty(4, 1, 4096, head_dim, dtype=dtype, **meta).expand(q.shape)
            with _recording(rotary, ["_rotate_half_kernel"], launches, f"rotate_half {str(dtype)[6:]} d={head_dim}"):
                rotary.rotate_half_embed(q, table, table)
                rotary.rotate_half_embed(q, table, table, conjugate=True)
    return launches


def compile_launch(launch: Launch, arch: str):
    """Compile one recorded launch for ``arch`` exactly as the JIT would specialize it; returns the kernel."""
    fn, target = launch.fn, {**ARCHS, **EXPERIMENTAL_ARCHS}[arch]
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def inspect_cubin(cubin: bytes, arch: str) -> tuple[dict, str]:
    """Registers, spills and tensor-core instruction counts read from a cubin by cuobjdump, and its SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(_CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(_CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    whole = static_model.region_stats(static_model.parse_sass(sass))
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "local_bytes": int(local.group(1)) if local else 0,
        "stack_bytes": int(stack.group(1)) if stack else 0,
        "spill_instructions": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        # the whole kernel's tensor-core instructions and warpgroup waits, counted as the loop model counts them
        "mma_instructions": sum(whole.hgmma.values()) + sum(whole.hmma.values()) + whole.tcgen05,
        "wgmma_instructions": sum(whole.hgmma.values()),
        "wgmma_waits": whole.waits,
    }, sass


def model_fields(sass: str, arch: str, kernel: str, kwargs: dict, num_warps: int, ttgir: str = "") -> dict:
    """The steady-state loop's counts and the cycle model's figures (kernels/transformer_kernels/static_model.py);
    ``ttgir`` gives Blackwell's tcgen05 products their shapes."""
    stats, has_loop = static_model.steady_loop(static_model.parse_sass(sass))
    if stats.tcgen05 and ttgir:
        static_model.attach_tcgen05(stats, ttgir)
    useful = static_model.useful_flops(kernel, kwargs)
    if kwargs.get("WS") and num_warps > kwargs["num_warps"]:
        # Warp-specialized: the steady loop is the consumers'; the producer warpgroup (the 4 warps
        # Triton adds) only issues the TMA loads, so it runs neither the MMAs nor this loop.
        num_warps -= 4
    wg, warp = stats.executed_flops(num_warps)
    c = static_model.cost(stats, num_warps, useful, arch)
    return dict(num_warps=num_warps, has_loop=has_loop, loop_instructions=stats.instructions,
                mma_shapes=stats.shapes(), executed_flops=wg + warp, useful_flops=useful, mufu=stats.mufu,
                fmul=stats.fmul, ffma=stats.ffma, loop_waits=stats.waits, loop_loads=stats.loads,
                global_bytes=stats.global_bytes_per_lane * 32 * num_warps,
                t_tensor=c.t_tensor, t_issue=c.t_issue, t_mufu=c.t_mufu, serial_tflops=c.serial_tflops,
                overlap_tflops=c.overlap_tflops)


def _specialization(arg) -> str:
    """What Triton's JIT specializes an argument on: a tensor's dtype; an int's being 1, a multiple of
    16, or neither; a float's type."""
    if isinstance(arg, torch.Tensor):
        return str(arg.dtype)
    if isinstance(arg, bool) or not isinstance(arg, int):
        return type(arg).__name__
    return "1" if arg == 1 else ("16k" if arg % 16 == 0 else "int")


def _identity(launch: Launch) -> tuple:
    """What makes two launches compile to the same binary: kernel, specialization, constexprs, options."""
    signature = tuple(_specialization(a) for a in launch.args)
    return (launch.kernel, signature, tuple(sorted((k, str(v)) for k, v in launch.kwargs.items())))


# A representative subset for the default test suite: every kernel, the HGMMA targets (bf16 and fp16,
# head_dim 64 and 128, forward and backward), the heaviest modifiers, decoding, fp32, the norms'
# single- and multi-pass kernels, the FFN's plain and gated matmuls and its cuBLAS route's elementwise
# kernel. The full sweep is
# ``python -m transformer_kernels.static_check`` (or ``STATIC_CHECK_FULL=1`` for the test).
QUICK_CASES = (
    "attention bfloat16 d=128 causal", "attention float16 d=64 causal", "attention float16 d=64 all-modifiers",
    "attention float16 d=128 decode", "attention float32 d=64 causal", "attention dropout mask",
    "layer_norm float16 N=4096", f"add_layer_norm+dropout float16 N={4 * layer_norm.MAX_SINGLE_PASS_N}",
    "ffn float16 gelu triton", "ffn float16 gelu cublas+fused", "ffn bfloat16 swiglu triton",
    "rotate_half bfloat16 d=128", "attention float8_e4m3fn d=128 causal", "ffn fp8 swiglu input=bfloat16",
)


@functools.lru_cache(maxsize=None)
def _launches(case_filters: tuple[str, ...], arch: str) -> tuple[Launch, ...]:
    """The shipped launches for ``arch`` whose case contains any of ``case_filters``, each compiled
    specialization once."""
    seen, unique = set(), []
    for launch in shipped_launches(arch):
        key = _identity(launch)
        if any(f in launch.case for f in case_filters) and key not in seen:
            seen.add(key)
            unique.append(launch)
    return tuple(unique)


# Bump when what a report holds or how inspect_cubin / model_fields derive it changes (static_model.py's
# own source is part of the key already).
_REPORT_VERSION = 3


def _cache_path(launch: Launch, arch: str) -> Path:
    """Where a launch's report is cached: keyed on the kernel's source (Triton's own hash of it and every
    function it calls), its specialization and options, the arch, Triton's version and the model."""
    root = Path(os.environ.get("KERNELS_STATIC_CACHE", Path.home() / ".cache" / "transformer-kernels" / "static_check"))
    checker = Path(static_model.__file__).read_bytes()
    key = repr((_REPORT_VERSION, launch.fn.cache_key, _identity(launch), arch, triton.__version__,
                hashlib.sha256(checker).hexdigest(),
                os.environ.get("TRITON_DEFAULT_FP_FUSION")))
    return root / f"{launch.kernel}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _report(job: tuple[tuple[str, ...], str, int]) -> Report:
    """Compile and inspect launch ``index`` of ``_launches(case_filters, arch)`` for ``arch`` (a worker's
    job); a cached report of the same binary is reused."""
    case_filters, arch, index = job
    launch = _launches(case_filters, arch)[index]
    path = _cache_path(launch, arch)
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError):
        kernel = compile_launch(launch, arch)
        info, sass = inspect_cubin(kernel.asm["cubin"], arch)
        fields = info | model_fields(sass, arch, launch.kernel, launch.kwargs, kernel.metadata.num_warps,
                                     kernel.asm.get("ttgir", ""))
        fields["shared_bytes"] = kernel.metadata.shared
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(fields))
            tmp.replace(path)
    dims = dict(head_dim=launch.kwargs.get("BLOCK_D", 0), head_dim_v=launch.kwargs.get("BLOCK_DV", 0),
                heavy=not launch.kwargs.get("SPLIT_WALK", True))
    return Report(launch.case, launch.kernel, arch, needs_mma=launch.needs_mma, **fields, **dims)


def check(case_filters=("",), archs=tuple(ARCHS), workers: int | None = None) -> list[Report]:
    """Compile every shipped launch whose case contains any of ``case_filters`` for each arch, in parallel."""
    case_filters = (case_filters,) if isinstance(case_filters, str) else tuple(case_filters)
    jobs = [(case_filters, arch, i) for arch in archs for i in range(len(_launches(case_filters, arch)))]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        return [_report(j) for j in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_report, jobs))


def attention_figures(reports: list[Report]) -> list[dict]:
    """Per attention case and arch: the model's forward and backward TFLOP/s (serial and overlap)."""
    by_case: dict[tuple[str, str], dict[str, Report]] = {}
    for r in reports:
        if r.kernel in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel") and r.useful_flops:
            by_case.setdefault((r.case, r.arch), {})[r.kernel] = r
    rows = []
    for (case, arch), ks in by_case.items():
        fwd, dkdv, dq = (ks.get(k) for k in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"))
        row = dict(case=case, arch=arch)
        for kind in ("serial", "overlap"):
            attr = f"{kind}_tflops"
            row[f"fwd_{kind}"] = getattr(fwd, attr) if fwd else 0.0
            row[f"bwd_{kind}"] = static_model.backward_tflops(
                dkdv.head_dim, dkdv.head_dim_v, getattr(dkdv, attr), getattr(dq, attr)) if dkdv and dq else 0.0
        rows.append(row)
    return rows


def _print_tables(reports: list[Report]) -> None:
    print(f"{'case':38} {'kernel':24} {'arch':6} {'regs':>4} {'spill':>5} {'smem':>6} {'warps':>5} {'loop':>5} "
          f"{'mma shapes':26} {'exec/useful':>11} {'mufu':>4} {'fmul':>4} {'ffma':>4} {'waits':>5} "
          f"{'t_tc':>6} {'t_iss':>6} {'t_mufu':>6} {'serial':>6} {'ovlap':>6}  ok")
    for r in reports:
        ratio = f"{r.executed_flops / r.useful_flops:.2f}" if r.useful_flops else "-"
        print(f"{r.case:38} {r.kernel:24} {r.arch:6} {r.registers:4} {r.spill_instructions + r.stack_bytes + r.local_bytes:5} "
              f"{r.shared_bytes:6} {r.num_warps:5} {r.loop_instructions:5} {r.mma_shapes[:26]:26} {ratio:>11} "
              f"{r.mufu:4} {r.fmul:4} {r.ffma:4} {r.loop_waits:5} {r.t_tensor:6.0f} {r.t_issue:6.0f} {r.t_mufu:6.0f} "
              f"{r.serial_tflops:6.0f} {r.overlap_tflops:6.0f}  {'yes' if r.ok else 'NO'}")
    figures = attention_figures(reports)
    if figures:
        machines = ", ".join(f"{m.name} for {a}" for a, m in static_model.MACHINES.items())
        print(f"\nAttention, the model's TFLOP/s (steady state; {machines}; backward counted as 2.5x the forward's "
              f"FLOPs)")
        print(f"{'case':44} {'arch':6} {'fwd serial':>10} {'fwd ovlap':>10} {'bwd serial':>10} {'bwd ovlap':>10}")
        for f in figures:
            print(f"{f['case']:44} {f['arch']:6} {f['fwd_serial']:10.0f} {f['fwd_overlap']:10.0f} "
                  f"{f['bwd_serial']:10.0f} {f['bwd_overlap']:10.0f}")


def markdown(reports: list[Report], before: list[dict] | None = None) -> str:
    """The model's report as Markdown (benchmarks/NOTES.md, README): attention figures per case and arch,
    then every tensor-core loop; with ``before`` (an earlier ``--json`` run), each figure as before -> after."""
    old_fig = {(f["case"], f["arch"]): f for f in attention_figures([Report(**_fields(r)) for r in before or []])}
    old_row = {(r["case"], r["kernel"], r["arch"]): r for r in before or []}

    def pair(old, new, fmt="{:.0f}"):
        return fmt.format(new) if old is None else f"{fmt.format(old)} -> {fmt.format(new)}"

    lines = ["| case | arch | fwd serial | fwd overlap | bwd serial | bwd overlap |", "|---|---|---|---|---|---|"]
    for f in attention_figures(reports):
        o = old_fig.get((f["case"], f["arch"]), {})
        lines.append(f"| {f['case']} | {f['arch']} | " + " | ".join(
            pair(o.get(k), f[k]) for k in ("fwd_serial", "fwd_overlap", "bwd_serial", "bwd_overlap")) + " |")
    lines += ["", "| case | kernel | arch | warps | regs | loop instr | MMA shapes | executed/useful | MUFU | FMUL "
              "| serial TFLOP/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        if not r.useful_flops:
            continue
        o = old_row.get((r.case, r.kernel, r.arch))
        ratio = lambda x: x["executed_flops"] / x["useful_flops"] if x["useful_flops"] else 0.0  # noqa: E731
        lines.append(f"| {r.case} | {r.kernel} | {r.arch} | {pair(o and o['num_warps'], r.num_warps)} | "
                     f"{pair(o and o['registers'], r.registers)} | {pair(o and o['loop_instructions'], r.loop_instructions)} | "
                     f"{r.mma_shapes} | {pair(o and ratio(o), ratio(asdict(r)), '{:.2f}')} | {pair(o and o['mufu'], r.mufu)} | "
                     f"{pair(o and o['fmul'], r.fmul)} | {pair(o and o['serial_tflops'], r.serial_tflops)} |")
    return "\n".join(lines)


def _fields(row: dict) -> dict:
    return {k: v for k, v in row.items() if k in Report.__dataclass_fields__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--filter", action="append", default=[],
                        help="only cases whose name contains this text (repeatable: any of them)")
    parser.add_argument("--quick", action="store_true", help="the representative subset the test suite checks")
    parser.add_argument("--arch", action="append", choices=sorted({**ARCHS, **EXPERIMENTAL_ARCHS}),
                        help="only this arch (repeatable; sm_100a only when named)")
    parser.add_argument("--markdown", action="store_true", help="print the model's figures as Markdown tables")
    parser.add_argument("--before", type=Path, help="with --markdown: an earlier --json run, shown as before -> after")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run without TRITON_INTERPRET=1: the interpreter cannot compile kernels")
    filters = tuple(args.filter) + (QUICK_CASES if args.quick else ())
    reports = check(filters or ("",), archs=tuple(args.arch or ARCHS))
    if args.json:
        print(json.dumps([asdict(r) | {"ok": r.ok} for r in reports]))
    elif args.markdown:
        print(markdown(reports, json.loads(args.before.read_text()) if args.before else None))
    else:
        _print_tables(reports)
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
