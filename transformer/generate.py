"""Generation from a trained model: greedy decoding, beam search, and sampling with temperature / top-k.

Every strategy works for both models. A :class:`~transformer.Transformer` (encoder-decoder) encodes a
source batch ``src`` ``(batch, seqlen_src)`` once and decodes from ``bos_id``; a
:class:`~transformer.TransformerLM` continues a prompt ``(batch, prompt_len)`` (the prompts of one
batch share a length; generate ragged prompts in separate calls). Generation stops at ``eos_id`` or
after ``max_new_tokens``.

With ``use_cache=True`` (the default) a prefill pass fills the per-layer KV caches
(:meth:`Transformer.init_cache`, :meth:`TransformerLM.init_cache`) and each later step feeds one token
per row, so it costs one query row per layer: on the triton backend the attention runs the split-key
decoding kernel ``transformer_kernels.flash_attn_with_kvcache``. ``use_cache=False`` recomputes the whole prefix at
every step; both give the same tokens and, within rounding, the same scores (tests/test_generate.py).

Beam search follows the paper: beam size 4 and length penalty alpha = 0.6 (Vaswani et al., 2017,
Sec. 6.1), where hypotheses are ranked by ``log P(Y|X) / lp(Y)`` with ``lp(Y) = (5 + |Y|)^alpha / 6^alpha``
(Wu et al., 2016, "Google's Neural Machine Translation System", Sec. 7). ``|Y|`` counts the generated
tokens, EOS included.

Command line (prints the decoded text)::

    python -m transformer.generate CHECKPOINT --src "Hello"                      # encoder-decoder, beam 4
    python -m transformer.generate CHECKPOINT --prompt "Once" --temperature 0.8 --top-k 40 --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from typing import Callable

import torch

from .model import Transformer, TransformerLM
from .tokenizer import BOS_ID, EOS_ID, ByteTokenizer

BEAM_SIZE = 4  # Vaswani et al., 2017, Sec. 6.1
LENGTH_PENALTY = 0.6  # alpha, ibid.; the penalty's form is Wu et al., 2016
EXTRA_TARGET_TOKENS = 50  # "maximum output length ... input length + 50" (Vaswani et al., 2017, Sec. 6.1)

__all__ = ["BEAM_SIZE", "LENGTH_PENALTY", "Generation", "beam_search", "gnmt_length_penalty", "greedy", "main",
           "sample", "sampling_log_probs"]


@dataclasses.dataclass
class Generation:
    """What a generation call returns; every tensor is on the model's device.

    Attributes:
        tokens: ``(batch, steps)`` int64, the new tokens only (not the prompt or BOS), the EOS included
            when one was generated; positions after a row's end hold ``pad_id``. ``steps`` is the
            longest row's length.
        lengths: ``(batch,)`` int64, new tokens per row, EOS included.
        log_probs: ``(batch,)`` float32, ``sum log P(token | prefix)`` of each row's tokens under the
            model (temperature 1, no top-k filter), computed in float32.
        scores: ``(batch,)`` float32; beam search: ``log_probs / lp(lengths)`` (Wu et al., 2016), what
            it ranks by; greedy and sampling: ``log_probs``.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    log_probs: torch.Tensor
    scores: torch.Tensor


def gnmt_length_penalty(length, alpha: float):
    """``lp(Y) = (5 + |Y|)^alpha / (5 + 1)^alpha`` (Wu et al., 2016, Sec. 7); ``length`` an int or tensor."""
    return ((5.0 + length) / 6.0) ** alpha


# ----------------------------------------------------------------------------------------------------------
# Public strategies
# ----------------------------------------------------------------------------------------------------------

def greedy(model: Transformer | TransformerLM, inputs: torch.Tensor, *,
           src_key_padding_mask: torch.Tensor | None = None, max_new_tokens: int | None = None,
           bos_id: int = BOS_ID, eos_id: int | None = EOS_ID, pad_id: int | None = None,
           use_cache: bool = True) -> Generation:
    """Greedy decoding: at each step the most likely next token.

    Args:
        model: a :class:`Transformer` or :class:`TransformerLM`; run in eval mode under
            ``torch.inference_mode()`` (its training flag is restored afterwards).
        inputs: int64/int32 ``(batch, seqlen)``: the source ``src`` of a :class:`Transformer`, or the
            prompt of a :class:`TransformerLM` (one length for the batch; include BOS yourself if the
            model was trained with one).
        src_key_padding_mask: :class:`Transformer` only: bool ``(batch, seqlen_src)``, True for real
            tokens, each row a run of True then False (right padding); default: derived from
            ``config.pad_id``, else no padding.
        max_new_tokens: most tokens to generate per row; default: the source length + 50 for a
            :class:`Transformer` (Sec. 6.1), what fits in ``config.max_len`` for an LM.
        bos_id: the decoder's start token (:class:`Transformer` only; default the byte tokenizer's BOS).
        eos_id: the token that ends a row (kept in the output); None: always ``max_new_tokens``.
        pad_id: what fills the output after a row's end (and is fed for ended rows); default
            ``config.pad_id``, else ``eos_id``, else 0.
        use_cache: KV-cache decoding (one query row per step); False recomputes the prefix each step.

    Returns:
        :class:`Generation`, ``scores`` = ``log_probs``.

    Raises:
        TypeError: ``model`` is neither model, or ``inputs`` is not an integer tensor.
        ValueError: a bad shape, id or mask, ``max_new_tokens < 1``, or a sequence that would not fit in
            ``config.max_len`` (BOS + new tokens; prompt + new tokens for an LM).
    """
    return _one_token_per_step(model, inputs, _argmax, src_key_padding_mask=src_key_padding_mask,
                               max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                               use_cache=use_cache)


def sample(model: Transformer | TransformerLM, inputs: torch.Tensor, *, temperature: float = 1.0,
           top_k: int | None = None, generator: torch.Generator | None = None,
           src_key_padding_mask: torch.Tensor | None = None, max_new_tokens: int | None = None,
           bos_id: int = BOS_ID, eos_id: int | None = EOS_ID, pad_id: int | None = None,
           use_cache: bool = True) -> Generation:
    """Ancestral sampling: each next token drawn from ``softmax(logits / temperature)``, restricted to
    the ``top_k`` most likely tokens when ``top_k`` is given (Fan et al., 2018, "Hierarchical Neural
    Story Generation"); see :func:`sampling_log_probs`.

    Args:
        temperature: > 0; below 1 sharpens the distribution, above 1 flattens it.
        top_k: None (the whole vocabulary) or an int >= 1 (values above the vocabulary size mean all of
            it); ``top_k=1`` is greedy decoding.
        generator: a ``torch.Generator`` on the model's device, for reproducible draws.
        Everything else: as :func:`greedy`.

    Returns:
        :class:`Generation`; ``log_probs`` and ``scores`` are under the model's own distribution
        (temperature 1, unfiltered), so they compare with greedy's.

    Raises:
        ValueError: ``temperature <= 0`` (or not finite), ``top_k < 1``, and as :func:`greedy`.
    """
    _check_sampling(temperature, top_k)

    def draw(log_probs: torch.Tensor) -> torch.Tensor:
        probs = sampling_log_probs(log_probs, temperature, top_k).exp()
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _one_token_per_step(model, inputs, draw, src_key_padding_mask=src_key_padding_mask,
                               max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                               use_cache=use_cache)


def beam_search(model: Transformer | TransformerLM, inputs: torch.Tensor, *, beam_size: int = BEAM_SIZE,
                length_penalty: float = LENGTH_PENALTY, src_key_padding_mask: torch.Tensor | None = None,
                max_new_tokens: int | None = None, bos_id: int = BOS_ID, eos_id: int | None = EOS_ID,
                pad_id: int | None = None, use_cache: bool = True) -> Generation:
    """Beam search with the GNMT length penalty; the paper's defaults: beam 4, alpha 0.6 (Sec. 6.1).

    Each step extends every live hypothesis by every token and ranks the ``2 * beam_size`` best by
    ``log P``. A candidate ending in EOS among the first ``beam_size`` is finished, scored
    ``log P / lp(|Y|)`` (:func:`gnmt_length_penalty`); the ``beam_size`` best candidates not ending in EOS
    stay live. A row stops once it has ``beam_size`` finished hypotheses; at ``max_new_tokens`` the live
    hypotheses compete too (scored by the same formula, without EOS). The best score wins. (This
    stopping rule is fairseq's, Ott et al., 2019; tensor2tensor, which the paper used, also stops early
    when it can.) With ``beam_size=1`` this is greedy decoding. The batch runs as ``batch * beam_size`` rows; with
    ``use_cache`` the caches are reordered (:meth:`KVCache.reorder`) to follow the surviving hypotheses.

    Args:
        beam_size: hypotheses kept per row, an int >= 1.
        length_penalty: alpha, a finite float; 0 ranks by ``log P`` alone, larger favours longer outputs.
        Everything else: as :func:`greedy`.

    Returns:
        :class:`Generation` of the best hypothesis per row; ``scores`` are the length-penalized scores.

    Raises:
        ValueError: ``beam_size < 1``, a non-finite ``length_penalty``, and as :func:`greedy`.
    """
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be an int >= 1, got {beam_size!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
            or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty (alpha) must be a finite number, got {length_penalty!r}")
    with _inference(model):
        stepper = _Stepper.build(model, inputs, src_key_padding_mask, max_new_tokens, bos_id, eos_id, pad_id,
                                 use_cache)
        return _BeamSearch(stepper, beam_size, float(length_penalty)).run()


def sampling_log_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """The distribution :func:`sample` draws from, as log-probabilities.

    ``log_softmax(logits / temperature)`` over the ``top_k`` largest logits of each row, ``-inf``
    elsewhere (exactly ``top_k`` tokens even when logits tie; all of them when ``top_k`` is None or
    exceeds the vocabulary). ``logits`` ``(..., vocab_size)``, any float dtype; returns float32 of the
    same shape. Raises ``ValueError`` for ``temperature <= 0`` or ``top_k < 1``.
    """
    _check_sampling(temperature, top_k)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        values, index = scaled.topk(top_k, dim=-1)
        scaled = torch.full_like(scaled, -math.inf).scatter(-1, index, values)
    return scaled.log_softmax(-1)


# ----------------------------------------------------------------------------------------------------------
# Feeding the model: prefill, then one token per row per step (cached) or the whole prefix (recompute)
# ----------------------------------------------------------------------------------------------------------

class _Stepper:
    """Runs a model step by step over ``rows`` sequences and hands back next-token log-probabilities.

    ``seq`` ``(rows, t)`` holds every token fed so far (the prompt, or BOS for a Transformer).
    :meth:`advance` appends one token per row and returns ``(rows, vocab_size)`` float32 log-probs of
    the next token; :meth:`reorder` keeps rows ``index`` (beam search).
    """

    def __init__(self, model, seq, *, memory, src_padding, max_new_tokens, eos_id, pad_id, use_cache):
        self.model, self.seq, self.is_lm = model, seq, memory is None
        self.memory, self.src_padding = memory, src_padding  # Transformer only
        self.max_new_tokens, self.eos_id, self.pad_id = max_new_tokens, eos_id, pad_id
        self.cache, self.fed = None, 0
        if use_cache:
            total = seq.shape[1] + max_new_tokens
            if self.is_lm:
                self.cache = model.init_cache(seq.shape[0], total)
            else:
                lengths = None if src_padding is None else src_padding.sum(1)
                self.cache = model.init_cache(memory, total, src_lengths=lengths)

    @classmethod
    def build(cls, model, inputs, src_key_padding_mask, max_new_tokens, bos_id, eos_id, pad_id,
              use_cache) -> "_Stepper":
        """Check the arguments, encode the source (a Transformer), and make the stepper."""
        if not isinstance(model, (Transformer, TransformerLM)):
            raise TypeError(f"expected a Transformer or TransformerLM, got {type(model).__name__}")
        config, device = model.config, model.embedding.weight.device
        inputs = _check_inputs(model, inputs).to(device)
        is_lm = isinstance(model, TransformerLM)
        for name, value in (("bos_id", None if is_lm else bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if value is not None:
                _check_id(name, value, config.vocab_size)
        pad_id = next(i for i in (pad_id, config.pad_id, eos_id, 0) if i is not None)
        max_new_tokens = _check_max_new_tokens(model, inputs, max_new_tokens)
        if is_lm:
            if src_key_padding_mask is not None:
                raise ValueError("src_key_padding_mask is for a Transformer's source; a TransformerLM's prompts "
                                 "share one length (generate ragged prompts in separate calls)")
            return cls(model, inputs, memory=None, src_padding=None, max_new_tokens=max_new_tokens,
                       eos_id=eos_id, pad_id=pad_id, use_cache=use_cache)
        src_padding = _right_padding(model, inputs, src_key_padding_mask)
        memory = model.encode(inputs, src_padding)
        start = torch.full((inputs.shape[0], 1), bos_id, dtype=torch.int64, device=device)
        return cls(model, start, memory=memory, src_padding=src_padding, max_new_tokens=max_new_tokens,
                   eos_id=eos_id, pad_id=pad_id, use_cache=use_cache)

    @property
    def rows(self) -> int:
        return self.seq.shape[0]

    def advance(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``tokens`` ``(rows,)`` (nothing on the first call, which runs the prefill) and return the
        next token's log-probs ``(rows, vocab_size)`` float32."""
        if tokens is not None:
            self.seq = torch.cat([self.seq, tokens[:, None]], dim=1)
        logits = self._cached_logits() if self.cache is not None else self._recomputed_logits()
        return logits[:, -1].float().log_softmax(-1)

    def _cached_logits(self) -> torch.Tensor:
        """Feed only the tokens not fed yet (the prompt or BOS, then one per row)."""
        new = self.seq[:, self.fed:]
        self.fed = self.seq.shape[1]
        if self.is_lm:
            return self.model(new, cache=self.cache)
        # The first call projects the memory into the cross-attention caches; later calls need only those.
        memory, self.memory = self.memory, None
        return self.model.decode(new, memory, cache=self.cache)

    def _recomputed_logits(self) -> torch.Tensor:
        """Run the whole prefix. Generated tokens are never padding, even one equal to ``config.pad_id``:
        no target padding mask (as on the cached path)."""
        no_padding = None if self.model.config.pad_id is None else torch.ones_like(self.seq, dtype=torch.bool)
        if self.is_lm:
            return self.model(self.seq, no_padding)
        return self.model.decode(self.seq, self.memory, src_key_padding_mask=self.src_padding,
                                 tgt_key_padding_mask=no_padding)

    def reorder(self, index: torch.Tensor, *, same_source: bool = False) -> None:
        """Keep rows ``index`` (int64 ``(new_rows,)``) of the sequences and caches, in this order.

        ``same_source=True`` promises that each new row comes from a row of the same source (beam
        search after the first step): the source's state (memory, padding, cross-attention caches) is
        then equal across those rows and is left as it is.
        """
        self.seq = self.seq.index_select(0, index)
        if not same_source:
            if self.memory is not None:
                self.memory = self.memory.index_select(0, index)
            if self.src_padding is not None:
                self.src_padding = self.src_padding.index_select(0, index)
        for layer_cache in self.cache or ():
            self_cache, cross_cache = layer_cache if isinstance(layer_cache, tuple) else (layer_cache, None)
            self_cache.reorder(index)
            if cross_cache is not None and not same_source:
                cross_cache.reorder(index)


def _argmax(log_probs: torch.Tensor) -> torch.Tensor:
    return log_probs.argmax(-1)


def _one_token_per_step(model, inputs, choose: Callable[[torch.Tensor], torch.Tensor], *, src_key_padding_mask,
                        max_new_tokens, bos_id, eos_id, pad_id, use_cache) -> Generation:
    """Greedy decoding and sampling: ``choose`` maps ``(batch, vocab)`` log-probs to ``(batch,)`` tokens."""
    with _inference(model):
        stepper = _Stepper.build(model, inputs, src_key_padding_mask, max_new_tokens, bos_id, eos_id, pad_id,
                                 use_cache)
        batch, steps, device = stepper.rows, stepper.max_new_tokens, stepper.seq.device
        tokens = torch.full((batch, steps), stepper.pad_id, dtype=torch.int64, device=device)
        lengths = torch.full((batch,), steps, dtype=torch.int64, device=device)
        total = torch.zeros(batch, dtype=torch.float32, device=device)
        ended = torch.zeros(batch, dtype=torch.bool, device=device)
        log_probs = stepper.advance()
        for t in range(steps):
            token = torch.where(ended, stepper.pad_id, choose(log_probs))
            total += torch.where(ended, 0.0, log_probs.gather(1, token[:, None]).squeeze(1))
            tokens[:, t] = token
            if stepper.eos_id is not None:
                newly = ~ended & (token == stepper.eos_id)
                lengths = torch.where(newly, t + 1, lengths)
                ended |= newly
            if t + 1 == steps or bool(ended.all()):
                break
            log_probs = stepper.advance(token)
        tokens = tokens[:, :int(lengths.max())]
        return Generation(tokens=tokens, lengths=lengths, log_probs=total, scores=total.clone())


class _BeamSearch:
    """The state of a beam search over ``batch`` rows of ``beam_size`` hypotheses (see :func:`beam_search`).

    Live hypotheses: ``tokens`` ``(batch, beam, steps)`` and ``log_p`` ``(batch, beam)``; finished ones:
    ``fin_tokens``, ``fin_log_p``, ``fin_scores`` (``-inf`` = empty slot) and ``fin_lengths``, the best
    ``beam`` kept, sorted by score.
    """

    def __init__(self, stepper: _Stepper, beam_size: int, alpha: float):
        self.stepper, self.beam, self.alpha = stepper, beam_size, alpha
        self.batch, self.steps = stepper.rows, stepper.max_new_tokens
        device = stepper.seq.device
        shape = (self.batch, beam_size)
        self.tokens = torch.full((*shape, self.steps), stepper.pad_id, dtype=torch.int64, device=device)
        self.log_p = torch.full(shape, -math.inf, device=device)
        self.log_p[:, 0] = 0.0  # one live hypothesis per row at the start: the others are copies of it
        self.fin_tokens = self.tokens.clone()
        self.fin_log_p = torch.full(shape, -math.inf, device=device)
        self.fin_scores = torch.full(shape, -math.inf, device=device)
        self.fin_lengths = torch.zeros(shape, dtype=torch.int64, device=device)
        self.row_base = torch.arange(self.batch, device=device)[:, None] * beam_size

    def run(self) -> Generation:
        k, eos = self.beam, self.stepper.eos_id
        log_probs = self.stepper.advance()  # prefill once per row, then copy it to the row's beams
        expand = torch.arange(self.batch, device=log_probs.device).repeat_interleave(k)
        self.stepper.reorder(expand)
        log_probs = log_probs.index_select(0, expand)
        for t in range(self.steps):
            cand_log_p, parent, token = self._top_candidates(log_probs)
            history = self.tokens.gather(1, parent[..., None].expand(-1, -1, self.steps)).clone()
            history[:, :, t] = token
            is_eos = torch.zeros_like(token, dtype=torch.bool) if eos is None else token == eos
            done = self._done()
            ends = is_eos[:, :k] & ~done[:, None] & torch.isfinite(cand_log_p[:, :k])
            self._finish(history[:, :k], cand_log_p[:, :k], ends, length=t + 1)
            live = torch.sort(is_eos.to(torch.int8), dim=1, stable=True).indices[:, :k]  # first k non-EOS
            self.tokens = history.gather(1, live[..., None].expand(-1, -1, self.steps))
            self.log_p, parent = cand_log_p.gather(1, live), parent.gather(1, live)
            if t + 1 == self.steps or bool(self._done().all()):
                break
            self.stepper.reorder((self.row_base + parent).flatten(), same_source=True)
            log_probs = self.stepper.advance(self.tokens[:, :, t].flatten())
        # Out of steps: rows short of beam_size finished hypotheses let the live ones compete.
        open_rows = ~self._done()[:, None] & torch.isfinite(self.log_p)
        self._finish(self.tokens, self.log_p, open_rows, length=t + 1)
        return self._best()

    def _top_candidates(self, log_probs: torch.Tensor):
        """The ``2 * beam`` best one-token extensions per row by ``log P``: ``(log_p, parent, token)``, each
        ``(batch, 2 * beam)``, sorted best first. At most ``beam`` of them end in EOS (one per parent), so
        ``beam`` others stay live."""
        vocab = log_probs.shape[-1]
        total = (self.log_p[..., None] + log_probs.view(self.batch, self.beam, vocab)).flatten(1)
        cand_log_p, index = total.topk(min(2 * self.beam, total.shape[1]), dim=1)
        return cand_log_p, index // vocab, index % vocab

    def _finish(self, tokens, log_p, mask, *, length: int) -> None:
        """Add the hypotheses where ``mask`` ``(batch, m)`` is set (``tokens`` ``(batch, m, steps)``, ``log_p``
        ``(batch, m)``, all of ``length`` tokens) to the finished ones, keeping the best ``beam`` by score."""
        scores = torch.where(mask, log_p / gnmt_length_penalty(length, self.alpha), -math.inf)
        all_scores = torch.cat([self.fin_scores, scores], dim=1)
        self.fin_scores, keep = all_scores.topk(self.beam, dim=1)
        self.fin_log_p = torch.cat([self.fin_log_p, log_p], dim=1).gather(1, keep)
        self.fin_lengths = torch.cat([self.fin_lengths, torch.full_like(log_p, length, dtype=torch.int64)],
                                     dim=1).gather(1, keep)
        self.fin_tokens = torch.cat([self.fin_tokens, tokens], dim=1).gather(
            1, keep[..., None].expand(-1, -1, self.steps))

    def _done(self) -> torch.Tensor:
        """``(batch,)`` bool: the row holds ``beam`` finished hypotheses."""
        return torch.isfinite(self.fin_scores).sum(1) >= self.beam

    def _best(self) -> Generation:
        lengths = self.fin_lengths[:, 0]
        return Generation(tokens=self.fin_tokens[:, 0, :int(lengths.max())], lengths=lengths,
                          log_probs=self.fin_log_p[:, 0], scores=self.fin_scores[:, 0])


# ----------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _inference(model):
    """``model.eval()`` under ``torch.inference_mode()``, the training flag restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _check_inputs(model, inputs) -> torch.Tensor:
    what = "prompt" if isinstance(model, TransformerLM) else "src"
    if not isinstance(inputs, torch.Tensor) or inputs.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{what} must be an int64 or int32 tensor of token ids, got "
                        f"{inputs.dtype if isinstance(inputs, torch.Tensor) else type(inputs).__name__}")
    if inputs.dim() != 2 or inputs.shape[0] < 1 or inputs.shape[1] < 1:
        raise ValueError(f"{what} must have shape (batch, seqlen) with batch, seqlen >= 1, got {tuple(inputs.shape)}")
    return inputs.long()


def _check_id(name: str, value, vocab_size: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {value!r}")


def _check_sampling(temperature, top_k) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r} (for the most likely "
                         "token use greedy or top_k=1)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")


def _check_max_new_tokens(model, inputs: torch.Tensor, max_new_tokens) -> int:
    """The number of steps: ``max_new_tokens`` checked, or its default; the whole sequence (prompt or BOS,
    plus the new tokens) must fit in ``config.max_len`` positions."""
    max_len = model.config.max_len
    is_lm = isinstance(model, TransformerLM)
    start = inputs.shape[1] if is_lm else 1
    room = max_len - start
    if max_new_tokens is None:
        max_new_tokens = room if is_lm else min(inputs.shape[1] + EXTRA_TARGET_TOKENS, room)
        if max_new_tokens < 1:
            raise ValueError(f"the prompt of {start} tokens leaves no room for new tokens in max_len {max_len}")
        return max_new_tokens
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if max_new_tokens > room:
        what = f"the prompt's {start} tokens" if is_lm else "BOS"
        raise ValueError(f"max_new_tokens {max_new_tokens} is beyond the model's max_len {max_len}: with "
                         f"{what} at most {room} new tokens fit")
    return max_new_tokens


def _right_padding(model: Transformer, src: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor | None:
    """The source's True-for-tokens mask (given, or from ``config.pad_id``), checked to be right padding
    with at least one token per row (the cached cross-attention attends the first ``length`` keys)."""
    padding = model.padding_mask(src, given)  # raises ValueError for a wrong dtype or shape
    if padding is None:
        return None
    lengths = padding.sum(1)
    if int(lengths.min()) < 1:
        raise ValueError("every source row needs at least one token (its key padding mask is all False)")
    if not torch.equal(padding, torch.arange(src.shape[1], device=src.device) < lengths[:, None]):
        raise ValueError("the source key padding mask must be right padding (True for the first tokens of a "
                         "row, then False)")
    return padding


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m transformer.generate",
        description="Generate text from a checkpoint saved by transformer.checkpoint.save_checkpoint (byte-level "
                    "vocabulary). Encoder-decoder: --src, beam search by default (beam 4, alpha 0.6, as the "
                    "paper). LM: --prompt, sampling by default. --greedy, --beam-size or --temperature/--top-k "
                    "pick the strategy.")
    p.add_argument("checkpoint", help="path of the checkpoint file")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--prompt", help="LM: the text to continue (BOS is prepended); default: empty")
    text.add_argument("--src", help="encoder-decoder: the source text (encoded with BOS and EOS)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="most tokens to generate (default: source length + 50, or what fits in max_len)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding")
    p.add_argument("--beam-size", type=int, default=None, help=f"beam search with this beam (default {BEAM_SIZE} "
                                                                "for an encoder-decoder)")
    p.add_argument("--length-penalty", type=float, default=LENGTH_PENALTY,
                   help=f"beam search's alpha (default {LENGTH_PENALTY})")
    p.add_argument("--temperature", type=float, default=None, help="sample with this temperature (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    p.add_argument("--backend", choices=("triton", "torch"), default=None,
                   help="ops to run on (default: triton with CUDA, else torch)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return p


def _strategy(args, is_lm: bool, parser: argparse.ArgumentParser) -> str:
    sampling = args.temperature is not None or args.top_k is not None
    chosen = [name for name, on in (("greedy", args.greedy), ("beam", args.beam_size is not None),
                                    ("sample", sampling)) if on]
    if len(chosen) > 1:
        parser.error(f"pick one strategy: --greedy, --beam-size, or --temperature/--top-k (got {' and '.join(chosen)})")
    return chosen[0] if chosen else ("sample" if is_lm else "beam")


def main(argv: list[str] | None = None) -> int:
    """The ``python -m transformer.generate`` command; prints the text and returns the exit status (0).
    Bad arguments exit with status 2 and a message (argparse)."""
    from .checkpoint import load_checkpoint

    parser = _parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = args.backend or ("triton" if device.type == "cuda" else "torch")
    try:
        model, ckpt = load_checkpoint(args.checkpoint, backend=backend)
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"cannot load {args.checkpoint}: {error}")
    model = model.to(device)
    is_lm = ckpt["model_type"] == "lm"
    tokenizer = ByteTokenizer()
    if model.config.vocab_size != tokenizer.vocab_size:
        parser.error(f"this checkpoint's vocab_size is {model.config.vocab_size}; the CLI encodes text with the "
                     f"byte tokenizer ({tokenizer.vocab_size} ids)")
    if (is_lm and args.src is not None) or (not is_lm and args.prompt is not None):
        parser.error("an LM checkpoint takes --prompt, an encoder-decoder one --src")
    if not is_lm and args.src is None:
        parser.error("an encoder-decoder checkpoint needs --src TEXT")
    ids = tokenizer.encode(args.prompt or "", bos=True) if is_lm else tokenizer.encode(args.src, bos=True, eos=True)
    inputs = torch.tensor([ids], dtype=torch.int64, device=device)
    strategy = _strategy(args, is_lm, parser)
    common = dict(max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id, bos_id=tokenizer.bos_id,
                  pad_id=tokenizer.pad_id)
    try:
        if strategy == "greedy":
            out = greedy(model, inputs, **common)
        elif strategy == "beam":
            out = beam_search(model, inputs, beam_size=BEAM_SIZE if args.beam_size is None else args.beam_size,
                              length_penalty=args.length_penalty, **common)
        else:
            generator = None if args.seed is None else torch.Generator(device=device).manual_seed(args.seed)
            out = sample(model, inputs, temperature=1.0 if args.temperature is None else args.temperature,
                         top_k=args.top_k, generator=generator, **common)
    except ValueError as error:
        parser.error(str(error))
    new = out.tokens[0, :int(out.lengths[0])].tolist()
    print(tokenizer.decode((ids if is_lm else []) + new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
