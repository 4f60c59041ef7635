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
from pathlib import Path

import pytest
import yaml

import se_surgery
from se_surgery import cli, sweep
from se_surgery.cli import build_for_training

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
    (["--seeds", "0"], "--seeds 0: must be at least 1"),
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
    with pytest.raises(se_surgery.SESurgeryError, match=r"--plot needs matplotlib: pip install 'se-surgery\[plot\]'"):
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
    with pytest.warns(UserWarning, match=r"cut.jsonl:10: not a trial record, ignored \(that trial runs again\)"):
        rc, stdout, _ = run_cli(sweep_args(cut, "--seeds", "2"))
    assert rc == 0 and "skipped 9 finished trial(s)" in stdout and "[10/10]" in stdout
    recs = [json.loads(x) for x in cut.read_text().splitlines()[:9] + cut.read_text().splitlines()[10:]]
    assert [r["key"] for r in recs] == [r["key"] for r in lines(out)]
