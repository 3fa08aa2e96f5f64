"""The engine side of the console (no peers): config edits that keep config.toml's
comments, the control socket and its refusals, and the keyed table's updates."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest

from mfconsole.config import load
from mfconsole.engine import config_edit
from mfconsole.control import ControlError, request

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def shipped(tmp_path) -> Path:
    """The shipped, commented config.toml in a temp folder."""
    path = tmp_path / "config.toml"
    shutil.copy(REPO / "config.toml", path)
    path.chmod(0o640)
    return path


def test_an_edit_changes_its_lines_only_and_keeps_the_mode(shipped):
    before = shipped.read_text().splitlines()
    problems = config_edit.apply(load(shipped), {"listeners[0].ae_title": "NEW_SCP",
                                                 "egress.allowed_tcp": "127.0.0.1:11113, 127.0.0.1:2575, 10.0.0.5:104",
                                                 "destinations[0].port": "11113"})
    assert problems == []
    after = shipped.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after)
    assert changed == [('allowed_tcp  = ["127.0.0.1:11113", "127.0.0.1:2575"]',
                        'allowed_tcp  = ["127.0.0.1:11113", "127.0.0.1:2575", "10.0.0.5:104"]'),
                       ('ae_title = "MF_SCP"', 'ae_title = "NEW_SCP"')]
    assert stat.S_IMODE(shipped.stat().st_mode) == 0o640
    assert load(shipped).listeners[0].ae_title == "NEW_SCP"
    assert not [p for p in shipped.parent.iterdir() if p.name.endswith(".edit")]


def test_an_invalid_edit_writes_nothing_and_names_every_problem(shipped):
    before = shipped.read_bytes()
    problems = config_edit.apply(load(shipped), {"listeners[0].ae_title": "X" * 17,
                                                 "destinations[0].port": "abc",
                                                 "egress.allowed_tcp": ["127.0.0.1:11113"],
                                                 "engine.data_dir": "/elsewhere"})
    keys = [key for key, _ in problems]
    assert keys == ["engine.data_dir"]          # not editable: refused before any check
    problems = config_edit.apply(load(shipped), {"listeners[0].ae_title": "X" * 17,
                                                 "destinations[0].port": "abc",
                                                 "egress.allowed_tcp": ["127.0.0.1:11113"]})
    keys = {key for key, _ in problems}
    # The ehr destination's port is no longer allowed: the same check `mfconsole check` runs.
    assert {"listeners[0].ae_title", "destinations[0].port"} <= keys
    assert any("egress" in why or key.startswith("destinations[2]") for key, why in problems)
    assert shipped.read_bytes() == before
    assert not [p for p in shipped.parent.iterdir() if p.name.endswith(".edit")]


def test_the_control_socket(engine_factory):
    engine = engine_factory()
    path = engine.data_dir / "control.sock"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert request(path, "snapshot")["engine"]["pid"] == os.getpid()
    with pytest.raises(ControlError, match="unknown operation"):
        request(path, "format_disk")
    read_only = engine.data_dir / "control-ro.sock"
    assert stat.S_IMODE(read_only.stat().st_mode) == 0o600
    assert request(read_only, "snapshot")["engine"]["pid"] == os.getpid()
    with pytest.raises(ControlError, match="read-only"):
        request(read_only, "reload")
    with pytest.raises(ControlError, match="neither a DIMSE destination"):
        request(path, "echo", {"destination": "nowhere"})
    with socket.socket(socket.AF_UNIX) as sock:       # garbage gets an answer, not a crash
        sock.connect(str(path))
        sock.sendall(b"{not json\n")
        assert json.loads(sock.makefile().readline()) == {"ok": False, "error": "malformed request"}
    assert request(path, "snapshot")["listeners"][0]["state"] == "listening"
    engine.stop()
    assert not path.exists() and not read_only.exists()


def test_session_counters_follow_the_audit(engine_factory):
    engine = engine_factory()
    service = engine.control.service
    for _ in range(3):
        engine.audit("stored", listener="modalities")
    engine.audit("delivered", destination="pacs")
    engine.audit("dead_lettered", destination="pacs")
    engine.store.call(lambda tx: None)        # the audit rows are committed
    snap = service.call("snapshot")
    listener = snap["listeners"][0]
    assert listener["session"]["received"] == 3 and sum(listener["history"]) <= 3
    pacs = snap["destinations"][0]
    assert pacs["session"]["sent"] == 1 and pacs["session"]["errored"] == 1
    assert service.call("snapshot")["listeners"][0]["session"]["received"] == 3   # not counted twice


def test_the_keyed_table_rewrites_only_changed_cells_and_keeps_the_cursor():
    from textual.app import App

    from mfconsole.console.widgets import KeyedTable

    class Host(App):
        def compose(self):
            yield KeyedTable([("name", "name"), ("n", "n")], id="t")

    async def main():
        app = Host()
        async with app.run_test() as pilot:
            table = app.query_one(KeyedTable)
            table.sync([("a", ("a", "1")), ("b", ("b", "2")), ("c", ("c", "3"))])
            table.move_cursor(row=2)
            updates = []
            original = table.update_cell
            table.update_cell = lambda *a, **k: (updates.append(a), original(*a, **k))
            table.sync([("a", ("a", "1")), ("b", ("b", "20")), ("c", ("c", "3"))])
            assert [(row, column, value) for row, column, value in updates] == [("b", "n", "20")]
            table.sync([("b", ("b", "20")), ("c", ("c", "3")), ("d", ("d", "4"))])   # a gone, d new
            await pilot.pause()
            assert table.cursor_key == "c"
            table.sync([("d", ("d", "4")), ("c", ("c", "3"))])                      # reordered
            await pilot.pause()
            assert table.keys == ["d", "c"] and table.cursor_key == "c"
    asyncio.run(main())
