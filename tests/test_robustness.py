"""Robustness: models fx cannot trace whole, channel attention already there, and
patched models at other input sizes, batch sizes, modes, dtypes and devices."""

import contextlib
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import se_surgery
from se_surgery import SqueezeExcite, hf
from se_surgery._plan import se_modules
from se_surgery._sites import discover

CONTROL_FLOW = "TraceError: symbolically traced variables cannot be used as inputs to control flow"


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, id(m), m.training) for n, m in model.named_modules()])


def _same(model, snap):
    state, mods = snap
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [(n, id(m), m.training) for n, m in model.named_modules()] == mods


# --------------------------------------------------------------------------- 2. untraceable models


class Block(nn.Module):
    """A plain residual block: fx traces it."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class Gated(nn.Module):
    """A residual block fx cannot trace: which join it makes depends on the data."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            return x + y
        return x - y


class Wild(nn.Module):
    """Top-level forward with data-dependent control flow; the blocks trace."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layer1 = nn.Sequential(Block(16), Block(16))
        self.gated = Gated(16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.layer2 = nn.Sequential(Block(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        if x.std() > 10:  # data-dependent: fx cannot trace the model whole
            x = x / x.std()
        x = self.layer1(x)
        x = self.gated(x)
        x = self.layer2(self.down(x))
        return self.head(x.mean((2, 3)))


@pytest.fixture
def wild():
    torch.manual_seed(0)
    return Wild().eval()


def test_untraceable_model_sites_in_traceable_blocks(wild):
    d = discover(wild, 32)
    assert [(s.name, s.stage, s.block, s.channels, s.spatial) for s in d.sites] == [
        ("layer1.0", 1, 1, 16, (32, 32)), ("layer1.1", 1, 2, 16, (32, 32)), ("layer2.0", 2, 1, 32, (16, 16))]
    assert d.untraced == (("<model>", CONTROL_FLOW), ("gated", CONTROL_FLOW))


def test_untraceable_model_gets_se_in_its_blocks(wild):
    snap = _snapshot(wild)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patched = se_surgery.apply(wild, input_size=32)
    assert any("gated" in str(w.message) and "could not be traced" in str(w.message) for w in caught)
    _same(wild, snap)
    assert type(patched) is Wild
    assert sorted(n for n, _ in se_modules(patched)) == ["layer1.0.se", "layer1.1.se", "layer2.0.se"]
    assert type(patched.gated) is Gated
    for size in (32, 24):  # also off the discovery size
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert torch.equal(patched(x), wild(x))
    patched.train()
    patched(torch.randn(2, 3, 32, 32)).sum().backward()
    assert patched.layer1[0].se.fc2.weight.grad.abs().sum() > 0


def test_untraceable_block_listed_as_skipped(wild):
    with _quiet():
        p = se_surgery.plan(wild, input_size=32)
    assert p.untraced == [("<model>", CONTROL_FLOW), ("gated", CONTROL_FLOW)]
    assert f"not traced: gated: {CONTROL_FLOW}" in str(p).splitlines()
    assert p.to_dict()["untraced"][1] == {"module": "gated", "reason": CONTROL_FLOW}


@pytest.mark.parametrize("fn", ["plan", "apply"])
def test_untraceable_block_is_an_error_when_strict(wild, fn):
    snap = _snapshot(wild)
    with pytest.raises(se_surgery.PlanError,
                       match=r"^strict: 2 module\(s\) could not be traced, their joins were not searched: "
                             r"<model> \(TraceError: .*\); gated \(TraceError: .*\)$"):
        getattr(se_surgery, fn)(wild, input_size=32, strict=True)
    _same(wild, snap)


class TrainOnlyPath(nn.Module):
    """Traces, but its own forward differs in train and eval mode: one graph cannot hold both."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        if self.training:
            y = y * 0.5
        return x + y


def test_block_that_cannot_be_rewritten_is_skipped_or_strict_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), Block(8), TrainOnlyPath(8)).eval()
    snap = _snapshot(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patched = se_surgery.apply(model, input_size=16)
    msgs = [str(w.message) for w in caught]
    assert any("2 (its forward takes different paths in train and eval mode" in m for m in msgs), msgs
    assert [n for n, _ in se_modules(patched)] == ["1.se"]
    with pytest.raises(se_surgery.PlanError, match=r"strict: 1 module\(s\) could not be traced, their joins were not "
                                                   r"searched: 2 \(its forward takes different paths in train and "
                                                   r"eval mode"):
        se_surgery.apply(model, input_size=16, strict=True)
    _same(model, snap)


# --------------------------------------------------------------------------- blocks rewritten as the model calls them


class OptionalShortcut(nn.Module):
    """timm DLA's bottleneck: the shortcut is an argument, ``None`` meaning the input."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        return F.relu(self.conv(x)) + shortcut


class ListBlock(nn.Module):
    """HRNet's multi-branch module: a list of maps in, assigned by index."""

    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, xs):
        xs[0] = F.relu(self.a(xs[0])) + xs[0]
        xs[1] = F.relu(self.b(xs[1])) + xs[1]
        return xs


class TokenConv(nn.Module):
    """CoaT / Twins positional conv: tokens and their (H, W) in, shape arithmetic inside."""

    def __init__(self, c):
        super().__init__()
        self.proj = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x, size):
        B, N, C = x.shape
        H, W = size
        torch._assert(N == 0 + H * W, "tokens do not fit the size")  # 0 + H * W: an add of ints, no join
        feat = x.transpose(1, 2).reshape(B, C, *size)
        return (F.relu(self.proj(feat)) + feat).flatten(2).transpose(1, 2)


class Called(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.tree1, self.tree2 = OptionalShortcut(8), OptionalShortcut(8)
        self.multi = ListBlock(8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.pos = TokenConv(8)  # shared: called twice, as CoaT's serial blocks share their cpe

    def forward(self, x):
        x = self.stem(x)
        x = self.tree2(self.tree1(x, self.proj(x)))
        a, b = self.multi([x, self.down(x)])
        B, C, H, W = a.shape
        t = self.pos(self.pos(a.flatten(2).transpose(1, 2), (H, W)), (H, W))
        return t.mean(1) + b.mean((2, 3))


def test_blocks_are_rewritten_as_the_model_calls_them():
    torch.manual_seed(0)
    model = Called().eval()
    sites = se_surgery.find_sites(model, 16)
    # One graph per module: pos, called twice, performs one join of its own code.
    assert [s.name for s in sites] == ["tree1", "tree2", "multi", "multi:2", "pos"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patched = se_surgery.apply(model, input_size=16)
    assert [str(w.message) for w in caught] == []
    assert sorted(n for n, _ in se_modules(patched)) == ["multi.se", "multi.se_2", "pos.se", "tree1.se", "tree2.se"]
    for size in (16, 12):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert torch.equal(patched(x), model(x)), size
    # tree2 is called without a shortcut: its SE closes the join with its input, which
    # is what discovery saw. Scaling the gate shows the skip is really there.
    with torch.no_grad():
        patched.tree2.se.fc2.bias.fill_(-30.0)  # gate ~ 0: output ~ the skip alone
        x = torch.randn(1, 3, 16, 16)
        inner = patched.tree1(patched.stem(x), patched.proj(patched.stem(x)))
        assert torch.allclose(patched.tree2(inner), inner, atol=1e-6)


class Holder(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


def test_block_shared_by_two_parents_gets_se_everywhere_it_is_used():
    torch.manual_seed(0)
    shared = Block(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), Holder(shared), Holder(shared)).eval()
    # One module, one graph, one join: a site, whichever parent calls it.
    assert [s.name for s in se_surgery.find_sites(model, 16)] == ["1.block"]
    patched = se_surgery.apply(model, input_size=16)
    assert patched[1].block is patched[2].block and isinstance(patched[2].block.se, SqueezeExcite)
    assert model[1].block is shared and model[2].block is shared  # the original is untouched
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))
    patched.train()
    patched(x).sum().backward()
    assert patched[1].block.se.fc2.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- 3. attention already there


class InlineGateBlock(nn.Module):
    """The generic pattern, spelled inline: pool -> fc -> relu -> fc -> sigmoid -> mul."""

    def __init__(self, c, method=False):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.fc1 = nn.Conv2d(c, c // 4, 1)
        self.fc2 = nn.Conv2d(c // 4, c, 1)
        self.method = method

    def forward(self, x):
        y = self.conv(x)
        if self.method:
            s = y.mean((2, 3), keepdim=True)
            g = self.fc2(F.relu(self.fc1(s))).sigmoid()
        else:
            g = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return x + y * g


class SwishBlock(nn.Module):
    """x * sigmoid(x) (swish) and a spatial gate sigmoid(conv(x)): neither is channel attention."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.spatial = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        y = self.conv(x)
        y = y * torch.sigmoid(y)
        y = y * torch.sigmoid(self.spatial(y))
        return x + y


class HardGateBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(c, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        y = self.conv(x)
        return x + y * self.gate(self.fc(self.pool(y)))


def _attention(model, size=64):
    return [(s.name, s.has_attention) for s in se_surgery.find_sites(model, size)]


def test_has_attention_generic_pattern():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), Block(16), InlineGateBlock(16), InlineGateBlock(16, method=True),
                          SwishBlock(16), HardGateBlock(16)).eval()
    assert _attention(model, 16) == [("1", False), ("2", True), ("3", True), ("4", False), ("5", True)]


@pytest.mark.parametrize("name, expected", [
    # torchvision SqueezeExcitation: every MBConv block of efficientnet (16: residual and block
    # sites), every regnet_y block; mobilenet_v3_large has SE in the 9 blocks its config marks.
    ("efficientnet_b0", [True] * 16),
    ("regnet_y_400mf", [True] * 16),
    ("mobilenet_v3_large", [False] * 3 + [True] * 3 + [False] * 4 + [True] * 5),
    ("regnet_x_400mf", [False] * 22),
    ("resnet18", [False] * 8),
])
def test_has_attention_torchvision(name, expected):
    model = torchvision.models.get_model(name)
    assert [a for _, a in _attention(model)] == expected


@pytest.mark.parametrize("name, expected", [
    ("seresnet18", True),  # timm SEModule
    ("ecaresnet26t", True),  # timm EcaModule
    ("resnet18", False),
])
def test_has_attention_timm(name, expected):
    import timm

    flags = [a for _, a in _attention(timm.create_model(name))]
    assert len(flags) == 8 and set(flags) == {expected}


@pytest.fixture(scope="module")
def mnv3():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_large().eval()


@pytest.mark.parametrize("flag", [True, False])
def test_select_has_attention_filters(mnv3, flag):
    sites = se_surgery.find_sites(mnv3, 64)
    with _quiet():
        p = se_surgery.plan(mnv3, {"rules": [{"select": {"has_attention": flag}}]}, input_size=64)
    # a selector without a kind selects joins: the block sites need kind: block
    assert [e.site.name for e in p.selected] == [s.name for s in sites if s.has_attention == flag and s.kind != "block"]
    assert 0 < len(p.selected) < len(sites)


@pytest.mark.parametrize("preset", ["all_stages", "late_stages", "no_last_stage", "se_pre", "se_post", "se_identity",
                                    "timm_compatible", "inception"])
def test_presets_never_double_se(mnv3, preset):
    with _quiet():
        p = se_surgery.plan(mnv3, preset, input_size=64)
        patched = se_surgery.apply(mnv3, preset, input_size=64)
    assert not any(e.site.has_attention for e in p.selected)
    owners = {e.site.owner for e in p.selected}
    for name, _, rec in se_surgery.inserted_modules(patched):
        owner = name.rpartition(".")[0]
        assert owner in owners and not rec.site.has_attention
        assert not any(type(m).__name__ == "SqueezeExcitation" for m in patched.get_submodule(owner).modules())


def test_all_stages_on_a_model_that_has_se_everywhere_adds_nothing():
    model = torchvision.models.efficientnet_b0().eval()
    with pytest.warns(se_surgery.SESurgeryWarning, match=r"rule 0 selects no site of EfficientNet \(16 sites"):
        patched = se_surgery.apply(model, "all_stages", input_size=64)
    assert se_modules(patched) == []


# --------------------------------------------------------------------------- 4. sizes, dtypes, devices


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def _out(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("preset", ["all_stages", "se_pre", "se_post", "se_identity"])
def test_other_sizes_and_batch_one(resnet18, preset):
    patched = se_surgery.apply(resnet18, preset, input_size=64).eval()
    variant = {"all_stages": "standard", "se_pre": "pre", "se_post": "post", "se_identity": "identity"}[preset]
    assert {r.options.variant for _, _, r in se_surgery.inserted_modules(patched)} == {variant}
    for shape in [(1, 3, 64, 64), (1, 3, 97, 131), (3, 3, 32, 48), (2, 3, 224, 224)]:
        x = torch.randn(shape)
        assert torch.equal(_out(patched, x), _out(resnet18, x)), shape


def test_train_mode_forward_backward_other_size(resnet18):
    patched = se_surgery.apply(resnet18, input_size=64)
    patched.train()
    assert all(se.training for _, se in se_modules(patched))
    out = patched(torch.randn(2, 3, 80, 72))
    out.square().mean().backward()
    for name, se in se_modules(patched):
        assert se.fc2.weight.grad is not None and se.fc2.weight.grad.abs().sum() > 0, name
        assert se.fc1.weight.grad is not None, name  # zero until fc2 moves: the identity init
    assert all(p.grad is not None for p in patched.parameters())


def test_default_input_size_from_timm_cfg_runs_at_other_sizes():
    import timm

    torch.manual_seed(0)
    base = timm.create_model("resnet10t").eval()
    patched = se_surgery.apply(base)  # discovery at the pretrained_cfg size (3, 176, 176)
    assert se_surgery.inserted_modules(patched)[0][2].site.spatial == (44, 44)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_out(patched, x), _out(base, x))
    assert patched.pretrained_cfg == base.pretrained_cfg and hasattr(patched, "forward_features")


def test_channels_last_sites_at_other_sizes():
    torch.manual_seed(0)
    base = torchvision.models.swin_t().eval()
    patched = se_surgery.apply(base, input_size=64)
    ses = se_modules(patched)
    assert len(ses) == 24 and {se.channel_dim for _, se in ses} == {-1}  # 12 blocks, two joins each
    for shape in [(1, 3, 64, 64), (1, 3, 96, 128)]:
        x = torch.randn(shape)
        assert torch.equal(_out(patched, x), _out(base, x)), shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_gets_half_se(resnet18, dtype):
    base = torchvision.models.resnet18().eval()
    base.load_state_dict(resnet18.state_dict())
    base = base.to(dtype)
    patched = se_surgery.apply(base, input_size=64)
    assert {p.dtype for p in patched.parameters()} == {dtype}
    x = torch.randn(1, 3, 48, 48, dtype=dtype)
    assert torch.equal(_out(patched, x), _out(base, x))
    patched.train()
    patched(torch.randn(2, 3, 64, 64, dtype=dtype)).float().sum().backward()
    assert patched.layer4[1].se.fc2.weight.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_to_dtype_after_apply(resnet18, dtype):
    patched = se_surgery.apply(resnet18, "se_post", input_size=64).to(dtype)
    base = torchvision.models.resnet18().eval()
    base.load_state_dict(resnet18.state_dict())
    base = base.to(dtype)
    x = torch.randn(1, 3, 40, 40, dtype=dtype)
    assert torch.equal(_out(patched, x), _out(base, x))
    assert {p.dtype for p in patched.parameters()} == {dtype}


def test_channels_last_memory_format(resnet18):
    patched = se_surgery.apply(resnet18, input_size=64).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    assert torch.equal(_out(patched, x), _out(resnet18, x))


def test_meta_device_model_gets_meta_se():
    base = torchvision.models.resnet18().to("meta").eval()
    patched = se_surgery.apply(base, input_size=64)
    assert {p.device.type for p in patched.parameters()} == {"meta"}
    assert _out(patched, torch.empty(1, 3, 50, 50, device="meta")).shape == (1, 1000)


def test_to_meta_after_apply(resnet18):
    patched = se_surgery.apply(resnet18, input_size=64).to("meta")
    assert {p.device.type for p in patched.parameters()} == {"meta"}
    assert _out(patched, torch.empty(2, 3, 64, 64, device="meta")).shape == (2, 1000)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_model_gets_cuda_se(resnet18, dtype):
    base = torchvision.models.resnet18().eval()
    base.load_state_dict(resnet18.state_dict())
    base = base.to("cuda", dtype)
    patched = se_surgery.apply(base, input_size=64)
    assert {(p.device.type, p.dtype) for p in patched.parameters()} == {("cuda", dtype)}
    x = torch.randn(1, 3, 80, 80, device="cuda", dtype=dtype)
    assert torch.equal(_out(patched, x), _out(base, x))
    patched.train()
    patched(torch.randn(2, 3, 64, 64, device="cuda", dtype=dtype)).float().sum().backward()
    assert patched.layer1[0].se.fc2.weight.grad.device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_after_apply(resnet18):
    patched = se_surgery.apply(resnet18, "se_pre", input_size=64).to("cuda")
    base = torchvision.models.resnet18().eval()
    base.load_state_dict(resnet18.state_dict())
    base = base.cuda()
    x = torch.randn(2, 3, 96, 64, device="cuda")
    assert torch.equal(_out(patched, x), _out(base, x))
    assert isinstance(patched.layer1[0].se, SqueezeExcite) and patched.layer1[0].se.fc1.weight.is_cuda


# ------------------------------------------------------------- issue 21: models off the happy road


class _Locked(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet18()
        self.lock = threading.Lock()

    def forward(self, x):
        return self.net(x)


def test_a_model_that_cannot_be_copied_says_use_inplace():
    model = _Locked()
    with pytest.raises(se_surgery.ModelTypeError, match=r"^apply\(\) works on a copy of the model \(inplace=False\), "
                                                        r"and _Locked cannot be deep-copied: TypeError: cannot pickle "
                                                        r"'_thread.lock' object .*pass inplace=True"):
        se_surgery.apply(model, "late_stages", input_size=32)
    assert not se_surgery.is_patched(model)
    assert se_surgery.is_patched(se_surgery.apply(model, "late_stages", input_size=32, inplace=True))


def test_report_of_a_compiled_patched_model_describes_the_model_it_runs():
    patched = se_surgery.apply(torchvision.models.resnet18(), "late_stages", input_size=64)
    r = se_surgery.report(torch.compile(patched))
    assert r.input_size == (3, 64, 64)  # the size it was patched at
    assert (r.added_params, len(r.sites)) == (se_surgery.report(patched).added_params, 4)


class _DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet18()

    def forward(self, batch: dict):
        return self.net(batch["image"])


def test_a_forward_that_takes_a_dict_is_told_how_to_wrap_it():
    with pytest.raises(se_surgery.TraceError, match=r"^cannot find the joins of _DictInput: its forward failed on a "
                                                    r"fake input of size 3x32x32: IndexError: .* Discovery calls "
                                                    r"forward\(x\) with one image tensor of shape \(1, 3, 32, 32\); .*"
                                                    r"wrap the model in a module whose forward\(x\) calls it"):
        se_surgery.find_sites(_DictInput(), 32)


def _hf_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic")
    return ResNetForImageClassification(cfg).eval()


def test_hugging_face_untraced_parts_are_explained_once():
    import warnings

    model = _hf_resnet()
    for call in (se_surgery.plan, se_surgery.report, se_surgery.apply):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(model, "all_stages", input_size=64)
        said = [(str(w.message), w.filename) for w in caught if "could not be traced" in str(w.message)]
        assert len(said) == 1 and said[0][1] == __file__, said  # once a call, at the caller's line
    assert said[0][0].startswith("4 module(s) of ResNetForImageClassification could not be traced as a whole, so joins "
                              "inside them were searched only in the submodules that did trace (4 site(s) found)")


def test_hugging_face_directory_without_the_se_plan_is_refused(tmp_path):
    from transformers import ResNetForImageClassification

    _hf_resnet().save_pretrained(tmp_path)
    with pytest.raises(se_surgery.MissingFileError, match=r"has no se.safetensors: it was not written by "
                                                          r"se_surgery.hf.save_pretrained"):
        hf.from_pretrained(ResNetForImageClassification, tmp_path)
