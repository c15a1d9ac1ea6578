"""The layout shows the architecture: data flows one way, no import cycle, classes one can read.

Read from the package's source with ``ast``, so a new import anywhere (a
function-level one too) is seen.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import etcd_config_dispenser

PACKAGE = Path(etcd_config_dispenser.__file__).parent
NAME = "etcd_config_dispenser"

# Each module may import only modules that come before it: the order of the flow,
# etcd source -> key rules -> snapshot writer -> signal, with the wiring last.
LAYERS = [
    "__init__",
    "logs",  # log format and fields
    "heap",  # the C heap's one setting
    "layout",  # the on-disk names
    "fsops",  # filesystem primitives
    "values",  # values in memory or spooled to a file
    "keys",  # key -> path rules
    "rules",  # the operator's globs: keys taken, file modes
    "certs",  # certificate pairs, the gate's rules, expiry; pure
    "tlsverify",  # --verify-tls: what the child serves
    "events",  # what flows from etcd to the files, as plain data
    "options",
    "config",  # etcd settings from the environment
    "health",
    "intake",  # key rules applied to events
    "ledger",  # snapshot bookkeeping, pure
    "links",
    "filemaker",
    "spares",  # spares made a step at a time
    "housekeeping",  # after the signal: old snapshots, spares, pool
    "recovery",
    "snapshot",  # the writer
    "source",  # etcd client
    "session",  # etcd side: read, watch, retry
    "status",  # --status-prefix: what this instance serves, in etcd
    "child",  # the child: spawn, signal, reap
    "checkcmd",  # --check, started through the child supervisor
    "onchange",  # --on-change, on its own thread
    "sdnotify",  # systemd's READY/STATUS/WATCHDOG
    "publisher",  # file side: intake -> snapshot -> signal
    "app",
    "cli",
    "rollout",  # etcd-config-ctl status and wait: the status keys read back
    "ctl",  # etcd-config-ctl, the companion command
    "__main__",
]
CLASS_LINES_MAX = 220


def imports_of(path: Path) -> set[str]:
    """The package's own modules that ``path`` imports, wherever the import stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith(NAME + "."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(NAME + "."):
                    found.add(alias.name.split(".")[1])
    found.discard("__version__")
    return found


def graph() -> dict[str, set[str]]:
    return {path.stem: imports_of(path) for path in PACKAGE.glob("*.py")}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package() -> None:
    assert find_cycle(graph()) is None


def test_every_module_has_its_place_in_the_flow() -> None:
    assert sorted(graph()) == sorted(LAYERS)


def test_modules_import_only_what_comes_before_them() -> None:
    order = {name: i for i, name in enumerate(LAYERS)}
    wrong = [
        f"{module} imports {dep}"
        for module, deps in graph().items()
        for dep in deps
        if dep in order and order[dep] >= order[module]
    ]
    assert wrong == []


def test_the_file_side_never_imports_etcd() -> None:
    """The publisher and the writer work on plain data: testable without etcd."""
    closure: set[str] = set()
    todo = ["publisher"]
    edges = graph()
    while todo:
        module = todo.pop()
        if module not in closure:
            closure.add(module)
            todo.extend(edges[module])
    assert not closure & {"source", "session", "app", "cli"}
    for module in closure:
        text = (PACKAGE / f"{module}.py").read_text()
        assert "import etcd3" not in text and "import grpc" not in text, module


def test_no_class_too_long_to_read_in_one_sitting() -> None:
    long = [
        f"{path.stem}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for path in PACKAGE.glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > CLASS_LINES_MAX
    ]
    assert long == []


def test_the_readme_layout_table_is_the_layer_order() -> None:
    """README's table says each module imports only those before it: so its order is
    LAYERS' order, every module in it."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("| module | concern |") :].split("\n\n", 1)[0]
    listed = re.findall(r"^\| `(\w+)\.py` \|", table, re.M)
    assert listed == [name for name in LAYERS if name not in ("__init__", "__main__")]
