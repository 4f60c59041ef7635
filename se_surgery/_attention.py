"""Channel-attention modules besides SE: effective SE, ECA, global context and CBAM.

Each follows its timm counterpart (``timm/layers``: ``EffectiveSEModule``, ``EcaModule``,
``GlobalContext``, ``CbamModule``) in structure and parameter count, with two additions
shared with :class:`~se_surgery._se.SqueezeExcite`:

- ``init="identity"`` (the default) makes the module compute exactly its input when it is
  inserted: gates are ``2 * sigmoid(z)`` (or ``2 * hard_sigmoid(z)``) with the layer that
  makes ``z`` zeroed, which is exactly 1.0; additive fusions zero their last layer.
  ``init="paper"`` keeps PyTorch's (timm's) init and the plain gate.
- ``channel_dim=-1`` takes channels-last (N, H, W, C) maps, and ``forward(x, skip)``
  returns ``skip + module(x)`` so a residual join can be closed in the same call.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import CHANNEL_DIMS, check_choices
from ._se import ACTS, GATES, INITS, RATIO_OF, hidden_channels, make_act, reduced_channels

__all__ = ["CBAM", "ECA", "EffectiveSE", "GlobalContext", "eca_kernel_size"]


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """ECA's adaptive kernel size: ``|log2(C) + beta| / gamma`` made odd, at least 3 (timm's rule).

    Example:
        >>> [eca_kernel_size(c) for c in (64, 256, 2048)]
        [3, 5, 7]
    """
    t = int(abs(math.log(channels, 2) + beta) / gamma)  # noqa: FURB163 - timm's expression, same rounding
    return max(t if t % 2 else t + 1, 3)


def _check_common(gate: str, init: str, channel_dim: int) -> None:
    check_choices(gate=(gate, GATES), init=(init, INITS), channel_dim=(channel_dim, CHANNEL_DIMS))


def _gate(z: torch.Tensor, gate: str, scale: float) -> torch.Tensor:
    g = torch.sigmoid(z) if gate == "sigmoid" else F.hardsigmoid(z)
    # scale 2 with z == 0 gives exactly 1.0: identity init.
    return g * scale if scale != 1.0 else g


def _scale(x: torch.Tensor, g: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    return x * g if skip is None else torch.addcmul(skip, x, g)


def _per_channel(v: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(N, C) -> broadcastable against an (N, C, H, W) or (N, H, W, C) map."""
    return v[:, :, None, None] if channel_dim == 1 else v[:, None, None, :]


def _pool(x: torch.Tensor, channel_dim: int, add_max: bool = False) -> torch.Tensor:
    """Global average (or mean of average and max) pool, (N, C)."""
    dims = (2, 3) if channel_dim == 1 else (1, 2)
    s = x.mean(dims)
    return 0.5 * s + 0.5 * x.amax(dims) if add_max else s


def _linear(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    # A 1x1 conv on a 1x1 map is a linear layer on the flattened vector: one GEMM.
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def _zero(tensors: list) -> bool:
    return not any(bool(t.any()) for t in tensors)


class EffectiveSE(nn.Module):
    """Effective SE (Lee and Park, CVPR 2020, CenterMask): one FC ``C -> C``, no bottleneck.

    Matches timm's ``EffectiveSEModule``: ``C * C + C`` parameters, ``hard_sigmoid`` gate.

    Example:
        >>> m = EffectiveSE(64)
        >>> x = torch.randn(2, 64, 8, 8)
        >>> torch.equal(m(x), x), sum(p.numel() for p in m.parameters())
        (True, 4160)
    """

    def __init__(self, channels: int, *, add_maxpool: bool = False, gate: str = "hard_sigmoid",
                 init: str = "identity", channel_dim: int = 1, device=None, dtype=None) -> None:
        super().__init__()
        _check_common(gate, init, channel_dim)
        self.channels, self.add_maxpool, self.gate_fn, self.init = int(channels), add_maxpool, gate, init
        self.channel_dim = channel_dim
        self.gate_scale = 2.0 if init == "identity" else 1.0
        self.fc = nn.Conv2d(self.channels, self.channels, 1, device=device, dtype=dtype)
        if init == "identity":
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(cast(torch.Tensor, self.fc.bias))  # made with bias=True

    def extra_repr(self) -> str:
        return f"channels={self.channels}, gate={self.gate_fn!r}, init={self.init!r}, channel_dim={self.channel_dim}"

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The gate, broadcastable against ``x``: exactly 1 at identity."""
        z = _linear(_pool(x, self.channel_dim, self.add_maxpool), self.fc)
        return _per_channel(_gate(z, self.gate_fn, self.gate_scale), self.channel_dim)

    def identity_tensors(self) -> list[torch.Tensor]:
        return [self.fc.weight, cast(torch.Tensor, self.fc.bias)]

    def is_identity(self) -> bool:
        return self.gate_scale == 2.0 and _zero(self.identity_tensors())

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        return _scale(x, self.excitation(x), skip)


class ECA(nn.Module):
    """Efficient channel attention (Wang et al., CVPR 2020): a 1-D conv across channels.

    Matches timm's ``EcaModule``: one bias-free ``Conv1d(1, 1, k)`` (``k`` parameters),
    ``k`` from :func:`eca_kernel_size` unless ``kernel_size`` is given.

    Example:
        >>> m = ECA(256)
        >>> x = torch.randn(2, 256, 4, 4)
        >>> torch.equal(m(x), x), m.kernel_size
        (True, 5)
    """

    def __init__(self, channels: int, *, kernel_size: int | None = None, gamma: float = 2, beta: float = 1,
                 gate: str = "sigmoid", init: str = "identity", channel_dim: int = 1, device=None, dtype=None) -> None:
        super().__init__()
        _check_common(gate, init, channel_dim)
        k = eca_kernel_size(channels, gamma, beta) if kernel_size is None else int(kernel_size)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {k}")
        self.channels, self.kernel_size, self.gate_fn, self.init = int(channels), k, gate, init
        self.channel_dim = channel_dim
        self.gate_scale = 2.0 if init == "identity" else 1.0
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False, device=device, dtype=dtype)
        if init == "identity":
            nn.init.zeros_(self.conv.weight)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, gate={self.gate_fn!r}, "
                f"init={self.init!r}, channel_dim={self.channel_dim}")

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The gate, broadcastable against ``x``: exactly 1 at identity."""
        s = _pool(x, self.channel_dim)
        z = self.conv(s[:, None, :])[:, 0, :]
        return _per_channel(_gate(z, self.gate_fn, self.gate_scale), self.channel_dim)

    def identity_tensors(self) -> list[torch.Tensor]:
        return [self.conv.weight]

    def is_identity(self) -> bool:
        return self.gate_scale == 2.0 and _zero(self.identity_tensors())

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        return _scale(x, self.excitation(x), skip)


class _ConvMlp(nn.Module):
    """timm's ``ConvMlp`` with ``LayerNorm2d`` (same parameter names), run on (N, C) vectors."""

    def __init__(self, channels: int, hidden: int, act: str = "relu", **kw) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1, **kw)
        self.norm = nn.LayerNorm(hidden, eps=1e-6, **kw)
        self.act = make_act(act)
        self.fc2 = nn.Conv2d(hidden, channels, 1, **kw)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return _linear(self.act(self.norm(_linear(v, self.fc1))), self.fc2)


class GlobalContext(nn.Module):
    """Global context block (Cao et al., 2019, GCNet), as timm's ``GlobalContext``.

    Attention pooling (a 1x1 conv ``C -> 1``, softmax over positions, weighted sum), then a
    bottleneck ``C -> hidden -> C`` with LayerNorm and ReLU, fused by ``add`` (timm's
    ``gca``, used in ``gcresnet50t``) or by a ``scale`` gate (timm's ``gc``). ``hidden`` is
    :func:`~se_surgery._se.hidden_channels` of ``ratio`` (timm's ``rd_ratio=1/8``).
    Parameters: ``(C + 1) + 2 * C * hidden + 3 * hidden + C``.

    Example:
        >>> m = GlobalContext(64)
        >>> x = torch.randn(2, 64, 8, 8)
        >>> torch.equal(m(x), x), sum(p.numel() for p in m.parameters())
        (True, 1177)
    """

    def __init__(self, channels: int, *, ratio: float = 8, divisor: int = 1, min_hidden: int = 1, fuse: str = "add",
                 gate: str = "sigmoid", act: str = "relu", ratio_of: str = "site", init: str = "identity",
                 channel_dim: int = 1, block_channels: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        _check_common(gate, init, channel_dim)
        check_choices(act=(act, ACTS), ratio_of=(ratio_of, RATIO_OF))
        if fuse not in ("add", "scale"):
            raise ValueError(f"fuse must be one of ('add', 'scale'), got {fuse!r}")
        kw = {"device": device, "dtype": dtype}
        self.channels, self.fuse, self.gate_fn, self.init = int(channels), fuse, gate, init
        self.hidden = hidden_channels(reduced_channels(channels, ratio_of, block_channels), ratio, divisor, min_hidden)
        self.channel_dim = channel_dim
        self.gate_scale = 2.0 if init == "identity" and fuse == "scale" else 1.0
        self.conv_attn = nn.Conv2d(self.channels, 1, 1, **kw)
        mlp = _ConvMlp(self.channels, self.hidden, act, **kw)
        # timm's names, so timm checkpoints map key for key.
        if fuse == "add":
            self.mlp_add = mlp
        else:
            self.mlp_scale = mlp
        if init == "identity":
            nn.init.zeros_(mlp.fc2.weight)
            nn.init.zeros_(cast(torch.Tensor, mlp.fc2.bias))  # made with bias=True
        else:  # timm's reset_parameters
            nn.init.kaiming_normal_(self.conv_attn.weight, mode="fan_in", nonlinearity="relu")
            if fuse == "add":
                nn.init.zeros_(mlp.fc2.weight)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, hidden={self.hidden}, fuse={self.fuse!r}, init={self.init!r}, "
                f"channel_dim={self.channel_dim}")

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        """Attention-pooled context, (N, C)."""
        n = x.shape[0]
        if self.channel_dim == 1:
            logits = F.conv2d(x, self.conv_attn.weight, self.conv_attn.bias).reshape(n, 1, -1)
            w = logits.softmax(-1)  # (N, 1, HW)
            return (x.reshape(n, self.channels, -1) @ w.transpose(1, 2))[:, :, 0]
        logits = F.linear(x, self.conv_attn.weight.flatten(1), self.conv_attn.bias).reshape(n, 1, -1)
        w = logits.softmax(-1)
        return (w @ x.reshape(n, -1, self.channels))[:, 0, :]

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The gate (``fuse: scale``), or 1 + the added context (``fuse: add``), broadcastable
        against ``x``: exactly 1 at identity either way."""
        ctx = self._context(x)
        if self.fuse == "add":
            return 1 + _per_channel(self.mlp_add(ctx), self.channel_dim)
        return _per_channel(_gate(self.mlp_scale(ctx), self.gate_fn, self.gate_scale), self.channel_dim)

    def identity_tensors(self) -> list[torch.Tensor]:
        mlp = self.mlp_add if self.fuse == "add" else self.mlp_scale
        return [mlp.fc2.weight, cast(torch.Tensor, mlp.fc2.bias)]

    def is_identity(self) -> bool:
        return (self.fuse == "add" or self.gate_scale == 2.0) and _zero(self.identity_tensors())

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        ctx = self._context(x)
        if self.fuse == "add":
            out = x + _per_channel(self.mlp_add(ctx), self.channel_dim)
            return out if skip is None else out.add_(skip)
        g = _gate(self.mlp_scale(ctx), self.gate_fn, self.gate_scale)
        return _scale(x, _per_channel(g, self.channel_dim), skip)


class CBAM(nn.Module):
    """Convolutional block attention (Woo et al., ECCV 2018), as timm's ``CbamModule``.

    Channel attention (average and max pool through one shared bottleneck MLP,
    ``C -> hidden -> C`` without bias, summed, gated), then spatial attention (a
    ``k x k`` conv over the channel-wise mean and max maps, with BatchNorm, gated).
    Parameters: ``2 * C * hidden (+ hidden + C with bias) + 2 * k * k + 2``. Identity
    init zeroes the MLP's last layer and the BatchNorm's weight, so both gates are 1.

    Example:
        >>> m = CBAM(64)
        >>> x = torch.randn(2, 64, 8, 8)
        >>> torch.equal(m(x), x), sum(p.numel() for p in m.parameters())
        (True, 612)
    """

    def __init__(self, channels: int, *, ratio: float = 16, divisor: int = 1, min_hidden: int = 1,
                 spatial_kernel_size: int = 7, bias: bool = False, gate: str = "sigmoid", act: str = "relu",
                 ratio_of: str = "site", init: str = "identity", channel_dim: int = 1,
                 block_channels: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        _check_common(gate, init, channel_dim)
        check_choices(act=(act, ACTS), ratio_of=(ratio_of, RATIO_OF))
        k = int(spatial_kernel_size)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"spatial_kernel_size must be an odd integer >= 1, got {spatial_kernel_size!r}")
        kw = {"device": device, "dtype": dtype}
        self.channels, self.gate_fn, self.init, self.channel_dim = int(channels), gate, init, channel_dim
        self.hidden = hidden_channels(reduced_channels(channels, ratio_of, block_channels), ratio, divisor, min_hidden)
        self.spatial_kernel_size = k
        self.gate_scale = 2.0 if init == "identity" else 1.0
        self.fc1 = nn.Conv2d(self.channels, self.hidden, 1, bias=bias, **kw)
        self.act = make_act(act)
        self.fc2 = nn.Conv2d(self.hidden, self.channels, 1, bias=bias, **kw)
        self.spatial_conv = nn.Conv2d(2, 1, k, padding=k // 2, bias=False, **kw)
        self.spatial_bn = nn.BatchNorm2d(1, **kw)
        if init == "identity":
            nn.init.zeros_(self.fc2.weight)
            if self.fc2.bias is not None:
                nn.init.zeros_(self.fc2.bias)
            # gamma 0 (beta is 0): the spatial logit is exactly 0 in train and eval mode,
            # and gamma still gets a gradient at once.
            nn.init.zeros_(self.spatial_bn.weight)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, hidden={self.hidden}, spatial_kernel_size={self.spatial_kernel_size}, "
                f"init={self.init!r}, channel_dim={self.channel_dim}")

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The channel gate, the channel-gated map and its spatial gate."""
        cd = self.channel_dim
        dims = (2, 3) if cd == 1 else (1, 2)
        pooled = torch.stack([x.mean(dims), x.amax(dims)])  # (2, N, C): both through one MLP call
        z = _linear(self.act(_linear(pooled, self.fc1)), self.fc2).sum(0)
        channel = _per_channel(_gate(z, self.gate_fn, self.gate_scale), cd)
        x = x * channel
        maps = torch.stack([x.mean(cd), x.amax(cd)], 1)  # (N, 2, H, W)
        s = _gate(self.spatial_bn(self.spatial_conv(maps)), self.gate_fn, self.gate_scale)
        return channel, x, s if cd == 1 else s.permute(0, 2, 3, 1)

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """Both gates' product, the factor ``x`` is multiplied by: exactly 1 at identity."""
        channel, _, spatial = self._gates(x)
        return channel * spatial

    def identity_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.fc2.weight, self.fc2.bias, self.spatial_bn.weight, self.spatial_bn.bias)
                if t is not None]

    def is_identity(self) -> bool:
        return self.gate_scale == 2.0 and _zero(self.identity_tensors())

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        _, gated, spatial = self._gates(x)
        return _scale(gated, spatial, skip)
