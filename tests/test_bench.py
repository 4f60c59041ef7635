"""``se-surgery bench`` and :mod:`se_surgery.studies.bench`: rows, gates off the identity, missing runtimes."""

import contextlib
import io
import json

import pytest
import torch
import torchvision

import se_surgery
from se_surgery import cli
from se_surgery.studies import bench as bench_mod
from se_surgery.studies.bench import BenchRow, RuntimeUnavailableError, bench, check_runtimes, move_gates_off_identity


def run_cli(args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(args)
    return rc, out.getvalue(), err.getvalue()


def test_rows_pair_each_rule_set_with_the_base_on_each_runtime():
    model = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = bench(model, ["late_stages", "all_stages"], runtimes=["eager"], batches=[1, 2], input_size=32, rounds=3,
                 warmup=1)
    assert [(r.rules, r.runtime, r.batch) for r in rows] == [
        ("late_stages", "eager", 1), ("all_stages", "eager", 1), ("late_stages", "eager", 2),
        ("all_stages", "eager", 2)]
    rep = se_surgery.report(model, "all_stages", input_size=32)
    assert rows[1].macs_ratio == round((rep.base_macs + rep.added_macs) / rep.base_macs, 4)
    for r in rows:
        assert r.spread[0] <= r.ratio <= r.spread[1] and r.base_ms > 0 and r.patched_ms > 0 and r.rounds == 3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model untouched


def test_gates_moved_off_identity_are_deterministic():
    def gates():
        torch.manual_seed(0)
        m = move_gates_off_identity(se_surgery.apply(torchvision.models.resnet18(), "late_stages", input_size=32)).eval()
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        se = [s for s in m.modules() if isinstance(s, se_surgery.SqueezeExcite)]
        out = []
        hooks = [s.register_forward_pre_hook(lambda mod, a: out.append(mod.gate(a[0]))) for s in se]
        with torch.no_grad():
            m(x)
        for h in hooks:
            h.remove()
        return out

    first, second = gates(), gates()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(not torch.equal(g, torch.ones_like(g)) for g in first)


def test_missing_runtime_names_the_package(monkeypatch):
    monkeypatch.setitem(bench_mod._PACKAGES, "openvino", ("no_such_package_xyz", "pip install 'se-surgery[openvino]'"))
    with pytest.raises(RuntimeUnavailableError, match=r"needs the no_such_package_xyz package.*se-surgery\[openvino\]"):
        check_runtimes(["eager", "openvino"])
    rc, out, err = run_cli(["bench", "resnet18", "--runtime", "openvino"])
    assert (rc, out) == (2, "")
    assert err.count("\n") == 1 and "pip install 'se-surgery[openvino]'" in err and "Traceback" not in err


def test_cli_json_rows_carry_the_promised_fields():
    rc, out, _ = run_cli(["bench", "resnet18", "--input-size", "32", "--rounds", "2", "--format", "json"])
    assert rc == 0
    (row,) = json.loads(out)
    assert {"rules", "runtime", "batch", "ratio", "base_ms", "patched_ms", "spread", "macs_ratio"} <= set(row)
    assert (row["rules"], row["runtime"], row["batch"]) == ("all_stages", "eager", 1)


def test_table_has_one_line_per_row():
    row = BenchRow("all_stages", "onnxruntime", 8, 1.2, (1.1, 1.3), 50.0, 60.0, 1.004, 20, 1)
    lines = bench_mod.format_rows([row, row]).splitlines()
    assert len(lines) == 4 and lines[2] == "| all_stages | onnxruntime | 8 | 1.200 | 1.100-1.300 | 50.00 | 60.00 | 1.0040 |"


def test_onnxruntime_runner_matches_eager():
    import onnx  # noqa: F401
    import onnxruntime as ort  # noqa: F401 - the runtime the bench row needs
    torch.manual_seed(0)
    m = move_gates_off_identity(se_surgery.apply(torchvision.models.resnet18(), "all_stages", input_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    got = torch.from_numpy(bench_mod._runner(m, "onnxruntime", x, 1)()[0])
    with torch.no_grad():
        want = m(x)
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())
