"""Command line: ``se-surgery sites|plan|report|check``.

Only this module looks models up by name. Every expected failure (bad model name,
missing file, invalid rules) prints one line to stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import warnings
from pathlib import Path

from torch import nn

from .errors import CheckpointError, MissingFileError, SESurgeryError, UnknownModelError

__all__ = ["main", "build_model", "load_weights"]


def _tv_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return list(timm.list_models())


def build_model(spec: str) -> nn.Module:
    """Build a model by name without weights: ``resnet50``, ``tv:resnet50``, ``timm:convnext_tiny``.

    A bare name tries torchvision first, then timm.

    Example:
        >>> type(build_model("tv:resnet18")).__name__
        'ResNet'
    """
    source, _, name = spec.partition(":") if ":" in spec else ("", "", spec)
    if source not in ("", "tv", "timm"):
        raise UnknownModelError(f"unknown model source {source!r} in {spec!r}; use tv:NAME or timm:NAME")
    if source in ("", "tv"):
        import torchvision

        if name in _tv_names():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # inception/googlenet init notices
                return torchvision.models.get_model(name, weights=None)
    if source in ("", "timm"):
        try:
            import timm
        except ImportError:
            timm = None
        if timm is not None and name in timm.list_models():
            return timm.create_model(name, pretrained=False)
        if timm is None and source == "timm":
            raise UnknownModelError("timm is not installed; pip install 'se-surgery[timm]'")
    pool = (_tv_names() if source != "timm" else []) + (_timm_names() if source != "tv" else [])
    close = difflib.get_close_matches(name, list(dict.fromkeys(pool)), n=5, cutoff=0.6)
    where = {"tv": "torchvision", "timm": "timm", "": "torchvision or timm"}[source]
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise UnknownModelError(f"unknown model {name!r} in {where}{hint}")


def load_weights(model: nn.Module, path: str) -> None:
    """Load a local checkpoint: safetensors, or a ``torch.load`` file with ``weights_only=True``."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"weights file {path!r} not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
    except Exception as e:
        raise CheckpointError(f"cannot load weights from {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    # Check everything before copying: load_state_dict copies the tensors that fit before
    # it raises for the ones that do not, which would leave the model half loaded.
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"cannot load weights from {path}: expected a state_dict (names to tensors), "
                              f"got {type(state).__name__}")
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing key(s) {missing[:3]}"] if missing else []) + \
                ([f"{len(unexpected)} unexpected key(s) {unexpected[:3]}"] if unexpected else [])
        raise CheckpointError(f"cannot load weights from {path}: they do not fit {type(model).__name__}: "
                              f"{', '.join(parts)}")
    for k, v in own.items():
        if state[k].shape != v.shape:
            raise CheckpointError(f"cannot load weights from {path}: {k} has shape {tuple(state[k].shape)}, "
                                  f"{type(model).__name__} needs {tuple(v.shape)}")
    model.load_state_dict(state)


def _model(args) -> nn.Module:
    model = build_model(args.model)
    if getattr(args, "weights", None):
        load_weights(model, args.weights)
    return model


def _cmd_sites(args) -> int:
    from tabulate import tabulate

    from .sites import discover

    model = _model(args)
    d = discover(model, args.input_size)
    if args.format == "json":
        print(json.dumps({"model": args.model, "input_size": list(d.input_size),
                          "sites": [s.to_dict() for s in d.sites],
                          "untraced": [{"module": p, "reason": r} for p, r in d.untraced],
                          "not_sites": [{"join": j, "reason": r} for j, r in d.rejected]}, indent=2))
        return 0
    rows = [[s.name, s.kind, s.stage, s.block, s.channels, f"{s.spatial[0]}x{s.spatial[1]}",
             "NCHW" if s.channel_dim == 1 else "NHWC", "yes" if s.has_attention else "", s.owner_type]
            for s in d.sites]
    print(f"{args.model} at {'x'.join(map(str, d.input_size))}: {len(d.sites)} sites")
    if rows:
        print(tabulate(rows, headers=["site", "kind", "stage", "block", "channels", "spatial", "layout",
                                      "has attention", "owner type"], disable_numparse=True))
    else:
        print("no residual or concat joins: SE has nowhere to go in this model")
    for p, r in d.untraced:
        print(f"not traced: {p}: {r}")
    if args.verbose:
        for j, r in d.rejected:
            print(f"not a site: {j}: {r}")
    return 0


def _cmd_plan(args) -> int:
    from .plan import plan

    model = _model(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = plan(model, args.rules, input_size=args.input_size, strict=args.strict)
    del caught  # the plan lists its own warnings
    print(json.dumps(p.to_dict(), indent=2) if args.format == "json" else p)
    return 0


def _cmd_report(args) -> int:
    from .report import report

    model = _model(args)
    rules_list = args.rules or ["all_stages"]
    reports = []
    for r in rules_list:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reports.append(report(model, r, input_size=args.input_size))
    if len(reports) == 1:
        print(reports[0].render(args.format))
    else:
        print(_compare(reports, args.format))
    if args.plot:
        _plot(reports, args.plot)
    return 0


def _compare(reports, fmt: str) -> str:
    """One row per rule set; where the rule sets insert different modules, one column per
    module instead (the metrics as rows), so modules read side by side."""
    mods = ["+".join(dict.fromkeys(s.module for s in r.sites)) or "-" for r in reports]
    rows = [{"rules": r.rules, "module": m, "SE sites": len(r.sites), "added params": r.added_params,
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

    from .report import FOOTER

    first = reports[0]
    head = f"{first.model} at {'x'.join(map(str, first.input_size))}: base {first.base_params:,} params, " \
           f"{first.base_macs:,} MACs"
    for r in rows:
        r["added params"], r["added MACs"] = f"{r['added params']:,}", f"{r['added MACs']:,}"
    tf = "github" if fmt == "markdown" else "simple"
    if len(set(mods)) > 1:
        heads = [m if mods.count(m) == 1 else f"{m} ({r.rules})" for m, r in zip(mods, reports)]
        metrics = [k for k in rows[0] if k != "module"]
        table = tabulate([[k] + [r[k] for r in rows] for k in metrics], headers=["", *heads], tablefmt=tf,
                         disable_numparse=True)
    else:
        table = tabulate(rows, headers="keys", tablefmt=tf, disable_numparse=True)
    return f"{head}\n\n{table}\n\n{FOOTER}"


def _plot(reports, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SESurgeryError("--plot needs matplotlib: pip install 'se-surgery[plot]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(reports)
    for i, r in enumerate(reports):
        st = r.stages()
        xs = [s["stage"] + i * width for s in st]
        axes[0].bar(xs, [s["params"] / 1e6 for s in st], width, label=r.rules)
        axes[1].bar(xs, [s["macs"] / 1e6 for s in st], width, label=r.rules)
    axes[0].set(title="added parameters per stage", xlabel="stage", ylabel="M params")
    axes[1].set(title="added MACs per stage", xlabel="stage", ylabel="M MACs")
    axes[0].legend()
    fig.suptitle(f"{reports[0].model}: what SE adds")
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}", file=sys.stderr)


def _cmd_check(args) -> int:
    from .rules import load_rules

    r = load_rules(args.rules)
    print(f"{r.source}: valid, {len(r.rules)} rule(s); defaults: "
          + ", ".join(f"{k}={v}" for k, v in r.defaults.to_dict().items()))
    return 0


def _size(text: str):
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N, HxW or CxHxW, got {text!r}") from None
    return parts[0] if len(parts) == 1 else tuple(parts)


# ---------------------------------------------------------------- sweep (issue 13)
# One self-contained block: the model builder for training and the ``sweep`` command.


def build_for_training(spec: str, num_classes: int, *, pretrained: bool = False) -> nn.Module:
    """:func:`build_model` with a fresh ``num_classes`` head; ``pretrained=True`` downloads the default weights.

    torchvision's ``weights="DEFAULT"``, timm's ``pretrained=True``; without a network
    that fails with one line suggesting ``--weights FILE``.

    Example:
        >>> build_for_training("tv:resnet18", 10).fc.out_features
        10
    """
    from .train import set_head

    model = build_model(spec)  # resolves the name (and names close matches) once for both sources
    if pretrained:
        name = spec.partition(":")[2] if ":" in spec else spec
        try:
            if type(model).__module__.startswith("timm."):
                import timm

                model = timm.create_model(name, pretrained=True)
            else:
                import torchvision

                model = torchvision.models.get_model(name, weights="DEFAULT")
        except (OSError, RuntimeError, ValueError) as e:  # no network, no cached file, no such weights
            first = str(e).splitlines()[0] if str(e) else ""
            raise CheckpointError(f"--pretrained: could not get the pretrained weights of {spec} "
                                  f"({type(e).__name__}: {first}); without a network, pass --weights FILE") from None
    set_head(model, num_classes)
    return model


def _cmd_sweep(args) -> int:
    from . import sweep
    from .train import load_base_weights, load_data, seed_everything

    shard = sweep.parse_shard(args.trial)  # a bad --trial fails before any data or model is loaded
    data = load_data(args.data, args.input_size, workers=args.workers)
    # The fresh head (and a base without weights) must be the same in every run and every
    # shard: trial keys promise that a finished trial would come out the same again.
    seed_everything(0)
    model = build_for_training(args.model, data.classes, pretrained=args.pretrained)
    if args.weights:
        load_base_weights(model, args.weights, log=lambda m: print(m, file=sys.stderr))
    config = sweep.SweepConfig(
        model=args.model, weights=args.weights, pretrained=args.pretrained, data=args.data, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, se_lr=args.se_lr,
        momentum=args.momentum, weight_decay=args.weight_decay, freeze_base=args.freeze_base)
    sweep.run(model, data, config, rules=args.rules or ["all_stages"], variants=args.variant or [None],
              ratios=args.ratio or [None], modules=args.module or [None], seeds=args.seeds, out=args.out,
              shard=shard, device=args.device, plot=args.plot)
    return 0


def _add_sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="fine-tune with SE placed by each rule set / variant / ratio; compare accuracy",
                       description="The paper's placement studies on your model and data: every --rules x --variant "
                                   "x --ratio x --module x seed is applied, fine-tuned and evaluated, plus one "
                                   "baseline without SE per seed. One JSON line per trial goes to --out as it "
                                   "finishes; re-running the same command skips finished trials.")
    p.add_argument("model", help="torchvision or timm model name; tv:NAME / timm:NAME forces the source")
    p.add_argument("--data", required=True, help="'digits' (offline, scikit-learn) or an ImageFolder directory")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", metavar="FILE", help="local base checkpoint (safetensors or torch.save)")
    w.add_argument("--pretrained", action="store_true", help="download the default pretrained weights")
    p.add_argument("--rules", action="append", metavar="RULES",
                   help="rules file or preset; repeat for several (default all_stages)")
    p.add_argument("--variant", action="append", metavar="V", help="override every rule's variant; repeatable")
    p.add_argument("--ratio", action="append", type=float, metavar="R", help="override every rule's ratio; repeatable")
    p.add_argument("--module", action="append", metavar="M", help="override every rule's module; repeatable")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per setting (default 1)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop each trial after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the base model")
    p.add_argument("--se-lr", type=float, default=1e-2, help="learning rate of the SE modules")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--freeze-base", action="store_true", help="train only the SE modules (the baseline then "
                                                                "is the base model as loaded)")
    p.add_argument("--input-size", type=int, default=None, metavar="N",
                   help="square input size (default 32 for digits, else 224)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda where there is one")
    p.add_argument("--workers", type=int, default=4, help="data loader workers (ImageFolder only)")
    p.add_argument("--out", default="sweep.jsonl", help="JSON lines file, appended to (default sweep.jsonl)")
    p.add_argument("--plot", metavar="FILE.png", help="accuracy against added parameters, with the Pareto front")
    p.add_argument("--trial", metavar="I/N", default=None,
                   help="run only every N-th trial starting at I (0 <= I < N), to share a sweep between machines")
    p.set_defaults(fn=_cmd_sweep)


# ---------------------------------------------------------------- end of sweep block


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="se-surgery", description="Add Squeeze-and-Excitation to existing models.")
    sub = ap.add_subparsers(dest="command", required=True)

    def model_args(p, weights=True):
        p.add_argument("model", help="torchvision or timm model name; tv:NAME / timm:NAME forces the source")
        p.add_argument("--input-size", type=_size, default=None, help="N, HxW or CxHxW (default: model's or 224)")
        if weights:
            p.add_argument("--weights", help="local checkpoint: .safetensors or a torch.load file (weights_only)")

    p = sub.add_parser("sites", help="list the sites where SE can go")
    model_args(p)
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("-v", "--verbose", action="store_true", help="also list 4-D adds that are not sites, and why")
    p.set_defaults(fn=_cmd_sites)

    p = sub.add_parser("plan", help="dry run: which site gets SE with which options")
    model_args(p)
    p.add_argument("--rules", default=None, help="rules file or preset name (default all_stages)")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(fn=_cmd_plan)

    p = sub.add_parser("report", help="parameters and MACs SE adds; several --rules compare")
    model_args(p)
    p.add_argument("--rules", action="append", help="rules file or preset; repeat to compare (default all_stages)")
    p.add_argument("--format", choices=("table", "markdown", "json", "csv"), default="table")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of added params and MACs per stage")
    p.set_defaults(fn=_cmd_report)

    p = sub.add_parser("check", help="validate a rules file without a model")
    p.add_argument("rules")
    p.set_defaults(fn=_cmd_check)

    _add_sweep_parser(sub)
    return ap


def main(argv=None) -> int:
    """Entry point of the ``se-surgery`` command."""
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except SESurgeryError as e:
        print(f"se-surgery: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"se-surgery: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
