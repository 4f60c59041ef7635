"""What SE costs where the model runs: latency of the base and each rule set on each runtime.

MACs hide SE's cost (the paper: +0.26 % FLOPs, +10 % GPU time), and a deployment runtime
fuses the base network much harder than eager PyTorch does. :func:`bench` measures the
base model and the model patched by each rule set on each runtime (eager PyTorch,
``torch.compile``, ONNX Runtime, OpenVINO), in one process, the candidates of a runtime
interleaved round by round (the order rotating), and reports the median of the per-round
paired ratios to the base with its spread, the absolute times and the MACs ratio.

The SE gates are moved off the identity (the last FC gets small deterministic weights), so
what is timed is a real gate: a runtime could not fold an exact identity away.

ONNX Runtime and OpenVINO are optional extras (``pip install 'se-surgery[onnx]'``,
``'se-surgery[openvino]'``); asking for one that is not installed raises
:class:`RuntimeUnavailableError` naming the package.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import SESurgeryError

__all__ = ["RUNTIMES", "BenchRow", "RuntimeUnavailableError", "bench", "check_runtimes", "format_rows",
           "move_gates_off_identity"]

RUNTIMES = ("eager", "compile", "onnxruntime", "openvino")
# runtime -> (module to import, what to install)
_PACKAGES = {"onnxruntime": ("onnxruntime", "pip install 'se-surgery[onnx]' (onnxruntime, onnx)"),
             "openvino": ("openvino", "pip install 'se-surgery[openvino]' (openvino)")}


class RuntimeUnavailableError(SESurgeryError, ImportError):
    """A runtime :func:`bench` was asked for is not installed."""


@dataclass(frozen=True)
class BenchRow:
    """One rule set on one runtime at one batch size, against the base on the same runtime.

    ``ratio`` is the median over rounds of patched time / base time in the same round;
    ``spread`` its quartiles; ``base_ms`` and ``patched_ms`` the median times of one call;
    ``macs_ratio`` (base + added MACs) / base MACs from :func:`se_surgery.report`.
    """

    rules: str
    runtime: str
    batch: int
    ratio: float
    spread: tuple[float, float]
    base_ms: float
    patched_ms: float
    macs_ratio: float
    rounds: int
    threads: int


def check_runtimes(runtimes: Sequence[str]) -> None:
    """Raise before any model is built if a runtime is unknown or not installed.

    Example:
        >>> check_runtimes(["eager"])
        >>> check_runtimes(["tensorrt"])
        Traceback (most recent call last):
        ...
        se_surgery.studies.bench.RuntimeUnavailableError: unknown runtime 'tensorrt'; choose from eager, compile, onnxruntime, openvino
    """  # noqa: E501 - doctest output must match verbatim
    for rt in runtimes:
        if rt not in RUNTIMES:
            raise RuntimeUnavailableError(f"unknown runtime {rt!r}; choose from {', '.join(RUNTIMES)}")
        module, install = _PACKAGES.get(rt, (None, ""))
        if module is not None and importlib.util.find_spec(module) is None:
            raise RuntimeUnavailableError(f"runtime {rt!r} needs the {module} package, which is not installed: "
                                          f"{install}")
        if rt == "onnxruntime" and importlib.util.find_spec("onnx") is None:
            raise RuntimeUnavailableError(f"runtime 'onnxruntime' needs the onnx package for the export: {install}")


def move_gates_off_identity(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Give every SE's last FC small deterministic weights, so its gate is no longer exactly 1.

    Changes ``model`` (pass a copy) and returns it. At identity init a runtime could fold
    the gate away; a benchmark must time a real one.

    Example:
        >>> import torchvision, se_surgery
        >>> m = move_gates_off_identity(se_surgery.apply(torchvision.models.resnet18(), "late_stages"))
        >>> se = next(s for s in m.modules() if isinstance(s, se_surgery.SqueezeExcite))
        >>> bool((se.gate(torch.randn(1, se.channels, 4, 4)) != 1).any())
        True
    """
    from .._record import inserted_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module, _ in inserted_modules(model):
            # The tensors identity init zeroes (a bias too: the gate moves even where the
            # hidden activations are all 0), each scaled to its fan-in.
            for t in getattr(module, "identity_tensors", lambda: [])():
                fan_in = t[0].numel() if t.dim() > 1 else 1
                t.copy_(torch.randn(t.shape, generator=g) * scale / fan_in ** 0.5)
    return model


def _runner(model: nn.Module, runtime: str, x: torch.Tensor, threads: int) -> Callable[[], object]:
    """A no-argument callable that runs ``model`` on ``x`` once in ``runtime`` (warmed up by the caller)."""
    model = model.eval()
    if runtime == "eager":
        def eager():
            with torch.inference_mode():
                return model(x)
        return eager
    if runtime == "compile":
        compiled = torch.compile(model)

        def run_compiled():
            with torch.inference_mode():
                return compiled(x)
        return run_compiled
    if runtime == "onnxruntime":
        import onnxruntime as ort

        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporter notices are not the user's concern here
            # The TorchScript-based exporter: it writes SE's squeeze as GlobalAveragePool, which ONNX
            # Runtime keeps in its blocked layout (the dynamo exporter writes ReduceMean; docs/performance.md).
            torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"])  # type: ignore[arg-type]  # takes a buffer
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        feed = {"x": x.numpy()}
        return lambda: sess.run(None, feed)
    import openvino as ov

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ov_model = ov.convert_model(model, example_input=x)
    compiled_ov = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                            "PERFORMANCE_HINT": "LATENCY"})
    request = compiled_ov.create_infer_request()
    data = x.numpy()
    return lambda: request.infer([data])


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one call each per round, the order rotating every round."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = clock()
            fns[n]()
            times[n].append(clock() - t)
    return times


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return (xs[0], xs[0])
    q = statistics.quantiles(xs, n=4)
    return (q[0], q[2])


def _patch_each(base: nn.Module, rules: Sequence, labels: list[str], size: tuple[int, int, int]):
    """{label: patched copy with gates off the identity}, {label: MACs ratio to the base}."""
    import se_surgery

    patched, macs = {}, {}
    for label, r in zip(labels, rules):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a rule selecting no site warns; the row shows ratio ~1
            patched[label] = move_gates_off_identity(se_surgery.apply(base, r, input_size=size)).eval()
            rep = se_surgery.report(base, r, input_size=size)
        macs[label] = (rep.base_macs + rep.added_macs) / rep.base_macs
    return patched, macs


def bench(model: nn.Module, rules: Sequence = ("all_stages",), *, runtimes: Sequence[str] = ("eager",),
          batches: Sequence[int] = (1,), threads: int | None = 1, input_size: int | tuple[int, int] | None = None,
          rounds: int = 20, warmup: int = 3, names: Sequence[str] | None = None,
          clock: str = "wall") -> list[BenchRow]:
    """Time ``model`` and ``apply(model, r)`` for each rule set ``r`` on each runtime; one row per (r, runtime, batch).

    ``model`` is not changed (each rule set patches a copy, whose gates are moved off the
    identity by :func:`move_gates_off_identity`). ``threads`` sets torch's (and the
    runtime's) intra-op threads for the duration of the call, then restores torch's
    (``None`` leaves them); ``input_size`` is a square side or (H, W) (default 224).
    ``names`` labels the rule sets in the rows (default: their text). ``clock="cpu"``
    times the process's CPU time instead of wall time: with one thread, a latency that
    other processes on a shared machine disturb much less.

    Example:
        >>> import torchvision
        >>> rows = bench(torchvision.models.resnet18(), ["late_stages"], input_size=32, rounds=2, warmup=1)
        >>> [(r.rules, r.runtime, r.batch) for r in rows], rows[0].macs_ratio > 1
        ([('late_stages', 'eager', 1)], True)
    """
    check_runtimes(runtimes)
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {tuple(CLOCKS)}, got {clock!r}")
    if rounds < 1 or warmup < 0 or not batches or min(batches) < 1:
        raise ValueError(f"rounds >= 1, warmup >= 0 and batch sizes >= 1 expected; got rounds={rounds}, "
                         f"warmup={warmup}, batches={list(batches)}")
    hw = (224, 224) if input_size is None else (input_size, input_size) if isinstance(input_size, int) \
        else tuple(input_size)
    labels = list(names) if names is not None else [r if isinstance(r, str) else f"rules{i}" for i, r in
                                                     enumerate(rules)]
    base = copy.deepcopy(model).eval()
    size = (3, hw[0], hw[1])
    patched, macs = _patch_each(base, rules, labels, size)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)  # the measurement's own setting, restored below
    try:
        rows = []
        for runtime in runtimes:
            for batch in batches:
                x = torch.randn((batch, *size), generator=torch.Generator().manual_seed(0))
                fns = {"base": _runner(base, runtime, x, threads or old_threads)}
                fns.update({f"patched:{k}": _runner(m, runtime, x, threads or old_threads) for k, m in patched.items()})
                times = _interleaved(fns, rounds, warmup, CLOCKS[clock])
                for label in patched:
                    pt, bt = times[f"patched:{label}"], times["base"]
                    ratios = [p / b for p, b in zip(pt, bt)]
                    q1, q3 = _quartiles(ratios)
                    rows.append(BenchRow(label, runtime, batch, round(statistics.median(ratios), 4),
                                         (round(q1, 4), round(q3, 4)), round(1e3 * statistics.median(bt), 3),
                                         round(1e3 * statistics.median(pt), 3), round(macs[label], 4), rounds,
                                         threads or old_threads))
        return rows
    finally:
        torch.set_num_threads(old_threads)


def format_rows(rows: Sequence[BenchRow], fmt: str = "table") -> str:
    """``"table"`` (markdown) or ``"json"`` (a list of objects with every :class:`BenchRow` field).

    Example:
        >>> row = BenchRow("all_stages", "eager", 1, 1.05, (1.04, 1.06), 10.0, 10.5, 1.004, 20, 1)
        >>> print(format_rows([row]))
        | rules | runtime | batch | patched / base | spread (IQR) | base ms | patched ms | MACs ratio |
        |---|---|---:|---:|---|---:|---:|---:|
        | all_stages | eager | 1 | 1.050 | 1.040-1.060 | 10.00 | 10.50 | 1.0040 |
    """
    if fmt == "json":
        return json.dumps([asdict(r) for r in rows], indent=1)
    lines = ["| rules | runtime | batch | patched / base | spread (IQR) | base ms | patched ms | MACs ratio |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    lines += [f"| {r.rules} | {r.runtime} | {r.batch} | {r.ratio:.3f} | {r.spread[0]:.3f}-{r.spread[1]:.3f} | "
              f"{r.base_ms:.2f} | {r.patched_ms:.2f} | {r.macs_ratio:.4f} |" for r in rows]
    return "\n".join(lines)
