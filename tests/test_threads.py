"""No process-global state: se-surgery's calls from several threads give exactly the
sequential results, and forwards of other models in other threads never notice them."""

from __future__ import annotations

import threading
import warnings

import torch
import torchvision
from torch import nn

import se_surgery
from se_surgery._compat import flop_counter, route_calls, unroute_calls

SIZE = (3, 64, 64)


def _work(model: nn.Module) -> tuple:
    """What one thread computes: sites, a plan applied, the report of what it would add."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_surgery.SESurgeryWarning)
        sites = [s.name for s in se_surgery.find_sites(model, SIZE)]
        patched = se_surgery.apply(model, se_surgery.plan(model, "all_stages", input_size=SIZE))
        added = se_surgery.report(model, "all_stages", input_size=SIZE).added_params
    n_se = len([n for n, _ in patched.named_modules() if n.endswith(".se")])
    return sites, n_se, added, patched


def test_concurrent_calls_give_the_sequential_results_and_other_forwards_never_notice():
    torch.manual_seed(0)
    models = [torchvision.models.resnet18().eval() for _ in range(3)]
    expected = _work(models[0])[:3]
    assert expected[1:] == (8, 89_080) and len(expected[0]) == 8
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 3))).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        reference = other(x)
    stop, failures, forwards = threading.Event(), [], [0]

    def forward_loop():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    if not torch.equal(other(x), reference):
                        failures.append("another output")
            except Exception as e:  # what fx's process-wide patch used to raise here
                failures.append(f"{type(e).__name__}: {e}")
            forwards[0] += 1

    results: dict[int, tuple] = {}

    def worker(i: int):
        try:
            results[i] = _work(models[i])
        except Exception as e:
            failures.append(f"worker {i}: {type(e).__name__}: {e}")

    call = nn.Module.__call__
    loop = threading.Thread(target=forward_loop)
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    loop.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    loop.join()
    assert failures == [] and forwards[0] > 0
    assert nn.Module.__call__ is call
    xs = torch.randn(1, *SIZE)
    for i in range(3):
        assert results[i][:3] == expected
        assert torch.equal(results[i][3](xs), models[i](xs))  # identity init: exactly the original


def test_routing_a_call_is_per_instance_and_skips_hooks_as_the_shape_pass_needs():
    a, b = nn.ReLU(), nn.ReLU()
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(m))
    try:
        route_calls(a, lambda *args, **kwargs: "routed")
        assert a(torch.ones(1)) == "routed" and seen == []  # no hook, not even a global one
        assert torch.equal(b(-torch.ones(1)), torch.zeros(1)) and seen == [b]  # another instance: unchanged
        unroute_calls(a)
        assert torch.equal(a(-torch.ones(1)), torch.zeros(1)) and seen == [b, a]  # the public path again
        assert "_compiled_call_impl" not in a.__dict__
    finally:
        handle.remove()


def test_flop_counter_counts_what_torch_counts_without_global_hooks():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    x = torch.randn(1, 3, 16, 16)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as public, torch.no_grad():
        m(x)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda mod, i, o: seen.append(mod))
    try:
        with flop_counter() as ours, torch.no_grad():
            assert not nn.modules.module._global_forward_pre_hooks  # torch's ModuleTracker would add one
            m(x)
    finally:
        handle.remove()
    assert ours.get_total_flops() == public.get_total_flops() > 0
