"""The plan: rules matched against sites, resolved and validated before any surgery."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from torch import nn

from . import modules
from ._checks import check_model
from ._record import inserted_modules, is_patched
from ._rules import VARIANTS_BY_KIND, Rules, SEOptions, load_rules
from ._sites import Analysis, Site, analysis_of, discover, fingerprint, forward_failed
from .errors import AlreadyPatchedError, PlanError, TraceError, warn

__all__ = ["Plan", "PlannedSite", "analyze", "plan", "match", "check_unpatched", "check_plan", "se_modules"]


def se_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(dotted name, module) of every module se-surgery inserted into ``model`` (see
    :func:`se_surgery._record.inserted_modules`, which also gives each one's record)."""
    return [(n, m) for n, m, _ in inserted_modules(model)]


def check_unpatched(model, *, analysis_ok: bool = True) -> nn.Module:
    """``model`` if it is an ``nn.Module`` se-surgery can work on and has not patched; else the error that says so."""
    if not isinstance(model, nn.Module) and analysis_ok:
        check_model(model, what="a torch.nn.Module or an se_surgery.Analysis")
    check_model(model)
    if is_patched(model):
        raise AlreadyPatchedError(
            f"{type(model).__name__} already has {len(se_modules(model))} SE module(s) from se-surgery; "
            "call se_surgery.strip(model) first to start from the original model"
        )
    return model


def analyze(model: nn.Module, input_size=None, tracer_kwargs=None) -> Analysis:
    """Look at ``model`` once: trace it, find its sites and count its MACs, without
    changing or running it (see :func:`find_sites`).

    The returned :class:`Analysis` is a frozen value that :func:`se_surgery.find_sites`,
    :func:`se_surgery.plan` and :func:`se_surgery.report` take in place of the model, so
    one analysis serves any number of rule sets; ``se_surgery.apply(model,
    se_surgery.plan(analysis, rules))`` cuts what was planned (into a model with the
    analysed structure only).

    Example:
        >>> import torchvision, se_surgery
        >>> a = se_surgery.analyze(torchvision.models.resnet50())
        >>> len(a.sites), a.model, a.stages
        (16, 'ResNet', {1: 3, 2: 4, 3: 6, 4: 3})
        >>> [se_surgery.report(a, r).added_params for r in ("all_stages", "late_stages")]
        [2530992, 2372352]
    """
    check_unpatched(model, analysis_ok=False)
    return discover(model, input_size, tracer_kwargs=tracer_kwargs, count_macs=True)


def check_plan(p: Plan, model: nn.Module | Analysis) -> None:
    """Refuse a plan (or analysis) made for a model of another structure than ``model``."""
    name, mine = (model.model, model.fingerprint) if isinstance(model, Analysis) else (
        type(model).__name__, fingerprint(model))
    if p.analysis is None or p.fingerprint != mine:
        raise PlanError(f"this plan was made for another model (a {p.model}, structure {p.fingerprint}), not this "
                        f"{name} (structure {mine}); make one for it with se_surgery.plan(model, rules)")


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
        if variant == "fusion":
            return cast(int, self.site.fusion_channels)  # plan() refuses the variant where the site lacks it
        return self.site.channels

    @property
    def se_spatial(self) -> tuple[int, int]:
        variant = self.options.variant if self.options is not None else None
        if variant == "pre":
            return cast(tuple[int, int], self.site.in_spatial)
        if variant == "inner":
            return cast(tuple[int, int], self.site.inner_spatial)
        if variant == "fusion":
            return cast(tuple[int, int], self.site.fusion_spatial)
        return self.site.spatial

    @property
    def hidden(self) -> int | None:
        if self.options is None:
            return None
        return modules.hidden(self.options.module, self.se_channels, self.options.module_options(),
                              self.site.in_channels)


@dataclass
class Plan:
    """Dry run of :func:`apply`: every site, whether it gets SE, with which options, why."""

    model: str
    input_size: tuple[int, int, int]
    rules: Rules
    entries: list[PlannedSite]
    untraced: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fingerprint: str = ""  # of the model planned for (see sites.fingerprint); apply refuses others
    analysis: Analysis | None = field(default=None, repr=False, compare=False)  # the graphs apply rewrites

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
        >>> from se_surgery._rules import load_rules
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


def plan(model: nn.Module | Analysis, rules=None, *, input_size=None, strict: bool = False,
         tracer_kwargs=None) -> Plan:
    """Match ``rules`` against the sites of ``model`` without changing anything.

    The returned :class:`Plan` is exactly what :func:`se_surgery.apply` cuts when it is
    passed as ``rules``: it holds the graphs the sites were found in.

    Args:
        model: the model to plan for (not modified, not run), or its
            :class:`~se_surgery.Analysis` (one analysis serves any number of plans).
        rules: path, preset name, dict, :class:`~se_surgery._rules.Rules` or rule list;
            ``None`` is the ``all_stages`` preset.
        input_size: example input size for shapes (see :func:`find_sites`).
        strict: turn warnings (a rule selecting nothing, untraceable blocks) into errors.
        tracer_kwargs: tracer options for models that do not trace as they are (see
            :func:`~se_surgery.find_sites`).

    Example:
        >>> import torchvision
        >>> from se_surgery._plan import plan
        >>> p = plan(torchvision.models.resnet50(), "late_stages")
        >>> [e.site.name for e in p.selected][:2], len(p.selected)
        (['layer3.0', 'layer3.1'], 9)
    """
    if not isinstance(model, Analysis):
        check_unpatched(model)
    rules = load_rules(rules)
    return plan_from(rules, analysis_of(model, input_size, tracer_kwargs), strict=strict)


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


def _notes_for_rules(rules: Rules, entries: list[PlannedSite], d: Analysis, strict: bool) -> list[str]:
    """Rules that select nothing and options that reach no module: warnings (errors with ``strict``)."""
    notes: list[str] = []
    used = {i for e in entries for i in e.matched}
    unused = [f"{rules.where('rules', i)}: rule {i} selects no site of {d.model} ({len(d.sites)} sites; "
              f"se-surgery sites MODEL lists them)" for i in range(len(rules.rules)) if i not in used]
    for msg in unused + rules.unused_options((e.matched, e.options.module) for e in entries if e.selected):
        if strict:
            raise PlanError(msg)
        notes.append(msg)
    return notes


def _refuse(rules: Rules, e: PlannedSite, message: str):
    raise PlanError(f"{rules.where('rules', e.rule)}: rule {e.rule}, key 'variant': {message}")


def _check_placements(rules: Rules, entries: list[PlannedSite]) -> None:
    """Every selected site can take its variant (and ``ratio_of``) where it is."""
    chosen = [e for e in entries if e.selected]
    bad = [e.site.name for e in chosen if e.options.variant not in VARIANTS_BY_KIND[e.site.kind]]
    if bad:
        e0 = next(e for e in chosen if e.site.name == bad[0])
        kind = e0.site.kind
        allowed = ", ".join(repr(v) for v in VARIANTS_BY_KIND[kind])
        hint = "add kind: residual to the rule's select" if kind != "block" else "block sites take variant: inner"
        _refuse(rules, e0, f"variant {e0.options.variant!r} is not allowed at {kind} site(s) {', '.join(bad[:5])}"
                           f"{' ...' if len(bad) > 5 else ''}; {kind} sites allow only {allowed} ({hint})")
    for e in chosen:
        v, s = e.options.variant, e.site
        if v == "pre" and s.in_channels is None:
            _refuse(rules, e, f"'pre' needs the block's input to be a 4-D map, which it is not at {s.name}; "
                              "use another variant")
        if v == "inner" and s.inner is None:
            _refuse(rules, e, f"'inner' needs a spatial convolution in the residual branch, and {s.name} has none; "
                              "use another variant")
        if v == "fusion" and s.fusion is None:
            _refuse(rules, e, f"'fusion' needs a conv layer that alone reads the concatenation, and {s.name} has "
                              "none; use 'standard'")
        if e.options.ratio_of == "block_input" and s.in_channels is None:
            raise PlanError(f"{rules.where('rules', e.rule)}: rule {e.rule}, key 'ratio_of': 'block_input' needs "
                            f"the block's input channels, which {s.kind} site {s.name} has not; use ratio_of: site")


def _layer_scale_note(entries: list[PlannedSite], name: str) -> list[str]:
    scaled = [e.site.name for e in entries if e.selected and e.site.layer_scale
              and cast(SEOptions, e.options).variant == "standard"]
    if not scaled:
        return []
    return [f"{len(scaled)} site(s) of {name} (e.g. {scaled[0]}) scale their branch by a learned layer "
            "scale (ConvNeXt-style, often initialised near 1e-6): a 'standard' SE sits before it, so its "
            "gradients are scaled by it and it barely moves with a frozen base; 'post' or 'identity' "
            "place it outside the layer scale"]


def _untraced(d: Analysis, strict: bool) -> str | None:
    """The untraced modules, said once (an error with ``strict``)."""
    if not d.untraced:
        return None
    listed = "; ".join(f"{p} ({why})" for p, why in d.untraced)
    if strict:
        raise PlanError(f"strict: {len(d.untraced)} module(s) could not be traced, their joins were not "
                        f"searched: {listed}")
    return (f"{len(d.untraced)} module(s) of {d.model} could not be traced as a whole, so joins inside them were "
            f"searched only in the submodules that did trace ({len(d.sites)} site(s) found). SE goes only at the "
            "sites plan() lists; a join inside an untraced part gets none, which is harmless if those are the "
            "sites you want (tracer_kwargs with leaf_modules or concrete_args may let more trace; strict=True "
            f"makes this an error): {listed}")


def plan_from(rules: Rules, d: Analysis, *, strict: bool = False,
              entries: list[PlannedSite] | None = None) -> Plan:
    """Validate ``rules`` (or given ``entries``) against an analysis; warn and build the Plan."""
    if d.stopped and not d.sites:
        raise TraceError(f"cannot plan for {forward_failed(d)}")
    notes: list[str] = []
    if entries is None:
        _check_ranges(rules, list(d.sites), d.model)
        entries = match(rules, list(d.sites))
        notes = _notes_for_rules(rules, entries, d, strict)
    _check_placements(rules, entries)
    notes += _layer_scale_note(entries, d.model)
    _check_modules(entries)
    untraced = _untraced(d, strict)
    for msg in notes:
        warn(msg)
    if untraced:  # listed in Plan.untraced; said once here for callers who only see warnings
        warn(untraced)
    return Plan(d.model, d.input_size, rules, entries, list(d.untraced), notes, d.fingerprint, d)
