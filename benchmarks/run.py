#!/usr/bin/env python
"""se-surgery benchmarks: what surgery costs, and what the inserted SE costs at runtime.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--out benchmarks/RESULTS.md]

Prints markdown tables and writes them to ``--out`` (one section per device, so a CPU run
and a GPU run can share the file; a rerun replaces only its own device's section).

Method: every comparison runs its candidates interleaved in one process (the order
rotates every round), several rounds; tables give medians and the median of the
per-round paired ratios, never single absolute times, so load from other processes
hits all candidates alike.

Sections:
  surgery   find_sites / plan / apply / report time (medians, warm) and peak memory of
            each, against the peak of one real forward pass of the same model at batch 1.
            Peak memory is the kernel's peak-RSS counter (VmHWM, reset through
            /proc/self/clear_refs) minus the RSS before the call, measured in a fresh
            process per (model, call) started with MALLOC_MMAP_THRESHOLD_=65536 so that
            freed tensors go back to the OS and RSS follows live memory; it counts tensors,
            Python objects and everything else. The Python-heap part (tracemalloc peak)
            is shown beside it.
  runtime   torchvision resnet50, patched resnet50 (all_stages, init identity and paper;
            the SE as the fused op se_surgery::se_join, and the identity model once more
            on the pre-fused aten composite, ``SqueezeExcite.use_fused = False``),
            timm seresnet50 and timm resnet50: inference and one SGD training step.
            CPU: batch 8 at 224, fp32 (``--batch 1``: the batch-1 table, its own section).
            CUDA: batch 64 at 224, bf16 autocast.
  memory    peak memory of one training step (CPU: peak RSS in a fresh process per model,
            as above; CUDA: torch.cuda.max_memory_allocated).
  compile   the inference comparison under torch.compile (``--compile-mode``: default, or
            reduce-overhead, its own section).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # runs from a plain checkout too (PYTHONPATH-free)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

warnings.filterwarnings("ignore")

# (label, source, name, rules, input size for discovery and the reference forward)
SURGERY_MODELS = [
    ("resnet50", "tv", "resnet50", "all_stages", 224),
    ("resnet152", "tv", "resnet152", "all_stages", 224),
    ("densenet201", "tv", "densenet201", "inception", 224),
    ("inception_v3", "tv", "inception_v3", "inception", 299),
    ("timm resnet200d", "timm", "resnet200d", "all_stages", None),
    ("timm convnext_large", "timm", "convnext_large", "all_stages", None),
]
QUICK_SURGERY = ("resnet50", "inception_v3")
SURGERY_OPS = ("find_sites", "plan", "apply", "report")

PAPER_RULES = {"defaults": {"init": "paper"}, "rules": [{"select": {"kind": "residual", "has_attention": False}}]}
RUNTIME_CANDIDATES = ("tv resnet50", "patched (identity)", "patched (identity, composite)", "patched (paper)",
                      "timm seresnet50", "timm resnet50")
COMPILE_CANDIDATES = ("tv resnet50", "patched (identity)", "patched (identity, composite)", "timm seresnet50")
BASE, TIMM_SE = "tv resnet50", "timm seresnet50"


# --------------------------------------------------------------------------- helpers

def build(src: str, name: str):
    if src == "tv":
        import torchvision

        kw = {"init_weights": True} if name in ("inception_v3", "googlenet") else {}
        return getattr(torchvision.models, name)(weights=None, **kw)
    import timm

    return timm.create_model(name, pretrained=False)


def build_candidate(label: str):
    """One of the runtime candidates, on CPU, fp32."""
    import se_surgery

    torch.manual_seed(0)
    if label == "tv resnet50":
        return build("tv", "resnet50")
    if label == "patched (identity)":
        return se_surgery.apply(build("tv", "resnet50"), "all_stages", inplace=True)
    if label == "patched (identity, composite)":
        model = se_surgery.apply(build("tv", "resnet50"), "all_stages", inplace=True)
        for m in model.modules():
            if isinstance(m, se_surgery.SqueezeExcite):
                m.use_fused = False  # the pre-fused path: plain aten ops, autograd's backward
        return model
    if label == "patched (paper)":
        return se_surgery.apply(build("tv", "resnet50"), PAPER_RULES, inplace=True)
    if label == "timm seresnet50":
        return build("timm", "seresnet50")
    if label == "timm resnet50":
        return build("timm", "resnet50")
    raise KeyError(label)


def machine_line(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    parts = [f"host `{platform.node()}`", f"CPU {cpu} ({os.cpu_count()} logical cores)"]
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        parts.append(f"GPU {p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)")
    parts += [f"torch {torch.__version__}", f"Python {platform.python_version()}",
              f"torch threads {torch.get_num_threads()}"]
    try:
        import torchvision

        parts.append(f"torchvision {torchvision.__version__}")
        import timm

        parts.append(f"timm {timm.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


# Wall time by default; ``--clock cpu`` times this thread's CPU time instead, which other
# processes on a shared machine barely disturb (meaningful with --threads 1 only, where all
# of torch's work runs on the calling thread).
CLOCK = time.perf_counter


def interleave(fns: dict, rounds: int, inner: int = 1, sync=lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``rounds`` samples each, candidates interleaved.

    Each round runs every candidate ``inner`` times back to back; the order rotates every
    round so no candidate always runs first or after the same neighbour.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            sync()
            t = CLOCK()
            for _ in range(inner):
                fns[n]()
            sync()
            samples[n].append((CLOCK() - t) / inner)
    return samples


def med(xs) -> float:
    return statistics.median(xs)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios a_i / b_i (candidates timed side by side)."""
    return med([x / y for x, y in zip(a, b)])


def md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def fmt_mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


# ------------------------------------------------------- peak memory in a fresh process

def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def peak_rss_of(fn) -> int:
    """Peak RSS above the RSS before ``fn()``: the kernel's VmHWM, reset just before."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


class _Tiny(torch.nn.Module):
    """A residual join and a concat join: warms imports and lazy init before a probe."""

    def __init__(self):
        super().__init__()
        c = torch.nn.Conv2d
        self.stem, self.bn = c(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.a, self.b1, self.b2 = c(8, 8, 3, padding=1), c(8, 4, 1), c(8, 4, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.a(x))
        x = torch.cat([self.b1(x), self.b2(x)], 1)
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def run_probe(spec: dict) -> dict:
    """Runs in a fresh process (see ``probe``): one measurement, printed as JSON."""
    torch.set_num_threads(spec["threads"])
    import se_surgery

    out: dict = {}
    if spec["what"] == "surgery":
        src, name, rules, size = spec["src"], spec["name"], spec["rules"], spec["size"]
        model = build(src, name)
        size = se_surgery._sites.resolve_input_size(model, size)
        op = spec["op"]
        # Warm up on a tiny model first, so that one-off imports and lazy initialisation
        # are not counted as the call's memory.
        tiny, every = _Tiny(), {"rules": [{"select": {}}]}
        with torch.no_grad():
            tiny.eval()(torch.randn(1, 3, 32, 32))
        if not op.startswith("forward"):
            getattr(se_surgery, op)(tiny, **({} if op == "find_sites" else {"rules": every}))
        if op.startswith("forward"):
            model.eval()
            x = torch.randn(1, *size)
            keep = op == "forward_autograd"  # as in training: activations kept for backward

            def fn():
                with torch.set_grad_enabled(keep):
                    model(x)
        else:
            fn = {
                "find_sites": lambda: se_surgery.find_sites(model, input_size=size),
                "plan": lambda: se_surgery.plan(model, rules, input_size=size),
                "apply": lambda: se_surgery.apply(model, rules, input_size=size),
                "report": lambda: se_surgery.report(model, rules, input_size=size),
            }[op]
        out["rss_cold"] = peak_rss_of(fn)  # first call: also pages in code and lazy state
        out["rss"] = peak_rss_of(fn)  # second call: what the call itself needs
        if not op.startswith("forward"):
            tracemalloc.start()
            fn()
            out["py"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    elif spec["what"] == "train":
        model = build_candidate(spec["candidate"])
        step = make_train_step(model, torch.device("cpu"), spec["batch"], None, False)
        step()  # optimizer state exists from here on
        out["rss"] = peak_rss_of(step)
    return out


def probe(spec: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_probe", json.dumps(spec)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"probe {spec} failed:\n{res.stderr[-2000:]}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------- surgery cost

def bench_surgery(args) -> str:
    import se_surgery

    models = [m for m in SURGERY_MODELS if not args.quick or m[0] in QUICK_SURGERY]
    rounds = 2 if args.quick else 5
    rows, mem_rows = [], []
    for label, src, name, rules, size in models:
        model = build(src, name)
        size = se_surgery._sites.resolve_input_size(model, size)
        fns = {  # defaults bind this round's model: the loop deletes it before the next
            "find_sites": lambda m=model, s=size: se_surgery.find_sites(m, input_size=s),
            "plan": lambda m=model, s=size, r=rules: se_surgery.plan(m, r, input_size=s),
            "apply": lambda m=model, s=size, r=rules: se_surgery.apply(m, r, input_size=s),
            "report": lambda m=model, s=size, r=rules: se_surgery.report(m, r, input_size=s),
        }
        t = time.perf_counter()
        patched = fns["apply"]()
        first_apply = time.perf_counter() - t
        n_se = len(se_surgery.se_parameters(patched)) // 4  # fc1/fc2 weight+bias per SE
        del patched
        for f in fns.values():
            f()  # warm: imports, fx and fake-tensor caches
        s = interleave(fns, rounds)
        params = sum(p.numel() for p in model.parameters())
        del model
        gc.collect()
        rows.append([label, f"{'x'.join(map(str, size[1:]))}", f"{params / 1e6:.1f} M", n_se, rules]
                    + [f"{med(s[op]):.3f}" for op in SURGERY_OPS] + [f"{first_apply:.3f}"])
        print(f"  surgery {label}: " + ", ".join(f"{op} {med(s[op]):.3f}s" for op in SURGERY_OPS), flush=True)
        if args.no_memory:
            continue
        spec = {"what": "surgery", "src": src, "name": name, "rules": rules, "size": list(size), "threads": args.threads}
        mem = {op: probe(dict(spec, op=op)) for op in ("forward", "forward_autograd") + SURGERY_OPS}
        fwd, fwd_grad = mem["forward"]["rss"], mem["forward_autograd"]["rss"]
        peak = {op: max(mem[op]["rss"], mem[op]["py"]) for op in SURGERY_OPS}
        mem_rows.append([label, fmt_mib(fwd), fmt_mib(fwd_grad)]
                        + [f"{fmt_mib(peak[op])} ({100 * peak[op] / fwd:.1f} %)" for op in SURGERY_OPS]
                        + [fmt_mib(mem["report"]["py"]), fmt_mib(mem["report"]["rss_cold"]),
                           mark(peak["report"] < 0.10 * fwd),
                           f"{100 * peak['report'] / fwd_grad:.1f} % {mark(peak['report'] < 0.10 * fwd_grad)}"])
        print(f"  memory {label}: forward {fmt_mib(fwd)} MiB, "
              + ", ".join(f"{op} {fmt_mib(peak[op])}" for op in SURGERY_OPS), flush=True)
    out = [
        "### Surgery cost",
        "",
        f"Seconds per call, median of {rounds} interleaved rounds after one warm-up call (`apply` first call: "
        "the very first `apply` on that model in the process, cold caches). Rules: `all_stages` for residual "
        "models, `inception` for concat models.",
        "",
        md_table(["model", "input", "params", "SE", "rules"] + [f"{op} s" for op in SURGERY_OPS] + ["apply first call s"],
                 rows),
    ]
    if mem_rows:
        out += [
            "",
            "Peak memory in MiB above the memory before the call, and in % of the peak of one real forward "
            "pass of the same model (batch 1, eval, `no_grad`, the same input size), a fresh process per cell. "
            "Each cell is the larger of the peak RSS of a warm call (the second; tensors are mmapped, so RSS "
            "follows them) and the tracemalloc peak of the Python heap. `apply` copies the model "
            "(`inplace=False`), so its peak includes one copy of the weights. `report` cold = peak RSS of "
            "the first call in the process, which also pages in code and lazy state. *forward with autograd*: "
            "the same forward with gradients enabled, as in training, so activations stay alive for backward.",
            "",
            md_table(["model", "one forward MiB", "forward with autograd MiB"]
                     + [f"{op} MiB (% of forward)" for op in SURGERY_OPS]
                     + ["report Python heap MiB", "report cold MiB", "report < 10 % of forward",
                        "report % of autograd forward (< 10 %)"], mem_rows),
        ]
    return "\n".join(out)


# ------------------------------------------------------------------- runtime cost

def make_train_step(model, device, batch, amp_dtype, channels_last):
    model.train()
    mf = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=mf)
    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=mf)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def make_infer(model, device, batch, amp_dtype, channels_last):
    model.eval()
    mf = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=mf)
    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=mf)

    def infer():
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            model(x)

    return infer


def runtime_rows(samples: dict[str, list[float]], extra: dict[str, list] | None = None) -> list[list]:
    rows = []
    for n, s in samples.items():
        row = [n, f"{1000 * med(s):.1f}", f"{paired_ratio(s, samples[BASE]):.3f}",
               f"{paired_ratio(s, samples[TIMM_SE]):.3f}" if TIMM_SE in samples else "-"]
        rows.append(row + list((extra or {}).get(n, [])))
    return rows


def run_settings(args, device: torch.device):
    """(cuda, batch, autocast dtype, channels_last, sync, calls per round) for a device."""
    cuda = device.type == "cuda"
    batch = args.batch or (64 if cuda else 8)
    amp = torch.bfloat16 if cuda else None
    cl = args.channels_last if args.channels_last is not None else cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # A batch-1 CPU call is short: three back to back per round steady the per-round ratio.
    return cuda, batch, amp, cl, sync, 10 if cuda else (3 if batch == 1 else 1)


def bench_runtime(args, device: torch.device) -> str:
    import se_surgery

    cuda, batch, amp, cl, sync, inner = run_settings(args, device)
    r_inf = (8 if args.quick else 20) if cuda else (4 if args.quick else (30 if batch == 1 else 15))
    r_train = (5 if args.quick else 15) if cuda else (2 if args.quick else 8)
    setting = (f"{device.type.upper()} eager, batch {batch} at 224x224, "
               f"{'bf16 autocast' if amp else 'fp32'}, {'channels_last' if cl else 'NCHW (contiguous)'}")

    # Exactness and size checks, once, on CPU in fp32.
    base = build_candidate("tv resnet50").eval()
    patched = se_surgery.apply(base, "all_stages").eval()
    xc = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        exact = torch.equal(patched(xc), base(xc))
    added = sum(p.numel() for p in patched.parameters()) - sum(p.numel() for p in base.parameters())
    del base, patched

    models = {n: build_candidate(n) for n in RUNTIME_CANDIDATES}
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    infer = {n: make_infer(m, device, batch, amp, cl) for n, m in models.items()}
    for f in infer.values():
        f(), f()
    s_inf = interleave(infer, r_inf, inner, sync)
    print("  inference done", flush=True)
    train = {n: make_train_step(m, device, batch, amp, cl) for n, m in models.items()}
    for f in train.values():
        f(), f()
    s_train = interleave(train, r_train, max(1, inner // 2), sync)
    print("  train done", flush=True)

    # Peak memory of one training step.
    mem: dict[str, int] = {}
    if not args.no_memory:
        for n, f in train.items():
            if cuda:
                sync()
                gc.collect()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                f()
                sync()
                mem[n] = torch.cuda.max_memory_allocated() - before
            else:
                mem[n] = probe({"what": "train", "candidate": n, "batch": batch, "threads": args.threads})["rss"]
        print("  memory done", flush=True)

    rows_inf = runtime_rows(s_inf, {n: [f"{params[n]:,}"] for n in models})
    rows_train = runtime_rows(s_train)
    pi = paired_ratio(s_inf["patched (identity)"], s_inf[BASE])
    pc = paired_ratio(s_inf["patched (identity, composite)"], s_inf[BASE])
    fc = paired_ratio(s_inf["patched (identity)"], s_inf["patched (identity, composite)"])
    tb = paired_ratio(s_train["patched (identity)"], s_train[BASE])
    # The targets: CPU 1 thread <= 1.03 at batch 1 and <= 1.02 at batch 8; GPU <= 1.10.
    goal = 1.10 if cuda else (1.03 if batch == 1 else 1.02)
    pp = paired_ratio(s_inf["patched (paper)"], s_inf[BASE])
    si = paired_ratio(s_inf["patched (identity)"], s_inf[TIMM_SE])
    sp = paired_ratio(s_inf["patched (paper)"], s_inf[TIMM_SE])
    ti = paired_ratio(s_train["patched (identity)"], s_train[TIMM_SE])
    tp = paired_ratio(s_train["patched (paper)"], s_train[TIMM_SE])
    out = [
        f"### Runtime: {setting}",
        "",
        f"ms per call: median of {r_inf} (inference) / {r_train} (training step) interleaved rounds"
        + (f", each round the mean of {inner} (inference) / {max(1, inner // 2)} (training) back-to-back calls"
           if inner > 1 else ", one call per candidate per round")
        + "; ratios are medians of the per-round paired ratios. Patched = torchvision resnet50 + "
        f"`se_surgery.apply(rules='all_stages')` (16 SE modules, +{added:,} params). Identity-init patched "
        f"model equals the original exactly (`torch.equal`, eval, fp32): **{exact}**.",
        "",
        "**Inference** (`torch.inference_mode`)",
        "",
        md_table(["model", "ms", "/ tv resnet50", "/ timm seresnet50", "params"], rows_inf),
        "",
        "**One training step** (forward, cross-entropy, backward, SGD momentum step)",
        "",
        md_table(["model", "ms", "/ tv resnet50", "/ timm seresnet50"], rows_train),
    ]
    targets = [
        f"- inference, patched / timm seresnet50 <= 1.00: identity {si:.3f} {mark(si <= 1.0)}, "
        f"paper {sp:.3f} {mark(sp <= 1.0)}",
        f"- inference, patched / base <= {goal:.2f} (batch {batch}): identity {pi:.3f} {mark(pi <= goal)}, "
        f"paper {pp:.3f} {mark(pp <= goal)}; pre-fused composite {pc:.3f}",
        f"- inference, fused / pre-fused composite (identity): {fc:.3f}",
        f"- training step, patched / timm seresnet50: identity {ti:.3f}, paper {tp:.3f}; patched (identity) / base "
        f"{tb:.3f}",
    ]
    if mem:
        mrows = [[n, fmt_mib(b), f"{b / mem[BASE]:.3f}", f"{b / mem[TIMM_SE]:.3f}"] for n, b in mem.items()]
        how = ("torch.cuda.max_memory_allocated above the memory allocated before the step" if cuda else
               "peak RSS above the RSS before the step, a fresh process per model, second step (see the top of "
               "benchmarks/run.py)")
        out += ["", f"**Training-step peak memory** (MiB; {how})", "",
                md_table(["model", "peak MiB", "/ tv resnet50", "/ timm seresnet50"], mrows)]
        mi, mp = mem["patched (identity)"] / mem[TIMM_SE], mem["patched (paper)"] / mem[TIMM_SE]
        targets.append(f"- training peak memory, patched / timm seresnet50 <= 1.05: identity {mi:.3f} {mark(mi <= 1.05)}, "
                       f"paper {mp:.3f} {mark(mp <= 1.05)}")
    out += ["", "Targets:", ""] + targets
    del models, infer, train
    gc.collect()
    return "\n".join(out)


def bench_compile(args, device: torch.device) -> str:
    cuda, batch, amp, cl, sync, inner = run_settings(args, device)
    rounds = 6 if args.quick else (20 if cuda else 12)
    names = RUNTIME_CANDIDATES if args.compile_all else COMPILE_CANDIDATES
    torch._dynamo.reset()
    fns, ctime = {}, {}
    for n in names:
        model = build_candidate(n)
        compiled = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)
        f = make_infer(model, device, batch, amp, cl)
        mf = torch.channels_last if cl else torch.contiguous_format
        x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=mf)

        def g(compiled=compiled, x=x):
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                compiled(x)

        del f
        sync()
        t = time.perf_counter()
        g()
        sync()
        ctime[n] = time.perf_counter() - t
        g()
        fns[n] = g
        print(f"  compiled {n} in {ctime[n]:.1f}s", flush=True)
    s = interleave(fns, rounds, inner, sync)
    rows = runtime_rows(s, {n: [f"{ctime[n]:.0f}"] for n in names})
    out = [
        f"### Runtime under torch.compile: {device.type.upper()}, inference, batch {batch}, "
        f"{'bf16 autocast' if amp else 'fp32'}, {'channels_last' if cl else 'NCHW'}",
        "",
        f"`torch.compile(model, mode={args.compile_mode!r})`, ms per call, median of {rounds} interleaved rounds"
        + (f" of {inner} calls" if inner > 1 else "") + "; compile s = the first call.",
        "",
        md_table(["model", "ms", "/ tv resnet50", "/ timm seresnet50", "compile s"], rows),
    ]
    return "\n".join(out)


# ------------------------------------------------------------------------- output

def write_section(path: Path, key: str, body: str) -> None:
    """Put ``body`` between this key's markers in ``path``, replacing what was there."""
    begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
    head = ("# se-surgery benchmarks\n\nGenerated by `python benchmarks/run.py` (see its docstring for the method). "
            "Each table is replaced by the next run of its section on the same device.\n")
    text = path.read_text() if path.exists() else head
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def section_key(args, sec: str) -> str:
    """The RESULTS.md block of a run: one per device, section, and non-default batch or compile mode."""
    key = f"{args.device}:{sec}"
    if sec == "compile" and args.compile_mode != "default":
        key += f"-{args.compile_mode}"
    if sec in ("runtime", "compile") and args.batch and args.batch != (64 if args.device == "cuda" else 8):
        key += f"-batch{args.batch}"
    return key


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer models and rounds, no torch.compile")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    ap.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                    help="channels_last inputs and weights (default on CUDA only)")
    ap.add_argument("--nchw", dest="channels_last", action="store_false", help="contiguous NCHW (default on CPU)")
    ap.add_argument("--sections", default=None,
                    help="comma list of surgery,runtime,compile (default: all on CPU; runtime,compile on CUDA)")
    ap.add_argument("--compile-all", action="store_true", help="compile all runtime candidates, not four")
    ap.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"),
                    help="torch.compile mode of the compile section (not default: its own section)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time per call: wall clock, or this thread's CPU time (shared machines; --threads 1)")
    ap.add_argument("--_probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._probe:
        print(json.dumps(run_probe(json.loads(args._probe))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    if args.clock == "cpu":
        if args.device != "cpu" or args.threads != 1:
            print("--clock cpu needs --device cpu --threads 1 (other threads' work would not count)", file=sys.stderr)
            return 2
        global CLOCK
        CLOCK = time.thread_time
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    default = "runtime,compile" if device.type == "cuda" else "surgery,runtime,compile"
    sections = (args.sections or default).split(",")
    if args.quick and not args.sections:
        sections = [s for s in sections if s != "compile"]
    env = machine_line(args.device)
    print(f"Machine: {env}", flush=True)
    cmd = "python benchmarks/run.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    stamp = f"Machine: {env}.  \nCommand: `{cmd.strip()}`; {time.strftime('%Y-%m-%d %H:%M')}."
    if args.clock == "cpu":
        stamp += " Times are this thread's CPU time (`--clock cpu`), not wall time."
    if args.quick:
        stamp += " **Quick run** (fewer models and rounds)."
    t0 = time.time()
    shown = []
    for sec in sections:
        print(f"[{sec}]", flush=True)
        if sec == "surgery":
            body = bench_surgery(args)
        elif sec == "runtime":
            body = bench_runtime(args, device)
        elif sec == "compile":
            body = bench_compile(args, device)
        else:
            raise SystemExit(f"unknown section {sec!r}")
        body = f"{body}\n\n{stamp}"
        shown.append(body)
        # One marked block per device and section, written as soon as it is done: a
        # killed run keeps what it had, and rerunning one section replaces only it.
        write_section(args.out, section_key(args, sec), body)
    print()
    print("\n\n".join(shown))
    print(f"\n(wrote {args.out}; {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
