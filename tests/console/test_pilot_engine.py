"""The console driven by keys (Textual pilot) over a real in-process engine on a temp
config, with DCMTK peers: what the operator sees and what their keys do."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

from pydicom.data import get_testdata_file

import dicomgen
from harness import poll
from peers import StoreSCP, require_tool
from support import cell, rows, screen_text, wait_for

from mfconsole.client import InProcessClient
from mfconsole.console.app import ConsoleApp

REPO = Path(__file__).resolve().parents[2]
FAST = {"retry_initial_s": 0.2, "retry_max_s": 0.5, "down_after": 3, "connect_timeout_s": 2,
        "acse_timeout_s": 5, "dimse_timeout_s": 5}


def pacs(port: int, **extra) -> dict:
    return {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": port, "ae_title": "PACS",
            **FAST, **extra}


def storescu(port: int, files: list[Path], *extra: str, aec: str = "MF_SCP") -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("storescu"), "-aet", "MODALITY", "-aec", aec, *extra,
                           "127.0.0.1", str(port), *map(str, files)], capture_output=True, text=True,
                          timeout=120)


def echoscu(port: int, aec: str) -> int:
    return subprocess.run([require_tool("echoscu"), "-aet", "MODALITY", "-aec", aec, "127.0.0.1",
                           str(port)], capture_output=True, timeout=30).returncode


def run(app: ConsoleApp, scenario, size=(120, 40)) -> None:
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await scenario(pilot)
    asyncio.run(main())


def console(engine, **kwargs) -> ConsoleApp:
    return ConsoleApp(InProcessClient(engine, **kwargs), refresh_s=0.25)


def test_dashboard_and_associations_count_what_storescu_sent(engine_factory, storescp_factory, tmp_path):
    scp = storescp_factory()
    engine = engine_factory(destinations=[pacs(scp.port)])
    port = engine.listeners[0].address[1]
    files = dicomgen.write_corpus(tmp_path / "sr", 12)
    app = console(engine)

    async def scenario(pilot):
        await wait_for(pilot, lambda: rows(app, "destinations") == ["pacs"], what="the dashboard")
        assert cell(app, "listeners", "modalities", "received") == "0"
        result = await asyncio.to_thread(storescu, port, files)
        assert result.returncode == 0, result.stderr
        await wait_for(pilot, lambda: cell(app, "listeners", "modalities", "received") == "12",
                       what="12 received")
        await wait_for(pilot, lambda: cell(app, "destinations", "pacs", "sent") == "12 / 12",
                       what="12 sent this run and in all")
        assert cell(app, "destinations", "pacs", "state") == "✓ up"
        assert cell(app, "destinations", "pacs", "queue") == "0"
        assert "dead letters 0" in str(app.screen.query_one("#summary").render())
        await pilot.press("2")

        def inbound() -> list[str]:
            return [k for k in rows(app, "associations") if cell(app, "associations", k, "dir") == "← in"]

        def released() -> str | None:   # after its last C-STORE: not implied by the deliveries
            keys = inbound()
            return keys[0] if keys and cell(app, "associations", keys[0], "status") == "✓ released" else None
        key = await wait_for(pilot, released, what="the association released")
        assert cell(app, "associations", key, "calling") == "MODALITY"
        assert cell(app, "associations", key, "objects") == "12"
        # ... and the engine's own association to the PACS, with what it sent.
        out = [k for k in rows(app, "associations") if cell(app, "associations", k, "dir") == "→ out"]
        assert out and cell(app, "associations", out[0], "calling") == "PACS"
        assert sum(int(cell(app, "associations", k, "objects")) for k in out) == 12

    run(app, scenario)


def test_a_stopped_storescp_shows_its_destination_retrying_then_down(engine_factory, storescp_factory,
                                                                     tmp_path):
    scp = storescp_factory()
    engine = engine_factory(destinations=[pacs(scp.port, down_after=4, retry_initial_s=0.4,
                                               retry_max_s=0.8)])
    port = engine.listeners[0].address[1]
    scp.stop()
    app = console(engine)
    seen: list[str] = []

    async def scenario(pilot):
        await pilot.press("3")
        await wait_for(pilot, lambda: rows(app, "destinations") == ["pacs"], what="destinations")
        assert (await asyncio.to_thread(storescu, port, dicomgen.write_corpus(tmp_path / "a", 3))).returncode == 0

        def state() -> str:
            word = cell(app, "destinations", "pacs", "state")
            if not seen or seen[-1] != word:
                seen.append(word)
            return word
        await wait_for(pilot, lambda: state() == "✗ DOWN", timeout=20, what="pacs down")
        assert "↻ retrying" in seen and seen.index("↻ retrying") < seen.index("✗ DOWN"), seen
        # (a probe has one in flight now and then: waited for, not read off the first DOWN)
        await wait_for(pilot, lambda: state() == "✗ DOWN"
                       and cell(app, "destinations", "pacs", "pending") == "3", what="3 pending")
        assert cell(app, "destinations", "pacs", "next").startswith(("in ", "now"))
        # The fact stays on screen, not only in a toast: the status bar says it too.
        assert "1 DOWN" in str(app.screen.query_one("StatusBar").render())

    run(app, scenario)


def test_c_echo_from_the_destinations_screen(engine_factory, storescp_factory):
    scp = storescp_factory()
    engine = engine_factory(destinations=[pacs(scp.port)])
    app = console(engine)

    async def scenario(pilot):
        await pilot.press("3")
        await wait_for(pilot, lambda: rows(app, "destinations") == ["pacs"], what="destinations")
        await pilot.press("e")
        ok = await wait_for(pilot, lambda: cell(app, "destinations", "pacs", "check").startswith("✓"),
                            what="echo ✓")
        assert "ms" in cell(app, "destinations", "pacs", "check")
        await asyncio.to_thread(scp.stop)
        await pilot.press("e")
        await wait_for(pilot, lambda: cell(app, "destinations", "pacs", "check").startswith("✗"),
                       what="echo ✗")
        assert "cannot connect" in cell(app, "destinations", "pacs", "check")
        return ok

    run(app, scenario)


def test_a_dead_letter_replayed_from_the_console_is_delivered_once_the_peer_is_back(
        engine_factory, tmp_path):
    # storescp taking only implicit VR: an RLE object has no presentation context there
    # (a permanent, message-scope failure: a dead letter).
    out = tmp_path / "pacs" / "received"
    strict = StoreSCP(out, extra_args=["+xi"]).start()
    engine = engine_factory(destinations=[pacs(strict.port)])
    port = engine.listeners[0].address[1]
    rle = Path(get_testdata_file("MR_small_RLE.dcm"))
    app = console(engine)

    async def scenario(pilot):
        assert (await asyncio.to_thread(storescu, port, [rle], "-xr")).returncode == 0   # propose RLE
        await pilot.press("4")
        letter = await wait_for(pilot, lambda: rows(app, "letters"), timeout=20, what="a dead letter")
        assert "presentation context" in cell(app, "letters", letter[0], "reason") + \
            cell(app, "letters", letter[0], "status")
        assert "1" in cell(app, "groups", "*", "count")
        # Its detail: routing-safe fields; the patient only after an explicit, audited reveal.
        await pilot.press("enter")
        await wait_for(pilot, lambda: "outcome history" in screen_text(app), what="the detail")
        assert "CompressedSamples" not in screen_text(app)
        await pilot.press("v")
        await wait_for(pilot, lambda: app.screen.query("#yes"), what="the reveal confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: "CompressedSamples^MR1" in screen_text(app),
                       what="the revealed patient name")
        # (the audit row is queued, committed with the store's next group: polled for)
        reveal = poll(lambda: engine.store.reader().rows("audit", event="phi_revealed"), timeout=10,
                      message="the phi_revealed audit row")[0]["detail"]
        assert "CompressedSamples" not in reveal and "console" in reveal
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen.query("#letters"), what="back to the list")
        # The PACS comes back, taking every syntax.
        await asyncio.to_thread(strict.stop)
        back = StoreSCP(out, port=strict.port).start()
        try:
            await pilot.press("r")
            await wait_for(pilot, lambda: "Replay" in str(app.screen.query_one("#yes").label)
                           if app.screen.query("#yes") else False, what="the confirmation")
            await pilot.press("y")
            await wait_for(pilot, lambda: not rows(app, "letters"), timeout=20, what="the list emptied")
            await asyncio.to_thread(back.wait_for_files, 1, 20)
            poll(lambda: engine.store.reader().rows("deliveries")[0]["state"] == "delivered", timeout=10)
            events = [r["event"] for r in engine.store.reader().rows("audit")]
            assert "replayed" in events and events.index("replayed") < len(events) - 1
        finally:
            back.stop()

    run(app, scenario)


CONFIG_COMMENT = "# The modality-facing listener: called AE title and who may call.\n"


def test_a_configuration_edit_lands_in_config_toml_with_comments_and_the_engine_uses_it(engine_factory):
    engine = engine_factory()
    path = engine.config.path
    text = path.read_text().replace("[[listeners]]\n", "[[listeners]]\n" + CONFIG_COMMENT)
    text = text.replace('ae_title = "MF_SCP"', 'ae_title = "MF_SCP"   # what modalities call us')
    path.write_text("# mfconsole test configuration\n" + text)
    port = engine.listeners[0].address[1]
    app = console(engine)

    async def edit(pilot, key: str, value: str) -> None:
        table = app.screen.query_one("#fields")
        table.move_cursor(row=rows(app, "fields").index(key))
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.screen.query("#answer"), what="the edit prompt")
        app.screen.query_one("#answer").value = value
        await pilot.press("enter")

    async def scenario(pilot):
        await pilot.press("6")
        await wait_for(pilot, lambda: "listeners[0].ae_title" in rows(app, "fields"), what="fields")
        # An invalid edit: refused with its key and why; the file is untouched.
        before = path.read_bytes()
        await edit(pilot, "listeners[0].ae_title", "MUCH_TOO_LONG_AE_TITLE")
        await pilot.press("w")
        await wait_for(pilot, lambda: app.screen.query("#yes"), what="the save confirmation")
        await pilot.press("y")
        result = app.screen.query_one("#result")
        await wait_for(pilot, lambda: "REFUSED" in str(result.render()), what="the refusal")
        assert "listener modalities · AE title" in str(result.render()) and "16" in str(result.render())
        assert path.read_bytes() == before
        # A valid one.
        await edit(pilot, "listeners[0].ae_title", "NEW_SCP")
        await pilot.press("w")
        await wait_for(pilot, lambda: app.screen.query("#yes"), what="the save confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: "saved and reloaded" in str(result.render()), what="the save")
        await wait_for(pilot, lambda: cell(app, "fields", "listeners[0].ae_title", "value") == "NEW_SCP",
                       what="the new value")

    run(app, scenario)
    text = path.read_text()
    assert text.startswith("# mfconsole test configuration\n")
    assert CONFIG_COMMENT in text
    assert 'ae_title = "NEW_SCP"   # what modalities call us' in text
    assert engine.config.listener("modalities").ae_title == "NEW_SCP"
    assert echoscu(port, "NEW_SCP") == 0
    assert echoscu(port, "MF_SCP") != 0


BROKEN = "\ndef (:\n"


def test_a_broken_handler_reload_shows_its_error_and_the_old_version_stays(engine_factory, tmp_path):
    folder = tmp_path / "engine"
    (folder / "handlers").mkdir(parents=True)
    handler = folder / "handlers" / "sr_to_oru.py"
    shutil.copy(REPO / "handlers" / "sr_to_oru.py", handler)
    engine = engine_factory(routes=[{"from": "modalities", "to": ["pacs"], "handler": "sr_to_oru"}])
    running = engine.handlers.get("sr_to_oru").version
    app = console(engine)

    async def scenario(pilot):
        await pilot.press("7")
        await wait_for(pilot, lambda: cell(app, "handlers", "sr_to_oru", "state") == "✓ active",
                       what="the handler")
        handler.write_text(handler.read_text().replace(f'VERSION = "{running}"', 'VERSION = "9.9.9"')
                           + BROKEN)
        await pilot.press("r")
        await wait_for(pilot, lambda: "refused" in cell(app, "handlers", "sr_to_oru", "last"),
                       what="the refusal")
        detail = str(app.screen.query_one("#handler-detail").render())
        assert "syntax error" in detail and "line" in detail
        assert cell(app, "handlers", "sr_to_oru", "version") == running
        assert cell(app, "handlers", "sr_to_oru", "state") == "✗ FILE BROKEN"

    run(app, scenario)
    assert engine.handlers.get("sr_to_oru").version == running
