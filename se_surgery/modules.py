"""The catalog of channel-attention modules se-surgery can insert: a name -> factory registry.

As in timm's ``create_attn``, a name maps to a factory that takes the channel count first
and the module's options as keywords. Built in:

======  =====================================================  ====================================
name    module                                                 options (defaults)
======  =====================================================  ====================================
se      :class:`~se_surgery._se.SqueezeExcite` (Hu et al.)      ratio 16, divisor 1, min_hidden 1,
                                                               round_limit 0, squeeze avg, gate
                                                               sigmoid, act relu, ratio_of site,
                                                               init, bias
ese     :class:`~se_surgery._attention.EffectiveSE`             add_maxpool false, gate hard_sigmoid
eca     :class:`~se_surgery._attention.ECA`                     kernel_size (from C), gamma 2, beta 1
gc      :class:`~se_surgery._attention.GlobalContext`           ratio 8, divisor, min_hidden, fuse add,
                                                               act relu, ratio_of site
cbam    :class:`~se_surgery._attention.CBAM`                    ratio 16, spatial_kernel_size 7, bias,
                                                               act relu, ratio_of site
======  =====================================================  ====================================

Every built-in also takes ``init`` (``identity``: exactly its input at insertion, or
``paper``) and ``gate``, accepts ``channel_dim=-1`` for channels-last maps, and its
``forward(x, skip=None)`` returns ``skip + module(x)`` when given ``skip``.

Every inserted module answers one protocol, :class:`ChannelAttention`: ``channels`` (the
channels it scales), ``excitation(x)`` (the factor it multiplies ``x`` by, broadcastable
against ``x``, exactly 1 at identity; ``gc`` with ``fuse: add`` gives 1 + the added
context) and ``is_identity()`` (whether it computes exactly its input). The built-ins
implement it. A registered module need not: :func:`excitation` and :func:`is_identity`
then fall back to measuring it (``module.forward(x) / x``, 1 where ``x`` is 0; and an
exact comparison of ``forward`` on a fixed random map with the map itself), and its
``channels`` are the site's. Drift (:func:`se_surgery.studies.train.se_drift`), reports and
checkpoints read every inserted module through this protocol and
:func:`se_surgery.inserted_modules`, the same for every module.

Users add their own with :func:`register_module`, or from an installed package through
the entry-point group ``se_surgery.modules`` (the entry point's name is the module name,
its object the factory), loaded on the first lookup of a module name.

A factory's options are its keyword parameters other than ``channels``, ``channel_dim``,
``device`` and ``dtype`` (those three are passed by se-surgery when the factory takes
them). A module whose ``forward`` has no ``skip`` parameter is closed into a residual
join as ``skip + module(x)``.

MACs (multiply-accumulates for one image at C x H x W, E = C*H*W elements, P = H*W, the
convention of :func:`se_surgery.report`): the FC/conv/matmul MACs plus one op per element
for each global pool and one for each scale or add:

- ``se``: ``2*C*hidden + E`` (``2E`` for ``avgmax``) ``+ E``
- ``ese``: ``C*C + E`` (``2E`` with ``add_maxpool``) ``+ E``
- ``eca``: ``k*C + E + E``
- ``gc``: ``E`` (attention logits) ``+ E`` (weighted pool) ``+ 2*C*hidden + E`` (fuse)
- ``cbam``: ``2E`` (avg and max pool) ``+ 4*C*hidden`` (the MLP, twice) ``+ E`` (scale)
  ``+ 2E`` (channel mean and max maps) ``+ 2*k*k*P`` (spatial conv) ``+ E`` (scale)
- a registered module: what ``torch.utils.flop_counter`` counts in its forward (on meta
  tensors, halved) ``+ E``.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ._se import ACTS, GATES, INITS, RATIO_OF, SQUEEZES, SqueezeExcite, hidden_channels, reduced_channels
from .errors import ModuleError, SESurgeryWarning

__all__ = ["ENTRY_POINT_GROUP", "ChannelAttention", "check_module", "count_macs", "count_params", "create",
           "excitation", "is_identity", "module_names", "option_defaults", "option_names", "register_module",
           "supports_skip", "validate_options"]

ENTRY_POINT_GROUP = "se_surgery.modules"
BUILTIN_NAMES = ("se", "ese", "eca", "gc", "cbam")
# Passed by se-surgery itself, never by a rule.
_CORE_ARGS = ("channels", "channel_dim", "device", "dtype", "block_channels")
# Rule keys that mean something else; an option of that name could never be set.
_RULE_WORDS = ("select", "skip", "variant", "module")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]*\Z")


# ---------------------------------------------------------------- option checks


def _is_number(v) -> bool:
    # ints are finite by construction (and may be too large for math.isfinite)
    return not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and math.isfinite(v)))


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


def _choice(options: tuple[str, ...]):
    return lambda v: None if v in options else f"one of {', '.join(options)}"


# Bounds of the bottleneck options. Anything outside asks for a layer nobody means to
# build (a ratio of 5e-324 is a hidden width of 1e325), so `se-surgery check` refuses it
# before a model is built rather than letting `plan` overflow. Below ratio 1/8 hidden
# exceeds 8x the channels; above 4096 (more than any CNN's channel count) every site gets
# min_hidden.
RATIO_RANGE = (0.125, 4096)
DIVISOR_RANGE = (1, 512)
MIN_HIDDEN_RANGE = (1, 4096)
# ECA's kernel is |log2(C) + beta| / gamma rounded to odd: these keep it under ~300 taps
# (5e-324 overflowed to infinity); explicit kernels stay below sizes no layer uses.
GAMMA_RANGE = (0.25, 64)
BETA_RANGE = (-64, 64)
KERNEL_SIZE_MAX = 255
SPATIAL_KERNEL_SIZE_MAX = 31


def _within(ok, lo, hi, what: str):
    return lambda v: None if ok(v) and lo <= v <= hi else f"{what} from {lo} to {hi}"


# key -> check returning None (valid) or what is allowed; messages match the rules' own.
_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "ratio": _within(_is_number, *RATIO_RANGE, "a number"),
    "divisor": _within(_is_int, *DIVISOR_RANGE, "an integer"),
    "min_hidden": _within(_is_int, *MIN_HIDDEN_RANGE, "an integer"),
    "init": _choice(INITS),
    "squeeze": _choice(SQUEEZES),
    "gate": _choice(GATES),
    "bias": lambda v: None if isinstance(v, bool) else "true or false",
    "add_maxpool": lambda v: None if isinstance(v, bool) else "true or false",
    "kernel_size": lambda v: None if v is None or (_is_int(v) and 1 <= v <= KERNEL_SIZE_MAX and v % 2) else
    f"an odd integer from 1 to {KERNEL_SIZE_MAX}, or null (from the channel count)",
    "spatial_kernel_size": lambda v: None if _is_int(v) and 1 <= v <= SPATIAL_KERNEL_SIZE_MAX and v % 2 else
    f"an odd integer from 1 to {SPATIAL_KERNEL_SIZE_MAX}",
    "gamma": _within(_is_number, *GAMMA_RANGE, "a number"),
    "beta": _within(_is_number, *BETA_RANGE, "a number"),
    "fuse": _choice(("add", "scale")),
    "act": _choice(ACTS),
    "ratio_of": _choice(RATIO_OF),
    "round_limit": _within(_is_number, 0, 1, "a number"),
}


# ---------------------------------------------------------------- specs


@dataclass(frozen=True)
class _Spec:
    """A registered factory and what its signature says."""

    name: str
    factory: Callable
    defaults: dict  # option -> default (inspect.Parameter.empty when required)
    any_options: bool  # the factory takes **kwargs
    takes: frozenset  # which of channel_dim / device / dtype it accepts
    builtin: bool = False
    # Closed-form counts of the built-ins: (channels, resolved options[, spatial]).
    params: Callable | None = field(default=None, compare=False)
    macs: Callable | None = field(default=None, compare=False)  # -> (FC/conv/matmul MACs, elementwise ops)
    hidden: Callable | None = field(default=None, compare=False)

    @property
    def origin(self) -> str:
        return f"{getattr(self.factory, '__module__', '?')}.{getattr(self.factory, '__qualname__', repr(self.factory))}"


def _inspect(name: str, factory: Callable) -> tuple[dict, bool, frozenset]:
    if not callable(factory):
        raise ModuleError(f"module {name!r}: the factory must be callable (a class or function taking the channel "
                          f"count first), got {type(factory).__name__}")
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError) as e:
        raise ModuleError(f"module {name!r}: cannot read the signature of {factory!r} ({e}); "
                          "wrap it in a function with named parameters") from None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.VAR_POSITIONAL)
    if not params or params[0].kind not in positional:
        raise ModuleError(f"module {name!r}: the factory must take the channel count as its first positional "
                          f"parameter, its signature is {inspect.signature(factory)}")
    defaults, any_options, takes = {}, False, set()
    for p in params[1:]:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            any_options = True
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        elif p.name in _CORE_ARGS:
            takes.add(p.name)
        elif p.name in _RULE_WORDS:
            raise ModuleError(f"module {name!r}: the factory has a parameter {p.name!r}, which is a rule key "
                              f"({', '.join(_RULE_WORDS)}) and could never be set; rename it")
        else:
            defaults[p.name] = p.default
    if any_options:
        takes.update(("channel_dim", "device", "dtype"))
    return defaults, any_options, frozenset(takes)


def _spec(name: str, factory: Callable, builtin: bool = False, **counts) -> _Spec:
    defaults, any_options, takes = _inspect(name, factory)
    return _Spec(name, factory, defaults, any_options, takes, builtin, **counts)


def _se_params(c, o):
    h = _hidden(c, o)
    return 2 * c * h + ((h + c) if o["bias"] else 0)


def _se_macs(c, sp, o):
    e = c * sp[0] * sp[1]
    return 2 * c * _hidden(c, o), e * (o["squeeze"] == "avgmax") + 2 * e


def _hidden(c, o):
    base = reduced_channels(c, o.get("ratio_of", "site"), o.get("block_channels"))
    return hidden_channels(base, o["ratio"], o["divisor"], o["min_hidden"], o.get("round_limit", 0.0))


def _eca_k(c, o):
    from ._attention import eca_kernel_size

    return o["kernel_size"] if o["kernel_size"] is not None else eca_kernel_size(c, o["gamma"], o["beta"])


def _cbam_params(c, o):
    h, k = _hidden(c, o), o["spatial_kernel_size"]
    return 2 * c * h + ((h + c) if o["bias"] else 0) + 2 * k * k + 2


def _cbam_macs(c, sp, o):
    e, k = c * sp[0] * sp[1], o["spatial_kernel_size"]
    return 4 * c * _hidden(c, o) + 2 * k * k * sp[0] * sp[1], 6 * e


def _builtins() -> dict[str, _Spec]:
    from ._attention import CBAM, ECA, EffectiveSE, GlobalContext

    return {
        "se": _spec("se", SqueezeExcite, True, params=_se_params, macs=_se_macs, hidden=_hidden),
        "ese": _spec("ese", EffectiveSE, True, params=lambda c, o: c * c + c, hidden=lambda c, o: None,
                     macs=lambda c, sp, o: (c * c, c * sp[0] * sp[1] * (2 + o["add_maxpool"]))),
        "eca": _spec("eca", ECA, True, params=lambda c, o: _eca_k(c, o), hidden=lambda c, o: None,
                     macs=lambda c, sp, o: (_eca_k(c, o) * c, 2 * c * sp[0] * sp[1])),
        "gc": _spec("gc", GlobalContext, True, hidden=_hidden,
                    params=lambda c, o: (c + 1) + 2 * c * _hidden(c, o) + 3 * _hidden(c, o) + c,
                    macs=lambda c, sp, o: (2 * c * sp[0] * sp[1] + 2 * c * _hidden(c, o), c * sp[0] * sp[1])),
        "cbam": _spec("cbam", CBAM, True, params=_cbam_params, macs=_cbam_macs, hidden=_hidden),
    }


class _Registry:
    """Built-ins, then users' registrations and plugins (loaded once, on first lookup)."""

    def __init__(self) -> None:
        self.builtin = _builtins()
        self.user: dict[str, _Spec] = {}
        self.failed: dict[str, str] = {}  # plugin name -> why it did not load
        self.plugins_loaded = False

    def load_plugins(self) -> None:
        if self.plugins_loaded:
            return
        self.plugins_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(getattr(ep, "dist", None), "name", None)
            who = f"plugin {ep.name!r} ({ep.value}" + (f", from {dist}" if dist else "") + ")"
            try:
                register_module(ep.name, ep.load())
            except Exception as e:  # noqa: BLE001 - a broken plugin must not break the built-in modules
                msg = f"module {who} failed to load: {type(e).__name__}: {_first_line(e)} (rules cannot use it)"
                self.failed[ep.name] = msg
                warnings.warn(msg, SESurgeryWarning, stacklevel=4)

    def get(self, name: str) -> _Spec:
        self.load_plugins()
        spec = self.user.get(name) if isinstance(name, str) else None
        spec = spec or (self.builtin.get(name) if isinstance(name, str) else None)
        if spec is not None:
            return spec
        if isinstance(name, str) and name in self.failed:
            raise ModuleError(self.failed[name])
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModuleError(f"unknown module {name!r}{hint}; available: {', '.join(self.names())} "
                          "(se_surgery.register_module(name, factory) adds your own)")

    def names(self) -> list[str]:
        return list(self.builtin) + [n for n in self.user if n not in self.builtin]


_REGISTRY: _Registry | None = None


def _registry() -> _Registry:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _Registry()
    return _REGISTRY


# ---------------------------------------------------------------- public API


def register_module(name: str, factory: Callable, *, overwrite: bool = False) -> None:
    """Make ``factory`` insertable as ``module: name`` in rules.

    ``factory(channels, **options)`` returns an ``nn.Module`` mapping a feature map to one
    of the same shape. Its keyword parameters are the options rules may set, checked by
    name (a rule key the factory does not take is an error). If it takes ``channel_dim``
    (``1`` for NCHW, ``-1`` for channels-last maps), ``device`` or ``dtype``, se-surgery
    passes them. A module whose ``forward`` takes ``skip`` must return ``skip + out``
    for it (one fused op); other modules are closed into a residual join as
    ``skip + module(x)``. Give it an exact identity init so that the patched model
    equals the original until trained.

    Args:
        name: letters, digits, ``_`` and ``-``, starting with a letter.
        factory: a class or function taking the channel count first.
        overwrite: replace a module of the same name (a built-in included).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Gate(nn.Module):
        ...     def __init__(self, channels, scale=1.0):
        ...         super().__init__()
        ...         self.w = nn.Parameter(torch.zeros(channels))
        ...     def forward(self, x):
        ...         return x * (1 + self.w[:, None, None])
        >>> register_module("my_gate", Gate)
        >>> option_names("my_gate"), count_params("my_gate", 64, {})
        (('scale',), 64)
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ModuleError(f"module name must be a string of letters, digits, '_' and '-' starting with a letter, "
                          f"got {name!r}")
    reg = _registry()
    spec = _spec(name, factory)
    old = reg.user.get(name) or reg.builtin.get(name)
    if old is not None and not overwrite and old.factory is not factory:
        what = "a built-in module" if old.builtin else f"already registered ({old.origin})"
        raise ModuleError(f"module {name!r} is {what}; pass overwrite=True to replace it, or pick another name")
    reg.user[name] = spec
    reg.failed.pop(name, None)


def module_names() -> list[str]:
    """Names rules may give as ``module``: the built-ins, then registered ones.

    Example:
        >>> module_names()[:5]
        ['se', 'ese', 'eca', 'gc', 'cbam']
    """
    reg = _registry()
    reg.load_plugins()
    return reg.names()


def option_names(module_name: str) -> tuple[str, ...]:
    """The options ``module_name``'s factory takes, in signature order.

    Example:
        >>> option_names("eca")
        ('kernel_size', 'gamma', 'beta', 'gate', 'init')
    """
    return tuple(_registry().get(module_name).defaults)


def option_defaults(module_name: str) -> dict:
    """Each option's default (``inspect.Parameter.empty`` for one the factory requires).

    Example:
        >>> option_defaults("gc")["ratio"]
        8
    """
    return dict(_registry().get(module_name).defaults)


def accepts(module_name: str, key: str) -> bool:
    """Whether ``module_name``'s factory takes the option ``key`` (a ``**kwargs`` factory takes any)."""
    spec = _registry().get(module_name)
    return key not in _CORE_ARGS and key not in _RULE_WORDS and (key in spec.defaults or spec.any_options)


def check_option(module_name: str, key: str, value) -> str | None:
    """Why ``value`` is not valid for ``key`` (``"ratio must be a number from 0.125 to 4096, got -1"``), or None."""
    spec = _registry().get(module_name)
    check = _CHECKS.get(key) if spec.builtin else None
    allowed = check(value) if check else None
    if not allowed:
        return None
    try:  # an int of 5,000 digits has no repr under Python's default limit
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    except ValueError:
        shown = f"an {type(value).__name__} too large to print"
    return f"{key} must be {allowed}, got {shown}"


def validate_options(module_name: str, options: dict) -> dict:
    """Check ``options`` against what ``module_name`` takes; return them as a new dict.

    Built-in modules check each value's type and range; registered modules are checked
    by name against their factory's signature (their values by the factory itself).

    Example:
        >>> validate_options("eca", {"kernel_size": 5})
        {'kernel_size': 5}
        >>> validate_options("eca", {"kernel_size": 4})
        Traceback (most recent call last):
        ...
        se_surgery.errors.ModuleError: module 'eca': kernel_size must be an odd integer from 1 to 255, or null (from the channel count), got 4
    """  # noqa: E501 - doctest output must match verbatim
    if not isinstance(options, dict):
        raise ModuleError(f"module {module_name!r}: options must be a dict, got {type(options).__name__}")
    spec = _registry().get(module_name)
    for k, v in options.items():
        if not accepts(module_name, k):
            names = list(spec.defaults)
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ModuleError(f"module {module_name!r} takes no option {k!r}{hint}; it takes: "
                              f"{', '.join(names) or 'none'}")
        why = check_option(module_name, k, v)
        if why:
            raise ModuleError(f"module {module_name!r}: {why}")
    return dict(options)


def resolve_options(module_name: str, options: dict) -> dict:
    """The factory's defaults overlaid by ``options`` (what the module is built with)."""
    spec = _registry().get(module_name)
    return {**{k: v for k, v in spec.defaults.items() if v is not inspect.Parameter.empty}, **options}


def create(module_name: str, channels: int, options: dict, *, channel_dim: int = 1, device=None,
           dtype=None, block_channels: int | None = None) -> nn.Module:
    """Build ``module_name`` for a map of ``channels`` channels with ``options``.

    Example:
        >>> import torch
        >>> m = create("eca", 64, {"kernel_size": 5}, channel_dim=-1)
        >>> x = torch.randn(2, 8, 8, 64)  # channels-last
        >>> type(m).__name__, torch.equal(m(x), x)
        ('ECA', True)
    """
    spec = _registry().get(module_name)
    opts = validate_options(module_name, options)
    if "channel_dim" in spec.takes:
        opts["channel_dim"] = channel_dim
    elif channel_dim != 1:
        raise ModuleError(f"module {module_name!r} cannot go at a channels-last (N, H, W, C) site: its factory "
                          f"{spec.origin} takes no channel_dim")
    for key, value in (("device", device), ("dtype", dtype), ("block_channels", block_channels)):
        if key in spec.takes and (key != "block_channels" or value is not None):
            opts[key] = value
    try:
        module = spec.factory(int(channels), **opts)
    except ModuleError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's factory may raise anything; say which module and why
        raise ModuleError(f"module {module_name!r} ({spec.origin}) could not be built for {channels} channels with "
                          f"options {options}: {type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(module, nn.Module):
        raise ModuleError(f"module {module_name!r}: the factory {spec.origin} returned a {type(module).__name__}, "
                          "not a torch.nn.Module")
    if (device is not None or dtype is not None) and not ({"device", "dtype"} <= spec.takes):
        module = module.to(device=device, dtype=dtype)
    return module


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else "(no message)"
    return line if len(line) <= 200 else line[:197] + "..."


def check_module(module_name: str, channels: int, spatial: tuple[int, int], options: dict, *, channel_dim: int = 1,
                 site: str = "?") -> None:
    """Build a registered module on the meta device and run it once on a fake map of the site's
    shape; raise :class:`ModuleError` naming the module, the site and what is wrong.

    Plan time calls this for every registered (non built-in) module it would insert, so
    that :func:`se_surgery.report` and :func:`se_surgery.apply` accept and refuse the same
    factories, and a factory's bug never surfaces as a raw torch error mid-surgery.
    Built-ins are exact by construction and not run.

    Example:
        >>> register_module("halver", lambda channels: nn.Conv2d(channels, channels // 2, 1))
        >>> check_module("halver", 64, (8, 8), {}, site="layer1.0")
        Traceback (most recent call last):
        ...
        se_surgery.errors.ModuleError: module 'halver' at site layer1.0: maps a (1, 64, 8, 8) float32 input to (1, 32, 8, 8) float32; an inserted module must return the shape and dtype it is given
    """  # noqa: E501 - doctest output must match verbatim
    import torch

    spec = _registry().get(module_name)
    if spec.builtin:
        return
    where = f"module {module_name!r} at site {site}"
    try:
        module = create(module_name, channels, options, channel_dim=channel_dim, device="meta")
    except ModuleError as e:
        msg = str(e)
        for prefix in (f"module {module_name!r}: ", f"module {module_name!r} "):
            msg = msg[len(prefix):] if msg.startswith(prefix) else msg
        raise ModuleError(f"{where}: {msg}") from None
    except Exception as e:  # noqa: BLE001 - .to("meta") of whatever the factory made
        raise ModuleError(f"{where}: cannot be moved to the meta device to check it: {type(e).__name__}: "
                          f"{_first_line(e)}") from None
    h, w = int(spatial[0]), int(spatial[1])
    shape = (1, channels, h, w) if channel_dim == 1 else (1, h, w, channels)
    x = torch.empty(shape, device="meta")
    try:
        with torch.no_grad():
            y = module(x)
    except NotImplementedError:
        return  # an op without a meta kernel: the real forward will tell
    except Exception as e:  # noqa: BLE001 - a user's forward may raise anything
        raise ModuleError(f"{where}: its forward fails on a {tuple(shape)} float32 input: {type(e).__name__}: "
                          f"{_first_line(e)}") from None
    if not isinstance(y, torch.Tensor):
        raise ModuleError(f"{where}: its forward returns a {type(y).__name__}, not a tensor of the input's shape")
    if tuple(y.shape) != shape or y.dtype != x.dtype:
        raise ModuleError(f"{where}: maps a {shape} {str(x.dtype)[6:]} input to {tuple(y.shape)} {str(y.dtype)[6:]}; "
                          "an inserted module must return the shape and dtype it is given")


def supports_skip(module: nn.Module) -> bool:
    """Whether ``module(x, skip)`` computes ``skip + module(x)`` itself (every built-in does).

    Example:
        >>> supports_skip(create("se", 64, {})), supports_skip(nn.Identity())
        (True, False)
    """
    try:
        return "skip" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def hidden(module_name: str, channels: int, options: dict, block_channels: int | None = None) -> int | None:
    """Bottleneck width of ``se``, ``gc`` and ``cbam``; None for modules without one."""
    spec = _registry().get(module_name)
    return spec.hidden(channels, _resolved(module_name, options, block_channels)) if spec.hidden else None


def _resolved(module_name: str, options: dict, block_channels: int | None) -> dict:
    # The block's input channels ride along for ratio_of: block_input (not a rule option).
    return dict(resolve_options(module_name, validate_options(module_name, options)), block_channels=block_channels)


def count_params(module_name: str, channels: int, options: dict, block_channels: int | None = None) -> int:
    """Parameters one module adds at a map of ``channels`` channels.

    Built-ins: ``se`` ``2*C*hidden (+ hidden + C with bias)``; ``ese`` ``C*C + C``; ``eca``
    ``k``; ``gc`` ``(C + 1) + 2*C*hidden + 3*hidden + C``; ``cbam`` ``2*C*hidden
    (+ hidden + C with bias) + 2*k*k + 2``. A registered module is built on the meta device
    and its parameters counted.

    Example:
        >>> [count_params(m, 256, {}) for m in ("se", "ese", "eca", "gc", "cbam")]
        [8464, 65792, 5, 16993, 8292]
    """
    spec = _registry().get(module_name)
    if spec.params is not None:  # a built-in (a registration under its name has no formulas)
        return int(spec.params(channels, _resolved(module_name, options, block_channels)))
    module = create(module_name, channels, options, device="meta", block_channels=block_channels)
    return sum(p.numel() for p in module.parameters())


def weight_macs(module_name: str, channels: int, spatial: tuple[int, int], options: dict,
                block_channels: int | None = None) -> int:
    """The FC/conv/matmul part of :func:`count_macs`: what ``torch.utils.flop_counter`` sees (halved)."""
    return _macs(module_name, channels, spatial, options, block_channels)[0]


def count_macs(module_name: str, channels: int, spatial: tuple[int, int], options: dict,
               block_channels: int | None = None) -> int:
    """MACs of one module at a ``channels x H x W`` map (formulas in this module's docstring).

    Example:
        >>> count_macs("se", 256, (56, 56), {})  # FCs 8,192 + squeeze 802,816 + scale 802,816
        1613824
        >>> count_macs("eca", 256, (56, 56), {})  # conv 5 * 256 + squeeze + scale
        1606912
    """
    return sum(_macs(module_name, channels, spatial, options, block_channels))


def _macs(module_name: str, channels: int, spatial, options: dict, block_channels: int | None = None
          ) -> tuple[int, int]:
    spec = _registry().get(module_name)
    h, w = int(spatial[0]), int(spatial[1])
    if spec.macs is not None:
        weight, ops = spec.macs(channels, (h, w), _resolved(module_name, options, block_channels))
        return int(weight), int(ops)
    import torch

    from ._compat import flop_counter  # no global module hooks while it counts

    module = create(module_name, channels, options, device="meta", block_channels=block_channels)
    with flop_counter() as counter, torch.no_grad():
        module(torch.empty(1, channels, h, w, device="meta"))
    return int(counter.get_total_flops()) // 2, channels * h * w


# ---------------------------------------------------------------- the inserted-module protocol


@runtime_checkable
class ChannelAttention(Protocol):
    """What every inserted module answers (the built-ins implement it; see the module docstring)."""

    channels: int

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The factor the module multiplies ``x`` by, broadcastable against ``x``: 1 at identity."""
        ...

    def is_identity(self) -> bool:
        """Whether the module computes exactly its input, for every input."""
        ...


def excitation(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module.excitation(x)``; for a module without it, ``module.forward(x) / x`` (1 where ``x`` is 0).

    Example:
        >>> m = create("eca", 8, {})
        >>> bool((excitation(m, torch.randn(2, 8, 4, 4)) == 1).all()), bool((excitation(nn.Identity(), torch.randn(2, 8, 4, 4)) == 1).all())
        (True, True)
    """  # noqa: E501 - doctest lines
    if isinstance(module, ChannelAttention):
        return module.excitation(x)
    # forward, not __call__: drift reads this from inside the module's own forward pre-hook.
    y = module.forward(x)
    nonzero = x != 0
    return torch.where(nonzero, y / torch.where(nonzero, x, torch.ones_like(x)), torch.ones_like(x))


def is_identity(module: nn.Module, channels: int | None = None, channel_dim: int = 1) -> bool:
    """Whether ``module`` computes exactly its input: ``module.is_identity()``; for a module
    without it, ``forward`` on a fixed random (2, C, 5, 5) map (channels-last for
    ``channel_dim=-1``) compared exactly with the map.

    Example:
        >>> is_identity(create("cbam", 16, {})), is_identity(create("cbam", 16, {"init": "paper"}))
        (True, False)
        >>> is_identity(nn.Identity(), 16), is_identity(nn.ReLU(), 16)
        (True, False)
    """
    if isinstance(module, ChannelAttention):
        return module.is_identity()
    c = int(channels if channels is not None else getattr(module, "channels", 0))
    if c < 1:
        raise ModuleError(f"{type(module).__name__} does not say how many channels it scales; pass channels")
    try:
        p = next(module.parameters())
        device, dtype = p.device, (p.dtype if p.is_floating_point() else torch.float32)
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    shape = (2, c, 5, 5) if channel_dim == 1 else (2, 5, 5, c)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    probe = copy.deepcopy(module).eval()  # a train-mode norm layer inside would update the module's statistics
    with torch.no_grad():
        return torch.equal(probe.forward(x), x)
