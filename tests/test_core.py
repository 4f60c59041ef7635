"""Core v2: look without touching, cut exactly the plan, keep classes and hooks, precise site kinds."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import se_surgery
from se_surgery import PlanError, TraceError
from se_surgery._plan import se_modules
from se_surgery._sites import discover


class Counting(nn.Module):
    """A block whose forward changes its own state, as real code does (counters, caches)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.register_buffer("seen", torch.zeros(()))
        self.calls = 0
        self.cache: dict = {}

    def forward(self, x):
        self.seen += 1
        self.calls = self.calls + 1
        self.cache["last"] = x
        return x + F.relu(self.conv(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Counting()
        self.tail = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.block(self.stem(x))
        return x + F.relu(self.tail(x))  # a join in the root's own forward


class CachingBlock(nn.Module):
    """Caches a tensor in eval mode and reads it back later, as timm's attention_bias_cache does."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(c, 1, 1))
        self.cache = {}

    def forward(self, x):
        if not self.training:
            if "s" not in self.cache:
                self.cache["s"] = self.scale * 2
            s = self.cache["s"]
        else:
            s = self.scale * 2
        return x + F.relu(self.conv(x)) * s


def test_looking_runs_no_user_code_and_changes_nothing():
    model = Net().train()
    model.block.eval()
    fired = []
    model.block.register_forward_hook(lambda m, a, o: fired.append("fwd"))
    model.block.register_forward_pre_hook(lambda m, a: fired.append("pre"))
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: fired.append("global"))
    hooks = [(n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()]
    try:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        flags = {n: m.training for n, m in model.named_modules()}
        se_surgery.find_sites(model, 16)
        p = se_surgery.plan(model, {"rules": [{"select": {}}]}, input_size=16)
        se_surgery.report(model, p.rules, input_size=16)
        se_surgery.apply(model, p)  # a copy: the given model stays as it was
    finally:
        handle.remove()
    assert fired == []
    assert model.block.seen.item() == 0 and model.block.calls == 0 and model.block.cache == {}
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model) is Net and type(model.block) is Counting and not se_surgery.is_patched(model)
    assert [(n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()] == hooks

    # A cache that later forwards read back: tracing and fake runs fill it, and must undo that in
    # the model and in the patched copy, or the copy would compute with a fake tensor.
    torch.manual_seed(0)
    cached = nn.Sequential(nn.Conv2d(3, 8, 1), CachingBlock(8)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_surgery.SESurgeryWarning)  # the layer-scale advice
        assert len(se_surgery.find_sites(cached, 16)) == 1
        patched = se_surgery.apply(cached, input_size=16)
        se_surgery.report(cached, input_size=16)
    assert cached[1].cache == {} and patched[1].cache == {}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(patched(x), cached(x))


def test_blocks_keep_class_methods_and_hooks():
    from torchvision.models.quantization import resnet18 as qresnet18
    from torchvision.models.quantization.resnet import QuantizableBasicBlock

    model = qresnet18(weights=None, quantize=False).eval()
    fired = []
    block = model.layer4[0]
    block.register_forward_pre_hook(lambda m, a: fired.append("pre"))
    block.register_forward_hook(lambda m, a, o: fired.append("fwd"))
    block.register_full_backward_hook(lambda m, gi, go: fired.append("bwd"))
    patched = se_surgery.apply(model, "all_stages", input_size=32, inplace=True)
    assert patched is model and isinstance(model.layer4[0], QuantizableBasicBlock)
    model(torch.randn(1, 3, 32, 32, requires_grad=True)).sum().backward()
    assert fired == ["pre", "fwd", "bwd"]
    x = torch.randn(2, 3, 32, 32)
    expect = model(x)
    # The block's own methods stay. (QuantizableResNet.fuse_model itself looks blocks up
    # with ``type(m) is QuantizableBasicBlock``, which no subclass passes: call them.)
    for m in model.modules():
        if isinstance(m, QuantizableBasicBlock):
            m.fuse_model()
    assert type(model.layer4[0].conv1).__name__ == "ConvReLU2d"
    assert torch.allclose(model(x), expect, atol=1e-4)


def test_strip_gives_back_exact_classes_for_shared_blocks_and_graph_modules():
    shared = Counting()
    model = nn.Sequential(nn.Conv2d(3, 8, 1), shared, shared)
    patched = se_surgery.apply(model, {"rules": [{"select": {}}]}, input_size=8)
    assert type(patched[1]) is not Counting and patched[1] is patched[2]
    back = se_surgery.strip(patched)
    assert not se_surgery.is_patched(back) and type(back[1]) is Counting and back[1] is back[2]

    gm = torch.fx.symbolic_trace(torchvision.models.resnet18().eval())
    cls = type(gm)
    x = torch.randn(1, 3, 32, 32)
    out = gm(x)
    back = se_surgery.strip(se_surgery.apply(gm, "all_stages", input_size=32, inplace=True), inplace=True)
    assert back is gm and type(back) is cls and torch.equal(back(x), out)


def test_apply_cuts_exactly_the_plan_and_refuses_another_models():
    model = torchvision.models.resnet18().eval()
    p = se_surgery.plan(model, "late_stages", input_size=32)
    patched = se_surgery.apply(model, p)
    assert sorted(n for n, _ in se_modules(patched)) == sorted(f"{e.site.owner}.se" for e in p.selected)
    with pytest.raises(PlanError, match=r"this plan was made for another model \(a ResNet, structure \w+\), not "
                                         r"this ResNet \(structure \w+\)"):
        se_surgery.apply(torchvision.models.resnet34(), p)


def test_swap_is_atomic_under_ctrl_c(monkeypatch):
    model = torchvision.models.resnet18().eval()
    hook = model.layer2[0].register_forward_hook(lambda *a: None)
    calls = []
    real = nn.Module.add_module

    def interrupted(self, name, module):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, name, module)

    monkeypatch.setattr(nn.Module, "add_module", interrupted)
    with pytest.raises(KeyboardInterrupt):
        se_surgery.apply(model, "all_stages", input_size=32, inplace=True)
    monkeypatch.undo()
    assert not se_surgery.is_patched(model) and not any(hasattr(b, "se") for b in model.modules())
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock and hook.id in model.layer2[0]._forward_hooks
    assert se_surgery.is_patched(se_surgery.apply(model, "all_stages", input_size=32, inplace=True))


def test_joins_in_the_root_and_in_a_child_are_both_patched():
    model = Net().eval()
    for inplace in (False, True):
        out = se_surgery.apply(model if inplace else Net().eval(), {"rules": [{"select": {}}]}, input_size=16,
                               inplace=inplace)
        assert isinstance(out, Net) and sorted(n for n, _ in se_modules(out)) == ["block.se", "se"]
        assert out is model if inplace else out is not model


class _Kinds(nn.Module):
    """One join of each kind a model can spell."""

    def __init__(self):
        super().__init__()
        c = 8
        self.a, self.b, self.c = (nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)) for _ in range(3))
        self.down = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        r = self.down(x) + F.relu(self.a(x))  # residual: projection skip + branch with a nonlinearity
        s = self.a(r) + self.b(r) + r  # re-parameterisation sum: linear branches (branch_sum, one site)
        p1, p2 = torch.split(s, 4, dim=1)
        q = p2 + F.relu(p1)  # Res2Net split-sum: parts of one tensor (no site)
        n = torch.linalg.vector_norm(s, dim=(2, 3), keepdim=True)
        g = s + self.gamma * (s * (n / (n.mean(dim=1, keepdim=True) + 1e-6)))  # GRN's "+ x" (no site)
        return torch.cat([q, q], 1) + g


def test_site_kinds_are_told_apart():
    d = discover(_Kinds().eval(), (8, 8, 8))
    assert [(s.name, s.kind) for s in d.sites] == [("add", "residual"), ("add_2", "branch_sum"), ("cat", "concat")]
    why = dict(d.rejected)
    assert why["<model>:add_1"] == "inner part of a sum of branches"
    assert why["<model>:add_3"].startswith("split-sum")
    assert why["<model>:add_5"].startswith("the branch holds no nonlinearity")
    assert why["<model>:add_6"].startswith("neither operand is a skip of the other")


@pytest.mark.parametrize("name, residual, other", [
    ("repvgg_a0", 0, 22),  # re-parameterisation sums of linear branches: one per block (stem + 2, 4, 14, 1)
    ("mobileone_s0", 0, 43),  # one sum per MobileOneBlock: the stem and a depthwise + pointwise pair per block
    ("res2net50_26w_4s", 16, 16),  # the split-sums are no sites; the split concats are
    ("hrnet_w18_small", 23, 12),  # multi-resolution fusion and the head's merges are branch sums
    ("convnextv2_atto", 12, 0),  # GRN's "+ x" is inside a normalisation layer
])
def test_long_tail_joins(name, residual, other):
    import timm

    sites = se_surgery.find_sites(timm.create_model(name), 64)
    assert sum(s.kind == "residual" for s in sites) == residual
    assert sum(s.kind != "residual" for s in sites) == other


def test_has_attention_is_decided_on_the_whole_block():
    import timm

    sites = se_surgery.find_sites(timm.create_model("ghostnet_100"), 64)
    # GhostNet's concats sit in GhostModules; the SE sits in the bottleneck that holds them.
    blocks_with_se = {s.owner for s in sites if s.kind == "residual" and s.has_attention}
    inner = [s for s in sites if s.kind == "concat" and s.owner.rsplit(".", 1)[0] in blocks_with_se]
    assert inner and all(s.has_attention for s in inner)


def test_stages_do_not_depend_on_the_input_size():
    model = torchvision.models.resnet18()
    for size in (16, 64, 224):
        sites = se_surgery.find_sites(model, size)
        assert [(s.stage, s.block, s.stride) for s in sites] == [
            (1, 1, 4), (1, 2, 4), (2, 1, 8), (2, 2, 8), (3, 1, 16), (3, 2, 16), (4, 1, 32), (4, 2, 32)], size
    assert len(se_surgery.plan(model, "late_stages", input_size=16).selected) == 4


def test_gate_scale_travels_with_the_weights_and_a_mismatch_is_loud():
    import timm

    ref = timm.create_model("seresnet18").eval()
    weights = ref.state_dict()
    default = se_surgery.apply(torchvision.models.resnet18(), "all_stages", input_size=32)
    with pytest.raises(RuntimeError, match="come without a gate scale.*'init: paper' \\(the timm_compatible preset\\)"):
        default.load_state_dict(weights)
    compatible = se_surgery.apply(torchvision.models.resnet18(), "timm_compatible", input_size=32).eval()
    compatible.load_state_dict(weights)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(compatible(x), ref(x), atol=1e-5)


def gated(x):
    return x if x.shape[1] > 4 else -x  # control flow on a shape: fx cannot trace through it


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return gated(x) + F.relu(self.conv(x))


def test_tracer_kwargs_reach_the_tracer():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), Gated())
    with pytest.warns(se_surgery.SESurgeryWarning, match="could not be traced"):
        assert se_surgery.plan(model, input_size=8).selected == []
    sites = se_surgery.find_sites(model, 8, tracer_kwargs={"autowrap_functions": [gated]})
    assert [s.name for s in sites] == ["1"]
    assert se_surgery.find_sites(model, 8, tracer_kwargs={"leaf_modules": [Gated]}) == []


def test_inner_goes_after_the_depthwise_conv_at_the_expanded_width():
    model = torchvision.models.mobilenet_v2().eval()
    rules = {"defaults": {"variant": "inner"}, "rules": [{"select": {"kind": "residual"}}]}
    p = se_surgery.plan(model, rules, input_size=64)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for e in p.selected:
        dw = convs[f"{e.site.owner}.conv.1.0"]
        assert dw.groups == dw.out_channels == e.se_channels  # the expanded width
    patched = se_surgery.apply(model, p)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(patched(x), model(x)) and len(se_modules(patched)) == 10
    sites = se_surgery.find_sites(torchvision.models.resnet50(), 64)
    assert sites[0].inner == ("relu_1",) and sites[0].inner_channels == 64  # after the bottleneck's 3x3 conv


@pytest.mark.parametrize("model, size, message", [
    (lambda: torch.jit.script(torchvision.models.resnet18()), 32, "TorchScript module"),
    (lambda: _TwoInputs(), 32, "missing a required argument: 'y'"),
    (lambda: torchvision.models.resnet18(), (1, 32, 32), "expected input.*to have 3 channels"),
])
def test_find_sites_says_why_it_found_nothing(model, size, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TraceError, match=message):
            se_surgery.find_sites(model(), size)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, y):
        return x + F.relu(self.conv(y))


def test_restructuring_a_rewritten_block_is_refused_not_broken():
    import timm

    model = timm.create_model("repvgg_a0").eval()
    patched = se_surgery.apply(model, {"rules": [{"select": {"kind": "branch_sum", "stage": -1}}]}, input_size=64)
    block = patched.stages[-1][0]
    with pytest.raises(se_surgery.SESurgeryError, match=r"RepVggBlock\.reparameterize\(\) would rebuild a block .* "
                                                        r"call se_surgery\.strip\(model\), then reparameterize\(\)"):
        block.reparameterize()
    assert hasattr(block, "conv_kxk") and se_surgery.is_patched(patched)
