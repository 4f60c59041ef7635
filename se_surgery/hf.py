"""Hugging Face ``transformers`` models with SE: keep SE across ``save_pretrained`` / ``from_pretrained``.

``model.save_pretrained(d)`` writes the SE weights under their ``state_dict`` names, but
``Model.from_pretrained(d)`` builds the model's own class from its config, which has no
SE, and drops them (transformers only logs "weights not used"). The two functions here
write, next to the usual files, an se-surgery checkpoint with the plan (``se.safetensors``,
see :func:`se_surgery.save_se`) and redo the surgery after loading::

    se_surgery.hf.save_pretrained(patched, "out/")          # = patched.save_pretrained("out/") + SE plan
    model = se_surgery.hf.from_pretrained(ResNetForImageClassification, "out/")  # with SE again

A directory written by ``save_pretrained`` alone holds no plan; :func:`from_pretrained`
then says so instead of returning a model without SE. ``transformers`` is imported by the
model classes you pass, never by this module.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from torch import nn

from ._checkpoint import load_se, save_se
from ._plan import is_patched
from .errors import CheckpointError, MissingFileError, NotPatchedError, SESurgeryWarning

__all__ = ["SE_FILE", "from_pretrained", "save_pretrained"]

SE_FILE = "se.safetensors"


def save_pretrained(model: nn.Module, directory: str | os.PathLike, **kwargs) -> None:
    """``model.save_pretrained(directory, **kwargs)``, plus the SE plan and weights in ``directory/se.safetensors``.

    Example:
        >>> import tempfile, torch, se_surgery
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     m = se_surgery.apply(ResNetForImageClassification(cfg).eval(), "late_stages", input_size=64)
        ...     d = tempfile.mkdtemp()
        ...     save_pretrained(m, d)
        ...     again = from_pretrained(ResNetForImageClassification, d).eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> se_surgery.is_patched(again), torch.equal(again(x).logits, m(x).logits)
        (True, True)
    """
    if not hasattr(model, "save_pretrained"):
        raise NotPatchedError(f"{type(model).__name__} has no save_pretrained(): not a Hugging Face model; "
                              "use se_surgery.save_se(model, path)")
    if not is_patched(model):
        raise NotPatchedError(f"{type(model).__name__} has no SE from se-surgery; call "
                              f"{type(model).__name__}.save_pretrained(directory) itself")
    model.save_pretrained(directory, **kwargs)
    with warnings.catch_warnings():
        # The base weights are in the save_pretrained files: the SE file needs only SE.
        warnings.simplefilter("ignore", SESurgeryWarning)
        save_se(model, Path(directory) / SE_FILE)


def from_pretrained(model_class, directory: str | os.PathLike, **kwargs) -> nn.Module:
    """``model_class.from_pretrained(directory, **kwargs)`` with the SE that :func:`save_pretrained` recorded.

    The base weights come from the ``save_pretrained`` files, SE (modules and weights)
    from ``directory/se.safetensors`` through :func:`se_surgery.load_se`, which checks
    that the plan fits the loaded model before changing it.
    """
    path = Path(directory) / SE_FILE
    if not path.is_file():
        raise MissingFileError(f"{str(directory)!r} has no {SE_FILE}: it was not written by "
                               "se_surgery.hf.save_pretrained, so it holds no SE plan (from_pretrained alone would "
                               "give the model without SE)")
    if not hasattr(model_class, "from_pretrained"):
        raise CheckpointError(f"{getattr(model_class, '__name__', model_class)!r} has no from_pretrained(): pass a "
                              "transformers model class such as ResNetForImageClassification")
    model = model_class.from_pretrained(directory, **kwargs)
    return load_se(model, path, inplace=True)
