"""One graph per module, as the model calls it, with shapes from one fake forward.

:func:`trace_model` runs the model's forward once on a :func:`~se_surgery._fake.structural_copy`
with fake tensors. Every module the forward calls (except torch.nn layers and the
leaves a user names) is traced on its own with ``torch.fx``, its children kept as
``call_module`` leaves, the first time the model calls it, and with the arguments it
got (an argument that is ``None`` stays ``None``, a list of tensors becomes one input
per tensor). The same forward then runs through those graphs, so every node of every
module's graph gets the shape it has in the model. A join found in the graph of module
``m`` is performed by ``m``'s own forward, which is what "owner" means; the graph is
the one :func:`se_surgery.apply` rewrites, so nothing is traced twice or matched by
position.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.fx as fx
from torch import nn

from ._checks import check_model
from ._compat import (
    PH,
    flop_counter,
    process_inputs,
    timm_registries,
    unset_fake_temporarily,
    wrapped_module,
)
from ._fake import fake_mode, model_device_dtype, run_fake, structural_copy
from ._nodes import is_join
from .errors import ModelTypeError, TraceError

__all__ = ["TracerOptions", "ModuleGraph", "ModelGraphs", "trace_model", "short_error", "call_skeleton"]


def short_error(err: BaseException, limit: int = 200) -> str:
    """The first line of an error, with its type, cut to ``limit`` characters."""
    text = (f"{type(err).__name__}: {err}".strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class TracerOptions:
    """What users can tell the tracer, as torchvision's ``create_feature_extractor(tracer_kwargs=...)``.

    Attributes:
        leaf_modules: module classes whose own forward is not traced (their joins are
            not searched; their children still are).
        autowrap_functions: functions recorded as one call instead of traced into
            (for functions with data-dependent control flow).
        autowrap_modules: Python modules whose functions are all autowrapped
            (fx's default is ``(math,)``).
        concrete_args: values fixed for the model's own forward, beside the image batch.
    """

    leaf_modules: tuple[type, ...] = ()
    autowrap_functions: tuple = ()
    autowrap_modules: tuple = ()
    concrete_args: dict | None = None

    @classmethod
    def of(cls, tracer_kwargs) -> "TracerOptions":
        """Validate a ``tracer_kwargs`` dict (or None, or TracerOptions)."""
        if tracer_kwargs is None:
            return cls()
        if isinstance(tracer_kwargs, cls):
            return tracer_kwargs
        if not isinstance(tracer_kwargs, dict):
            raise ModelTypeError(f"tracer_kwargs must be a dict, got {type(tracer_kwargs).__name__}")
        allowed = ("leaf_modules", "autowrap_functions", "autowrap_modules", "concrete_args")
        unknown = [k for k in tracer_kwargs if k not in allowed]
        if unknown:
            raise ModelTypeError(f"unknown tracer_kwargs key {unknown[0]!r}; allowed: {', '.join(allowed)}")
        leaves = tuple(tracer_kwargs.get("leaf_modules", ()))
        if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in leaves):
            raise ModelTypeError("tracer_kwargs['leaf_modules'] must list nn.Module classes")
        fns = tuple(tracer_kwargs.get("autowrap_functions", ()))
        if not all(callable(f) for f in fns):
            raise ModelTypeError("tracer_kwargs['autowrap_functions'] must list functions")
        concrete = tracer_kwargs.get("concrete_args")
        if concrete is not None and not isinstance(concrete, dict):
            raise ModelTypeError("tracer_kwargs['concrete_args'] must be a dict of argument name to value")
        return cls(leaves, fns, tuple(tracer_kwargs.get("autowrap_modules", ())), concrete)


class _Tracer(fx.Tracer):
    """Traces one module's own forward: every child is a ``call_module`` leaf.

    While it traces, fx replaces ``nn.Module.__call__`` and ``__getattr__`` for the whole
    process with wrappers that call this tracer's :meth:`call_module` and :meth:`getattr`.
    A module another thread calls meanwhile is not part of this trace: both hand it the
    plain behaviour. Two of these traces never overlap (:data:`_TRACING`), so one never
    restores the other's patch.
    """

    def __init__(self, autowrap_functions=(), autowrap_modules=()):
        super().__init__(autowrap_modules=(math, *autowrap_modules), autowrap_functions=tuple(autowrap_functions))
        self._thread = threading.get_ident()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)  # fx's forward here is the original Module.__call__
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


_TRACING = threading.RLock()


class _TrainingFlag(int):
    """Stands for ``self.training`` while a forward is traced and notes every read.

    A forward that reads its training flag may trace differently in train and eval
    mode; only such a forward is traced a second time to compare.
    """

    reads: list

    def __new__(cls, value: bool, reads: list):
        obj = int.__new__(cls, bool(value))
        obj.reads = reads
        return obj

    def __bool__(self) -> bool:
        self.reads.append(True)
        return bool(int(self))

    def __repr__(self) -> str:
        self.reads.append(True)  # the flag was passed on as an argument (F.dropout(..., self.training))
        return repr(bool(int(self)))


# fx stores an argument that is a tensor in a graph as an attribute it adds to the root.
def _constants(module: nn.Module, before: set) -> dict:
    return {k: module.__dict__.pop(k) for k in set(module.__dict__) - before}


def _trace_with_flag(module: nn.Module, flag: bool, opts: TracerOptions, fns, concrete) -> tuple[fx.Graph, dict, bool]:
    reads: list = []
    before = set(module.__dict__)
    module.__dict__["training"] = _TrainingFlag(flag, reads)
    try:
        with _TRACING:
            graph = _Tracer(fns, opts.autowrap_modules).trace(module, concrete_args=concrete)
    finally:
        module.__dict__["training"] = False
        constants = _constants(module, before)
    def plain(a):
        if isinstance(a, _TrainingFlag):
            reads.append(True)
            return bool(int(a))
        return a

    for n in graph.nodes:  # the graph keeps plain bools, as fx would have recorded them
        n.args, n.kwargs = fx.node.map_aggregate(n.args, plain), fx.node.map_aggregate(n.kwargs, plain)
    return graph, constants, bool(reads)


def _graphs_differ_by_mode(m: nn.Module) -> bool:
    """Whether ``m`` swaps in another fx graph in train mode (torchvision's feature
    extractors, ``DualGraphModule``, hold ``train_graph`` and ``eval_graph``): its forward
    then differs by mode without reading ``self.training``."""
    graphs = [m.__dict__.get(k) for k in ("train_graph", "eval_graph")]
    if not all(isinstance(g, fx.Graph) for g in graphs):
        return False
    return len({g.python_code("self").src for g in graphs}) > 1


class _Tensor:
    """Stands for a tensor in the record of how a module was called."""

    def __repr__(self) -> str:
        return "Tensor"


TENSOR = _Tensor()
SIZE = "<int>"  # stands for an int inside a list or tuple argument (a size)


def call_skeleton(args: tuple, kwargs: dict) -> tuple:
    """A module call's arguments with tensors replaced by placeholders (comparable, no data)."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return TENSOR
        # fx hands lists on as its immutable_list: the same call to the module's code.
        kind = list if isinstance(v, list) else tuple if isinstance(v, tuple) and not hasattr(v, "_fields") else None
        if kind and v and all(isinstance(t, torch.Tensor) for t in v):
            return kind(TENSOR for _ in v)
        if kind and v and all(type(t) is int for t in v):
            return kind(SIZE for _ in v)  # sizes such as (H, W): kept symbolic, never baked in
        return v if v is None or isinstance(v, (bool, int, float, str)) else type(v).__name__
    return tuple(one(a) for a in args), tuple(sorted((k, one(v)) for k, v in kwargs.items()))


def _concrete_args(module: nn.Module, skeleton: tuple) -> dict | None:
    """fx ``concrete_args`` that make a module's trace follow how the model calls it.

    Traced on its own, a block sees every argument as a tensor proxy. A block called as
    ``block(x)`` whose forward does ``if shortcut is None: shortcut = x`` would be
    traced down the other path, and one called with a list of tensors would fail on
    ``x[i]``. Arguments that are ``None`` in the call are fixed to ``None``; lists and
    tuples of tensors or of ints (sizes) become one input per element.
    """
    args, kwargs = skeleton
    sig = inspect.signature(module.forward)
    try:
        bound = sig.bind(*args, **dict(kwargs))
    except TypeError:
        return None
    bound.apply_defaults()
    out = {}
    for name, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name not in bound.arguments:
            continue
        v = bound.arguments[name]
        if v is None or isinstance(v, (bool, int, float, str)) and v not in (SIZE,):
            out[name] = v  # a flag or setting the model passes (pre_logits=False): the path it takes
        elif type(v) in (list, tuple) and all(a is TENSOR or a == SIZE for a in v):
            out[name] = type(v)(PH for _ in v)
    return out or None


@dataclass
class ModuleGraph:
    """The traced forward of one module of the model.

    Attributes:
        path: dotted path of the module in the model (its first one, where it is shared).
        module: the module in the structural copy (fake tensors), with its class.
        graph: its forward as an fx graph (children as ``call_module``); None where it
            could not be traced, and then ``error`` says why.
        constants: tensors fx stored for the graph (``_tensor_constant0`` ...).
        calls: how often one forward of the model calls it.
    """

    path: str
    module: nn.Module
    graph: fx.Graph | None = None
    error: str | None = None
    constants: dict = field(default_factory=dict)
    calls: int = 0
    skeleton: tuple | None = None
    # The forward takes other paths in train mode: the graph (traced in eval mode) is
    # right for shapes but must not replace the forward.
    train_dependent: bool = False
    quiet: bool = False  # a failure nobody needs to hear about (a user's leaf, a timm layer)
    # (graph, call_module node) of the first call, where the caller is a traced graph:
    # what a placeholder is, seen from outside (its channel axis, say).
    caller: tuple | None = field(default=None, repr=False)

    @property
    def module_type(self) -> type:
        return type(self.module)

    def node(self, name: str) -> fx.Node:
        """The graph's node called ``name``."""
        for n in self.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


@dataclass
class ModelGraphs:
    """Result of :func:`trace_model`: each called module's graph, in the order first called."""

    model: nn.Module  # the structural copy
    graphs: list[ModuleGraph]
    input_size: tuple[int, int, int]
    stopped: str | None = None  # why the model's fake forward did not finish, if it did not
    stride_size: tuple[int, int, int] | None = None  # the input size node.meta["canon_shape"] is at
    macs: int | None = None  # multiply-accumulates of the forward at input_size, where counted

    def untraced(self) -> list[tuple[str, str]]:
        """(path, reason) of every module whose own forward could not be searched for joins."""
        return [(g.path or "<model>", g.error) for g in self.graphs if g.error and not g.quiet]


def _is_layer(m: nn.Module) -> bool:
    # torch.nn layers hold no joins of their own; containers just call their children.
    mod = type(m).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) and not isinstance(m, nn.Sequential)


class _ShapeInterpreter(fx.Interpreter):
    def __init__(self, mg: ModuleGraph, keys: tuple[str, str], walker: "_Walker"):
        super().__init__(mg.module, graph=mg.graph)
        self.extra_traceback = False  # our errors name the node themselves
        self.mg, (self.shape_key, self.tensor_key), self.walker = mg, keys, walker

    def fetch_attr(self, target: str):
        if target in self.mg.constants:
            return self.mg.constants[target]
        return super().fetch_attr(target)

    def run_node(self, n: fx.Node):
        if n.op == "call_module":
            self.walker.calling = (self.mg, n)
        try:
            out = super().run_node(n)
        except _Stop:
            raise
        except Exception as e:
            raise _NodeFailed(f"{self.mg.path or '<model>'} node {n.name!r}: {short_error(e)}") from e
        if self.shape_key == "shape":
            self.walker.order += 1
            n.meta.setdefault("order", self.walker.order)  # when the model first ran it
        if isinstance(out, torch.Tensor):
            n.meta[self.shape_key] = tuple(int(s) for s in out.shape)
            n.meta["tensor"] = True
        elif isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in out):
            n.meta["tensor"] = True  # unbind / split / chunk: data flows on through getitem
        return out


class _NodeFailed(RuntimeError):
    pass


class _Stop(BaseException):
    """Raised through the user's code to end the run (never caught by an ``except Exception``)."""


class _Walker:
    """Runs the model's forward on the copy, tracing and interpreting each module it calls."""

    def __init__(self, copy: nn.Module, mode, paths: dict[int, str], opts: TracerOptions, leaves: tuple, fns: tuple):
        self.copy, self.mode, self.paths, self.opts = copy, mode, paths, opts
        # timm's leaves are traced too: some hold joins (NormFreeBlock, MobileVitBlock);
        # where one does not trace, its forward runs as it is.
        self.leaves = tuple(opts.leaf_modules)
        self.quiet = tuple(leaves)  # failures expected by timm itself: not worth a warning
        self.fns = tuple(opts.autowrap_functions) + tuple(fns)
        self.graphs: dict[int, ModuleGraph] = {}
        self.keys = ("shape", "tensor")
        self.calling: tuple | None = None  # the graph node calling a module right now
        self.order = 0

    def dispatch(self, m: nn.Module, args: tuple, kwargs: dict):
        inner = wrapped_module(m)
        if inner is not None:
            return self.dispatch(inner, args, kwargs)
        if _is_layer(m):
            return m.forward(*args, **kwargs)
        mg = self.graphs.get(id(m))
        caller, self.calling = self.calling, None
        if mg is None:
            mg = self.graphs[id(m)] = self._trace(m, args, kwargs)
            if caller is not None and caller[1].target and m is caller[0].module.get_submodule(caller[1].target):
                mg.caller = caller
        mg.calls += 1
        if mg.graph is not None and call_skeleton(args, kwargs) != mg.skeleton:
            mg.error = ("the model calls it in different ways (arguments "
                        f"{mg.skeleton} and {call_skeleton(args, kwargs)}), which one graph cannot express")
        if mg.graph is None or mg.error:
            return m.forward(*args, **kwargs)
        try:
            flat = self._flat_inputs(m, mg, args, kwargs)
            return _ShapeInterpreter(mg, self.keys, self).run(*flat)
        except _NodeFailed as e:
            # The graph could not run where the module's own code can (a value the
            # trace fixed, say): run that code, and leave this module's joins alone.
            mg.error = f"shapes unknown: {e}"
            return m.forward(*args, **kwargs)

    def _trace(self, m: nn.Module, args: tuple, kwargs: dict) -> ModuleGraph:
        path = self.paths[id(m)]
        skeleton = call_skeleton(args, kwargs)
        mg = ModuleGraph(path, m, skeleton=skeleton)
        if isinstance(m, self.leaves) if self.leaves else False:
            mg.error, mg.quiet = "a leaf module (its forward is not traced)", True
            return mg
        concrete = _concrete_args(m, skeleton)
        if m is self.copy and self.opts.concrete_args:
            concrete = dict(concrete or {}, **self.opts.concrete_args)
        try:
            with unset_fake_temporarily():
                graph, constants, read_flag = _trace_with_flag(m, False, self.opts, self.fns, concrete)
                if read_flag:
                    other, _, _ = _trace_with_flag(m, True, self.opts, self.fns, concrete)
                    mg.train_dependent = graph.python_code("self").src != other.python_code("self").src
        except Exception as e:  # fx raises many types: TraceError, TypeError, AttributeError, ...
            mg.error = short_error(e)
            mg.quiet = bool(self.quiet) and isinstance(m, self.quiet) and all(map(_is_layer, m.children()))
            return mg
        mg.graph, mg.constants = graph, constants
        mg.train_dependent = mg.train_dependent or _graphs_differ_by_mode(m)
        return mg

    @staticmethod
    def _flat_inputs(m: nn.Module, mg: ModuleGraph, args: tuple, kwargs: dict) -> list:
        sig = inspect.signature(m.forward)
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
            if kwargs:
                raise _NodeFailed("keyword arguments to a forward with *args/**kwargs")
            return list(args)
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return process_inputs(mg.graph, *(bound.arguments[n] for n in sig.parameters))

    def run(self, size: tuple[int, int, int], keys: tuple[str, str], device, dtype) -> str | None:
        """One fake forward at ``size``; the reason it stopped, or None."""
        self.keys = keys
        for g in self.graphs.values():
            g.calls = 0
        try:
            run_fake(self.copy, self.mode, size, device, dtype, self.dispatch)
        except _NodeFailed as e:
            return str(e)
        except Exception as e:
            return short_error(e)
        return None


def _collapsed(graphs) -> bool:
    """Whether some 4-D join came out 1 pixel high or wide (its stride is then unknown)."""
    for g in graphs:
        for n in g.graph.nodes if g.graph is not None else ():
            shape = n.meta.get("shape")
            if shape is not None and len(shape) == 4 and is_join(n) and min(shape[1:]) < 2:
                return True
    return False


def trace_model(model: nn.Module, input_size: tuple[int, int, int], *, canonical_size=None,
                tracer_kwargs=None, count_macs: bool = False) -> ModelGraphs:
    """Trace every module ``model`` calls and give each graph node its shape.

    Nothing of ``model`` runs or changes: the forward runs on a structural copy with
    fake tensors and no hooks. Each node's ``meta["canon_shape"]`` is its shape at
    ``canonical_size`` (for strides that do not depend on ``input_size``): where some
    join's map has shrunk to a single pixel at ``input_size``, input size / map size no
    longer tells the stride, so a second fake forward at ``canonical_size`` measures it.

    Example:
        >>> import torchvision
        >>> mg = trace_model(torchvision.models.resnet18(), (3, 64, 64))
        >>> [g.path for g in mg.graphs][:4], mg.stopped
        (['', 'layer1', 'layer1.0', 'layer1.1'], None)
    """
    check_model(model)
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError(f"{type(model).__name__} is a TorchScript module (torch.jit.script/trace): torch.fx cannot "
                         "trace it; pass the Python model instead")
    opts = TracerOptions.of(tracer_kwargs)
    leaves, fns = timm_registries(model)
    mode = fake_mode()
    copy, memo = structural_copy(model, mode)
    paths: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(memo[id(m)]), name)
    walker = _Walker(copy, mode, paths, opts, leaves, fns)
    device, dtype = model_device_dtype(model)
    size = cast(tuple[int, int, int], tuple(input_size))
    # The report's base MACs come from this same pass (torch's flop counter / 2) when asked.
    with flop_counter() if count_macs else contextlib.nullcontext() as counter:
        stopped = walker.run(size, ("shape", "tensor"), device, dtype)
    macs = int(counter.get_total_flops()) // 2 if count_macs and stopped is None else None
    measured = size  # the input size "canon_shape" was measured at
    if canonical_size is not None and tuple(canonical_size) != tuple(input_size) and stopped is None \
            and _collapsed(walker.graphs.values()):
        # Strides at the canonical size only: what fails there (a model made for one
        # size) leaves the graphs and their errors as the user's size found them.
        kept = {id(g): (g.error, g.calls) for g in walker.graphs.values()}
        measured = cast(tuple[int, int, int], tuple(canonical_size))
        walker.run(measured, ("canon_shape", "canon_tensor"), device, dtype)
        for g in list(walker.graphs.values()):
            if id(g) in kept:
                g.error, g.calls = kept[id(g)]
            else:  # only reached at the canonical size
                del walker.graphs[id(g.module)]
    else:
        for g in walker.graphs.values():
            for n in g.graph.nodes if g.graph is not None else ():
                if "shape" in n.meta:
                    n.meta["canon_shape"] = n.meta["shape"]
    return ModelGraphs(copy, list(walker.graphs.values()), size, stopped, measured, macs)
