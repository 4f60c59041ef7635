"""The fused SE op (se_surgery::se_join) against the plain-PyTorch composite it replaces.

The reference below is the pre-fused SqueezeExcite code path written out with aten ops and
differentiated by autograd; nothing in it comes from se_surgery.ops. The Triton kernels run
under ``TRITON_INTERPRET=1`` in a subprocess (the variable only counts if it is set before
the kernels are defined, and other tests of the suite import triton first).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from se_surgery import SqueezeExcite
from se_surgery.ops import fused, se_join

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("nchw", "channels_last", "nhwc")
SQUEEZES = ("avg", "max", "avgmax")
GATES = ("sigmoid", "hard_sigmoid")
ACTS = (None, "relu")
TOL = {torch.float32: {"atol": 1e-6, "rtol": 1e-6}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
       torch.float16: {"atol": 2e-3, "rtol": 2e-3}, torch.float64: {"atol": 1e-12, "rtol": 1e-12}}
# Gradients are sums over the map and the batch; their rounding differs from autograd's order.
GRAD_TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 5e-2, "rtol": 5e-2},
            torch.float16: {"atol": 5e-3, "rtol": 5e-3}}


def reference(x, skip, w1, b1, w2, b2, channel_dim=1, squeeze="avg", gate="sigmoid", gate_scale=1.0, act=None):
    """The pre-fused composite: mean/amax, two linears, gate, addcmul (as SqueezeExcite had it)."""
    dims = (2, 3) if channel_dim == 1 else (1, 2)
    if squeeze == "avg":
        s = x.mean(dims)
    elif squeeze == "max":
        s = x.amax(dims)
    else:
        s = 0.5 * (x.mean(dims) + x.amax(dims))
    z = F.linear(torch.relu(F.linear(s, w1.flatten(1), b1)), w2.flatten(1), b2)
    g = torch.sigmoid(z) if gate == "sigmoid" else F.hardsigmoid(z)
    g = g[:, :, None, None] if channel_dim == 1 else g[:, None, None, :]
    y = x * (g * gate_scale) if skip is None else torch.addcmul(skip, x, g, value=gate_scale)
    return torch.relu(y) if act == "relu" else y


def make(layout, bias=True, dtype=torch.float32, skip=True, n=2, c=6, h=3, w=5, hidden=3, seed=0):
    """x, skip and FC parameters (1x1-conv shaped), with gradients on, for one layout."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, h, w, c) if layout == "nhwc" else (n, c, h, w)
    x = torch.randn(shape, generator=g)
    s = torch.randn(shape, generator=g) if skip else None
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        s = s.to(memory_format=torch.channels_last) if skip else None
    params = [torch.randn(hidden, c, 1, 1, generator=g), torch.randn(hidden, generator=g) if bias else None,
              torch.randn(c, hidden, 1, 1, generator=g), torch.randn(c, generator=g) if bias else None]
    ts = [x, s] + params
    return [t.to(dtype).requires_grad_() if t is not None else None for t in ts]


def cdim(layout):
    return -1 if layout == "nhwc" else 1


def grads(out, inputs, seed=1):
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    live = [t for t in inputs if t is not None]
    got = torch.autograd.grad(out, live, dout)
    it = iter(got)
    return [next(it) if t is not None else None for t in inputs]


def assert_all_close(got, want, tol):
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"tensor {i}: {m}")


# ------------------------------------------------------------------ the op, eager, CPU

@pytest.mark.parametrize("layout,squeeze,gate,bias,has_skip,act",
                         list(itertools.product(LAYOUTS, SQUEEZES, GATES, (True, False), (True, False), ACTS)))
def test_op_matches_reference_fp32(layout, squeeze, gate, bias, has_skip, act):
    x, skip, w1, b1, w2, b2 = ts = make(layout, bias, skip=has_skip)
    kw = {"channel_dim": cdim(layout), "squeeze": squeeze, "gate": gate, "gate_scale": 2.0, "act": act}
    got = se_join(x, w1, b1, w2, b2, skip=skip, **kw)
    want = reference(x, skip, w1, b1, w2, b2, **kw)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert got.stride() == want.stride()  # channels_last stays channels_last
    assert_all_close(grads(got, ts), grads(want, ts), GRAD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("squeeze", SQUEEZES)
def test_op_matches_reference_half(dtype, layout, squeeze):
    ts = make(layout, dtype=dtype)
    x, skip, w1, b1, w2, b2 = ts
    kw = {"channel_dim": cdim(layout), "squeeze": squeeze, "gate_scale": 2.0, "act": "relu"}
    got = se_join(x, w1, b1, w2, b2, skip=skip, **kw)
    # Against the reference in float32 on the same (rounded) inputs.
    ts32 = [t.detach().float().requires_grad_() if t is not None else None for t in ts]
    want = reference(*ts32, **kw)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **TOL[dtype])
    assert_all_close([g.float() for g in grads(got, ts)], grads(want, ts32), GRAD_TOL[dtype])


@pytest.mark.parametrize("squeeze,gate,has_skip,act", [
    ("avg", "sigmoid", True, "relu"), ("max", "hard_sigmoid", False, None),
    ("avgmax", "sigmoid", False, "relu"), ("avgmax", "hard_sigmoid", True, None)])
@pytest.mark.parametrize("layout", ("channels_last", "nhwc"))
def test_op_gradcheck_float64(squeeze, gate, has_skip, act, layout):
    ts = make(layout, dtype=torch.float64, skip=has_skip, n=2, c=4, h=2, w=3, hidden=2)
    # Logits well inside hard_sigmoid's linear part, so finite differences see no kink.
    ts[4] = (ts[4].detach() * 0.3).requires_grad_()
    kw = {"channel_dim": cdim(layout), "squeeze": squeeze, "gate": gate, "gate_scale": 2.0, "act": act}
    x, skip, w1, b1, w2, b2 = ts
    if skip is None:
        assert torch.autograd.gradcheck(lambda x, w1, b1, w2, b2: se_join(x, w1, b1, w2, b2, **kw),
                                        (x, w1, b1, w2, b2))
    else:
        assert torch.autograd.gradcheck(lambda x, s, w1, b1, w2, b2: se_join(x, w1, b1, w2, b2, skip=s, **kw),
                                        (x, skip, w1, b1, w2, b2))


@pytest.mark.parametrize("args", [
    lambda: (*make("channels_last")[:6], 1, "avgmax", "sigmoid", 2.0, "relu"),
    lambda: (make("nhwc", bias=False)[0], None, *make("nhwc", bias=False)[2:], -1, "max", "hard_sigmoid", 1.0,
             "none")])
def test_opcheck(args):
    torch.library.opcheck(fused._se_join, args())


def test_wider_skip_promotes_like_the_composite():
    xb, _, w1, b1, w2, b2 = make("channels_last", dtype=torch.bfloat16)
    skip = make("channels_last")[1]
    kw = {"squeeze": "avgmax", "act": "relu", "gate_scale": 2.0}
    got = se_join(xb, w1, b1, w2, b2, skip=skip, **kw)
    want = reference(xb, skip, w1, b1, w2, b2, **kw)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])
    assert_all_close(grads(got, [xb, skip, w1, b1, w2, b2]), grads(want, [xb, skip, w1, b1, w2, b2]),
                     GRAD_TOL[torch.bfloat16])
    torch.library.opcheck(fused._se_join, (xb, skip, w1, b1, w2, b2, 1, "avgmax", "sigmoid", 2.0, "relu"))


def test_max_squeeze_shares_gradient_between_ties():
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = torch.tensor([[1.0, 3.0], [3.0, 0.0]])  # two maxima in channel 0
    x[0, 1] = 2.0  # all four tie
    x.requires_grad_()
    w1, w2 = torch.randn(1, 2, requires_grad=True), torch.randn(2, 1, requires_grad=True)
    got = grads(se_join(x, w1, None, w2, None, squeeze="max"), [x, w1, w2])
    want = grads(reference(x, None, w1, None, w2, None, squeeze="max"), [x, w1, w2])
    assert_all_close(got, want, GRAD_TOL[torch.float32])


def test_bad_arguments_name_the_value():
    x, w1, w2 = torch.randn(1, 4, 2, 2), torch.randn(2, 4), torch.randn(4, 2)
    for kw, words in [({"squeeze": "mean"}, "'mean'"), ({"gate": "tanh"}, "'tanh'"), ({"act": "gelu"}, "'gelu'"),
                      ({"channel_dim": 2}, "2"), ({"skip": torch.randn(1, 4, 3, 3)}, "(1, 4, 3, 3)")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            se_join(x, w1, None, w2, None, **kw)
    with pytest.raises(ValueError, match="do not fit 4 channels"):
        se_join(x, torch.randn(2, 5), None, w2, None)
    with pytest.raises(ValueError, match="'gelu'"):
        SqueezeExcite(4, 2)(x, act="gelu")


# -------------------------------------------------------------- the module uses the op

def _module_and_inputs(layout, init="paper", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    se = SqueezeExcite(6, 2, init=init, channel_dim=cdim(layout), dtype=dtype, **kw)
    x, skip = (t.detach().to(dtype) for t in make(layout)[:2])
    return se, x, skip


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ACTS)
def test_module_inference_kernel_equals_composite_path(layout, act):
    # The op's kernel, as the module calls it in CUDA inference, against the module's composite.
    se, x, skip = _module_and_inputs(layout, squeeze="avgmax")
    args = (se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias, se.channel_dim, se.squeeze, se.gate_fn,
            se.gate_scale, act or "none")
    with torch.no_grad():
        for s in (None, skip):
            assert not se.runs_op(x)
            torch.testing.assert_close(fused.se_join_into(None, x, s, *args), se(x, s, act=act),
                                       **TOL[torch.float32])


def test_module_training_on_cpu_takes_autograd_over_the_composite():
    se, x, skip = _module_and_inputs("nchw")
    y = se(x, skip, act="relu")
    assert type(y.grad_fn).__name__ == "ReluBackward0"  # not the op's GeneratedBackwardFor_se_surgery_se_join...
    assert "se_surgery_se_join" in type(_FunctionalBlock()(x).grad_fn).__name__  # the name the check relies on


def test_flop_counter_counts_the_op_like_the_composite():
    from torch.utils.flop_counter import FlopCounterMode

    se, x, skip = _module_and_inputs("nchw")
    x.requires_grad_()
    counts = []
    for use_fused in (True, False):
        se.use_fused = use_fused
        with FlopCounterMode(display=False) as counter:
            se(x, skip).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0  # se_surgery.report subtracts the FCs' MACs from this count


def test_module_inplace_inference_writes_into_x():
    se, x, skip = _module_and_inputs("channels_last")
    want = se(x, skip, act="relu").detach()
    branch = x.clone()
    with torch.inference_mode():
        out = se(branch, skip, inplace=True, act="relu")
    assert out.data_ptr() == branch.data_ptr()
    torch.testing.assert_close(out, want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate", GATES)
def test_identity_init_is_exact(dtype, layout, gate):
    se, x, skip = _module_and_inputs(layout, init="identity", dtype=dtype, gate=gate, squeeze="avgmax")
    x, skip = x * 3, skip * 3  # values far from 1: exactness is not luck of the rounding
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert torch.equal(se(x), x)
            assert torch.equal(se(x, skip), skip + x)
            assert torch.equal(se(x, skip, act="relu"), torch.relu(skip + x))
    with torch.inference_mode():
        branch = x.clone()
        assert torch.equal(se(branch, skip, inplace=True, act="relu"), torch.relu(skip + x))


# ------------------------------------------------------------------ compile and export

class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.se = SqueezeExcite(6, 2, init="paper", squeeze="avgmax")

    def forward(self, x):
        return self.se(self.conv(x), x, act="relu")


class _FunctionalBlock(_Block):
    def forward(self, x):  # the op itself, whatever the module's dispatch policy
        se = self.se
        return se_join(self.conv(x), se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias, skip=x,
                       squeeze="avgmax", act="relu")


def _call_targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def _compiled(m):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # aot: the fake and autograd registrations run too
    return torch.compile(m, backend=counter, fullgraph=True), counter


def test_compile_fullgraph_sees_one_op_and_trains():
    m, x = _FunctionalBlock(), torch.randn(2, 6, 4, 4)
    compiled, counter = _compiled(m)
    y = compiled(x)
    y.sum().backward()
    targets = _call_targets(counter.graphs[0])
    assert sum("se_join" in t for t in targets) == 1 and len(targets) == 2, targets  # conv + se_join
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    want_y = m(x)
    want_y.sum().backward()
    torch.testing.assert_close(y, want_y, **TOL[torch.float32])
    assert_all_close(got, [p.grad for p in m.parameters()], GRAD_TOL[torch.float32])


def test_module_compiled_for_cpu_gives_inductor_the_composite():
    m, x = _Block(), torch.randn(2, 6, 4, 4)
    compiled, counter = _compiled(m)
    y = compiled(x)
    assert not any("se_join" in t for t in _call_targets(counter.graphs[0]))
    torch.testing.assert_close(y, m(x), **TOL[torch.float32])


@pytest.mark.parametrize("grad", [True, False])
def test_export_decomposes_the_module_and_keeps_the_op_when_called(grad):
    # A .pt2 of the module has aten ops only (it loads without se-surgery); se_join called
    # directly stays one node.
    x = torch.randn(2, 6, 4, 4)
    for block, se_ops in ((_Block().eval(), 0), (_FunctionalBlock().eval(), 1)):
        with torch.set_grad_enabled(grad):
            ep = torch.export.export(block, (x,))
        targets = _call_targets(ep.graph_module)
        assert sum("se_surgery" in t for t in targets) == se_ops, targets
        assert [t.split(".")[1] for t in targets].count("conv2d") == 3 - 2 * se_ops  # the block's + two 1x1 FCs
        torch.testing.assert_close(ep.module()(x), block(x), **TOL[torch.float32])


@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_export_matches_onnxruntime(dynamo):
    import onnxruntime as ort

    m, x = _Block().eval(), torch.randn(2, 6, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            data = torch.onnx.export(m, (x,), dynamo=True, verbose=False).model_proto.SerializeToString()
        else:
            buf = io.BytesIO()
            torch.onnx.export(m, (x,), buf, dynamo=False)
            data = buf.getvalue()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), m(x), atol=1e-5, rtol=1e-5)


def test_torchscript_scripts_and_traces_the_composite():
    m, x = _Block().eval(), torch.randn(2, 6, 4, 4)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        scripted, traced = torch.jit.script(m), torch.jit.trace(m, x)
        torch.testing.assert_close(scripted(x), m(x), **TOL[torch.float32])
        assert "se_surgery::" not in str(traced.se.graph)  # standard ops, which fvcore can count
        torch.testing.assert_close(traced(x), m(x), **TOL[torch.float32])


def test_import_does_not_load_the_triton_kernels():
    code = "import sys, se_surgery; print('se_surgery.ops.triton_kernels' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.stdout.strip() == "False", res.stderr[-2000:]


# ------------------------------------------------ Triton kernels under TRITON_INTERPRET=1

_INTERP_SCRIPT = textwrap.dedent("""
    import itertools, json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    import test_fused as T
    from se_surgery.ops import triton_kernels as K
    out = {}
    combos = list(itertools.product(T.LAYOUTS, T.SQUEEZES, T.GATES, (True, False), T.ACTS))
    for i, (layout, squeeze, gate, has_skip, act) in enumerate(combos):
        bias = i % 2 == 0
        for dtype in (torch.float32, torch.bfloat16) if i % 4 == 0 else (torch.float32,):
            ts = T.make(layout, bias, dtype=dtype, skip=has_skip, seed=i)
            ts32 = [t.detach().float().requires_grad_() if t is not None else None for t in ts]
            kw = {"channel_dim": T.cdim(layout), "squeeze": squeeze, "gate": gate, "gate_scale": 2.0, "act": act}
            want = T.reference(*ts32, **kw)
            want_g = T.grads(want, ts32)
            args = [t.detach() if t is not None else None for t in ts]
            pos = (kw["channel_dim"], squeeze, gate, 2.0, act or "none")
            got = K.se_forward(args[0], args[1], *args[2:], *pos)
            dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
            dx, dskip, dw1, db1, dw2, db2 = K.se_backward(dout, args[0], got if act else None, *args[2:], *pos,
                                                          has_skip)
            if has_skip and not act:
                dskip = dout
            got_g = [dx, dskip if has_skip else None, dw1, db1 if bias else None, dw2, db2 if bias else None]
            inplace = args[0].clone()
            if i % 4 == 1:
                K.se_forward(inplace, args[1], *args[2:], *pos, out=inplace)
            else:
                inplace = got
            key = f"{layout}-{squeeze}-{gate}-{'skip' if has_skip else 'noskip'}-{act}-{str(dtype)[6:]}"
            err = lambda a, b: (a.float() - b.float()).abs().max().item() / (1 + b.abs().max().item())
            out[key] = {"forward": err(got, want), "inplace": err(inplace, got),
                        "stride": got.stride() == args[0].stride(),
                        "backward": max(err(a, b) for a, b in zip(got_g, want_g) if b is not None)}
    ident = T.make("channels_last", seed=99)
    x, skip = (t.detach() for t in ident[:2])
    w1, b1 = (t.detach() for t in ident[2:4])
    w2, b2 = torch.zeros(6, 3, 1, 1), torch.zeros(6)
    for hard in (False, True):
        g = "hard_sigmoid" if hard else "sigmoid"
        y = K.se_forward(x, skip, w1, b1, w2, b2, 1, "avgmax", g, 2.0, "relu")
        out[f"identity-{g}"] = bool(torch.equal(y, torch.relu(skip + x)))
    from se_surgery.ops import fused
    xb = x.bfloat16()  # a bfloat16 branch, a float32 skip, float32 FCs: as under autocast
    pos = (1, "avg", "sigmoid", 1.0, "none")
    fcs = [t.detach() for t in ident[2:]]
    y, r = K.se_forward(xb, skip, *fcs, *pos), fused.composite_forward(xb, skip, *fcs, *pos)
    out["promote"] = y.dtype == r.dtype == torch.float32 and bool(torch.allclose(y, r, atol=2e-2, rtol=2e-2))
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT, str(Path(__file__).parent)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_triton_forward_matches_reference(interpreted):
    bad = {k: v["forward"] for k, v in interpreted.items()
           if isinstance(v, dict) and v["forward"] > (1e-6 if k.endswith("float32") else 1e-2)}
    assert not bad and sum(isinstance(v, dict) for v in interpreted.values()) == 72 + 18, bad


def test_triton_backward_matches_reference(interpreted):
    bad = {k: v["backward"] for k, v in interpreted.items()
           if isinstance(v, dict) and v["backward"] > (1e-5 if k.endswith("float32") else 3e-2)}
    assert not bad, bad


def test_triton_keeps_layout_and_can_write_in_place(interpreted):
    bad = [k for k, v in interpreted.items() if isinstance(v, dict) and (not v["stride"] or v["inplace"] != 0)]
    assert not bad, bad


def test_triton_identity_init_is_exact(interpreted):
    assert interpreted["identity-sigmoid"] and interpreted["identity-hard_sigmoid"]


def test_triton_wider_skip_promotes(interpreted):
    assert interpreted["promote"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_op_matches_reference(layout):
    ts = [t.detach().cuda().requires_grad_() if t is not None else None for t in make(layout, c=40, h=7, w=9)]
    kw = {"channel_dim": cdim(layout), "squeeze": "avgmax", "gate_scale": 2.0, "act": "relu"}
    got = se_join(ts[0], *ts[2:], skip=ts[1], **kw)
    want = reference(*ts, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert_all_close(grads(got, ts), grads(want, ts), {"atol": 1e-4, "rtol": 1e-4})
