"""Latency histograms the engine keeps in memory for the metrics export
(mfconsole/metrics_export.py): each destination's time to send an object, and the
store's group commit. Fixed buckets, cumulative on read, like a Prometheus histogram;
they start empty with each engine (a Prometheus histogram may reset on restart).

Observing costs a lock and a bisect: cheap beside a send or an fsync."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

# Seconds. A send: a C-STORE on loopback takes ms, a STOW of a study over a WAN many s.
SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A group commit: an fsync or two (sub-ms on NVMe, tens of ms on a busy disk).
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class HistogramView:
    buckets: tuple[tuple[float, int], ...]   # (upper bound, cumulative count), +Inf last
    sum: float
    count: int


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(sorted(bounds))
        self._counts = [0] * (len(self.bounds) + 1)    # the last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float, n: int = 1) -> None:
        """``n`` observations of ``seconds`` each."""
        i = bisect.bisect_left(self.bounds, seconds)
        with self._lock:
            self._counts[i] += n
            self._sum += seconds * n

    def view(self) -> HistogramView:
        with self._lock:
            counts, total = list(self._counts), self._sum
        running, out = 0, []
        for bound, n in zip((*self.bounds, float("inf")), counts):
            running += n
            out.append((bound, running))
        return HistogramView(tuple(out), total, running)


class PerName:
    """One histogram per destination name, made on first use: a destination's
    workers are replaced on reload, its histogram stays."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self._items: dict[str, Histogram] = {}
        self._lock = threading.Lock()

    def of(self, name: str) -> Histogram:
        with self._lock:
            h = self._items.get(name)
            if h is None:
                h = self._items[name] = Histogram(self.bounds)
            return h

    def views(self) -> dict[str, HistogramView]:
        with self._lock:
            items = dict(self._items)
        return {name: h.view() for name, h in sorted(items.items())}
