"""One custom op per SE join: squeeze, excitation MLP, gate, scale, residual add, activation.

``se_surgery::se_join`` is a :func:`torch.library.custom_op`, so eager autograd,
``torch.compile(fullgraph=True)`` and ``torch.export`` see one node per SE instead of the
twenty-odd aten ops of the composite. Its backward is a second op,
``se_surgery::se_join_backward``. CUDA tensors run the Triton kernels of
:mod:`se_surgery.ops.triton_kernels` (imported on first use, so ``import se_surgery`` stays
light); every other device runs :func:`composite_forward`, the fewest aten dispatches
that compute the same thing.

What one call computes, for ``x`` of shape (N, C, H, W) (``channel_dim=1``, contiguous or
``channels_last``) or (N, H, W, C) (``channel_dim=-1``)::

    s = squeeze(x)                       # mean | amax | (mean + amax) / 2 over H, W
    z = fc2(relu(fc1(s)))                # 1x1-conv weights (out, in[, 1, 1]), optional biases
    y = x * (gate_scale * gate(z))       # gate: sigmoid | hard_sigmoid, per (n, c)
    y = skip + y                         # when skip is given
    y = relu(y)                          # when act == "relu"
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

__all__ = ["ACTS", "GATES", "SQUEEZES", "composite_backward", "composite_forward", "gate_of", "scale_join", "se_join",
           "se_join_into", "squeeze_map"]

SQUEEZES = ("avg", "max", "avgmax")
GATES = ("sigmoid", "hard_sigmoid")
ACTS = (None, "relu")


def _dims(channel_dim: int) -> tuple[int, int]:
    return (2, 3) if channel_dim == 1 else (1, 2)


def _bcast(g: Tensor, channel_dim: int) -> Tensor:
    """(N, C) -> broadcastable against x."""
    return g[:, :, None, None] if channel_dim == 1 else g[:, None, None, :]


def _out_dtype(x: Tensor, skip: Tensor | None) -> torch.dtype:
    # As ``skip + x * g`` would promote (a float32 skip and a bfloat16 branch under autocast).
    return x.dtype if skip is None or skip.dtype == x.dtype else torch.promote_types(x.dtype, skip.dtype)


def _mat(w: Tensor) -> Tensor:
    # 1x1-conv weights (out, in, 1, 1) are used as (out, in) matrices without a copy.
    return w.view(w.shape[0], -1) if w.dim() != 2 else w


def _conv(w: Tensor) -> Tensor:
    # (out, in) matrices as the (out, in, 1, 1) weights of a 1x1 conv, without a copy.
    return w if w.dim() == 4 else w.view(*w.shape, 1, 1)


def _squeeze(x: Tensor, channel_dim: int, squeeze: str) -> Tensor:
    dims = _dims(channel_dim)
    if squeeze == "avg":
        return x.mean(dims)
    if squeeze == "max":
        return x.amax(dims)
    return 0.5 * (x.mean(dims) + x.amax(dims))


def _excite(s: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None):
    """(pre-activation of fc1, hidden after ReLU, pre-gate logits), all (N, *)."""
    s = s.to(w1.dtype)
    z1 = F.linear(s, _mat(w1), b1)
    h = torch.relu(z1)
    return z1, h, F.linear(h, _mat(w2), b2)


def _gate(z: Tensor, gate: str) -> Tensor:
    return torch.sigmoid(z) if gate == "sigmoid" else F.hardsigmoid(z)


def squeeze_map(x: Tensor, channel_dim: int, squeeze: str, onnx: bool = False) -> Tensor:
    """The squeeze as an (N, C, 1, 1) map, whatever ``channel_dim``: what 1x1-conv FCs take.

    ``onnx=True`` (under ``torch.onnx.export``) pools with ``adaptive_avg_pool2d``, which the
    TorchScript exporter writes as ``GlobalAveragePool``: ONNX Runtime keeps that in its
    blocked NCHWc layout, a ``ReduceMean`` it does not. Eager runs ``mean`` (the same value
    within rounding, and what the tests of exactness were written against).

    Example:
        >>> squeeze_map(torch.ones(2, 4, 3, 5), -1, "avg").shape  # an (N, H, W, C) map
        torch.Size([2, 5, 1, 1])
    """
    if channel_dim == -1:
        x = x.permute(0, 3, 1, 2)  # a view: (N, H, W, C) -> (N, C, H, W), channels-last in memory
    if squeeze == "max":
        return x.amax((2, 3), keepdim=True)
    mean = F.adaptive_avg_pool2d(x, 1) if onnx else x.mean((2, 3), keepdim=True)
    return mean if squeeze == "avg" else 0.5 * (mean + x.amax((2, 3), keepdim=True))


def gate_of(z: Tensor, gate: str, gate_scale: float) -> Tensor:
    """``gate_scale * gate(z)`` on the excitation's logits: the SE gate.

    The scale rides on the (N, C) gate, never on the map: ``x * (2 * 0.5)`` is exactly
    ``x``, so identity init stays exact.

    Example:
        >>> gate_of(torch.zeros(1, 3, 1, 1), "sigmoid", 2.0).flatten().tolist()
        [1.0, 1.0, 1.0]
    """
    g = torch.sigmoid(z) if gate == "sigmoid" else F.hardsigmoid(z)
    if gate_scale == 2.0:
        return g + g  # exactly 2 * g, without wrapping 2.0 in a tensor (an aten::_to_copy a call)
    return g * gate_scale if gate_scale != 1.0 else g


def scale_join(x: Tensor, g: Tensor, skip: Tensor | None, relu: bool, out: Tensor | None = None,
               onnx: bool = False) -> Tensor:
    """``relu?(skip + x * g)``, or ``x * g`` without a skip: the one pass over the map.

    ``g`` is the gate of :func:`gate_of`, shaped to broadcast against ``x``. ``out`` (a
    tensor nothing else reads, ``x`` itself included) receives the result. Eager runs one
    ``addcmul``; ``onnx=True`` writes ``skip + x * g``, which exports as one Mul and one Add
    (``addcmul`` exports with a third Mul by its ``value`` over the whole map) and computes
    the same floats.

    Example:
        >>> x, skip = torch.ones(1, 2, 2, 2), torch.full((1, 2, 2, 2), -3.0)
        >>> scale_join(x, torch.full((1, 2, 1, 1), 2.0), skip, relu=True).flatten().tolist()
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    if isinstance(g, Tensor) and g.dtype != x.dtype:  # an fp32 MLP under a low-precision map (autocast)
        g = g.to(x.dtype)  # (no Cast node in an export otherwise; an fx Proxy promotes as it runs)
    if out is None:
        y = x * g if skip is None else skip + x * g if onnx else torch.addcmul(skip, x, g)
    elif skip is None:
        y = torch.mul(x, g, out=out)
    else:
        y = torch.addcmul(skip, x, g, out=out)
    return y.relu_() if relu else y


def composite_forward(x: Tensor, skip: Tensor | None, w1: Tensor, b1: Tensor | None, w2: Tensor,
                      b2: Tensor | None, channel_dim: int, squeeze: str, gate: str, gate_scale: float,
                      act: str, out: Tensor | None = None) -> Tensor:
    """The op's CPU implementation: :func:`squeeze_map`, :func:`gate_of`, :func:`scale_join`.

    ``out`` (for example ``x`` itself, when nothing else reads it) receives the result; by
    default a new tensor with ``x``'s shape, dtype and memory format is returned.

    Example:
        >>> x = torch.randn(2, 8, 4, 4)
        >>> w1, w2 = torch.randn(2, 8), torch.zeros(8, 2)
        >>> y = composite_forward(x, None, w1, None, w2, None, 1, "avg", "sigmoid", 2.0, "none")
        >>> torch.equal(y, x)  # zero fc2 and gate_scale 2: the gate is exactly 1
        True
    """
    s = squeeze_map(x, channel_dim, squeeze).to(w1.dtype)
    g = gate_of(F.conv2d(F.conv2d(s, _conv(w1), b1).relu_(), _conv(w2), b2), gate, gate_scale)
    if channel_dim == -1:
        g = g.permute(0, 2, 3, 1)
    if out is None:
        # The layout of x (channels_last stays channels_last), exactly as the fake kernel says,
        # and the dtype ``skip + x * g`` promotes to (a float32 skip, a bfloat16 branch).
        out = torch.empty_like(x, dtype=_out_dtype(x, skip))
    return scale_join(x, g, skip, act == "relu", out)


def composite_backward(grad: Tensor, x: Tensor, out: Tensor | None, w1: Tensor, b1: Tensor | None,
                       w2: Tensor, b2: Tensor | None, channel_dim: int, squeeze: str, gate: str,
                       gate_scale: float, act: str, has_skip: bool):
    """Gradients of :func:`composite_forward`: (dx, dskip, dw1, db1, dw2, db2).

    The small (N, C) squeeze and MLP are recomputed from ``x`` rather than saved. ``dskip``
    is an empty tensor where it equals ``grad`` (no activation) or no skip was given; ``db*``
    are empty where the FC has no bias.

    Example:
        >>> x, w1, w2 = torch.randn(1, 4, 2, 2), torch.randn(2, 4), torch.randn(4, 2)
        >>> g = composite_backward(torch.ones_like(x), x, None, w1, None, w2, None, 1, "avg", "sigmoid", 1.0,
        ...                        "none", False)
        >>> [t.shape for t in g[:1] + g[2:5:2]]
        [torch.Size([1, 4, 2, 2]), torch.Size([2, 4]), torch.Size([4, 2])]
    """
    dims = _dims(channel_dim)
    dskip = x.new_empty(0)
    if act == "relu":
        # threshold_backward is ReLU's own backward: one pass, zero where out <= 0. Where it
        # is also the skip's gradient it goes in a tensor laid out as the fake kernel says.
        if has_skip:
            dskip = torch.empty_like(x, dtype=grad.dtype)
            dy = torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=dskip)
        else:
            dy = torch.ops.aten.threshold_backward(grad, out, 0)
    else:
        dy = grad
    dy = dy if dy.dtype == x.dtype else dy.to(x.dtype)  # a wider skip promoted the output
    mean = x.mean(dims) if squeeze != "max" else None
    amax = x.amax(dims) if squeeze != "avg" else None
    s = cast(Tensor, mean if amax is None else amax if mean is None else 0.5 * (mean + amax))
    z1, h, z2 = _excite(s, w1, b1, w2, b2)
    g = _gate(z2, gate)
    # d out / d g for each (n, c): sum over H, W of dy * x, accumulated in the MLP's dtype.
    dg = (dy * x).sum(dims, dtype=z2.dtype) * gate_scale
    if gate == "sigmoid":
        dz2 = dg * g * (1 - g)
    else:
        dz2 = torch.where((z2 > -3) & (z2 < 3), dg / 6, torch.zeros((), dtype=dg.dtype))
    dw2 = dz2.t() @ h
    dz1 = torch.where(z1 > 0, dz2 @ _mat(w2), torch.zeros((), dtype=dz2.dtype))
    dw1 = dz1.t() @ s.to(w1.dtype)
    ds = (dz1 @ _mat(w1)).to(x.dtype)
    gs = _bcast((gate_scale * g).to(x.dtype), channel_dim)
    half = 0.5 if squeeze == "avgmax" else 1.0
    dx = torch.empty_like(x)
    if squeeze == "max":
        torch.mul(dy, gs, out=dx)
    else:
        # dy * gate + the mean's gradient, broadcast over H, W in the same pass.
        hw = x.shape[dims[0]] * x.shape[dims[1]]
        torch.addcmul(_bcast(ds * (half / hw), channel_dim), dy, gs, out=dx)
    if squeeze != "avg":
        # amax's gradient is shared evenly by tied maxima, as torch.amax's backward does.
        hit = x == _bcast(cast(Tensor, amax), channel_dim)
        cnt = hit.sum(dims, dtype=ds.dtype)
        dx.add_(hit * _bcast(ds * half / cnt, channel_dim))
    db1 = dz1.sum(0).to(b1.dtype) if b1 is not None else x.new_empty(0)
    db2 = dz2.sum(0).to(b2.dtype) if b2 is not None else x.new_empty(0)
    return (dx, dskip, dw1.reshape(w1.shape).to(w1.dtype), db1,
            dw2.reshape(w2.shape).to(w2.dtype), db2)


# ----------------------------------------------------------------------------- the ops

def _use_triton(x: Tensor) -> bool:
    return x.device.type == "cuda"


@torch.library.custom_op("se_surgery::se_join", mutates_args=())
def _se_join(x: Tensor, skip: Tensor | None, w1: Tensor, b1: Tensor | None, w2: Tensor,
             b2: Tensor | None, channel_dim: int, squeeze: str, gate: str, gate_scale: float,
             act: str) -> Tensor:
    if _use_triton(x):
        from . import triton_kernels

        return triton_kernels.se_forward(x, skip, w1, b1, w2, b2, channel_dim, squeeze, gate, gate_scale, act)
    return composite_forward(x, skip, w1, b1, w2, b2, channel_dim, squeeze, gate, gate_scale, act)


@_se_join.register_fake
def _se_join_fake(x, skip, w1, b1, w2, b2, channel_dim, squeeze, gate, gate_scale, act):
    return torch.empty_like(x, dtype=_out_dtype(x, skip))


@torch.library.custom_op("se_surgery::se_join_backward", mutates_args=())
def _se_join_backward(grad: Tensor, x: Tensor, out: Tensor | None, w1: Tensor, b1: Tensor | None,
                      w2: Tensor, b2: Tensor | None, channel_dim: int, squeeze: str, gate: str,
                      gate_scale: float, act: str, has_skip: bool) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                              Tensor, Tensor]:
    if _use_triton(x):
        from . import triton_kernels

        res = triton_kernels.se_backward(grad, x, out, w1, b1, w2, b2, channel_dim, squeeze, gate, gate_scale,
                                         act, has_skip)
    else:
        res = composite_backward(grad, x, out, w1, b1, w2, b2, channel_dim, squeeze, gate, gate_scale, act,
                                 has_skip)
    return res


@_se_join_backward.register_fake
def _se_join_backward_fake(grad, x, out, w1, b1, w2, b2, channel_dim, squeeze, gate, gate_scale, act, has_skip):
    # Weight gradients come out contiguous whatever the weights' memory format.
    return (torch.empty_like(x), torch.empty_like(x, dtype=grad.dtype) if has_skip and act == "relu"
            else x.new_empty(0), w1.new_empty(w1.shape), b1.new_empty(b1.shape) if b1 is not None else x.new_empty(0),
            w2.new_empty(w2.shape), b2.new_empty(b2.shape) if b2 is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, skip, w1, b1, w2, b2, channel_dim, squeeze, gate, gate_scale, act = inputs
    # The output is kept only to mask the ReLU's gradient.
    ctx.save_for_backward(x, w1, b1, w2, b2, output if act == "relu" else None)
    ctx.args = (channel_dim, squeeze, gate, gate_scale, act, skip is not None)


def _backward(ctx, grad):
    x, w1, b1, w2, b2, out = ctx.saved_tensors
    channel_dim, squeeze, gate, gate_scale, act, has_skip = ctx.args
    dx, dskip, dw1, db1, dw2, db2 = _se_join_backward(grad, x, out, w1, b1, w2, b2, channel_dim, squeeze, gate,
                                                      gate_scale, act, has_skip)
    if has_skip:
        dskip = dskip if act == "relu" else grad
    else:
        dskip = None
    return (dx, dskip, dw1, db1 if b1 is not None else None, dw2, db2 if b2 is not None else None,
            None, None, None, None, None)


_se_join.register_autograd(_backward, setup_context=_setup_context)


def _fc_macs(x_shape, w1_shape) -> int:
    """MACs of the two FCs, as ``FlopCounterMode`` counts the composite's two ``linear``s."""
    c = 1
    for d in w1_shape[1:]:
        c *= d
    return x_shape[0] * c * w1_shape[0] * 2


@register_flop_formula(torch.ops.se_surgery.se_join)
def _se_join_flops(x_shape, skip_shape, w1_shape, *args, **kwargs) -> int:
    return 2 * _fc_macs(x_shape, w1_shape)


@register_flop_formula(torch.ops.se_surgery.se_join_backward)
def _se_join_backward_flops(grad_shape, x_shape, out_shape_, w1_shape, *args, **kwargs) -> int:
    return 2 * 2 * _fc_macs(x_shape, w1_shape)  # a weight and an input gradient per FC


def se_join(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, *,
            skip: Tensor | None = None, channel_dim: int = 1, squeeze: str = "avg", gate: str = "sigmoid",
            gate_scale: float = 1.0, act: str | None = None) -> Tensor:
    """One whole SE join as one op: ``act(skip + x * gate_scale * gate(fc2(relu(fc1(squeeze(x))))))``.

    Args:
        x: the map to scale, (N, C, H, W) with ``channel_dim=1`` (any memory format) or
            (N, H, W, C) with ``channel_dim=-1``; float32, float16 or bfloat16.
        w1, b1: first FC, weight (hidden, C) or (hidden, C, 1, 1), bias (hidden,) or None.
        w2, b2: second FC, weight (C, hidden) or (C, hidden, 1, 1), bias (C,) or None.
        skip: residual added after the scale (same shape as ``x``), or None.
        channel_dim: 1 or -1.
        squeeze: ``"avg"``, ``"max"`` or ``"avgmax"``.
        gate: ``"sigmoid"`` or ``"hard_sigmoid"``.
        gate_scale: constant factor on the gate (2.0 for identity init).
        act: None or ``"relu"``, applied after the add.

    Returns:
        A new tensor shaped and laid out like ``x``.

    Example:
        >>> x, skip = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
        >>> w1, w2 = torch.randn(2, 8), torch.zeros(8, 2)
        >>> y = se_join(x, w1, None, w2, None, skip=skip, gate_scale=2.0, act="relu")
        >>> torch.equal(y, torch.relu(skip + x))
        True
    """
    from .._checks import CHANNEL_DIMS, check_choices

    check_choices(channel_dim=(channel_dim, CHANNEL_DIMS), squeeze=(squeeze, SQUEEZES), gate=(gate, GATES),
                  act=(act, ACTS))
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D map, got shape {tuple(x.shape)}")
    if skip is not None and skip.shape != x.shape:
        raise ValueError(f"skip must have the shape of x {tuple(x.shape)}, got {tuple(skip.shape)}")
    c = x.shape[channel_dim]
    if _mat(w1).shape[1] != c or _mat(w2).shape[0] != c:
        raise ValueError(f"FC weights {tuple(w1.shape)} and {tuple(w2.shape)} do not fit {c} channels "
                         f"(x {tuple(x.shape)}, channel_dim {channel_dim})")
    return _se_join(x, skip, w1, b1, w2, b2, channel_dim, squeeze, gate, float(gate_scale), act or "none")


def se_join_into(out: Tensor | None, x: Tensor, skip: Tensor | None, w1: Tensor, b1: Tensor | None, w2: Tensor,
                 b2: Tensor | None, channel_dim: int, squeeze: str, gate: str, gate_scale: float,
                 act: str) -> Tensor:
    """The op's kernels without the op (no autograd, no dispatcher): eager inference only.

    Writes into ``out`` (which may be ``x`` itself), or a new tensor when ``out`` is None.

    Example:
        >>> x, skip = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
        >>> w1, w2 = torch.randn(2, 4), torch.zeros(4, 2)
        >>> want = skip + x
        >>> y = se_join_into(x, x, skip, w1, None, w2, None, 1, "avg", "sigmoid", 2.0, "none")
        >>> y is x and torch.equal(x, want)
        True
    """
    if _use_triton(x):
        from . import triton_kernels

        return triton_kernels.se_forward(x, skip, w1, b1, w2, b2, channel_dim, squeeze, gate, gate_scale, act,
                                         out=out)
    return composite_forward(x, skip, w1, b1, w2, b2, channel_dim, squeeze, gate, gate_scale, act, out=out)
