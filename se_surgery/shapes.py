"""Shapes without compute: propagate fake tensors through the traced regions.

Each tensor-valued node gets ``node.meta["shape"]`` (a tuple); every node that carries
tensor data (a tensor, or a tuple of them) gets ``node.meta["tensor"] = True``. Fake tensors carry shapes and dtypes but no storage, so the shapes of resnet152
or densenet201 cost no real activations.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .trace import Region, Tracing, _short, eval_mode, model_device_dtype

__all__ = ["propagate_shapes", "fake_mode"]


def fake_mode() -> FakeTensorMode:
    # Real parameters meet fake activations: let fake mode wrap them on the fly.
    return FakeTensorMode(allow_non_fake_inputs=True)


class _ShapeInterpreter(fx.Interpreter):
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


def propagate_shapes(model: nn.Module, tracing: Tracing, input_size: tuple[int, int, int]) -> dict[str, str]:
    """Annotate every region's nodes with shapes for a (1, *input_size) example input.

    Returns ``{region path: reason}`` for regions whose shapes could not be found.
    """
    device, dtype = model_device_dtype(model)
    failed: dict[str, str] = {}
    captured: dict[int, tuple] = {}
    nested = [r for r in tracing.all_regions() if r.path]
    with eval_mode(model), torch.no_grad(), fake_mode() as mode:
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
                    failed["<model>"] = _short(e)
            for region in tracing.all_regions():
                if id(region) not in captured:
                    failed[region.path or "<model>"] = failed.get("<model>", "the module was never called")
                    continue
                args, kwargs = captured[id(region)]
                try:
                    _ShapeInterpreter(region.module, graph=region.graph).run(*_positional(region.graph, args, kwargs))
                except Exception as e:
                    failed[region.path or "<model>"] = _short(e)
        finally:
            for h in hooks:
                h.remove()
    del mode
    return failed
