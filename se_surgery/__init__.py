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
import sys
import types
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
    from .checkpoint import load_se, save_se
    from .finetune import mark_only_se_trainable, param_groups, se_parameters, strip
    from .insert import apply
    from .modules import register_module
    from .plan import Plan, PlannedSite, analyze, plan
    from .record import Inserted, inserted_modules, is_patched
    from .report import Report, report
    from .rules import Rule, Rules, Selector, SEOptions, load_rules, preset_names
    from .se import SqueezeExcite
    from .sites import Analysis, Site, find_sites
    from .trace import TracerOptions

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

# public name -> the module that defines it (imported, with torch, when the name is first used)
_LAZY = {
    **dict.fromkeys(("load_se", "save_se"), ".checkpoint"),
    **dict.fromkeys(("mark_only_se_trainable", "param_groups", "se_parameters", "strip"), ".finetune"),
    "apply": ".insert", "register_module": ".modules",
    **dict.fromkeys(("Plan", "PlannedSite", "analyze", "plan"), ".plan"),
    **dict.fromkeys(("Inserted", "inserted_modules", "is_patched"), ".record"),
    **dict.fromkeys(("Report", "report"), ".report"),
    **dict.fromkeys(("Rule", "Rules", "Selector", "SEOptions", "load_rules", "preset_names"), ".rules"),
    "SqueezeExcite": ".se", **dict.fromkeys(("Analysis", "Site", "find_sites"), ".sites"), "TracerOptions": ".trace",
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        # A submodule (se_surgery.sweep, se_surgery.ops, ...), as when the package imported them all.
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'se_surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    # Importing the submodule ``se_surgery.plan`` (or ``.report``) makes Python set the
    # package's attribute of that name to the module; the public name is the function.
    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == "." + name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
