"""One analysis serves every rule set; one record per inserted module; one protocol for every module."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
import torchvision

import se_surgery
from se_surgery import ModelTypeError, PlanError
from se_surgery import _sites as sites_module
from se_surgery._record import RECORD, Inserted, facts_of
from se_surgery.modules import ChannelAttention, create, excitation, is_identity
from se_surgery.studies.sweep import overlay
from se_surgery.studies.train import se_drift

SIZE = 32


@pytest.fixture(scope="module")
def resnet18():
    return torchvision.models.resnet18().eval()


@pytest.fixture
def traces(monkeypatch):
    """How many times the model is traced."""
    calls = []
    real = sites_module.trace_model
    monkeypatch.setattr(sites_module, "trace_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_one_analysis_serves_every_rule_set_and_cuts_only_its_model(resnet18, traces):
    a = se_surgery.analyze(resnet18, SIZE)
    assert dataclasses.is_dataclass(a) and a.model == "ResNet" and a.base_params == 11_689_512
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.sites = ()  # type: ignore[misc]
    reports = [se_surgery.report(a, r) for r in ("all_stages", "late_stages")]
    p = se_surgery.plan(a, "late_stages")
    assert se_surgery.find_sites(a) == list(a.sites) and len(a.sites) == 8
    assert se_surgery.report(resnet18, p) == reports[1]  # report(model, plan)
    patched = se_surgery.apply(resnet18, p)
    assert len(traces) == 1  # everything above: one trace
    # The same numbers as the model itself gives, rule set by rule set.
    assert [se_surgery.report(resnet18, r, input_size=SIZE) for r in ("all_stages", "late_stages")] == reports
    assert se_surgery.report(patched).added_params == reports[1].added_params == 83_552
    with pytest.raises(PlanError, match=r"made for another model \(a ResNet, structure \w+\), not this ResNet"):
        se_surgery.apply(torchvision.models.resnet34(), p)
    with pytest.raises(PlanError, match=r"made for another model \(a ResNet, .*\), not this ResNet"):
        se_surgery.report(se_surgery.analyze(torchvision.models.resnet34(), SIZE), p)
    with pytest.raises(ModelTypeError, match=r"apply needs the model itself, not its Analysis"):
        se_surgery.apply(a, "all_stages")  # type: ignore[arg-type]
    with pytest.raises(ModelTypeError, match=r"input_size and tracer_kwargs belong to analyze\(\)"):
        se_surgery.plan(a, input_size=64)


def test_cli_report_with_two_rule_sets_traces_once(traces, capsys):
    from se_surgery.cli import main

    assert main(["report", "resnet18", "--rules", "all_stages", "--rules", "late_stages", "--input-size", "32",
                 "--format", "csv"]) == 0
    assert len(traces) == 1
    assert "all_stages" in capsys.readouterr().out


def test_sweep_prices_every_setting_from_one_trace(resnet18, traces):
    from se_surgery.studies.sweep import _costs

    settings = {("all_stages", v, None, None): overlay("all_stages", variant=v) for v in ("standard", "pre", "post")}
    costs = _costs(resnet18, settings, (3, SIZE, SIZE))
    assert len(traces) == 1 and [c["sites"] for c in costs.values()] == [8, 8, 8]


def test_one_record_per_module_and_the_plan_once_on_the_root(resnet18):
    patched = se_surgery.apply(resnet18, "late_stages", input_size=SIZE)
    found = se_surgery.inserted_modules(patched)
    assert [n for n, _, _ in found] == ["layer3.0.se", "layer3.1.se", "layer4.0.se", "layer4.1.se"]
    for _, m, rec in found:
        assert isinstance(rec, Inserted) and rec.rule == 0 and rec.options.module == "se"
        assert [k for k in vars(m) if k.startswith("se_")] == [RECORD]  # one attribute, nothing else
    (facts,) = facts_of(patched)
    assert facts.input_size == (3, SIZE, SIZE) and facts.rules.source == "preset late_stages"
    assert len(facts.sites) == 8 and "se_surgery_plan" not in vars(patched.layer3[0].se)
    assert se_surgery.is_patched(patched) and not se_surgery.is_patched(resnet18)
    # Copies keep the record; state_dict gains only the modules' tensors.
    for other in (copy.deepcopy(patched), pickle.loads(pickle.dumps(patched))):
        assert [(n, r) for n, _, r in se_surgery.inserted_modules(other)] == [(n, r) for n, _, r in found]
        assert facts_of(other) == [facts]
    added = set(patched.state_dict()) - set(resnet18.state_dict())
    assert added == {f"{n}.{k}" for n, m, _ in found for k in m.state_dict()}
    with pytest.raises(se_surgery.AlreadyPatchedError, match=r"already has 4 SE module\(s\) from se-surgery"):
        se_surgery.analyze(patched)
    back = se_surgery.strip(patched)
    assert not se_surgery.is_patched(back) and facts_of(back) == []


@pytest.mark.parametrize("name", ["se", "ese", "eca", "gc", "cbam"])
def test_drift_and_identity_are_the_same_for_every_module(resnet18, name):
    rules = overlay("all_stages", module=name)  # the shipped preset with SE-only defaults
    patched = se_surgery.apply(resnet18, rules, input_size=SIZE)
    mods = se_surgery.inserted_modules(patched)
    assert len(mods) == 8 and all(r.options.module == name for _, _, r in mods)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(patched(x), resnet18(x))
    assert all(isinstance(m, ChannelAttention) and m.is_identity() for _, m, _ in mods)
    assert se_drift(patched, x) == {"fc2_max": 0.0, "gate_dev": 0.0}
    with torch.no_grad():
        for t in mods[0][1].identity_tensors():
            t.fill_(0.25)
    moved = se_drift(patched, x)
    assert moved["fc2_max"] == 0.25 and moved["gate_dev"] > 0
    assert not mods[0][1].is_identity() and all(m.is_identity() for _, m, _ in mods[1:])


def test_a_module_without_the_protocol_is_measured():
    class Half(torch.nn.Module):
        def forward(self, x):
            return x * 0.5

    x = torch.randn(2, 8, 4, 4)
    x[0, 0] = 0
    g = excitation(Half(), x)
    assert g.shape == x.shape and bool((g[0, 0] == 1).all()) and bool((g[1] == 0.5).all())
    assert (is_identity(torch.nn.Identity(), 8), is_identity(Half(), 8), is_identity(create("gc", 8, {}))) == (
        True, False, True)
    with pytest.raises(se_surgery.ModuleError, match=r"Half does not say how many channels it scales"):
        is_identity(Half())
