"""Bad input: every mistake a user can make gets one clear error, and the model is untouched.

Each row of ``CASES`` is (id, call, error class, message pattern, model factory). ``call``
gets the model and a temporary folder and makes the bad call; the test pins the error
class and its message, then checks that the model's state_dict, module objects and
training flags are exactly what they were.
"""

import math
import warnings
from collections import OrderedDict

import pytest
import torch
import torchvision
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import se_surgery
from se_surgery import (
    AlreadyPatchedError,
    CheckpointError,
    MissingFileError,
    ModelTypeError,
    PlanError,
    RuleError,
    TraceError,
)
from se_surgery._rules import OPTION_KEYS, RULE_KEYS, SELECT_KEYS, TOP_KEYS, Rules
from se_surgery.hub import load_weights

ALLOWED_VARIANTS = "standard, pre, post, identity, inner, fusion"


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18()  # left in train mode: discovery must not flip it


def plain_cnn():
    """No residual or concat join anywhere."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class Fire(nn.Module):
    def __init__(self):
        super().__init__()
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.a = nn.Conv2d(4, 8, 1)
        self.b = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        s = self.squeeze(x)
        return torch.cat([self.a(s), self.b(s)], 1)


def concat_only():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 1), Fire())


def patched_resnet18():
    return se_surgery.apply(resnet18(), "late_stages")


def _rules_file(tmp, text, name="rules.yaml"):
    path = tmp / name
    path.write_text(text)
    return str(path)


def apply_yaml(text):
    def call(model, tmp):
        return se_surgery.apply(model, _rules_file(tmp, text))
    return call


def apply_rules(rules, **kw):
    def call(model, tmp):
        return se_surgery.apply(model, rules, **kw)
    return call


def _truncated(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def weights_truncated(model, tmp):
    path = tmp / "w.safetensors"
    save_file(dict(model.state_dict()), str(path))
    load_weights(model, str(_truncated(path)))


def weights_of_other_model(model, tmp):
    path = tmp / "resnet34.safetensors"
    save_file(dict(torchvision.models.resnet34().state_dict()), str(path))
    load_weights(model, str(path))  # resnet18's keys are all there, with extra ones: nothing may be copied


def weights_wrong_shape(model, tmp):
    path = tmp / "ten_classes.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), str(path))
    load_weights(model, str(path))


def weights_not_a_state_dict(model, tmp):
    path = tmp / "list.pt"
    torch.save([torch.zeros(2)], str(path))
    load_weights(model, str(path))


def se_checkpoint_truncated(model, tmp):
    path = tmp / "se.safetensors"
    se_surgery.save_se(se_surgery.apply(model, "late_stages"), path)
    se_surgery.load_se(model, _truncated(path))


def se_checkpoint_not_ours(model, tmp):
    path = tmp / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    se_surgery.load_se(model, path)


def se_checkpoint_other_model(model, tmp):
    path = tmp / "se34.safetensors"
    se_surgery.save_se(se_surgery.apply(torchvision.models.resnet34(), "late_stages"), path)
    se_surgery.load_se(model, path, inplace=True)


CASES = [
    # ----- rules files
    ("broken_yaml", apply_yaml("rules:\n  - select: {kind: residual\n"), RuleError,
     r"^.*rules\.yaml:3: invalid YAML: expected ',' or '}', but got '<stream end>'$", resnet18),
    ("python_object_tag", apply_yaml("rules:\n  - !!python/object/apply:os.system ['echo owned']\n"), RuleError,
     r"rules\.yaml:2: invalid YAML: could not determine a constructor for the tag "
     r"'tag:yaml.org,2002:python/object/apply:os.system' \(only plain YAML is read", resnet18),
    ("empty_file", apply_yaml(""), RuleError,
     r"rules\.yaml: the rules are empty; expected a mapping with 'rules:' \(a list\) and optional 'defaults:'$",
     resnet18),
    ("only_a_comment", apply_yaml("# nothing here\n"), RuleError, r"rules\.yaml: the rules are empty", resnet18),
    ("top_level_list", apply_yaml("- select: {kind: residual}\n"), RuleError,
     r"rules\.yaml:1: expected a mapping with keys defaults, rules, got list$", resnet18),
    ("unknown_top_key", apply_yaml("rule:\n  - select: {kind: residual}\n"), RuleError,
     r"rules\.yaml:1: key 'rule': unknown top-level key 'rule' \(did you mean 'rules'\?\); allowed: defaults, rules$",
     resnet18),
    ("missing_rules_key", apply_yaml("defaults: {ratio: 8}\n"), RuleError,
     r"rules\.yaml:1: missing key 'rules' \(a list of rules, each with 'select:'\)$", resnet18),
    ("rules_not_a_list", apply_yaml("rules:\n  select: {kind: residual}\n"), RuleError,
     r"rules\.yaml:1: key 'rules': rules must be a list of mappings, got dict$", resnet18),
    ("rules_empty_list", apply_yaml("rules: []\n"), RuleError,
     r"rules\.yaml:1: key 'rules': rules is an empty list; add at least one rule", resnet18),
    ("unknown_select_key", apply_yaml("rules:\n  - select: {stages: [-1]}\n"), RuleError,
     r"rules\.yaml:2: rule 0, key 'stages': unknown select key 'stages' \(did you mean 'stage'\?\); "
     r"allowed: kind, stage, block, name, min_channels, max_channels, has_attention$", resnet18),
    ("unknown_rule_key", apply_yaml("rules:\n  - select: {kind: residual}\n    ration: 8\n"), RuleError,
     r"rules\.yaml:3: rule 0, key 'ration': unknown rule key 'ration' \(did you mean 'ratio'\?\); "
     r"allowed: select, skip, variant, ratio, ", resnet18),
    ("unknown_defaults_key", apply_yaml("defaults: {varient: pre}\nrules: [{select: {}}]\n"), RuleError,
     r"rules\.yaml:1: key 'defaults.varient': unknown defaults key 'varient' \(did you mean 'variant'\?\)",
     resnet18),
    ("ratio_wrong_type", apply_yaml("rules:\n  - select: {}\n    ratio: sixteen\n"), RuleError,
     r"rules\.yaml:3: rule 0, key 'ratio': ratio must be a number from 0.125 to 4096, got 'sixteen'$", resnet18),
    ("ratio_zero", apply_yaml("defaults: {ratio: 0}\nrules: [{select: {}}]\n"), RuleError,
     r"rules\.yaml:1: key 'defaults.ratio': ratio must be a number from 0.125 to 4096, got 0$", resnet18),
    ("ratio_negative", apply_rules({"rules": [{"select": {}, "ratio": -4}]}), RuleError,
     r"^<dict>: rule 0, key 'ratio': ratio must be a number from 0.125 to 4096, got -4$", resnet18),
    ("ratio_nan", apply_yaml("rules:\n  - select: {}\n    ratio: .nan\n"), RuleError,
     r"ratio must be a number from 0.125 to 4096, got nan$", resnet18),
    ("ratio_bool", apply_rules({"rules": [{"select": {}, "ratio": True}]}), RuleError,
     r"ratio must be a number from 0.125 to 4096, got True$", resnet18),
    ("divisor_float", apply_yaml("rules:\n  - select: {}\n    divisor: 2.5\n"), RuleError,
     r"rules\.yaml:3: rule 0, key 'divisor': divisor must be an integer from 1 to 512, got 2\.5$", resnet18),
    ("divisor_zero", apply_rules({"defaults": {"divisor": 0}, "rules": [{"select": {}}]}), RuleError,
     r"key 'defaults.divisor': divisor must be an integer from 1 to 512, got 0$", resnet18),
    ("unknown_variant", apply_yaml("defaults: {variant: middle}\nrules: [{select: {}}]\n"), RuleError,
     rf"key 'defaults.variant': variant must be one of {ALLOWED_VARIANTS}, got 'middle'$", resnet18),
    ("unknown_gate", apply_rules({"rules": [{"select": {}, "gate": "relu"}]}), RuleError,
     r"rule 0, key 'gate': gate must be one of sigmoid, hard_sigmoid, got 'relu'$", resnet18),
    ("unknown_kind", apply_rules({"rules": [{"select": {"kind": "attention"}}]}), RuleError,
     r"rule 0, key 'kind': kind must be one of residual, branch_sum, concat, block, got 'attention'$", resnet18),
    ("stage_zero", apply_yaml("rules:\n  - select: {stage: 0}\n"), RuleError,
     r"rules\.yaml:2: rule 0, key 'stage': stage must be a non-zero integer or a list of them", resnet18),
    ("stage_quoted", apply_yaml("rules:\n  - select: {stage: '2'}\n"), RuleError,
     r"rules\.yaml:2: rule 0, key 'stage': stage must be a non-zero integer .*got '2'$", resnet18),
    ("stage_float", apply_rules({"rules": [{"select": {"stage": [1, 2.5]}}]}), RuleError,
     r"rule 0, key 'stage': stage must be a non-zero integer .*got \[1, 2\.5\]$", resnet18),
    ("select_not_mapping", apply_rules({"rules": [{"select": 5}]}), RuleError,
     r"rule 0, key 'select': select must be a mapping of kind, stage, .*, got int$", resnet18),
    ("name_empty_list", apply_rules({"rules": [{"select": {"name": []}}]}), RuleError,
     r"rule 0, key 'name': name must be a glob string or a list of them, got \[\]$", resnet18),
    ("has_attention_string", apply_rules({"rules": [{"select": {"has_attention": "yes"}}]}), RuleError,
     r"rule 0, key 'has_attention': has_attention must be true or false, got 'yes'$", resnet18),
    ("min_above_max", apply_rules({"rules": [{"select": {"min_channels": 512, "max_channels": 64}}]}), RuleError,
     r"rule 0, key 'min_channels': min_channels 512 > max_channels 64$", resnet18),
    ("skip_with_options", apply_rules({"rules": [{"select": {}, "skip": True, "ratio": 8}]}), RuleError,
     r"rule 0, key 'ratio': a rule with skip: true takes no SE options$", resnet18),
    ("bias_string", apply_rules({"rules": [{"select": {}, "bias": "yes"}]}), RuleError,
     r"rule 0, key 'bias': bias must be true or false, got 'yes'$", resnet18),
    ("duplicate_key", apply_yaml("rules:\n  - select: {kind: residual}\n    ratio: 8\n    ratio: 4\n"), RuleError,
     r"rules\.yaml:4: invalid YAML: duplicate key 'ratio'; give each key once per mapping$", resnet18),
    ("self_referencing_alias", apply_yaml("rules: &r\n  - select: {}\n  - *r\n"), RuleError,
     r"rules\.yaml:\d: invalid YAML: an alias refers to the anchor it is inside of", resnet18),
    ("rules_file_missing", apply_rules("no/such/rules.yaml"), MissingFileError,
     r"^rules file 'no/such/rules\.yaml' not found, and it is not a preset name; presets: all_stages, efficientnet, inception,",
     resnet18),
    ("unknown_preset", apply_rules("late_stage"), MissingFileError,
     r"^rules file 'late_stage' not found, and it is not a preset name", resnet18),
    ("rules_wrong_type", apply_rules(42), RuleError,
     r"^rules must be a path, a preset name \(all_stages, .*\), a dict, Rules or a list of Rule, got int$", resnet18),
    ("rules_list_of_junk", apply_rules([1, 2]), RuleError,
     r"^a list of rules must hold Rule objects or rule dicts$", resnet18),
    # ----- rules that do not fit the model
    ("stage_9_of_4", apply_yaml("rules:\n  - select: {stage: 9}\n"), PlanError,
     r"rules\.yaml:2: rule 0, key 'stage': ResNet has no stage 9; it has 4 stage\(s\): 1\.\.4 or -4\.\.-1", resnet18),
    ("stage_minus_5_of_4_inplace", apply_rules({"rules": [{"select": {"stage": -5}}]}, inplace=True), PlanError,
     r"ResNet has no stage -5; it has 4 stage\(s\)", resnet18),
    ("block_3_of_2", apply_rules({"rules": [{"select": {"stage": 1, "block": 3}}]}), PlanError,
     r"rule 0, key 'block': no stage of ResNet it selects has a block 3; the longest has 2 \(1\.\.2 or -2\.\.-1\)$",
     resnet18),
    ("strict_rule_selects_nothing", apply_rules({"rules": [{"select": {"name": "layer9.*"}}]}, strict=True),
     PlanError, r"^<dict>: rule 0 selects no site of ResNet \(8 sites; se-surgery sites MODEL lists them\)$",
     resnet18),
    ("variant_pre_at_concat", apply_rules({"defaults": {"variant": "pre"}, "rules": [{"select": {"kind": "concat"}}]}),
     PlanError, r"variant 'pre' is not allowed at concat site\(s\) 1; concat sites allow only 'standard', 'fusion' "
                r"\(add kind: residual to the rule's select\)$", concat_only),
    # ----- models
    ("model_is_a_string", lambda model, tmp: se_surgery.apply("resnet18"), ModelTypeError,
     r"^model must be a torch\.nn\.Module, got str$", resnet18),
    ("model_is_a_state_dict", lambda model, tmp: se_surgery.apply(model.state_dict()), ModelTypeError,
     r"^model must be a torch\.nn\.Module, got OrderedDict$", resnet18),
    ("model_is_a_class", lambda model, tmp: se_surgery.find_sites(torchvision.models.ResNet), ModelTypeError,
     r"^model must be a torch\.nn\.Module, got type$", resnet18),
    ("model_without_sites", apply_rules(None), PlanError,
     r"^nothing to add SE to in Sequential: it has no residual, branch-sum or concat join", plain_cnn),
    ("already_patched", apply_rules("all_stages"), AlreadyPatchedError,
     r"^ResNet already has 4 SE module\(s\) from se-surgery; call se_surgery\.strip\(model\) first", patched_resnet18),
    ("input_size_string", apply_rules(None, input_size="224"), ModelTypeError,
     r"^input_size must be an int or a \(C, H, W\) / \(H, W\) tuple, got '224'$", resnet18),
    ("input_size_zero", apply_rules(None, input_size=(3, 0, 224)), ModelTypeError,
     r"^input_size must hold positive ints, got \(3, 0, 224\)$", resnet18),
    ("input_size_four_dims", apply_rules(None, input_size=(1, 3, 224, 224)), ModelTypeError,
     r"^input_size must be an int or a \(C, H, W\) / \(H, W\) tuple, got \(1, 3, 224, 224\)$", resnet18),
    # ----- weights and SE checkpoints
    ("weights_missing", lambda model, tmp: load_weights(model, str(tmp / "nope.safetensors")), MissingFileError,
     r"^weights file '.*nope\.safetensors' not found$", resnet18),
    ("weights_truncated", weights_truncated, CheckpointError,
     r"^cannot load weights from .*w\.safetensors: SafetensorError: ", resnet18),
    ("weights_of_other_model", weights_of_other_model, CheckpointError,
     r"resnet34\.safetensors: they do not fit ResNet: 96 unexpected key\(s\) \['layer1\.2\.", resnet18),
    ("weights_wrong_shape", weights_wrong_shape, CheckpointError,
     r"ten_classes\.pt: fc\.weight has shape \(10, 512\), ResNet needs \(1000, 512\)$", resnet18),
    ("weights_not_a_state_dict", weights_not_a_state_dict, CheckpointError,
     r"list\.pt: expected a state_dict \(names to tensors\), got list$", resnet18),
    ("se_checkpoint_missing", lambda model, tmp: se_surgery.load_se(model, tmp / "se.safetensors"), MissingFileError,
     r"^SE checkpoint '.*se\.safetensors' not found$", resnet18),
    ("se_checkpoint_truncated", se_checkpoint_truncated, CheckpointError,
     r"se\.safetensors: not a readable safetensors file \(", resnet18),
    ("se_checkpoint_not_ours", se_checkpoint_not_ours, CheckpointError,
     r"plain\.safetensors: not an se-surgery checkpoint of this version \(metadata format None, expected 'se-surgery/2'\); "
     r"write one with se_surgery\.save_se$", resnet18),
    ("se_checkpoint_other_model", se_checkpoint_other_model, CheckpointError,
     r"se34\.safetensors: site 'layer1\.2' \(residual, 64 channels\) is not in this ResNet \(8 sites", resnet18),
]


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, id(m), type(m), m.training) for n, m in model.named_modules()])


@pytest.mark.parametrize("call, error, pattern, make", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, call, error, pattern, make):
    model = make()
    state, modules = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=pattern) as info:
            call(model, tmp_path)
    assert type(info.value) is error  # the specific class, not a broader one
    assert isinstance(info.value, se_surgery.SESurgeryError)
    assert "\n" not in str(info.value)  # one line
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert [(n, id(m), type(m), m.training) for n, m in model.named_modules()] == modules


def test_table_is_big_enough():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


def test_errors_are_also_builtin_errors():
    assert issubclass(RuleError, ValueError) and issubclass(PlanError, ValueError)
    assert issubclass(ModelTypeError, TypeError) and issubclass(MissingFileError, FileNotFoundError)
    assert issubclass(TraceError, ValueError) and issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("call", [
    lambda m, f: se_surgery.find_sites(m), lambda m, f: se_surgery.plan(m), lambda m, f: se_surgery.apply(m),
    lambda m, f: se_surgery.report(m), lambda m, f: se_surgery.strip(m), lambda m, f: se_surgery.se_parameters(m),
    lambda m, f: se_surgery.mark_only_se_trainable(m), lambda m, f: se_surgery.param_groups(m, 0.1, 0.1),
    lambda m, f: se_surgery.save_se(m, f), lambda m, f: se_surgery.load_se(m, f), lambda m, f: se_surgery.is_patched(m),
], ids=["find_sites", "plan", "apply", "report", "strip", "se_parameters", "mark_only_se_trainable", "param_groups",
        "save_se", "load_se", "is_patched"])
def test_every_public_function_checks_the_model(call, tmp_path):
    with pytest.raises(ModelTypeError, match=r"^model must be a torch\.nn\.Module( or an se_surgery\.Analysis)?, got str$"):
        call("resnet18", tmp_path / "se.safetensors")


# --------------------------------------------------------------------------- property-based: rule dicts

_names = st.sampled_from(sorted(set(TOP_KEYS + RULE_KEYS + SELECT_KEYS + OPTION_KEYS)))
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([10 ** 400, -(10 ** 400), 2 ** 63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["standard", "pre", "post", "identity", "residual", "concat", "avg", "max", "avgmax",
                     "sigmoid", "hard_sigmoid", "identity", "paper", "layer*", "*"]),
    st.integers(min_value=-6, max_value=6),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(_names, st.text(max_size=6)), inner, max_size=4),
), max_leaves=12)

_select = st.dictionaries(st.sampled_from(SELECT_KEYS) | st.text(max_size=5), _values, max_size=4)
_rule = st.dictionaries(st.sampled_from(RULE_KEYS) | st.text(max_size=5), _values | _select, max_size=4)
_ints = st.integers(-5, 5) | st.lists(st.integers(-5, 5), max_size=3)
_VALID = {  # a plausible value for each key, so that the near-valid dicts below often validate
    "variant": st.sampled_from(["standard", "pre", "post", "identity"]),
    "ratio": st.floats(0.01, 64) | st.integers(1, 64), "divisor": st.integers(1, 16), "min_hidden": st.integers(1, 8),
    "init": st.sampled_from(["identity", "paper"]), "squeeze": st.sampled_from(["avg", "max", "avgmax"]),
    "gate": st.sampled_from(["sigmoid", "hard_sigmoid"]), "bias": st.booleans(), "skip": st.booleans(),
    "kind": st.sampled_from(["residual", "concat"]), "stage": _ints, "block": _ints,
    "name": st.text(min_size=1, max_size=6) | st.lists(st.sampled_from(["layer*", "a", "*.2"]), max_size=2),
    "min_channels": st.integers(0, 600), "max_channels": st.integers(0, 600), "has_attention": st.booleans(),
}


def _near(keys):
    """Dicts over ``keys`` whose values are mostly plausible, sometimes junk."""
    return st.dictionaries(st.sampled_from(keys), st.none(), max_size=4).flatmap(
        lambda d: st.fixed_dictionaries({k: _VALID[k] | _scalars if k in _VALID else _scalars for k in d}))


_near_rules = st.fixed_dictionaries(
    {"rules": st.lists(st.builds(lambda sel, r: dict(r, select=sel), _near(SELECT_KEYS) | st.none(),
                                 _near(("skip",) + OPTION_KEYS)), min_size=1, max_size=3)},
    optional={"defaults": _near(OPTION_KEYS)})

_rule_dicts = st.one_of(
    _near_rules,
    _values.filter(lambda v: not isinstance(v, str)),  # a string is a path or preset name
    st.fixed_dictionaries({"rules": st.lists(_rule | _values, max_size=4)},
                          optional={"defaults": st.dictionaries(st.sampled_from(OPTION_KEYS) | st.text(max_size=5),
                                                                _values, max_size=4) | _values}),
    st.dictionaries(_names | st.text(max_size=6), _values | st.lists(_rule, max_size=3), max_size=3),
)


def _validates_or_rule_error(source):
    try:
        rules = se_surgery.load_rules(source)
    except RuleError as e:
        assert str(e) and "\n" not in str(e)
        return None
    assert isinstance(rules, Rules)
    for r in rules.rules:  # whatever validated is usable: options build, selectors match
        opts = rules.defaults.to_dict()
        opts.update(r.options)
        assert opts["ratio"] > 0 and not (isinstance(opts["ratio"], float) and math.isnan(opts["ratio"]))
        r.select.matches(se_surgery.Site("a", "residual", "a", "B", 1, 1, 64, (8, 8)), 4, {1: 2, 2: 2, 3: 2, 4: 2})
    return rules


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_rule_dicts)
def test_any_rule_dict_validates_or_raises_rule_error(data):
    _validates_or_rule_error(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_rule_dicts)
def test_any_rule_dict_as_yaml_validates_or_raises_rule_error(tmp_path_factory, data):
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        return
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(text)
    _validates_or_rule_error(str(path))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from(list("rules:-{}[]&*!#|>'\" \n\tselctkindagv0123456789.,?<")), max_size=80))
def test_any_yaml_text_validates_or_raises_rule_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(text)
    _validates_or_rule_error(str(path))


def test_valid_dicts_do_validate():
    # The property above must not pass by rejecting everything.
    for d in [{"rules": [{"select": {}}]},
              {"defaults": {"ratio": 8.5, "variant": "pre"}, "rules": [{"select": {"stage": [-1, 2], "kind": "residual"}},
                                                                       {"select": {"name": "layer4.*"}, "skip": True}]},
              {"rules": [{"select": None, "ratio": 4096}]}]:
        assert isinstance(_validates_or_rule_error(d), Rules)
    assert isinstance(_validates_or_rule_error(OrderedDict(rules=[{"select": {"block": -1}}])), Rules)


# ------------------------------------------------------------- issue 21: rule objects, YAML numbers, modules

from se_surgery._rules import Rule, Selector  # noqa: E402 - grouped with the tests that use them


@pytest.mark.parametrize("build, message", [
    (lambda: Rule(select={"stag": 1}), r"^Rule\(\.\.\.\): key 'select.stag': unknown select key 'stag' \(did you "
                                       r"mean 'stage'\?\)"),
    (lambda: Rule(select=[1]), r"^Rule\(\.\.\.\): key 'select': select must be a Selector or a dict of kind, "),
    (lambda: Rule(options=[("ratio", 8)]), r"^Rule\(\.\.\.\): key 'options': options must be a dict"),
    (lambda: Rule(skip="yes"), r"^Rule\(\.\.\.\): key 'skip': skip must be True or False, got 'yes'"),
    (lambda: Rules(defaults={"ratio": -8}), r"^Rules\(defaults=\.\.\.\): key 'defaults.ratio': ratio must be"),
    (lambda: Rules(defaults=[("ratio", 8)]), r"^Rules\(\.\.\.\): key 'defaults': defaults must be SEOptions or a"),
    (lambda: Rules(rules=[Selector(kind="residual")]), r"^Rules\(\.\.\.\): key 'rules': rules must be a list of "
                                                         r"Rule objects, got Selector in the list"),
    (lambda: Selector(stage=Selector()), r"^Selector\(\.\.\.\): key 'stage': stage must be a non-zero integer"),
    (lambda: Selector(kind="residul"), r"^Selector\(\.\.\.\): key 'kind': kind must be one of residual, "),
])
def test_rule_objects_are_validated_like_rules_files(build, message):
    with pytest.raises(RuleError, match=message):
        build()


def test_rule_objects_take_what_a_rules_file_writes():
    r = Rules(defaults={"ratio": 8}, rules=[Rule(select={"stage": [-1]}), Rule(Selector(stage=3))])
    assert r.defaults.ratio == 8 and r.rules[0].select.stage == (-1,) and r.rules[1].select.stage == (3,)
    p = se_surgery.plan(resnet18(), r, input_size=32)
    assert [e.site.name for e in p.selected] == ["layer3.0", "layer3.1", "layer4.0", "layer4.1"]


def test_exponent_numbers_yaml_11_reads_as_strings_are_numbers(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("defaults: {ratio: 1e2, min_hidden: 2E0}\nrules:\n  - select: {}\n    divisor: 8e0\n")
    assert yaml.safe_load(f.read_text())["defaults"]["ratio"] == "1e2"  # what PyYAML gives
    r = se_surgery.load_rules(f)
    assert (r.defaults.ratio, r.defaults.min_hidden, r.rules[0].options) == (100, 2, {"divisor": 8})
    f.write_text("defaults: {ratio: 1e400}\nrules: [{select: {}}]\n")
    with pytest.raises(RuleError, match=r"ratio must be a number from 0.125 to 4096, got '1e400'"):
        se_surgery.load_rules(f)


def test_a_huge_rules_file_is_refused_in_the_parser(tmp_path):
    import time

    f = tmp_path / "r.yaml"
    f.write_text("rules:\n" + "".join(f"  - {{select: {{name: 'l{i}'}}, ratio: 8}}\n" for i in range(6000)))
    assert f.stat().st_size < 256 * 1024
    start = time.perf_counter()
    with pytest.raises(RuleError, match=r":\d+: more than 20,000 YAML values; a rules file needs a few dozen"):
        se_surgery.load_rules(f)
    assert time.perf_counter() - start < 10  # refused before safe_load builds it (it took 15 s and 776 MB)


class _Bad(nn.Module):
    def __init__(self, how: str, channels: int):
        super().__init__()
        self.how, self.conv = how, nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        if self.how == "channels":
            return x[:, :1]
        if self.how == "dtype":
            return x.double()
        if self.how == "spatial":
            return x[..., ::2, ::2]
        if self.how == "tuple":
            return (x, x)
        raise KeyError("boom")


def _factory(how):
    def make(channels):
        if how == "raise":
            raise ZeroDivisionError("no")
        if how == "int":
            return 3
        return _Bad(how, channels)
    return make


@pytest.mark.parametrize("how, message", [
    ("raise", r"could not be built for 256 channels with options \{\}: ZeroDivisionError: no"),
    ("int", r"returned a int, not a torch.nn.Module"),
    ("channels", r"maps a \(1, 256, 2, 2\) float32 input to \(1, 1, 2, 2\) float32; an inserted module must return "
                 r"the shape and dtype it is given"),
    ("dtype", r"maps a \(1, 256, 2, 2\) float32 input to \(1, 256, 2, 2\) float64"),
    ("spatial", r"maps a \(1, 256, 2, 2\) float32 input to \(1, 256, 1, 1\) float32"),
    ("tuple", r"its forward returns a tuple, not a tensor of the input's shape"),
    ("forward", r"its forward fails on a \(1, 256, 2, 2\) float32 input: KeyError: 'boom'"),
])
def test_registered_factories_are_checked_at_plan_time(how, message):
    name = f"bad_{how}"
    se_surgery.register_module(name, _factory(how), overwrite=True)
    rules = {"defaults": {"module": name}, "rules": [{"select": {"stage": 3}}]}
    model = resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (se_surgery.plan, se_surgery.report, se_surgery.apply):  # report and apply agree
        with pytest.raises(se_surgery.ModuleError, match=f"^module '{name}' at site layer3.0: .*{message}"):
            call(model, rules, input_size=32)
    assert not se_surgery.is_patched(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


_behaviours = st.sampled_from(["ok", "raise", "int", "none", "channels", "dtype", "spatial", "tuple", "forward"])


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.a(x)
        return x + torch.relu(self.b(x))


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(how=_behaviours, options=st.dictionaries(st.sampled_from(["scale", "k"]),
                                                st.one_of(st.integers(-3, 3), st.text(max_size=3), st.none()),
                                                max_size=2),
       raises=st.sampled_from([RuntimeError, TypeError, ValueError, KeyError, IndexError, AttributeError]))
def test_random_factories_give_results_or_module_errors(how, options, raises):
    def factory(channels, scale=1, k=None):
        if how == "raise":
            raise raises("factory bug")
        if how in ("int", "none"):
            return 3 if how == "int" else None
        if how == "ok":
            return nn.Identity()
        return _Bad(how if how != "forward" else "other", channels)

    se_surgery.register_module("prop_mod", factory, overwrite=True)
    rules = {"defaults": {"module": "prop_mod", **options}, "rules": [{"select": {}}]}
    outcomes = []
    for call in (se_surgery.report, se_surgery.apply):
        try:
            call(_Tiny(), rules, input_size=8)
            outcomes.append("ok")
        except se_surgery.SESurgeryError as e:
            outcomes.append(type(e).__name__ + str(e))
    assert outcomes[0] == outcomes[1]  # report and apply accept and refuse the same factories
    assert (outcomes[0] == "ok") == (how == "ok")
