"""Rotary position embedding (RoPE; Su et al., 2021, "RoFormer", Sec. 3.4.2), fused: one Triton kernel
rotates the first ``rotary_dim`` dims of every (token, head) row by its position's angles, forward and
backward (the backward is the conjugate rotation). Two signatures of the one op:

* flash-attention's ``apply_rotary_emb`` (``flash_attn/layers/rotary.py``): cos/sin tables indexed by
  position. kernel (:func:`_rotary_kernel`) -> launcher (:func:`rotary`) -> autograd
  (:class:`_ApplyRotaryEmb`) -> function (:func:`apply_rotary_emb`).
* transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` (``modeling_llama.py`` and the
  ~110 modeling files copied from it): cos/sin already gathered per token, ``q * cos + rotate_half(q) * sin``.
  kernel (:func:`_rotate_half_kernel`) -> launcher (:func:`rotate_half_embed`) -> custom op with autograd
  (``transformer_kernels::rotate_half_embed``, so ``torch.compile`` keeps it whole) -> function
  (:func:`apply_rotary_pos_emb`).
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


# --------------------------------------------------------------------------------------------------
# transformers' form: q * cos + rotate_half(q) * sin, cos and sin gathered per token
# --------------------------------------------------------------------------------------------------
@triton.jit
def _rotate_half_kernel(
    X, OUT, COS, SIN, rows, n1, n2, half,
    sx0, sx1, sx2, sx3, so0, so1, so2, so3, sc0, sc1, sc2, sc3, ss0, ss1, ss2, ss3,
    CONJUGATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``BLOCK_M`` rows (flattened dims 0-2) of a 4-d ``x``: with a = x[:half], b = x[half:],
    out = (a cos_a - b sin_a, b cos_b + a sin_b), cos and sin broadcast to x (stride 0 where they
    broadcast) and each half read with its own cos and sin, as transformers' formula does.
    ``CONJUGATE`` is the transpose (the backward): sin_a -> -sin_b, sin_b -> -sin_a."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    i0, i1, i2 = r // (n1 * n2), (r // n2) % n1, r % n2
    i = tl.arange(0, BLOCK_K)
    ok = (r < rows)[:, None] & (i < half)[None, :]
    x_row = (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None]
    c_row = (i0 * sc0 + i1 * sc1 + i2 * sc2)[:, None]
    s_row = (i0 * ss0 + i1 * ss1 + i2 * ss2)[:, None]
    o_row = (i0 * so0 + i1 * so1 + i2 * so2)[:, None]
    da, db = i[None, :], (i + half)[None, :]
    xa = tl.load(X + x_row + da * sx3, mask=ok, other=0.0).to(tl.float32)
    xb = tl.load(X + x_row + db * sx3, mask=ok, other=0.0).to(tl.float32)
    ca = tl.load(COS + c_row + da * sc3, mask=ok, other=0.0).to(tl.float32)
    cb = tl.load(COS + c_row + db * sc3, mask=ok, other=0.0).to(tl.float32)
    sa = tl.load(SIN + s_row + da * ss3, mask=ok, other=0.0).to(tl.float32)
    sb = tl.load(SIN + s_row + db * ss3, mask=ok, other=0.0).to(tl.float32)
    if CONJUGATE:
        sa, sb = -sb, -sa
    tl.store(OUT + o_row + da * so3, (xa * ca - xb * sa).to(OUT.dtype.element_ty), mask=ok)
    tl.store(OUT + o_row + db * so3, (xb * cb + xa * sb).to(OUT.dtype.element_ty), mask=ok)


def rotate_half_embed(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, conjugate: bool = False, *,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch :func:`_rotate_half_kernel` (no autograd, no checks): ``x`` 4-d with an even last dim,
    ``cos``/``sin`` already expanded to ``x.shape``. Writes ``out`` (x's shape and dtype, any strides)
    if given, else a new contiguous tensor, and returns it."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    rows = x.shape[0] * x.shape[1] * x.shape[2]
    if rows == 0 or x.shape[3] == 0:
        return out
    half = x.shape[3] // 2
    block_k = triton.next_power_of_2(half)
    block_m = max(1, min(64, 4096 // block_k))
    _rotate_half_kernel[(triton.cdiv(rows, block_m),)](
        x, out, cos, sin, rows, x.shape[1], x.shape[2], half, *x.stride(), *out.stride(), *cos.stride(),
        *sin.stride(), CONJUGATE=bool(conjugate), BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
    )
    dispatch.record_launch("rotary")
    return out


@torch.library.custom_op("transformer_kernels::rotate_half_embed", mutates_args=())
def _rotate_half_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, conjugate: bool) -> torch.Tensor:
    return rotate_half_embed(x, cos, sin, conjugate)


@_rotate_half_op.register_fake
def _(x, cos, sin, conjugate):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _rotate_half_setup_context(ctx, inputs, output):
    _, cos, sin, conjugate = inputs
    ctx.save_for_backward(cos, sin)
    ctx.conjugate = conjugate


def _rotate_half_backward(ctx, dout):
    cos, sin = ctx.saved_tensors
    return _rotate_half_op(dout, cos, sin, not ctx.conjugate), None, None, None


torch.library.register_autograd("transformer_kernels::rotate_half_embed", _rotate_half_backward,
                                setup_context=_rotate_half_setup_context)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotary_pos_emb_reference(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' ``apply_rotary_pos_emb`` in plain PyTorch (the PyTorch path; the tests' reference)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rotary_pos_emb_problem(q, k, cos, sin, unsqueeze_dim=1) -> tuple[type[Exception], str] | None:
    """Why :func:`apply_rotary_pos_emb` cannot run these inputs on the kernel, as (the exception it
    raises, the message), or None when it can."""
    tensors = {"q": q, "k": k, "cos": cos, "sin": sin}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return InputTypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            return InputTypeError, (f"{name} has dtype {t.dtype}; supported dtypes are float16, bfloat16 and "
                                    "float32 (float64 runs the PyTorch path)")
        if t.device != q.device:
            return InputValueError, f"{name} is on {t.device} but q is on {q.device}; all tensors must be on one device"
        if t.is_nested:
            return InputValueError, f"{name} is a nested tensor"
    if not isinstance(unsqueeze_dim, int) or isinstance(unsqueeze_dim, bool):
        return InputValueError, f"unsqueeze_dim must be an int, got {unsqueeze_dim!r}"
    if cos.shape != sin.shape:
        return InputValueError, f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}"
    if not -cos.dim() - 1 <= unsqueeze_dim <= cos.dim():
        return InputValueError, f"unsqueeze_dim {unsqueeze_dim} is out of range for cos of rank {cos.dim()}"
    table = cos.shape[:unsqueeze_dim % (cos.dim() + 1)] + (1,) + cos.shape[unsqueeze_dim % (cos.dim() + 1):]
    for name, x in (("q", q), ("k", k)):
        if not 1 <= x.dim() <= 4:
            return InputValueError, f"{name} must have 1 to 4 dims, got {x.dim()}"
        if x.shape[-1] % 2:
            return InputValueError, f"{name}'s last dim (head_dim) must be even, got {x.shape[-1]}"
        if len(table) > x.dim() or any(t not in (1, n) for t, n in zip(reversed(table), reversed(x.shape))):
            return InputValueError, (f"cos.unsqueeze({unsqueeze_dim}) {tuple(table)} does not broadcast to "
                                     f"{name}'s shape {tuple(x.shape)}")
        if table[-1] != x.shape[-1]:
            return InputValueError, f"cos's last dim {table[-1]} must equal {name}'s head_dim {x.shape[-1]}"
        if torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype) != x.dtype:
            return InputValueError, f"cos/sin ({cos.dtype}, {sin.dtype}) would promote {name} ({x.dtype}) to a wider dtype"
    if cos.requires_grad or sin.requires_grad:
        return InputValueError, "cos or sin requires grad (the kernel differentiates in q and k only)"
    return None


def _rotate(x, cos, sin):
    lead = (None,) * (4 - x.dim())  # the kernel takes 4-d views
    return _rotate_half_op(x[lead], cos.expand(x.shape)[lead], sin.expand(x.shape)[lead], False).view(x.shape)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' ``apply_rotary_pos_emb`` on one fused kernel per tensor: returns
    ``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)`` with cos and sin unsqueezed at
    ``unsqueeze_dim`` (RoPE, Su et al., 2021, Sec. 3.4.2, in the GPT-NeoX half-split layout).

    Args:
        q, k: ``(batch, heads, seqlen, head_dim)`` for ``unsqueeze_dim=1`` (``(batch, seqlen, heads,
            head_dim)`` for 2); up to 4 dims, head_dim even; float16, bfloat16 or float32 (float64 runs
            the PyTorch path), any strides.
        cos, sin: per-token tables, e.g. ``(batch, seqlen, head_dim)``, that broadcast to q and k once
            unsqueezed; any of the three float dtypes no wider than q's. Each half of head_dim is read
            with its own cos and sin, as transformers' formula does (no assumption that they repeat).
        unsqueeze_dim: where cos and sin get their heads dim.

    Returns:
        ``(q_embed, k_embed)``: q's and k's shape and dtype, contiguous, computed in fp32 and rounded
        once (transformers rounds after each product and the sum, so low-precision results differ by
        rounding). Differentiable in q and k; cos and sin get no gradient.

    Raises:
        TypeError: non-tensors or unsupported dtypes. ValueError: shapes that do not broadcast, an odd
        head_dim, cos/sin that would promote q or k, tensors on different devices, or cos/sin that
        require grad (call :func:`rotary_pos_emb_reference` for those).
    """
    problem = rotary_pos_emb_problem(q, k, cos, sin, unsqueeze_dim)
    if problem is not None:
        raise problem[0](f"apply_rotary_pos_emb: {problem[1]}")
    return apply_checked(q, k, cos, sin, unsqueeze_dim)


def apply_checked(q, k, cos, sin, unsqueeze_dim=1):
    """:func:`apply_rotary_pos_emb` for inputs :func:`rotary_pos_emb_problem` has passed (no second check)."""
    if not all(dispatch.triton_available_for(t) for t in (q, k, cos, sin)):
        dispatch.record_path("rotary", "torch")
        return rotary_pos_emb_reference(q, k, cos, sin, unsqueeze_dim)
    dispatch.record_path("rotary", "triton")
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
