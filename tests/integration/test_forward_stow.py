"""Forwarding to STOW-RS destinations: Orthanc with its DICOMweb plugin (what lands,
outages, a refused object) and tests/stow_server.py for the answers Orthanc will not
give on demand. Asserts on what the peer holds, on what it was sent, and on the
delivery rows."""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import hashlib
import subprocess
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread

import dicomgen
from harness import delivery_states, holds, mfconsole, poll, stored_sha256, write_config
from mfconsole.config import EgressConfig
from mfconsole.engine import outbox
from peers import require_tool
from stow_server import answer, drop, make_pki, server_tls, slow, stored, too_large

FAST = {"retry_initial_s": 0.2, "retry_max_s": 1.0, "down_after": 5, "connect_timeout_s": 2,
        "response_timeout_s": 5, "bounded_attempts": 2}
TOKEN = "TOKEN-CANARY-5f1d0c9e7a"
PASSWORD = "PASSWORD-CANARY-8be2"


def stow_dest(url: str, **extra) -> dict:
    return {"name": "web", "kind": "stow", "url": url, **FAST, **extra}


def storescu(engine, files: list[Path], *extra: str) -> None:
    res = subprocess.run([require_tool("storescu"), "-aet", "MODALITY", "-aec", "MF_SCP", *extra,
                          "127.0.0.1", str(engine.listeners[0].address[1]), *map(str, files)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def held_back(engine, files: list[Path], *extra: str) -> None:
    """Ingest ``files`` while the destination is paused, then resume: the worker finds
    them all queued at once and batches them (one study per request)."""
    engine.store.call(outbox.pause, "web", "test: hold until all are stored")
    storescu(engine, files, *extra)
    engine.store.call(outbox.resume, "web")


def rows(engine) -> dict[str, dict]:
    """SOP Instance UID -> its delivery row."""
    reads = engine.store.reader()
    uid_of = {o["id"]: o["sop_instance_uid"] for o in reads.rows("objects")}
    return {uid_of[d["object_id"]]: {"sop_instance_uid": uid_of[d["object_id"]], **d}
            for d in reads.rows("deliveries")}


def states(engine) -> dict[str, int]:
    return delivery_states(engine.store.reader())


def settled(engine, count: int) -> bool:
    s = states(engine)
    return s.get("delivered", 0) + s.get("dead", 0) == count


def dest_state(engine) -> outbox.DestinationState:
    return outbox.state(engine.store.reader(), "web")


def digests(engine) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the stored object (the database's digest is keyed)."""
    return stored_sha256(engine.data_dir, engine.config.store.key_file)


def uids_of(files: list[Path]) -> list[str]:
    return [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


def part10_dataset(raw: bytes, tmp: Path) -> tuple[bytes, str]:
    tmp.write_bytes(raw)
    return dicomgen.dataset_bytes(tmp)


# -- against Orthanc -----------------------------------------------------------------------


def test_every_object_lands_in_orthanc_byte_identical(engine_factory, orthanc, tmp_path):
    from pydicom.data import get_testdata_file
    from pynetdicom import AE

    engine = engine_factory(destinations=[stow_dest(orthanc.dicomweb_url)])
    files = dicomgen.write_corpus(tmp_path / "sr", 25) + dicomgen.write_corpus(tmp_path / "sr2", 12)
    files += dicomgen.write_corpus(tmp_path / "ct", 4, kind="ct", pixel_bytes=300 * 1024)
    storescu(engine, files)
    storescu(engine, [dicomgen.save(dicomgen.make_sr(), tmp_path / "implicit.dcm", implicit=True)], "-xi")
    # Compressed objects go as the bytes received (no transcoding).
    names = ["JPEG2000.dcm", "SC_rgb_rle.dcm", "JPEG-lossy.dcm", "MR_small_jpeg_ls_lossless.dcm",
             "CT_small.dcm"]
    ae = AE(ae_title="MODALITY")
    paths = [Path(get_testdata_file(n)) for n in names]
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", engine.listeners[0].address[1], ae_title="MF_SCP")
    assert [assoc.send_c_store(p).Status for p in paths] == [0] * len(paths)
    assoc.release()
    total = len(files) + 1 + len(paths)
    poll(lambda: states(engine).get("delivered") == total, timeout=120)
    expected = digests(engine)
    syntaxes = {r["sop_instance_uid"]: r["transfer_syntax"] for r in engine.store.reader().rows("objects")}
    held: dict[str, str] = {}
    for oid in orthanc.instances():
        data, ts = part10_dataset(orthanc.instance_file(oid), tmp_path / "held.dcm")
        uid = str(dcmread(tmp_path / "held.dcm", stop_before_pixels=True).SOPInstanceUID)
        held[uid] = hashlib.sha256(data).hexdigest()
        assert ts == syntaxes[uid], "the file meta must name the syntax the data set is in"
    # Orthanc keeps a STOW part as it arrived: the data set bytes it holds are the ones
    # we received, bit for bit (the same SHA-256 the store computed at ingest).
    assert held == expected
    assert all(r["last_class"] == "delivered/message" for r in rows(engine).values())


def test_orthanc_stopped_and_restarted_mid_run_loses_nothing(engine_factory, orthanc, tmp_path):
    engine = engine_factory(destinations=[stow_dest(orthanc.dicomweb_url, batch_max_objects=5)])
    first = dicomgen.write_corpus(tmp_path / "a", 20)
    storescu(engine, first)
    poll(lambda: states(engine).get("delivered") == 20, timeout=60)
    orthanc.stop()
    second = dicomgen.write_corpus(tmp_path / "b", 30)
    storescu(engine, second)
    poll(lambda: dest_state(engine).failures >= 2, timeout=30, message="retries while Orthanc is down")
    assert states(engine).get("delivered") == 20
    orthanc.start()
    poll(lambda: states(engine).get("delivered") == 50, timeout=60)
    assert states(engine).get("dead", 0) == 0
    assert sorted(orthanc.sop_instance_uids()) == sorted(uids_of(first + second))
    attempts = max((r["attempts"] for r in engine.store.reader().rows("deliveries")), default=None)
    assert attempts >= 2, "the outage must have cost retries"


def test_object_orthanc_refuses_is_dead_lettered_with_its_reason(engine_factory, orthanc, tmp_path):
    engine = engine_factory(destinations=[stow_dest(orthanc.dicomweb_url)])
    study = "1.2.826.0.1.3680043.8.498.77"
    good = [dicomgen.save(dicomgen.make_sr(study), tmp_path / f"g{i}.dcm") for i in range(3)]
    ds = dicomgen.make_sr(study)
    del ds.SeriesInstanceUID    # we accept it; Orthanc cannot index it
    bad = dicomgen.save(ds, tmp_path / "bad.dcm")
    held_back(engine, good[:2] + [bad] + good[2:])
    poll(lambda: settled(engine, 4), timeout=60)
    by_uid = rows(engine)
    refused = by_uid[str(ds.SOPInstanceUID)]
    # Orthanc answers the request 400 with FailedSOPSequence/FailureReason 0xC000 for
    # the bad one and ReferencedSOPSequence for the others.
    assert refused["state"] == "dead" and refused["last_status"] == "0xC000"
    assert "cannot understand" in refused["last_reason"] and "FailureReason" in refused["last_reason"]
    assert refused["attempts"] == 1
    assert all(by_uid[u]["state"] == "delivered" for u in uids_of(good))
    assert sorted(orthanc.sop_instance_uids()) == sorted(uids_of(good))
    res = mfconsole("--config", str(engine.config.path), "dead-letters", "list")
    assert "0xC000" in res.stdout and str(ds.SOPInstanceUID) in res.stdout


def test_echo_a_stow_destination(orthanc, stow_server, tmp_path):
    config = write_config(tmp_path / "e", destinations=[stow_dest(orthanc.dicomweb_url)])
    res = mfconsole("--config", str(config), "echo", "web")
    assert res.returncode == 0 and "HTTP 200" in res.stdout, res.stdout + res.stderr
    assert orthanc.count() == 0
    wrong = write_config(tmp_path / "w", destinations=[stow_dest(orthanc.base_url + "/nothere")])
    res = mfconsole("--config", str(wrong), "echo", "web")
    assert res.returncode == 1 and "HTTP 404" in res.stderr
    server = stow_server(default=answer(401))
    locked = write_config(tmp_path / "l", destinations=[stow_dest(server.url)])
    res = mfconsole("--config", str(locked), "echo", "web")
    assert res.returncode == 1 and "credentials" in res.stderr


# -- against the scripted server -----------------------------------------------------------


def test_request_is_multipart_of_part10_files_with_the_stored_bytes(engine_factory, stow_server,
                                                                     tmp_path):
    server = stow_server()
    engine = engine_factory(destinations=[stow_dest(server.url, batch_max_objects=4)])
    files = dicomgen.write_corpus(tmp_path / "sr", 6)
    implicit = dicomgen.save(dicomgen.make_sr(), tmp_path / "implicit.dcm", implicit=True)
    held_back(engine, files)
    storescu(engine, [implicit], "-xi")
    poll(lambda: states(engine).get("delivered") == 7, timeout=30)
    posts = server.posts()
    assert sorted(len(r.uids) for r in posts) == [1, 2, 4], "6 of one study in 4 + 2, then 1"
    expected = digests(engine)
    syntaxes = {r["sop_instance_uid"]: r["transfer_syntax"] for r in engine.store.reader().rows("objects")}
    for req in posts:
        ctype = req.headers["Content-Type"]
        assert ctype.startswith('multipart/related; type="application/dicom"; boundary=')
        boundary = ctype.rsplit("boundary=", 1)[1].encode()
        assert req.path == "/dicom-web/studies"
        assert req.headers["Accept"] == "application/dicom+json"
        assert "Authorization" not in req.headers
        assert req.part_types == ["application/dicom"] * len(req.parts)
        for uid, part in zip(req.uids, req.parts):
            assert boundary not in part
            assert part[128:132] == b"DICM"
            meta = dcmread(BytesIO(part), stop_before_pixels=True).file_meta
            assert meta.MediaStorageSOPInstanceUID == uid
            assert meta.TransferSyntaxUID == syntaxes[uid]
            data, _ = part10_dataset(part, tmp_path / "part.dcm")
            assert hashlib.sha256(data).hexdigest() == expected[uid]
    assert len({r.headers["Content-Type"] for r in posts}) == len(posts), "a fresh boundary each time"


@pytest.mark.parametrize("xml", [False, True], ids=["json", "xml"])
def test_mixed_per_instance_results(engine_factory, stow_server, tmp_path, xml):
    files = dicomgen.write_corpus(tmp_path / "sr", 6)
    u = uids_of(files)
    failed = {u[0]: 0xC000, u[1]: 0xA700, u[2]: 0x0110}
    server = stow_server()
    server.script(stored(failed=failed, warnings={u[3]: 0xB000}, xml=xml))
    engine = engine_factory(destinations=[stow_dest(server.url)])
    held_back(engine, files)
    poll(lambda: settled(engine, 6), timeout=30)
    r = rows(engine)
    assert r[u[0]]["state"] == "dead" and r[u[0]]["last_status"] == "0xC000"
    assert r[u[0]]["attempts"] == 1, "permanent: not retried"
    # 0xA700 is transient, 0x0110 bounded: both tried again (and stored the second time).
    assert r[u[1]]["state"] == "delivered" and r[u[1]]["attempts"] == 2
    assert r[u[2]]["state"] == "delivered" and r[u[2]]["attempts"] == 2
    assert r[u[3]]["state"] == "delivered" and r[u[3]]["last_class"] == "warning/message"
    assert r[u[3]]["last_status"] == "0xB000"
    assert all(r[x]["state"] == "delivered" and r[x]["attempts"] == 1 for x in u[4:])
    posts = server.posts()
    assert len(posts[0].uids) == 6
    assert sorted(x for p in posts[1:] for x in p.uids) == sorted(u[1:3]), "only those two again"
    assert not dest_state(engine).paused
    events = [e["event"] for e in engine.store.reader().rows("audit", destination="web")]
    assert "delivered_with_warning" in events and "dead_lettered" in events


def test_409_with_failure_reasons(engine_factory, stow_server, tmp_path):
    files = dicomgen.write_corpus(tmp_path / "sr", 3)
    u = uids_of(files)
    server = stow_server()
    server.script(stored(failed={u[1]: 0xA900}, status=409))
    engine = engine_factory(destinations=[stow_dest(server.url)])
    held_back(engine, files)
    poll(lambda: settled(engine, 3), timeout=30)
    r = rows(engine)
    assert r[u[1]]["state"] == "dead" and r[u[1]]["last_status"] == "0xA900"
    assert "HTTP 409" in r[u[1]]["last_reason"]
    assert r[u[0]]["state"] == r[u[2]]["state"] == "delivered"
    assert len(server.posts()) == 1


def test_413_splits_the_batch_until_it_fits(engine_factory, stow_server, tmp_path):
    server = stow_server(default=too_large(2))
    engine = engine_factory(destinations=[stow_dest(server.url, batch_max_objects=8)])
    files = dicomgen.write_corpus(tmp_path / "sr", 8)
    held_back(engine, files)
    poll(lambda: settled(engine, 8), timeout=30)
    assert states(engine) == {"delivered": 8}
    assert sorted(server.stored) == sorted(uids_of(files))
    sizes = [len(r.uids) for r in server.posts()]
    assert sizes == [8, 4, 2, 2, 4, 2, 2]
    assert all(r["attempts"] == 1 for r in rows(engine).values()), "a split is not a retry"


def test_413_for_a_single_instance_is_a_dead_letter(engine_factory, stow_server, tmp_path):
    server = stow_server(default=too_large(0))
    engine = engine_factory(destinations=[stow_dest(server.url)])
    storescu(engine, dicomgen.write_corpus(tmp_path / "ct", 1, kind="ct", pixel_bytes=64 * 1024))
    poll(lambda: settled(engine, 1), timeout=30)
    (row,) = rows(engine).values()
    assert row["state"] == "dead" and row["last_status"] == "HTTP 413" and "too large" in row["last_reason"]
    assert len(server.posts()) == 1


def test_unexplained_400_isolates_the_poison_object(engine_factory, stow_server, tmp_path):
    files = dicomgen.write_corpus(tmp_path / "sr", 4)
    poison = uids_of(files)[2]
    server = stow_server()

    def refuse_poison(srv, req, h):
        (answer(400) if poison in req.uids else stored())(srv, req, h)

    server.default = refuse_poison
    engine = engine_factory(destinations=[stow_dest(server.url)])
    held_back(engine, files)
    poll(lambda: settled(engine, 4), timeout=30)
    r = rows(engine)
    assert r[poison]["state"] == "dead" and r[poison]["last_status"] == "HTTP 400"
    assert sum(1 for x in r.values() if x["state"] == "delivered") == 3


@pytest.mark.parametrize("status,header", [(429, "2"), (503, "date")])
def test_retry_after_is_honoured(engine_factory, stow_server, tmp_path, status, header):
    server = stow_server()

    def busy(srv, req, h):   # the date is taken when answering, as a server would
        value = header if header != "date" else email.utils.formatdate(time.time() + 3, usegmt=True)
        answer(status, retry_after=value)(srv, req, h)

    server.script(busy)
    engine = engine_factory(destinations=[stow_dest(server.url)])
    storescu(engine, dicomgen.write_corpus(tmp_path / "sr", 3))
    poll(lambda: states(engine).get("delivered") == 3, timeout=30)
    first, second = server.posts()[:2]
    wait = second.at - first.answered_at
    # retry_initial_s is 0.2: only Retry-After explains the wait (an HTTP-date has a
    # resolution of one second, hence 2 s for "now + 3 s").
    assert wait >= (2.0 if header == "2" else 1.9), wait
    assert states(engine).get("dead", 0) == 0 and not dest_state(engine).paused


def test_500_is_retried(engine_factory, stow_server, tmp_path):
    server = stow_server()
    server.script(answer(500), answer(502))
    engine = engine_factory(destinations=[stow_dest(server.url)])
    storescu(engine, dicomgen.write_corpus(tmp_path / "sr", 1))
    poll(lambda: states(engine).get("delivered") == 1, timeout=30)
    assert [r.behaviour for r in server.posts()] == ["answer(500)", "answer(502)", "stored()"]
    (row,) = rows(engine).values()
    assert row["attempts"] == 3


def test_redirect_to_another_host_is_not_followed(engine_factory, stow_server, tmp_path):
    elsewhere = stow_server()
    server = stow_server(default=answer(302, location=elsewhere.url + "/studies"))
    engine = engine_factory(destinations=[stow_dest(server.url)])
    storescu(engine, dicomgen.write_corpus(tmp_path / "sr", 3))
    poll(lambda: dest_state(engine).paused, timeout=30, message="paused on a redirect")
    # The rest of the batch goes back after the pause is written.
    poll(lambda: states(engine) == {"pending": 3}, timeout=10,
         message="the queue kept, nothing dead-lettered")
    assert holds(lambda: elsewhere.requests == [] and len(server.posts()) == 1
                 and states(engine) == {"pending": 3}, 0.5), \
        "the redirect target must never be contacted, nor the archive again while paused"
    st = dest_state(engine)
    assert "redirect" in st.pause_reason and f"127.0.0.1:{elsewhere.port}" in st.pause_reason
    server.default = stored()
    engine.store.call(outbox.resume, "web")
    poll(lambda: states(engine).get("delivered") == 3, timeout=30)
    assert elsewhere.requests == []


def test_slow_answer_times_out_and_is_sent_again(engine_factory, stow_server, tmp_path):
    server = stow_server()
    server.script(slow(4))
    engine = engine_factory(destinations=[stow_dest(server.url, response_timeout_s=1)])
    storescu(engine, dicomgen.write_corpus(tmp_path / "sr", 2))
    poll(lambda: states(engine).get("delivered") == 2, timeout=30)
    first, second = server.posts()[:2]
    assert 0.9 <= second.at - first.at < 4, "given up after response_timeout_s, not after the answer"
    assert first.answered_at is None or first.answered_at > second.at
    assert states(engine).get("dead", 0) == 0


@pytest.mark.parametrize("store_first", [False, True], ids=["dropped", "stored_then_dropped"])
def test_dropped_connection_is_retried(engine_factory, stow_server, tmp_path, store_first):
    server = stow_server()
    server.script(drop(store_first=store_first))
    engine = engine_factory(destinations=[stow_dest(server.url)])
    files = dicomgen.write_corpus(tmp_path / "sr", 3)
    held_back(engine, files)
    poll(lambda: states(engine).get("delivered") == 3, timeout=30)
    posts = server.posts()
    # A request dropped with several objects may hold the one the archive chokes on:
    # it is sent again in halves (1 + 2), with the same bytes (re-storing is a no-op).
    assert len(posts) == 3 and sorted(posts[0].uids) == sorted(uids_of(files))
    assert [len(p.uids) for p in posts[1:]] == [1, 2]
    assert sorted(posts[1].uids + posts[2].uids) == sorted(uids_of(files))
    again = {**dict(zip(posts[1].uids, posts[1].parts)), **dict(zip(posts[2].uids, posts[2].parts))}
    assert dict(zip(posts[0].uids, posts[0].parts)) == again
    assert sorted(server.stored) == sorted(uids_of(files))
    # Nothing counts against any object: every one was delivered at its first attempt.
    assert sorted(r["attempts"] for r in rows(engine).values()) == [1, 1, 1]


def test_401_pauses_the_destination_and_keeps_the_queue(engine_factory, stow_server, tmp_path):
    token = tmp_path / "secrets" / "token"
    token.parent.mkdir()
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    server = stow_server(default=answer(401))
    engine = engine_factory(destinations=[stow_dest(server.url, bearer_token_file=str(token))])
    storescu(engine, dicomgen.write_corpus(tmp_path / "sr", 4))
    poll(lambda: dest_state(engine).paused, timeout=30)
    # The rest of the batch goes back after the pause is written.
    poll(lambda: states(engine) == {"pending": 4}, timeout=10, message="all four pending")
    assert holds(lambda: len(server.posts()) == 1 and states(engine) == {"pending": 4}, 0.5), \
        "paused after the first refusal"
    assert all(r["attempts"] == 0 for r in rows(engine).values()), "not the objects' fault"
    assert server.posts()[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert "credentials" in dest_state(engine).pause_reason
    # The operator fixes the token (read at every request) and resumes.
    token.write_text("ROTATED-" + TOKEN)
    server.default = stored()
    engine.store.call(outbox.resume, "web")
    poll(lambda: states(engine).get("delivered") == 4, timeout=30)
    assert server.posts()[-1].headers["Authorization"] == f"Bearer ROTATED-{TOKEN}"
    assert_secret_nowhere(engine, TOKEN)


def test_basic_auth_password_is_read_at_each_request(engine_factory, stow_server, tmp_path):
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    password.chmod(0o600)
    server = stow_server()
    engine = engine_factory(destinations=[stow_dest(server.url, username="mf",
                                                    password_file=str(password))])
    storescu(engine, dicomgen.write_corpus(tmp_path / "a", 1))
    poll(lambda: states(engine).get("delivered") == 1, timeout=30)
    password.write_text(PASSWORD + "-2")
    storescu(engine, dicomgen.write_corpus(tmp_path / "b", 1))
    poll(lambda: states(engine).get("delivered") == 2, timeout=30)
    sent = [base64.b64decode(r.headers["Authorization"].split()[1]).decode() for r in server.posts()]
    assert sent == [f"mf:{PASSWORD}", f"mf:{PASSWORD}-2"]
    assert_secret_nowhere(engine, PASSWORD)


def assert_secret_nowhere(engine, secret: str) -> None:
    """Not in the database (WAL included), the logs or the audit trail."""
    needle = secret.encode()
    data_dir = engine.config.engine.data_dir
    found = [p for p in data_dir.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert not found, f"secret found in {found}"
    b64 = base64.b64encode(f"mf:{secret}".encode())
    assert not [p for p in data_dir.rglob("*") if p.is_file() and b64 in p.read_bytes()]


def test_egress_is_checked_before_each_request(engine_factory, stow_server, tmp_path):
    server = stow_server()
    engine = engine_factory(destinations=[stow_dest(server.url)])
    storescu(engine, dicomgen.write_corpus(tmp_path / "a", 1))
    poll(lambda: states(engine).get("delivered") == 1, timeout=30)
    # As a reload that drops the prefix would: the next request never leaves.
    engine.config = dataclasses.replace(engine.config, egress=EgressConfig(allowed_tcp=(), allowed_http=()))
    storescu(engine, dicomgen.write_corpus(tmp_path / "b", 2))
    poll(lambda: dest_state(engine).paused, timeout=30)
    assert len(server.posts()) == 1
    assert "allowed_http" in dest_state(engine).pause_reason
    assert states(engine) == {"delivered": 1, "pending": 2}


def test_unreachable_archive_is_retried_then_down(engine_factory, stow_server, tmp_path):
    server = stow_server()
    url = server.url
    server.stop()      # nothing listens there any more
    engine = engine_factory(destinations=[stow_dest(url, down_after=2)])
    storescu(engine, dicomgen.write_corpus(tmp_path / "sr", 5))
    poll(lambda: dest_state(engine).down, timeout=30)
    # (the batch behind a failed request goes back after its outcome; a probe has one in flight)
    poll(lambda: states(engine) == {"pending": 5}, timeout=10, message="all five pending")
    reasons = {r["last_reason"] for r in rows(engine).values() if r["last_reason"]}
    assert any("cannot connect" in x for x in reasons), reasons


# -- TLS ------------------------------------------------------------------------------------


def test_tls_is_verified_against_ca_file(engine_factory, stow_server, tmp_path):
    pki = make_pki(tmp_path / "pki")
    server = stow_server(tls=server_tls(pki))
    trusted = engine_factory("trusted", destinations=[stow_dest(server.url, tls={"ca_file": str(pki["ca.crt"])})])
    storescu(trusted, dicomgen.write_corpus(tmp_path / "a", 2))
    poll(lambda: states(trusted).get("delivered") == 2, timeout=30)
    # Without ca_file the system trust store decides, and it does not know this CA:
    # a trust failure is the destination's configuration, so it pauses (queue kept).
    before = len(server.posts())
    untrusted = engine_factory("untrusted", destinations=[stow_dest(server.url)])
    storescu(untrusted, dicomgen.write_corpus(tmp_path / "b", 2))
    poll(lambda: dest_state(untrusted).paused, timeout=30)
    assert "not trusted" in dest_state(untrusted).pause_reason
    poll(lambda: states(untrusted) == {"pending": 2}, timeout=10, message="both pending")
    assert len(server.posts()) == before, "nothing was sent to the untrusted server"


def test_mutual_tls(engine_factory, stow_server, tmp_path):
    pki = make_pki(tmp_path / "pki")
    server = stow_server(tls=server_tls(pki, require_client_cert=True))
    engine = engine_factory(destinations=[stow_dest(server.url, tls={
        "ca_file": str(pki["ca.crt"]), "cert_file": str(pki["client.crt"]),
        "key_file": str(pki["client.key"])})])
    storescu(engine, dicomgen.write_corpus(tmp_path / "a", 2))
    poll(lambda: states(engine).get("delivered") == 2, timeout=30)
    assert any(dict(x[0] for x in c["subject"]).get("commonName") == "mfconsole"
               for c in server.client_certs)
    before = len(server.posts())
    anonymous = engine_factory("anonymous", destinations=[stow_dest(server.url, tls={"ca_file": str(pki["ca.crt"])})])
    storescu(anonymous, dicomgen.write_corpus(tmp_path / "b", 1))
    poll(lambda: dest_state(anonymous).failures >= 2, timeout=30, message="refused handshakes retried")
    # (retries go on: between two, the object is pending, not in flight)
    poll(lambda: states(anonymous) == {"pending": 1}, timeout=10, message="pending between retries")
    assert len(server.posts()) == before


def test_dead_letter_replayed_once_the_archive_takes_it(engine_factory, stow_server, tmp_path):
    server = stow_server(default=answer(422))
    engine = engine_factory(destinations=[stow_dest(server.url)])
    storescu(engine, dicomgen.write_corpus(tmp_path / "sr", 1))
    poll(lambda: states(engine).get("dead") == 1, timeout=30)
    server.default = stored()
    res = mfconsole("--config", str(engine.config.path), "dead-letters", "replay", "--all",
                    "--destination", "web")
    assert res.returncode == 0 and "1 dead letter(s) queued again" in res.stdout
    poll(lambda: states(engine).get("delivered") == 1, timeout=30)
    assert [r.behaviour for r in server.posts()] == ["answer(422)", "stored()"]
    events = [e["event"] for e in engine.store.reader().rows("audit", destination="web")]
    assert events[-3:] == ["dead_lettered", "replayed", "delivered"]
