"""HL7 over MLLP end to end: DCMTK storescu sends SRs to the listener, the shipped
sr_to_oru handler maps them, and hl7apy's MLLP server (tests/mllp_peer.py) receives
the ORU^R01 messages — in order, with the tabled answer to each scripted ACK fault.
Also the handler reload cycle against a running `mfconsole serve`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

import dicomgen
from harness import holds, mfconsole, poll
from mllp_peer import MllpPeer
from test_forward_dimse import dimse_dest, received_by_storescp, storescu

REPO = Path(__file__).resolve().parents[2]
FAST = {"retry_initial_s": 0.2, "retry_max_s": 0.5, "down_after": 50, "connect_timeout_s": 2,
        "ack_timeout_s": 1}


def ehr_dest(port: int, **extra) -> dict:
    return {"name": "ehr", "kind": "mllp", "host": "127.0.0.1", "port": port,
            "sending_facility": "RADIOLOGY", "receiving_application": "EHR", **FAST, **extra}


def with_handlers(folder: Path, source: str | None = None) -> None:
    """The shipped sr_to_oru handler (or ``source`` under that name) next to a config."""
    (folder / "handlers").mkdir(parents=True, exist_ok=True)
    target = folder / "handlers" / "sr_to_oru.py"
    if source is None:
        shutil.copy(REPO / "handlers" / "sr_to_oru.py", target)
    else:
        target.write_text(source)


def msh(message: str, field: int) -> str:
    return message.replace("\n", "\r").split("\r", 1)[0].split("|")[field - 1 if field > 1 else 0]


def rows(engine, destination: str = "ehr") -> list[tuple]:
    return [(r["id"], r["state"], r["attempts"], r["last_status"], r["handler_version"])
            for r in engine.store.reader().rows("deliveries", destination=destination)]


def srs(tmp_path: Path, n: int) -> list[Path]:
    files = [Path(get_testdata_file("test-SR.dcm"))]
    return files + dicomgen.write_corpus(tmp_path / "sr", n - 1)


def test_sr_to_oru_reaches_the_ehr_in_order_and_the_pacs_too(engine_factory, storescp_factory, tmp_path):
    from hl7apy.parser import parse_message

    peer = MllpPeer(tmp_path / "ehr").start()
    scp = storescp_factory("-B")
    with_handlers(tmp_path / "engine")
    engine = engine_factory(
        destinations=[dimse_dest(scp.port), ehr_dest(peer.port)],
        routes=[{"from": "modalities", "to": ["pacs"]},
                {"from": "modalities", "to": ["ehr"], "handler": "sr_to_oru"}])
    files = srs(tmp_path, 8)
    ct = dicomgen.write_corpus(tmp_path / "ct", 1, kind="ct", pixel_bytes=4096)
    assert storescu(engine.listeners[0].address[1], files + ct).returncode == 0
    poll(lambda: [r[1] for r in rows(engine)].count("delivered") == 8, timeout=60)
    try:
        got = peer.received()
        assert len(got) == 8
        # In order, one message per delivery, each carrying its delivery's MSH-10.
        ids = [r[0] for r in rows(engine) if r[1] == "delivered"]
        assert [g["control_id"] for g in got] == [f"MF{i:012d}" for i in ids]
        uids = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
        for g, uid in zip(got, uids):
            message = g["message"]
            assert msh(message, 9).startswith("ORU^R01")
            assert msh(message, 21).startswith("sr_to_oru^1.0.0") or "sr_to_oru" in msh(message, 21)
            assert uid in message                      # the SR instance UID, for linkage
            parse_message(message.replace("\n", "\r"), find_groups=False)
        # The CT is not an SR: filtered for the EHR, delivered to the PACS (whose workers
        # are not the EHR's: polled for on its own, not taken from the EHR's progress).
        states = lambda: {f"{d}:{s}": n for d, by_state in engine.store.reader().delivery_counts().items()
                          for s, n in by_state.items()}
        expected = {"ehr:delivered": 8, "ehr:filtered": 1, "pacs:delivered": 9}
        poll(lambda: states() == expected, timeout=30, message=f"{expected}")
        versions = {r[4] for r in rows(engine)}
        assert versions == {"1.0.0"}
        poll(lambda: len(received_by_storescp(scp)) == 9, timeout=30)
    finally:
        peer.stop()


@pytest.mark.parametrize("acks, first_state, first_attempts, receptions", [
    ("AE,AA", "dead", 1, 1),           # permanent, message: dead letter, the queue moves on
    ("AR,AR,AR,AA", "dead", 3, 3),     # bounded: bounded_attempts tries, then dead
    ("CE,AA", "delivered", 2, 2),      # bounded: a retry that succeeds
    ("NONE,AA", "delivered", 2, 2),    # no ACK: resent with the same MSH-10
    ("WRONG,AA", "delivered", 2, 2),   # MSA-2 is not ours: never "delivered" on it
    ("GARBLED,AA", "delivered", 2, 2),
    ("BIG,AA", "delivered", 2, 2),     # oversized reply: bounded read, then resent
    ("CA", "delivered", 1, 1),
])
def test_ack_answers_follow_the_table(engine_factory, tmp_path, acks, first_state, first_attempts,
                                      receptions):
    peer = MllpPeer(tmp_path / "ehr", acks=acks).start()
    with_handlers(tmp_path / "engine")
    engine = engine_factory(destinations=[ehr_dest(peer.port, bounded_attempts=3)],
                            routes=[{"from": "modalities", "to": ["ehr"], "handler": "sr_to_oru"}])
    try:
        assert storescu(engine.listeners[0].address[1], srs(tmp_path, 3)).returncode == 0
        poll(lambda: all(r[1] in ("delivered", "dead") for r in rows(engine)) and len(rows(engine)) == 3,
             timeout=60)
        (first, *rest) = rows(engine)
        assert (first[1], first[2]) == (first_state, first_attempts)
        assert [r[1] for r in rest] == ["delivered", "delivered"]
        got = [g["control_id"] for g in peer.received()]
        first_id = f"MF{first[0]:012d}"
        # The first message's tries all came before anything behind it: delivery in order.
        assert got[:receptions] == [first_id] * receptions
        assert got[receptions:] == [f"MF{r[0]:012d}" for r in rest]
    finally:
        peer.stop()


def test_commit_reject_pauses_the_destination(engine_factory, tmp_path):
    peer = MllpPeer(tmp_path / "ehr", acks="CR").start()
    with_handlers(tmp_path / "engine")
    engine = engine_factory(destinations=[ehr_dest(peer.port)],
                            routes=[{"from": "modalities", "to": ["ehr"], "handler": "sr_to_oru"}])
    try:
        assert storescu(engine.listeners[0].address[1], srs(tmp_path, 3)).returncode == 0
        reads = engine.store.reader()
        paused = lambda: (reads.destination_state("ehr") or {"paused": 0})["paused"] == 1
        poll(paused, timeout=30, message="ehr paused")
        # The messages claimed behind the refused one go back after the pause is written.
        pending = lambda: [r[1] for r in rows(engine)] == ["pending"] * 3   # nothing dead, nothing lost
        poll(pending, timeout=10, message="all three pending")
        assert holds(lambda: paused() and pending() and len(peer.received()) == 1), peer.received()
    finally:
        peer.stop()


def _serve_with_handler(serve_factory, tmp_path, peer_port: int, source: str):
    folder = tmp_path / "serve"
    with_handlers(folder, source)
    return serve_factory(destinations=[ehr_dest(peer_port)],
                         routes=[{"from": "modalities", "to": ["ehr"], "handler": "sr_to_oru"}])


def test_reload_keeps_the_running_version_on_bad_code_and_activates_a_good_one(serve_factory, tmp_path):
    shipped = (REPO / "handlers" / "sr_to_oru.py").read_text()
    assert 'VERSION = "1.0.0"' in shipped
    peer = MllpPeer(tmp_path / "ehr").start()
    try:
        serve = _serve_with_handler(serve_factory, tmp_path, peer.port, shipped)
        config = serve.config
        handler = config.parent / "handlers" / "sr_to_oru.py"
        sent = 0

        def send_and_wait(tag: str) -> str:
            nonlocal sent
            files = dicomgen.write_corpus(tmp_path / tag, 1)
            assert storescu(serve.port, files).returncode == 0
            sent += 1
            poll(lambda: len(peer.received()) >= sent, timeout=30, message=f"{tag} delivered")
            return msh(peer.received()[-1]["message"], 21)

        assert "1.0.0" in send_and_wait("first")
        bad_versions = {
            "syntax error": shipped.replace('VERSION = "1.0.0"', 'VERSION = "2.0.0"') + "\ndef (:\n",
            "no handle": shipped.replace('VERSION = "1.0.0"', 'VERSION = "2.0.0"')
                                .replace("def handle(", "def handle_renamed("),
            "raises on recent objects": shipped.replace('VERSION = "1.0.0"', 'VERSION = "2.0.0"')
                                               .replace("def handle(obj, ctx):",
                                                        "def handle(obj, ctx):\n    raise KeyError(obj.dataset.PatientName)"),
        }
        for what, source in bad_versions.items():
            handler.write_text(source)
            res = mfconsole("--config", str(config), "reload")
            assert res.returncode == 1, (what, res.stdout, res.stderr)
            assert "new version refused" in res.stderr and "1.0.0" in res.stderr, what
            assert dicomgen.CANARY_NAME not in res.stderr
            assert "1.0.0" in send_and_wait(what.replace(" ", "-")), what

        handler.write_text(shipped.replace('VERSION = "1.0.0"', 'VERSION = "2.0.0"'))
        res = mfconsole("--config", str(config), "reload")
        assert res.returncode == 0 and "activated" in res.stdout and "2.0.0" in res.stdout
        assert "2.0.0" in send_and_wait("good")
        with serve.db() as db:
            poll(lambda: len(db.rows("deliveries", state="delivered")) == 5, timeout=10)
            versions = [r["handler_version"] for r in db.rows("deliveries")]
        assert versions == ["1.0.0"] * 4 + ["2.0.0"]
        listed = mfconsole("--config", str(config), "handlers", "list")
        assert "2.0.0" in listed.stdout
    finally:
        peer.stop()


def test_handler_that_raises_dead_letters_with_name_version_and_no_phi(engine_factory, tmp_path):
    shipped = (REPO / "handlers" / "sr_to_oru.py").read_text()
    broken = shipped.replace("def handle(obj, ctx):",
                             "def handle(obj, ctx):\n    raise ValueError(str(obj.dataset.PatientName))")
    peer = MllpPeer(tmp_path / "ehr").start()
    with_handlers(tmp_path / "engine", broken)
    engine = engine_factory(destinations=[ehr_dest(peer.port)],
                            routes=[{"from": "modalities", "to": ["ehr"], "handler": "sr_to_oru"}])
    try:
        assert storescu(engine.listeners[0].address[1], srs(tmp_path, 2)).returncode == 0
        poll(lambda: [r[1] for r in rows(engine)] == ["dead", "dead"], timeout=30)
        reads = engine.store.reader()
        reasons = ([r["last_reason"] for r in reads.rows("deliveries")]
                   + [r["detail"] for r in reads.rows("audit")])
        assert any("handler sr_to_oru 1.0.0 raised ValueError at sr_to_oru.py line" in (r or "")
                   for r in reasons)
        assert not any(dicomgen.CANARY_NAME in (r or "") for r in reasons)
        assert peer.received() == []
        # Fix, reload, replay: both go out, made by the fixed version.
        with_handlers(tmp_path / "engine", shipped.replace('VERSION = "1.0.0"', 'VERSION = "1.0.1"'))
        report = engine.reload()
        assert any("activated" in line and "1.0.1" in line for line in report), report
        from mfconsole import ops
        ops.replay(engine.config, [r[0] for r in rows(engine)])
        poll(lambda: len(peer.received()) == 2, timeout=30)
        assert all("1.0.1" in msh(g["message"], 21) for g in peer.received())
    finally:
        peer.stop()


def test_handlers_run_previews_without_sending(tmp_path):
    from harness import write_config

    folder = tmp_path / "preview"
    with_handlers(folder)
    config = write_config(folder, destinations=[ehr_dest(9)],
                          routes=[{"from": "modalities", "to": ["ehr"], "handler": "sr_to_oru"}])
    res = mfconsole("--config", str(config), "handlers", "run", "sr_to_oru", get_testdata_file("test-SR.dcm"))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("# sr_to_oru 1.0.0") and lines[1].startswith("MSH|")
    assert any(line.startswith("OBX|") for line in lines)
    res = mfconsole("--config", str(config), "handlers", "run", "sr_to_oru", get_testdata_file("CT_small.dcm"))
    assert res.returncode == 0 and "filtered" in res.stdout
    res = mfconsole("--config", str(config), "handlers", "list")
    assert res.returncode == 0 and "sr_to_oru" in res.stdout and "1.0.0" in res.stdout
