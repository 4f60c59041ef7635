"""The checks the public entry points make on what they are given: the model, and option choices."""

from __future__ import annotations

import sys

from torch import nn

from .errors import ModelTypeError

__all__ = ["CHANNEL_DIMS", "check_choices", "check_model"]


def _sharded(model: nn.Module) -> str | None:
    """How ``model`` (or a module in it) is sharded by FSDP, if it is. torch.distributed.fsdp
    is only looked at when something imported it: no model can be sharded otherwise."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return None
    kinds = {getattr(fsdp, "FSDPModule", None): "fully_shard (FSDP2)",
             getattr(fsdp, "FullyShardedDataParallel", None): "FullyShardedDataParallel"}
    for m in model.modules():
        for cls, name in kinds.items():
            if isinstance(cls, type) and isinstance(m, cls):
                return name
    return None


def check_model(model, *, sharded_ok: bool = False, what: str = "a torch.nn.Module") -> nn.Module:
    """Raise :class:`~se_surgery.ModelTypeError` unless ``model`` is a ``torch.nn.Module``
    se-surgery can work on; return it.

    A model sharded by FSDP (``fully_shard`` or ``FullyShardedDataParallel``) holds its
    weights as shards of other processes: its structure cannot be traced, nor its weights
    saved or restored one module at a time. SE goes in first, sharding after.
    ``sharded_ok`` is for functions that only read parameter names (``se_parameters``).

    Example:
        >>> check_model("resnet50")
        Traceback (most recent call last):
        ...
        se_surgery.errors.ModelTypeError: model must be a torch.nn.Module, got str
    """
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"model must be {what}, got {type(model).__name__}")
    kind = None if sharded_ok else _sharded(model)
    if kind is not None:
        raise ModelTypeError(f"{type(model).__name__} is sharded with {kind}; se-surgery works on the whole, "
                             "unsharded model: call se_surgery (apply, load_se, strip ...) before sharding it")
    return model


# Layouts a channel-attention module accepts: NCHW, or channels-last (N, H, W, C).
CHANNEL_DIMS = (1, -1)


def check_choices(**values: tuple) -> None:
    """Raise ``ValueError`` for the first ``name=(value, allowed)`` whose value is not allowed.

    The rules validate options before any module is built; this guards direct use.

    Example:
        >>> check_choices(gate=("relu", ("sigmoid", "hard_sigmoid")))
        Traceback (most recent call last):
        ...
        ValueError: gate must be one of ('sigmoid', 'hard_sigmoid'), got 'relu'
    """
    for name, (value, allowed) in values.items():
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
