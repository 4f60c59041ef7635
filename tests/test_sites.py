"""Site discovery: what find_sites must find in real models and what it must not."""

import warnings

import pytest
import torch
import torchvision
from torch import nn

import se_surgery
from se_surgery._sites import discover

tv = torchvision.models


def _build(name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return tv.get_model(name, weights=None, **kw)


def test_resnet50_sites():
    sites = se_surgery.find_sites(_build("resnet50"))
    expected = [f"layer{s}.{b}" for s, n in zip(range(1, 5), (3, 4, 6, 3)) for b in range(n)]
    assert [s.name for s in sites] == expected
    assert {s.kind for s in sites} == {"residual"}
    for stage, count, channels, size in zip((1, 2, 3, 4), (3, 4, 6, 3), (256, 512, 1024, 2048), (56, 28, 14, 7)):
        in_stage = [s for s in sites if s.stage == stage]
        assert len(in_stage) == count
        assert [s.block for s in in_stage] == list(range(1, count + 1))
        assert {s.channels for s in in_stage} == {channels}
        assert {s.spatial for s in in_stage} == {(size, size)}
        assert {s.owner_type for s in in_stage} == {"Bottleneck"}
    first = sites[0]
    assert (first.owner, first.channel_dim, first.in_channels, first.in_spatial) == ("layer1.0", 1, 64, (56, 56))
    assert sites[3].in_channels == 256 and sites[3].in_spatial == (56, 56)  # layer2.0 reads the 56x56 map


def test_inception_v3_outer_cats_only():
    sites = se_surgery.find_sites(_build("inception_v3", init_weights=False), input_size=299)
    names = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
             "Mixed_7a", "Mixed_7b", "Mixed_7c"]
    assert [s.name for s in sites] == names
    assert {s.kind for s in sites} == {"concat"}
    assert [s.stage for s in sites] == [1] * 3 + [2] * 5 + [3] * 3
    assert [s.spatial[0] for s in sites] == [35] * 3 + [17] * 5 + [8] * 3
    assert sites[-1].channels == 2048


def test_googlenet_and_densenet121():
    g = se_surgery.find_sites(_build("googlenet", init_weights=False))
    assert [s.name for s in g] == ["inception3a", "inception3b", "inception4a", "inception4b", "inception4c",
                                   "inception4d", "inception4e", "inception5a", "inception5b"]
    d = se_surgery.find_sites(_build("densenet121"))
    assert len(d) == 58 and {s.kind for s in d} == {"concat"}
    # The first layer of each dense block concatenates a single tensor: not a join.
    assert "features.denseblock1.denselayer1" not in {s.name for s in d}
    assert d[0].name == "features.denseblock1.denselayer2" and d[0].channels == 96
    assert [s.name for s in d if s.owner_type == "_DenseBlock"] == [f"features.denseblock{i}" for i in range(1, 5)]


@pytest.mark.parametrize(
    "name, count, channels, blocks",
    [
        # InvertedResidual with stride 1 and in == out: 1 + 2 + 3 + 2 + 2 of the 17 blocks;
        # the other 7 (no skip) are block sites.
        ("mobilenet_v2", 10, [24, 32, 32, 64, 64, 64, 96, 96, 160, 160], 7),
        # MBConv blocks after the first of each stage: 0 + 1 + 1 + 2 + 2 + 3 + 0; the 7 first are blocks.
        ("efficientnet_b0", 9, [24, 40, 80, 80, 112, 112, 192, 192, 192], 7),
        # Every CNBlock: depths 3, 3, 9, 3.
        ("convnext_tiny", 18, [96] * 3 + [192] * 3 + [384] * 9 + [768] * 3, 0),
        # Every ResBottleneckBlock: depths 1, 3, 6, 6.
        ("regnet_y_400mf", 16, [48] + [104] * 3 + [208] * 6 + [440] * 6, 0),
        ("resnext50_32x4d", 16, [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3, 0),
    ],
)
def test_residual_counts(name, count, channels, blocks):
    sites = se_surgery.find_sites(_build(name))
    residual = [s for s in sites if s.kind == "residual"]
    assert len(residual) == count
    assert [s.channels for s in residual] == channels
    assert len(sites) - len(residual) == blocks
    assert {s.kind for s in sites} == {"residual"} | ({"block"} if blocks else set())


def test_attention_already_there_is_marked():
    assert all(s.has_attention for s in se_surgery.find_sites(_build("efficientnet_b0")))
    assert all(s.has_attention for s in se_surgery.find_sites(_build("regnet_y_400mf")))
    assert not any(s.has_attention for s in se_surgery.find_sites(_build("resnet18")))


def test_vit_has_no_residual_sites():
    d = discover(_build("vit_b_16"))
    assert d.sites == ()


def test_swin_channels_last_joins():
    sites = se_surgery.find_sites(_build("swin_t"))
    assert len(sites) == 24  # two joins in each of the 2 + 2 + 6 + 2 blocks
    assert {s.channel_dim for s in sites} == {-1}
    assert [s.channels for s in sites[::2]] == [96] * 2 + [192] * 2 + [384] * 6 + [768] * 2
    assert sites[0].spatial == (56, 56) and sites[-1].spatial == (7, 7)
    assert sites[1].name == "features.1.0:2"  # an owner's second join gets a suffix


class PosEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Parameter(torch.zeros(1, 8, 16, 16))

    def forward(self, x):
        return self.conv(x) + self.pos


class TwoInputs(nn.Module):
    """Adds a map of the image to a map of an unrelated tensor (a stored template)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.register_buffer("template", torch.randn(1, 3, 16, 16))

    def forward(self, x):
        return self.a(x) + self.b(self.template)


def test_no_site_for_embedding_or_unrelated_inputs():
    assert se_surgery.find_sites(PosEmbed(), input_size=16) == []
    d = discover(PosEmbed(), input_size=16)
    assert d.rejected == (("<model>:add", "the operands share no common input (two unrelated tensors)"),)
    d = discover(TwoInputs(), input_size=16)
    assert d.sites == ()
    assert d.rejected == (("<model>:add", "the operands share no common input (two unrelated tensors)"),)


class DropPath(nn.Module):
    def __init__(self, p=0.1):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class Spellings(nn.Module):
    """One block per spelling of a residual join."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.f = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
                               for _ in range(6))
        self.proj = nn.Conv2d(c, c, 1)
        self.drop = DropPath()
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.f[0](x)  # operator.add
        y = self.f[1](x)
        y += x  # +=, which fx records as operator.add
        x = torch.add(y, self.f[2](y))  # torch.add
        x = x.add(self.f[3](x))  # Tensor.add
        x = x + self.drop(self.gamma * self.f[4](x))  # drop path and layer scale
        return self.proj(x) + self.f[5](x)  # proj(x) + f(x)


def test_every_spelling_of_a_residual_join():
    sites = se_surgery.find_sites(Spellings(), input_size=16)
    assert [s.name for s in sites] == ["add", "add_1", "add_2", "add_3", "add_4", "add_5"]
    assert [s.branch_arg for s in sites] == [1, 0, 1, 1, 1, 1]
    assert {s.owner for s in sites} == {""}
    model = Spellings().eval()
    out = se_surgery.apply(model, {"rules": [{"select": {}}]}, input_size=16)
    assert isinstance(out, Spellings)  # joins in the root's own forward: the root keeps its class too
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(out(x), model(x))


def test_site_records_are_frozen_and_roundtrip():
    site = se_surgery.find_sites(_build("resnet18"))[0]
    with pytest.raises(AttributeError):
        site.channels = 3
    assert se_surgery.Site.from_dict(site.to_dict()) == site


def test_input_size_from_timm_config():
    import timm

    model = timm.create_model("resnet18", pretrained=False)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 160, 160))
    assert se_surgery.find_sites(model)[0].spatial == (40, 40)


class Untraceable(nn.Module):
    """Control flow on the input's size at the top; traceable residual blocks inside."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = torchvision.models.resnet.BasicBlock(8, 8)

    def forward(self, x):
        x = self.stem(x)
        if x.shape[-1] % 2:  # fx cannot branch on a traced value; fake tensors can
            x = nn.functional.pad(x, (0, 1, 0, 1))
        return self.block(x)


class ValueDependent(Untraceable):
    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:  # needs real data: even fake tensors cannot say which way it goes
            x = -x
        return self.block(x)


def test_untraceable_root_falls_back_to_blocks():
    d = discover(Untraceable(), input_size=15)
    assert [(s.name, s.spatial) for s in d.sites] == [("block", (16, 16))]
    assert d.untraced[0][0] == "<model>"
    assert "control flow" in d.untraced[0][1]


def test_block_behind_value_dependent_flow_is_still_reached():
    # The shape run reads data-dependent scalars as 0 and goes down one path.
    d = discover(ValueDependent(), input_size=16)
    assert [(s.name, s.spatial) for s in d.sites] == [("block", (16, 16))]
    assert [p for p, _ in d.untraced] == ["<model>"]
