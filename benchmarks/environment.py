"""Provenance of a run: machine, versions, git commit, date (DESIGN.md, "Benchmarks")."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str]) -> str | None:
    """stdout of a read-only command, or None if it is missing or fails."""
    try:
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # git status must not rewrite the index
        done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=20, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_info() -> dict:
    """Commit of the checkout and whether tracked files differ from it (None outside a git checkout)."""
    commit = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"]) if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_info() -> dict | None:
    """GPU name, capability, CUDA runtime and driver versions; None without a CUDA device."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "cuda_runtime": torch.version.cuda,
        "driver": driver.splitlines()[0] if driver else None,
    }


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing optional package is reported as None
        return None


def load_average() -> float | None:
    """1-minute load average of the machine (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def environment(argv: list[str] | None = None, load_average_start: float | None = None) -> dict:
    """Everything a reader needs to know where and with what the numbers were produced.

    ``argv``: the command-line arguments after ``python -m benchmarks`` (default ``sys.argv[1:]``);
    ``load_average_start``: :func:`load_average` when the run began.
    """
    argv = sys.argv[1:] if argv is None else argv
    cuda = cuda_info()
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "benchmarks", *argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": cuda,
        "device_name": cuda["name"] if cuda else cpu_name(),
        "versions": {name: _version(name) for name in ("torch", "triton", "numpy", "matplotlib", "tqdm")},
        "git": git_info(),
        "load_average_start": load_average_start,
        "load_average_end": load_average(),
        "env": {name: os.environ.get(name) for name in ("TRITON_INTERPRET", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")},
    }
