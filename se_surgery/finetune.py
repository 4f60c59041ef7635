"""Fine-tuning helpers: train only SE, SE-only checkpoints, and removing SE again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from .errors import CheckpointError, MissingFileError, NotPatchedError
from .plan import se_modules

__all__ = ["se_parameters", "mark_only_se_trainable", "param_groups", "save_se", "load_se", "strip"]

FORMAT = "se-surgery/1"


def se_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of every SE module se-surgery inserted, by state_dict name.

    Example:
        >>> import torchvision, se_surgery
        >>> m = se_surgery.apply(torchvision.models.resnet50())
        >>> sum(p.numel() for p in se_surgery.se_parameters(m).values())
        2530992
    """
    out = {}
    for name, mod in se_modules(model):
        for pname, p in mod.named_parameters():
            out[f"{name}.{pname}"] = p
    return out


def mark_only_se_trainable(model: nn.Module) -> str:
    """Freeze every parameter except the SE ones; return PEFT's status line.

    Example:
        >>> import torchvision, se_surgery
        >>> m = se_surgery.apply(torchvision.models.resnet50())
        >>> se_surgery.mark_only_se_trainable(m)
        'trainable params: 2,530,992 || all params: 28,088,024 || trainable%: 9.0109'
    """
    se = {id(p) for p in se_parameters(model).values()}
    if not se:
        raise NotPatchedError(f"{type(model).__name__} has no SE from se-surgery; call se_surgery.apply first")
    for p in model.parameters():
        p.requires_grad_(id(p) in se)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def param_groups(model: nn.Module, lr: float, se_lr: float, weight_decay: float | None = None) -> list[dict]:
    """Optimizer parameter groups: the base model at ``lr``, SE at ``se_lr``.

    Frozen parameters (``requires_grad=False``) are left out; an empty group is dropped.

    Example:
        >>> import torch, torchvision, se_surgery
        >>> m = se_surgery.apply(torchvision.models.resnet18())
        >>> opt = torch.optim.SGD(se_surgery.param_groups(m, lr=1e-3, se_lr=1e-2), lr=1e-3)
        >>> [g["lr"] for g in opt.param_groups]
        [0.001, 0.01]
    """
    se = {id(p) for p in se_parameters(model).values()}
    if not se:
        raise NotPatchedError(f"{type(model).__name__} has no SE from se-surgery; call se_surgery.apply first")
    base = [p for p in model.parameters() if p.requires_grad and id(p) not in se]
    ses = [p for p in model.parameters() if p.requires_grad and id(p) in se]
    groups = []
    for params, rate, name in ((base, lr, "base"), (ses, se_lr, "se")):
        if params:
            g = {"params": params, "lr": rate, "name": name}
            if weight_decay is not None:
                g["weight_decay"] = weight_decay
            groups.append(g)
    return groups


def _site_rules(model: nn.Module) -> dict:
    """Rules that re-create exactly the model's SE: one rule per site, by name."""
    rules = []
    for _, se in se_modules(model):
        rule = {"select": {"name": se.se_site.name}}
        rule.update(se.se_options.to_dict())
        rules.append(rule)
    return {"rules": rules}


def save_se(model: nn.Module, path: str | os.PathLike) -> None:
    """Write only the SE weights to a safetensors file, with the plan in its metadata.

    The metadata holds the base model's class, the input size, the per-site options
    (as rules that select each site by name) and the site records, so that
    :func:`load_se` can redo the surgery on a fresh model. No pickle is involved.

    Example:
        >>> import tempfile, torchvision, se_surgery
        >>> m = se_surgery.apply(torchvision.models.resnet18(), "late_stages")
        >>> f = tempfile.mkdtemp() + "/se.safetensors"
        >>> se_surgery.save_se(m, f)
        >>> m2 = se_surgery.load_se(torchvision.models.resnet18(), f)
        >>> sorted(se_surgery.se_parameters(m2)) == sorted(se_surgery.se_parameters(m))
        True
    """
    from safetensors.torch import save_file

    mods = se_modules(model)
    if not mods:
        raise NotPatchedError(f"{type(model).__name__} has no SE from se-surgery; nothing to save")
    tensors = {k: v.detach().contiguous().cpu() for k, v in _se_state(model).items()}
    base = model
    meta = {
        "format": FORMAT,
        "model_class": f"{type(base).__module__}.{type(base).__qualname__}",
        "input_size": json.dumps(list(getattr(model, "se_surgery_input_size", ()) or ())),
        "rules": json.dumps(_site_rules(model)),
        "sites": json.dumps([se.se_site.to_dict() for _, se in mods]),
    }
    save_file(tensors, str(path), metadata=meta)


def _se_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, mod in se_modules(model):
        for k, v in mod.state_dict().items():
            state[f"{name}.{k}"] = v
    return state


def load_se(model: nn.Module, path: str | os.PathLike, *, inplace: bool = False) -> nn.Module:
    """Re-apply the surgery recorded in an SE checkpoint to ``model`` and load its weights.

    ``model`` is a fresh (usually pretrained) model of the class the checkpoint was made
    from. A model that does not fit (a site it lacks, other channels) raises
    :class:`~se_surgery.CheckpointError` naming the first mismatch. See :func:`save_se`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .insert import apply
    from .sites import Site, discover

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"SE checkpoint {str(path)!r} not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an se-surgery checkpoint (metadata format {meta.get('format')!r}, "
                              f"expected {FORMAT!r}); it was not written by se_surgery.save_se")
    try:
        rules = json.loads(meta["rules"])
        saved_sites = [Site.from_dict(d) for d in json.loads(meta["sites"])]
        size = json.loads(meta.get("input_size", "[]")) or None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged se-surgery metadata ({e})") from None
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    if cls != meta.get("model_class"):
        raise CheckpointError(f"{path}: made for a {meta.get('model_class')}, not a {cls}")
    d = discover(model, size)
    have = {s.name: s for s in d.sites}
    for s in saved_sites:
        mine = have.get(s.name)
        if mine is None:
            raise CheckpointError(f"{path}: site {s.name!r} ({s.kind}, {s.channels} channels) does not exist in "
                                  f"this {type(model).__name__}")
        if (mine.kind, mine.channels, mine.in_channels) != (s.kind, s.channels, s.in_channels):
            raise CheckpointError(f"{path}: site {s.name!r} has {mine.channels} channels ({mine.kind}) here, "
                                  f"the checkpoint's has {s.channels} ({s.kind})")
    out = apply(model, rules, input_size=size, strict=True, inplace=inplace)
    state = _se_state(out)
    missing = sorted(set(state) - set(tensors))
    extra = sorted(set(tensors) - set(state))
    if missing or extra:
        raise CheckpointError(f"{path}: SE weights do not fit: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in state.items():
        if v.shape != tensors[k].shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, the model needs {tuple(v.shape)}")
    with torch.no_grad():
        for k, v in state.items():
            v.copy_(tensors[k])
    return out


def strip(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Remove every SE se-surgery inserted; give back the original modules.

    Each rewritten block is replaced by a module of its original class holding the
    same children, parameters and buffers, so ``state_dict`` has exactly the original
    keys and the outputs equal the original model's.

    Example:
        >>> import torch, torchvision, se_surgery
        >>> base = torchvision.models.resnet18().eval()
        >>> back = se_surgery.strip(se_surgery.apply(base))
        >>> type(back.layer1[0]).__name__, list(back.state_dict()) == list(base.state_dict())
        ('BasicBlock', True)
    """
    import copy

    if not se_modules(model):
        raise NotPatchedError(f"{type(model).__name__} has no SE from se-surgery; nothing to strip")
    target = model if inplace else copy.deepcopy(model)
    owners = [(n, m) for n, m in target.named_modules() if isinstance(m, fx.GraphModule) and hasattr(m, "se_surgery_original")]
    if isinstance(target, fx.GraphModule) and hasattr(target, "se_surgery_original"):
        owners = [("", target)] + [o for o in owners if o[0]]
    # Deepest first, so a parent is restored after its children.
    for name, gm in sorted(owners, key=lambda o: -o[0].count(".") - bool(o[0])):
        original = _restore(gm)
        if not name:
            target = original
            continue
        parent_path, _, attr = name.rpartition(".")
        parent = target.get_submodule(parent_path) if parent_path else target
        setattr(parent, attr, original)
    return target


def _restore(gm: fx.GraphModule) -> nn.Module:
    original = gm.se_surgery_original
    shell = original.__class__.__new__(original.__class__)
    shell.__dict__.update(original.__dict__)
    shell.__dict__.update(
        _modules=type(original._modules)((k, gm._modules[k]) for k in original._modules),
        _parameters=gm._parameters,
        _buffers=gm._buffers,
        _non_persistent_buffers_set=set(gm._non_persistent_buffers_set),
        training=gm.training,
    )
    return shell
