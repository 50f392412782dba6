"""FP8 (e4m3) position-wise feed-forward network for inference: both products on FP8 tensor cores.

The weights are ``torch.float8_e4m3fn`` with one float32 scale per output channel (the rows of an
``nn.Linear`` weight: ``W = W_fp8.float() * weight_scale[:, None]``, as vLLM's and compressed-tensors'
"channel" FP8 checkpoints store them); the activations entering each product are quantized per token
with a dynamic scale (its row's amax / 448). Each product is then ``torch._scaled_mm``'s row-wise scaled
GEMM, ``(A_fp8 @ B_fp8) * scale_a (M, 1) * scale_b (1, N)`` in fp32, followed by the bf16 path's fused
epilogue (bias, activation, gating, residual). Where the quantization happens (no extra pass over
memory, and nothing but the two GEMM kernels is launched):

* the input ``x`` (tokens, d_model): either already e4m3 with its per-token ``input_scale`` (a norm that
  quantizes its output), or a float tensor that the first GEMM quantizes as it loads it, with each
  row's amax found by a first sweep over the program's row block (d_model wide; the product rereads
  those tiles, from L2 on a GPU);
* the hidden ``h`` (tokens, d_ff): the first GEMM's epilogue stores it in the output dtype and
  max-reduces each token's amax across its column tiles with atomics; the second GEMM quantizes its
  tiles to e4m3 as it loads them with that per-token scale. ``h`` therefore crosses memory at 2 bytes
  per element, as in the bf16 FFN, not 1: a per-token scale needs the whole d_ff-wide row, which no
  single program of the first GEMM holds (DeepSeek-V3's 1x128 per-group scales would allow a 1-byte
  ``h``, at the price of a rescaled accumulator in every K step of the second GEMM).

Sources: the FP8 formats (Micikevicius et al., 2022, "FP8 Formats for Deep Learning"); row-wise
scaling as in ``torch._scaled_mm`` and vLLM's ``Fp8LinearMethod`` (per-channel weights, dynamic
per-token activations). Accuracy: tests/test_ffn_fp8.py and README ("FP8 feed-forward").

Hardware: FP8 tensor cores exist from compute capability 8.9; an older GPU gets a clear error. On a CPU
without Triton's interpreter the call runs :func:`ffn_fp8_reference` in float32 (a reference, not a
speed path). Inference only: nothing here has a backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import dispatch
from ._triton_utils import InputTypeError, InputValueError, fp8_row_scales, to_fp8_rows
from .attention.fp8 import FP8_DTYPE, FP8_MAX, _FLOAT8, to_e4m3

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_AMAX_FLOOR = FP8_MAX * torch.finfo(torch.float32).tiny  # scale >= fp32's smallest normal; 448 / amax finite


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8, scale)``: each row of ``x`` (..., n) as e4m3 with the float32 scale ``amax / 448`` of
    its row (shape ``x.shape[:-1]``), so ``x ~ x_fp8.float() * scale[..., None]``. Per token for
    activations, per output channel for an ``nn.Linear`` weight (d_out, d_in). An all-zero row gets
    fp32's smallest normal as its scale (its values stay 0). The kernels quantize with the same arithmetic
    (``x * (448 / amax)``, both divisions correctly rounded, then to nearest even, saturated)."""
    amax = x.detach().float().abs().amax(-1).clamp_min(_AMAX_FLOOR)
    fp8_max = torch.full_like(amax, FP8_MAX)  # (a scalar / tensor multiplies by the reciprocal: two roundings)
    return (x.detach().float() * (fp8_max / amax)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), amax / fp8_max


def dequantize_rows(x_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``x_fp8 * scale[..., None]``: the values an e4m3 tensor with per-row scales stands for."""
    return x_fp8.float() * scale.float()[..., None]


def weight_scale_vector(op: str, name: str, scale, rows: int, device) -> torch.Tensor:
    """A weight's scale as float32 ``(rows,)``: given per output channel ``(rows,)`` or ``(rows, 1)`` (the
    compressed-tensors layout), or per tensor (one element). Raises :class:`InputTypeError` /
    :class:`InputValueError` for anything else."""
    if scale is None:
        raise InputValueError(f"{op}: the float8_e4m3fn {name[:-6]} needs {name}, float32 ({rows},) per output "
                              f"channel (or one element per tensor)")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        got = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise InputTypeError(f"{op}: {name} must be a float32 tensor of shape ({rows},), got {got}")
    if scale.device != device:
        raise InputValueError(f"{op}: {name} is on {scale.device} but the weights are on {device}")
    if scale.numel() == 1:
        return scale.reshape(1).expand(rows)
    if tuple(scale.shape) not in ((rows,), (rows, 1)):
        raise InputValueError(f"{op}: {name} must have shape ({rows},) (per output channel), ({rows}, 1) or one "
                              f"element (per tensor); got {tuple(scale.shape)}")
    return scale.reshape(rows)


def check(op, input, weights, scales, biases, residual, input_scale, out_dtype, gemm) -> torch.dtype:
    """Validate an FP8 FFN call (shapes are checked by the caller); returns the output dtype.

    Raises :class:`InputTypeError` for a float8 weight or input other than e4m3fn, a float input that is
    not float16/bfloat16/float32, biases or residual not of the output dtype, a non-float32 scale;
    :class:`InputValueError` for a missing or misshapen scale, an ``input_scale`` with a float input,
    a tensor that requires grad while autograd records (inference only), ``gemm="torch"``, mixed
    devices, or a GPU without FP8 tensor cores."""
    for name, w in weights.items():
        if w is not None and w.dtype != FP8_DTYPE:
            hint = " (AMD's variant, exponent bias 8)" if "fnuz" in str(w.dtype) else ""
            raise InputTypeError(f"{op}: {name} has dtype {w.dtype}{hint}; FP8 FFN weights are all "
                                 f"torch.float8_e4m3fn with per-output-channel float32 scales")
    if input.dtype in _FLOAT8:
        if input.dtype != FP8_DTYPE:
            raise InputTypeError(f"{op}: input has dtype {input.dtype}; an FP8 input is torch.float8_e4m3fn")
        if input_scale is None:
            raise InputValueError(f"{op}: a float8_e4m3fn input needs input_scale, float32 per token "
                                  f"{tuple(input.shape[:-1])}")
        out = out_dtype or torch.bfloat16
    else:
        if input.dtype not in OUT_DTYPES:
            raise InputTypeError(f"{op}: input has dtype {input.dtype}; with FP8 weights the input is "
                                 f"float16, bfloat16 or float32 (quantized per token), or float8_e4m3fn with "
                                 f"input_scale")
        if input_scale is not None:
            raise InputValueError(f"{op}: input_scale describes a float8_e4m3fn input; a {input.dtype} input is "
                                  f"quantized per token by the kernel")
        out = out_dtype or input.dtype
    if out not in OUT_DTYPES:
        raise InputTypeError(f"{op}: out_dtype must be one of {OUT_DTYPES}, got {out}")
    if out_dtype is not None and input.dtype not in _FLOAT8 and out_dtype != input.dtype:
        raise InputValueError(f"{op}: out_dtype is for a float8_e4m3fn input; a {input.dtype} input gives "
                              f"{input.dtype}")
    if input_scale is not None:
        if not isinstance(input_scale, torch.Tensor) or input_scale.dtype != torch.float32:
            raise InputTypeError(f"{op}: input_scale must be a float32 tensor")
        if tuple(input_scale.shape) not in (tuple(input.shape[:-1]), tuple(input.shape[:-1]) + (1,)):
            raise InputValueError(f"{op}: input_scale must have shape {tuple(input.shape[:-1])} (one per token) "
                                  f"or {tuple(input.shape[:-1]) + (1,)}, got {tuple(input_scale.shape)}")
    for name, t in {**biases, "residual": residual}.items():
        if t is not None and t.dtype != out:
            raise InputTypeError(f"{op}: {name} has dtype {t.dtype}; with FP8 weights biases and the residual are "
                                 f"in the output dtype {out}")
    everything = {"input": input, **weights, **scales, **biases, "residual": residual, "input_scale": input_scale}
    for name, t in everything.items():
        if t is None:
            continue
        if t.device != input.device:
            raise InputValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise InputValueError(f"{op}: the FP8 FFN is inference-only (no backward); {name} requires grad "
                                  f"(run under torch.no_grad() / torch.inference_mode(), or detach it)")
    if gemm == "torch":
        raise InputValueError(f"{op}: the FP8 FFN runs its own Triton GEMMs; gemm must be 'auto' or 'triton'")
    if input.is_cuda and torch.cuda.get_device_capability(input.device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(input.device)
        raise InputValueError(f"{op}: FP8 FFN needs FP8 tensor cores (compute capability 8.9 or newer: Ada, "
                              f"Hopper, Blackwell); {torch.cuda.get_device_name(input.device)} is {major}.{minor}")
    return out


def ffn_fp8_forward(x, w1, s1, b1, w2, s2, b2, *, activation, wg=None, sg=None, bg=None, residual=None,
                    input_scale=None, out_dtype):
    """The two FP8 GEMM launches on 2-D ``x`` (tokens, d_model): float (quantized as loaded) or e4m3 with
    ``input_scale`` (tokens,). Scales are float32 vectors. Returns (tokens, d_model) in ``out_dtype``."""
    from .ffn import GATED_ACTIVATIONS, matmul

    gated = activation in GATED_ACTIVATIONS
    base = GATED_ACTIVATIONS.get(activation, activation)
    amax = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    first = {"a": "e4m3" if x.dtype == FP8_DTYPE else "sweep", "sb": s1, "amax_out": amax, "out_dtype": out_dtype}
    if input_scale is not None:
        first["sa"] = input_scale
    if gated:
        first["sb2"] = sg
    h = matmul(x, w1.t(), b1, epilogue="gated" if gated else "act", activation=base,
               b2=None if wg is None else wg.t(), bias2=bg, fp8=first)
    return matmul(h, w2.t(), b2, residual=residual, fp8={"a": "amax", "sa": amax, "sb": s2, "out_dtype": out_dtype})


# --------------------------------------------------------------------------------------------------
# The pre-quantizing candidate: the same per-token quantization as a pass of its own
# --------------------------------------------------------------------------------------------------
@triton.jit
def _quantize_rows_kernel(X, Y, SCALE, AMAX, M, N, stride_xm, stride_xn, stride_ym,
                          HAS_AMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y = e4m3(X * 448 / amax_row), SCALE = amax_row / 448, for BLOCK_M rows: the amax read from AMAX (a
    producer's epilogue reduced it) or found by a first sweep over the row. Exactly the arithmetic of the
    matmul's quantize-on-load (``_matmul_tile``'s ``A_FP8`` "amax" / "sweep")."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_N)
    if HAS_AMAX:
        amax = tl.load(AMAX + rows, mask=row_ok, other=0.0)
    else:
        amax = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(0, N, BLOCK_N):
            mask = row_ok[:, None] & ((c0 + cols) < N)[None, :]
            x = tl.load(X + rows[:, None] * stride_xm + (c0 + cols)[None, :] * stride_xn, mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    scale, mult = fp8_row_scales(amax)
    tl.store(SCALE + rows, scale, mask=row_ok)
    for c0 in range(0, N, BLOCK_N):
        mask = row_ok[:, None] & ((c0 + cols) < N)[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + (c0 + cols)[None, :] * stride_xn, mask=mask, other=0.0)
        tl.store(Y + rows[:, None] * stride_ym + (c0 + cols)[None, :], to_fp8_rows(x, mult), mask=mask)


def quantize_rows_triton(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` of a 2-D float ``x`` as one Triton pass (the rows' amax given, or found in the
    kernel): ``(x_fp8 contiguous, scale (M,))``, bit for bit what the GEMMs' quantize-on-load computes."""
    m, n = x.shape
    y = torch.empty((m, n), device=x.device, dtype=FP8_DTYPE)
    scale = torch.empty(m, device=x.device, dtype=torch.float32)
    if m:
        block_m, block_n = (4, 32) if dispatch.INTERPRETER else (4, 1024)
        _quantize_rows_kernel[(triton.cdiv(m, block_m),)](
            x, y, scale, amax if amax is not None else scale, m, n, x.stride(0), x.stride(1), y.stride(0),
            HAS_AMAX=amax is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
        dispatch.record_launch("ffn_quantize")
    return y, scale


@torch.library.custom_op("transformer_kernels::ffn_forward_fp8", mutates_args=())
def _ffn_fp8_op(x: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                s2: torch.Tensor, b2: Optional[torch.Tensor], wg: Optional[torch.Tensor], sg: Optional[torch.Tensor],
                bg: Optional[torch.Tensor], residual: Optional[torch.Tensor], input_scale: Optional[torch.Tensor],
                activation: str, out_dtype: torch.dtype) -> torch.Tensor:
    return ffn_fp8_forward(x, w1, s1, b1, w2, s2, b2, activation=activation, wg=wg, sg=sg, bg=bg, residual=residual,
                           input_scale=input_scale, out_dtype=out_dtype)


@_ffn_fp8_op.register_fake
def _(x, w1, s1, b1, w2, s2, b2, wg, sg, bg, residual, input_scale, activation, out_dtype):
    return x.new_empty((x.shape[0], w2.shape[0]), dtype=out_dtype)


def ffn_fp8_reference(input, weight1, weight1_scale, bias1, weight2, weight2_scale, bias2, activation="relu", *,
                      weight_gate=None, weight_gate_scale=None, bias_gate=None, residual=None, input_scale=None,
                      out_dtype=None, compute_dtype=torch.float32):
    """The FP8 FFN in plain PyTorch, step for step what the kernels compute (in ``compute_dtype``): the
    per-token quantization of the input (unless it is e4m3 with ``input_scale``), the row-wise scaled
    products (``torch._scaled_mm``'s semantics, dequantized), the epilogues, ``h`` rounded to the output
    dtype and quantized per token, the second product, bias and residual. Scales are float32 vectors
    (per output channel; per token for ``input_scale``)."""
    from .ffn import _TORCH_ACTIVATIONS, GATED_ACTIVATIONS

    out_dtype = out_dtype or (input.dtype if input.dtype != FP8_DTYPE else torch.bfloat16)
    if input.dtype != FP8_DTYPE:
        input, input_scale = quantize_rows(input)
    f = compute_dtype

    def scaled_mm(a, sa, w, sw, bias):  # (a_fp8 @ w_fp8^T) * sa (M, 1) * sw (1, N) + bias
        y = (a.to(f) @ w.to(f).t()) * sa.to(f).reshape(-1, 1) * sw.to(f).reshape(1, -1)
        return y if bias is None else y + bias.to(f)

    x2d, sx = input.reshape(-1, input.shape[-1]), input_scale.reshape(-1)
    act = _TORCH_ACTIVATIONS[GATED_ACTIVATIONS.get(activation, activation)]
    up = scaled_mm(x2d, sx, weight1, weight1_scale, bias1)
    h = act(scaled_mm(x2d, sx, weight_gate, weight_gate_scale, bias_gate)) * up if weight_gate is not None else act(up)
    h_fp8, sh = quantize_rows(h.to(out_dtype))
    y = scaled_mm(h_fp8, sh, weight2, weight2_scale, bias2)
    if residual is not None:
        y = y + residual.reshape(y.shape).to(f)
    return y.reshape(*input.shape[:-1], -1).to(out_dtype)


def on_triton(x) -> bool:
    """The Triton kernels run FP8 on CUDA and under the interpreter; elsewhere :func:`ffn_fp8_reference`."""
    return x.is_cuda or (x.device.type == "cpu" and dispatch.INTERPRETER)


# --------------------------------------------------------------------------------------------------
# One FP8 linear layer (the products outside a fused FFN call: a module's own forward)
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("transformer_kernels::linear_fp8", mutates_args=())
def _linear_fp8_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    from .ffn import matmul
    return matmul(x, weight.t(), bias, fp8={"a": "sweep", "sb": weight_scale, "out_dtype": x.dtype})


@_linear_fp8_op.register_fake
def _(x, weight, weight_scale, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def linear_fp8(input, weight, weight_scale, bias=None):
    """``F.linear`` with an e4m3 ``weight`` (out, in) and its float32 per-output-channel ``weight_scale``
    (out,): ``input`` (..., in) float16/bfloat16/float32 is quantized per token inside the GEMM (as in
    :func:`ffn_fp8_forward`), the product runs on FP8 tensor cores with row-wise scaling, ``bias`` (out,)
    in input's dtype is added in the epilogue. Returns (..., out) in input's dtype. Inference only.
    Raises as :func:`check`."""
    check("linear_fp8", input, {"weight": weight}, {"weight_scale": weight_scale}, {"bias": bias}, None, None,
          None, "triton")
    if weight.dim() != 2 or input.shape[-1] != weight.shape[1] or (bias is not None and bias.shape != weight.shape[:1]):
        raise InputValueError(f"linear_fp8: expected input (..., {weight.shape[-1]}), weight (out, in), bias (out,); "
                              f"got {tuple(input.shape)}, {tuple(weight.shape)}, "
                              f"{None if bias is None else tuple(bias.shape)}")
    scale = weight_scale_vector("linear_fp8", "weight_scale", weight_scale, weight.shape[0], weight.device)
    if not on_triton(input):
        xq, sx = quantize_rows(input)
        y = dequantize_rows(xq, sx) @ dequantize_rows(weight, scale).t()
        return (y if bias is None else y + bias.float()).to(input.dtype)
    x2d = input.reshape(-1, input.shape[-1])
    return _linear_fp8_op(x2d, weight, scale.contiguous(), bias).view(*input.shape[:-1], weight.shape[0])
