"""Fixtures running real DICOM peers (DCMTK storescp, Orthanc) on loopback.

``tests/`` is deliberately not a package (no ``tests/__init__.py``, no
``tests/conftest.py``), so the helper module ``tests/peers.py`` is made
importable by putting the ``tests`` directory on ``sys.path`` here.  This
conftest is imported by pytest before any test module below it, so test
modules can simply ``import peers`` too.  (Robust to the rootdir, to the
cwd pytest is started from, and to ``--import-mode``.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent.parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from peers import Orthanc, StoreSCP, require_dicomweb_plugin, require_tool  # noqa: E402

DCMTK_TOOLS = ("storescu", "storescp", "echoscu", "dcmsend")


@pytest.fixture(scope="session")
def dcmtk() -> dict[str, str]:
    """{tool name: absolute path} for the DCMTK tools (skip/fail if missing)."""
    return {name: require_tool(name) for name in DCMTK_TOOLS}


@pytest.fixture
def storescp_factory(tmp_path):
    """Start extra/fault-injecting storescp instances::

        scp = storescp_factory("--refuse", ae_title="BAD")

    All are stopped at teardown (even if the test fails).
    """
    started: list[StoreSCP] = []

    def make(*extra_args: str, ae_title: str = "PACS", name: str | None = None) -> StoreSCP:
        out = tmp_path / (name or f"storescp{len(started)}") / "received"
        scp = StoreSCP(out, ae_title=ae_title, extra_args=extra_args)
        started.append(scp)
        return scp.start()

    yield make
    for scp in started:
        scp.stop()


@pytest.fixture
def storescp(storescp_factory) -> StoreSCP:
    """A running storescp (AE "PACS") writing to ``tmp_path/storescp/received``."""
    return storescp_factory(name="storescp")


# Teardown note: a graceful Orthanc shutdown (SIGTERM) takes ~3.5 s (its HTTP
# and DICOM server threads poll for the stop flag), so fixtures SIGKILL the PID
# at teardown -- the storage is thrown away anyway.  Tests that restart Orthanc
# and expect data to survive use the graceful ``stop()``/``start()``.


def _make_orthanc(workdir: Path, **kwargs) -> Orthanc:
    require_tool("Orthanc")
    require_dicomweb_plugin()
    return Orthanc(workdir, **kwargs)


@pytest.fixture
def orthanc(tmp_path):
    """A fresh Orthanc per test (may be stopped/restarted/killed by the test)."""
    o = _make_orthanc(tmp_path / "orthanc")
    try:
        yield o.start()
    finally:
        o.kill()  # SIGKILL: see note above


@pytest.fixture(scope="module")
def orthanc_module(tmp_path_factory):
    """One Orthanc shared by a module (faster).  Tests must not stop it and
    should not assume it is empty (use unique UIDs, or call ``.clear()``)."""
    o = _make_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield o.start()
    finally:
        o.kill()


# Scripted HTTP servers (tests/stow_server.py, tests/fhir_server.py), for what a real
# archive or FHIR server will not do on demand. Imported when a test asks for one.

def _started(server_class):
    servers = []

    def make(**kwargs):
        servers.append(server_class(**kwargs).start())
        return servers[-1]

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def stow_server():
    """Start STOW-RS servers: ``server = stow_server(tls=..., default=...)``; all are
    stopped at teardown."""
    from stow_server import StowServer

    yield from _started(StowServer)


@pytest.fixture
def fhir_server():
    """Start FHIR servers: ``server = fhir_server(tls=...)``; all are stopped at teardown."""
    from fhir_server import FhirServer

    yield from _started(FhirServer)
