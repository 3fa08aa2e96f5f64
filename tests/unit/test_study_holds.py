"""Study-stable delivery's bookkeeping on a real schema (engine/holds.py, the
study_holds rows, the held state): a hold pushed back by each instance, released in
one transaction, late instances by policy, whole-study claims, the release clock,
purge keeping held objects, and the destination keys' checks."""

from __future__ import annotations

import time

import pytest

from harness import plant
from mfconsole.config import ConfigError, parse
from mfconsole.engine import holds, outbox
from mfconsole.repository import Tx, connect, migrate
from mfconsole.repository.states import HELD, PENDING


@pytest.fixture
def tx(tmp_path):
    c = connect(tmp_path / "t.db")
    migrate(c)
    yield Tx(c)
    c.close()


def ingest(tx: Tx, uid: str, study: str, now: float, *, dest: str = "web", hold_s: float = 2.0,
           update: bool = False) -> int:
    """What the store's commit does for one object routed to a study-stable destination."""
    object_id = tx.insert_object({"sop_instance_uid": uid, "version": 1, "digest": "d", "blob": "f",
                                  "study_uid": study, "received_at": now, "size": 10}, None)
    state = HELD if tx.hold_study(dest, study, now, hold_s, update) else PENDING
    tx.add_deliveries(object_id, None, [(dest, None, None, 0, state)], now)
    return object_id


def states(tx: Tx) -> dict[str, str]:
    uid = {o["id"]: o["sop_instance_uid"] for o in tx.rows("objects")}
    return {uid[d["object_id"]]: d["state"] for d in tx.rows("deliveries")}


def hold(tx: Tx, study: str, dest: str = "web") -> dict:
    row, = [r for r in tx.rows("study_holds", destination=dest) if r["study_uid"] == study]
    return row


def test_each_instance_pushes_the_release_back_and_nothing_goes_before(tx):
    t0 = 1000.0
    ingest(tx, "1", "S", t0)
    ingest(tx, "2", "S", t0 + 1.5)
    assert hold(tx, "S")["release_at"] == t0 + 3.5 and hold(tx, "S")["objects"] == 2
    assert holds.release(tx, "web", now=t0 + 3.4) == t0 + 3.5       # not yet
    assert set(states(tx).values()) == {HELD}
    assert outbox.claim(tx, "web", 10, now=t0 + 3.4) == []          # held is never claimed
    assert holds.release(tx, "web", now=t0 + 3.6) is None           # released, nothing else held
    assert set(states(tx).values()) == {PENDING}
    row = hold(tx, "S")
    assert row["release_at"] is None and row["released_at"] == t0 + 3.6
    audit, = tx.rows("audit", event="study_released")
    assert "study S: 2 held deliveries queued" in audit["detail"]


def test_studies_released_together_are_claimed_study_by_study(tx):
    t0 = 1000.0
    for i in range(6):       # two studies, their instances interleaved
        ingest(tx, f"{i}", "A" if i % 2 else "B", t0 + i * 0.1)
    holds.release(tx, "web", now=t0 + 10)
    items = outbox.claim(tx, "web", 10, now=t0 + 10, whole_studies=True)
    assert [i.study_uid for i in items] == ["B", "B", "B", "A", "A", "A"]


def test_a_whole_study_claim_takes_the_rest_of_the_study_beyond_the_limit_and_not_yet_due(tx):
    t0 = 1000.0
    for i in range(5):
        ingest(tx, f"{i}", "S", t0)
    ingest(tx, "other", "T", t0 + 50)
    holds.release(tx, "web", now=t0 + 10)
    plant(tx, "UPDATE deliveries SET retry_at = ? WHERE id IN (4, 5)", (t0 + 99,))   # backed off
    items = outbox.claim(tx, "web", 2, now=t0 + 10, whole_studies=True)
    assert sorted(i.sop_instance_uid for i in items) == ["0", "1", "2", "3", "4"]


def test_a_late_instance_alone_goes_pending_and_the_study_stays_released(tx):
    t0 = 1000.0
    ingest(tx, "1", "S", t0)
    holds.release(tx, "web", now=t0 + 5)
    ingest(tx, "late", "S", t0 + 6)
    assert states(tx)["late"] == PENDING
    assert hold(tx, "S")["release_at"] is None


def test_a_late_instance_with_update_is_held_again_as_a_new_group(tx):
    t0 = 1000.0
    ingest(tx, "1", "S", t0, update=True)
    holds.release(tx, "web", now=t0 + 5)
    ingest(tx, "late", "S", t0 + 6, update=True)
    ingest(tx, "late2", "S", t0 + 7, update=True)
    assert states(tx) == {"1": PENDING, "late": HELD, "late2": HELD}
    row = hold(tx, "S")
    assert (row["release_at"], row["objects"], row["updating"]) == (t0 + 9, 2, 1)
    holds.release(tx, "web", now=t0 + 9.5)
    assert set(states(tx).values()) == {PENDING}
    assert tx.rows("audit", event="study_released")[-1]["status"] == "update"


def test_everything_is_released_when_the_destination_is_no_longer_study_stable(tx):
    t0 = time.time()
    ingest(tx, "1", "S", t0, hold_s=3600)
    ingest(tx, "2", "T", t0, hold_s=3600)
    assert holds.release(tx, "web", everything=True, now=t0 + 1) is None
    assert set(states(tx).values()) == {PENDING}
    assert tx.next_release("web") is None


def test_holds_are_per_destination(tx):
    t0 = 1000.0
    ingest(tx, "1", "S", t0, dest="web", hold_s=2)
    object_id = tx.insert_object({"sop_instance_uid": "2", "version": 1, "digest": "d", "blob": "f",
                                  "study_uid": "S", "received_at": t0}, None)
    tx.add_deliveries(object_id, None, [("pacs", None)], t0)        # an instance destination
    holds.release(tx, "web", now=t0 + 3)
    assert tx.held_studies() == []
    assert [d["state"] for d in tx.rows("deliveries")] == [PENDING, PENDING]


def test_purge_keeps_objects_with_held_deliveries(tx):
    t0 = 1000.0
    ingest(tx, "1", "S", t0)
    blobs, _ = tx.purge_batch(t0 + 10**6, (float("-inf"), 0), 100, t0 + 10**6)
    assert blobs == [] and tx.rows("objects")[0]["purged_at"] is None


def test_released_hold_rows_are_forgotten_after_the_retention(tx):
    ingest(tx, "1", "S", 1000.0)
    holds.release(tx, "web", now=1005.0)
    assert tx.forget_released_holds(1004.0) == 0
    assert tx.forget_released_holds(1006.0) == 1


def test_the_release_clock_is_a_lower_bound():
    clock = holds.ReleaseClock()
    assert clock.due(0.0)                       # the first round looks at the table
    clock.set(None)
    assert not clock.due(10**9)
    clock.noted(50.0)
    clock.noted(60.0)
    assert not clock.due(49.9) and clock.due(50.0)
    clock.set(60.0)                             # a release at 50: the table says 60 next
    clock.noted(70.0)                           # committed after that release's query
    clock.set(None)                             # the next release saw nothing...
    assert clock.due(70.0) and not clock.due(69.0)   # ...but 70 is kept


# -- config ------------------------------------------------------------------------

def load(tmp_path, **dest) -> object:
    raw = {"engine": {"data_dir": str(tmp_path / "data")}, "store": {"key_file": str(tmp_path / "k")},
           "listeners": [{"name": "in", "ae_title": "MF", "port": 11112, "host": "127.0.0.1"}],
           "destinations": [{"name": "web", "kind": "stow", "url": "http://127.0.0.1:8042/dicom-web",
                             **dest}],
           "routes": [{"from": "in", "to": ["web"]}],
           "egress": {"allowed_http": ["http://127.0.0.1:8042/dicom-web"]}}
    return parse(raw, tmp_path / "config.toml")


def problems(tmp_path, **dest) -> dict[str, str]:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, **dest)
    return dict(exc.value.problems)


def test_config_defaults_and_values(tmp_path):
    d = load(tmp_path).destinations[0]
    assert (d.trigger, d.stable_after_s, d.late_instance, d.study_stable) == ("instance", 30.0, "alone", False)
    d = load(tmp_path, trigger="study_stable", stable_after_s=2, late_instance="update").destinations[0]
    assert (d.trigger, d.stable_after_s, d.late_instance, d.study_stable) == ("study_stable", 2.0, "update", True)


@pytest.mark.parametrize("dest, key, why", [
    ({"trigger": "study"}, "trigger", 'must be "instance" or "study_stable"'),
    ({"trigger": "study_stable", "stable_after_s": 0}, "stable_after_s", "must be between 1 and 86400"),
    ({"trigger": "study_stable", "stable_after_s": 90000}, "stable_after_s", "must be between 1 and 86400"),
    ({"trigger": "study_stable", "stable_after_s": "30"}, "stable_after_s", "must be a number"),
    ({"trigger": "study_stable", "late_instance": "drop"}, "late_instance", 'must be "alone" or "update"'),
    ({"stable_after_s": 5}, "stable_after_s", 'does not apply: trigger is not "study_stable"'),
    ({"late_instance": "update"}, "late_instance", 'does not apply: trigger is not "study_stable"'),
])
def test_config_errors_name_the_key(tmp_path, dest, key, why):
    assert problems(tmp_path, **dest)[f"destinations[0].{key}"] == why
