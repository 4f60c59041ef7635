"""Report: what SE adds to a model, in parameters and multiply-accumulates (MACs).

Convention (also printed in every report's footer): MACs are multiply-accumulates for
one image (the paper's "GFLOPs" are MACs). The base model is measured with
``torch.utils.flop_counter`` on fake tensors (its FLOP count divided by two: convs and
matmuls). Each SE adds the MACs of its two FCs plus one operation per element of the
feature map for the squeeze (two for ``avgmax``) and one for the scale.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from typing import cast

from torch import nn

from . import modules
from ._checks import check_model
from ._compat import flop_counter, orig_mod
from ._fake import run_copy
from ._plan import Plan, check_plan, plan_from
from ._record import facts_of, inserted_modules, is_patched
from ._rules import load_rules
from ._sites import Analysis, analysis_of, resolve_input_size
from ._trace import short_error
from .errors import ModelTypeError, PlanError, TraceError

__all__ = ["CSV_COLUMNS", "FOOTER", "FORMATS", "Report", "SiteRow", "report", "se_macs", "se_params"]

FOOTER = (
    "MACs = multiply-accumulates per image (the paper's GFLOPs): base from torch.utils.flop_counter / 2; "
    "SE = its two FCs + 1 op per element for the squeeze + 1 for the scale; other modules: their FC/conv MACs + "
    "1 op per element per pool and per scale (docs/modules.md)."
)
FORMATS = ("table", "markdown", "json", "csv")
# CSV: 'row' is "site" for each SE module, then "added" (the sum of the site rows) and
# "base" (the model without SE); totals leave the per-site columns empty.
CSV_COLUMNS = ("row", "name", "kind", "stage", "variant", "channels", "hidden", "params", "macs")


def se_params(channels: int, hidden: int, bias: bool = True) -> int:
    """Parameters of one SE module: two 1x1 convs, with their biases.

    Example:
        >>> se_params(256, 16)
        8464
    """
    return 2 * channels * hidden + ((hidden + channels) if bias else 0)


def se_macs(channels: int, hidden: int, spatial: tuple[int, int], squeeze: str = "avg") -> int:
    """MACs of one SE module at a feature map of ``channels x H x W``.

    Example:
        >>> se_macs(256, 16, (56, 56))  # FCs 8,192 + squeeze 802,816 + scale 802,816
        1613824
    """
    elements = channels * spatial[0] * spatial[1]
    return 2 * channels * hidden + elements * (2 if squeeze == "avgmax" else 1) + elements


@dataclass(frozen=True)
class SiteRow:
    """One SE module in a report."""

    name: str
    kind: str
    stage: int
    variant: str
    channels: int
    hidden: int | None  # bottleneck width; None for modules without one (ese, eca)
    params: int
    macs: int
    module: str = "se"


@dataclass
class Report:
    """What SE adds to a model: per-site rows, per-stage sums and totals.

    ``str(report)`` is the table format; :meth:`render` gives the others.
    """

    model: str
    input_size: tuple[int, int, int]
    base_params: int
    added_params: int
    base_macs: int
    added_macs: int
    sites: list[SiteRow] = field(default_factory=list)
    rules: str | None = None

    @property
    def added_params_pct(self) -> float:
        return 100.0 * self.added_params / self.base_params if self.base_params else 0.0

    @property
    def added_macs_pct(self) -> float:
        return 100.0 * self.added_macs / self.base_macs if self.base_macs else 0.0

    def stages(self) -> list[dict]:
        """Per-stage summary: sites with SE, added params and MACs."""
        out: dict[int, dict] = {}
        for r in self.sites:
            s = out.setdefault(r.stage, {"stage": r.stage, "sites": 0, "params": 0, "macs": 0})
            s["sites"] += 1
            s["params"] += r.params
            s["macs"] += r.macs
        return [out[k] for k in sorted(out)]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "input_size": list(self.input_size),
            "rules": self.rules,
            "base_params": self.base_params,
            "added_params": self.added_params,
            "added_params_pct": round(self.added_params_pct, 4),
            "base_macs": self.base_macs,
            "added_macs": self.added_macs,
            "added_macs_pct": round(self.added_macs_pct, 4),
            "stages": self.stages(),
            "sites": [asdict(r) for r in self.sites],
            "convention": FOOTER,
        }

    def _totals(self) -> list[list]:
        return [
            ["params", f"{self.base_params:,}", f"{self.added_params:,}", f"{self.added_params_pct:.2f} %"],
            ["MACs", f"{self.base_macs:,}", f"{self.added_macs:,}", f"{self.added_macs_pct:.2f} %"],
        ]

    def render(self, fmt: str = "table") -> str:
        """The report as ``table``, ``markdown``, ``json`` or ``csv`` text.

        CSV has one header and a ``row`` column: ``site`` rows, then the ``added`` and
        ``base`` totals.

        Example:
            >>> r = Report("Net", (3, 32, 32), 1000, 25, 5000, 10,
            ...            [SiteRow("a", "residual", 1, "standard", 8, 1, 25, 10)])
            >>> print(r.render("csv"))
            row,name,kind,stage,variant,channels,hidden,params,macs
            site,a,residual,1,standard,8,1,25,10
            added,,,,,,,25,10
            base,,,,,,,1000,5000
            <BLANKLINE>
        """
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2)
        if fmt == "csv":
            # One table a spreadsheet can filter: the first column says what a row is, so
            # that summing the params column over the 'site' rows gives the 'added' row.
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(CSV_COLUMNS)
            for r in self.sites:
                w.writerow(["site", r.name, r.kind, r.stage, r.variant, r.channels, r.hidden, r.params, r.macs])
            w.writerow(["added", "", "", "", "", "", "", self.added_params, self.added_macs])
            w.writerow(["base", "", "", "", "", "", "", self.base_params, self.base_macs])
            return buf.getvalue()
        if fmt not in ("table", "markdown"):
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        from tabulate import tabulate

        tf = "github" if fmt == "markdown" else "simple"
        rows = [[r.name, r.kind, r.stage, r.variant, r.channels, r.hidden, f"{r.params:,}", f"{r.macs:,}"]
                for r in self.sites]
        size = "x".join(map(str, self.input_size))
        title = f"{self.model} at {size}" + (f", rules {self.rules}" if self.rules else "")
        parts = [f"## {title}" if fmt == "markdown" else title, ""]
        parts.append(tabulate(rows, headers=["site", "kind", "stage", "variant", "channels", "hidden",
                                             "params", "MACs"], tablefmt=tf, disable_numparse=True))
        parts += ["", tabulate([[s["stage"], s["sites"], f"{s['params']:,}", f"{s['macs']:,}"] for s in self.stages()],
                               headers=["stage", "sites", "params", "MACs"], tablefmt=tf, disable_numparse=True)]
        parts += ["", tabulate(self._totals(), headers=["", "base", "added", "added %"], tablefmt=tf,
                               disable_numparse=True)]
        parts += ["", ("_" + FOOTER + "_") if fmt == "markdown" else FOOTER]
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.render("table")


def _count(model: nn.Module, size: tuple[int, int, int], watch=()) -> tuple[int, dict]:
    """Flop-counted MACs of one fake forward, and the input shape each watched module sees.

    The forward runs on a structural copy (fake tensors, no hooks): the user's model
    runs nothing and keeps every attribute.
    """
    try:
        with flop_counter() as counter:
            seen = run_copy(model, size, watch)
    except Exception as e:
        raise TraceError(f"cannot count the MACs of {type(model).__name__} on fake tensors: {short_error(e)}") from e
    return int(counter.get_total_flops()) // 2, seen


def report(model: nn.Module | Analysis, rules=None, *, input_size=None, tracer_kwargs=None) -> Report:
    """What SE adds to ``model``, in parameters and MACs, per site and in total.

    For a model patched by :func:`se_surgery.apply`, describes its inserted modules
    (``rules`` must be None). For an unpatched model, or its
    :class:`~se_surgery.Analysis`, describes what ``rules`` (default ``all_stages``, or a
    :class:`~se_surgery.Plan`) would add; one analysis serves any number of rule sets.
    Either way nothing runs on real tensors and nothing of ``model`` runs or changes
    (see :func:`find_sites`).

    Example:
        >>> import torchvision
        >>> from se_surgery._report import report
        >>> r = report(torchvision.models.resnet50(), "all_stages")
        >>> r.base_params, r.added_params, round(r.added_params_pct, 2)
        (25557032, 2530992, 9.9)
    """
    if not isinstance(model, Analysis):
        check_model(model, what="a torch.nn.Module or an se_surgery.Analysis")
        model = orig_mod(model) or model  # torch.compile's wrapper: the model it runs
    if isinstance(model, nn.Module) and is_patched(model):
        if rules is not None:
            raise PlanError("this model already has SE from se-surgery; report(model) describes it, "
                            "rules only apply to an unpatched model")
        facts = facts_of(model)
        if input_size is None and facts:  # counted at the size it was patched at
            input_size = facts[0].input_size
        return _report_patched(model, resolve_input_size(model, input_size))
    if isinstance(rules, Plan):
        if input_size is not None or tracer_kwargs is not None:
            raise PlanError("input_size and tracer_kwargs belong to plan(); a Plan passed to report() already has "
                            "them")
        check_plan(rules, model)
        p = rules
    else:  # the base MACs are counted in the analysis's own fake pass
        p = plan_from(load_rules(rules), analysis_of(model, input_size, tracer_kwargs, count_macs=True))
    d = cast(Analysis, p.analysis)  # every plan check_plan passes has its analysis
    base_macs = d.macs if d.macs is not None else _base_macs(model, p)
    rows = [SiteRow(e.site.name, e.site.kind, e.site.stage, e.options.variant, e.se_channels, e.hidden,
                    modules.count_params(e.options.module, e.se_channels, e.options.module_options(),
                                         e.site.in_channels),
                    modules.count_macs(e.options.module, e.se_channels, e.se_spatial, e.options.module_options(),
                                       e.site.in_channels),
                    e.options.module)
            for e in p.selected if e.options is not None]
    return Report(d.model, p.input_size, d.base_params, sum(r.params for r in rows), base_macs,
                  sum(r.macs for r in rows), rows, rules=p.rules.source)


def _base_macs(model, p: Plan) -> int:
    """MACs of ``model`` where its analysis did not count them (a plan made by plan(model))."""
    if isinstance(model, Analysis):
        raise ModelTypeError(f"the analysis of this {model.model} counted no MACs (it came from plan(model)); pass "
                             "the model, or an analysis from se_surgery.analyze(model)")
    return _count(model, p.input_size)[0]


def _report_patched(model: nn.Module, size: tuple[int, int, int]) -> Report:
    """The report of the modules a patched model carries, measured in one fake forward."""
    mods = inserted_modules(model)
    total_macs, seen = _count(model, size, [m for _, m, _ in mods])
    rows, fc_macs = [], 0  # fc_macs: what the flop counter counted inside the inserted modules
    for _, se, rec in mods:
        shape = seen.get(id(se))
        if shape is None:
            raise TraceError(f"SE module at {rec.site.name} was not reached by a forward pass")
        o, site = rec.options, rec.site
        channels, spatial = (shape[1], shape[2:4]) if site.channel_dim == 1 else (shape[3], shape[1:3])
        params = sum(p.numel() for p in se.parameters())
        opts, block = o.module_options(), site.in_channels
        rows.append(SiteRow(site.name, site.kind, site.stage, o.variant, channels,
                            modules.hidden(o.module, channels, opts, block), params,
                            modules.count_macs(o.module, channels, spatial, opts, block), o.module))
        fc_macs += modules.weight_macs(o.module, channels, spatial, opts, block)
    added = sum(r.params for r in rows)
    n_params = sum(p.numel() for p in model.parameters())
    return Report(type(model).__name__, size, n_params - added, added, total_macs - fc_macs,
                  sum(r.macs for r in rows), rows, rules=None)
