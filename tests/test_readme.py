"""The README's rules example does what its comment says."""

from pathlib import Path

import torchvision

import se_surgery

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_rules_example(tmp_path):
    text = README.read_text()
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert example.startswith("# SE on the residual joins of the last two stages, but not on the very last block")
    path = tmp_path / "rules.yaml"
    path.write_text(example)
    p = se_surgery.plan(torchvision.models.resnet50(), path)
    chosen = {e.site.name: e.options.ratio for e in p.selected}
    assert chosen == {**{f"layer3.{i}": 16 for i in range(6)}, "layer4.0": 8, "layer4.1": 8}
