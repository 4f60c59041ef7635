"""Every private torch, torch.fx and timm API se-surgery uses, in one place.

When a release moves one of these, this is the only file to change; everything else
imports from here.
"""

from __future__ import annotations

import functools
import itertools
import linecache
from typing import Any

import torch
from torch import nn

__all__ = [
    "FakeTensor", "FakeTensorMode", "unset_fake_temporarily", "PH", "format_import_block", "exec_source",
    "timm_registries", "route_calls", "unroute_calls", "flop_counter", "TorchDispatchMode", "pytree_info",
    "plain_codegen", "process_inputs", "is_op_overload", "orig_mod", "spec_children",
    "wrapped_module",
]

from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily  # noqa: E402
from torch.fx._symbolic_trace import PH  # noqa: E402  (placeholder marker for concrete_args lists)
from torch.fx.graph_module import _format_import_block, sys_importer  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from .errors import SESurgeryError  # noqa: E402


def route_calls(module: nn.Module, fn) -> None:
    """Make calls of this one instance, ``module(...)``, run ``fn(*args, **kwargs)`` instead.

    ``nn.Module.__call__`` (``_wrapped_call_impl``) hands a call to the instance's
    ``_compiled_call_impl`` when it is set, before any hook (that attribute is how
    ``Module.compile()`` installs its compiled call). Set in the instance's own
    ``__dict__``, it changes nothing for any other module or thread, unlike replacing
    ``nn.Module.__call__`` on the class. Only se-surgery's own structural copies are routed.
    """
    _check_call_routing()
    module.__dict__["_compiled_call_impl"] = fn


def unroute_calls(module: nn.Module) -> None:
    """Undo :func:`route_calls`."""
    module.__dict__.pop("_compiled_call_impl", None)


@functools.cache
def _routing_works() -> bool:
    # The probe is only ever called routed: an unrouted call would run the user's global hooks.
    probe = nn.Identity()
    fired: list = []
    probe.register_forward_hook(lambda m, a, out: fired.append(out))
    probe.__dict__["_compiled_call_impl"] = lambda *args, **kwargs: ("routed", args, kwargs)
    return probe(1, k=2) == ("routed", (1,), {"k": 2}) and not fired


def _check_call_routing() -> None:
    if not _routing_works():
        raise SESurgeryError(f"torch {torch.__version__} no longer calls a module through its _compiled_call_impl, "
                             "which se-surgery's shape pass relies on; use a torch release se-surgery supports")


class _NoModuleTracker:
    """Stands in for FlopCounterMode's ModuleTracker: every count goes to the total only."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """torch's ``FlopCounterMode`` counting totals only (``get_total_flops``).

    Its ``ModuleTracker`` registers global module hooks (``register_module_forward_pre_hook``)
    for as long as it counts, so every other thread's forwards would run them; counting
    happens in a dispatch mode, which is per thread, so the total needs none of that.
    """
    counter = FlopCounterMode(display=False)
    if not hasattr(counter, "mod_tracker"):  # pragma: no cover - a torch that counts another way
        raise SESurgeryError(f"torch {torch.__version__}'s FlopCounterMode has no mod_tracker to replace")
    counter.mod_tracker = _NoModuleTracker()  # type: ignore[assignment]
    return counter


def format_import_block(globals_: dict[str, Any]) -> str:
    """Import statements that recreate the globals fx's code generator refers to."""
    return _format_import_block(globals_, sys_importer)


_counter = itertools.count(1)  # next() is atomic: threads get distinct file names


def exec_source(src: str, globals_: dict[str, Any], name: str) -> dict[str, Any]:
    """Execute generated source with its text registered in ``linecache``.

    Tracebacks, ``inspect.getsource`` and ``torch.jit.script`` read the source of a
    function through linecache; fx's GraphModule registers its code the same way.
    """
    filename = f"<se_surgery:{name}:{next(_counter)}>"
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


def wrapped_module(m: nn.Module) -> nn.Module | None:
    """The model a wrapper holds and calls (DataParallel, DistributedDataParallel,
    ``torch.compile``'s OptimizedModule), or None. The shape pass calls it directly: a
    wrapper's own forward (scatter to devices, compiled code) has no place in it."""
    if isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return m.module
    return orig_mod(m) if is_compiled_wrapper(m) else None


def orig_mod(m: nn.Module) -> nn.Module | None:
    """The model inside ``torch.compile``'s wrapper, or None."""
    inner = getattr(m, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


def spec_children(spec) -> list:
    """A pytree TreeSpec's child specs (``children()`` in newer torch, ``children_specs`` before)."""
    children = getattr(spec, "children", None)
    return list(children()) if callable(children) else list(spec.children_specs)
