"""The console attached to `mfconsole serve` over data_dir/control.sock: the operator
acts, closes the console, and routing never stopped."""

from __future__ import annotations

import asyncio
import stat
import subprocess

import pytest

import dicomgen
from harness import holds, poll
from peers import require_tool
from support import cell, rows, wait_for

from mfconsole.client import AttachedClient, ClientError, open_client
from mfconsole.config import load
from mfconsole.console.app import ConsoleApp
from mfconsole.console.commands import ConsoleCommands


def storescu(port: int, files) -> int:
    return subprocess.run([require_tool("storescu"), "-aet", "MODALITY", "-aec", "MF_SCP", "127.0.0.1",
                           str(port), *map(str, files)], capture_output=True, timeout=120).returncode


def test_attach_act_close_and_routing_never_stopped(serve_factory, storescp_factory, tmp_path):
    scp = storescp_factory()
    serve = serve_factory(destinations=[{"name": "pacs", "kind": "dimse", "host": "127.0.0.1",
                                         "port": scp.port, "ae_title": "PACS", "retry_initial_s": 0.2,
                                         "retry_max_s": 0.5}])
    client = open_client(load(serve.config))     # waits for the socket of a starting engine
    sock = serve.data_dir / "control.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert isinstance(client, AttachedClient) and not client.hosts_engine
    pid = serve.proc.pid
    app = ConsoleApp(client, refresh_s=0.25)
    sent = [0]

    async def scenario(pilot):
        await wait_for(pilot, lambda: str(pid) in str(app.screen.query_one("#summary").render()),
                       what="the serving engine's pid")
        # Objects arrive while the console watches.
        assert await asyncio.to_thread(storescu, serve.port, dicomgen.write_corpus(tmp_path / "a", 5)) == 0
        sent[0] += 5
        await wait_for(pilot, lambda: cell(app, "destinations", "pacs", "sent").endswith("/ 5"),
                       what="5 delivered")
        # Pause the destination from the console.
        await pilot.press("3")
        await wait_for(pilot, lambda: rows(app, "destinations") == ["pacs"], what="destinations")
        await pilot.press("s")
        await wait_for(pilot, lambda: app.screen.query("#yes"), what="the pause confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: cell(app, "destinations", "pacs", "state") == "⏸ PAUSED",
                       what="paused")
        await pilot.press("q")      # attached: quits without asking, routing goes on

    async def main():
        async with app.run_test(size=(120, 40)) as pilot:
            await scenario(pilot)
    asyncio.run(main())
    client.close()
    assert serve.proc.poll() is None, "closing the console stopped the engine"
    # Routing never stopped: objects are still received and queued for the paused PACS.
    assert storescu(serve.port, dicomgen.write_corpus(tmp_path / "b", 3)) == 0
    with serve.db() as db:
        poll(lambda: db.object_count() == 8, timeout=10)
        assert db.destination_state("pacs")["paused"] == 1
        assert len(db.rows("deliveries", state="pending")) == 3
        audit = [r["event"] for r in db.rows("audit")]
    assert "destination_paused" in audit and "engine_stopped" not in audit
    assert holds(lambda: len(scp.received_files()) == 5, 0.5), scp.received_files()


def test_a_read_only_console_cannot_change_anything(serve_factory):
    serve = serve_factory()
    client = open_client(load(serve.config), read_only=True)
    # The engine refuses, whatever the console shows.
    with pytest.raises(ClientError, match="read-only"):
        client.pause("pacs")
    app = ConsoleApp(client, refresh_s=0.25)

    async def main():
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("3")
            await wait_for(pilot, lambda: rows(app, "destinations") == ["pacs"], what="destinations")
            footer = {b.binding.action for b in app.screen.active_bindings.values() if b.enabled}
            assert "echo" in footer and "pause_resume" not in footer
            await pilot.press("s")
            await pilot.pause(0.3)
            assert not app.screen.query("#yes")
            await pilot.press("4")
            await pilot.pause(0.3)
            enabled = {b.binding.action for b in app.screen.active_bindings.values() if b.enabled}
            assert not enabled & {"replay", "replay_group", "replay_to", "discard"}
            assert "READ-ONLY" in str(app.screen.query_one("StatusBar").render())
            commands = [text for text, _, _ in ConsoleCommands(app.screen).commands()]
            assert "echo pacs" in commands and "go to dead letters" in commands
            assert not [c for c in commands if c.startswith(("pause pacs", "resume", "reload"))]
    asyncio.run(main())
    with serve.db() as db:
        assert len(db.rows("destination_state", paused=1)) == 0
