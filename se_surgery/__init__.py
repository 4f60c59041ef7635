"""se-surgery: add Squeeze-and-Excitation to existing networks by fx graph surgery.

Example:
    >>> import torchvision, se_surgery
    >>> model = se_surgery.apply(torchvision.models.resnet18(), "late_stages")
    >>> len(se_surgery.se_parameters(model)) > 0
    True
"""

from .checkpoint import load_se, save_se
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
