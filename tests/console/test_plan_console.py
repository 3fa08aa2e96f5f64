"""The routing plan on the configuration screen (6, p) over a real in-process engine:
objects ingested through the engine, config.toml changed on disk, the plan shown in the
result pane — also on a read-only console — and nothing sent, reloaded or created."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import dicomgen
from harness import CANARY_ID, CANARY_NAME, poll, write_config
from peers import require_tool
from support import screen_text, wait_for

from mfconsole.client import InProcessClient
from mfconsole.console.app import ConsoleApp

DESTS = [{"name": n, "kind": "dimse", "host": "127.0.0.1", "port": p, "ae_title": n.upper()}
         for n, p in (("pacs", 11113), ("archive", 11114))]
OLD = [{"name": "ct", "when": {"calling_aet": ["CT1"]}, "to": ["pacs"]}]
NEW = [{"name": "ct", "when": {"calling_aet": ["CT1", "MR1"]}, "to": ["pacs"]}]


def run(app: ConsoleApp, scenario, size=(120, 40)) -> None:
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await scenario(pilot)
    asyncio.run(main())


def send(port: int, aet: str, files: list[Path]) -> None:
    res = subprocess.run([require_tool("storescu"), "-aet", aet, "-aec", "MF_SCP", "127.0.0.1", str(port),
                          *map(str, files)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def engine_with_objects(engine_factory, tmp_path):
    engine = engine_factory(destinations=DESTS, routes=[], rules=OLD, routing={"fallback": ["archive"]})
    for name in ("pacs", "archive"):
        engine.control.service.call("pause", {"destination": name})
    port = engine.listeners[0].address[1]
    send(port, "CT1", dicomgen.write_corpus(tmp_path / "ct", 3))
    send(port, "MR1", dicomgen.write_corpus(tmp_path / "mr", 5))
    poll(lambda: len(engine.store.reader().rows("objects")) == 8, message="8 objects stored")
    write_config(engine.config.path.parent, port=port, destinations=DESTS, routes=[], rules=NEW,
                 routing={"fallback": ["archive"]})
    return engine


def plan_scenario(app: ConsoleApp):
    async def scenario(pilot):
        await pilot.press("6")
        await pilot.press("p")
        result = app.screen.query_one("#result")
        await wait_for(pilot, lambda: "would change what these objects get" in str(result.render()),
                       timeout=30, what="the plan")
        text = str(result.render())
        assert "pacs" in text and "+5 / -0" in text and "+0 / -5" in text, screen_text(app)
        assert CANARY_NAME not in text and CANARY_ID not in text
        app.plan_text = text
    return scenario


def test_p_shows_the_plan_of_config_toml_and_changes_nothing(engine_factory, tmp_path):
    engine = engine_with_objects(engine_factory, tmp_path)
    deliveries = json.dumps(engine.store.reader().rows("deliveries"))
    running = engine.config
    app = ConsoleApp(InProcessClient(engine), refresh_s=0.25)
    run(app, plan_scenario(app))
    assert "to apply: reload" in app.plan_text
    assert engine.config is running and json.dumps(engine.store.reader().rows("deliveries")) == deliveries
    assert poll(lambda: [a for a in engine.store.reader().rows("audit") if a["event"] == "routing_plan"],
                message="the routing_plan audit row")


def test_a_read_only_console_may_make_a_plan(engine_factory, tmp_path):
    engine = engine_with_objects(engine_factory, tmp_path)
    app = ConsoleApp(InProcessClient(engine, read_only=True), refresh_s=0.25)
    run(app, plan_scenario(app))
    assert "to apply" not in app.plan_text
    assert engine.config.rules[0].name == "ct" and len(engine.config.rules[0].when[0].values) == 1
