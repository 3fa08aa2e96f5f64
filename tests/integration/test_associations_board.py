"""The associations board shows both directions: a peer's association into a listener
(and which stored objects it carried, through the object browser's association
filter), and the engine's own association to a destination with what it sent."""

from __future__ import annotations

from dicomgen import write_corpus
from harness import poll, store_files

from mfconsole.control import RO_SOCKET_NAME, request


def test_inbound_and_outbound_associations_and_the_objects_one_carried(engine_factory, storescp_factory,
                                                                        tmp_path):
    scp = storescp_factory()
    engine = engine_factory(destinations=[{"name": "pacs", "kind": "dimse", "host": "127.0.0.1",
                                           "port": scp.port, "ae_title": "PACS"}])
    port = engine.listeners[0].address[1]
    first = store_files(port, write_corpus(tmp_path / "a", 3))
    second = store_files(port, write_corpus(tmp_path / "b", 2))
    poll(lambda: engine.store.reader().delivery_counts("pacs").get("pacs") == {"delivered": 5},
         timeout=30, message="five deliveries")

    board = engine.board.snapshot()
    inbound = [a for a in board["live"] + board["recent"] if a["direction"] == "in"]
    assert len(inbound) == 2 and all(a["key"] and a["key"].startswith(a["id"] + "@") for a in inbound)
    outbound = poll(lambda: [a for a in engine.board.snapshot()["live"] + engine.board.snapshot()["recent"]
                             if a["direction"] == "out" and a["objects"]], message="an outbound association")
    assert sum(a["objects"] for a in outbound) == 5
    assert all(a["listener"] == "pacs" and a["called_ae"] == "PACS" and "127.0.0.1" in a["peer"]
               for a in outbound)

    by_start = sorted(inbound, key=lambda a: a["started"])
    ro = engine.data_dir / RO_SOCKET_NAME
    for association, uids in zip(by_start, (first, second)):
        rows = request(ro, "objects", {"filters": {"association": association["key"]}})["rows"]
        assert sorted(r["sop_instance_uid"] for r in rows) == sorted(uids)
