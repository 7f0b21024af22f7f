"""One-way layering: models may depend on data, never the reverse.

Every module under ``datamodules/`` is parsed with ``ast`` and each import statement, including
those inside functions and ``if TYPE_CHECKING`` blocks, is checked: none may name
``lightning_modules``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = "lightning_modules"


def forbidden_imports(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """(line, imported module) of every import of ``lightning_modules`` (or a submodule) in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] == FORBIDDEN]
    return found


@pytest.mark.parametrize(
    "source",
    [
        "import lightning_modules",
        "import os, lightning_modules.encoders.sources as s",
        "from lightning_modules.encoders import sources",
        "def f():\n    from lightning_modules.encoders.sources import create_tokenizer\n",
        "class A:\n    def m(self):\n        if True:\n            import lightning_modules.system\n",
    ],
)
def test_checker_finds_every_form_of_import(source):
    assert forbidden_imports(source), source


def test_checker_ignores_other_and_relative_imports():
    source = "import lightning\nfrom lightning.pytorch import Trainer\nfrom . import base\n"
    assert forbidden_imports(source) == []


def test_datamodules_never_import_lightning_modules():
    files = sorted((REPO / "datamodules").rglob("*.py"))
    assert files, "no datamodules package found"
    offenders = [
        f"{path.relative_to(REPO)}:{line}: imports {name}"
        for path in files
        for line, name in forbidden_imports(path.read_text(encoding="utf-8"), str(path))
    ]
    assert not offenders, "datamodules must not import lightning_modules:\n" + "\n".join(offenders)


def benchmark_imports(source: str, filename: str = "<string>") -> set[str]:
    """Modules of the ``benchmarks`` package that ``source`` imports (any form, at any depth)."""
    found = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found |= {
                alias.name.split(".")[1] for alias in node.names if alias.name.startswith("benchmarks.")
            }
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "benchmarks":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("benchmarks."):
                found.add(node.module.split(".")[1])
    return found


def test_benchmark_checker_finds_every_form_of_import():
    source = (
        "from benchmarks import benchutil as b, bench\nimport benchmarks.ablation\n"
        "def f():\n    from benchmarks.device_pack import read_store\n"
    )
    assert benchmark_imports(source) == {"benchutil", "bench", "ablation", "device_pack"}


def test_benchmarks_import_each_other_without_cycles_and_never_edit_sys_path():
    files = {
        path.stem: path for path in sorted((REPO / "benchmarks").glob("*.py")) if path.stem != "__init__"
    }
    assert {"ablation", "bench", "benchutil", "device_pack"} <= set(files)
    graph = {
        name: benchmark_imports(path.read_text(encoding="utf-8"), str(path)) - {name}
        for name, path in files.items()
    }
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join([*trail, name])
        state[name] = "open"
        for other in sorted(graph.get(name, ())):
            visit(other, [*trail, name])
        state[name] = "done"

    for name in graph:
        visit(name, [])
    edits = [
        f"{name}.py:{node.lineno}"
        for name, path in files.items()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    ]
    assert not edits, (
        f"benchmarks are run as modules (python -m benchmarks.x), not via sys.path edits: {edits}"
    )
