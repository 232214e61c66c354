"""The layers point one way: the components never import the ``chatai`` command or its devstack.

``chatai/devstack/`` (dev and test harness) and ``chatai/`` (the command) build on the components;
an import the other way would ship the harness to GPU nodes and login nodes.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = ("gateway", "broker_config", "gpu_worker", "slurm_jobs", "circuit_breaker")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_components_never_import_the_chatai_command_or_the_devstack():
    upward = {f"{path.relative_to(REPO)}: {name}"
              for component in COMPONENTS for path in sorted((REPO / component).rglob("*.py"))
              for name in imported_modules(path) if name == "chatai" or name.startswith("chatai.")}
    assert sum(1 for c in COMPONENTS for _ in (REPO / c).rglob("*.py")) > 40  # the scan saw the code
    assert not upward, sorted(upward)
