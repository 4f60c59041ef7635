#!/usr/bin/env python
"""Fine-tune a pretrained model with Squeeze-and-Excitation added by se-surgery.

The model keeps every pretrained weight; SE is added where ``--rules`` say (identity
init, so before training it computes exactly what the pretrained model did), then the
SE modules (and, without ``--freeze-base``, the base at its own learning rate) are
trained. Only the SE weights are saved, with ``se_surgery.save_se``.

Offline, on the handwritten digits scikit-learn ships (8x8 images, upscaled)::

    # 1. a small "pretrained" base model, trained from scratch
    python examples/finetune.py timm:test_resnet --data digits --train-base-only \\
        --epochs 2 --lr 0.1 --out base.safetensors
    # 2. add SE after every residual join (se_post) and train only the SE modules
    python examples/finetune.py timm:test_resnet --weights base.safetensors --data digits \\
        --rules se_post --freeze-base --epochs 4 --se-lr 0.5 --out se.safetensors

With the base frozen, place SE where it can move: ``se_post`` (or ``se_identity``) gates
the skip path, which carries most of a trained block's signal, and its gates end about
10 % away from 1; the default ``standard`` placement gates only the residual branch, whose
output is small next to the skip, so its gates barely move (1.6 %; docs/sweep.md has the
measurements, over three bases and two seeds each). With ``--freeze-base`` left out, the
base trains too and any placement works.

Runs are repeatable: every generator is seeded (``--seed``), PyTorch's deterministic
algorithms are on, and one CPU thread is used (``--threads 1``; a float sum over more
threads adds in another order). The same command then writes the same weights again on
the same kind of CPU with the same torch build.

With a network, on your own ImageFolder (``DIR/train`` and ``DIR/val``, or one folder
split 80/20)::

    python examples/finetune.py tv:resnet50 --pretrained --data DIR --rules late_stages \\
        --epochs 3 --lr 1e-3 --se-lr 1e-2 --out se.safetensors

Several processes (DistributedDataParallel; gloo on CPU, nccl on GPU): prefix with
``torchrun --nproc_per_node N``. ``--batch-size`` is per process.

After each epoch the script prints the test accuracy and, with SE, how far SE has moved
from identity: the largest ``|fc2 weight|`` and the mean ``|gate - 1|`` on 64 test
images (both 0 at insertion). The training machinery lives in ``se_surgery.studies.train``,
shared with ``se-surgery sweep``, which compares placements (docs/sweep.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import se_surgery
from se_surgery.hub import build_for_training, load_weights
from se_surgery.studies.train import Dist, deterministic, evaluate, load_data, se_drift, train


def fail(msg: str):
    raise SystemExit(f"finetune.py: error: {msg}")


def _rank_path(out: str, rank: int) -> str:
    p = Path(out)
    return str(p.with_name(f"{p.stem}.rank{rank}{p.suffix}"))


def _save(model, path: str, with_base: bool) -> None:
    # A fine-tune that also trained the base is reproducible only with the base tensors.
    se_surgery.save_se(model, path, include_base=with_base)


def _epoch_report(model, test_ds, d: Dist, workers: int, probe: torch.Tensor | None):
    """A ``train(on_epoch=...)`` callback: test accuracy, and how far SE moved from identity."""

    def report(epoch: int, steps: int) -> None:
        acc, c, n = evaluate(model, test_ds, d, workers=workers)
        line = f"epoch {epoch}: {acc:.2f}% ({c}/{n}) after {steps} steps"
        if probe is not None:
            drift = se_drift(model, probe)
            line += f"; SE from identity: max |fc2 weight| {drift['fc2_max']:.4f}, " \
                    f"mean |gate - 1| {drift['gate_dev']:.4f}"
        d.log(line)

    return report


# ------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="torchvision or timm model name: resnet50, tv:resnet50, timm:convnext_tiny")
    w = ap.add_mutually_exclusive_group()
    w.add_argument("--weights", metavar="FILE", help="local pretrained checkpoint (safetensors or torch.save)")
    w.add_argument("--pretrained", action="store_true", help="download the default pretrained weights")
    ap.add_argument("--rules", default=None, help="rules file or preset name (default: all_stages)")
    ap.add_argument("--data", required=True, help="'digits' (offline) or an ImageFolder directory")
    ap.add_argument("--image-size", type=int, default=None, help="input size (default 32 for digits, else 224)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of the base model")
    ap.add_argument("--se-lr", type=float, default=1e-2, help="learning rate of the SE modules")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--freeze-base", action="store_true", help="train only the SE modules")
    ap.add_argument("--train-base-only", action="store_true",
                    help="no SE: train the plain model (e.g. from scratch) and save its full state_dict to --out")
    ap.add_argument("--out", default=None, help="output file (default se.safetensors, or base.safetensors)")
    ap.add_argument("--save-all-ranks", action="store_true",
                    help="every process also writes its own copy, OUT with .rankN before the suffix")
    ap.add_argument("--workers", type=int, default=None,
                    help="data loader workers (ImageFolder only; default: the CPUs this process may use)")
    ap.add_argument("--augment", choices=("none", "flip", "crop"), default="crop",
                    help="training augmentation of an ImageFolder (crop: random resized crop + flip; flip; none)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads; 1 (default) makes a run repeatable on another machine with the same CPU "
                         "type (float sums over more threads add in another order); 0 keeps torch's default")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda where there is one")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.train_base_only and args.freeze_base:
        ap.error("--freeze-base has no meaning with --train-base-only")
    if args.out is None:
        args.out = "base.safetensors" if args.train_base_only else "se.safetensors"
    return args


def main(argv=None) -> dict:
    """Run the script; return the accuracies and the trained (unwrapped) model."""
    args = parse_args(argv)
    d = None
    try:
        d = Dist(args.device)
        return _run(args, d)
    except se_surgery.SESurgeryError as e:
        fail(str(e))
    finally:
        if d is not None:
            d.close()


def _run(args, d: Dist) -> dict:
    # Seeds, deterministic algorithms and a fixed thread count: the same command gives the
    # same weights again (the same torch build and CPU type provided).
    deterministic(args.seed, threads=args.threads or None)
    data = load_data(args.data, args.image_size, seed=args.seed, workers=args.workers, augment=args.augment)
    model = build_for_training(args.model, data.classes, pretrained=args.pretrained)
    if args.weights:
        load_weights(model, args.weights, fresh_head=True, log=d.log)
    model.to(d.device)
    kw = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "max_steps": args.max_steps,
          "workers": data.workers}
    d.log(f"{args.model}: {len(data.train)} training / {len(data.test)} test images, {data.classes} classes, "
          f"{data.size}x{data.size}, {d.world} process(es) on {d.device.type}")

    if args.train_base_only:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                              weight_decay=args.weight_decay, nesterov=True)
        steps = train(model, data.train, opt, d, desc="base",
                      on_epoch=_epoch_report(model, data.test, d, data.workers, None), **kw)
        acc, c, n = evaluate(model, data.test, d, workers=data.workers)
        if d.rank == 0:
            from safetensors.torch import save

            # Written by Python's open(), so the file's mode follows the umask (save_file
            # writes 0600).
            Path(args.out).write_bytes(save({k: v.detach().to("cpu", copy=True).contiguous()
                                             for k, v in model.state_dict().items()}))
        d.barrier()
        d.log(f"accuracy: {acc:.2f}% ({c}/{n} test images) after {steps} steps of base training; "
              f"weights: {args.out}")
        return {"accuracy": acc, "steps": steps, "model": model}

    acc0, c0, n = evaluate(model, data.test, d, workers=data.workers)
    # inplace: the plain model is not needed any more; no second copy of its weights.
    model = se_surgery.apply(model, args.rules, input_size=data.input_size, inplace=True)
    acc1, c1, _ = evaluate(model, data.test, d, workers=data.workers)
    d.log(f"pretrained: {acc0:.2f}% ({c0}/{n}); with SE before training: {acc1:.2f}% ({c1}/{n})")
    if args.freeze_base:
        d.log(se_surgery.mark_only_se_trainable(model))
    groups = se_surgery.param_groups(model, lr=args.lr, se_lr=args.se_lr, weight_decay=args.weight_decay)
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    probe = torch.stack([data.test[i][0] for i in range(min(64, len(data.test)))]).to(d.device)
    steps = train(model, data.train, opt, d, desc="fine-tune",
                  on_epoch=_epoch_report(model, data.test, d, data.workers, probe), **kw)
    acc, c, _ = evaluate(model, data.test, d, workers=data.workers)
    if d.rank == 0:
        _save(model, args.out, with_base=not args.freeze_base)
    if args.save_all_ranks:
        _save(model, _rank_path(args.out, d.rank), with_base=not args.freeze_base)
    d.barrier()
    d.log(f"accuracy: {acc:.2f}% ({c}/{n} test images) after {steps} steps of fine-tuning with SE "
          f"(pretrained {acc0:.2f}%); SE checkpoint: {args.out}")
    return {"accuracy_pretrained": acc0, "accuracy_applied": acc1, "accuracy": acc, "steps": steps, "model": model}


if __name__ == "__main__":
    main()
