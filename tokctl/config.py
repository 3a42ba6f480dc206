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


def _hydra_compose(folder: str, config_name: str, overrides: list[str],
                   return_hydra_config: bool = False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir(folder)), version_base="1.3",
                               job_name=config_name):
        return hydra_compose(config_name=config_name, return_hydra_config=return_hydra_config,
                             overrides=list(overrides) + [common_searchpath()])


def compose_with_hydra(folder: str, config_name: str, overrides: list[str]):
    """The config with its ``hydra`` node (the launcher chosen, the groups' choices), unresolved
    and unchecked; Hydra's errors as one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return _hydra_compose(folder, config_name, overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise _hydra_error(exc) from None


def compose(folder: str, config_name: str, overrides: list[str]):
    """Compose ``conf/<folder>/<config_name>.yaml`` with overrides; Hydra's errors become one line.

    Every override is checked against the keys and types of the YAML files first (see
    tokctl.schema): a misspelt key, a key no code reads or a value of the wrong type is refused
    in one line that names the key, what it takes and the closest valid key."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for o in overrides:
        if o.startswith("-"):
            raise UserError(f"unknown option {o!r}; configs are changed with key=value overrides "
                            f"(see --help)")
    check_overrides(folder, config_name, overrides)
    try:
        cfg = _hydra_compose(folder, config_name, overrides)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise _hydra_error(exc) from None
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        raise UserError(f"{', '.join(missing)} must be set: add {missing[0]}=VALUE to the command")
    return cfg


# ------------------------------------------------------------------------ checking overrides
def _is_hydra_key(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def parse_overrides(overrides: list[str]):
    """Hydra's parse of the overrides; an override without '=' gets a readable error."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    for o in overrides:
        if "=" not in o and not o.startswith("~"):
            raise UserError(f"{o!r} is not an override: configs are changed with key=value "
                            f"(see --help)")
    try:
        return OverridesParser.create().parse_overrides(overrides=list(overrides))
    except HydraException as exc:
        raise _hydra_error(exc) from None


def _values(override) -> list:
    """The plain values an override sets: one, or each of a sweep's."""
    from hydra.core.override_parser.types import ChoiceSweep, RangeSweep

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return list(value.list)
    if isinstance(value, RangeSweep):  # range(a, b, s): check what it yields (b excluded)
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return list(range(value.start, value.stop, value.step))[:1000]
        return [value.start]
    if override.is_sweep_override():  # intervals, globs: nothing plain to check
        return []
    return [value]


def did_you_mean(word: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.5)
    return f"did you mean {close[0]}? " if close else ""


def schema_for(folder: str, config_name: str, group_overrides: tuple[str, ...] = ()):
    """The key specs of one config with these group choices (cached: sweeps ask per point)."""
    key = (str(conf_root()), folder, config_name, tuple(group_overrides))
    if key not in _SCHEMAS:
        _SCHEMAS[key] = _build_schema(folder, config_name, list(group_overrides))
    return _SCHEMAS[key]


_SCHEMAS: dict = {}


def _build_schema(folder: str, config_name: str, group_overrides: list[str]):
    from omegaconf import OmegaConf, open_dict

    from tokctl import schema

    cfg = compose_with_hydra(folder, config_name, group_overrides)
    own = groups(folder)
    choices = {g: str(c) for g, c in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
               if g in own and c is not None}
    with open_dict(cfg):
        del cfg["hydra"]
    base = conf_dir(folder)
    files = [("", base / f"{config_name}.yaml")]
    files += [(g.replace("/", "."), base / g / f"{c}.yaml") for g, c in choices.items()]
    try:
        return schema.build(cfg, [(p, f) for p, f in files if f.is_file()], own, choices)
    except ValueError as exc:  # a malformed '#:' annotation: the config's bug, said plainly
        raise UserError(f"bad '#:' type annotation in conf/{folder}: {exc}") from None


def check_overrides(folder: str, config_name: str, overrides: list[str]) -> None:
    """Refuse, in one line, any override that names no key of the config, sets a key with a
    value its type or choices do not allow, or picks an option a group does not have."""
    parsed = parse_overrides([o for o in overrides if not o.startswith("hydra.run.dir=")])
    own = groups(folder)
    group_choices = []
    for o in parsed:
        key = o.key_or_group
        if _is_hydra_key(key) or key not in own or o.is_delete():
            continue
        for v in _values(o):
            if str(v) not in own[key]:
                raise UserError(f"{key}={v}: no such option; {did_you_mean(v, own[key])}"
                                f"({key}: {', '.join(own[key])})")
        if not o.is_sweep_override():
            group_choices.append(o.input_line.lstrip("+"))
    sch = schema_for(folder, config_name, tuple(group_choices))
    for o in parsed:
        key = o.key_or_group
        if _is_hydra_key(key) or key in own or o.is_delete():
            continue
        spec = sch.get(key)
        shown = o.input_line
        if spec is None:
            if o.is_force_add():  # ++key=value: on purpose, for a key no YAML declares
                continue
            raise UserError(_unknown_key(folder, config_name, sch, key, shown))
        if o.is_add() and not o.is_force_add():
            raise UserError(f"{shown}: {key} is already a key; set it without the '+' "
                            f"({key}={o.input_line.split('=', 1)[1]})")
        for v in _values(o):
            expected = spec.check(v)
            if expected is None:
                continue
            hint = spec.suggestion(v)
            said = (f"is {expected.replace('one of', 'not one of', 1)}"
                    if expected.startswith("one of ") else f": expected {expected}")
            raise UserError(f"{key}={show_value(v)}{' ' if said[0] != ':' else ''}{said}"
                            + (f"; did you mean {key}={hint}?" if hint else "")
                            + f" (default {show_value(spec.default)})")


def show_value(value) -> str:
    from tokctl.schema import _show

    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value)
    return _show(value)


def _unknown_key(folder: str, config_name: str, sch, key: str, shown: str) -> str:
    where = f"tokctl's {folder.replace('_', '-')} config" if config_name == folder.split("/")[-1] \
        else f"tokctl's {folder.replace('_', '-')} {config_name.replace('_', '-')} config"
    head = f"{shown}: no key {key} in {where}"
    group, _, leaf = key.partition(".")
    if leaf and group in sch.groups:  # a key of another option of the same group?
        holders = [opt for opt in sch.groups[group] if opt != sch.choices.get(group)
                   and _yaml_has(conf_dir(folder) / group / f"{opt}.yaml", leaf)]
        if holders:
            return (f"{head}: it is a key of {group}={', '.join(holders)}, not of "
                    f"{group}={sch.choices.get(group)}; choose one of those or drop it")
    close = sch.close_keys(key)
    if close:
        best = close[0]
        if best in sch.groups:
            return f"{head}; did you mean {best}? (a config group: {best}={sch.choices.get(best)})"
        return f"{head}; did you mean {best}? (--help lists the keys)"
    return f"{head} (--help lists the keys)"


def _yaml_has(path, dotted: str) -> bool:
    from omegaconf import OmegaConf

    if not path.is_file():
        return False
    return OmegaConf.select(OmegaConf.load(path), dotted, default="__absent__") != "__absent__"


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


def check_sweep(folder: str, config_name: str, overrides: list[str]) -> None:
    """check_overrides for every point of a ``-m`` sweep (a group swept changes which keys
    exist); sweep.py's own request keys (+resume) and Hydra's are left to it."""
    task = [o for o in overrides
            if o.split("=", 1)[0].lstrip("+") != "resume" and not _is_hydra_key(
                o.split("=", 1)[0].lstrip("+~"))]
    parse_overrides(task)
    for point in sweep_points(task):
        check_overrides(folder, config_name, point)
