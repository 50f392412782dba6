"""Tests of the training recipe and ``python -m transformer.train`` (Vaswani et al., 2017, Sec. 5).

What they show: the learning-rate schedule is the paper's formula; the loss smooths labels and skips
padding; the corpora and task batches are what they claim; the encoder-decoder learns to reverse strings
and the language model beats the unigram baseline on the standard library's source; a resumed run
repeats an uninterrupted one exactly; the CLI writes its files, alone and under ``torchrun`` with
gloo (replicas bit-identical, data different per rank); and it runs on the Triton kernels.

All on the torch backend (the Triton interpreter is far too slow to train) except the smoke test, in
one thread per process: on a shared 2-core machine, oversubscribed OpenMP threads make the same steps
5-10x slower.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import transformer_kernels as tk
from transformer import Transformer, TransformerConfig, TransformerLM, train
from transformer.checkpoint import load_checkpoint
from transformer.data import (
    LMBatcher,
    load_corpus,
    stdlib_files,
    task_batch,
    task_target,
    unigram_entropy,
)
from transformer.tokenizer import BOS_ID, EOS_ID, PAD_ID
from transformer.training import (
    compute_loss,
    evaluate,
    loss_and_metrics,
    make_optimizer,
    noam_lr,
    noam_scheduler,
    train_step,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(*args, out: Path) -> dict:
    """``train.main`` in this process with a quiet bar; returns the summary."""
    return train.main([*map(str, args), "--out", str(out), "--no-progress"])


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "kernels"), str(ROOT)])}


# ---------------------------------------------------------------------------------------------------
# Schedule, optimizer, loss
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_model, warmup", [(512, 4000), (64, 100)])
def test_noam_lr_matches_the_formula(d_model, warmup):
    formula = lambda step: d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)  # noqa: E731
    assert noam_lr(1, d_model, warmup) == pytest.approx(d_model ** -0.5 * warmup ** -1.5, rel=1e-12)
    assert noam_lr(warmup, d_model, warmup) == pytest.approx((d_model * warmup) ** -0.5, rel=1e-12)
    assert noam_lr(10 * warmup, d_model, warmup) == pytest.approx((d_model * 10 * warmup) ** -0.5, rel=1e-12)
    steps = range(1, 20 * warmup, max(1, warmup // 50))
    for step in steps:
        assert noam_lr(step, d_model, warmup) == pytest.approx(formula(step), rel=1e-12)
    peak = max(range(1, 3 * warmup), key=lambda s: noam_lr(s, d_model, warmup))
    assert peak == warmup
    with pytest.raises(ValueError):
        noam_lr(0, d_model, warmup)


def test_scheduler_gives_the_formula_at_each_optimizer_step():
    """Base lr 1.0 (the paper): the rate used by the n-th optimizer step is scale * noam_lr(n)."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = make_optimizer([param])
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-9
    scheduler = noam_scheduler(optimizer, d_model=64, warmup=10, scale=0.5)
    for n in range(1, 40):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * noam_lr(n, 64, 10), rel=1e-12)
        param.sum().backward()
        optimizer.step()
        scheduler.step()


def test_loss_smooths_labels_and_ignores_padding():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.from_preset("tiny", backend="torch", pad_id=PAD_ID)).eval()
    src, tgt = task_batch("copy", 4, 6, min_len=2, generator=torch.Generator().manual_seed(1))
    assert (tgt == PAD_ID).any()
    with torch.no_grad():
        logits = model(src, tgt[:, :-1])
        keep = tgt[:, 1:] != PAD_ID
        expected = F.cross_entropy(logits[keep], tgt[:, 1:][keep], label_smoothing=0.1)
        torch.testing.assert_close(compute_loss(model, (src, tgt), label_smoothing=0.1), expected)
        loss, metrics = loss_and_metrics(model, (src, tgt), label_smoothing=0.1)
    assert metrics.tokens == int(keep.sum())
    assert metrics.loss == pytest.approx(expected.item(), rel=1e-5)
    assert metrics.nll == pytest.approx(F.cross_entropy(logits[keep], tgt[:, 1:][keep]).item(), rel=1e-5)
    assert metrics.perplexity == pytest.approx(math.exp(metrics.nll))


def test_train_step_follows_the_schedule():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig.from_preset("tiny", backend="torch"))
    optimizer = make_optimizer(model.parameters())
    scheduler = noam_scheduler(optimizer, 64, warmup=4)
    batch = torch.randint(0, 256, (2, 9))
    for n in range(1, 6):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(noam_lr(n, 64, 4))
        assert math.isfinite(train_step(model, batch, optimizer, 0.1, scheduler=scheduler))


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def test_stdlib_corpus_is_deterministic_and_split():
    files = stdlib_files()
    assert len(files) > 100 and files == stdlib_files()
    names = {f.name for f in files}
    assert {"os.py", "argparse.py"} <= names
    root = Path(sysconfig.get_paths()["stdlib"])
    assert not any({"site-packages", "test"} & set(f.relative_to(root).parts) for f in files)
    corpus = load_corpus(max_bytes=300_000, val_fraction=0.1)
    assert corpus.num_bytes == 300_000 and corpus.val.numel() == 30_000
    assert corpus.train[0] == BOS_ID and (corpus.train == EOS_ID).any()
    assert torch.equal(load_corpus(max_bytes=300_000, val_fraction=0.1).val, corpus.val)
    head = bytes(corpus.train[1:200].tolist())
    assert head == files[0].read_bytes()[:199]


def test_user_files_and_unigram_entropy(tmp_path):
    (tmp_path / "a.txt").write_text("ab" * 500)
    corpus = load_corpus([tmp_path / "a.txt"], val_fraction=0.5)
    assert corpus.name == "files" and corpus.sources == [str(tmp_path / "a.txt")]
    # val: the second half of BOS abab...ab EOS: 500 bytes + EOS, "a" and "b" equally often.
    p = torch.tensor([250, 250, 1], dtype=torch.float64) / 501
    assert unigram_entropy(corpus.val) == pytest.approx(float(-(p * p.log()).sum()))
    assert unigram_entropy(torch.arange(16)) == pytest.approx(math.log(16))


def test_files_option_expands_folders(tmp_path):
    for name in ("b.txt", "sub/c.md", ".git/config", "sub/.hidden"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    one = tmp_path / "a.txt"
    one.write_text("a")
    assert train.expand_files([one, tmp_path]) == [one, one, tmp_path / "b.txt", tmp_path / "sub" / "c.md"]
    with pytest.raises(FileNotFoundError):
        train.expand_files([tmp_path / "missing.txt"])


def test_lm_batcher_draws_seeded_windows():
    tokens = torch.arange(1000, dtype=torch.int16)
    batcher = LMBatcher(tokens, batch_size=4, seq_len=16)
    a = batcher.batch(torch.Generator().manual_seed(3))
    b = batcher.batch(torch.Generator().manual_seed(3))
    assert a.shape == (4, 17) and a.dtype == torch.int64 and torch.equal(a, b)
    assert torch.equal(a - a[:, :1], torch.arange(17).expand(4, 17))  # contiguous windows
    assert len(batcher.fixed_batches(3, seed=1)) == 3


@pytest.mark.parametrize("task", ["copy", "reverse", "sort"])
def test_task_batch_layout(task):
    src, tgt = task_batch(task, 32, 7, generator=torch.Generator().manual_seed(0))
    assert src.shape == tgt.shape == (32, 9)
    for s, t in zip(src.tolist(), tgt.tolist()):
        n = s.index(EOS_ID) - 1
        assert s[0] == BOS_ID and 1 <= n <= 7 and all(97 <= c <= 122 for c in s[1:n + 1])
        assert set(s[n + 2:]) <= {PAD_ID} and set(t[n + 2:]) <= {PAD_ID}
        assert t[: n + 2] == [BOS_ID, *task_target(task, s[1:n + 1]), EOS_ID]


# ---------------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_decode(model: Transformer, src: torch.Tensor, max_len: int) -> torch.Tensor:
    """Greedy decoding without a cache: ``(batch, max_len)`` ids after BOS (the model's own outputs fed back)."""
    model.eval()
    memory = model.encode(src)
    out = torch.full((src.shape[0], 1), BOS_ID)
    for _ in range(max_len):
        logits = model.decode(out, memory, src=src)[:, -1]
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    return out[:, 1:]


def test_encoder_decoder_learns_to_reverse(tmp_path):
    """Measured (seeds 0, 1, 2): 11-14 s on one CPU thread; validation token accuracy 0.99-1.0 (teacher
    forced); greedy decoding of 200 fresh strings 0.994-0.999 of the tokens and 0.98-0.995 of the strings
    exactly right."""
    summary = run_cli("--model", "encoder_decoder", "--task", "reverse", "--preset", "tiny", "--backend", "torch",
                      "--steps", 400, "--batch-size", 64, "--seq-len", 8, "--warmup", 50, "--lr-scale", 0.2,
                      "--eval-every", 100, "--device", "cpu", out=tmp_path)
    assert summary["val"]["accuracy"] >= 0.95, summary
    model, _ = load_checkpoint(tmp_path / "checkpoint.pt", backend="torch")
    src, tgt = task_batch("reverse", 200, 8, generator=torch.Generator().manual_seed(12345))
    decoded, expected = greedy_decode(model, src, max_len=tgt.shape[1] - 1), tgt[:, 1:]
    scored = expected != PAD_ID  # the reversed string and its EOS
    assert (decoded[scored] == expected[scored]).float().mean() >= 0.95
    assert ((decoded == expected) | ~scored).all(dim=1).float().mean() >= 0.9


def test_language_model_beats_the_unigram_baseline_on_stdlib(tmp_path):
    """Measured (seeds 0, 1, 2): 200 steps of 32 x 64 bytes, 7-9 s on one CPU thread; validation NLL
    2.0-2.1 nats/byte (perplexity ~8) against a unigram entropy of 3.0 (perplexity ~20)."""
    summary = run_cli("--model", "lm", "--preset", "tiny", "--backend", "torch", "--device", "cpu",
                      "--steps", 200, "--batch-size", 32, "--seq-len", 64, "--warmup", 50,
                      "--max-corpus-bytes", 1_000_000, "--eval-every", 100, out=tmp_path)
    baseline, val = summary["unigram_entropy"], summary["val"]["nll"]
    assert 2.0 < baseline < 4.0  # bytes of Python source: ~4.3-4.6 bits each
    assert val < 0.8 * baseline, summary
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["step"] for r in metrics["eval"]] == [100, 200]
    assert metrics["eval"][-1]["nll"] < metrics["eval"][0]["nll"]


# ---------------------------------------------------------------------------------------------------
# Checkpoints and the CLI
# ---------------------------------------------------------------------------------------------------
COMMON = ("--preset", "tiny", "--backend", "torch", "--device", "cpu", "--batch-size", 4, "--seq-len", 16,
          "--warmup", 3, "--max-corpus-bytes", 50_000, "--eval-every", 4, "--eval-batches", 2, "--dropout", 0.1)


@pytest.mark.parametrize("model", ["lm", "encoder_decoder"])
def test_resume_continues_exactly(tmp_path, model):
    """Dropout on, so the per-step seeds matter too: 4 + 4 resumed steps == 8 steps, bit for bit."""
    run_cli("--model", model, "--steps", 8, *COMMON, out=tmp_path / "full")
    run_cli("--model", model, "--steps", 4, *COMMON, out=tmp_path / "part")
    resumed = train.main(["--resume", str(tmp_path / "part" / "checkpoint.pt"), "--steps", "8", "--no-progress"])
    assert resumed["out"] == str(tmp_path / "part")
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    part = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert [r["step"] for r in part["train"]] == list(range(1, 9))
    for key in ("loss", "lr"):
        assert [r[key] for r in part["train"]] == [r[key] for r in full["train"]], key
    a, ckpt = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b, ckpt_resumed = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert ckpt["step"] == ckpt_resumed["step"] == 8
    assert ckpt_resumed["scheduler"]["last_epoch"] == 8
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_cli_writes_checkpoint_metrics_and_plot(tmp_path):
    """``python -m transformer.train`` in a fresh process, on a user's text file."""
    text = tmp_path / "poem.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 200)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "transformer.train", "--files", str(text), "--steps", "6", "--out", str(out),
         *map(str, COMMON)], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout and "perplexity" in result.stdout
    assert "files: 1 files" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["train"]) == 6 and metrics["summary"]["step"] == 6
    assert {"loss", "nll", "perplexity", "lr", "tokens_per_s"} <= set(metrics["train"][0])
    assert metrics["unigram_entropy"] > 0 and metrics["eval"][-1]["step"] == 6
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert isinstance(model, TransformerLM) and checkpoint["step"] == 6
    assert checkpoint["config"]["vocab_size"] == 259
    assert checkpoint["optimizer"] is not None and checkpoint["scheduler"]["last_epoch"] == 6


def test_cli_rejects_a_model_task_mismatch(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "lm", "--task", "reverse"])
    assert "cannot learn" in capsys.readouterr().err


def test_torchrun_two_processes_with_gloo(tmp_path):
    """DistributedDataParallel on CPU: 2 processes, each on its own data (different losses), gradients
    averaged (bit-identical parameters after every step, checked at the end by a SHA-256 per rank)."""
    out = tmp_path / "ddp"
    for attempt in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "transformer.train", "--steps", "5", "--out", str(out), *map(str, COMMON)],
            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        # A rank has aborted at interpreter exit, after training, its barrier and destroy_process_group
        # ("terminate called without an active exception", seen twice in CI rehearsals on 2 busy cores):
        # one retry, and the second run must exit cleanly.
        if result.returncode == 0 or "terminate called without an active exception" not in result.stderr:
            break
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    ddp = metrics["distributed"]
    assert ddp["world_size"] == 2 and metrics["summary"]["world_size"] == 2
    assert ddp["replicas_identical"] and len(set(ddp["param_digests"])) == 1
    losses = ddp["last_step_rank_losses"]
    assert len(losses) == 2 and losses[0] != losses[1]
    model, checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["step"] == 5
    assert train.param_digest(model) == ddp["param_digests"][0]  # rank 0 saved the shared weights
    assert result.stdout.count("wrote ") == 1  # only rank 0 reports


def test_triton_backend_smoke(tmp_path, device):
    """Two steps on the Triton kernels (interpreted on a CPU): the CLI runs them, forward and backward."""
    before = {k: tk.launch_count(k) for k in ("attention_fwd", "attention_bwd_dq", "layer_norm_fwd", "ffn_matmul")}
    summary = run_cli("--model", "lm", "--preset", "tiny", "--backend", "triton", "--device", device,
                      "--steps", 2, "--batch-size", 2, "--seq-len", 8, "--warmup", 2,
                      "--max-corpus-bytes", 20_000, "--eval-batches", 1, out=tmp_path)
    assert summary["backend"] == "triton" and math.isfinite(summary["val"]["nll"])
    for kernel, count in before.items():
        assert tk.launch_count(kernel) > count, kernel
    model, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    assert model.backend == "triton"


def test_bf16_autocast(tmp_path):
    """``--bf16``: products in bfloat16 under torch.autocast, weights and checkpoint in float32."""
    summary = run_cli("--bf16", "--steps", 3, *COMMON, out=tmp_path)
    assert summary["precision"] == "bf16 autocast" and math.isfinite(summary["val"]["nll"])
    model, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_evaluate_restores_training_mode():
    model = TransformerLM(TransformerConfig.from_preset("tiny", backend="torch")).train()
    metrics = evaluate(model, [torch.randint(0, 256, (2, 9))])
    assert model.training and metrics.tokens == 16


def test_resume_keeps_an_explicit_backend_and_device(tmp_path):
    """Chosen on the command line, the backend and device are the run's: a resumed run keeps them (on a GPU
    machine the defaults would switch a CPU/torch run to CUDA/Triton), unless they are given again."""
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"extra": {"args": {"backend": "torch", "device": "cpu", "steps": 4}}}, ckpt)
    args = train.parse_args(["--resume", str(ckpt)])
    assert (args.backend, args.device, args.steps) == ("torch", "cpu", 4)
    args = train.parse_args(["--resume", str(ckpt), "--backend", "triton"])
    assert (args.backend, args.device) == ("triton", "cpu")
