"""The package's structure: Hydra's and submitit's public surface only (their private modules and
names change without notice between releases), and no import circle between tokctl's modules."""

import ast
from pathlib import Path

import tokctl

PACKAGE = Path(tokctl.__file__).resolve().parent


def private_uses(source: str) -> list[str]:
    """Imports of ``hydra._internal`` (or any private hydra/submitit module), and any private
    name (``_usr_sig``, ``_handle_signals``, ...) imported from or read off hydra or submitit."""
    found, aliases = [], {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("hydra", "submitit", "hydra_plugins"):
                    aliases[(a.asname or a.name).split(".")[0]] = a.name
                    if any(part.startswith("_") for part in a.name.split(".")):
                        found.append(f"import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] in ("hydra", "submitit", "hydra_plugins"):
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            if any(p.startswith("_") for p in node.module.split(".") + [a.name for a in node.names]):
                found.append(f"from {node.module} import {', '.join(a.name for a in node.names)}")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in aliases:
                found.append(f"{aliases[root.id]}...{node.attr}")
    return found


def test_no_module_uses_private_hydra_or_submitit_names():
    uses = {str(f.relative_to(PACKAGE)): private_uses(f.read_text())
            for f in PACKAGE.rglob("*.py")}
    assert {f: u for f, u in uses.items() if u} == {}


def test_the_check_catches_what_the_old_sweep_code_did():
    old = """
from hydra._internal.callbacks import Callbacks
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from submitit.core.job_environment import JobEnvironment
import submitit
sig = JobEnvironment._usr_sig()
env = submitit.JobEnvironment._usr_sig()
"""
    assert len(private_uses(old)) == 4
    assert private_uses("import submitit\nsubmitit.JobEnvironment.USR_SIG\n") == []


def imports_of(path: Path, module: str, modules: set[str]) -> set[str]:
    """The tokctl modules one module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".")[:len(module.split(".")) - node.level + (path.name == "__init__.py")]
            mod = ".".join(base + [node.module or ""]).strip(".") if node.level else node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules and n != module}
    return found


def test_no_import_circle():
    """cli -> jobs / sweep -> commands -> models and kernels: nothing imports back up."""
    files = {".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): f
             for f in PACKAGE.rglob("*.py")}
    graph = {m: imports_of(f, m, set(files)) for m, f in files.items()}
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in sorted(graph[m]):
            assert state.get(d) != "open", f"import circle: {' -> '.join(path + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
