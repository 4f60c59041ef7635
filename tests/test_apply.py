"""apply(): SE insertion keeps the model's class, weights and (with identity init) outputs."""

import copy
import inspect
import io
import pickle
import warnings

import pytest
import torch
import torchvision

import se_surgery
from se_surgery import SqueezeExcite
from se_surgery._plan import se_modules

RESNET50_PARAMS = 25_557_032
RESNET50_SE = 2_530_992  # timm seresnet50 has 28,088,024 = 25,557,032 + 2,530,992


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return torchvision.models.resnet50().eval()


@pytest.fixture(scope="module")
def patched50(resnet50):
    return se_surgery.apply(resnet50, "all_stages")


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


def test_resnet50_all_stages_params_class_and_weights(resnet50, patched50):
    assert type(patched50) is torchvision.models.ResNet
    assert _nparams(resnet50) == RESNET50_PARAMS
    assert _nparams(patched50) - RESNET50_PARAMS == RESNET50_SE
    before, after = resnet50.state_dict(), patched50.state_dict()
    assert list(after)[: len(before)] != [] and set(before) <= set(after)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    added = sorted(set(after) - set(before))
    # Four tensors per SE and its gate scale, which travels with the weights.
    assert len(added) == 16 * 5 and all(".se." in k for k in added)
    assert "layer3.2.se.fc1.weight" in added and "layer3.2.se.gate_scale" in added
    # Blocks keep their class (a generated subclass of it); the original's are untouched.
    assert all(isinstance(patched50.get_submodule(f"layer{i}.0"), torchvision.models.resnet.Bottleneck)
               for i in range(1, 5))
    assert type(resnet50.layer1[0]) is torchvision.models.resnet.Bottleneck
    assert not any(isinstance(m, SqueezeExcite) for m in resnet50.modules())


def test_variant_placement(resnet50):
    # A rewritten block's forward is generated code with its source registered, as fx's.
    code = {v: inspect.getsource(type(se_surgery.apply(resnet50, f"se_{v}").layer2[0]).forward)
            for v in ("pre", "post", "identity")}
    assert "se = self.se(x)" in code["pre"] and "conv1 = self.conv1(se)" in code["pre"]
    assert "downsample = self.downsample(x)" in code["pre"]  # the skip path reads the unscaled input
    assert "relu_2 = self.relu(add)" in code["post"] and "se = self.se(relu_2)" in code["post"]
    assert "se = self.se(downsample)" in code["identity"] and "add = bn3 + se" in code["identity"]
    pre = se_surgery.apply(resnet50, "se_pre")
    assert pre.layer2[0].se.channels == 256 and pre.layer1[0].se.channels == 64  # the block input's channels


def test_training_reaches_se(patched50):
    model = copy.deepcopy(patched50).train()
    ses = [m for _, m in se_modules(model)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(se.fc2.weight.grad.abs().sum() > 0 for se in ses)
    assert all(se.fc1.weight.grad.abs().sum() == 0 for se in ses)  # zero last FC blocks it at first
    opt.step()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for se in ses:
        for name, p in se.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_stage_presets(resnet50):
    late = se_surgery.apply(resnet50, "late_stages")
    assert sorted(r.site.name for _, _, r in se_surgery.inserted_modules(late)) == sorted(
        [f"layer3.{i}" for i in range(6)] + [f"layer4.{i}" for i in range(3)])
    cheap = se_surgery.apply(resnet50, "no_last_stage")
    stages = {r.site.stage for _, _, r in se_surgery.inserted_modules(cheap)}
    assert stages == {1, 2, 3}
    assert _nparams(cheap) - RESNET50_PARAMS == 951_600


def test_original_checkpoint_loads_with_only_se_keys_missing(resnet50, patched50):
    buf = io.BytesIO()
    torch.save(resnet50.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model = copy.deepcopy(patched50)
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(se_surgery.se_parameters(model))


def test_state_dict_save_load_roundtrip(patched50):
    buf = io.BytesIO()
    torch.save(patched50.state_dict(), buf)
    buf.seek(0)
    fresh = se_surgery.apply(torchvision.models.resnet50(), "all_stages").eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), patched50(x))


def test_deepcopy_and_pickle(patched50):  # torch.jit and fx: test_deployment.py
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = patched50(x)
        for other in (copy.deepcopy(patched50), pickle.loads(pickle.dumps(patched50))):
            assert torch.equal(other(x), ref)
            assert list(other.state_dict()) == list(patched50.state_dict())
            assert other.layer1[0].stride == 1  # plain attributes of the block survive


def test_torch_compile():
    torch.manual_seed(0)
    base = torchvision.models.resnet18().eval()
    model = se_surgery.apply(base, "late_stages")
    compiled = torch.compile(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), base(x), rtol=1e-4, atol=1e-4)


def test_train_mode_forward_backward(resnet50):
    model = se_surgery.apply(resnet50.train(), "all_stages")
    resnet50.eval()
    assert model.training and model.layer1[0].training and model.layer1[0].se.training
    model(torch.randn(2, 3, 64, 64)).sum().backward()


def test_inplace_and_not(resnet50):
    base = copy.deepcopy(resnet50)
    out = se_surgery.apply(base, "late_stages", inplace=True)
    assert out is base and isinstance(base.layer4[0].se, SqueezeExcite)


def test_inception_v3_with_inception_preset():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        base = torchvision.models.inception_v3(weights=None, init_weights=False, aux_logits=False).eval()
    model = se_surgery.apply(base, "inception", input_size=299)
    ses = se_modules(model)
    assert [n for n, _ in ses] == [f"Mixed_{k}.se" for k in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e",
                                                               "7a", "7b", "7c")]
    x = torch.randn(1, 3, 299, 299)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    model.train()
    model(torch.randn(2, 3, 299, 299)).sum().backward()
    assert all(m.fc2.weight.grad is not None for _, m in ses)


@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny"])
def test_timm_model_keeps_its_api(name):
    import timm

    base = timm.create_model(name, pretrained=False).eval()
    model = se_surgery.apply(base, "all_stages")
    assert type(model) is type(base)
    assert model.pretrained_cfg == base.pretrained_cfg
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), base.forward_features(x))
        assert torch.equal(model(x), base(x))
    model.reset_classifier(10)
    assert model(x).shape == (1, 10)


def test_paper_init_and_options(resnet50):
    rules = {"defaults": {"init": "paper", "divisor": 8, "squeeze": "avgmax", "gate": "hard_sigmoid"},
             "rules": [{"select": {"stage": -1}, "ratio": 8, "bias": False}]}
    model = se_surgery.apply(resnet50, rules)
    se = model.layer4[0].se
    assert (se.hidden, se.fc1.bias, se.gate_fn, se.squeeze, se.init) == (256, None, "hard_sigmoid", "avgmax", "paper")
    assert _nparams(model) - RESNET50_PARAMS == 3 * 2 * 2048 * 256
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(model(x), resnet50(x))  # the paper's init changes the function


def test_se_module_dtype_device_follow_model():
    base = torchvision.models.resnet18().to(torch.bfloat16).eval()
    model = se_surgery.apply(base, "late_stages")
    assert {p.dtype for p in se_surgery.se_parameters(model).values()} == {torch.bfloat16}
    x = torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


class _ParamFree(torch.nn.Module):
    def forward(self, x):
        return x + torch.relu(x)


def test_se_in_a_parameter_free_block_takes_the_models_dtype():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _ParamFree(), torch.nn.Conv2d(8, 4, 1))
    model = model.to(torch.bfloat16).eval()
    out = se_surgery.apply(model, {"rules": [{"select": {}}]}, input_size=16)
    assert out[1].se.fc1.weight.dtype == torch.bfloat16
    x = torch.randn(1, 3, 16, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(out(x), model(x))
