"""What one node of a module's graph is: a join, an activation, a projection, a gate.

Pure functions and a per-graph view over the graphs :func:`~se_surgery._trace.trace_model`
made; sites, insertion and the inner placement all read nodes through here.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._compat import is_op_overload, pytree_info, spec_children

if TYPE_CHECKING:  # trace.py reads joins through this module; the import runs one way
    from ._trace import ModuleGraph

__all__ = ["is_add", "is_cat", "is_join", "add_operands", "shape", "tensor_inputs", "ancestors", "GraphView",
           "channel_slice_of",
           "ATTENTION_CLASSES"]

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
_PRODUCTS = {"mul", "mul_", "truediv", "div", "div_", "matmul", "bmm", "einsum", "addcmul", "imul", "itruediv"}
_SPLIT_NAMES = {"split", "chunk", "unbind", "tensor_split", "split_with_sizes"}

# Elementwise nonlinearities (and attention, which holds a softmax): what makes a path a
# transforming branch rather than a projection.
ACTIVATION_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.softmax, torch.softmax, F.log_softmax, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, F.prelu, F.glu, F.hardtanh, F.scaled_dot_product_attention,
}
ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "log_softmax", "gelu",
                      "silu", "hardswish"}
# Activation classes outside torch.nn.modules.activation (timm, common code), by name.
ACTIVATION_NAMES = {"GELU", "GELUTanh", "QuickGELU", "Swish", "SiLU", "HardSwish", "HardSigmoid", "Mish", "Sigmoid",
                    "Tanh", "PReLU", "StarReLU", "SquaredReLU", "HardMish", "ReLU6", "ReLU"}
# Channel-attention blocks users already have, by class name (torchvision, timm, common code).
ATTENTION_CLASSES = frozenset({
    "SqueezeExcitation", "SEModule", "SqueezeExcite", "SqueezeExciteCl", "EffectiveSEModule",
    "EcaModule", "CecaModule", "EfficientChannelAttn", "CircularEfficientChannelAttn",
    "SELayer", "SEBlock", "SE", "GatherExcite", "CbamModule", "LightCbamModule", "SplitAttn",
    "SelectiveKernel", "SelectiveKernelAttn", "GlobalContext", "RadixSoftmax",
})


def is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in ADD_FUNCTIONS) or (
        n.op == "call_method" and n.target in ADD_METHODS)


def is_cat(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in CAT_FUNCTIONS


def is_join(n: fx.Node) -> bool:
    """Whether a node is an add or a concatenation (a candidate join)."""
    return is_add(n) or is_cat(n)


def add_operands(n: fx.Node) -> list:
    """The two operands of an add node, wherever they were passed (``other=`` too)."""
    ops = list(n.args[:2])
    if len(ops) < 2 and n.kwargs.get("other") is not None:
        ops.append(n.kwargs["other"])
    return ops


def cat_inputs(n: fx.Node):
    tensors = n.args[0] if n.args else n.kwargs.get("tensors")
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", n.kwargs.get("axis", 0))
    return tensors, dim


def is_channel_cat(n: fx.Node) -> bool:
    tensors, dim = cat_inputs(n)
    out = shape(n)
    return (out is not None and len(out) == 4 and dim in (1, -3) and isinstance(tensors, (list, tuple))
            and len(tensors) >= 2 and all(isinstance(t, fx.Node) for t in tensors))


def shape(n, key: str = "shape") -> tuple | None:
    return n.meta.get(key) if isinstance(n, fx.Node) else None


def tensor_inputs(n: fx.Node) -> list[fx.Node]:
    """Inputs that carry tensor data (a shape read is not a data path)."""
    return [a for a in n.all_input_nodes if a.meta.get("tensor")]


def ancestors(n: fx.Node) -> set[fx.Node]:
    """Nodes ``n`` depends on through tensor values."""
    seen: set[fx.Node] = set()
    stack = tensor_inputs(n)
    while stack:
        a = stack.pop()
        if a not in seen:
            seen.add(a)
            stack.extend(tensor_inputs(a))
    return seen


def callable_name(n: fx.Node) -> str:
    return cast(str, n.target) if n.op == "call_method" else getattr(n.target, "__name__", "")


def channel_slice_of(n) -> fx.Node | None:
    """The tensor ``n`` is a channel slice of (``x[:, a:b]``, ``x[:, :c, :, :]``), or None."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or n.target is not operator.getitem:
        return None
    src, index = n.args[0], n.args[1]
    if not isinstance(src, fx.Node) or len(shape(src) or ()) != 4 or not isinstance(index, tuple) or len(index) < 2:
        return None
    full = slice(None, None, None)
    if index[0] != full or not isinstance(index[1], slice) or index[1].step not in (None, 1) \
            or any(i != full for i in index[2:]):
        return None
    return src


def is_split(n: fx.Node) -> bool:
    return n.op in ("call_function", "call_method") and callable_name(n) in _SPLIT_NAMES


def _is_torch_function(fn) -> bool:
    mod = getattr(fn, "__module__", None) or ""
    return fn is getattr or mod in ("_operator", "operator", "builtins", "math", "torch") \
        or mod.startswith(("torch.", "torch._")) or is_op_overload(fn)


def is_activation_module(m: nn.Module) -> bool:
    if type(m).__module__ == "torch.nn.modules.activation":
        return True
    return type(m).__name__ in ACTIVATION_NAMES and not any(True for _ in m.children())


class GraphView:
    """Questions about the nodes of one module's graph, with memoised answers.

    ``graphs`` maps ``id(module)`` to every traced module's :class:`ModuleGraph`, so a
    ``call_module`` node can be judged by what its module's own graph does.
    """

    def __init__(self, mg: ModuleGraph, graphs: dict[int, ModuleGraph], nonlinear_memo: dict,
                 views: dict[int, "GraphView"] | None = None):
        self.mg, self.graphs, self._nl = mg, graphs, nonlinear_memo
        self.views = views if views is not None else {}  # id(ModuleGraph) -> its view
        self.order = {n: i for i, n in enumerate(mg.graph.nodes)}
        self._axis: dict[fx.Node, int | None] = {}
        self._from_input: dict[fx.Node, bool] | None = None
        self._args: dict[fx.Node, int] | None = None

    # ------------------------------------------------------------ structure

    def module(self, n: fx.Node) -> nn.Module | None:
        try:
            return self.mg.module.get_submodule(cast(str, n.target))
        except AttributeError:
            return None

    def argument_of(self, n: fx.Node) -> int | None:
        """Which argument of the forward a placeholder belongs to (the elements of one list
        argument, flattened into placeholders, share it)."""
        if self._args is None:
            phs = [p for p in self.mg.graph.nodes if p.op == "placeholder"]
            info = pytree_info(self.mg.graph)
            sizes = [1] * len(phs)
            if info is not None:
                spec = info.in_spec
                while spec is not None and len(spec_children(spec)) == 2 and spec.type is tuple:
                    spec = spec_children(spec)[0]  # (args, kwargs): the positional args
                sizes = [c.num_leaves for c in spec_children(spec)] if spec is not None else sizes
            owner = [i for i, k in enumerate(sizes) for _ in range(k)]
            self._args = {p: (owner[j] if j < len(owner) else j) for j, p in enumerate(phs)}
        return self._args.get(n)

    def inputs_of(self, n: fx.Node) -> set[int]:
        """The forward's arguments ``n`` carries data from."""
        # argument_of knows every placeholder of the graph: never None here.
        return {cast(int, self.argument_of(a)) for a in ancestors(n) | {n} if a.op == "placeholder"}

    def from_input(self, n: fx.Node) -> bool:
        """Whether a placeholder is ``n`` or among its tensor ancestors."""
        if self._from_input is None:
            reach: dict[fx.Node, bool] = {}
            for m in self.mg.graph.nodes:  # topological order
                reach[m] = m.op == "placeholder" or any(reach.get(a, False) for a in tensor_inputs(m))
            self._from_input = reach
        return self._from_input[n]

    def fork(self, a: fx.Node, b: fx.Node) -> fx.Node | None:
        """The latest node both ``a`` and ``b`` depend on that carries the block's input."""
        anc_a, anc_b = ancestors(a) | {a}, ancestors(b) | {b}
        common = [c for c in anc_a & anc_b if c.op != "get_attr" and self.from_input(c)]
        return max(common, key=self.order.__getitem__) if common else None

    @staticmethod
    def path(fork: fx.Node, o: fx.Node) -> set[fx.Node]:
        """The nodes between ``fork`` (excluded) and ``o`` (included)."""
        return (ancestors(o) | {o}) - (ancestors(fork) | {fork})

    # ------------------------------------------------------------ what a node does

    def module_nonlinear(self, m: nn.Module) -> bool:
        """Whether a module applies a nonlinearity anywhere inside (an activation or attention)."""
        key = id(m)
        if key not in self._nl:
            self._nl[key] = False  # guards recursion through shared modules
            result = False
            for sub in m.modules():
                if is_activation_module(sub) or isinstance(sub, nn.MultiheadAttention):
                    result = True
                    break
                g = self.graphs.get(id(sub))
                if g is not None and g.graph is not None and any(
                        self.node_kind(n, g) != "linear" for n in g.graph.nodes if n.op != "call_module"):
                    result = True
                    break
            self._nl[key] = result
        return self._nl[key]

    def node_kind(self, n: fx.Node, mg: ModuleGraph | None = None) -> str:
        """``"act"`` (a nonlinearity), ``"opaque"`` (a function we cannot see into) or ``"linear"``."""
        mg = mg or self.mg
        if n.op == "call_module":
            try:
                m = mg.module.get_submodule(cast(str, n.target))
            except AttributeError:
                return "opaque"
            return "act" if self.module_nonlinear(m) else "linear"
        if n.op == "call_function":
            if n.target in ACTIVATION_FUNCTIONS:
                return "act"
            return "linear" if _is_torch_function(n.target) else "opaque"
        if n.op == "call_method":
            return "act" if n.target in ACTIVATION_METHODS else "linear"
        return "linear"

    def is_projection(self, fork: fx.Node, o: fx.Node) -> bool:
        """``o`` is ``fork`` itself or reaches it only through linear layers and ops
        (conv/norm downsample, pooling, drop-path, layer scale), not through a slice or
        an element of it, nor a product of two tensors that both carry the input."""
        if o is fork:
            return True
        for n in self.path(fork, o):
            if n.op == "call_function" and n.target is operator.getitem or is_split(n):
                return False
            if self.node_kind(n) != "linear" or self._product(n):
                return False
        return True

    def _product(self, n: fx.Node) -> bool:
        if n.op not in ("call_function", "call_method") or callable_name(n) not in _PRODUCTS:
            return False
        return sum(self.from_input(a) for a in tensor_inputs(n)) >= 2

    def has_nonlinearity(self, fork: fx.Node, o: fx.Node) -> bool:
        return any(self.node_kind(n) != "linear" for n in self.path(fork, o))

    # ------------------------------------------------------------ channel axis

    def channel_axis(self, n: fx.Node, depth: int = 0) -> int | None:
        """The channel axis (0-based) of a 4-D node, read from the layers that produce it."""
        if n in self._axis:
            return self._axis[n]
        self._axis[n] = None  # guards cycles through in-place aliases
        axis = self._channel_axis(n, depth)
        self._axis[n] = axis
        return axis

    def _channel_axis(self, n: fx.Node, depth: int) -> int | None:
        s = shape(n)
        if s is None or len(s) != 4 or depth > 64:
            return None
        own = self.layer_axis(n)
        if own is not None:
            return own
        if n.op == "call_module":
            m = self.module(n)
            if m is not None and type(m).__module__.startswith("torch.nn") and not isinstance(m, nn.Sequential):
                return self._follow_same_shape(n, depth)  # activations, dropout, identity
            return self._module_output_axis(m, depth) if m is not None else None
        if n.op == "placeholder":
            return self._placeholder_axis(n, depth)
        if n.op in ("call_function", "call_method"):
            name = callable_name(n)
            if name == "permute":
                return self._permuted_axis(n, depth)
            if name == "transpose":
                return self._transposed_axis(n, depth)
            return self._follow_same_shape(n, depth)
        return None

    def _placeholder_axis(self, n: fx.Node, depth: int) -> int | None:
        axis = self.consumer_axis(n, depth)
        if axis is None and self.mg.caller is not None and depth < 48:
            # What the caller passed in: the producer one level up knows the axis.
            graph, call = self.mg.caller
            view = self.views.get(id(graph))
            index = [p for p in self.mg.graph.nodes if p.op == "placeholder"].index(n)
            arg = call.args[index] if index < len(call.args) else None
            if view is not None and isinstance(arg, fx.Node):
                axis = view.channel_axis(arg, depth + 1)
        return axis

    def _permuted_axis(self, n: fx.Node, depth: int) -> int | None:
        dims: Any = n.args[1:] if n.op == "call_method" else n.args[1]
        if n.op == "call_method" and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        dims = n.kwargs.get("dims", dims)
        src = n.args[0]
        axis = self.channel_axis(src, depth + 1) if isinstance(src, fx.Node) else None
        if axis is None or not all(isinstance(d, int) for d in dims):
            return None
        dims = [d % 4 for d in dims]
        return dims.index(axis) if axis in dims else None

    def _transposed_axis(self, n: fx.Node, depth: int) -> int | None:
        src, a, b = n.args[0], cast(int, n.args[1]) % 4, cast(int, n.args[2]) % 4
        axis = self.channel_axis(src, depth + 1) if isinstance(src, fx.Node) else None
        if axis is None:
            return None
        return b if axis == a else a if axis == b else axis

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

    def consumer_axis(self, n: fx.Node, depth: int = 0) -> int | None:
        """The channel axis of a 4-D node as its consumers read it (a norm or conv right after,
        or the first layer inside a child module it is passed to)."""
        for u in n.users:
            axis = self.layer_axis(u)
            if axis is None and u.op == "call_module" and depth < 16 and u.args and u.args[0] is n:
                m = self.module(u)
                g = self.graphs.get(id(m)) if m is not None else None
                view = self.views.get(id(g)) if g is not None else None
                if view is not None:
                    ph = next((p for p in g.graph.nodes if p.op == "placeholder"), None)
                    axis = view.consumer_axis(ph, depth + 1) if ph is not None else None
            if axis is not None:
                return axis
        return None

    def _module_output_axis(self, m: nn.Module, depth: int) -> int | None:
        """The channel axis of what a child module returns, read from its own graph."""
        g = self.graphs.get(id(m))
        view = self.views.get(id(g)) if g is not None else None
        if view is None or depth > 48:
            return None
        out = next((n for n in reversed(g.graph.nodes) if n.op == "output"), None)
        res = out.args[0] if out is not None and out.args else None
        return view.channel_axis(res, depth + 1) if isinstance(res, fx.Node) else None

    def _follow_same_shape(self, n: fx.Node, depth: int) -> int | None:
        for a in tensor_inputs(n):
            if shape(a) == shape(n):
                axis = self.channel_axis(a, depth + 1)
                if axis is not None:
                    return axis
        return None

    # ------------------------------------------------------------ existing attention

    def is_gate_mul(self, n: fx.Node) -> bool:
        """``x * gate`` where the gate is a sigmoid of a spatially pooled map (SE, ECA and kin).

        Walking back from the operand (through an ``expand``), only through tensors
        smaller than the product, a gate function is met and, before it, a pool that
        leaves at most one dimension per sample. Swish (``x * sigmoid(x)``) and spatial
        gates (``x * sigmoid(conv(x))``, N x 1 x H x W) are not channel attention.
        """
        if n.op not in ("call_function", "call_method") or n.target not in (
                operator.mul, operator.imul, torch.mul, "mul", "mul_"):
            return False
        out = shape(n)
        if out is None or len(out) != 4:
            return False
        full = math.prod(out[1:])

        def small(a: fx.Node) -> bool:
            s = shape(a)
            return s is not None and len(s) >= 1 and math.prod(s[1:]) < full

        for operand in tensor_inputs(n):
            if operand.op in ("call_method", "call_function") and callable_name(operand) in _EXPAND_NAMES:
                operand = operand.args[0] if operand.args and isinstance(operand.args[0], fx.Node) else operand
            if self._pooled_gate(operand, small):
                return True
        return False

    def _pooled_gate(self, operand: fx.Node, small) -> bool:
        """Walking back from ``operand`` through ``small`` tensors: a gate, then a pool."""
        frontier, seen = [(operand, False)], set()
        for _ in range(12):
            nxt: list[tuple[fx.Node, bool]] = []
            for a, saw_gate in frontier:
                if not small(a) or (a, saw_gate) in seen:
                    continue
                seen.add((a, saw_gate))
                saw_gate = saw_gate or self._is_gate(a)
                if saw_gate and self._is_pool(a) and sum(d > 1 for d in cast(tuple, shape(a))[1:]) <= 1:
                    return True
                nxt.extend((b, saw_gate) for b in tensor_inputs(a))
            frontier = nxt
        return False

    def _is_gate(self, a: fx.Node) -> bool:
        m = self.module(a) if a.op == "call_module" else None
        return (a.op == "call_function" and a.target in _GATE_FUNCTIONS) or isinstance(m, _GATE_MODULES) or (
            a.op == "call_method" and a.target in ("sigmoid", "sigmoid_"))

    def _is_pool(self, a: fx.Node) -> bool:
        m = self.module(a) if a.op == "call_module" else None
        return (a.op == "call_function" and a.target in _POOL_FUNCTIONS) or isinstance(m, _POOL_MODULES) or (
            a.op == "call_method" and a.target in ("mean", "amax"))
