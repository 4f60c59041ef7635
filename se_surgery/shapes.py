"""Shapes without compute: propagate fake tensors through the traced regions.

Each tensor-valued node gets ``node.meta["shape"]`` (a tuple); every node that carries
tensor data (a tensor, or a tuple of them) gets ``node.meta["tensor"] = True``. Fake tensors carry shapes and dtypes but no storage, so the shapes of resnet152
or densenet201 cost no real activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from .trace import Region, Tracing, _short, call_skeleton, eval_mode, model_device_dtype

__all__ = ["propagate_shapes", "fake_mode", "record_calls", "annotate_call", "TensorSpec"]


class _ShapeFakeMode(FakeTensorMode):
    """Fake mode with a shortcut for eval-mode batch norm.

    On fake tensors ``native_batch_norm`` runs through a slow Python decomposition
    (~2 ms a call, most of a ResNet's fake forward); with ``training=False`` its output
    is just a tensor like its input (save_mean/invstd empty, as on CPU), so return that.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _BN and len(args) > 5 and args[5] is False and not kwargs and isinstance(args[0], FakeTensor):
            x = args[0]
            stat = x.new_empty((0,))
            return torch.empty_like(x), stat, stat
        return super().__torch_dispatch__(func, types, args, kwargs)


_BN = torch.ops.aten.native_batch_norm.default


def fake_mode() -> FakeTensorMode:
    # Real parameters meet fake activations: let fake mode wrap them on the fly.
    return _ShapeFakeMode(allow_non_fake_inputs=True)


class _NeutralScalars(TorchDispatchMode):
    """Read every data-dependent scalar of a fake tensor as 0 / 0.0 / False.

    Fake tensors have no values, so ``if x.mean() > 0:`` or ``x.item()`` in a forward
    that fx could not trace would stop the shape run there. Only shapes are wanted, so
    such reads get a neutral value and the forward goes on down one of its paths; the
    blocks it reaches get the inputs they really get. A forward that keeps reading
    (a loop until some value converges) is stopped after ``limit`` reads.
    """

    def __init__(self, limit: int = 10_000):
        super().__init__()
        self.reads, self.limit = 0, limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
            if self.reads > self.limit:
                raise RuntimeError(f"more than {self.limit} data-dependent scalar reads during the shape run")
            t = args[0]
            return False if t.dtype is torch.bool else 0.0 if t.is_floating_point() or t.is_complex() else 0
        return func(*args, **(kwargs or {}))


class _ShapeInterpreter(fx.Interpreter):
    def __init__(self, module, graph=None, constants=None):
        super().__init__(module, graph=graph)
        self.constants = constants or {}

    def fetch_attr(self, target: str):
        if target in self.constants:  # see Region.constants
            return self.constants[target]
        return super().fetch_attr(target)

    def run_node(self, n: fx.Node):
        try:
            out = super().run_node(n)
        except Exception as e:
            raise RuntimeError(f"shape propagation failed at node {n.name!r} ({n.format_node()}): {_short(e)}") from e
        if isinstance(out, torch.Tensor):
            n.meta["shape"] = tuple(int(s) for s in out.shape)
            n.meta["tensor"] = True
        elif isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in out):
            n.meta["tensor"] = True  # unbind / split / chunk: data flows on through getitem
        return out


def _capture_inputs(regions: list[Region], captured: dict):
    hooks = []
    for r in regions:
        def hook(mod, args, kwargs, _r=r):
            captured.setdefault(id(_r), (args, kwargs))
        hooks.append(r.module.register_forward_pre_hook(hook, with_kwargs=True))
    return hooks


def _positional(graph: fx.Graph, args: tuple, kwargs: dict) -> list:
    """Map a call's args and kwargs onto the graph's placeholders, in order."""
    out = list(args)
    for ph in [n for n in graph.nodes if n.op == "placeholder"][len(args):]:
        name = str(ph.target).lstrip("*")
        if name in kwargs:
            out.append(kwargs[name])
        elif ph.args:
            out.append(ph.args[0])
        elif str(ph.target).startswith("*"):
            continue
        else:
            raise TypeError(f"no value for input {name!r}")
    return out


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and device of a tensor a module was called with."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device


def _spec(v):
    if isinstance(v, torch.Tensor):
        return TensorSpec(tuple(int(s) for s in v.shape), v.dtype, v.device)
    if type(v) in (list, tuple):
        return type(v)(_spec(t) for t in v)
    return v


def _unspec(v):
    if isinstance(v, TensorSpec):
        return torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if type(v) in (list, tuple):
        return type(v)(_unspec(t) for t in v)
    return v


def record_calls(model: nn.Module, modules: dict[str, nn.Module], input_size: tuple[int, int, int]) -> dict[str, list]:
    """How the model calls each of ``modules``, from one forward on fake tensors.

    Returns ``{path: [(call skeleton, example), ...]}``: the skeleton (see
    :func:`~se_surgery.trace.call_skeleton`) says which arguments are tensors, lists,
    sizes or ``None``; the example holds the call's args and kwargs with each tensor
    as a :class:`TensorSpec` (for :func:`annotate_call`). ``{}`` where the model's
    forward cannot run on fake tensors.
    """
    device, dtype = model_device_dtype(model)
    calls: dict[str, list] = {p: [] for p in modules}
    hooks = []
    with eval_mode(model), torch.no_grad(), fake_mode(), _NeutralScalars():
        for path, module in modules.items():
            def hook(mod, args, kwargs, _path=path):
                calls[_path].append((call_skeleton(args, kwargs), (_spec(tuple(args)), {k: _spec(v) for k, v in kwargs.items()})))
            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            model(torch.empty((1, *input_size), device=device, dtype=dtype))
        except Exception:
            return {}
        finally:
            for h in hooks:
                h.remove()
    return calls


def annotate_call(module: nn.Module, graph: fx.Graph, example: tuple) -> bool:
    """Shapes for a block's own graph (traced with :func:`~se_surgery.trace.trace_local`),
    run on fake tensors shaped as in ``example`` (from :func:`record_calls`).

    Marks tensor-valued nodes as :func:`propagate_shapes` does, so that joins of tensors
    can be told from arithmetic on sizes (``1 + H * W``). Returns False where it fails.
    """
    import inspect

    args, kwargs = example
    sig = inspect.signature(module.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        return False
    try:
        with eval_mode(module), torch.no_grad(), fake_mode(), _NeutralScalars():
            bound = sig.bind(*_unspec(args), **{k: _unspec(v) for k, v in kwargs.items()})
            bound.apply_defaults()
            flat = graph._codegen.process_inputs(*(bound.arguments[name] for name in sig.parameters))
            _ShapeInterpreter(module, graph=graph).run(*flat)
    except Exception:
        return False
    return True


def propagate_shapes(model: nn.Module, tracing: Tracing, input_size: tuple[int, int, int]) -> dict[str, str]:
    """Annotate every region's nodes with shapes for a (1, *input_size) example input.

    Returns ``{region path: reason}`` for regions whose shapes could not be found.
    """
    device, dtype = model_device_dtype(model)
    failed: dict[str, str] = {}
    captured: dict[int, tuple] = {}
    nested = [r for r in tracing.all_regions() if r.path]
    stopped = None  # why the model's own forward stopped, where it had to be run
    with eval_mode(model), torch.no_grad(), fake_mode() as mode, _NeutralScalars():
        x = torch.empty((1, *input_size), device=device, dtype=dtype)
        hooks = _capture_inputs(nested, captured)
        try:
            roots = [r for r in tracing.regions if not r.path]
            if roots:
                captured[id(roots[0])] = ((x,), {})
            else:
                # The model itself did not trace: run its own forward on fake data to
                # reach the traced submodules with the inputs they really get.
                try:
                    model(x)
                except Exception as e:
                    stopped = _short(e)
            for region in tracing.all_regions():
                if id(region) not in captured:
                    failed[region.path or "<model>"] = (
                        f"the model's forward stopped before calling it: {stopped}" if stopped
                        else "the module was never called")
                    continue
                args, kwargs = captured[id(region)]
                try:
                    _ShapeInterpreter(region.module, graph=region.graph, constants=region.constants).run(*_positional(region.graph, args, kwargs))
                except Exception as e:
                    failed[region.path or "<model>"] = _short(e)
        finally:
            for h in hooks:
                h.remove()
    del mode
    return failed
