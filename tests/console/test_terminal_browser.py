"""The object browser in a real terminal (tmux), attached to `mfconsole serve`: ten
thousand objects page and sort; an accession number search finds exactly the objects
that carry it and leaves an audit row; the timeline of an object delivered to one
destination and dead-lettered at another shows both."""

from __future__ import annotations

import time

import pytest
from dicomgen import make_sr, save
from fault_scp import FaultSCP
from harness import plant, poll, store_files
from test_terminal import Tmux, console_command, tmux  # noqa: F401 (fixture)

from mfconsole.repository import db_path, reading, writing

SEEDED = 10_000


def seed(tx, count: int) -> None:
    """Objects seeded straight into the tables (never opened here): fault planting."""
    now = time.time() - 3600
    plant(tx, "INSERT INTO objects (sop_instance_uid, version, sop_class_uid, study_uid, transfer_syntax, "
              "size, digest, blob, listener, calling_ae, peer, received_at, modality) "
              "VALUES (?,1,?,?,?,?,?,?,?,?,?,?,?)",
          [(f"1.2.826.0.1.3680043.8.498.7.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1",
            1000 + i, f"{i:064x}", "inline", "modalities", f"CT{i % 7}", "127.0.0.1:1", now + i * 0.01, "CT")
           for i in range(count)])


@pytest.fixture
def refusing(tmp_path):
    scp = FaultSCP(None, "--status", "0x0122", record_dir=tmp_path / "refusing", ae_title="ARCHIVE").start()
    yield scp
    scp.stop()


def test_the_object_browser_in_a_real_terminal(tmux, serve_factory, storescp_factory, refusing,   # noqa: F811
                                               tmp_path):
    pacs = storescp_factory()
    serve = serve_factory(destinations=[
        {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"},
        {"name": "archive", "kind": "dimse", "host": "127.0.0.1", "port": refusing.port,
         "ae_title": "ARCHIVE"}])
    with writing(db_path(serve.data_dir)) as run:
        run(seed, SEEDED)
    files = []
    for i in range(3):
        ds = make_sr()
        ds.AccessionNumber = "ACC-TMUX-7" if i < 2 else "ACC-OTHER"
        files.append(save(ds, tmp_path / "in" / f"{i}.dcm"))
    uids = store_files(serve.port, files)
    with reading(db_path(serve.data_dir)) as reads:
        poll(lambda: {r["state"] for r in reads.rows("deliveries", destination="pacs")} == {"delivered"}
             and {r["state"] for r in reads.rows("deliveries", destination="archive")} == {"dead"},
             timeout=30, message="delivered to pacs, dead at archive")

    tmux.start(console_command(serve.config), width=120, height=40)
    tmux.wait("1 Dashboard")
    tmux.keys("8")
    tmux.wait(f"of {SEEDED + 3:,}".replace(",", " "))
    started = time.monotonic()
    for _ in range(12):
        tmux.keys("PageDown")
    poll(lambda: any(f"{n} shown of" in tmux.screen() for n in (400, 600, 800)),
         timeout=20, message="further pages loaded")
    assert time.monotonic() - started < 15, "paging through 12 screens took too long"
    tmux.keys("s")
    tmux.wait("sort received_at")
    tmux.keys("S")
    tmux.wait("↑ ascending")

    tmux.keys("/")
    tmux.wait("— enter applies")           # the filter line is open (and has the focus)
    tmux.keys("acc:acc-tmux-7")
    tmux.wait("acc:acc-tmux-7")
    tmux.keys("Enter")
    try:
        tmux.wait("2 shown of 2")
    except AssertionError:
        raise AssertionError(tmux.screen()) from None
    # The cursor row's UIDs, in full, under the table.
    poll(lambda: uids[0] in tmux.screen() or uids[1] in tmux.screen(), timeout=10,
         message="a found object's UID in full")
    assert uids[2] not in tmux.screen()
    with reading(db_path(serve.data_dir)) as reads:
        searches = poll(lambda: reads.rows("audit", event="identifier_search"), message="the audited search")
    assert "ACC-TMUX-7" not in searches[0]["detail"] and searches[0]["actor"]

    tmux.keys("Enter")
    try:
        tmux.wait("— timeline", "stored", "pacs  ✓ delivered", "archive  ✉ DEAD", "0x0122")
    except AssertionError:
        raise AssertionError(tmux.screen()) from None
    tmux.keys("Escape")
