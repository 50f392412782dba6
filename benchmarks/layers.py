"""The layers that Table 1 of Vaswani et al. (2017) compares, and countable equivalents of them.

Every layer maps ``(batch, seqlen, d_model)`` to ``(batch, seqlen, d_model)`` so the suite can time,
count and stack them the same way:

* :class:`SelfAttention` - multi-head self-attention (Sec. 3.2.2): q/k/v/out projections around
  scaled dot-product attention (Sec. 3.2.1). The SDPA function is a parameter, so the same weights
  run with torch's SDPA or with ``transformer_kernels.scaled_dot_product_attention``.
* :class:`AttentionCore` - the attention alone, without the projections (the n^2 d term).
* :class:`RestrictedSelfAttention` - self-attention restricted to a neighbourhood of size ``r``
  around each position (Table 1's last row, Sec. 4).
* :class:`Convolution` - ``nn.Conv1d(d, d, k)`` keeping the length (centred padding, or causal for
  the dilated stacks of Sec. 4).
* :class:`SeparableConvolution` - a depthwise-separable convolution (Sec. 4, citing Xception): a
  depthwise ``nn.Conv1d(d, d, k, groups=d)`` followed by a pointwise ``nn.Conv1d(d, d, 1)``, the
  O(k·n·d + n·d²) layer of the paper.
* :class:`Recurrent` - ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``, returning the output sequence only.
* :class:`UnrolledRecurrence` - the same recurrence written cell by cell with the module's own
  weights. ``torch.utils.flop_counter`` cannot see inside ``nn.LSTM``'s fused CPU kernel and its
  autograd graph is a single node, so FLOPs and sequential operations are counted on this
  equivalent; tests check it reproduces the module's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

SDPA = Callable[..., torch.Tensor]


class SelfAttention(nn.Module):
    """Multi-head self-attention, Vaswani et al. (2017) Sec. 3.2.2: ``Concat(head_1..h) W^O``.

    ``forward(x, sdpa=None)`` takes ``x`` of shape ``(batch, seqlen, d_model)``; ``sdpa`` (torch's
    signature, layout ``(batch, heads, seqlen, head_dim)``) defaults to the one given at construction.
    """

    def __init__(self, d_model: int, num_heads: int, sdpa: SDPA = F.scaled_dot_product_attention):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.d_model, self.num_heads = d_model, num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.sdpa = sdpa

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(batch, seqlen, d_model) -> (batch, heads, seqlen, head_dim), a view."""
        batch, seqlen, _ = t.shape
        return t.view(batch, seqlen, self.num_heads, -1).transpose(1, 2)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sdpa: SDPA) -> torch.Tensor:
        return sdpa(q, k, v)

    def forward(self, x: torch.Tensor, sdpa: SDPA | None = None) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        q, k, v = (self.split_heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = self.core(q, k, v, sdpa or self.sdpa)
        return self.out_proj(o.transpose(1, 2).reshape(batch, seqlen, self.d_model))


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Attention in which query ``i`` sees only keys ``i - window//2 .. i + window - 1 - window//2``.

    Shapes ``(batch, heads, seqlen, head_dim)``. The keys and values of each window are gathered with
    ``unfold`` so the work is ``4 * seqlen * window * head_dim`` per head (O(r n d), Table 1), not n^2.
    """
    seqlen = q.shape[-2]
    before = window // 2
    after = window - 1 - before
    k_win = F.pad(k, (0, 0, before, after)).unfold(-2, window, 1)  # (b, h, n, head_dim, window)
    v_win = F.pad(v, (0, 0, before, after)).unfold(-2, window, 1)
    scores = torch.einsum("bhnd,bhndw->bhnw", q, k_win) / math.sqrt(q.shape[-1])
    key_pos = torch.arange(seqlen, device=q.device)[:, None] + torch.arange(window, device=q.device) - before
    outside = (key_pos < 0) | (key_pos >= seqlen)
    probs = torch.softmax(scores.masked_fill(outside, float("-inf")), dim=-1)
    return torch.einsum("bhnw,bhndw->bhnd", probs, v_win)


class AttentionCore(nn.Module):
    """The attention of a self-attention layer without its projections: each head attends over ``x`` itself.

    ``x`` of shape ``(batch, seqlen, d_model)`` is split into heads and used as query, key and value;
    ``window`` restricts it to a neighbourhood (:func:`local_attention`), else ``sdpa`` runs. This is the
    n^2 d (or r n d) term of Table 1 on its own, without the n d^2 projections around it.
    """

    def __init__(self, d_model: int, num_heads: int, sdpa: SDPA = F.scaled_dot_product_attention,
                 window: int | None = None):
        super().__init__()
        self.d_model, self.num_heads, self.sdpa, self.window = d_model, num_heads, sdpa, window

    def forward(self, x: torch.Tensor, sdpa: SDPA | None = None) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        h = x.view(batch, seqlen, self.num_heads, -1).transpose(1, 2)
        o = local_attention(h, h, h, self.window) if self.window else (sdpa or self.sdpa)(h, h, h)
        return o.transpose(1, 2).reshape(batch, seqlen, self.d_model)


class RestrictedSelfAttention(SelfAttention):
    """Self-attention restricted to a neighbourhood of size ``r`` centred on each position (Sec. 4)."""

    def __init__(self, d_model: int, num_heads: int, r: int):
        super().__init__(d_model, num_heads)
        self.r = r

    def core(self, q, k, v, sdpa):
        return local_attention(q, k, v, self.r)


class Convolution(nn.Module):
    """``nn.Conv1d(d_model, d_model, kernel_size, dilation)`` on (batch, seqlen, d_model), length kept.

    Padding is centred ("same", odd ``kernel_size``) by default; ``causal=True`` pads on the left only,
    so output ``t`` sees inputs ``t - dilation * (k - 1) .. t``, as in the dilated convolutions of
    ByteNet and WaveNet that Sec. 4 cites for the O(log_k(n)) path length.
    """

    def __init__(self, d_model: int, kernel_size: int, dilation: int = 1, causal: bool = False):
        super().__init__()
        span = dilation * (kernel_size - 1)
        if not causal and kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for centred padding, got {kernel_size}")
        self.left_pad = span if causal else 0
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, padding=0 if causal else span // 2, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        if self.left_pad:
            x = F.pad(x, (self.left_pad, 0))
        return self.conv(x).transpose(1, 2)


class SeparableConvolution(nn.Module):
    """Depthwise-separable convolution on (batch, seqlen, d_model), length kept (centred padding).

    A depthwise ``nn.Conv1d(d_model, d_model, kernel_size, groups=d_model)`` (each channel filtered on
    its own: k·n·d multiply-adds) followed by a pointwise ``nn.Conv1d(d_model, d_model, 1)`` (n·d²),
    the separable convolution of Sec. 4 of Vaswani et al. (2017), O(k·n·d + n·d²).
    """

    def __init__(self, d_model: int, kernel_size: int):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for centred padding, got {kernel_size}")
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model)
        self.pointwise = nn.Conv1d(d_model, d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x.transpose(1, 2))).transpose(1, 2)


RECURRENT = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class Recurrent(nn.Module):
    """``nn.RNN`` (tanh), ``nn.LSTM`` or ``nn.GRU`` of width ``d_model``, batch first, returning the output sequence."""

    def __init__(self, kind: str, d_model: int):
        super().__init__()
        if kind not in RECURRENT:
            raise ValueError(f"kind must be one of {', '.join(RECURRENT)}, got {kind!r}")
        cls = RECURRENT[kind]
        self.kind = kind
        self.rnn = cls(d_model, d_model, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class UnrolledRecurrence(nn.Module):
    """A single-layer ``nn.RNN``/``nn.LSTM``/``nn.GRU`` written out cell by cell, sharing the module's weights.

    ``forward`` runs the recurrence one time step after another (what the fused kernel does), so its
    FLOPs are visible to ``FlopCounterMode`` and its autograd graph has one chain of nodes per step.
    ``iterations`` applies the cell to every position at once, reading the state the previous
    application left at position ``t - 1``: one application moves information one position forward,
    and after ``seqlen`` applications the result equals ``forward`` exactly (the recurrence is a
    triangular system). Counting applications until position ``n - 1`` depends on position ``0``
    measures the recurrence's path length (Table 1, "Maximum Path Length").
    """

    def __init__(self, recurrent: Recurrent | nn.RNNBase):
        super().__init__()
        module = recurrent.rnn if isinstance(recurrent, Recurrent) else recurrent
        if module.num_layers != 1 or module.bidirectional or not module.batch_first or not module.bias:
            raise ValueError("UnrolledRecurrence needs a one-layer, unidirectional, batch_first module with bias")
        if isinstance(module, nn.LSTM):
            if module.proj_size:
                raise ValueError("UnrolledRecurrence does not support LSTM proj_size")
            self.kind = "lstm"
        elif isinstance(module, nn.GRU):
            self.kind = "gru"
        elif isinstance(module, nn.RNN) and module.nonlinearity == "tanh":
            self.kind = "rnn"
        else:
            raise ValueError(f"UnrolledRecurrence supports nn.LSTM, nn.GRU and tanh nn.RNN, got {module}")
        self.module = module

    def input_projection(self, x: torch.Tensor) -> torch.Tensor:
        """x W_ih^T + b_ih for every position at once (no dependence between time steps)."""
        return F.linear(x, self.module.weight_ih_l0, self.module.bias_ih_l0)

    def initial_state(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = like.new_zeros(*like.shape[:-1], self.module.hidden_size)
        return (h, h.clone()) if self.kind == "lstm" else (h,)

    def cell(self, x_proj: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """One step on any leading dims: the equations of torch's nn.RNN / nn.LSTM / nn.GRU documentation."""
        h_proj = F.linear(state[0], self.module.weight_hh_l0, self.module.bias_hh_l0)
        if self.kind == "gru":  # gates in torch's order r, z, n; the reset gate scales W_hn h + b_hn
            x_r, x_z, x_n = x_proj.chunk(3, dim=-1)
            h_r, h_z, h_n = h_proj.chunk(3, dim=-1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            candidate = torch.tanh(x_n + r * h_n)
            return ((1 - z) * candidate + z * state[0],)
        gates = x_proj + h_proj
        if self.kind == "rnn":
            return (torch.tanh(gates),)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_proj = self.input_projection(x)
        state = self.initial_state(x[:, 0])
        outputs = []
        for t in range(x.shape[1]):
            state = self.cell(x_proj[:, t], state)
            outputs.append(state[0])
        return torch.stack(outputs, dim=1)

    def stepwise(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield the output at t = 0, 1, 2, ... computing the input projection of each step as it comes.

        The same function and the same operations as :meth:`forward`, with the input projection split
        by position, so the work done up to step ``t`` is exactly that of a sequence of length ``t + 1``:
        one pass over a long sequence under ``FlopCounterMode`` gives the count of every shorter one.
        """
        state = self.initial_state(x[:, 0])
        for t in range(x.shape[1]):
            state = self.cell(self.input_projection(x[:, t]), state)
            yield state[0]

    def iterations(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield the output sequence after 1, 2, 3, ... parallel applications of the cell."""
        x_proj = self.input_projection(x)
        state = self.initial_state(x)
        while True:
            previous = tuple(F.pad(s[:, :-1], (0, 0, 1, 0)) for s in state)  # state at t - 1, zeros at t = 0
            state = self.cell(x_proj, previous)
            yield state[0]
