"""Insertion: rewrite the graph of each module that owns a planned site, then swap it in."""

from __future__ import annotations

import copy
import operator
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn

from . import modules
from ._fake import model_device_dtype
from ._inner import inline_path
from ._nodes import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, add_operands, ancestors, is_activation_module
from ._patch import OwnerPatch, copy_model, patched_class, source_of, swap
from ._plan import Plan, PlannedSite, check_plan, check_unpatched
from ._plan import plan as make_plan
from ._record import Inserted, PlanFacts, mark, set_facts
from ._rules import SEOptions
from ._se import SqueezeExcite
from ._sites import Analysis
from ._trace import ModuleGraph
from .errors import ModelTypeError, PlanError

__all__ = ["apply", "build_patches"]

_FRESH_OUTPUT = (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
def _is_activation(n: fx.Node, owner: nn.Module) -> bool:
    if n.op == "call_module":
        try:
            return is_activation_module(owner.get_submodule(cast(str, n.target)))
        except AttributeError:
            return False
    if n.op == "call_function":
        return n.target in ACTIVATION_FUNCTIONS
    return n.op == "call_method" and n.target in ACTIVATION_METHODS


def _private_fresh(branch: fx.Node, join: fx.Node, owner: nn.Module) -> bool:
    """Whether the join may overwrite ``branch``: a new tensor made by a conv or norm layer
    (exact class, no forward hooks) that only the join reads, as in ``out += identity``."""
    if branch.op != "call_module" or len(branch.users) != 1 or join not in branch.users:
        return False
    try:
        m = owner.get_submodule(cast(str, branch.target))
    except AttributeError:  # an SE module inserted at an earlier join of this owner
        return False
    return type(m) in _FRESH_OUTPUT and not m._forward_hooks


def _lone_relu(join: fx.Node, owner: nn.Module) -> fx.Node | None:
    """The ReLU that alone reads the join's output, where folding it into SE changes nothing
    anyone can see: a plain ``nn.ReLU`` without hooks, or ``F.relu`` / ``torch.relu``."""
    if len(join.users) != 1:
        return None
    u = next(iter(join.users))
    if not u.args or u.args[0] is not join or len(u.args) > 1 or set(u.kwargs) - {"inplace"}:
        return None
    if u.op == "call_module":
        try:
            m = owner.get_submodule(str(u.target))
        except AttributeError:
            return None
        hooked = m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
        return u if type(m) is nn.ReLU and not hooked else None
    if u.op == "call_function" and u.target in (torch.relu, nn.functional.relu):
        return u
    return u if u.op == "call_method" and u.target == "relu" else None


def _insert(graph: fx.Graph, owner: nn.Module, entry: PlannedSite, node: fx.Node, se_name: str,
            se: nn.Module) -> None:
    site, variant = entry.site, entry.options.variant
    if variant == "inner":  # ``node`` is the point inside the branch (see inner.py)
        with graph.inserting_after(node):
            new = graph.call_module(se_name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        return
    if site.kind != "residual" or variant in ("post", "fusion"):  # fusion: ``node`` is the point after the layer
        target = node
        users = list(node.users)
        if variant == "post" and len(users) == 1 and _is_activation(users[0], owner):
            target = users[0]
        with graph.inserting_after(target):
            new = graph.call_module(se_name, (target,))
        target.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        return
    _insert_residual(graph, owner, entry, node, se_name, se)


def _insert_residual(graph: fx.Graph, owner: nn.Module, entry: PlannedSite, node: fx.Node, se_name: str,
                     se: nn.Module) -> None:
    site, variant = entry.site, entry.options.variant
    ops = add_operands(node)
    b = cast(int, site.branch_arg)  # set on every add site
    branch, skip = ops[b], ops[1 - b]
    if variant == "standard" and not modules.supports_skip(se):  # a user's module: skip + module(branch)
        with graph.inserting_before(node):
            new = graph.call_function(operator.add, (skip, graph.call_module(se_name, (branch,))))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    elif variant == "standard":
        # One fused addcmul (skip + branch * gate) instead of a mul and an add; written
        # into the branch's own fresh tensor where nothing else can see it (inference).
        fresh = isinstance(se, SqueezeExcite) and _private_fresh(branch, node, owner)
        kwargs: dict[str, Any] = {"inplace": True} if fresh else {}
        relu = _lone_relu(node, owner) if isinstance(se, SqueezeExcite) else None
        if relu is not None:
            kwargs["act"] = "relu"  # the join's ReLU rides in the same pass
        with graph.inserting_before(node):
            new = graph.call_module(se_name, (branch, skip), kwargs)
        if relu is not None:
            relu.replace_all_uses_with(new)
            graph.erase_node(relu)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    elif variant == "identity":
        with graph.inserting_before(node):
            new = graph.call_module(se_name, (skip,))
        node.replace_input_with(skip, new)
    elif variant == "pre":
        # The fork discovery found (one definition of a join's fork, in nodes.GraphView.fork).
        fork = next(n for n in graph.nodes if n.name == site.fork)
        anc_b, anc_s = ancestors(branch) | {branch}, ancestors(skip) | {skip}
        users = [u for u in fork.users if u in anc_b and u not in anc_s and u is not node]
        with graph.inserting_after(fork):
            new = graph.call_module(se_name, (fork,))
        for u in users:
            u.replace_input_with(fork, new)
    else:  # pragma: no cover - the plan rejects other variants
        raise PlanError(f"unknown variant {variant!r}")


def _se_name(owner: nn.Module, k: int, taken: set[str]) -> str:
    base = "se" if k == 1 else f"se_{k}"
    name = base
    while hasattr(owner, name) or name in taken:
        name = "se_inserted" if name == base else name + "_"
    taken.add(name)
    return name


def _make_module(entry: PlannedSite, device, dtype) -> nn.Module:
    o = entry.options
    return modules.create(o.module, entry.se_channels, o.module_options(), channel_dim=entry.site.channel_dim,
                          device=device, dtype=dtype, block_channels=entry.site.in_channels)


def _inner_node(graph: fx.Graph, owner: nn.Module, mg: ModuleGraph, site, p: Plan) -> fx.Node:
    """The node after which ``inner`` SE goes, in ``graph``, inlining the modules on the way."""
    *chain, node = site.inner
    graphs, path, current = [], mg.path, mg
    for name in chain:
        target = cast(str, current.node(name).target)
        path = f"{path}.{target}" if path else target
        current = cast(Analysis, p.analysis).graph_of(path)
        module = owner.get_submodule(path[len(mg.path) + 1:] if mg.path else path)
        if module._forward_hooks or module._forward_pre_hooks:
            raise PlanError(f"site {site.name}: variant 'inner' would inline {path} ({type(module).__name__}), "
                            "which has hooks that would then no longer run; remove them or use another variant")
        graphs.append(current)
    return inline_path(graph, tuple(chain), node, graphs)


def rewrite(mg: ModuleGraph, owner: nn.Module, entries: list[PlannedSite], p: Plan, fallback) -> OwnerPatch:
    """The patch for one owner: its planned graph with SE at ``entries``, and the SE modules."""
    graph = cast(fx.Graph, copy.deepcopy(mg.graph))  # the plan's graph stays as the user reviewed it
    nodes = {n.name: n for n in graph.nodes}
    device, dtype = model_device_dtype(owner, fallback)
    taken: set[str] = set()
    added: dict[str, nn.Module] = {}
    for k, entry in enumerate(entries, 1):
        name = _se_name(owner, k, taken)
        se = _make_module(entry, device, dtype)
        se.train(owner.training)
        # What save_se records, and report reads: the site, the options, the rule that decided.
        mark(se, Inserted(entry.site, cast(SEOptions, entry.options), entry.rule))
        added[name] = se
        if entry.options.variant == "inner":
            node = _inner_node(graph, owner, mg, entry.site, p)
        elif entry.options.variant == "fusion":
            node = nodes[cast(tuple, entry.site.fusion)[1]]  # in fusion[0]'s graph, this owner (build_patches)
        else:
            node = nodes[entry.site.node]
        _insert(graph, owner, entry, node, name, se)
    graph.lint()
    source, attrs = source_of(graph)
    # Per instance, not per class: blocks of one class may trace to different constants.
    attrs = {**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in mg.constants.items()}, **attrs}
    cls = patched_class(type(owner), source, tuple(added), tuple(attrs))
    return OwnerPatch(mg.path, cls, added, attrs)


def build_patches(model: nn.Module, p: Plan) -> list[OwnerPatch]:
    """Every owner's patch for ``model``, built without changing it."""
    by_owner: dict[str, list[PlannedSite]] = {}
    for e in p.selected:
        # A concat's fusion point may lie in the caller's graph (VoVNet: the cat is returned
        # and the block's conv_concat reads it): SE then belongs to that module.
        owner = cast(tuple, e.site.fusion)[0] if e.options.variant == "fusion" else e.site.owner
        by_owner.setdefault(owner, []).append(e)
    fallback = model_device_dtype(model)
    patches = []
    for owner, entries in by_owner.items():
        mg = cast(Analysis, p.analysis).graph_of(owner)
        module = model.get_submodule(owner) if owner else model
        patches.append(rewrite(mg, module, entries, p, fallback))
    return patches


def apply(model: nn.Module, rules=None, *, input_size=None, strict: bool = False, inplace: bool = False,
          tracer_kwargs=None) -> nn.Module:
    """Insert SE modules into ``model`` where ``rules`` say, keeping every weight.

    ``rules`` may be a :class:`~se_surgery.Plan` from :func:`se_surgery.plan` (of the
    model, or of its :class:`~se_surgery.Analysis`): what the user reviewed is then
    exactly what is cut, without tracing again (a plan made for a model of another
    structure is refused, naming both). ``model`` itself is always needed: an Analysis
    holds only a fake-tensor copy. Otherwise the plan is made here, resolved and validated in
    full first. The model is copied (unless ``inplace=True``); each module that owns a
    selected site stays the same object, with its class replaced by a generated
    subclass whose forward calls the SE modules, added as its children. ``isinstance``,
    methods and hooks survive; every original ``state_dict`` key and tensor is
    unchanged and SE weights appear under ``<owner>.se...``. On any error, Ctrl-C
    included, the given model is exactly as it was.

    Args:
        model: the model (torchvision, timm or any ``nn.Module``).
        rules: a Plan, path, preset name, dict, Rules or rule list; ``None`` = ``all_stages``.
        input_size: example input size used for discovery (shapes only).
        strict: raise instead of warning for rules that select nothing and for modules
            that cannot be traced.
        inplace: modify ``model`` itself instead of a copy.
        tracer_kwargs: tracer options (see :func:`se_surgery.find_sites`).

    Example:
        >>> import torch, torchvision, se_surgery
        >>> from torchvision.models.resnet import Bottleneck
        >>> base = torchvision.models.resnet50().eval()
        >>> model = se_surgery.apply(base, "all_stages")
        >>> type(model).__name__, sum(p.numel() for p in model.parameters()) - 25_557_032
        ('ResNet', 2530992)
        >>> isinstance(model.layer1[0], Bottleneck)
        True
        >>> x = torch.randn(1, 3, 224, 224)
        >>> torch.equal(model(x), base(x))
        True
    """
    p = _plan_for(model, rules, input_size, strict, tracer_kwargs)
    if not p.entries:
        raise PlanError(f"nothing to add SE to in {type(model).__name__}: it has no residual, branch-sum or concat "
                        "join (se-surgery sites MODEL -v shows every join and why it is no site)")
    target = model if inplace else copy_model(model)
    patches = build_patches(target, p)
    swap(target, patches)
    set_facts(target, plan_facts(p))
    return target


def plan_facts(p: Plan) -> PlanFacts:
    """The facts one apply of ``p`` records on the root model."""
    return PlanFacts(p.rules, p.input_size, p.fingerprint,
                     tuple((e.site.name, e.site.kind, e.site.channels) for e in p.entries))


def _plan_for(model, rules, input_size, strict: bool, tracer_kwargs) -> Plan:
    if isinstance(model, Analysis):
        raise ModelTypeError("apply needs the model itself, not its Analysis: se_surgery.apply(model, "
                             "se_surgery.plan(analysis, rules)) cuts what the analysis planned")
    check_unpatched(model, analysis_ok=False)
    if not isinstance(rules, Plan):
        return make_plan(model, rules, input_size=input_size, strict=strict, tracer_kwargs=tracer_kwargs)
    check_plan(rules, model)
    if input_size is not None or tracer_kwargs is not None:
        raise PlanError("input_size and tracer_kwargs belong to plan(); a Plan passed to apply() already has them")
    return rules
