"""What se-surgery inserted, recorded once: one frozen record per inserted module, and the
plan's facts once on the root model.

Every inserted module (SE or a catalog module) carries one :class:`Inserted` record (its
site, its resolved options, the rule that decided) as the plain attribute
``se_surgery_inserted``; the plan-level facts (rules, input size, the model's fingerprint
and site list) are one :class:`PlanFacts` on the model :func:`se_surgery.apply` returned,
as ``se_surgery_plan``. Plain attributes: they travel with ``copy.deepcopy`` and pickle,
and add no ``state_dict`` key. Everything that asks "what was inserted?" (report,
save/load, strip, the fine-tuning helpers, drift) asks this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ._checks import check_model
from ._patch import is_patched_module
from ._rules import Rules, SEOptions
from ._sites import Site
from .errors import NotPatchedError

__all__ = ["Inserted", "PlanFacts", "inserted_modules", "is_patched", "facts_of", "not_patched", "record_of"]

RECORD = "se_surgery_inserted"
FACTS = "se_surgery_plan"


@dataclass(frozen=True)
class Inserted:
    """One inserted module: where it sits, what it was built with, which rule decided."""

    site: Site
    options: SEOptions
    rule: int | None  # index of the deciding rule (None where a checkpoint recorded none)


@dataclass(frozen=True)
class PlanFacts:
    """What one :func:`se_surgery.apply` planned for the whole model."""

    rules: Rules
    input_size: tuple[int, int, int]
    fingerprint: str  # of the model before surgery (see se_surgery._sites.fingerprint)
    sites: tuple[tuple[str, str, int], ...]  # (name, kind, channels) of every site: what a checkpoint checks


def record_of(module: nn.Module) -> Inserted | None:
    """The record of an inserted module; None for any other module."""
    return module.__dict__.get(RECORD)


def mark(module: nn.Module, record: Inserted) -> None:
    """Record ``module`` as inserted (``nn.Module.__setattr__`` stores plain values in ``__dict__``)."""
    object.__setattr__(module, RECORD, record)


def set_facts(root: nn.Module, facts: PlanFacts) -> None:
    object.__setattr__(root, FACTS, facts)


def clear(model: nn.Module) -> None:
    """Forget the records (after the inserted modules are gone: strip)."""
    for m in model.modules():
        for key in (RECORD, FACTS):
            m.__dict__.pop(key, None)


def inserted_modules(model: nn.Module) -> list[tuple[str, nn.Module, Inserted]]:
    """(dotted name, module, record) of every module se-surgery inserted into ``model``, in model order.

    Example:
        >>> import torchvision, se_surgery
        >>> m = se_surgery.apply(torchvision.models.resnet18(), "late_stages", input_size=64)
        >>> [(n, r.site.name, r.options.module) for n, _, r in inserted_modules(m)][:2]
        [('layer3.0.se', 'layer3.0', 'se'), ('layer3.1.se', 'layer3.1', 'se')]
    """
    out = []
    for name, m in model.named_modules():
        rec = record_of(m)
        if rec is not None:
            out.append((name, m, rec))
    return out


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` carries modules inserted by se-surgery (or blocks it rewrote).

    Example:
        >>> import torchvision, se_surgery
        >>> base = torchvision.models.resnet18()
        >>> se_surgery.is_patched(base), se_surgery.is_patched(se_surgery.apply(base, input_size=64))
        (False, True)
    """
    return any(record_of(m) is not None or is_patched_module(m) for m in check_model(model, sharded_ok=True).modules())


def facts_of(model: nn.Module) -> list[PlanFacts]:
    """The plan facts found in ``model``: on its root, or on the submodules that were
    patched separately (one entry per distinct apply)."""
    out: list[PlanFacts] = []
    for m in model.modules():
        facts = m.__dict__.get(FACTS)
        if facts is not None and facts not in out:
            out.append(facts)
    return out


def not_patched(model: nn.Module, what: str) -> NotPatchedError:
    """The error for an operation that needs inserted modules, on a model without any."""
    return NotPatchedError(f"{type(model).__name__} has no SE from se-surgery; {what} "
                           "(call se_surgery.apply(model, rules) first)")
