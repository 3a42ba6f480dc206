"""What the decode CLI tests share: running `tokctl` in-process, and reading its one error line."""

from typer.testing import CliRunner

from tokctl.cli import app

runner = CliRunner()


def tokctl(*args):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def one_error_line(output):
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error:"), output
    assert "Traceback" not in output
    return lines[0]
