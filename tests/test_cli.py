"""The se-surgery command: sites, plan, check, and clean failures."""

import json
import subprocess
import sys

import pytest
import torch
import torchvision

from se_surgery.cli import main
from se_surgery.hub import build_model


def test_sites_table_and_json(capsys):
    assert main(["sites", "resnet50"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "resnet50 at 3x224x224: 16 sites"
    assert "layer4.2" in out and "2048" in out
    assert main(["sites", "tv:resnet50", "--format", "json", "--input-size", "160"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["sites"]) == 16 and data["sites"][0]["spatial"] == [40, 40]


def test_sites_of_a_model_without_joins(capsys):
    assert main(["sites", "vgg11"]) == 0
    assert "no residual, concat or block sites" in capsys.readouterr().out


def test_unknown_model_names_close_matches(capsys):
    assert main(["sites", "resnet5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("se-surgery: error: unknown model 'resnet5' in torchvision or timm; close matches: resnet50")
    assert len(err.splitlines()) == 1
    assert main(["sites", "tv:convnxt_tiny"]) == 2
    assert "close matches: convnext_tiny" in capsys.readouterr().err


def test_timm_prefix():
    assert type(build_model("timm:resnet18")).__module__.startswith("timm")
    assert type(build_model("resnet18")).__module__.startswith("torchvision")


def test_plan_and_check(tmp_path, capsys):
    assert main(["plan", "resnet18", "--rules", "late_stages"]) == 0
    out = capsys.readouterr().out
    assert "SE at 4 of 8 sites" in out
    assert main(["check", "late_stages"]) == 0
    assert capsys.readouterr().out.startswith("preset late_stages: valid, 1 rule(s)")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - select: {}\n    ratio: 0\n")
    assert main(["check", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == \
        f"se-surgery: error: {bad}:3: rule 0, key 'ratio': ratio must be a number from 0.125 to 4096, got 0"
    assert main(["plan", "resnet18", "--rules", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_weights_file(tmp_path, capsys):
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    assert main(["sites", "resnet18", "--weights", str(path)]) == 0
    capsys.readouterr()
    assert main(["sites", "resnet18", "--weights", str(tmp_path / "nope.pt")]) == 2
    assert capsys.readouterr().err.strip() == f"se-surgery: error: weights file '{tmp_path / 'nope.pt'}' not found"
    assert main(["sites", "resnet34", "--weights", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"se-surgery: error: cannot load weights from {path}: they do not fit ResNet: 96 missing key(s) "
        "['layer1.2.conv1.weight', 'layer1.2.bn1.weight', 'layer1.2.bn1.bias']")


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "se_surgery.cli", "check", "inception"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0 and out.stdout.startswith("preset inception: valid")


def test_import_is_light():
    code = "import sys, se_surgery; print('timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["presets"], ["bench", "--help"]])
def test_answers_without_importing_torch(args):
    code = ("import sys; from se_surgery.cli import main; code = main(sys.argv[1:]); "
            "print('torch' in sys.modules, file=sys.stderr); sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout and out.stderr.strip() == "False", out.stderr
