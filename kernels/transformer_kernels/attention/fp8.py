"""FP8 (e4m3) attention forward for inference, with FlashAttention-3's descale semantics.

q, k and v are ``torch.float8_e4m3fn`` with one float32 descale per (batch, KV head) each
(``q_descale``, ``k_descale``, ``v_descale`` of shape ``(batch, nheads_k)``; query head h uses the descale
of its KV head ``h // (nheads // nheads_k)``): the real value of an element is ``x.float() * descale``.
The kernel is the bf16 forward (FlashAttention-2's Alg. 1) with both products on e4m3 operands and fp32
accumulators (Hopper's FP8 warpgroup MMA: twice the bf16 rate):

* ``S = (q . k) * q_descale * k_descale * softmax_scale``: the descales fold into the scalar scales, so
  the scores cost nothing extra;
* P is quantized to e4m3 for the PV product as FlashAttention-3 does (Shah et al., 2024, Sec. 3.3): it is
  computed as 256x the probabilities (the row max offset by 2^8, as FA3's FP8 ``Max_offset``), so the
  largest is 256 (e4m3 holds 448) and probabilities down to 2^-14 keep e4m3's 3 mantissa bits; the
  row sum is kept in the same units, so the factor cancels;
* ``out = (P V) / rowsum(P) * v_descale`` in bfloat16; ``softmax_lse`` in natural log units as usual.

Accuracy (tests/test_fp8.py, against float64 attention of the unquantized inputs): the RMSE stays within
2x of the error that quantizing q, k, v alone costs (float64 attention of the dequantized inputs), for
random inputs and for a few 100x outlier channels. No backward (FlashAttention-3's FP8 path has none):
inputs that require grad are refused, as are dropout and float8 dtypes other than e4m3fn.

Hardware: FP8 tensor cores exist from compute capability 8.9 (Ada, Hopper, Blackwell); an older GPU gets
a clear error. On a CPU without Triton's interpreter the inputs are dequantized to float32 and run the
PyTorch path (a reference, not a speed path).
"""

from __future__ import annotations

import torch

from .. import dispatch
from .._triton_utils import InputTypeError, InputValueError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                                             "float8_e8m0fnu") if hasattr(torch, n))


def requested(tensors, descales) -> bool:
    """Whether a call takes the FP8 path: any of ``tensors`` is a float8 tensor, or a descale was given."""
    return any(isinstance(t, torch.Tensor) and t.dtype in _FLOAT8 for t in tensors) or \
        any(d is not None for d in descales)


def check(op: str, q, k, v, q_descale, k_descale, v_descale, *, batch: int, heads_k: int, dropout_p: float = 0.0,
          return_attn_probs: bool = False, quantize_q: bool = False) -> torch.Tensor:
    """Validate an FP8 call; returns the descales stacked as float32 ``(3, batch, heads_k)`` (a missing
    one is 1). Raises :class:`InputTypeError` for a float8 dtype other than e4m3fn, mixed dtypes, or a
    descale that is not a float32 tensor; :class:`InputValueError` for inputs that require grad,
    dropout, ``return_attn_probs``, a descale that does not broadcast to ``(batch, nheads_k)``, another
    device, or a GPU without FP8 tensor cores (compute capability < 8.9). ``quantize_q``: q is a float
    tensor the caller quantizes (a KV-cache call), so only k and v must be e4m3 and ``q_descale`` None."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if name == "q" and quantize_q:
            if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, FP8_DTYPE):
                raise InputTypeError(f"{op}: q has dtype {t.dtype}; with an FP8 cache q is float8_e4m3fn (with "
                                     "q_descale) or float16/bfloat16/float32 (quantized per call)")
            if t.dtype != FP8_DTYPE and q_descale is not None:
                raise InputValueError(f"{op}: q_descale describes a float8_e4m3fn q; a {t.dtype} q is quantized "
                                      "per call")
        elif t.dtype != FP8_DTYPE:
            hint = {"float8_e4m3fnuz": " (AMD's variant: no negative zero, exponent bias 8)",
                    "float8_e5m2": " (FlashAttention-3's FP8 forward takes e4m3 only)"}.get(str(t.dtype)[6:], "")
            raise InputTypeError(f"{op}: {name} has dtype {t.dtype}{hint}; FP8 attention takes q, k and v all "
                                 f"torch.float8_e4m3fn, with q_descale / k_descale / v_descale")
        if t.requires_grad:
            raise InputValueError(f"{op}: FP8 attention is inference-only (no backward, as FlashAttention-3's "
                                  f"FP8 forward); {name} requires grad")
        if t.device != q.device:
            raise InputValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if dropout_p:
        raise InputValueError(f"{op}: FP8 attention is inference-only: dropout_p must be 0, got {dropout_p}")
    if return_attn_probs:
        raise InputValueError(f"{op}: return_attn_probs is not available with FP8 inputs")
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(q.device)
        raise InputValueError(f"{op}: FP8 attention needs FP8 tensor cores (compute capability 8.9 or newer: "
                              f"Ada, Hopper, Blackwell); {torch.cuda.get_device_name(q.device)} is {major}.{minor}")
    scales = []
    for name, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
        if d is None:
            scales.append(torch.ones((batch, heads_k), device=q.device, dtype=torch.float32))
            continue
        if not isinstance(d, torch.Tensor) or d.dtype != torch.float32:
            got = d.dtype if isinstance(d, torch.Tensor) else type(d).__name__
            raise InputTypeError(f"{op}: {name} must be a float32 tensor of shape ({batch}, {heads_k}), got {got}")
        if d.device != q.device:
            raise InputValueError(f"{op}: {name} is on {d.device} but q is on {q.device}")
        try:
            scales.append(torch.broadcast_to(d, (batch, heads_k)))
        except RuntimeError:
            raise InputValueError(f"{op}: {name} must have shape (batch, nheads_k) = ({batch}, {heads_k}) or "
                                  f"broadcast to it, got {tuple(d.shape)}") from None
    return torch.stack(scales)


def dequantize(x: torch.Tensor, descale: torch.Tensor, *, heads_dim: int, batch_of=None) -> torch.Tensor:
    """float32 values of an FP8 tensor: ``x * descale[b, head // group]``. ``heads_dim``: where the heads
    sit; ``batch_of``: the sequence of each entry along dim 0 when that is not the batch (the tokens of a
    packed (total, heads, dim) tensor, the pages of a (num_pages, page_size, heads, dim) pool)."""
    heads = x.shape[heads_dim]
    scale = descale.repeat_interleave(heads // descale.shape[1], dim=1)  # (batch, heads)
    if batch_of is not None:
        scale = scale[batch_of]  # (entries of dim 0, heads)
    shape = [1] * x.dim()
    shape[0], shape[heads_dim] = scale.shape
    return x.float() * scale.reshape(shape)


def quantize(x: torch.Tensor, *, heads_dim: int = -2, group: int = 1, batch_of=None,
             num_seqs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8, descale)``: ``x`` (a float tensor with batch first and heads at ``heads_dim``, e.g.
    flash-attention's ``(batch, seqlen, nheads, headdim)``) scaled per (batch, head group) so that its
    largest magnitude maps to e4m3's 448, as FlashAttention-3's tests quantize. ``group``: heads that
    share one descale (``nheads // nheads_k`` for q). Packed ``(total, nheads, headdim)`` tensors pass
    ``batch_of`` (each token's sequence, int64) and ``num_seqs``. ``descale`` is float32
    ``(batch, nheads // group)``."""
    heads = x.shape[heads_dim]
    if heads % group:
        raise InputValueError(f"quantize: {heads} heads do not form groups of {group}")
    moved = x.detach().float().movedim(heads_dim, 1)  # (batch or total, heads, ...)
    per = moved.abs().reshape(moved.shape[0], heads // group, -1).amax(-1)  # (batch or total, groups)
    if batch_of is not None:
        per = torch.zeros((num_seqs, heads // group), device=x.device).scatter_reduce_(
            0, batch_of[:, None].expand_as(per), per, "amax")
    descale = (per / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    scale = descale.repeat_interleave(group, dim=1)
    scale = scale[batch_of] if batch_of is not None else scale
    scaled = to_e4m3(moved, scale.reshape(*scale.shape, *[1] * (moved.dim() - 2)))
    return scaled.movedim(1, heads_dim).contiguous(), descale


def to_e4m3(x: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """``x / descale`` (broadcast) as e4m3, rounded to nearest and saturated to +-448."""
    return (x.float() / descale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def on_triton(q) -> bool:
    """The Triton kernel runs FP8 on CUDA and under the interpreter; elsewhere the dequantized PyTorch path."""
    return q.is_cuda or (q.device.type == "cpu" and dispatch.INTERPRETER)
