"""The direction of imports inside ``syncnode/``, read from the source with ``ast``.

Every ``import`` counts, wherever it stands (module level, inside a function): a deferred
import is still a dependency. Imports under ``if TYPE_CHECKING:`` never run: they count for
the direction rules but not as cycles (a module may name in a type hint the class that
uses it). Rules:

- no cycles between modules;
- the inner modules (identity, events, Merkle tree, peer protocol, wire format, blob store,
  catalog) never import the outer ones (sync, peer server, node wiring, admin API, DICOM
  bridge, CLI);
- the admin API and the running node do not import each other's way back: the API depends
  on :mod:`syncnode.service`, never on :mod:`syncnode.node`;
- the core's status report does not import the DICOM bridge;
- only the catalog package opens SQLite databases (it owns the SQL; elsewhere ``sqlite3``
  may only be named for its errors).
"""

from __future__ import annotations

import ast
from pathlib import Path

import syncnode

PACKAGE = Path(syncnode.__file__).parent
INNER = {"ids", "events", "merkle", "protocol", "nodeid", "wire", "blobstore", "catalog"}
OUTER = {"sync", "peer_server", "node", "admin", "dicom", "cli", "service"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_only_lines(tree: ast.AST) -> set[int]:
    """Line numbers of the statements under ``if TYPE_CHECKING:``."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                for sub in ast.walk(stmt):
                    if hasattr(sub, "lineno"):
                        lines.add(sub.lineno)
    return lines


def imports_of(path: Path, modules: set[str], *, runtime_only: bool = False) -> set[str]:
    """The syncnode modules ``path`` imports (``from . import x`` resolved to ``x``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_only_lines(tree) if runtime_only else set()
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # ``from P import m`` depends on the module P.m if there is one, else on P
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem
                       for a in node.names]
        for target in targets:
            # the longest syncnode module that is a prefix of the target
            t = target
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t != "syncnode":
                found.add(t)
    return found


def graph(*, runtime_only: bool = False) -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules, runtime_only=runtime_only) for f in files}


def top(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_the_graph_is_read() -> None:
    g = graph()
    # a few edges known to exist: the checks below are not vacuous
    assert "syncnode.catalog" in g["syncnode.local"]
    assert "syncnode.service" in g["syncnode.admin.api"]
    assert "syncnode.service" in g["syncnode.cli"]
    assert "syncnode.service" in g["syncnode.node"]
    assert len(g) > 30


def test_no_import_cycles() -> None:
    g = graph(runtime_only=True)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                cycles.append([*path[path.index(n):], n] if n in path else [m, n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_inner_modules_never_import_outer_ones() -> None:
    g = graph()
    bad = [(m, n) for m, deps in g.items() if top(m) in INNER
           for n in deps if top(n) in OUTER]
    assert not bad, bad


def test_admin_api_depends_on_the_service_not_on_the_running_node() -> None:
    g = graph()
    for m, deps in g.items():
        if top(m) == "admin":
            assert "syncnode.node" not in deps, m
    assert not any(top(n) == "admin" for n in g["syncnode.service"])


def test_core_status_does_not_import_the_dicom_bridge() -> None:
    g = graph()
    assert not any(top(n) == "dicom" for n in g["syncnode.status"])


def test_only_the_catalog_opens_sqlite() -> None:
    outside: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if module_name(path).startswith("syncnode.catalog"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "connect"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "sqlite3"):
                outside.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert outside == [], f"SQLite opened outside syncnode/catalog: {outside}"
