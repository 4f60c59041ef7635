"""Placement v3: the field's placements on attention-free builds of the models that define them.

Each timm model is built as timm ships it (random weights), its own channel attention
replaced by ``nn.Identity``; se-surgery then puts attention back where the model had it,
and the parameter count (and, with timm's attention weights copied in, the output) must
be the original's.
"""

import copy
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
import yaml
from torch import nn

import se_surgery
from se_surgery._plan import se_modules
from se_surgery._sites import discover
from se_surgery.cli import main
from se_surgery.errors import PlanError, RuleError

PRESETS = Path(__file__).resolve().parent.parent / "rules"


def _timm(name):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def _without(model, classes, attr):
    """Replace every child ``attr`` of a class in ``classes`` by nn.Identity; their owners' paths."""
    owners = []
    for path, m in list(model.named_modules()):
        child = getattr(m, attr, None)
        if isinstance(child, nn.Module) and type(child).__name__ in classes:
            setattr(m, attr, nn.Identity())
            owners.append(path)
    return owners


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _copy_timm_se(patched, ref):
    """Load timm's SE weights (conv_reduce / conv_expand) into the inserted SE (fc1 / fc2)."""
    theirs, mine = ref.state_dict(), patched.state_dict()
    copied = 0
    for name, module in se_modules(patched):
        owner = name.rsplit(".", 1)[0]
        for a, b in (("fc1", "conv_reduce"), ("fc2", "conv_expand")):
            for t in ("weight", "bias"):
                mine[f"{name}.{a}.{t}"] = theirs[f"{owner}.se.{b}.{t}"]
                copied += 1
    patched.load_state_dict(mine)
    return copied


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def test_efficientnet_b0_preset_is_timms_efficientnet():
    ref = _timm("efficientnet_b0")
    base = copy.deepcopy(ref)
    owners = _without(base, {"SqueezeExcite"}, "se")
    assert len(owners) == 16
    patched = se_surgery.apply(base, "efficientnet")
    assert _params(patched) == _params(ref) == 5_288_548
    assert sorted(n.rsplit(".", 1)[0] for n, _ in se_modules(patched)) == sorted(owners)
    first = patched.blocks[0][0].se_inserted  # the depthwise-separable block: no skip, a block site
    assert (first.hidden, first.act_name) == (8, "silu")  # 32 input channels / 4
    _copy_timm_se(patched, ref)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert _rel(ref(x), patched(x)) < 1e-5


def test_mobilenetv3_large_inner_se_is_timms():
    ref = _timm("mobilenetv3_large_100")
    base = copy.deepcopy(ref)
    owners = _without(base, {"SqueezeExcite"}, "se")
    assert len(owners) == 8
    rules = yaml.safe_load((PRESETS / "mobilenetv3.yaml").read_text())
    rules["defaults"]["init"] = "paper"  # timm's plain hard-sigmoid gate, to load its weights
    rules["rules"] = [{"select": {"kind": kind, "name": owners}} for kind in ("residual", "block")]
    patched = se_surgery.apply(base, rules)
    assert _params(patched) == _params(ref)
    # 72 expanded channels / 4 = 18 -> 24: timm's round_channels (divisor 8, round limit 0.9)
    assert patched.blocks[2][0].se_inserted.hidden == 24
    _copy_timm_se(patched, ref)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert _rel(ref(x), patched(x)) < 1e-5


def test_mobilenet_v2_gets_se_in_every_inverted_residual_block():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        base = torchvision.models.mobilenet_v2().eval()
    patched = se_surgery.apply(base, "mobilenetv3")
    blocks = [f"features.{i}" for i in range(1, 18)]
    assert sorted((n.rsplit(".", 1)[0] for n, _ in se_modules(patched)), key=lambda p: int(p.split(".")[1])) == blocks
    kinds = {s.name: s.kind for s in se_surgery.find_sites(base)}
    assert sum(k == "block" for k in kinds.values()) == 7 and kinds["features.1"] == "block"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(base(x), patched(x))


def test_ese_after_vovnet_fusion_conv():
    ref = _timm("ese_vovnet39b")
    # eSE follows the fusion conv of the last OSA block of each stage (4 of the 6 concats).
    concat = [s for s in se_surgery.find_sites(ref) if s.kind == "concat"]
    assert [s.has_attention for s in concat] == [True, True, False, True, False, True]
    assert [e.site.name for e in se_surgery.plan(ref, "inception").selected] == [
        "stages.2.blocks.0.conv_mid", "stages.3.blocks.0.conv_mid"]
    base = copy.deepcopy(ref)
    owners = _without(base, {"EffectiveSEModule"}, "attn")
    assert owners == ["stages.0.blocks.0", "stages.1.blocks.0", "stages.2.blocks.1", "stages.3.blocks.1"]
    sites = [s for s in se_surgery.find_sites(base) if s.kind == "concat"]
    assert [s.fusion[1] for s in sites] == ["conv_concat"] * 6
    assert not any(s.has_attention for s in sites)
    rules = {"rules": [{"select": {"name": [f"{o}.conv_mid" for o in owners]}, "module": "ese",
                        "variant": "fusion"}]}
    patched = se_surgery.apply(base, rules)
    assert _params(patched) == _params(ref)
    assert [n for n, _ in se_modules(patched)] == [f"{o}.se" for o in owners]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(base(x), patched(x))  # identity init


class Cat(nn.Module):
    """A concat of two convs and nothing after it: no block input, no fusion layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_fusion_needs_a_consuming_conv():
    with pytest.raises(PlanError, match=r"'fusion' needs a conv layer that alone reads the concatenation, and "
                                        r"cat has none; use 'standard'$"):
        se_surgery.plan(Cat(), {"rules": [{"select": {"kind": "concat"}, "variant": "fusion"}]}, input_size=16)


def test_dpn_dual_path_is_residual():
    sites = se_surgery.find_sites(_timm("dpn68b"))
    residual = [s for s in sites if s.kind == "residual"]
    assert len(residual) == 22  # k_sec 3 + 4 + 12 + 3
    assert not [s for s in sites if s.kind == "branch_sum"]
    assert [s.stage for s in residual] == [1] * 3 + [2] * 4 + [3] * 12 + [4] * 3


def test_rexnet_partial_residual_reassembly_is_no_concat_site():
    d = discover(_timm("rexnetr_100"))
    assert not [s for s in d.sites if s.kind == "concat"]
    assert len([s for s in d.sites if s.kind == "residual"]) == 11
    assert sum(why.startswith("reassembles channel slices of one tensor") for _, why in d.rejected) == 11


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coat_tiny", "twins_pcpvt_small"])
def test_conv_positional_encoding_is_no_site(name):
    d = discover(_timm(name))
    assert not [s for s in d.sites if s.kind == "branch_sum"]
    assert sum("positional encoding" in why for _, why in d.rejected) == 4


def test_dilated_resnet50_stages_are_declared(capsys):
    model = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    d = discover(model)
    assert d.stage_source == "declared (layerN)"
    assert [sum(s.stage == k for s in d.sites) for k in (1, 2, 3, 4)] == [3, 4, 6, 3]
    assert main(["sites", "resnet50"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "stages: declared (layerN)"


@pytest.mark.slow
def test_hybrid_vit_backbone_stages_from_its_feature_info():
    d = discover(_timm("vit_small_r26_s32_224"))
    assert d.stage_source == "declared (feature_info)"
    assert [(s.name, s.stage) for s in d.sites] == [(f"patch_embed.backbone.stages.{i}.blocks.{j}", i + 1)
                                                     for i in range(4) for j in range(2)]


def test_mobilenet_v2_stages_by_stride():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        d = discover(torchvision.models.mobilenet_v2())
    assert d.stage_source == "by stride"


class _Sep(nn.Module):
    """A depthwise-separable block with a made-up class name: found by structure."""

    def __init__(self, c):
        super().__init__()
        self.dw, self.bn, self.act = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU()
        self.pw = nn.Conv2d(c, 2 * c, 1)

    def forward(self, x):
        return self.pw(self.act(self.bn(self.dw(x))))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(_Sep(8), _Sep(16))

    def forward(self, x):
        return self.body(self.stem(x))


def test_block_sites_are_structural_and_take_inner_only():
    sites = se_surgery.find_sites(_Net(), input_size=16)
    assert [(s.name, s.kind, s.channels, s.in_channels, s.inner, s.inner_channels) for s in sites] == [
        ("body.0", "block", 16, 8, ("act",), 8), ("body.1", "block", 32, 16, ("act",), 16)]
    with pytest.raises(PlanError, match=r"variant 'standard' is not allowed at block site\(s\) body.0, body.1; "
                                        r"block sites allow only 'inner' \(block sites take variant: inner\)$"):
        se_surgery.plan(_Net(), {"rules": [{"select": {"kind": "block"}}]}, input_size=16)
    model = _Net().eval()
    rules = {"rules": [{"select": {"kind": "block"}, "variant": "inner", "ratio": 2, "ratio_of": "block_input",
                        "act": "hard_swish"}]}
    patched = se_surgery.apply(model, rules)
    se = patched.body[1].se
    assert (se.channels, se.hidden, type(se.act).__name__) == (16, 8, "Hardswish")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), patched(x))
    report = se_surgery.report(patched)
    assert [r.hidden for r in report.sites] == [4, 8]
    assert report.added_params == se_surgery.report(model, rules).added_params == _params(patched) - _params(model)


@pytest.mark.parametrize("key, value, allowed", [
    ("act", "swish", "one of relu, relu6, silu, gelu, hard_swish, mish"),
    ("ratio_of", "input", "one of site, block_input"),
    ("round_limit", 2, "a number from 0 to 1"),
])
def test_new_options_are_checked(key, value, allowed):
    with pytest.raises(RuleError, match=rf"rule 0, key '{key}': {key} must be {allowed}, got {value!r}$"):
        se_surgery.load_rules({"rules": [{"select": {}, key: value}]})


def test_ratio_of_block_input_needs_a_block_input():
    with pytest.raises(PlanError, match=r"key 'ratio_of': 'block_input' needs the block's input channels, which "
                                        r"concat site cat has not; use ratio_of: site$"):
        se_surgery.plan(Cat(), {"rules": [{"select": {}, "ratio_of": "block_input"}]}, input_size=16)
