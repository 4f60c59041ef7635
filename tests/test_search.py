"""``se-surgery search`` (issue 20): shared study, resume, export, pruning, errors.

Every search fine-tunes ``timm:test_resnet`` on scikit-learn's digits at 16x16 for two
or three optimizer steps: the promises are about the study's bookkeeping, not accuracy.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna  # noqa: E402 - a declared dev dependency: missing is an error, not a skip
import pytest

import se_surgery  # noqa: E402
from se_surgery import cli  # noqa: E402
from se_surgery.hub import build_for_training  # noqa: E402
from se_surgery.studies import search  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "timm:test_resnet"
BUDGET = ["--data", "digits", "--input-size", "16", "--max-steps", "2", "--lr", "0.05", "--device", "cpu"]
S = optuna.trial.TrialState


def run_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(args)
    return rc, out.getvalue(), err.getvalue()


def worker(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "se_surgery", "search", MODEL, *BUDGET, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def journal(path: Path, name: str | None = None):
    storage = search._storage(str(path), path, "")[0]  # the journal file as search opens it
    name = name or optuna.get_all_study_names(storage)[0]
    return optuna.load_study(study_name=name, storage=storage)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def finished(study) -> list:
    return study.get_trials(states=(S.COMPLETE, S.PRUNED))


@pytest.mark.slow  # a second Python process imports torch and timm: seconds, more on a loaded machine
def test_two_workers_share_one_study(tmp_path):
    # Two new processes started together reach the study at about the same time.
    store = tmp_path / "shared.journal"
    procs = [worker(["--storage", str(store), "--study", "two", "--trials", "6", "--pruner", "none", "--max-steps",
                     "4", "--out", str(tmp_path / f"w{i}.jsonl")]) for i in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    study = journal(store, "two")
    done = finished(study)
    assert len(done) == 6
    assert not study.get_trials(states=(S.RUNNING, S.WAITING))
    # A failed trial may only be one asked at the very moment the study filled up.
    assert all(t.user_attrs.get("surplus") for t in study.get_trials(states=(S.FAIL,)))
    files = {i: {r["trial"] for r in lines(tmp_path / f"w{i}.jsonl")} for i in (0, 1)}
    assert files[0] and files[1], files  # both worked
    assert not files[0] & files[1]  # no trial trained twice
    trained = {t.number for t in done if "duplicate_of" not in t.user_attrs}
    assert files[0] | files[1] == trained
    for t in done:  # each trial's line is in the file of the worker that ran it
        if t.number in trained:
            assert t.number in files[int(Path(t.user_attrs["out"]).stem[1])]


@pytest.mark.slow  # as above
def test_killed_worker_resumes(tmp_path):
    out = tmp_path / "k.jsonl"
    args = ["--trials", "4", "--pruner", "none", "--out", str(out), "--sampler-seed", "1"]
    p = worker(args)
    deadline = time.monotonic() + 120

    def training() -> bool:  # a trial finished, and the next one is running with its worker recorded
        if not lines(out) or not list(tmp_path.glob("*.journal")):
            return False
        running = journal(next(tmp_path.glob("*.journal"))).get_trials(states=(S.RUNNING,))
        return any("pid" in t.user_attrs for t in running)

    while not training() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # no chance to tidy up: its running trial stays RUNNING
    p.wait()
    assert lines(out), "the worker finished no trial before it was killed"
    rc, stdout, err = run_cli(["search", MODEL, *BUDGET, *args])
    assert rc == 0, err
    assert "4 trials requested" in stdout
    study = journal(next(tmp_path.glob("*.journal")))
    assert len(finished(study)) == 4
    assert not study.get_trials(states=(S.RUNNING,))
    failed = study.get_trials(states=(S.FAIL,))
    assert all(t.user_attrs["pid"] == p.pid for t in failed)  # only the killed worker's trial failed
    assert stdout.count(f"its worker (pid {p.pid}) is gone; marked failed") == len(failed)
    print(f"killed worker left {len(failed)} running trial(s)")
    recs = [r for r in lines(out) if r["state"] == "complete"]
    assert {t.number for t in finished(study) if "duplicate_of" not in t.user_attrs} <= {r["trial"] for r in recs}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    d = tmp_path_factory.mktemp("search")
    args = ["search", MODEL, *BUDGET, "--trials", "5", "--pruner", "none", "--sampler-seed", "0", "--out",
            str(d / "s.jsonl"), "--export", str(d / "best.yaml"), "--plot", str(d / "front.png")]
    rc, stdout, err = run_cli(args)
    assert rc == 0, err
    return d, args, stdout


def test_export_reproduces_the_trials_added_params(searched):
    d, _, stdout = searched
    assert run_cli(["check", str(d / "best.yaml")])[0] == 0
    study = journal(next(d.glob("*.journal")))
    rows = search.summaries(study)
    best = search.best(rows)
    assert best["accuracy"] == max(r["accuracy"] for r in rows if r["rules"])
    assert f"rules of trial {best['trial']} ({best['placement']})" in stdout
    base = build_for_training(MODEL, 10)
    patched = se_surgery.apply(base, str(d / "best.yaml"), input_size=16)
    added = sum(p.numel() for p in patched.parameters()) - sum(p.numel() for p in base.parameters())
    assert added == best["added_params"] > 0
    assert (d / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trials_zero_only_reports_and_exports(searched):
    d, args, stdout = searched
    before = (d / "s.jsonl").read_text()
    exported = (d / "best.yaml").read_text()
    (d / "best.yaml").unlink()
    rc, again, err = run_cli([a if a != "5" else "0" for a in args])
    assert rc == 0, err
    assert (d / "s.jsonl").read_text() == before  # nothing trained
    assert (d / "best.yaml").read_text() == exported
    front = stdout[stdout.index("Pareto front"):].splitlines()[:-2]  # without the export and plot lines
    assert again[again.index("Pareto front"):].splitlines()[:len(front)] == front


def test_a_study_refuses_other_settings(searched):
    d, args, _ = searched
    name = next(d.glob("*.journal")).stem
    other = [a if a != "2" else "3" for a in args] + ["--study", name]  # --max-steps 3
    rc, _, err = run_cli(other)
    assert rc == 2
    assert err == (f"se-surgery: error: study {name!r} was run with other settings (config.max_steps: 2 there, 3 "
                   "here); give another --study\n")


def test_pruned_trial_is_recorded_as_pruned(tmp_path):
    # A completed trial that reached 101 % after epoch 1 puts the median out of reach.
    store = tmp_path / "p.journal"
    space = search.build_space(build_for_training(MODEL, 10), 16)
    dists = {space.param(s): optuna.distributions.CategoricalDistribution(list(c)) for s, c in space.choices.items()}
    params = {k: d.choices[-1] for k, d in dists.items()}
    study = optuna.create_study(study_name="prune", storage=search._storage(str(store), store, "")[0],
                                directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, values=[1.0, 1.0],
                                              user_attrs={"acc_s0_e1": 1.01}))
    out = tmp_path / "p.jsonl"
    # Two epochs of 3 steps (1,437 images in batches of 512): the median is asked after epoch 1.
    rc, stdout, err = run_cli(["search", MODEL, "--data", "digits", "--input-size", "16", "--device", "cpu",
                               "--lr", "0.05", "--epochs", "2", "--batch-size", "512", "--trials", "3", "--prune-after", "1", "--sampler-seed", "0",
                               "--storage", str(store), "--study", "prune", "--out", str(out)])
    assert rc == 0, err
    study = journal(store, "prune")
    states = [t.state for t in study.trials]
    assert states == [S.COMPLETE, S.COMPLETE, S.PRUNED]  # the injected trial, the baseline (never pruned), one
    pruned = study.trials[2]
    assert pruned.user_attrs["pruned_at"]["epoch"] == 1 and pruned.user_attrs["pruned_at"]["steps"] == 3
    rec = lines(out)[-1]
    assert (rec["trial"], rec["state"], rec["epoch"], rec["steps"]) == (2, "pruned", 1, 3)
    assert "[trial 2]" in stdout and "pruned after epoch 1" in stdout


@pytest.mark.parametrize("extra, message", [
    (["--objective", "params", "--objective", "macs"], "give accuracy and one cost"),
    (["--trials", "-1"], "--trials -1: must be at least 0"),
    (["--space", "/no/such/space.yaml"], "--space '/no/such/space.yaml': no such file"),
])
def test_bad_search_input_is_one_line(extra, message):
    rc, _, err = run_cli(["search", MODEL, "--data", "digits", *extra])
    assert rc == 2
    assert err.count("\n") == 1 and message in err, err


def test_search_without_optuna_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    rc, _, err = run_cli(["search", MODEL, "--data", "digits"])
    assert rc == 2
    assert err == "se-surgery: error: search needs Optuna: pip install 'se-surgery[search]' (optuna>=3.6)\n"


def test_space_file_says_what_is_searched(tmp_path):
    model = build_for_training(MODEL, 10)
    f = tmp_path / "space.yaml"
    f.write_text("stages: [3, 4]\nmodule: [se, eca]\nratio: [8]\nvariant: [post]\ndefaults: {init: identity}\n")
    space = search.build_space(model, 16, space_file=f)
    assert space.choices == {3: ("off", "se/8/post", "eca/post"), 4: ("off", "se/8/post", "eca/post")}
    rules = space.rules({"stage3": "eca/post", "stage4": "se/8/post"})
    assert rules == {"defaults": {"init": "identity"}, "rules": [
        {"select": {"stage": 3}, "module": "eca", "variant": "post"},
        {"select": {"stage": 4}, "module": "se", "variant": "post", "ratio": 8}]}
    assert len(se_surgery.plan(model, rules, input_size=16).selected) == 2
    # the command line's lists replace the file's
    assert search.build_space(model, 16, space_file=f, variants=["standard"]).choices[4] == (
        "off", "se/8/standard", "eca/standard")
    f.write_text("stages: [5]\n")
    with pytest.raises(search.SearchError, match=r"stage\(s\) \[5\] not in ResNet, whose sites are in stages "
                                                 r"\[1, 2, 3, 4\]"):
        search.build_space(model, 16, space_file=f)


def test_latency_objective_is_the_measured_ratio(tmp_path):
    out = tmp_path / "r.jsonl"
    rc, stdout, err = run_cli(["search", MODEL, *BUDGET, "--objective", "accuracy", "--objective", "latency",
                               "--trials", "2", "--pruner", "none", "--out", str(out)])
    assert rc == 0, err
    study = journal(next(tmp_path.glob("*.journal")))
    done = study.get_trials(states=(S.COMPLETE,))
    assert len(done) == 2
    by_rules = {t.user_attrs["rules"] is None: t for t in done}
    assert by_rules[True].values[1] == 1.0  # the baseline is the base
    assert by_rules[False].values[1] == by_rules[False].user_attrs["latency_ratio"] > 0
    assert "| trial | accuracy % | latency / base |" in stdout
