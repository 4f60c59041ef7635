"""Insertion: rewrite the forward of each module that owns a selected site."""

from __future__ import annotations

import copy
import operator
import warnings
from collections import OrderedDict

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import modules
from .errors import PlanError, SESurgeryWarning, TraceError
from .plan import Plan, PlannedSite, plan as make_plan
from .se import SqueezeExcite
from .sites import add_operands, is_add, is_cat, is_join
from .shapes import annotate_call, record_calls
from .trace import concrete_args_for, eval_mode, model_device_dtype, trace_local

__all__ = ["apply", "build_owner"]

_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish, nn.CELU, nn.SELU)
_ACTIVATION_NAMES = {"ReLU", "ReLU6", "GELU", "GELUTanh", "QuickGELU", "SiLU", "Swish", "HardSwish", "Hardswish",
                     "Mish", "LeakyReLU", "ELU"}
_ACTIVATION_FUNCTIONS = {F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu, F.elu, F.mish}
_ACTIVATION_METHODS = {"relu", "relu_", "gelu", "silu", "silu_"}
_SHAPE_READS = {"size", "dim", "shape"}


def _is_activation(n: fx.Node, owner: nn.Module) -> bool:
    if n.op == "call_module":
        m = owner.get_submodule(n.target)
        return isinstance(m, _ACTIVATION_MODULES) or type(m).__name__ in _ACTIVATION_NAMES
    if n.op == "call_function":
        import torch

        return n.target in _ACTIVATION_FUNCTIONS or n.target in (torch.relu, torch.relu_)
    return n.op == "call_method" and n.target in _ACTIVATION_METHODS


def _data_inputs(n: fx.Node) -> list[fx.Node]:
    # Without shapes in the local graph, shape reads are the edges that carry no data.
    return [a for a in n.all_input_nodes
            if not (a.op == "call_method" and a.target in _SHAPE_READS)
            and not (a.op == "call_function" and getattr(a.target, "__name__", "") == "getattr")]


def _ancestors(n: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = _data_inputs(n)
    while stack:
        a = stack.pop()
        if a not in seen:
            seen.add(a)
            stack.extend(_data_inputs(a))
    return seen


def _se_name(owner: nn.Module, k: int, taken: set[str]) -> str:
    base = "se" if k == 1 else f"se_{k}"
    name = base
    while hasattr(owner, name) or name in taken:
        name = "se_inserted" if name == base else name + "_"
    taken.add(name)
    return name


_FRESH_OUTPUT = (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def _private_fresh(branch: fx.Node, join: fx.Node, owner: nn.Module) -> bool:
    """Whether the join may overwrite ``branch``: a new tensor made by a conv or norm layer
    (exact class, no forward hooks) that only the join reads, as in ``out += identity``."""
    if branch.op != "call_module" or len(branch.users) != 1 or join not in branch.users:
        return False
    try:
        m = owner.get_submodule(branch.target)
    except AttributeError:  # an SE module inserted at an earlier join of this owner
        return False
    return type(m) in _FRESH_OUTPUT and not m._forward_hooks


def _insert(graph: fx.Graph, owner: nn.Module, entry: PlannedSite, node: fx.Node, se_name: str,
            se: nn.Module) -> None:
    site, variant = entry.site, entry.options.variant
    if site.kind == "concat" or variant == "post":
        target = node
        users = list(node.users)
        if variant == "post" and len(users) == 1 and _is_activation(users[0], owner):
            target = users[0]
        with graph.inserting_after(target):
            new = graph.call_module(se_name, (target,))
        target.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        return
    ops = add_operands(node)
    if len(ops) != 2 or not all(isinstance(o, fx.Node) for o in ops):
        raise TraceError(f"site {site.name}: the join in {site.owner_type}.forward no longer has two tensor operands")
    branch, skip = ops[site.branch_arg], ops[1 - site.branch_arg]
    if variant == "standard" and not modules.supports_skip(se):  # a user's module: skip + module(branch)
        with graph.inserting_before(node):
            new = graph.call_function(operator.add, (skip, graph.call_module(se_name, (branch,))))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    elif variant == "standard":
        # One fused addcmul (skip + branch * gate) instead of a mul and an add; written
        # into the branch's own fresh tensor where nothing else can see it (inference).
        kwargs = {"inplace": True} if isinstance(se, SqueezeExcite) and _private_fresh(branch, node, owner) else {}
        with graph.inserting_before(node):
            new = graph.call_module(se_name, (branch, skip), kwargs)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    elif variant == "identity":
        with graph.inserting_before(node):
            new = graph.call_module(se_name, (skip,))
        node.replace_input_with(skip, new)
    elif variant == "pre":
        anc_b, anc_s = _ancestors(branch) | {branch}, _ancestors(skip) | {skip}
        common = [c for c in anc_b & anc_s if c.op != "get_attr"]
        if not common:
            raise TraceError(f"site {site.name}: no common input of the two paths in {site.owner_type}.forward")
        order = {n: i for i, n in enumerate(graph.nodes)}
        fork = max(common, key=order.__getitem__)
        users = [u for u in fork.users if u in anc_b and u not in anc_s and u is not node]
        if not users:
            raise TraceError(f"site {site.name}: the residual branch does not start at the block's input")
        with graph.inserting_after(fork):
            new = graph.call_module(se_name, (fork,))
        for u in users:
            u.replace_input_with(fork, new)
    else:  # pragma: no cover - rules validation rejects other variants
        raise PlanError(f"unknown variant {variant!r}")


def _local_graph(module: nn.Module, path: str, calls: list | None = None) -> fx.Graph:
    """Trace the owner's own forward as the model calls it (``calls``, see
    :func:`~se_surgery.shapes.record_calls`); refuse owners whose forward depends on ``training``."""
    concrete = concrete_args_for(module, path, [c[0] for c in calls or ()])
    # The caller holds eval_mode(module), which restores every module's own flag.
    module.train(False)
    graph = trace_local(module, path, concrete)
    module.train(True)
    other = trace_local(module, path, concrete)
    if graph.python_code("self").src != other.python_code("self").src:
        raise TraceError(
            f"cannot rewrite {path or '<model>'} ({type(module).__name__}): its forward takes different paths in "
            "train and eval mode, which one fx graph cannot express"
        )
    return graph


def build_owner(module: nn.Module, path: str, entries: list[PlannedSite], *, input_size=None,
                rules=None, calls: list | None = None, device_dtype=None) -> fx.GraphModule:
    """A GraphModule computing ``module``'s forward with SE at the given sites.

    The result shares every child, parameter and buffer with ``module`` (same objects,
    same names, same order) and adds the SE modules after them. ``input_size`` and
    ``rules`` are the plan's; each SE module keeps them so that ``save_se`` can record
    the surgery and ``load_se`` redo it at the same size. SE modules are created on the
    block's device and dtype (``device_dtype``, the model's, for a block without tensors).
    """
    with eval_mode(module):  # restores training flags and what tracing writes into attributes (caches)
        graph = _local_graph(module, path, calls)
    # Count joins of tensors only, as discovery does: with shapes from how the model
    # calls the block, arithmetic on sizes (1 + H * W) is told apart from real joins.
    shaped = bool(calls) and annotate_call(module, graph, calls[0][1])
    joins = [n for n in graph.nodes if is_join(n) and (n.meta.get("tensor") or not shaped)]
    device, dtype = model_device_dtype(module, device_dtype)
    taken: set[str] = set()
    new_modules: dict[str, nn.Module] = {}
    # A module the model calls several times (a shared block) performs its joins once per
    # call: discovery numbers them on across calls, one graph holds them once.
    n_calls = len(calls) if calls else 1
    done: dict[int, str] = {}
    k = 0
    for entry in entries:
        site = entry.site
        if site.join_index >= len(joins) * n_calls:
            raise TraceError(f"site {site.name}: {type(module).__name__}.forward has only {len(joins)} joins")
        index = site.join_index % len(joins)
        if index in done:
            warnings.warn(f"site {site.name} is the join of site {done[index]} again (the model calls {path} "
                          f"{n_calls} times): both share one SE module", SESurgeryWarning, stacklevel=3)
            continue
        done[index] = site.name
        k += 1
        node = joins[index]
        if (site.kind == "residual") != is_add(node) or (site.kind == "concat") != is_cat(node):
            raise TraceError(f"site {site.name}: join {site.join_index} of {type(module).__name__}.forward "
                             f"is {node.format_node()}, not a {site.kind}")
        name = _se_name(module, k, taken)
        o = entry.options
        se = modules.create(o.module, entry.se_channels, o.module_options(), channel_dim=site.channel_dim,
                            device=device, dtype=dtype)
        se.train(module.training)
        se.se_site, se.se_options, se.se_rule = site, o, entry.rule
        se.se_input_size, se.se_rules = input_size, rules
        new_modules[name] = se
        _insert(graph, module, entry, node, name, se)
    graph.lint()
    # Same children, parameters and buffers under the same names and order as the
    # original, so every state_dict key and tensor is unchanged. GraphModule's own
    # constructor keeps only what the graph uses, so the dicts are set again after it.
    state = {
        "_modules": OrderedDict(module._modules, **new_modules),
        "_parameters": OrderedDict(module._parameters),
        "_buffers": OrderedDict(module._buffers),
    }
    root = nn.Module()
    root.__dict__.update(state)
    gm = SEGraphModule(root, graph, class_name=type(module).__name__)
    gm.__dict__.update(state)
    gm._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    gm.training = module.training
    for key, value in module.__dict__.items():
        if not key.startswith("_") and key not in gm.__dict__ and not hasattr(type(gm), key):
            gm.__dict__[key] = value  # plain attributes users read (stride, drop_path_rate, ...)
    # strip() rebuilds the original block from this shell: its class and plain state,
    # without children or tensors (those live on in the GraphModule).
    shell = module.__class__.__new__(module.__class__)
    shell.__dict__.update(module.__dict__)
    shell.__dict__.update(_modules=OrderedDict((k, None) for k in module._modules), _parameters=OrderedDict(),
                          _buffers=OrderedDict())
    gm.__dict__["se_surgery_original"] = shell
    return gm


_FORCED = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set", "training")


class SEGraphModule(fx.GraphModule):
    """A block whose forward se-surgery rewrote to call SE modules.

    A plain ``GraphModule`` keeps only what its graph uses when it is copied or
    unpickled; this one keeps the block's every child, tensor, attribute and their
    order, so ``copy.deepcopy`` and ``pickle`` give back the same ``state_dict`` and
    :func:`se_surgery.strip` still finds the original class.
    """

    def __deepcopy__(self, memo):
        res = type(self).__new__(type(self))
        memo[id(self)] = res
        body = copy.deepcopy(self.__dict__, memo)
        _init_from_body(res, body, body["_graph"], type(self).__name__)
        return res

    def __reduce__(self):
        fn, args = super().__reduce__()
        return (_rebuild, (fn, args, type(self).__name__))


class _Holder(nn.Module):
    def __init__(self, body: dict):
        super().__init__()
        self.__dict__ = body


def _init_from_body(res: SEGraphModule, body: dict, graph: fx.Graph, class_name: str) -> None:
    SEGraphModule.__init__(res, _Holder(body), graph, class_name=class_name)
    for k in _FORCED:
        res.__dict__[k] = body[k]
    for k, v in body.items():
        if k not in res.__dict__:
            res.__dict__[k] = v


def _rebuild(fn, args, class_name: str) -> SEGraphModule:
    """Unpickle: let torch rebuild a GraphModule, then restore what it dropped."""
    plain = fn(*args)
    res = SEGraphModule.__new__(SEGraphModule)
    _init_from_body(res, args[0], plain.graph, class_name)
    return res


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` where the module at ``path`` is, and wherever else the model holds
    that same object (a block shared by several parents, as CoaT's ``cpe``)."""
    old = model.get_submodule(path)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is old:
                parent._modules[name] = module


def apply(model: nn.Module, rules=None, *, input_size=None, strict: bool = False, inplace: bool = False,
          _discovery=None) -> nn.Module:
    """Insert SE modules into ``model`` where ``rules`` say, keeping every weight.

    The plan is resolved and validated in full first; the model is then copied (unless
    ``inplace=True``) and only the modules that own a selected site are replaced by
    rewritten ``torch.fx.GraphModule``s that share the original children. The returned
    model has the same class; every original ``state_dict`` key and tensor is unchanged
    and SE weights appear under ``<owner>.se...``. On any error the given model is
    exactly as it was.

    Args:
        model: the model (torchvision, timm or any ``nn.Module``).
        rules: path, preset name, dict, Rules or rule list; ``None`` = ``all_stages``.
        input_size: example input size used for discovery (shapes only).
        strict: raise instead of warning for rules that select nothing and for blocks
            that cannot be traced or rewritten.
        inplace: modify ``model`` itself instead of a copy.

    Example:
        >>> import torch, torchvision, se_surgery
        >>> base = torchvision.models.resnet50().eval()
        >>> model = se_surgery.apply(base, "all_stages")
        >>> type(model).__name__, sum(p.numel() for p in model.parameters()) - 25_557_032
        ('ResNet', 2530992)
        >>> x = torch.randn(1, 3, 224, 224)
        >>> torch.equal(model(x), base(x))
        True
    """
    p: Plan = make_plan(model, rules, input_size=input_size, strict=strict, _discovery=_discovery)
    if not p.entries:
        raise PlanError(
            f"found no residual or concat join in {type(model).__name__}: nothing to add SE to "
            "(se-surgery sites MODEL shows what discovery saw)"
        )
    target = model if inplace else copy.deepcopy(model)
    by_owner: dict[str, list[PlannedSite]] = {}
    for e in p.selected:
        by_owner.setdefault(e.site.owner, []).append(e)
    built: dict[str, nn.Module] = {}
    owners = {owner: target.get_submodule(owner) if owner else target for owner in by_owner}
    calls = record_calls(target, owners, p.input_size)  # how the model calls each owner
    device_dtype = model_device_dtype(target)
    for owner, entries in by_owner.items():
        module = owners[owner]
        try:
            built[owner] = build_owner(module, owner, entries, input_size=p.input_size, rules=p.rules,
                                       device_dtype=device_dtype,
                                       calls=calls.get(owner))
        except TraceError as e:
            if strict:
                raise
            warnings.warn(f"{e}; skipped site(s) {', '.join(x.site.name for x in entries)}",
                          SESurgeryWarning, stacklevel=2)
    # Nothing has been changed so far; swapping in cannot fail. Parents first, so a
    # nested owner is set on its parent's replacement.
    for owner in sorted(built, key=lambda o: (o.count(".") + bool(o), o)):
        if owner:
            _set(target, owner, built[owner])
    if "" in built:
        warnings.warn(f"joins in {type(model).__name__}.forward itself: the returned model is an fx GraphModule, "
                      f"not a {type(model).__name__}", SESurgeryWarning, stacklevel=2)
        return built[""]
    return target
