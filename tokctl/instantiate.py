"""Building a method from its config (``_target_`` plus options) with Hydra's ``instantiate``.

The user's mistakes (an unknown ``_target_``, an option the class does not take, a value its
constructor refuses with UserError) become one-line UserErrors. Anything else the constructor
raises is a bug: it propagates with its own traceback, which the job records in error.txt.
"""

from __future__ import annotations

import inspect
from typing import Any

from tokctl.errors import UserError, one_line


def instantiate(params: dict[str, Any], what: str) -> Any:
    """``what`` names the config in messages, e.g. "method tome"."""
    from hydra.errors import InstantiationException
    from hydra.utils import get_object, instantiate as hydra_instantiate

    target = params.get("_target_")
    if not target:
        raise UserError(f"{what}: the config has no _target_")
    try:
        factory = get_object(str(target))
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"{what}: _target_ {target} cannot be imported ({one_line(exc)})") from None
    _check_options(factory, params, what)
    try:
        return hydra_instantiate(params, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, UserError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if exc.__cause__ is not None:  # the constructor failed: a bug, keep its traceback
            raise exc.__cause__
        raise UserError(f"{what}: {one_line(exc)}") from None


def _check_options(factory, params: dict[str, Any], what: str) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    accepted = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return
    given = [k for k in params if not k.startswith("_")]
    unknown = [k for k in given if k not in accepted]
    options = [n for n, p in accepted.items()
               if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if unknown:
        raise UserError(f"{what}: no option {', '.join(unknown)} (options: {', '.join(options)})")
    missing = [n for n in options if accepted[n].default is inspect.Parameter.empty and n not in given]
    if missing:
        raise UserError(f"{what}: option {', '.join(missing)} must be set")
