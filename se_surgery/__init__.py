"""se-surgery: add Squeeze-and-Excitation to existing networks by fx graph surgery.

The public names load on first use (PEP 562), so ``se-surgery --version`` and the other
commands that need no model start without importing torch.

Example:
    >>> import torchvision, se_surgery
    >>> model = se_surgery.apply(torchvision.models.resnet18(), "late_stages")
    >>> len(se_surgery.se_parameters(model)) > 0
    True
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .errors import (
    AlreadyPatchedError,
    CheckpointError,
    MissingFileError,
    ModelTypeError,
    ModuleError,
    NotPatchedError,
    PlanError,
    RuleError,
    SESurgeryError,
    SESurgeryWarning,
    TraceError,
)

if TYPE_CHECKING:
    from ._checkpoint import load_se, save_se
    from ._insert import apply
    from ._plan import Plan, PlannedSite, analyze, plan
    from ._record import Inserted, inserted_modules, is_patched
    from ._report import Report, report
    from ._rules import Rule, Rules, Selector, SEOptions, load_rules, preset_names
    from ._se import SqueezeExcite
    from ._sites import Analysis, Site, find_sites
    from ._trace import TracerOptions
    from ._trainable import mark_only_se_trainable, param_groups, se_parameters, strip
    from .modules import register_module

__version__ = "0.1.0"
__all__ = [
    "analyze", "find_sites", "plan", "apply", "report", "load_rules", "preset_names", "register_module",
    "se_parameters", "mark_only_se_trainable", "param_groups", "save_se", "load_se", "strip", "is_patched",
    "inserted_modules", "Analysis", "Inserted",
    "Site", "TracerOptions", "Plan", "Report", "PlannedSite", "Rules", "Rule", "Selector", "SEOptions",
    "SqueezeExcite",
    "SESurgeryError", "RuleError", "PlanError", "TraceError", "AlreadyPatchedError", "NotPatchedError",
    "ModelTypeError", "CheckpointError", "MissingFileError", "ModuleError", "SESurgeryWarning", "__version__",
]

# public name -> the private module that defines it (imported, with torch, on first use)
_LAZY = {
    **dict.fromkeys(("load_se", "save_se"), "._checkpoint"),
    **dict.fromkeys(("mark_only_se_trainable", "param_groups", "se_parameters", "strip"), "._trainable"),
    "apply": "._insert", "register_module": ".modules",
    **dict.fromkeys(("Plan", "PlannedSite", "analyze", "plan"), "._plan"),
    **dict.fromkeys(("Inserted", "inserted_modules", "is_patched"), "._record"),
    **dict.fromkeys(("Report", "report"), "._report"),
    **dict.fromkeys(("Rule", "Rules", "Selector", "SEOptions", "load_rules", "preset_names"), "._rules"),
    "SqueezeExcite": "._se", **dict.fromkeys(("Analysis", "Site", "find_sites"), "._sites"),
    "TracerOptions": "._trace",
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        # A public submodule (se_surgery.studies, se_surgery.hub, se_surgery.ops, ...).
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'se_surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
