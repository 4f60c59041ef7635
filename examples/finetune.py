#!/usr/bin/env python
"""Fine-tune a pretrained model with Squeeze-and-Excitation added by se-surgery.

The model keeps every pretrained weight; SE is added where ``--rules`` say (identity
init, so before training it computes exactly what the pretrained model did), then the
SE modules (and, without ``--freeze-base``, the base at its own learning rate) are
trained. Only the SE weights are saved, with ``se_surgery.save_se``.

Offline, on the handwritten digits scikit-learn ships (8x8 images, upscaled)::

    # 1. a small "pretrained" base model, trained from scratch
    python examples/finetune.py timm:test_resnet --data digits --train-base-only \\
        --epochs 4 --lr 0.1 --out base.safetensors
    # 2. add SE and train only the SE modules
    python examples/finetune.py timm:test_resnet --weights base.safetensors --data digits \\
        --freeze-base --epochs 1 --se-lr 0.05 --out se.safetensors

With a network, on your own ImageFolder (``DIR/train`` and ``DIR/val``, or one folder
split 80/20)::

    python examples/finetune.py tv:resnet50 --pretrained --data DIR --rules late_stages \\
        --epochs 3 --lr 1e-3 --se-lr 1e-2 --out se.safetensors

Several processes (DistributedDataParallel; gloo on CPU, nccl on GPU): prefix with
``torchrun --nproc_per_node N``. ``--batch-size`` is per process.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

import se_surgery

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def fail(msg: str):
    raise SystemExit(f"finetune.py: error: {msg}")


# ------------------------------------------------------------------------------ data


def digits_data(size: int = 32):
    """scikit-learn's 1,797 handwritten digits as (train, test, classes) tensors datasets.

    Each 8x8 image is scaled to ``size`` x ``size``, repeated to 3 channels and
    normalised like ImageNet inputs, so ImageNet-pretrained models see familiar
    statistics. The split is fixed (stratified 80/20, 1,437 / 360 images).
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx]), 10


def folder_data(root: str, size: int = 224, seed: int = 0):
    """An ImageFolder as (train, test, classes): ``root/train`` + ``root/val``, else one folder split 80/20."""
    from torchvision import datasets, transforms

    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    test_tf = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                                  transforms.ToTensor(), norm])
    r = Path(root)
    if not r.is_dir():
        fail(f"--data {root!r}: not a directory (give an ImageFolder directory, or 'digits')")
    if (r / "train").is_dir() and (r / "val").is_dir():
        train, test = datasets.ImageFolder(r / "train", train_tf), datasets.ImageFolder(r / "val", test_tf)
        if train.classes != test.classes:
            fail(f"--data {root!r}: train/ and val/ have different classes")
        return train, test, len(train.classes)
    train, test = datasets.ImageFolder(r, train_tf), datasets.ImageFolder(r, test_tf)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(0.8 * len(order))
    return Subset(train, order[:cut]), Subset(test, order[cut:]), len(train.classes)


# ----------------------------------------------------------------------------- model


def _set_head(model: nn.Module, num_classes: int) -> None:
    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(num_classes)
        return
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        fail(f"cannot find the classifier of {type(model).__name__} to give it {num_classes} classes")
    name, old = linears[-1]  # torchvision puts the classifier last (fc, classifier[-1], heads.head, head)
    parent, _, attr = name.rpartition(".")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _download(make, spec: str) -> nn.Module:
    try:
        return make()
    except (OSError, RuntimeError, ValueError) as e:  # no network, no cached file, no such weights
        fail(f"--pretrained: could not get the pretrained weights of {spec} ({type(e).__name__}: "
             f"{str(e).splitlines()[0] if str(e) else ''}); without a network, pass --weights FILE")


def build(spec: str, num_classes: int, *, pretrained: bool = False) -> nn.Module:
    """A torchvision or timm model by name (``resnet50``, ``tv:resnet50``, ``timm:resnet50.a1_in1k``).

    ``pretrained=True`` downloads the default weights (torchvision ``weights="DEFAULT"``,
    timm ``pretrained=True``) and gives the model a new ``num_classes`` head.
    """
    import torchvision

    source, _, name = spec.rpartition(":")
    if source in ("", "tv") and name in torchvision.models.list_models(module=torchvision.models):
        if not pretrained:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        model = _download(lambda: torchvision.models.get_model(name, weights="DEFAULT"), spec)
        _set_head(model, num_classes)
        return model
    if source in ("", "timm"):
        try:
            import timm
        except ImportError:
            timm = None
        if timm is not None and timm.is_model(name):
            if not pretrained:
                return timm.create_model(name, num_classes=num_classes)
            return _download(lambda: timm.create_model(name, pretrained=True, num_classes=num_classes), spec)
    from se_surgery.cli import build_model

    build_model(spec)  # raises UnknownModelError with the close matches
    fail(f"cannot build {spec!r}")


def load_base_weights(model: nn.Module, path: str, log=print) -> None:
    """Load a local checkpoint (safetensors, or ``torch.load`` with ``weights_only=True``).

    Tensors whose shape differs from the model's (a classifier for other classes) are
    left at their fresh initialisation, and said so; any other mismatch is an error.
    """
    p = Path(path)
    if not p.is_file():
        fail(f"--weights {path!r}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    reshaped = [k for k in state if k in own and state[k].shape != own[k].shape]
    for k in reshaped:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != set(reshaped):
        extra = sorted(set(missing) - set(reshaped))
        fail(f"--weights {path}: does not fit {type(model).__name__}: missing {extra[:3]}, unexpected "
             f"{list(unexpected)[:3]}")
    if reshaped:
        log(f"{path}: {', '.join(reshaped)} have other shapes (a head for other classes): freshly initialised")


# -------------------------------------------------------------------------- training


class Dist:
    """Who this process is: rank, world size, device.

    Under ``torchrun`` (which sets ``RANK`` and ``WORLD_SIZE``) the process group is
    started, with nccl on GPUs and gloo on CPU, and training runs in
    DistributedDataParallel, even with one process. ``device`` is ``"cuda"``, ``"cpu"``
    or ``None`` for CUDA where there is one.
    """

    def __init__(self, device: str | None = None):
        self.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.world = int(os.environ["WORLD_SIZE"]) if self.distributed else 1
        self.rank = int(os.environ["RANK"]) if self.distributed else 0
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() if device is None else device == "cuda"
        if cuda and not torch.cuda.is_available():
            fail("--device cuda: no CUDA device here")
        self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")

    def log(self, *args, **kw):
        if self.rank == 0:
            print(*args, **kw, flush=True)

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _freeze_norm_stats(model: nn.Module) -> None:
    # A frozen BatchNorm still moves its running statistics in train mode; keep them
    # (and so the base model's function) exactly as pretrained.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters())
            if params and not any(p.requires_grad for p in params):
                m.eval()


def train(model: nn.Module, dataset, optimizer, d: Dist, *, epochs: int, batch_size: int, seed: int = 0,
          max_steps: int | None = None, workers: int = 0, desc: str = "train") -> int:
    """Train ``model`` (already on ``d.device``), in DDP under torchrun; return the steps run.

    Every process sees its own shard (DistributedSampler, reshuffled each epoch); the
    learning rate follows a cosine from each group's ``lr`` to 0 over the run.
    """
    from tqdm import tqdm

    sampler = DistributedSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=d.device.type == "cuda")
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    net = model
    if d.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda"
                                                  else None)
    step = 0
    for epoch in range(epochs):
        if step >= total:
            break
        sampler.set_epoch(epoch)
        net.train()
        _freeze_norm_stats(model)
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", disable=d.rank != 0, leave=True, file=sys.stderr)
        for x, y in bar:
            if step >= total:
                break
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
    model.eval()
    return step


@torch.no_grad()
def evaluate(model: nn.Module, dataset, d: Dist, *, batch_size: int = 256, workers: int = 0) -> tuple[float, int, int]:
    """(accuracy in %, correct, total) over ``dataset``, each process taking every world-th image."""
    was = model.training
    model.eval()
    shard = Subset(dataset, range(d.rank, len(dataset), d.world))  # exact: no padding, no duplicates
    correct = torch.zeros(2, dtype=torch.long, device=d.device)
    for x, y in DataLoader(shard, batch_size=batch_size, num_workers=workers):
        pred = model(x.to(d.device)).argmax(1)
        correct[0] += (pred == y.to(d.device)).sum()
        correct[1] += len(y)
    if d.distributed:
        dist.all_reduce(correct)
    model.train(was)
    c, n = int(correct[0]), int(correct[1])
    return 100.0 * c / n, c, n


def _rank_path(out: str, rank: int) -> str:
    p = Path(out)
    return str(p.with_name(f"{p.stem}.rank{rank}{p.suffix}"))


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
    ap.add_argument("--workers", type=int, default=4, help="data loader workers (ImageFolder only)")
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
    d = Dist(args.device)
    try:
        return _run(args, d)
    except se_surgery.SESurgeryError as e:
        fail(str(e))
    finally:
        d.close()


def _run(args, d: Dist) -> dict:
    torch.manual_seed(args.seed)
    if args.data == "digits":
        size = args.image_size or 32
        train_ds, test_ds, classes = digits_data(size)
        workers = 0
    else:
        size = args.image_size or 224
        train_ds, test_ds, classes = folder_data(args.data, size, args.seed)
        workers = args.workers
    model = build(args.model, classes, pretrained=args.pretrained)
    if args.weights:
        load_base_weights(model, args.weights, log=d.log)
    model.to(d.device)
    kw = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, max_steps=args.max_steps,
              workers=workers)
    evaluate_kw = dict(workers=workers)
    d.log(f"{args.model}: {len(train_ds)} training / {len(test_ds)} test images, {classes} classes, "
          f"{size}x{size}, {d.world} process(es) on {d.device.type}")

    if args.train_base_only:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                              weight_decay=args.weight_decay, nesterov=True)
        steps = train(model, train_ds, opt, d, desc="base", **kw)
        acc, c, n = evaluate(model, test_ds, d, **evaluate_kw)
        if d.rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()},
                      args.out)
        d.barrier()
        d.log(f"accuracy: {acc:.2f}% ({c}/{n} test images) after {steps} steps of base training; "
              f"weights: {args.out}")
        return {"accuracy": acc, "steps": steps, "model": model}

    acc0, c0, n = evaluate(model, test_ds, d, **evaluate_kw)
    # inplace: the plain model is not needed any more; no second copy of its weights.
    model = se_surgery.apply(model, args.rules, input_size=(3, size, size), inplace=True)
    acc1, c1, _ = evaluate(model, test_ds, d, **evaluate_kw)
    d.log(f"pretrained: {acc0:.2f}% ({c0}/{n}); with SE before training: {acc1:.2f}% ({c1}/{n})")
    if args.freeze_base:
        d.log(se_surgery.mark_only_se_trainable(model))
    groups = se_surgery.param_groups(model, lr=args.lr, se_lr=args.se_lr, weight_decay=args.weight_decay)
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    steps = train(model, train_ds, opt, d, desc="fine-tune", **kw)
    acc, c, _ = evaluate(model, test_ds, d, **evaluate_kw)
    if d.rank == 0:
        se_surgery.save_se(model, args.out)
    if args.save_all_ranks:
        se_surgery.save_se(model, _rank_path(args.out, d.rank))
    d.barrier()
    d.log(f"accuracy: {acc:.2f}% ({c}/{n} test images) after {steps} steps of fine-tuning with SE "
          f"(pretrained {acc0:.2f}%); SE checkpoint: {args.out}")
    return {"accuracy_pretrained": acc0, "accuracy_applied": acc1, "accuracy": acc, "steps": steps, "model": model}


if __name__ == "__main__":
    main()
