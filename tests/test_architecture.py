"""The shape of the package, as docs/contracts.md and the README's design section say it.

Read from the source (no imports run): the import graph, where caproto's private names
may appear, and the size of classes and functions in ioc/ and readout/.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dtacq_ioc"
CAPROTO_PRIVATE = re.compile(
    r"\._queues\b|\._content\b|\._read\(|_subscription_queue_send|\.client\.writer"
    r"|_process_command|_get_db_entry_from_command|_start_write_task"
    r"|_searches_by_name|_unanswered_searches|pvs_needing_circuits|pv_cache_lock"
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _typing_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports inside `if TYPE_CHECKING:` blocks."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def _imports(path: Path, modules: dict[str, Path], typing: bool = True) -> set[str]:
    """Project modules a file imports, anywhere in it; `typing`: TYPE_CHECKING ones too."""
    found = set()
    tree = ast.parse(path.read_text())
    skip = set() if typing else _typing_only(tree)
    for node in ast.walk(tree):
        if getattr(node, "lineno", 0) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("dtacq_ioc.") or name == "dtacq_ioc":
                found.add(name)
    return found


def _graph(typing: bool = True) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules, typing) - {name} for name, path in modules.items()}


def test_ioc_and_bridge_never_import_each_other():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("dtacq_ioc.ioc"):
            assert not [d for d in deps if d.startswith("dtacq_ioc.bridge")], name
        if name.startswith("dtacq_ioc.bridge"):
            assert not [d for d in deps if d.startswith("dtacq_ioc.ioc")], name


@pytest.mark.parametrize("ground", ["dtacq_ioc.config", "dtacq_ioc.contract"])
def test_the_ground_floor_imports_nothing_of_the_project(ground):
    assert _graph()[ground] <= {"dtacq_ioc"}, _graph()[ground]


def test_no_import_loop_between_files():
    graph = _graph(typing=False)  # a loop of type hints alone never runs
    # __init__ re-exports (dtacq_ioc) are not a loop of files.
    graph = {n: {d for d in deps if d != "dtacq_ioc"} for n, deps in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                loop = [*path[path.index(dep) :], dep]
                raise AssertionError("import loop: " + " -> ".join(loop))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_only_the_adapter_names_caproto_privates():
    offenders = []
    for name, path in _modules().items():
        text = path.read_text()
        if name == "dtacq_ioc.caproto_adapter" or "caproto" not in text:
            continue  # the names are caproto's only in modules that use caproto
        for i, line in enumerate(text.splitlines(), 1):
            if CAPROTO_PRIVATE.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_every_type_ignore_says_why():
    bare = []
    for path in PACKAGE.rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            m = re.search(r"#\s*type:\s*ignore(\[[^\]]*\])?(.*)$", line)
            if m and not m.group(2).strip().lstrip("#").strip():
                bare.append(f"{path.relative_to(PACKAGE.parent)}:{i}")
    assert not bare, "type: ignore without a reason: " + ", ".join(bare)


@pytest.mark.parametrize("package", ["ioc", "readout"])
def test_classes_and_functions_stay_small(package):
    big = []
    for path in sorted((PACKAGE / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if isinstance(node, ast.ClassDef) and lines > 250:
                big.append(f"class {path.name}:{node.name} {lines} lines")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and lines > 60:
                big.append(f"function {path.name}:{node.name} {lines} lines")
    assert not big, big
