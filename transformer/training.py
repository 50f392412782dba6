"""One training step with teacher forcing and cross-entropy (Vaswani et al., 2017, Sec. 5), and a
synthetic copy task to check on a CPU that training works.

The full recipe (the warm-up learning-rate schedule of Sec. 5.3, batching by length, checkpoints)
comes later.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import Transformer, TransformerLM

BOS_ID = 0  # the start-of-sequence id that copy_task_batch puts before each target


def compute_loss(model: Transformer | TransformerLM, batch, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on ``batch`` (a 0-dim float32 tensor, differentiable).

    Args:
        model: a :class:`Transformer`, with ``batch = (src, tgt)``: ``src`` ``(batch, seqlen_src)`` and
            ``tgt`` ``(batch, seqlen_tgt + 1)`` whose first column is a start token; the model reads
            ``tgt[:, :-1]`` and is scored on ``tgt[:, 1:]``. Or a :class:`TransformerLM`, with
            ``batch = tokens`` ``(batch, seqlen + 1)``, read as ``tokens[:, :-1]``, scored on ``tokens[:, 1:]``.
        label_smoothing: in [0, 1); the paper uses 0.1 (Sec. 5.4).
    """
    if isinstance(model, Transformer):
        src, tgt = batch
        inputs, labels = tgt[:, :-1], tgt[:, 1:]
        logits = model(src, inputs)
    elif isinstance(model, TransformerLM):
        inputs, labels = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
    else:
        raise TypeError(f"compute_loss: expected a Transformer or TransformerLM, got {type(model).__name__}")
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), label_smoothing=label_smoothing)


def train_step(model: Transformer | TransformerLM, batch, optimizer: torch.optim.Optimizer,
               label_smoothing: float = 0.0) -> float:
    """Forward, cross-entropy, backward and one ``optimizer`` step on ``batch`` (see :func:`compute_loss`).

    Puts the model in training mode (dropout on). Returns the loss before the step, as a Python float.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss(model, batch, label_smoothing)
    loss.backward()
    optimizer.step()
    return loss.item()


def copy_task_batch(batch_size: int, seqlen: int, vocab_size: int, *, reverse: bool = False,
                    generator: torch.Generator | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the synthetic copy (or reverse) task: the target repeats the source (reversed).

    Returns ``(src, tgt)``, int64: ``src`` ``(batch_size, seqlen)`` with ids drawn uniformly from
    ``[1, vocab_size)``, and ``tgt`` ``(batch_size, seqlen + 1)`` = ``BOS_ID`` followed by ``src``
    (flipped when ``reverse``), the layout :func:`compute_loss` expects. Raises ``ValueError`` for
    ``vocab_size < 2``.
    """
    if vocab_size < 2:
        raise ValueError(f"copy_task_batch: vocab_size must be >= 2 (id 0 is BOS), got {vocab_size}")
    src = torch.randint(1, vocab_size, (batch_size, seqlen), generator=generator, device=device)
    body = src.flip(1) if reverse else src
    bos = torch.full((batch_size, 1), BOS_ID, dtype=src.dtype, device=src.device)
    return src, torch.cat([bos, body], dim=1)
