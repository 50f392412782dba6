"""Run-time choice among statically verified launch candidates: the device picks, not a guess.

A launcher with more than one candidate config calls :func:`choose`. The first candidate is the
default: what runs when nothing is timed. On a CUDA device the first call for a key (the op, the
device, the kernel's source, and the problem's bucket: dtype, head_dim, causal kind, sequence
lengths...) times every candidate with ``triton.testing.do_bench`` on the call's own tensors and keeps
the fastest, as ``triton.autotune`` does; the winner's name is kept in memory and in a JSON file per
device and Triton version under ``KERNELS_AUTOTUNE_CACHE`` (default ``~/.cache/transformer-kernels/autotune``),
so the next process does not time again. Beside each winner the file keeps every candidate's median
milliseconds (``"timed: <key>"``), so a run that stops early still leaves its measurements. A candidate that fails to compile or launch on the device is
dropped with one warning (never an error for the user); the default is what remains if all fail. Every
candidate is deterministic (no atomics), so the choice changes speed, never results beyond rounding.

A guard for what no GPU has run yet (TMA, persistent and later candidates are proven only in the
interpreter and the SASS): a launcher that names its ``outputs`` has each candidate's results compared
with the default's on the same call before it is timed; one that disagrees beyond its dtype's rounding
(:data:`AGREE`, relative to the norm, and the same non-finite entries) is dropped with one warning and
recorded in the winners file (``"rejected: <key> <candidate>"``), so a fast wrong kernel is never chosen.

Nothing is timed (the default runs) when ``KERNELS_AUTOTUNE=0``, in Triton's interpreter, on a CPU
tensor, or while a CUDA graph is being captured. A pin (``KERNELS_ATTENTION_CONFIG``) replaces the
candidate list. ``python -m transformer_kernels.static_check`` compiles every candidate for its arch and the
tests run every one through the interpreter (:func:`forced`).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from . import dispatch

_FORCED: contextvars.ContextVar[int | None] = contextvars.ContextVar("kernels_autotune_forced", default=None)
_memory: dict[str, str] = {}
_warned: set[str] = set()


def name(cfg: dict) -> str:
    """A candidate's stable name, e.g. ``"BLOCK_M=128 BLOCK_N=128 TMA=True num_stages=2 num_warps=8"``."""
    return " ".join(f"{k}={v}" for k, v in sorted(cfg.items()))


@contextlib.contextmanager
def forced(index: int):
    """Within the block, :func:`choose` returns candidate ``index`` (the last one where a list is
    shorter) without timing: the tests run each candidate through the interpreter this way, and the
    static check compiles each."""
    token = _FORCED.set(index)
    try:
        yield
    finally:
        _FORCED.reset(token)


def enabled(device: torch.device) -> bool:
    """Whether a call on ``device`` may time its candidates (see the module docstring)."""
    return (device.type == "cuda" and not dispatch.INTERPRETER and os.environ.get("KERNELS_AUTOTUNE", "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


# Largest ||candidate - default|| / ||default|| accepted, by output dtype: a different tile order or
# load path rounds differently, never by more than a few ulps of the stored dtype.
AGREE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def choose(op: str, key: tuple, candidates: list[dict], launch: Callable[[dict], object], device: torch.device,
           kernel=None, outputs: Callable[[], list[torch.Tensor]] | None = None) -> dict:
    """The candidate to run for this call. ``launch(cfg)`` runs the op with config ``cfg`` (it must be
    idempotent: it is called repeatedly while timing); ``key`` is the problem's bucket; ``kernel`` (a
    ``triton.jit`` function) ties a stored winner to the kernel's source; ``outputs()`` returns the
    tensors a launch writes, for the guard (module docstring)."""
    if (index := _FORCED.get()) is not None:
        return candidates[min(index, len(candidates) - 1)]
    if len(candidates) == 1 or not enabled(device):
        return candidates[0]
    names = [name(c) for c in candidates]
    full_key = _full_key(op, key, names, device, kernel)
    winner = _memory.get(full_key) or _disk().get(full_key)
    if winner in names:
        _memory[full_key] = winner
        return candidates[names.index(winner)]
    best, best_ms = None, float("inf")
    reference, timed = None, {}
    for i, cfg in enumerate(candidates):
        try:
            if outputs is not None:
                launch(cfg)
                got = [t.detach().clone() for t in outputs()]
                if reference is None:
                    reference = got if i == 0 else None
                elif (why := _disagrees(got, reference)) is not None:
                    _reject(op, full_key, cfg, device, why)
                    timed[name(cfg)] = "rejected"
                    continue
            ms = _measure(launch, cfg)
        except Exception as exc:  # noqa: BLE001 - any compile or launch failure drops the candidate
            _warn_once(f"{op}: candidate {name(cfg)} failed on {_device_name(device)} and is dropped "
                       f"({type(exc).__name__}: {exc})")
            timed[name(cfg)] = f"failed: {type(exc).__name__}"
            continue
        timed[name(cfg)] = ms
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        return candidates[0]  # the caller's launch of the default raises the real error
    _memory[full_key] = name(best)
    _store(full_key, name(best), timed)
    return best


def _disagrees(got: list[torch.Tensor], reference: list[torch.Tensor]) -> str | None:
    """Why ``got`` is not the default's ``reference`` up to rounding, or None."""
    for i, (a, b) in enumerate(zip(got, reference)):
        finite = torch.isfinite(b)
        if not torch.equal(torch.isfinite(a), finite):
            return f"output {i}: non-finite entries differ from the default's"
        a, b = a[finite].double(), b[finite].double()
        if not b.numel():
            continue
        rel = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        if rel > AGREE.get(reference[i].dtype, 1e-4):
            return f"output {i}: relative difference {rel:.2e} from the default's"
    return None


def _reject(op: str, full_key: str, cfg: dict, device: torch.device, why: str) -> None:
    """Drop a candidate whose results differ from the default's: one warning, and a record beside the winners."""
    _warn_once(f"{op}: candidate {name(cfg)} disagrees with the default on {_device_name(device)} and is "
               f"dropped ({why})")
    _store(f"rejected: {full_key} {name(cfg)}", why)


def _measure(launch: Callable[[dict], object], cfg: dict) -> float:
    """Milliseconds per call of ``launch(cfg)`` on the current CUDA stream (median of do_bench)."""
    import triton.testing

    return triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _full_key(op: str, key: tuple, names: list[str], device: torch.device, kernel) -> str:
    source = getattr(kernel, "cache_key", None) or repr(getattr(kernel, "__name__", kernel))
    digest = hashlib.sha256(repr((source, names)).encode()).hexdigest()[:16]
    return f"{op} {_device_name(device)} {key!r} {digest}"


def cache_path() -> Path:
    """The JSON file of stored winners for this Triton version."""
    import triton

    root = Path(os.environ.get("KERNELS_AUTOTUNE_CACHE", Path.home() / ".cache" / "transformer-kernels" / "autotune"))
    return root / f"winners-triton-{triton.__version__}.json"


_disk_cache: dict[str, str] | None = None


def _disk() -> dict[str, str]:
    global _disk_cache
    if _disk_cache is None:
        _disk_cache = _read(cache_path())
    return _disk_cache


def _read(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(full_key: str, winner: str, timed: dict | None = None) -> None:
    """Merge one winner into the file (another process may have written since: read, update, replace),
    with what each candidate measured (``"timed: <key>"``: milliseconds, or why it was dropped)."""
    path = cache_path()
    with contextlib.suppress(OSError):
        data = _read(path) | {full_key: winner} | ({f"timed: {full_key}": timed} if timed else {})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
        _disk().update(data)
