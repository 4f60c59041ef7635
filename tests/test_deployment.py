"""Deployment: a patched model exports and runs outside eager PyTorch, as the README promises.

Every test compares outputs with the patched model in eager mode (behaviour, not how SE is
implemented inside). SE uses ``init: paper`` so that its gates are not the identity: a
model that lost its SE modules on the way would give different numbers and fail.
"""

import copy
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torchvision

import se_surgery

VARIANTS = ("standard", "pre", "post", "identity")
SIZE = 64  # resnet18 at 64 px: every stage has a spatial map, and export stays fast


def patched(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    base = torchvision.models.resnet18().eval()
    rules = {"defaults": {"variant": variant, "init": "paper"}, "rules": [{"select": {"kind": "residual"}}]}
    return se_surgery.apply(base, rules, input_size=SIZE).eval()


@pytest.fixture(scope="module")
def example():
    torch.manual_seed(1)
    return torch.randn(2, 3, SIZE, SIZE)


def _eager(model, x):
    with torch.no_grad():
        return model(x)


def test_se_changes_the_output(example):
    # Otherwise the parity tests below could not tell a model without SE from one with it.
    torch.manual_seed(0)
    base = torchvision.models.resnet18().eval()
    assert not torch.allclose(_eager(patched("standard"), example), _eager(base, example), atol=1e-3)


def _onnx_max_diff(model, x, path, dynamo: bool) -> float:
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter notices (opset, deprecations) are not ours
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(out - _eager(model, x).numpy()).max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_legacy_export_matches_onnxruntime(tmp_path, example, variant):
    assert _onnx_max_diff(patched(variant), example, tmp_path / "m.onnx", dynamo=False) < 2e-6


@pytest.mark.slow  # 4 to 12 s per variant on one loaded CPU thread
@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_dynamo_export_matches_onnxruntime(tmp_path, example, variant):
    assert _onnx_max_diff(patched(variant), example, tmp_path / "m.onnx", dynamo=True) < 2e-6


@pytest.mark.slow  # about 5 s per variant
@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_export_pt2_round_trip(tmp_path, example, variant):
    model = patched(variant)
    program = torch.export.export(model, (example,))
    path = tmp_path / "m.pt2"
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path))
    # The .pt2 program runs the same kernels as eager, so the outputs are equal, not close.
    assert torch.equal(_eager(loaded.module(), example), _eager(model, example))


def test_jit_script_trace_and_symbolic_trace(example):
    model = patched("standard")
    expected = _eager(model, example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        scripted, traced = torch.jit.script(model), torch.jit.trace(model, example)
    assert torch.equal(_eager(scripted, example), expected)
    assert torch.equal(_eager(traced, example), expected)
    assert torch.equal(_eager(torch.fx.symbolic_trace(model), example), expected)


def test_fx_post_training_quantization_runs(example):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model = patched("standard")
    expected = _eager(model, example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (example,))
        prepared(example)  # calibration
        quantized = convert_fx(prepared)
    out = _eager(quantized, example)
    assert any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in quantized.modules())
    # int8 keeps the function: within a tenth of the output's range on random weights.
    assert float((out - expected).abs().max()) < 0.1 * float(expected.abs().max())


def test_whole_model_pickle_needs_se_surgery_where_it_is_loaded(tmp_path, example):
    model = patched("standard")
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)  # se_surgery is importable here
    assert torch.equal(_eager(loaded.eval(), example), _eager(model, example))
    code = textwrap.dedent(f"""
        import sys
        sys.modules["se_surgery"] = None  # as on a machine without it
        import torch
        try:
            torch.load({str(path)!r}, weights_only=False)
        except ModuleNotFoundError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "se_surgery" in out.stdout
