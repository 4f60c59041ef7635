"""report(): added parameters and MACs, per site, per stage and in total, in four formats."""

import csv
import io
import json
import sys

import pytest
import torchvision

import se_surgery
from se_surgery._report import FOOTER, se_macs
from se_surgery.cli import main


@pytest.fixture(scope="module")
def resnet50():
    return torchvision.models.resnet50()


@pytest.fixture(scope="module")
def rep(resnet50):
    return se_surgery.report(resnet50, "all_stages")


def test_resnet50_all_stages_numbers(rep):
    assert rep.base_params == 25_557_032
    assert rep.added_params == 2_530_992
    assert round(rep.added_params_pct, 2) == 9.90
    assert abs(rep.base_macs / 4.089e9 - 1) < 0.005
    assert abs(rep.added_macs / 13.55e6 - 1) < 0.02
    fc = sum(2 * r.channels * r.hidden for r in rep.sites)
    elements = sum(r.macs - 2 * r.channels * r.hidden for r in rep.sites) // 2
    assert abs(fc / 2.51e6 - 1) < 0.01 and abs(elements / 5.52e6 - 1) < 0.01  # squeeze and scale each
    assert [s["sites"] for s in rep.stages()] == [3, 4, 6, 3]
    assert sum(s["params"] for s in rep.stages()) == rep.added_params
    row = rep.sites[0]
    assert (row.name, row.kind, row.stage, row.variant, row.channels, row.hidden, row.params) == \
        ("layer1.0", "residual", 1, "standard", 256, 16, 8464)
    assert row.macs == se_macs(256, 16, (56, 56)) == 2 * 256 * 16 + 2 * 256 * 56 * 56


def test_no_last_stage_is_the_papers_cheaper_variant(resnet50):
    r = se_surgery.report(resnet50, "no_last_stage")
    assert r.added_params == 951_600
    assert 3.6 < r.added_params_pct < 3.8  # the paper's "~4 %"


def test_report_before_equals_report_after_apply(resnet50, rep):
    for rules in ("all_stages", "se_pre", "late_stages"):
        before = se_surgery.report(resnet50, rules)
        after = se_surgery.report(se_surgery.apply(resnet50, rules))
        assert after.to_dict() == dict(before.to_dict(), rules=None), rules


def test_patched_report_at_another_input_size(resnet50):
    patched = se_surgery.apply(resnet50, "late_stages")
    r = se_surgery.report(patched, input_size=448)
    assert r.sites[0].macs == se_macs(1024, 64, (28, 28))
    with pytest.raises(se_surgery.PlanError, match="rules only apply to an unpatched model"):
        se_surgery.report(patched, "all_stages")


def test_formats_render_the_same_numbers(rep):
    data = json.loads(rep.render("json"))
    assert {"model", "input_size", "base_params", "added_params", "base_macs", "added_macs", "sites"} <= set(data)
    assert (data["model"], data["input_size"], data["added_params"], data["added_macs"]) == \
        ("ResNet", [3, 224, 224], rep.added_params, rep.added_macs)
    assert len(data["sites"]) == 16 and data["sites"][0]["params"] == 8464
    rows = list(csv.DictReader(io.StringIO(rep.render("csv"))))
    assert [r["row"] for r in rows] == ["site"] * 16 + ["added", "base"]  # totals apart from site rows
    assert [int(r["params"]) for r in rows[:16]] == [s.params for s in rep.sites]
    assert int(rows[16]["params"]) == rep.added_params == sum(int(r["params"]) for r in rows[:16])
    assert int(rows[17]["macs"]) == rep.base_macs
    for fmt in ("table", "markdown"):
        text = rep.render(fmt)
        assert f"{rep.added_params:,}" in text and f"{rep.base_macs:,}" in text and "9.90 %" in text
        assert "1,613,824" in text and FOOTER in text
    assert "| layer1.0 " in rep.render("markdown")
    assert str(rep) == rep.render("table")


def test_cli_report_json_and_compare(capsys):
    assert main(["report", "resnet18", "--format", "json", "--input-size", "128"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["input_size"] == [3, 128, 128] and len(data["sites"]) == 8
    assert main(["report", "resnet18", "--rules", "all_stages", "--rules", "late_stages"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("preset ")]
    assert [ln.split()[1] for ln in lines] == ["all_stages", "late_stages"]
    assert main(["report", "resnet18", "--rules", "all_stages", "--rules", "late_stages", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["sites"] for r in rows] == ["8", "4"]


def test_cli_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", "resnet18", "--plot", str(tmp_path / "x.png"), "--input-size", "64"]) == 2
    assert "--plot needs matplotlib: pip install 'se-surgery[plot]'" in capsys.readouterr().err


def test_report_of_resnet152_uses_no_real_activations():
    import tracemalloc

    model = torchvision.models.resnet152()
    tracemalloc.start()
    r = se_surgery.report(model, "all_stages")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert r.added_params > 0
    # One real forward at 224 holds hundreds of MB of activations; fake tensors hold none.
    assert peak < 50 * 2**20, peak
