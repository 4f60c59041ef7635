"""A look-alike of the user's model to run instead of it: same classes, fake tensors, no hooks.

Discovery, planning and reporting must not run a user's hook, change a buffer the
forward assigns (``self.seen += 1``), leave a cache entry behind, or copy a weight. They
all run on :func:`structural_copy`: every module is a new instance of its own class
whose parameters and buffers are fake tensors (shapes, no storage), whose hook tables
are empty and whose dicts and lists are its own.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ._compat import (
    FakeTensor,
    FakeTensorMode,
    TorchDispatchMode,
    from_tensor,
    route_calls,
    unroute_calls,
    wrapped_module,
)

__all__ = ["fake_mode", "structural_copy", "NeutralScalars"]


class _ShapeFakeMode(FakeTensorMode):
    """Fake mode with shortcuts for eval-mode batch norm and 2-D convolution.

    On fake tensors ``native_batch_norm`` runs through a slow Python decomposition
    (~2 ms a call, most of a ResNet's fake forward); with ``training=False`` its output
    is a tensor like its input (save_mean/invstd empty, as on CPU), so return that.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _BN and len(args) > 5 and args[5] is False and not kwargs and isinstance(args[0], FakeTensor):
            x = args[0]
            stat = x.new_empty((0,))
            return torch.empty_like(x), stat, stat
        if func is _CONV and not kwargs and len(args) == 9 and args[6] is False and isinstance(args[0], FakeTensor) \
                and args[0].dim() == 4 and all(type(v) is int for v in (*args[3], *args[4], *args[5])) \
                and args[0].shape[1] == args[1].shape[1] * args[8]:  # else the real path says what is wrong
            # A 2-D convolution's output is a new tensor of a shape arithmetic gives; the
            # generic fake path (backend selection, meta kernel) costs several ms a call.
            x, w, _, stride, padding, dilation, _, _, _ = args
            n, _, h, wd = x.shape
            k = w.shape[2:]
            size = [(d + 2 * p - dl * (kk - 1) - 1) // s + 1
                    for d, p, dl, kk, s in zip((h, wd), padding, dilation, k, stride)]
            return x.new_empty((n, w.shape[0], *size))
        return super().__torch_dispatch__(func, types, args, kwargs)


_BN = torch.ops.aten.native_batch_norm.default
_CONV = torch.ops.aten.convolution.default


def fake_mode() -> FakeTensorMode:
    """The fake mode every shape run uses. Tensors a forward creates on the fly (a
    constant, a mask) are real until they meet a fake one, so mixing is allowed."""
    return _ShapeFakeMode(allow_non_fake_inputs=True)


class NeutralScalars(TorchDispatchMode):
    """Read every data-dependent scalar of a fake tensor as 0 / 0.0 / False.

    Fake tensors have no values, so ``if x.mean() > 0:`` or ``x.item()`` would stop
    the shape run there. Only shapes are wanted, so such reads get a neutral value and
    the forward goes on down one of its paths. A forward that keeps reading (a loop
    until some value converges) is stopped after ``limit`` reads.
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


def _is_hook_table(key: str, value) -> bool:
    return key.startswith("_") and "hook" in key and isinstance(value, dict)


def structural_copy(model: nn.Module, mode: FakeTensorMode) -> tuple[nn.Module, dict[int, nn.Module]]:
    """Copy ``model`` module by module with fake tensors and no hooks, in eval mode.

    Returns the copy and ``{id(original module): copied module}``. A module the model
    holds in several places is copied once, so sharing is kept. No ``__init__`` and no
    ``__deepcopy__`` of the user's classes run; nothing of ``model`` is written.

    Example:
        >>> import torchvision
        >>> from se_surgery._fake import fake_mode, structural_copy
        >>> m = torchvision.models.resnet18()
        >>> c, _ = structural_copy(m, fake_mode())
        >>> type(c) is type(m), c.training, type(c.conv1.weight).__name__, c.conv1.weight.shape
        (True, False, 'FakeTensor', torch.Size([64, 3, 7, 7]))
    """
    memo: dict[int, nn.Module] = {}
    tensors: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in tensors:  # tied weights stay tied
            tensors[id(t)] = from_tensor(mode, t)
        return tensors[id(t)]

    def one(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = object.__new__(type(m))
        memo[id(m)] = new
        body = {}
        for k, v in m.__dict__.items():
            if k == "_parameters" or k == "_buffers":
                v = OrderedDict((n, None if t is None else fake(t)) for n, t in v.items())
            elif k == "_modules":
                v = OrderedDict((n, None if c is None else one(c)) for n, c in v.items())
            elif _is_hook_table(k, v):
                v = type(v)()
            elif isinstance(v, torch.Tensor):
                v = fake(v)
            elif type(v) in (dict, list, set):
                v = type(v)(v)  # a forward's caches fill the copy's, not the user's
            body[k] = v
        body["training"] = False
        object.__setattr__(new, "__dict__", body)
        return new

    return one(model), memo


def model_device_dtype(model: nn.Module, fallback=None) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first floating parameter or buffer (else ``fallback``,
    else CPU and the default dtype): what an example input, or a new module, should have."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return fallback or (torch.device("cpu"), torch.get_default_dtype())


def _router(module: nn.Module, dispatch):
    def call(*args, **kwargs):
        return dispatch(module, args, kwargs)
    return call


def run_fake(copy: nn.Module, mode: FakeTensorMode, size: tuple[int, int, int], device, dtype, dispatch):
    """One forward of a structural ``copy`` on a fake ``(1, *size)`` input.

    Every call of one of the copy's modules goes to ``dispatch(module, args, kwargs)``
    instead of its ``__call__``: no hook runs, not even the global ones
    (``register_module_forward_hook``). Only the copy's own instances are routed (see
    :func:`~se_surgery._compat.route_calls`): no class and no other thread sees a change.
    """
    mods = list(copy.modules())
    try:
        for m in mods:
            route_calls(m, _router(m, dispatch))
        with torch.no_grad(), mode, NeutralScalars():
            return copy(torch.empty((1, *size), device=device, dtype=dtype))
    finally:
        for m in mods:
            unroute_calls(m)


def run_copy(model: nn.Module, size: tuple[int, int, int], watch=()) -> dict[int, tuple]:
    """One forward of a structural copy of ``model`` (see :func:`run_fake`), each module
    running its own ``forward``. Returns ``{id(module): shape of its first input}`` for the
    modules of ``model`` in ``watch``.
    """
    mode = fake_mode()
    copy, memo = structural_copy(model, mode)
    watched = {id(memo[id(m)]): id(m) for m in watch}
    seen: dict[int, tuple] = {}

    def dispatch(mod, args, kwargs):
        inner = wrapped_module(mod)
        if inner is not None:
            return dispatch(inner, args, kwargs)
        if id(mod) in watched and args and isinstance(args[0], torch.Tensor):
            seen.setdefault(watched[id(mod)], tuple(args[0].shape))
        return mod.forward(*args, **kwargs)

    run_fake(copy, mode, size, *model_device_dtype(model), dispatch)
    return seen
