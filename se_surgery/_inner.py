"""The ``inner`` placement: inside the residual branch, after its depthwise (or widest
spatial) convolution and that convolution's norm and activation, where MobileNetV3 and
EfficientNet put SE.

:func:`find_inner` locates the point structurally, descending into the modules the
branch calls; :func:`inline_path` makes it reachable from the owner's own graph by
inlining those modules' graphs, so the SE module still belongs to the residual block.
"""

from __future__ import annotations

from typing import Any, cast

import torch.fx as fx
from torch import nn

from ._compat import plain_codegen
from ._nodes import GraphView, is_activation_module
from ._trace import ModuleGraph

__all__ = ["InnerPoint", "find_inner", "follows", "inline_path", "mixed_conv"]

_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, nn.SyncBatchNorm)


class InnerPoint(tuple):
    """``(chain, node, channels, spatial)``: the call_module targets to descend through
    from the owner's graph, the node after which SE goes, and the map's size there."""


def _spatial_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1


def mixed_conv(m: nn.Module) -> bool:
    """A layer of several depthwise convs over channel groups (MixNet's MixedConv2d): one
    depthwise conv for placement."""
    kids = list(m.children())
    return len(kids) > 1 and all(isinstance(c, nn.Conv2d) and max(c.kernel_size) > 1 and c.groups > 1
                                 and c.groups == c.in_channels for c in kids)


def _score(m: nn.Conv2d) -> tuple[int, int]:
    depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
    return (1 if depthwise else 0, m.out_channels)


def _candidates(view: GraphView, nodes, chain: tuple, views: dict, depth: int = 0):
    """(score, calls, view, conv node) for each spatial conv the branch runs, descending
    into the modules it calls; ``calls`` are the call_module nodes passed on the way."""
    mg = view.mg
    for n in nodes:
        if n.op != "call_module":
            continue
        m = view.module(n)
        if m is None:
            continue
        if _spatial_conv(m):
            yield _score(cast(nn.Conv2d, m)), chain, view, n
            continue
        if mixed_conv(m):
            yield (1, sum(cast(nn.Conv2d, c).out_channels for c in m.children())), chain, view, n
            continue
        g = view.graphs.get(id(m))
        sub = views.get(id(g)) if g is not None else None
        # Only graphs that inline cleanly: traced, plain inputs, no stored constants.
        if sub is not None and depth < 8 and not g.error and plain_codegen(g.graph) \
                and not g.constants and mg is not g:
            yield from _candidates(sub, [x for x in g.graph.nodes if x.op not in ("placeholder", "output")],
                                   chain + ((n, view),), views, depth + 1)


def follows(view: GraphView, n: fx.Node) -> fx.Node:
    """Step past the norm and activation that read the conv's output alone."""
    while len(n.users) == 1:
        u = next(iter(n.users))
        if u.meta.get("shape") != n.meta.get("shape") or not u.args or u.args[0] is not n:
            break
        m = view.module(u) if u.op == "call_module" else None
        if m is None or not (isinstance(m, _NORMS) or is_activation_module(m) or "Norm" in type(m).__name__):
            break
        n = u
    return n


def find_inner(view: GraphView, fork: fx.Node, branch: fx.Node, views: dict) -> InnerPoint | None:
    """Where ``inner`` SE goes in the residual branch ``fork -> branch``, or None."""
    path = sorted(view.path(fork, branch), key=view.order.__getitem__)
    best = None
    for score, chain, v, n in _candidates(view, path, (), views):
        if best is None or score > best[0]:
            best = (score, chain, v, n)
    if best is None:
        return None
    _, chain, v, n = best
    n = follows(v, n)
    chain = list(chain)
    # Hoist while the point is what a descended-into module returns: then it lies right
    # after that module's call one level up, and fewer modules need inlining.
    while chain:
        out = next(x for x in reversed(v.mg.graph.nodes) if x.op == "output")
        if out.args[0] is not n:
            break
        call, v = chain.pop()
        n = follows(v, call)
    s = n.meta.get("shape")
    if s is None or len(s) != 4:
        return None
    return InnerPoint((tuple(c.name for c, _ in chain), n.name, s[1], (s[2], s[3])))


def inline_path(graph: fx.Graph, chain: tuple, node: str, graphs: list[ModuleGraph]) -> fx.Node:
    """Inline the modules called at the nodes named in ``chain`` into ``graph`` (their
    targets become dotted paths such as ``conv.1``) and return the node called ``node``
    of the innermost one. ``graphs`` are those modules' graphs, outermost first."""
    names = {n.name: n for n in graph.nodes}
    for name, child in zip(chain, graphs):
        call = names[name]
        names = _inline(graph, call, cast(fx.Graph, child.graph), cast(str, call.target))
    return names[node]


def _inline(graph: fx.Graph, call: fx.Node, child: fx.Graph, prefix: str) -> dict[str, fx.Node]:
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in child.nodes if n.op == "placeholder"]
    for i, ph in enumerate(placeholders):
        if i < len(call.args):
            env[ph] = call.args[i]
        elif ph.target in call.kwargs:
            env[ph] = call.kwargs[ph.target]
        else:
            env[ph] = ph.args[0] if ph.args else None
    result = None
    with graph.inserting_before(call):
        for n in child.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                result = fx.node.map_arg(n.args[0], env.__getitem__)
                break
            new = graph.node_copy(n, env.__getitem__)
            if new.op in ("call_module", "get_attr"):
                new.target = f"{prefix}.{n.target}"
            env[n] = new
    call.replace_all_uses_with(cast(fx.Node, result))
    graph.erase_node(call)
    return {n.name: v for n, v in env.items() if n.op != "placeholder" and isinstance(v, fx.Node)}
