"""`kd` commands run in-process for tests (typer's CliRunner); a failure shows kd's output."""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner, Result

from kdcli.cli import app

runner = CliRunner()


def kd(*args: str | os.PathLike, env: dict[str, str] | None = None, code: int | None = 0) -> Result:
    """Run ``kd ARGS`` and return its result.

    The test fails unless kd exits with ``code`` (0 by default); ``code=None`` checks nothing, for
    tests that look at the result themselves.
    """
    result = runner.invoke(app, [str(a) for a in args], env=env)
    if code is not None:
        assert result.exit_code == code, f"exit {result.exit_code} (expected {code})\n{result.output}"
    return result


def kd_in(directory: Path, *args: str | os.PathLike, code: int | None = 0) -> Result:
    """``kd ARGS`` run in ``directory`` (module fixtures cannot use monkeypatch.chdir)."""
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        return kd(*args, code=code)
    finally:
        os.chdir(cwd)
