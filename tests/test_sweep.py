"""``se-surgery sweep`` (issue 13): trials, JSON lines, resume, shards, torchrun, table and plot.

Every sweep here fine-tunes ``timm:test_resnet`` (374k parameters) on scikit-learn's
digits at 32x32 for a couple of optimizer steps: the promises are about bookkeeping,
not about accuracy, so the base starts from scratch.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import se_surgery
from se_surgery import cli
from se_surgery.hub import build_for_training
from se_surgery.studies import sweep

MODEL = "timm:test_resnet"
RULES = ["late_stages", "no_last_stage"]
VARIANTS = ["standard", "pre"]
FIELDS = {"rules", "variant", "ratio", "seed", "added_params", "added_macs", "accuracy", "baseline_accuracy",
          "seconds", "key", "baseline", "steps", "model"}


def sweep_args(out: Path, *extra: str) -> list[str]:
    args = ["sweep", MODEL, "--data", "digits", "--max-steps", "2", "--lr", "0.05", "--device", "cpu", "--out", str(out)]
    for r in RULES:
        args += ["--rules", r]
    for v in VARIANTS:
        args += ["--variant", v]
    return args + list(extra)


def run_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(args)
    return rc, out.getvalue(), err.getvalue()


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The whole sweep: 2 rule sets x 2 variants x 2 seeds, plus a baseline per seed."""
    out = tmp_path_factory.mktemp("sweep") / "results.jsonl"
    rc, stdout, _ = run_cli(sweep_args(out, "--seeds", "2", "--plot", str(out.with_suffix(".png"))))
    assert rc == 0
    return out, stdout


# No wall-clock bound here: on a shared machine it fails by load, not by code (speed: benchmarks/).
def test_sweep_writes_one_line_per_trial(full):
    out, _ = full
    recs = lines(out)
    assert len(recs) == 2 + 2 * 2 * 2
    assert all(FIELDS <= set(r) for r in recs)
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["baseline_accuracy"] <= 1 for r in recs)
    base = [r for r in recs if r["baseline"]]
    assert sorted(r["seed"] for r in base) == [0, 1]  # one baseline per seed
    assert all(r["added_params"] == 0 == r["added_macs"] and r["accuracy"] == r["baseline_accuracy"]
               and r["rules"] is None for r in base)
    by_seed = {r["seed"]: r["accuracy"] for r in base}
    model = build_for_training(MODEL, 10)
    se = [r for r in recs if not r["baseline"]]
    assert sorted((r["rules"], r["variant"], r["seed"]) for r in se) == sorted(
        (rule, v, s) for rule in RULES for v in VARIANTS for s in (0, 1))
    for r in se:
        rep = se_surgery.report(model, sweep.overlay(r["rules"], variant=r["variant"]), input_size=32)
        assert (r["added_params"], r["added_macs"]) == (rep.added_params, rep.added_macs) != (0, 0)
        assert {s.variant for s in rep.sites} == {r["variant"]}  # --variant overrode the preset's
        assert r["ratio"] == 16 and r["steps"] == 2 and r["baseline_accuracy"] == by_seed[r["seed"]]
    assert len({r["key"] for r in recs}) == len(recs)
    # The same setting costs the same whatever the seed.
    assert len({(r["rules"], r["variant"], r["added_params"]) for r in se}) == 4


def test_sweep_prints_a_markdown_table_and_plots(full):
    out, stdout = full
    table = stdout[stdout.index("| rules |"):].splitlines()
    assert table[0].startswith("| rules | variant | ratio | module | seeds | accuracy % | gain (points) |")
    assert table[2].startswith("| baseline (no SE) |  |  |  | 2 | ")
    assert [row.split(" | ")[:2] for row in table[3:7]] == [["| " + r, v] for r in RULES for v in VARIANTS]
    assert all(" ± " in row for row in table[2:7])  # mean ± std over the two seeds
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_rerun_skips_finished_trials(full):
    out, _ = full
    before = out.read_text()
    rc, stdout, _ = run_cli(sweep_args(out, "--seeds", "2"))
    assert rc == 0
    assert out.read_text() == before
    assert "skipped 10 finished trial(s)" in stdout
    assert "[1/10]" not in stdout and "| baseline (no SE) |  |  |  | 2 |" in stdout


def test_resumed_sweep_with_nothing_left_builds_no_model_and_loads_no_data(full, monkeypatch):
    out, first = full

    def refuse(*args, **kwargs):
        raise AssertionError("a finished sweep must not build a model or load data")

    monkeypatch.setattr(cli, "build_for_training", refuse)
    monkeypatch.setattr("se_surgery.studies.train.load_data", refuse)
    rc, stdout, _ = run_cli(sweep_args(out, "--seeds", "2"))
    assert rc == 0
    assert stdout.startswith("skipped 10 finished trial(s)")
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table == [line for line in first.splitlines() if line.startswith("|")]  # the same summary table


def test_shards_cover_the_sweep_exactly_once(full, tmp_path):
    out, _ = full
    keys = {r["key"] for r in lines(out) if not r["baseline"]}
    shards = []
    for i in (0, 1):
        f = tmp_path / f"shard{i}.jsonl"
        assert run_cli(sweep_args(f, "--seeds", "2", "--trial", f"{i}/2"))[0] == 0
        shards.append(lines(f))
    se = [{r["key"] for r in s if not r["baseline"]} for s in shards]
    assert se[0] | se[1] == keys and not se[0] & se[1] and len(se[0]) == len(se[1]) == 4
    # Each shard also has the baseline of every seed it ran, so each file stands alone.
    for s in shards:
        assert sorted(r["seed"] for r in s if r["baseline"]) == sorted({r["seed"] for r in s})
    # Seeded: a trial run again, in another shard, gets the same accuracy and SE weights' drift.
    ran = {r["key"]: r for r in lines(out)}
    assert all((r["correct"], r.get("fc2_max")) == (ran[r["key"]]["correct"], ran[r["key"]].get("fc2_max"))
               for s in shards for r in s)


def test_variant_override_wins_over_every_rule_but_skips():
    rules = {"defaults": {"variant": "standard"},
             "rules": [{"select": {"stage": 1}, "variant": "post"}, {"select": {"stage": -1}, "skip": True}]}
    got = sweep.overlay(rules, variant="identity", ratio=8.0)
    assert got["defaults"]["variant"] == "identity" and got["defaults"]["ratio"] == 8
    assert got["rules"][0]["variant"] == "identity" and got["rules"][0]["ratio"] == 8
    assert got["rules"][1] == {"select": {"stage": [-1]}, "skip": True}


def test_freeze_base_baseline_is_the_base_as_loaded(tmp_path):
    out = tmp_path / "frozen.jsonl"
    args = ["sweep", MODEL, "--data", "digits", "--rules", "late_stages", "--max-steps", "1", "--freeze-base",
            "--device", "cpu", "--out", str(out)]
    assert run_cli(args)[0] == 0
    base, se = lines(out)
    assert base["baseline"] and base["steps"] == 0  # no SE: nothing left to train
    assert not se["baseline"] and se["steps"] == 1 and se["freeze_base"]


@pytest.mark.parametrize("extra, message", [
    (["--trial", "2/2"], "--trial '2/2': expected I/N with 0 <= I < N, such as 0/2 and 1/2"),
    (["--trial", "x"], "--trial 'x': expected I/N with 0 <= I < N"),
    (["--seeds", "0"], "--seeds 0: must be an integer from 1 to 10,000"),
    (["--data", "/no/such/dir"], "--data '/no/such/dir': not a directory"),
    (["--rules", "no_such_rules"], "no_such_rules"),
    (["--variant", "sideways"], "--rules late_stages with --variant sideways: "),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, extra, message):
    args = ["sweep", MODEL, "--data", "digits", "--rules", "late_stages", "--max-steps", "1", "--device", "cpu",
            "--out", str(tmp_path / "r.jsonl")] + extra
    rc, _, err = run_cli(args)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("se-surgery: error: ") and message in err, err
    assert not (tmp_path / "r.jsonl").exists()


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(se_surgery.SESurgeryError, match=r"plot needs matplotlib: pip install 'se-surgery\[plot\]'"):
        sweep.plot([], tmp_path / "p.png")


@pytest.mark.slow  # two fresh interpreters importing torch: ~20 s on a shared CPU
def test_torchrun_two_processes_one_writer(tmp_path):
    out = tmp_path / "ddp.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "se_surgery.cli", "sweep", MODEL, "--data", "digits", "--rules", "late_stages", "--max-steps", "2",
           "--lr", "0.05", "--device", "cpu", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es) on cpu" in run.stdout
    assert run.stdout.count("| rules |") == 1  # only rank 0 prints
    recs = lines(out)
    assert len(recs) == 2  # the baseline and one SE trial, written once (by rank 0)
    assert all(r["world"] == 2 and r["replicas_agree"] for r in recs)  # DDP kept both ranks' models equal
    assert [r["steps"] for r in recs] == [2, 2]


def test_rules_file_is_recorded_as_given(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump({"rules": [{"select": {"stage": -1}}]}))
    out = tmp_path / "r.jsonl"
    assert run_cli(["sweep", MODEL, "--data", "digits", "--rules", str(f), "--ratio", "4", "--max-steps", "1",
                    "--device", "cpu", "--out", str(out)])[0] == 0
    se = lines(out)[1]
    assert se["rules"] == str(f) and se["ratio"] == 4 and se["variant"] == "standard" and se["sites"] == 1


def test_a_line_cut_by_an_interruption_runs_that_trial_again(full, tmp_path):
    out, _ = full
    cut = tmp_path / "cut.jsonl"
    text = out.read_text()
    cut.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])  # the last record half written
    rc, stdout, err = run_cli(sweep_args(cut, "--seeds", "2"))
    # The CLI prints warnings in its one-line format.
    assert f"se-surgery: warning: {cut}:10: not a JSON trial record; line ignored (that trial runs again)\n" in err
    assert rc == 0 and "skipped 9 finished trial(s)" in stdout and "[10/10]" in stdout
    recs = [json.loads(x) for x in cut.read_text().splitlines()[:9] + cut.read_text().splitlines()[10:]]
    assert [r["key"] for r in recs] == [r["key"] for r in lines(out)]


def test_latency_is_recorded_per_setting_when_asked(tmp_path):
    from se_surgery.studies.train import load_data

    data = load_data("digits", 16)
    base = build_for_training(MODEL, data.classes)
    cfg = sweep.SweepConfig(MODEL, "digits", max_steps=1, lr=0.05)
    recs = sweep.run(base, data, cfg, rules=["late_stages"], out=tmp_path / "r.jsonl", device="cpu", latency=True)
    assert "latency_ratio" not in recs[0]  # the baseline
    assert recs[1]["latency_ratio"] > 0 and lines(tmp_path / "r.jsonl")[1]["latency_ratio"] == recs[1]["latency_ratio"]


# ------------------------------------------------------------- damaged results, bounds (issue 21)

GOOD = {"key": "k", "accuracy": 0.5, "baseline_accuracy": 0.5, "seed": 0, "added_params": 0, "added_macs": 0,
        "seconds": 1.0, "rules": None, "variant": None, "ratio": None, "module": None}


@pytest.mark.parametrize("line, why", [
    (b"\x93\xff\x00garbage", "not UTF-8 text"),
    (bytes(b for b in range(256) if b != 10), "not UTF-8 text"),
    (json.dumps(dict(GOOD, seed="0")).encode(), "field 'seed' is str, not int"),
    (json.dumps(dict(GOOD, accuracy=[1])).encode(), "field 'accuracy' is list, not int or float"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "accuracy"}).encode(), "no 'accuracy' field"),
    (json.dumps(dict(GOOD, accuracy=float("nan"))).encode(), "accuracy nan is not a fraction from 0 to 1"),
    (json.dumps(dict(GOOD, accuracy=float("inf"))).encode(), "accuracy inf is not a fraction from 0 to 1"),
    (json.dumps(dict(GOOD, rules={"a": 1})).encode(), "field 'rules' is dict, not a string or number"),
    (b"[" * 100_000, "not a JSON trial record"),
])
def test_damaged_results_lines_are_skipped_with_file_and_line(tmp_path, line, why):
    f = tmp_path / "r.jsonl"
    f.write_bytes(json.dumps(GOOD).encode() + b"\n" + line + b"\n" + json.dumps(dict(GOOD, key="k2")).encode())
    with pytest.warns(sweep.SweepWarning) as caught:
        recs = sweep.read_results(f)
    assert [r["key"] for r in recs] == ["k", "k2"]
    assert [str(w.message) for w in caught] == [f"{f}:2: {why}; line ignored (that trial runs again)"]


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "1000000000000"], "--seeds 1000000000000: must be an integer from 1 to 10,000"),
    (["--lr", "nan"], "--lr nan: must be a finite number from 0 to 1000"),
    (["--se-lr", "inf"], "--se-lr inf: must be a finite number from 0 to 1000"),
    (["--momentum", "2"], "--momentum 2.0: must be a finite number from 0 to 1"),
    (["--input-size", "0"], "--input-size 0: must be an integer from 8 to 4096 (pixels a side)"),
    (["--input-size", "100000"], "--input-size 100000: must be an integer from 8 to 4096 (pixels a side)"),
    (["--ratio", "nan"], "--ratio: nan is not a finite number"),
    (["--batch-size", "0"], "--batch-size 0: must be an integer from 1 to 1,000,000"),
])
def test_bounds_are_checked_before_anything_trains(tmp_path, extra, message):
    out = tmp_path / "r.jsonl"
    rc, stdout, err = run_cli(["sweep", MODEL, "--data", "digits", "--max-steps", "1", "--device", "cpu",
                               "--out", str(out)] + extra)
    assert (rc, err) == (2, f"se-surgery: error: {message}\n") and stdout == ""
    assert not out.exists()


def test_an_unwritable_out_fails_before_the_first_trial(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, stdout, err = run_cli(["sweep", MODEL, "--data", "digits", "--device", "cpu", "--out",
                               str(blocker / "r.jsonl")])
    assert rc == 2 and stdout == ""
    assert err == f"se-surgery: error: --out '{blocker}/r.jsonl': '{blocker}' is not a folder\n"


def _image_folder(root: Path, classes: int, image: bool = True) -> Path:
    from PIL import Image

    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(3):
            if image:
                Image.new("RGB", (12, 12), (40 * c, 10 * i, 0)).save(root / f"c{c}" / f"{i}.png")
            else:
                (root / f"c{c}" / f"{i}.png").write_text("not an image")
    return root


@pytest.mark.parametrize("classes, image, message", [
    (1, True, "--data: 1 class(es); classification needs at least 2"),
    (2, False, "--data: the first train image cannot be read (UnidentifiedImageError: cannot identify image file"),
])
def test_folders_a_sweep_cannot_learn_from_fail_at_once(tmp_path, classes, image, message):
    root = _image_folder(tmp_path / "data", classes, image)
    out = tmp_path / "r.jsonl"
    rc, _, err = run_cli(["sweep", MODEL, "--data", str(root), "--input-size", "16", "--workers", "0",
                          "--device", "cpu", "--out", str(out)])
    assert rc == 2 and err.startswith(f"se-surgery: error: {message}") and err.count("\n") == 1, err
    assert not out.exists()


def test_folder_augmentation_is_the_users_choice(tmp_path):
    from se_surgery.studies.train import load_data

    root = _image_folder(tmp_path / "data", 2)
    names = {a: [type(t).__name__ for t in load_data(str(root), 16, augment=a).train.dataset.transform.transforms]
             for a in ("none", "flip", "crop")}
    assert names == {"none": ["Resize", "CenterCrop", "ToTensor", "Normalize"],
                     "flip": ["Resize", "CenterCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"],
                     "crop": ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]}
    assert load_data(str(root), 16).workers == len(os.sched_getaffinity(0))
    with pytest.raises(se_surgery.SESurgeryError, match="augment 'rotate': use one of none, flip, crop"):
        load_data(str(root), 16, augment="rotate")


def test_table_never_prints_minus_zero():
    recs = [dict(GOOD, seed=s, accuracy=a, baseline_accuracy=a) for s, a in ((0, 0.9), (1, 0.8))]
    recs += [dict(r, rules="late_stages", variant="pre", ratio=16.0, module="se",
                  accuracy=r["accuracy"] - 0.00001) for r in recs[:2]]
    row = sweep.table(recs).splitlines()[-1]
    assert "| +0.00 ± 0.00 |" in row and "-0.00" not in row


def test_plot_draws_setting_means_and_their_front(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    drawn = {}
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda self, x, y, **kw: drawn.setdefault(kw["label"],
                                                                                                    (x, y, kw["yerr"])))
    lines_drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, **kw: lines_drawn.append((x, y)))
    recs = [dict(GOOD, seed=s, accuracy=a) for s, a in ((0, 0.90), (1, 0.80))]
    recs += [dict(GOOD, rules="a", variant="pre", ratio=16.0, module="se", added_params=30, seed=s, accuracy=a)
             for s, a in ((0, 0.99), (1, 0.75))]  # one lucky seed (99 %), but b beats its mean (87 %)
    recs += [dict(GOOD, rules="b", variant="post", ratio=16.0, module="se", added_params=20, seed=s, accuracy=a)
             for s, a in ((0, 0.95), (1, 0.93))]
    sweep.plot(recs, tmp_path / "p.png")
    assert drawn["baseline (no SE) (n=2)"][:2] == ([0], [pytest.approx(85.0)])
    assert drawn["a pre r16 (n=2)"][1] == [pytest.approx(87.0)]
    assert lines_drawn == [([0, 20], [pytest.approx(85.0), pytest.approx(94.0)])]  # a stays off the front


_damage = st.sampled_from([b"", b"\xff\xfe\x00", b'{"key": 1}', b'{"key": "x", "accuracy": NaN}', b"[" * 5000,
                           b'{"key": "x", "accuracy": "0.5"}', b"null", b'{"key": "x"}', b"\x00" * 10])


@pytest.mark.slow  # each example builds the model and prices the settings: ~1 s
@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                               HealthCheck.function_scoped_fixture])
@given(args=st.lists(st.sampled_from([
    ["--seeds", "0"], ["--seeds", "2"], ["--seeds", "99999999999"], ["--lr", "nan"], ["--lr", "-1"],
    ["--lr", "0.05"], ["--input-size", "0"], ["--input-size", "16"], ["--input-size", "100000"],
    ["--epochs", "0"], ["--batch-size", "-3"], ["--momentum", "inf"], ["--trial", "1/2"], ["--trial", "3/2"],
    ["--ratio", "8"], ["--ratio", "nan"], ["--ratio", "-1"], ["--variant", "pre"], ["--variant", "sideways"],
    ["--module", "eca"], ["--module", "nope"], ["--rules", "late_stages"], ["--rules", "no_such"],
    ["--max-steps", "0"], ["--freeze-base"], ["--workers", "-1"]]), max_size=4),
    damage=st.lists(_damage, max_size=3), out_kind=st.sampled_from(["file", "dir", "under_a_file"]))
def test_random_sweeps_exit_0_or_2(tmp_path_factory, monkeypatch, args, damage, out_kind):
    # Training is replaced by a record of the right form: the property is about arguments,
    # results files and checks, which all run for real.
    def fake_trial(base, trial, resolved, cost, data, config, d, key, progress):
        return {"key": key, "model": config.model, "rules": trial.rules, "variant": cost.get("variant"),
                "ratio": cost.get("ratio"), "module": cost.get("module"), "seed": trial.seed,
                "baseline": trial.baseline, "sites": cost["sites"], "added_params": cost["added_params"],
                "added_macs": cost["added_macs"], "accuracy": 0.5, "seconds": 0.0, "steps": 0}

    monkeypatch.setattr(sweep, "_run_trial", fake_trial)
    tmp = tmp_path_factory.mktemp("sweep")
    out = {"file": tmp / "r.jsonl", "dir": tmp, "under_a_file": tmp / "f" / "r.jsonl"}[out_kind]
    if out_kind == "under_a_file":
        (tmp / "f").write_text("")
    else:
        (tmp / "r.jsonl").write_bytes(b"\n".join(damage))
    argv = ["sweep", MODEL, "--data", "digits", "--device", "cpu", "--out", str(out)]
    for a in args:
        argv += a
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc, _, err = run_cli(argv)
    assert rc in (0, 2), err
    assert "internal error" not in err and "Traceback" not in err
    if rc == 2:
        assert err.count("\n") == 1 and err.startswith("se-surgery: error: "), err
