"""The README's examples run and do what they say.

Every ```python block of README.md runs, top to bottom, in one namespace: the README is
read as one session (the block that loads ``se.safetensors`` continues the one that saved
it; the ``torch.export`` block continues the ONNX one). The blocks run in a temporary
folder, offline: a pretrained download (torchvision's ``weights="DEFAULT"``, timm's
``pretrained=True``) gets a fixed random initialisation of the same architecture instead,
which every claim the blocks make (exact identity, parameter counts, key-for-key loading)
holds for. A comment line right under a ``print(...)`` is that print's output, and is
checked.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision

import se_surgery

README = Path(__file__).resolve().parent.parent / "README.md"

# Blocks that do not run as written, by a line they contain: the error they raise, and why.
# An entry fails the test once its block runs, or once no block holds its line, so that it
# is removed when README.md is fixed.
README_BUGS: dict[str, tuple[type[Exception], str]] = {}


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    return [(text[: m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)]


def printed_claims(code: str) -> list[str]:
    """The comment lines right under a ``print(...)`` line: what it prints."""
    claims, after_print = [], False
    for line in code.splitlines():
        stripped = line.strip()
        if after_print and stripped.startswith("#"):
            claims.append(stripped[1:].strip())
            continue
        after_print = stripped.startswith("print(")
    return claims


def _random_pretrained(self, *args, **kwargs):
    """WeightsEnum.get_state_dict, offline: a seeded random init of the architecture the weights are for."""
    name = next(n for n in torchvision.models.list_models(module=torchvision.models)
                if torchvision.models.get_model_weights(n) is type(self))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, num_classes=len(self.meta["categories"]))
    return model.state_dict()


def _no_download(*args, **kwargs):
    raise AssertionError("the README test runs offline; a block tried to download something")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", _random_pretrained)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: create(name, pretrained=False, **kw))
    monkeypatch.chdir(tmp_path)  # se.safetensors, model.onnx, model.pt2 land here


@pytest.mark.slow  # resnet50 built eight times, exported to ONNX and with torch.export: about a minute
def test_every_python_block_runs_in_order(offline):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5
    unused = dict(README_BUGS)
    namespace: dict = {"__name__": "readme"}
    for line, code in blocks:
        where = f"README.md:{line}"
        bug = next((k for k in README_BUGS if k in code), None)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            if bug is None:
                exec(compile(code, where, "exec"), namespace)
            else:
                error, why = unused.pop(bug)
                with pytest.raises(error):
                    exec(compile(code, where, "exec"), namespace)
                continue
        for claim in printed_claims(code):
            assert claim in out.getvalue(), f"{where}: the block prints\n{out.getvalue()}\nnot {claim!r}"
    assert not unused, f"README_BUGS entries that match no block: {list(unused)}"


def test_readme_rules_example(tmp_path):
    text = README.read_text()
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert example.startswith("# SE on the residual joins of the last two stages, but not on the very last block")
    path = tmp_path / "rules.yaml"
    path.write_text(example)
    p = se_surgery.plan(torchvision.models.resnet50(), path)
    chosen = {e.site.name: e.options.ratio for e in p.selected}
    assert chosen == {**{f"layer3.{i}": 16 for i in range(6)}, "layer4.0": 8, "layer4.1": 8}
