"""Rotary position embedding (RoPE; Su et al., 2021, "RoFormer", Sec. 3.4.2), fused: one Triton kernel
rotates the first ``rotary_dim`` dims of every (token, head) row by its position's angles, forward and
backward (the backward is the conjugate rotation). flash-attention's ``apply_rotary_emb``
(``flash_attn/layers/rotary.py``) signature and semantics.

kernel (:func:`_rotary_kernel`) -> launcher (:func:`rotary`) -> autograd (:class:`_ApplyRotaryEmb`) ->
function (:func:`apply_rotary_emb`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dispatch
from ._triton_utils import InputTypeError, InputValueError, check_tensor


@triton.jit
def _rotary_kernel(
    X, OUT, COS, SIN, OFFSETS, CU_SEQLENS,
    sx_b, sx_s, sx_h, sx_d, so_b, so_s, so_h, so_d, sc_s, ss_s,
    seqlen, half_dim, offset,
    VARLEN: tl.constexpr, OFFSETS_TENSOR: tl.constexpr, INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rows ``BLOCK_M`` tokens of one (sequence, head): dims (a, b) of each pair -- (2i, 2i+1) when
    ``INTERLEAVED`` (GPT-J), (i, i + rotary_dim / 2) otherwise (GPT-NeoX) -- become
    (a cos - b sin, a sin + b cos) at the token's position (row + offset); ``CONJUGATE`` negates sin."""
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    start = tl.full([], 0, tl.int64)
    if VARLEN:
        start = tl.load(CU_SEQLENS + b).to(tl.int64)
        seqlen = (tl.load(CU_SEQLENS + b + 1) - tl.load(CU_SEQLENS + b)).to(tl.int32)
        X += start * sx_s + h * sx_h
        OUT += start * so_s + h * so_h
    else:
        X += b * sx_b + h * sx_h
        OUT += b * so_b + h * so_h
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if tl.program_id(0) * BLOCK_M >= seqlen:
        return
    if OFFSETS_TENSOR:
        offset = tl.load(OFFSETS + b)
    pos = (rows + offset).to(tl.int64)
    i = tl.arange(0, BLOCK_K)
    ok = (rows < seqlen)[:, None] & (i < half_dim)[None, :]
    cos = tl.load(COS + pos[:, None] * sc_s + i[None, :], mask=ok, other=1.0).to(tl.float32)
    sin = tl.load(SIN + pos[:, None] * ss_s + i[None, :], mask=ok, other=0.0).to(tl.float32)
    if CONJUGATE:
        sin = -sin
    da = 2 * i if INTERLEAVED else i
    db = 2 * i + 1 if INTERLEAVED else i + half_dim
    xa = tl.load(X + rows[:, None] * sx_s + da[None, :] * sx_d, mask=ok, other=0.0).to(tl.float32)
    xb = tl.load(X + rows[:, None] * sx_s + db[None, :] * sx_d, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * so_s + da[None, :] * so_d, (xa * cos - xb * sin).to(OUT.dtype.element_ty), mask=ok)
    tl.store(OUT + rows[:, None] * so_s + db[None, :] * so_d, (xa * sin + xb * cos).to(OUT.dtype.element_ty), mask=ok)


def _check(x, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen, op="apply_rotary_emb"):
    """Shapes, dtypes and the table length; returns (batch, seqlen, rotary_dim)."""
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        check_tensor(name, t, op=op)
    if cos.shape != sin.shape or cos.dim() != 2:
        raise InputValueError(f"{op}: cos and sin must both be (seqlen_rotary, rotary_dim / 2), got "
                              f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.device != x.device or sin.device != x.device:
        raise InputValueError(f"{op}: cos and sin must be on x's device {x.device}")
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim > x.shape[-1] or rotary_dim == 0:
        raise InputValueError(f"{op}: rotary_dim {rotary_dim} (2 x cos.shape[1]) must lie in "
                              f"[2, headdim = {x.shape[-1]}]")
    if cu_seqlens is None:
        if x.dim() != 4:
            raise InputValueError(f"{op}: x must be (batch, seqlen, nheads, headdim), got {tuple(x.shape)}")
        batch, seqlen = x.shape[0], x.shape[1]
    else:
        if x.dim() != 3:
            raise InputValueError(f"{op}: with cu_seqlens, x must be (total_seqlen, nheads, headdim), got "
                                  f"{tuple(x.shape)}")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise InputTypeError(f"{op}: cu_seqlens must be a 1-D torch.int32 tensor")
        if max_seqlen is None:
            raise InputValueError(f"{op}: cu_seqlens needs max_seqlen")
        batch, seqlen = cu_seqlens.numel() - 1, int(max_seqlen)
    if isinstance(seqlen_offsets, torch.Tensor):
        if seqlen_offsets.dtype not in (torch.int32, torch.int64) or tuple(seqlen_offsets.shape) != (batch,):
            raise InputTypeError(f"{op}: seqlen_offsets must be an int or an int32/int64 tensor of shape ({batch},)")
        longest = seqlen + (int(seqlen_offsets.max()) if batch else 0)
    elif isinstance(seqlen_offsets, int):
        longest = seqlen + seqlen_offsets
    else:
        raise InputTypeError(f"{op}: seqlen_offsets must be an int or a tensor, got {type(seqlen_offsets).__name__}")
    if longest > cos.shape[0]:
        raise InputValueError(f"{op}: rotary tables of {cos.shape[0]} positions are too short: positions up to "
                              f"{longest - 1} are needed (seqlen {seqlen} plus seqlen_offsets)")
    return batch, seqlen, rotary_dim


def rotary(x, cos, sin, *, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None,
           conjugate=False):
    """Launch :func:`_rotary_kernel` (no autograd). Returns the rotated tensor (``x`` itself if ``inplace``)."""
    batch, seqlen, rotary_dim = _check(x, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen)
    if not dispatch.triton_available_for(x):
        return _torch_rotary(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, conjugate)
    dispatch.record_path("rotary", "triton")
    if inplace:
        out = x
    elif rotary_dim == x.shape[-1]:
        out = torch.empty_like(x)
    else:
        out = x.clone()  # the dims past rotary_dim pass through
    if x.numel() == 0 or batch == 0:
        return out
    if cu_seqlens is not None:  # (total, heads, dim): a packed batch has no batch stride
        sx, so = (0, *x.stride()), (0, *out.stride())
    else:
        sx, so = x.stride(), out.stride()
    offsets = seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else None
    block_k = triton.next_power_of_2(rotary_dim // 2)
    block_m = max(1, min(64, 4096 // block_k))
    grid = (triton.cdiv(seqlen, block_m), batch, x.shape[-2])
    _rotary_kernel[grid](
        x, out, cos, sin, x if offsets is None else offsets, x if cu_seqlens is None else cu_seqlens,
        *sx, *so, cos.stride(0), sin.stride(0), seqlen, rotary_dim // 2,
        0 if offsets is not None else int(seqlen_offsets),
        VARLEN=cu_seqlens is not None, OFFSETS_TENSOR=offsets is not None, INTERLEAVED=bool(interleaved),
        CONJUGATE=bool(conjugate), BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
    )
    dispatch.record_launch("rotary")
    return out


def _torch_rotary(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, conjugate):
    """The PyTorch path (CPU without the interpreter): the same rotation in fp32."""
    dispatch.record_path("rotary", "torch")
    half = cos.shape[1]
    if cu_seqlens is None:
        pos = torch.arange(x.shape[1], device=x.device)[None, :] + (
            seqlen_offsets[:, None] if isinstance(seqlen_offsets, torch.Tensor) else seqlen_offsets)
        c, s = cos[pos][:, :, None].float(), sin[pos][:, :, None].float()  # (batch, seqlen, 1, half)
    else:
        bounds = cu_seqlens.tolist()
        pos = torch.cat([torch.arange(b - a, device=x.device) + (
            int(seqlen_offsets[i]) if isinstance(seqlen_offsets, torch.Tensor) else seqlen_offsets)
            for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]) if len(bounds) > 1 else \
            torch.zeros(0, dtype=torch.long, device=x.device)
        c, s = cos[pos][:, None].float(), sin[pos][:, None].float()  # (total, 1, half)
    s = -s if conjugate else s
    out = x if inplace else x.clone()
    if interleaved:
        a, b = x[..., 0:2 * half:2].float(), x[..., 1:2 * half:2].float()
        ra, rb = a * c - b * s, a * s + b * c
        out[..., 0:2 * half:2], out[..., 1:2 * half:2] = ra.to(x.dtype), rb.to(x.dtype)
    else:
        a, b = x[..., :half].float(), x[..., half:2 * half].float()
        ra, rb = a * c - b * s, a * s + b * c
        out[..., :half], out[..., half:2 * half] = ra.to(x.dtype), rb.to(x.dtype)
    return out


class _ApplyRotaryEmb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen):
        out = rotary(x, cos, sin, interleaved=interleaved, inplace=inplace, seqlen_offsets=seqlen_offsets,
                     cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        offsets_tensor = seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else None
        ctx.save_for_backward(cos, sin, cu_seqlens, offsets_tensor)
        ctx.seqlen_offsets = None if offsets_tensor is not None else seqlen_offsets
        ctx.interleaved, ctx.max_seqlen = interleaved, max_seqlen
        if inplace:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, dout):
        cos, sin, cu_seqlens, offsets_tensor = ctx.saved_tensors
        offsets = offsets_tensor if offsets_tensor is not None else ctx.seqlen_offsets
        dx = rotary(dout.contiguous() if dout.stride(-1) != 1 else dout, cos, sin, interleaved=ctx.interleaved,
                    seqlen_offsets=offsets, cu_seqlens=cu_seqlens, max_seqlen=ctx.max_seqlen, conjugate=True)
        return dx, None, None, None, None, None, None, None


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """Rotate the first ``rotary_dim`` dims of ``x`` by position (RoPE), as flash-attention's
    ``apply_rotary_emb``; differentiable in ``x`` (the tables get no gradient, as there).

    Args:
        x: ``(batch, seqlen, nheads, headdim)``, or ``(total_seqlen, nheads, headdim)`` with ``cu_seqlens``;
            float16, bfloat16 or float32, any strides.
        cos, sin: ``(seqlen_rotary, rotary_dim / 2)``, any float dtype (computed in fp32);
            ``rotary_dim <= headdim``; dims past it are passed through.
        interleaved: rotate pairs (0, 1), (2, 3), ... (GPT-J) instead of (i, i + rotary_dim / 2) (GPT-NeoX).
        inplace: write into ``x``.
        seqlen_offsets: int, or ``(batch,)`` int tensor: token t of sequence b sits at position
            ``t + seqlen_offsets[b]`` (decoding with a KV cache).
        cu_seqlens: int32 ``(batch + 1,)`` offsets of a packed batch; needs ``max_seqlen``.

    Returns:
        The rotated tensor, x's shape and dtype.

    Raises:
        TypeError: non-tensors, unsupported dtypes, offsets or cu_seqlens of the wrong dtype.
        ValueError: cos and sin of different shapes, rotary_dim above headdim, x of the wrong rank,
        rotary tables shorter than the largest position (one host sync for tensor offsets).
    """
    return _ApplyRotaryEmb.apply(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen)
