"""``se-surgery sweep``: the paper's placement studies (stages, variants, ratios) on your model and data.

Trials are the product of the rule sets, variants, ratios and modules given, times
seeds. A variant, ratio or module given here overrides the rule set's: it is written
into the rules' ``defaults`` and into every (non-skip) rule, so it wins whatever the
rules said. Each trial applies SE to a copy of the base model, fine-tunes it with the
same data, seed, schedule and budget, and evaluates it; one baseline per seed gets the
same fine-tuning without SE.

One JSON line per trial is appended to the output as the trial finishes; each carries a
``key`` hashed from its full configuration, and a trial whose key is already in the
file is skipped, so re-running the same command resumes an interrupted sweep.
``shard=(i, n)`` (``--trial i/n``) runs every n-th SE trial starting at i; each shard
also runs (or reuses) the baselines of its seeds, so every shard's file is complete.

Under ``torchrun`` every trial runs on all ranks (DistributedDataParallel); only rank 0
reads and writes the output.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..errors import RuleError, SESurgeryError, SESurgeryWarning
from .train import Data, Dist, evaluate, se_drift, seed_everything, train

__all__ = [
    "SweepConfig",
    "SweepError",
    "SweepWarning",
    "Trial",
    "finished",
    "overlay",
    "pareto_front",
    "parse_shard",
    "plot",
    "read_results",
    "run",
    "table",
    "trials",
    "check_data",
    "check_input_size",
    "check_out",
]

# Fields of a trial's JSON line that describe its setting (the table groups by them).
SETTING = ("rules", "variant", "ratio", "module")
# Bounds that turn a typo into one line before anything trains: a sweep of 10^12 seeds
# would only fill memory with trial objects, an input of 10^5 pixels a side asks torch
# for terabytes.
MAX_SEEDS, MAX_SIDE, MAX_EPOCHS, MAX_BATCH = 10_000, 4096, 100_000, 1_000_000
# What a trial record must hold, and the types each field may have (resume reads them).
_RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "key": (str,), "accuracy": (int, float), "baseline_accuracy": (int, float), "seed": (int,),
    "added_params": (int,), "added_macs": (int,), "seconds": (int, float)}


class SweepError(SESurgeryError, ValueError):
    """A sweep setting is invalid (a bad ``--trial``, ``--seeds``, budget or results file)."""


class SweepWarning(SESurgeryWarning):
    """A results-file line that was skipped (it will run again)."""


@dataclass(frozen=True)
class SweepConfig:
    """What every trial of a sweep shares: the base model, the data and the fine-tuning budget."""

    model: str  # as given on the command line (recorded, and part of the trial key)
    data: str  # "digits" or the ImageFolder directory
    weights: str | None = None
    pretrained: bool = False
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64  # per process
    lr: float = 1e-3  # base model
    se_lr: float = 1e-2  # SE modules
    momentum: float = 0.9
    weight_decay: float = 1e-4
    freeze_base: bool = False

    def check(self) -> None:
        """Raise :class:`SweepError` for a budget that cannot train (messages name the parameters).

        Example:
            >>> SweepConfig("m", "digits", lr=float("nan")).check()
            Traceback (most recent call last):
            ...
            se_surgery.studies.sweep.SweepError: lr nan: must be a finite number from 0 to 1000
        """
        for name, hi in (("epochs", MAX_EPOCHS), ("batch_size", MAX_BATCH)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
                raise SweepError(f"{name} {v!r}: must be an integer from 1 to {hi:,}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise SweepError(f"max_steps {self.max_steps!r}: must be at least 1 (or left out)")
        for name, lo, top in (("lr", 0.0, 1e3), ("se_lr", 0.0, 1e3), ("momentum", 0.0, 1.0),
                              ("weight_decay", 0.0, 1e3)):
            x = getattr(self, name)
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or not lo <= x <= top:
                raise SweepError(f"{name} {x!r}: must be a finite number from {lo:g} to {top:g}")


@dataclass(frozen=True)
class Trial:
    """One point of the sweep; ``rules=None`` is the baseline (no SE) of its seed.

    Example:
        >>> Trial("late_stages", "pre", 8.0, None, 1).label
        'late_stages variant=pre ratio=8'
        >>> Trial(None, None, None, None, 0).label
        'baseline (no SE)'
    """

    rules: str | None
    variant: str | None
    ratio: float | None
    module: str | None
    seed: int

    @property
    def baseline(self) -> bool:
        return self.rules is None

    @property
    def label(self) -> str:
        if self.baseline:
            return "baseline (no SE)"
        parts = [cast(str, self.rules)] + [
            f"{k}={_fmt(v)}" for k, v in (("variant", self.variant), ("ratio", self.ratio), ("module", self.module))
            if v is not None]
        return " ".join(parts)


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` (``--trial``) as ``(i, n)`` with ``0 <= i < n``; ``None`` is the whole sweep ``(0, 1)``.

    Example:
        >>> parse_shard("1/4"), parse_shard(None)
        ((1, 4), (0, 1))
        >>> parse_shard("4/4")
        Traceback (most recent call last):
        ...
        se_surgery.studies.sweep.SweepError: trial '4/4': expected I/N with 0 <= I < N, such as 0/2 and 1/2
    """
    if text is None:
        return 0, 1
    i_text, sep, n_text = str(text).partition("/")
    try:
        i, n = int(i_text), int(n_text)
    except ValueError:
        i, n = -1, 0
    if not sep or not 0 <= i < n:
        raise SweepError(f"trial {text!r}: expected I/N with 0 <= I < N, such as 0/2 and 1/2")
    return i, n


def overlay(rules, variant: str | None = None, ratio: float | None = None, module: str | None = None) -> dict:
    """The rules (path, preset or dict) as a dict, with the given options forced on every site they select.

    Each given option is written into ``defaults`` and into every rule that is not a
    ``skip``, so it overrides whatever the rule set said; the result is validated.

    Example:
        >>> r = overlay("late_stages", variant="pre", ratio=8)
        >>> r["defaults"]["variant"], r["defaults"]["ratio"], r["rules"][0]["variant"]
        ('pre', 8, 'pre')
    """
    from .._rules import load_rules

    given = {k: v for k, v in (("variant", variant), ("ratio", ratio), ("module", module)) if v is not None}
    if "ratio" in given and float(given["ratio"]).is_integer():
        given["ratio"] = int(given["ratio"])  # 16, not 16.0, in the recorded rules
    data = load_rules(rules).to_dict()
    data["defaults"].update(given)
    for rule in data["rules"]:
        if not rule.get("skip"):
            rule.update(given)
    try:
        load_rules(data)
    except RuleError as e:
        opts = " ".join(f"{k}={_fmt(v)}" for k, v in given.items())
        raise RuleError(f"rules {rules} with {opts}: {e}") from None
    return data


def trials(rules: Sequence[str], variants: Sequence = (None,), ratios: Sequence = (None,),
           modules: Sequence = (None,), seeds: int = 1) -> list[Trial]:
    """Every SE trial of a sweep, seed-major (a whole seed first: an interrupted sweep compares every setting).

    ``None`` in ``variants``, ``ratios`` or ``modules`` keeps the rule set's own. The
    baselines (one per seed) are not in the list: :func:`run` adds them.

    Example:
        >>> [t.label + f" seed {t.seed}" for t in trials(["all_stages", "late_stages"], ["pre"], seeds=2)][:3]
        ['all_stages variant=pre seed 0', 'late_stages variant=pre seed 0', 'all_stages variant=pre seed 1']
    """
    if not isinstance(seeds, int) or isinstance(seeds, bool) or not 1 <= seeds <= MAX_SEEDS:
        raise SweepError(f"seeds {seeds!r}: must be an integer from 1 to {MAX_SEEDS:,}")
    for r in ratios:
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)):
            raise SweepError(f"ratios: {r!r} is not a finite number")
    settings = list(itertools.product(rules, variants, [None if r is None else float(r) for r in ratios], modules))
    return [Trial(*s, seed=seed) for seed in range(seeds) for s in settings]


def _key(trial: Trial, config: SweepConfig, resolved: dict | None, input_size, world: int) -> str:
    cfg = dataclasses.asdict(config)
    if trial.baseline:
        cfg.pop("se_lr")  # the baseline has no SE: adding SE settings to a sweep must not redo it
    blob = {"config": cfg, "input_size": list(input_size), "world": world, "seed": trial.seed,
            "setting": [trial.rules, trial.variant, trial.ratio, trial.module], "rules": resolved}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _record_problem(rec) -> str | None:
    """Why a parsed line is not a usable trial record, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    for k, types in _RECORD_TYPES.items():
        v = rec.get(k)
        if k not in rec:
            return f"no {k!r} field"
        if isinstance(v, bool) or not isinstance(v, types):
            return f"field {k!r} is {type(v).__name__}, not {' or '.join(t.__name__ for t in types)}"
    for k in ("accuracy", "baseline_accuracy"):
        if not math.isfinite(rec[k]) or not 0 <= rec[k] <= 1:
            return f"{k} {rec[k]!r} is not a fraction from 0 to 1"
    for k in SETTING:
        if rec.get(k) is not None and not isinstance(rec[k], (str, int, float)):
            return f"field {k!r} is {type(rec[k]).__name__}, not a string or number"
    return None


def read_results(path: str | Path) -> list[dict]:
    """The trial records (JSON lines) in ``path``; ``[]`` if it does not exist.

    A line that is not a usable trial record (a write cut by an interruption, bytes that
    are not UTF-8, a field of the wrong type, no ``accuracy``, an accuracy that is NaN or
    outside [0, 1]) is skipped with a warning naming the file and line: that trial runs again.

    Example:
        >>> read_results("/no/such/results.jsonl")
        []
    """
    p = Path(path)
    try:
        if not p.exists():
            return []
        if not p.is_file():
            raise SweepError(f"out {str(path)!r}: not a file (a directory or device); give a results file name")
        raw = p.read_bytes()
    except OSError as e:
        raise SweepError(f"out {str(path)!r}: cannot read it: {e.strerror or e}") from None
    out = []
    for i, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"), parse_constant=float)  # NaN, Infinity: refused below
            why = _record_problem(rec)
        except UnicodeDecodeError:
            why = "not UTF-8 text"
        except (ValueError, RecursionError):
            why = "not a JSON trial record"
        if why:
            warnings.warn(f"{path}:{i}: {why}; line ignored (that trial runs again)", SweepWarning, stacklevel=2)
            continue
        out.append(rec)
    return out


def check_out(path: str | Path) -> None:
    """Refuse a results file that cannot be read or appended to, before anything trains (creates nothing).

    Example:
        >>> import tempfile
        >>> f = tempfile.mkdtemp() + "/a_file"
        >>> _ = open(f, "w").write("")
        >>> check_out(f + "/results.jsonl")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        se_surgery.studies.sweep.SweepError: out '.../a_file/results.jsonl': '.../a_file' is not a folder
    """
    p = Path(path)
    try:
        if p.exists():
            if not p.is_file():
                raise SweepError(f"out {str(path)!r}: not a file (a directory or device); give a results file name")
            if not os.access(p, os.R_OK | os.W_OK):
                raise SweepError(f"out {str(path)!r}: no permission to read and append to it")
            return
        folder = p.parent
        while not folder.exists():  # the folders run() will create
            folder = folder.parent
        if not folder.is_dir():
            raise SweepError(f"out {str(path)!r}: {str(folder)!r} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SweepError(f"out {str(path)!r}: no permission to write in {str(folder)!r}")
    except OSError as e:  # a name longer than the file system allows
        raise SweepError(f"out {str(path)[:120]!r}: {e.strerror or e}") from None


def check_input_size(size: int | None) -> None:
    """Refuse a square input size a sweep cannot train at (``None``: the data's default).

    Example:
        >>> check_input_size(100000)
        Traceback (most recent call last):
        ...
        se_surgery.studies.sweep.SweepError: input_size 100000: must be an integer from 8 to 4096 (pixels a side)
    """
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= MAX_SIDE):
        raise SweepError(f"input_size {size!r}: must be an integer from 8 to {MAX_SIDE} (pixels a side)")


def check_data(data: Data) -> None:
    """Refuse data a sweep cannot learn from, before anything trains: fewer than two
    classes, an empty split, an input size out of bounds, or images that cannot be read.

    Example:
        >>> from se_surgery.studies.train import load_data
        >>> check_data(load_data("digits", 16))
    """
    check_input_size(data.size)
    if data.classes < 2:
        raise SweepError(f"data: {data.classes} class(es); classification needs at least 2")
    for split in ("train", "test"):
        ds = getattr(data, split)
        if len(ds) == 0:
            raise SweepError(f"data: the {split} split has no images")
        try:
            ds[0]
        except (OSError, ValueError, RuntimeError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise SweepError(f"data: the first {split} image cannot be read ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _append(path: Path, record: dict) -> None:
    # A line cut by an earlier interruption must not swallow this one.
    needs_newline = False
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as f:
            f.seek(-1, 2)
            needs_newline = f.read(1) != b"\n"
    with path.open("a") as f:
        f.write(("\n" if needs_newline else "") + json.dumps(record) + "\n")
        f.flush()


def _one(values: Iterable):
    vals = set(values)
    return vals.pop() if len(vals) == 1 else ("mixed" if vals else None)


def _checksum(model: nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in model.parameters()))


def _probe(dataset, n: int = 64) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def _fine_tune(model: nn.Module, data: Data, config: SweepConfig, d: Dist, seed: int, se: bool,
               desc: str, progress: bool, on_epoch=None) -> int:
    import se_surgery

    if config.freeze_base:
        if not se:
            return 0  # the same fine-tuning without SE trains nothing: the baseline is the base as loaded
        se_surgery.mark_only_se_trainable(model)
    if se:
        groups = se_surgery.param_groups(model, lr=config.lr, se_lr=config.se_lr, weight_decay=config.weight_decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr,
                   "weight_decay": config.weight_decay}]
    opt = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    return train(model, data.train, opt, d, epochs=config.epochs, batch_size=config.batch_size, seed=seed,
                 max_steps=config.max_steps, workers=data.workers, desc=desc, progress=progress, on_epoch=on_epoch)


def _run_trial(base: nn.Module, trial: Trial, resolved: dict | None, cost: dict, data: Data, config: SweepConfig,
               d: Dist, key: str, progress: bool, on_epoch=None) -> dict:
    """Fine-tune and evaluate one trial; ``on_epoch(model, epoch, steps)`` runs after each epoch (search prunes)."""
    import se_surgery

    start = time.perf_counter()
    seed_everything(trial.seed)
    model = copy.deepcopy(base)
    if resolved is not None:
        # Seeded before apply(): the SE modules' first FC starts from the same draw on every rank.
        # The plan priced before the first trial: the sweep traces the model once, not per trial.
        model = se_surgery.apply(model, cost["plan"], inplace=True)
    model.to(d.device)
    hook = None if on_epoch is None else (lambda epoch, steps: on_epoch(model, epoch, steps))
    steps = _fine_tune(model, data, config, d, trial.seed, resolved is not None, trial.label, progress, hook)
    _, correct, total = evaluate(model, data.test, d, workers=data.workers)
    drift = se_drift(model, _probe(data.test).to(d.device)) if resolved is not None else {}
    seconds = time.perf_counter() - start
    agree = None
    if d.distributed:
        sums: list[Any] = [None] * d.world
        torch.distributed.all_gather_object(sums, _checksum(model))
        agree = all(s == sums[0] for s in sums)
    rec = {"key": key, "model": config.model, "data": config.data, "rules": trial.rules,
           "variant": cost.get("variant"), "ratio": cost.get("ratio"), "module": cost.get("module"),
           "seed": trial.seed, "baseline": trial.baseline, "sites": cost["sites"],
           "added_params": cost["added_params"], "added_macs": cost["added_macs"],
           "accuracy": correct / total, "correct": correct, "test_images": total,
           "epochs": config.epochs, "steps": steps, "freeze_base": config.freeze_base, "lr": config.lr,
           "se_lr": None if trial.baseline else config.se_lr, "batch_size": config.batch_size, "world": d.world,
           "input_size": list(data.input_size), **drift, "seconds": round(seconds, 3)}
    if "latency_ratio" in cost:
        rec["latency_ratio"] = cost["latency_ratio"]
    if agree is not None:
        rec["replicas_agree"] = agree  # DDP kept every rank's copy of the model identical
    return rec


def _costs(base: nn.Module, settings: dict, input_size, latency: bool = False) -> dict:
    """Validate every setting's plan on the model and price it, before any training.

    ``latency``: also measure each setting's eager CPU latency ratio to the base
    (:func:`se_surgery.studies.bench.bench`, batch 1, one thread, at the data's input size).
    """
    # From the modules: the package attribute se_surgery.plan is the submodule once
    # something imports it by that name (pytest's --doctest-modules does).
    from .._plan import analyze, plan
    from .._report import report

    out = {}
    analysis = analyze(base, input_size)  # traced once for every setting
    for setting, resolved in settings.items():
        p = plan(analysis, resolved)
        rep = report(analysis, p)
        opts = [e.options for e in p.selected]
        _, variant, ratio, module = setting
        out[setting] = {
            "sites": len(p.selected), "added_params": rep.added_params, "added_macs": rep.added_macs,
            "variant": variant if variant is not None else _one(o.variant for o in opts),
            "ratio": ratio if ratio is not None else _one(float(o.ratio) for o in opts),
            "module": module if module is not None else _one(getattr(o, "module", "se") for o in opts),
            "plan": p,
        }
        if latency:
            from .bench import bench

            row = bench(base, [resolved], input_size=tuple(input_size[1:]), rounds=15)[0]
            out[setting]["latency_ratio"] = row.ratio
    return out


def run(model: nn.Module, data: Data, config: SweepConfig, *, rules: Sequence[str], variants: Sequence = (None,),
        ratios: Sequence = (None,), modules: Sequence = (None,), seeds: int = 1, out: str | Path = "sweep.jsonl",
        shard: tuple[int, int] = (0, 1), device: str | None = None, plot: str | None = None,
        progress: bool | None = None, latency: bool = False) -> list[dict]:
    """Run a sweep over ``model`` (the base, with its head for ``data``; not changed) and return its records.

    Every setting is resolved, planned and priced before the first trial trains, so a
    rule that does not fit the model fails at once. Finished trials (their key is in
    ``out``) are skipped. Rank 0 appends one JSON line per trial to ``out``, prints a
    line per trial and, at the end, the markdown :func:`table` of this sweep's records
    (and writes ``plot``). Returns the records of this sweep (this shard's), old and new.
    ``latency=True`` records each setting's measured eager CPU ``latency_ratio`` to the base
    (batch 1, one thread; :mod:`se_surgery.studies.bench`) in its trials' records.

    Example (two SE settings and the baseline, three optimizer steps each):
        >>> import tempfile, se_surgery
        >>> from se_surgery.studies.train import load_data
        >>> from se_surgery.hub import build_for_training
        >>> data = load_data("digits", 16)
        >>> base = build_for_training("timm:test_resnet", data.classes)
        >>> cfg = SweepConfig("timm:test_resnet", "digits", max_steps=3, lr=0.05)
        >>> out = tempfile.mkdtemp() + "/sweep.jsonl"
        >>> recs = run(base, data, cfg, rules=["late_stages"], variants=["standard", "pre"], out=out,
        ...            device="cpu")  # doctest: +ELLIPSIS
        timm:test_resnet on digits: 3 trials (2 with SE, 1 baseline(s)), 1 process(es) on cpu; results: ...
        >>> [(r["rules"], r["variant"], r["steps"]) for r in recs]
        [(None, None, 3), ('late_stages', 'standard', 3), ('late_stages', 'pre', 3)]
    """
    check_data(data)
    if os.environ.get("RANK", "0") == "0":  # only rank 0 writes the results
        check_out(out)
    mine, settings = _plan_trials(config, rules, variants, ratios, modules, seeds, shard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        costs = _costs(model, settings, data.input_size, latency)
    d = Dist(device)
    try:
        return _sweep(model, data, config, d, mine, settings, costs, Path(out), plot,
                      d.rank == 0 and (progress if progress is not None else _tty()))
    finally:
        d.close()


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()


def _plan_trials(config: SweepConfig, rules, variants, ratios, modules, seeds: int, shard: tuple[int, int]):
    """This shard's trials with SE and the resolved rules of each setting (no model needed)."""
    config.check()
    shard_i, shard_n = shard
    if not 0 <= shard_i < shard_n:
        raise SweepError(f"shard {shard}: expected (i, n) with 0 <= i < n")
    if not rules:
        raise SweepError("rules: empty; name at least one rules file or preset")
    mine = trials(rules, variants, ratios, modules, seeds)[shard_i::shard_n]
    settings: dict = {}
    for t in mine:
        s = (t.rules, t.variant, t.ratio, t.module)
        if s not in settings:
            settings[s] = overlay(t.rules, t.variant, t.ratio, t.module)
    return mine, settings


def _order_and_keys(mine: list[Trial], settings: dict, config: SweepConfig, input_size, world: int):
    """Run order (per seed: the baseline, then the trials with SE) and each trial's key."""
    seeds = sorted({t.seed for t in mine})
    baselines = {s: Trial(None, None, None, None, s) for s in seeds}
    order = []
    for s in seeds:
        order.append(baselines[s])
        order += [t for t in mine if t.seed == s]
    keys = {t: _key(t, config, None if t.baseline else settings[(t.rules, t.variant, t.ratio, t.module)],
                    input_size, world) for t in order}
    return order, keys, baselines


def finished(config: SweepConfig, *, rules: Sequence[str], variants: Sequence = (None,), ratios: Sequence = (None,),
             modules: Sequence = (None,), seeds: int = 1, out: str | Path = "sweep.jsonl",
             shard: tuple[int, int] = (0, 1), input_size: tuple[int, int, int], world: int = 1) -> list[dict] | None:
    """The records of a sweep whose every trial is already in ``out`` (in run order), else None.

    Builds no model and loads no data: the trial keys come from the settings alone, so a
    resumed sweep with nothing left to run answers at once.

    Example:
        >>> cfg = SweepConfig("timm:test_resnet", "digits", max_steps=3)
        >>> finished(cfg, rules=["late_stages"], out="/no/such/sweep.jsonl", input_size=(3, 32, 32)) is None
        True
    """
    mine, settings = _plan_trials(config, rules, variants, ratios, modules, seeds, shard)
    order, keys, _ = _order_and_keys(mine, settings, config, input_size, world)
    done = {r["key"]: r for r in read_results(out)}
    return [done[keys[t]] for t in order] if all(keys[t] in done for t in order) else None


def _sweep(model, data, config, d: Dist, mine: list[Trial], settings: dict, costs: dict, out: Path,
           plot_path, progress: bool) -> list[dict]:
    order, keys, baselines = _order_and_keys(mine, settings, config, data.input_size, d.world)
    seeds = sorted({t.seed for t in mine})
    done = None
    if d.rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        done = {r["key"]: r for r in read_results(out)}
    done = d.broadcast(done)  # every rank skips the same trials, whether or not it sees the file
    skipped = sum(keys[t] in done for t in order)
    d.log(f"{config.model} on {config.data}: {len(order)} trials ({len(mine)} with SE, {len(seeds)} baseline(s)), "
          f"{d.world} process(es) on {d.device.type}; results: {out}")
    if skipped:
        d.log(f"skipped {skipped} finished trial(s) (already in {out})")
    base_cost = {"sites": 0, "added_params": 0, "added_macs": 0}
    records, by_key = [], dict(done)
    for i, t in enumerate(order, 1):
        key = keys[t]
        if key in done:
            records.append(done[key])
            continue
        setting = (t.rules, t.variant, t.ratio, t.module)
        resolved = None if t.baseline else settings[setting]
        rec = _run_trial(model, t, resolved, base_cost if t.baseline else costs[setting], data, config, d, key,
                         progress)
        base_acc = rec["accuracy"] if t.baseline else by_key[keys[baselines[t.seed]]]["accuracy"]
        rec["baseline_accuracy"] = base_acc
        by_key[key] = rec
        records.append(rec)
        if d.rank == 0:
            _append(out, rec)
        d.log(f"[{i}/{len(order)}] {t.label} seed {t.seed}: accuracy {100 * rec['accuracy']:.2f}% "
              f"(baseline {100 * base_acc:.2f}%), +{rec['added_params']:,} params, {rec['steps']} steps, "
              f"{rec['seconds']:.1f} s")
    d.barrier()
    if d.rank == 0:
        d.log("")
        d.log(table(records))
        if plot_path:
            plot(records, plot_path)
            d.log(f"plot written to {plot_path}")
    return records


def _mean_std(xs: list[float], scale: float = 100.0, sign: bool = False) -> str:
    # round(...) + 0.0 turns -0.0 into 0.0: a gain of -0.001 points prints +0.00, never -0.00
    m = round(scale * statistics.fmean(xs), 2) + 0.0
    s = round(scale * statistics.stdev(xs), 2) + 0.0 if len(xs) > 1 else None
    text = f"{m:+.2f}" if sign else f"{m:.2f}"
    return text if s is None else f"{text} ± {s:.2f}"


def table(records: list[dict]) -> str:
    """A markdown table of trial records: one row per setting, mean ± std over its seeds.

    Accuracy is in %, the gain over the baseline of the same seed in percentage points;
    added parameters and MACs are those of one model (``se_surgery.report``).

    Example:
        >>> recs = [{"rules": None, "variant": None, "ratio": None, "module": None, "seed": s, "accuracy": a,
        ...          "baseline_accuracy": a, "added_params": 0, "added_macs": 0, "seconds": 1.0}
        ...         for s, a in ((0, 0.9), (1, 0.8))]
        >>> recs += [dict(recs[s], rules="late_stages", variant="pre", ratio=16.0, module="se", accuracy=a,
        ...               added_params=100, added_macs=2000) for s, a in ((0, 0.95), (1, 0.8))]
        >>> print(table(recs))
        | rules | variant | ratio | module | seeds | accuracy % | gain (points) | added params | added MACs | s / trial |
        |---|---|---|---|---|---|---|---|---|---|
        | baseline (no SE) |  |  |  | 2 | 85.00 ± 7.07 | +0.00 ± 0.00 | 0 | 0 | 1.0 |
        | late_stages | pre | 16 | se | 2 | 87.50 ± 10.61 | +2.50 ± 3.54 | 100 | 2,000 | 1.0 |
    """  # noqa: E501 - doctest output must match verbatim
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(k) for k in SETTING), []).append(r)
    head = ["rules", "variant", "ratio", "module", "seeds", "accuracy %", "gain (points)", "added params",
            "added MACs", "s / trial"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # The baseline first, then the settings in the order they ran.
    for setting, rs in sorted(groups.items(), key=lambda g: g[0][0] is not None):
        name = setting[0] if setting[0] is not None else "baseline (no SE)"
        row = [name] + ["" if v is None else _fmt(v) for v in setting[1:]]
        row += [str(len(rs)), _mean_std([r["accuracy"] for r in rs]),
                _mean_std([r["accuracy"] - r["baseline_accuracy"] for r in rs], sign=True),
                f"{rs[0]['added_params']:,}", f"{rs[0]['added_macs']:,}",
                f"{statistics.fmean(r['seconds'] for r in rs):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both counts (fewer added parameters, higher accuracy), by cost.

    Example:
        >>> pareto_front([(0, 0.90), (10, 0.95), (20, 0.93), (30, 0.97), (5, 0.90)])
        [(0, 0.9), (10, 0.95), (30, 0.97)]
    """
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot(records: list[dict], path: str | Path) -> None:
    """Accuracy against added parameters, one marker per setting (mean ± std over its seeds), saved to ``path``.

    The Pareto front joins the settings whose mean no other setting beats on both counts
    (fewer added parameters, higher mean accuracy); dominated settings stay off it.

    Needs matplotlib (imported here, not with the package).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SESurgeryError("plot needs matplotlib: pip install 'se-surgery[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(k) for k in SETTING), []).append(r)
    markers = itertools.cycle("osD^v<>PpXh")  # "*" is the baseline's
    colors = itertools.cycle(plt.get_cmap("tab20").colors)  # type: ignore[attr-defined]  # tab20 is a ListedColormap
    means = []
    for setting, rs in groups.items():
        rules, variant, ratio, module = setting
        if rules is None:
            label, marker, color = "baseline (no SE)", "*", "k"
        else:
            label = " ".join([rules, str(variant), f"r{_fmt(ratio)}"] + ([str(module)] if module != "se" else []))
            marker, color = next(markers), next(colors)
        accs = [100 * r["accuracy"] for r in rs]
        x, y = rs[0]["added_params"], statistics.fmean(accs)
        err = statistics.stdev(accs) if len(accs) > 1 else 0.0
        means.append((x, y))
        ax.errorbar([x], [y], yerr=[err], fmt=marker, color=color, ms=10 if rules is None else 6, capsize=3,
                    alpha=0.9, zorder=3, label=f"{label} (n={len(rs)})")
    front = pareto_front(means)  # of the settings' means: one seed's luck does not draw the line
    ax.plot([p[0] for p in front], [p[1] for p in front], color="k", lw=1, ls="--", label="Pareto front (means)",
            zorder=2)
    ax.set(xlabel="added parameters", ylabel="test accuracy (%)",
           title=f"{records[0].get('model', '')}: accuracy against SE cost" if records else "")
    ax.legend(fontsize=7, loc="best", ncol=1 + len(groups) // 10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

