"""Saving and loading models (and training state) as one file.

A checkpoint is a ``torch.save`` dict: ``{"model_type": "lm" | "encoder_decoder", "config": dict of
TransformerConfig fields, "model": state_dict, "step": int, "optimizer": state_dict | None,
"scheduler": state_dict | None, "extra": dict}``. Tensors only (``weights_only=True`` loads it).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .config import TransformerConfig
from .model import Transformer, TransformerLM

MODEL_TYPES = {"lm": TransformerLM, "encoder_decoder": Transformer}


def model_type(model) -> str:
    for name, cls in MODEL_TYPES.items():
        if isinstance(model, cls):  # (FSDP2 subclasses the model's class)
            return name
    raise TypeError(f"expected a Transformer or TransformerLM, got {type(model).__name__}")


def save_checkpoint(path, model, *, step: int = 0, optimizer=None, scheduler=None, extra: dict | None = None,
                    model_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write ``model`` (and the training state) to ``path`` atomically (a temporary file, then rename).
    Under DistributedDataParallel pass the inner module; under FSDP pass the gathered ``model_state`` and
    ``optimizer_state`` (full state dicts, e.g. from ``torch.distributed.checkpoint.state_dict``), which
    replace ``model.state_dict()`` and ``optimizer.state_dict()``. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model_type": model_type(model),
        "config": dataclasses.asdict(model.config),
        "model": model.state_dict() if model_state is None else model_state,
        "step": int(step),
        "optimizer": optimizer_state if optimizer_state is not None else
        None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "extra": extra or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path, *, map_location="cpu", backend: str | None = None):
    """Rebuild the model saved at ``path``; returns ``(model, checkpoint dict)``. ``backend`` overrides the
    saved one (e.g. ``"torch"`` on a machine without a GPU). Raises ``FileNotFoundError`` or
    ``ValueError`` (not a checkpoint of this library)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{path} is not a transformer checkpoint (no known model_type)")
    fields = dict(checkpoint["config"])
    if backend is not None:
        fields["backend"] = backend
    model = MODEL_TYPES[checkpoint["model_type"]](TransformerConfig(**fields))
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint
