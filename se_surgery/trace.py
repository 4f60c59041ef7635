"""Tracing with module scope.

:func:`trace_regions` turns a model into *regions*: fx graphs of the model itself or,
where the model cannot be traced whole, of its largest traceable submodules. Every node
records the module that owns it (``node.meta["scope"] = (dotted path, type)``), so a
join such as ``operator.add`` can be attributed to the block whose forward performs it.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.fx as fx
from torch import nn

from .errors import TraceError

__all__ = ["Region", "Tracing", "ScopeTracer", "trace_regions", "trace_local", "eval_mode", "TENSOR",
           "call_skeleton", "concrete_args_for"]


def _is_torch_nn(m: nn.Module) -> bool:
    mod = type(m).__module__
    return mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")


def _timm_registries(model: nn.Module) -> tuple[tuple[type, ...], tuple]:
    """timm's own leaf modules and autowrapped functions, if the model uses timm.

    timm is only imported when one of the model's classes comes from it, so tracing a
    torchvision model never pays for the timm import.
    """
    if not any(type(m).__module__.startswith("timm") for m in model.modules()):
        return (), ()
    try:
        from timm.layers import _fx as timm_fx  # timm >= 0.9
    except ImportError:  # pragma: no cover - older timm
        try:
            from timm.models import _features_fx as timm_fx
        except ImportError:
            return (), ()
    leaves = tuple(timm_fx.get_notrace_modules())
    fns = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
    return leaves, fns


class ScopeTracer(fx.Tracer):
    """An fx tracer that records the owning module of every node.

    Args:
        leaf_types: extra module classes to keep as leaves (timm's registry).
        autowrap_functions: functions to record as calls instead of tracing into.
        all_children_leaves: treat every submodule as a leaf; used to rewrite one
            block's own forward without touching its children.
    """

    def __init__(self, leaf_types=(), autowrap_functions=(), all_children_leaves=False):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.leaf_types = tuple(leaf_types)
        self.all_children_leaves = all_children_leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.all_children_leaves:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["scope"] = (self.scope.module_path, self.scope.module_type)
        return node


@dataclass
class Region:
    """One traced graph: the module at ``path`` (``""`` is the model itself)."""

    path: str
    module: nn.Module
    graph: fx.Graph
    # Leaves traced as regions of their own, by the call_module target inside this graph.
    children: dict[str, "Region"] = field(default_factory=dict)
    # Tensor constants the graph reads (get_attr _tensor_constant0 ...): fx sets them on
    # the traced module, where discovery must not leave them; they are kept here instead.
    constants: dict = field(default_factory=dict)

    def qualify(self, local_path: str) -> str:
        """Dotted path in the whole model of a path local to this region."""
        if not self.path:
            return local_path
        return f"{self.path}.{local_path}" if local_path else self.path


@dataclass
class Tracing:
    """Result of :func:`trace_regions`: the regions in depth order and what failed."""

    regions: list[Region]
    untraced: list[tuple[str, str]]  # (module path, shortened fx error)

    def all_regions(self) -> Iterator[Region]:
        for r in self.regions:
            yield from _walk(r)


def _walk(region: Region) -> Iterator[Region]:
    yield region
    for child in region.children.values():
        yield from _walk(child)


def _short(err: BaseException, limit: int = 160) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"training"}


def _plain_state(m: nn.Module) -> dict:
    """A module's own attributes (not its parameters, buffers, children or hooks), with
    the contents of dicts and lists, which forwards use as caches."""
    return {k: (v, dict(v) if type(v) is dict else list(v) if type(v) is list else None)
            for k, v in m.__dict__.items() if k not in _MODULE_INTERNALS}


def _restore_plain(m: nn.Module, state: dict) -> None:
    for k in [k for k in m.__dict__ if k not in _MODULE_INTERNALS and k not in state]:
        del m.__dict__[k]
    for k, (v, contents) in state.items():
        m.__dict__[k] = v
        # By identity: == on values that are tensors would compare them elementwise.
        if type(v) is dict and (len(v) != len(contents) or any(v.get(key, v) is not x for key, x in contents.items())):
            v.clear()
            v.update(contents)
        elif type(v) is list and (len(v) != len(contents) or any(a is not b for a, b in zip(v, contents))):
            v[:] = contents


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every module in eval mode; restore each one's own flag afterwards.

    Also restores every module's plain attributes: a forward run on fake tensors must
    leave nothing behind, such as timm's ``attention_bias_cache`` holding a fake tensor.
    """
    flags = [(m, m.training, _plain_state(m)) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, flag, state in flags:
            m.training = flag
            _restore_plain(m, state)


def _trace_one(module: nn.Module, leaves, fns, concrete_args=None) -> tuple[fx.Graph, dict]:
    """The graph, and the tensor constants fx attached to ``module`` for it (taken off again)."""
    before = set(module.__dict__)
    tracer = ScopeTracer(leaves, fns)
    try:
        graph = tracer.trace(module, concrete_args=concrete_args)
    finally:
        added = {k: module.__dict__.pop(k) for k in set(module.__dict__) - before}
    return graph, added


def _trace_tree(path: str, module: nn.Module, leaves, fns, untraced) -> list[Region]:
    try:
        # The model itself is called as model(x): its other arguments keep their defaults.
        concrete = None if path else concrete_args_for(module, path, [((TENSOR,), ())])
        graph, constants = _trace_one(module, leaves, fns, concrete)
    except Exception as e:  # fx raises many types: TraceError, TypeError, AttributeError...
        untraced.append((path or "<model>", _short(e)))
        out = []
        for name, child in module.named_children():
            if _is_torch_nn(child) and not isinstance(child, nn.Sequential | nn.ModuleList | nn.ModuleDict):
                continue  # torch.nn layers hold no joins of their own
            out.extend(_trace_tree(f"{path}.{name}" if path else name, child, leaves, fns, untraced))
        return out
    region = Region(path, module, graph, constants=constants)
    _trace_custom_leaves(region, leaves, fns, untraced)
    return [region]


def _trace_custom_leaves(region: Region, leaves, fns, untraced) -> None:
    """Leaves that timm keeps out of the trace may hold joins: trace them on their own."""
    if not leaves:
        return
    for node in region.graph.nodes:
        if node.op != "call_module" or node.target in region.children:
            continue
        sub = region.module.get_submodule(node.target)
        if _is_torch_nn(sub) or not isinstance(sub, leaves):
            continue
        found = _trace_tree(region.qualify(node.target), sub, leaves, fns, untraced)
        if len(found) == 1 and found[0].module is sub:
            region.children[node.target] = found[0]
        else:
            # Only parts of the leaf traced: keep them as regions nested under it.
            for i, r in enumerate(found):
                region.children[f"{node.target}#{i}"] = r


def trace_regions(model: nn.Module) -> Tracing:
    """Trace ``model`` into regions with module scope, in eval mode.

    Falls back to tracing submodules where the whole model cannot be traced, and
    records which modules failed and why.

    Example:
        >>> import torchvision
        >>> t = trace_regions(torchvision.models.resnet18())
        >>> [r.path for r in t.regions], t.untraced
        ([''], [])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    leaves, fns = _timm_registries(model)
    untraced: list[tuple[str, str]] = []
    with eval_mode(model):
        regions = _trace_tree("", model, leaves, fns, untraced)
    return Tracing(regions, untraced)


class _Tensor:
    """Stands for a tensor in the record of how a module was called."""

    def __repr__(self) -> str:
        return "Tensor"


TENSOR = _Tensor()
SIZE = "<int>"  # stands for an int inside a list or tuple argument (a size)


def call_skeleton(args: tuple, kwargs: dict) -> tuple:
    """A module call's arguments with tensors replaced by :data:`TENSOR` (comparable, no data)."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return TENSOR
        if type(v) in (list, tuple) and v and all(isinstance(t, torch.Tensor) for t in v):
            return type(v)(TENSOR for _ in v)
        if type(v) in (list, tuple) and v and all(type(t) is int for t in v):
            return type(v)(SIZE for _ in v)  # sizes such as (H, W): kept symbolic, never baked in
        return v if v is None or isinstance(v, (bool, int, float, str)) else type(v).__name__
    return tuple(one(a) for a in args), tuple(sorted((k, one(v)) for k, v in kwargs.items()))


def concrete_args_for(module: nn.Module, path: str, calls: list[tuple] | None) -> dict | None:
    """fx ``concrete_args`` that make a block's own trace follow how the model calls it.

    Traced on its own, a block sees every argument as a tensor proxy. A block called
    as ``block(x)`` whose forward does ``if shortcut is None: shortcut = x`` would then
    be traced down the other path, and a block called with a list of tensors would
    fail on ``x[i] = ...``. Arguments that are ``None`` in the model's calls are fixed
    to ``None``; lists and tuples of tensors or of ints (sizes) become one placeholder
    per element, so a size stays an input and the graph works at every size.
    """
    import inspect

    from torch.fx._symbolic_trace import PH

    if not calls:
        return None
    if len(set(map(repr, calls))) > 1:
        raise TraceError(
            f"cannot rewrite {path or '<model>'} ({type(module).__name__}): the model calls it in "
            f"{len(set(map(repr, calls)))} different ways, which one fx graph cannot express"
        )
    args, kwargs = calls[0]  # call skeletons (see call_skeleton)
    sig = inspect.signature(module.forward)
    try:
        bound = sig.bind(*args, **dict(kwargs))
    except TypeError:
        return None
    bound.apply_defaults()
    out = {}
    for name, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name not in bound.arguments:
            continue
        v = bound.arguments[name]
        if v is None:
            out[name] = None
        elif type(v) in (list, tuple) and all(a is TENSOR or a == SIZE for a in v):
            out[name] = type(v)(PH for _ in v)
    return out or None


def trace_local(module: nn.Module, path: str, concrete_args: dict | None = None) -> fx.Graph:
    """Trace only ``module``'s own forward, every child kept as a call_module leaf.

    ``concrete_args`` (see :func:`concrete_args_for`) fixes arguments to how the model
    really calls the module.
    """
    tracer = ScopeTracer(all_children_leaves=True, autowrap_functions=_timm_registries(module)[1])
    try:
        return tracer.trace(module, concrete_args=concrete_args)
    except Exception as e:
        raise TraceError(
            f"cannot trace the forward of {path or '<model>'} ({type(module).__name__}) "
            f"to insert SE: {_short(e)}"
        ) from e


def model_device_dtype(model: nn.Module, fallback=None) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first floating parameter or buffer.

    A module without any (a parameter-free block) gets ``fallback``, else CPU and the
    default dtype.
    """
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return fallback or (torch.device("cpu"), torch.get_default_dtype())


