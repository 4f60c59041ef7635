"""Rules: loading, matching and precedence, presets (validation messages: test_bad_input.py)."""

import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torchvision

import se_surgery
from se_surgery import Site, load_rules, preset_names
from se_surgery._plan import match

PRESETS = ["all_stages", "late_stages", "no_last_stage", "se_pre", "se_post", "se_identity", "inception",
           "timm_compatible"]


def _site(name, stage, block, kind="residual", channels=256, attention=False):
    return Site(name, kind, name, "Block", stage, block, channels, (8, 8), has_attention=attention)


# Two stages of 3 residual sites, then one stage with a concat site and a residual one.
SITES = [_site(f"s1.{i}", 1, i + 1, channels=64) for i in range(3)] + \
        [_site(f"s2.{i}", 2, i + 1, channels=128) for i in range(3)] + \
        [_site("s3.cat", 3, 1, kind="concat", channels=512), _site("s3.res", 3, 2, channels=512, attention=True)]


@pytest.mark.parametrize(
    "select, expected",
    [
        ({}, [s.name for s in SITES]),
        ({"kind": "concat"}, ["s3.cat"]),
        ({"kind": "residual", "stage": 3}, ["s3.res"]),
        ({"stage": [-1]}, ["s3.cat", "s3.res"]),
        ({"stage": [1, -2]}, ["s1.0", "s1.1", "s1.2", "s2.0", "s2.1", "s2.2"]),
        ({"block": 1}, ["s1.0", "s2.0", "s3.cat"]),
        ({"block": -1}, ["s1.2", "s2.2", "s3.res"]),
        ({"stage": 2, "block": [2, 3]}, ["s2.1", "s2.2"]),
        ({"name": "s2.*"}, ["s2.0", "s2.1", "s2.2"]),
        ({"name": ["s1.0", "s3.?at"]}, ["s1.0", "s3.cat"]),
        ({"min_channels": 128}, ["s2.0", "s2.1", "s2.2", "s3.cat", "s3.res"]),
        ({"max_channels": 128, "min_channels": 100}, ["s2.0", "s2.1", "s2.2"]),
        ({"has_attention": True}, ["s3.res"]),
        ({"has_attention": False, "stage": 3}, ["s3.cat"]),
        ({"name": "nothing*"}, []),
    ],
)
def test_selector_table(select, expected):
    rules = load_rules({"rules": [{"select": select}]})
    assert [e.site.name for e in match(rules, SITES) if e.selected] == expected


def test_precedence_last_selecting_rule_decides_and_options_overlay():
    rules = load_rules({
        "defaults": {"ratio": 16, "variant": "standard"},
        "rules": [
            {"select": {"kind": "residual"}, "ratio": 8},
            {"select": {"stage": 2}, "variant": "post"},
            {"select": {"name": "s2.1"}, "skip": True},
            {"select": {"name": "s2.2"}, "init": "paper"},
            {"select": {"name": "s1.0"}, "skip": True},
            {"select": {"name": "s1.0"}},
        ],
    })
    by = {e.site.name: e for e in match(rules, SITES)}
    assert (by["s1.1"].selected, by["s1.1"].rule, by["s1.1"].options.ratio, by["s1.1"].options.variant) == \
        (True, 0, 8, "standard")
    assert (by["s2.0"].options.ratio, by["s2.0"].options.variant) == (8, "post")
    assert (by["s2.1"].selected, by["s2.1"].rule, by["s2.1"].options) == (False, 2, None)
    assert (by["s2.2"].options.variant, by["s2.2"].options.init, by["s2.2"].rule) == ("post", "paper", 3)
    assert by["s1.0"].selected and by["s1.0"].rule == 5 and by["s1.0"].options.ratio == 8  # re-selected after skip
    assert (by["s3.cat"].selected, by["s3.cat"].rule) == (False, None)
    assert by["s2.1"].matched == (0, 1, 2)


def _write(tmp_path, text, name="rules.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_rule_objects_and_dicts_are_equivalent(tmp_path):
    from se_surgery import Rule, Selector

    obj = load_rules([Rule(Selector(kind="residual", stage=(-1,)), {"ratio": 8})])
    dct = load_rules({"rules": [{"select": {"kind": "residual", "stage": -1}, "ratio": 8}]})
    path = load_rules(_write(tmp_path, "rules:\n  - select: {kind: residual, stage: -1}\n    ratio: 8\n"))
    assert obj.rules == dct.rules == path.rules
    assert obj.defaults == dct.defaults == path.defaults


def test_rule_that_selects_nothing_warns():  # with strict=True it is an error: test_bad_input.py
    model = torchvision.models.resnet18()
    rules = {"rules": [{"select": {"kind": "residual"}}, {"select": {"name": "layer9.*"}}]}
    with pytest.warns(se_surgery.SESurgeryWarning, match=r"rule 1 selects no site of ResNet \(8 sites"):
        p = se_surgery.plan(model, rules)
    assert len(p.selected) == 8


def test_plan_reports_the_deciding_rule():
    p = se_surgery.plan(torchvision.models.resnet18(), "no_last_stage")
    rows = {r["site"]: r for r in p.rows()}
    assert rows["layer1.0"]["rule"] == 0 and rows["layer1.0"]["se"] == "yes"
    assert rows["layer4.1"]["rule"] == 1 and rows["layer4.1"]["se"] == "-"
    assert "SE at 6 of 8 sites" in str(p)
    assert p.to_dict()["sites"][0]["options"]["ratio"] == 16


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_say_what_they_are(name):
    assert name in preset_names()
    rules = load_rules(name)
    assert rules.source == f"preset {name}"
    assert load_rules(f"{name}.yaml").rules == rules.rules
    root = Path(se_surgery.__file__).resolve().parent.parent / "rules" / f"{name}.yaml"
    first = root.read_text().splitlines()[0]
    assert first.startswith(f"# {name}: ")


def test_timm_compatible_matches_timm_seresnet50_parameter_count():
    import timm

    base = torchvision.models.resnet50()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = se_surgery.apply(base, "timm_compatible")
    ours = sum(p.numel() for p in model.parameters())
    theirs = sum(p.numel() for p in timm.create_model("seresnet50", pretrained=False).parameters())
    assert ours == theirs == 28_088_024


def test_presets_load_from_an_installed_wheel(tmp_path):
    """The presets ship inside the wheel, so they load without this checkout."""
    # pip builds in the source tree (build/, *.egg-info): build from a copy, not the checkout.
    repo = tmp_path / "src"
    shutil.copytree(Path(__file__).resolve().parent.parent, repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "build", "dist", "*.egg-info", ".*cache", ".hypothesis", "tests", "benchmarks"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(repo)], check=True, capture_output=True)
    wheel = next(wheels.glob("se_surgery-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = ("import se_surgery, pathlib; r = se_surgery.load_rules('late_stages'); "
            "print(pathlib.Path(se_surgery.__file__).parent.parent == pathlib.Path(r'%s'), r.source, "
            "len(se_surgery.preset_names()))" % site)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""},
                         check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "preset", "late_stages", "10"]
