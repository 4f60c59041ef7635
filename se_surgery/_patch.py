"""The one place that changes a user's module: a generated subclass and added children.

A rewritten block keeps its identity: the same object, now an instance of a generated
subclass of its own class whose ``forward`` is the rewritten graph's code, with the SE
modules added as children after its own. ``isinstance``, methods, attributes and hooks
stay; :func:`unpatch` gives back exactly the original class.

A generated class holds code only: one class per (base class, forward source). What the
code reads from ``self`` beyond the module's own attributes (tensors fx had to store for
the graph, ``_tensor_constant0`` ..., and the tree specs of a forward that takes lists)
differs between instances of one class, so :func:`swap` puts it in each instance's own
``__dict__`` (plain attributes: not in ``state_dict``, not moved by ``.to()``, exactly as
the tensor the original forward made on each call), and :func:`unpatch` removes it.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Any, cast

import torch.fx as fx
from torch import nn

from ._compat import exec_source, format_import_block, pytree_info
from .errors import ModelTypeError, SESurgeryError, TraceError

__all__ = ["OwnerPatch", "patched_class", "copy_model", "swap", "unpatch", "original_class", "is_patched_module",
           "base_class", "generated_class"]

_CLASSES: dict[tuple, type] = {}
_CLASSES_LOCK = threading.Lock()  # two threads patching alike blocks get one class


def _forward_from(base: type, source: str) -> object:
    return exec_source(source, {}, base.__name__)["forward"]


def _rebuild(base: type, source: str, added: tuple, names: tuple = ()):
    """Unpickle or copy an instance of a patched class: find or make the class, then an empty instance."""
    cls = patched_class(base, source, added, names)
    return cast(Any, cls).__new__(cls)  # typeshed's type.__new__ wants a class body; this is the base's __new__


def _reduce_ex(self, protocol):
    cls = type(self)
    if "_se_surgery_base" not in cls.__dict__:
        # A class someone derived from ours (parametrize's): its own protocol decides.
        return super(generated_class(cls), self).__reduce_ex__(protocol)
    if "<locals>" in cls._se_surgery_base.__qualname__:
        raise SESurgeryError(
            f"{cls.__name__} (a class made at run time, such as an fx GraphModule's) cannot be pickled with its SE; "
            "save the SE with se_surgery.save_se(model, path) and redo it with se_surgery.load_se on a fresh model")
    return _rebuild, (cls._se_surgery_base, cls._se_surgery_source, cls._se_surgery_added,
                      cls._se_surgery_instance_attrs), self.__dict__


def _deepcopy(self, memo):
    # Copied as plain state: a base class's own __deepcopy__ (GraphModule's) would
    # recompile its forward onto the shared generated class.
    new = object.__new__(type(self))
    memo[id(self)] = new
    object.__setattr__(new, "__dict__", copy.deepcopy(self.__dict__, memo))
    return new


def _recompile(self):
    """``GraphModule.recompile`` that leaves the rewritten forward in place.

    GraphModule writes the graph's code onto ``type(self)`` whenever its graph is set
    (torchvision's feature extractors set it on every ``train()``/``eval()``): that is the
    generated class here, whose forward must stay. Calls go on through the base class's
    own call wrapper, as before the patch.
    """
    gen: Any = generated_class(type(self))
    before = self.__dict__.get("_code")
    result = super(gen, self).recompile()
    cls = type(self)
    for name in ("forward", "__call__", "_wrapped_call"):
        if name in cls.__dict__:
            delattr(cls, name)
    gen.forward = gen._se_surgery_forward
    if before is not None and self._code != before:
        raise SESurgeryError(f"the graph of {gen.__name__} changed after se-surgery rewrote its forward, which "
                             "still runs the old graph; call se_surgery.strip(model) first, change the graph, "
                             "then se_surgery.apply again")
    return result


# Methods that rebuild a block into another structure (re-parameterisation to one conv):
# the rewritten forward still calls the branches they delete.
_RESTRUCTURING = ("reparameterize", "switch_to_deploy")


def _refuse_restructure(name: str):
    def refuse(self, *args, **kwargs):
        raise SESurgeryError(
            f"{type(self).__name__}.{name}() would rebuild a block whose forward se-surgery rewrote, and the SE "
            f"there would lose its place; call se_surgery.strip(model), then {name}(), then se_surgery.apply again")
    refuse.__name__ = name
    return refuse


def patched_class(base: type, source: str, added: tuple[str, ...], instance_attrs: tuple[str, ...] = ()) -> type:
    """The subclass of ``base`` whose forward is ``source`` (import block and code).

    One class per (base, source): instances patched the same way share it, and pickling
    or copying gives the same class back. ``added`` (the SE children) and
    ``instance_attrs`` (what each instance holds for the code) are names the code reads,
    so the source decides them. It keeps ``base``'s name, module and qualname, so a
    patched ``BasicBlock`` still prints and reports as ``BasicBlock``.
    """
    key = (base, source, tuple(added), tuple(instance_attrs))
    with _CLASSES_LOCK:
        cls = _CLASSES.get(key)
        if cls is None:
            cls = _CLASSES[key] = _make_class(base, source, added, instance_attrs)
    return cls


def _make_class(base: type, source: str, added: tuple[str, ...], instance_attrs: tuple[str, ...]) -> type:
    guards = {name: _refuse_restructure(name) for name in _RESTRUCTURING if callable(getattr(base, name, None))}
    if issubclass(base, fx.GraphModule):
        guards["recompile"] = _recompile
    forward = _forward_from(base, source)
    attrs = {
        **guards,
        "forward": forward,
        "_se_surgery_forward": forward,  # what _recompile puts back
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__reduce_ex__": _reduce_ex,
        "__deepcopy__": _deepcopy,
        "_se_surgery_base": base,
        "_se_surgery_source": source,
        "_se_surgery_added": tuple(added),
        "_se_surgery_instance_attrs": tuple(instance_attrs),
    }
    return type(base.__name__, (base,), attrs)


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
    """What :func:`swap` does to one module: a class to take, children to add, and the
    attributes its new forward reads (``cls._se_surgery_instance_attrs``, by name)."""

    path: str
    cls: type
    modules: dict[str, nn.Module] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


def generated_class(cls: type) -> type | None:
    """The class :func:`patched_class` made in ``cls``'s MRO (``cls`` itself, or a class
    another library derived from it, as ``torch.nn.utils.parametrize`` does), or None."""
    for c in cls.__mro__:
        if "_se_surgery_base" in c.__dict__:
            return c
    return None


def is_patched_module(m: nn.Module) -> bool:
    """Whether ``m``'s forward is one se-surgery generated (directly or under a derived class)."""
    return generated_class(type(m)) is not None


def base_class(m: nn.Module) -> type:
    """``m``'s own class before se-surgery patched it."""
    gen = generated_class(type(m))
    return cast(Any, gen)._se_surgery_base if gen is not None else type(m)


def copy_model(model: nn.Module, what: str = "apply()") -> nn.Module:
    """``copy.deepcopy(model)`` in the train/eval mode of each of ``model``'s modules, or one
    clear error saying why it cannot be copied and what to do.

    Some classes' own ``__deepcopy__`` resets the mode: torchvision's ``DualGraphModule``
    (``create_feature_extractor``) comes back in train mode. Where a module's mode differs
    from the original's, its own ``train()`` sets it (so a DualGraphModule takes the graph
    of that mode), outer modules first.

    Example:
        >>> import threading
        >>> m = nn.Linear(2, 2); m.lock = threading.Lock()
        >>> copy_model(m)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        se_surgery.errors.ModelTypeError: apply() works on a copy of the model (inplace=False), and Linear cannot be deep-copied: ...
    """  # noqa: E501 - doctest output must match verbatim
    try:
        new = copy.deepcopy(model)
    except (TypeError, RuntimeError, AttributeError, NotImplementedError) as e:  # pickle/copy refusals
        first = str(e).splitlines()[0] if str(e) else ""
        raise ModelTypeError(
            f"{what} works on a copy of the model (inplace=False), and {type(model).__name__} cannot be deep-copied: "
            f"{type(e).__name__}: {first} (an attribute holding a lock, file, stream or process handle?); pass "
            "inplace=True to change this model itself, or give its class a __deepcopy__ that leaves that "
            "attribute out") from None
    modes = {name: m.training for name, m in model.named_modules()}
    for name, m in new.named_modules():
        if name in modes and m.training != modes[name]:
            m.train(modes[name])
    return new


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
    done: list[tuple[nn.Module, type, list[str], list[str]]] = []
    try:
        for p in patches:
            m = model.get_submodule(p.path) if p.path else model
            taken = [k for k in p.attrs if k in m.__dict__ or hasattr(type(m), k)]
            if taken:
                raise TraceError(f"{type(m).__name__} at {p.path or '<model>'} already has an attribute "
                                 f"{taken[0]!r}, which its rewritten forward needs for itself")
            done.append((m, type(m), list(p.modules), list(p.attrs)))
            for name, sub in p.modules.items():
                m.add_module(name, sub)
            m.__dict__.update(p.attrs)
            m.__class__ = p.cls
    except BaseException:
        for m, cls, names, attrs in reversed(done):
            for name in names:
                m._modules.pop(name, None)
            for name in attrs:
                m.__dict__.pop(name, None)
            m.__class__ = cls
        raise


def _rebased(cls: type, gen: type, base: type) -> type:
    """``cls`` (derived from the generated class ``gen``) rebuilt on ``base`` instead: the
    same name, body and other bases."""
    if cls is gen:
        return base
    if type(cls) is not type or "__slots__" in cls.__dict__:
        raise SESurgeryError(
            f"cannot remove SE from {cls.__qualname__}: another library derived this class from the one "
            f"se-surgery generated ({'a custom metaclass' if type(cls) is not type else '__slots__'}), and it "
            "cannot be rebuilt on the original class; undo that library's change first, then strip")
    bases = tuple(_rebased(b, gen, base) if issubclass(b, gen) else b for b in cls.__bases__)
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    body["__qualname__"] = cls.__qualname__
    return type(cls.__name__, bases, body)


def original_class(m: nn.Module) -> type:
    """The class :func:`unpatch` gives ``m``: its base, or a class another library derived
    from the generated one, rebuilt on the base (raises where that cannot be done exactly)."""
    gen = cast(Any, generated_class(type(m)))
    return _rebased(type(m), gen, gen._se_surgery_base)


def unpatch(m: nn.Module, cls: type | None = None) -> None:
    """Remove what :func:`swap` added to ``m`` and give it back its own class (``cls``,
    from :func:`original_class`, where the caller already computed it)."""
    gen: Any = generated_class(type(m))
    target = cls if cls is not None else original_class(m)
    for name in gen._se_surgery_added:
        m._modules.pop(name, None)
    for name in gen._se_surgery_instance_attrs:
        m.__dict__.pop(name, None)
    m.__class__ = target
