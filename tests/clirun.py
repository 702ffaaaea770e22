"""`kd` commands run in-process for tests (typer's CliRunner); a failure shows kd's output."""

from __future__ import annotations

from typer.testing import CliRunner, Result

from kdcli.cli import app

runner = CliRunner()


def kd(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run ``kd ARGS`` and return its result; the test fails unless it exits 0."""
    result = runner.invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result
