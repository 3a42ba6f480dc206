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


def one_line_error(exc: BaseException) -> str:
    """``Type: first line of the message``, for naming a failure in one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def _unreadable() -> tuple[type[BaseException], ...]:
    import pickle
    import zipfile

    return (OSError, EOFError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError,
            zipfile.BadZipFile)


# What reading a file that is not what it should be (truncated, another format, a foreign pickle)
# raises, from torch.load and friends: the user's file to fix. Anything else is a bug.
UNREADABLE_FILE = _unreadable()
