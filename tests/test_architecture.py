"""The layers of the package, checked by parsing every import (no module is imported).

Read top-down the package is cli -> pipeline / reasoning (lists of stages) -> stages (stage
mechanics) -> workloads (tasks/), teachers/, train/ (the loop) -> losses/, models/, data/,
generate/ (building blocks). A building block never imports the stage lists or their mechanics.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "distilflow"
BELOW_THE_STAGES = ("data", "generate", "models", "losses", "train", "teachers", "tasks")
ABOVE = ("distilflow.pipeline", "distilflow.stages", "distilflow.reasoning", "distilflow.cli")


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path`` (below ``root``), relative imports resolved,
    function-level ones included; ``from m import a`` gives both ``m`` and ``m.a``."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


@pytest.mark.parametrize("folder", BELOW_THE_STAGES)
def test_building_blocks_do_not_import_the_stages(folder):
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((PACKAGE / folder).rglob("*.py"))
        for line, module in imported_modules(path)
        if module in ABOVE or module.startswith(tuple(f"{m}." for m in ABOVE))
    ]
    assert not offenders, "\n".join(offenders)


def test_the_rule_sees_function_level_and_relative_imports(tmp_path):
    """The parser finds what the rule forbids wherever it is written (the rule can fail)."""
    probe = tmp_path / "distilflow" / "data" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from distilflow.pipeline import Run\n\nfrom ..stages import train_stage\n")
    found = {module for _, module in imported_modules(probe, tmp_path)}
    assert {"distilflow.pipeline", "distilflow.pipeline.Run", "distilflow.stages.train_stage"} <= found


# --- private names stay in their module ----------------------------------------------------------

SOURCES = [
    p for folder in ("distilflow", "tests", "benchmarks", "scripts") for p in sorted((ROOT / folder).rglob("*.py"))
]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_crossings(path: Path, root: Path = ROOT) -> list[str]:
    """``from m import _name``, ``m._name`` on an imported distilflow module, and (tests) imports of
    another test module: what ``path`` takes from another module that the other did not make public."""
    tree = ast.parse(path.read_text())
    problems, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            module = node.module or ""
            problems += [
                f"{path.relative_to(root)}:{node.lineno} imports {n} from {module}" for n in names if _private(n)
            ]
            if module.split(".")[-1].startswith("test_"):
                problems.append(f"{path.relative_to(root)}:{node.lineno} imports from the test module {module}")
            if module.startswith("distilflow") or node.level:
                modules |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[-1].startswith("test_"):
                    problems.append(f"{path.relative_to(root)}:{node.lineno} imports the test module {alias.name}")
                if alias.name.startswith("distilflow"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name):
            if node.value.id in modules:
                problems.append(f"{path.relative_to(root)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return problems


def test_no_private_name_crosses_a_module_border():
    """Shared code is public; test helpers live in a conftest.py (never in another test file)."""
    problems = [problem for path in SOURCES for problem in private_crossings(path)]
    assert not problems, "\n".join(problems)


def test_the_private_name_rule_can_fail(tmp_path):
    probe = tmp_path / "tests" / "test_probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "from distilflow.cli import _load\nfrom distilflow import pipeline\nfrom .test_other import helper\n"
        "import distilflow.data.batches as batches\n\npipeline._train\nbatches._permutation\nself._own\n"
    )
    found = private_crossings(probe, tmp_path)
    assert len(found) == 4, found
    assert any("_load" in p for p in found) and any("test_other" in p for p in found)
    assert any("pipeline._train" in p for p in found) and any("batches._permutation" in p for p in found)
