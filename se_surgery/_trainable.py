"""What to train and how to take SE out again: SE parameters, freezing the base, learning-rate groups, strip.

The workflow mirrors PEFT's for adapters::

    model = se_surgery.apply(pretrained, "all_stages")
    print(se_surgery.mark_only_se_trainable(model))   # freeze the base, train SE
    ...train...
    se_surgery.save_se(model, "se.safetensors")       # SE weights + the plan (see checkpoint.py)
    model = se_surgery.load_se(fresh_pretrained, "se.safetensors")
    plain = se_surgery.strip(model)                   # the original model again
"""

from __future__ import annotations

from torch import nn

from ._checks import check_model
from ._patch import copy_model, is_patched_module, original_class, unpatch
from ._record import clear, inserted_modules, is_patched, not_patched

__all__ = ["se_parameters", "mark_only_se_trainable", "param_groups", "strip"]


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
    check_model(model, sharded_ok=True)
    out = {}
    for name, mod, _ in inserted_modules(model):
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
    se = {id(p) for p in se_parameters(model).values()}  # checks the model
    if not se:
        raise not_patched(model, "nothing would be left to train")
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
    se = {id(p) for p in se_parameters(model).values()}  # checks the model
    if not se:
        raise not_patched(model, "there is no SE group to give a learning rate")
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


def strip(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Remove every SE se-surgery inserted; give back the original modules.

    Each rewritten module gets its own class back and loses the SE children, so
    ``state_dict`` has exactly the original keys (in order) and the outputs equal the
    original model's. A module several parents share is restored once, for all of
    them. Fine-tuned base weights stay fine-tuned; only the SE modules go. A class another
    library derived from a patched one (``torch.nn.utils.parametrize``) is rebuilt on the
    original class, so its parametrizations keep working.

    Example:
        >>> import torch, torchvision, se_surgery
        >>> base = torchvision.models.resnet18().eval()
        >>> back = se_surgery.strip(se_surgery.apply(base, input_size=64))
        >>> type(back.layer1[0]) is type(base.layer1[0]), list(back.state_dict()) == list(base.state_dict())
        (True, True)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> torch.equal(back(x), base(x))
        True
    """
    if not is_patched(check_model(model)):
        raise not_patched(model, "there is nothing to strip")
    target = model if inplace else copy_model(model, "strip()")
    # Every class is worked out first (one derived by another library may be refused),
    # so a refusal leaves even an in-place model whole.
    classes = {id(m): (m, original_class(m)) for m in target.modules() if is_patched_module(m)}
    for m, cls in classes.values():
        unpatch(m, cls)
    clear(target)  # the plan's facts on the root (the records went with their modules)
    return target
