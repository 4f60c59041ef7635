"""Triton kernels behind ``se_surgery::se_join`` on CUDA (forward three launches, backward three).

Every 4-D map is addressed as a logical (N, C, HW) view with its own strides, so one
kernel serves NCHW, ``channels_last`` NCHW and (N, H, W, C) maps: the stride that is 1
(HW for NCHW, C for the other two) is specialised by Triton and the tile loads along it
are vectorised. Statistics, the MLP and the gate are computed in float32 whatever the
map's dtype; the map itself is read and written in its own dtype.

Forward:  ``_squeeze`` (one read of x: mean and/or max per (n, c)),
          ``_excite`` (one program per sample: fc1, ReLU, fc2, gate, times gate_scale),
          ``_scale`` (one read of x and skip, one write: x * g [+ skip] [relu]).
Backward: ``_reduce_bwd`` (one read of grad, x [and out]: sum(dy * x) and the squeeze again),
          ``_excite_bwd`` (the MLP's backward per sample), two small GEMMs for the FC
          weight gradients, and ``_dx`` (one read, one write [two with a skip and relu]).

Importing this module imports triton; :mod:`se_surgery.ops.fused` does that only when a
CUDA tensor reaches the op. With ``TRITON_INTERPRET=1`` set before triton is first
imported, :func:`se_forward` and :func:`se_backward` also run on CPU tensors (slowly):
that is how the tests check the kernels on machines without a GPU.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["se_backward", "se_forward"]

_SQUEEZE_CODE = {"avg": 0, "max": 1, "avgmax": 2}


@triton.jit
def _squeeze(x_ptr, mean_ptr, max_ptr, C, HW, sxn, sxc, sxhw, inv_hw,
             DO_MEAN: tl.constexpr, DO_MAX: tl.constexpr, BC: tl.constexpr, BHW: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = c < C
    base = x_ptr + n * sxn + c[:, None].to(tl.int64) * sxc
    acc = tl.zeros([BC, BHW], dtype=tl.float32)
    mx = tl.full([BC, BHW], float("-inf"), dtype=tl.float32)
    for start in range(0, HW, BHW):
        hw = start + tl.arange(0, BHW)
        m = cm[:, None] & (hw[None, :] < HW)
        v = tl.load(base + hw[None, :].to(tl.int64) * sxhw, mask=m, other=0.0).to(tl.float32)
        if DO_MEAN:
            acc += v
        if DO_MAX:
            mx = tl.maximum(mx, tl.where(m, v, float("-inf")))
    if DO_MEAN:
        tl.store(mean_ptr + n * C + c, tl.sum(acc, 1) * inv_hw, mask=cm)
    if DO_MAX:
        tl.store(max_ptr + n * C + c, tl.max(mx, 1), mask=cm)


@triton.jit
def _load_squeeze(mean_ptr, max_ptr, offs, m, SQUEEZE: tl.constexpr):
    if SQUEEZE == 0:
        s = tl.load(mean_ptr + offs, mask=m, other=0.0)
    elif SQUEEZE == 1:
        s = tl.load(max_ptr + offs, mask=m, other=0.0)
    else:
        s = 0.5 * (tl.load(mean_ptr + offs, mask=m, other=0.0) + tl.load(max_ptr + offs, mask=m, other=0.0))
    return s


@triton.jit
def _hidden(mean_ptr, max_ptr, w1_ptr, b1_ptr, n, C, HID,
            SQUEEZE: tl.constexpr, HAS_B1: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr):
    """fc1 of sample n before its ReLU, (BH,) float32."""
    hh = tl.arange(0, BH)
    hm = hh < HID
    z1 = tl.zeros([BH], dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        s = _load_squeeze(mean_ptr, max_ptr, n * C + c, cm, SQUEEZE)
        w = tl.load(w1_ptr + hh[:, None] * C + c[None, :], mask=hm[:, None] & cm[None, :], other=0.0)
        z1 += tl.sum(w.to(tl.float32) * s[None, :], 1)
    if HAS_B1:
        z1 += tl.load(b1_ptr + hh, mask=hm, other=0.0).to(tl.float32)
    return z1


@triton.jit
def _logits(w2_ptr, b2_ptr, h, c, cm, hh, hm, HID, HAS_B2: tl.constexpr):
    w = tl.load(w2_ptr + c[:, None] * HID + hh[None, :], mask=cm[:, None] & hm[None, :], other=0.0)
    z2 = tl.sum(w.to(tl.float32) * h[None, :], 1)
    if HAS_B2:
        z2 += tl.load(b2_ptr + c, mask=cm, other=0.0).to(tl.float32)
    return z2


@triton.jit
def _gate_of(z, HARD: tl.constexpr):
    if HARD:
        # torch's hardsigmoid, relu6(z + 3) / 6, as a product: fp32 division on the GPU is
        # approximate, and 3 * fl(1/6) rounds to exactly 0.5 (identity init needs g(0) = 0.5).
        g = tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) * (1.0 / 6.0)
    else:
        # tl.sigmoid uses the GPU's approximate exp and division; pin g(0) = 0.5 exactly so
        # identity init (zero logits, gate_scale 2) gives a gate of exactly 1.
        g = tl.where(z == 0.0, 0.5, tl.sigmoid(z))
    return g


@triton.jit
def _excite(mean_ptr, max_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gate_ptr, C, HID, gate_scale,
            SQUEEZE: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HARD: tl.constexpr,
            BC: tl.constexpr, BH: tl.constexpr):
    n = tl.program_id(0)
    hh = tl.arange(0, BH)
    hm = hh < HID
    h = tl.maximum(_hidden(mean_ptr, max_ptr, w1_ptr, b1_ptr, n, C, HID, SQUEEZE, HAS_B1, BC, BH), 0.0)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        g = _gate_of(_logits(w2_ptr, b2_ptr, h, c, cm, hh, hm, HID, HAS_B2), HARD)
        tl.store(gate_ptr + n * C + c, g * gate_scale, mask=cm)


@triton.jit
def _tile(C, HW, BC: tl.constexpr, BHW: tl.constexpr):
    """This program's tile of a logical (N, C, HW) map: sample, channels and their mask, the
    tile's mask, and the channel and position offsets widened for 64-bit addressing."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    hw = tl.program_id(2) * BHW + tl.arange(0, BHW)
    cm = c < C
    m = cm[:, None] & (hw[None, :] < HW)
    return n, c, cm, m, c[:, None].to(tl.int64), hw[None, :].to(tl.int64)


@triton.jit
def _scale(x_ptr, skip_ptr, out_ptr, gate_ptr, C, HW, sxn, sxc, sxhw, ssn, ssc, sshw, son, soc, sohw,
           HAS_SKIP: tl.constexpr, RELU: tl.constexpr, BC: tl.constexpr, BHW: tl.constexpr):
    n, c, cm, m, c64, hw64 = _tile(C, HW, BC, BHW)
    g = tl.load(gate_ptr + n * C + c, mask=cm, other=0.0)
    y = tl.load(x_ptr + n * sxn + c64 * sxc + hw64 * sxhw, mask=m, other=0.0).to(tl.float32) * g[:, None]
    if HAS_SKIP:
        y += tl.load(skip_ptr + n * ssn + c64 * ssc + hw64 * sshw, mask=m, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(out_ptr + n * son + c64 * soc + hw64 * sohw, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _reduce_bwd(grad_ptr, x_ptr, out_ptr, dg_ptr, mean_ptr, max_ptr, cnt_ptr, C, HW,
                sgn, sgc, sghw, sxn, sxc, sxhw, son, soc, sohw, inv_hw,
                RELU: tl.constexpr, DO_MEAN: tl.constexpr, DO_MAX: tl.constexpr, BC: tl.constexpr,
                BHW: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = c < C
    c64 = c[:, None].to(tl.int64)
    dg = tl.zeros([BC, BHW], dtype=tl.float32)
    acc = tl.zeros([BC, BHW], dtype=tl.float32)
    mx = tl.full([BC, BHW], float("-inf"), dtype=tl.float32)
    cnt = tl.zeros([BC, BHW], dtype=tl.float32)
    for start in range(0, HW, BHW):
        hw = start + tl.arange(0, BHW)
        m = cm[:, None] & (hw[None, :] < HW)
        hw64 = hw[None, :].to(tl.int64)
        v = tl.load(x_ptr + n * sxn + c64 * sxc + hw64 * sxhw, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(grad_ptr + n * sgn + c64 * sgc + hw64 * sghw, mask=m, other=0.0).to(tl.float32)
        if RELU:
            o = tl.load(out_ptr + n * son + c64 * soc + hw64 * sohw, mask=m, other=0.0)
            dy = tl.where(o > 0, dy, 0.0)
        dg += dy * v
        if DO_MEAN:
            acc += v
        if DO_MAX:
            # running max and how many lanes hold it (amax's gradient is shared by ties)
            vm = tl.where(m, v, float("-inf"))
            cnt = tl.where(vm > mx, 1.0, tl.where((vm == mx) & m, cnt + 1.0, cnt))
            mx = tl.maximum(mx, vm)
    tl.store(dg_ptr + n * C + c, tl.sum(dg, 1), mask=cm)
    if DO_MEAN:
        tl.store(mean_ptr + n * C + c, tl.sum(acc, 1) * inv_hw, mask=cm)
    if DO_MAX:
        top = tl.max(mx, 1)
        tl.store(max_ptr + n * C + c, top, mask=cm)
        tl.store(cnt_ptr + n * C + c, tl.sum(tl.where(mx == top[:, None], cnt, 0.0), 1), mask=cm)


@triton.jit
def _excite_bwd(mean_ptr, max_ptr, dg_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gs_ptr, dz2_ptr, h_ptr, dz1_ptr,
                ds_ptr, C, HID, gate_scale,
                SQUEEZE: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HARD: tl.constexpr,
                BC: tl.constexpr, BH: tl.constexpr):
    n = tl.program_id(0)
    hh = tl.arange(0, BH)
    hm = hh < HID
    z1 = _hidden(mean_ptr, max_ptr, w1_ptr, b1_ptr, n, C, HID, SQUEEZE, HAS_B1, BC, BH)
    h = tl.maximum(z1, 0.0)
    dh = tl.zeros([BH], dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        z2 = _logits(w2_ptr, b2_ptr, h, c, cm, hh, hm, HID, HAS_B2)
        g = _gate_of(z2, HARD)
        dgs = tl.load(dg_ptr + n * C + c, mask=cm, other=0.0) * gate_scale
        if HARD:
            dz2 = tl.where((z2 > -3.0) & (z2 < 3.0), dgs / 6.0, 0.0)
        else:
            dz2 = dgs * g * (1.0 - g)
        tl.store(gs_ptr + n * C + c, g * gate_scale, mask=cm)
        tl.store(dz2_ptr + n * C + c, dz2, mask=cm)
        w = tl.load(w2_ptr + c[:, None] * HID + hh[None, :], mask=cm[:, None] & hm[None, :], other=0.0)
        dh += tl.sum(w.to(tl.float32) * dz2[:, None], 0)
    dz1 = tl.where(z1 > 0, dh, 0.0)
    tl.store(h_ptr + n * HID + hh, h, mask=hm)
    tl.store(dz1_ptr + n * HID + hh, dz1, mask=hm)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        w = tl.load(w1_ptr + hh[:, None] * C + c[None, :], mask=hm[:, None] & cm[None, :], other=0.0)
        tl.store(ds_ptr + n * C + c, tl.sum(w.to(tl.float32) * dz1[:, None], 0), mask=cm)


@triton.jit
def _dx(grad_ptr, x_ptr, out_ptr, dx_ptr, dskip_ptr, gs_ptr, ds_ptr, max_ptr, cnt_ptr, C, HW,
        sgn, sgc, sghw, sxn, sxc, sxhw, son, soc, sohw, sdn, sdc, sdhw, avg_coef, max_coef,
        RELU: tl.constexpr, STORE_DSKIP: tl.constexpr, DO_MEAN: tl.constexpr, DO_MAX: tl.constexpr,
        BC: tl.constexpr, BHW: tl.constexpr):
    n, c, cm, m, c64, hw64 = _tile(C, HW, BC, BHW)
    dy = tl.load(grad_ptr + n * sgn + c64 * sgc + hw64 * sghw, mask=m, other=0.0).to(tl.float32)
    if RELU:
        o = tl.load(out_ptr + n * son + c64 * soc + hw64 * sohw, mask=m, other=0.0)
        dy = tl.where(o > 0, dy, 0.0)
    gs = tl.load(gs_ptr + n * C + c, mask=cm, other=0.0)
    ds = tl.load(ds_ptr + n * C + c, mask=cm, other=0.0)
    dx = dy * gs[:, None]
    if DO_MEAN:
        dx += (ds * avg_coef)[:, None]
    if DO_MAX:
        top = tl.load(max_ptr + n * C + c, mask=cm, other=0.0)
        k = tl.load(cnt_ptr + n * C + c, mask=cm, other=1.0)
        v = tl.load(x_ptr + n * sxn + c64 * sxc + hw64 * sxhw, mask=m, other=0.0).to(tl.float32)
        dx += tl.where(v == top[:, None], (ds * max_coef / k)[:, None], 0.0)
    # dx and dskip have the layout of x (empty_like)
    tl.store(dx_ptr + n * sdn + c64 * sdc + hw64 * sdhw, dx.to(dx_ptr.dtype.element_ty), mask=m)
    if STORE_DSKIP:
        tl.store(dskip_ptr + n * sdn + c64 * sdc + hw64 * sdhw, dy.to(dskip_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------- launchers

def _nchw(t: Tensor, channel_dim: int) -> tuple[int, int, int, int]:
    if channel_dim == 1:
        return t.shape[0], t.shape[1], t.shape[2], t.shape[3]
    return t.shape[0], t.shape[3], t.shape[1], t.shape[2]


def _strides(t: Tensor, channel_dim: int) -> tuple[Tensor, tuple[int, int, int]]:
    """``t`` (contiguous if its H, W strides do not fold into one) and its (n, c, hw) strides."""
    if channel_dim == 1:
        sn, sc, sh, sw = t.stride()
        _, _, h, w = t.shape
    else:
        sn, sh, sw, sc = t.stride()
        _, h, w, _ = t.shape
    if h > 1 and w > 1 and sh != w * sw:
        return _strides(t.contiguous(), channel_dim)
    return t, (sn, sc, sw if w > 1 else sh)


def _tiles(sc: int) -> tuple[int, int]:
    # Wide along whichever axis is contiguous in memory, so loads coalesce and vectorise.
    return (64, 16) if sc == 1 else (8, 128)


def _mats(w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    return w1.reshape(w1.shape[0], -1).contiguous(), w2.reshape(w2.shape[0], -1).contiguous()


def se_forward(x: Tensor, skip: Tensor | None, w1: Tensor, b1: Tensor | None, w2: Tensor,
               b2: Tensor | None, channel_dim: int, squeeze: str, gate: str, gate_scale: float, act: str,
               out: Tensor | None = None) -> Tensor:
    """Forward of ``se_surgery::se_join`` with the Triton kernels (arguments as the op's).

    ``out`` may be ``x`` itself (each element is read before it is written by the same
    program). Runs on CUDA tensors, or on CPU tensors with ``TRITON_INTERPRET=1``.

    Example (needs a GPU, or CPU tensors with ``TRITON_INTERPRET=1`` set before import):
        >>> from se_surgery.ops import composite_forward
        >>> if torch.cuda.is_available():
        ...     x, w1, w2 = (torch.randn(*s, device="cuda") for s in ((2, 8, 4, 4), (2, 8), (8, 2)))
        ...     args = (None, w1, None, w2, None, 1, "avg", "sigmoid", 1.0, "none")
        ...     assert torch.allclose(se_forward(x, *args), composite_forward(x, *args), atol=1e-5)
    """
    n, c, h, w = _nchw(x, channel_dim)
    hw = h * w
    if out is None:  # before x may be made contiguous: the layout the fake kernel promises
        dtype = x.dtype if skip is None else torch.promote_types(x.dtype, skip.dtype)
        out = torch.empty_like(x, dtype=dtype)
    x, (sxn, sxc, sxhw) = _strides(x, channel_dim)
    w1m, w2m = _mats(w1, w2)
    hid = w1m.shape[0]
    f32: dict[str, Any] = {"device": x.device, "dtype": torch.float32}
    do_mean, do_max = squeeze != "max", squeeze != "avg"
    mean = torch.empty((n, c), **f32) if do_mean else torch.empty(0, **f32)
    amax = torch.empty((n, c), **f32) if do_max else torch.empty(0, **f32)
    bc, bhw = _tiles(sxc)
    _squeeze[(n, triton.cdiv(c, bc))](x, mean, amax, c, hw, sxn, sxc, sxhw, 1.0 / hw,
                                       DO_MEAN=do_mean, DO_MAX=do_max, BC=bc, BHW=bhw)
    gates = torch.empty((n, c), **f32)
    bh = triton.next_power_of_2(hid)
    _excite[(n,)](mean, amax, w1m, b1 if b1 is not None else w1m, w2m, b2 if b2 is not None else w2m, gates, c,
                  hid, float(gate_scale), SQUEEZE=_SQUEEZE_CODE[squeeze], HAS_B1=b1 is not None,
                  HAS_B2=b2 is not None, HARD=gate == "hard_sigmoid", BC=max(16, min(128, 4096 // bh)), BH=bh)
    out_t, (son, soc, sohw) = _strides(out, channel_dim)
    has_skip = skip is not None
    if has_skip:
        skip, (ssn, ssc, sshw) = _strides(cast(Tensor, skip), channel_dim)
    else:
        skip, (ssn, ssc, sshw) = x, (0, 0, 0)
    _scale[(n, triton.cdiv(c, bc), triton.cdiv(hw, bhw))](
        x, skip, out_t, gates, c, hw, sxn, sxc, sxhw, ssn, ssc, sshw, son, soc, sohw,
        HAS_SKIP=has_skip, RELU=act == "relu", BC=bc, BHW=bhw)
    if out_t is not out:  # out's H, W strides did not fold: written to a contiguous copy
        out.copy_(out_t)
    return out


def se_backward(grad: Tensor, x: Tensor, out: Tensor | None, w1: Tensor, b1: Tensor | None, w2: Tensor,
                b2: Tensor | None, channel_dim: int, squeeze: str, gate: str, gate_scale: float, act: str,
                has_skip: bool):
    """Backward of ``se_surgery::se_join`` with the Triton kernels: (dx, dskip, dw1, db1, dw2, db2).

    Same contract as :func:`se_surgery.ops.fused.composite_backward` (empty tensors for
    gradients that are absent or equal to ``grad``).

    Example (needs a GPU, or CPU tensors with ``TRITON_INTERPRET=1`` set before import):
        >>> from se_surgery.ops import composite_backward
        >>> if torch.cuda.is_available():
        ...     x, w1, w2 = (torch.randn(*s, device="cuda") for s in ((2, 8, 4, 4), (2, 8), (8, 2)))
        ...     args = (x, None, w1, None, w2, None, 1, "max", "sigmoid", 1.0, "none", False)
        ...     got, want = se_backward(torch.ones_like(x), *args), composite_backward(torch.ones_like(x), *args)
        ...     assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))
    """
    n, c, h, w = _nchw(x, channel_dim)
    hw = h * w
    dx_final = torch.empty_like(x)
    store_dskip = has_skip and act == "relu"
    dskip = torch.empty_like(x, dtype=grad.dtype) if store_dskip else x.new_empty(0)
    x, (sxn, sxc, sxhw) = _strides(x, channel_dim)
    grad, (sgn, sgc, sghw) = _strides(grad, channel_dim)
    relu = act == "relu"
    if relu:
        out, (son, soc, sohw) = _strides(cast(Tensor, out), channel_dim)
    else:
        out, (son, soc, sohw) = x, (0, 0, 0)
    w1m, w2m = _mats(w1, w2)
    hid = w1m.shape[0]
    f32: dict[str, Any] = {"device": x.device, "dtype": torch.float32}
    do_mean, do_max = squeeze != "max", squeeze != "avg"
    dg = torch.empty((n, c), **f32)
    mean = torch.empty((n, c), **f32) if do_mean else torch.empty(0, **f32)
    amax, cnt = (torch.empty((n, c), **f32), torch.empty((n, c), **f32)) if do_max else (dg, dg)
    bc, bhw = _tiles(sxc)
    _reduce_bwd[(n, triton.cdiv(c, bc))](grad, x, out, dg, mean, amax, cnt, c, hw, sgn, sgc, sghw,
                                         sxn, sxc, sxhw, son, soc, sohw, 1.0 / hw, RELU=relu,
                                         DO_MEAN=do_mean, DO_MAX=do_max, BC=bc, BHW=bhw)
    gs, dz2, ds = (torch.empty((n, c), **f32) for _ in range(3))
    hbuf, dz1 = torch.empty((n, hid), **f32), torch.empty((n, hid), **f32)
    bh = triton.next_power_of_2(hid)
    _excite_bwd[(n,)](mean, amax, dg, w1m, b1 if b1 is not None else w1m, w2m, b2 if b2 is not None else w2m,
                      gs, dz2, hbuf, dz1, ds, c, hid, float(gate_scale), SQUEEZE=_SQUEEZE_CODE[squeeze],
                      HAS_B1=b1 is not None, HAS_B2=b2 is not None, HARD=gate == "hard_sigmoid",
                      BC=max(16, min(128, 4096 // bh)), BH=bh)
    dx, (sdn, sdc, sdhw) = _strides(dx_final, channel_dim)
    dskip_t = _strides(dskip, channel_dim)[0] if store_dskip else dx
    if store_dskip and dskip_t.stride() != dx.stride():
        dskip_t = torch.empty_like(dx, dtype=grad.dtype)  # one layout for both: they share the strides
    half = squeeze == "avgmax"
    _dx[(n, triton.cdiv(c, bc), triton.cdiv(hw, bhw))](
        grad, x, out, dx, dskip_t, gs, ds, amax, cnt, c, hw, sgn, sgc, sghw,
        sxn, sxc, sxhw, son, soc, sohw, sdn, sdc, sdhw, (0.5 if half else 1.0) / hw, 0.5 if half else 1.0,
        RELU=relu, STORE_DSKIP=store_dskip, DO_MEAN=do_mean, DO_MAX=do_max, BC=bc, BHW=bhw)
    if dx is not dx_final:  # H, W strides that do not fold: written contiguous, copied back
        dx_final.copy_(dx)
    if store_dskip and dskip_t is not dskip:
        dskip.copy_(dskip_t)
    dx = dx_final
    # The FC weight gradients are (N, C) x (N, hidden) products: two small GEMMs.
    s = mean if squeeze == "avg" else amax if squeeze == "max" else 0.5 * (mean + amax)
    empty = x.new_empty(0)
    dw1 = (dz1.t() @ s).reshape(w1.shape).to(w1.dtype)
    dw2 = (dz2.t() @ hbuf).reshape(w2.shape).to(w2.dtype)
    db1 = dz1.sum(0).to(b1.dtype) if b1 is not None else empty
    db2 = dz2.sum(0).to(b2.dtype) if b2 is not None else empty.clone()
    return dx, dskip, dw1, db1, dw2, db2
