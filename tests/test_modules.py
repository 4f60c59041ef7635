"""The module catalog: se, ese, eca, gc, cbam and users' own, chosen by the rule option ``module``."""

import copy
import dataclasses
import importlib.metadata
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import se_surgery
from se_surgery import modules
from se_surgery._plan import se_modules
from se_surgery._report import se_macs
from se_surgery._rules import SEOptions, load_rules
from se_surgery.errors import ModuleError, RuleError

BUILTINS = ("se", "ese", "eca", "gc", "cbam")
# A second configuration of each module, so that every option reaches the counts.
VARIANT_OPTIONS = {
    "se": {"ratio": 4, "divisor": 8, "bias": False, "squeeze": "avgmax"},
    "ese": {"add_maxpool": True, "gate": "sigmoid"},
    "eca": {"kernel_size": 9},
    "gc": {"ratio": 4, "fuse": "scale"},
    "cbam": {"ratio": 8, "spatial_kernel_size": 3, "bias": True},
}


def _numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class TinyNet(nn.Module):
    """Two residual blocks on a 16-channel map: the smallest model with residual sites."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return x


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(torch.relu(x))))


@pytest.fixture
def registry(monkeypatch):
    """A fresh registry for tests that register modules or plugins, thrown away after."""
    monkeypatch.setattr(modules, "_REGISTRY", None)
    return modules


# ---------------------------------------------------------------- the modules themselves


@pytest.mark.parametrize("channel_dim", [1, -1], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", BUILTINS)
def test_identity_init_is_exact(name, channel_dim):
    torch.manual_seed(0)
    for options in ({}, VARIANT_OPTIONS[name]):
        m = modules.create(name, 48, options, channel_dim=channel_dim)
        x = torch.randn(3, 48, 7, 5) * 10
        x = x if channel_dim == 1 else x.permute(0, 2, 3, 1).contiguous()
        skip = torch.randn_like(x)
        for mode in (True, False):  # cbam's BatchNorm: batch statistics, then running ones
            m.train(mode)
            assert torch.equal(m(x), x), (name, options, mode)
            assert torch.equal(m(x, skip), skip + x), (name, options, mode)


@pytest.mark.parametrize("name", BUILTINS)
def test_identity_init_gets_a_gradient_at_once(name):
    # The zeroed layer must learn from the first step, or the module never leaves identity.
    m = modules.create(name, 32, {})
    m(torch.randn(2, 32, 6, 6)).square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()), name


@pytest.mark.parametrize("name", BUILTINS)
def test_skip_closes_the_join_in_the_same_call(name):
    torch.manual_seed(0)
    m = modules.create(name, 32, {"init": "paper"}).eval()
    x, skip = torch.randn(2, 32, 6, 6), torch.randn(2, 32, 6, 6)
    assert modules.supports_skip(m)
    torch.testing.assert_close(m(x, skip), skip + m(x))


def _timm_modules(channels):
    from timm.layers.cbam import CbamModule
    from timm.layers.eca import EcaModule
    from timm.layers.global_context import GlobalContext
    from timm.layers.squeeze_excite import EffectiveSEModule, SEModule

    return [
        ("se", {"divisor": 8}, SEModule(channels, rd_ratio=1 / 16, rd_divisor=8)),
        ("ese", {}, EffectiveSEModule(channels)),
        ("eca", {}, EcaModule(channels)),
        ("gc", {}, GlobalContext(channels, fuse_add=True, fuse_scale=False)),  # timm's 'gca'
        ("gc", {"fuse": "scale"}, GlobalContext(channels)),  # timm's 'gc'
        ("cbam", {}, CbamModule(channels)),
    ]


@pytest.mark.parametrize("channels", [24, 256])
def test_paper_init_is_timms_module(channels):
    """Same parameter count as timm's module and, with its weights, the same function."""
    torch.manual_seed(0)
    for name, options, theirs in _timm_modules(channels):
        options = dict(options, init="paper")
        mine = modules.create(name, channels, options)
        assert _numel(mine) == _numel(theirs) == modules.count_params(name, channels, options), name
        with torch.no_grad():
            for p, q in zip(mine.parameters(), theirs.parameters(), strict=True):
                p.copy_(q.view_as(p))
            for p, q in zip(mine.buffers(), theirs.buffers(), strict=True):
                p.copy_(q.view_as(p))
        x = torch.randn(2, channels, 7, 5)
        want = theirs.eval()(x)
        torch.testing.assert_close(mine.eval()(x), want, msg=name)
        last = modules.create(name, channels, options, channel_dim=-1)
        last.load_state_dict(mine.state_dict())
        out = last.eval()(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)
        torch.testing.assert_close(out, want, msg=f"{name} channels-last")


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("channels", [8, 24, 256])
def test_count_params_is_the_modules(name, channels):
    for options in ({}, VARIANT_OPTIONS[name]):
        assert modules.count_params(name, channels, options) == _numel(modules.create(name, channels, options))


def test_macs_by_hand():
    # C = 64 at 8 x 8: E = 4,096 elements, P = 64 positions.
    e, p = 64 * 8 * 8, 64
    assert modules.count_macs("se", 64, (8, 8), {}) == 2 * 64 * 4 + e + e  # hidden 4
    assert modules.count_macs("ese", 64, (8, 8), {}) == 64 * 64 + e + e
    assert modules.count_macs("ese", 64, (8, 8), {"add_maxpool": True}) == 64 * 64 + 2 * e + e
    assert modules.count_macs("eca", 64, (8, 8), {}) == 3 * 64 + e + e  # k = 3
    assert modules.count_macs("gc", 64, (8, 8), {}) == e + e + 2 * 64 * 8 + e  # hidden 8
    assert modules.count_macs("cbam", 64, (8, 8), {}) == 2 * e + 4 * 64 * 4 + e + 2 * e + 2 * 49 * p + e
    assert modules.count_macs("se", 256, (56, 56), {}) == se_macs(256, 16, (56, 56))


@pytest.mark.parametrize("channel_dim", [1, -1], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", BUILTINS)
def test_weight_macs_are_what_the_flop_counter_sees(name, channel_dim):
    """The report subtracts weight_macs from a flop-counted total: they must agree."""
    for options in ({}, VARIANT_OPTIONS[name]):
        m = modules.create(name, 64, options, channel_dim=channel_dim)
        x = torch.randn(1, 64, 6, 5) if channel_dim == 1 else torch.randn(1, 6, 5, 64)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(x)
        assert counter.get_total_flops() // 2 == modules.weight_macs(name, 64, (6, 5), options), (name, options)


# ---------------------------------------------------------------- parity with timm's networks


def _apply_quiet(model, rules):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_surgery.SESurgeryWarning)
        return se_surgery.apply(model, rules, input_size=64)


def test_eca_on_every_residual_join_of_resnet50d_is_ecaresnet50d():
    import timm

    base, theirs = timm.create_model("resnet50d").eval(), timm.create_model("ecaresnet50d").eval()
    mine = _apply_quiet(base, {"defaults": {"module": "eca", "init": "paper"}, "rules": [{"select": {"kind": "residual"}}]})
    assert _numel(mine) == _numel(theirs) == _numel(base) + 86  # k = 5, 5, 5, 7 over 3 + 4 + 6 + 3 blocks
    # timm's Bottleneck has `se = None`, so ours is named se_inserted; otherwise the same keys.
    mine.load_state_dict({k.replace(".se.", ".se_inserted."): v for k, v in theirs.state_dict().items()})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), theirs(x))


def test_global_context_inside_the_bottleneck_is_gcresnet50t():
    """gcresnet50t puts timm's 'gca' block inside each bottleneck, after the 3x3 conv at the
    bottleneck width: ``variant: inner`` on the attention-free network is that network."""
    import timm
    from timm.models.byobnet import ByobNet, model_cfgs

    plain = ByobNet(dataclasses.replace(model_cfgs["gcresnet50t"], attn_layer=None)).eval()
    theirs = timm.create_model("gcresnet50t").eval()
    rules = {"defaults": {"module": "gc", "init": "paper", "variant": "inner"}, "rules": [{"select": {"kind": "residual"}}]}
    mine = _apply_quiet(plain, rules)
    assert _numel(mine) == _numel(theirs) and _numel(theirs) - _numel(plain) == 323_352
    assert se_surgery.report(mine).added_params == 323_352
    mine.load_state_dict({k.replace(".attn.", ".se."): v for k, v in theirs.state_dict().items()})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), theirs(x))


# ---------------------------------------------------------------- rules


def _write(tmp_path, text):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return str(path)


def test_module_options_come_from_what_was_written_for_them():
    r = load_rules({"defaults": {"ratio": 16, "kernel_size": 7},
                    "rules": [{"select": {"stage": 1}}, {"select": {"stage": 2}, "module": "eca"},
                              {"select": {"stage": 3}, "module": "gc"}, {"select": {"stage": 3, "block": 1}, "ratio": 4}]})
    from se_surgery._plan import match

    sites = [se_surgery.Site(f"s{st}", "residual", f"s{st}", "Block", st, 1, 64, (8, 8)) for st in (1, 2, 3)]
    opts = {e.site.stage: e.options for e in match(r, sites)}
    assert (opts[1].module, opts[1].module_options()["ratio"], opts[1].extra) == ("se", 16, ())
    assert opts[2].module_options() == {"kernel_size": 7}  # defaults' ratio is not eca's
    assert opts[3].module_options() == {"ratio": 4}  # written by rule 3, which selects it too
    assert modules.resolve_options("gc", {})["ratio"] == 8  # unwritten: gc's own default, timm's 1/8


def test_seoptions_round_trips():
    o = SEOptions(variant="pre", ratio=4, module="gc", extra={"ratio": 4, "fuse": "scale"})  # as match() makes it
    assert SEOptions(**o.to_dict()) == o and o.extra == (("fuse", "scale"), ("ratio", 4))
    assert (o.ratio, o.variant, o.module, o.divisor) == (4, "pre", "gc", 1)
    assert SEOptions().merged(o.rule_options()).resolved() == o
    r = load_rules({"defaults": {"module": "eca", "gamma": 3}, "rules": [{"select": {}, "kernel_size": 3}]})
    assert load_rules(r.to_dict()) == dataclasses.replace(r, source="<dict>")


@pytest.mark.parametrize("text, message", [
    ("rules:\n  - select: {}\n    module: eca\n    ratio: 8\n",
     (r"rules.yaml:4: rule 0, key 'ratio': module 'eca' takes no option 'ratio'; eca takes: kernel_size, gamma, "
      r"beta, gate, init \('ratio' is an option of se, gc, cbam: set module: se\)$")),
    ("rules:\n  - select: {}\n    module: eca\n    kernal_size: 5\n",
     (r"rules.yaml:4: rule 0, key 'kernal_size': unknown rule key 'kernal_size' \(did you mean 'kernel_size'\?\); "
      r"allowed: select, skip, variant, kernel_size, gamma, beta, gate, init, module$")),
    ("defaults: {module: eca}\nrules:\n  - select: {}\n    kernel_size: 4\n",
     (r"rules.yaml:4: rule 0, key 'kernel_size': kernel_size must be an odd integer from 1 to 255, or null \(from "
      r"the channel count\), got 4$")),
    ("rules:\n  - select: {}\n    module: ecca\n",
     (r"rules.yaml:3: rule 0, key 'module': unknown module 'ecca' \(did you mean 'eca'\?\); available: se, ese, eca, "
      r"gc, cbam")),
    # defaults are shared by all modules: a key no registered module takes is the error.
    ("defaults: {module: gc, sqeeze: max}\nrules: [{select: {}}]\n",
     (r"rules.yaml:1: key 'defaults.sqeeze': unknown defaults key 'sqeeze' \(did you mean 'squeeze'\?\); allowed: "
      r"variant, ratio, divisor, min_hidden, .*squeeze, .*, add_maxpool, kernel_size, gamma, beta, fuse, "
      r"spatial_kernel_size, (.*, )?module$")),  # and the options of modules other tests registered
])
def test_option_errors_name_file_line_rule_key_and_what_the_module_takes(tmp_path, text, message):
    with pytest.raises(RuleError, match=message):
        load_rules(_write(tmp_path, text))


def test_a_key_is_allowed_when_a_module_the_rule_can_resolve_to_takes_it():
    # Rule 0 sets no module: it may resolve to rule 1's eca at the sites both select.
    r = load_rules({"rules": [{"select": {}, "kernel_size": 5}, {"select": {"stage": -1}, "module": "eca"}]})
    assert r.rules[0].options == {"kernel_size": 5}


def test_validate_options_messages():
    with pytest.raises(ModuleError, match=r"^module 'cbam' takes no option 'kernel_size' \(did you mean "
                                          r"'spatial_kernel_size'\?\); it takes: ratio, divisor, min_hidden, "
                                          r"spatial_kernel_size, bias, gate, act, ratio_of, init$"):
        modules.validate_options("cbam", {"kernel_size": 3})
    with pytest.raises(ModuleError, match=r"^module 'gc': fuse must be one of add, scale, got 'mul'$"):
        modules.validate_options("gc", {"fuse": "mul"})
    with pytest.raises(ModuleError, match=r"^module 'se': ratio must be a number from 0\.125 to 4096, got True$"):
        modules.validate_options("se", {"ratio": True})


# ---------------------------------------------------------------- the registry


class Doubler(nn.Module):
    """A user module with neither ``skip`` nor ``channel_dim``: ``2 * x``."""

    def __init__(self, channels, factor=2.0):
        super().__init__()
        self.factor = factor
        self.w = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return x * (self.factor + self.w[:, None, None])


def test_user_module_by_name_in_rules(registry):
    registry.register_module("doubler", Doubler)
    assert registry.option_names("doubler") == ("factor",)
    model = TinyNet().eval()
    patched = se_surgery.apply(model, {"defaults": {"module": "doubler", "factor": 3.0}, "rules": [{"select": {}}]},
                               input_size=16)
    block, x = patched.blocks[0], torch.randn(1, 16, 16, 16)
    assert isinstance(block.se, Doubler) and block.se.factor == 3.0
    # Without a skip parameter the core closes the join as skip + module(branch).
    b = model.blocks[0]
    want = torch.relu(x + 3.0 * b.bn(b.conv(torch.relu(x))))
    torch.testing.assert_close(block(x), want)
    assert se_surgery.report(patched).added_params == 2 * 16
    with pytest.raises(RuleError, match=r"module 'doubler' takes no option 'ratio'"):
        load_rules({"rules": [{"select": {}, "module": "doubler", "ratio": 4}]})


def test_register_module_refusals(registry):
    with pytest.raises(ModuleError, match=r"module 'eca' is a built-in module; pass overwrite=True"):
        registry.register_module("eca", Doubler)
    registry.register_module("eca", Doubler, overwrite=True)
    assert registry.option_names("eca") == ("factor",)
    with pytest.raises(ModuleError, match=r"module name must be a string of letters.*got 'my gate'"):
        registry.register_module("my gate", Doubler)
    with pytest.raises(ModuleError, match=r"first positional parameter"):
        registry.register_module("kw", lambda *, channels: nn.Identity())
    with pytest.raises(ModuleError, match=r"parameter 'variant', which is a rule key"):
        registry.register_module("bad", lambda channels, variant="a": nn.Identity())
    registry.register_module("doubler", Doubler)
    registry.register_module("doubler", Doubler)  # the same factory again (a re-run notebook cell) is fine
    with pytest.raises(ModuleError, match=r"'doubler' is already registered \(\S*test_modules.Doubler\)"):
        registry.register_module("doubler", lambda c: Doubler(c))
    with pytest.raises(ModuleError, match=r"cannot go at a channels-last \(N, H, W, C\) site: its factory "
                                          r"\S*test_modules.Doubler takes no channel_dim"):
        registry.create("doubler", 8, {}, channel_dim=-1)


def test_plugins_load_from_the_entry_point_group_on_first_lookup(registry, monkeypatch):
    plugin = types.ModuleType("fake_se_plugin")
    plugin.Doubler = Doubler
    monkeypatch.setitem(sys.modules, "fake_se_plugin", plugin)
    calls = []

    def entry_points(group):
        calls.append(group)
        return [importlib.metadata.EntryPoint("twice", "fake_se_plugin:Doubler", group),
                importlib.metadata.EntryPoint("broken", "fake_se_plugin:Missing", group)]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert calls == []  # lazily: nothing is read before a module name is looked up
    with pytest.warns(se_surgery.SESurgeryWarning, match=r"module plugin 'broken' \(fake_se_plugin:Missing\) failed "
                                                         r"to load: AttributeError"):
        assert registry.option_names("twice") == ("factor",)
    assert calls == ["se_surgery.modules"]
    with pytest.raises(ModuleError, match=r"plugin 'broken' \(fake_se_plugin:Missing\) failed to load"):
        registry.create("broken", 8, {})
    registry.module_names()
    assert calls == ["se_surgery.modules"]  # once


def test_register_module_is_exported():
    assert se_surgery.register_module is modules.register_module


# ---------------------------------------------------------------- on a model: report, save, load, strip


def test_report_rows_name_the_module_and_count_it():
    import torchvision

    model = torchvision.models.resnet18()
    rules = {"defaults": {"module": "cbam"}, "rules": [{"select": {"stage": [1, 4]}}, {"select": {"stage": 4},
                                                                                          "module": "eca"}]}
    before = se_surgery.report(model, rules, input_size=64)
    assert [(r.module, r.hidden) for r in before.sites] == [("cbam", 4)] * 2 + [("eca", None)] * 2
    patched = se_surgery.apply(model, rules, input_size=64)
    after = se_surgery.report(patched, input_size=64)
    assert after.to_dict() == dict(before.to_dict(), rules=None)
    assert before.added_params == _numel(patched) - _numel(model)


def test_save_load_strip_with_catalog_modules(tmp_path):
    import torchvision

    base = torchvision.models.resnet18().eval()
    rules = {"defaults": {"module": "gc", "ratio": 4}, "rules": [{"select": {"stage": -1}}, {"select": {"stage": 1},
                                                                                            "module": "cbam"}]}
    tuned = se_surgery.apply(base, rules, input_size=64)
    with torch.no_grad():
        for p in se_surgery.se_parameters(tuned).values():
            p.normal_()
    path = tmp_path / "se.safetensors"
    se_surgery.save_se(tuned, path)
    again = se_surgery.load_se(copy.deepcopy(base), path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), tuned(x))
        assert torch.equal(se_surgery.strip(again)(x), base(x))
    assert type(again.layer4[0].se).__name__ == "GlobalContext" and again.layer4[0].se.hidden == 128


def test_cli_compare_puts_modules_side_by_side(tmp_path, capsys):
    from se_surgery.cli import main

    files = []
    for m in ("eca", "gc"):
        files += ["--rules", _write_named(tmp_path, f"{m}.yaml", f"defaults: {{module: {m}}}\nrules: [{{select: {{}}}}]\n")]
    assert main(["report", "resnet18", "--input-size", "64", "--rules", "all_stages", *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(ln for ln in lines if ln.split()[:3] == ["se", "eca", "gc"])
    params = next(ln for ln in lines if ln.startswith("added params")).split()[2:]
    assert head and params[1] == "36"  # eca: k = 3 at 64 channels, 5 at 128, 256 and 512; two blocks each
    assert main(["report", "resnet18", "--input-size", "64", "--rules", "all_stages", "--rules", "late_stages"]) == 0
    assert any(ln.startswith("preset late_stages") for ln in capsys.readouterr().out.splitlines())  # one module: rows


def _write_named(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


DOC = Path(__file__).resolve().parent.parent / "docs" / "modules.md"


def test_docs_rules_example_does_what_its_comment_says(tmp_path):
    import torchvision

    example = DOC.read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    assert example.startswith("# ECA at every residual join; global context, reduction 4, at those of the last stage")
    p = se_surgery.plan(torchvision.models.resnet18(), _write(tmp_path, example), input_size=64)
    got = {e.site.name: (e.options.module, e.options.module_options()) for e in p.selected}
    assert got == {**{f"layer{s}.{b}": ("eca", {}) for s in (1, 2, 3) for b in (0, 1)},
                   "layer4.0": ("gc", {"ratio": 4}), "layer4.1": ("gc", {"ratio": 4})}


def test_docs_own_module_example_runs_and_is_the_identity(registry):
    import torchvision

    code = DOC.read_text().split("```python\n", 1)[1].split("```", 1)[0]
    base = torchvision.models.resnet18().eval()
    scope = {"model": base}
    exec(code, scope)  # noqa: S102 - the documentation's own example
    patched, x = scope["model"], torch.randn(1, 3, 64, 64)
    assert type(patched.layer1[0].se).__name__ == "Gate" and patched.layer1[0].se.scale == 2.0
    assert torch.equal(patched(x), base(x))


@pytest.fixture(scope="module")
def swin():
    import torchvision

    model, x = torchvision.models.swin_t().eval(), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        return model, x, model(x)


@pytest.mark.parametrize("name", BUILTINS)
def test_channels_last_model_is_unchanged_at_insertion(swin, name):
    """torchvision Swin joins (N, H, W, C) maps: every module must scale the last axis."""
    model, x, want = swin
    patched = _apply_quiet(model, {"defaults": {"module": name}, "rules": [{"select": {"stage": -1}}]})
    inserted = [m for _, m in se_modules(patched)]
    assert len(inserted) == 4 and all(m.channel_dim == -1 for m in inserted)
    with torch.no_grad():
        assert torch.equal(patched(x), want)


def test_a_rule_option_that_reaches_no_module_is_warned_about():
    # The one site that would get eca is skipped: kernel_size reaches no module.
    rules = {"rules": [{"select": {}, "kernel_size": 5}, {"select": {"name": "blocks.1"}, "module": "eca"},
                       {"select": {"name": "blocks.1"}, "skip": True}]}
    with pytest.warns(se_surgery.SESurgeryWarning, match=r"rule 0, key 'kernel_size': no effect, no site it selects "
                                                         r"gets a module that takes 'kernel_size'"):
        se_surgery.plan(TinyNet(), rules, input_size=16)
    with pytest.raises(se_surgery.PlanError, match=r"rule 0, key 'kernel_size': no effect"):
        se_surgery.plan(TinyNet(), rules, input_size=16, strict=True)
    del rules["rules"][2]  # now it reaches eca at blocks.1: no note
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = se_surgery.plan(TinyNet(), rules, input_size=16)
    assert [e.options.module_options() for e in p.selected] == [{"ratio": 16, "divisor": 1, "min_hidden": 1,
                                                                "squeeze": "avg", "gate": "sigmoid",
                                                                "init": "identity", "bias": True, "act": "relu",
                                                                "ratio_of": "site", "round_limit": 0.0},
                                                               {"kernel_size": 5}]
