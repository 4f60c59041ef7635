"""Tracing with module scope.

:func:`trace_regions` turns a model into *regions*: fx graphs of the model itself or,
where the model cannot be traced whole, of its largest traceable submodules. Every node
records the module that owns it (``node.meta["scope"] = (dotted path, type)``), so a
join such as ``operator.add`` can be attributed to the block whose forward performs it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.fx as fx
from torch import nn

from .errors import TraceError

__all__ = ["Region", "Tracing", "ScopeTracer", "trace_regions", "trace_local", "eval_mode"]


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


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every module in eval mode and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _trace_one(module: nn.Module, leaves, fns) -> fx.Graph:
    tracer = ScopeTracer(leaves, fns)
    return tracer.trace(module)


def _trace_tree(path: str, module: nn.Module, leaves, fns, untraced) -> list[Region]:
    try:
        graph = _trace_one(module, leaves, fns)
    except Exception as e:  # fx raises many types: TraceError, TypeError, AttributeError...
        untraced.append((path or "<model>", _short(e)))
        out = []
        for name, child in module.named_children():
            if _is_torch_nn(child) and not isinstance(child, nn.Sequential | nn.ModuleList | nn.ModuleDict):
                continue  # torch.nn layers hold no joins of their own
            out.extend(_trace_tree(f"{path}.{name}" if path else name, child, leaves, fns, untraced))
        return out
    region = Region(path, module, graph)
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


def trace_local(module: nn.Module, path: str) -> fx.Graph:
    """Trace only ``module``'s own forward, every child kept as a call_module leaf."""
    tracer = ScopeTracer(all_children_leaves=True, autowrap_functions=_timm_registries(module)[1])
    try:
        return tracer.trace(module)
    except Exception as e:
        raise TraceError(
            f"cannot trace the forward of {path or '<model>'} ({type(module).__name__}) "
            f"to insert SE: {_short(e)}"
        ) from e


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first floating parameter or buffer."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


