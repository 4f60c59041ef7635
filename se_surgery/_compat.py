"""Every private torch, torch.fx and timm API se-surgery uses, in one place.

When a release moves one of these, this is the only file to change; everything else
imports from here.
"""

from __future__ import annotations

import linecache
from typing import Any

import torch
from torch import nn

__all__ = [
    "FakeTensor", "FakeTensorMode", "unset_fake_temporarily", "PH", "format_import_block", "exec_source",
    "timm_registries", "MODULE_CALL", "TorchDispatchMode", "pytree_info", "plain_codegen", "process_inputs",
    "is_op_overload", "orig_mod", "spec_children",
]

from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily  # noqa: E402
from torch.fx._symbolic_trace import PH  # noqa: E402  (placeholder marker for concrete_args lists)
from torch.fx.graph_module import _format_import_block, sys_importer  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# nn.Module.__call__ as torch defines it; the shape pass swaps in its own dispatcher
# for the duration of one fake forward, as torch.fx's own tracer does.
MODULE_CALL = nn.Module.__call__


def format_import_block(globals_: dict[str, Any]) -> str:
    """Import statements that recreate the globals fx's code generator refers to."""
    return _format_import_block(globals_, sys_importer)


_counter = [0]


def exec_source(src: str, globals_: dict[str, Any], name: str) -> dict[str, Any]:
    """Execute generated source with its text registered in ``linecache``.

    Tracebacks, ``inspect.getsource`` and ``torch.jit.script`` read the source of a
    function through linecache; fx's GraphModule registers its code the same way.
    """
    _counter[0] += 1
    filename = f"<se_surgery:{name}:{_counter[0]}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    ns = dict(globals_)
    exec(compile(src, filename, "exec"), ns)  # noqa: S102 - our own generated code
    return ns


def timm_registries(model: nn.Module) -> tuple[tuple[type, ...], tuple]:
    """timm's leaf modules and autowrapped functions, where the model uses timm.

    timm is imported only when one of the model's classes comes from it, so a
    torchvision model never pays for the import.
    """
    if not any(type(m).__module__.startswith("timm") for m in model.modules()):
        return (), ()
    try:
        from timm.layers import _fx as timm_fx  # timm >= 0.9
    except ImportError:  # pragma: no cover - older timm
        try:
            from timm.models import _features_fx as timm_fx  # type: ignore[no-redef]  # same module, older name
        except ImportError:
            return (), ()
    leaves = tuple(timm_fx.get_notrace_modules())
    fns = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
    return leaves, fns


def is_compiled_wrapper(m: nn.Module) -> bool:
    """``torch.compile(model)`` returns an OptimizedModule holding the model as ``_orig_mod``."""
    return isinstance(getattr(m, "_orig_mod", None), nn.Module) and type(m).__name__ == "OptimizedModule"


def from_tensor(mode: FakeTensorMode, t: torch.Tensor) -> torch.Tensor:
    """A fake tensor (shape, dtype, device; no data) standing for ``t``; parameters stay parameters."""
    return mode.from_tensor(t, static_shapes=True)


def pytree_info(graph) -> Any:
    """fx's record of how a graph flattens list/dict inputs (None for plain inputs)."""
    return getattr(graph._codegen, "pytree_info", None)


def plain_codegen(graph) -> bool:
    """Whether the graph's inputs are plain placeholders (no pytree flattening)."""
    import torch.fx as fx

    return type(graph._codegen) is fx.graph.CodeGen


def process_inputs(graph, *args) -> list:
    """A call's arguments as the graph's flat placeholders."""
    return list(graph._codegen.process_inputs(*args))


def is_op_overload(fn) -> bool:
    return isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))


def orig_mod(m: nn.Module) -> nn.Module | None:
    """The model inside ``torch.compile``'s wrapper, or None."""
    inner = getattr(m, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


def spec_children(spec) -> list:
    """A pytree TreeSpec's child specs (``children()`` in newer torch, ``children_specs`` before)."""
    children = getattr(spec, "children", None)
    return list(children()) if callable(children) else list(spec.children_specs)
