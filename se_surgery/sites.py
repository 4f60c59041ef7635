"""Sites: the joins in a model where SE can go, found structurally in the traced graph."""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import ModelTypeError
from .shapes import propagate_shapes
from .trace import Region, Tracing, trace_regions

__all__ = ["Site", "Discovery", "find_sites", "discover", "resolve_input_size"]

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}

_CHANNEL_FIRST_MODULES = (
    nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d,
)
_CHANNEL_FIRST_FUNCTIONS = {F.conv2d, F.conv_transpose2d, F.batch_norm, F.group_norm, F.instance_norm, torch.conv2d}
_CHANNEL_LAST_FUNCTIONS = {F.linear, F.layer_norm, torch.layer_norm}
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.nn.functional.silu}
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.mean, torch.amax}
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_EXPAND_NAMES = {"expand", "expand_as", "broadcast_to"}
# Channel-attention blocks users already have, by class name (torchvision, timm, common code).
ATTENTION_CLASSES = frozenset({
    "SqueezeExcitation", "SEModule", "SqueezeExcite", "SqueezeExciteCl", "EffectiveSEModule",
    "EcaModule", "CecaModule", "EfficientChannelAttn", "CircularEfficientChannelAttn",
    "SELayer", "SEBlock", "SE", "GatherExcite", "CbamModule", "LightCbamModule", "SplitAttn",
    "SelectiveKernel", "SelectiveKernelAttn", "GlobalContext", "RadixSoftmax",
})


@dataclass(frozen=True)
class Site:
    """One join where SE can go.

    Attributes:
        name: the owner's dotted path (``layer3.2``); ``owner:2``, ``owner:3`` for an
            owner's second and later joins; the fx node name for joins in the root's
            own forward.
        kind: ``"residual"`` or ``"concat"``.
        owner: dotted path of the innermost module whose forward performs the join.
        owner_type: class name of that module.
        stage: 1-based; a new stage starts whenever the spatial size of the join changes.
        block: 1-based position inside the stage.
        channels: channels of the join's output.
        spatial: (H, W) of the join for the example input.
        channel_dim: 1 for NCHW joins, -1 for channels-last (N, H, W, C) joins.
        in_channels, in_spatial: channels and size at the point both residual paths
            leave from (what the ``pre`` variant scales); None where unknown.
        has_attention: the owner already contains a channel gate (SE, ECA, ...).
        join_index: position of this join among the joins of the owner's own forward.
        branch_arg: for a residual, which operand of the add is the transforming branch.
    """

    name: str
    kind: str
    owner: str
    owner_type: str
    stage: int
    block: int
    channels: int
    spatial: tuple[int, int]
    channel_dim: int = 1
    in_channels: int | None = None
    in_spatial: tuple[int, int] | None = None
    has_attention: bool = False
    join_index: int = 0
    branch_arg: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spatial"] = list(self.spatial)
        d["in_spatial"] = list(self.in_spatial) if self.in_spatial else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Site":
        d = dict(d)
        d["spatial"] = tuple(d["spatial"])
        d["in_spatial"] = tuple(d["in_spatial"]) if d.get("in_spatial") else None
        return cls(**d)


@dataclass
class Discovery:
    """Everything discovery learned: the sites and what it had to pass over."""

    sites: list[Site]
    input_size: tuple[int, int, int]
    untraced: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (join, why it is no site)


def resolve_input_size(model: nn.Module, input_size=None) -> tuple[int, int, int]:
    """The example input size: the caller's, else timm's ``pretrained_cfg``, else 3x224x224.

    Example:
        >>> resolve_input_size(nn.Identity(), 299)
        (3, 299, 299)
    """
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            input_size = cfg["input_size"]
        else:
            input_size = 224
    if isinstance(input_size, bool) or not isinstance(input_size, (int, tuple, list)):
        raise ModelTypeError(f"input_size must be an int or a (C, H, W) / (H, W) tuple, got {input_size!r}")
    if isinstance(input_size, int):
        size = (3, input_size, input_size)
    elif len(input_size) == 2:
        size = (3, *input_size)
    elif len(input_size) == 3:
        size = tuple(input_size)
    else:
        raise ModelTypeError(f"input_size must be an int or a (C, H, W) / (H, W) tuple, got {input_size!r}")
    if not all(isinstance(s, int) and s > 0 for s in size):
        raise ModelTypeError(f"input_size must hold positive ints, got {input_size!r}")
    return tuple(int(s) for s in size)


def is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in ADD_FUNCTIONS) or (
        n.op == "call_method" and n.target in ADD_METHODS
    )


def is_cat(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in CAT_FUNCTIONS


def add_operands(n: fx.Node) -> list:
    """The two operands of an add node, wherever they were passed (``other=`` too)."""
    ops = list(n.args[:2])
    if len(ops) < 2 and n.kwargs.get("other") is not None:
        ops.append(n.kwargs["other"])
    return ops


def is_join(n: fx.Node) -> bool:
    """Whether a node is an add or a concatenation (a candidate join)."""
    return is_add(n) or is_cat(n)


def _shape(n) -> tuple | None:
    return n.meta.get("shape") if isinstance(n, fx.Node) else None


def _tensor_inputs(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if a.meta.get("tensor")]


def _ancestors(n: fx.Node) -> set[fx.Node]:
    """Nodes ``n`` depends on through tensor values (shape reads are not a data path)."""
    seen: set[fx.Node] = set()
    stack = _tensor_inputs(n)
    while stack:
        a = stack.pop()
        if a in seen:
            continue
        seen.add(a)
        stack.extend(_tensor_inputs(a))
    return seen


class _RegionView:
    """Per-region helpers with memoised answers."""

    def __init__(self, region: Region):
        self.region = region
        self.order = {n: i for i, n in enumerate(region.graph.nodes)}
        self._axis: dict[fx.Node, int | None] = {}
        self._from_input: dict[fx.Node, bool] | None = None

    def from_input(self, n: fx.Node) -> bool:
        """Whether a placeholder is ``n`` or among its tensor ancestors (one pass, memoised)."""
        if self._from_input is None:
            reach: dict[fx.Node, bool] = {}
            for m in self.region.graph.nodes:  # topological order
                reach[m] = m.op == "placeholder" or any(reach.get(a, False) for a in _tensor_inputs(m))
            self._from_input = reach
        return self._from_input[n]

    def module(self, n: fx.Node) -> nn.Module | None:
        try:
            return self.region.module.get_submodule(n.target)
        except AttributeError:
            return None

    def owner(self, n: fx.Node) -> tuple[str, str]:
        path, typ = n.meta.get("scope", ("", None))
        if typ is None:
            typ = type(self.region.module) if not path else type(self.region.module.get_submodule(path))
        return self.region.qualify(path), typ.__name__

    def channel_axis(self, n: fx.Node, depth: int = 0) -> int | None:
        """The channel axis (0-based) of a 4-D node, read from the layers that produce it."""
        if n in self._axis:
            return self._axis[n]
        self._axis[n] = None  # guards cycles through in-place aliases
        axis = self._channel_axis(n, depth)
        self._axis[n] = axis
        return axis

    def _channel_axis(self, n: fx.Node, depth: int) -> int | None:
        shape = _shape(n)
        if shape is None or len(shape) != 4 or depth > 64:
            return None
        own = self.layer_axis(n)
        if own is not None:
            return own
        if n.op == "call_module":
            m = self.module(n)
            if m is not None and type(m).__module__.startswith("torch.nn") and not isinstance(m, nn.Sequential):
                return self._follow_same_shape(n, depth)  # activations, dropout, identity
            return None
        if n.op in ("call_function", "call_method"):
            name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
            if name == "permute":
                dims = n.args[1:] if n.op == "call_method" else n.args[1]
                if n.op == "call_method" and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                    dims = dims[0]
                dims = n.kwargs.get("dims", dims)
                src = n.args[0]
                axis = self.channel_axis(src, depth + 1) if isinstance(src, fx.Node) else None
                if axis is None or not all(isinstance(d, int) for d in dims):
                    return None
                dims = [d % 4 for d in dims]
                return dims.index(axis) if axis in dims else None
            if name == "transpose":
                src, a, b = n.args[0], n.args[1] % 4, n.args[2] % 4
                axis = self.channel_axis(src, depth + 1) if isinstance(src, fx.Node) else None
                if axis is None:
                    return None
                return b if axis == a else a if axis == b else axis
            return self._follow_same_shape(n, depth)
        return None

    def layer_axis(self, n: fx.Node) -> int | None:
        """The channel axis a layer itself works on: 1 for convs and BN-like norms, 3 for
        linear layers and LayerNorm over the last dim; None for anything else."""
        if n.op == "call_module":
            m = self.module(n)
            if isinstance(m, _CHANNEL_FIRST_MODULES):
                return 1
            if isinstance(m, nn.Linear) or (isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward):
                return 3
        elif n.op == "call_function" and n.target in _CHANNEL_FIRST_FUNCTIONS:
            return 1
        elif n.op == "call_function" and n.target in _CHANNEL_LAST_FUNCTIONS:
            return 3
        return None

    def consumer_axis(self, n: fx.Node) -> int | None:
        """The channel axis of a 4-D node as its consumers read it (a norm or conv right after)."""
        for u in n.users:
            axis = self.layer_axis(u)
            if axis is not None:
                return axis
        return None

    def _follow_same_shape(self, n: fx.Node, depth: int) -> int | None:
        for a in _tensor_inputs(n):
            if _shape(a) == _shape(n):
                axis = self.channel_axis(a, depth + 1)
                if axis is not None:
                    return axis
        return None

    def is_gate_mul(self, n: fx.Node) -> bool:
        """``x * gate`` where the gate is a sigmoid of a spatially pooled map (SE, ECA and kin).

        The gate must be computed from a channel descriptor: walking back from the
        operand (through an ``expand``/``expand_as``), only through tensors smaller than
        the product, a gate function is met and, before it, a pool that leaves at most
        one dimension (the channels) per sample. Swish (``x * sigmoid(x)``) and spatial
        gates (``x * sigmoid(conv(x))``, shape N x 1 x H x W) are not channel attention.
        """
        name = n.target if n.op == "call_method" else n.target if n.op == "call_function" else None
        if name not in (operator.mul, operator.imul, torch.mul, "mul", "mul_"):
            return False
        out = _shape(n)
        if out is None or len(out) != 4:
            return False
        full = math.prod(out[1:])

        def small(a: fx.Node) -> bool:
            shape = _shape(a)
            return shape is not None and len(shape) >= 1 and math.prod(shape[1:]) < full

        for operand in _tensor_inputs(n):
            if operand.op in ("call_method", "call_function") and _callable_name(operand) in _EXPAND_NAMES:
                operand = operand.args[0] if operand.args and isinstance(operand.args[0], fx.Node) else operand
            frontier, seen = [(operand, False)], set()
            for _ in range(12):
                nxt = []
                for a, saw_gate in frontier:
                    if not small(a) or (a, saw_gate) in seen:
                        continue
                    seen.add((a, saw_gate))
                    m = self.module(a) if a.op == "call_module" else None
                    if (a.op == "call_function" and a.target in _GATE_FUNCTIONS) or isinstance(m, _GATE_MODULES) or (
                        a.op == "call_method" and a.target in ("sigmoid", "sigmoid_")
                    ):
                        saw_gate = True
                    pooled = (a.op == "call_function" and a.target in _POOL_FUNCTIONS) or isinstance(m, _POOL_MODULES) or (
                        a.op == "call_method" and a.target in ("mean", "amax")
                    )
                    if saw_gate and pooled and sum(d > 1 for d in _shape(a)[1:]) <= 1:
                        return True
                    nxt.extend((b, saw_gate) for b in _tensor_inputs(a))
                frontier = nxt
        return False


def _callable_name(n: fx.Node) -> str:
    return n.target if n.op == "call_method" else getattr(n.target, "__name__", "")


def _ordered(region: Region) -> Iterator[tuple[Region, fx.Node]]:
    """(region, node) pairs in depth order, descending into leaves traced on their own."""
    nested: dict[str, list[Region]] = {}
    for key, child in region.children.items():
        nested.setdefault(key.split("#")[0], []).append(child)
    for n in region.graph.nodes:
        yield region, n
        if n.op == "call_module" and n.target in nested:
            for child in nested.pop(n.target):
                yield from _ordered(child)


def _residual(view: _RegionView, n: fx.Node) -> tuple[dict | None, str | None]:
    """Classify an add node: the residual join's facts, or why it is not one."""
    if n.op == "call_function" and n.kwargs.get("alpha", 1) != 1:
        return None, "scaled add (alpha)"
    operands = add_operands(n)
    out = _shape(n)
    if out is None or len(out) != 4:
        return None, None  # not a 4-D add: nothing to explain
    if len(operands) != 2 or not all(isinstance(o, fx.Node) and o.meta.get("tensor") for o in operands):
        return None, "one operand is not a tensor"
    if any(_shape(o) != out for o in operands):
        return None, "operands broadcast (a bias or embedding, not a join)"
    anc = [_ancestors(o) | {o} for o in operands]
    common = [c for c in anc[0] & anc[1] if c.op not in ("get_attr",)]
    # A common point must carry data from the block's input, not only from parameters.
    common = [c for c in common if view.from_input(c)]
    if not common:
        return None, "the operands share no common input (two unrelated tensors)"
    fork = max(common, key=view.order.__getitem__)
    base = _ancestors(fork) | {fork}
    lengths = [len(a - base) for a in anc]
    if max(lengths) == 0:
        return None, "both operands are the same tensor"
    branch = 0 if lengths[0] > lengths[1] else 1
    axis = (view.channel_axis(operands[branch]) or view.channel_axis(operands[1 - branch])
            or view.consumer_axis(fork) or view.consumer_axis(n))
    if axis not in (1, 3):
        return None, "channel axis unknown (no conv, norm or linear layer produces it)"
    fork_shape = _shape(fork)
    in_ch = in_sp = None
    if fork_shape is not None and len(fork_shape) == 4 and view.channel_axis(fork) in (axis, None):
        in_ch = fork_shape[axis]
        in_sp = tuple(fork_shape[2:4]) if axis == 1 else tuple(fork_shape[1:3])
    return {
        "kind": "residual",
        "channels": out[axis],
        "spatial": tuple(out[2:4]) if axis == 1 else tuple(out[1:3]),
        "channel_dim": 1 if axis == 1 else -1,
        "in_channels": in_ch,
        "in_spatial": in_sp,
        "branch_arg": branch,
    }, None


def _cat_inputs(n: fx.Node):
    tensors = n.args[0] if n.args else n.kwargs.get("tensors")
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", n.kwargs.get("axis", 0))
    return tensors, dim


def _is_channel_cat(n: fx.Node) -> bool:
    tensors, dim = _cat_inputs(n)
    out = _shape(n)
    return (
        out is not None and len(out) == 4 and dim in (1, -3)
        and isinstance(tensors, (list, tuple)) and len(tensors) >= 2
        and all(isinstance(t, fx.Node) for t in tensors)
    )


def _concat(view: _RegionView, n: fx.Node) -> tuple[dict | None, str | None]:
    tensors, dim = _cat_inputs(n)
    out = _shape(n)
    if out is None or len(out) != 4 or dim not in (1, -3):
        return None, None
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
        return None, None  # a single-input cat is a copy, not a join
    if n.users and all(is_cat(u) and _is_channel_cat(u) for u in n.users):
        return None, "inner concatenation (its result only feeds an outer one)"
    return {"kind": "concat", "channels": out[1], "spatial": tuple(out[2:4]), "channel_dim": 1,
            "in_channels": None, "in_spatial": None, "branch_arg": None}, None


def _owner_has_attention(model: nn.Module, owner: str, gate_scopes: list[str]) -> bool:
    try:
        mod = model.get_submodule(owner) if owner else model
    except AttributeError:
        mod = None
    if mod is not None and any(type(m).__name__ in ATTENTION_CLASSES for m in mod.modules()):
        return True
    return any(s == owner or s.startswith(owner + ".") or not owner for s in gate_scopes)


def discover(model: nn.Module, input_size=None) -> Discovery:
    """Trace, propagate shapes and classify every join. See :func:`find_sites`."""
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    size = resolve_input_size(model, input_size)
    tracing: Tracing = trace_regions(model)
    failed = propagate_shapes(model, tracing, size)
    untraced = list(tracing.untraced) + [(p, f"shapes unknown: {r}") for p, r in failed.items()]
    found: list[dict] = []
    rejected: list[tuple[str, str]] = []
    counters: dict[str, int] = {}
    gate_scopes: list[str] = []
    views: dict[int, _RegionView] = {}
    for region in tracing.regions:
        for reg, n in _ordered(region):
            view = views.setdefault(id(reg), _RegionView(reg))
            if n.op in ("call_function", "call_method") and view.is_gate_mul(n):
                gate_scopes.append(view.owner(n)[0])
            if not is_join(n) or not n.meta.get("tensor"):
                continue  # arithmetic on sizes (1 + H * W) is no join; apply counts the same way
            owner, owner_type = view.owner(n)
            index = counters.get(owner, 0)
            counters[owner] = index + 1
            facts, why = (_residual if is_add(n) else _concat)(view, n)
            label = f"{owner or '<model>'}:{n.name}"
            if facts is None:
                if why:
                    rejected.append((label, why))
                continue
            found.append(dict(facts, owner=owner, owner_type=owner_type, join_index=index, node=n.name))
    sites: list[Site] = []
    per_owner: dict[str, int] = {}
    stage, block, last = 0, 0, None
    for f in found:
        k = per_owner[f["owner"]] = per_owner.get(f["owner"], 0) + 1
        if not f["owner"]:
            name = f["node"]
        else:
            name = f["owner"] if k == 1 else f"{f['owner']}:{k}"
        if f["spatial"] != last:
            stage, block, last = stage + 1, 0, f["spatial"]
        block += 1
        node = f.pop("node")
        del node
        sites.append(Site(name=name, stage=stage, block=block,
                          has_attention=_owner_has_attention(model, f["owner"], gate_scopes), **f))
    return Discovery(sites, size, untraced, rejected)


def find_sites(model: nn.Module, input_size=None) -> list[Site]:
    """Find every join in ``model`` where SE can go, without changing or running it.

    Traces the model with ``torch.fx`` (submodule by submodule where the whole model
    cannot be traced), propagates fake tensors for shapes and returns residual and
    concat sites in depth order.

    Args:
        model: any ``nn.Module`` taking one image batch.
        input_size: ``N``, ``(H, W)`` or ``(C, H, W)`` of the example input; default
            the model's timm ``pretrained_cfg`` size, else 3x224x224.

    Returns:
        Frozen :class:`Site` records.

    Example:
        >>> import torchvision, se_surgery
        >>> sites = se_surgery.find_sites(torchvision.models.resnet50())
        >>> len(sites), sites[0].name, sites[0].channels, sites[-1].spatial
        (16, 'layer1.0', 256, (7, 7))
    """
    return discover(model, input_size).sites
