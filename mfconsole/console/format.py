"""Words and symbols for what the engine reports. Pure functions of their arguments:
times are relative to the snapshot's own clock (``generated_at``), so the same data
always renders the same way."""

from __future__ import annotations

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


def now_and_lifetime(now: int | None, lifetime: int | None) -> str:
    """Mirth's pair: this engine run / all time."""
    return f"{count(now)} / {count(lifetime)}"


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


def echo_result(result: dict[str, Any] | None, frame: int = 0) -> Text:
    """✓ 3.1 ms, or ✗ and why; a spinner while it runs."""
    if result is None:
        return Text("")
    if result.get("running"):
        return Text(f"{SPINNER[frame % len(SPINNER)]} echo…", style="italic")
    if result.get("ok"):
        return Text(f"✓ OK {result.get('rtt_ms', 0):.0f} ms")
    return Text(f"✗ {result.get('detail') or 'failed'}", style="bold")


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


def level_of(line: str) -> str:
    """The level of a redacted log line ("2026-01-01 12:00:00,000 WARNING name: …")."""
    parts = line.split(None, 3)
    return parts[2] if len(parts) > 2 and parts[2] in LEVELS else ""


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
