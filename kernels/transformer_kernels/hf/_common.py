"""What the parts of :mod:`transformer_kernels.hf` share: transformers imported lazily, and modules
recognized by their *code* (bytecode, constants and the objects behind their globals), so that a
"Copied from" sibling of a reference class is proven to compute the same and a look-alike is not."""

from __future__ import annotations

import functools
import importlib
import types

import torch.nn as nn
import torch.nn.functional as F

from .. import patching
from ..patching import Leave, Options, activation_name, has_hooks


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("transformer_kernels.hf needs the `transformers` package (pip install transformers)") from e


_HF_MODULES: dict[str, types.ModuleType] = {}


def _hf_module(name: str) -> types.ModuleType:
    """``transformers.<name>``, imported once. The rules import at patch time, so a patched forward
    finds the module here: an import per call would break ``torch.compile``'s graph (dynamo refuses
    ``importlib.import_module``)."""
    module = _HF_MODULES.get(name)
    if module is None:
        module = _HF_MODULES[name] = importlib.import_module(f"transformers.{name}")
    return module


_MISSING = object()


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _same_code(a: types.CodeType, b: types.CodeType, skip_doc: bool) -> bool:
    consts_a, consts_b = list(a.co_consts), list(b.co_consts)
    if skip_doc and consts_a and consts_b:  # a docstring is the first constant; it may differ
        consts_a, consts_b = consts_a[1:], consts_b[1:]
    if (a.co_code, a.co_names, a.co_varnames, a.co_argcount, a.co_kwonlyargcount, len(consts_a)) != \
            (b.co_code, b.co_names, b.co_varnames, b.co_argcount, b.co_kwonlyargcount, len(consts_b)):
        return False
    for x, y in zip(consts_a, consts_b):
        if isinstance(x, types.CodeType) and isinstance(y, types.CodeType):
            if not _same_code(x, y, skip_doc=False):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


def same_function(f, g, _seen: frozenset = frozenset()) -> bool:
    """Whether functions ``f`` and ``g`` run the same code on the same globals: equal bytecode, names and
    constants (docstrings aside), no closures, equal defaults, and every global name either reads is
    bound to the same object in both modules, or to plain functions that are themselves the same by
    this rule (each modeling file has its own copy of helpers such as ``rotate_half``). This is how a
    "Copied from" class or function is proven identical."""
    f, g = getattr(f, "__func__", f), getattr(g, "__func__", g)
    if f is g:
        return True
    if not (isinstance(f, types.FunctionType) and isinstance(g, types.FunctionType)):
        return False
    if (f, g) in _seen:  # recursion: assume equal, the other names decide
        return True
    if f.__closure__ or g.__closure__ or f.__defaults__ != g.__defaults__:
        return False
    if not _same_code(f.__code__, g.__code__, skip_doc=True):
        return False
    seen = _seen | {(f, g)}
    for n in _code_names(f.__code__):
        a, b = f.__globals__.get(n, _MISSING), g.__globals__.get(n, _MISSING)
        if a is not b and not (isinstance(a, types.FunctionType) and same_function(a, b, seen)):
            return False
    return True


def _reference(module: str, qualname: str):
    """A reference class of transformers, e.g. ``("llama", "LlamaMLP")``."""
    return getattr(_hf_module(f"models.{module}.modeling_{module}"), qualname)


def _forward_is(m: nn.Module | type, module: str, cls: str, method: str = "forward") -> bool:
    """Whether ``m``'s (a module's or a class's) ``method`` is that of transformers' ``cls`` in ``module``."""
    owner = m if isinstance(m, type) else type(m)
    return same_function(getattr(owner, method, None), getattr(_reference(module, cls), method))


def _recognize_hf_activation(act) -> str | None:
    """transformers.activations modules that compute a transformer_kernels.ffn activation exactly (up to rounding)."""
    if not isinstance(act, nn.Module) or type(act).__module__ != "transformers.activations" or has_hooks(act):
        return None
    acts = _hf_module("activations")
    cls = type(act)
    if cls is acts.GELUActivation:  # F.gelu, or the same erf formula in Python
        fn = act.act
        return "gelu" if fn is F.gelu or getattr(fn, "__func__", None) is acts.GELUActivation._gelu_python else None
    if cls is getattr(acts, "GELUTanh", None):
        fn = act.act
        if getattr(fn, "__func__", None) is acts.GELUTanh._gelu_tanh_python:
            return "gelu_tanh"
        return activation_name(fn)
    if cls in (acts.NewGELUActivation, acts.FastGELUActivation, acts.AccurateGELUActivation):
        return "gelu_tanh"  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); FastGELU's constant to 1e-11
    if cls is acts.SiLUActivation:
        return "silu"
    if cls is getattr(acts, "QuickGELUActivation", None):  # input * sigmoid(1.702 * input)
        return "quick_gelu"
    return None


patching.ACTIVATION_RECOGNIZERS.append(_recognize_hf_activation)


def _activation_problem(act, gated: bool = False) -> str | None:
    """Why ``act`` cannot be fused now, or None if it can."""
    name = activation_name(act)
    if name is None:
        return f"activation {type(act).__name__} has no kernel"
    if gated:
        name = patching.GATED.get(name)
        if name is None:
            return f"gated activation with {activation_name(act)!r} has no kernel"
    if name not in patching.FFN_ACTIVATIONS:
        return f"the installed transformer_kernels.ffn has no {name!r} activation yet"
    return None


def _ffn_refusal(opts: Options, act, gated: bool = False) -> Leave | None:
    """The Leave for an MLP whose FFN may not or cannot be fused (``ffn=False``, an activation with no
    kernel), or None when it can."""
    if not opts.ffn:
        return Leave("ffn=False")
    problem = _activation_problem(act, gated)
    return Leave(problem) if problem else None
