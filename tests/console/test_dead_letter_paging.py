"""10 000 dead letters: the first page shows at once, the count comes after it, and
paging down through thousands stays quick (pages of 200, fetched ahead)."""

from __future__ import annotations

import asyncio
import time

from harness import plant
from support import rows, wait_for

from mfconsole.client import InProcessClient
from mfconsole.console.app import ConsoleApp
from mfconsole.console.dead_letters import PAGE, DeadLettersScreen

COUNT = 10_000
CAUSES = [("0x0122", "peer does not support this SOP class"), ("0xA900", "peer says the data set "
          "does not match the SOP class"), ("handler error", "handler sr_to_oru 1.0.0 raised KeyError")]


def bury(tx, count: int) -> None:
    """Dead letters seeded straight into the tables (objects marked inline with no
    sealed bytes: nothing here opens them), grouped by cause: fault planting."""
    now = time.time()
    plant(tx, 
        "INSERT INTO objects (sop_instance_uid, version, sop_class_uid, study_uid, transfer_syntax, "
        "size, digest, blob, listener, calling_ae, peer, received_at) VALUES (?,1,?,?,?,?,?,?,?,?,?,?)",
        [(f"1.2.826.0.1.3680043.8.498.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1",
          1024, f"{i:064x}", "inline", "modalities", "CT01", "127.0.0.1:1", now) for i in range(count)])
    plant(tx, 
        "INSERT INTO deliveries (object_id, destination, listener, state, attempts, retry_at, "
        "last_status, last_class, last_reason, created_at, updated_at) "
        "SELECT id, 'pacs', 'modalities', 'dead', 1, ?, ?, 'permanent', ?, ?, ? FROM objects "
        "WHERE id % 3 = ?", [(now, s, r, now, now, k) for k, (s, r) in enumerate(CAUSES)])


class CountingClient(InProcessClient):
    def __init__(self, engine):
        super().__init__(engine)
        self.calls: list[tuple[str, dict]] = []

    def call(self, op: str, **args):
        self.calls.append((op, args))
        return super().call(op, **args)


def test_ten_thousand_dead_letters_page_smoothly(engine_factory, monkeypatch):
    engine = engine_factory()
    engine.store.call(bury, COUNT)
    client = CountingClient(engine)
    app = ConsoleApp(client, refresh_s=0.5)
    # What "smooth" needs: the UI thread's work to show one more page stays small, and
    # does not grow with what is already loaded.
    page_work: list[float] = []
    show_more = DeadLettersScreen._show_more

    def timed(self, page):
        t = time.perf_counter()
        show_more(self, page)
        page_work.append(time.perf_counter() - t)
    monkeypatch.setattr(DeadLettersScreen, "_show_more", timed)

    async def main():
        async with app.run_test(size=(120, 40)) as pilot:
            t0 = time.monotonic()
            await pilot.press("4")
            await wait_for(pilot, lambda: len(rows(app, "letters")) >= PAGE, what="the first page")
            first_page_s = time.monotonic() - t0
            label = app.screen.query_one("#dead-count")
            await wait_for(pilot, lambda: "of 10 000" in str(label.render()), what="the lazy count")
            assert app.screen.query_one("#groups").row_count == 1 + len(CAUSES)
            table = app.screen.query_one("#letters")
            table.focus()
            t1 = time.monotonic()
            for _ in range(5):                 # page by page: the screenful after this one is there
                await pilot.press("pagedown")
                assert table.row_count > table.cursor_row + 20
            while table.cursor_row < 3000:     # then to the end of what is loaded, again and again
                loaded = table.row_count
                for _ in range(5):
                    # A key pressed in the very cycle the rows were added may see the old
                    # size, and Textual (8.2) now and then moves the focus to the groups
                    # table on a relayout: press again, as an operator would.
                    table.focus()
                    await pilot.press("ctrl+end")
                    if table.cursor_row == loaded - 1:
                        break
                    await pilot.pause(0.1)
                await wait_for(pilot, lambda: table.row_count > loaded, what="the next page")
            return first_page_s, time.monotonic() - t1

    first_page_s, paging_s = asyncio.run(main())
    fetches = [args for op, args in client.calls if op == "dead_letters"]
    assert all(args["limit"] <= PAGE for args in fetches), "every query is a page"
    assert len(fetches) >= 3000 // PAGE
    ops = [op for op, _ in client.calls]
    assert ops.index("dead_letters") < ops.index("dead_letter_count"), "the count comes after the page"
    assert first_page_s < 3.0, first_page_s
    assert len(page_work) >= 3000 // PAGE - 1
    assert max(page_work) < 0.3, page_work
    early, late = sorted(page_work[:3])[1], sorted(page_work[-3:])[1]
    assert late < max(3 * early, 0.05), page_work     # flat, not growing with the rows loaded
    assert paging_s < 60, paging_s
