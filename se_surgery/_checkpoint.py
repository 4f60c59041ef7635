"""Checkpoints: SE weights (and, after a full fine-tune, the base too) with the plan that made them.

A checkpoint is a safetensors file: no pickle. Its metadata records the model's class,
a fingerprint of its sites (name, kind, channels of every site discovery found), the
input size, the rules and, for every inserted module, its site and resolved options.
:func:`load_se` rebuilds exactly that plan on a fresh model, after checking every field
and every tensor, so a checkpoint never half-loads and never loads into a model it was
not made for.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ._checks import check_model
from ._compat import orig_mod
from ._insert import build_patches, plan_facts
from ._patch import OwnerPatch, base_class, copy_model, swap
from ._plan import Plan, PlannedSite, plan_from
from ._record import PlanFacts, facts_of, inserted_modules, is_patched, not_patched, set_facts
from ._rules import Rules, SEOptions, load_rules
from ._sites import KINDS, Analysis, Site, discover
from .errors import (
    AlreadyPatchedError,
    CheckpointError,
    MissingFileError,
    RuleError,
    SESurgeryWarning,
    warn,
)

__all__ = ["save_se", "load_se", "FORMAT"]

FORMAT = "se-surgery/2"


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The model inside DataParallel / DistributedDataParallel / torch.compile wrappers, and
    its path in the wrapper (``module``, ``_orig_mod``, ``""`` when there is none)."""
    path: list[str] = []
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            path.append("module")
        elif orig_mod(model) is not None:
            model = cast(nn.Module, orig_mod(model))
            path.append("_orig_mod")
        else:
            return model, ".".join(path)


def read_tensor_file(path: Path) -> Any:
    """What a local weights file holds: safetensors, or ``torch.load`` with
    ``weights_only=True`` (no pickled code runs), unwrapped from a ``{"state_dict": ...}``
    or ``{"model": ...}`` dict. Raises whatever the loader raises; callers say which file.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _strip_prefix(name: str, prefix: str) -> str:
    if not prefix:
        return name
    if name == prefix:
        return ""
    return name[len(prefix) + 1:] if name.startswith(prefix + ".") else name


def _class_path(model: nn.Module) -> str:
    cls = base_class(model)  # a root with joins of its own has a generated subclass
    return f"{cls.__module__}.{cls.__qualname__}"


def _short(path) -> str:
    text = str(path)
    return repr(text if len(text) <= 120 else text[:60] + "..." + text[-57:])


def _what_is(p: Path) -> str | None:
    """What a path that is not a regular file is (``"a directory"``), None for a file, or
    raise :class:`CheckpointError` when it cannot even be looked at (a name too long)."""
    import stat

    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as e:  # ENAMETOOLONG, ELOOP, EACCES on a folder on the way
        raise CheckpointError(f"{_short(p)}: cannot look at it: {e.strerror or e}") from None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _check_target(path) -> Path:
    p = _as_path(path)
    what = _what_is(p)
    if what not in (None, "missing"):
        raise CheckpointError(f"{_short(path)} exists and is {what}; give a file name")
    if p.is_symlink():
        raise CheckpointError(f"{_short(path)} is a symbolic link; give the file itself")
    if _what_is(p.parent) != "a directory":
        raise CheckpointError(f"cannot write {_short(path)}: the folder {_short(p.parent)} does not exist")
    return p


def _one_plan(model: nn.Module) -> PlanFacts:
    """The one plan the inserted modules of ``model`` came from."""
    found = facts_of(model)
    if len(found) != 1:
        sizes = sorted({"x".join(map(str, f.input_size)) for f in found})
        raise CheckpointError(f"the SE modules of this {type(model).__name__} come from {len(found)} apply() calls "
                              f"(input sizes {', '.join(sizes) or 'unknown'}); one apply() call makes one plan, "
                              "and a checkpoint holds one")
    return found[0]


def _metadata(inner: nn.Module, prefix: str, mods: list, facts: PlanFacts, include_base: bool) -> dict[str, str]:
    """The checkpoint's metadata: the model's class and sites, the plan, and each module's record."""

    def site_dict(site: Site) -> dict:
        d = site.to_dict()
        d["name"], d["owner"] = _strip_prefix(site.name, prefix), _strip_prefix(site.owner, prefix)
        return d

    rules = facts.rules
    return {
        "format": FORMAT,
        "model_class": _class_path(inner),
        "input_size": json.dumps(list(facts.input_size)),
        "rules": json.dumps(dict(rules.to_dict(), source=rules.source)),
        "sites": json.dumps([[_strip_prefix(n, prefix), k, c] for n, k, c in facts.sites]),
        "plan": json.dumps([{"module": name, "site": site_dict(rec.site),
                             "options": rec.options.rule_options(), "rule": rec.rule} for name, _, rec in mods]),
        "include_base": json.dumps(include_base),
    }


def _as_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise CheckpointError(f"the checkpoint path must be a file name, got {path!r}")
    return Path(path)


def _is_site_triple(s) -> bool:
    return (isinstance(s, list) and len(s) == 3 and isinstance(s[0], str) and isinstance(s[1], str)
            and isinstance(s[2], int) and not isinstance(s[2], bool))


def _check_values(model: nn.Module, path, doing: str) -> None:
    """Refuse a model whose weights are on the meta device: they have no values to save or load into."""
    meta = next((n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise CheckpointError(f"cannot {doing} {_short(path)}: {type(model).__name__}'s {meta} is on the meta device "
                              "(shapes without values); materialise the model first (model.to_empty(device=...) "
                              "and load its weights)")


def _open_new(folder: Path) -> str:
    """A new, empty file in ``folder`` created with mode 0666 less the umask, as ``open()``
    would create the checkpoint itself (``mkstemp`` would give 0600)."""
    import secrets

    for _ in range(100):
        name = str(folder / f".se-surgery-{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return name
        except FileExistsError:
            continue
    raise OSError(f"cannot create a temporary file in {folder}")


def save_se(model: nn.Module, path: str | os.PathLike, *, include_base: bool = False) -> None:
    """Write the SE weights to a safetensors file, with the plan that made them.

    Tensors are stored under their ``state_dict`` names (``layer3.0.se.fc1.weight``).
    With ``include_base=True`` every other tensor of the model is written too, so a
    fine-tune that trained the base is reproduced by :func:`load_se` on the original
    model; without it, a warning says when base parameters were trainable. A model
    wrapped in DataParallel, DistributedDataParallel or ``torch.compile`` is saved as
    the bare model, and loads onto either. The file is written next to ``path`` and
    moved into place, so a failed save leaves no half-written checkpoint.

    Example:
        >>> import tempfile, torchvision, se_surgery
        >>> m = se_surgery.apply(torchvision.models.resnet18(), "late_stages", input_size=64)
        >>> f = tempfile.mkdtemp() + "/se.safetensors"
        >>> se_surgery.save_se(m, f)
        >>> from safetensors import safe_open
        >>> with safe_open(f, "pt") as st:
        ...     len(st.keys()), st.metadata()["input_size"]
        (20, '[3, 64, 64]')
    """
    from safetensors.torch import save_file

    target = _check_target(path)
    inner, prefix = unwrap(check_model(model))
    mods = inserted_modules(inner)
    if not mods:
        raise not_patched(inner, "there are no SE weights to save")
    _check_values(inner, path, "save")
    se_ids = {id(p) for _, m, _ in mods for p in m.parameters()}
    trainable = [n for n, p in inner.named_parameters() if p.requires_grad and id(p) not in se_ids]
    if trainable and not include_base:
        warn(f"{len(trainable)} base parameter(s) of {type(inner).__name__} are trainable (e.g. {trainable[0]}): "
             "if they were trained, save_se(..., include_base=True) keeps them; this checkpoint holds only the SE "
             "weights")
    # The facts are on the model apply() returned: a wrapper's when the wrapper was applied to.
    meta = _metadata(inner, prefix, mods, _one_plan(model), include_base)
    state = inner.state_dict()
    names = {f"{name}.{k}" for name, m, _ in mods for k in m.state_dict()}
    keep = state if include_base else {k: v for k, v in state.items() if k in names}
    # Copies: safetensors refuses tensors that share storage, as state_dict views may.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in keep.items()}
    from safetensors import SafetensorError

    tmp = None
    try:
        tmp = _open_new(target.parent)
        mode = os.stat(tmp).st_mode & 0o777  # 0666 less the umask, as the kernel applied it
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, mode)  # safetensors writes its own file (0600); the user's umask decides
        os.replace(tmp, target)
    except (OSError, SafetensorError) as e:  # a full disk is a SafetensorError; the user's path, not the temp file's
        why = getattr(e, "strerror", None) or str(e).replace(str(tmp), "the file")
        raise CheckpointError(f"cannot write {_short(path)}: {why}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------ reading and checking


def is_se_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`save_se` (reads only its header).

    Example:
        >>> is_se_checkpoint("/no/such/file.safetensors")
        False
    """
    p = Path(path)
    try:
        if p.suffix != ".safetensors" or not p.is_file():
            return False
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            return str((f.metadata() or {}).get("format", "")).startswith("se-surgery/")
    except Exception:  # noqa: BLE001 - anything unreadable is not an SE checkpoint; its loader says why
        return False


def saved_plan_inputs(path: str | os.PathLike) -> tuple[tuple[int, int, int], Rules]:
    """The input size and rules an SE checkpoint was planned with, checked as :func:`load_se` checks them.

    Example:
        >>> import tempfile, torchvision, se_surgery
        >>> f = tempfile.mkdtemp() + "/se.safetensors"
        >>> se_surgery.save_se(se_surgery.apply(torchvision.models.resnet18(), "late_stages", input_size=64), f)
        >>> size, rules = saved_plan_inputs(f)
        >>> size, rules.source
        ((3, 64, 64), 'preset late_stages')
    """
    p = Path(path)
    meta, _ = _read(p)
    size, rules, *_ = _parse(p, meta)
    return cast(tuple[int, int, int], size), rules


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    what = _what_is(path)
    if what == "missing":
        raise MissingFileError(f"SE checkpoint {_short(path)} not found")
    if what is not None:
        raise CheckpointError(f"SE checkpoint {_short(path)} is {what}, not a file; give a .safetensors file "
                              "written by se_surgery.save_se")
    if path.stat().st_size == 0:
        raise CheckpointError(f"SE checkpoint {_short(path)} is empty (0 bytes); an interrupted copy?")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({first})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an se-surgery checkpoint of this version (metadata format "
                              f"{meta.get('format')!r}, expected {FORMAT!r}); write one with se_surgery.save_se")
    return meta, tensors


def _field(path: Path, meta: dict, key: str, kind: type | tuple):
    if key not in meta:
        raise CheckpointError(f"{path}: metadata field {key!r} is missing")
    try:
        value = json.loads(meta[key], parse_constant=lambda c: math.nan)
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: metadata field {key!r} is not valid JSON") from None
    except RecursionError:
        raise CheckpointError(f"{path}: metadata field {key!r} is nested too deeply to be a checkpoint's") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: metadata field {key!r} must be a {getattr(kind, '__name__', kind)}, got "
                              f"{type(value).__name__}")
    return value


_SITE_TYPES = {"name": str, "kind": str, "owner": str, "owner_type": str, "stage": int, "block": int,
               "channels": int, "spatial": list, "stride": int, "channel_dim": int, "node": str}


def _site(path: Path, i: int, raw) -> Site:
    where = f"{path}: plan entry {i}"
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: 'site' must be an object")
    for k, t in _SITE_TYPES.items():
        if not isinstance(raw.get(k), t) or isinstance(raw.get(k), bool):
            raise CheckpointError(f"{where}: site field {k!r} must be a {t.__name__}, got {raw.get(k)!r}")
    if raw["kind"] not in KINDS:
        raise CheckpointError(f"{where}: site kind {raw['kind']!r} is not one of {', '.join(KINDS)}")
    if raw["channels"] < 1 or raw["channel_dim"] not in (1, -1):
        raise CheckpointError(f"{where}: site {raw['name']!r} has channels {raw['channels']} and channel_dim "
                              f"{raw['channel_dim']}")
    try:
        return Site.from_dict({k: raw.get(k) for k in Site.__dataclass_fields__ if k in raw})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: damaged site record ({e})") from None


def _options(path: Path, i: int, raw) -> SEOptions:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: plan entry {i}: 'options' must be an object")
    try:  # the options as one rule writes them: validated as rules are
        rules = load_rules({"rules": [dict(raw, select={})]})
    except RuleError as e:
        raise CheckpointError(f"{path}: plan entry {i}: options {str(e).split(': ', 1)[-1]}") from None
    return rules.defaults.merged(rules.rules[0].options).resolved()


def _entries(path: Path, raw_plan: list) -> list[tuple[str, PlannedSite]]:
    """(module name, planned site) of every entry of the checkpoint's plan, each field checked."""
    if not raw_plan:
        raise CheckpointError(f"{path}: the checkpoint's plan has no SE site")
    entries, seen = [], set()
    for i, raw in enumerate(raw_plan):
        if not isinstance(raw, dict) or not isinstance(raw.get("module"), str) or not raw["module"]:
            raise CheckpointError(f"{path}: plan entry {i} must be an object with a 'module' name")
        site, options = _site(path, i, raw.get("site")), _options(path, i, raw.get("options"))
        rule = raw.get("rule")
        if rule is not None and (not isinstance(rule, int) or isinstance(rule, bool)):
            raise CheckpointError(f"{path}: plan entry {i}: 'rule' must be an int or null, got {rule!r}")
        for key in (raw["module"], site.name):
            if key in seen:
                raise CheckpointError(f"{path}: plan entry {i}: {key!r} appears twice in the plan")
            seen.add(key)
        entries.append((raw["module"], PlannedSite(site, True, options, rule, () if rule is None else (rule,))))
    return entries


def _parse(path: Path, meta: dict):
    size = _field(path, meta, "input_size", list)
    if len(size) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 65536 for s in size):
        raise CheckpointError(f"{path}: metadata field 'input_size' must be 3 positive ints (C, H, W), got {size!r}")
    raw_rules = _field(path, meta, "rules", dict)
    try:
        source = str(raw_rules.pop("source", "<dict>"))
        rules = load_rules(raw_rules)
        rules = Rules(rules.defaults, rules.rules, source)
    except RuleError as e:
        raise CheckpointError(f"{path}: metadata field 'rules' is not valid rules: {e}") from None
    sites = _field(path, meta, "sites", list)
    if not all(_is_site_triple(s) for s in sites):
        raise CheckpointError(f"{path}: metadata field 'sites' must list [name, kind, channels] triples "
                              "(a string, a string and an integer)")
    entries = _entries(path, _field(path, meta, "plan", list))
    include_base = _field(path, meta, "include_base", bool)
    return tuple(size), rules, [tuple(s) for s in sites], entries, include_base


def _check_sites(path: Path, name: str, found: list[tuple], recorded: list[tuple]) -> None:
    """Refuse a model whose sites differ from the checkpoint's model's, naming the first difference."""
    have = {n: (k, c) for n, k, c in found}
    for site, kind, channels in recorded:
        if site not in have:
            raise CheckpointError(f"{path}: site {site!r} ({kind}, {channels} channels) is not in this {name} "
                                  f"({len(found)} sites; se-surgery sites MODEL lists them)")
        if have[site] != (kind, channels):
            k, c = have[site]
            raise CheckpointError(f"{path}: site {site!r} is a {k} join of {c} channels in this {name}, a {kind} "
                                  f"join of {channels} channels in the checkpoint's model")
    theirs = {r[0] for r in recorded}
    extra = [n for n, _, _ in found if n not in theirs]
    if extra:
        raise CheckpointError(f"{path}: this {name} has site {extra[0]!r}, which the checkpoint's model did not "
                              f"have ({len(found)} sites here, {len(recorded)} there)")


def load_se(model: nn.Module, path: str | os.PathLike, *, inplace: bool = False) -> nn.Module:
    """Redo the surgery recorded in a checkpoint on ``model`` and load its weights.

    ``model`` is a fresh (usually pretrained) model of the class the checkpoint was made
    from, without SE; it may be wrapped in DataParallel or ``torch.compile``. The model
    is traced once at the recorded input size and must have the same sites (name, kind,
    channels) as the one the checkpoint was made on; every metadata field and tensor is
    checked, and only then is anything changed, so a bad checkpoint leaves ``model`` as
    it was. A checkpoint saved with ``include_base=True`` also restores the base weights.
    Returns the patched model (a copy unless ``inplace=True``), in the training mode
    ``model`` was in.

    Example:
        >>> import tempfile, torch, torchvision, se_surgery
        >>> tuned = se_surgery.apply(torchvision.models.resnet18().eval(), "late_stages", input_size=64)
        >>> f = tempfile.mkdtemp() + "/se.safetensors"
        >>> se_surgery.save_se(tuned, f)
        >>> base = torchvision.models.resnet18()
        >>> base.load_state_dict(se_surgery.strip(tuned).state_dict())  # the same pretrained weights
        <All keys matched successfully>
        >>> again = se_surgery.load_se(base.eval(), f)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> torch.equal(again(x), tuned(x))
        True
    """
    check_model(model)
    path = _as_path(path)
    meta, tensors = _read(path)
    size, rules, recorded, entries, include_base = _parse(path, meta)
    inner, _ = unwrap(model)
    _check_values(inner, path, "load")
    if is_patched(inner):
        raise AlreadyPatchedError(f"{type(inner).__name__} already has SE from se-surgery; load {path} into a "
                                  "fresh model (or se_surgery.strip(model) first)")
    cls = _class_path(inner)
    if cls != meta.get("model_class"):
        raise CheckpointError(f"{path}: made for a {meta.get('model_class')}, not a {cls}")
    p = _replan(path, inner, discover(inner, size), rules, recorded, entries)
    target = model if inplace else copy_model(model, "load_se()")
    target_inner, _ = unwrap(target)
    patches = build_patches(target_inner, p)
    made = _made(path, patches, [m for m, _ in entries])
    base_state = target_inner.state_dict() if include_base else {}
    _check_tensors(path, type(inner).__name__, tensors, made, base_state)
    for name, m in made.items():  # every tensor was checked: nothing below can fail half-way
        prefix = name + "."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    swap(target_inner, patches)
    set_facts(target_inner, plan_facts(p))
    if include_base:
        with torch.no_grad():
            for k, v in target_inner.state_dict().items():
                if k in base_state:
                    v.copy_(tensors[k])
    return target


def _replan(path: Path, inner: nn.Module, d: Analysis, rules: Rules, recorded: list[tuple],
            entries: list[tuple[str, PlannedSite]]) -> Plan:
    """The checkpoint's plan on this model's analysis: the same sites, the recorded options."""
    _check_sites(path, d.model, [(s.name, s.kind, s.channels) for s in d.sites], recorded)
    have = {s.name: s for s in d.sites}
    by_name = {}
    for _, e in entries:
        mine = have.get(e.site.name)
        if mine is None or (mine.kind, mine.channels, mine.channel_dim, mine.node) != (
                e.site.kind, e.site.channels, e.site.channel_dim, e.site.node):
            raise CheckpointError(f"{path}: site {e.site.name!r} of the plan does not match this {d.model}")
        by_name[mine.name] = PlannedSite(mine, True, e.options, e.rule, e.matched)
    all_entries = [by_name.get(s.name) or PlannedSite(s, False, None, None) for s in d.sites]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SESurgeryWarning)  # said when the checkpoint was made
        return plan_from(rules, d, entries=all_entries)


def _made(path: Path, patches: list[OwnerPatch], planned: list[str]) -> dict[str, nn.Module]:
    """The modules the patches add, by dotted name: exactly the checkpoint's."""
    made = {(f"{pt.path}.{n}" if pt.path else n): m for pt in patches for n, m in pt.modules.items()}
    if sorted(made) != sorted(planned):
        raise CheckpointError(f"{path}: the plan's modules are {sorted(planned)[:3]}..., this model "
                              f"would get {sorted(made)[:3]}...")
    return made


def _check_tensors(path: Path, name: str, tensors: dict[str, torch.Tensor], made: dict[str, nn.Module],
                   base_state: dict) -> None:
    """Every tensor against what it will be loaded into, before anything changes."""
    expected = {f"{n}.{k}": v for n, m in made.items() for k, v in m.state_dict().items()}
    for key, t in tensors.items():
        want = expected.get(key, base_state.get(key))
        if want is None:
            raise CheckpointError(f"{path}: tensor {key!r} belongs to nothing in this {name}")
        if t.is_floating_point() != want.is_floating_point() or (t.dtype == torch.bool) != (want.dtype == torch.bool):
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {t.dtype}, this model's is {want.dtype}; "
                                  "tensors of another kind are refused, not cast")
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, this model needs "
                                  f"{tuple(want.shape)}")
    for key in list(expected) + list(base_state):
        if key not in tensors:
            raise CheckpointError(f"{path}: tensor {key!r} is missing from the file")
