"""Models by name and local weights: the one place the CLI, the studies and the example get them.

``build_model("resnet50")`` builds a torchvision or timm model without weights;
``build_for_training`` gives it a head for your classes (and, with a network, the
library's pretrained weights); ``load_weights`` loads a local checkpoint (safetensors,
or ``torch.load`` with ``weights_only=True``), checking every key and shape before it
copies anything. The core (``analyze``, ``plan``, ``apply`` ...) never imports this
module: it takes models, not names. torch is imported when a function runs, so the CLI
can start without it.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, MissingFileError, SESurgeryError, UnknownModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["build_model", "build_for_training", "load_weights", "read_state_dict", "set_head"]


def _tv_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return list(timm.list_models())


def build_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """Build a model by name without weights: ``resnet50``, ``tv:resnet50``, ``timm:convnext_tiny``.

    A bare name tries torchvision first, then timm. ``num_classes`` sizes the classifier
    (default: the library's, 1000 for ImageNet models), so that a fine-tuned
    checkpoint's head fits.

    Example:
        >>> type(build_model("tv:resnet18")).__name__
        'ResNet'
        >>> build_model("resnet18", num_classes=10).fc.out_features
        10
    """
    extra: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    source, _, name = spec.partition(":") if ":" in spec else ("", "", spec)
    if source not in ("", "tv", "timm"):
        raise UnknownModelError(f"unknown model source {source!r} in {spec!r}; use tv:NAME or timm:NAME")
    if source in ("", "tv"):
        import torchvision

        if name in _tv_names():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # inception/googlenet init notices
                return torchvision.models.get_model(name, weights=None, **extra)
    if source in ("", "timm"):
        try:
            import timm
        except ImportError:
            timm = None  # type: ignore[assignment]
        if timm is not None and name in timm.list_models():
            return timm.create_model(name, pretrained=False, **extra)
        if timm is None and source == "timm":
            raise UnknownModelError("timm is not installed; pip install 'se-surgery[timm]'")
    pool = (_tv_names() if source != "timm" else []) + (_timm_names() if source != "tv" else [])
    close = difflib.get_close_matches(name, list(dict.fromkeys(pool)), n=5, cutoff=0.6)
    where = {"tv": "torchvision", "timm": "timm", "": "torchvision or timm"}[source]
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise UnknownModelError(f"unknown model {name!r} in {where}{hint}")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A local checkpoint's tensors, every file and type checked: safetensors, or ``torch.load``
    with ``weights_only=True`` (no pickle of code). A ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper and DDP's ``module.`` prefix are removed.

    Example:
        >>> import tempfile, torch
        >>> f = tempfile.mkdtemp() + "/w.pt"
        >>> torch.save({"model": {"module.fc.weight": torch.zeros(2, 3)}}, f)
        >>> list(read_state_dict(f))
        ['fc.weight']
    """
    import torch

    p = Path(path)
    try:
        found, folder = p.is_file(), p.is_dir()
    except OSError as e:  # a name longer than the file system allows
        raise MissingFileError(f"weights file {_short(str(path))!r} cannot be read: {e.strerror or e}") from None
    if folder:
        raise MissingFileError(f"weights file {_short(str(path))!r} is a directory; give a .safetensors or "
                               "torch.save file")
    if not found:
        raise MissingFileError(f"weights file {_short(str(path))!r} not found")
    from ._checkpoint import is_se_checkpoint, read_tensor_file

    if is_se_checkpoint(p):
        raise CheckpointError(f"{_short(str(path))} is an SE checkpoint (from se_surgery.save_se), not base weights: "
                              "pass it as --se FILE (and the base weights, if any, as --weights)")
    try:
        state: Any = read_tensor_file(p)
    except Exception as e:  # noqa: BLE001 - any loader failure means the file is not a usable checkpoint
        first = str(e).splitlines()[0] if str(e) else "empty or damaged file"
        raise CheckpointError(f"cannot load weights from {path}: {type(e).__name__}: {first}") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"cannot load weights from {path}: expected a state_dict (names to tensors), "
                              f"got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | os.PathLike, *, hint: str = "", fresh_head: bool = False,
                 log: Callable[[str], None] = print) -> None:
    """Load a local checkpoint (see :func:`read_state_dict`) into ``model``.

    Everything is checked before a tensor is copied: ``load_state_dict`` copies the
    tensors that fit before it raises for the ones that do not, which would leave the
    model half loaded. ``hint`` is appended to a shape mismatch. With ``fresh_head``,
    tensors whose shape differs (a classifier for other classes) keep their fresh
    initialisation instead, and ``log`` says which.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> f = tempfile.mkdtemp() + "/w.pt"
        >>> torch.save(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Linear(8, 1000)).state_dict(), f)
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Linear(8, 10))  # a head for 10 classes
        >>> load_weights(m, f, fresh_head=True, log=lambda s: print(s.split(": ", 1)[1]))
        1.weight, 1.bias have other shapes (a head for other classes): freshly initialised
    """
    state = read_state_dict(path)
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing key(s) {missing[:3]}"] if missing else []) + \
                ([f"{len(unexpected)} unexpected key(s) {unexpected[:3]}"] if unexpected else [])
        raise CheckpointError(f"cannot load weights from {path}: they do not fit {type(model).__name__}: "
                              f"{', '.join(parts)}")
    reshaped = [k for k, v in own.items() if state[k].shape != v.shape]
    if reshaped and not fresh_head:
        k = reshaped[0]
        raise CheckpointError(f"cannot load weights from {path}: {k} has shape {tuple(state[k].shape)}, "
                              f"{type(model).__name__} needs {tuple(own[k].shape)}{hint}")
    model.load_state_dict({k: v for k, v in state.items() if k not in reshaped}, strict=not reshaped)
    if reshaped:
        log(f"{path}: {', '.join(reshaped)} have other shapes (a head for other classes): freshly initialised")


def set_head(model: nn.Module, num_classes: int) -> None:
    """Give ``model`` a fresh classifier for ``num_classes`` (timm ``reset_classifier``, else the last Linear).

    Example:
        >>> import torchvision
        >>> m = torchvision.models.resnet18()
        >>> set_head(m, 10)
        >>> m.fc
        Linear(in_features=512, out_features=10, bias=True)
    """
    from torch import nn

    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(num_classes)
        return
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SESurgeryError(f"cannot find the classifier of {type(model).__name__} to give it {num_classes} "
                             "classes (no nn.Linear)")
    name, old = linears[-1]  # torchvision puts the classifier last (fc, classifier[-1], heads.head, head)
    if old.out_features == num_classes:
        return
    parent, _, attr = name.rpartition(".")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def build_for_training(spec: str, num_classes: int, *, pretrained: bool = False) -> nn.Module:
    """:func:`build_model` with a fresh ``num_classes`` head; ``pretrained=True`` downloads the default weights.

    torchvision's ``weights="DEFAULT"``, timm's ``pretrained=True``; without a network
    that fails with one line suggesting ``--weights FILE``.

    Example:
        >>> build_for_training("tv:resnet18", 10).fc.out_features
        10
    """
    model = build_model(spec)  # resolves the name (and names close matches) once for both sources
    if pretrained:
        name = spec.partition(":")[2] if ":" in spec else spec
        _check_download(model, name, spec)
        try:
            if type(model).__module__.startswith("timm."):
                import timm

                model = timm.create_model(name, pretrained=True)
            else:
                import torchvision

                model = torchvision.models.get_model(name, weights="DEFAULT")
        except (OSError, RuntimeError, ValueError) as e:  # no network, no cached file, no such weights
            first = str(e).splitlines()[0] if str(e) else ""
            raise CheckpointError(f"pretrained: could not get the pretrained weights of {spec} "
                                  f"({type(e).__name__}: {first}); without a network, load a local checkpoint instead "
                                  "(--weights FILE on the command line)") from None
    set_head(model, num_classes)
    return model


def _reachable(host: str, timeout: float = 3.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_download(model: nn.Module, name: str, spec: str) -> None:
    """Fail in seconds, not after a minute of retries, when pretrained weights are neither
    cached nor reachable."""
    import torch

    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if type(model).__module__.startswith("timm."):
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        repo, url, host = cfg.get("hf_hub_id"), cfg.get("url"), "huggingface.co"
        if repo:
            from huggingface_hub import try_to_load_from_cache

            files = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
            if any(isinstance(try_to_load_from_cache(repo, f), str) for f in files):
                return
        elif url:
            if (hub / os.path.basename(url)).is_file():
                return
            host = url.split("/")[2]
        else:
            return  # timm says itself that it has no weights
    else:
        import torchvision

        try:
            url = torchvision.models.get_model_weights(name).DEFAULT.url
        except (ValueError, AttributeError, KeyError):
            return  # torchvision says itself that it has no weights
        if (hub / os.path.basename(url)).is_file():
            return
        host = url.split("/")[2]
    if not _reachable(host):
        raise CheckpointError(f"pretrained: the weights of {spec} are not cached and {host} cannot be reached "
                              "(no network?); load a local checkpoint instead (--weights FILE on the command line)")


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit - 3]}..."

