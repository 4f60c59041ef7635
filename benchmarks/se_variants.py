#!/usr/bin/env python
"""Where the time of an inserted SE goes, and which formulation of it is fastest.

    python benchmarks/se_variants.py [--device cpu|cuda] [--batch N] [--nchw]

Times patched torchvision resnet50 (``all_stages``, identity init, inference) with the
SE module's squeeze and scale swapped for alternative formulations, interleaved with the
base model and timm ``seresnet50``, and prints the CUDA (or CPU) kernels that take the
most time in one patched forward. A study, not part of ``run.py``'s tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import build_candidate, interleave, paired_ratio  # noqa: E402

from se_surgery._se import SqueezeExcite  # noqa: E402

_orig_pool = SqueezeExcite._pool
_orig_forward = SqueezeExcite.forward


def pool_avgpool(self, x):
    return F.adaptive_avg_pool2d(x, 1)


def pool_sum(self, x):
    return x.sum((2, 3), keepdim=True, dtype=torch.float32).mul_(1.0 / (x.shape[2] * x.shape[3])).to(x.dtype)


def forward_mul_add(self, x, skip=None, inplace=False):
    if skip is None:
        return _orig_forward(self, x)
    g = self._excite(x)
    if self.gate_scale != 1.0:
        g = g * self.gate_scale
    if inplace and not torch.is_grad_enabled():
        return x.mul_(g).add_(skip)
    return x * g + skip


VARIANTS = {
    "mean + addcmul (current)": (None, None),
    "adaptive_avg_pool2d + addcmul": (pool_avgpool, None),
    "fp32 sum + addcmul": (pool_sum, None),
    "mean + mul_/add_": (None, forward_mul_add),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--nchw", action="store_true")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    batch = args.batch or (64 if cuda else 8)
    amp = torch.bfloat16 if cuda else None
    mf = torch.contiguous_format if (args.nchw or not cuda) else torch.channels_last
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    x = torch.randn(batch, 3, 224, 224, device=dev).to(memory_format=mf)
    models = {n: build_candidate(n).eval().to(dev, memory_format=mf)
              for n in ("tv resnet50", "patched (identity)", "timm seresnet50")}

    def call(m, variant=None):
        def f():
            pool, fwd = VARIANTS[variant] if variant else (None, None)
            SqueezeExcite._pool = pool or _orig_pool
            SqueezeExcite.forward = fwd or _orig_forward
            with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                m(x)
        return f

    fns = {"tv resnet50": call(models["tv resnet50"]), "timm seresnet50": call(models["timm seresnet50"])}
    for v in VARIANTS:
        fns[f"patched: {v}"] = call(models["patched (identity)"], v)
    with torch.inference_mode():
        ref = None
        for n, f in fns.items():
            f(), f()
    s = interleave(fns, args.rounds, 10 if cuda else 1, sync)
    print(f"{dev.type} batch {batch} {'bf16' if amp else 'fp32'} {'NCHW' if mf is torch.contiguous_format else 'channels_last'}"
          f", torch {torch.__version__}")
    print(f"{'':36s} {'ms':>7s} {'/base':>7s} {'/timm-se':>9s}")
    for n, v in s.items():
        print(f"{n:36s} {1000 * statistics.median(v):7.2f} {paired_ratio(v, s['tv resnet50']):7.3f} "
              f"{paired_ratio(v, s['timm seresnet50']):9.3f}")
    SqueezeExcite._pool, SqueezeExcite.forward = _orig_pool, _orig_forward
    del ref
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for n in ("patched (identity)", "tv resnet50"):
        f = call(models[n])
        with profile(activities=acts) as prof:
            for _ in range(3):
                f()
            sync()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(f"\n{n}: top ops/kernels over 3 forwards")
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
