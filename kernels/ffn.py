"""Fused position-wise feed-forward network, forward and backward, in Triton.

FFN(x) = act(x W1^T + b1) W2^T + b2, the Transformer's eq. (2) (Vaswani et al., 2017, Sec. 3.3), with
act = ReLU (the paper) or GELU (Hendrycks & Gimpel, 2016; erf form, as ``F.gelu``'s default).

Every product runs through one tiled Triton matmul (the grouped-ordering kernel of the Triton tutorial
"Matrix Multiplication", 03-matrix-multiplication.py) whose epilogue does the elementwise work while the
tile is still in registers, so no intermediate makes an extra trip through memory:

    forward   h   = act(x W1^T + b1)        bias + activation in the epilogue (GELU also stores x W1^T + b1)
              y   = h W2^T + b2             bias in the epilogue
    backward  dh' = (dy W2) * act'(.)       activation derivative in the epilogue
              dW2 = dy^T h,  dW1 = dh'^T x,  dx = dh' W1,  db = column sums (fp32)

ReLU's derivative is read off the stored activation (h > 0), so it saves no pre-activation.

Layers: ``_matmul_kernel`` -> ``matmul`` (launcher) -> ``_FFNFunction`` -> ``ffn`` -> ``FFN``.
``ffn_reference`` is the plain PyTorch definition the tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from . import dispatch
from ._triton_utils import check_same, check_tensor, dot, dot_flags

ACTIVATIONS = ("relu", "gelu")
# Globals read inside @triton.jit code must be constexpr to compile (the interpreter does not check).
_RSQRT2 = tl.constexpr(0.7071067811865476)
_RSQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        return tl.maximum(x, 0.0)
    elif ACTIVATION == "gelu":
        return 0.5 * x * (1.0 + tl.erf(x * _RSQRT2))
    else:
        return x


@triton.jit
def _activation_grad(x, ACTIVATION: tl.constexpr):
    """d act / d pre, from the pre-activation (GELU) or from either side (ReLU: pre > 0 iff act > 0)."""
    if ACTIVATION == "relu":
        return tl.where(x > 0.0, 1.0, 0.0)
    else:  # gelu: Phi(x) + x phi(x)
        return 0.5 * (1.0 + tl.erf(x * _RSQRT2)) + x * tl.exp(-0.5 * x * x) * _RSQRT_2PI


@triton.jit
def _matmul_kernel(
    A, B, C, BIAS, AUX,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_xm, stride_xn,
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,  # "none" | "act" (store act(acc), and acc into AUX if STORE_AUX) | "act_grad"
    ACTIVATION: tl.constexpr, STORE_AUX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """C = epilogue(A @ B + bias) for A (M, K) and B (K, N) of any strides; fp32 accumulation."""
    pid = tl.program_id(0)
    # Grouped ordering: GROUP_M row-blocks share each column-block while it is hot in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = A + rm.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + rn.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + rk) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot(a, b, acc, UPCAST, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    aux_ptrs = AUX + rm.to(tl.int64)[:, None] * stride_xm + rn[None, :] * stride_xn
    if EPILOGUE == "act":
        if STORE_AUX:
            tl.store(aux_ptrs, acc.to(AUX.dtype.element_ty), mask=mask)
        acc = _activation(acc, ACTIVATION)
    elif EPILOGUE == "act_grad":
        acc = acc * _activation_grad(tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32), ACTIVATION)
    c_ptrs = C + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask)


def _config(dtype: torch.dtype, epilogue: str) -> dict:
    """Tile shapes. Half precision: 128x128x32 tiles on the tensor cores with a 3-stage pipeline; the
    activation-derivative epilogue also holds the loaded pre-activation tile, so it narrows to 128x64
    (x64 along K) to stay spill-free. True fp32 (no tensor cores) uses 64x64 tiles. Every entry
    compiles without spills for sm_80 and sm_90a (``python -m kernels.static_check``). Interpreter:
    32^3 tiles so small test shapes still cross several tiles and every tail mask."""
    if dispatch.INTERPRETER:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    if epilogue == "act_grad":
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)


def matmul(a, b, bias=None, *, epilogue="none", activation="none", aux=None, store_aux=False, out=None):
    """``epilogue(a @ b + bias)`` for 2-D ``a`` (M, K) and ``b`` (K, N) of any strides.

    ``epilogue="act"`` applies ``activation`` (and writes the pre-activation into ``aux`` when
    ``store_aux``); ``"act_grad"`` multiplies by the activation's derivative read from ``aux`` (M, N).
    Writes into ``out`` (M, N) of any strides if given, else into a new contiguous tensor of a's dtype.
    """
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty((m, n), device=a.device, dtype=a.dtype) if out is None else out
    if c.numel() == 0:
        return c
    if k == 0:  # an empty sum: let the epilogue act on the bias alone
        return _epilogue_torch(c.zero_() if bias is None else c.copy_(bias.expand(m, n)), epilogue, activation, aux, store_aux)
    cfg = _config(a.dtype, epilogue)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    aux_arg = aux if aux is not None else c
    _matmul_kernel[grid](
        a, b, c, bias if bias is not None else c, aux_arg,
        m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        aux_arg.stride(0), aux_arg.stride(1),
        HAS_BIAS=bias is not None, EPILOGUE=epilogue, ACTIVATION=activation, STORE_AUX=store_aux,
        **cfg, **dot_flags(a.dtype),
    )
    dispatch.record_launch("ffn_matmul")
    return c


def _epilogue_torch(c, epilogue, activation, aux, store_aux):
    if epilogue == "act":
        if store_aux:
            aux.copy_(c)
        return c.copy_(_activation_torch(c.float(), activation))
    if epilogue == "act_grad":
        return c.mul_(_activation_grad_torch(aux.float(), activation).to(c.dtype))
    return c


def _activation_torch(x, activation):
    return F.relu(x) if activation == "relu" else F.gelu(x)


def _activation_grad_torch(x, activation):
    if activation == "relu":
        return (x > 0).to(x.dtype)
    return 0.5 * (1.0 + torch.erf(x * _RSQRT2.value)) + x * torch.exp(-0.5 * x * x) * _RSQRT_2PI.value


class _FFNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight1, bias1, weight2, bias2, activation):
        keep_pre = activation != "relu"
        pre = torch.empty((x2d.shape[0], weight1.shape[0]), device=x2d.device, dtype=x2d.dtype) if keep_pre else None
        h = matmul(x2d, weight1.t(), bias1, epilogue="act", activation=activation, aux=pre, store_aux=keep_pre)
        y = matmul(h, weight2.t(), bias2)
        ctx.save_for_backward(x2d, weight1, weight2, h, pre)
        ctx.activation = activation
        ctx.has_bias = (bias1 is not None, bias2 is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight1, weight2, h, pre = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        dx = dw1 = db1 = dw2 = db2 = None
        if need_w2:
            dw2 = matmul(dy.t(), h)
        if need_b2 and ctx.has_bias[1]:
            db2 = dy.sum(0, dtype=torch.float32).to(dy.dtype)
        if need_x or need_w1 or need_b1:
            aux = pre if pre is not None else h
            dpre = matmul(dy, weight2, epilogue="act_grad", activation=ctx.activation, aux=aux)
            if need_w1:
                dw1 = matmul(dpre.t(), x2d)
            if need_b1 and ctx.has_bias[0]:
                db1 = dpre.sum(0, dtype=torch.float32).to(dpre.dtype)
            if need_x:
                dx = matmul(dpre, weight1)
        return dx, dw1, db1, dw2, db2, None


def _check_ffn_inputs(input, weight1, bias1, weight2, bias2, activation) -> None:
    op = "ffn"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    named = {"input": input, "weight1": weight1, "bias1": bias1, "weight2": weight2, "bias2": bias2}
    for name, t in named.items():
        if t is not None or not name.startswith("bias"):
            check_tensor(name, t, op=op)
    check_same(op, named)
    if input.dim() < 1 or weight1.dim() != 2 or weight2.dim() != 2:
        raise ValueError(f"{op}: expected input (..., d_model), weight1 (d_ff, d_model), weight2 (d_model, d_ff); "
                         f"got {tuple(input.shape)}, {tuple(weight1.shape)}, {tuple(weight2.shape)}")
    d_model, d_ff = input.shape[-1], weight1.shape[0]
    if weight1.shape[1] != d_model or tuple(weight2.shape) != (d_model, d_ff):
        raise ValueError(f"{op}: with input (..., {d_model}) expected weight1 ({d_ff}, {d_model}) and weight2 "
                         f"({d_model}, {d_ff}); got {tuple(weight1.shape)} and {tuple(weight2.shape)}")
    for name, t, size in (("bias1", bias1, d_ff), ("bias2", bias2, d_model)):
        if t is not None and tuple(t.shape) != (size,):
            raise ValueError(f"{op}: {name} must have shape ({size},), got {tuple(t.shape)}")


def ffn(input, weight1, bias1, weight2, bias2, activation="relu"):
    """Position-wise feed-forward network act(input W1^T + b1) W2^T + b2 (Vaswani et al., 2017, eq. 2).

    Weights follow ``nn.Linear``'s layout, so ``ffn(x, l1.weight, l1.bias, l2.weight, l2.bias)`` equals
    ``l2(act(l1(x)))``.

    Args:
        input: ``(..., d_model)``, float16, bfloat16 or float32, any strides.
        weight1: ``(d_ff, d_model)``; bias1: ``(d_ff,)`` or None.
        weight2: ``(d_model, d_ff)``; bias2: ``(d_model,)`` or None. All of input's dtype and device.
        activation: ``"relu"`` (the paper) or ``"gelu"`` (erf form).

    Returns:
        ``(..., d_model)`` in input's dtype. Differentiable in every tensor argument.

    Raises:
        TypeError: non-tensor, unsupported or mixed dtypes. ValueError: shape mismatch, mixed devices,
        unknown activation.
    """
    _check_ffn_inputs(input, weight1, bias1, weight2, bias2, activation)
    if not dispatch.triton_available_for(input):
        dispatch.record_path("ffn", "torch")
        return ffn_reference(input, weight1, bias1, weight2, bias2, activation)
    dispatch.record_path("ffn", "triton")
    d_model = input.shape[-1]
    y = _FFNFunction.apply(input.reshape(-1, d_model), weight1, bias1, weight2, bias2, activation)
    return y.view(*input.shape[:-1], d_model)


def ffn_reference(input, weight1, bias1, weight2, bias2, activation="relu"):
    """Plain PyTorch FFN (two ``F.linear`` and the activation); the tests run it in float64."""
    return F.linear(_activation_torch(F.linear(input, weight1, bias1), activation), weight2, bias2)


class FFN(nn.Module):
    """The position-wise feed-forward sub-layer on :func:`ffn`.

    Parameters are ``linear1`` (d_model -> d_ff) and ``linear2`` (d_ff -> d_model), two ``nn.Linear``
    like ``nn.TransformerEncoderLayer``'s, so its ``state_dict`` keys are ``linear1.weight``,
    ``linear1.bias``, ``linear2.weight``, ``linear2.bias`` and the initialization is nn.Linear's.

    Args:
        d_model: model width (512 in the paper's base model). d_ff: inner width (2048).
        activation: ``"relu"`` or ``"gelu"``. bias: whether the two projections have biases.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", bias: bool = True, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"FFN: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias, device=device, dtype=dtype)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ffn(x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
