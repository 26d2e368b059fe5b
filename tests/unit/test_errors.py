"""The user-error hierarchy: one base the CLI maps to exit 2, the old bases kept, no torch on
import, and the traceback only on request (--debug or KFORCING_DIST_DEBUG)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kforcing_dist import errors
from kforcing_dist.cli import DEBUG_ENV, EXIT_USER_ERROR, main
from kforcing_dist.config import ConfigError
from kforcing_dist.data import DataError
from kforcing_dist.decode import DecodeError
from kforcing_dist.parallel.launch import LaunchError
from kforcing_dist.training.checkpoint import CheckpointError
from tests.conftest import ROOT


@pytest.mark.parametrize("cls, old_base", [(ConfigError, ValueError), (DataError, Exception),
                                           (CheckpointError, RuntimeError), (DecodeError, ValueError),
                                           (LaunchError, RuntimeError), (errors.OutputPathError, OSError)])
def test_every_user_error_is_one_class_and_keeps_its_old_base(cls, old_base):
    assert issubclass(cls, errors.UserError) and issubclass(cls, old_base)
    assert getattr(errors, cls.__name__) is cls  # the packages re-export the one class


def test_the_cli_and_the_errors_import_without_torch():
    """Training commands install their stop-signal catcher after importing these; torch there
    would let a Slurm USR1 kill a starting job."""
    code = "import sys, kforcing_dist.cli, kforcing_dist.errors; print(sorted(m for m in sys.modules if m == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


MISSING_MODEL = ["generate", "--model", "/nonexistent/decoder"]


@pytest.mark.parametrize("argv, env, traceback", [
    (MISSING_MODEL, None, False),
    (["--debug", *MISSING_MODEL], None, True),
    ([*MISSING_MODEL, "--debug"], None, True),
    (MISSING_MODEL, "1", True),
    (MISSING_MODEL, "0", False),
])
def test_one_line_unless_debugging(argv, env, traceback, monkeypatch, capsys):
    if env is None:
        monkeypatch.delenv(DEBUG_ENV, raising=False)
    else:
        monkeypatch.setenv(DEBUG_ENV, env)
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert ("Traceback" in err) == traceback
    assert err.splitlines()[-1].startswith("kforcing-dist generate: error: decoder folder /nonexistent/decoder "
                                           "does not exist")
