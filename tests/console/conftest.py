"""Console tests: Textual pilots against a real engine (in-process or attached to
`mfconsole serve`), layout snapshots against a scripted client, and a real terminal
(tmux). The DCMTK peer fixtures are the integration suite's."""

from __future__ import annotations

import pytest

from integration.conftest import dcmtk, storescp_factory  # noqa: F401  (fixtures)


@pytest.fixture
def frozen_clock(monkeypatch):
    """Times render in UTC whatever the machine's zone (snapshots)."""
    import time

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()
