"""Run a function as soon as a module is imported, without importing it: registrations that need a
package (transformers' attention registry, DTensor's sharding rules) happen whichever of it and
``transformer_kernels`` is imported first, and ``import transformer_kernels`` pays for neither."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
from typing import Callable


class _CallAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``fn`` right after ``fullname`` has executed on its first import, then leaves ``sys.meta_path``."""

    def __init__(self, fullname: str, fn: Callable[[], object]):
        self.fullname, self.fn = fullname, fn

    def find_spec(self, fullname, path, target=None):
        if fullname != self.fullname:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module, fn = spec.loader.exec_module, self.fn

            def exec_and_call(module):
                exec_module(module)
                with contextlib.suppress(Exception):  # never break the user's import
                    fn()
            spec.loader.exec_module = exec_and_call
        return spec


def call_when_imported(fullname: str, fn: Callable[[], object]) -> None:
    """``fn()`` now if ``fullname`` is imported, else right after its first import (once: a second
    request for the same module and function, e.g. on a reload, adds nothing)."""
    if fullname in sys.modules:
        fn()
    elif not any(isinstance(f, _CallAfterImport) and (f.fullname, f.fn) == (fullname, fn) for f in sys.meta_path):
        sys.meta_path.insert(0, _CallAfterImport(fullname, fn))
