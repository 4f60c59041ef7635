"""Command line: ``se-surgery sites|plan|report|check|presets|bench|sweep``.

Models come by name from :mod:`se_surgery.hub`. Every expected failure (bad model name,
missing or unreadable file, invalid rules, an output that cannot be written) prints one
line to stderr and exits with code 2; Ctrl-C exits with 130 and one line; a closed pipe
(``| head``) ends quietly with 141, as ``cat`` does.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SESurgeryError
from .hub import _short, build_for_training, build_model, load_weights

if TYPE_CHECKING:  # torch is imported when a command runs, under main's Ctrl-C handler
    from torch import nn

__all__ = ["main", "parser"]

# Exit codes: what shells and CI scripts test.
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 130, 141
# Bounds of the numeric options, so that a typo fails in one line instead of asking
# torch for a 10^10-pixel tensor or a classifier of a billion rows.
MAX_SIDE, MAX_CHANNELS, MAX_CLASSES = 8192, 1024, 100_000


def _model(args) -> nn.Module:
    model = build_model(args.model, args.num_classes)
    if args.weights:
        hint = "" if args.num_classes else " (a checkpoint with its own classifier needs --num-classes N)"
        load_weights(model, args.weights, hint=hint)
    return model


def _saved(args):
    """``--se FILE``: the model with the SE the checkpoint records, and the input size it was planned at."""
    from ._checkpoint import load_se, saved_plan_inputs

    size, _ = saved_plan_inputs(args.se)  # a bad file fails before the model is built
    model = load_se(_model(args), args.se, inplace=True)
    return model, args.input_size or size


def _cmd_sites(args) -> int:
    from tabulate import tabulate

    from ._sites import discover

    model = _model(args)
    d = discover(model, args.input_size)
    if args.format == "json":
        print(json.dumps({"model": args.model, "input_size": list(d.input_size), "stages": d.stage_source,
                          "sites": [s.to_dict() for s in d.sites],
                          "untraced": [{"module": p, "reason": r} for p, r in d.untraced],
                          "not_sites": [{"join": j, "reason": r} for j, r in d.rejected]}, indent=2))
        return 0
    rows = [[s.name, s.kind, s.stage, s.block, s.channels, f"{s.spatial[0]}x{s.spatial[1]}",
             "NCHW" if s.channel_dim == 1 else "NHWC", "yes" if s.has_attention else "", s.owner_type]
            for s in d.sites]
    print(f"{args.model} at {'x'.join(map(str, d.input_size))}: {len(d.sites)} sites")
    if rows:
        print(f"stages: {d.stage_source}")
        print(tabulate(rows, headers=["site", "kind", "stage", "block", "channels", "spatial", "layout",
                                      "has attention", "owner type"], disable_numparse=True))
    else:
        print("no residual, concat or block sites: SE has nowhere to go in this model")
    for p, r in d.untraced:
        print(f"not traced: {p}: {r}")
    if args.verbose:
        for j, r in d.rejected:
            print(f"not a site: {j}: {r}")
    return 0


def _plan_text(p) -> str:
    """The plan's table, with the channels SE scales: for ``pre`` the block input's, as
    ``report`` counts them (``Plan.rows`` gives the join's)."""
    from tabulate import tabulate

    rows = p.rows()
    for row, e in zip(rows, p.entries):
        if e.selected:
            row["channels"] = e.se_channels
    head = f"{p.model} at {'x'.join(map(str, p.input_size))}, rules {p.rules.source}: " \
           f"SE at {len(p.selected)} of {len(p.entries)} sites"
    parts = [head, tabulate(rows, headers="keys")]
    parts += [f"not traced: {m}: {r}" for m, r in p.untraced]
    parts += [f"warning: {w}" for w in p.warnings]
    return "\n".join(parts)


def _cmd_plan(args) -> int:
    from ._plan import plan
    from ._rules import load_rules

    if args.se and args.rules:
        raise SESurgeryError("--se and --rules: the checkpoint records its own rules; give one of them")
    size = args.input_size
    if args.se:  # the plan the checkpoint was made from, checked against the model it loads into
        from ._checkpoint import load_se, saved_plan_inputs

        saved_size, rules = saved_plan_inputs(args.se)  # a bad file fails before the model is built
        model = _model(args)
        load_se(model, args.se)  # a copy: refuses a checkpoint made for another model
        size = size or saved_size
    else:
        rules = load_rules(args.rules)  # a bad rules file fails before the model is built
        model = _model(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = plan(model, rules, input_size=size, strict=args.strict)
    del caught  # the plan lists its own warnings
    print(json.dumps(p.to_dict(), indent=2) if args.format == "json" else _plan_text(p))
    return 0


def _cmd_report(args) -> int:
    from ._plan import analyze
    from ._report import report
    from ._rules import load_rules

    # Everything that can be checked without the model is checked first, so that a typo
    # fails at once rather than after the model is built and counted.
    if args.plot:
        _check_plot_path(args.plot)
    if args.se and args.rules:
        raise SESurgeryError("--se and --rules: the checkpoint records its own rules; give one of them")
    size = args.input_size
    if args.se:  # the model as it was saved, counted at the size it was patched at
        model, size = _saved(args)
        rules_list: list = [None]
        subject = model
    else:
        rules_list = [load_rules(r) for r in args.rules or ["all_stages"]]
        model = _model(args)
        subject = analyze(model, size)  # one look at the model serves every rule set
        size = None  # the analysis has it
    reports, said = [], []
    for r in rules_list:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reports.append(report(subject, r, input_size=size))
        said += [str(w.message) for w in caught if str(w.message) not in said]
    for msg in said:  # on stderr, so that --format json|csv output stays parseable
        print(f"se-surgery: warning: {msg}", file=sys.stderr)
    if len(reports) == 1:
        print(reports[0].render(args.format))
    else:
        print(_compare(reports, args.format))
    if args.plot:
        _plot(reports, args.plot, args.model)
    return 0


def _compare(reports, fmt: str) -> str:
    """One row per rule set; where the rule sets insert different modules, one column per
    module instead (the metrics as rows), so modules read side by side."""
    mods = ["+".join(dict.fromkeys(s.module for s in r.sites)) or "-" for r in reports]
    rows = [{"rules": r.rules, "module": m, "sites": len(r.sites), "added params": r.added_params,
             "params %": round(r.added_params_pct, 2), "added MACs": r.added_macs,
             "MACs %": round(r.added_macs_pct, 2)} for r, m in zip(reports, mods)]
    if fmt == "json":
        return json.dumps([r.to_dict() for r in reports], indent=2)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    from tabulate import tabulate

    from ._report import FOOTER

    first = reports[0]
    head = f"{first.model} at {'x'.join(map(str, first.input_size))}: base {first.base_params:,} params, " \
           f"{first.base_macs:,} MACs"
    for r in rows:  # the single report's formats: 1,234 and 9.90 %
        r["added params"], r["added MACs"] = f"{r['added params']:,}", f"{r['added MACs']:,}"
        r["params %"], r["MACs %"] = f"{r['params %']:.2f} %", f"{r['MACs %']:.2f} %"
    tf = "github" if fmt == "markdown" else "simple"
    if len(set(mods)) > 1:
        heads = [m if mods.count(m) == 1 else f"{m} ({r.rules})" for m, r in zip(mods, reports)]
        metrics = [k for k in rows[0] if k != "module"]
        table = tabulate([[k] + [r[k] for r in rows] for k in metrics], headers=["", *heads], tablefmt=tf,
                         disable_numparse=True)
    else:
        table = tabulate(rows, headers="keys", tablefmt=tf, disable_numparse=True)
    return f"{head}\n\n{table}\n\n{FOOTER}"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SESurgeryError("--plot needs matplotlib: pip install 'se-surgery[plot]'") from None
    return plt


def _check_plot_path(path: str) -> None:
    """Refuse a plot file that cannot be written, before any model is built."""
    _pyplot()
    from matplotlib.figure import Figure

    kinds = sorted(Figure().canvas.get_supported_filetypes())
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in kinds:
        raise SESurgeryError(f"--plot {_short(path)!r}: the file name must end in one of "
                             f".{', .'.join(kinds)} (it picks the image format)")
    try:
        target, folder = Path(path), Path(path).parent
        if target.is_dir():
            raise SESurgeryError(f"--plot {_short(path)!r} is a directory; give a file name such as stages.png")
        if not folder.is_dir():
            raise SESurgeryError(f"--plot {_short(path)!r}: folder {_short(str(folder))!r} does not exist")
        if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise SESurgeryError(f"--plot {_short(path)!r}: no permission to write there")
    except OSError as e:
        raise SESurgeryError(f"--plot {_short(path)!r}: {e.strerror or e}") from None


def _plot(reports, path: str, title: str) -> None:
    plt = _pyplot()
    stages = sorted({s["stage"] for r in reports for s in r.stages()})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(reports)
    for i, r in enumerate(reports):
        by_stage = {s["stage"]: s for s in r.stages()}
        offset = (i - (len(reports) - 1) / 2) * width  # the group of bars is centred on its stage
        xs = [st + offset for st in stages]
        for ax, key, scale in ((axes[0], "params", 1e6), (axes[1], "macs", 1e6)):
            ax.bar(xs, [by_stage[st][key] / scale if st in by_stage else 0 for st in stages], width, label=r.rules)
    for ax, what, unit in ((axes[0], "parameters", "M params"), (axes[1], "MACs", "M MACs")):
        ax.set(title=f"added {what} per stage", xlabel="stage", ylabel=unit)
        ax.set_xticks(stages)
    axes[0].legend()
    size = "x".join(map(str, reports[0].input_size))
    fig.suptitle(f"{title} ({reports[0].model}, {size}): what SE adds")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise SESurgeryError(f"--plot {_short(path)!r}: cannot write it: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    print(f"plot written to {path}", file=sys.stderr)


def _cmd_check(args) -> int:
    from ._rules import load_rules

    r = load_rules(args.rules)
    d = r.defaults.resolved()  # the options of the module the defaults insert, not every key they wrote
    shown = {"variant": d.variant, **({"module": d.module} if d.module != "se" else {}), **d.module_options()}
    print(f"{r.source}: valid, {len(r.rules)} rule(s); defaults: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return 0


def _cmd_presets(args) -> int:
    from ._shipped import preset_summaries

    summaries = preset_summaries()
    width = max(map(len, summaries))
    for name, line in summaries.items():
        print(f"{name:<{width}}  {line}")
    return 0


def _cmd_bench(args) -> int:
    from .studies.bench import bench, check_runtimes, format_rows

    runtimes = args.runtime or ["eager"]
    check_runtimes(runtimes)  # a missing runtime fails in one line before any model is built
    model = _model(args)
    size = args.input_size if args.input_size is None or isinstance(args.input_size, int) else args.input_size[-2:]
    rows = bench(model, args.rules or ["all_stages"], runtimes=runtimes, batches=args.batch or [1],
                 threads=args.threads, input_size=size, rounds=args.rounds, clock=args.clock)
    print(format_rows(rows, args.format))
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to 100000, got {value}")
    return value


def _size(text: str):
    """``--input-size``: N, HxW or CxHxW, each within bounds a model can be traced at."""
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or any(p < 1 for p in parts):
        raise argparse.ArgumentTypeError(f"expected N, HxW or CxHxW with positive integers, got {_short(text)!r}")
    sides, channels = parts[-2:] if len(parts) > 1 else parts, parts[0] if len(parts) == 3 else 3
    if max(sides) > MAX_SIDE or channels > MAX_CHANNELS:
        raise argparse.ArgumentTypeError(f"{_short(text)!r} is too large: height and width go up to {MAX_SIDE}, "
                                         f"channels up to {MAX_CHANNELS}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _classes(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_CLASSES:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {MAX_CLASSES:,}, got {_short(text)!r}")
    return n


class _Help(argparse.HelpFormatter):
    """Wraps prose, keeps the examples' line breaks, shows each option's default."""

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" if line else "" for line in lines)


# ---------------------------------------------------------------- sweep (issue 13)
# One self-contained block: the model builder for training and the ``sweep`` command.


def _training_config(args):
    """The fine-tuning settings ``sweep`` and ``search`` share, checked before any data or model is loaded."""
    from .studies import sweep

    config = sweep.SweepConfig(
        model=args.model, weights=args.weights, pretrained=args.pretrained, data=args.data, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, se_lr=args.se_lr,
        momentum=args.momentum, weight_decay=args.weight_decay, freeze_base=args.freeze_base)
    config.check()
    return config


def _data_and_base(args):
    """The data and the base model (a fresh head for the data's classes) of ``sweep`` and ``search``."""
    from .studies.sweep import check_data
    from .studies.train import load_data, seed_everything

    data = load_data(args.data, args.input_size, workers=args.workers, augment=args.augment)
    check_data(data)
    # The fresh head (and a base without weights) must be the same in every run, worker and
    # shard: trial keys promise that a finished trial would come out the same again.
    seed_everything(0)
    model = build_for_training(args.model, data.classes, pretrained=args.pretrained)
    if args.weights:
        load_weights(model, args.weights, fresh_head=True, log=lambda m: print(m, file=sys.stderr))
    return data, model


def _cmd_sweep(args) -> int:
    from .studies import sweep

    # Everything that can be checked without data or a model is checked first, so that a
    # typo fails at once rather than after the first trial trained.
    shard = sweep.parse_shard(args.trial)
    config = _training_config(args)
    sweep.trials(args.rules or ["all_stages"], args.variant or [None], args.ratio or [None], args.module or [None],
                 args.seeds)
    if args.plot:
        _check_plot_path(args.plot)
    sweep.check_input_size(args.input_size)
    if os.environ.get("RANK", "0") == "0":
        sweep.check_out(args.out)
    grid = {"rules": args.rules or ["all_stages"], "variants": args.variant or [None], "ratios": args.ratio or [None],
            "modules": args.module or [None], "seeds": args.seeds, "out": args.out, "shard": shard}
    if not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):  # one process: it alone reads the results
        size = args.input_size or (32 if args.data == "digits" else 224)  # as load_data defaults
        records = sweep.finished(config, input_size=(3, size, size), **grid)
        if records is not None:  # nothing left to run: the summary, without a model or data
            print(f"skipped {len(records)} finished trial(s) (already in {args.out}); nothing left to run\n")
            print(sweep.table(records))
            if args.plot:
                sweep.plot(records, args.plot)
            return 0
    data, model = _data_and_base(args)
    sweep.run(model, data, config, device=args.device, plot=args.plot, latency=args.latency, **grid)
    return 0


def _add_sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="fine-tune with SE placed by each rule set / variant / ratio; compare accuracy",
                       description="The paper's placement studies on your model and data: every --rules x --variant "
                                   "x --ratio x --module x seed is applied, fine-tuned and evaluated, plus one "
                                   "baseline without SE per seed. One JSON line per trial goes to --out as it "
                                   "finishes; re-running the same command skips finished trials.",
                       formatter_class=_Help,
                       epilog=_examples(
                           "se-surgery sweep timm:test_resnet --data digits --weights base.safetensors "
                           "--rules all_stages --rules late_stages --variant standard --variant pre --seeds 2",
                           "se-surgery sweep tv:resnet50 --pretrained --data ~/data/flowers --ratio 8 --ratio 16 "
                           "--freeze-base --out flowers.jsonl --plot pareto.png", "", "See docs/sweep.md."))
    _add_training_options(p)
    p.add_argument("--rules", action="append", metavar="RULES",
                   help="rules file or preset; repeat for several (default all_stages)")
    p.add_argument("--variant", action="append", metavar="V", help="override every rule's variant; repeatable")
    p.add_argument("--ratio", action="append", type=float, metavar="R", help="override every rule's ratio; repeatable")
    p.add_argument("--module", action="append", metavar="M", help="override every rule's module; repeatable")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per setting (default 1)")
    p.add_argument("--out", default="sweep.jsonl", help="JSON lines file, appended to (default sweep.jsonl)")
    p.add_argument("--plot", metavar="FILE.png", help="accuracy against added parameters, with the Pareto front")
    p.add_argument("--latency", action="store_true",
                   help="also measure each setting's eager CPU latency ratio to the base (batch 1, one thread) and "
                        "record it as latency_ratio")
    p.add_argument("--trial", metavar="I/N", default=None,
                   help="run only every N-th trial starting at I (0 <= I < N), to share a sweep between machines")
    p.set_defaults(fn=_cmd_sweep)


def _add_training_options(p) -> None:
    """The model, data and fine-tuning options of ``sweep`` and ``search``: their trials train alike."""
    p.add_argument("model", help="torchvision or timm model name; tv:NAME / timm:NAME forces the source")
    p.add_argument("--data", required=True, help="'digits' (offline, scikit-learn) or an ImageFolder directory")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", metavar="FILE", help="local base checkpoint (safetensors or torch.save)")
    w.add_argument("--pretrained", action="store_true", help="download the default pretrained weights")
    p.add_argument("--epochs", type=int, default=1, help="training epochs per trial")
    p.add_argument("--max-steps", type=int, default=None, help="stop each trial after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the base model")
    p.add_argument("--se-lr", type=float, default=1e-2, help="learning rate of the inserted attention modules")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--freeze-base", action="store_true", help="train only the inserted modules (the baseline "
                                                                "then is the base model as loaded)")
    p.add_argument("--input-size", type=int, default=None, metavar="N",
                   help="square input size (default 32 for digits, else 224)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda where there is one")
    p.add_argument("--workers", type=int, default=None,
                   help="data loader workers (ImageFolder only; default: the CPUs this process may use)")
    p.add_argument("--augment", choices=("none", "flip", "crop"), default="crop",
                   help="training augmentation of an ImageFolder: crop = random resized crop + flip (ImageNet "
                        "recipe), flip = resize + centre crop + flip, none = resize + centre crop, as the test "
                        "images (digits data gets none)")



# ---------------------------------------------------------------- search (issue 20)


def _cmd_search(args) -> int:
    from .studies import search

    try:
        import optuna
    except ImportError:
        raise SESurgeryError("search needs Optuna: pip install 'se-surgery[search]' (optuna>=3.6)") from None
    # Everything that can be checked without data or a model is checked first.
    objectives = args.objective or ["accuracy", "params"]
    costs = [o for o in objectives if o != "accuracy"]
    if len(costs) != 1 or len(objectives) > 2:
        raise search.SearchError(f"--objective {' --objective '.join(objectives)}: give accuracy and one cost, "
                                 f"such as --objective accuracy --objective params (costs: {', '.join(search.COSTS)})")
    search._check_args(costs[0], args.trials, args.seeds, args.pruner, args.prune_after, args.timeout)
    config = _training_config(args)
    if args.plot:
        _check_plot_path(args.plot)
    if args.space:
        search.read_space(args.space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this command prints its own line per trial
    data, model = _data_and_base(args)
    space = search.build_space(model, data.input_size, modules=args.module, ratios=args.ratio,
                               variants=args.variant, space_file=args.space)
    search.run(model, data, config, space=space, cost=costs[0], trials=args.trials, timeout=args.timeout,
               seeds=args.seeds, storage=args.storage, study=args.study, sampler=args.sampler,
               sampler_seed=args.sampler_seed, pruner=args.pruner, prune_after=args.prune_after, out=args.out,
               export_path=args.export, plot_path=args.plot, device=args.device)
    return 0


def _add_search_parser(sub) -> None:
    p = sub.add_parser("search", help="find where attention should go: a multi-objective Optuna study",
                       description="For each stage of MODEL, search whether attention goes there and with which "
                                   "module, ratio and variant, maximising accuracy and minimising added params, "
                                   "MACs or latency. Each trial is fine-tuned like a sweep trial. The study lives "
                                   "in Optuna storage: run the same command on several machines to share it; "
                                   "rerunning resumes. Needs optuna: pip install 'se-surgery[search]'.",
                       formatter_class=_Help,
                       epilog=_examples(
                           "se-surgery search timm:test_resnet --data digits --weights base.safetensors "
                           "--freeze-base --epochs 2 --trials 40 --export best.yaml --plot pareto.png",
                           "se-surgery search tv:resnet50 --pretrained --data ~/data/flowers --module se "
                           "--module eca --storage postgresql://user@host/db --study flowers --trials 200",
                           "se-surgery search timm:test_resnet --data digits --trials 0 --export best.yaml",
                           "", "See docs/search.md."))
    _add_training_options(p)
    p.add_argument("--module", action="append", metavar="M", help="attention module to search; repeatable "
                                                                   "(default se)")
    p.add_argument("--ratio", action="append", type=float, metavar="R",
                   help="reduction ratio to search; repeatable (default 4, 8, 16, 32)")
    p.add_argument("--variant", action="append", metavar="V", help="variant to search; repeatable "
                                                                    "(default standard, post)")
    p.add_argument("--space", metavar="FILE.yaml", help="which stages and choices are searched, fixed options "
                                                        "(docs/search.md); --module, --ratio, --variant replace "
                                                        "its lists")
    p.add_argument("--objective", action="append", choices=("accuracy", "params", "macs", "latency"), metavar="O",
                   help="accuracy and one cost: params, macs or latency (default: accuracy, params)")
    p.add_argument("--trials", type=int, default=20, help="trials in the study, over every worker; 0 only "
                                                          "reports and exports")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="start no trial after S seconds")
    p.add_argument("--storage", metavar="URL", help="Optuna storage: a URL (sqlite:///FILE, postgresql://...), a "
                                                    ".db file (SQLite) or any other file (journal); default "
                                                    "STUDY.journal next to --out")
    p.add_argument("--study", metavar="NAME", help="study name (default: from the model, data, budget and space)")
    p.add_argument("--sampler", choices=("tpe", "nsga2"), default="tpe", help="Optuna sampler")
    p.add_argument("--sampler-seed", type=int, default=None, metavar="N", help="repeatable proposals (one worker)")
    p.add_argument("--pruner", choices=("median", "none"), default="median",
                   help="stop a trial whose accuracy after an epoch is below the completed trials' median")
    p.add_argument("--prune-after", type=int, default=4, metavar="N",
                   help="completed trials with that epoch's accuracy before the median prunes")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per trial; the accuracy is their mean")
    p.add_argument("--out", default="search.jsonl", help="this worker's JSON lines file, appended to")
    p.add_argument("--export", metavar="FILE.yaml", help="write the rules of the most accurate trial")
    p.add_argument("--plot", metavar="FILE.png", help="accuracy against the cost, the Pareto front highlighted")
    p.set_defaults(fn=_cmd_search)


def parser() -> argparse.ArgumentParser:
    """The ``se-surgery`` argument parser (one sub-parser per command).

    Example:
        >>> parser().parse_args(["check", "late_stages"]).rules
        'late_stages'
    """
    from . import __version__

    ap = argparse.ArgumentParser(
        prog="se-surgery", formatter_class=_Help,
        description="Add Squeeze-and-Excitation to existing torchvision and timm models: find where it can go, "
                    "plan it from YAML rules, and report what it adds.",
        epilog=_examples("se-surgery sites resnet50", "se-surgery plan resnet50 --rules late_stages",
                         "se-surgery report resnet50 --rules all_stages --rules no_last_stage",
                         "se-surgery check my_rules.yaml", "se-surgery presets",
                         "", "Run 'se-surgery COMMAND --help' for a command's options. Exit codes: 0 ok, 2 bad "
                         "input, 130 interrupted.") + "\n")
    ap.add_argument("--version", action="version", version=f"se-surgery {__version__}",
                    help="print the version and exit")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(p):
        p.add_argument("model", help="torchvision or timm model name, built without weights; tv:NAME / timm:NAME "
                                     "forces the source (a bare name tries torchvision first)")
        p.add_argument("--input-size", type=_size, default=None, metavar="SIZE",
                       help=f"example input: N (square), HxW or CxHxW, sides up to {MAX_SIDE}; shapes are computed "
                            "on fake tensors, so size costs nothing (default: the model's own, else 224)")
        p.add_argument("--weights", metavar="FILE",
                       help="load a local checkpoint first: .safetensors, or a torch.load file (weights_only=True)")
        p.add_argument("--num-classes", type=_classes, default=None, metavar="N",
                       help="build the classifier with N classes, as in a fine-tuned --weights file "
                            "(default: the library's, 1000 for ImageNet models)")

    def se_arg(p):
        p.add_argument("--se", metavar="FILE",
                       help="an SE checkpoint from se_surgery.save_se: show the model as it was saved (its rules "
                            "and input size); base weights, if any, go in --weights")

    p = sub.add_parser(
        "sites", help="list the sites where SE can go", formatter_class=_Help,
        description="List every residual join and outer channel concatenation of MODEL, with its stage, block, "
                    "channels and spatial size at the example input size.",
        epilog=_examples("se-surgery sites resnet50", "se-surgery sites timm:convnext_tiny --input-size 160",
                         "se-surgery sites inception_v3 --format json > sites.json", "se-surgery sites resnet18 -v"))
    model_args(p)
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.add_argument("-v", "--verbose", action="store_true", help="also list 4-D adds that are not sites, and why")
    p.set_defaults(fn=_cmd_sites)

    p = sub.add_parser(
        "plan", help="dry run: which site gets SE with which options", formatter_class=_Help,
        description="Match RULES against the sites of MODEL without changing anything: for each site, whether it "
                    "gets SE, the variant, ratio, hidden width, the channels SE scales and the rule that decided.",
        epilog=_examples("se-surgery plan resnet50", "se-surgery plan resnet50 --rules late_stages",
                         "se-surgery plan resnet18 --rules my_rules.yaml --strict --format json"))
    model_args(p)
    se_arg(p)
    p.add_argument("--rules", default=None, metavar="RULES",
                   help="rules file or preset name ('se-surgery presets' lists them) (default: all_stages)")
    p.add_argument("--strict", action="store_true",
                   help="fail, instead of warning, on a rule that selects no site or a module that cannot be traced")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.set_defaults(fn=_cmd_plan)

    p = sub.add_parser(
        "report", help="parameters and MACs SE adds; several --rules compare", formatter_class=_Help,
        description="Parameters and multiply-accumulates (MACs) that SE adds to MODEL under RULES, per site, per "
                    "stage and in total, computed without running real compute. Warnings go to stderr.",
        epilog=_examples("se-surgery report resnet50",
                         "se-surgery report resnet50 --rules all_stages --rules late_stages --rules no_last_stage",
                         "se-surgery report resnet50 --format csv > se.csv",
                         "se-surgery report resnet50 --rules all_stages --rules late_stages --plot stages.png"))
    model_args(p)
    se_arg(p)
    p.add_argument("--rules", action="append", metavar="RULES",
                   help="rules file or preset; repeat to compare placements side by side (default: all_stages)")
    p.add_argument("--format", choices=("table", "markdown", "json", "csv"), default="table",
                   help="output format; csv has a 'row' column: 'site' rows, then 'added' and 'base' totals")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw added params and MACs per stage (format from the suffix: png, svg, pdf, ...; "
                        "needs matplotlib)")
    p.set_defaults(fn=_cmd_report)

    p = sub.add_parser(
        "check", help="validate a rules file without a model", formatter_class=_Help,
        description="Read and validate RULES (syntax, keys, types and value ranges) without building a model; "
                    "prints the resolved defaults.",
        epilog=_examples("se-surgery check my_rules.yaml", "se-surgery check late_stages"))
    p.add_argument("rules", metavar="RULES", help="rules file or preset name")
    p.set_defaults(fn=_cmd_check)

    p = sub.add_parser(
        "presets", help="list the shipped rule presets, one line each", formatter_class=_Help,
        description="List the rule presets shipped with se-surgery; pass a name to --rules or 'check'.",
        epilog=_examples("se-surgery presets", "se-surgery plan resnet50 --rules no_last_stage"))
    p.set_defaults(fn=_cmd_presets)

    p = sub.add_parser(
        "bench", help="latency of the base and each rule set on each runtime", formatter_class=_Help,
        description="Time MODEL and MODEL patched by each RULES (SE gates moved off the identity) on each runtime, "
                    "the candidates interleaved round by round; prints the median paired ratio to the base with its "
                    "spread (quartiles), the median times and the MACs ratio: what MACs do not say.",
        epilog=_examples("se-surgery bench resnet50", "se-surgery bench resnet50 --rules all_stages --rules "
                         "late_stages --runtime eager --runtime onnxruntime --batch 1 --batch 8",
                         "se-surgery bench resnet50 --runtime openvino --format json > bench.json",
                         "", "onnxruntime and openvino are optional: pip install 'se-surgery[onnx]' or "
                         "'se-surgery[openvino]'. See docs/performance.md."))
    model_args(p)
    p.add_argument("--rules", action="append", metavar="RULES",
                   help="rules file or preset; repeat to compare (default all_stages)")
    p.add_argument("--runtime", action="append", choices=("eager", "compile", "onnxruntime", "openvino"),
                   help="where to run; repeatable (default eager)")
    p.add_argument("--batch", action="append", type=_positive, metavar="N", help="batch size; repeatable (default 1)")
    p.add_argument("--threads", type=_positive, default=1, metavar="N", help="intra-op threads (default 1)")
    p.add_argument("--rounds", type=_positive, default=20, metavar="N", help="interleaved rounds (default 20)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or the process's CPU time (steadier on a shared machine; use with --threads 1)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.set_defaults(fn=_cmd_bench)

    _add_sweep_parser(sub)
    _add_search_parser(sub)
    return ap


# Library errors name the parameter (``lr nan: ...``); the CLI's user typed a flag.
_FLAGS = {"shard": "--trial", "trial": "--trial", "size": "--input-size", "input_size": "--input-size",
          "out": "--out", "data": "--data", "data='digits'": "--data digits", "weights": "--weights",
          "device": "--device", "plot": "--plot", "rules": "--rules", "seeds": "--seeds", "ratios": "--ratio",
          "lr": "--lr", "se_lr": "--se-lr", "momentum": "--momentum", "weight_decay": "--weight-decay",
          "epochs": "--epochs", "batch_size": "--batch-size", "max_steps": "--max-steps", "workers": "--workers",
          "augment": "--augment", "pretrained": "--pretrained"}


def _as_flags(message: str) -> str:
    """A library error as the CLI's user reads it: its leading parameter name as the flag.

    Example:
        >>> _as_flags("lr nan: must be a finite number"), _as_flags("batch_size 0: ...")
        ('--lr nan: must be a finite number', '--batch-size 0: ...')
        >>> _as_flags("rules late_stages with variant=pre: ...")
        '--rules late_stages with --variant pre: ...'
    """
    word, sep, rest = message.partition(" ")
    flag = _FLAGS.get(word.rstrip(":"))
    if flag is None or not sep or rest.startswith("file "):  # "weights file X": the CLI's own wording
        return message
    if word == "rules":  # overlay(): "rules R with variant=pre ratio=8: ..."
        head, colon, tail = rest.partition(": ")
        head = " ".join(f"--{w.replace('=', ' ', 1)}" if "=" in w else w for w in head.split(" "))
        rest = head + colon + tail
    return flag + (":" if word.endswith(":") else "") + sep + rest


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings in the CLI's one-line format (``se-surgery: warning: ...``), not Python's two lines."""
    from .errors import SESurgeryWarning

    text = " ".join(str(message).split())
    kind = "" if issubclass(category, SESurgeryWarning) else f"{category.__name__}: "
    print(f"se-surgery: warning: {kind}{_as_flags(text)}", file=sys.stderr if file is None else file)


def _error(message: str) -> None:
    print(f"se-surgery: {message}", file=sys.stderr)


def _silence_stdout() -> None:
    # Whatever is still buffered would fail again when Python flushes stdout at exit and
    # print "Exception ignored ..."; point the descriptor at /dev/null instead.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced (pytest's capture) or already closed
        pass


def main(argv=None) -> int:
    """Entry point of the ``se-surgery`` command; returns the exit code.

    Example:
        >>> main(["check", "late_stages"])
        preset late_stages: valid, 1 rule(s); defaults: variant=standard, ratio=16, divisor=1, min_hidden=1, init=identity, squeeze=avg, gate=sigmoid, bias=True, act=relu, ratio_of=site, round_limit=0.0
        0
    """  # noqa: E501 - doctest output must match verbatim
    try:
        if not (sys.argv[1:] if argv is None else list(argv)):  # a bare `se-surgery`: say what it does
            parser().print_help()
            return EXIT_OK
        try:
            args = parser().parse_args(argv)
        except SystemExit as e:  # --help, --version, or a usage error argparse has printed
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        if sys.stdout is None:  # started with stdout closed (`se-surgery ... >&-`)
            _error("error: standard output is closed; redirect it to a file or /dev/null")
            return EXIT_USAGE
        with warnings.catch_warnings():  # restored on return: main() may be called from Python too
            warnings.showwarning = _show_warning
            code = args.fn(args)
        sys.stdout.flush()  # a write error must surface here, not at interpreter exit
        return code
    except SESurgeryError as e:
        _error(f"error: {_as_flags(str(e))}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as e:
        if e.errno == errno.EPIPE:
            _silence_stdout()
            return EXIT_BROKEN_PIPE
        if e.errno is None:  # not a system call's error (PIL's UnidentifiedImageError for a damaged image)
            _error(f"error: {type(e).__name__}: {_short(' '.join(str(e).split()), 200)}")
        elif e.errno == errno.ENOSPC or getattr(e, "filename", None) is None:
            _silence_stdout()
            _error(f"error: cannot write the output: {e.strerror or e}")
        else:
            _error(f"error: {_short(str(e.filename), 120)}: {e.strerror or e}")
        return EXIT_USAGE
    except RecursionError:
        _error("error: the input is nested too deeply to process (Python's recursion limit)")
        return EXIT_USAGE
    except Exception as e:
        # A bug, not a bad input: still one line, but its own code, and the traceback on request.
        if os.environ.get("SE_SURGERY_TRACEBACK"):
            raise
        _error(f"internal error: {type(e).__name__}: {_short(' '.join(str(e).split()), 200)} (a bug: rerun with "
               "SE_SURGERY_TRACEBACK=1 and report the traceback)")
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
