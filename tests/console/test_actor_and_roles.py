"""Who did it, and who may: every operator action is audited with the actor the engine
read from the control socket's peer credentials; a read-only connection (the socket it
came in on, never a flag in the request) can neither change anything nor see patient
data; against a running engine the CLI acts through the socket."""

from __future__ import annotations

import json
import os
import pwd
import socket
from pathlib import Path

import pytest

import dicomgen
from harness import CANARY_NAME, mfconsole, poll, store_files

from mfconsole import actor
from mfconsole.client import ClientError, InProcessClient, open_client
from mfconsole.config import load
from mfconsole.control import RO_SOCKET_NAME, SOCKET_NAME, ControlError, request
from mfconsole.repository import Tx, db_path, writing

ME = f"{pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()}"      # "root (uid 0" as root


def raw(path: Path, message: dict) -> dict:
    """A hand-written request: whatever a client cares to send."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(json.dumps(message).encode() + b"\n")
        return json.loads(sock.makefile().readline())


def state(db) -> dict:
    """Everything an action could change."""
    return {"deliveries": [(r["id"], r["state"], r["destination"], r["retry_at"])
                           for r in db.rows("deliveries")],
            "destinations": [tuple(r.values()) for r in db.rows("destination_state")],
            "audit": len([r for r in db.rows("audit")
                          if r["event"] not in ("retry_scheduled", "destination_down", "requeued")])}


def audit_rows(db, event: str) -> list[dict]:
    return db.rows("audit", event=event)


@pytest.fixture
def served(serve_factory, tmp_path):
    """`mfconsole serve` with three stored objects for a paused PACS, two of them made
    dead letters; the third stays pending."""
    serve = serve_factory()
    store_files(serve.port, dicomgen.write_corpus(tmp_path / "sr", 3))
    operator = serve.data_dir / SOCKET_NAME
    poll(operator.exists, timeout=20, message="the control socket")
    request(operator, "pause", {"destination": "pacs"})
    with serve.db() as db:
        poll(lambda: len(db.rows("deliveries", state="pending")) == 3,
             timeout=20, message="three deliveries pending, none in flight")
        ids = [r["id"] for r in db.rows("deliveries")]

    def bury(tx: Tx, delivery_id: int) -> None:
        """Dead-letter one delivery beside the running engine (its queue is paused),
        keeping what it had: only state, status and reason change."""
        [d] = tx.rows("deliveries", id=delivery_id)
        tx.set_outcome(delivery_id, state="dead", attempts=d["attempts"], retry_at=d["retry_at"],
                       status="0xC000", label=d["last_class"], reason="test: cannot understand",
                       now=d["updated_at"])

    with writing(db_path(serve.data_dir)) as run:
        for delivery_id in ids[:2]:
            run(bury, delivery_id)
    serve.ids = ids
    return serve


def test_a_read_only_connection_refuses_every_change_and_every_reveal(served):
    ro, config = served.data_dir / RO_SOCKET_NAME, served.config
    dead, pending = served.ids[0], served.ids[2]
    assert ro.exists() and (ro.stat().st_mode & 0o777) == 0o600
    before_config = config.read_bytes()
    with served.db() as db:
        before = state(db)
    asks = [("pause", {"destination": "pacs"}), ("resume", {"destination": "pacs"}),
            ("replay", {"ids": [dead]}), ("replay", {"all_": True}),
            ("discard", {"ids": [dead]}), ("discard", {"destination": "pacs"}),
            ("reveal", {"id": dead}), ("reveal", {"id": pending}),
            ("preview_handler", {"name": "anything", "delivery_id": dead}),
            ("edit_config", {"changes": {"listeners[0].ae_title": "HACKED"}}),
            ("reload", {}), ("reload_handler", {"name": "anything"})]
    for op, args in asks:
        # The flags a client might send to raise itself are not read.
        for extra in ({}, {"read_only": False}, {"role": "operator"}):
            reply = raw(ro, {"op": op, "args": args, **extra})
            assert reply["ok"] is False and "read-only" in reply["error"], (op, extra, reply)
            assert CANARY_NAME not in json.dumps(reply)
    # An actor in the arguments does not pass for the engine's: refused, not recorded.
    assert raw(ro, {"op": "pause", "args": {"destination": "pacs", "actor": "mallory"}})["ok"] is False
    # Observation still works on it, routing-safe.
    snap = raw(ro, {"op": "snapshot", "args": {}})
    assert snap["ok"] and snap["result"]["dead_letters"] == 2
    letters = raw(ro, {"op": "dead_letters", "args": {}})
    assert letters["ok"] and len(letters["result"]) == 2 and CANARY_NAME not in json.dumps(letters)
    with served.db() as db:
        assert state(db) == before
        assert not audit_rows(db, "phi_revealed")
    assert config.read_bytes() == before_config
    # The read-only console is that connection.
    client = open_client(load(config), read_only=True)
    assert client.socket_path == ro
    for act in (lambda: client.pause("pacs"), lambda: client.reveal(dead), lambda: client.replay([dead]),
                lambda: client.preview_handler("x")):
        with pytest.raises(ClientError, match="read-only"):
            act()


def test_operator_actions_are_audited_with_the_peers_uid_and_name(served):
    op = served.data_dir / SOCKET_NAME
    dead, other, pending = served.ids
    # A pending delivery's patient is nobody's business: refused, and nothing audited.
    with pytest.raises(ControlError, match="not a dead letter"):
        request(op, "reveal", {"id": pending})
    fields = dict(request(op, "reveal", {"id": dead})["fields"])
    assert fields["patient name"] == CANARY_NAME
    assert request(op, "replay", {"ids": [dead]})["queued"] == 1
    assert request(op, "discard", {"ids": [other]})["discarded"] == 1
    request(op, "resume", {"destination": "pacs"})
    request(op, "pause", {"destination": "pacs"})
    with served.db() as db:
        poll(lambda: audit_rows(db, "phi_revealed"), timeout=10, message="the reveal audited")
        rows = {e: audit_rows(db, e) for e in ("phi_revealed", "replayed", "discarded",
                                               "destination_resumed", "destination_paused")}
    assert len(rows["phi_revealed"]) == 1 and rows["phi_revealed"][0]["delivery_id"] == dead
    assert len(rows["destination_paused"]) == 2         # the fixture's pause, and this one
    for event, found in rows.items():
        for row in found:
            assert row["actor"].startswith(ME) and row["actor"].endswith("via control socket"), row
            assert ME in row["detail"] and "operator" not in row["detail"].split(":")[0], row
            assert CANARY_NAME not in row["detail"]


def test_the_cli_acts_through_a_running_engine_and_reload_prints_its_report(served):
    config = served.config
    res = mfconsole("--config", str(config), "resume", "pacs")
    assert res.returncode == 0, res.stderr
    res = mfconsole("--config", str(config), "pause", "pacs")
    assert res.returncode == 0, res.stderr
    res = mfconsole("--config", str(config), "dead-letters", "replay", str(served.ids[0]))
    assert res.returncode == 0 and "1 dead letter(s) queued again" in res.stdout, res.stderr
    res = mfconsole("--config", str(config), "dead-letters", "discard", "--destination", "pacs",
                    "--reason", "cannot understand")
    assert res.returncode == 0 and "1 dead letter(s) discarded" in res.stdout, res.stderr
    res = mfconsole("--config", str(config), "pause", "nowhere")       # checked before asking
    assert res.returncode == 2 and "no destination named" in res.stderr
    res = mfconsole("--config", str(config), "reload")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"reload done (pid {served.proc.pid}): no change"
    with served.db() as db:
        poll(lambda: audit_rows(db, "reloaded"), timeout=10, message="the reload audited")
        for event in ("destination_resumed", "destination_paused", "replayed", "discarded", "reloaded"):
            row = audit_rows(db, event)[-1]
            assert row["actor"].startswith(ME) and "via control socket" in row["detail"], row
        assert db.destination_state("pacs")["paused"] == 1


def test_without_an_engine_the_cli_writes_itself_and_names_its_user(serve_factory):
    serve = serve_factory()
    poll((serve.data_dir / SOCKET_NAME).exists, timeout=20, message="the control socket")
    serve.stop()
    res = mfconsole("--config", str(serve.config), "pause", "pacs")
    assert res.returncode == 0, res.stderr
    with serve.db() as db:
        row = audit_rows(db, "destination_paused")[-1]
    assert row["actor"] == actor.local(via="CLI") and row["actor"].startswith(ME)
    assert row["detail"].startswith(f"by {ME}") and "control socket" not in row["detail"]
    res = mfconsole("--config", str(serve.config), "reload")
    assert res.returncode == 1 and "no engine is serving" in res.stderr


def test_an_in_process_read_only_console_is_read_only_for_its_lifetime(engine):
    client = InProcessClient(engine, read_only=True)
    for act in (lambda: client.pause("pacs"), lambda: client.reveal(1), lambda: client.reload(),
                lambda: client.edit_config({"listeners[0].ae_title": "X"})):
        with pytest.raises(ClientError, match="read-only"):
            act()
    assert client.snapshot()["destinations"][0]["name"] == "pacs"
    InProcessClient(engine).pause("pacs")
    row = poll(lambda: engine.store.reader().rows("audit", event="destination_paused"), timeout=10)[0]
    assert row["actor"].startswith(ME) and row["actor"].endswith("via in-process console")


def test_the_actor_in_words():
    name = pwd.getpwuid(0).pw_name
    assert actor.describe(0) == f"{name} (uid 0)"
    assert actor.describe(0, sudo_user="bob", via="control socket") == \
        f"{name} (uid 0, via sudo from bob) via control socket"
    assert actor.describe(0, loginuid=0xFFFFFFFF) == f"{name} (uid 0)"         # no login session
    assert actor.describe(0, loginuid=0) == f"{name} (uid 0)"
    assert "logged in as uid 4242" in actor.describe(0, loginuid=4242)
    assert actor.describe(0, sudo_user="x; DROP TABLE") == f"{name} (uid 0)"   # not a user name
    assert actor.describe(4242).startswith("unknown user (uid 4242")
    assert actor.of_process(os.getpid(), os.getuid()).startswith(ME)
    assert actor.of_process(999_999_999, os.getuid()).startswith(ME)        # unreadable: still an answer


def test_read_only_is_an_allow_list_of_observations():
    from mfconsole.control import MUTATING, READ_ONLY_OPS, ControlService

    ops = {name[3:] for name in dir(ControlService) if name.startswith("op_")}
    assert READ_ONLY_OPS < ops
    assert not READ_ONLY_OPS & (MUTATING | {"reveal", "preview_handler"})
