"""Fine-tuning workflow (issue 5): freezing, SE-only checkpoints, strip, a real run, DDP.

A small timm ResNet (``timm:test_resnet``, 374k parameters, one block per stage) is
trained from scratch on scikit-learn's handwritten digits (upscaled to 32x32) with
``examples/finetune.py --train-base-only``; that checkpoint is the "pretrained" model
every other test starts from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file

import se_surgery
from se_surgery import AlreadyPatchedError, CheckpointError, NotPatchedError
from se_surgery._record import facts_of
from se_surgery.hub import build_for_training, load_weights
from se_surgery.studies.train import Dist, digits_data, evaluate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune.py"
MODEL = "timm:test_resnet"
SIZE = 32


@pytest.fixture(scope="module")
def ft():
    """examples/finetune.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("se_surgery_finetune_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    _, test, _ = digits_data(SIZE)
    return test.tensors[0]


@pytest.fixture(scope="module")
def pretrained(ft, work) -> tuple[Path, float]:
    path = work / "base.safetensors"
    res = ft.main([MODEL, "--data", "digits", "--train-base-only", "--epochs", "2", "--lr", "0.1",
                   "--device", "cpu", "--out", str(path)])
    return path, res["accuracy"]


def fresh(path: Path) -> torch.nn.Module:
    m = build_for_training(MODEL, 10)
    load_weights(m, str(path), fresh_head=True)
    return m.eval()


@pytest.fixture(scope="module")
def tuned(ft, pretrained, work) -> tuple[dict, Path]:
    out = work / "se.safetensors"
    res = ft.main([MODEL, "--weights", str(pretrained[0]), "--data", "digits", "--freeze-base", "--epochs", "1",
                   "--se-lr", "0.05", "--device", "cpu", "--out", str(out)])
    return res, out


# ------------------------------------------------------------------ accuracy on real data


def test_pretrained_base_learned_the_digits(pretrained):
    print(f"pretrained (trained from scratch) test accuracy: {pretrained[1]:.2f}%")
    assert pretrained[1] >= 90.0


def test_apply_with_identity_init_keeps_outputs_and_accuracy(pretrained, test_images):
    base = fresh(pretrained[0])
    model = se_surgery.apply(base, input_size=SIZE)
    assert len(se_surgery.se_parameters(model)) == 16  # 4 sites x fc1/fc2 weight/bias
    with torch.no_grad():
        assert torch.equal(model(test_images), base(test_images))
    d, test = Dist("cpu"), digits_data(SIZE)[1]
    assert evaluate(model, test, d) == evaluate(base, test, d)


def test_finetune_with_se_keeps_accuracy(tuned, pretrained):
    res, _ = tuned
    print(f"pretrained {res['accuracy_pretrained']:.2f}%, after apply {res['accuracy_applied']:.2f}%, "
          f"after fine-tuning with SE {res['accuracy']:.2f}%")
    assert res["accuracy_pretrained"] == pretrained[1]
    assert res["accuracy_applied"] == res["accuracy_pretrained"]
    assert res["accuracy"] >= res["accuracy_pretrained"] - 1.0
    # The fine-tune really trained SE: the identity init's zero FC moved.
    fc2 = [p for n, p in se_surgery.se_parameters(res["model"]).items() if n.endswith("fc2.weight")]
    assert all(p.abs().sum() > 0 for p in fc2)
    assert res["steps"] == 23  # ceil(1437 / 64)


def test_a_full_fine_tune_saves_what_reproduces_its_accuracy(ft, pretrained, work):
    out = work / "full.safetensors"
    res = ft.main([MODEL, "--weights", str(pretrained[0]), "--data", "digits", "--epochs", "1", "--max-steps", "4",
                   "--lr", "0.05", "--se-lr", "0.05", "--device", "cpu", "--out", str(out)])
    loaded = se_surgery.load_se(fresh(pretrained[0]), out)
    assert evaluate(loaded, digits_data(SIZE)[1], Dist("cpu"))[0] == res["accuracy"]
    assert not torch.equal(se_surgery.strip(loaded).conv1[0].weight, fresh(pretrained[0]).conv1[0].weight)  # base trained


def test_freeze_base_leaves_every_base_tensor_unchanged(tuned, pretrained):
    res, _ = tuned
    base = fresh(pretrained[0]).state_dict()
    after = se_surgery.strip(res["model"]).state_dict()
    assert list(after) == list(base)
    assert all(torch.equal(after[k], base[k]) for k in base)  # weights and BatchNorm statistics


# ------------------------------------------------------------------ save_se / load_se / strip


def test_save_se_writes_only_se_weights_and_the_plan(tuned):
    res, out = tuned
    model = res["model"]
    with safe_open(str(out), "pt") as f:
        keys, meta = sorted(f.keys()), f.metadata()
        assert all(torch.equal(f.get_tensor(k), v) for k, v in se_surgery.se_parameters(model).items())
    # The SE parameters and each SE's gate scale, which travels with its weights.
    assert keys == sorted([*se_surgery.se_parameters(model), *(f"layer{i}.0.se_inserted.gate_scale" for i in range(1, 5))])
    assert keys[0] == "layer1.0.se_inserted.fc1.bias"  # timm's BasicBlock already has an ``se`` attribute
    assert set(meta) == {"format", "model_class", "input_size", "rules", "sites", "plan", "include_base"}
    assert meta["format"] == "se-surgery/2"
    assert meta["model_class"] == "timm.models.resnet.ResNet"
    assert meta["input_size"] == "[3, 32, 32]"
    rules = json.loads(meta["rules"])
    assert rules["source"] == "preset all_stages"
    assert rules["rules"] == [{"select": {"kind": "residual", "has_attention": False}}]
    plan = json.loads(meta["plan"])
    assert [e["module"] for e in plan] == [f"layer{i}.0.se_inserted" for i in (1, 2, 3, 4)]
    assert [(e["site"]["name"], e["site"]["channels"], e["site"]["spatial"]) for e in plan] == [
        ("layer1.0", 32, [8, 8]), ("layer2.0", 48, [4, 4]), ("layer3.0", 192, [2, 2]), ("layer4.0", 96, [1, 1])]
    assert json.loads(meta["sites"]) == [[e["site"]["name"], "residual", e["site"]["channels"]] for e in plan]
    assert plan[0]["options"] == {"variant": "standard"}  # as a rule writes them: the rest are the defaults
    assert {e["rule"] for e in plan} == {0}


def test_load_se_on_a_fresh_model_gives_identical_outputs(tuned, pretrained, test_images, work):
    res, out = tuned
    model = res["model"].eval()
    loaded = se_surgery.load_se(fresh(pretrained[0]), out)
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(test_images), model(test_images))
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # Rediscovered at the size apply() used (spatial sizes of 32x32 input, not 224x224).
    assert [r for _, _, r in se_surgery.inserted_modules(loaded)] == [r for _, _, r in se_surgery.inserted_modules(model)]
    assert facts_of(loaded) == facts_of(model) and facts_of(loaded)[0].input_size == (3, 32, 32)
    # Saving the loaded model again writes the same file content.
    again = work / "again.safetensors"
    se_surgery.save_se(loaded, again)
    with safe_open(str(out), "pt") as f, safe_open(str(again), "pt") as g:
        assert f.metadata() == g.metadata()
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())


def test_strip_gives_the_original_model(tuned, pretrained, test_images):
    res, _ = tuned
    model = res["model"]
    base = fresh(pretrained[0])
    plain = se_surgery.strip(model)
    assert type(plain) is type(base)
    assert [(n, type(m)) for n, m in plain.named_modules()] == [(n, type(m)) for n, m in base.named_modules()]
    assert list(plain.state_dict()) == list(base.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(test_images), base(test_images))
    assert se_surgery.is_patched(model) and not se_surgery.is_patched(plain)  # a copy unless inplace=True
    assert se_surgery.strip(model, inplace=True) is model and not se_surgery.is_patched(model)


@pytest.fixture()
def tv_resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _randomise_se(model):
    with torch.no_grad():
        for p in se_surgery.se_parameters(model).values():
            p.normal_(0, 0.1)


def test_round_trip_keeps_per_site_options(tv_resnet18, tmp_path):
    rules = {"defaults": {"ratio": 4, "divisor": 2},
             "rules": [{"select": {"stage": 1}, "variant": "pre"},
                       {"select": {"stage": -1}, "variant": "post", "squeeze": "avgmax", "gate": "hard_sigmoid"}]}
    model = se_surgery.apply(tv_resnet18, rules, input_size=SIZE)
    _randomise_se(model)
    se_surgery.save_se(model, tmp_path / "se.safetensors")
    fresh_model = torchvision.models.resnet18(num_classes=10).eval()
    fresh_model.load_state_dict(tv_resnet18.state_dict())
    loaded = se_surgery.load_se(fresh_model, tmp_path / "se.safetensors")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert not torch.equal(loaded(x), tv_resnet18(x))  # the SE weights matter
    opts = [(n, r.options.variant, r.options.squeeze, m.hidden) for n, m, r in se_surgery.inserted_modules(loaded)]
    assert opts == [("layer1.0.se", "pre", "avg", 16), ("layer1.1.se", "pre", "avg", 16),
                    ("layer4.0.se", "post", "avgmax", 128), ("layer4.1.se", "post", "avgmax", 128)]


def test_load_se_names_other_channels(tuned):
    _, out = tuned
    wider = build_for_training("timm:resnet10t", 10)  # same class and blocks as test_resnet, twice the channels
    with pytest.raises(CheckpointError) as e:
        se_surgery.load_se(wider, out)
    assert str(e.value) == f"{out}: site 'layer1.0' is a residual join of 64 channels in this ResNet, a residual " \
                           "join of 32 channels in the checkpoint's model"


def test_load_se_refuses_another_class(tuned):
    _, out = tuned
    with pytest.raises(CheckpointError) as e:
        se_surgery.load_se(torchvision.models.resnet18(num_classes=10), out)
    assert str(e.value) == f"{out}: made for a timm.models.resnet.ResNet, not a torchvision.models.resnet.ResNet"


def test_load_se_names_a_tensor_of_the_wrong_shape(tv_resnet18, tmp_path):
    f, bad = tmp_path / "se.safetensors", tmp_path / "bad.safetensors"
    se_surgery.save_se(se_surgery.apply(tv_resnet18, input_size=SIZE), f)
    with safe_open(str(f), "pt") as st:
        meta, tensors = st.metadata(), {k: st.get_tensor(k) for k in st.keys()}
    tensors["layer3.0.se.fc1.weight"] = torch.zeros(8, 256, 1, 1)
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(CheckpointError) as e:
        se_surgery.load_se(torchvision.models.resnet18(num_classes=10), bad)
    assert str(e.value) == f"{bad}: tensor 'layer3.0.se.fc1.weight' has shape (8, 256, 1, 1), this model needs " \
                           "(16, 256, 1, 1)"


def test_load_se_refuses_a_patched_model(tv_resnet18, tmp_path):
    f = tmp_path / "se.safetensors"
    patched = se_surgery.apply(tv_resnet18, input_size=SIZE)
    se_surgery.save_se(patched, f)
    with pytest.raises(AlreadyPatchedError):
        se_surgery.load_se(patched, f)


def test_no_pickle_in_save_and_load(tv_resnet18, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pickle used")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "dump"), (pickle, "dumps"),
                      (torch, "load"), (torch, "save")):
        monkeypatch.setattr(mod, name, refuse)
    f = tmp_path / "se.safetensors"
    se_surgery.save_se(se_surgery.apply(tv_resnet18, "late_stages", input_size=SIZE), f)
    assert se_surgery.is_patched(se_surgery.load_se(torchvision.models.resnet18(num_classes=10), f))


def test_helpers_refuse_a_model_without_se(tv_resnet18, tmp_path):
    for fn in (se_surgery.mark_only_se_trainable, se_surgery.strip,
               lambda m: se_surgery.save_se(m, tmp_path / "x.safetensors"),
               lambda m: se_surgery.param_groups(m, 0.1, 0.1)):
        with pytest.raises(NotPatchedError, match="ResNet has no SE from se-surgery"):
            fn(tv_resnet18)
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------ freezing and groups


def test_mark_only_se_trainable_resnet50_all_stages():
    model = se_surgery.apply(torchvision.models.resnet50(), "all_stages")
    line = se_surgery.mark_only_se_trainable(model)
    assert line == "trainable params: 2,530,992 || all params: 28,088,024 || trainable%: 9.0109"
    se = se_surgery.se_parameters(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2_530_992
    assert all(p.requires_grad == (n in se) for n, p in model.named_parameters())
    groups = se_surgery.param_groups(model, lr=0.1, se_lr=1.0)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("se", 1.0, 64)]


def test_param_groups_split_base_and_se(tv_resnet18):
    model = se_surgery.apply(tv_resnet18, "late_stages", input_size=SIZE)
    groups = se_surgery.param_groups(model, lr=0.01, se_lr=0.1, weight_decay=0.0)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("base", 0.01, 0.0), ("se", 0.1, 0.0)]
    se = {id(p) for p in se_surgery.se_parameters(model).values()}
    assert {id(p) for p in groups[1]["params"]} == se
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters()} - se


# ------------------------------------------------------------------ DistributedDataParallel


def test_torchrun_two_processes_keep_se_weights_identical(pretrained, work):
    out = work / "ddp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           MODEL, "--weights", str(pretrained[0]), "--data", "digits", "--epochs", "1", "--max-steps", "3",
           "--lr", "0.01", "--se-lr", "0.05", "--device", "cpu", "--out", str(out), "--save-all-ranks"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=work)
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("accuracy: ") and "after 3 steps of fine-tuning with SE" in last, run.stdout
    assert "2 process(es) on cpu" in run.stdout
    # Each epoch reports its accuracy and how far SE moved from identity (once: rank 0 only).
    assert run.stdout.count("epoch 1: ") == 1 and "mean |gate - 1|" in run.stdout, run.stdout
    files = [out, work / "ddp.rank0.safetensors", work / "ddp.rank1.safetensors"]
    opened = [safe_open(str(f), "pt") for f in files]
    keys = sorted(opened[0].keys())  # SE only, or SE and base where save_se has include_base
    assert all(sorted(o.keys()) == keys for o in opened)
    assert len([k for k in keys if ".se_inserted." in k]) == 20  # 4 x (fc1, fc2 weight and bias, gate scale)
    # Parameters agree on every rank (DDP); BatchNorm's running statistics are each rank's own.
    for k in [k for k in keys if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]:
        t = [o.get_tensor(k) for o in opened]
        assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2]), k
    # Three steps really moved every SE (the identity init's last FC starts at zero).
    assert all(opened[0].get_tensor(k).abs().sum() > 0 for k in keys if k.endswith("fc2.weight"))
