"""The se-surgery command never shows a traceback: bad input is one line and exit 2.

The table pins each bad input a user reported with its one-line message; the subprocess
tests cover what only a real process sees (a closed pipe, a full disk, Ctrl-C); the
properties drive ``main`` with random arguments and random rules-file bytes.
"""

import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import se_surgery
from se_surgery._rules import preset_names, preset_summaries
from se_surgery.cli import MAX_SIDE, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv):
    """(exit code, stdout, stderr) of ``main(argv)`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _files(tmp):
    """The bad files the table refers to as {name}."""
    files = {
        "deep": b"rules: " + b"[" * 1000 + b"]" * 1000 + b"\n",
        "latin1": "rules:\n  - select: {name: 'café'}\n".encode("latin-1"),
        "utf16_no_bom": "rules:\n  - select: {}\n".encode("utf-16-le"),
        "tiny_ratio": b"rules:\n  - select: {}\n    ratio: 5.0e-324\n",
        "huge_divisor": b"defaults: {divisor: 1000000}\nrules: [{select: {}}]\n",
        "huge_min_hidden": b"rules:\n  - select: {}\n    min_hidden: 100000000\n",
        "huge_int": b"rules:\n  - select: {}\n    ratio: " + b"7" * 5000 + b"\n",
        "broken": b"rules: [select: {kind: residual\n",
        "stage9": b"rules: [{select: {stage: 9}}]\n",
        "long": None,
    }
    paths = {}
    for name, data in files.items():
        path = tmp / f"{name}.yaml"
        if data is not None:
            path.write_bytes(data)
        paths[name] = str(path)
    paths["long"] = str(tmp / ("r" * 300 + ".yaml"))
    paths["tmp"] = str(tmp)
    return paths


BAD = [  # (id, argv, the one line on stderr)
    ("broken_yaml", ["check", "{broken}"], r"broken\.yaml:2: invalid YAML: expected ',' or '}'"),
    ("broken_yaml_plan", ["plan", "resnet18", "--rules", "{broken}"], r"broken\.yaml:2: invalid YAML: expected ',' or '}'"),
    ("stage_9_of_4_plan", ["plan", "resnet18", "--rules", "{stage9}"],
     r"stage9\.yaml:1: rule 0, key 'stage': ResNet has no stage 9"),
    ("nested_1000_deep", ["check", "{deep}"], r"deep\.yaml:1: invalid YAML: nested more than 64 levels deep"),
    ("latin1_file", ["check", "{latin1}"], (r"latin1\.yaml:2: not UTF-8 text \(byte 0xe9 at offset 30\); save the "
                                           r"rules file as UTF-8$")),
    ("utf16_without_bom", ["check", "{utf16_no_bom}"], r"utf16_no_bom\.yaml: not UTF-8 text \(it holds NUL bytes"),
    ("ratio_5e-324", ["check", "{tiny_ratio}"], (r"tiny_ratio\.yaml:3: rule 0, key 'ratio': ratio must be a number from "
                                                r"0\.125 to 4096, got 5e-324$")),
    ("ratio_5e-324_plan", ["plan", "resnet18", "--input-size", "32", "--rules", "{tiny_ratio}"],
     r"ratio must be a number from 0\.125 to 4096, got 5e-324$"),
    ("divisor_huge", ["check", "{huge_divisor}"], (r"key 'defaults\.divisor': divisor must be an integer from 1 to 512, "
                                                  r"got 1000000$")),
    ("min_hidden_huge", ["check", "{huge_min_hidden}"], r"min_hidden must be an integer from 1 to 4096, got 100000000$"),
    ("int_of_5000_digits", ["check", "{huge_int}"], (r"huge_int\.yaml: invalid YAML: a value cannot be read: Exceeds "
                                                    r"the limit \(4300 digits\)")),
    ("path_over_255", ["check", "{long}"], (r"rules file '.*r+\.\.\.' \(\d+ characters\) cannot exist: the name is too "
                                           r"long for the file system$")),
    ("rules_is_a_folder", ["check", "{tmp}"], r"rules file '.*' is a directory; give a YAML file or a preset name$"),
    ("plot_unknown_format", ["report", "resnet18", "--input-size", "32", "--plot", "{tmp}/out.xyz"],
     r"--plot '.*out\.xyz': the file name must end in one of \.avif, .*\.png"),
    ("plot_missing_folder", ["report", "resnet18", "--input-size", "32", "--plot", "{tmp}/no/out.png"],
     r"--plot '.*out\.png': folder '.*no' does not exist$"),
    ("weights_is_a_folder", ["sites", "resnet18", "--weights", "{tmp}"],
     r"weights file '.*' is a directory; give a \.safetensors or torch\.save file$"),
    ("weights_long_path", ["sites", "resnet18", "--weights", "{long}"], (r"weights file '.*r+\.\.\.' cannot be read: "
                                                                        r"File name too long$")),
]


@pytest.mark.parametrize("argv, pattern", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, argv, pattern):
    paths = _files(tmp_path)
    code, out, err = run([a.format(**paths) for a in argv])
    assert code == 2, err
    assert out == ""  # nothing was printed first: --plot is checked before the report is made
    assert len(err.splitlines()) == 1 and err.startswith("se-surgery: error: "), err
    assert re.search(pattern, err.strip()), err


@pytest.mark.parametrize("argv, pattern", [
    (["sites", "resnet18", "--input-size", "10000000000"], (r"'10000000000' is too large: height and width go up to "
                                                            rf"{MAX_SIDE}, channels up to 1024$")),
    (["sites", "resnet18", "--input-size", "3x0x5"], r"expected N, HxW or CxHxW with positive integers, got '3x0x5'$"),
    (["sites", "resnet18", "--input-size", "1x2x3x4"], r"expected N, HxW or CxHxW"),
    (["sites", "resnet18", "--num-classes", "0"], r"--num-classes: expected an integer from 1 to 100,000, got '0'$"),
    (["bogus"], r"invalid choice: 'bogus'"),
])
def test_usage_errors_exit_2_with_argparse_usage(argv, pattern):
    code, out, err = run(argv)
    assert code == 2 and out == ""
    assert err.startswith("usage: se-surgery") and re.search(pattern, err.splitlines()[-1]), err


def test_utf16_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("# règles\nrules:\n  - select: {name: 'layer4.*'}\n", encoding="utf-16")
    code, out, _ = run(["check", str(path)])
    assert code == 0 and out.startswith(f"{path}: valid, 1 rule(s)")


def test_version_and_python_dash_m():
    code, out, _ = run(["--version"])
    assert code == 0 and out.strip() == f"se-surgery {se_surgery.__version__}"
    proc = subprocess.run([sys.executable, "-m", "se_surgery", "--version"], capture_output=True, text=True,
                          cwd=REPO, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == f"se-surgery {se_surgery.__version__}"


def test_presets_lists_every_preset_on_one_line():
    code, out, _ = run(["presets"])
    lines = out.splitlines()
    assert code == 0 and [ln.split()[0] for ln in lines] == preset_names()
    summaries = preset_summaries()
    for line in lines:
        name, text = line.split(maxsplit=1)
        assert text == summaries[name] and len(text) > 20  # a real description, not the YAML's first key


def test_every_subcommand_and_option_has_help_and_examples():
    from se_surgery.cli import parser

    ap = parser()
    subs = next(a for a in ap._actions if a.dest == "command").choices
    assert {"sites", "plan", "report", "check", "presets"} <= set(subs)
    for name, sp in subs.items():
        assert "examples:" in (sp.epilog or ""), name
        for action in sp._actions:
            assert action.help, (name, action.dest)
    assert "examples:" in ap.epilog


def test_num_classes_loads_a_fine_tuned_head(tmp_path):
    path = tmp_path / "r18_10.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    code, _, err = run(["sites", "resnet18", "--input-size", "32", "--weights", str(path)])
    assert code == 2 and err.strip().endswith("ResNet needs (1000, 512) (a checkpoint with its own classifier needs "
                                              "--num-classes N)")
    code, out, _ = run(["sites", "resnet18", "--input-size", "32", "--weights", str(path), "--num-classes", "10"])
    assert code == 0 and out.startswith("resnet18 at 3x32x32: 8 sites")


def test_report_warns_on_stderr_and_keeps_stdout_parseable(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("rules:\n  - select: {stage: -1}\n  - select: {name: 'nothing*'}\n")
    code, out, err = run(["report", "resnet18", "--input-size", "32", "--rules", str(path), "--format", "json"])
    assert code == 0 and json.loads(out)["added_params"] > 0
    assert err.strip() == f"se-surgery: warning: {path}:3: rule 1 selects no site of ResNet (8 sites; se-surgery " \
                          "sites MODEL lists them)"


def _column(text: str, site: str, header: str) -> str:
    lines = text.splitlines()
    head = next(ln for ln in lines if ln.startswith("site "))
    row = next(ln for ln in lines if ln.startswith(site + " "))
    return row.split()[head.split().index(header)]


def test_plan_and_report_agree_on_channels_for_pre():
    # layer2.0 joins 128 channels, but 'pre' scales its 64-channel input.
    _, plan_out, _ = run(["plan", "resnet18", "--input-size", "32", "--rules", "se_pre"])
    _, report_out, _ = run(["report", "resnet18", "--input-size", "32", "--rules", "se_pre"])
    assert _column(plan_out, "layer2.0", "channels") == _column(report_out, "layer2.0", "channels") == "64"
    assert _column(plan_out, "layer2.0", "hidden") == _column(report_out, "layer2.0", "hidden") == "4"
    _, plan_out, _ = run(["plan", "resnet18", "--input-size", "32", "--rules", "all_stages"])
    assert _column(plan_out, "layer2.0", "channels") == "128"


def test_csv_keeps_totals_apart_from_site_rows():
    code, out, _ = run(["report", "resnet18", "--input-size", "32", "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["row"] for r in rows] == ["site"] * 8 + ["added", "base"]
    assert sum(int(r["params"]) for r in rows if r["row"] == "site") == int(rows[-2]["params"])
    assert rows[-1]["params"] == str(sum(p.numel() for p in torchvision.models.resnet18().parameters()))


def test_plot_has_integer_stage_ticks_centred_bars_and_the_model_name(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), real_savefig(self, *a, **k)))
    png = tmp_path / "se.png"
    argv = ["report", "resnet18", "--input-size", "64", "--rules", "all_stages", "--rules", "late_stages"]
    code, _, err = run(argv + ["--plot", str(png)])
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plot written to" in err
    (fig,) = figures
    assert "resnet18" in fig.get_suptitle()
    for ax in fig.axes:
        assert list(ax.get_xticks()) == [1, 2, 3, 4]
        centres = sorted(p.get_x() + p.get_width() / 2 for p in ax.patches)
        # Two rule sets: two bars per stage, symmetric about the tick.
        for stage in (1, 2, 3, 4):
            pair = [c for c in centres if abs(c - stage) < 0.5]
            assert len(pair) == 2 and abs(sum(pair) / 2 - stage) < 1e-9


# --------------------------------------------------------------------------- what only a real process sees


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "se_surgery", *args], cwd=REPO, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), **kw)


def test_closed_pipe_is_quiet():
    # Like `se-surgery sites resnet18 | head -0`: the reader is gone before the first write.
    proc = _cli("sites", "resnet18", "--input-size", "32", stdout=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_full_disk_is_one_line():
    with open("/dev/full", "w") as full:
        proc = _cli("presets", stdout=full)
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 2
    assert err == "se-surgery: error: cannot write the output: No space left on device\n"


def test_closed_stdout_is_one_line():
    code = textwrap.dedent("""
        import os, subprocess, sys
        # The child starts with descriptor 1 closed, as after `se-surgery presets >&-`.
        proc = subprocess.run([sys.executable, "-m", "se_surgery", "presets"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
        print(proc.returncode, proc.stderr, end="")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout == "2 se-surgery: error: standard output is closed; redirect it to a file or /dev/null\n"


def test_ctrl_c_is_one_line_and_exit_130():
    # The interrupt arrives while a command runs, as Ctrl-C during a long report would.
    code = textwrap.dedent("""
        import os, signal, sys
        from se_surgery import cli
        cli._cmd_check = lambda args: os.kill(os.getpid(), signal.SIGINT)
        sys.exit(cli.main(["check", "late_stages"]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 130 and proc.stderr == "se-surgery: interrupted\n" and proc.stdout == ""


# --------------------------------------------------------------------------- properties: random input


def _assert_clean(code, err):
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert err.strip(), "exit 2 without a message"


_yaml_bytes = st.one_of(
    st.binary(max_size=200),
    st.text(alphabet=st.sampled_from(list("rules:-{}[]&*!#|>'\" \n\tselctkindagvoph0123456789.,e+?<é\x00")),
            max_size=120).flatmap(lambda t: st.sampled_from(["utf-8", "utf-16", "utf-16-le", "latin-1"]).map(
                lambda enc: t.encode(enc, errors="replace"))),
    st.builds(lambda key, value: f"defaults: {{{key}: {value}}}\nrules: [{{select: {{}}}}]\n".encode(),
              st.sampled_from(["ratio", "divisor", "min_hidden", "variant", "bias"]),
              st.sampled_from(["0", "-1", "5.0e-324", "1e400", ".inf", ".nan", "16", "0.125", "4096", "4097",
                               "512", "513", "1" * 40, "[1]", "{a: 1}", "yes", "~", "pre"])),
    st.integers(1, 1200).map(lambda n: b"rules: " + b"[" * n + b"]" * n),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_yaml_bytes)
def test_check_any_rules_bytes_exits_0_or_2(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_bytes(data)
    code, _, err = run(["check", str(path)])
    _assert_clean(code, err)
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("se-surgery: error: "), err


_tokens = st.sampled_from([
    "check", "presets", "sites", "plan", "report", "late_stages", "all_stages", "se_pre", "no_such_preset",
    "--rules", "--format", "json", "csv", "markdown", "table", "xml", "--input-size", "32", "0", "-3", "3x32x32",
    "32x48", "1e9", "--weights", "/no/such.pt", "--num-classes", "10", "--strict", "-v", "--plot", "/no/dir/x.png",
    "x.xyz", "--version", "--help", "-h", "tv:", "timm:", "resnet5", "", "--", "\x00", "é",
]) | st.text(max_size=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=st.lists(_tokens, max_size=6).filter(lambda a: not {"sites", "plan", "report"} & set(a[:1])))
def test_random_arguments_exit_0_or_2(argv):
    # No model is built here (the first word is never a model command), so this runs fast.
    code, _, err = run(argv)
    _assert_clean(code, err)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=st.sampled_from(["sites", "plan", "report"]),
       extra=st.lists(st.sampled_from(["--rules", "late_stages", "se_pre", "inception", "--format", "json", "csv",
                                       "--strict", "-v", "--num-classes", "7", "--input-size", "3x32x48", "40",
                                       "{rules}"]), max_size=5),
       rules=_yaml_bytes)
def test_random_model_commands_exit_0_or_2(tmp_path_factory, command, extra, rules):
    # resnet18 at 32 px, which the argv may override with another small size; {rules} is a
    # file of random bytes.
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_bytes(rules)
    code, _, err = run([command, "resnet18", "--input-size", "32", *(a.format(rules=path) for a in extra)])
    _assert_clean(code, err)


# ---------------------------------------------------------------- issue 21: files, flags, formats


def test_bare_command_prints_help():
    code, out, err = run([])
    assert code == 0 and err == ""
    assert out.startswith("usage: se-surgery") and "Run 'se-surgery COMMAND --help'" in out


@pytest.fixture(scope="module")
def se_file(tmp_path_factory):
    """An SE checkpoint of resnet18 patched with late_stages at 64 px."""
    import warnings

    f = tmp_path_factory.mktemp("se") / "se.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        se_surgery.save_se(se_surgery.apply(torchvision.models.resnet18(), "late_stages", input_size=64), f)
    return f


def test_report_and_plan_show_an_se_checkpoint_as_it_was_saved(se_file):
    code, out, err = run(["report", "resnet18", "--se", str(se_file), "--format", "json"])
    assert code == 0, err
    data = json.loads(out)
    assert data["input_size"] == [3, 64, 64]  # the size it was patched at, not 224
    assert [s["name"] for s in data["sites"]] == ["layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    assert data["added_params"] == 2 * (2 * 256 * 16 + 16 + 256) + 2 * (2 * 512 * 32 + 32 + 512)
    code, out, err = run(["plan", "resnet18", "--se", str(se_file)])
    assert code == 0, err
    assert out.startswith("ResNet at 3x64x64, rules preset late_stages: SE at 4 of 8 sites")
    code, out, err = run(["report", "resnet34", "--se", str(se_file)])
    assert code == 2 and out == "" and "made for a torchvision.models.resnet.ResNet" not in err
    assert err.startswith(f"se-surgery: error: {se_file}: ") and len(err.splitlines()) == 1


def test_se_checkpoint_given_as_weights_says_use_se(se_file):
    code, out, err = run(["report", "resnet18", "--weights", str(se_file)])
    assert (code, out) == (2, "")
    assert err == (f"se-surgery: error: {se_file} is an SE checkpoint (from se_surgery.save_se), not base weights: "
                   "pass it as --se FILE (and the base weights, if any, as --weights)\n")


def test_empty_weights_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    code, _, err = run(["sites", "resnet18", "--weights", str(empty)])
    assert code == 2 and err.startswith(f"se-surgery: error: cannot load weights from {empty}: "), err
    assert "internal error" not in err and len(err.splitlines()) == 1


def test_pretrained_without_a_network_fails_at_once(tmp_path, monkeypatch):
    from se_surgery import hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # nothing cached
    monkeypatch.setattr(hub, "_reachable", lambda host, timeout=3.0: False)
    code, out, err = run(["sweep", "tv:resnet18", "--pretrained", "--data", "digits", "--out",
                          str(tmp_path / "r.jsonl")])
    assert (code, out) == (2, "")
    assert err == ("se-surgery: error: --pretrained: the weights of tv:resnet18 are not cached and "
                   "download.pytorch.org cannot be reached (no network?); load a local checkpoint instead "
                   "(--weights FILE on the command line)\n")


def test_compare_uses_the_single_reports_headers_and_formats():
    code, out, _ = run(["report", "resnet18", "--rules", "all_stages", "--rules", "late_stages", "--input-size", "64"])
    assert code == 0
    head, rule, *rows = [ln for ln in out.splitlines() if ln.strip()][1:4]
    assert head.split() == ["rules", "module", "sites", "added", "params", "params", "%", "added", "MACs", "MACs", "%"]
    pct = re.findall(r"\d+\.\d+ %", rows[0])
    assert len(pct) == 2 and all(len(p.split(".")[1]) == len("00 %") for p in pct), rows[0]


def test_library_errors_name_parameters_and_the_cli_names_flags():
    from se_surgery.studies import sweep

    with pytest.raises(sweep.SweepError, match=r"^weight_decay -1: must be a finite number from 0 to 1000$"):
        sweep.SweepConfig("m", "digits", weight_decay=-1).check()
    code, _, err = run(["sweep", "timm:test_resnet", "--data", "digits", "--weight-decay", "-1"])
    assert (code, err) == (2, "se-surgery: error: --weight-decay -1.0: must be a finite number from 0 to 1000\n")


def test_plugin_warnings_use_the_cli_one_line_format(monkeypatch, capsys):
    from se_surgery import modules

    monkeypatch.setattr(modules, "_REGISTRY", None)

    class Broken:
        name, value, dist = "broken", "pkg:Missing", None

        def load(self):
            raise ImportError("No module named 'pkg'\nsecond line")

    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [Broken()])
    code, out, err = run(["check", "late_stages"])  # check looks up module names
    assert code == 0
    assert err == ("se-surgery: warning: module plugin 'broken' (pkg:Missing) failed to load: ImportError: No module "
                   "named 'pkg' (rules cannot use it)\n")
