"""Sites: the joins in a model where SE can go, found structurally in each module's graph."""

from __future__ import annotations

import hashlib
import math
import operator
import re
from dataclasses import asdict, dataclass, field
from typing import cast

import torch.fx as fx
from torch import nn

from ._checks import check_model
from ._inner import find_inner, follows, mixed_conv
from ._nodes import (
    ATTENTION_CLASSES,
    GraphView,
    add_operands,
    ancestors,
    callable_name,
    cat_inputs,
    channel_slice_of,
    is_activation_module,
    is_add,
    is_cat,
    is_channel_cat,
    is_join,
    is_split,
    shape,
    tensor_inputs,
)
from ._trace import ModelGraphs, ModuleGraph, trace_model
from .errors import ModelTypeError, TraceError

__all__ = ["Site", "Analysis", "find_sites", "discover", "fingerprint", "resolve_input_size", "KINDS"]

KINDS = ("residual", "branch_sum", "concat", "block")


@dataclass(frozen=True)
class Site:
    """One join where SE can go.

    Attributes:
        name: the owner's dotted path (``layer3.2``); ``owner:2``, ``owner:3`` for an
            owner's second and later joins; the fx node name for joins in the root
            model's own forward.
        kind: ``"residual"``, ``"branch_sum"``, ``"concat"`` or ``"block"`` (a depthwise
            block without a join: MobileNet / EfficientNet blocks without a skip).
        owner: dotted path of the innermost module whose forward performs the join.
        owner_type: class name of that module.
        stage: 1-based: the model's declared stage where it declares them, else by output
            stride (see :func:`find_sites`).
        block: 1-based position inside the stage.
        channels: channels of the join's output.
        spatial: (H, W) of the join for the example input.
        stride: the join's output stride (input size / join size, a power of two).
        channel_dim: 1 for NCHW joins, -1 for channels-last (N, H, W, C) joins.
        in_channels, in_spatial: channels and size where both residual paths leave
            from (what the ``pre`` variant scales); None where that is no 4-D map.
        has_attention: the residual block holding the join already has a channel gate.
        node: name of the join's node in the owner's fx graph.
        branch_arg: for a residual, which operand of the add is the transforming branch.
        inner, inner_channels, inner_spatial: where the ``inner`` variant puts SE (the
            call nodes to descend through, then the node), and the map's size there;
            None where the branch has no spatial convolution.
        layer_scale: the branch ends scaled by a learned per-channel factor (ConvNeXt).
        fork: name of the node both residual paths leave from (a block's input for a
            block site): the one definition discovery and insertion share.
        fusion, fusion_channels, fusion_spatial: for a concat, (owner path, node) after
            the layer that consumes the concatenation and its norm and activation
            (VoVNet's ``conv_concat``), where the ``fusion`` variant puts SE; None where
            no conv layer alone reads it.
    """

    name: str
    kind: str
    owner: str
    owner_type: str
    stage: int
    block: int
    channels: int
    spatial: tuple[int, int]
    stride: int = 1
    channel_dim: int = 1
    in_channels: int | None = None
    in_spatial: tuple[int, int] | None = None
    has_attention: bool = False
    node: str = ""
    branch_arg: int | None = None
    inner: tuple[str, ...] | None = None
    inner_channels: int | None = None
    inner_spatial: tuple[int, int] | None = None
    layer_scale: bool = False
    fork: str = ""
    fusion: tuple[str, str] | None = None
    fusion_channels: int | None = None
    fusion_spatial: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in _TUPLES:
            d[k] = list(d[k]) if d[k] else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Site":
        d = dict(d)
        for k in _TUPLES:
            d[k] = tuple(d[k]) if d.get(k) else None
        return cls(**d)


_TUPLES = ("spatial", "in_spatial", "inner", "inner_spatial", "fusion", "fusion_spatial")


@dataclass(frozen=True)
class Analysis:
    """Everything one look at a model learned: a value that plans, reports and
    :func:`se_surgery.apply` (through a plan) reuse instead of tracing the model again.

    Attributes:
        sites: every site, in model order.
        input_size: the (C, H, W) the shapes were measured at.
        untraced: (module path, why) of every module whose joins were not searched.
        rejected: (join, why it is no site) of every join passed over.
        graphs: the traced graphs of the model's structural copy (what apply rewrites).
        stopped: why the model's fake forward stopped, if it did.
        model: the model's class name.
        fingerprint: the model's structure (see :func:`fingerprint`); a plan made from
            this analysis cuts only a model with the same one.
        base_params: the model's parameter count.
    """

    sites: tuple[Site, ...]
    input_size: tuple[int, int, int]
    untraced: tuple[tuple[str, str], ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()  # (join, why it is no site)
    graphs: ModelGraphs | None = field(default=None, repr=False, compare=False)
    stopped: str | None = None
    model: str = ""
    fingerprint: str = ""
    base_params: int = 0
    stage_source: str = "by stride"  # or "declared (feature_info)", "declared (layerN)", "declared (features.N)"

    @property
    def stages(self) -> dict[int, int]:
        """Stage number -> how many sites it has."""
        sizes: dict[int, int] = {}
        for s in self.sites:
            sizes[s.stage] = sizes.get(s.stage, 0) + 1
        return sizes

    @property
    def macs(self) -> int | None:
        """The model's MACs at ``input_size``, where the fake pass counted them (:func:`analyze` does)."""
        return self.graphs.macs if self.graphs is not None else None

    def graph_of(self, owner: str) -> ModuleGraph:
        """The traced graph of the module at ``owner`` (the one the sites were found in)."""
        for g in cast(ModelGraphs, self.graphs).graphs:
            if g.path == owner:
                return g
        raise KeyError(owner)


def fingerprint(model: nn.Module) -> str:
    """A digest of the model's structure: its class, every module's path and class, and
    every parameter and buffer's name and shape. Two models with the same fingerprint
    accept the same plan (weights and dtype may differ)."""
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, m in model.named_modules(remove_duplicate=False):
        h.update(f"|{name}:{type(m).__module__}.{type(m).__qualname__}".encode())
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        h.update(f"|{name}{tuple(t.shape)}".encode())
    return h.hexdigest()[:16]


def resolve_input_size(model: nn.Module, input_size=None) -> tuple[int, int, int]:
    """The example input size: the caller's, else timm's ``pretrained_cfg``, else 3x224x224.

    Example:
        >>> resolve_input_size(nn.Identity(), 299)
        (3, 299, 299)
    """
    if input_size is None:
        input_size = _config_size(model) or 224
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
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ModelTypeError(f"input_size must hold positive ints, got {input_size!r}")
    if size[0] > 4096 or size[1] > 65536 or size[2] > 65536:
        raise ModelTypeError(f"input_size {size} is out of range: at most 4096 channels and 65536 pixels a side")
    return size


def _config_size(model: nn.Module):
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(cfg["input_size"])
    return None


# ------------------------------------------------------------------ classifying one join


def _residual(view: GraphView, n: fx.Node) -> tuple[dict | None, str | None]:
    """Classify an add node: residual or branch_sum facts, or why it is no site."""
    operands, why = _add_checked(n)
    if operands is None:
        return None, why
    fork = view.fork(*operands)
    if fork is None:
        return _unforked(view, n, operands)
    if shape(fork) is None:  # the fork is a list or tuple of tensors
        if is_split(fork):
            return None, "split-sum: the operands are parts of one tensor (Res2Net-style hierarchical sum)"
        return _facts(view, n, "branch_sum", None, None), None
    if fork is operands[0] and fork is operands[1]:
        return None, "both operands are the same tensor"
    return _forked(view, n, fork, operands)


def _add_checked(n: fx.Node) -> tuple[list | None, str | None]:
    """The add's two tensor operands of the output's shape, or why it is no join."""
    if n.op == "call_function" and n.kwargs.get("alpha", 1) != 1:
        return None, "scaled add (alpha)"
    operands = add_operands(n)
    out = shape(n)
    if out is None or len(out) != 4:
        return None, None  # not a 4-D add: nothing to explain
    if len(operands) != 2 or not all(isinstance(o, fx.Node) and o.meta.get("tensor") for o in operands):
        return None, "one operand is not a tensor"
    if any(shape(o) != out for o in operands):
        return None, "operands broadcast (a bias or embedding, not a join)"
    return operands, None


def _unforked(view: GraphView, n: fx.Node, operands: list) -> tuple[dict | None, str | None]:
    if not all(view.from_input(o) for o in operands):
        return None, "the operands share no common input (two unrelated tensors)"
    args = [view.inputs_of(o) for o in operands]
    # A shortcut the caller passes in (DLA's ``block(x, shortcut)``): one operand is that
    # argument itself (or a projection of it), the other a branch of another argument.
    for skip in (0, 1):
        o, other = operands[skip], operands[1 - skip]
        if o.op == "placeholder" and args[skip].isdisjoint(args[1 - skip]) and _separate_argument(view, o) \
                and any(view.node_kind(x) != "linear" for x in ancestors(other) | {other}):
            return _facts(view, n, "residual", None, 1 - skip), None
    # Inputs the forward got as one list (HRNet's resolutions), or unrelated branches: fusion.
    return _facts(view, n, "branch_sum", None, None), None


def _forked(view: GraphView, n: fx.Node, fork: fx.Node, operands: list) -> tuple[dict | None, str | None]:
    proj = [view.is_projection(fork, o) for o in operands]
    nonlin = [view.has_nonlinearity(fork, o) for o in operands]
    if proj[0] != proj[1]:
        branch = 0 if proj[1] else 1
        if not nonlin[branch]:
            return None, "the branch holds no nonlinearity (an addition inside a layer such as a normalisation)"
        return _residual_facts(view, n, fork, branch), None
    sliced = [_slice_skip(view, fork, o) for o in operands]
    if sliced[0] != sliced[1] and nonlin[0 if sliced[1] else 1]:
        # DPN's dual path: the branch is added to a channel slice of the block input (or
        # of its projection), x[:, :c] + f(x).
        return _residual_facts(view, n, fork, 0 if sliced[1] else 1), None
    if all(proj) and fork in operands and not any(is_add(o) for o in operands if o is not fork):
        # One linear path back onto its input (x + dwconv(x)); a sum of several linear
        # branches and the input (x + a(x) + b(x)) stays a re-parameterisation sum.
        return None, "a linear layer added to its own input, no nonlinearity (a positional encoding, x + dwconv(x))"
    if all(proj) or all(nonlin):
        return _facts(view, n, "branch_sum", None, None), None  # parallel branches, none a skip of the other
    return None, "neither operand is a skip of the other, and one holds no nonlinearity"


def _residual_facts(view: GraphView, n: fx.Node, fork: fx.Node, branch: int) -> dict | None:
    facts = _facts(view, n, "residual", fork, branch)
    if facts is None:
        return None
    b = add_operands(n)[branch]
    facts["layer_scale"] = _layer_scaled(view, fork, b)
    point = find_inner(view, fork, b, view.views)
    if point is not None:
        chain, node, channels, spatial = point
        facts.update(inner=(*chain, node), inner_channels=channels, inner_spatial=spatial)
    return facts


def _slice_skip(view: GraphView, fork: fx.Node, o: fx.Node) -> bool:
    """``o`` is a channel slice of the fork, of a projection of it, or of one layer applied
    to it alone (DPN's pre-activated 1x1 projection)."""
    src = channel_slice_of(o)
    if src is None:
        return False
    if src is fork or view.is_projection(fork, src):
        return True
    return src.op == "call_module" and tensor_inputs(src) == [fork]


def _facts(view: GraphView, n: fx.Node, kind: str, fork: fx.Node | None, branch: int | None) -> dict | None:
    out = cast(tuple, shape(n))  # an add the fake forward reached: its shape is recorded
    operands = add_operands(n)
    order = operands if branch is None else [operands[branch], operands[1 - branch]]
    axis = None
    for o in order:
        axis = axis or view.channel_axis(o)
    axis = axis or (view.consumer_axis(fork) if fork is not None else None) or view.consumer_axis(n)
    if axis not in (1, 3):
        return None
    in_ch = in_sp = None
    fork_shape = shape(fork) if fork is not None else None
    if fork is not None and fork_shape is not None and len(fork_shape) == 4 and view.channel_axis(fork) in (axis, None):
        in_ch = fork_shape[axis]
        in_sp = tuple(fork_shape[2:4]) if axis == 1 else tuple(fork_shape[1:3])
    return {"kind": kind, "channels": out[axis], "spatial": tuple(out[2:4]) if axis == 1 else tuple(out[1:3]),
            "channel_dim": 1 if axis == 1 else -1, "in_channels": in_ch, "in_spatial": in_sp, "branch_arg": branch,
            "axis": axis, "fork": fork.name if fork is not None and in_ch is not None else ""}


def _separate_argument(view: GraphView, p: fx.Node) -> bool:
    """Whether placeholder ``p`` is an argument of its own, not an element of a list argument."""
    arg = view.argument_of(p)
    return sum(view.argument_of(q) == arg for q in view.mg.graph.nodes if q.op == "placeholder") == 1


def _layer_scaled(view: GraphView, fork: fx.Node, branch: fx.Node) -> bool:
    """Whether the branch ends scaled by a learned per-channel factor (ConvNeXt's gamma,
    timm's LayerScale): SE inside it then learns through that factor."""
    for n in view.path(fork, branch):
        if n.op == "call_module" and "LayerScale" in type(view.module(n)).__name__:
            return True
        if n.op in ("call_function", "call_method") and callable_name(n) in ("mul", "mul_") and any(
                a.op == "get_attr" for a in n.all_input_nodes):
            return True
    return False


def _concat(view: GraphView, n: fx.Node) -> tuple[dict | None, str | None]:
    tensors, dim = cat_inputs(n)
    out = shape(n)
    if out is None or len(out) != 4 or dim not in (1, -3):
        return None, None
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
        return None, None  # a single-input cat is a copy, not a join
    if n.users and all(is_cat(u) and is_channel_cat(u) for u in n.users):
        return None, "inner concatenation (its result only feeds an outer one)"
    if _reassembles(tensors):
        return None, "reassembles channel slices of one tensor (a partial residual, as in ReXNet)"
    if _grouped_conv(view, tensors):
        return None, "joins per-group convs of one tensor's channel split (one mixed or grouped conv layer, MixConv)"
    facts = {"kind": "concat", "channels": out[1], "spatial": tuple(out[2:4]), "channel_dim": 1,
             "in_channels": None, "in_spatial": None, "branch_arg": None, "axis": 1, "fork": ""}
    point = _fusion_point(view, n)
    if point is not None:
        (owner, node), fview = point
        s = cast(tuple, shape(node))
        facts.update(fusion=(owner, node.name), fusion_channels=s[1], fusion_spatial=(s[2], s[3]),
                     fusion_attention=_attention_after(fview, node))
    return facts, None


def _reassembles(tensors) -> bool:
    """Whether every input is a channel slice of one tensor, or such a slice plus something."""
    sources = set()
    for t in tensors:
        src = channel_slice_of(t) if isinstance(t, fx.Node) else None
        if src is None and isinstance(t, fx.Node) and is_add(t):
            src = next((s for s in map(channel_slice_of, add_operands(t)) if s is not None), None)
        if src is None:
            return False
        sources.add(src)
    return len(sources) == 1


def _grouped_conv(view: GraphView, tensors) -> bool:
    """Whether every input is one conv applied to a part of the same split (MixNet's
    MixedConv2d, CoaT's per-head convolutions): a layer, not a join of branches."""
    sources = set()
    for t in tensors:
        if not isinstance(t, fx.Node) or t.op != "call_module" or not isinstance(view.module(t), nn.Conv2d):
            return False
        ins = tensor_inputs(t)
        part = ins[0] if len(ins) == 1 else None
        if part is None or part.op != "call_function" or part.target is not operator.getitem \
                or not isinstance(part.args[0], fx.Node) or not is_split(part.args[0]):
            return False
        sources.add(part.args[0])
    return len(sources) == 1


def _fusion_point(view: GraphView, n: fx.Node):
    """((owner path, node), view) after the layer that consumes the concatenation, and its
    norm and activation (VoVNet's ``conv_concat``); the consumer may be in the caller's graph
    where the owner returns the concatenation. None where no conv layer reads it alone."""
    if _returned(view) is n and view.mg.caller is not None and view.mg.calls == 1:
        graph, call = view.mg.caller
        caller = view.views.get(id(graph))
        if caller is None:
            return None
        view, n = caller, call
    if len(n.users) != 1:
        return None
    u = next(iter(n.users))
    m = view.module(u) if u.op == "call_module" else None
    if m is None or not u.args or u.args[0] is not n or not _starts_with_conv(m):
        return None
    point = follows(view, u)
    s = shape(point)
    if s is None or len(s) != 4:
        return None
    return (view.mg.path, point), view


def _returned(view: GraphView) -> fx.Node | None:
    """The one tensor the module's forward returns (a pytree-flattened ``[x]`` too)."""
    out = next(x for x in reversed(view.mg.graph.nodes) if x.op == "output")
    res = out.args[0] if out.args else None
    if isinstance(res, (list, tuple)) and len(res) == 1:
        res = res[0]
    return res if isinstance(res, fx.Node) else None


def _starts_with_conv(m: nn.Module) -> bool:
    if isinstance(m, nn.Conv2d):
        return True
    first = next((c for c in m.modules() if isinstance(c, nn.Conv2d)), None)
    return first is not None and not isinstance(m, (nn.ModuleList, nn.ModuleDict))


def _attention_after(view: GraphView, point: fx.Node) -> bool:
    """Whether the module right after the fusion point is a channel attention (VoVNet's eSE)."""
    for u in point.users:
        m = view.module(u) if u.op == "call_module" else None
        if m is not None and any(type(x).__name__ in ATTENTION_CLASSES for x in m.modules()):
            return True
    return False


def _stride(size: tuple[int, int, int], n: fx.Node, axis: int) -> int:
    s = n.meta.get("canon_shape") or n.meta["shape"]
    h = s[2] if axis == 1 else s[1]
    return 2 ** max(0, round(math.log2(max(size[1] / max(h, 1), 1))))


# ------------------------------------------------------------------ block sites


def _grouped_spatial(c: nn.Module) -> bool:
    return isinstance(c, nn.Conv2d) and c.groups > 1 and max(c.kernel_size) > 1


def _dw_then_projection(m: nn.Module) -> bool:
    """One depthwise (or grouped spatial) conv, an activation, then a 1x1 projection (a
    separable conv *layer*, dw then pw with nothing between, is no block)."""
    inside = {id(c) for x in m.modules() if mixed_conv(x) for c in x.children()}
    layers = [c for c in m.modules() if id(c) not in inside]
    grouped = [i for i, c in enumerate(layers) if _grouped_spatial(c) or mixed_conv(c)]
    if len(grouped) != 1:
        return False
    after = layers[grouped[0] + 1:]
    # The projection: the last pointwise conv (an SE's own 1x1 convs come before it).
    pw = [i for i, c in enumerate(after) if isinstance(c, nn.Conv2d) and max(c.kernel_size) == 1 and c.groups == 1]
    return bool(pw) and any(is_activation_module(c) for c in after[:pw[-1]])


def _container(m: nn.Module) -> bool:
    return type(m) in (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _prefixes(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[:cut]) for cut in range(len(parts) + 1)]


def _blocks(mg: ModelGraphs, views: dict[int, GraphView], found: list[dict]) -> list[dict]:
    """Block sites: modules the model calls that hold a depthwise conv and a projection but
    no join, outside every module that owns a site (MobileNet / EfficientNet blocks
    without a skip). The outermost such module that is not a plain container is the block."""
    owners = {f["graph"].path for f in found}
    holders: set[str] = set()  # modules with a join anywhere inside (a MixConv layer's cat is none)
    for g in mg.graphs:
        if g.path in owners or (g.graph is not None and any(is_add(n) and len(shape(n) or ()) == 4
                                                            for n in g.graph.nodes)):
            holders.update(_prefixes(g.path))
    cands = {g.path: g for g in mg.graphs if _block_candidate(g, holders, owners)}
    out = []
    for path, g in cands.items():
        above = [cands[p] for p in _prefixes(path)[1:-1] if p in cands]
        if any(not _container(a.module) for a in above) or _in_wider_block(g, mg, holders):
            continue  # part of a bigger block
        if _container(g.module) and any(q != path and _within(q, path) for q in cands):
            continue  # a stage holding one block: the block is the site
        facts = _block_facts(views[id(g)])
        if facts is not None:
            out.append(dict(facts, graph=g))
    return out


def _in_wider_block(g: ModuleGraph, mg: ModelGraphs, holders: set[str]) -> bool:
    """Whether a module above ``g`` (not the model, not a container) runs several depthwise
    convs and no join: ``g`` is then one layer of a bigger block (Xception's exit flow)."""
    for p in _prefixes(g.path)[1:-1]:
        m = mg.model.get_submodule(p)
        if not _container(m) and p not in holders \
                and sum(_grouped_spatial(c) for c in m.modules()) > 1:
            return True
    return False


def _block_candidate(g: ModuleGraph, holders: set[str], owners: set[str]) -> bool:
    if not g.path or g.graph is None or g.error or g.train_dependent or g.path in holders:
        return False
    return not any(_within(g.path, o) for o in owners) and _dw_then_projection(g.module)


def _block_facts(view: GraphView) -> dict | None:
    phs = [p for p in view.mg.graph.nodes if p.op == "placeholder"]
    res = _returned(view)
    if len(phs) != 1 or not isinstance(res, fx.Node) or len(shape(res) or ()) != 4 or len(shape(phs[0]) or ()) != 4:
        return None
    if view.channel_axis(res) != 1:
        return None
    point = find_inner(view, phs[0], res, view.views)
    if point is None:
        return None
    chain, node, channels, spatial = point
    s, i = cast(tuple, shape(res)), cast(tuple, shape(phs[0]))
    return {"kind": "block", "node": res, "channels": s[1], "spatial": (s[2], s[3]), "channel_dim": 1,
            "in_channels": i[1], "in_spatial": (i[2], i[3]), "branch_arg": None, "axis": 1, "fork": phs[0].name,
            "inner": (*chain, node), "inner_channels": channels, "inner_spatial": spatial}


# ------------------------------------------------------------------ stages


_LAYER = re.compile(r"layer\d+\Z")


def _feature_taps(info) -> list[str]:
    """The module paths a timm ``feature_info`` lists, in order."""
    info = getattr(info, "info", info)
    if not isinstance(info, (list, tuple)):
        return []
    return [f["module"] for f in info if isinstance(f, dict) and isinstance(f.get("module"), str) and f["module"]]


def _declarations(model: nn.Module) -> tuple[list[tuple[str, list[str], bool]], str]:
    """(scope path, stage paths, whether a site after a path belongs to the next one) of
    every stage declaration, and what declared them."""
    scopes = [(p, taps, True) for p, m in model.named_modules() if (taps := _feature_taps(getattr(m, "feature_info",
                                                                                                     None)))]
    if scopes:
        return scopes, "feature_info"
    names = [n for n, _ in model.named_children()]
    layers = [n for n in names if _LAYER.match(n)]
    if layers:
        return [("", layers, False)], "layerN"
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        stages = [f"features.{n}" for n, c in features.named_children() if _container(c)]
        if stages:
            return [("", stages, False)], "features.N"
    return [], ""


def _declared_stage(model: nn.Module, scopes, owner: str, order: dict) -> tuple | None:
    """(scope index, stage index) of the innermost declaration holding ``owner``."""
    for k in sorted(range(len(scopes)), key=lambda k: -len(scopes[k][0])):
        scope, taps, onward = scopes[k]
        if scope and not _within(owner, scope):
            continue
        rel = owner[len(scope) + 1:] if scope else owner
        for i, t in enumerate(taps):
            if _within(rel, t) or (onward and order.get((scope, t), -1) >= order.get((scope, rel), 1 << 30)):
                return (k, i)
        return None
    return None


def _stages(model: nn.Module, found: list[dict], canonical) -> tuple[list[int], list[int], str]:
    """Each site's stage and stride, and where the stages came from: the model's own
    declaration where it has one that holds every site and is not coarser than the
    strides, else the output stride."""
    strides = [_stride(canonical, f["node"], f["axis"]) for f in found]
    by_stride = {s: i + 1 for i, s in enumerate(sorted(set(strides)))}
    scopes, source = _declarations(model)
    if scopes and found:
        order = {}
        for scope, _, _ in scopes:
            sub = model.get_submodule(scope) if scope else model
            order.update({(scope, p): i for i, (p, _) in enumerate(sub.named_modules())})
        keys = [_declared_stage(model, scopes, f["graph"].path, order) for f in found]
        held = [k for k in keys if k is not None]
        rank = {k: i + 1 for i, k in enumerate(sorted(set(held)))}
        if len(held) == len(keys) and len(rank) >= len(by_stride):
            return [rank[k] for k in held], strides, f"declared ({source})"
    return [by_stride[s] for s in strides], strides, "by stride"


# ------------------------------------------------------------------ discovery


def _attention_scopes(graphs: list[ModuleGraph], views: dict[int, GraphView]) -> set[str]:
    out = set()
    for g in graphs:
        if g.graph is None:
            continue
        if any(n.op in ("call_function", "call_method") and views[id(g)].is_gate_mul(n) for n in g.graph.nodes):
            out.add(g.path)
    return out


def _within(path: str, block: str) -> bool:
    return not block or path == block or path.startswith(block + ".")


def discover(model: nn.Module, input_size=None, *, tracer_kwargs=None, count_macs: bool = False) -> Analysis:
    """Trace, propagate shapes and classify every join. See :func:`find_sites`.

    With ``count_macs``, the same fake pass also counts the model's MACs (``Analysis.macs``).
    """
    check_model(model)
    size = resolve_input_size(model, input_size)
    canonical = resolve_input_size(model, _config_size(model) or 224)
    mg = trace_model(model, size, canonical_size=canonical, tracer_kwargs=tracer_kwargs, count_macs=count_macs)
    by_module = {id(g.module): g for g in mg.graphs}
    memo: dict = {}
    views: dict[int, GraphView] = {}
    for g in mg.graphs:
        if g.graph is not None:
            views[id(g)] = GraphView(g, by_module, memo, views)
    rejected: list[tuple[str, str]] = []
    blocked: dict[str, str] = {}  # modules with joins that cannot be rewritten, and why
    found = _outer_sums(_joins(mg, views, rejected, blocked), rejected)
    found += _blocks(mg, views, found)
    found.sort(key=lambda f: f["node"].meta.get("order", 0))  # the order the model runs them
    sites, source = _name_and_number(model, found, mg.stride_size or size, views)
    return _analysis(model, size, mg, sites, blocked, rejected, source)


def _joins(mg: ModelGraphs, views: dict[int, GraphView], rejected: list, blocked: dict) -> list[dict]:
    """Facts of every join that is a site, in graph order; the others go to ``rejected``."""
    found: list[dict] = []
    for g in mg.graphs:
        if g.graph is None or g.error:
            continue
        view = views[id(g)]
        for n in g.graph.nodes:
            if not is_join(n) or not n.meta.get("tensor") or "shape" not in n.meta:
                continue  # arithmetic on sizes (1 + H * W) is no join
            facts, why = (_residual if is_add(n) else _concat)(view, n)
            label = f"{g.path or '<model>'}:{n.name}"
            if facts is None:
                if why:
                    rejected.append((label, why))
                elif is_add(n) and (s := shape(n)) is not None and len(s) == 4:
                    rejected.append((label, "channel axis unknown (no conv, norm or linear layer produces it)"))
                continue
            if g.train_dependent:
                rejected.append((label, f"{g.path or '<model>'}.forward takes other paths in train mode, so it "
                                        "cannot be rewritten"))
                blocked.setdefault(g.path or "<model>", "its forward takes different paths in train and eval mode")
                continue
            found.append(dict(facts, graph=g, node=n))
    return found


def _outer_sums(found: list[dict], rejected: list) -> list[dict]:
    """A sum of several branches is one join: its inner partial sums are not sites."""
    sums = {f["node"] for f in found if f["kind"] == "branch_sum"}
    outer = []
    for f in found:
        n = f["node"]
        if f["kind"] == "branch_sum" and _next_use(n) in sums:
            rejected.append((f"{f['graph'].path or '<model>'}:{n.name}", "inner part of a sum of branches"))
            continue
        outer.append(f)
    return outer


def _analysis(model: nn.Module, size, mg: ModelGraphs, sites: list[Site], blocked: dict[str, str],
              rejected: list[tuple[str, str]], stage_source: str) -> Analysis:
    untraced = mg.untraced() + list(blocked.items()) + (
        [("<model>", f"the forward stopped: {mg.stopped}")] if mg.stopped else [])
    return Analysis(tuple(sites), size, tuple(untraced), tuple(rejected), mg, mg.stopped, type(model).__name__,
                    fingerprint(model), sum(p.numel() for p in model.parameters()), stage_source)


def _next_use(n: fx.Node) -> fx.Node | None:
    """The one node that reads ``n``, past drop-path and identity calls of its shape."""
    while len(n.users) == 1:
        u = next(iter(n.users))
        if u.op != "call_module" or shape(u) != shape(n) or tensor_inputs(u) != [n] or len(u.users) != 1:
            return u
        n = u
    return None


def _name_and_number(model: nn.Module, found: list[dict], canonical, views) -> tuple[list[Site], str]:
    scopes = _attention_scopes([v.mg for v in views.values()], views)
    residual_owners = {f["graph"].path for f in found if f["kind"] == "residual"}
    stages, strides, source = _stages(model, found, canonical)
    sites: list[Site] = []
    per_owner: dict[str, int] = {}
    per_stage: dict[int, int] = {}
    for f, stage, stride in zip(found, stages, strides):
        g: ModuleGraph = f["graph"]
        owner = g.path
        k = per_owner[owner] = per_owner.get(owner, 0) + 1
        name = f["node"].name if not owner else owner if k == 1 else f"{owner}:{k}"
        block = per_stage[stage] = per_stage.get(stage, 0) + 1
        # has_attention is a property of the residual block that holds the join.
        blk = owner
        if f["kind"] not in ("residual", "block"):
            blk = next((p for p in reversed(_prefixes(owner)) if p in residual_owners), owner)
        holder = model.get_submodule(blk) if blk else model
        attention = f.get("fusion_attention", False) or any(
            type(m).__name__ in ATTENTION_CLASSES for m in holder.modules()) or any(_within(s, blk) for s in scopes)
        sites.append(Site(name=name, kind=f["kind"], owner=owner, owner_type=type(g.module).__name__, stage=stage,
                          block=block, channels=f["channels"], spatial=f["spatial"], stride=stride,
                          channel_dim=f["channel_dim"], in_channels=f["in_channels"], in_spatial=f["in_spatial"],
                          has_attention=attention, node=f["node"].name, branch_arg=f["branch_arg"],
                          inner=f.get("inner"), inner_channels=f.get("inner_channels"),
                          inner_spatial=f.get("inner_spatial"), layer_scale=f.get("layer_scale", False),
                          fork=f.get("fork", ""), fusion=f.get("fusion"), fusion_channels=f.get("fusion_channels"),
                          fusion_spatial=f.get("fusion_spatial")))
    return sites, source


def find_sites(model: nn.Module | Analysis, input_size=None, *, tracer_kwargs=None) -> list[Site]:
    """Find every join in ``model`` where SE can go, without changing or running it.

    Every module the model calls is traced with ``torch.fx`` on its own, as the model
    calls it, and shapes come from one forward on fake tensors through a copy of the
    model (no hook runs, no attribute or buffer of ``model`` changes, no weight is
    copied). Returns residual, branch-sum, concat and block sites in model order.

    Stages are the model's own where it declares them (timm ``feature_info`` module
    paths, torchvision's ``layerN`` or ``features.N`` containers) and the declaration
    holds every site; else they are numbered by output stride, measured at the model's
    own input size (timm ``pretrained_cfg``) or 224. Either way they do not depend on
    ``input_size``; :func:`discover`'s ``stage_source`` says which.

    Args:
        model: any ``nn.Module`` taking one image batch, or its :class:`Analysis`.
        input_size: ``N``, ``(H, W)`` or ``(C, H, W)`` of the example input; default
            the model's timm ``pretrained_cfg`` size, else 3x224x224.
        tracer_kwargs: ``leaf_modules``, ``autowrap_functions``, ``autowrap_modules``
            and ``concrete_args`` for models that do not trace as they are (see
            :class:`~se_surgery._trace.TracerOptions`).

    Returns:
        Frozen :class:`Site` records.

    Example:
        >>> import torchvision, se_surgery
        >>> sites = se_surgery.find_sites(torchvision.models.resnet50())
        >>> len(sites), sites[0].name, sites[0].channels, sites[-1].spatial, sites[-1].stage
        (16, 'layer1.0', 256, (7, 7), 4)
    """
    d = analysis_of(model, input_size, tracer_kwargs)
    if d.stopped and not d.sites:
        raise TraceError(f"cannot find the joins of {forward_failed(d)}")
    return list(d.sites)


def analysis_of(model, input_size=None, tracer_kwargs=None, *, count_macs: bool = False) -> Analysis:
    """``model`` itself when it is an :class:`Analysis` (then ``input_size`` and
    ``tracer_kwargs`` must be None: they were the analysis's), else its discovery."""
    if isinstance(model, Analysis):
        if input_size is not None or tracer_kwargs is not None:
            raise ModelTypeError("input_size and tracer_kwargs belong to analyze(); an Analysis already has them "
                                 f"(input size {'x'.join(map(str, model.input_size))})")
        return model
    return discover(model, input_size, tracer_kwargs=tracer_kwargs, count_macs=count_macs)


def forward_failed(d: Analysis) -> str:
    """``Net: its forward failed on ...: why; what to do`` for a model discovery could not run."""
    size = "x".join(map(str, d.input_size))
    return (f"{d.model}: its forward failed on a fake input of size {size}: {d.stopped}. Discovery "
            f"calls forward(x) with one image tensor of shape (1, {size.replace('x', ', ')}); for a forward that "
            "takes a dict, several inputs or other arguments, wrap the model in a module whose forward(x) calls it "
            "(return self.model({'image': x})), or fix the other arguments with "
            "tracer_kwargs={'concrete_args': {...}}")
