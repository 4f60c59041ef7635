"""The one place that changes a user's module: a generated subclass and added children.

A rewritten block keeps its identity: the same object, now an instance of a generated
subclass of its own class whose ``forward`` is the rewritten graph's code, with the SE
modules added as children after its own. ``isinstance``, methods, attributes and hooks
stay; :func:`unpatch` gives back exactly the original class.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, cast

import torch.fx as fx
from torch import nn

from ._compat import exec_source, format_import_block, pytree_info

__all__ = ["OwnerPatch", "patched_class", "swap", "unpatch", "is_patched_module", "base_class"]

_CLASSES: dict[tuple, type] = {}


def _forward_from(base: type, source: str) -> object:
    return exec_source(source, {}, base.__name__)["forward"]


def _rebuild(base: type, source: str, added: tuple, constants: dict):
    """Unpickle or copy an instance of a patched class: find or make the class, then an empty instance."""
    cls = patched_class(base, source, added, constants)
    return cast(Any, cls).__new__(cls)  # typeshed's type.__new__ wants a class body; this is the base's __new__


def _reduce_ex(self, protocol):
    cls = type(self)
    return _rebuild, (cls._se_surgery_base, cls._se_surgery_source, cls._se_surgery_added,
                      cls._se_surgery_constants), self.__dict__


def _deepcopy(self, memo):
    # Copied as plain state: a base class's own __deepcopy__ (GraphModule's) would
    # recompile its forward onto the shared generated class.
    new = object.__new__(type(self))
    memo[id(self)] = new
    object.__setattr__(new, "__dict__", copy.deepcopy(self.__dict__, memo))
    return new


# Methods that rebuild a block into another structure (re-parameterisation to one conv):
# the rewritten forward still calls the branches they delete.
_RESTRUCTURING = ("reparameterize", "switch_to_deploy")


def _refuse_restructure(name: str):
    def refuse(self, *args, **kwargs):
        from .errors import SESurgeryError

        raise SESurgeryError(
            f"{type(self).__name__}.{name}() would rebuild a block whose forward se-surgery rewrote, and the SE "
            f"there would lose its place; call se_surgery.strip(model), then {name}(), then se_surgery.apply again")
    refuse.__name__ = name
    return refuse


def patched_class(base: type, source: str, added: tuple[str, ...], constants: dict | None = None) -> type:
    """The subclass of ``base`` whose forward is ``source`` (import block and code).

    One class per (base, source): instances patched the same way share it, and pickling
    or copying gives the same class back. It keeps ``base``'s name, module and qualname,
    so a patched ``BasicBlock`` still prints and reports as ``BasicBlock``.
    """
    key = (base, source)
    cls = _CLASSES.get(key)
    if cls is None:
        guards = {name: _refuse_restructure(name) for name in _RESTRUCTURING if callable(getattr(base, name, None))}
        attrs = {
            **guards,
            "forward": _forward_from(base, source),
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__reduce_ex__": _reduce_ex,
            "__deepcopy__": _deepcopy,
            "_se_surgery_base": base,
            "_se_surgery_source": source,
            "_se_surgery_added": tuple(added),
            # Tensors fx had to store for the graph (a constant made inside forward).
            "_se_surgery_constants": dict(constants or {}),
            **dict(constants or {}),
        }
        cls = _CLASSES[key] = type(base.__name__, (base,), attrs)
    return cls


def source_of(graph: fx.Graph) -> tuple[str, dict]:
    """Import block plus the forward fx generates for ``graph``, and the attributes that
    code reads from ``self`` beyond the module's own (the input and output tree specs of a
    forward that takes lists)."""
    code = graph.python_code("self")
    attrs = {}
    info = pytree_info(graph)
    if info is not None:
        attrs = {"_in_spec": info.in_spec, "_out_spec": info.out_spec}
    return format_import_block(code.globals) + "\n" + code.src, attrs


@dataclass
class OwnerPatch:
    """What :func:`swap` does to one module: a class to take and children to add."""

    path: str
    cls: type
    modules: dict[str, nn.Module] = field(default_factory=dict)


def is_patched_module(m: nn.Module) -> bool:
    return "_se_surgery_base" in type(m).__dict__


def base_class(m: nn.Module) -> type:
    return cast(Any, type(m))._se_surgery_base if is_patched_module(m) else type(m)


def swap(model: nn.Module, patches: list[OwnerPatch]) -> None:
    """Apply every patch, or none: on any exception (Ctrl-C included) the model is put back.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Sequential(nn.ReLU())
        >>> source, _ = source_of(fx.symbolic_trace(lambda x: x + 1).graph)
        >>> swap(m, [OwnerPatch("", patched_class(nn.Sequential, source, ()))])
        >>> isinstance(m, nn.Sequential), m(torch.zeros(1)).item()
        (True, 1.0)
    """
    done: list[tuple[nn.Module, type, list[str]]] = []
    try:
        for p in patches:
            m = model.get_submodule(p.path) if p.path else model
            done.append((m, type(m), list(p.modules)))
            for name, sub in p.modules.items():
                m.add_module(name, sub)
            m.__class__ = p.cls
    except BaseException:
        for m, cls, names in reversed(done):
            for name in names:
                m._modules.pop(name, None)
            m.__class__ = cls
        raise


def unpatch(m: nn.Module) -> None:
    """Remove what :func:`swap` added to ``m`` and give it back its own class."""
    cls: Any = type(m)  # a patched class: it has the _se_surgery_* attributes
    for name in cls._se_surgery_added:
        m._modules.pop(name, None)
    m.__class__ = cls._se_surgery_base
