"""``se-surgery search``: find where attention should go in a model, for a budget, with an Optuna study.

The space: for each stage of the model (as :func:`se_surgery.find_sites` numbers them),
either nothing or one choice ``module/ratio/variant`` from the modules, ratios and
variants given (default ``se``, the paper's ratios 4, 8, 16, 32, ``standard`` and
``post``). A trial's placement is an ordinary rules dict (one rule per stage that gets
attention), planned and priced like any other before it trains.

Each trial runs the sweep's trial runner (:mod:`se_surgery.studies.sweep`: same data, budget,
seeds, results-line format) on every seed and reports two objectives to a
multi-objective Optuna study: the mean test accuracy (maximised) and a cost (minimised):
the parameters or MACs attention adds (``se_surgery.report``). The placement without
attention (the baseline) is the study's first trial.

Optuna's ``trial.report``/``should_prune`` do not exist for multi-objective studies, so
pruning is done here, Optuna's median rule on the accuracy objective: after each epoch
but the last, a trial whose test accuracy is below the median of the completed trials'
accuracies at the same seed and epoch (once ``prune_after`` of them have one) stops and
is recorded as ``PRUNED``. A placement that a finished trial already measured is
answered from the study, not trained again.

The study lives in Optuna storage, so any number of workers (processes, machines, each
possibly a ``torchrun`` job) run one study, and rerunning resumes it. ``trials`` is the
study's total: a worker stops when the study holds that many trials (finished or
running). Every worker appends its trials to its own JSON-lines file, in the sweep's
format plus ``trial``, ``study``, ``state``, ``placement`` and ``trial_rules``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import PlanError, RuleError, SESurgeryError
from .sweep import (
    SweepConfig,
    Trial,
    _append,
    _costs,
    _fmt,
    _key,
    _mean_std,
    _run_trial,
    _tty,
    pareto_front,
    read_results,
)
from .train import Data, Dist, evaluate

__all__ = ["COSTS", "SearchError", "Space", "build_space", "export", "front", "front_table", "plot", "read_space",
           "run", "summaries"]

COSTS = ("params", "macs", "latency")
RATIOS = (4, 8, 16, 32)  # the paper's Table 13
VARIANTS = ("standard", "post")
OFF = "off"
SPACE_KEYS = ("stages", "select", "module", "ratio", "variant", "defaults")


class SearchError(SESurgeryError, ValueError):
    """A search setting is invalid (space, objective, storage, study) or Optuna is missing."""


def _optuna():
    try:
        import optuna
    except ImportError:
        raise SearchError("search needs Optuna: pip install 'se-surgery[search]' (optuna>=3.6)") from None
    return optuna


# --------------------------------------------------------------------------- space


@dataclass
class Space:
    """The searched placements: per stage, ``"off"`` or ``"module/ratio/variant"`` (``"module/variant"``
    for a module without a ratio); ``select`` is added to every stage's rule, ``defaults`` to every trial's rules.

    Example:
        >>> s = Space({2: ("off", "se/16/post"), 3: ("off", "eca/standard")})
        >>> s.placement({"stage2": "se/16/post", "stage3": "off"})
        's2=se/16/post s3=-'
        >>> s.rules({"stage2": "se/16/post", "stage3": "eca/standard"})["rules"]
        [{'select': {'stage': 2}, 'module': 'se', 'variant': 'post', 'ratio': 16}, {'select': {'stage': 3}, 'module': 'eca', 'variant': 'standard'}]
        >>> s.rules({"stage2": "off", "stage3": "off"}) is None  # the baseline
        True
        >>> s.size
        4
    """  # noqa: E501 - doctest output must match verbatim

    choices: dict[int, tuple[str, ...]]
    select: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)

    @staticmethod
    def param(stage: int) -> str:
        return f"stage{stage}"

    @property
    def size(self) -> int:
        return math.prod(len(c) for c in self.choices.values())

    def baseline(self) -> dict[str, str]:
        return {self.param(s): OFF for s in self.choices}

    def placement(self, params: dict[str, str]) -> str:
        return " ".join(f"s{s}={'-' if params[self.param(s)] == OFF else params[self.param(s)]}" for s in self.choices)

    def rules(self, params: dict[str, str]) -> dict | None:
        """The trial's rules (a dict ``load_rules`` accepts), or ``None`` where no stage gets attention."""
        out = []
        for s in self.choices:
            choice = params[self.param(s)]
            if choice != OFF:
                out.append({"select": {"stage": s, **self.select}, **_parse_choice(choice)})
        if not out:
            return None
        return {"defaults": dict(self.defaults), "rules": out} if self.defaults else {"rules": out}

    def to_dict(self) -> dict:
        return {"choices": {str(s): list(c) for s, c in self.choices.items()}, "select": self.select,
                "defaults": self.defaults}


def _choice(module: str, ratio, variant: str) -> str:
    return f"{module}/{variant}" if ratio is None else f"{module}/{_fmt(ratio)}/{variant}"


def _parse_choice(choice: str) -> dict:
    parts = choice.split("/")
    opts: dict[str, Any] = {"module": parts[0], "variant": parts[-1]}
    if len(parts) == 3:
        r = float(parts[1])
        opts["ratio"] = int(r) if r.is_integer() else r
    return opts


def read_space(path: str | os.PathLike) -> dict:
    """A space file (YAML): which stages are searched and over what; every key optional.

    ``stages`` (list of stage numbers; default every stage with a site), ``select``
    (select keys added to every stage's rule, e.g. ``{kind: residual}``), ``module``,
    ``ratio``, ``variant`` (lists of choices; the command line's ``--module``,
    ``--ratio``, ``--variant`` replace them), ``defaults`` (options every trial's rules
    start from, as a rules file's ``defaults``).

    Example:
        >>> import tempfile
        >>> f = tempfile.mkdtemp() + "/space.yaml"
        >>> _ = open(f, "w").write("stages: [3, 4]\\nratio: [8, 16]\\n")
        >>> read_space(f)
        {'stages': [3, 4], 'ratio': [8, 16]}
        >>> _ = open(f, "w").write("ratios: [8]\\n")
        >>> read_space(f)
        Traceback (most recent call last):
        ...
        se_surgery.studies.search.SearchError: --space ...: unknown key 'ratios'; allowed: stages, select, module, ratio, variant, defaults
    """  # noqa: E501 - doctest output must match verbatim
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SearchError(f"--space {str(path)!r}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SearchError(f"--space {path}: not valid YAML ({' '.join(str(e).split())[:120]})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise SearchError(f"--space {path}: expected a mapping of {', '.join(SPACE_KEYS)}")
    for k, v in data.items():
        if k not in SPACE_KEYS:
            raise SearchError(f"--space {path}: unknown key {k!r}; allowed: {', '.join(SPACE_KEYS)}")
        want = dict if k in ("select", "defaults") else list
        if not isinstance(v, want) or (want is list and not v):
            raise SearchError(f"--space {path}: key {k!r} must be a {'mapping' if want is dict else 'non-empty list'}")
    if "stage" in data.get("select", {}):
        raise SearchError(f"--space {path}: select must not name 'stage' (list the searched stages under 'stages')")
    return data


def build_space(model: nn.Module, input_size=None, *, modules: Sequence[str] | None = None,
                ratios: Sequence[float] | None = None, variants: Sequence[str] | None = None,
                space_file: str | os.PathLike | None = None) -> Space:
    """The space for ``model``: every choice checked as rules, every stage's variants checked against its sites.

    A variant that a stage's sites do not allow (``post`` at a concat site) is left out
    of that stage's choices; a stage whose rule selects no site is not searched.

    Example:
        >>> from se_surgery.hub import build_for_training
        >>> s = build_space(build_for_training("timm:test_resnet", 10), 32, ratios=[8, 16])
        >>> sorted(s.choices), s.choices[1]
        ([1, 2, 3, 4], ('off', 'se/8/standard', 'se/8/post', 'se/16/standard', 'se/16/post'))
    """
    from .._plan import plan_from
    from .._rules import load_rules
    from .._sites import discover

    spec = read_space(space_file) if space_file is not None else {}
    modules = list(modules or spec.get("module") or ["se"])
    ratios = list(ratios or spec.get("ratio") or RATIOS)
    variants = list(variants or spec.get("variant") or VARIANTS)
    select, defaults = dict(spec.get("select", {})), dict(spec.get("defaults", {}))
    combos = _combos(modules, ratios, variants, select, defaults)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = discover(model, input_size)
        stages = sorted({s.stage for s in d.sites})
        wanted = [int(s) for s in spec.get("stages", stages)]
        unknown = [s for s in wanted if s not in stages]
        if unknown:
            raise SearchError(f"--space {space_file}: stage(s) {unknown} not in {type(model).__name__}, whose sites "
                              f"are in stages {stages}")
        choices: dict[int, tuple[str, ...]] = {}
        for s in wanted:
            ok = []
            for v in variants:
                try:
                    p = plan_from(load_rules({"defaults": defaults, "rules": [
                        {"select": {"stage": s, **select}, "module": modules[0], "variant": v}]}), d)
                except (PlanError, RuleError):
                    continue
                if p.selected:
                    ok.append(v)
            stage_choices = [c for c in combos if _parse_choice(c)["variant"] in ok]
            if stage_choices:
                choices[s] = (OFF, *stage_choices)
    if not choices:
        raise SearchError(f"nothing to search: no stage of {type(model).__name__} has a site that the choices "
                          f"({', '.join(combos)}) fit")
    return Space(choices, select, defaults)


def _combos(modules: list, ratios: list, variants: list, select: dict, defaults: dict) -> list[str]:
    """Every ``module/ratio/variant`` choice (no ratio for a module without one), each checked as a rule."""
    from .._rules import load_rules
    from ..modules import accepts, module_names

    combos: list[str] = []
    for m in modules:
        for r in (ratios if m in module_names() and accepts(m, "ratio") else [None]):
            for v in variants:
                c = _choice(m, r, v)
                if c not in combos:
                    combos.append(c)
    for c in combos:
        try:
            load_rules({"defaults": defaults, "rules": [{"select": {"stage": 1, **select}, **_parse_choice(c)}]})
        except RuleError as e:
            raise SearchError(f"search choice {c} (module/ratio/variant): {e}") from None
    return combos


# --------------------------------------------------------------------------- study


def _study_name(config: SweepConfig, settings: dict) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str)
    tag = "".join(ch if ch.isalnum() else "-" for ch in f"{config.model}-{Path(config.data).name}")
    return f"{tag}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def _storage(spec: str | None, out: Path, name: str):
    """``spec`` as Optuna storage: a URL as given, a ``.db``/``.sqlite`` path as SQLite, any other path (and the
    default, ``<out's folder>/<study>.journal``) as a journal file; returns (storage, where)."""
    optuna = _optuna()
    if spec is not None and "://" in spec:
        try:
            return optuna.storages.RDBStorage(spec), spec
        except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver, a server that is down
            raise SearchError(f"--storage {spec}: cannot open it ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]})") from None
    path = Path(spec) if spec is not None else out.parent / f"{name}.journal"
    if not path.parent.is_dir():
        raise SearchError(f"--storage {str(path)!r}: folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise SearchError(f"--storage {str(path)!r} is a directory; give a file such as study.journal")
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        return _storage(f"sqlite:///{path.resolve()}", out, name)
    from optuna.storages import JournalStorage

    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # Optuna 3.x names it JournalFileStorage
        from optuna.storages import JournalFileStorage as JournalFileBackend  # type: ignore[attr-defined,no-redef]

    return JournalStorage(JournalFileBackend(str(path))), str(path)


def _sampler(name: str, seed: int | None = None):
    optuna = _optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # constant_liar: concurrent workers see each other's running trials and spread out.
            return optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=seed)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
    raise SearchError(f"--sampler {name!r}: use tpe or nsga2")


def _open_study(storage, name: str, sampler, settings: dict, explicit: bool):
    optuna = _optuna()
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, load_if_exists=True,
                                directions=["maximize", "minimize"])
    stored, mine = study.user_attrs.get("se_surgery"), json.loads(json.dumps(settings, default=str))
    if stored is None:
        study.set_user_attr("se_surgery", mine)
    elif stored != mine:
        flat = {**mine, **{f"config.{k}": v for k, v in mine["config"].items()}}
        old = {**stored, **{f"config.{k}": v for k, v in stored.get("config", {}).items()}}
        diff = sorted(k for k in set(flat) | set(old) if k != "config" and flat.get(k) != old.get(k))
        shown = ", ".join(f"{k}: {_short(old.get(k))} there, {_short(flat.get(k))} here" for k in diff[:3])
        hint = "; give another --study" if explicit else ""
        raise SearchError(f"study {name!r} was run with other settings ({shown}){hint}")
    return study


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _fail_gone(study, log) -> None:
    """Mark failed the running trials of workers on this host that no longer exist (killed, not interrupted)."""
    optuna = _optuna()
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == host and isinstance(pid, int) and pid != os.getpid() and not _alive(pid):
            with contextlib.suppress(ValueError, RuntimeError):  # another worker got there first
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                log(f"trial {t.number}: its worker (pid {pid}) is gone; marked failed")


def _counted(study, below: int | None = None) -> int:
    states = _optuna().trial.TrialState
    return sum(1 for t in study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.RUNNING))
               if below is None or t.number < below)


# --------------------------------------------------------------------------- run


class _Pruned(Exception):
    def __init__(self, seed: int, epoch: int, steps: int, accuracy: float):
        super().__init__(f"pruned at seed {seed}, epoch {epoch}")
        self.seed, self.epoch, self.steps, self.accuracy = seed, epoch, steps, accuracy


def _median_says_stop(study, seed: int, epoch: int, accuracy: float, after: int) -> bool:
    states = _optuna().trial.TrialState
    key = f"acc_s{seed}_e{epoch}"
    seen = [t.user_attrs[key] for t in study.get_trials(deepcopy=False, states=(states.COMPLETE,))
            if key in t.user_attrs]
    return len(seen) >= after and accuracy < statistics.median(seen)


@dataclass
class _Run:
    """What every trial of this worker shares."""

    model: nn.Module
    data: Data
    config: SweepConfig
    space: Space
    cost: str
    seeds: int
    pruner: str
    prune_after: int
    out: Path
    d: Dist
    study: Any  # optuna.Study on rank 0, None elsewhere
    name: str
    done: dict  # key -> finished record in out (a trial trained but not told before an interruption)
    progress: bool

    def _baseline_accuracy(self, seed: int) -> float | None:
        states = _optuna().trial.TrialState
        for t in self.study.get_trials(deepcopy=False, states=(states.COMPLETE,)):
            if t.params == self.space.baseline() and "accuracy_by_seed" in t.user_attrs:
                return t.user_attrs["accuracy_by_seed"][seed]
        return None

    def hook(self, trial, seed: int):
        """After each epoch but the last: the median rule on the test accuracy (rank 0 decides for all ranks)."""
        def on_epoch(model, epoch: int, steps: int) -> None:
            c = self.config
            if epoch >= c.epochs or (c.max_steps is not None and steps >= c.max_steps):
                return
            _, correct, total = evaluate(model, self.data.test, self.d, workers=self.data.workers)
            stop = None
            if self.d.rank == 0:
                trial.set_user_attr(f"acc_s{seed}_e{epoch}", correct / total)
                stop = _median_says_stop(self.study, seed, epoch, correct / total, self.prune_after)
            if self.d.broadcast(stop):
                raise _Pruned(seed, epoch, steps, correct / total)
        return on_epoch

    def evaluate_trial(self, number: int, params: dict, trial) -> None:
        """Run the trial on every seed (all ranks); rank 0 appends the lines and tells the study."""
        resolved = self.space.rules(params)
        label = self.space.placement(params)
        setting = (label, None, None, None)
        # latency: the placement's measured eager CPU latency ratio to the base (studies.bench)
        cost = {"sites": 0, "added_params": 0, "added_macs": 0, "latency_ratio": 1.0} if resolved is None else \
            _costs(self.model, {setting: resolved}, self.data.input_size, latency=self.cost == "latency")[setting]
        extra = {"trial": number, "study": self.name, "placement": label, "trial_rules": resolved}
        recs = []
        for seed in range(self.seeds):
            t = Trial(None if resolved is None else label, None, None, None, seed)
            key = _key(t, self.config, resolved, self.data.input_size, self.d.world)
            if key in self.done:
                rec = dict(self.done[key], **extra)
            else:
                on_epoch = None if self.pruner == "none" or resolved is None else self.hook(trial, seed)
                try:
                    rec = _run_trial(self.model, t, resolved, cost, self.data, self.config, self.d, key,
                                     self.progress, on_epoch=on_epoch)
                except _Pruned as p:
                    if self.d.rank == 0:
                        _append(self.out, {"key": key, "model": self.config.model, "data": self.config.data,
                                           "rules": label, "seed": seed, "state": "pruned", "epoch": p.epoch,
                                           "steps": p.steps, "accuracy": p.accuracy, **extra})
                        trial.set_user_attr("pruned_at", {"seed": seed, "epoch": p.epoch, "steps": p.steps,
                                                          "accuracy": p.accuracy})
                        self._describe(trial, label, resolved, cost)
                        self.study.tell(trial, state=_optuna().trial.TrialState.PRUNED)
                    self.d.log(f"[trial {number}] {label}: pruned after epoch {p.epoch} of seed {seed} "
                               f"(accuracy {100 * p.accuracy:.2f}% below the median)")
                    return
                if self.d.rank == 0:
                    base = rec["accuracy"] if resolved is None else self._baseline_accuracy(seed)
                    rec.update(baseline_accuracy=base, state="complete", **extra)
                    _append(self.out, rec)
            recs.append(rec)
        if self.d.rank == 0:
            accs = [r["accuracy"] for r in recs]
            trial.set_user_attr("accuracy_by_seed", accs)
            trial.set_user_attr("seconds", round(sum(r["seconds"] for r in recs), 3))
            self._describe(trial, label, resolved, cost)
            objective = cost["latency_ratio"] if self.cost == "latency" else cost[f"added_{self.cost}"]
            self.study.tell(trial, [statistics.fmean(accs), float(objective)])
        self.d.log(f"[trial {number}] {label}: accuracy {_mean_std([r['accuracy'] for r in recs])}%, "
                   f"+{cost['added_params']:,} params, +{cost['added_macs']:,} MACs, {recs[-1]['steps']} steps, "
                   f"{sum(r['seconds'] for r in recs):.1f} s")

    @staticmethod
    def _describe(trial, label: str, resolved, cost: dict) -> None:
        for k, v in (("placement", label), ("rules", resolved), ("added_params", cost["added_params"]),
                     ("added_macs", cost["added_macs"]), ("sites", cost["sites"]),
                     ("latency_ratio", cost.get("latency_ratio"))):
            trial.set_user_attr(k, v)

    def next_trial(self, target: int, deadline: float | None):
        """Rank 0: the next trial to train as (trial, params), or None; duplicates are answered here."""
        optuna = _optuna()
        states = optuna.trial.TrialState
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                self.d.log("--timeout reached: no new trial")
                return None
            _fail_gone(self.study, self.d.log)
            if _counted(self.study) >= target:
                return None
            # The reference every placement is compared with, first in the study.
            self.study.enqueue_trial(self.space.baseline(), skip_if_exists=True)
            trial = self.study.ask()
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
            trial.set_user_attr("out", str(self.out))
            if _counted(self.study, below=trial.number) >= target:  # another worker asked at the same moment
                trial.set_user_attr("surplus", True)
                self.study.tell(trial, state=states.FAIL)
                return None
            params = {self.space.param(s): trial.suggest_categorical(self.space.param(s), list(c))
                      for s, c in self.space.choices.items()}
            same = [t for t in self.study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED))
                    if t.params == params]
            if not same:
                return trial, params
            src = same[0]
            trial.set_user_attr("duplicate_of", src.number)
            for k in ("placement", "rules", "added_params", "added_macs", "sites", "accuracy_by_seed"):
                if k in src.user_attrs:
                    trial.set_user_attr(k, src.user_attrs[k])
            if src.state == states.COMPLETE:
                self.study.tell(trial, src.values)
            else:
                self.study.tell(trial, state=states.PRUNED)
            self.d.log(f"[trial {trial.number}] {self.space.placement(params)}: same placement as trial "
                       f"{src.number} ({src.state.name.lower()}), answered from the study")


def _check_args(cost: str, trials: int, seeds: int, pruner: str, prune_after: int, timeout: float | None) -> None:
    _check_cost(cost)
    for name, value, low in (("trials", trials, 0), ("seeds", seeds, 1), ("prune-after", prune_after, 1)):
        if value < low:
            raise SearchError(f"--{name} {value}: must be at least {low}")
    if pruner not in ("median", "none"):
        raise SearchError(f"--pruner {pruner!r}: use median or none")
    if timeout is not None and not timeout > 0:
        raise SearchError(f"--timeout {timeout}: must be a positive number of seconds")


def _check_cost(cost: str) -> None:
    if cost not in COSTS:
        raise SearchError(f"--objective {cost!r}: the cost objective is one of {', '.join(COSTS)}")


def run(model: nn.Module, data: Data, config: SweepConfig, *, space: Space, cost: str = "params", trials: int = 20,
        timeout: float | None = None, seeds: int = 1, storage: str | None = None, study: str | None = None,
        sampler: str = "tpe", sampler_seed: int | None = None, pruner: str = "median", prune_after: int = 4,
        out: str | Path = "search.jsonl",
        export_path: str | Path | None = None, plot_path: str | Path | None = None, device: str | None = None,
        progress: bool | None = None) -> list[dict]:
    """Run (or resume, or with ``trials=0`` only report) a search; return :func:`summaries` of the study.

    ``model`` is the base (with its head for ``data``; not changed). ``trials`` is the
    study's total over every worker. ``sampler_seed`` makes one worker's proposals
    repeatable (workers sharing a study should leave it out or give each its own).
    Rank 0 prints a line per trial and, at the end, the Pareto front (:func:`front_table`);
    it writes ``export_path`` (:func:`export`) and ``plot_path`` (:func:`plot`).

    Example (three trials in a space of 3 placements, two optimizer steps each):
        >>> import tempfile
        >>> from se_surgery.studies.train import load_data
        >>> from se_surgery.hub import build_for_training
        >>> data = load_data("digits", 16)
        >>> base = build_for_training("timm:test_resnet", data.classes)
        >>> space = Space({4: ("off", "se/16/post", "se/4/post")})
        >>> cfg = SweepConfig("timm:test_resnet", "digits", max_steps=2, lr=0.05)
        >>> out = tempfile.mkdtemp() + "/search.jsonl"
        >>> rows = run(base, data, cfg, space=space, trials=3, out=out, device="cpu",
        ...            sampler_seed=0)  # doctest: +ELLIPSIS
        timm:test_resnet on digits: study ...
        >>> [(r["trial"], r["placement"], r["added_params"]) for r in rows]
        [(0, 's4=-', 0), (1, 's4=se/16/post', 1254), (2, 's4=se/4/post', 4728)]
    """
    optuna = _optuna()
    config.check()
    _check_args(cost, trials, seeds, pruner, prune_after, timeout)
    if export_path is not None and not Path(export_path).absolute().parent.is_dir():
        raise SearchError(f"--export {str(export_path)!r}: folder {str(Path(export_path).parent)!r} does not exist")
    out = Path(out)
    d = Dist(device)
    try:
        # File names, not paths: workers on other machines mount the same files elsewhere.
        cfg = dict(asdict(config), data=Path(config.data).name,
                   weights=None if config.weights is None else Path(config.weights).name)
        settings = {"config": cfg, "input_size": list(data.input_size), "seeds": seeds, "cost": cost,
                    "space": space.to_dict(), "world": d.world}
        name = study or _study_name(config, settings)
        st = None
        done: dict = {}
        if d.rank == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            storage_obj, where = _storage(storage, out, name)
            st = _open_study(storage_obj, name, _sampler(sampler, sampler_seed), settings, explicit=study is not None)
            done = {r["key"]: r for r in read_results(out) if r.get("state", "complete") == "complete"}
            finished = len(st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                    optuna.trial.TrialState.PRUNED)))
            d.log(f"{config.model} on {config.data}: study {name} in {where}; {trials} trials requested, {finished} "
                  f"finished; objectives: accuracy (max), added {cost} (min); {len(space.choices)} stages, "
                  f"{space.size:,} placements; {d.world} process(es) on {d.device.type}; results: {out}")
        done = d.broadcast(done)
        r = _Run(model, data, config, space, cost, seeds, pruner, prune_after, out, d, st, name, done,
                 d.rank == 0 and (progress if progress is not None else _tty()))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = r.next_trial(trials, deadline) if d.rank == 0 else None
            plain = d.broadcast(None if job is None else (job[0].number, job[1]))
            if plain is None:
                break
            trial = job[0] if job is not None else None
            try:
                r.evaluate_trial(plain[0], plain[1], trial)
            except BaseException:
                if d.rank == 0:  # an interrupted trial must not count as running forever
                    with contextlib.suppress(Exception):
                        st.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
        d.barrier()
        rows = summaries(st) if d.rank == 0 else []
        if d.rank == 0:
            d.log("")
            d.log(front_table(rows, cost))
            if export_path:
                best = export(rows, export_path, name)
                d.log(f"rules of trial {best['trial']} ({best['placement']}) written to {export_path}")
            if plot_path:
                pruned = len(st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))
                plot(rows, plot_path, cost, title=f"{config.model} on {config.data}: {len(rows)} placements "
                                                  f"completed, {pruned} trials pruned")
                d.log(f"plot written to {plot_path}")
        return rows
    finally:
        d.close()


# --------------------------------------------------------------------------- results


def summaries(study) -> list[dict]:
    """One dict per completed placement of ``study`` (a duplicate answered from the study is not repeated).

    Keys: ``trial``, ``placement``, ``accuracy`` (mean over seeds), ``accuracy_by_seed``,
    ``cost`` (the study's second objective), ``added_params``, ``added_macs``, ``sites``,
    ``rules`` (None for the baseline) and ``front`` (on the Pareto front).
    """
    states = _optuna().trial.TrialState
    rows = [{"trial": t.number, "placement": t.user_attrs.get("placement", ""), "accuracy": t.values[0],
             "accuracy_by_seed": t.user_attrs.get("accuracy_by_seed", [t.values[0]]), "cost": t.values[1],
             "added_params": t.user_attrs.get("added_params"), "added_macs": t.user_attrs.get("added_macs"),
             "sites": t.user_attrs.get("sites"), "rules": t.user_attrs.get("rules")}
            for t in study.get_trials(deepcopy=False, states=(states.COMPLETE,))
            if "duplicate_of" not in t.user_attrs]
    return front(rows)


def front(rows: list[dict]) -> list[dict]:
    """``rows`` with ``front`` set: True for the first trial at each point of the Pareto front.

    Example:
        >>> rows = front([{"trial": 0, "cost": 0, "accuracy": 0.9}, {"trial": 1, "cost": 10, "accuracy": 0.95},
        ...               {"trial": 2, "cost": 20, "accuracy": 0.93}])
        >>> [r["front"] for r in rows]
        [True, True, False]
    """
    points = set(pareto_front((r["cost"], r["accuracy"]) for r in rows))
    for r in sorted(rows, key=lambda r: r["trial"]):
        r["front"] = (r["cost"], r["accuracy"]) in points
        points.discard((r["cost"], r["accuracy"]))
    return rows


def front_table(rows: list[dict], cost: str = "params") -> str:
    """The Pareto front as a markdown table, by cost: accuracy (mean ± std over seeds, %), costs, placement.

    Example:
        >>> rows = front([{"trial": 0, "cost": 0, "accuracy": 0.9, "accuracy_by_seed": [0.9], "added_params": 0,
        ...                "added_macs": 0, "sites": 0, "placement": "s1=- s2=-"},
        ...               {"trial": 3, "cost": 88, "accuracy": 0.95, "accuracy_by_seed": [0.95], "added_params": 88,
        ...                "added_macs": 120, "sites": 1, "placement": "s1=- s2=se/16/post"}])
        >>> print(front_table(rows))
        Pareto front: 2 of 2 completed placements (accuracy up, added params down)
        <BLANKLINE>
        | trial | accuracy % | added params | added MACs | sites | placement |
        |---|---|---|---|---|---|
        | 0 | 90.00 | 0 | 0 | 0 | s1=- s2=- |
        | 3 | 95.00 | 88 | 120 | 1 | s1=- s2=se/16/post |
    """
    on = sorted((r for r in rows if r["front"]), key=lambda r: (r["cost"], -r["accuracy"]))
    latency = cost == "latency"
    head = ["trial", "accuracy %", *(["latency / base"] if latency else []), "added params", "added MACs", "sites",
            "placement"]
    down = "latency" if latency else f"added {cost}"
    lines = [f"Pareto front: {len(on)} of {len(rows)} completed placements (accuracy up, {down} down)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in on:
        cells = [r["trial"], _mean_std(r["accuracy_by_seed"]), *([f"{r['cost']:.3f}"] if latency else []),
                 *(_count(r.get(k)) for k in ("added_params", "added_macs", "sites")), r["placement"] or "?"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def _count(n) -> str:
    return "?" if n is None else f"{n:,}"  # "?": a trial added to the study by other means than search


def best(rows: list[dict]) -> dict:
    """The most accurate placement with attention (fewest added parameters among equals, then the earliest)."""
    with_attention = [r for r in rows if r.get("rules")]
    if not with_attention:
        raise SearchError("--export: no completed trial adds attention yet (run some trials first)")
    return min(with_attention, key=lambda r: (-r["accuracy"], r["added_params"], r["trial"]))


def export(rows: list[dict], path: str | Path, study: str = "") -> dict:
    """Write the rules of :func:`best` to ``path`` (YAML that ``se-surgery check`` accepts); return its row."""
    import yaml

    from .._rules import load_rules

    b = best(rows)
    head = (f"# se-surgery search, study {study}, trial {b['trial']}: accuracy {100 * b['accuracy']:.2f}% "
            f"(mean of {len(b['accuracy_by_seed'])} seed(s)), +{b['added_params']:,} params, "
            f"+{b['added_macs']:,} MACs\n# placement: {b['placement']}\n")
    load_rules(b["rules"])  # what is written must be what check and apply accept
    try:
        Path(path).write_text(head + yaml.safe_dump(b["rules"], sort_keys=False))
    except OSError as e:
        raise SearchError(f"--export {str(path)!r}: cannot write it: {e.strerror or e}") from None
    return b


def plot(rows: list[dict], path: str | Path, cost: str = "params", title: str = "") -> None:
    """Accuracy (mean over seeds, bars: min to max) against the cost, every completed placement, the front drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SESurgeryError("--plot needs matplotlib: pip install 'se-surgery[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for on, color, label in ((False, "0.6", "trial"), (True, "C3", "Pareto front")):
        rs = [r for r in rows if r["front"] == on]
        if not rs:
            continue
        ys = [100 * r["accuracy"] for r in rs]
        lo = [y - 100 * min(r["accuracy_by_seed"]) for y, r in zip(ys, rs)]
        hi = [100 * max(r["accuracy_by_seed"]) - y for y, r in zip(ys, rs)]
        ax.errorbar([r["cost"] for r in rs], ys, yerr=[lo, hi], fmt="o", color=color, ms=7 if on else 4,
                    label=label, zorder=3 if on else 2, capsize=2)
    pts = sorted((r["cost"], 100 * r["accuracy"]) for r in rows if r["front"])
    if pts:
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="C3", lw=1, ls="--")
    for r in rows:
        if not r.get("rules"):
            ax.scatter([r["cost"]], [100 * r["accuracy"]], marker="*", s=120, color="k", zorder=4,
                       label="baseline (no attention)")
    seeds = max((len(r["accuracy_by_seed"]) for r in rows), default=1)
    ax.set(xlabel={"params": "added parameters", "macs": "added MACs"}.get(cost, "measured latency / base"),
           ylabel=f"test accuracy (%, mean of {seeds} seed(s))", title=title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise SearchError(f"--plot {str(path)!r}: cannot write it: {e.strerror or e}") from None
    finally:
        plt.close(fig)
