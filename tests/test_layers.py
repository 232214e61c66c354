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


FLOOR_2 = ("gateway", "gpu_worker", "slurm_jobs", "circuit_breaker")


def _imports_under(folder: Path) -> dict[str, set[str]]:
    return {str(p.relative_to(REPO)): imported_modules(p) for p in sorted(folder.rglob("*.py"))}


def _is(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def test_the_cluster_client_speaks_no_http():
    """``gateway/cluster/`` (tunnel, broker, registry, one request's life on the wire) never
    imports the HTTP face: its failures are cluster errors, mapped to HTTP in ``gateway/errors.py``."""
    http = ("fastapi", "starlette", "gateway.errors", "gateway.schemas", "gateway.routes", "gateway.context",
            "gateway.app", "gateway.streaming", "gateway.http_guard")
    found = _imports_under(REPO / "gateway" / "cluster")
    assert len(found) >= 8  # the scan saw the package
    wrong = sorted(f"{path}: {name}" for path, names in found.items() for name in names
                   if any(_is(name, h) for h in http))
    assert not wrong, wrong


def test_the_components_on_one_floor_never_import_each_other():
    """The gateway, the worker, the Slurm tools and the breaker share only ``broker_config``."""
    wrong = sorted(f"{path}: {name}" for component in FLOOR_2
                   for path, names in _imports_under(REPO / component).items() for name in names
                   for other in FLOOR_2 if other != component and _is(name, other))
    assert not wrong, wrong
