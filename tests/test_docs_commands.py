"""Every command the README and the --help examples show is parsed and composed (not run), so
the docs cannot drift from the tool: a renamed key, option or flag fails here."""

import re
import shlex
from pathlib import Path

import pytest
import typer
try:  # typer >= 0.20 ships its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:
    from click.exceptions import UsageError
from typer.testing import CliRunner

from tokctl.cli import FILE_ACTIONS, app
from tokctl.jobs import JOBS

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def readme_commands() -> list[str]:
    """`tokctl ...` lines inside the README's code blocks (comments and `&&` prefixes dropped)."""
    out, in_code = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            continue
        if line.startswith("$ "):  # a transcript: checked by test_readme_transcripts
            continue
        line = line.split("&&")[-1]
        m = re.search(r"(?:^|\s)(?:\.venv/bin/)?(tokctl\s.*)$", line)
        if m and not line.lstrip().startswith("#"):
            out.append(re.sub(r"\s+#.*$", "", m.group(1)).strip())
    return out


def help_examples() -> list[str]:
    return [re.sub(r"\s+#.*$", "", e).strip() for job in JOBS.values() for e in job.examples]


def check(command: str) -> None:
    """Parse one documented command the way tokctl would, stopping before any work."""
    argv = shlex.split(command)[1:]
    top = argv[0]
    if any(top == name.split(" ")[0] for name in JOBS):
        if len(argv) > 1 and f"{top} {argv[1]}" in FILE_ACTIONS:
            from tokctl.imagetok import codec

            fn = {"encode": codec.encode_command, "decode": codec.decode_command}[argv[1]]
            cmd = typer.main.get_command(codec._single(fn))
            cmd.make_context(f"tokctl {top} {argv[1]}", argv[2:])
            return
        if "--help" in argv:
            result = runner.invoke(app, argv)
        else:
            result = runner.invoke(app, [*argv, "--cfg"])
        assert result.exit_code == 0, f"{command}\n{result.output}"
        return
    cmd, ctx, rest, name = typer.main.get_command(app), None, list(argv), "tokctl"
    while hasattr(cmd, "resolve_command"):  # resolve subcommands as click does, run none of them
        ctx = cmd.make_context(name, rest, parent=ctx)
        name, cmd, rest = cmd.resolve_command(ctx, _pending(ctx))
    cmd.make_context(name, rest, parent=ctx)


def _pending(ctx) -> list[str]:
    """The arguments a group leaves for its subcommand (click renamed the attribute in 8.2)."""
    protected = getattr(ctx, "_protected_args", None)
    if protected is None:
        protected = ctx.protected_args
    return [*protected, *ctx.args]


def test_readme_has_commands():
    assert len(readme_commands()) > 30


@pytest.mark.parametrize("command", sorted(set(readme_commands() + help_examples())))
def test_documented_command_parses(command):
    check(command)


@pytest.mark.parametrize("command", [
    "tokctl runs compare RUN --bogus", "tokctl runs lss", "tokctl decode max_new_token=5",
    "tokctl tokenize-image encode a.png --tokenz 3", "tokctl compress-vit method=tomee"])
def test_a_wrong_command_fails_the_check(command):
    with pytest.raises((AssertionError, UsageError)):
        check(command)


def readme_transcripts() -> list[tuple[str, str]]:
    """``$ tokctl ...`` lines of the README and the line shown after each."""
    lines = (ROOT / "README.md").read_text().splitlines()
    return [(ln[2:], lines[i + 1]) for i, ln in enumerate(lines[:-1]) if ln.startswith("$ tokctl ")]


@pytest.mark.parametrize("command,shown", readme_transcripts())
def test_readme_transcripts_print_what_the_readme_says(command, shown):
    result = runner.invoke(app, shlex.split(command)[1:], terminal_width=1000)
    assert result.output.strip().splitlines()[-1] == shown
