"""Fine-tuning helpers: train only SE, SE-only checkpoints, and removing SE again.

The workflow mirrors PEFT's for adapters::

    model = se_surgery.apply(pretrained, "all_stages")
    print(se_surgery.mark_only_se_trainable(model))   # freeze the base, train SE
    ...train...
    se_surgery.save_se(model, "se.safetensors")       # only the SE weights + the plan
    model = se_surgery.load_se(fresh_pretrained, "se.safetensors")
    plain = se_surgery.strip(model)                   # the original model again
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import warnings
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from .errors import AlreadyPatchedError, CheckpointError, MissingFileError, NotPatchedError, SESurgeryWarning
from .plan import PlannedSite, is_patched, se_modules
from . import modules
from .rules import Rule, Rules, SEOptions, Selector, load_rules
from .sites import Site

__all__ = ["se_parameters", "mark_only_se_trainable", "param_groups", "save_se", "load_se", "strip"]

FORMAT = "se-surgery/1"
# Site fields that must agree between a checkpoint and the model it is loaded into;
# ``spatial`` and ``stage`` are left out: they describe the example input, not the weights.
_FIT_FIELDS = ("kind", "owner_type", "channels", "in_channels", "channel_dim")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _no_se(model: nn.Module, what: str) -> NotPatchedError:
    return NotPatchedError(f"{type(model).__name__} has no SE from se-surgery; {what} "
                           "(call se_surgery.apply(model, rules) first)")


def se_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of every SE module se-surgery inserted, by ``state_dict`` name.

    Example:
        >>> import torchvision, se_surgery
        >>> m = se_surgery.apply(torchvision.models.resnet50())
        >>> sum(p.numel() for p in se_surgery.se_parameters(m).values())
        2530992
        >>> next(iter(se_surgery.se_parameters(m)))
        'layer1.0.se.fc1.weight'
    """
    out = {}
    for name, mod in se_modules(model):
        for pname, p in mod.named_parameters():
            out[f"{name}.{pname}"] = p
    return out


def _status(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    # PEFT's print_trainable_parameters format, character for character.
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def mark_only_se_trainable(model: nn.Module) -> str:
    """Freeze every parameter except the SE ones; return PEFT's status line.

    Only ``requires_grad`` changes: BatchNorm layers still update their running
    statistics in ``train()`` mode. To keep a frozen base exactly as it was, put its
    norm layers in ``eval()`` while training (``examples/finetune.py --freeze-base``
    does this).

    Example:
        >>> import torchvision, se_surgery
        >>> m = se_surgery.apply(torchvision.models.resnet50())
        >>> se_surgery.mark_only_se_trainable(m)
        'trainable params: 2,530,992 || all params: 28,088,024 || trainable%: 9.0109'
    """
    se = {id(p) for p in se_parameters(model).values()}
    if not se:
        raise _no_se(model, "nothing would be left to train")
    for p in model.parameters():
        p.requires_grad_(id(p) in se)
    return _status(model)


def param_groups(model: nn.Module, lr: float, se_lr: float, weight_decay: float | None = None) -> list[dict]:
    """Optimizer parameter groups: the base model at ``lr``, SE at ``se_lr``.

    Frozen parameters (``requires_grad=False``) are left out and an empty group is
    dropped, so this also works after :func:`mark_only_se_trainable`. Each group has a
    ``"name"`` (``"base"`` or ``"se"``).

    Example:
        >>> import torch, torchvision, se_surgery
        >>> m = se_surgery.apply(torchvision.models.resnet18())
        >>> opt = torch.optim.SGD(se_surgery.param_groups(m, lr=1e-3, se_lr=1e-2), lr=1e-3)
        >>> [(g["name"], g["lr"]) for g in opt.param_groups]
        [('base', 0.001), ('se', 0.01)]
    """
    se = {id(p) for p in se_parameters(model).values()}
    if not se:
        raise _no_se(model, "there is no SE group to give a learning rate")
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


def _class_path(model: nn.Module) -> str:
    # A model whose own forward had a join comes back from apply() as a GraphModule;
    # the class that matters for loading is the one it was made from.
    if isinstance(model, fx.GraphModule) and hasattr(model, "se_surgery_original"):
        model = model.se_surgery_original
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _se_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, mod in se_modules(model) for k, v in mod.state_dict().items()}


def save_se(model: nn.Module, path: str | os.PathLike) -> None:
    """Write only the SE weights to a safetensors file, with the resolved plan in its metadata.

    Tensors are stored under their ``state_dict`` names (``layer3.0.se.fc1.weight``).
    The metadata (all JSON strings) holds ``format``, ``model_class`` (the base model's
    class), ``input_size`` (the example size ``apply`` discovered at), ``rules`` (the
    rules given to ``apply``) and ``plan``: for every SE module its name, site record,
    resolved options and the index of the rule that decided it. That is all
    :func:`load_se` needs to redo the surgery on a fresh model. No pickle is involved.
    A model wrapped in DistributedDataParallel or ``torch.compile`` is unwrapped.

    Example:
        >>> import tempfile, torchvision, se_surgery
        >>> m = se_surgery.apply(torchvision.models.resnet18(), "late_stages", input_size=64)
        >>> f = tempfile.mkdtemp() + "/se.safetensors"
        >>> se_surgery.save_se(m, f)
        >>> from safetensors import safe_open
        >>> with safe_open(f, "pt") as st:
        ...     len(st.keys()), st.metadata()["input_size"]
        (16, '[3, 64, 64]')
    """
    from safetensors.torch import save_file

    model = _unwrap(model)
    mods = se_modules(model)
    if not mods:
        raise _no_se(model, "there are no SE weights to save")
    sizes = {tuple(s) if s is not None else None for s in (getattr(se, "se_input_size", None) for _, se in mods)}
    if len(sizes) != 1:
        raise CheckpointError(f"the SE modules of this {type(model).__name__} were planned at different input "
                              f"sizes {sorted(map(str, sizes))}; one apply() call makes one plan")
    size = sizes.pop()
    rules = getattr(mods[0][1], "se_rules", None)
    plan = [{"module": name, "site": se.se_site.to_dict(), "options": se.se_options.to_dict(),
             "rule": se.se_rule, "hidden": getattr(se, "hidden", None)} for name, se in mods]
    meta = {
        "format": FORMAT,
        "model_class": _class_path(model),
        "input_size": json.dumps(list(size) if size else None),
        "rules": json.dumps(dict(rules.to_dict(), source=rules.source) if rules is not None else None),
        "plan": json.dumps(plan),
    }
    # clone(): safetensors refuses tensors that share storage, and a state_dict view may.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in _se_state(model).items()}
    save_file(tensors, str(path), metadata=meta)


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise MissingFileError(f"SE checkpoint {str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an se-surgery SE checkpoint (metadata format {meta.get('format')!r}, "
                              f"expected {FORMAT!r}); write one with se_surgery.save_se")
    return meta, tensors


def _parse_plan(path: Path, meta: dict) -> tuple[tuple | None, Rules | None, list[tuple[str, PlannedSite]]]:
    try:
        size = json.loads(meta["input_size"])
        raw_rules = json.loads(meta["rules"])
        entries = []
        for e in json.loads(meta["plan"]):
            entries.append((e["module"], PlannedSite(Site.from_dict(e["site"]), True,
                                                     SEOptions(**e["options"]), e["rule"])))
        rules = None
        if raw_rules is not None:
            source = raw_rules.pop("source", "<dict>")
            rules = dataclasses.replace(load_rules(raw_rules), source=source)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged se-surgery metadata ({type(e).__name__}: {e})") from None
    if not entries:
        raise CheckpointError(f"{path}: the checkpoint's plan has no SE site")
    return (tuple(size) if size else None), rules, entries


def _check_fit(path: Path, model: nn.Module, size, entries, tensors: dict[str, torch.Tensor]):
    """Raise for the first way the checkpoint does not fit ``model``; change nothing.

    Returns the discovery, so that the surgery does not discover the sites again.
    """
    from .sites import discover

    name = type(model).__name__
    found = discover(model, size)
    have = {s.name: s for s in found.sites}
    for _, e in entries:
        s, mine = e.site, have.get(e.site.name)
        if mine is None:
            raise CheckpointError(
                f"{path}: site {s.name!r} ({s.kind}, {s.channels} channels) is not in this {name} "
                f"({len(have)} sites; se-surgery sites MODEL lists them)")
        for f in _FIT_FIELDS:
            if getattr(mine, f) != getattr(s, f):
                raise CheckpointError(f"{path}: site {s.name!r} has {f} {getattr(mine, f)!r} in this {name}, "
                                      f"the checkpoint's has {getattr(s, f)!r}")
    expected: dict[str, tuple[str, tuple]] = {}
    for module, e in entries:
        o = e.options
        try:
            se = modules.create(o.module, e.se_channels, o.module_options(), channel_dim=e.site.channel_dim,
                                device="meta")
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: damaged options for site {e.site.name!r}: {err}") from None
        for k, v in se.state_dict().items():
            expected[f"{module}.{k}"] = (e.site.name, tuple(v.shape))
    for key, (site, shape) in expected.items():
        if key not in tensors:
            raise CheckpointError(f"{path}: tensor {key!r} (SE at site {site!r}) is missing from the file")
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the SE at "
                                  f"site {site!r} needs {shape}")
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise CheckpointError(f"{path}: tensor {extra[0]!r} belongs to no SE module of the checkpoint's plan")
    return found


def _exact(name: str) -> str:
    # Site names are matched as fnmatch globs; bracket the glob characters so each
    # rule selects exactly the one site it was written for.
    return re.sub(r"([*?\[])", r"[\1]", name)


def load_se(model: nn.Module, path: str | os.PathLike, *, inplace: bool = False) -> nn.Module:
    """Redo the surgery recorded in an SE checkpoint on ``model`` and load the SE weights.

    ``model`` is a fresh (usually pretrained) model of the class the checkpoint was
    made from, without SE. Sites are rediscovered at the input size ``apply`` used and
    everything is checked before the model is touched: a model that does not fit (a
    site it lacks, other channels, a tensor of another shape) raises
    :class:`~se_surgery.CheckpointError` naming the first mismatch. Returns the patched
    model (a copy unless ``inplace=True``), in the training mode ``model`` was in.

    Example:
        >>> import tempfile, torch, torchvision, se_surgery
        >>> tuned = se_surgery.apply(torchvision.models.resnet18().eval(), "late_stages", input_size=64)
        >>> f = tempfile.mkdtemp() + "/se.safetensors"
        >>> se_surgery.save_se(tuned, f)
        >>> base = torchvision.models.resnet18()
        >>> base.load_state_dict(se_surgery.strip(tuned).state_dict())  # the same pretrained weights
        <All keys matched successfully>
        >>> again = se_surgery.load_se(base.eval(), f)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> torch.equal(again(x), tuned(x))
        True
    """
    from .insert import apply

    path = Path(path)
    meta, tensors = _read(path)
    size, rules, entries = _parse_plan(path, meta)
    model = _unwrap(model)
    if is_patched(model):
        raise AlreadyPatchedError(f"{type(model).__name__} already has SE from se-surgery; load {path} into a "
                                  "fresh model (or se_surgery.strip(model) first)")
    cls = _class_path(model)
    if cls != meta.get("model_class"):
        raise CheckpointError(f"{path}: made for a {meta.get('model_class')}, not a {cls}")
    found = _check_fit(path, model, size, entries, tensors)
    site_rules = Rules(rules=tuple(Rule(Selector(name=(_exact(e.site.name),)), e.options.rule_options())
                                   for _, e in entries), source=f"{path} (saved plan)")
    with warnings.catch_warnings():
        # A block that cannot be rewritten is skipped with a warning by apply(), before
        # anything is swapped in: here it must fail instead, leaving ``model`` as it was.
        warnings.filterwarnings("error", category=SESurgeryWarning)
        warnings.filterwarnings("default", message=r"joins in .*forward itself", category=SESurgeryWarning)
        try:
            out = apply(model, site_rules, input_size=size, inplace=inplace, _discovery=found)
        except SESurgeryWarning as w:
            raise CheckpointError(f"{path}: cannot redo the surgery on this {type(model).__name__}: {w}") from None
    mods = dict(se_modules(out))
    want = [m for m, _ in entries]
    if sorted(mods) != sorted(want):  # pragma: no cover - the checks above make the names agree
        raise CheckpointError(f"{path}: the SE modules came out as {sorted(mods)[:3]}..., expected {want[:3]}...")
    with torch.no_grad():
        for k, v in _se_state(out).items():
            v.copy_(tensors[k])
    # Keep the provenance of the original apply() (its rules and deciding rule
    # indices), so that saving this model again writes the same metadata.
    for module, e in entries:
        mods[module].se_rule, mods[module].se_rules = e.rule, rules
    return out


def strip(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Remove every SE se-surgery inserted; give back the original modules.

    Each rewritten block is replaced by a module of its original class holding the
    same children, parameters and buffers, so ``state_dict`` has exactly the original
    keys (in order) and the outputs equal the original model's. Fine-tuned base
    weights stay fine-tuned; only the SE modules go.

    Example:
        >>> import torch, torchvision, se_surgery
        >>> base = torchvision.models.resnet18().eval()
        >>> back = se_surgery.strip(se_surgery.apply(base, input_size=64))
        >>> type(back.layer1[0]).__name__, list(back.state_dict()) == list(base.state_dict())
        ('BasicBlock', True)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> torch.equal(back(x), base(x))
        True
    """
    if not is_patched(model):
        raise _no_se(model, "there is nothing to strip")
    target = model if inplace else copy.deepcopy(model)
    owners = [(n, m) for n, m in target.named_modules()
              if isinstance(m, fx.GraphModule) and hasattr(m, "se_surgery_original")]
    # Deepest first, so a parent is restored after its children (the root, "", last).
    for name, gm in sorted(owners, key=lambda o: -(o[0].count(".") + bool(o[0]))):
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
