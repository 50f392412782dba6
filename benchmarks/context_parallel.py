"""Attention past one device: what context parallelism costs each rank, by world size and sequence length
(a section of the ``attention`` suite, :mod:`benchmarks.attention_cost`).

Measured on any machine, in spawned gloo groups of 2, 3 and 4 processes on CPU tensors (the Triton
kernels through Triton's interpreter; what is counted does not depend on the device):

* the bytes each rank sends in one causal attention call, forward and backward, counted at the calls
  themselves (``torch.distributed.batch_isend_irecv`` and ``all_to_all_single`` are wrapped for the
  call), next to :func:`transformer_kernels.context_parallel.communication_volume`'s formula;
* the memory one call allocates per rank beyond its inputs, forward and forward + backward, tracked
  by torch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``, a private torch module: used
  when importable, else the figures read "not counted"), at two local lengths, as bytes per local
  token. Every buffer of the kernels and the exchanges grows linearly with the local length (no
  seqlen x seqlen tensor exists), which the two lengths check.

Projected from those (no timing): per-rank FLOPs (causal work is equal across ranks under the zigzag
layout), bytes sent, per-rank peak at long sequences, and the longest sequence that fits a device's
memory, for one device and each world size and strategy, two ways: one attention call alone (inputs q,
k, v, dO plus the call's peak), and the attention share of a ``layers``-layer model (each layer's saved
q, k, v and output, plus one call's peak: the transient workspace is not multiplied by the layers). One device's figure comes from ``transformer_kernels.flash_attn_func`` measured the same way.

Timed on GPUs (``benchmarks/gpu_session.sh`` runs it when more than one GPU is present)::

    torchrun --nproc_per_node=N -m benchmarks.context_parallel --time --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Config:
    worlds: tuple[int, ...] = (2, 3, 4)
    strategies: tuple[str, ...] = ("ring", "all_to_all")
    layout: str = "zigzag"
    heads: int = 32
    heads_k: int = 32
    head_dim: int = 128
    element_bytes: int = 2  # measured in float16 (the interpreter's bf16 dots are wrong); bf16 is the same size
    lengths: tuple[int, ...] = (24, 48)  # local tokens per rank, measured
    project_seqlens: tuple[int, ...] = tuple(2**k for k in range(14, 21))
    project_worlds: tuple[int, ...] = (1, 2, 4, 8)
    memory_gib: tuple[float, ...] = (80.0, 141.0)  # H100 80GB, H200 141GB (HBM as sold, in GiB here)
    volume_case: tuple[int, int, int, int] = (131072, 32, 128, 8)  # seqlen, heads, head_dim, world
    layers: int = 32  # the model view: this many layers' saved q, k, v, out plus one call's peak

    @classmethod
    def from_dict(cls, fields: dict) -> "Config":
        """The config a spawned process gets as ``asdict(cfg)`` (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    @classmethod
    def quick(cls) -> "Config":
        return cls(worlds=(2,), heads=8, heads_k=8, head_dim=64, lengths=(8, 16))


# --------------------------------------------------------------------------------------------------
# Counting inside a rank
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def count_sends():
    """Bytes this rank sends through ``batch_isend_irecv`` (its isends) and ``all_to_all_single`` (all
    but its own part) while the block runs: ``{"bytes": int}``."""
    counted = {"bytes": 0}
    p2p, a2a = dist.batch_isend_irecv, dist.all_to_all_single

    def batch_isend_irecv(ops):
        counted["bytes"] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return p2p(ops)

    def all_to_all_single(output, input, *args, group=None, **kwargs):
        world = dist.get_world_size(group)
        counted["bytes"] += input.numel() * input.element_size() * (world - 1) // world
        return a2a(output, input, *args, group=group, **kwargs)

    dist.batch_isend_irecv, dist.all_to_all_single = batch_isend_irecv, all_to_all_single
    try:
        yield counted
    finally:
        dist.batch_isend_irecv, dist.all_to_all_single = p2p, a2a


def _tracker():
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # the private module moved or is gone: memory is then not counted
        return None
    return MemTracker()


def _peak(tracker) -> int | None:
    if tracker is None:
        return None
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def _inputs(cfg: Config, local: int):
    torch.manual_seed(0)
    shape_q, shape_k = (1, local, cfg.heads, cfg.head_dim), (1, local, cfg.heads_k, cfg.head_dim)
    q, k, v = (torch.randn(s, dtype=torch.float16, requires_grad=True) for s in (shape_q, shape_k, shape_k))
    return q, k, v, torch.randn(shape_q, dtype=torch.float16)


def _measure_call(fn, q, k, v, dout) -> dict:
    tracker = _tracker()
    with count_sends() as sent, (tracker or contextlib.nullcontext()):
        out = fn(q, k, v)
        fwd_bytes, fwd_peak = sent["bytes"], _peak(tracker)
        out.backward(dout)
    return dict(sent_forward=fwd_bytes, sent_backward=sent["bytes"] - fwd_bytes, peak_forward=fwd_peak,
                peak_forward_backward=_peak(tracker))


def _rank_main(rank: int, world: int, port: int, cfg_dict: dict, out_file: str) -> None:
    cfg = Config.from_dict(cfg_dict)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from transformer_kernels import context_parallel as cp

        rows = []
        for strategy in _runnable(cfg, world):
            for local in cfg.lengths:
                q, k, v, dout = _inputs(cfg, local)
                row = _measure_call(lambda a, b, c: cp.attn_func(a, b, c, causal=True, strategy=strategy,
                                                                 layout=cfg.layout), q, k, v, dout)
                rows.append(dict(world=world, strategy=strategy, local_tokens=local, rank=rank, **row))
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            Path(out_file).write_text(json.dumps([r for part in gathered for r in part]))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # No interpreter teardown: gloo's threads have aborted a finished process there on busy cores.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _runnable(cfg: Config, world: int) -> list[str]:
    """The strategies that run at this world size: all-to-all needs the heads to divide by it."""
    a2a_ok = cfg.heads % world == 0 and (cfg.heads_k % world == 0 or world % cfg.heads_k == 0)
    return [s for s in cfg.strategies if s != "all_to_all" or a2a_ok]


def _one_device_main(cfg_dict: dict, out_file: str) -> None:
    cfg = Config.from_dict(cfg_dict)
    import transformer_kernels as tk

    rows = []
    for local in cfg.lengths:
        q, k, v, dout = _inputs(cfg, local)
        rows.append(dict(world=1, strategy="one device", local_tokens=local, rank=0,
                         **_measure_call(lambda a, b, c: tk.flash_attn_func(a, b, c, causal=True), q, k, v, dout)))
    Path(out_file).write_text(json.dumps(rows))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _interpreted_children():
    """Spawned children run the Triton kernels through the interpreter on CPU tensors (they import triton
    afresh and read the variable then); this process's setting is restored after."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def measure(cfg: Config, work_dir: Path) -> list[dict]:
    """Rows of counted bytes and tracked peaks, one per (world, strategy, local length, rank), plus one
    device's (world 1)."""
    import torch.multiprocessing as mp

    work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    ctx = mp.get_context("spawn")
    with _interpreted_children():
        path = work_dir / "cp-one-device.json"
        p = ctx.Process(target=_one_device_main, args=(asdict(cfg), str(path)))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"context-parallel measurement: the one-device process exited with {p.exitcode}")
        rows += json.loads(path.read_text())
        for world in cfg.worlds:
            path = work_dir / f"cp-world{world}.json"
            mp.spawn(_rank_main, args=(world, _free_port(), asdict(cfg), str(path)), nprocs=world, join=True)
            rows += json.loads(path.read_text())
    return rows


# --------------------------------------------------------------------------------------------------
# What the measurements say at long sequences
# --------------------------------------------------------------------------------------------------
def _per_token(rows: list[dict], world: int, strategy: str, key: str) -> dict | None:
    """The largest rank's ``key`` per local token at each measured length, and whether it is linear."""
    pts = {}
    for r in rows:
        if r["world"] == world and r["strategy"] == strategy and r.get(key) is not None:
            pts[r["local_tokens"]] = max(pts.get(r["local_tokens"], 0), r[key])
    if len(pts) < 2:
        return None
    (l1, y1), (l2, y2) = sorted(pts.items())[:2]
    slope, intercept = (y2 - y1) / (l2 - l1), (y1 * l2 - y2 * l1) / (l2 - l1)
    return dict(bytes_per_token=slope, intercept_bytes=intercept, lengths=[l1, l2], values=[y1, y2])


def project(cfg: Config, rows: list[dict]) -> dict:
    from transformer_kernels.context_parallel import communication_volume

    from .attention_cost import attention_flops

    e = cfg.element_bytes
    input_bytes_per_token = (2 * cfg.heads + 2 * cfg.heads_k) * cfg.head_dim * e  # q, dO, k, v
    saved_bytes_per_token = (2 * cfg.heads + 2 * cfg.heads_k) * cfg.head_dim * e  # q, k, v, out per layer
    per_token = {}
    for world in (1, *cfg.worlds):
        for strategy in (("one device",) if world == 1 else cfg.strategies):
            fit = _per_token(rows, world, strategy, "peak_forward_backward")
            if fit is not None:
                per_token[(world, strategy)] = fit
    checks = []
    for r in rows:
        if r["world"] > 1 and r["rank"] == 0:
            f = communication_volume(r["strategy"], batch=1, seqlen=r["local_tokens"] * r["world"],
                                     num_heads=cfg.heads, num_heads_k=cfg.heads_k, head_dim=cfg.head_dim,
                                     world=r["world"], element_bytes=e)
            checks.append(dict(world=r["world"], strategy=r["strategy"], local_tokens=r["local_tokens"],
                               counted_forward=r["sent_forward"], formula_forward=f["forward_bytes"],
                               counted_backward=r["sent_backward"], formula_backward=f["backward_bytes"]))
    def fit_for(world: int, strategy: str):
        """The measured bytes per token of this world size, or the largest measured one's."""
        measured_world = world if (world, strategy) in per_token else max(
            (w for (w, s) in per_token if s == strategy), default=None)
        return measured_world, per_token.get((measured_world, strategy))

    projected = []
    for world in cfg.project_worlds:
        for strategy in (("one device",) if world == 1 else cfg.strategies):
            measured_world, fit = fit_for(world, strategy)
            for seqlen in cfg.project_seqlens:
                local = seqlen // world
                row = dict(world=world, strategy=strategy, seqlen=seqlen,
                           flops_per_rank=3.5 * attention_flops(1, cfg.heads, seqlen, cfg.head_dim, True) / world)
                if world > 1:
                    vol = communication_volume(strategy, batch=1, seqlen=seqlen, num_heads=cfg.heads,
                                               num_heads_k=cfg.heads_k, head_dim=cfg.head_dim, world=world,
                                               element_bytes=e)
                    row.update(bytes_sent_forward=vol["forward_bytes"], bytes_sent_backward=vol["backward_bytes"])
                if fit is not None:
                    peak = fit["intercept_bytes"] + fit["bytes_per_token"] * local
                    row.update(peak_bytes_per_rank=peak, memory_per_rank=peak + input_bytes_per_token * local,
                               memory_from_world=measured_world)
                projected.append(row)
    fits = []
    for world in cfg.project_worlds:
        for strategy in (("one device",) if world == 1 else cfg.strategies):
            measured_world, fit = fit_for(world, strategy)
            if fit is None:
                continue
            per_local = fit["bytes_per_token"] + input_bytes_per_token
            # A model of cfg.layers layers keeps each layer's q, k, v and out (what both one device and
            # the ring save for the backward) while one call's transient peak comes and goes.
            per_local_model = cfg.layers * saved_bytes_per_token + fit["bytes_per_token"] + input_bytes_per_token
            for gib in cfg.memory_gib:
                budget = gib * 2**30 - fit["intercept_bytes"]
                fits.append(dict(world=world, strategy=strategy, memory_gib=gib, memory_from_world=measured_world,
                                 max_seqlen=int(budget / per_local) * world, bytes_per_local_token=per_local,
                                 max_seqlen_model=int(budget / per_local_model) * world,
                                 bytes_per_local_token_model=per_local_model))
    seqlen, heads, head_dim, world = cfg.volume_case
    volume = {s: communication_volume(s, batch=1, seqlen=seqlen, num_heads=heads, head_dim=head_dim, world=world,
                                      element_bytes=2) for s in cfg.strategies}
    return dict(per_token={f"{w}|{s}": v for (w, s), v in per_token.items()}, send_checks=checks,
                projected=projected, longest_fitting=fits, volume_case=volume,
                input_bytes_per_token=input_bytes_per_token)


def run(cfg: Config, work_dir: Path) -> dict:
    rows = measure(cfg, work_dir)
    return dict(config=asdict(cfg), measured=rows, **project(cfg, rows))


# --------------------------------------------------------------------------------------------------
# Timing on GPUs, under torchrun
# --------------------------------------------------------------------------------------------------
def time_on_gpus(out: Path, seqlens=(16384, 32768, 65536, 131072), heads=32, head_dim=128) -> dict | None:
    """Each strategy's causal forward and forward+backward time and per-rank peak memory (CUDA's
    allocator) on this torchrun's GPUs, bfloat16; rank 0 writes ``context_parallel_timed.json``."""
    from triton.testing import do_bench

    from transformer_kernels import context_parallel as cp

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    rows = []
    for seqlen in seqlens:
        for strategy in ("ring", "all_to_all"):
            local = seqlen // world
            try:
                q, k, v = (torch.randn(1, local, heads, head_dim, device="cuda", dtype=torch.bfloat16,
                                       requires_grad=True) for _ in range(3))
                dout = torch.randn_like(q)
                fwd = lambda: cp.attn_func(q, k, v, causal=True, strategy=strategy)  # noqa: E731
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fwd().backward(dout)
                peak = torch.cuda.max_memory_allocated() - base
                t_fwd = do_bench(fwd, return_mode="median")
                t_all = do_bench(lambda: fwd().backward(dout), return_mode="median")
                status = "measured"
            except torch.OutOfMemoryError:
                t_fwd = t_all = peak = None
                status = "out of memory"
            times = [None] * world
            dist.all_gather_object(times, (t_fwd, t_all, peak))
            rows.append(dict(seqlen=seqlen, strategy=strategy, world=world, status=status,
                             forward_ms_per_rank=[t[0] for t in times], forward_backward_ms_per_rank=[t[1] for t in times],
                             peak_bytes_per_rank=[t[2] for t in times]))
            torch.cuda.empty_cache()
    result = dict(suite="context_parallel_timed", world=world, device=torch.cuda.get_device_name(), rows=rows,
                  torch=torch.__version__)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "context_parallel_timed.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.context_parallel",
                                     description="context-parallel attention: counted bytes and memory "
                                                 "(default), or --time on this torchrun's GPUs")
    parser.add_argument("--time", action="store_true", help="time ring and all-to-all on GPUs (under torchrun)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench-out") / "context_parallel")
    args = parser.parse_args(argv)
    if args.time:
        time_on_gpus(args.out)
        return 0
    result = run(Config.quick() if args.quick else Config(), args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "context_parallel.json").write_text(json.dumps(result, indent=1))
    print(args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
