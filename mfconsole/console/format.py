"""Words and symbols for what the engine reports. Pure functions of their arguments:
times are relative to the snapshot's own clock (``generated_at``), so the same data
always renders the same way."""

from __future__ import annotations

import re
import time
from typing import Any

from rich.text import Text

SPARK = "▁▂▃▄▅▆▇█"

# Never colour alone: every state has a symbol and a word; the bad ones shout.
STATES = {
    "up": ("✓ up", ""),
    "retrying": ("↻ retrying", "bold"),
    "down": ("✗ DOWN", "bold reverse"),
    "paused": ("⏸ PAUSED", "bold reverse"),
    # Expected, not a fault: said in words, not shouted.
    "outside_window": ("◷ outside window", "bold"),
    "listening": ("✓ listening", ""),
    "stopped": ("✗ STOPPED", "bold reverse"),
}


def state(word: str) -> Text:
    label, style = STATES.get(word, (word, ""))
    return Text(label, style=style)


def duration(seconds: float | None) -> str:
    """3s, 4m12s, 2h03m, 5d02h."""
    if seconds is None:
        return ""
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def ago(ts: float | None, now: float) -> str:
    return f"{duration(now - ts)} ago" if ts else ""


def until(ts: float | None, now: float) -> str:
    if not ts:
        return ""
    return "now" if ts <= now else f"in {duration(ts - now)}"


def clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else ""


def stamp(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def short_stamp(ts: float | None) -> str:
    return time.strftime("%m-%d %H:%M", time.localtime(ts)) if ts else ""


def size(n: int | None) -> str:
    if not n:
        return "0"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def count(n: int | None) -> str:
    return f"{n or 0:,}".replace(",", " ")


def compact(n: int | None) -> str:
    """A count in at most 5 characters: 1 204, 17.9k, 812k, 3.4M."""
    n = n or 0
    if n < 10_000:
        return count(n)
    if n < 1_000_000:
        return f"{n / 1000:.1f}k" if n < 100_000 else f"{n // 1000}k"
    return f"{n / 1_000_000:.1f}M"


def now_and_lifetime(now: int | None, lifetime: int | None, *, narrow: bool = False) -> str:
    """Mirth's pair: this engine run / all time."""
    if narrow:
        return f"{compact(now)}/{compact(lifetime)}"
    return f"{count(now)} / {count(lifetime)}"


def destination_state(item: dict[str, Any], *, wide: bool = True) -> Text:
    """The transport state, or ⚠ failing when the transport is fine but most recent
    deliveries are not (a peer that refuses every object of a kind answers every
    association: "up" alone would hide it)."""
    health = item.get("health") or {}
    word = item.get("state", "")
    if word == "up" and health.get("failing"):
        label = f"⚠ failing {health['failed_share'] * 100:.0f} %"
        if wide and health.get("status"):
            label += f" ({health['status']})"
        return Text(label, style="bold reverse")
    return state(word)


def problem(item: dict[str, Any], now: float) -> Text | None:
    """A destination's problem in full, one paragraph: what, the last error, what next."""
    health = item.get("health") or {}
    word = item.get("state", "")
    failing = word == "up" and health.get("failing")
    if word == "up" and not failing:
        return None
    text = Text()
    text.append(item["name"], style="bold")
    text.append(" ")
    text.append_text(destination_state(item, wide=False))
    if failing:
        text.append(f": {health['failed_share'] * 100:.0f} % of the last {health['outcomes']} "
                    "outcomes failed" + (f", mostly {health['status']}" if health.get("status") else ""))
    error = item.get("last_error") or ""
    if error:
        status = item.get("last_status") or ""
        text.append(f": {status + ': ' if status else ''}{error}")
    elif failing and health.get("last_failure"):
        text.append(f"; last: {health['last_failure']}")
    if word in ("retrying", "down") and item.get("next_attempt_at"):
        text.append(f" · next attempt {until(item['next_attempt_at'], now)}")
    if word == "outside_window":
        text.append(f" · {window_opens(item)}")
    return text


def window_opens(item: dict[str, Any]) -> str:
    """"nothing is sent until 18:00" for a destination outside its delivery window."""
    window = item.get("window") or {}
    said = (f"nothing is sent until {window['next_change']}" if window.get("next_change")
            else "no window opens within a week")
    if window.get("urgent_ignores_window"):
        said += " (urgent deliveries still go)"
    return said


def pacing(item: dict[str, Any]) -> list[str]:
    """A destination's windows and rate caps in words, one line each (none unset)."""
    lines = []
    window = item.get("window")
    if window:
        ranges = ", ".join(window["windows"]) if window["windows"] else "always"
        if window["blackout"]:
            ranges += f"; never {', '.join(window['blackout'])}"
        change = window.get("next_change")
        state = ("open" + (f" until {change}" if change else "") if window["open"]
                 else "closed" + (f" until {change}" if change else ""))
        lines.append(f"window {ranges}: {state}"
                     + (" (urgent deliveries ignore it)" if window.get("urgent_ignores_window") else ""))
    caps = [f"{rate_number(item['max_objects_per_s'])} objects/s" if item.get("max_objects_per_s") else "",
            f"{rate_number(item['max_mb_per_s'])} MiB/s" if item.get("max_mb_per_s") else ""]
    if any(caps):
        lines.append("rate cap " + ", ".join(c for c in caps if c))
    return lines


def rate_number(value: float) -> str:
    return f"{value:g}"


def pending(counts: dict[str, Any], urgent: int | None) -> str:
    """Pending deliveries, and how many of them are urgent when any are."""
    n = count(counts.get("pending"))
    return f"{n} ({count(urgent)} urgent)" if urgent else n


def held(counts: dict[str, Any], studies: list[dict[str, Any]] | None, now: float) -> str:
    """Beside pending: deliveries held for their study (study-stable), and when the
    next study goes ("" when none is held)."""
    n = counts.get("held")
    if not n:
        return ""
    first = (studies or [{}])[0].get("release_at")
    return f" +{count(n)} held" + (f" ({until(first, now)})" if first else "")


def held_lines(d: dict[str, Any], now: float) -> list[str]:
    """A study-stable destination's held studies, the next release first, each with
    its countdown (the detail pane)."""
    if d.get("trigger") != "study_stable" and not d.get("held_studies"):
        return []
    studies = d.get("held_studies") or []
    n = d.get("held_study_count") or len(studies)
    lines = [f"study-stable: released after {d.get('stable_after_s') or 0:g} s quiet; "
             f"{n} stud{'y' if n == 1 else 'ies'} held"]
    for h in studies:
        lines.append(f"  {h['study_uid']}  {h['objects']} obj  release {until(h['release_at'], now)}"
                     + ("  (update)" if h.get("update") else ""))
    return lines


def rate(value: float | None) -> str:
    return f"{value or 0:.1f}/s"


def spark(values: list[int] | None, width: int = 20) -> str:
    """A throughput sparkline of the last ``width`` seconds; dots when idle."""
    values = ([0] * width + list(values or []))[-width:]
    top = max(values)
    if not top:
        return "·" * width
    return "".join(SPARK[round(v / top * (len(SPARK) - 1))] if v else " " for v in values)


SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


ECHO_STALE_S = 300      # an echo older than this says how old it is, greyed


def echo_result(result: dict[str, Any] | None, frame: int = 0, now: float | None = None) -> Text:
    """✓ 3 ms, or ✗ and why, with when it was taken (an old result says its age and
    is greyed: it says how the peer was, not how it is); a spinner while it runs."""
    if result is None:
        return Text("")
    if result.get("running"):
        return Text(f"{SPINNER[frame % len(SPINNER)]} echo…", style="italic")
    at = result.get("at")
    old = at is not None and now is not None and now - at > ECHO_STALE_S
    when = f" {duration(now - at)} ago" if old else (f" at {clock(at)}" if at else "")
    if result.get("ok"):
        return Text(f"✓ OK {result.get('rtt_ms', 0):.0f} ms{when}", style="dim" if old else "")
    return Text(f"✗ {result.get('detail') or 'failed'}{when}", style="dim" if old else "bold")


def cause(group: dict[str, Any]) -> str:
    """'0x0122 peer does not support this SOP class' — the dead-letter group label."""
    status = group.get("status") or ""
    reason = group.get("reason") or "no reason recorded"
    return f"{status} {reason}".strip()


def events(rows: list[dict[str, Any]], when: Any) -> Text:
    """Audit events as two lines each: when, what and status; then the detail."""
    text = Text()
    for row in rows:
        text.append(f"{when(row.get('ts'))} ")
        text.append(row.get("event", ""), style="bold")
        if row.get("status"):
            text.append(f" {row['status']}")
        if row.get("detail"):
            text.append(f"\n  {row['detail']}")
        text.append("\n")
    return text


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d (\d\d:\d\d:\d\d),\d{3} (\w+)\s+(?:mfconsole\.)?(\S+?): ")


def short_log_line(line: str) -> str:
    """A log line for a narrow terminal: the time without the date, the level's first
    letter, the logger without its package — the message keeps the width."""
    m = _LOG_LINE.match(line)
    if m is None:
        return line
    return f"{m.group(1)} {m.group(2)[:1]} {m.group(3)}: {line[m.end():]}"


def level_of(line: str) -> str:
    """The level of a redacted log line ("2026-01-01 12:00:00,000 WARNING name: …")."""
    parts = line.split(None, 3)
    return parts[2] if len(parts) > 2 and parts[2] in LEVELS else ""


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
