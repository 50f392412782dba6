"""Test set-up: run the Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported (torch.utils.flop_counter, among
others, imports it), so this happens here, before any test module loads.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # keeps Triton 3.9's default, silences its warning

import pytest  # noqa: E402
import torch  # noqa: E402

import transformer_kernels as tk  # noqa: E402
from transformer_kernels import dispatch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> str:
    """Where the Triton tests run: the GPU when there is one, else the CPU through the interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    if not dispatch.INTERPRETER:
        pytest.skip("no GPU and TRITON_INTERPRET was not set before triton was imported")
    return "cpu"


@pytest.fixture
def launches():
    """Counts launches of a Triton kernel during a test: ``with launches("attention_fwd", 1): ...``."""
    import contextlib

    @contextlib.contextmanager
    def expect(kernel: str, at_least: int = 1):
        before = tk.launch_count(kernel)
        yield
        ran = tk.launch_count(kernel) - before
        assert ran >= at_least, f"Triton kernel {kernel!r} launched {ran} times, expected >= {at_least}"

    return expect


@pytest.fixture
def gpu_tiles(monkeypatch):
    """``gpu_tiles(arch)`` makes the attention launchers pick the candidates they ship for ``arch``
    ("sm_80" or "sm_90a"; the interpreter otherwise takes 32x32 tiles): those tiles run here, through
    the interpreter, the default unless ``transformer_kernels.autotune.forced`` picks another candidate."""
    import importlib

    mod = importlib.import_module("transformer_kernels.attention.configs")  # the launchers read the configs there
    originals = mod.fwd_candidates, mod.bwd_candidates

    def use(arch):
        def as_on(pick):
            def picked(*args, **kwargs):
                with monkeypatch.context() as m:
                    m.setattr(dispatch, "INTERPRETER", False)
                    return pick(*args[:-1], arch, **kwargs)  # the launchers pass the arch last
            return picked

        monkeypatch.setattr(mod, "fwd_candidates", as_on(originals[0]))
        monkeypatch.setattr(mod, "bwd_candidates", as_on(originals[1]))

    return use
