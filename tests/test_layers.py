"""The package's layers (docs/development.md, "The layers"): no module imports from a layer above
its own, and no import circle, counting every import statement (module level, inside functions and
under TYPE_CHECKING alike)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

SRC = REPO / "src"
# Bottom to top; a module belongs to the first entry naming it or a package above it.
LAYERS = [
    ("base", ("saelab.errors", "saelab.signals", "saelab.seeds")),
    ("runs", ("saelab.runs",)),
    ("config", ("saelab.config",)),
    ("data", ("saelab.data",)),
    ("nn", ("saelab.nn",)),
    ("experiment", ("saelab.experiment",)),
    ("report", ("saelab.report",)),
    ("front", ("saelab.api", "saelab.cli", "saelab.__main__", "saelab")),
]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(p): p for p in (SRC / "saelab").rglob("*.py")}


def layer(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(f"{p}.") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer")


def imports(module: str) -> set[str]:
    """The saelab modules `module` imports, anywhere in its text."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from saelab.config import schema` imports the module saelab.config.schema
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES
                     else node.module for a in node.names]
        else:
            continue
        out |= {n for n in names if n == "saelab" or n.startswith("saelab.")}
    return out - {module}


def test_every_module_is_in_a_layer_and_imports_none_above_its_own():
    upward = []
    for module in sorted(MODULES):
        for target in imports(module):
            if layer(target) > layer(module):
                upward.append(f"{module} ({LAYERS[layer(module)][0]}) imports {target} "
                              f"({LAYERS[layer(target)][0]})")
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = {m: imports(m) & MODULES.keys() for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path, module, target]
            if target not in state and (found := visit(target, [*path, module])):
                return found
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            circle = visit(module, [])
            assert circle is None, " -> ".join(circle)


def test_the_layer_test_sees_upward_and_circular_imports(tmp_path, monkeypatch):
    """The checks above can fail: a report module imported by the config layer is upward, and
    two modules importing each other are a circle."""
    assert layer("saelab.report.sweep") > layer("saelab.config.rules")
    fake = {"saelab.config.rules": tmp_path / "a.py", "saelab.config.job": tmp_path / "b.py"}
    fake["saelab.config.rules"].write_text("def f():\n    from saelab.report import sweep\n"
                                           "    from saelab.config import job\n")
    fake["saelab.config.job"].write_text("from saelab.config.rules import f\n")
    monkeypatch.setattr(f"{__name__}.MODULES", {**MODULES, **fake})
    assert {"saelab.report.sweep", "saelab.config.job"} <= imports("saelab.config.rules")
    assert "saelab.config.rules" in imports("saelab.config.job")
