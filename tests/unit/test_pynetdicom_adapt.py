"""pynetdicom is adapted in one module, for one pinned version.

* mfconsole/dimse/pynetdicom_adapt.py refuses any pynetdicom but the one pinned in
  pyproject.toml, at import, with a message naming both versions and what to do;
* no other mfconsole module uses a pynetdicom internal: read from the source
  (``ast``; nothing is imported), an internal is a private name imported from
  pynetdicom, a private attribute name that pynetdicom's own source defines or uses
  (read from the installed package), a service provider of an association
  (``.dul``, ``.dimse``, ``.acse``), a pynetdicom class subclassed, or an attribute
  assigned on something imported from pynetdicom (a monkeypatch).

That the adaptations are applied per AE, not globally, is
tests/integration/test_pynetdicom_per_ae.py.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pynetdicom
import pytest

from mfconsole.dimse import pynetdicom_adapt as adapt

ROOT = Path(__file__).resolve().parents[2]
ADAPT = ROOT / "mfconsole" / "dimse" / "pynetdicom_adapt.py"
# The service providers of an Association: pynetdicom's machinery under its public
# methods and events.
PROVIDERS = {"dul", "dimse", "acse"}


# -- the version ----------------------------------------------------------------------

def test_the_installed_version_is_the_pinned_one():
    adapt.check_version()
    assert pynetdicom.__version__ == adapt.PINNED_VERSION


def test_the_pin_in_pyproject_is_the_adapted_version():
    pins = re.findall(r'"pynetdicom([^"]*)"', (ROOT / "pyproject.toml").read_text())
    assert pins == [f"=={adapt.PINNED_VERSION}"]


@pytest.mark.parametrize("other", ["3.0.5", "3.1.0", "2.1.1", "3.0.4.post1", "4.0.0.dev0"])
def test_another_version_is_refused_naming_both(monkeypatch, other):
    monkeypatch.setattr(pynetdicom, "__version__", other)
    with pytest.raises(adapt.PynetdicomVersionError) as caught:
        adapt.check_version()
    message = str(caught.value)
    assert f"pynetdicom {other} is installed" in message
    assert f"pynetdicom {adapt.PINNED_VERSION} exactly" in message
    assert f"pip install 'pynetdicom=={adapt.PINNED_VERSION}'" in message
    assert "pynetdicom_adapt.py" in message and "pyproject.toml" in message
    assert isinstance(caught.value, ImportError)


def test_importing_mfconsole_with_another_version_fails_at_import():
    # A fresh interpreter: the check runs when the module is first imported.
    code = ("import pynetdicom\npynetdicom.__version__ = '3.0.9'\n"
            "import mfconsole.dimse.listener\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert res.returncode != 0
    assert "PynetdicomVersionError" in res.stderr
    assert "pynetdicom 3.0.9 is installed" in res.stderr, res.stderr


# -- no internals outside the adapt module --------------------------------------------

def pynetdicom_private_names() -> set[str]:
    """Every private (single underscore, not dunder) name pynetdicom's source defines or
    uses as an attribute: its private methods, attributes and module globals."""
    names: set[str] = set()
    for path in Path(pynetdicom.__file__).parent.rglob("*.py"):
        if "tests" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Name):
                names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def root_name(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def internals_used(source: str, private: set[str]) -> list[str]:
    """The uses of pynetdicom internals in ``source``, as "line N: what"."""
    tree = ast.parse(source)
    found: list[str] = []
    from_pynetdicom: set[str] = set()   # local names bound to pynetdicom objects

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pynetdicom":
            parts = node.module.split(".")
            for alias in node.names:
                if any(p.startswith("_") for p in parts + [alias.name]):
                    found.append(f"line {node.lineno}: imports {node.module}.{alias.name}")
                from_pynetdicom.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pynetdicom":
                    if any(p.startswith("_") for p in parts):
                        found.append(f"line {node.lineno}: imports {alias.name}")
                    from_pynetdicom.add(alias.asname or parts[0])

    def is_self(node: ast.expr) -> bool:
        return isinstance(node, ast.Name) and node.id in ("self", "cls")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr in private and not is_self(node.value):
                found.append(f"line {node.lineno}: .{node.attr}")
            elif node.attr in PROVIDERS and root_name(node.value) != "mfconsole":
                found.append(f"line {node.lineno}: .{node.attr} (a service provider)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and node.args[1].value in private | PROVIDERS and not is_self(node.args[0]):
            found.append(f"line {node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                if root_name(base) in from_pynetdicom:
                    found.append(f"line {node.lineno}: class {node.name} subclasses "
                                 f"{ast.unparse(base)}")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and root_name(target) in from_pynetdicom:
                    found.append(f"line {node.lineno}: assigns {ast.unparse(target)}")
    return sorted(set(found), key=lambda s: int(s.split(":")[0].split()[1]))


@pytest.fixture(scope="module")
def private() -> set[str]:
    names = pynetdicom_private_names()
    # A guard for the reader: these are the internals mfconsole adapts.
    assert {"_reactor_checkpoint", "_is_paused", "_negotiate_as_acceptor", "_create_socket",
            "_config", "_servers", "_serve_request", "_common_ext", "_create_association"} <= names
    return names


def test_no_module_but_the_adapt_module_uses_pynetdicom_internals(private):
    wrong = []
    for path in sorted((ROOT / "mfconsole").rglob("*.py")):
        if path == ADAPT:
            continue
        for use in internals_used(path.read_text(encoding="utf-8"), private):
            wrong.append(f"{path.relative_to(ROOT)} {use}")
    assert not wrong, ("pynetdicom internals outside mfconsole/dimse/pynetdicom_adapt.py "
                       "(move them there, with why):\n  " + "\n  ".join(wrong))


def test_the_adapt_module_is_where_they_are(private):
    # The reader sees the adaptations where they are (else the test above proves nothing).
    uses = "\n".join(internals_used(ADAPT.read_text(encoding="utf-8"), private))
    for what in ("_reactor_checkpoint", "_is_paused", "_servers", "_config", "_serve_request",
                 "_common_ext", ".dul", ".dimse", ".acse", "subclasses acse.ACSE",
                 "subclasses AE", "subclasses ThreadedAssociationServer"):
        assert what in uses, what


def test_the_reader_finds_what_it_must(private):
    source = '''
import pynetdicom._config
from pynetdicom import _config, acse, AE
from pynetdicom.transport import AssociationSocket as Sock
from pynetdicom import evt
from mfconsole import dimse
import mfconsole.dimse.sender

acse.ACSE._negotiate_as_acceptor = print
Sock.recv = print
_config.LOG_HANDLER_LEVEL = "none"

class Mine(AE):
    pass

class Ours:
    def __init__(self):
        self._tls = None            # our own private: fine
        self._servers = []          # on self: fine

    def use(self, assoc, ae):
        assoc._reactor_checkpoint.set()
        ae._servers.append(1)
        getattr(assoc, "_is_paused")
        assoc.dul.socket
        assoc.dimse.get_msg()
        x = mfconsole.dimse.sender  # our package, not a provider
        return self._tls, other._tls_private_of_ours
'''
    uses = internals_used(source, private | {"_tls_private_of_ours_is_not_pynetdicoms"})
    text = "\n".join(uses)
    for expected in ("line 2: imports pynetdicom._config", "line 3: imports pynetdicom._config",
                     "line 9: assigns acse.ACSE._negotiate_as_acceptor", "line 10: assigns Sock.recv",
                     "line 11: assigns _config.LOG_HANDLER_LEVEL", "line 13: class Mine subclasses AE",
                     "line 22: ._reactor_checkpoint", "line 23: ._servers",
                     "line 24: getattr(..., '_is_paused')", "line 25: .dul",
                     "line 26: .dimse"):
        assert expected in text, (expected, uses)
    assert not any(u.startswith(("line 19:", "line 20:", "line 27:", "line 28:")) for u in uses), uses
