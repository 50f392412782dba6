"""``python -m transformer.train``: train a Transformer with the paper's recipe on data that needs no download.

The recipe of Vaswani et al. (2017), Sec. 5: Adam (beta1 0.9, beta2 0.98, eps 1e-9) with the warm-up
schedule ``lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)`` (Sec. 5.3), label-smoothed
cross-entropy with eps_ls = 0.1 and dropout as configured (Sec. 5.4).

Data (:mod:`transformer.data`): by default a byte-level language model on the Python standard library's
own source files; ``--files`` trains on your text files instead; ``--model encoder_decoder`` learns a
transduction task (``--task copy|reverse|sort``). It reports loss, perplexity and tokens/s with a
progress bar, and writes into ``--out``: ``checkpoint.pt`` (model, optimizer, schedule, step: resumable
with ``--resume``, loadable with :func:`transformer.checkpoint.load_checkpoint`), ``metrics.json`` and
``loss.png``.

Several GPUs or nodes: launch with ``torchrun``; each process trains a replica under
``torch.nn.parallel.DistributedDataParallel`` (NCCL on CUDA, gloo on CPU) on its own data, and rank 0
writes the files::

    torchrun --nproc_per_node=8 -m transformer.train --preset base --steps 100000

``--fsdp`` shards parameters, gradients and Adam's state with FSDP2 (``fully_shard``) instead of DDP.
``--context-parallel N`` splits each sequence over N ranks (a device mesh ``(dp, cp)`` with ``dp =
world / N``): the N ranks of a ``cp`` group share one batch, each holds a zigzag slice of every sequence,
and attention runs across them (:mod:`transformer_kernels.context_parallel`, ``--cp-strategy ring`` or
``all_to_all``); gradients are averaged over all ranks (DDP or FSDP over the whole mesh), each rank's
loss weighted by its share of the tokens, so the update equals one process training on the dp batches::

    torchrun --nproc_per_node=2 -m transformer.train --context-parallel 2 --seq-len 4096

Randomness: every step reseeds the generators from ``(seed, rank, step)`` (as fairseq does), so a run
resumed from a checkpoint draws the same batches and dropout masks as one that never stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import transformer_kernels as tk

from .checkpoint import load_checkpoint, save_checkpoint
from .config import BYTE_VOCAB_SIZE, PRESETS, TransformerConfig
from .data import TASKS, LMBatcher, load_corpus, task_batch, unigram_entropy
from .model import Transformer, TransformerLM
from .tokenizer import PAD_ID
from .training import (LABEL_SMOOTHING, LossMetrics, SequenceShard, _ignore_index, evaluate, make_optimizer,
                       noam_scheduler, train_step_metrics, unwrap)

MODELS = ("lm", "encoder_decoder")
# Flags that define the run (model, data, schedule): a resumed run takes them from the checkpoint
# unless they are given again on the command line.
# The backend and device too, when they were chosen explicitly: a run that resumes on other kernels or
# another device does not continue bit for bit.
RUN_FLAGS = ("model", "preset", "task", "files", "seq_len", "batch_size", "warmup", "lr_scale", "seed",
             "max_corpus_bytes", "label_smoothing", "dropout", "steps", "bf16", "backend", "device")


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The CLI's parser. With ``suppress_defaults`` it returns only the flags actually given (used to let
    a resumed run keep its saved settings unless they are overridden)."""
    p = argparse.ArgumentParser(
        prog="python -m transformer.train",
        description="Train a Transformer with the recipe of Vaswani et al. (2017), Sec. 5, on byte-level text "
                    "(the Python standard library's source by default) or a transduction task.")
    d = (lambda value: argparse.SUPPRESS) if suppress_defaults else (lambda value: value)  # the default
    p.add_argument("--model", choices=MODELS, default=d("lm"),
                   help="decoder-only language model (default), or the encoder-decoder on a transduction task")
    p.add_argument("--preset", choices=tuple(PRESETS), default=d("tiny"),
                   help="model size (config.py; default tiny); the vocabulary is always the 259 byte ids")
    p.add_argument("--task", choices=("text", *TASKS), default=d(None),
                   help="text for --model lm; copy/reverse/sort for encoder_decoder (default: text / reverse)")
    p.add_argument("--files", nargs="+", default=d(None), metavar="PATH",
                   help="text files or folders to train on instead of the standard library's source")
    p.add_argument("--steps", type=int, default=d(1000),
                   help="total optimizer steps, a resumed run's included (default 1000)")
    p.add_argument("--batch-size", type=int, default=d(32), help="sequences per step per process (default 32)")
    p.add_argument("--seq-len", type=int, default=d(None),
                   help="tokens per window (text; default 128) or longest source string (tasks; default 10)")
    p.add_argument("--warmup", type=int, default=d(None),
                   help="warm-up steps of the schedule (default: the paper's 4000, or steps/10 if fewer)")
    p.add_argument("--lr-scale", type=float, default=d(1.0),
                   help="multiplies the paper's learning rate (default 1.0)")
    p.add_argument("--label-smoothing", type=float, default=d(LABEL_SMOOTHING),
                   help=f"eps_ls of Sec. 5.4 (default {LABEL_SMOOTHING})")
    p.add_argument("--dropout", type=float, default=d(None), help="override the preset's dropout")
    p.add_argument("--bf16", action="store_true", default=d(False),
                   help="mixed precision: torch.autocast to bfloat16 (weights and Adam state stay float32)")
    p.add_argument("--backend", choices=("triton", "torch"), default=d(None),
                   help="kernels or torch.nn.functional (default: triton on CUDA, else torch)")
    p.add_argument("--device", default=d(None), help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--out", default=d(None), help="output folder (default: runs/<timestamp>, or the "
                                                  "folder of --resume)")
    p.add_argument("--resume", default=d(None), metavar="CKPT",
                   help="continue from this checkpoint.pt: same model, data settings, schedule position and "
                        "random draws; flags given again override the saved ones (e.g. a larger --steps)")
    p.add_argument("--seed", type=int, default=d(0), help="weights, batches, dropout (default 0)")
    p.add_argument("--max-corpus-bytes", type=int, default=d(None),
                   help="read at most this many bytes of text (default: all)")
    p.add_argument("--eval-every", type=int, default=d(200), help="steps between validation runs (default 200)")
    p.add_argument("--eval-batches", type=int, default=d(10), help="batches per validation run (default 10)")
    p.add_argument("--save-every", type=int, default=d(500),
                   help="steps between checkpoints (default 500; always at the end)")
    p.add_argument("--no-progress", action="store_true", default=d(False), help="no progress bar")
    p.add_argument("--context-parallel", type=int, default=d(1), metavar="N",
                   help="split each sequence over N ranks (language model; --seq-len divisible by 2N; default 1)")
    p.add_argument("--cp-strategy", choices=("ring", "all_to_all"), default=d("ring"),
                   help="context-parallel attention: K/V around a ring, or Ulysses all-to-all (default ring)")
    p.add_argument("--fsdp", action="store_true", default=d(False),
                   help="FSDP2 (fully_shard) instead of DistributedDataParallel under torchrun")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse ``argv``; with ``--resume``, the run's settings (:data:`RUN_FLAGS`) not given again come from
    the checkpoint. Fills in the derived defaults (task, warmup, out) and checks combinations."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        given = vars(build_parser(suppress_defaults=True).parse_args(argv))
        saved = torch.load(args.resume, map_location="cpu", weights_only=True).get("extra", {}).get("args", {})
        for name in RUN_FLAGS:
            if name not in given and name in saved:
                setattr(args, name, saved[name])
        if args.out is None:
            args.out = str(Path(args.resume).parent)
    if args.task is None:
        args.task = "text" if args.model == "lm" else "reverse"
    if (args.model == "lm") != (args.task == "text"):
        parser.error(f"--model {args.model} cannot learn --task {args.task}: the language model learns text, "
                     f"the encoder-decoder one of {TASKS}")
    if args.seq_len is None:
        args.seq_len = 128 if args.task == "text" else 10
    if args.warmup is None:
        args.warmup = max(1, min(4000, args.steps // 10))
    for name in ("steps", "batch_size", "seq_len", "warmup", "eval_every", "eval_batches", "save_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.label_smoothing < 1.0 or not args.lr_scale > 0.0:
        parser.error("--label-smoothing must be in [0, 1) and --lr-scale > 0")
    if args.context_parallel < 1:
        parser.error("--context-parallel must be >= 1")
    if args.context_parallel > 1:
        if args.model != "lm":
            parser.error("--context-parallel splits a language model's sequences; the encoder-decoder's "
                         "padded task strings are not supported")
        if args.seq_len % (2 * args.context_parallel):
            parser.error(f"--seq-len {args.seq_len} must divide into 2 x --context-parallel = "
                         f"{2 * args.context_parallel} chunks (zigzag layout)")
    return args


# ---------------------------------------------------------------------------------------------------
# Processes and devices
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    """Where this process runs: ``rank`` of ``world_size`` processes, on ``device``; with context
    parallelism, the ``(dp, cp)`` device ``mesh``: ``dp_rank`` picks the data, ``cp_size`` ranks share it."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object = None
    dp_rank: int = 0
    cp_size: int = 1
    flat_mesh: object = None  # every rank, 1-D: FSDP2 shards over it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None, context_parallel: int = 1) -> Dist:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on CUDA, gloo on
    CPU, one GPU per process (``LOCAL_RANK``), and a ``(dp, cp)`` device mesh. Otherwise a single process
    on ``device`` (default: CUDA if available). Raises ValueError when ``context_parallel`` does not
    divide the world size."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % context_parallel:
        raise ValueError(f"--context-parallel {context_parallel} does not divide the {world_size} processes")
    if world_size <= 1:
        return Dist(device=torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    from torch.distributed.device_mesh import init_device_mesh

    kind = torch.device(device).type
    mesh = init_device_mesh(kind, (world_size // context_parallel, context_parallel), mesh_dim_names=("dp", "cp"))
    flat = init_device_mesh(kind, (world_size,), mesh_dim_names=("dp_cp",))
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(device), mesh,
                mesh.get_local_rank("dp"), context_parallel, flat)


def all_reduce_metrics(metrics: LossMetrics, d: Dist) -> LossMetrics:
    """Sum ``metrics`` over all processes (a no-op for one)."""
    if not d.enabled:
        return metrics
    t = metrics.as_tensor(d.device)
    dist.all_reduce(t)
    return LossMetrics.from_tensor(t)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the random draws (batch, dropout) of optimizer step ``step`` on process ``rank``."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) & 0x7FFF_FFFF_FFFF_FFFF


def param_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal across processes iff the replicas are bit-identical
    (sharded parameters are gathered first: a collective then)."""
    h = hashlib.sha256()
    for name, p in unwrap(model).named_parameters():
        p = p.detach()
        if hasattr(p, "full_tensor"):  # a DTensor (FSDP2)
            p = p.full_tensor()
        h.update(name.encode())
        h.update(p.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def expand_files(paths) -> list[Path]:
    """Files as given, folders as every file under them (sorted, hidden ones skipped)."""
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            out.extend(sorted(f for f in path.rglob("*") if f.is_file()
                              and not any(part.startswith(".") for part in f.relative_to(path).parts)))
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"--files: no such file or folder: {path}")
    return out


class TextData:
    """Random windows of the corpus for the language model; validation on fixed windows of the held-out
    tail; the unigram entropy of that tail as the baseline."""

    def __init__(self, args, d: Dist):
        files = expand_files(args.files) if args.files else None
        self.corpus = load_corpus(files, max_bytes=args.max_corpus_bytes)
        self.train = LMBatcher(self.corpus.train, args.batch_size, args.seq_len, device=d.device)
        self.val = LMBatcher(self.corpus.val, args.batch_size, min(args.seq_len, self.corpus.val.numel() - 2),
                             device=d.device)
        self.val_batches = self.val.fixed_batches(args.eval_batches, seed=10_000 + d.dp_rank)
        self.baseline = unigram_entropy(self.corpus.val)
        self.description = self.corpus.describe()

    def batch(self, generator: torch.Generator):
        return self.train.batch(generator)


class TaskData:
    """Fresh random strings of a transduction task every step; validation on a fixed set."""

    def __init__(self, args, d: Dist):
        self.task, self.batch_size, self.max_len, self.device = args.task, args.batch_size, args.seq_len, d.device
        generator = torch.Generator().manual_seed(10_000 + d.dp_rank)
        self.val_batches = [self.batch(generator) for _ in range(args.eval_batches)]
        self.baseline = None
        self.description = f"task {args.task}: strings of 1..{args.seq_len} lowercase letters"

    def batch(self, generator: torch.Generator):
        return task_batch(self.task, self.batch_size, self.max_len, generator=generator, device=self.device)


# ---------------------------------------------------------------------------------------------------
# Model, optimizer, schedule
# ---------------------------------------------------------------------------------------------------
def build_config(args, backend: str) -> TransformerConfig:
    """The preset at byte level (vocabulary 259), long enough for ``--seq-len``; PAD masked for tasks."""
    preset = PRESETS[args.preset]
    overrides = dict(vocab_size=BYTE_VOCAB_SIZE, backend=backend,
                     max_len=max(preset.get("max_len", 1024), args.seq_len + 2))
    if args.model == "encoder_decoder":
        overrides["pad_id"] = PAD_ID
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    return TransformerConfig.from_preset(args.preset, **overrides)


def build_training(args, d: Dist, backend: str):
    """Model (fresh, or from ``--resume``), Adam and the warm-up schedule on ``d.device``. Returns
    ``(model, optimizer, scheduler, step, history)``, ``model`` wrapped in DDP (or sharded by FSDP2 with
    ``--fsdp``) when distributed, its attention context parallel over the mesh's ``cp`` dim with
    ``--context-parallel``."""
    from .parallel import apply_fsdp, enable_context_parallel

    checkpoint = None
    if args.resume:
        model, checkpoint = load_checkpoint(args.resume, backend=backend)
    else:
        torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        config = build_config(args, backend)
        model = (TransformerLM if args.model == "lm" else Transformer)(config)
    model.to(d.device)
    if d.cp_size > 1:
        enable_context_parallel(model, (d.mesh, "cp"), strategy=args.cp_strategy)
    if d.enabled and args.fsdp:  # over every rank: gradients averaged over dp x cp, as DDP's
        apply_fsdp(model, d.flat_mesh)
    optimizer = make_optimizer(model.parameters())
    scheduler = noam_scheduler(optimizer, model.config.d_model, args.warmup, args.lr_scale)
    step, history = 0, {"train": [], "eval": []}
    if checkpoint is not None and d.enabled and args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    elif checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
        step, history = checkpoint["step"], checkpoint["extra"].get("history", history)
    if d.enabled and not args.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return model, optimizer, scheduler, step, history


# ---------------------------------------------------------------------------------------------------
# Reports: metrics.json, loss.png, summary
# ---------------------------------------------------------------------------------------------------
def metrics_record(metrics: LossMetrics, step: int, **more) -> dict:
    return {"step": step, "loss": metrics.loss, "nll": metrics.nll, "perplexity": metrics.perplexity,
            "accuracy": metrics.accuracy, "tokens": metrics.tokens, **more}


def plot_losses(metrics: dict, path: Path) -> Path:
    """Training loss (label-smoothed objective and plain NLL, smoothed over 1% of the run), validation NLL,
    the unigram baseline, and the learning rate, as a PNG (matplotlib's Agg canvas: no display needed)."""
    from matplotlib.figure import Figure

    train, evals = metrics["train"], metrics["eval"]
    fig = Figure(figsize=(8, 6), tight_layout=True)
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    steps = [r["step"] for r in train]
    window = max(1, len(train) // 100)
    for key, label in (("loss", "train loss (label-smoothed)"), ("nll", "train NLL")):
        values = torch.tensor([r[key] for r in train], dtype=torch.float64)
        smooth = torch.nn.functional.avg_pool1d(values[None, None], window, 1).flatten().tolist() if values.numel() \
            else []
        ax.plot(steps[window - 1:], smooth, label=label, lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["nll"] for r in evals], "o-", label="validation NLL", ms=3)
    if metrics.get("unigram_entropy") is not None:
        ax.axhline(metrics["unigram_entropy"], ls="--", c="gray", label="unigram baseline (val entropy)")
    ax.set_ylabel("nats / token")
    ax.set_title(metrics.get("title", "training"))
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in train], c="tab:red", lw=1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def write_reports(out: Path, metrics: dict) -> None:
    """``metrics.json`` and ``loss.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, out / "metrics.json")
    plot_losses(metrics, out / "loss.png")


def summary_lines(summary: dict) -> list[str]:
    """The closing report, one fact a line."""
    lines = [f"trained {summary['model']} ({summary['preset']}, {summary['parameters'] / 1e6:.2f}M parameters, "
             f"backend {summary['backend']}, {summary['precision']}, {summary['world_size']} process(es)) "
             f"on {summary['data']}",
             f"steps {summary['step']}: {summary['tokens_per_s']:,.0f} tokens/s"]
    train = summary.get("train")
    if train:
        lines.append(f"train: loss {train['loss']:.3f} (label-smoothed), NLL {train['nll']:.3f} nats/token, "
                     f"perplexity {train['perplexity']:.2f}")
    val = summary.get("val")
    if val:
        lines.append(f"val:   NLL {val['nll']:.3f} nats/token ({val['nll'] / math.log(2):.3f} bits), "
                     f"perplexity {val['perplexity']:.2f}, token accuracy {val['accuracy']:.3f}")
    if summary.get("unigram_entropy") is not None:
        h = summary["unigram_entropy"]
        lines.append(f"unigram baseline (val byte entropy): {h:.3f} nats/token ({h / math.log(2):.3f} bits), "
                     f"perplexity {math.exp(h):.2f}")
    lines.append(f"wrote {summary['out']}/checkpoint.pt, metrics.json, loss.png")
    return lines


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------
def default_out() -> str:
    return str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))


def train(args: argparse.Namespace) -> dict:
    """Run the training that ``args`` (from :func:`parse_args`) describe; returns the summary dict
    (also stored under ``"summary"`` in metrics.json). Only rank 0 writes files and prints."""
    d = setup_distributed(args.device, args.context_parallel)
    try:
        summary = _train(args, d)
        if d.enabled:  # no rank tears gloo down while another still talks to it (a CI run aborted so)
            dist.barrier()
        return summary
    finally:
        if d.enabled:
            dist.destroy_process_group()


def _train(args, d: Dist) -> dict:
    backend = args.backend or ("triton" if d.device.type == "cuda" else "torch")
    out = Path(args.out or _broadcast(default_out(), d))
    data = TextData(args, d) if args.task == "text" else TaskData(args, d)
    model, optimizer, scheduler, step, history = build_training(args, d, backend)
    if d.cp_size > 1:  # validation on this rank's slices too
        data.val_batches = [_shard_lm_batch(unwrap(model), b) for b in data.val_batches]
    run = Run(args, d, out, backend, data, model, optimizer, scheduler, history)
    run.log(f"{args.model} {args.preset}: {run.num_parameters:,} parameters, backend {backend}, "
            f"{d.world_size} x {d.device}" + (f" (dp {d.world_size // d.cp_size} x cp {d.cp_size}, "
                                              f"{args.cp_strategy})" if d.cp_size > 1 else "")
            + (", FSDP2" if d.enabled and args.fsdp else "") + f"; data {data.description}; out {out}"
            + (f"; resumed at step {step}" if step else ""))
    if backend == "triton" and d.device.type == "cpu" and not tk.dispatch.INTERPRETER:
        run.log("note: on a CPU without TRITON_INTERPRET=1 the kernels run their PyTorch fallback (see README)")
    bar = _progress(args, d, step)
    while step < args.steps:
        step += 1
        m, lr, tokens_per_s = run.train_one(step)
        bar.update(1)
        bar.set_postfix(loss=f"{m.loss:.3f}", ppl=f"{m.perplexity:.2f}", lr=f"{lr:.2e}",
                        tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        if step % args.eval_every == 0 or step == args.steps:
            (bar.write if d.is_main else run.log)(run.validate(step))
        if step % args.save_every == 0 and step < args.steps:
            run.save(step)
    bar.close()
    return run.finish(step)


class Run:
    """The state of one training run and what it does at each step: train, validate, save, finish."""

    def __init__(self, args, d: Dist, out: Path, backend: str, data, model, optimizer, scheduler, history: dict):
        self.args, self.d, self.out, self.backend, self.data = args, d, out, backend, data
        self.model, self.inner, self.optimizer, self.scheduler = model, unwrap(model), optimizer, scheduler
        self.num_parameters = sum(p.numel() for p in self.inner.parameters())
        self.generator = torch.Generator()
        self.autocast_dtype = torch.bfloat16 if args.bf16 else None
        self.metrics = {"args": _jsonable(vars(args)), "config": dataclasses.asdict(self.inner.config),
                        "world_size": d.world_size, "unigram_entropy": data.baseline,
                        "title": f"{args.model} {args.preset} on {data.description}", **history}

    def log(self, line: str) -> None:
        if self.d.is_main:
            print(line, flush=True)

    def train_one(self, step: int) -> tuple[LossMetrics, float, float]:
        """Optimizer step ``step`` on a batch drawn from seed ``(seed, rank, step)``; records it. Returns the
        metrics summed over processes, the learning rate used and tokens/s over the last 20 steps."""
        seed = step_seed(self.args.seed, self.d.dp_rank if self.d.cp_size > 1 else self.d.rank, step)
        self.generator.manual_seed(seed)
        torch.manual_seed(seed)  # dropout
        start = time.perf_counter()
        batch = self.data.batch(self.generator)
        scale = 1.0
        if self.d.cp_size > 1:
            batch = _shard_lm_batch(self.inner, batch)
            scale = _context_parallel_loss_scale(batch, self.inner, self.d)
        lr = self.optimizer.param_groups[0]["lr"]
        local = train_step_metrics(self.model, batch, self.optimizer, self.args.label_smoothing,
                                   scheduler=self.scheduler, autocast_dtype=self.autocast_dtype, loss_scale=scale)
        m = all_reduce_metrics(local, self.d)
        seconds = time.perf_counter() - start
        train = self.metrics["train"]
        train.append(metrics_record(m, step, lr=lr, seconds=seconds, tokens_per_s=m.tokens / seconds,
                                    local_loss=local.loss))
        recent = train[-20:]
        return m, lr, sum(r["tokens"] for r in recent) / sum(r["seconds"] for r in recent)

    def validate(self, step: int) -> str:
        """Plain cross-entropy, perplexity and accuracy on the validation batches (all processes); recorded."""
        v = all_reduce_metrics(evaluate(self.inner, self.data.val_batches, autocast_dtype=self.autocast_dtype), self.d)
        if self.d.enabled and self.args.fsdp:
            from .parallel import reshard

            reshard(self.inner)
        self.metrics["eval"].append(metrics_record(v, step))
        baseline = self.data.baseline
        return (f"step {step}: val NLL {v.nll:.3f}, perplexity {v.perplexity:.2f}, accuracy {v.accuracy:.3f}"
                + (f" (unigram baseline {baseline:.3f})" if baseline is not None else ""))

    def save(self, step: int) -> None:
        """checkpoint.pt (with the run's settings and history, for --resume), metrics.json, loss.png: rank 0."""
        self.metrics["summary"] = summarize(self, step)
        states = {}
        if self.d.enabled and self.args.fsdp:  # gather the shards (a collective), rank 0 writes them
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            states = dict(zip(("model_state", "optimizer_state"), get_state_dict(
                self.inner, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))))
        if self.d.is_main:
            history = {"train": self.metrics["train"], "eval": self.metrics["eval"]}
            save_checkpoint(self.out / "checkpoint.pt", self.inner, step=step, optimizer=self.optimizer,
                            scheduler=self.scheduler, extra={"args": _jsonable(vars(self.args)), "history": history},
                            **states)
            write_reports(self.out, self.metrics)

    def finish(self, step: int) -> dict:
        """Validate (unless just done), check the replicas, save, print the summary; returns it."""
        if not self.metrics["eval"] or self.metrics["eval"][-1]["step"] != step:  # e.g. resumed at the end
            self.log(self.validate(step))
        self.metrics["distributed"] = check_replicas(self.model, self.d, self.metrics)
        self.save(step)
        for line in summary_lines(self.metrics["summary"]):
            self.log(line)
        return self.metrics["summary"]


def summarize(run: Run, step: int) -> dict:
    """Final numbers: last-10-step train metrics, last validation, tokens/s over the run (first step,
    which compiles kernels, left out when there are others)."""
    args, metrics = run.args, run.metrics
    train = metrics["train"]
    timed = train[1:] if len(train) > 1 else train
    tokens_per_s = sum(r["tokens"] for r in timed) / max(sum(r["seconds"] for r in timed), 1e-9)
    recent = train[-10:]
    nll = sum(r["nll"] for r in recent) / len(recent) if recent else None
    return {
        "model": args.model, "preset": args.preset, "backend": run.backend, "world_size": run.d.world_size,
        "context_parallel": run.d.cp_size, "data_parallel": "fsdp" if run.d.enabled and args.fsdp else "ddp",
        "precision": "bf16 autocast" if args.bf16 else "fp32",
        "parameters": run.num_parameters, "data": run.data.description, "step": step, "tokens_per_s": tokens_per_s,
        "train": {"loss": sum(r["loss"] for r in recent) / len(recent), "nll": nll, "perplexity": math.exp(nll)}
        if recent else None,
        "val": metrics["eval"][-1] if metrics["eval"] else None,
        "unigram_entropy": run.data.baseline, "out": str(run.out),
    }


def check_replicas(model, d: Dist, metrics: dict) -> dict:
    """Under DDP: every rank's parameter digest (all equal iff the replicas stayed bit-identical) and
    every rank's own loss at the last step (different, since each rank draws its own data)."""
    digest, last = param_digest(model), metrics["train"][-1]["local_loss"] if metrics["train"] else None
    gathered = [(digest, last)]
    if d.enabled:
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, (digest, last))
    digests = [g[0] for g in gathered]
    return {"world_size": d.world_size, "param_digests": digests, "replicas_identical": len(set(digests)) == 1,
            "last_step_rank_losses": [g[1] for g in gathered]}


def _shard_lm_batch(model, tokens: torch.Tensor) -> SequenceShard:
    """A ``(batch, seqlen + 1)`` token batch as this rank's slices of inputs and labels."""
    inputs, labels = model.context_parallel.shard([tokens[:, :-1], tokens[:, 1:]])
    return SequenceShard(inputs, labels)


def _context_parallel_loss_scale(batch: SequenceShard, model, d: Dist) -> float:
    """cp x (this rank's scored tokens) / (the replica's): the gradient average over dp x cp ranks then
    equals the dp average of each replica's mean-loss gradient."""
    ignore = _ignore_index(model, None)
    counts = torch.tensor([(batch.labels != ignore).sum().item()], dtype=torch.float64, device=d.device)
    local = counts.item()
    dist.all_reduce(counts, group=d.mesh.get_group("cp"))
    return d.cp_size * local / max(counts.item(), 1.0)


def _broadcast(value, d: Dist):
    if not d.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _progress(args, d: Dist, step: int):
    from tqdm.auto import tqdm

    return tqdm(total=args.steps, initial=step, disable=args.no_progress or not d.is_main, unit="step",
                dynamic_ncols=True, file=sys.stderr)


def _jsonable(values: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}


def main(argv=None) -> dict:
    """Entry point of ``python -m transformer.train``; returns the summary (see :func:`train`)."""
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
