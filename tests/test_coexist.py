"""se-surgery next to other code that changes classes: blocks of one class with their own
constants, parametrize, fx GraphModules (torchvision feature extractors), wrappers."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.utils import parametrize
from torchvision.models.feature_extraction import create_feature_extractor

import se_surgery


class _ScaledBlock(nn.Module):
    """A residual block whose forward makes a tensor from a per-instance setting: fx stores
    it as a constant of the traced graph (``_tensor_constant0``)."""

    def __init__(self, c: int, scale: float):
        super().__init__()
        self.conv, self.bn, self.scale = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), scale

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x))) * torch.tensor(self.scale)


class _ScaledNet(nn.Module):
    def __init__(self, scales=(1.0, 5.0)):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(*(_ScaledBlock(8, s) for s in scales))

    def forward(self, x):
        return self.layer1(self.stem(x))


def _apply(m: nn.Module) -> nn.Module:
    with pytest.warns(se_surgery.SESurgeryWarning):  # the layer-scale placement note
        return se_surgery.apply(m, "all_stages", input_size=(3, 16, 16))


def test_blocks_of_one_class_keep_their_own_traced_constants():
    torch.manual_seed(0)
    base, other = _ScaledNet().eval(), _ScaledNet((3.0, 7.0)).eval()
    x = torch.randn(2, 3, 16, 16)
    patched, patched_other = _apply(base), _apply(other)
    assert type(patched.layer1[0]) is type(patched.layer1[1]) is type(patched_other.layer1[0])  # one class: code only
    for p, m in ((patched, base), (patched_other, other)):
        assert torch.equal(p(x), m(x))
        assert torch.equal(pickle.loads(pickle.dumps(p))(x), m(x))
        assert torch.equal(copy.deepcopy(p)(x), m(x))
        keys = list(p.state_dict())
        assert [k for k in keys if ".se." not in k] == list(m.state_dict())  # nothing new but SE's
        assert [k for k in keys if ".se." in k] == [f"layer1.{i}.se.{k}" for i in (0, 1)
                                                    for k in ("gate_scale", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
    back = se_surgery.strip(patched)
    assert back.layer1[1].__dict__.keys() == base.layer1[1].__dict__.keys()  # the constant went with SE
    assert torch.equal(back(x), base(x))


class _GammaBlock(nn.Module):
    """A residual block with a parameter of its own (a layer scale), for parametrize."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.full((1, c, 1, 1), 0.5))

    def forward(self, x):
        return x + self.gamma * torch.relu(self.bn(self.conv(x)))


class _Double(nn.Module):
    def forward(self, w):
        return w * 2


def test_strip_works_through_a_class_parametrize_derived_from_the_patched_one():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(_GammaBlock(8), _GammaBlock(8))).eval()
    with pytest.warns(se_surgery.SESurgeryWarning):  # the layer-scale placement note
        patched = se_surgery.apply(base, "all_stages", input_size=(3, 16, 16))
    for m in (base, patched):
        parametrize.register_parametrization(m[1][0], "gamma", _Double())  # on the patched block's own parameter
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(patched(x), base(x)) and se_surgery.is_patched(patched)
    back = se_surgery.strip(patched)
    assert not se_surgery.is_patched(back) and not hasattr(back[1][0], "se")
    assert type(back[1][0]).__mro__[1] is _GammaBlock  # parametrize's class, rebuilt on the original
    assert type(back[1][1]) is _GammaBlock
    assert back.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in back.state_dict().items())
    assert torch.equal(back(x), base(x))
    with torch.no_grad():
        back[1][0].parametrizations.gamma.original.fill_(1.0)  # the parametrization still computes gamma
    assert torch.equal(back[1][0].gamma, torch.full((1, 8, 1, 1), 2.0))
    parametrize.remove_parametrizations(back[1][0], "gamma")
    assert type(back[1][0]) is _GammaBlock


def test_a_torchvision_feature_extractor_keeps_its_mode_and_switches_after_apply():
    torch.manual_seed(0)
    small = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    extractor = create_feature_extractor(small, {"layer4": "out"}).eval()
    patched = se_surgery.apply(extractor, "all_stages", input_size=32)
    assert not patched.training and len(se_surgery.se_parameters(patched)) == 4 * 4
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(patched(x)["out"], extractor(x)["out"])
    for mode in (True, False, True):  # each switch sets the graph of that mode (a recompile)
        patched.train(mode)
        extractor.train(mode)
        assert torch.equal(patched(x)["out"], extractor(x)["out"])  # train mode: both update their statistics
    with pytest.raises(se_surgery.SESurgeryError, match=r"cannot be pickled with its SE; save the SE with se_surgery"):
        pickle.dumps(patched)  # its class is made at run time (GraphModule's per-instance class)
    back = se_surgery.strip(patched.eval())
    extractor.eval()
    assert not se_surgery.is_patched(back) and torch.equal(back(x)["out"], extractor(x)["out"])
    assert back.train().training and not back.eval().training
    assert torch.equal(back(x)["out"], extractor(x)["out"])


class _ModeNet(nn.Module):
    """A block at the root whose forward takes another path in train mode."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        x = x * 0.5 if self.training else x
        return x + torch.relu(self.bn(self.conv(x)))


def test_a_feature_extractor_with_other_graphs_in_train_mode_is_not_rewritten():
    extractor = create_feature_extractor(_ModeNet(), ["add"]).eval()
    assert se_surgery.find_sites(extractor, (3, 16, 16)) == []
    with pytest.raises(se_surgery.PlanError, match="nothing to add SE to"):
        se_surgery.apply(extractor, input_size=(3, 16, 16))


def test_fsdp2_goes_after_apply_and_a_sharded_model_is_refused_with_what_to_do(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        patched = se_surgery.apply(torchvision.models.resnet18().eval(), "late_stages", input_size=64)
        reference = copy.deepcopy(patched)
        for block in (*patched.layer3, *patched.layer4):
            fully_shard(block)
        fully_shard(patched)
        x = torch.randn(1, 3, 64, 64)
        assert torch.equal(patched(x), reference(x))  # SE first, sharding after: supported
        assert len(se_surgery.se_parameters(patched)) == 16  # names only: fine on a sharded model
        sharded = r"^FSDP\w+ is sharded with fully_shard \(FSDP2\); se-surgery works on the whole, unsharded model: "
        for call in (lambda: se_surgery.strip(patched), lambda: se_surgery.save_se(patched, tmp_path / "se.st"),
                     lambda: se_surgery.report(patched), lambda: se_surgery.apply(fully_shard(nn.Sequential(
                         nn.Conv2d(3, 3, 1))))):
            with pytest.raises(se_surgery.ModelTypeError, match=sharded):
                call()
    finally:
        dist.destroy_process_group()
