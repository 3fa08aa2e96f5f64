"""Key custody and restore safety, as an operator restoring and rotating would meet
them: a missing key is a refusal (never a new key), a rotation is finished online by
`mfconsole rekey`, a missing database is a refusal, blobs without a row are
quarantined (never deleted), and a backup taken while ingesting restores. Asserts on
the store, the files on disk and what the peer received."""

from __future__ import annotations

import json
from collections import Counter
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

import dicomgen
from fault_scp import FaultSCP
from harness import mfconsole, plant, poll, store_files, stored_sha256, write_config
from test_forward_dimse import deliveries, dimse_dest

from mfconsole.config import load
from mfconsole.engine import outbox
from mfconsole.engine.engine import Engine
from mfconsole.engine.engine_lock import EngineError
from mfconsole.repository import DB_NAME, db_path


@pytest.fixture
def engines():
    """Start engines on a config (several in turn on one data directory)."""
    started: list[Engine] = []

    def start(config: Path, **kwargs) -> Engine:
        engine = Engine(load(config), log_to_stderr=False, **kwargs)
        engine.start()
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.stop()


def send(engine: Engine, folder: Path, count: int, **kwargs) -> list[str]:
    return store_files(engine.listeners[0].address[1], dicomgen.write_corpus(folder, count, **kwargs))


def blob_files(data_dir: Path) -> dict[str, bytes]:
    root = data_dir / "blobs"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.blob")}


def set_store_keys(config: Path, key_file: str, previous: list[str]) -> None:
    lines = [line for line in config.read_text().splitlines()
             if not line.startswith(("key_file =", "previous_key_files ="))]
    at = lines.index("[store]") + 1
    listed = ", ".join(f'"{p}"' for p in previous)
    lines[at:at] = [f'key_file = "{key_file}"', f"previous_key_files = [{listed}]"]
    config.write_text("\n".join(lines) + "\n")


def queued(engines, tmp_path: Path, count: int, folder: str = "ct") -> tuple[Path, Engine]:
    """An engine whose one destination is paused, holding ``count`` objects stored as
    blob files (over 256 KiB each)."""
    config = write_config(tmp_path / "e", destinations=[dimse_dest(1)],
                          egress={"allowed_tcp": ["127.0.0.1:1"]})
    engine = engines(config)
    engine.store.call(outbox.pause, "pacs", "test")
    send(engine, tmp_path / folder, count, kind="ct", pixel_bytes=300 * 1024)
    return config, engine


def test_a_missing_key_is_a_refusal_and_the_queue_waits_for_it(engines, tmp_path):
    scp = FaultSCP(None, record_dir=tmp_path / "scp", ae_title="PACS").start()
    try:
        config = write_config(tmp_path / "e", destinations=[dimse_dest(scp.port)])
        engine = engines(config)
        engine.store.call(outbox.pause, "pacs", "test: queue first")
        uids = send(engine, tmp_path / "sr", 5) + send(engine, tmp_path / "ct", 2, kind="ct",
                                                       pixel_bytes=300 * 1024)
        engine.stop()
        key = tmp_path / "e" / "var" / "keys" / "store.key"
        moved = tmp_path / "elsewhere.key"
        shutil.move(key, moved)
        with pytest.raises(EngineError) as refused:
            engines(config)
        text = str(refused.value)
        assert "store.key_file" in text and "is missing" in text and "7 objects" in text
        assert "put the key file back" in text
        assert not key.exists(), "a new key was made for a store that holds objects"
        # The command line says the same and exits non-zero.
        result = mfconsole("--config", str(config), "serve", timeout=60)
        assert result.returncode != 0 and "is missing" in result.stderr
        # A different key is refused too, naming the key id the store needs.
        from mfconsole.engine.vault import create_key, key_id_of, load_key
        create_key(key)
        with pytest.raises(EngineError, match=key_id_of(load_key(moved)).hex()):
            engines(config)
        key.unlink()
        shutil.move(moved, key)
        again = engines(config)
        again.store.call(outbox.resume, "pacs")
        again.deliveries["pacs"].wake.set()
        poll(lambda: deliveries(again) == {"delivered": 7}, timeout=30,
             message=f"all delivered: {[(r['state'], r['last_reason']) for r in again.store.reader().rows('deliveries')]}")
        sent = {r["sop_instance_uid"]: r["sha256"] for r in scp.received() if r["status"] == 0}
        assert sent == stored_sha256(again.data_dir, key)
        assert set(sent) == set(uids)
    finally:
        scp.stop()


def test_rotation_during_ingest_then_rekey_then_the_old_key_can_go(engines, tmp_path):
    scp = FaultSCP(None, record_dir=tmp_path / "scp", ae_title="PACS").start()
    try:
        config = write_config(tmp_path / "e", destinations=[dimse_dest(scp.port)])
        folder = config.parent
        engine = engines(config)
        engine.store.call(outbox.pause, "pacs", "test: queue first")
        before = send(engine, tmp_path / "sr1", 30) + send(engine, tmp_path / "ct1", 3, kind="ct",
                                                          pixel_bytes=300 * 1024)
        plain_before = stored_sha256(engine.data_dir, engine.config.store.key_file)

        # Rotate: a new key takes over, the old one is kept read-only.
        result = mfconsole("--config", str(config), "keys", "new", str(folder / "keys" / "new.key"))
        assert result.returncode == 0, result.stderr
        set_store_keys(config, "keys/new.key", ["var/keys/store.key"])
        # The engine still seals with the old key: rekeying now would write what it
        # cannot read.
        refused = mfconsole("--config", str(config), "rekey")
        assert refused.returncode != 0 and "restart it on this configuration" in refused.stderr
        engine.stop()
        engine = engines(config)
        old_id, new_id = engine.store.vault.key_ids[1], engine.store.vault.key_id
        # Rekey while objects keep arriving.
        ingest = threading.Thread(target=lambda: send(engine, tmp_path / "sr2", 60))
        ingest.start()
        result = mfconsole("--config", str(config), "rekey", timeout=120)
        ingest.join()
        assert result.returncode == 0, result.stdout + result.stderr
        assert "33 object(s) re-sealed" in result.stdout
        keys = mfconsole("--config", str(config), "keys", "list")
        assert f"previous  {old_id}" in keys.stdout and "0 object(s)" in keys.stdout.split(old_id)[1].splitlines()[0]
        status = mfconsole("--config", str(config), "status", "--json")
        assert {k["key_id"]: k["objects"] for k in json.loads(status.stdout)["keys"]} \
            == {new_id: 93, old_id: 0}
        engine.stop()

        # The old key is retired: no previous_key_files, the file gone. Everything opens.
        set_store_keys(config, "keys/new.key", [])
        (folder / "var" / "keys" / "store.key").unlink()
        engine = engines(config)
        assert stored_sha256(engine.data_dir, folder / "keys" / "new.key").items() >= plain_before.items()
        engine.store.call(outbox.resume, "pacs")
        engine.deliveries["pacs"].wake.set()
        poll(lambda: deliveries(engine) == {"delivered": 93}, timeout=60, message="93 delivered")
        sent = {r["sop_instance_uid"]: r["sha256"] for r in scp.received() if r["status"] == 0}
        assert set(before) <= set(sent) and len(sent) == 93
        assert {u: sent[u] for u in before} == plain_before
        audit = [r["event"] for r in engine.store.reader().rows("audit")
                 if r["event"].lower().startswith("rekey")]
        assert audit == ["rekey_started", "rekeyed"]
    finally:
        scp.stop()


def test_a_missing_database_beside_blobs_is_a_refusal_and_blobs_stay(engines, tmp_path):
    config, engine = queued(engines, tmp_path, 3)
    data_dir = engine.data_dir
    engine.stop()
    blobs = blob_files(data_dir)
    assert len(blobs) == 3
    for p in data_dir.glob(DB_NAME + "*"):
        p.unlink()
    with pytest.raises(EngineError, match="restore the database"):
        engines(config)
    assert blob_files(data_dir) == blobs
    assert not db_path(data_dir).exists()
    # Deliberately starting anew keeps the blobs, in quarantine.
    engine = engines(config, accept_empty_store=True)
    assert blob_files(data_dir) == {}
    quarantined = {p.name: p.read_bytes() for p in (data_dir / "quarantine").rglob("*.blob")}
    assert sorted(quarantined.values()) == sorted(blobs.values())


def test_a_stale_database_restored_quarantines_newer_blobs(engines, tmp_path):
    config, engine = queued(engines, tmp_path, 2, "ct1")
    old = [uid for uid in stored_sha256(engine.data_dir, engine.config.store.key_file)]
    data_dir = engine.data_dir
    backup = tmp_path / "backup.db"
    with sqlite3.connect(db_path(data_dir)) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    send(engine, tmp_path / "ct2", 2, kind="ct", pixel_bytes=300 * 1024)
    engine.stop()
    everything = blob_files(data_dir)
    assert len(everything) == 4
    for p in data_dir.glob(DB_NAME + "*"):
        p.unlink()
    shutil.copy(backup, db_path(data_dir))
    engine = engines(config)
    kept = blob_files(data_dir)
    quarantined = {p.read_bytes() for p in (data_dir / "quarantine").rglob("*.blob")}
    assert len(kept) == 2 and len(quarantined) == 2
    assert set(kept.values()) | quarantined == set(everything.values())   # nothing deleted
    assert set(stored_sha256(data_dir, engine.config.store.key_file)) == set(old)
    detail = engine.store.reader().rows("audit", order_by="id DESC", event="recovered")[0]["detail"]
    assert "quarantined_blobs=2" in detail


def test_backup_taken_while_ingesting_restores_whole(engines, tmp_path):
    """The README's procedure: an online database backup, then the blobs copied, while
    objects keep arriving; restored into a new data directory with the key, every
    object the backup knows opens, and blobs newer than it are quarantined."""
    _, engine = queued(engines, tmp_path, 5, "warm")
    data_dir = engine.data_dir
    stop = threading.Event()

    def keep_sending() -> None:
        n = 0
        while not stop.is_set():
            send(engine, tmp_path / f"live{n}", 2, kind="ct", pixel_bytes=300 * 1024)
            n += 1

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        # Committed rows, not blob files: a blob is written before its row commits.
        poll(lambda: engine.store.reader().object_count() >= 9 and len(blob_files(data_dir)) >= 4,
             timeout=30, message="ingest under way")
        restored = tmp_path / "restored"
        (restored / "var").mkdir(parents=True)
        with sqlite3.connect(db_path(data_dir)) as src, \
                sqlite3.connect(db_path(restored / "var")) as dst:
            src.backup(dst)                                       # online, consistent
        shutil.copytree(data_dir / "blobs", restored / "var" / "blobs")   # after the database
    finally:
        stop.set()
        sender.join()
    (restored / "var" / "keys").mkdir()
    shutil.copy(engine.config.store.key_file, restored / "var" / "keys" / "store.key")
    engine.stop()
    config2 = write_config(restored, destinations=[dimse_dest(1)],
                           egress={"allowed_tcp": ["127.0.0.1:1"]})
    again = engines(config2)
    known = again.store.reader().object_count()
    assert known >= 9
    opened = stored_sha256(again.data_dir, again.config.store.key_file)   # every one decrypts
    assert len(opened) == known


def test_rekey_stopped_midway_resumes_where_it_left_off(engines, tmp_path):
    """A rekey interrupted after a batch (as a crash or Ctrl-C would) leaves a store
    that opens with both keys; run again, it finishes the rest and nothing twice."""
    from mfconsole.engine import rekey as rekeying
    from mfconsole.engine.keys import open_vault

    config, engine = queued(engines, tmp_path, 3)
    send(engine, tmp_path / "sr", 40)
    data_dir = engine.data_dir
    plain = stored_sha256(data_dir, engine.config.store.key_file)
    engine.stop()
    assert mfconsole("--config", str(config), "keys", "new", str(config.parent / "keys" / "b.key")).returncode == 0
    set_store_keys(config, "keys/b.key", ["var/keys/store.key"])
    vault = open_vault(load(config).store, data_dir)
    stop = threading.Event()
    first = rekeying.rekey(db_path(data_dir), data_dir / "blobs", vault, batch=10,
                           progress=lambda done, total: stop.set(), stop=stop)
    assert first == (10, 0)                     # stopped after one batch
    done, failed = rekeying.rekey(db_path(data_dir), data_dir / "blobs", vault, batch=10)
    assert (done, failed) == (33, 0)            # the rest, nothing twice
    engine = engines(config)
    assert stored_sha256(data_dir, config.parent / "keys" / "b.key") == plain
    assert dict(Counter(r["key_id"] for r in engine.store.reader().rows("objects"))) == {vault.key_id: 43}


def test_a_blob_left_by_an_interrupted_purge_is_quarantined_not_a_refusal(engines, tmp_path):
    """Every object purged, one blob file left behind (a crash between the purge's
    commit and its unlink): the database is not lost, so the start goes on and the
    file is quarantined."""
    config, engine = queued(engines, tmp_path, 1)
    data_dir = engine.data_dir
    leftover = next((data_dir / "blobs").rglob("*.blob"))
    kept = leftover.read_bytes()
    engine.store.call(lambda tx: plant(tx, "UPDATE objects SET purged_at = 1"))
    engine.stop()
    again = engines(config)
    assert not leftover.exists()
    assert [p.read_bytes() for p in (data_dir / "quarantine").rglob("*.blob")] == [kept]
    assert again.store is not None
