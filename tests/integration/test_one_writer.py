"""While the engine runs, every write goes through its one writer (the store's writer
thread): operator actions from the console and the control socket included. No
operation may open the database for writing beside it."""

from __future__ import annotations

import time

import pytest

from mfconsole.control import ControlService
from mfconsole.repository import Tx


def _dead_letter(tx: Tx, uid: str) -> int:
    now = time.time()
    object_id = tx.insert_object({"sop_instance_uid": uid, "version": 1, "digest": "d", "blob": "x",
                                  "received_at": now}, None)
    delivery_id, = tx.add_deliveries(object_id, "modalities", [("pacs", None)], now)
    tx.set_outcome(delivery_id, state="dead", attempts=3, retry_at=now, status="0xA700",
                   label="permanent/message", reason="test dead letter", now=now)
    return delivery_id


@pytest.fixture
def no_second_writer(monkeypatch):
    import mfconsole.ops as ops
    import mfconsole.repository.writes as writes

    def refuse(*_a, **_k):
        raise AssertionError("an operation opened a second writer beside the engine's")

    monkeypatch.setattr(ops, "writing", refuse)
    monkeypatch.setattr(writes, "writing", refuse)


def test_operator_actions_go_through_the_engines_writer(engine, no_second_writer):
    service = ControlService(engine)
    first, second = (engine.store.call(_dead_letter, uid) for uid in ("1.2.3.1", "1.2.3.2"))
    commits = engine.store.commits
    service.call("pause", {"destination": "pacs"}, actor="uid=0(alice) via test")
    assert service.call("replay", {"ids": [first]}, actor="uid=0(alice) via test")["queued"] == 1
    assert service.call("discard", {"ids": [second]}, actor="uid=0(alice) via test")["discarded"] == 1
    service.call("resume", {"destination": "pacs"}, actor="uid=0(alice) via test")
    assert engine.store.commits >= commits + 4

    reads = engine.store.reader()
    assert reads.delivery(second)["state"] == "discarded"
    assert reads.delivery(first)["state"] in ("pending", "in_flight", "dead")   # queued again, then tried
    events = [(r["event"], r["actor"]) for r in reads.rows("audit") if r["actor"]]
    assert events == [(e, "uid=0(alice) via test") for e in
                      ("destination_paused", "replayed", "discarded", "destination_resumed")]
