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
