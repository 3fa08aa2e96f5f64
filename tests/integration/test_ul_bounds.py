"""Resource bounds of mfconsole's upper layer: the in-flight byte budget shared by
every association (store.inflight_mb), the log of a connect/close flood, and the
RLIMIT_NOFILE raise at engine start. Driven over raw sockets, so which object is in
flight when is decided by the test, not by timing.
"""

from __future__ import annotations

import hashlib
import re
import resource
import socket
import struct

import pytest

import dicomgen
from harness import poll, stored_sha256
from test_ul_acceptor import (CT, EXPLICIT_LE, UL, associate_rq, audit, connect, element,
                              objects, port_of, read_message, recv_pdu, us)

from mfconsole.ul import acceptor
from mfconsole.ul.acceptor import InflightBudget

MiB = 1024 * 1024


def uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" * (len(raw) % 2)


def store_rq(msg_id: int, sop_class: str, sop_instance: str) -> bytes:
    from test_ul_acceptor import command_set
    return command_set(cls=(0x0002, uid(sop_class)), field=(0x0100, us(0x0001)),
                       msgid=(0x0110, us(msg_id)), prio=(0x0700, us(0)),
                       dstype=(0x0800, us(0x0000)), inst=(0x1000, uid(sop_instance)))


def pdv(cx: int, control: int, fragment: bytes) -> bytes:
    return (b"\x04\x00" + struct.pack(">I", len(fragment) + 6)
            + struct.pack(">IBB", len(fragment) + 2, cx, control) + fragment)


def send_data(sock: socket.socket, data: bytes, *, last: bool, chunk: int = 128 * 1024) -> None:
    for start in range(0, len(data), chunk):
        end = min(len(data), start + chunk)
        sock.sendall(pdv(1, 0x02 if last and end == len(data) else 0x00, data[start:end]))


def associated(engine) -> socket.socket:
    sock = connect(engine)
    sock.sendall(associate_rq(contexts=((1, CT, EXPLICIT_LE),)))
    assert recv_pdu(sock)[:1] == b"\x02"
    return sock


def status_of(sock: socket.socket) -> int:
    _, rsp = read_message(sock)
    assert element(rsp, 0x0100) == us(0x8001), rsp
    return struct.unpack("<H", element(rsp, 0x0900))[0]


def big_object(tmp_path, name: str, size: int) -> tuple[bytes, str]:
    ds = dicomgen.make_image(pixel_bytes=size)
    path = dicomgen.save(ds, tmp_path / f"{name}.dcm")
    data, ts = dicomgen.dataset_bytes(path)
    assert ts == EXPLICIT_LE
    return data, str(ds.SOPInstanceUID)


def test_budget_arithmetic():
    budget = InflightBudget(10)
    assert budget.take(8, 0)                 # alone: always
    assert not budget.take(5, 0)             # another object would go over
    assert budget.take(5, 8)                 # the only holder may go over (up to max_object_mb)
    budget.give(13)
    assert budget.used == 0 and budget.take(20, 0) and budget.refusals == 1


def test_pre_association_limits_from_the_config():
    """max_pending_connections / max_pending_per_address: 0 is the descriptor-based
    bound; a configured value is kept under it; per address never exceeds the total."""
    from dataclasses import replace

    from mfconsole.config import ListenerConfig

    cfg = ListenerConfig(name="l", ae_title="MF_SCP", host="127.0.0.1", port=104, calling_aets=("*",))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    bound = max(64, (1 << 20 if soft == resource.RLIM_INFINITY else soft) // 2)
    auto = min(8192, bound)
    assert acceptor.pending_limits(cfg) == (auto, max(16, auto // 2))
    assert acceptor.pending_limits(replace(cfg, max_pending_connections=40, max_pending_per_address=10)) == (40, 10)
    assert acceptor.pending_limits(replace(cfg, max_pending_connections=40, max_pending_per_address=99)) == (40, 40)
    assert acceptor.pending_limits(replace(cfg, max_pending_connections=bound + 1))[0] == bound


def test_an_object_over_the_in_flight_budget_is_refused_transiently_and_nothing_is_lost(
        engine_factory, tmp_path):
    # 1 MiB: what A holds of its object before it streams into its blob (and then no more).
    engine = engine_factory(listener=UL, store={"inflight_mb": 1})
    budget = engine.listeners[0].inflight
    assert budget is engine.inflight and budget.limit == MiB
    first, first_uid = big_object(tmp_path, "a", int(1.5 * MiB))
    second, second_uid = big_object(tmp_path, "b", int(1.5 * MiB))
    a, b = associated(engine), associated(engine)
    # A holds 1 MiB of its object, not yet whole.
    a.sendall(pdv(1, 0x03, store_rq(1, CT, first_uid)))
    send_data(a, first[:MiB], last=False)
    poll(lambda: budget.used >= MiB, message="A's first MiB in flight")
    # B's object would take the budget over 1 MiB: refused 0xA700, its bytes dropped.
    b.sendall(pdv(1, 0x03, store_rq(1, CT, second_uid)))
    send_data(b, second, last=True)
    assert status_of(b) == 0xA700
    assert budget.used <= MiB + 128 * 1024     # B holds nothing
    # A goes on and is stored; then B's retry fits.
    send_data(a, first[MiB:], last=True)
    assert status_of(a) == 0x0000
    b.sendall(pdv(1, 0x03, store_rq(2, CT, second_uid)))
    send_data(b, second, last=True)
    assert status_of(b) == 0x0000
    for sock in (a, b):
        sock.sendall(b"\x05\x00" + struct.pack(">I", 4) + b"\0" * 4)   # A-RELEASE-RQ
        assert recv_pdu(sock)[:1] == b"\x06"
        sock.close()
    assert budget.used == 0 and budget.refusals == 1
    stored = stored_sha256(engine.data_dir)
    assert stored == {first_uid: hashlib.sha256(first).hexdigest(),
                      second_uid: hashlib.sha256(second).hexdigest()}
    assert len(objects(engine)) == 2
    [row] = audit(engine, "refused")
    assert row["status"] == "0xA700" and "in-flight budget" in row["detail"], dict(row)
    assert row["sop_instance_uid"] == second_uid


def test_an_object_cut_short_gives_its_budget_back(engine_factory, tmp_path):
    engine = engine_factory(listener=UL, store={"inflight_mb": 2})
    data, sop_uid = big_object(tmp_path, "a", MiB)
    a = associated(engine)
    a.sendall(pdv(1, 0x03, store_rq(1, CT, sop_uid)))
    send_data(a, data[:512 * 1024], last=False)
    poll(lambda: engine.inflight.used >= 512 * 1024, message="half in flight")
    a.close()
    poll(lambda: engine.inflight.used == 0, message="the budget given back")


def test_a_connect_close_flood_is_summarized_in_the_log(engine_factory, monkeypatch):
    monkeypatch.setattr(acceptor._Quiet, "INTERVAL", 1.0)
    engine = engine_factory(listener=UL)
    for _ in range(200):
        socket.create_connection(("127.0.0.1", port_of(engine)), timeout=5).close()
    logfile = engine.data_dir / "logs" / "mfconsole.log"

    def counted():
        lines = logfile.read_text().splitlines()
        single = [line for line in lines if "closed before association" in line and " more " not in line]
        summaries = [int(m.group(1)) for line in lines
                     if (m := re.search(r"(\d+) more connection\(s\) closed before association", line))]
        return (len(single), summaries) if len(single) + sum(summaries) >= 200 else None

    single, summaries = poll(counted, timeout=15, message="200 closed connections accounted for")
    assert single == acceptor._Quiet.FEW and sum(summaries) == 200 - single, (single, summaries)
    assert 1 <= len(summaries) <= 8, summaries     # one per second of flood, not one per connection


def test_engine_raises_the_soft_nofile_limit_to_the_hard_one(engine_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"hard limit {hard}: nothing to raise to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        engine = engine_factory(listener=UL)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        log = (engine.data_dir / "logs" / "mfconsole.log").read_text()
        assert f"RLIMIT_NOFILE: soft limit raised from 1024 to {hard}" in log
        # The pre-association bounds are sized on the raised limit.
        assert engine.listeners[0].pending_max == max(64, min(8192, hard // 2))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]), hard))
