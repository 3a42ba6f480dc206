"""Finding conf/, composing a command's config the way ``@hydra.main`` would, and describing it.

Each command has its own folder under conf/ (``conf/decode/``, ``conf/compress_vit/``, ...) so that
every command can have its own ``model``, ``method`` and ``data`` groups: the override
``method=tome`` then means the same thing on the command line as it does in Hydra's own syntax.
Configs shared by all commands (launchers, for instance) live in ``conf/common`` and are added
to Hydra's search path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tokctl.errors import UserError, one_line

CONF_ENV = "TOKCTL_CONF_DIR"


def conf_root() -> Path:
    """conf/ of a source checkout, or the copy packed into the wheel as tokctl/_conf."""
    if os.environ.get(CONF_ENV):
        return Path(os.environ[CONF_ENV]).resolve()
    here = Path(__file__).resolve().parent
    for candidate in (here / "_conf", here.parent / "conf"):
        if candidate.is_dir():
            return candidate
    raise UserError(f"tokctl's configs are missing (looked in {here / '_conf'} and "
                    f"{here.parent / 'conf'}); reinstall tokctl or set {CONF_ENV}=PATH")


def conf_dir(folder: str) -> Path:
    path = conf_root() / folder
    if not path.is_dir():
        raise UserError(f"no config folder {path}; reinstall tokctl or set {CONF_ENV}=PATH")
    return path


def common_searchpath() -> str:
    return f"hydra.searchpath=[file://{conf_root() / 'common'}]"


def groups(folder: str) -> dict[str, list[str]]:
    """Config groups of one command and the options in each, read from the folder tree."""
    base = conf_dir(folder)
    out: dict[str, list[str]] = {}
    for sub in sorted(p for p in base.rglob("*") if p.is_dir()):
        options = sorted(p.stem for p in sub.glob("*.yaml"))
        if options:
            out[str(sub.relative_to(base))] = options
    return out


def split_run_dir(overrides: Iterable[str]) -> tuple[str | None, list[str]]:
    """Take ``hydra.run.dir=PATH`` out of the overrides: tokctl makes the run folder itself."""
    run_dir, rest = None, []
    for o in overrides:
        if o.startswith("hydra.run.dir="):
            run_dir = o.split("=", 1)[1]
        else:
            rest.append(o)
    return run_dir, rest


def _hydra_error(exc: Exception) -> UserError:
    msg = one_line(str(exc).split("Config search path:")[0])
    msg = msg.replace("Available options in", "; available options in")
    return UserError(msg)


def compose(folder: str, config_name: str, overrides: list[str]):
    """Compose ``conf/<folder>/<config_name>.yaml`` with overrides; Hydra's errors become one line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for o in overrides:
        if o.startswith("-"):
            raise UserError(f"unknown option {o!r}; configs are changed with key=value overrides "
                            f"(see --help)")
    try:
        with initialize_config_dir(config_dir=str(conf_dir(folder)), version_base="1.3",
                                   job_name=config_name):
            cfg = hydra_compose(config_name=config_name,
                                overrides=list(overrides) + [common_searchpath()])
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise _hydra_error(exc) from None
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        raise UserError(f"{', '.join(missing)} must be set: add {missing[0]}=VALUE to the command")
    return cfg


def to_yaml(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg, resolve=True)


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Expand ``key=a,b`` sweeps into one override list per point, as Hydra's basic sweeper does:
    the cartesian product in the order typed, a key typed twice keeping its last value."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    except HydraException as exc:
        raise _hydra_error(exc) from None
    choices: dict[str, list[str]] = {}
    for o in parsed:
        key = o.get_key_element()
        if not o.is_sweep_override():
            choices[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep():
            choices[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            raise UserError(f"{o.input_line}: a sweep takes a list of values (a,b,c or range(...))")
    return [list(point) for point in itertools.product(*choices.values())]
