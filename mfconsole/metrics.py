"""[metrics] and the Prometheus text exposition format (version 0.0.4).

Protocol-free and import-light (config.py reads [metrics] with it): what is measured,
and when it is written or served, is mfconsole/metrics_export.py's.

Label values are configured names, states, reasons, key ids and certificate file
paths only: never a UID or a DICOM value, so the text may go to any monitoring
system. Label values and help texts are escaped as the format says, whatever they hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

METRICS_KEYS = frozenset({"textfile", "interval_s", "listen"})
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_TEXTFILE = Path("metrics") / "mfconsole.prom"     # under [engine].data_dir
DEFAULT_INTERVAL_S = 15.0


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: where the text goes. ``textfile`` None: no file; ``listen`` None: no
    HTTP endpoint; neither: nothing is collected at all."""
    textfile: Path | None = None
    interval_s: float = DEFAULT_INTERVAL_S
    listen: tuple[str, int] | None = None      # (host, port), loopback only

    @property
    def enabled(self) -> bool:
        return self.textfile is not None or self.listen is not None


def read(r: Any, raw: Any, resolve: Callable[[str], Path], data_dir: Path,
         is_loopback: Callable[[str], bool]) -> MetricsConfig:
    """[metrics] with config.py's reader ``r`` (problems with key paths). ``resolve``
    makes a path relative to the configuration's folder absolute."""
    t = r.table(raw, "metrics", METRICS_KEYS)
    textfile: Path | None = data_dir / DEFAULT_TEXTFILE
    value = r.get(t, "metrics", "textfile", str, None)
    if value is not None:
        textfile = resolve(value) if value.strip() else None
        if textfile is not None and not textfile.name.endswith(".prom"):
            # node_exporter's textfile collector reads *.prom only; the temporary file
            # the text is written to first must not be one.
            r.fail("metrics.textfile", "must name a file ending in .prom (what node_exporter's "
                   "textfile collector reads)")
    interval = r.get(t, "metrics", "interval_s", float, DEFAULT_INTERVAL_S,
                     lambda v: None if 1 <= v <= 3600 else "must be between 1 and 3600 (seconds)")
    listen = None
    where = r.get(t, "metrics", "listen", str, None)
    if where is not None:
        listen = _listen(where)
        if isinstance(listen, str):
            r.fail("metrics.listen", listen)
            listen = None
        elif not is_loopback(listen[0]):
            r.fail("metrics.listen", f"'{listen[0]}' is not a loopback address: the endpoint has "
                   "no authentication; listen on 127.0.0.1 (or ::1) and let a local "
                   "node_exporter or a reverse proxy carry it further")
            listen = None
    return MetricsConfig(textfile=textfile, interval_s=interval or DEFAULT_INTERVAL_S, listen=listen)


def _listen(value: str) -> tuple[str, int] | str:
    """"host:port" ("[::1]:9464" for IPv6) → (host, port), or why not."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return "must be host:port, e.g. \"127.0.0.1:9464\" (\"[::1]:9464\" for IPv6)"
    return host, int(port)


# -- the exposition format --------------------------------------------------------------

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


@dataclass
class Family:
    """One metric family: its name, type, help, and samples as (name suffix, labels,
    value); a histogram's suffixes are _bucket, _sum and _count."""
    name: str
    type: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: Any) -> "Family":
        self.samples.append(("", {k: str(v) for k, v in labels.items()}, value))
        return self

    def histogram(self, view: Any, **labels: Any) -> "Family":
        """A histogram's samples from a ``latency.HistogramView`` (cumulative buckets)."""
        base = {k: str(v) for k, v in labels.items()}
        for bound, n in view.buckets:
            self.samples.append(("_bucket", {**base, "le": _number(bound)}, n))
        self.samples.append(("_sum", base, view.sum))
        self.samples.append(("_count", base, view.count))
        return self


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    """The text of ``families``: # HELP and # TYPE for each, then its samples."""
    lines: list[str] = []
    for f in families:
        lines.append(f"# HELP {f.name} {escape_help(f.help)}")
        lines.append(f"# TYPE {f.name} {f.type}")
        for suffix, labels, value in f.samples:
            tags = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            lines.append(f"{f.name}{suffix}{{{tags}}} {_number(value)}" if tags
                         else f"{f.name}{suffix} {_number(value)}")
    return "\n".join(lines) + "\n"
