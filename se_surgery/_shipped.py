"""The rule presets shipped with the package: their names and one-line summaries.

No torch here: ``se-surgery presets`` answers without importing it.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = ["preset_names", "preset_summaries"]


def _preset_dir():
    # A checkout (imported from PYTHONPATH, or another worktree beside an editable install)
    # reads its own rules/; an installed wheel reads the packaged presets.
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "rules" / "all_stages.yaml").is_file():
        return checkout / "rules"
    return importlib.resources.files("se_surgery.presets")


def preset_names() -> list[str]:
    """Names of the presets shipped with the package.

    Example:
        >>> "all_stages" in preset_names()
        True
    """
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def preset_summaries() -> dict[str, str]:
    """One line per shipped preset: the first comment line of its YAML, after ``name:``.

    Example:
        >>> preset_summaries()["all_stages"]
        "SE on every residual join (the paper's SE-ResNet, ~10 % more parameters)"
    """
    out = {}
    for name in preset_names():
        first = (_preset_dir() / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0]
        out[name] = first.lstrip("# ").removeprefix(f"{name}:").strip()
    return out
