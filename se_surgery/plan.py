"""The plan: rules matched against sites, resolved and validated before any surgery."""

from __future__ import annotations

import hashlib
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import cast

from torch import nn

from . import modules
from .errors import AlreadyPatchedError, ModelTypeError, PlanError, SESurgeryWarning, TraceError
from .rules import VARIANTS_BY_KIND, Rules, SEOptions, load_rules
from .sites import Discovery, Site, discover, forward_failed

__all__ = ["Plan", "PlannedSite", "plan", "match", "is_patched", "se_modules", "fingerprint"]


def se_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(dotted name, module) of every module se-surgery inserted into ``model``."""
    return [(n, m) for n, m in model.named_modules() if "se_site" in m.__dict__]


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` carries modules inserted by se-surgery."""
    return any("se_site" in m.__dict__ or hasattr(type(m), "_se_surgery_base") for m in model.modules())


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


@dataclass(frozen=True)
class PlannedSite:
    """One site and what the rules decided for it."""

    site: Site
    selected: bool  # gets SE
    options: SEOptions | None  # resolved options when selected
    rule: int | None  # index of the last rule that selects the site (the deciding one)
    matched: tuple[int, ...] = ()  # indices of every rule that selects the site

    @property
    def se_channels(self) -> int:
        """Channels the SE module scales (the block input's for ``pre``, the branch's
        inside for ``inner``)."""
        variant = self.options.variant if self.options is not None else None
        if variant == "pre":
            return cast(int, self.site.in_channels)  # plan() refuses the variant where the site lacks it
        if variant == "inner":
            return cast(int, self.site.inner_channels)  # plan() refuses the variant where the site lacks it
        return self.site.channels

    @property
    def se_spatial(self) -> tuple[int, int]:
        variant = self.options.variant if self.options is not None else None
        if variant == "pre":
            return cast(tuple[int, int], self.site.in_spatial)
        if variant == "inner":
            return cast(tuple[int, int], self.site.inner_spatial)
        return self.site.spatial

    @property
    def hidden(self) -> int | None:
        if self.options is None:
            return None
        return modules.hidden(self.options.module, self.se_channels, self.options.module_options())


@dataclass
class Plan:
    """Dry run of :func:`apply`: every site, whether it gets SE, with which options, why."""

    model: str
    input_size: tuple[int, int, int]
    rules: Rules
    entries: list[PlannedSite]
    untraced: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fingerprint: str = ""  # of the model planned for (see fingerprint()); apply refuses others
    discovery: Discovery | None = field(default=None, repr=False, compare=False)  # the graphs apply rewrites

    @property
    def selected(self) -> list[PlannedSite]:
        return [e for e in self.entries if e.selected]

    def rows(self) -> list[dict]:
        rows = []
        for e in self.entries:
            s = e.site
            rows.append({
                # The channels SE scales: the block input's for 'pre' (as report shows them).
                "site": s.name, "kind": s.kind, "stage": s.stage, "block": s.block, "channels": e.se_channels,
                "se": "yes" if e.selected else "-", "variant": e.options.variant if e.options else "",
                "module": e.options.module if e.options else "",
                "ratio": modules.resolve_options(e.options.module, e.options.module_options()).get("ratio", "")
                if e.options else "", "hidden": e.hidden or "",
                "rule": "" if e.rule is None else e.rule,
            })
        return rows

    def to_dict(self) -> dict:
        return {
            "model": self.model, "input_size": list(self.input_size), "rules_source": self.rules.source,
            "rules": self.rules.to_dict(),
            "sites": [dict(e.site.to_dict(), selected=e.selected, rule=e.rule,
                           options=e.options.to_dict() if e.options else None, hidden=e.hidden)
                      for e in self.entries],
            "untraced": [{"module": p, "reason": r} for p, r in self.untraced],
            "warnings": list(self.warnings),
        }

    def __str__(self) -> str:
        from tabulate import tabulate

        head = f"{self.model} at {'x'.join(map(str, self.input_size))}, rules {self.rules.source}: " \
               f"SE at {len(self.selected)} of {len(self.entries)} sites"
        parts = [head, tabulate(self.rows(), headers="keys")]
        parts += [f"not traced: {p}: {r}" for p, r in self.untraced]
        parts += [f"warning: {w}" for w in self.warnings]
        return "\n".join(parts)


def match(rules: Rules, sites: list[Site]) -> list[PlannedSite]:
    """Resolve which site gets SE with which options (a pure function of rules and sites).

    Example:
        >>> from se_surgery.rules import load_rules
        >>> s = Site("a", "residual", "a", "Block", 1, 1, 64, (8, 8))
        >>> r = load_rules({"rules": [{"select": {}}, {"select": {"name": "a"}, "ratio": 4}]})
        >>> e = match(r, [s])[0]
        >>> e.selected, e.rule, e.options.ratio
        (True, 1, 4)
    """
    n_stages, sizes = _stage_sizes(sites)
    out = []
    for s in sites:
        chosen = tuple(i for i, r in enumerate(rules.rules) if r.select.matches(s, n_stages, sizes))
        if not chosen or rules.rules[chosen[-1]].skip:
            out.append(PlannedSite(s, False, None, chosen[-1] if chosen else None, chosen))
            continue
        opts: SEOptions = rules.defaults
        for i in chosen:
            opts = opts.merged(rules.rules[i].options)
        out.append(PlannedSite(s, True, opts.resolved(), chosen[-1], chosen))
    return out


def _stage_sizes(sites: list[Site]) -> tuple[int, dict[int, int]]:
    sizes: dict[int, int] = {}
    for s in sites:
        sizes[s.stage] = sizes.get(s.stage, 0) + 1
    return max(sizes, default=0), sizes


def _check_ranges(rules: Rules, sites: list[Site], model_name: str) -> None:
    n_stages, sizes = _stage_sizes(sites)
    for i, r in enumerate(rules.rules):
        for st in r.select.stage or ():
            if abs(st) > n_stages:
                raise PlanError(
                    f"{rules.where('rules', i, 'select', 'stage')}: rule {i}, key 'stage': {model_name} has no stage "
                    f"{st}; it has {n_stages} stage(s): 1..{n_stages} or -{n_stages}..-1 "
                    f"(se-surgery sites MODEL lists them)" if n_stages else
                    f"{rules.where('rules', i, 'select', 'stage')}: rule {i}, key 'stage': {model_name} has no sites"
                )
        if r.select.block:
            stages = r.select.stage or tuple(sizes)
            longest = max((sizes.get(st if st > 0 else n_stages + 1 + st, 0) for st in stages), default=0)
            for b in r.select.block:
                if abs(b) > longest:
                    raise PlanError(
                        f"{rules.where('rules', i, 'select', 'block')}: rule {i}, key 'block': no stage of "
                        f"{model_name} it selects has a block {b}; the longest has {longest} "
                        f"(1..{longest} or -{longest}..-1)"
                    )


def plan(model: nn.Module, rules=None, *, input_size=None, strict: bool = False, tracer_kwargs=None) -> Plan:
    """Match ``rules`` against the sites of ``model`` without changing anything.

    The returned :class:`Plan` is exactly what :func:`se_surgery.apply` cuts when it is
    passed as ``rules``: it holds the graphs the sites were found in.

    Args:
        model: the model to plan for (not modified, not run).
        rules: path, preset name, dict, :class:`~se_surgery.rules.Rules` or rule list;
            ``None`` is the ``all_stages`` preset.
        input_size: example input size for shapes (see :func:`find_sites`).
        strict: turn warnings (a rule selecting nothing, untraceable blocks) into errors.
        tracer_kwargs: tracer options for models that do not trace as they are (see
            :func:`~se_surgery.find_sites`).

    Example:
        >>> import torchvision
        >>> from se_surgery.plan import plan
        >>> p = plan(torchvision.models.resnet50(), "late_stages")
        >>> [e.site.name for e in p.selected][:2], len(p.selected)
        (['layer3.0', 'layer3.1'], 9)
    """
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_patched(model):
        raise AlreadyPatchedError(
            f"{type(model).__name__} already has {len(se_modules(model))} SE module(s) from se-surgery; "
            "call se_surgery.strip(model) first to start from the original model"
        )
    rules = load_rules(rules)
    d = discover(model, input_size, tracer_kwargs=tracer_kwargs)
    return plan_from(model, rules, d, strict=strict)


# Models already told which of their parts could not be traced: plan, apply and report of
# one model say it once, not once per call. Weak keys: a model's entry goes with the model.
_TOLD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOLD_LOCK = threading.Lock()


def _first_time(model: nn.Module, what: str) -> bool:
    with _TOLD_LOCK:
        try:
            told = _TOLD.setdefault(model, set())
        except TypeError:  # a model that cannot be weakly referenced: say it every time
            return True
        if what in told:
            return False
        told.add(what)
        return True


def _warn_untraced(model: nn.Module, d: Discovery) -> None:
    if not d.untraced:
        return
    listed = "; ".join(f"{p} ({why})" for p, why in d.untraced)
    if _first_time(model, listed):
        warnings.warn(f"{len(d.untraced)} module(s) of {type(model).__name__} could not be traced as a whole, so "
                      f"joins inside them were searched only in the submodules that did trace ({len(d.sites)} "
                      "site(s) found). SE goes only at the sites plan() lists; a join inside an untraced part gets "
                      "none, which is harmless if those are the sites you want (tracer_kwargs with leaf_modules or "
                      f"concrete_args may let more trace; strict=True makes this an error): {listed}",
                      SESurgeryWarning, stacklevel=4)


def _check_modules(entries: list[PlannedSite]) -> None:
    """Run every registered module the plan inserts once per shape on the meta device, so that
    report() and apply() refuse the same factories (built-ins are not run)."""
    checked = set()
    for e in entries:
        if e.selected:
            opts = e.options.module_options()
            key = (e.options.module, e.se_channels, e.se_spatial, e.site.channel_dim, repr(opts))
            if key not in checked:
                checked.add(key)
                modules.check_module(e.options.module, e.se_channels, e.se_spatial, opts,
                                     channel_dim=e.site.channel_dim, site=e.site.name)


def plan_from(model: nn.Module, rules: Rules, d: Discovery, *, strict: bool = False,
              entries: list[PlannedSite] | None = None) -> Plan:
    """Validate ``rules`` (or given ``entries``) against a discovery; warn and build the Plan."""
    name = type(model).__name__
    if d.stopped and not d.sites:
        raise TraceError(f"cannot plan for {forward_failed(model, d)}")
    notes: list[str] = []
    if entries is None:
        _check_ranges(rules, d.sites, name)
        entries = match(rules, d.sites)
        used = {i for e in entries for i in e.matched}
        for i in range(len(rules.rules)):
            if i not in used:
                msg = f"{rules.where('rules', i)}: rule {i} selects no site of {name} ({len(d.sites)} sites; " \
                      f"se-surgery sites MODEL lists them)"
                if strict:
                    raise PlanError(msg)
                notes.append(msg)
        for msg in rules.unused_options((e.matched, e.options.module) for e in entries if e.selected):
            if strict:
                raise PlanError(msg)
            notes.append(msg)
    bad = [e.site.name for e in entries
           if e.selected and e.options.variant not in VARIANTS_BY_KIND[e.site.kind]]
    if bad:
        e0 = next(e for e in entries if e.site.name == bad[0])
        raise PlanError(
            f"{rules.where('rules', e0.rule)}: rule {e0.rule}, key 'variant': variant "
            f"{e0.options.variant!r} is not allowed at {e0.site.kind} site(s) {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}; {e0.site.kind} sites allow only 'standard' "
            f"(add kind: residual to the rule's select)"
        )
    no_fork = [e for e in entries if e.selected and e.options.variant == "pre" and e.site.in_channels is None]
    if no_fork:
        raise PlanError(
            f"{rules.where('rules', no_fork[0].rule)}: rule {no_fork[0].rule}, key 'variant': 'pre' needs the "
            f"block's input to be a 4-D map, which it is not at {no_fork[0].site.name}; use another variant"
        )
    no_inner = [e for e in entries if e.selected and e.options.variant == "inner" and e.site.inner is None]
    if no_inner:
        raise PlanError(
            f"{rules.where('rules', no_inner[0].rule)}: rule {no_inner[0].rule}, key 'variant': 'inner' needs a "
            f"spatial convolution in the residual branch, and {no_inner[0].site.name} has none; use another variant"
        )
    scaled = [e.site.name for e in entries if e.selected and e.site.layer_scale and e.options.variant == "standard"]
    if scaled:
        notes.append(f"{len(scaled)} site(s) of {name} (e.g. {scaled[0]}) scale their branch by a learned layer "
                     "scale (ConvNeXt-style, often initialised near 1e-6): a 'standard' SE sits before it, so its "
                     "gradients are scaled by it and it barely moves with a frozen base; 'post' or 'identity' "
                     "place it outside the layer scale")
    _check_modules(entries)
    if d.untraced:
        listed = "; ".join(f"{p} ({why})" for p, why in d.untraced)
        if strict:
            raise PlanError(f"strict: {len(d.untraced)} module(s) could not be traced, their joins were not "
                            f"searched: {listed}")
    for msg in notes:
        warnings.warn(msg, SESurgeryWarning, stacklevel=3)
    _warn_untraced(model, d)  # listed in Plan.untraced; said once per model for callers who only see warnings
    return Plan(name, d.input_size, rules, entries, list(d.untraced), notes, fingerprint(model), d)
