"""Fine-tuning machinery shared by ``examples/finetune.py`` and ``se-surgery sweep``.

Data (the offline scikit-learn digits, or an ImageFolder), a local-checkpoint loader
that tolerates a classifier for other classes, a seeded SGD loop with a cosine
schedule that runs in DistributedDataParallel under ``torchrun``, evaluation, and a
measure of how far the SE modules moved from identity. Building a model by name is
the hub's job (:func:`se_surgery.hub.build_model`); everything here takes a model.

Optional dependencies (scikit-learn for ``digits``, tqdm for progress bars) are
imported only where they are used, so ``import se_surgery`` stays light.
"""

from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from ..errors import MissingFileError, SESurgeryError

__all__ = [
    "Data",
    "Dist",
    "digits_data",
    "evaluate",
    "folder_data",
    "default_workers",
    "deterministic",
    "freeze_norm_stats",
    "load_data",
    "se_drift",
    "seed_everything",
    "train",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------ data


@dataclass
class Data:
    """A train/test split, the number of classes, the square input size and loader workers."""

    train: Dataset
    test: Dataset
    classes: int
    size: int
    workers: int = 0

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)


def digits_data(size: int = 32) -> tuple[TensorDataset, TensorDataset, int]:
    """scikit-learn's 1,797 handwritten digits as (train, test, classes) tensor datasets.

    Each 8x8 image is scaled to ``size`` x ``size``, repeated to 3 channels and
    normalised like ImageNet inputs, so ImageNet-pretrained models see familiar
    statistics. The split is fixed (stratified 80/20, 1,437 / 360 images).

    Example:
        >>> train, test, classes = digits_data(16)
        >>> len(train), len(test), classes, tuple(train[0][0].shape)
        (1437, 360, 10, (3, 16, 16))
    """
    try:
        import numpy as np
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SESurgeryError("data='digits' needs scikit-learn: pip install 'se-surgery[examples]'") from None

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx]), 10


AUGMENTATIONS = ("none", "flip", "crop")


def _transforms(size: int, augment: str):
    from torchvision import transforms

    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    # Resize the short side and centre-crop: the whole image, as the test split sees it.
    resize = [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)]
    train = {"none": resize, "flip": [*resize, transforms.RandomHorizontalFlip()],
             "crop": [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]}[augment]
    return (transforms.Compose([*train, transforms.ToTensor(), norm]),
            transforms.Compose([*resize, transforms.ToTensor(), norm]))


def folder_data(root: str | os.PathLike, size: int = 224, seed: int = 0, *,
                augment: str = "crop") -> tuple[Dataset, Dataset, int]:
    """An ImageFolder as (train, test, classes): ``root/train`` + ``root/val``, else one folder split 80/20.

    Test images are resized (short side ``size * 256 / 224``) and centre-cropped to
    ``size``. Training images get ``augment``: ``"crop"`` (default, the ImageNet recipe:
    a random resized crop and a flip), ``"flip"`` (the test transform and a random flip)
    or ``"none"`` (the test transform: for data where position and scale carry the
    label, such as small digits, random crops cut the label out). The 80/20 split of a
    single folder is fixed by ``seed``.

    Example:
        >>> folder_data("/no/such/dir")
        Traceback (most recent call last):
        ...
        se_surgery.errors.MissingFileError: data '/no/such/dir': not a directory (give an ImageFolder directory, or 'digits')
    """  # noqa: E501 - doctest output must match verbatim
    if augment not in AUGMENTATIONS:
        raise SESurgeryError(f"augment {augment!r}: use one of {', '.join(AUGMENTATIONS)}")
    r = Path(root)
    if not r.is_dir():
        raise MissingFileError(f"data {str(root)!r}: not a directory (give an ImageFolder directory, or 'digits')")
    from torchvision import datasets

    train_tf, test_tf = _transforms(size, augment)
    try:
        if (r / "train").is_dir() and (r / "val").is_dir():
            train, test = datasets.ImageFolder(r / "train", train_tf), datasets.ImageFolder(r / "val", test_tf)
            if train.classes != test.classes:
                raise SESurgeryError(f"data {str(root)!r}: train/ and val/ have different classes")
            return train, test, len(train.classes)
        train, test = datasets.ImageFolder(r, train_tf), datasets.ImageFolder(r, test_tf)
    except FileNotFoundError as e:  # ImageFolder's "Couldn't find any class folder" / "Found no valid file"
        raise MissingFileError(f"data {str(root)!r}: not an ImageFolder ({e})") from None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(0.8 * len(order))
    return Subset(train, order[:cut]), Subset(test, order[cut:]), len(train.classes)


def default_workers() -> int:
    """Data-loader workers by default: the CPUs this process may use (``os.cpu_count()`` where
    the affinity mask is unknown).

    Example:
        >>> default_workers() >= 1
        True
    """
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_data(spec: str, size: int | None = None, *, seed: int = 0, workers: int | None = None,
              augment: str = "crop") -> Data:
    """``"digits"`` (offline, default 32 px, no loader workers) or an ImageFolder directory (default 224 px).

    ``workers`` defaults to :func:`default_workers`; ``augment`` is the training
    augmentation of an ImageFolder (see :func:`folder_data`; digits get none).

    Example:
        >>> d = load_data("digits")
        >>> d.classes, d.input_size, d.workers
        (10, (3, 32, 32), 0)
    """
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 8192):
        raise SESurgeryError(f"size {size!r}: must be an integer from 1 to 8192 (pixels a side)")
    if workers is not None and (not isinstance(workers, int) or not 0 <= workers <= 1024):
        raise SESurgeryError(f"workers {workers!r}: must be an integer from 0 to 1024")
    if spec == "digits":
        size = size or 32
        return Data(*digits_data(size), size=size, workers=0)
    size = size or 224
    return Data(*folder_data(spec, size, seed, augment=augment), size=size,
                workers=default_workers() if workers is None else workers)


# ----------------------------------------------------------------------------- model


# -------------------------------------------------------------------------- training


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (where installed) and torch's generators, on every device.

    Example:
        >>> seed_everything(0); a = torch.rand(1)
        >>> seed_everything(0); torch.equal(a, torch.rand(1))
        True
    """
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)


def deterministic(seed: int = 0, threads: int | None = 1) -> None:
    """Make a run repeatable where PyTorch allows: seeds, deterministic algorithms, fixed threads.

    Seeds every generator (:func:`seed_everything`), asks torch for deterministic
    algorithms (``warn_only``: an op without one warns instead of failing), turns off
    cuDNN's benchmark autotuner and, with ``threads``, fixes the number of CPU threads:
    a float sum over 1 or 16 threads adds in another order, so the same seed gives other
    weights on another machine unless the thread count is the same. Bit-identical runs
    still need the same PyTorch build and hardware. This sets process-wide torch
    settings: call it once at the start of a script, not from library code.

    Example:
        >>> deterministic(0); a = torch.rand(2)
        >>> deterministic(0); torch.equal(a, torch.rand(2)), torch.get_num_threads()
        (True, 1)
    """
    seed_everything(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, read at first use
    if threads is not None:
        torch.set_num_threads(threads)


class Dist:
    """Who this process is: rank, world size, device.

    Under ``torchrun`` (which sets ``RANK`` and ``WORLD_SIZE``) the process group is
    started, with nccl on GPUs and gloo on CPU, and training runs in
    DistributedDataParallel, even with one process. ``device`` is ``"cuda"``, ``"cpu"``
    or ``None`` for CUDA where there is one. Only rank 0 logs.

    Example:
        >>> d = Dist("cpu")  # outside torchrun: one process
        >>> d.rank, d.world, d.device.type, d.distributed
        (0, 1, 'cpu', False)
    """

    def __init__(self, device: str | None = None):
        self.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.world = int(os.environ["WORLD_SIZE"]) if self.distributed else 1
        self.rank = int(os.environ["RANK"]) if self.distributed else 0
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device not in (None, "cpu", "cuda"):
            raise SESurgeryError(f"device {device!r}: use 'cpu' or 'cuda'")
        cuda = torch.cuda.is_available() if device is None else device == "cuda"
        if cuda and not torch.cuda.is_available():
            raise SESurgeryError("device 'cuda': no CUDA device here (use 'cpu')")
        self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")

    def log(self, *args, **kw) -> None:
        if self.rank == 0:
            print(*args, **kw, flush=True)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (a picklable object made by this program, never read from a file)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def freeze_norm_stats(model: nn.Module) -> None:
    """Put every BatchNorm whose parameters are all frozen in eval mode.

    A frozen BatchNorm still moves its running statistics in train mode; this keeps
    them (and so the frozen base model's function) exactly as loaded.

    Example:
        >>> bn = nn.BatchNorm2d(4).train().requires_grad_(False)
        >>> freeze_norm_stats(bn); bn.training
        False
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters())
            if params and not any(p.requires_grad for p in params):
                m.eval()


def _bar(loader, desc: str, show: bool):
    if show:
        try:
            from tqdm import tqdm
        except ImportError:
            return loader
        return tqdm(loader, desc=desc, leave=True, file=sys.stderr)
    return loader


def train(model: nn.Module, dataset, optimizer, d: Dist, *, epochs: int, batch_size: int, seed: int = 0,
          max_steps: int | None = None, workers: int = 0, desc: str = "train", progress: bool = True,
          on_epoch: Callable[[int, int], None] | None = None) -> int:
    """Train ``model`` (already on ``d.device``), in DDP under torchrun; return the steps run.

    Every process sees its own shard (DistributedSampler seeded with ``seed``,
    reshuffled each epoch); the learning rate follows a cosine from each group's ``lr``
    to 0 over the run (``epochs`` epochs, or ``max_steps`` steps if fewer). BatchNorms
    whose parameters are frozen keep their statistics. ``on_epoch(epoch, steps)`` is
    called on every rank after each epoch (1-based), in eval mode. Progress bars
    (tqdm, where installed) show on rank 0 when ``progress``.

    Example:
        >>> data = TensorDataset(torch.randn(8, 3), torch.tensor([0, 1] * 4))
        >>> net = nn.Linear(3, 2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> train(net, data, opt, Dist("cpu"), epochs=2, batch_size=4, progress=False)
        4
    """
    sampler: DistributedSampler[int] = DistributedSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=True,
                                                          seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=d.device.type == "cuda")
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                              lambda s: 0.5 * (1 + math.cos(math.pi * s / max(total, 1))))
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
        freeze_norm_stats(model)
        bar = _bar(loader, f"{desc} {epoch + 1}/{epochs}", progress and d.rank == 0)
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
            if bar is not loader:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if bar is not loader:
            bar.close()
        model.eval()
        if on_epoch is not None:
            on_epoch(epoch + 1, step)
    model.eval()
    return step


@torch.no_grad()
def evaluate(model: nn.Module, dataset, d: Dist, *, batch_size: int = 256, workers: int = 0) -> tuple[float, int, int]:
    """(accuracy in %, correct, total) over ``dataset``, each process taking every world-th image.

    Every image is counted exactly once over all processes (no padding, no duplicates).

    Example:
        >>> data = TensorDataset(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
        >>> net = nn.Linear(3, 2)
        >>> with torch.no_grad():
        ...     _ = net.bias.copy_(torch.tensor([1e3, 0.0]))
        >>> evaluate(net, data, Dist("cpu"))
        (100.0, 4, 4)
    """
    was = model.training
    model.eval()
    shard = Subset(dataset, range(d.rank, len(dataset), d.world))
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


@torch.no_grad()
def se_drift(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """How far the inserted modules (SE or any registered module) have moved from identity, on the batch ``x``.

    ``fc2_max``: the largest ``|value|`` over every module's tensors that identity init
    zeroes (SE's last FC, ECA's conv, ...; 0 at identity init); ``gate_dev``: the mean
    ``|excitation - 1|`` (:func:`se_surgery.modules.excitation`: the gate) over channels,
    images and modules (0 while every module still computes the identity). Runs one
    forward in eval mode.

    Example:
        >>> import torchvision, se_surgery
        >>> m = se_surgery.apply(torchvision.models.resnet18(), "late_stages", input_size=32)
        >>> se_drift(m, torch.randn(2, 3, 32, 32))
        {'fc2_max': 0.0, 'gate_dev': 0.0}
    """
    from .._record import inserted_modules
    from ..modules import excitation

    mods = [m for _, m, _ in inserted_modules(model)]
    devs: list[torch.Tensor] = []
    # The pre-hook reads the module's input before forward runs: an SE may write its
    # result into that tensor in place when no gradient is needed.
    hooks = [m.register_forward_pre_hook(lambda m, args: devs.append((excitation(m, args[0]) - 1).abs().mean()))
             for m in mods]
    was = model.training
    try:
        model.eval()
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    zeroed = [t for m in mods for t in getattr(m, "identity_tensors", list)()]
    fc2 = max((float(t.abs().max()) for t in zeroed), default=0.0)
    dev = float(torch.stack([d.float() for d in devs]).mean()) if devs else 0.0
    return {"fc2_max": fc2, "gate_dev": dev}
