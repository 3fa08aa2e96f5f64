"""Objects read ahead: while one group of a round goes to the peer, the next group's
objects are read and decrypted on the worker's reader thread (engine/delivery.py),
and the first group of the next round too once its claim is committed. What a peer
receives must not change: every object intact, in its own group's place, and one
that cannot be read is settled on its own wherever it sits (first group, a group
read ahead, a group of the round after)."""

from __future__ import annotations

import threading

import dicomgen
from fault_scp import FaultSCP
from harness import plant, poll
from test_forward_dimse import deliveries, dimse_dest, stored_digests, storescu

from mfconsole.engine import delivery, outbox
from mfconsole.ul.sender import UlSender


def _queue(engine, files) -> None:
    engine.store.call(outbox.pause, "pacs", "test: queue first")
    assert storescu(engine.listeners[0].address[1], files).returncode == 0


def _resume(engine) -> None:
    engine.store.call(outbox.resume, "pacs")
    engine.deliveries["pacs"].wake.set()


def _damage(engine, object_ids: list[int]) -> None:
    """Flip a byte in each object's sealed (inline) blob: it fails authentication."""
    def flip(tx, ids):
        for object_id in ids:
            sealed = bytearray(tx.rows("blob_data", object_id=object_id)[0]["sealed"])
            sealed[-5] ^= 0xFF
            plant(tx, "UPDATE blob_data SET sealed = ? WHERE object_id = ?", (bytes(sealed), object_id))
    engine.store.call(flip, object_ids)


def _accepted(scp: FaultSCP) -> dict[str, str]:
    return {r["sop_instance_uid"]: r["sha256"] for r in scp.received() if r["status"] == 0}


def test_unreadable_objects_anywhere_in_a_burst_are_settled_alone(engine_factory, tmp_path,
                                                                   monkeypatch):
    # Groups of 8: a round of BATCH holds several, so each place below is its own group.
    group = 8
    monkeypatch.setattr(UlSender, "max_batch", (group, UlSender.max_batch[1]))
    scp = FaultSCP(None, record_dir=tmp_path / "scp", ae_title="PACS").start()
    engine = engine_factory(destinations=[dimse_dest(scp.port)])
    files = dicomgen.write_corpus(tmp_path / "sr", 3 * delivery.BATCH)
    _queue(engine, files)
    rows = sorted(engine.store.reader().rows("objects"), key=lambda r: r["id"])
    assert len(rows) == len(files)
    # The first group (read in the round), the second (read ahead during the first)
    # and the first group of the second round (read ahead across rounds).
    damaged = [rows[2], rows[group + 3], rows[delivery.BATCH + 1]]
    digests = stored_digests(engine)
    _damage(engine, [r["id"] for r in damaged])
    _resume(engine)
    poll(lambda: not {"pending", "in_flight"} & set(deliveries(engine)), timeout=60,
         message="every delivery settled")

    assert deliveries(engine) == {"delivered": len(files) - 3, "dead": 3}
    dead = engine.store.reader().rows("deliveries", state="dead")
    assert {r["object_id"] for r in dead} == {r["id"] for r in damaged}
    assert {r["last_status"] for r in dead} == {"unreadable"}
    got = _accepted(scp)
    assert not {r["sop_instance_uid"] for r in damaged} & set(got)
    assert got == {uid: digest for uid, digest in digests.items()
                   if uid not in {r["sop_instance_uid"] for r in damaged}}
    # At most one reader thread per worker, whatever the number of rounds.
    readers = [t.name for t in threading.enumerate() if t.name.startswith("read-deliver-pacs-")]
    workers = engine.config.destinations[0].max_associations
    assert 1 <= len(readers) <= workers and all(name.endswith("_0") for name in readers), readers


def test_large_objects_are_read_in_turn_not_ahead(engine_factory, tmp_path, monkeypatch):
    """A group over READ_AHEAD_BYTES is read when its turn comes (memory stays about
    one group per worker); the objects still arrive intact."""
    monkeypatch.setattr(delivery, "READ_AHEAD_BYTES", 64 * 1024)
    # Groups of 4: the small objects make several groups, some of them read ahead.
    monkeypatch.setattr(UlSender, "max_batch", (4, UlSender.max_batch[1]))
    scp = FaultSCP(None, record_dir=tmp_path / "scp", ae_title="PACS").start()
    engine = engine_factory(destinations=[dimse_dest(scp.port)])
    files = dicomgen.write_corpus(tmp_path / "sr", 12)
    files += dicomgen.write_corpus(tmp_path / "ct", 6, kind="ct", pixel_bytes=96 * 1024)
    submitted: list[list[int]] = []
    real = delivery._Lane.read_ahead

    def spy(lane, read, ids):
        submitted.append(list(ids))
        return real(lane, read, ids)

    monkeypatch.setattr(delivery._Lane, "read_ahead", spy)
    _queue(engine, files)
    sizes = {r["id"]: r["size"] for r in engine.store.reader().rows("objects")}
    _resume(engine)
    poll(lambda: deliveries(engine) == {"delivered": len(files)}, timeout=60,
         message="all delivered")
    assert _accepted(scp) == stored_digests(engine)
    assert submitted, "small groups are read ahead"
    assert all(sum(sizes[i] for i in ids) <= 64 * 1024 for ids in submitted)


def _watch_groups(monkeypatch) -> tuple[list[int], list[tuple[int, int]]]:
    """The size of each group a worker sends, and (read ahead, sent) for each group
    whose read-ahead was made for other objects."""
    sizes: list[int] = []
    missed: list[tuple[int, int]] = []
    real = delivery._Lane.take_read

    def spy(lane, ids):
        pending = lane._next_read
        sizes.append(len(ids))
        if pending is not None and pending[0] != ids:
            missed.append((len(pending[0]), len(ids)))
        return real(lane, ids)

    monkeypatch.setattr(delivery._Lane, "take_read", spy)
    return sizes, missed


def test_a_burst_uses_every_read_ahead(engine_factory, storescp, tmp_path, monkeypatch):
    """In a plain burst (nothing urgent, no failure) each group's objects were read
    ahead for exactly that group, the first group of each round included, although
    group sizes follow the pace of the round before (GROUP_S): the first round, its
    pace unknown, sends groups of min_group, the next ones (GROUP_S raised here so
    that any pace gives full groups) groups of max_batch."""
    monkeypatch.setattr(delivery, "GROUP_S", 1.0)
    sizes, missed = _watch_groups(monkeypatch)
    # One worker: a second one would start at an unknown pace, with groups of 8.
    engine = engine_factory(destinations=[dimse_dest(storescp.port, max_associations=1)])
    files = dicomgen.write_corpus(tmp_path / "sr", 4 * delivery.BATCH)
    _queue(engine, files)
    _resume(engine)
    poll(lambda: deliveries(engine) == {"delivered": len(files)}, timeout=60,
         message="all delivered")
    assert len(list(storescp.output_dir.iterdir())) == len(files)
    assert {UlSender.min_group, UlSender.max_batch[0]} <= set(sizes), sizes
    assert missed == []


def test_the_pace_is_forgotten_between_bursts(engine_factory, storescp, tmp_path, monkeypatch):
    """A burst starts from groups of min_group whatever the pace of the one before:
    the worker forgets it when it idles or pauses (the next peer may be slower, and an
    urgent delivery waits for the group in flight)."""
    monkeypatch.setattr(delivery, "GROUP_S", 1.0)    # any known pace: full groups
    sizes, _ = _watch_groups(monkeypatch)
    engine = engine_factory(destinations=[dimse_dest(storescp.port, max_associations=1)])
    for burst in range(2):
        sizes.clear()
        files = dicomgen.write_corpus(tmp_path / f"sr{burst}", 3 * delivery.BATCH)
        _queue(engine, files)
        _resume(engine)
        poll(lambda: deliveries(engine).get("delivered") == (burst + 1) * len(files), timeout=60,
             message="the burst delivered")
        assert sizes[0] == UlSender.min_group and UlSender.max_batch[0] in sizes, sizes
