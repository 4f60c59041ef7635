"""Declarative rules: which sites get SE and with which options.

A rules source is a YAML file, the name of a shipped preset, a dict of the same
structure, a :class:`Rules` object or a list of :class:`Rule` objects::

    defaults: {variant: standard, ratio: 16}
    rules:
      - select: {kind: residual, stage: [-2, -1]}
      - select: {name: "layer4.2"}
        skip: true

Precedence (one order for everything): rules apply in file order. A site gets SE when
at least one rule selects it and the last rule that selects it is not ``skip``; its
options are ``defaults`` overlaid by every selecting rule's options, in order.

``module`` (default ``se``) chooses what is inserted (see :mod:`se_surgery.modules`); it
resolves by the same order. The resolved module is built from the options written in
``defaults`` and in the selecting rules that its factory takes; options it does not take
(``ratio`` in a preset's defaults at a site a rule gives ``module: eca``) are not passed
to it, and options nobody wrote take the module's own defaults (``gc`` reduces by 8, not
by the ``ratio`` default of ``se``). ``se`` itself is built from the SE fields of
:class:`SEOptions`, as before. ``defaults`` are shared by all modules: each takes the
options it knows, so a default only other modules take (a preset's ``bias`` when every
rule says ``module: eca``) is no error; a defaults key no registered module takes is. A
key written in a rule that no module the rule can resolve to takes is an error; one that
reaches no module in the model is a warning at plan time (an error with ``strict``).
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import errno
import fnmatch
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from . import modules
from ._shipped import _preset_dir, preset_names, preset_summaries
from .errors import MissingFileError, ModuleError, RuleError
from .modules import DIVISOR_RANGE, MIN_HIDDEN_RANGE, RATIO_RANGE

__all__ = [
    "DIVISOR_RANGE",
    "KINDS",
    "MIN_HIDDEN_RANGE",
    "RATIO_RANGE",
    "VARIANTS",
    "VARIANTS_BY_KIND",
    "Rule",
    "Rules",
    "SEOptions",
    "Selector",
    "load_rules",
    "preset_names",
    "preset_summaries",
]

VARIANTS = ("standard", "pre", "post", "identity", "inner", "fusion")
KINDS = ("residual", "branch_sum", "concat", "block")
# What each kind of site allows: ``inner`` goes inside a residual branch or a block,
# ``fusion`` after the layer that consumes a concatenation (VoVNet's eSE).
VARIANTS_BY_KIND = {"residual": ("standard", "pre", "post", "identity", "inner"), "branch_sum": ("standard",),
                    "concat": ("standard", "fusion"), "block": ("inner",)}
TOP_KEYS = ("defaults", "rules")

# A rules file is a few lines; these caps keep a hostile or mistaken file from
# exhausting the parser (PyYAML's composer recurses once per nesting level).
MAX_RULES_BYTES = 1 << 18
MAX_NESTING = 64
MAX_NODES = 20_000  # values, mappings and lists: the presets have under 100


@dataclass(frozen=True)
class SEOptions:
    """Options of one inserted SE module (the ``defaults`` block and rule overrides)."""

    variant: str = "standard"  # standard | pre | post | identity | inner | fusion (VARIANTS_BY_KIND)
    ratio: float = 16  # reduction ratio r: hidden = channels / ratio; RATIO_RANGE
    divisor: int = 1  # round hidden to a multiple of this (timm uses 8); DIVISOR_RANGE
    min_hidden: int = 1  # lower bound on hidden before rounding; MIN_HIDDEN_RANGE
    init: str = "identity"  # identity (exact identity at insertion) | paper
    squeeze: str = "avg"  # avg | max | avgmax
    gate: str = "sigmoid"  # sigmoid | hard_sigmoid
    bias: bool = True  # FCs with bias (timm's SEModule has them)
    act: str = "relu"  # the excitation's activation: relu | relu6 | silu | gelu | hard_swish | mish
    ratio_of: str = "site"  # site: hidden = channels / ratio; block_input: the block's input channels / ratio
    round_limit: float = 0.0  # one divisor more where rounding lost more than 1 - this (timm's MobileNetV3: 0.9)
    module: str = "se"  # what is inserted: se | ese | eca | gc | cbam | a registered name
    # Options written for a module other than se (kernel_size, ratio for gc, ...), as
    # sorted (key, value) pairs; a dict is accepted. In Rules.defaults: every option the
    # defaults block wrote, for whichever module a rule resolves to.
    extra: tuple | dict = ()  # a dict is taken too: __post_init__ stores sorted (key, value) pairs

    def __post_init__(self):
        extra = self.extra.items() if isinstance(self.extra, dict) else self.extra
        object.__setattr__(self, "extra", tuple(sorted((str(k), v) for k, v in extra)))

    def to_dict(self) -> dict:
        """The fields, ``SEOptions(**o.to_dict()) == o``; ``module`` and ``extra`` only when
        set, so that SE-only plans and checkpoints read as they did before the catalog."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("module", "extra")}
        if self.module != "se":
            out["module"] = self.module
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    def module_options(self) -> dict:
        """The options the module is built with (its factory's keywords).

        Example:
            >>> SEOptions(ratio=8).module_options()["ratio"]
            8
            >>> SEOptions(module="eca", extra={"kernel_size": 5}).module_options()
            {'kernel_size': 5}
        """
        if self.module == "se":  # a registration that replaced se gets the SE fields it takes
            return {k: getattr(self, k) for k in SE_KEYS if modules.accepts("se", k)}
        return dict(self.extra)

    def rule_options(self) -> dict:
        """These options as one rule would write them: re-resolved over default
        :class:`SEOptions` they give back an equal object.

        Example:
            >>> SEOptions(module="eca", extra={"kernel_size": 5}).rule_options()
            {'variant': 'standard', 'module': 'eca', 'kernel_size': 5}
        """
        out = {"variant": self.variant}
        out.update({k: getattr(self, k) for k in SE_KEYS if getattr(self, k) != _SE_DEFAULTS[k]})
        if self.module != "se":
            out["module"] = self.module
        out.update(self.extra)
        return out

    def merged(self, options: dict) -> SEOptions:
        """These options overlaid by one selecting rule's ``options`` (precedence order).

        Example:
            >>> SEOptions().merged({"module": "gc"}).merged({"ratio": 4}).module_options()
            {'ratio': 4}
        """
        own = {k: v for k, v in options.items() if k in _FIELDS}
        written = {k: v for k, v in options.items() if k not in ("variant", "module", "extra")}
        return SEOptions(**dict(self.to_dict(), **own, extra=dict(self.extra, **written)))

    def resolved(self) -> SEOptions:
        """Keep in ``extra`` only what the resolved module takes (nothing for se)."""
        if self.module == "se":
            return dataclasses.replace(self, extra=())
        return dataclasses.replace(self, extra={k: v for k, v in self.extra if modules.accepts(self.module, k)})


SE_KEYS = ("ratio", "divisor", "min_hidden", "init", "squeeze", "gate", "bias", "act", "ratio_of",
           "round_limit")  # se's own options
_SE_DEFAULTS = {f.name: f.default for f in fields(SEOptions)}
_FIELDS = tuple(f.name for f in fields(SEOptions) if f.name != "extra")
OPTION_KEYS = _FIELDS  # keys a defaults block or a rule may always write


@dataclass(frozen=True)
class Selector:
    """Which sites a rule selects; every given key must hold (``None`` = any).

    A selector that names no ``kind`` selects joins (residual, branch_sum, concat) only:
    ``block`` sites are no joins and take only ``variant: inner``, so a rule reaches them
    by saying ``kind: block`` (as the ``efficientnet`` and ``mobilenetv3`` presets do).
    """

    kind: str | None = None
    stage: tuple[int, ...] | None = None  # 1-based; negative counts from the last stage
    block: tuple[int, ...] | None = None  # 1-based inside the stage; negative from its end
    name: tuple[str, ...] | None = None  # fnmatch globs over site names
    min_channels: int | None = None
    max_channels: int | None = None
    has_attention: bool | None = None  # the owner already has a channel gate

    def __post_init__(self):
        # Checked as a rules file's select is, so that Selector(stage=3) or a Selector given
        # where a list belongs fails here with a RuleError, not later in matches().
        given = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        for k, v in _Checker("Selector(...)", {}).selector_fields((), given).items():
            object.__setattr__(self, k, v)

    def matches(self, site, n_stages: int, stage_sizes: dict[int, int]) -> bool:
        """Whether ``site`` satisfies every key of this selector (a pure function)."""
        if site.kind != self.kind and (self.kind is not None or site.kind == "block"):
            return False
        if self.stage is not None and site.stage not in {s if s > 0 else n_stages + 1 + s for s in self.stage}:
            return False
        if self.block is not None:
            size = stage_sizes.get(site.stage, 0)
            if site.block not in {b if b > 0 else size + 1 + b for b in self.block}:
                return False
        if self.name is not None and not any(fnmatch.fnmatchcase(site.name, g) for g in self.name):
            return False
        if self.min_channels is not None and site.channels < self.min_channels:
            return False
        if self.max_channels is not None and site.channels > self.max_channels:
            return False
        return self.has_attention is None or site.has_attention == self.has_attention

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


SELECT_KEYS = tuple(f.name for f in fields(Selector))
RULE_KEYS = ("select", "skip") + OPTION_KEYS  # and the options of the modules a rule names


@dataclass(frozen=True)
class Rule:
    """One rule: a selector, option overrides, or ``skip=True``.

    Example:
        >>> Rule(Selector(kind="residual", stage=(-1,)), {"ratio": 8}).options
        {'ratio': 8}
    """

    select: Selector = field(default_factory=Selector)
    options: dict = field(default_factory=dict)
    skip: bool = False

    def __post_init__(self):
        chk = _Checker("Rule(...)", {})
        if self.select is None or isinstance(self.select, dict):  # as a rules file writes it
            object.__setattr__(self, "select", chk.selector(("select",), self.select))
        elif not isinstance(self.select, Selector):
            chk.fail(("select",), f"select must be a Selector or a dict of {', '.join(SELECT_KEYS)}, got "
                                  f"{type(self.select).__name__}")
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            chk.fail(("options",), f"options must be a dict of option names to values, got "
                                   f"{type(self.options).__name__}")
        if not isinstance(self.skip, bool):
            chk.fail(("skip",), f"skip must be True or False, got {_show(self.skip)}")

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"select": self.select.to_dict()}
        out.update(self.options)
        if self.skip:
            out["skip"] = True
        return out


@dataclass(frozen=True)
class Rules:
    """A validated rule set: defaults, rules in file order, and where it came from."""

    defaults: SEOptions = field(default_factory=SEOptions)
    rules: tuple[Rule, ...] = ()
    source: str = "<dict>"
    lines: dict = field(default_factory=dict, compare=False, repr=False)  # key path -> YAML line

    def __post_init__(self):
        chk = _Checker("Rules(...)", {})
        if isinstance(self.defaults, dict):  # as a rules file's defaults block
            d = _from_data({"defaults": self.defaults, "rules": [{"select": {}}]}, "Rules(defaults=...)", {})
            object.__setattr__(self, "defaults", d.defaults)
        elif not isinstance(self.defaults, SEOptions):
            chk.fail(("defaults",), f"defaults must be SEOptions or a dict of options, got "
                                    f"{type(self.defaults).__name__}")
        if not isinstance(self.rules, (list, tuple)) or not all(isinstance(r, Rule) for r in self.rules):
            got = type(self.rules).__name__ if not isinstance(self.rules, (list, tuple)) else \
                next(type(r).__name__ for r in self.rules if not isinstance(r, Rule)) + " in the list"
            chk.fail(("rules",), f"rules must be a list of Rule objects, got {got}")
        object.__setattr__(self, "rules", tuple(self.rules))
        if not isinstance(self.source, str):
            chk.fail(("source",), f"source must be a string, got {type(self.source).__name__}")

    def to_dict(self) -> dict:
        """As a rules file would say it: ``load_rules(r.to_dict())`` resolves the same."""
        return {"defaults": self.defaults.rule_options(), "rules": [r.to_dict() for r in self.rules]}

    def unused_options(self, resolved: Iterable[tuple[tuple[int, ...], str]]) -> list[str]:
        """Notes for rule options that reach no module: at every site the rule selects and
        that gets a module, the module does not take the option (``kernel_size`` in a rule
        whose sites all end up ``se``). ``resolved``: (selecting rule indices, module) per site.
        """
        used: dict[tuple[int, str], bool] = {}
        for matched, module in resolved:
            for i in matched:
                for k in self.rules[i].options:
                    if k not in ("variant", "module"):
                        used[i, k] = used.get((i, k), False) or modules.accepts(module, k)
        return [f"{self.where('rules', i, k)}: rule {i}, key {k!r}: no effect, no site it selects gets a module "
                f"that takes {k!r}" for (i, k), hit in used.items() if not hit]

    def where(self, *path) -> str:
        """``file`` or ``file:line`` for a key path such as ("rules", 0, "stage")."""
        for cut in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:cut]))
            if line is not None:
                return f"{self.source}:{line}"
        return self.source


# ---------------------------------------------------------------- presets and files


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _show(value) -> str:
    """``repr`` for an error message, cut to one readable line (an int of 5,000 digits
    cannot even be turned into text under Python's default limit)."""
    try:
        return _short(repr(value))
    except ValueError:
        return f"an {type(value).__name__} too large to print"


def _decode(data: bytes, name: str) -> str:
    """Rules text from file bytes: UTF-8, or UTF-16/32 with a byte-order mark (YAML allows them)."""
    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                          (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            break
    else:
        encoding = "utf-8"
    if encoding == "utf-8" and b"\0" in data:
        raise RuleError(f"{name}: not UTF-8 text (it holds NUL bytes: UTF-16 or UTF-32 without a byte-order mark?); "
                        "save the rules file as UTF-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise RuleError(f"{name}:{line}: not {encoding.upper().replace('-SIG', '')} text (byte 0x{data[e.start]:02x} "
                        f"at offset {e.start}); save the rules file as UTF-8") from None


def _read_source(source: str | os.PathLike) -> tuple[str, str]:
    """(text, display name) of a rules path or preset name."""
    path = Path(source)
    shown = _short(str(source))
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
        data = path.read_bytes() if is_file and path.stat().st_size <= MAX_RULES_BYTES else None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise MissingFileError(f"rules file {shown!r} ({len(str(source))} characters) cannot exist: the name is "
                                   "too long for the file system") from None
        raise MissingFileError(f"cannot read rules file {shown!r}: {e.strerror or e}") from None
    if is_dir:
        raise MissingFileError(f"rules file {shown!r} is a directory; give a YAML file or a preset name")
    if is_file:
        if data is None:
            raise RuleError(f"{shown}: a rules file may have at most {MAX_RULES_BYTES:,} bytes")
        return _decode(data, str(path)), str(path)
    stem = path.name[:-5] if path.name.endswith((".yaml", ".yml")) else path.name
    if path.parent == Path(".") and stem in preset_names():
        text = (_preset_dir() / f"{stem}.yaml").read_text(encoding="utf-8")
        return text, f"preset {stem}"
    raise MissingFileError(
        f"rules file {shown!r} not found, and it is not a preset name; "
        f"presets: {', '.join(preset_names())}"
    )


def _line_map(node, path=(), out=None) -> dict:
    """Map key paths to 1-based YAML lines, from the composed node tree."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[path + (key,)] = k.start_mark.line + 1
            _line_map(v, path + (key,), out)
            out[path + (key,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, path + (i,), out)
    return out


def _check_depth(text: str, name: str) -> None:
    """Refuse nesting deeper than MAX_NESTING before anything recursive sees the text.

    The event parser is iterative, so this walk is safe where ``safe_load`` would hit
    Python's recursion limit.
    """
    depth = 0
    for n, event in enumerate(yaml.parse(text, Loader=yaml.SafeLoader)):
        if n > MAX_NODES:  # refused in the parser's time, before safe_load builds it (seconds, hundreds of MB)
            raise RuleError(f"{name}:{event.start_mark.line + 1}: more than {MAX_NODES:,} YAML values; a rules "
                            "file needs a few dozen (select sites by stage, kind or name globs, not one by one)")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_NESTING:
                raise RuleError(f"{name}:{event.start_mark.line + 1}: invalid YAML: nested more than {MAX_NESTING} "
                                "levels deep; rules need three or four")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _parse_yaml(text: str, name: str) -> tuple[Any, dict]:
    try:
        _check_depth(text, name)
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}" if mark else name
        problem = e.problem or str(e)
        if "could not determine a constructor" in str(e):
            problem += " (only plain YAML is read: mappings, lists, strings, numbers, booleans)"
        raise RuleError(f"{where}: invalid YAML: {problem}") from None
    except RuleError:
        raise
    except yaml.YAMLError as e:
        # A ReaderError (a control character, such as the NULs of UTF-16 without a
        # byte-order mark) prints on two lines; the CLI promises one.
        raise RuleError(f"{name}: invalid YAML: {' '.join(str(e).split())}") from None
    except (ValueError, OverflowError) as e:
        # The safe constructor's own failures: an integer over Python's 4,300-digit text
        # limit, a timestamp such as 2020-13-45.
        raise RuleError(f"{name}: invalid YAML: a value cannot be read: {_short(' '.join(str(e).split()), 120)}") \
            from None
    _check_nodes(node, name)
    return data, (_line_map(node) if node is not None else {})


def _check_nodes(root, name: str) -> None:
    """Refuse what safe_load accepts silently: a key given twice (the last would win
    unseen) and an alias inside its own anchor (a structure that contains itself)."""
    stack: list[tuple[Any, tuple[int, ...]]] = [(root, ())] if root is not None else []
    visits = 0
    while stack:
        node, inside = stack.pop()
        visits += 1
        if visits > 100_000:  # aliases of aliases expand exponentially ("billion laughs")
            raise RuleError(f"{name}: invalid YAML: more than 100,000 nodes once aliases are expanded")
        if id(node) in inside:
            raise RuleError(f"{name}:{node.start_mark.line + 1}: invalid YAML: an alias refers to the anchor it is "
                            "inside of; rules must not contain themselves")
        inside = inside + (id(node),)
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in seen:
                        raise RuleError(f"{name}:{k.start_mark.line + 1}: invalid YAML: duplicate key {k.value!r}; "
                                        "give each key once per mapping")
                    seen.add(k.value)
                stack.extend([(k, inside), (v, inside)])
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, inside) for v in node.value)


# ---------------------------------------------------------------- validation


# YAML 1.1 (PyYAML) reads a float only with a dot and a signed exponent (1.0e+2), so
# `ratio: 1e2` arrives as the string "1e2"; it is read as the number it means.
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml11_number(value, key: str, takers: list[str]):
    """``value`` as a number where it is a string in exponent notation that the options'
    checks refuse as a string and accept as a number; otherwise ``value`` unchanged."""
    if not isinstance(value, str) or not _EXPONENT.fullmatch(value.strip()):
        return value
    number = float(value)
    if not math.isfinite(number):
        return value
    num: float | int = int(number) if number.is_integer() else number
    if any(modules.check_option(m, key, value) for m in takers) and \
            not any(modules.check_option(m, key, num) for m in takers):
        return num
    return value


class _Checker:
    def __init__(self, source: str, lines: dict):
        self.source, self.lines = source, lines

    def where(self, path) -> str:
        for cut in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:cut]))
            if line is not None:
                return f"{self.source}:{line}"
        return self.source

    def fail(self, path, message: str):
        ctx = ""
        if len(path) >= 2 and path[0] == "rules":
            ctx = f"rule {path[1]}" + (f", key {path[-1]!r}" if len(path) > 2 else "")
        elif path:
            ctx = f"key {'.'.join(str(p) for p in path)!r}"
        raise RuleError(f"{self.where(path)}: {ctx + ': ' if ctx else ''}{message}")

    def keys(self, path, mapping: dict, allowed: Iterable[str], what: str):
        for k in mapping:
            if k not in allowed:
                import difflib

                close = difflib.get_close_matches(str(k), list(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(path + (k,), f"unknown {what} key {_show(k)}{hint}; allowed: {', '.join(allowed)}")

    def module(self, path, value) -> str:
        if not isinstance(value, str):
            self.fail(path, f"module must be a module name ({', '.join(modules.module_names())}), got {value!r}")
        try:
            modules.option_names(value)
        except ModuleError as e:
            self.fail(path, str(e))
        return value

    def options(self, path, mapping: dict, candidates: tuple[str, ...], what: str, fixed: tuple[str, ...],
                shared: bool = False) -> dict:
        """Check every key of ``mapping`` outside ``fixed``: some module in ``candidates``
        (those the rule can resolve to; any registered module where ``shared``) must take
        it, and each that does accepts its value."""
        out = {}
        for k, v in mapping.items():
            if k in fixed:
                continue
            takers = [m for m in candidates if modules.accepts(m, k)]
            if shared and not takers:
                candidates = tuple(modules.module_names())
                takers = [m for m in candidates if modules.accepts(m, k)]
            if not takers:
                self._not_taken(path + (k,), k, candidates, what, fixed)
            v = _yaml11_number(v, k, takers)
            for m in takers:
                why = modules.check_option(m, k, v)
                if why:
                    self.fail(path + (k,), why)
            out[k] = v
        return out

    def _not_taken(self, path, key, candidates, what, fixed):
        own = [k for k in fixed if k != "module"]
        allowed = list(dict.fromkeys([*own, *(o for m in candidates for o in modules.option_names(m)), "module"]))
        others = [m for m in modules.module_names() if m not in candidates and key in modules.option_names(m)]
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if not others:
            self.fail(path, f"unknown {what} key {key!r}{hint}; allowed: {', '.join(allowed)}")
        names = " or ".join(repr(m) for m in candidates)
        self.fail(path, f"module {names} takes no option {key!r}{hint}; "
                        + "; ".join(f"{m} takes: {', '.join(modules.option_names(m)) or 'none'}" for m in candidates)
                        + f" ({key!r} is an option of {', '.join(others)}: set module: {others[0]})")

    def int_list(self, path, key: str, value, allow_negative: bool) -> tuple[int, ...]:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items:
            self.fail(path, f"{key} must be an integer or a non-empty list of integers, got []")
        for v in items:
            if isinstance(v, bool) or not isinstance(v, int) or v == 0 or (v < 0 and not allow_negative):
                self.fail(path, f"{key} must be a non-zero integer or a list of them (1-based, negative counts "
                                f"from the end), got {_show(value)}")
        return tuple(items)

    def selector(self, path, sel) -> Selector:
        if sel is None:
            return Selector()
        if isinstance(sel, Selector):
            return sel
        if not isinstance(sel, dict):
            self.fail(path, f"select must be a mapping of {', '.join(SELECT_KEYS)}, got {type(sel).__name__}")
        return Selector(**self.selector_fields(path, sel))

    def selector_fields(self, path, sel: dict) -> dict:
        """The validated, normalised fields of a select mapping (lists as tuples)."""
        self.keys(path, sel, SELECT_KEYS, "select")
        out: dict[str, Any] = {}
        for k, v in sel.items():
            p = path + (k,)
            if k == "kind":
                if v not in KINDS:
                    self.fail(p, f"kind must be one of {', '.join(KINDS)}, got {_show(v)}")
                out[k] = v
            elif k in ("stage", "block"):
                out[k] = self.int_list(p, k, v, allow_negative=True)
            elif k == "name":
                names = list(v) if isinstance(v, (list, tuple)) else [v]
                if not names or not all(isinstance(g, str) and g for g in names):
                    self.fail(p, f"name must be a glob string or a list of them, got {_show(v)}")
                out[k] = tuple(names)
            elif k in ("min_channels", "max_channels"):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    self.fail(p, f"{k} must be a positive integer, got {_show(v)}")
                out[k] = v
            elif k == "has_attention":
                if not isinstance(v, bool):
                    self.fail(p, f"has_attention must be true or false, got {_show(v)}")
                out[k] = v
        if "min_channels" in out and "max_channels" in out and out["min_channels"] > out["max_channels"]:
            self.fail(path + ("min_channels",),
                      f"min_channels {out['min_channels']} > max_channels {out['max_channels']}")
        return out


def _from_data(data, source: str, lines: dict) -> Rules:
    chk = _Checker(source, lines)
    if data is None:
        chk.fail((), "the rules are empty; expected a mapping with 'rules:' (a list) and optional 'defaults:'")
    if not isinstance(data, dict):
        chk.fail((), f"expected a mapping with keys {', '.join(TOP_KEYS)}, got {type(data).__name__}")
    chk.keys((), data, TOP_KEYS, "top-level")
    if "rules" not in data:
        chk.fail((), "missing key 'rules' (a list of rules, each with 'select:')")
    defaults_raw = {} if data.get("defaults") is None else data["defaults"]
    if not isinstance(defaults_raw, dict):
        chk.fail(("defaults",), f"defaults must be a mapping of {', '.join(OPTION_KEYS)}")
    raw_rules = data["rules"]
    if not isinstance(raw_rules, list):
        chk.fail(("rules",), f"rules must be a list of mappings, got {type(raw_rules).__name__}")
    if not raw_rules:
        chk.fail(("rules",), "rules is an empty list; add at least one rule such as '- select: {kind: residual}'")
    raw_rules = [r.to_dict() if isinstance(r, Rule) else r for r in raw_rules]
    # A rule without its own module may resolve to the defaults' or to any other rule's.
    default_module = chk.module(("defaults", "module"), defaults_raw.get("module", "se"))
    rule_modules = [chk.module(("rules", i, "module"), r["module"]) if isinstance(r, dict) and "module" in r
                    else None for i, r in enumerate(raw_rules)]
    every = tuple(dict.fromkeys([default_module, *(m for m in rule_modules if m)]))
    fixed = ("variant", "module")
    # Defaults are shared by every module: each takes the options it knows, so an option
    # only other registered modules take (a preset's 'bias' when every rule says eca) is
    # no error; one that no module takes is.
    written = chk.options(("defaults",), defaults_raw, every, "defaults", fixed, shared=True)
    defaults_raw = {**defaults_raw, **written}  # values as read (ratio: 1e2 -> 100.0)
    if defaults_raw.get("variant", "standard") not in VARIANTS:
        chk.fail(("defaults", "variant"), f"variant must be one of {', '.join(VARIANTS)}, "
                                          f"got {defaults_raw['variant']!r}")
    defaults = SEOptions(**{k: v for k, v in defaults_raw.items() if k in _FIELDS}, extra=written)
    rules = [_rule(chk, i, r, (m,) if (m := rule_modules[i]) else every) for i, r in enumerate(raw_rules)]
    return Rules(defaults, tuple(rules), source, lines)


def _rule(chk: _Checker, i: int, r, candidates: tuple[str, ...]) -> Rule:
    """Rule ``i`` checked; ``candidates``: the modules it can resolve to."""
    path = ("rules", i)
    if not isinstance(r, dict):
        chk.fail(path, f"each rule must be a mapping with 'select:', got {type(r).__name__}")
    r = {**r, **chk.options(path, r, candidates, "rule", ("select", "skip", "variant", "module"))}
    select = chk.selector(path + ("select",), r.get("select"))
    skip = r.get("skip", False)
    if not isinstance(skip, bool):
        chk.fail(path + ("skip",), f"skip must be true or false, got {skip!r}")
    if "variant" in r and r["variant"] not in VARIANTS:
        chk.fail(path + ("variant",), f"variant must be one of {', '.join(VARIANTS)}, got {r['variant']!r}")
    options = {k: v for k, v in r.items() if k not in ("select", "skip")}
    if skip and options:
        chk.fail(path + (next(iter(options)),), "a rule with skip: true takes no SE options")
    return Rule(select, options, skip)


def load_rules(source=None) -> Rules:
    """Read and validate rules from a path, preset name, dict, Rules or list of Rule.

    ``None`` means the preset ``all_stages``. Every problem raises :class:`RuleError`
    naming the file (and line), the rule's index and the key, with the allowed values.

    Example:
        >>> r = load_rules({"rules": [{"select": {"stage": [-1]}, "ratio": 8}]})
        >>> r.rules[0].select.stage, r.rules[0].options
        ((-1,), {'ratio': 8})
        >>> load_rules("late_stages").source
        'preset late_stages'
    """
    if source is None:
        source = "all_stages"
    if isinstance(source, Rules):
        return source
    if isinstance(source, Rule):
        source = [source]
    if isinstance(source, (list, tuple)):
        if not all(isinstance(r, (Rule, dict)) for r in source):
            raise RuleError("a list of rules must hold Rule objects or rule dicts")
        return _from_data({"rules": list(source)}, "<rules>", {})
    if isinstance(source, dict):
        return _from_data(source, "<dict>", {})
    if isinstance(source, (str, os.PathLike)):
        text, name = _read_source(source)
        data, lines = _parse_yaml(text, name)
        return _from_data(data, name, lines)
    raise RuleError(
        f"rules must be a path, a preset name ({', '.join(preset_names())}), a dict, Rules or a list of "
        f"Rule, got {type(source).__name__}"
    )
