#!/usr/bin/env python
"""SE's cost on each runtime: torchvision resnet50 + all_stages and timm seresnet50 against resnet50.

    python benchmarks/runtimes.py [--runtime eager --runtime onnxruntime ...] [--batch 1 --batch 8]
                                  [--rounds 10] [--clock cpu]

Prints a markdown table: per runtime and batch, the median over interleaved rounds of the
paired ratio (candidate / base in the same round) with its quartiles, and the base's median
time. The SE gates are moved off the identity (se_surgery.studies.bench.move_gates_off_identity);
timm's seresnet50 is built with pretrained=False. One thread (torch, ONNX Runtime, OpenVINO).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

import se_surgery  # noqa: E402
from se_surgery.studies.bench import CLOCKS, _interleaved, _quartiles, _runner, check_runtimes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", action="append", choices=("eager", "compile", "onnxruntime", "openvino"))
    ap.add_argument("--batch", action="append", type=int)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="cpu")
    args = ap.parse_args()
    runtimes, batches = args.runtime or ["eager", "onnxruntime", "openvino"], args.batch or [1, 8]
    check_runtimes(runtimes)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    base = torchvision.models.resnet50().eval()
    ours = se_surgery.studies.bench.move_gates_off_identity(se_surgery.apply(base, "all_stages")).eval()
    theirs = timm.create_model("seresnet50", pretrained=False).eval()
    print(f"torch {torch.__version__}, 1 thread, 224 px, {args.rounds} interleaved rounds, clock {args.clock}")
    print("| runtime | batch | se-surgery / base | IQR | timm seresnet50 / base | IQR | base ms |")
    print("|---|---:|---:|---|---:|---|---:|")
    for runtime in runtimes:
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            fns = {k: _runner(m, runtime, x, 1) for k, m in (("base", base), ("ours", ours), ("timm", theirs))}
            t = _interleaved(fns, args.rounds, args.warmup, CLOCKS[args.clock])
            cells = []
            for k in ("ours", "timm"):
                r = [a / b for a, b in zip(t[k], t["base"])]
                q1, q3 = _quartiles(r)
                cells += [f"{statistics.median(r):.3f}", f"{q1:.3f}-{q3:.3f}"]
            print(f"| {runtime} | {batch} | " + " | ".join(cells) + f" | {1e3 * statistics.median(t['base']):.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
