"""Status lines for slow steps, and the run folder named on every exit of a job."""

import pytest
from typer.testing import CliRunner

from tokctl import jobs
from tokctl.cli import app
from tokctl.console import step
from tokctl.errors import UserError

runner = CliRunner()


def test_step_says_what_and_how_long(capsys):
    with step("measuring something", "a few seconds"):
        pass
    err = capsys.readouterr().err
    assert "measuring something (a few seconds) ..." in err and "done in" in err


@pytest.mark.parametrize("raised,code,needle", [
    (KeyboardInterrupt(), 130, "interrupted: finished samples are kept in "),
    (UserError("bad input"), 2, "error: bad input (run folder: "),
])
def test_the_run_folder_is_named_on_every_exit(monkeypatch, tmp_path, raised, code, needle):
    def job(cfg, run):
        raise raised

    monkeypatch.setattr(jobs, "load_target", lambda job: job_fn)
    job_fn = job
    run = tmp_path / "run"
    result = runner.invoke(app, ["tokenize-image", "eval", f"hydra.run.dir={run}"],
                           terminal_width=1000)
    assert result.exit_code == code, result.output
    assert needle + str(run) in result.output
    assert run.is_dir()
