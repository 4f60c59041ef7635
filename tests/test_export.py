"""The form SE takes outside eager PyTorch: ONNX graphs, portable .pt2 files, FLOP counters.

A patched torchvision resnet18 at 64 px (8 SE modules, gates off the identity so that a
lost SE would show in the numbers).
"""

import io
import logging
import re
import subprocess
import sys
import textwrap
import warnings
from collections import Counter

import pytest
import torch
import torchvision

import se_surgery
from se_surgery.studies.bench import move_gates_off_identity

SIZE = 64


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    base = torchvision.models.resnet18().eval()
    patched = move_gates_off_identity(se_surgery.apply(base, "all_stages", input_size=SIZE)).eval()
    return base, patched


@pytest.fixture(scope="module")
def example():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _se_modules(model):
    return [m for m in model.modules() if isinstance(m, se_surgery.SqueezeExcite)]


def _fc_macs(model, batch=1) -> int:
    return batch * sum(2 * se.channels * se.hidden for se in _se_modules(model))


def test_torchscript_onnx_export_writes_global_average_pool_and_convs(models, example):
    import onnx
    _, patched = models
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(patched, (example,), buf, dynamo=False)
    ops = Counter(n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node)
    n = len(_se_modules(patched))
    # Per SE: GlobalAveragePool, two 1x1 Conv, Sigmoid, Add (g + g: the gate scale 2, on the
    # small gate), Mul by the map, Add of the skip; the classifier's pool is one more
    # GlobalAveragePool, and resnet18's own 8 residual Adds are SE's now.
    assert ops["GlobalAveragePool"] == n + 1 and ops["Sigmoid"] == n and ops["Mul"] == n and ops["Add"] == 2 * n
    assert ops["Conv"] == 20 + 2 * n and ops["Gemm"] == 1  # resnet18's 20 convs and its fc
    assert "ReduceMean" not in ops and "Cast" not in ops and "Unsqueeze" not in ops


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_runs_equal_to_eager_within_1e5_relative(models, example, dynamo):
    import onnx  # noqa: F401
    import onnxruntime as ort
    import onnxscript  # noqa: F401
    _, patched = models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            data = torch.onnx.export(patched, (example,), dynamo=True, verbose=False).model_proto.SerializeToString()
        else:
            buf = io.BytesIO()
            torch.onnx.export(patched, (example,), buf, dynamo=False)
            data = buf.getvalue()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: example.numpy()})[0])
    with torch.no_grad():
        want = patched(example)
    # Relative to the output's scale: elementwise, outputs near 0 would measure rounding noise.
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_pt2_loads_and_runs_without_se_surgery(tmp_path, models, example):
    _, patched = models
    program = torch.export.export(patched, (example,))
    assert not any("se_surgery" in str(n.target) for n in program.graph.nodes)
    path = tmp_path / "m.pt2"
    torch.export.save(program, str(path))
    with torch.no_grad():
        torch.save(patched(example), tmp_path / "want.pt")
    torch.save(example, tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["se_surgery"] = None  # as on a machine without it
        import torch
        m = torch.export.load({str(path)!r}).module()
        x, want = torch.load({str(tmp_path / "x.pt")!r}), torch.load({str(tmp_path / "want.pt")!r})
        with torch.no_grad():
            print(torch.equal(m(x), want))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_fvcore_counts_the_fcs_exactly(models):
    import fvcore.nn as fvcore
    base, patched = models
    x = torch.randn(1, 3, SIZE, SIZE)
    totals = []
    for m in (base, patched):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)  # fvcore logs every op it skips (mean, sigmoid, mul)
            try:
                count = fvcore.FlopCountAnalysis(m, x)
                count.unsupported_ops_warnings(False)
                totals.append(count.total())
            finally:
                logging.disable(logging.NOTSET)
    # fvcore counts one per conv MAC and skips elementwise ops: the difference is the FCs.
    assert totals[1] - totals[0] == _fc_macs(patched) == sum(
        2 * r.channels * r.hidden for r in se_surgery.report(base, "all_stages", input_size=SIZE).sites)


def test_ptflops_counts_the_fcs(models):
    import ptflops
    base, patched = models
    totals = []
    for m in (base, patched):
        macs, _ = ptflops.get_model_complexity_info(m, (3, SIZE, SIZE), as_strings=False, backend="aten",
                                                    print_per_layer_stat=False)
        totals.append(macs)
    # The aten backend counts convolutions with their bias adds.
    biases = sum(se.hidden + se.channels for se in _se_modules(patched))
    assert totals[1] - totals[0] == _fc_macs(patched) + biases


def test_ptflops_module_hooks_see_the_fcs(models):
    import ptflops
    _, patched = models
    out = io.StringIO()
    ptflops.get_model_complexity_info(patched, (3, SIZE, SIZE), as_strings=False, backend="pytorch", ost=out,
                                      output_precision=6)
    scale = {"": 1, "K": 1e3, "M": 1e6}
    got = [round(float(v) * scale[u]) for v, u in re.findall(r"\(fc1\): Conv2d\([^,]*, [^,]*, ([\d.]+) (K|M|)Mac",
                                                            out.getvalue())]
    # One row per SE, each with its conv's MACs: C * hidden + hidden (the bias adds).
    assert got == [se.channels * se.hidden + se.hidden for se in _se_modules(patched)]
