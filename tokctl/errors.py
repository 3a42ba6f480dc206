"""The one exception type that reaches the user as a single line instead of a traceback."""


class UserError(Exception):
    """A mistake the user can fix: bad override, missing file, unknown model.

    The CLI prints ``error: <message>`` and exits with status 2. The message should name what was
    wrong and how to fix it, on one line.
    """

    exit_code = 2


def one_line(text: str) -> str:
    """Collapse a multi-line message (Hydra's, for instance) into one readable line."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    return " ".join(parts)
