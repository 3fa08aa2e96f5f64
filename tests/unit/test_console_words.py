"""The console's words for what the engine reports: echo results carry when they were
taken and say their age once old; log lines fit a narrow terminal; counts fit a narrow
column; a failing destination says so, with its last failure in full."""

from __future__ import annotations

from mfconsole.console import format as fmt

NOW = 1_790_000_000.0


def test_an_echo_result_says_when_and_greys_when_old():
    fresh = fmt.echo_result({"ok": True, "rtt_ms": 3.2, "at": NOW - 10}, now=NOW)
    assert fresh.plain.startswith("✓ OK 3 ms at ") and "dim" not in str(fresh.style)
    old = fmt.echo_result({"ok": True, "rtt_ms": 3.2, "at": NOW - 3600}, now=NOW)
    assert old.plain == "✓ OK 3 ms 1h00m ago" and "dim" in str(old.style)
    failed = fmt.echo_result({"ok": False, "detail": "refused", "at": NOW - 5}, now=NOW)
    assert failed.plain.startswith("✗ refused at ")


def test_log_lines_keep_the_message_on_a_narrow_terminal():
    line = "2026-09-21 14:02:02,000 WARNING mfconsole.listener: listener modalities: rejected"
    assert fmt.short_log_line(line) == "14:02:02 W listener: listener modalities: rejected"
    assert fmt.short_log_line("a continuation line") == "a continuation line"


def test_compact_counts():
    assert [fmt.compact(n) for n in (0, 9_999, 17_900, 812_345, 3_400_000)] == \
        ["0", "9 999", "17.9k", "812k", "3.4M"]
    assert fmt.now_and_lifetime(1180, 17900, narrow=True) == "1 180/17.9k"


def test_a_destination_failing_behind_a_working_transport_is_named_with_its_last_failure():
    item = {"name": "pacs", "state": "up", "health": {
        "outcomes": 50, "failed_share": 1.0, "failing": True, "status": "0x0122",
        "last_failure": "attempt 1: permanent/message: 0x0122 SOP class not supported"}}
    assert fmt.destination_state(item).plain == "⚠ failing 100 % (0x0122)"
    assert fmt.destination_state(item, wide=False).plain == "⚠ failing 100 %"
    text = fmt.problem(item, NOW).plain
    assert "100 % of the last 50 outcomes failed, mostly 0x0122" in text and "SOP class not supported" in text
    healthy = {"name": "pacs", "state": "up", "health": {"failing": False, "failed_share": 0.1}}
    assert fmt.problem(healthy, NOW) is None and fmt.destination_state(healthy).plain == "✓ up"


def test_a_failed_connect_says_which_way_it_failed():
    import errno
    import socket

    from mfconsole.dimse.sender import connect_failure

    assert connect_failure(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), 10).startswith(
        "connection refused")
    assert connect_failure(socket.timeout("timed out"), 10).startswith("no answer within connect_timeout_s=10")
    assert connect_failure(OSError(errno.EHOSTUNREACH, "no route"), 10).startswith("unreachable (EHOSTUNREACH")
    assert "connect_timeout_s=10" in connect_failure(None, 10)


def test_a_paced_destination_says_its_window_cap_and_urgent_queue(tmp_path):
    """From what `status` collects (no database yet) to the console's words: outside
    its window with the next opening, not shouted; its rate cap; urgent pending."""
    import time

    from harness import write_config
    from mfconsole.config import load
    from mfconsole.console.destinations import destination_row, detail
    from mfconsole.engine.status import collect

    hour = time.localtime().tm_hour
    closed = f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"
    config = load(write_config(tmp_path, destinations=[
        {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": 11113, "ae_title": "PACS",
         "windows": [closed], "urgent_ignores_window": True, "max_objects_per_s": 20,
         "max_mb_per_s": 2.5}]))
    item = collect(config)["destinations"][0]
    assert item["state"] == "outside_window" and item["urgent_pending"] == 0
    opens = f"{(hour + 2) % 24:02d}:00"
    assert item["window"]["next_change"].endswith(opens)
    state = fmt.destination_state(item)
    assert state.plain == "◷ outside window" and "reverse" not in str(state.style)
    assert fmt.problem(item, NOW).plain.endswith(
        f"nothing is sent until {item['window']['next_change']} (urgent deliveries still go)")
    assert fmt.pacing(item) == [
        f"window {closed}: closed until {item['window']['next_change']} (urgent deliveries ignore it)",
        "rate cap 20 objects/s, 2.5 MiB/s"]
    row = destination_row({**item, "counts": {"pending": 1204}, "urgent_pending": 3}, NOW, None)
    assert row[2] == "1 204 (3 urgent)"
    text = detail({**item, "urgent_pending": 3, "outcomes": []}, NOW, None).renderables[0].plain
    assert "rate cap 20 objects/s" in text and "urgent pending 3" in text
