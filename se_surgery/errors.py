"""Errors and warnings raised by se-surgery.

Every error derives from :class:`SESurgeryError`; the specific ones also derive from the
built-in exception a caller would catch without knowing this package (``ValueError`` for
bad values, ``TypeError`` for wrong types, ``FileNotFoundError`` for missing files).
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType


class SESurgeryError(Exception):
    """Base class of every error this package raises on purpose."""


class RuleError(SESurgeryError, ValueError):
    """A rules file, dict or rule object is invalid (syntax, key, type or value)."""


class PlanError(SESurgeryError, ValueError):
    """Valid rules that do not fit the model (a stage it lacks, a variant a site forbids)."""


class TraceError(SESurgeryError, ValueError):
    """A model, or a module that owns a site, cannot be traced or rewritten."""


class AlreadyPatchedError(SESurgeryError, ValueError):
    """The model already carries SE modules inserted by se-surgery."""


class NotPatchedError(SESurgeryError, ValueError):
    """An operation that needs SE modules got a model without any."""


class ModelTypeError(SESurgeryError, TypeError):
    """Something that is not a ``torch.nn.Module`` was passed as the model."""


class CheckpointError(SESurgeryError, ValueError):
    """An SE checkpoint is unreadable or does not fit the model it is loaded into."""


class MissingFileError(SESurgeryError, FileNotFoundError):
    """A rules, weights or checkpoint file does not exist."""


class UnknownModelError(SESurgeryError, ValueError):
    """A model name that neither torchvision nor timm knows (CLI only)."""


class SESurgeryWarning(UserWarning):
    """A setting that had no effect, such as a rule that selects no site."""


class ModuleError(SESurgeryError, ValueError):
    """A channel-attention module name, factory, plugin or option is invalid."""


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = SESurgeryWarning) -> None:
    """Warn, naming the user's own line as the place: the first caller outside se-surgery.

    However deep inside the package the warning arises, Python's warning filters then see
    one place per user call, so ``plan``, ``report`` and ``apply`` of one model on one
    line say a thing once under the default filter.
    """
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
