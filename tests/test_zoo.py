"""The model zoos: every torchvision classification model and a timm sample.

For each model: find its sites; where there are any, apply ``all_stages`` (``inception``
for concat-only models; every site where all of them already hold a channel gate, so
the surgery is still exercised) with identity init, then check that in eval mode the
outputs equal the original's (``torch.equal``), that forward and backward run in train
mode, and that the model keeps its class. Models without sites must be the ones listed
in ``NO_SITES`` with the reason.

    python -m pytest tests/test_zoo.py            # fast subset, a few minutes on 2 cores
    python -m pytest -m zoo tests/test_zoo.py     # the full sweep, asserted
    python benchmarks/zoo_coverage.py             # the full sweep, written to docs/coverage.md

The tests only assert; ``benchmarks/zoo_coverage.py`` runs the same ``check`` on every
model and writes the table. All models are built without weights, at a small input size
where the model allows one.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import pytest
import timm
import torch
import torchvision

import se_surgery
from se_surgery._plan import se_modules
from se_surgery._sites import discover

SMALL = 64  # input size wherever the model takes it

TORCHVISION = sorted(torchvision.models.list_models(module=torchvision.models))
# Input sizes other than SMALL, and why.
TV_SIZES = {
    "inception_v3": 299,  # eval needs 75 px, but the train-mode aux head needs its full 299
    "maxvit_t": 224,  # built for a fixed 224 x 224 grid
    **{n: 224 for n in TORCHVISION if n.startswith("vit_")},  # fixed-size position embeddings
}

# The timm sample: the smallest variant of each family (>= 60 models).
TIMM = [
    # ResNet / ResNeXt / ResNeSt / Res2Net / SKNet and attention variants
    "resnet18", "resnet10t", "resnext26ts", "resnest14d", "res2net50_14w_8s", "res2next50", "skresnet18",
    "seresnet18", "ecaresnet26t", "seresnext26t_32x4d", "gcresnet33ts", "legacy_seresnet18", "resnetv2_50",
    "tresnet_m", "gernet_s", "botnet26t_256", "halonet26t", "lambda_resnet26t",
    # RegNet
    "regnetx_002", "regnety_002", "regnetz_005",
    # EfficientNet / MobileNet / NAS families
    "efficientnet_b0", "efficientnetv2_rw_t", "mobilenetv3_small_050", "mobilenetv4_conv_small", "mobilenetv2_035",
    "mixnet_s", "mnasnet_small", "fbnetc_100", "spnasnet_100", "hardcorenas_a", "tinynet_e", "semnasnet_050",
    "ghostnet_050", "ghostnetv2_100", "repghostnet_050", "lcnet_050", "lcnetv2_small", "rexnet_100",
    # ConvNeXt and other modern convnets
    "convnext_atto", "convnextv2_atto", "inception_next_atto", "rdnet_tiny", "starnet_s050", "fasternet_t0",
    "mambaout_femto", "convmixer_768_32",
    # DenseNet, DLA, DPN, CSPNet, HRNet, VoVNet, SelecSLS, HGNet, DarkNet
    "densenet121", "dla46_c", "dla34", "dpn48b", "cspresnet50", "cspdarknet53", "cs3darknet_s", "cspnext_tiny",
    "hrnet_w18_small", "ese_vovnet19b_dw", "vovnet39a", "selecsls42", "hgnetv2_b0", "hgnet_tiny", "darknet17",
    # Inception / Xception / NASNet
    "inception_v3", "inception_v4", "inception_resnet_v2", "legacy_xception", "xception41", "nasnetalarge",
    "pnasnet5large",
    # Normalizer-free
    "nf_regnet_b0", "nf_resnet26", "eca_nfnet_l0", "nfnet_l0",
    # Reparameterisable
    "repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9",
    # Hybrids and vision transformers with 4-D stages
    "edgenext_xx_small", "coatnet_nano_rw_224", "maxvit_pico_rw_256", "swin_tiny_patch4_window7_224",
    "swinv2_cr_tiny_ns_224", "nest_tiny", "gcvit_xxtiny", "mobilevit_xxs", "mobilevitv2_050", "tiny_vit_5m_224",
    "efficientvit_b0", "efficientvit_m0", "efficientformer_l1", "efficientformerv2_s0", "poolformer_s12",
    "caformer_s18", "focalnet_tiny_srf", "davit_tiny", "shvit_s1", "swiftformer_xs", "sequencer2d_s",
    "visformer_tiny", "mvitv2_tiny", "twins_svt_small", "coat_lite_tiny",
    # Token-only models (no 4-D joins)
    "pvt_v2_b0", "levit_128s", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "mixer_s32_224", "resmlp_12_224",
    "crossvit_tiny_240", "xcit_nano_12_p16_224", "pit_ti_224", "cait_xxs24_224", "hiera_tiny_224",
]
# timm models whose size is fixed by their config (position embeddings, window grids,
# attention biases) or whose stem needs more than SMALL: run at pretrained_cfg's size.
TIMM_CFG_SIZE = {
    "inception_v3", "inception_v4", "inception_resnet_v2", "coatnet_nano_rw_224", "maxvit_pico_rw_256",
    "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224", "nest_tiny", "gcvit_xxtiny", "efficientformer_l1",
    "efficientformerv2_s0", "levit_128s", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "mixer_s32_224",
    "resmlp_12_224", "botnet26t_256", "halonet26t", "visformer_tiny", "pit_ti_224", "coat_lite_tiny",
    "cait_xxs24_224", "hiera_tiny_224",
}

# Models with no site, and why: what discovery must report for them.
_TOKENS = "every add is on 3-D (B, N, C) tokens: not a site"
NO_SITES = {
    "tv:alexnet": "plain conv stack, no joins",
    **{f"tv:{n}": "plain conv stack, no joins" for n in TORCHVISION if n.startswith("vgg")},
    **{f"tv:{n}": _TOKENS for n in TORCHVISION if n.startswith("vit_")},
    # Their only 4-D adds are conv positional encodings, x + dwconv(x) without a nonlinearity;
    # CoaT's other joins are per-group concats over one split (its relative position encoding).
    **{f"timm:{n}": "conv positional encodings and 3-D token adds: no sites"
       for n in ["davit_tiny", "twins_svt_small", "coat_lite_tiny"]},
    **{f"timm:{n}": _TOKENS for n in ["pvt_v2_b0", "levit_128s", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
                                      "mixer_s32_224", "resmlp_12_224", "crossvit_tiny_240", "xcit_nano_12_p16_224",
                                      "pit_ti_224", "cait_xxs24_224", "hiera_tiny_224"]},
}

# Known deviations, each with its reason; everything else must be exact.
NEAR_EQUAL: dict[str, float] = {
    # Nothing: timm:focalnet_tiny_srf, once within 1e-6, is exact since the v2 core (its
    # fused join no longer changes the layout the next conv reads).
}
# Every model keeps its class: joins in a root forward (HRNet's head) rewrite the root
# into a generated subclass of its own class, like any block. Nothing is listed here.
NOT_SAME_CLASS: dict[str, str] = {}


def build(key: str) -> torch.nn.Module:
    source, name = key.split(":", 1)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source == "tv":
            return torchvision.models.get_model(name, weights=None).eval()
        return timm.create_model(name, pretrained=False).eval()


def input_size(key: str, model) -> int:
    source, name = key.split(":", 1)
    if source == "tv":
        return TV_SIZES.get(name, SMALL)
    return int(model.pretrained_cfg["input_size"][-1]) if name in TIMM_CFG_SIZE else SMALL


@dataclass
class Row:
    model: str
    size: int = 0
    sites: int = 0
    attention: int = 0
    rules: str = ""
    applied: int = 0
    equal: str = ""
    train: str = ""
    same_class: bool | None = None
    seconds: float = 0.0
    untraced: list = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        if not self.sites:
            return self.model in NO_SITES
        return (self.applied > 0 and self.equal.startswith(("exact", "<=")) and self.train == "ok"
                and (self.same_class or self.model in NOT_SAME_CLASS))


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def check(key: str) -> Row:
    """Run every zoo check on one model; the row says what held."""
    t0 = time.perf_counter()
    row = Row(key)
    model = build(key)
    row.size = size = input_size(key, model)
    d = discover(model, size)
    row.sites, row.attention, row.untraced = len(d.sites), sum(s.has_attention for s in d.sites), d.untraced
    if not d.sites:
        row.note = NO_SITES.get(key, "no sites found")
        row.seconds = time.perf_counter() - t0
        return row
    if any(s.kind == "residual" and not s.has_attention for s in d.sites):
        row.rules, rules = "all_stages", "all_stages"
    elif any(s.kind == "concat" and not s.has_attention for s in d.sites):
        row.rules, rules = "inception", "inception"
    elif any(s.kind == "block" and not s.has_attention for s in d.sites):
        row.rules, rules = "mobilenetv3", "mobilenetv3"
    else:  # every site already has a channel gate: the presets add nothing, so force it
        row.rules, rules = "every site", {"rules": [{"select": {}}, {"select": {"kind": "block"}, "variant": "inner"}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patched = se_surgery.apply(model, rules, input_size=size)
    row.applied = len(se_modules(patched))
    row.same_class = isinstance(patched, type(model))  # a root with joins gets a subclass of its class
    torch.manual_seed(1)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        a, b = _tensors(model(x)), _tensors(patched.eval()(x))
    if len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b)):
        row.equal = "exact"
    else:
        diff = max((p - q).abs().max().item() for p, q in zip(a, b))
        tol = NEAR_EQUAL.get(key)
        row.equal = f"<= {tol:g} ({diff:.1e})" if tol is not None and diff <= tol else f"no ({diff:.1e})"
    try:
        patched.train()
        out = _tensors(patched(torch.randn(2, 3, size, size)))
        sum(o.float().square().mean() for o in out).backward()
        missing = [n for n, se in se_modules(patched) if se.fc2.weight.grad is None]
        row.train = "ok" if not missing else f"no gradient at {missing[0]}"
    except Exception as e:  # recorded, then asserted by the test
        row.train = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    row.seconds = time.perf_counter() - t0
    if row.untraced:
        row.note = f"{len(row.untraced)} module(s) not traced, e.g. {row.untraced[0][0]}"
    if key in NOT_SAME_CLASS:
        row.note = (row.note + "; " if row.note else "") + NOT_SAME_CLASS[key]
    return row


def assert_row(row: Row) -> None:
    key = row.model
    if key in NO_SITES:
        assert row.sites == 0, f"{key}: expected no sites ({NO_SITES[key]}), found {row.sites}"
        return
    assert row.sites > 0, f"{key}: no sites found"
    assert row.applied > 0, f"{key}: {row.sites} sites, but no SE was inserted"
    if key in NEAR_EQUAL:
        assert row.equal.startswith(("exact", "<=")), f"{key}: outputs differ: {row.equal}"
    else:
        assert row.equal == "exact", f"{key}: outputs differ: {row.equal}"
    assert row.train == "ok", f"{key}: train mode: {row.train}"
    assert row.same_class or key in NOT_SAME_CLASS, f"{key}: apply() changed the class"
    if key in NOT_SAME_CLASS:
        assert not row.same_class, f"{key} keeps its class now: remove it from NOT_SAME_CLASS"


# --------------------------------------------------------------------------- fast subset (CI)

FAST = [
    "tv:resnet18", "tv:densenet121", "tv:googlenet", "tv:mobilenet_v3_small", "tv:efficientnet_b0", "tv:swin_t",
    "tv:shufflenet_v2_x0_5", "tv:regnet_x_400mf", "tv:vgg11",
    "timm:convnext_atto", "timm:dla46_c", "timm:selecsls42", "timm:mobilevit_xxs", "timm:hrnet_w18_small",
    "timm:tiny_vit_5m_224", "timm:dpn48b", "timm:lcnet_050",
]


@pytest.mark.parametrize("key", FAST)
def test_fast_subset(key):
    assert_row(check(key))


# --------------------------------------------------------------------------- the full sweep

ZOO = [f"tv:{n}" for n in TORCHVISION] + [f"timm:{n}" for n in TIMM]


@pytest.mark.zoo
@pytest.mark.parametrize("key", ZOO)
def test_zoo(key):
    assert_row(check(key))


def test_timm_sample_is_big_and_unique():
    assert len(TIMM) >= 60 and len(set(TIMM)) == len(TIMM)
    assert all(n in timm.list_models() for n in TIMM)
    assert set(FAST) <= set(ZOO)
