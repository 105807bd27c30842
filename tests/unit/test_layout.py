"""The package's plan, checked: layers import only downward, one module starts processes,
and only the lab needs the lab's third-party packages."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "captainos"
# Lower layers never import higher ones. The front door (cli, host, summary) sits on top.
RANK = {"core": 0, "sources": 1, "stages": 2, "lab": 3, "front": 4}
LAB_ONLY = {"grpc", "grpc_tools", "yaml"}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "front"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("captainos", *path.relative_to(PACKAGE).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every module an import statement names (`from a import b` counts a.b when that is a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_downward_only(module):
    upward = sorted(
        name for name in _imports(MODULES[module])
        if name in MODULES and name != "captainos" and RANK[_layer(name)] > RANK[_layer(module)]
    )
    assert not upward, f"{module} ({_layer(module)}) imports a higher layer: {upward}"


def test_only_run_starts_processes():
    starters = sorted(m for m, path in MODULES.items() if {"subprocess", "os.system"} & _imports(path))
    assert starters == ["captainos.core.run"]


def test_only_the_lab_needs_the_lab_extra():
    outside = sorted(m for m, path in MODULES.items()
                     if _layer(m) != "lab" and {n.split(".")[0] for n in _imports(path)} & LAB_ONLY)
    assert outside == []


def test_the_layers_are_folders():
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "core", "sources", "stages", "lab"}
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == ["__init__", "__main__", "cli", "host", "summary"]


def test_outside_the_lab_only_fetch_downloads():
    downloaders = sorted(m for m, path in MODULES.items()
                         if _layer(m) != "lab" and any(n.split(".")[0] in ("urllib", "http") for n in _imports(path)))
    assert downloaders == ["captainos.sources.fetch"]
