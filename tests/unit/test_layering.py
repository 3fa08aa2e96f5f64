"""The layers of mfconsole, read from the source (``ast``; nothing is imported):

* the protocol packages (dimse, ul, stow, fhir, mllp, hl7, and httpdest below stow
  and fhir) never import the engine, at any level and by no way round through
  another mfconsole module: the engine drives them through mfconsole/contract.py;
* contract.py stands below both sides: of mfconsole it imports only hardening and tls
  (lazily, for the text of raised_at and tls_failure), and what it reaches that way
  reaches neither the engine nor a protocol package;
* no import cycle among mfconsole modules, nor among its parts (a package such as
  mfconsole/engine or mfconsole/hl7 taken whole, or a top-level module): two packages
  whose modules import each other are one layer in two folders;
* Textual is imported by mfconsole/console only.

Cycles are judged on imports that run when a module is loaded (module and class
level). An import inside a function runs only when it is called, after every module
has loaded: that is how a module that is started by another calls back into it (the
engine's control server asks the engine for its handlers, the console's command
palette asks the app for its screens, the control server runs ops), and it is not a
cycle at startup. ``if TYPE_CHECKING:`` imports never run and are counted like
function-level ones. Function-level imports still count for every other rule.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOCOLS = ("mfconsole.dimse", "mfconsole.ul", "mfconsole.stow", "mfconsole.mllp", "mfconsole.hl7",
             "mfconsole.fhir", "mfconsole.auditlog", "mfconsole.httpdest", "mfconsole.alerting")
ENGINE = "mfconsole.engine"
CONTRACT = "mfconsole.contract"
CONTRACT_MAY_IMPORT = {"mfconsole.hardening", "mfconsole.tls"}
CONSOLE = "mfconsole.console"
REPOSITORY = "mfconsole.repository"
ABOVE_ENGINE = ("mfconsole.ops", "mfconsole.control", "mfconsole.cli", "mfconsole.client", CONSOLE)


@dataclass(frozen=True)
class Import:
    source: str      # the importing module
    target: str      # the imported module, as far as it is one of the tree (else the name)
    line: int
    at_load: bool    # runs when ``source`` is loaded (not inside a function, not TYPE_CHECKING)


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def module_names(root: Path, package: str = "mfconsole") -> dict[str, Path]:
    """Every module of the package under ``root``: dotted name -> file."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, at_load: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            at_load = False
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, at_load)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(name, alias.name, node.lineno, at_load))
        elif isinstance(node, ast.ImportFrom):
            if node.level:    # relative: from the package, up level - 1
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                # "from pkg import sub" imports the module pkg.sub when there is one
                candidate = f"{origin}.{alias.name}"
                found.append(Import(name, candidate if candidate in modules else origin,
                                    node.lineno, at_load))
        for child in ast.iter_child_nodes(node):
            visit(child, at_load)

    visit(tree, True)
    return found


def import_graph(root: Path, package: str = "mfconsole") -> dict[str, list[Import]]:
    modules = module_names(root, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def loaded_with(imp: Import, modules: dict[str, list[Import]]) -> list[str]:
    """The modules of the tree that ``imp`` loads: the target and the packages above it
    (those above the importer are loaded already)."""
    parts = imp.target.split(".")
    out = []
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name in modules and not within(imp.source, name):
            out.append(name)
    return out


def reach(start: str, graph: dict[str, list[Import]]) -> dict[str, list[Import]]:
    """Every module that ``start`` imports, at any level, directly or through others:
    name -> the chain of imports that leads there."""
    paths: dict[str, list[Import]] = {start: []}
    todo = [start]
    while todo:
        here = todo.pop()
        for imp in graph.get(here, []):
            for name in loaded_with(imp, graph) or [imp.target]:
                if name not in paths:
                    paths[name] = paths[here] + [imp]
                    if name in graph:
                        todo.append(name)
    del paths[start]
    return paths


def cycles(graph: dict[str, list[Import]]) -> list[list[Import]]:
    """One cycle of load-time imports per strongly connected group of modules."""
    edges = {name: [(target, imp) for imp in imps if imp.at_load
                    for target in loaded_with(imp, graph)]
             for name, imps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(v: str) -> None:    # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w, _ in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or any(w == v for w, _ in edges[v]):
                groups.append(group)

    for v in sorted(edges):
        if v not in index:
            connect(v)

    found = []
    for group in groups:    # walk inside the group back to where it started
        start = min(group)
        seen: dict[str, list[Import]] = {start: []}
        todo = [start]
        loop = None
        while todo and loop is None:
            here = todo.pop(0)
            for w, imp in edges[here]:
                if w == start:
                    loop = seen[here] + [imp]
                    break
                if w in group and w not in seen:
                    seen[w] = seen[here] + [imp]
                    todo.append(w)
        found.append(loop)
    return found


def part_of(name: str) -> str:
    """mfconsole.engine.outbox -> mfconsole.engine; mfconsole.config stays itself."""
    return ".".join(name.split(".")[:2])


def parts_graph(graph: dict[str, list[Import]]) -> dict[str, list[Import]]:
    """The load-time imports between parts (see part_of), each with a line that makes it."""
    parts: dict[str, list[Import]] = {part_of(name): [] for name in graph}
    for name, imps in graph.items():
        for imp in imps:
            for target in loaded_with(imp, graph) if imp.at_load else []:
                if part_of(target) != part_of(name):
                    parts[part_of(name)].append(Import(name, part_of(target), imp.line, True))
    return parts


def show(chain: list[Import]) -> str:
    return " -> ".join([chain[0].source] + [f"{i.target} (line {i.line})" for i in chain])


@pytest.fixture(scope="module")
def graph() -> dict[str, list[Import]]:
    return import_graph(ROOT)


def test_the_graph_sees_the_tree(graph):
    # A guard for the tests below: they would pass on an empty or unreadable tree.
    assert {CONTRACT, "mfconsole.engine.delivery", "mfconsole.dimse.sender",
            "mfconsole.stow.client", "mfconsole.mllp.sender", "mfconsole.hl7.header"} <= set(graph)
    assert any(i.target == CONTRACT for i in graph["mfconsole.engine.delivery"])
    assert any(i.target == "mfconsole.dimse.listener" for i in graph["mfconsole.engine.engine"])


def test_protocol_packages_never_reach_the_engine(graph):
    wrong = []
    for name in sorted(graph):
        if any(within(name, p) for p in PROTOCOLS):
            for target, chain in reach(name, graph).items():
                if within(target, ENGINE):
                    wrong.append(show(chain))
                    break
    assert not wrong, ("a protocol package imports the engine (it gets Outbound, Outcome "
                       "and Sender from mfconsole/contract.py):\n  " + "\n  ".join(wrong))


def test_the_contract_stands_below_engine_and_protocols(graph):
    direct = {i.target for i in graph[CONTRACT] if within(i.target, "mfconsole")}
    assert direct <= CONTRACT_MAY_IMPORT, f"contract.py imports {sorted(direct - CONTRACT_MAY_IMPORT)}"
    above = (ENGINE, CONSOLE, "mfconsole.handlers") + PROTOCOLS
    wrong = [show(chain) for target, chain in sorted(reach(CONTRACT, graph).items())
             if any(within(target, p) for p in above)]
    assert not wrong, "contract.py reaches the engine or a protocol:\n  " + "\n  ".join(wrong)


def test_the_repository_stands_below_the_engine(graph):
    """mfconsole/repository imports nothing of mfconsole but itself, at any level."""
    wrong = [f"{name} -> {i.target} (line {i.line})" for name, imps in sorted(graph.items())
             if within(name, REPOSITORY) for i in imps
             if within(i.target, "mfconsole") and not within(i.target, REPOSITORY)]
    assert not wrong, "the repository imports the rest of mfconsole:\n  " + "\n  ".join(wrong)


def test_protocol_packages_never_reach_the_repository(graph):
    wrong = [show(chain) for name in sorted(graph) if any(within(name, p) for p in PROTOCOLS)
             for target, chain in sorted(reach(name, graph).items()) if within(target, REPOSITORY)]
    assert not wrong, "a protocol package reaches the repository:\n  " + "\n  ".join(wrong)


def test_the_engine_never_reaches_the_layers_above_it(graph):
    """The operations layer (ops, control), the CLI, the client and the console drive
    the engine; the engine is handed what it needs of them (``control=serve_control``)
    and imports none of them, not even inside a function."""
    wrong = [show(chain) for name in sorted(graph) if within(name, ENGINE)
             for target, chain in sorted(reach(name, graph).items())
             if any(within(target, above) for above in ABOVE_ENGINE)]
    assert not wrong, "the engine imports a layer above it:\n  " + "\n  ".join(wrong)


def test_no_import_cycle(graph):
    found = cycles(graph)
    assert not found, "import cycles (imports run at load time):\n  " + "\n  ".join(
        show(c) for c in found)


def test_no_import_cycle_between_packages(graph):
    found = cycles(parts_graph(graph))
    assert not found, "packages that import each other (imports run at load time):\n  " + \
        "\n  ".join(" -> ".join(f"{i.source} imports {i.target} (line {i.line})" for i in c)
                    for c in found)


def test_textual_only_in_the_console(graph):
    wrong = [f"{i.source} line {i.line}" for name, imps in sorted(graph.items())
             if not within(name, CONSOLE) for i in imps if within(i.target, "textual")]
    assert not wrong, "Textual imported outside mfconsole/console: " + ", ".join(wrong)


# -- the reader itself, on a tree made for it ----------------------------------------

def test_the_reader_finds_what_it_must(tmp_path):
    files = {
        "mfconsole/__init__.py": "",
        "mfconsole/engine/__init__.py": "",
        "mfconsole/engine/core.py": "from mfconsole.dimse import a\n",
        "mfconsole/dimse/__init__.py": "",
        "mfconsole/dimse/a.py": "def f():\n    from mfconsole import engine\n",
        "mfconsole/dimse/b.py": "from . import c\n",
        "mfconsole/dimse/c.py": "import mfconsole.dimse.b\n",
        "mfconsole/dimse/d.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                 "    from mfconsole.engine.core import x\n"),
        "mfconsole/ui.py": "class A:\n    import textual.app\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    g = import_graph(tmp_path)
    assert [i.target for i in g["mfconsole.dimse.b"]] == ["mfconsole.dimse.c"]
    assert "mfconsole.engine" in reach("mfconsole.dimse.a", g)          # lazy counts
    assert "mfconsole.engine.core" in reach("mfconsole.dimse.d", g)     # so does TYPE_CHECKING
    assert [{i.source for i in c} for c in cycles(g)] == [{"mfconsole.dimse.b", "mfconsole.dimse.c"}]
    assert cycles(parts_graph(g)) == []    # dimse reaches the engine only lazily
    assert [i.at_load for i in g["mfconsole.ui"]] == [True]


def test_pynetdicom_is_only_a_dictionary():
    """mfconsole speaks DICOM itself (mfconsole/ul): of pynetdicom it takes the SOP class
    dictionary, nothing private, nothing that associates, nothing to patch."""
    allowed = {("pynetdicom", "AllStoragePresentationContexts"), ("pynetdicom", "sop_class"),
               ("pynetdicom.sop_class", "Verification")}
    used = set()
    for path in sorted((ROOT / "mfconsole").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pynetdicom":
                used |= {(node.module, a.name) for a in node.names}
            elif isinstance(node, ast.Import):
                used |= {(a.name, "") for a in node.names if a.name.split(".")[0] == "pynetdicom"}
    assert used, "the reader found no pynetdicom import at all"
    assert used <= allowed, f"pynetdicom used beyond its dictionary: {sorted(used - allowed)}"
