"""Checkpoints you can trust: full fine-tunes kept, wrapped and Hugging Face models, every field checked."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file

import se_surgery
from se_surgery import CheckpointError

SIZE = 32


def _base(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10).eval()


def _tuned(train_base: bool):
    model = se_surgery.apply(_base(), "late_stages", input_size=SIZE)
    if not train_base:
        se_surgery.mark_only_se_trainable(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    torch.manual_seed(1)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3, SIZE, SIZE)), torch.arange(4)).backward()
        opt.step()
    return model.eval()


def test_a_full_fine_tune_is_kept(tmp_path):
    tuned = _tuned(train_base=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    only_se, full = tmp_path / "se.safetensors", tmp_path / "full.safetensors"
    with pytest.warns(se_surgery.SESurgeryWarning, match=r"base parameter\(s\) of ResNet are trainable .* "
                                                         r"save_se\(\.\.\., include_base=True\) keeps them"):
        se_surgery.save_se(tuned, only_se)
    se_surgery.save_se(tuned, full, include_base=True)
    assert not torch.equal(se_surgery.load_se(_base(), only_se)(x), tuned(x))  # the base's training is not in it
    assert torch.equal(se_surgery.load_se(_base(), full)(x), tuned(x))


@pytest.mark.parametrize("wrap", ["data_parallel", "compile"])
def test_wrapped_models_round_trip_onto_wrapped_and_bare(tmp_path, wrap):
    def wrapped(m):
        return torch.nn.DataParallel(m) if wrap == "data_parallel" else torch.compile(m)

    with torch.no_grad():
        tuned = se_surgery.apply(wrapped(_base()), "late_stages", input_size=SIZE)
        for p in se_surgery.se_parameters(tuned).values():
            p.normal_()
    f = tmp_path / "se.safetensors"
    se_surgery.save_se(tuned, f)
    with safe_open(str(f), "pt") as st:
        assert all(k.startswith("layer") for k in st.keys())  # the bare model's names
        assert json.loads(st.metadata()["plan"])[0]["site"]["name"] == "layer3.0"
    x = torch.randn(2, 3, SIZE, SIZE)
    bare = se_surgery.load_se(_base(), f)
    assert torch.allclose(bare(x), tuned(x), atol=1e-5)  # compiled code may sum in another order
    again = se_surgery.load_se(wrapped(_base()), f)
    assert type(again) is type(tuned) and torch.allclose(again(x), bare(x), atol=1e-5)


def test_hugging_face_models_round_trip(tmp_path):
    import transformers

    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                    num_labels=10)
    torch.manual_seed(0)
    tuned = se_surgery.apply(transformers.ResNetForImageClassification(cfg).eval(), input_size=SIZE)
    with torch.no_grad():
        for p in se_surgery.se_parameters(tuned).values():
            p.normal_()
    f = tmp_path / "se.safetensors"
    se_surgery.save_se(tuned, f)
    torch.manual_seed(0)
    loaded = se_surgery.load_se(transformers.ResNetForImageClassification(cfg).eval(), f)
    x = torch.randn(1, 3, SIZE, SIZE)
    assert torch.equal(loaded(x).logits, tuned(x).logits)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict, dict]:
    f = tmp_path_factory.mktemp("ckpt") / "se.safetensors"
    se_surgery.save_se(se_surgery.apply(_base(), "late_stages", input_size=SIZE).requires_grad_(False), f)
    with safe_open(str(f), "pt") as st:
        return f, st.metadata(), {k: st.get_tensor(k) for k in st.keys()}


def _plan_edit(key, value):
    def edit(meta, tensors):
        plan = json.loads(meta["plan"])
        plan[0]["options"][key] = value
        meta["plan"] = json.dumps(plan)
    return edit


def _set(field, value):
    def edit(meta, tensors):
        meta[field] = value
    return edit


def _dtype(dtype):
    def edit(meta, tensors):
        tensors["layer3.0.se.fc1.weight"] = tensors["layer3.0.se.fc1.weight"].to(dtype)
    return edit


def _duplicate(meta, tensors):
    plan = json.loads(meta["plan"])
    meta["plan"] = json.dumps(plan + plan[:1])


@pytest.mark.parametrize("edit, message", [
    (_set("input_size", "5"), "metadata field 'input_size' must be a list, got int"),
    (_set("input_size", '"abc"'), "metadata field 'input_size' must be a list, got str"),
    (_set("input_size", "[3, 1e999, 32]"), r"'input_size' must be 3 positive ints \(C, H, W\), got \[3, inf, 32\]"),
    (_set("rules", json.dumps(json.dumps({"rules": []}))), "metadata field 'rules' must be a dict, got str"),
    (_set("plan", "[{"), "metadata field 'plan' is not valid JSON"),
    (_plan_edit("ratio", 0), r"plan entry 0: options .*ratio must be"),
    (_plan_edit("variant", "middle"), r"plan entry 0: options .*variant must be one of"),
    (_duplicate, r"plan entry 4: 'layer3.0.se' appears twice in the plan"),
    (_dtype(torch.int64), r"tensor 'layer3.0.se.fc1.weight' has dtype torch.int64, this model's is torch.float32"),
    (_dtype(torch.bool), r"tensor 'layer3.0.se.fc1.weight' has dtype torch.bool"),
    (_set("plan", "[" * 100_000 + "]" * 100_000), "metadata field 'plan' is nested too deeply to be a checkpoint's"),
    (_set("sites", json.dumps([[["layer3.0"], "residual", 256]])),
     r"metadata field 'sites' must list \[name, kind, channels\] triples \(a string, a string and an integer\)"),
])
def test_every_field_is_checked_before_anything_changes(saved, tmp_path, edit, message):
    f, meta, tensors = saved
    meta, tensors = dict(meta), dict(tensors)
    edit(meta, tensors)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    model = _base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"^{bad}: .*{message}"):
        se_surgery.load_se(model, bad, inplace=True)
    assert not se_surgery.is_patched(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_save_names_the_users_path_and_replaces_only_files(tmp_path):
    model = se_surgery.apply(_base(), "late_stages", input_size=SIZE).requires_grad_(False)
    for path, message in [
        (None, "the checkpoint path must be a file name, got None"),
        (tmp_path, f"'{tmp_path}' exists and is a directory; give a file name"),
        (tmp_path / "missing" / "se.safetensors", f"cannot write '{tmp_path}/missing/se.safetensors': the folder"),
        ("/proc/se.safetensors", "cannot write '/proc/se.safetensors': "),
    ]:
        with pytest.raises(CheckpointError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
            se_surgery.save_se(model, path)
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []  # nothing left behind, nothing replaced


def test_layer_scaled_branches_are_warned_about():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        se_surgery.plan(torchvision.models.convnext_tiny(), "all_stages", input_size=32)
    assert any("scale their branch by a learned layer scale" in str(w.message) for w in caught)


def _patched():
    return se_surgery.apply(_base(), "late_stages", input_size=SIZE).requires_grad_(False)


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path):
    import os

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    long = tmp_path / ("x" * 300 + ".safetensors")
    for path, error, message in [
        (tmp_path, CheckpointError, f"SE checkpoint '{tmp_path}' is a directory, not a file"),
        (fifo, CheckpointError, f"SE checkpoint '{fifo}' is a named pipe (FIFO), not a file"),
        ("/dev/zero", CheckpointError, "SE checkpoint '/dev/zero' is a device, not a file"),
        (empty, CheckpointError, f"SE checkpoint '{empty}' is empty (0 bytes)"),
        (long, CheckpointError, f"'{str(long)[:60]}...{str(long)[-57:]}': cannot look at it: File name too long"),
        (tmp_path / "none.safetensors", se_surgery.MissingFileError, "SE checkpoint '.*none.safetensors' not found"),
        (["a"], CheckpointError, r"the checkpoint path must be a file name, got \['a'\]"),
    ]:
        with pytest.raises(error, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
            se_surgery.load_se(_base(), path)
    with pytest.raises(CheckpointError, match="cannot look at it: File name too long"):
        se_surgery.save_se(_patched(), long)


def test_a_full_disk_names_the_users_path(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        raise SafetensorError(f"Error while serializing: IoError(Os {{ code: 28, kind: StorageFull, message: "
                              f"\"No space left on device\" }}) writing {filename}")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    target = tmp_path / "se.safetensors"
    with pytest.raises(CheckpointError, match=f"^cannot write '{target}': Error while serializing: .*No space left "
                                              "on device.* writing the file$"):
        se_surgery.save_se(_patched(), target)
    assert list(tmp_path.iterdir()) == []


def test_meta_device_models_are_refused_with_what_to_do(tmp_path, saved):
    f, _, _ = saved
    for call in (lambda m: se_surgery.save_se(se_surgery.apply(m, "late_stages", input_size=SIZE), tmp_path / "x"),
                 lambda m: se_surgery.load_se(m, f)):
        with pytest.raises(CheckpointError, match=r"conv1.weight is on the meta device \(shapes without values\); "
                                                  "materialise the model first"):
            call(_base().to("meta"))


def test_files_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        target = tmp_path / "se.safetensors"
        se_surgery.save_se(_patched(), target)
        assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    finally:
        os.umask(old)
