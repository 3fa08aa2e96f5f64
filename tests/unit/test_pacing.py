"""Priority and pacing per destination, below the workers: delivery windows read and
judged (mfconsole/windows.py) and checked in config.toml with key paths, the rate-cap
schedule (engine/pacing.py) on injected clocks, urgent deliveries claimed first
(outbox.due) through one index range, and [[rules]] priority. The integration tests
(tests/integration/test_pacing_peers.py) drive the same against storescp."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from harness import plant, write_config
from mfconsole.config import ConfigError, load
from mfconsole.engine import outbox
from mfconsole.engine.pacing import CLOSED, OPEN, URGENT_ONLY, Pacer
from mfconsole.engine.router import Router
from mfconsole.repository import Tx, connect, migrate
from mfconsole.repository.writes import transaction
from mfconsole.rules import URGENT, Facts
from mfconsole.windows import describe, parse, schedule

MON, TUE, FRI, SAT, SUN = 0, 1, 4, 5, 6


def at(day: int, hh: int, mm: int = 0) -> float:
    """A local timestamp on a weekday (0 = Monday) of the week from Monday 2026-06-01
    (and the Monday after): no zone changes its clocks in early June."""
    return datetime(2026, 6, 1 + day, hh, mm).timestamp()


# -- windows: reading ---------------------------------------------------------------------

@pytest.mark.parametrize("text,days,start,end", [
    ("18:00-07:00", set(range(7)), 18 * 60, 7 * 60),
    ("Mon-Fri 08:00-18:00", {MON, TUE, 2, 3, FRI}, 8 * 60, 18 * 60),
    ("sat,SUN 0:00-24:00", {SAT, SUN}, 0, 1440),
    ("Fri-Mon 22:00-06:00", {FRI, SAT, SUN, MON}, 22 * 60, 6 * 60),
    ("Mon,Wed-Fri 08:00-09:30", {MON, 2, 3, FRI}, 8 * 60, 9 * 60 + 30),
])
def test_ranges_are_read(text, days, start, end):
    found, why = parse(text)
    assert why is None and (set(found.days), found.start, found.end) == (days, start, end)


@pytest.mark.parametrize("text,says", [
    ("18-07", "is not a time range"),
    ("25:00-07:00", "'25:00' is not a time of day"),
    ("08:60-09:00", "'08:60' is not a time of day"),
    ("24:00-07:00", "'24:00' is not a time of day (00:00 to 23:59)"),
    ("10:00-10:00", "an empty range"),
    ("Mo-Fr 08:00-18:00", "three-letter English day names"),
    ("Mon-Fri-Sat 08:00-18:00", "three-letter English day names"),
])
def test_bad_ranges_say_why(text, says):
    found, why = parse(text)
    assert found is None and says in why


def test_a_window_wrapping_midnight_belongs_to_the_day_it_starts():
    s = schedule(("Fri 22:00-06:00",))
    assert not s.open_at(at(FRI, 21, 59)) and s.open_at(at(FRI, 22))
    assert s.open_at(at(SAT, 5, 59)) and not s.open_at(at(SAT, 6))
    assert not s.open_at(at(SAT, 23)) and not s.open_at(at(MON, 1))   # Thursday night neither
    assert not s.open_at(at(FRI, 3))


def test_blackout_wins_over_windows_and_alone_closes_only_itself():
    s = schedule(("08:00-18:00",), ("12:00-13:00",))
    assert s.open_at(at(TUE, 11, 59)) and not s.open_at(at(TUE, 12, 30)) and s.open_at(at(TUE, 13))
    alone = schedule((), ("Sun 01:00-03:00",))
    assert alone.open_at(at(SAT, 1, 30)) and not alone.open_at(at(SUN, 1, 30))
    assert not schedule() and schedule().open_at(at(MON, 3))


def test_next_change_is_the_next_boundary_that_changes_anything():
    s = schedule(("Mon-Fri 18:00-07:00",))
    assert s.next_change(at(TUE, 12)) == at(TUE, 18)
    assert s.next_change(at(TUE, 18)) == at(2, 7)            # open: closes Wednesday 07:00
    # Friday night runs into Saturday morning; then nothing until Monday evening.
    assert s.next_change(at(SAT, 6)) == at(SAT, 7)
    assert s.next_change(at(SAT, 8)) == at(MON + 7, 18)
    # Two ranges meeting at midnight are one: no change at 00:00.
    joined = schedule(("22:00-24:00", "00:00-02:00"))
    assert joined.next_change(at(TUE, 23)) == at(2, 2)
    assert schedule(("00:00-24:00",)).next_change(at(TUE, 12)) is None


def test_describe_says_the_day_beyond_today():
    now = time.time()
    today = datetime.fromtimestamp(now).replace(hour=18, minute=0, second=0, microsecond=0)
    assert describe(today.timestamp()) == "18:00"
    assert describe(today.timestamp() + 2 * 86400).endswith(" 18:00")
    assert describe(None) == ""


# -- the destination keys -------------------------------------------------------------------

def dest(**keys: Any) -> dict[str, Any]:
    return {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": 11113, "ae_title": "PACS",
            **keys}


def problems(tmp_path: Path, **keys: Any) -> list[tuple[str, str]]:
    path = write_config(tmp_path, destinations=[dest(**keys)])
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value.problems


@pytest.mark.parametrize("keys,where,says", [
    ({"windows": ["18:00-07:00", "7pm-8pm"]}, "destinations[0].windows[1]", "is not a time range"),
    ({"windows": "18:00-07:00"}, "destinations[0].windows", "must be a list"),
    ({"blackout": ["Mon 25:00-26:00"]}, "destinations[0].blackout[0]", "'25:00' is not a time of day"),
    ({"urgent_ignores_window": True}, "destinations[0].urgent_ignores_window", "no windows or blackout"),
    ({"max_objects_per_s": 0}, "destinations[0].max_objects_per_s", "greater than 0"),
    ({"max_mb_per_s": "fast"}, "destinations[0].max_mb_per_s", "must be a number"),
])
def test_destination_pacing_errors_name_the_key(tmp_path, keys, where, says):
    assert any(key == where and says in why for key, why in problems(tmp_path, **keys)), \
        problems(tmp_path, **keys)


def test_destination_pacing_keys_are_typed(tmp_path):
    config = load(write_config(tmp_path, destinations=[dest(
        windows=["Mon-Fri 18:00-07:00"], blackout=["Sun 01:00-03:00"], urgent_ignores_window=True,
        max_objects_per_s=20, max_mb_per_s=2.5)]))
    d = config.destination("pacs")
    assert d.windows == ("Mon-Fri 18:00-07:00",) and d.blackout == ("Sun 01:00-03:00",)
    assert (d.max_objects_per_s, d.max_mb_per_s, d.urgent_ignores_window) == (20.0, 2.5, True)
    assert d.schedule().open_at(at(TUE, 20)) and not d.schedule().open_at(at(SUN, 2))


# -- the pacer: windows and the rate cap, on injected clocks ---------------------------------

class Clocks:
    def __init__(self, wall: float):
        self.wall, self.mono = wall, 1000.0


def pacer(clocks: Clocks, **keys: Any) -> Pacer:
    d = load(write_config(Path(keys.pop("folder")), destinations=[dest(**keys)])).destination("pacs")
    return Pacer(d, clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)


def test_the_window_and_urgent_deliveries(tmp_path):
    clocks = Clocks(at(TUE, 12))
    p = pacer(clocks, folder=tmp_path / "a", windows=["18:00-07:00"], urgent_ignores_window=True)
    assert p.window() == URGENT_ONLY and p.window(in_order=True) == CLOSED
    assert p.seconds_to_change() == pytest.approx(6 * 3600)
    clocks.wall = at(TUE, 18)
    assert p.window() == OPEN and p.seconds_to_change() == pytest.approx(13 * 3600)
    q = pacer(Clocks(at(TUE, 12)), folder=tmp_path / "b", windows=["18:00-07:00"])
    assert q.window() == CLOSED
    assert pacer(Clocks(at(TUE, 12)), folder=tmp_path / "c").window() == OPEN


def test_the_rate_cap_spaces_sends_and_saves_nothing_up(tmp_path):
    clocks = Clocks(at(TUE, 12))
    p = pacer(clocks, folder=tmp_path, max_objects_per_s=20, max_mb_per_s=1)
    assert p.group_limits(8, 32 << 20) == (2, 104857)        # a tenth of a second's worth
    assert p.reserve(1, 1000) == 0                            # the first goes at once
    assert p.reserve(1, 1000) == pytest.approx(0.05)          # then one slot per 1/20 s
    assert p.reserve(2, 1000) == pytest.approx(0.10)
    assert p.reserve(1, 1 << 20) == pytest.approx(0.20)       # 2 objects: 0.1 s later
    assert p.reserve(1, 1000) == pytest.approx(1.20)          # 1 MiB at 1 MiB/s: a second
    clocks.mono += 60                                          # idle a minute: no burst saved
    assert p.reserve(1, 1000) == 0 and p.reserve(1, 1000) == pytest.approx(0.05)
    free = pacer(clocks, folder=tmp_path / "free")
    assert free.reserve(100, 1 << 30) == 0 and free.group_limits(8, 0) == (8, 0)


# -- urgent first ---------------------------------------------------------------------------

@pytest.fixture
def tx(tmp_path):
    c = connect(tmp_path / "t.db")
    migrate(c)
    yield Tx(c)
    c.close()


def add(tx: Tx, n: int, priority: int = 0, retry_at: float = 0.0, start: int = 0) -> list[int]:
    ids = []
    for i in range(start, start + n):
        object_id = tx.insert_object({"sop_instance_uid": f"1.2.{i}", "version": 1, "digest": "d",
                                      "blob": "file", "received_at": 0}, None)
        ids += tx.add_deliveries(object_id, None, [("pacs", None, None, priority)], retry_at)
    return ids


def test_urgent_deliveries_are_claimed_first_suspects_last(tx):
    normal = add(tx, 3)
    urgent = add(tx, 2, URGENT, start=10)
    later = add(tx, 1, URGENT, retry_at=time.time() + 3600, start=20)    # waits for its retry
    tx.mark_suspect("pacs", urgent[0])
    order = [c.delivery_id for c in outbox.due(tx, "pacs", 10)]
    assert order == [urgent[1], *normal, urgent[0]]
    assert [c.priority for c in outbox.due(tx, "pacs", 1)] == [URGENT]
    assert [c.delivery_id for c in outbox.due(tx, "pacs", 10, urgent_only=True)] == [urgent[1], urgent[0]]
    # In order (HL7): arrival order whatever the priority, and never urgent alone.
    assert [c.delivery_id for c in outbox.due(tx, "pacs", 10, ordered=True)] == [*normal, *urgent]
    assert outbox.due(tx, "pacs", 10, ordered=True, urgent_only=True) == []
    assert later[0] not in [c.delivery_id for c in outbox.due(tx, "pacs", 10)]
    claimed = outbox.claim(tx, "pacs", 2, urgent_only=True)
    assert [c.delivery_id for c in claimed] == [urgent[1], urgent[0]]
    assert tx.urgent_pending("pacs") == 1      # the one waiting for its retry


def test_the_due_query_is_one_index_range_with_100000_pending(tx):
    with transaction(tx.conn) as bulk:      # one commit, not 200 000
        plant(bulk, "INSERT INTO objects (id, sop_instance_uid, version, digest, blob, received_at) "
                    "VALUES (?, ?, 1, 'd', 'file', 0)", [(i, f"1.2.{i}") for i in range(1, 100_001)])
        plant(bulk, "INSERT INTO deliveries (object_id, destination, state, retry_at, priority) "
                    "VALUES (?, 'pacs', 'pending', ?, ?)",
              [(i, float(i), 1 if i == 99_999 else 0) for i in range(1, 100_001)])
    plan = tx.due_plan("pacs")
    assert "USING INDEX deliveries_due (destination=? AND state=? AND priority=? AND retry_at<?)" in plan
    assert "TEMP B-TREE" not in plan
    started = time.perf_counter()
    for _ in range(20):
        items = outbox.due(tx, "pacs", 32, now=time.time())
    per_claim = (time.perf_counter() - started) / 20
    assert items[0].object_id == 99_999 and [c.object_id for c in items[1:4]] == [1, 2, 3]
    assert per_claim < 0.005, f"{per_claim * 1000:.2f} ms per due query"


def test_urgent_deliveries_stay_first_when_groups_take_one_calling_ae_each():
    from mfconsole.engine.delivery import groups

    def item(i: int, calling: str, priority: int = 0) -> outbox.Claimed:
        return outbox.Claimed(i, i, 0, f"1.2.{i}", "1.2.3", "1.2.840.10008.1.2.1", study_uid="s",
                              size=10, calling_ae=calling, priority=priority)

    claimed = [item(1, "CT1", URGENT), item(2, "BACKLOG"), item(3, "CT1"), item(4, "BACKLOG")]
    assert [[i.delivery_id for i in g] for g in groups(claimed, 8, 0, by_calling_ae=True)] == \
        [[1], [2, 4], [3]]


# -- rules: priority ------------------------------------------------------------------------

def rules_config(tmp_path: Path, rules: list[dict[str, Any]], match: str = "first") -> Path:
    return write_config(tmp_path, destinations=[dest(), {**dest(), "name": "archive", "port": 11114}],
                        routes=[], rules=rules, routing={"match": match, "fallback": []})


@pytest.mark.parametrize("rule,where,says", [
    ({"name": "s", "to": ["pacs"], "priority": "high"}, "rules[0].priority", 'must be "urgent" or "normal"'),
    ({"name": "s", "action": "discard", "priority": "urgent"}, "rules[0].priority", "only applies with `to`"),
    ({"name": "s", "to": ["pacs"], "priority": 1}, "rules[0].priority", "must be a string"),
])
def test_rule_priority_errors_name_the_key(tmp_path, rule, where, says):
    with pytest.raises(ConfigError) as info:
        load(rules_config(tmp_path, [rule]))
    assert any(key == where and says in why for key, why in info.value.problems), info.value.problems


def test_with_match_all_urgent_wins_for_the_same_destination(tmp_path):
    config = load(rules_config(tmp_path, [
        {"name": "ct", "when": {"modality": "CT"}, "to": ["pacs", "archive"]},
        {"name": "stroke", "when": {"study_description": "STROKE"}, "to": ["pacs"], "priority": "urgent"},
    ], match="all"))
    router = Router(config)
    facts = Facts(listener="modalities", modality="CT", values={0x00081030: b"CT STROKE PROTOCOL"})
    decision = router.decide_for(facts)
    assert [(r.destination, r.priority) for r in decision.routes] == [("pacs", URGENT), ("archive", 0)]
    assert decision.words == "rules ct, stroke; urgent"
    plain = router.decide_for(Facts(listener="modalities", modality="CT"))
    assert [(r.destination, r.priority) for r in plain.routes] == [("pacs", 0), ("archive", 0)]
    assert plain.words == "rule ct"
