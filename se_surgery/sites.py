"""Sites: the joins in a model where SE can go, found structurally in each module's graph."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import cast

import torch.fx as fx
from torch import nn

from .errors import ModelTypeError, TraceError
from .inner import find_inner
from .nodes import (
    ATTENTION_CLASSES,
    GraphView,
    add_operands,
    ancestors,
    callable_name,
    cat_inputs,
    is_add,
    is_cat,
    is_channel_cat,
    is_split,
    shape,
)
from .trace import ModelGraphs, ModuleGraph, trace_model

__all__ = ["Site", "Discovery", "find_sites", "discover", "resolve_input_size", "KINDS"]

KINDS = ("residual", "branch_sum", "concat")


@dataclass(frozen=True)
class Site:
    """One join where SE can go.

    Attributes:
        name: the owner's dotted path (``layer3.2``); ``owner:2``, ``owner:3`` for an
            owner's second and later joins; the fx node name for joins in the root
            model's own forward.
        kind: ``"residual"``, ``"branch_sum"`` or ``"concat"``.
        owner: dotted path of the innermost module whose forward performs the join.
        owner_type: class name of that module.
        stage: 1-based, by output stride (see :func:`find_sites`).
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

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("spatial", "in_spatial", "inner", "inner_spatial"):
            d[k] = list(d[k]) if d[k] else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Site":
        d = dict(d)
        for k in ("spatial", "in_spatial", "inner", "inner_spatial"):
            d[k] = tuple(d[k]) if d.get(k) else None
        return cls(**d)


@dataclass
class Discovery:
    """Everything discovery learned: the sites, what it passed over, and the graphs it read."""

    sites: list[Site]
    input_size: tuple[int, int, int]
    untraced: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (join, why it is no site)
    graphs: ModelGraphs | None = field(default=None, repr=False)
    stopped: str | None = None

    def graph_of(self, owner: str) -> ModuleGraph:
        """The traced graph of the module at ``owner`` (the one the sites were found in)."""
        for g in self.graphs.graphs:
            if g.path == owner:
                return g
        raise KeyError(owner)


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
    fork = view.fork(*operands)
    if fork is None:
        if not all(view.from_input(o) for o in operands):
            return None, "the operands share no common input (two unrelated tensors)"
        args = [view.inputs_of(o) for o in operands]
        # A shortcut the caller passes in (DLA's ``block(x, shortcut)``): one operand is that
        # argument itself (or a projection of it), the other a branch of another argument.
        for skip in (0, 1):
            o, other = operands[skip], operands[1 - skip]
            if o.op == "placeholder" and args[skip].isdisjoint(args[1 - skip]) and _separate_argument(view, o) \
                    and any(view.node_kind(x) != "linear" for x in ancestors(other) | {other}):
                facts = _facts(view, n, "residual", None, 1 - skip)
                return facts, None
        # Inputs the forward got as one list (HRNet's resolutions), or unrelated branches: fusion.
        return _facts(view, n, "branch_sum", None, None), None
    if shape(fork) is None:  # the fork is a list or tuple of tensors
        if is_split(fork):
            return None, "split-sum: the operands are parts of one tensor (Res2Net-style hierarchical sum)"
        return _facts(view, n, "branch_sum", None, None), None
    if fork is operands[0] and fork is operands[1]:
        return None, "both operands are the same tensor"
    proj = [view.is_projection(fork, o) for o in operands]
    nonlin = [view.has_nonlinearity(fork, o) for o in operands]
    if proj[0] != proj[1]:
        branch = 0 if proj[1] else 1
        if not nonlin[branch]:
            return None, "the branch holds no nonlinearity (an addition inside a layer such as a normalisation)"
        facts = _facts(view, n, "residual", fork, branch)
        if facts is not None:
            facts["layer_scale"] = _layer_scaled(view, fork, operands[branch])
        point = find_inner(view, fork, operands[branch], view.views) if facts else None
        if point is not None:
            chain, node, channels, spatial = point
            facts.update(inner=(*chain, node), inner_channels=channels, inner_spatial=spatial)
        return facts, None
    if all(proj) or all(nonlin):
        return _facts(view, n, "branch_sum", None, None), None  # parallel branches, none a skip of the other
    return None, "neither operand is a skip of the other, and one holds no nonlinearity"


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
            "axis": axis}


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
    return {"kind": "concat", "channels": out[1], "spatial": tuple(out[2:4]), "channel_dim": 1,
            "in_channels": None, "in_spatial": None, "branch_arg": None, "axis": 1}, None


def _stride(size: tuple[int, int, int], n: fx.Node, axis: int) -> int:
    s = n.meta.get("canon_shape") or n.meta["shape"]
    h = s[2] if axis == 1 else s[1]
    return 2 ** max(0, round(math.log2(max(size[1] / max(h, 1), 1))))


def _declared_reductions(model: nn.Module) -> list[int]:
    """Reductions of the stages the model declares (timm ``feature_info``), if any."""
    info = getattr(model, "feature_info", None)
    try:
        out = sorted({int(f["reduction"]) for f in info if isinstance(f, dict) and "reduction" in f})
    except TypeError:
        return []
    return out


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


def discover(model: nn.Module, input_size=None, *, tracer_kwargs=None, count_macs: bool = False) -> Discovery:
    """Trace, propagate shapes and classify every join. See :func:`find_sites`.

    With ``count_macs``, the same fake pass also counts the model's MACs (``graphs.macs``).
    """
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    size = resolve_input_size(model, input_size)
    canonical = resolve_input_size(model, _config_size(model) or 224)
    mg = trace_model(model, size, canonical_size=canonical, tracer_kwargs=tracer_kwargs, count_macs=count_macs)
    by_module = {id(g.module): g for g in mg.graphs}
    memo: dict = {}
    views: dict[int, GraphView] = {}
    for g in mg.graphs:
        if g.graph is not None:
            views[id(g)] = GraphView(g, by_module, memo, views)
    found: list[dict] = []
    rejected: list[tuple[str, str]] = []
    blocked: dict[str, str] = {}  # modules with joins that cannot be rewritten, and why
    for g in mg.graphs:
        if g.graph is None or g.error:
            continue
        view = views[id(g)]
        for n in g.graph.nodes:
            if not (is_add(n) or is_cat(n)) or not n.meta.get("tensor") or "shape" not in n.meta:
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
    found.sort(key=lambda f: f["node"].meta.get("order", 0))  # the order the model runs them
    # A sum of several branches is one join: its inner partial sums are not sites.
    sums = {f["node"] for f in found if f["kind"] == "branch_sum"}
    outer = []
    for f in found:
        n = f["node"]
        if f["kind"] == "branch_sum" and len(n.users) == 1 and next(iter(n.users)) in sums:
            rejected.append((f"{f['graph'].path or '<model>'}:{n.name}", "inner part of a sum of branches"))
            continue
        outer.append(f)
    return Discovery(_name_and_number(model, outer, mg.stride_size or size, views), size,
                     mg.untraced() + list(blocked.items())
                     + ([("<model>", f"the forward stopped: {mg.stopped}")] if mg.stopped else []),
                     rejected, mg, mg.stopped)


def _name_and_number(model: nn.Module, found: list[dict], canonical, views) -> list[Site]:
    scopes = _attention_scopes([v.mg for v in views.values()], views)
    residual_owners = {f["graph"].path for f in found if f["kind"] == "residual"}
    declared = _declared_reductions(model)
    strides = []
    for f in found:
        s = _stride(canonical, f["node"], f["axis"])
        if declared:
            s = min((r for r in declared if r >= s), default=s)
        strides.append(s)
    stage_of = {s: i + 1 for i, s in enumerate(sorted(set(strides)))}
    sites: list[Site] = []
    per_owner: dict[str, int] = {}
    per_stage: dict[int, int] = {}
    for f, stride in zip(found, strides):
        g: ModuleGraph = f["graph"]
        owner = g.path
        k = per_owner[owner] = per_owner.get(owner, 0) + 1
        name = f["node"].name if not owner else owner if k == 1 else f"{owner}:{k}"
        stage = stage_of[stride]
        block = per_stage[stage] = per_stage.get(stage, 0) + 1
        # has_attention is a property of the residual block that holds the join.
        blk = owner
        if f["kind"] != "residual":
            parts = owner.split(".") if owner else []
            for cut in range(len(parts), -1, -1):
                if ".".join(parts[:cut]) in residual_owners:
                    blk = ".".join(parts[:cut])
                    break
        holder = model.get_submodule(blk) if blk else model
        attention = any(type(m).__name__ in ATTENTION_CLASSES for m in holder.modules()) or any(
            _within(s, blk) for s in scopes)
        sites.append(Site(name=name, kind=f["kind"], owner=owner, owner_type=type(g.module).__name__, stage=stage,
                          block=block, channels=f["channels"], spatial=f["spatial"], stride=stride,
                          channel_dim=f["channel_dim"], in_channels=f["in_channels"], in_spatial=f["in_spatial"],
                          has_attention=attention, node=f["node"].name, branch_arg=f["branch_arg"],
                          inner=f.get("inner"), inner_channels=f.get("inner_channels"),
                          inner_spatial=f.get("inner_spatial"), layer_scale=f.get("layer_scale", False)))
    return sites


def find_sites(model: nn.Module, input_size=None, *, tracer_kwargs=None) -> list[Site]:
    """Find every join in ``model`` where SE can go, without changing or running it.

    Every module the model calls is traced with ``torch.fx`` on its own, as the model
    calls it, and shapes come from one forward on fake tensors through a copy of the
    model (no hook runs, no attribute or buffer of ``model`` changes, no weight is
    copied). Returns residual, branch-sum and concat sites in model order.

    Stages are numbered by output stride, measured at the model's own input size
    (timm ``pretrained_cfg``) or 224, so they do not depend on ``input_size``.

    Args:
        model: any ``nn.Module`` taking one image batch.
        input_size: ``N``, ``(H, W)`` or ``(C, H, W)`` of the example input; default
            the model's timm ``pretrained_cfg`` size, else 3x224x224.
        tracer_kwargs: ``leaf_modules``, ``autowrap_functions``, ``autowrap_modules``
            and ``concrete_args`` for models that do not trace as they are (see
            :class:`~se_surgery.trace.TracerOptions`).

    Returns:
        Frozen :class:`Site` records.

    Example:
        >>> import torchvision, se_surgery
        >>> sites = se_surgery.find_sites(torchvision.models.resnet50())
        >>> len(sites), sites[0].name, sites[0].channels, sites[-1].spatial, sites[-1].stage
        (16, 'layer1.0', 256, (7, 7), 4)
    """
    d = discover(model, input_size, tracer_kwargs=tracer_kwargs)
    if d.stopped and not d.sites:
        raise TraceError(f"cannot find the joins of {forward_failed(model, d)}")
    return d.sites


def forward_failed(model: nn.Module, d: Discovery) -> str:
    """``Net: its forward failed on ...: why; what to do`` for a model discovery could not run."""
    size = "x".join(map(str, d.input_size))
    return (f"{type(model).__name__}: its forward failed on a fake input of size {size}: {d.stopped}. Discovery "
            f"calls forward(x) with one image tensor of shape (1, {size.replace('x', ', ')}); for a forward that "
            "takes a dict, several inputs or other arguments, wrap the model in a module whose forward(x) calls it "
            "(return self.model({'image': x})), or fix the other arguments with "
            "tracer_kwargs={'concrete_args': {...}}")
