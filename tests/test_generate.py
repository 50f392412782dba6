"""Tests of transformer/generate.py: greedy decoding, beam search and sampling, for the encoder-decoder
and the LM, with and without the KV cache, on both backends; beam search against exhaustive search; a
model trained on the reverse task decodes it with beam search; the command line; bad arguments.

The models (d_model 32, vocab 10) are trained for a few seconds on the reverse task (torch backend):
briefly, so that their outputs vary and end with EOS at different steps, or longer, so that they know
the task. Random models make poor tests here: with tied embeddings they repeat one token forever. The
triton backend runs through Triton's interpreter on a CPU (tests/conftest.py), so its tests use even
smaller shapes."""

from __future__ import annotations

import copy
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import transformer_kernels as tk
from transformer import Transformer, TransformerLM, copy_task_batch, train_step
from transformer.checkpoint import save_checkpoint
from transformer.config import from_preset
from transformer.generate import (
    beam_search,
    gnmt_length_penalty,
    greedy,
    main,
    sample,
    sampling_log_probs,
)

VOCAB, BOS, EOS, PAD = 10, 0, 8, 9  # ids 1..7 are symbols; BOS 0 as transformer.training.copy_task_batch
IDS = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)
MODELS = {"lm": TransformerLM, "encoder_decoder": Transformer}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These shapes are far too small for intra-op threads; on a busy 2-core machine two threads spin
    and run ~10x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reverse_task(kind: str, n: int, generator: torch.Generator, longest: int = 5):
    """A batch of the reverse task, sources of 2..``longest`` symbols. Encoder-decoder: ``(src, tgt)``,
    ``src`` right-padded with PAD, ``tgt`` = BOS, the source reversed, EOS, PAD... LM: ``tokens`` = the
    source, BOS (as a separator), the source reversed, EOS, PAD..."""
    src, _ = copy_task_batch(n, longest, EOS, generator=generator)  # symbols 1..EOS-1
    lengths = torch.randint(2, longest + 1, (n,), generator=generator).tolist()
    tgt = torch.full((n, longest + 2), PAD)
    lm = torch.full((n, 2 * longest + 2), PAD)
    for i, length in enumerate(lengths):
        body = src[i, :length].clone()
        src[i, length:] = PAD
        tgt[i, :length + 2] = torch.cat([torch.tensor([BOS]), body.flip(0), torch.tensor([EOS])])
        lm[i, :2 * length + 2] = torch.cat([body, torch.tensor([BOS]), body.flip(0), torch.tensor([EOS])])
    return (src, tgt) if kind == "encoder_decoder" else lm


def train_on_reverse(kind: str, steps: int, snapshot_at: int):
    """A tiny model (d_model 32) trained with :func:`train_step` on the reverse task, Adam with warm-up
    and linear decay; returns ``(snapshot after snapshot_at steps, final model)``, both in eval mode."""
    torch.manual_seed(0)
    config = from_preset("tiny", vocab_size=VOCAB, backend="torch", pad_id=PAD, max_len=16, d_model=32, d_ff=128,
                         num_encoder_layers=1, num_decoder_layers=1 if kind == "encoder_decoder" else 2)
    model, snapshot = MODELS[kind](config), MODELS[kind](config)
    optimizer = torch.optim.Adam(model.parameters())
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 5e-3 * min(1.0, (step + 1) / 30) * (1 - step / steps)
        train_step(model, reverse_task(kind, 64, generator), optimizer)
        if step + 1 == snapshot_at:
            snapshot.load_state_dict(model.state_dict())
    return snapshot.eval(), model.eval()


@pytest.fixture(scope="module")
def models():
    """``{"lm": ..., "encoder_decoder": ...}``: models trained for 60 steps, which half know the task, so
    they end rows with EOS at different steps and keep several tokens likely; and ``"reverse"``, an
    encoder-decoder trained for 400 steps, which knows it. Don't modify them."""
    early_ed, reverse = train_on_reverse("encoder_decoder", steps=400, snapshot_at=60)
    early_lm, _ = train_on_reverse("lm", steps=60, snapshot_at=60)
    return {"encoder_decoder": early_ed, "lm": early_lm, "reverse": reverse}


def random_inputs(kind: str, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Sources of ``length`` symbols, or LM prompts of ``length`` symbols and the BOS separator."""
    symbols = torch.randint(1, EOS, (batch, length), generator=torch.Generator().manual_seed(seed))
    return symbols if kind == "encoder_decoder" else torch.cat([symbols, torch.full((batch, 1), BOS)], dim=1)


def full_log_probs(model, inputs, tokens, src_key_padding_mask=None) -> torch.Tensor:
    """``(batch, steps, vocab)`` float32 next-token log-probs along ``tokens``, by one full forward."""
    with torch.no_grad():
        if isinstance(model, TransformerLM):
            logits = model(torch.cat([inputs, tokens], dim=1))[:, inputs.shape[1] - 1:-1]
        else:
            bos = torch.full((inputs.shape[0], 1), BOS, dtype=torch.int64)
            logits = model(inputs, torch.cat([bos, tokens[:, :-1]], dim=1), src_key_padding_mask=src_key_padding_mask)
    return logits.float().log_softmax(-1)


def check_well_formed(out, max_new_tokens: int) -> None:
    """EOS only as a row's last token; ``lengths`` new tokens, then PAD."""
    batch, steps = out.tokens.shape
    assert steps == int(out.lengths.max()) <= max_new_tokens
    for row, n in zip(out.tokens, out.lengths.tolist()):
        assert (row[:n - 1] != EOS).all()
        assert row[n - 1] == EOS or n == max_new_tokens
        assert (row[n:] == PAD).all()


def check_log_probs(model, inputs, out, src_key_padding_mask=None) -> None:
    """``out.log_probs`` is the sum of the model's log-probs of the tokens, by a full forward."""
    lp = full_log_probs(model, inputs, out.tokens, src_key_padding_mask)
    per_token = lp.gather(2, out.tokens[..., None]).squeeze(2)
    inside = torch.arange(out.tokens.shape[1])[None] < out.lengths[:, None]
    torch.testing.assert_close(out.log_probs, (per_token * inside).sum(1), atol=1e-4, rtol=1e-5)


def assert_same_generation(a, b) -> None:
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Beam 1 = greedy; cache = recompute
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(MODELS))
def test_beam_search_with_beam_one_equals_greedy(models, kind):
    model = models[kind]
    inputs = random_inputs(kind, 8, 4)
    g = greedy(model, inputs, max_new_tokens=7, **IDS)
    b = beam_search(model, inputs, beam_size=1, max_new_tokens=7, **IDS)
    assert torch.equal(g.tokens, b.tokens) and torch.equal(g.lengths, b.lengths)
    torch.testing.assert_close(g.log_probs, b.log_probs)
    torch.testing.assert_close(b.scores, b.log_probs / gnmt_length_penalty(b.lengths.float(), 0.6))
    assert len(set(g.lengths.tolist())) > 1 and (g.tokens == EOS).any(), "rows should end at different steps"
    check_well_formed(g, 7)
    check_log_probs(model, inputs, g)


def query_widths(model) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Records the number of query rows (tokens) of each call of the first self-attention."""
    widths = []
    layer = model.layers[0] if isinstance(model, TransformerLM) else model.decoder.layers[0]
    return widths, layer.self_attn.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))


@pytest.mark.parametrize("kind", list(MODELS))
def test_cache_equals_full_recompute_torch(models, kind):
    """Token for token and score for score; each cached step feeds one query row per sequence."""
    model = models[kind]
    inputs = random_inputs(kind, 6, 4, seed=1)
    widths, hook = query_widths(model)
    try:
        for run in (lambda **kw: greedy(model, inputs, max_new_tokens=8, **IDS, **kw),
                    lambda **kw: beam_search(model, inputs, beam_size=3, max_new_tokens=8, **IDS, **kw)):
            widths.clear()
            cached = run(use_cache=True)
            prefill = inputs.shape[1] if kind == "lm" else 1
            assert widths[0] == prefill and set(widths[1:]) == {1}, widths
            widths.clear()
            full = run(use_cache=False)
            assert widths == list(range(prefill, prefill + len(widths)))  # the whole prefix, every step
            assert_same_generation(cached, full)
            assert len(set(cached.lengths.tolist())) > 1
            check_well_formed(cached, 8)
            check_log_probs(model, inputs, cached)
    finally:
        hook.remove()


@pytest.mark.parametrize("kind", list(MODELS))
def test_cache_equals_full_recompute_triton(models, kind, device, monkeypatch):
    """The triton backend: the cached path runs flash_attn_with_kvcache (split-key decoding) on the
    Triton kernel, one query row per step; it equals full recompute, and the torch backend, token for
    token and score for score."""
    reference = copy.deepcopy(models[kind]).to(device)
    model = copy.deepcopy(reference).set_backend("triton")
    inputs = random_inputs(kind, 2, 2, seed=2).to(device)
    calls = []
    real = tk.flash_attn_with_kvcache
    monkeypatch.setattr(tk, "flash_attn_with_kvcache",
                        lambda q, *args, **kwargs: calls.append(q.shape[1]) or real(q, *args, **kwargs))
    layers = len(model.layers) if kind == "lm" else 2 * len(model.decoder.layers)  # (self, cross) per layer
    for run in (lambda m, **kw: greedy(m, inputs, max_new_tokens=4, **IDS, **kw),
                lambda m, **kw: beam_search(m, inputs, beam_size=2, max_new_tokens=4, **IDS, **kw)):
        calls.clear()
        launched = tk.launch_count("attention_fwd")
        cached = run(model, use_cache=True)
        assert calls[:layers] == [1 if kind == "encoder_decoder" else inputs.shape[1]] * layers  # the prefill
        assert len(calls) > layers and set(calls[layers:]) == {1}, calls  # then one query row per step
        assert tk.launch_count("attention_fwd") > launched and tk.last_path("attention") == "triton"
        assert_same_generation(cached, run(model, use_cache=False))
        assert_same_generation(cached, run(reference))


# ----------------------------------------------------------------------------------------------------------
# Beam search: exact on a tiny search space, the paper's defaults, source padding, a trained model
# ----------------------------------------------------------------------------------------------------------

def exhaustive_best(model, inputs, steps: int, alpha: float):
    """Best ``log P(Y) / lp(|Y|)`` over every hypothesis of at most ``steps`` tokens (ending at its first
    EOS, or ``steps`` long without one), for a batch of one: ``(tokens, score)``."""
    every = torch.tensor(list(itertools.product(range(VOCAB), repeat=steps)))
    lp = full_log_probs(model, inputs.expand(len(every), -1), every)
    cum = lp.gather(2, every[..., None]).squeeze(2).cumsum(1)
    best, best_tokens = -math.inf, None
    for n in range(1, steps + 1):
        no_eos_before = (every[:, :n - 1] != EOS).all(1)
        ends = no_eos_before & (every[:, n - 1] == EOS) if n < steps else no_eos_before
        scores = torch.where(ends, cum[:, n - 1] / gnmt_length_penalty(n, alpha), -math.inf)
        i = int(scores.argmax())
        if scores[i] > best:
            best, best_tokens = float(scores[i]), every[i, :n]
    return best_tokens, best


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("alpha", [0.6, 0.0])
def test_beam_search_as_wide_as_the_search_space_is_exact(models, kind, alpha):
    """With a beam that holds every hypothesis, beam search returns the exact best length-penalized one."""
    model, steps = models[kind], 3
    for seed in range(3):
        inputs = random_inputs(kind, 1, 2, seed=seed)
        tokens, score = exhaustive_best(model, inputs, steps, alpha)
        out = beam_search(model, inputs, beam_size=VOCAB ** steps, length_penalty=alpha, max_new_tokens=steps,
                          **IDS)
        assert out.tokens[0, :int(out.lengths[0])].tolist() == tokens.tolist()
        assert out.scores[0].item() == pytest.approx(score, abs=1e-5)


def test_beam_search_defaults_and_length_penalty(models):
    """The paper's defaults (beam 4, alpha 0.6); scores are log P / lp(|Y|) and log P is the model's."""
    model = models["encoder_decoder"]
    src = random_inputs("encoder_decoder", 8, 5, seed=4)
    out = beam_search(model, src, max_new_tokens=9, **IDS)
    torch.testing.assert_close(out.scores, out.log_probs / ((5 + out.lengths.float()) / 6) ** 0.6)
    check_well_formed(out, 9)
    check_log_probs(model, src, out)
    alpha0 = beam_search(model, src, length_penalty=0.0, max_new_tokens=9, **IDS)
    torch.testing.assert_close(alpha0.scores, alpha0.log_probs)
    assert not torch.equal(out.tokens, greedy(model, src, max_new_tokens=9, **IDS).tokens)  # it searched


@pytest.mark.parametrize("use_cache", [True, False])
def test_source_padding(models, use_cache):
    """A right-padded source row decodes as the unpadded source alone, with the mask given or derived
    from config.pad_id."""
    model = models["encoder_decoder"]
    src = random_inputs("encoder_decoder", 2, 5, seed=5)
    src[1, 3:] = PAD
    mask = src != PAD
    for run in (greedy, lambda m, x, **kw: beam_search(m, x, beam_size=3, **kw)):
        padded = run(model, src, src_key_padding_mask=mask, max_new_tokens=8, use_cache=use_cache, **IDS)
        assert_same_generation(padded, run(model, src, max_new_tokens=8, use_cache=use_cache, **IDS))
        alone = run(model, src[1:, :3], max_new_tokens=8, use_cache=use_cache, **IDS)
        n = int(alone.lengths[0])
        assert padded.tokens[1, :n].tolist() == alone.tokens[0, :n].tolist()
        assert padded.scores[1].item() == pytest.approx(alone.scores[0].item(), abs=1e-4)


def test_trained_reverse_task_beam_search(models):
    """A tiny encoder-decoder trained briefly (torch backend, 400 steps) to reverse its source and then
    emit EOS decodes held-out sources of 2..5 symbols exactly, with beam search (beam 4, alpha 0.6) and
    greedy, in one padded batch."""
    model = models["reverse"]
    src, tgt = reverse_task("encoder_decoder", 32, torch.Generator().manual_seed(1))
    expected = [row[1:][row[1:] != PAD].tolist() for row in tgt]  # the source reversed, EOS
    model.train()
    for out in (beam_search(model, src, max_new_tokens=10, **IDS), greedy(model, src, max_new_tokens=10, **IDS)):
        got = [row[:n].tolist() for row, n in zip(out.tokens, out.lengths.tolist())]
        assert got == expected
        assert model.training  # generation ran in eval mode and restored the flag
    model.eval()


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(MODELS))
def test_sampling_top_k_one_and_cold_temperature_equal_greedy(models, kind):
    model = models[kind]
    inputs = random_inputs(kind, 6, 4, seed=6)
    g = greedy(model, inputs, max_new_tokens=8, **IDS)
    for kwargs in (dict(top_k=1), dict(top_k=1, temperature=3.0), dict(temperature=1e-4)):
        s = sample(model, inputs, max_new_tokens=8, generator=torch.Generator().manual_seed(0), **kwargs, **IDS)
        assert_same_generation(g, s)


@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_top_k_bound_and_reproducibility(models, use_cache):
    """With top_k=3 every sampled token is among the 3 most likely under the model (checked against the
    logits of a full forward); the same seed gives the same draws."""
    model = models["lm"]
    prompt = random_inputs("lm", 16, 3, seed=7)
    draw = lambda seed: sample(model, prompt, top_k=3, temperature=2.0, max_new_tokens=8,  # noqa: E731
                               use_cache=use_cache, generator=torch.Generator().manual_seed(seed), **IDS)
    out = draw(0)
    lp = full_log_probs(model, prompt, out.tokens)
    third = lp.topk(3, dim=-1).values[..., -1]
    chosen = lp.gather(2, out.tokens[..., None]).squeeze(2)
    inside = torch.arange(out.tokens.shape[1])[None] < out.lengths[:, None]
    assert (chosen[inside] >= third[inside] - 1e-5).all()
    assert (chosen[inside] < lp.max(-1).values[inside] - 1e-3).any()  # it samples, not only the argmax
    check_log_probs(model, prompt, out)
    check_well_formed(out, 8)
    assert_same_generation(out, draw(0))
    assert not torch.equal(out.tokens, draw(1).tokens)


def test_sampling_log_probs():
    """softmax(logits / T) renormalized over exactly the top_k largest logits, -inf elsewhere."""
    logits = torch.randn(4, 7, VOCAB) * 3
    for temperature, top_k in ((1.0, None), (0.5, 3), (2.0, 1), (1.5, VOCAB + 5)):
        got = sampling_log_probs(logits, temperature, top_k)
        k = VOCAB if top_k is None else min(top_k, VOCAB)
        kept = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(k, dim=-1).indices, True)
        ref = (logits / temperature).masked_fill(~kept, -math.inf).log_softmax(-1)
        torch.testing.assert_close(got, ref)
        assert (torch.isfinite(got).sum(-1) == k).all()
    ties = torch.zeros(2, VOCAB)
    assert (torch.isfinite(sampling_log_probs(ties, 1.0, 3)).sum(-1) == 3).all()


def test_sampling_follows_the_tempered_distribution(models):
    """The first sampled token's frequencies over 4000 draws match softmax(logits / T) over the top k
    (within 5 sigma), and no token outside the top k appears."""
    model = models["lm"]
    prompt = random_inputs("lm", 1, 4, seed=8).expand(4000, -1)
    with torch.no_grad():
        probs = sampling_log_probs(model(prompt[:1])[0, -1], temperature=1.5, top_k=5).exp()
    out = sample(model, prompt, temperature=1.5, top_k=5, max_new_tokens=1,
                 generator=torch.Generator().manual_seed(0), **IDS)
    freq = torch.bincount(out.tokens[:, 0], minlength=VOCAB).float() / len(prompt)
    sigma = (probs * (1 - probs) / len(prompt)).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-6).all(), (freq, probs)
    assert (probs > 0.02).sum() >= 3  # a spread distribution, so the check means something


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(MODELS))
def test_bad_arguments_raise(models, kind):
    model = models[kind]
    x = random_inputs(kind, 2, 3)
    room = model.config.max_len - (x.shape[1] if kind == "lm" else 1)
    cases = [
        (lambda: beam_search(model, x, beam_size=0, **IDS), "beam_size must be an int >= 1"),
        (lambda: beam_search(model, x, length_penalty=math.nan, **IDS), "length_penalty"),
        (lambda: sample(model, x, temperature=0.0, **IDS), "temperature must be a finite number > 0"),
        (lambda: sample(model, x, temperature=-1.0, **IDS), "temperature"),
        (lambda: sample(model, x, top_k=0, **IDS), "top_k must be None or an int >= 1"),
        (lambda: greedy(model, x, max_new_tokens=0, **IDS), "max_new_tokens must be an int >= 1"),
        (lambda: greedy(model, x, max_new_tokens=room + 1, **IDS), "beyond the model's max_len"),
        (lambda: greedy(model, x, bos_id=BOS, eos_id=VOCAB), "eos_id must be a token id"),
        (lambda: greedy(model, x[:, :0], **IDS), "shape"),
    ]
    if kind == "lm":
        cases.append((lambda: greedy(model, x, src_key_padding_mask=x > 0, **IDS), "TransformerLM"))
    else:
        bad_mask = torch.tensor([[False, True, True]] * 2)
        cases.append((lambda: greedy(model, x, src_key_padding_mask=bad_mask, **IDS), "right padding"))
        cases.append((lambda: greedy(model, x, bos_id=-1), "bos_id"))
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError):
        greedy(model, x.float(), **IDS)
    with pytest.raises(TypeError):
        greedy(torch.nn.Linear(2, 2), x, **IDS)
    assert greedy(model, x, max_new_tokens=room, bos_id=BOS, eos_id=None).tokens.shape == (2, room)  # it fits


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    paths = {}
    for kind, cls in MODELS.items():
        torch.manual_seed(0)
        model = cls(from_preset("tiny", backend="torch", d_model=32, d_ff=64, num_encoder_layers=1,
                                num_decoder_layers=1, max_len=64))
        paths[kind] = save_checkpoint(root / f"{kind}.pt", model)
    return paths


def test_cli_subprocess(checkpoints):
    """``python -m transformer.generate`` on a saved LM checkpoint prints the prompt and its continuation."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "kernels") + os.pathsep + str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "transformer.generate", str(checkpoints["lm"]), "--prompt", "Hi",
                             "--max-new-tokens", "6", "--top-k", "5", "--seed", "0", "--backend", "torch",
                             "--device", "cpu"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hi") and result.stdout.endswith("\n")


@pytest.mark.parametrize("flags", [[], ["--greedy"], ["--beam-size", "2", "--length-penalty", "1.0"]])
def test_cli_encoder_decoder(checkpoints, capsys, flags):
    assert main([str(checkpoints["encoder_decoder"]), "--src", "abc", "--max-new-tokens", "5", "--backend", "torch",
                 "--device", "cpu", *flags]) == 0
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize("argv, message", [
    (["--src", "abc", "--beam-size", "0"], "beam_size"),
    (["--src", "abc", "--max-new-tokens", "1000"], "max_len"),
    (["--src", "abc", "--greedy", "--beam-size", "2"], "pick one strategy"),
    (["--prompt", "abc"], "--src"),
    ([], "needs --src"),
])
def test_cli_bad_arguments(checkpoints, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoints["encoder_decoder"]), "--backend", "torch", "--device", "cpu", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(checkpoints["lm"]), "--backend", "torch", "--device", "cpu", "--temperature", "0"])
