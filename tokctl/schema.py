"""Types of config keys, read from the YAML files themselves, and the checks they allow.

The YAML files under conf/ stay the only source of truth: a key's type is its default's type
(``max_new_tokens: 128`` is an int, ``rfid: true`` a bool, ``also: []`` a list), so a key added to
a YAML is typed with no other edit. Where a default cannot say it, a trailing ``#:`` comment on
the key's line does (Hydra and OmegaConf never see comments)::

    max_new_tokens: 128      #: >= 1                       range on the default's type
    verify_cost: cached      #: cached | measure            choices
    budget: auto             #: auto | int >= 1             a word or a typed value
    dtype: null              #: null | float32 | bfloat16   nullable choices
    r: 8                     #: int >= 0 | list             several types

Alternatives are separated by ``|``; each is a type (``int``, ``float``, ``str``, ``bool``,
``list``, ``dict``, ``any``) with optional bounds (``>= 0``, ``> 0``, ``<= 1``, ``< 1``), or a
literal value (a word, a number, ``null``). A ``#:`` holding bounds only narrows the default's
type. Keys whose default is null, ``???`` or an interpolation take any value unless annotated.

Typing rules from a default: bool takes only true/false; int takes integers (write ``3.0`` when
fractions are fine); float takes any number; a string takes any scalar but a bool (``budget=40``
for a default of ``auto`` is fine; add choices with ``#:`` where only some words are valid).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

TYPES = ("int", "float", "str", "bool", "list", "dict", "any")
_OPS = {">=": lambda v, b: v >= b, ">": lambda v, b: v > b,
        "<=": lambda v, b: v <= b, "<": lambda v, b: v < b}
_KEY_LINE = re.compile(r"^(?P<indent>[ ]*)(?P<key>[A-Za-z_][\w\-]*)\s*:(?P<rest>.*)$")
_ANNOTATION = re.compile(r"(?:^|\s)#:\s*(?P<spec>.*)$")
_PACKAGE = re.compile(r"^#\s*@package\s+(?P<package>\S+)")


@dataclass(frozen=True)
class Alternative:
    """One accepted form: a type with bounds, or a literal value."""

    type: str | None = None  # one of TYPES; None for a literal
    literal: Any = None
    bounds: tuple[tuple[str, float], ...] = ()

    def accepts(self, value: Any) -> bool:
        if self.type is None:
            return _same_literal(value, self.literal)
        if not _is_type(value, self.type):
            return False
        return all(_OPS[op](value, bound) for op, bound in self.bounds)

    def type_fits(self, value: Any) -> bool:
        return self.type is not None and _is_type(value, self.type)

    def describe(self) -> str:
        if self.type is None:
            return _show(self.literal)
        text = {"str": "a string", "bool": "true or false", "int": "an int", "float": "a number",
                "list": "a list [...]", "dict": "a mapping {...}", "any": "anything"}[self.type]
        return " and ".join([text + (f" {self.bounds[0][0]} {_show(self.bounds[0][1])}"
                                     if self.bounds else "")]
                            + [f"{op} {_show(b)}" for op, b in self.bounds[1:]])


@dataclass
class Spec:
    """What one key takes: its default and the alternatives it accepts (None: anything)."""

    default: Any
    alternatives: tuple[Alternative, ...] | None

    def check(self, value: Any) -> str | None:
        """None when ``value`` is accepted, else what was expected (for the error line)."""
        if self.alternatives is None or _is_interpolation(value):
            return None
        if any(a.accepts(value) for a in self.alternatives):
            return None
        return self.describe()

    def describe(self) -> str:
        if self.alternatives is None:
            return "anything"
        words = [a.describe() for a in self.alternatives]
        if all(a.type is None for a in self.alternatives):
            return "one of " + ", ".join(words)
        return " or ".join(words)

    def suggestion(self, value: Any) -> str | None:
        """The closest literal choice to a mistyped word (``float33`` -> ``float32``)."""
        if self.alternatives is None or not isinstance(value, str):
            return None
        words = [_show(a.literal) for a in self.alternatives if a.type is None]
        if any(a.type == "bool" for a in self.alternatives):
            words += ["true", "false"]
        close = difflib.get_close_matches(value.lower(), words, n=1, cutoff=0.5)
        return close[0] if close else None

    def short(self) -> str:
        """For --help: the accepted forms in a few words."""
        if self.alternatives is None:
            return ""
        parts = []
        for a in self.alternatives:
            if a.type is None:
                parts.append(_show(a.literal))
            else:
                parts.append(" ".join([a.type] + [f"{op}{_show(b)}" for op, b in a.bounds]))
        return " | ".join(parts)


# ----------------------------------------------------------------------------- values and types
def _is_type(value: Any, kind: str) -> bool:
    if kind == "any":
        return True
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":  # numbers are fine where a word is (names, budget=40 beside auto)
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if kind == "list":
        return isinstance(value, (list, tuple))
    if kind == "dict":
        return isinstance(value, dict)
    raise ValueError(kind)


def _same_literal(value: Any, literal: Any) -> bool:
    if literal is None or value is None:
        return value is None and literal is None
    if isinstance(literal, bool) or isinstance(value, bool):
        return value is literal
    return value == literal or str(value) == str(literal)


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def type_of_default(default: Any) -> str | None:
    if default is None or default == "???" or _is_interpolation(default):
        return None
    for kind in ("bool", "int", "float", "str", "list", "dict"):
        if _is_type(default, kind):
            return kind
    return None


# -------------------------------------------------------------------------------- annotations
def parse_annotation(text: str, default: Any, where: str = "") -> tuple[Alternative, ...]:
    """``#:`` text -> alternatives; bounds alone narrow the default's own type."""
    text = text.strip()
    alternatives = []
    for part in (p.strip() for p in text.split("|")):
        if not part:
            raise ValueError(f"{where}: empty alternative in '#: {text}'")
        words = part.split()
        if words[0] in TYPES:
            kind, rest = words[0], words[1:]
        elif words[0] in _OPS:
            kind, rest = type_of_default(default), words
            if kind not in ("int", "float"):
                raise ValueError(f"{where}: bounds '{part}' need a numeric default or a type "
                                 f"(e.g. '#: int {part}')")
        else:
            if len(words) != 1:
                raise ValueError(f"{where}: cannot read '{part}' in '#: {text}'")
            alternatives.append(Alternative(literal=_literal(words[0])))
            continue
        if len(rest) % 2:
            raise ValueError(f"{where}: bounds in '{part}' come as pairs like '>= 1'")
        bounds = []
        for op, number in zip(rest[::2], rest[1::2]):
            if op not in _OPS:
                raise ValueError(f"{where}: unknown comparison {op!r} in '#: {text}'")
            bounds.append((op, float(number) if "." in number or "e" in number else int(number)))
        alternatives.append(Alternative(type=kind, bounds=tuple(bounds)))
    return tuple(alternatives)


def _literal(word: str) -> Any:
    import yaml

    value = yaml.safe_load(word)
    return value if isinstance(value, (str, int, float, bool)) or value is None else word


def annotations(path: Path) -> tuple[str, dict[str, str]]:
    """The ``@package`` of a YAML file (None: the default) and its ``#:`` texts by dotted key."""
    package, found, stack = None, {}, []  # stack: (indent, key) of the enclosing mappings
    for line in path.read_text().splitlines():
        head = _PACKAGE.match(line)
        if head:
            package = head["package"]
            continue
        m = _KEY_LINE.match(line)
        if not m:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m["key"]))
        note = _ANNOTATION.search(m["rest"])
        if note:
            found[".".join(k for _, k in stack)] = note["spec"]
    return package, found


# -------------------------------------------------------------------------------------- schema
@dataclass
class Schema:
    """Specs of every key of one composed config (its defaults, with the user's group choices)."""

    specs: dict[str, Spec]
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> options
    choices: dict[str, str] = field(default_factory=dict)  # group -> chosen option

    def get(self, key: str) -> Spec | None:
        return self.specs.get(key)

    def keys(self) -> list[str]:
        return list(self.specs)

    def close_keys(self, key: str) -> list[str]:
        """Valid keys (and group names) nearest to a mistyped one, best first."""
        names = list(self.specs) + list(self.groups)
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
        if not close and "." in key:  # match the last part among its siblings
            parent, _, leaf = key.rpartition(".")
            siblings = [k.rpartition(".")[2] for k in self.specs if k.rpartition(".")[0] == parent]
            close = [f"{parent}.{s}" for s in difflib.get_close_matches(leaf, siblings, n=3)]
        return close


def build(defaults_cfg, note_files: Iterable[tuple[str, Path]], groups: dict[str, list[str]],
          choices: dict[str, str]) -> Schema:
    """Specs from a composed config of defaults (an OmegaConf node) and the YAML files it came
    from (``(prefix, path)``: the dotted place of each file's keys in the config)."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(defaults_cfg, resolve=False)
    notes: dict[str, tuple[str, str]] = {}
    for prefix, path in note_files:
        package, found = annotations(path)
        if package is not None:
            prefix = "" if package == "_global_" else package.replace("_group_", prefix)
        for key, text in found.items():
            notes[f"{prefix}.{key}" if prefix else key] = (text, f"{path.name}: {key}")
    specs: dict[str, Spec] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if dotted in notes:
                text, where = notes[dotted]
                specs[dotted] = Spec(value, parse_annotation(text, value, where))
            else:
                kind = type_of_default(value)
                specs[dotted] = Spec(value, None if kind is None else (Alternative(type=kind),))
            if isinstance(value, dict):
                walk(value, dotted)

    walk(plain, "")
    return Schema(specs, groups, choices)
