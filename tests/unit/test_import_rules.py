"""Import rules that keep arrows pointing inward, checked by reading the sources (no import runs)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import statement in ``path``, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _sources() -> list[Path]:
    files = [*sorted((ROOT / "pdx").rglob("*.py")), *sorted((ROOT / "proxy").rglob("*.py"))]
    deploy = ROOT / "pdx" / "deploy"
    return [p for p in files if deploy not in p.parents]


def test_the_sources_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _sources()}
    assert "pdx/agent/server.py" in names and "proxy/app.py" in names
    assert not any(n.startswith("pdx/deploy/") for n in names)


def test_nothing_outside_pdx_deploy_imports_it() -> None:
    offenders = [f"{p.relative_to(ROOT)}:{line} imports {mod}"
                 for p in _sources() for line, mod in _imported_modules(p)
                 if mod == "pdx.deploy" or mod.startswith("pdx.deploy.")]
    assert offenders == [], "pdx/deploy/ is a leaf: " + "; ".join(offenders)


def test_the_rule_sees_a_nested_import(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from pdx.deploy.process import AgentProcess\n    import pdx.deploy\n")
    assert [m for _, m in _imported_modules(src)] == [
        "pdx.deploy.process", "pdx.deploy.process.AgentProcess", "pdx.deploy"]
