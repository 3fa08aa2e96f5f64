"""The Objects (8) and Audit (9) screens over a real in-process engine: 10 000 objects
page smoothly and sort, only the latest filter's answer is ever shown, an accession
search finds the right objects and is audited, the timeline shows each delivery and
event, and an export holds exactly the filtered rows, mode 0600, no patient data."""

from __future__ import annotations

import asyncio
import csv
import json
import stat
import threading
import time

import dicomgen
from harness import CANARY_ID, CANARY_NAME, store_files
from support import cell, rows, screen_text, wait_for

from mfconsole.client import InProcessClient
from mfconsole.console import format as fmt
from mfconsole.console.app import ConsoleApp
from mfconsole.console.objects import EXPORT_FIELDS, PAGE, Query, export_objects

COUNT = 10_000
KINDS = [("CT", "1.2.840.10008.5.1.4.1.1.2"), ("MR", "1.2.840.10008.5.1.4.1.1.4"),
         ("SR", "1.2.840.10008.5.1.4.1.1.88.11")]
AES = ["CT01", "MR02", "US03", "PX04"]


def seed(tx, count: int) -> None:
    """Objects straight through the repository (no bytes: nothing here opens them),
    delivered to pacs, and to web delivered or (every fifth) dead."""
    now = time.time()
    for i in range(count):
        modality, sop_class = KINDS[i % len(KINDS)]
        object_id = tx.insert_object({
            "sop_instance_uid": f"1.2.826.0.1.3680043.8.498.7.{i}", "version": 1,
            "sop_class_uid": sop_class, "study_uid": f"1.2.826.0.1.3680043.8.498.8.{i // 10}",
            "series_uid": f"1.2.826.0.1.3680043.8.498.9.{i // 5}", "modality": modality,
            "transfer_syntax": "1.2.840.10008.1.2.1", "size": 1000 + (i * 7919) % 100_000,
            "digest": f"{i:064x}", "blob": f"seeded/{i}", "key_id": None, "listener": "modalities",
            "calling_ae": AES[i % len(AES)], "peer": "127.0.0.1:1", "received_at": now - (count - i),
            "superseded": 0}, None)
        pacs, web = tx.add_deliveries(object_id, "modalities", [("pacs", None), ("web", None)], now)
        tx.set_outcome(pacs, state="delivered", attempts=1, retry_at=now, status="0x0000",
                       label="success", reason="delivered", now=now)
        dead = i % 5 == 0
        tx.set_outcome(web, state="dead" if dead else "delivered", attempts=3 if dead else 1,
                       retry_at=now, status="0x0122" if dead else "0x0000",
                       label="permanent" if dead else "success",
                       reason="peer does not support this SOP class" if dead else "delivered", now=now)


def run(app: ConsoleApp, scenario, size=(120, 40)) -> None:
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await scenario(pilot)
    asyncio.run(main())


def count_line(app) -> str:
    return str(app.screen.query_one("#objects-count").render())


def shown(app) -> list[dict]:
    """The rows the table shows, in its order (as the screen loaded them)."""
    by_id = {str(r["id"]): r for r in app.screen.rows}
    return [by_id[key] for key in rows(app, "objects")]


async def type_filter(pilot, text: str) -> None:
    """/ then the words: the line opens with its text selected, so typing replaces it."""
    await pilot.press("slash", *text, "enter")


def test_ten_thousand_objects_page_and_sort(engine_factory, tmp_path):
    engine = engine_factory()
    engine.store.call(seed, COUNT)
    client = InProcessClient(engine)
    calls: list[tuple] = []
    objects = client.objects

    def counted(*args):
        calls.append(args)
        return objects(*args)
    client.objects = counted
    app = ConsoleApp(client, refresh_s=0.5)

    async def scenario(pilot):
        await pilot.press("8")
        await wait_for(pilot, lambda: len(rows(app, "objects")) >= PAGE, what="the first page")
        await wait_for(pilot, lambda: "200 shown of 10 000" in count_line(app), what="the total")
        ids = [r["id"] for r in shown(app)]
        assert ids == sorted(ids, reverse=True), "newest first"
        table = app.screen.query_one("#objects")
        table.focus()
        for _ in range(5):
            await pilot.press("pagedown")
        assert table.row_count > table.cursor_row + 20
        while table.row_count < 1200:
            loaded = table.row_count
            for _ in range(5):
                table.focus()
                await pilot.press("ctrl+end")
                if table.cursor_row == loaded - 1:
                    break
                await pilot.pause(0.1)
            await wait_for(pilot, lambda: table.row_count > loaded, what="the next page")
        await wait_for(pilot, lambda: f"{fmt.count(table.row_count)} shown of 10 000" in count_line(app),
                       what="the count line")
        ids = [r["id"] for r in shown(app)]
        assert len(ids) == len(set(ids)) and ids == sorted(ids, reverse=True)
        # The cursor's full UIDs are on screen whatever the table's width.
        row = shown(app)[table.cursor_row]
        assert row["sop_instance_uid"] in screen_text(app)

        # s cycles the sort column: id → received_at → listener → calling_ae → modality.
        for _ in range(3):
            await pilot.press("s")
        await wait_for(pilot, lambda: "sort calling_ae ↓" in count_line(app) and len(rows(app, "objects")) >= PAGE,
                       what="sorted by calling AE")
        aes = [r["calling_ae"] for r in shown(app)]
        assert aes == sorted(aes, reverse=True) and aes[0] == "US03"
        await pilot.press("S")
        await wait_for(pilot, lambda: "sort calling_ae ↑" in count_line(app) and len(rows(app, "objects")) >= PAGE,
                       what="ascending")
        aes = [r["calling_ae"] for r in shown(app)]
        assert aes == sorted(aes) and aes[0] == "CT01"
        assert cell(app, "objects", rows(app, "objects")[0], "calling") == "CT01"
        # (size sorts too, a numeric column)
        for _ in range(6):
            await pilot.press("s")
        await wait_for(pilot, lambda: "sort size ↑" in count_line(app) and len(rows(app, "objects")) >= PAGE,
                       what="sorted by size")
        sizes = [r["size"] for r in shown(app)]
        assert sizes == sorted(sizes)

    run(app, scenario)
    assert all(args[4] <= PAGE for args in calls), "every query is a page"
    # An export pages through everything the view holds.
    result = export_objects(Query(), client, str(tmp_path / "all.json"))
    assert result == {"rows": COUNT, "capped": False, "path": str(tmp_path / "all.json")}
    data = json.loads((tmp_path / "all.json").read_text())
    assert len({r["id"] for r in data}) == COUNT
    assert export_objects(Query(), client, str(tmp_path / "few.csv"), cap=150)["capped"] is True


class SlowFirst(InProcessClient):
    """`objects` for modality CT answers late; any other query at once."""

    def __init__(self, engine):
        super().__init__(engine)
        self.slow_answered = threading.Event()

    def objects(self, filters=None, *args):
        if (filters or {}).get("modality") == "CT":
            time.sleep(1.5)
            result = super().objects(filters, *args)
            self.slow_answered.set()
            return result
        return super().objects(filters, *args)


def test_only_the_latest_filters_answer_is_shown(engine_factory):
    engine = engine_factory()
    engine.store.call(seed, 300)
    client = SlowFirst(engine)
    app = ConsoleApp(client, refresh_s=0.5)

    async def scenario(pilot):
        await pilot.press("8")
        await wait_for(pilot, lambda: len(rows(app, "objects")) >= PAGE, what="the first page")
        await type_filter(pilot, "mod:CT")
        await type_filter(pilot, "mod:MR")
        await wait_for(pilot, lambda: rows(app, "objects"), what="the MR rows")
        await wait_for(pilot, client.slow_answered.is_set, what="the slow CT answer")
        await pilot.pause(0.5)                     # let it reach the screen, if it were to
        assert "filter: mod:MR" in count_line(app)
        modalities = {r["modality"] for r in shown(app)}
        assert modalities == {"MR"}, modalities
        assert {cell(app, "objects", key, "modality") for key in rows(app, "objects")} == {"MR"}
        assert "100 shown of 100" in count_line(app)
        # Unknown words: told which keys there are, and nothing changes.
        await type_filter(pilot, "colour:red")
        await pilot.pause(0.3)
        notes = [n.message for n in app._notifications]
        assert any("is not a filter" in n and "ae, mod" in n for n in notes), notes
        assert {r["modality"] for r in shown(app)} == {"MR"}

    run(app, scenario)


def _sr_files(folder, accessions: list[str]):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, accession in enumerate(accessions):
        ds = dicomgen.make_sr()
        ds.AccessionNumber = accession
        paths.append(dicomgen.save(ds, folder / f"sr{i}.dcm"))
    return paths


def test_an_accession_search_finds_the_objects_and_is_audited(engine_factory, tmp_path):
    engine = engine_factory()
    port = engine.listeners[0].address[1]
    wanted = store_files(port, _sr_files(tmp_path / "a", ["ACC-1234"] * 3))
    store_files(port, _sr_files(tmp_path / "b", ["ACC-9999"] * 2))
    app = ConsoleApp(InProcessClient(engine), refresh_s=0.5)

    async def scenario(pilot):
        await pilot.press("8")
        await wait_for(pilot, lambda: len(rows(app, "objects")) == 5, what="5 objects")
        await type_filter(pilot, "acc:ACC-1234")
        await wait_for(pilot, lambda: "filter: acc:•••" in count_line(app)
                       and "3 shown of 3" in count_line(app), what="the search's answer")
        assert "ACC-1234" not in screen_text(app), "the accession number does not stay on screen"
        assert sorted(r["sop_instance_uid"] for r in shown(app)) == sorted(wanted)
        notes = [n.message for n in app._notifications]
        assert any("audit" in n for n in notes), notes

    run(app, scenario)
    searches = engine.store.reader().rows("audit", event="identifier_search")
    assert len(searches) == 1
    assert "in-process console" in (searches[0]["actor"] or "")
    assert "ACC-1234" not in json.dumps(searches[0])
    assert "3 found" in searches[0]["detail"]


def test_a_read_only_console_cannot_search_by_identifier(engine_factory):
    engine = engine_factory()
    client = InProcessClient(engine, read_only=True)
    app = ConsoleApp(client, refresh_s=0.5)

    async def scenario(pilot):
        await pilot.press("8")
        await wait_for(pilot, lambda: "shown of" in count_line(app), what="the list")
        await type_filter(pilot, "pid:CANARY-0001")
        await pilot.pause(0.3)
        assert any("read-only" in n.message for n in app._notifications)
        assert "filter:" not in count_line(app)

    run(app, scenario)
    assert not engine.store.reader().rows("audit", event="identifier_search")


def _two_fates(tx) -> int:
    """One object delivered to pacs and dead at web, with the events the engine writes."""
    now = time.time() - 60
    uid = "1.2.826.0.1.3680043.8.498.4242424242424242424242424242424242424242.1"
    object_id = tx.insert_object({
        "sop_instance_uid": uid, "version": 1, "sop_class_uid": KINDS[0][1],
        "study_uid": "1.2.826.0.1.3680043.8.498.5151515151515151515151515151515151515151.2",
        "series_uid": "1.2.826.0.1.3680043.8.498.3.3", "modality": "CT",
        "transfer_syntax": "1.2.840.10008.1.2.1", "size": 5120, "digest": "f" * 64, "blob": "seeded/x",
        "key_id": None, "listener": "modalities", "calling_ae": "CT01", "peer": "127.0.0.1:1",
        "received_at": now, "superseded": 0}, None)
    pacs, web = tx.add_deliveries(object_id, "modalities", [("pacs", None), ("web", None)], now)
    tx.audit("stored", object_id=object_id, listener="modalities", sop_instance_uid=uid, ts=now,
             detail="version=1 size=5120 routes=2")
    tx.set_outcome(pacs, state="delivered", attempts=1, retry_at=now, status="0x0000", label="success",
                   reason="delivered", now=now + 1)
    tx.audit("delivered", destination="pacs", object_id=object_id, delivery_id=pacs, status="0x0000",
             ts=now + 1, detail="attempt 1: delivered: success")
    tx.set_outcome(web, state="dead", attempts=3, retry_at=now, status="0x0122", label="permanent",
                   reason="peer does not support this SOP class", now=now + 9)
    tx.audit("dead_lettered", destination="web", object_id=object_id, delivery_id=web, status="0x0122",
             ts=now + 9, detail="attempt 3: permanent: peer does not support this SOP class")
    tx.audit("replayed", destination="web", delivery_id=web, ts=now + 20, actor="alice (uid 1000)",
             detail="by alice (uid 1000): queued again")
    return object_id


def test_the_timeline_shows_both_deliveries_and_every_event(engine_factory):
    engine = engine_factory()
    object_id = engine.store.call(_two_fates)
    app = ConsoleApp(InProcessClient(engine), refresh_s=0.5)

    async def scenario(pilot):
        await pilot.press("8")
        await wait_for(pilot, lambda: rows(app, "objects") == [str(object_id)], what="the object")
        assert cell(app, "objects", str(object_id), "deliveries") == "pacs ✓  web ✉dead"
        await pilot.press("enter")
        text = await wait_for(pilot, lambda: "timeline" in screen_text(app) and screen_text(app),
                              what="the timeline")
        body = app.screen.body
        from rich.console import Console
        console = Console(width=200, record=True, file=open("/dev/null", "w"))
        console.print(body)
        full = console.export_text()
        assert "1.2.826.0.1.3680043.8.498.4242424242424242424242424242424242424242.1" in full
        assert "1.2.826.0.1.3680043.8.498.5151515151515151515151515151515151515151.2" in full
        assert "pacs  ✓ delivered  attempts 1" in full
        assert "web  ✉ DEAD  attempts 3" in full and "peer does not support this SOP class" in full
        events = [e for e in ("stored", "delivered", "dead_lettered", "replayed") if e in full]
        assert events == ["stored", "delivered", "dead_lettered", "replayed"]
        order = [full.index(f" {e}") for e in ("stored", "delivered  pacs", "dead_lettered", "replayed")]
        assert order == sorted(order), "in time order"
        assert "by alice (uid 1000)" in full
        assert "Object" in text
        await pilot.press("escape")

    run(app, scenario, size=(80, 24))


def test_export_writes_exactly_the_filtered_rows_0600_without_patient_data(engine_factory, tmp_path):
    engine = engine_factory()
    port = engine.listeners[0].address[1]
    folder = tmp_path / "in"
    folder.mkdir()
    srs = store_files(port, _sr_files(folder / "sr", ["ACC-1", "ACC-2", "ACC-3"]))
    images = [dicomgen.save(dicomgen.make_image(pixel_bytes=2048), folder / f"ct{i}.dcm") for i in range(2)]
    store_files(port, images)
    out = tmp_path / "export" / "objects.csv"
    out.parent.mkdir()
    app = ConsoleApp(InProcessClient(engine), refresh_s=0.5)

    async def scenario(pilot):
        await pilot.press("8")
        await wait_for(pilot, lambda: len(rows(app, "objects")) == 5, what="5 objects")
        await type_filter(pilot, "mod:SR")
        await wait_for(pilot, lambda: "3 shown of 3" in count_line(app), what="the SRs")
        await pilot.press("x")
        prompt = await wait_for(pilot, lambda: app.screen.query("#answer"), what="the prompt")
        assert prompt.first().value.startswith("~/mfconsole-objects-") and prompt.first().value.endswith(".csv")
        prompt.first().value = str(out)
        await pilot.press("enter")
        await wait_for(pilot, lambda: any("written to" in n.message for n in app._notifications),
                       what="the export")

    run(app, scenario)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    text = out.read_text()
    assert CANARY_NAME not in text and CANARY_ID not in text and "ACC-" not in text
    with out.open() as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert tuple(header) == EXPORT_FIELDS
    assert sorted(r[header.index("sop_instance_uid")] for r in body) == sorted(srs)
    assert {r[header.index("modality")] for r in body} == {"SR"}


def _trail(tx, count: int) -> None:
    now = time.time() - count
    for i in range(count):
        if i % 50 == 7:
            tx.audit("replayed", destination="web", delivery_id=i, ts=now + i, actor="alice (uid 1000)",
                     detail=f"by alice (uid 1000): dead letter {i} queued again")
        else:
            tx.audit("delivered", destination="pacs", delivery_id=i, ts=now + i, status="0x0000",
                     sop_instance_uid=f"1.2.826.0.1.3680043.8.498.6.{i}", detail="attempt 1: delivered: success")


def test_the_audit_screen_pages_filters_and_shows_a_row_in_full(engine_factory):
    engine = engine_factory()
    engine.store.call(_trail, 1000)
    app = ConsoleApp(InProcessClient(engine), refresh_s=0.5)

    def line() -> str:
        return str(app.screen.query_one("#audit-count").render())

    async def scenario(pilot):
        await pilot.press("9")
        await wait_for(pilot, lambda: len(rows(app, "audit")) >= 200, what="the first page")
        ids = [int(k) for k in rows(app, "audit")]
        assert ids == sorted(ids, reverse=True), "newest first"
        table = app.screen.query_one("#audit")
        while table.row_count < 600:
            loaded = table.row_count
            for _ in range(5):
                table.focus()
                await pilot.press("ctrl+end")
                if table.cursor_row == loaded - 1:
                    break
                await pilot.pause(0.1)
            await wait_for(pilot, lambda: table.row_count > loaded, what="the next page")
        ids = [int(k) for k in rows(app, "audit")]
        assert len(ids) == len(set(ids)) and ids == sorted(ids, reverse=True)

        await pilot.press("slash", *"event:replayed actor:ALICE", "enter")
        await wait_for(pilot, lambda: "filter: event:replayed actor:ALICE" in line()
                       and "20 shown · all loaded" in line(), what="the replays")
        assert {cell(app, "audit", k, "event") for k in rows(app, "audit")} == {"replayed"}
        assert cell(app, "audit", rows(app, "audit")[0], "actor") == "alice"
        await pilot.press("slash", *"1.2.826.0.1.3680043.8.498.6.999", "enter")   # free text
        await wait_for(pilot, lambda: len(rows(app, "audit")) == 1, what="the one row")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "1.2.826.0.1.3680043.8.498.6.999" in screen_text(app)
                       and "Audit row" in screen_text(app), what="the row in full")

    run(app, scenario)


class SlowReplays(InProcessClient):
    """`audit` for event replayed answers late; any other query at once."""

    def __init__(self, engine):
        super().__init__(engine)
        self.slow_answered = threading.Event()

    def audit(self, filters=None, *args):
        if (filters or {}).get("event") == "replayed":
            time.sleep(1.5)
            result = super().audit(filters, *args)
            self.slow_answered.set()
            return result
        return super().audit(filters, *args)


def test_the_audit_screen_shows_only_the_latest_filters_answer(engine_factory):
    engine = engine_factory()
    engine.store.call(_trail, 300)
    client = SlowReplays(engine)
    app = ConsoleApp(client, refresh_s=0.5)

    async def scenario(pilot):
        await pilot.press("9")
        await wait_for(pilot, lambda: len(rows(app, "audit")) >= 200, what="the first page")
        # (the late answer's rows are older than the shown ones: paging alone would take them)
        await pilot.press("slash", *"event:replayed", "enter", "slash", *"event:delivered", "enter")
        await wait_for(pilot, client.slow_answered.is_set, what="the slow answer")
        await pilot.pause(0.5)
        assert {cell(app, "audit", k, "event") for k in rows(app, "audit")} == {"delivered"}
        assert len(rows(app, "audit")) == 200

    run(app, scenario)


def test_filter_words():
    from mfconsole.console import audit, objects

    filters, search = objects.parse_filter("ae:CT1 mod:CT since:2h until:2026-12-01 state:dead dest:pacs "
                                           "study:1.2.3 sop:1.2.4 listener:modalities acc:A1", now=10_000)
    assert filters == {"calling_ae": "CT1", "modality": "CT", "since": 10_000 - 7200, "until": "2026-12-01",
                       "state": "dead", "destination": "pacs", "study_uid": "1.2.3",
                       "sop_instance_uid": "1.2.4", "listener": "modalities"}
    assert search == {"accession": "A1"}
    for bad in ("CT1", "colour:red", "state:lost", "ae:"):
        try:
            objects.parse_filter(bad)
        except objects.FilterError as exc:
            assert ("ae, mod" in str(exc)) or ("pending" in str(exc)), exc
        else:
            raise AssertionError(f"{bad!r} accepted")
    assert audit.parse_filter("event:replayed actor:alice object:42 since:1d no such thing", now=90_000) == {
        "event": "replayed", "actor": "alice", "object_id": 42, "since": 90_000 - 86_400,
        "text": "no such thing"}
