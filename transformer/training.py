"""The paper's training recipe (Vaswani et al., 2017, Sec. 5): teacher-forced cross-entropy with label
smoothing (Sec. 5.4), Adam with the warm-up learning-rate schedule (Sec. 5.3), and one training step;
plus a synthetic copy task to check on a CPU that training works.

The command line that trains on real text is :mod:`transformer.train`; its data is :mod:`transformer.data`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .model import Transformer, TransformerLM

BOS_ID = 0  # the start-of-sequence id that copy_task_batch puts before each target
ADAM_BETAS, ADAM_EPS = (0.9, 0.98), 1e-9  # Sec. 5.3
LABEL_SMOOTHING = 0.1  # Sec. 5.4


# ---------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule (Sec. 5.3)
# ---------------------------------------------------------------------------------------------------
def noam_lr(step: int, d_model: int, warmup: int) -> float:
    """The paper's learning rate at ``step`` (Sec. 5.3, Eq. 3), counting steps from 1:

        lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)

    It rises linearly for ``warmup`` steps, peaks at ``step == warmup`` with ``(d_model * warmup)^-0.5``,
    then decays as ``step^-0.5``. Raises ``ValueError`` for ``step < 1`` or ``warmup < 1``.
    """
    if step < 1 or warmup < 1:
        raise ValueError(f"noam_lr: step and warmup count from 1, got step={step}, warmup={warmup}")
    return d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def make_optimizer(params, lr: float = 1.0) -> torch.optim.Adam:
    """Adam with the paper's beta1 = 0.9, beta2 = 0.98, eps = 1e-9 (Sec. 5.3). ``lr`` is the base rate that
    :func:`noam_scheduler` multiplies; 1.0 gives the paper's schedule exactly."""
    return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def noam_scheduler(optimizer: torch.optim.Optimizer, d_model: int, warmup: int = 4000,
                   scale: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` whose rate for the optimizer's n-th step (n = 1, 2, ...) is
    ``base_lr * scale * noam_lr(n, d_model, warmup)``: call ``scheduler.step()`` after each
    ``optimizer.step()``. ``scale`` is 1.0 in the paper; other values move the whole curve (e.g. a
    lower peak for a short warm-up)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: scale * noam_lr(epoch + 1, d_model, warmup))


# ---------------------------------------------------------------------------------------------------
# Loss and metrics (Sec. 5.4)
# ---------------------------------------------------------------------------------------------------
def unwrap(model):
    """The model inside a ``DistributedDataParallel`` (or any wrapper with ``.module``), else ``model``."""
    return getattr(model, "module", model)


@dataclasses.dataclass
class SequenceShard:
    """A language-model batch under context parallelism: this rank's slice of the model's ``inputs``
    (``tokens[:, :-1]``) and of the ``labels`` (``tokens[:, 1:]``), cut the same way
    (:meth:`transformer.parallel.ContextParallel.shard`), each ``(batch, seqlen / cp)``."""

    inputs: torch.Tensor
    labels: torch.Tensor


def logits_and_labels(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits ``(batch, seqlen, vocab_size)`` and the labels ``(batch, seqlen)`` they are
    scored on (see :func:`compute_loss` for the layouts). ``model`` may be wrapped in
    ``DistributedDataParallel``; the call goes through the wrapper so its gradient hooks run."""
    inner = unwrap(model)
    if isinstance(batch, SequenceShard):
        return model(batch.inputs), batch.labels
    if isinstance(inner, Transformer):
        src, tgt = batch
        return model(src, tgt[:, :-1]), tgt[:, 1:]
    if isinstance(inner, TransformerLM):
        return model(batch[:, :-1]), batch[:, 1:]
    raise TypeError(f"compute_loss: expected a Transformer or TransformerLM, got {type(inner).__name__}")


def _ignore_index(model, ignore_index: int | None) -> int:
    if ignore_index is not None:
        return ignore_index
    pad_id = unwrap(model).config.pad_id
    return -100 if pad_id is None else pad_id


def compute_loss(model: Transformer | TransformerLM, batch, label_smoothing: float = 0.0, *,
                 ignore_index: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on ``batch`` (a 0-dim float32 tensor, differentiable).

    Args:
        model: a :class:`Transformer`, with ``batch = (src, tgt)``: ``src`` ``(batch, seqlen_src)`` and
            ``tgt`` ``(batch, seqlen_tgt + 1)`` whose first column is a start token; the model reads
            ``tgt[:, :-1]`` and is scored on ``tgt[:, 1:]``. Or a :class:`TransformerLM`, with
            ``batch = tokens`` ``(batch, seqlen + 1)``, read as ``tokens[:, :-1]``, scored on ``tokens[:, 1:]``.
        label_smoothing: in [0, 1); the paper uses 0.1 (Sec. 5.4).
        ignore_index: label id left out of the loss; default ``model.config.pad_id`` (no id when None).
    """
    logits, labels = logits_and_labels(model, batch)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), label_smoothing=label_smoothing,
                           ignore_index=_ignore_index(model, ignore_index))


@dataclasses.dataclass
class LossMetrics:
    """Sums over the scored (non-padding) tokens of one or more batches.

    ``loss_sum``: the training objective (label-smoothed cross-entropy, nats) summed over tokens;
    ``nll_sum``: the plain negative log-likelihood (nats), from which perplexity is computed;
    ``tokens``: tokens scored; ``correct``: tokens whose argmax prediction is the label.
    """

    loss_sum: float = 0.0
    nll_sum: float = 0.0
    tokens: int = 0
    correct: int = 0

    def __add__(self, other: "LossMetrics") -> "LossMetrics":
        return LossMetrics(self.loss_sum + other.loss_sum, self.nll_sum + other.nll_sum,
                           self.tokens + other.tokens, self.correct + other.correct)

    @property
    def loss(self) -> float:
        """Mean objective per token (nats)."""
        return self.loss_sum / max(self.tokens, 1)

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per token (nats); ``/ ln 2`` gives bits per token (byte)."""
        return self.nll_sum / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        """``exp(nll)``: the effective number of equally likely next tokens."""
        return math.exp(min(self.nll, 700.0))

    @property
    def accuracy(self) -> float:
        """Share of scored tokens predicted exactly (teacher-forced argmax)."""
        return self.correct / max(self.tokens, 1)

    def as_tensor(self, device=None) -> torch.Tensor:
        """float64 ``[loss_sum, nll_sum, tokens, correct]``, e.g. to ``all_reduce`` across processes."""
        return torch.tensor([self.loss_sum, self.nll_sum, self.tokens, self.correct], dtype=torch.float64,
                            device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "LossMetrics":
        loss_sum, nll_sum, tokens, correct = t.tolist()
        return cls(loss_sum, nll_sum, int(tokens), int(correct))


def loss_and_metrics(model, batch, label_smoothing: float = 0.0, *,
                     ignore_index: int | None = None) -> tuple[torch.Tensor, LossMetrics]:
    """The mean label-smoothed loss (differentiable, as :func:`compute_loss`) and its
    :class:`LossMetrics` (plain NLL, token count, argmax accuracy) from a single forward pass."""
    logits, labels = logits_and_labels(model, batch)
    logits, labels = logits.float().flatten(0, 1), labels.flatten()
    ignore = _ignore_index(model, ignore_index)
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, ignore_index=ignore)
    with torch.no_grad():
        scored = labels != ignore
        tokens = scored.sum().double()
        nll = F.cross_entropy(logits, labels, ignore_index=ignore, reduction="sum").double() if label_smoothing \
            else loss.detach().double() * tokens
        correct = ((logits.argmax(-1) == labels) & scored).sum().double()
        sums = torch.stack([loss.detach().double() * tokens, nll, tokens, correct])
        loss_sum, nll_sum, tokens, correct = sums.tolist()
    return loss, LossMetrics(loss_sum, nll_sum, int(tokens), int(correct))  # one device sync for all four


# ---------------------------------------------------------------------------------------------------
# Training and evaluation steps
# ---------------------------------------------------------------------------------------------------
def autocast(model, dtype: torch.dtype | None):
    """``torch.autocast`` on the model's device type with ``dtype`` (mixed precision: products and
    attention in ``dtype``, weights and optimizer state in float32), or a no-op for ``dtype=None``."""
    device_type = next(unwrap(model).parameters()).device.type
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


def train_step_metrics(model, batch, optimizer: torch.optim.Optimizer, label_smoothing: float = 0.0, *,
                       scheduler=None, max_grad_norm: float | None = None,
                       autocast_dtype: torch.dtype | None = None, loss_scale: float = 1.0) -> LossMetrics:
    """One step: forward (under ``torch.autocast(autocast_dtype)`` when given), label-smoothed loss,
    backward, [gradient clipping], ``optimizer.step()`` and ``scheduler.step()`` when given. Puts the model
    in training mode (dropout on). Returns the :class:`LossMetrics` of ``batch`` before the step.
    ``model`` may be a ``DistributedDataParallel`` or FSDP2 model. ``loss_scale`` multiplies the mean
    loss before the backward (context parallelism: this rank's share of the replica's tokens, times the
    ranks a gradient average divides by)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(model, autocast_dtype):
        loss, metrics = loss_and_metrics(model, batch, label_smoothing)
    (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return metrics


def train_step(model: Transformer | TransformerLM, batch, optimizer: torch.optim.Optimizer,
               label_smoothing: float = 0.0, *, scheduler=None) -> float:
    """Forward, cross-entropy, backward and one ``optimizer`` step on ``batch`` (see :func:`compute_loss`),
    then ``scheduler.step()`` when given.

    Puts the model in training mode (dropout on). Returns the loss before the step, as a Python float.
    """
    return train_step_metrics(model, batch, optimizer, label_smoothing, scheduler=scheduler).loss


@torch.no_grad()
def evaluate(model, batches, *, autocast_dtype: torch.dtype | None = None) -> LossMetrics:
    """Plain cross-entropy (no label smoothing), perplexity and accuracy summed over ``batches``, in eval
    mode (no dropout); restores the previous mode. Padding labels are ignored."""
    was_training = model.training
    model.eval()
    total = LossMetrics()
    for batch in batches:
        with autocast(model, autocast_dtype):
            total = total + loss_and_metrics(model, batch)[1]
    model.train(was_training)
    return total


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
