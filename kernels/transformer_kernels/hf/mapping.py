"""Our kernels through Hugging Face's own mechanism: a kernel mapping for ``kernels.kernelize``.

transformers (>= 5.25, which requires Hugging Face's ``kernels`` package) marks layers with
``use_kernel_forward_from_hub(name)``; ``kernels.kernelize(model, mode=...)`` swaps the forward of each
marked module for the layer that the active kernel mapping names. A mapping entry may be any object
with a ``load()`` returning the layer class (``kernels``' ``RepositoryProtocol``), so ours load the
classes of :mod:`transformer_kernels.hf.layers` from this package: offline, no Hub, no download.

Mapped (the names whose semantics our kernels match; transformers 5.25 counts):

========================  =====================================================  ========================
name                      code it must run (else the original forward runs)       our kernel
========================  =====================================================  ========================
``RMSNorm``               LlamaRMSNorm (133 classes)                              ``rms_norm``
``RMSNormZeroCentered``   GemmaRMSNorm, ``x * (1 + w)`` in fp32 (Qwen3.5)         ``rms_norm``, 1 + w
``rotary_pos_emb``        Llama's ``apply_rotary_pos_emb`` (111 files)            ``apply_rotary_pos_emb``
========================  =====================================================  ========================

Not mapped: ``RMSNormGated`` (a gate inside the norm: no kernel of ours), the activations ``SiLU``,
``GeLU``, ``GeluTanh``, ``QuickGELU``, ``NewGELU``, ``FastGELU`` (a lone activation gains nothing from a
kernel of its own: ours fuse it into the FFN, which :func:`transformer_kernels.hf.apply_kernels`
reaches), attention (transformers' attention interface: :func:`transformer_kernels.hf.register`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch.nn as nn

from . import layers

#: The device types the mapping covers: CUDA (the Triton kernels) and CPU (the kernels under
#: ``TRITON_INTERPRET=1``, else the PyTorch path; see README "Where each call runs").
DEVICES = ("cuda", "cpu")

#: transformers' kernel name -> our layer class (in :mod:`transformer_kernels.hf.layers`).
LAYERS = {"RMSNorm": "LlamaRMSNorm", "RMSNormZeroCentered": "GemmaRMSNorm", "rotary_pos_emb": "RotaryPosEmb"}


@dataclasses.dataclass(frozen=True)
class PackageLayer:
    """A ``kernels`` repository (``RepositoryProtocol``) for a layer class of this package:
    ``load()`` returns ``transformer_kernels.hf.layers.<layer_name>``. Hashable, as ``kernels`` caches
    loaded layers by repository."""

    layer_name: str

    def load(self) -> type[nn.Module]:
        return getattr(layers, self.layer_name)

    def __str__(self) -> str:
        return f"transformer_kernels.hf.layers.{self.layer_name}"


#: The kernel mapping, in ``kernels``' format (``{name: {device: repository}}``, every mode): pass it to
#: ``kernels.use_kernel_mapping`` / ``register_kernel_mapping`` to combine it with other mappings.
KERNEL_MAPPING = {name: {device: PackageLayer(layer) for device in DEVICES} for name, layer in LAYERS.items()}


def kernelize(model: nn.Module, *, mode, device=None, use_fallback=True) -> nn.Module:
    """Hugging Face's ``kernels.kernelize`` with our :data:`KERNEL_MAPPING` alone: the modules that
    transformers marks ``RMSNorm``, ``RMSNormZeroCentered`` and ``rotary_pos_emb`` run our kernels (where
    their code is the one our kernels reproduce), every other marked module its original forward.

    Args:
        model: any ``nn.Module`` (a transformers model); kernelized in place. Parameters, buffers and
            ``state_dict`` keys are untouched.
        mode: ``kernels.Mode``: ``INFERENCE``, ``TRAINING``, or either ``| TORCH_COMPILE``. Our layers
            have a backward and compile whole (``has_backward = can_torch_compile = True``).
        device: ``"cuda"``, ``"cpu"`` or a ``torch.device``; None infers it from the parameters.
        use_fallback: as ``kernels.kernelize`` (True: original forwards where no mapping applies).

    Returns:
        ``model``.

    Raises:
        ImportError: Hugging Face's ``kernels`` is not installed (``pip install kernels``; transformers
        >= 5.25 installs it). ValueError: as ``kernels.kernelize`` (no INFERENCE/TRAINING in mode, an
        unsupported device, ``use_fallback=False`` with an unmapped marked layer).

    ``kernels``' warning for each marked module that the mapping leaves alone (``SiLU``, ...) is not
    shown. The mapping replaces any other for the call (``inherit_mapping=False``): modules kernelized before
    from the Hub get their original forward back unless mapped here. To combine mappings, call
    ``kernels.kernelize`` inside ``kernels.use_kernel_mapping(KERNEL_MAPPING)``.
    """
    try:
        import kernels
    except ImportError as e:
        raise ImportError("transformer_kernels.hf.kernelize needs Hugging Face's `kernels` package "
                          "(pip install kernels; transformers >= 5.25 installs it)") from e
    if not hasattr(kernels, "kernelize"):
        raise ImportError(f"`import kernels` gives {getattr(kernels, '__file__', kernels)!r}, not Hugging Face's "
                          "`kernels` package (is an older transformer_kernels checkout on sys.path?)")
    quiet = _QuietUnmapped()
    log = logging.getLogger("kernels._internals.layer.layer")
    log.addFilter(quiet)
    try:
        with kernels.use_kernel_mapping(KERNEL_MAPPING, inherit_mapping=False):
            return kernels.kernelize(model, mode=mode, device=device, use_fallback=use_fallback)
    finally:
        log.removeFilter(quiet)


class _QuietUnmapped(logging.Filter):
    """Drops ``kernels``' "No kernel mapping found for layer" warning (one per marked module: 2 per
    layer of a Llama) during :func:`kernelize`, whose docstring says which names it leaves alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No kernel mapping found for layer" not in record.getMessage()


_METADATA = {"id": "transformer_kernels_hub", "name": "transformer-kernels", "version": 1, "license": "Apache-2.0",
             "python-depends": [], "backend": {"type": "cuda"}}
_INIT = '''"""Kernel layers of transformer_kernels (written by transformer_kernels.hf.write_local_kernel): the
installed package's classes, so this folder never goes stale."""
from transformer_kernels.hf import layers  # noqa: F401
'''


def write_local_kernel(path: str | os.PathLike) -> Path:
    """Write a local kernel repository at ``path`` that Hugging Face's ``kernels.LocalLayerRepository``
    and transformers' ``KernelConfig(..., use_local_kernel=True)`` load: ``build/torch-universal/``
    (a noarch build) with ``metadata.json`` and an ``__init__.py`` whose ``layers`` are
    :mod:`transformer_kernels.hf.layers`. Returns the path, for a mapping such as
    ``{"RMSNorm": f"{path}:LlamaRMSNorm", "rotary_pos_emb": f"{path}:RotaryPosEmb"}``
    (see :data:`LAYERS`).

    The folder is built beside ``path`` and moved into place, so a failure leaves no half-written
    repository; an existing ``path`` is replaced only if it is such a repository (it holds
    ``build/torch-universal/metadata.json`` with our id), else FileExistsError is raised.
    """
    path = Path(path).absolute()
    metadata = path / "build" / "torch-universal" / "metadata.json"
    if path.exists():
        try:
            ours = json.loads(metadata.read_text()).get("id") == _METADATA["id"]
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise FileExistsError(f"write_local_kernel: {path} exists and is not a transformer_kernels local kernel")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build = staging / "build" / "torch-universal"
        build.mkdir(parents=True)
        (build / "metadata.json").write_text(json.dumps(_METADATA, indent=2) + "\n")
        (build / "__init__.py").write_text(_INIT)
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
