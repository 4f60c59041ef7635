"""Suite-wide settings: the tests write nothing into the checkout.

Hypothesis keeps no example database and puts its other files (the unicode tables its
text strategies cache) in a temporary folder, not in ``./.hypothesis``. At the end of a
session the checkout is compared with how it was at the start; a file that a test wrote
into it fails the run, named. Tool caches that every Python run leaves (``__pycache__``,
pytest's own ``.pytest_cache``) are not counted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
TOOL_CACHES = ("__pycache__", ".pytest_cache")
_BEFORE = pytest.StashKey["set[str] | None"]()

settings.register_profile("se-surgery", database=None)
settings.load_profile("se-surgery")

_HYPOTHESIS_HOME: str | None = None


def pytest_configure(config):
    global _HYPOTHESIS_HOME
    if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:  # a folder the user chose wins
        _HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="se-surgery-hypothesis-")
        os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = _HYPOTHESIS_HOME


def pytest_unconfigure(config):
    if _HYPOTHESIS_HOME is not None:
        os.environ.pop("HYPOTHESIS_STORAGE_DIRECTORY", None)
        shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)


def _checkout_state() -> set[str] | None:
    """``git status`` lines of the checkout, ignored files included; None outside a git checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {line for line in out.splitlines() if not any(c in line for c in TOOL_CACHES)}


def pytest_sessionstart(session):
    # xdist workers share the controller's checkout: the controller alone checks it.
    if not hasattr(session.config, "workerinput"):
        session.config.stash[_BEFORE] = _checkout_state()


def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_BEFORE, None)
    if before is None:
        return
    after = _checkout_state()
    written = sorted((after or set()) - before)
    if written:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = ["the tests wrote into the checkout (use tmp_path):", *written]
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_sep("=", "files written into the checkout", red=True)
            for line in lines:
                reporter.write_line(line)
        else:
            print("\n".join(lines))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

