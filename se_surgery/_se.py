"""The Squeeze-and-Excitation module that se-surgery inserts.

``squeeze -> FC(C -> hidden) -> ReLU -> FC(hidden -> C) -> gate -> channel-wise scale``,
with 1x1 convolutions as FCs so the parameter count matches timm's ``SEModule``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import CHANNEL_DIMS, check_choices
from .ops.fused import _se_join as _se_join_op
from .ops.fused import gate_of, scale_join, se_join_into, squeeze_map

# torch.compiler.is_exporting is newer than torch.library.custom_op (2.4).
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)

__all__ = ["SqueezeExcite", "hidden_channels", "make_act", "reduced_channels"]

SQUEEZES = ("avg", "max", "avgmax")
GATES = ("sigmoid", "hard_sigmoid")
INITS = ("identity", "paper")
ACTS = ("relu", "relu6", "silu", "gelu", "hard_swish", "mish")
RATIO_OF = ("site", "block_input")


def make_act(name: str) -> nn.Module:
    """The excitation's activation module for an ``act`` option.

    Example:
        >>> make_act("silu")
        SiLU()
    """
    check_choices(act=(name, ACTS))
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    return {"silu": nn.SiLU, "gelu": nn.GELU, "hard_swish": nn.Hardswish, "mish": nn.Mish}[name]()


def hidden_channels(channels: int, ratio: float, divisor: int = 1, min_hidden: int = 1,
                    round_limit: float = 0.0) -> int:
    """Width of the SE bottleneck, rounded the way timm's ``make_divisible`` does.

    ``max(min_hidden, channels / ratio)`` rounded to the nearest multiple of ``divisor``
    (halves up), never below ``divisor``; one ``divisor`` more where rounding lost more
    than ``1 - round_limit`` of the width (timm's MobileNetV3 SE rounds with 0.9, its
    ``SEModule`` with 0).

    Example:
        >>> hidden_channels(256, 16)
        16
        >>> hidden_channels(64, 16, divisor=8)
        8
        >>> hidden_channels(24, 16)
        2
        >>> hidden_channels(72, 4, divisor=8), hidden_channels(72, 4, divisor=8, round_limit=0.9)
        (16, 24)
    """
    v = max(float(min_hidden), channels / ratio)
    h = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return h + divisor if h < round_limit * v else h


def reduced_channels(channels: int, ratio_of: str = "site", block_channels: int | None = None) -> int:
    """The channel count the ratio divides: the site's, or the block input's for ``block_input``.

    Example:
        >>> reduced_channels(96, "block_input", 16)
        16
    """
    if ratio_of != "block_input":
        return int(channels)
    if block_channels is None:
        raise ValueError("ratio_of='block_input' needs block_channels (the block's input channels)")
    return int(block_channels)


class SqueezeExcite(nn.Module):
    """Channel attention of Hu et al. (2018) on a 4-D feature map.

    Args:
        channels: channels of the map the gate scales.
        ratio: reduction ratio ``r``; see :func:`hidden_channels`.
        divisor, min_hidden, round_limit: rounding of the bottleneck width.
        squeeze: ``"avg"``, ``"max"`` or ``"avgmax"`` (mean of both) global pooling.
        gate: ``"sigmoid"`` or ``"hard_sigmoid"``.
        init: ``"identity"`` zero-initialises the last FC and doubles the gate, so the
            gate is exactly 1 and the module computes the identity until it is trained;
            ``"paper"`` keeps PyTorch's default init and the plain gate.
        bias: whether the FCs have a bias.
        act: the excitation's activation (``relu``; EfficientNet uses ``silu``).
        ratio_of: ``"site"`` (hidden = channels / ratio) or ``"block_input"`` (hidden =
            ``block_channels`` / ratio, EfficientNet's SE: a quarter of the block input).
        channel_dim: 1 for (N, C, H, W) maps, -1 for channels-last (N, H, W, C) maps.
        block_channels: the input channels of the block the module sits in (passed by
            se-surgery; needed for ``ratio_of="block_input"``).

    ``forward(x)`` returns ``x * gate(x)``; ``forward(x, skip)`` returns
    ``skip + x * gate(x)``, which is how the ``standard`` variant closes a residual join;
    ``act="relu"`` folds the join's activation in. On CUDA the whole SE is one
    ``se_surgery::se_join`` op (:mod:`se_surgery.ops`); elsewhere aten ops (:meth:`runs_op`).

    Example:
        >>> se = SqueezeExcite(64, ratio=16)
        >>> x = torch.randn(2, 64, 8, 8)
        >>> torch.equal(se(x), x)  # identity init: exact identity at insertion
        True
        >>> sum(p.numel() for p in se.parameters())
        580
    """

    def __init__(
        self,
        channels: int,
        ratio: float = 16,
        *,
        divisor: int = 1,
        min_hidden: int = 1,
        round_limit: float = 0.0,
        squeeze: str = "avg",
        gate: str = "sigmoid",
        act: str = "relu",
        ratio_of: str = "site",
        init: str = "identity",
        bias: bool = True,
        channel_dim: int = 1,
        block_channels: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_choices(squeeze=(squeeze, SQUEEZES), gate=(gate, GATES), init=(init, INITS),
                      channel_dim=(channel_dim, CHANNEL_DIMS), act=(act, ACTS), ratio_of=(ratio_of, RATIO_OF))
        self.channels = int(channels)
        self.hidden = hidden_channels(reduced_channels(channels, ratio_of, block_channels), ratio, divisor,
                                      min_hidden, round_limit)
        self.squeeze = squeeze
        self.gate_fn = gate
        self.init = init
        self.channel_dim = channel_dim
        # identity init: 2 * sigmoid(0) == 2 * hard_sigmoid(0) == 1.0 exactly.
        self.gate_scale = 2.0 if init == "identity" else 1.0
        kw = {"device": device, "dtype": dtype}
        self.fc1 = nn.Conv2d(self.channels, self.hidden, 1, bias=bias, **kw)
        self.act = make_act(act)
        self.act_name = act
        self.fc2 = nn.Conv2d(self.hidden, self.channels, 1, bias=bias, **kw)
        if init == "identity":
            nn.init.zeros_(self.fc2.weight)
            if self.fc2.bias is not None:
                nn.init.zeros_(self.fc2.bias)

    # The gate scale travels with the weights: SE weights trained with one scale compute
    # something else under another (timm's SEModule and init: paper use 1, init: identity
    # 2), so a state dict records it and loading refuses a mismatch instead of guessing.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "gate_scale"] = torch.tensor(self.gate_scale, dtype=torch.float32)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "gate_scale"
        saved = state_dict.pop(key, None) if key in state_dict else None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        has_weights = any(k.startswith(prefix + "fc") for k in state_dict)
        if saved is None:
            if has_weights and self.gate_scale != 1.0:
                error_msgs.append(
                    f"{key}: these SE weights come without a gate scale, as timm's SEModule and se-surgery's "
                    f"'init: paper' save them (gate = sigmoid); this SE has init {self.init!r} (gate = "
                    f"{self.gate_scale:g}*sigmoid) and would compute something else. Apply with 'init: paper' "
                    "(the timm_compatible preset) to load them")
            return
        value = float(saved)
        if value not in (1.0, 2.0):
            error_msgs.append(f"{key}: gate scale {value:g} is not one se-surgery writes (1 or 2)")
            return
        self.gate_scale = value

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden={self.hidden}, squeeze={self.squeeze!r}, "
            f"gate={self.gate_fn!r}, init={self.init!r}, channel_dim={self.channel_dim}"
            + (f", act={self.act_name!r}" if self.act_name != "relu" else "")
        )

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel gate times ``gate_scale``, shaped to broadcast against ``x``.

        ``fc1``, ``act`` and ``fc2`` run as modules: their hooks, ``torch.jit.trace`` (and
        so fvcore) and module-hook counters such as ptflops see two ``Conv2d``.
        """
        s = squeeze_map(x, self.channel_dim, self.squeeze, _onnx_exporting())
        g = gate_of(self.fc2(self.act(self.fc1(s))), self.gate_fn, self.gate_scale)
        return g if self.channel_dim == 1 else g.permute(0, 2, 3, 1)

    # The inserted-module protocol (se_surgery.modules.ChannelAttention).
    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The factor this module multiplies ``x`` by (the gate): exactly 1 at identity."""
        return self.gate(x)

    def identity_tensors(self) -> list[torch.Tensor]:
        """The tensors identity init zeroes: while they are zero, the gate is exactly 1."""
        return [t for t in (self.fc2.weight, self.fc2.bias) if t is not None]

    def is_identity(self) -> bool:
        """Whether the module computes exactly its input (for every input)."""
        return self.gate_scale == 2.0 and not any(bool(t.any()) for t in self.identity_tensors())

    #: False keeps the op out even on CUDA (the composite below everywhere); benchmarks compare both.
    use_fused: bool = True

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, inplace: bool = False,
                act: str | None = None) -> torch.Tensor:
        """``x * gate(x)``, or ``skip + x * gate(x)`` when ``skip`` is given, then ``act``.

        Args:
            x: the map to scale.
            skip: the residual the scaled map is added to (the ``standard`` variant's join).
            inplace: the caller guarantees nothing else reads ``x``: in inference the result
                is written into ``x`` (no new activation).
            act: None or ``"relu"``: the join's activation, folded into the same pass.

        Which implementation runs is decided in one place, :meth:`runs_op`.
        """
        if act is not None and act != "relu":
            raise ValueError("act must be None or 'relu', got '" + act + "'")  # (TorchScript has no !r)
        if not torch.jit.is_scripting() and self.runs_op(x):  # (TorchScript compiles no call of runs_op)
            return self._op(x, skip, inplace, act)
        g = self.gate(x)
        out = x if _may_write_into(x, skip, inplace) else None
        return scale_join(x, g, skip, act is not None, out, _onnx_exporting())

    @torch.jit.unused
    def runs_op(self, x):
        """Whether this call runs the ``se_surgery::se_join`` op instead of the aten composite.

        The op only for CUDA maps (its Triton kernels), in eager mode and under
        ``torch.compile``. Everywhere else the composite of :meth:`forward`, each choice
        measured or needed:

        - CPU eager inference: the op's CPU kernel is the same aten ops (0.99-1.01x) but
          summed in another order, and identity init must be exact.
        - CPU eager training: autograd over the composite beat the op's fused backward
          (resnet50 batch 1: 1.04 against 1.07 x the base; the custom op's Python dispatch).
        - ``torch.compile`` for the CPU: Inductor fuses the composite into the neighbouring
          kernels (1.03 x the compiled base; the opaque op 1.18).
        - ``torch.export``: a ``.pt2`` of aten ops loads where se-surgery is not installed.
        - ``torch.jit.trace`` / ``script``, ONNX export: standard ops that fvcore counts and
          ONNX Runtime and OpenVINO fuse (GlobalAveragePool, 1x1 Conv, Sigmoid, Mul, Add).
        - An excitation other than ReLU (the op computes ReLU) and ``use_fused = False``.
        """
        return (isinstance(x, torch.Tensor) and x.device.type == "cuda" and self.use_fused and type(self.act) is nn.ReLU
                and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or _is_exporting()))

    @torch.jit.unused
    def _op(self, x: torch.Tensor, skip: torch.Tensor | None, inplace: bool, act: str | None) -> torch.Tensor:
        fc1, fc2 = self.fc1, self.fc2
        args = (fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.channel_dim, self.squeeze, self.gate_fn,
                float(self.gate_scale), act or "none")
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, skip, fc1.weight, fc2.weight))
        if torch.compiler.is_compiling() or needs_grad or type(x) is not torch.Tensor:
            return _se_join_op(x, skip, *args)  # through the dispatcher: autograd, Dynamo, fake tensors
        # Eager inference: the op's kernels without the dispatcher (about 20 us of Python a
        # call). With ``inplace`` the branch is a fresh tensor only this join reads.
        into = x if inplace and (skip is None or skip.dtype == x.dtype) else None
        return se_join_into(into, x, skip, *args)


def _onnx_exporting() -> bool:
    if not torch.jit.is_scripting():
        return torch.onnx.is_in_onnx_export()
    return False


def _may_write_into(x: torch.Tensor, skip: torch.Tensor | None, inplace: bool) -> bool:
    # Only eager inference may reuse x: autograd needs it, and graphs must stay functional
    # (an fx Proxy is no Tensor).
    return (inplace and isinstance(x, torch.Tensor) and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and (skip is None or skip.dtype == x.dtype))
