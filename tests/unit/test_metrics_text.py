"""[metrics] and the Prometheus text renderer (mfconsole/metrics.py), the latency
histograms (engine/latency.py) and the atomic text file: the text is what
`promtool check metrics` accepts, label values are escaped whatever they hold, and a
bad [metrics] names its key."""

from __future__ import annotations

import os
import stat
import subprocess
import threading

import pytest

from harness import write_config
from mfconsole.config import ConfigError, load
from mfconsole.engine.latency import Histogram, PerName
from mfconsole.metrics import COUNTER, GAUGE, HISTOGRAM, Family, escape_label, render
from mfconsole.metrics_export import Tally, write_atomically
from peers import require_tool


def promtool_check(text: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("promtool"), "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=60)


# -- the renderer -------------------------------------------------------------------


def test_every_family_has_help_and_type_and_its_samples():
    text = render([Family("mfconsole_up", GAUGE, "Up.").add(1),
                   Family("mfconsole_listener_objects_total", COUNTER, "Objects.")
                   .add(3, listener="modalities").add(0, listener="er")])
    assert text == ("# HELP mfconsole_up Up.\n# TYPE mfconsole_up gauge\nmfconsole_up 1\n"
                    "# HELP mfconsole_listener_objects_total Objects.\n"
                    "# TYPE mfconsole_listener_objects_total counter\n"
                    'mfconsole_listener_objects_total{listener="modalities"} 3\n'
                    'mfconsole_listener_objects_total{listener="er"} 0\n')
    assert promtool_check(text).returncode == 0


def test_label_values_and_help_are_escaped():
    hostile = 'C:\\certs\\"odd"\nname.pem'
    assert escape_label(hostile) == 'C:\\\\certs\\\\\\"odd\\"\\nname.pem'
    f = Family("mfconsole_tls_certificate_expiry_seconds", GAUGE, "Help with \\ and\nnewline.")
    text = render([f.add(1.5e9, file=hostile)])
    lines = text.splitlines()
    assert lines[0] == "# HELP mfconsole_tls_certificate_expiry_seconds Help with \\\\ and\\nnewline."
    assert lines[2] == ('mfconsole_tls_certificate_expiry_seconds{file="C:\\\\certs\\\\\\"odd\\"\\n'
                        'name.pem"} 1500000000')
    assert len(lines) == 3                 # the newline did not split a sample
    result = promtool_check(text)
    assert result.returncode == 0, result.stdout + result.stderr


def test_numbers_are_written_as_the_format_wants():
    text = render([Family("mfconsole_x_seconds", GAUGE, "X.").add(0.25).add(float("inf"), a="b")
                   .add(7.0, a="c")])
    assert "mfconsole_x_seconds 0.25\n" in text
    assert 'mfconsole_x_seconds{a="b"} +Inf\n' in text
    assert 'mfconsole_x_seconds{a="c"} 7\n' in text


def test_histogram_buckets_are_cumulative_with_le_inclusive():
    h = Histogram((0.1, 1.0))
    h.observe(0.1)          # on a bound: counted in it (le is "less than or equal")
    h.observe(0.5, n=2)
    h.observe(5.0)
    view = h.view()
    assert view.buckets == ((0.1, 1), (1.0, 3), (float("inf"), 4))
    assert view.count == 4 and view.sum == pytest.approx(0.1 + 1.0 + 5.0)
    text = render([Family("mfconsole_destination_send_seconds", HISTOGRAM, "Send.")
                   .histogram(view, destination="pacs")])
    assert 'mfconsole_destination_send_seconds_bucket{destination="pacs",le="0.1"} 1\n' in text
    assert 'mfconsole_destination_send_seconds_bucket{destination="pacs",le="+Inf"} 4\n' in text
    assert 'mfconsole_destination_send_seconds_count{destination="pacs"} 4\n' in text
    assert promtool_check(text).returncode == 0


def test_histograms_per_name_outlive_their_users_and_count_under_threads():
    per = PerName((0.01,))
    assert per.of("pacs") is per.of("pacs")
    threads = [threading.Thread(target=lambda: [per.of("pacs").observe(0.001) for _ in range(1000)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert per.views()["pacs"].count == 4000


# -- the tally of counters ------------------------------------------------------------


class _Reads:
    """The two tailed reads, over in-memory rows (what the tally asks, by id)."""

    def __init__(self) -> None:
        self.audit: list[dict] = []
        self.objects: list[dict] = []

    def audit_tally(self, events, after_id):
        groups: dict[tuple, dict] = {}
        for row in self.audit:
            if row["id"] > after_id and row["event"] in events:
                key = (row["event"], row.get("listener"), row.get("destination"), row.get("status"))
                g = groups.setdefault(key, {"event": key[0], "listener": key[1], "destination": key[2],
                                            "status": key[3], "n": 0, "last": 0})
                g["n"] += 1
                g["last"] = max(g["last"], row["id"])
        return list(groups.values())

    def object_sizes_since(self, after_id):
        out: dict[str, dict] = {}
        for row in self.objects:
            if row["id"] > after_id:
                g = out.setdefault(row["listener"], {"listener": row["listener"], "n": 0, "bytes": 0,
                                                     "last": 0})
                g["n"] += 1
                g["bytes"] += row["size"]
                g["last"] = max(g["last"], row["id"])
        return list(out.values())


def test_tally_counts_each_row_once_across_rounds():
    reads, tally = _Reads(), Tally()
    reads.audit += [{"id": 1, "event": "stored", "listener": "modalities"},
                    {"id": 2, "event": "refused", "listener": "modalities", "status": "0xA700"},
                    {"id": 3, "event": "association_rejected", "listener": "modalities"},
                    {"id": 4, "event": "delivered", "destination": "pacs"},
                    {"id": 5, "event": "engine_started"}]
    reads.objects += [{"id": 1, "listener": "modalities", "size": 1000}]
    tally.update(reads)
    reads.audit += [{"id": 6, "event": "delivered_with_warning", "destination": "pacs"},
                    {"id": 7, "event": "stored", "listener": "modalities"}]
    reads.objects += [{"id": 2, "listener": "modalities", "size": 24}]
    tally.update(reads)
    tally.update(reads)          # nothing new: nothing counted twice
    assert tally.by(1, {"stored": "objects"}) == {("modalities", "objects"): 2}
    assert tally.by(2, {"delivered": "delivered", "delivered_with_warning": "delivered"}) == {
        ("pacs", "delivered"): 2}
    assert tally.rejects() == {("modalities", "refused 0xA700"): 1,
                               ("modalities", "association_rejected"): 1}
    assert tally.received_bytes == {"modalities": 1024}


# -- the text file --------------------------------------------------------------------


def test_the_text_file_is_replaced_whole_and_world_readable(tmp_path):
    path = tmp_path / "textfile" / "mfconsole.prom"
    write_atomically(path, "first\n")
    write_atomically(path, "second\n")
    assert path.read_text() == "second\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(path.parent) == ["mfconsole.prom"]     # no temporary file left


# -- [metrics] ------------------------------------------------------------------------


def test_metrics_defaults_write_under_the_data_directory(tmp_path):
    cfg = load(write_config(tmp_path))
    assert cfg.metrics.textfile == tmp_path / "var" / "metrics" / "mfconsole.prom"
    assert cfg.metrics.interval_s == 15 and cfg.metrics.listen is None


def test_metrics_keys_are_read(tmp_path):
    cfg = load(write_config(tmp_path, tables={"metrics": {
        "textfile": "prom/mf.prom", "interval_s": 2, "listen": "127.0.0.1:9464"}}))
    assert cfg.metrics.textfile == tmp_path / "prom" / "mf.prom"
    assert cfg.metrics.interval_s == 2.0 and cfg.metrics.listen == ("127.0.0.1", 9464)
    assert load(write_config(tmp_path, tables={"metrics": {"listen": "[::1]:9464"}})
                ).metrics.listen == ("::1", 9464)
    off = load(write_config(tmp_path, tables={"metrics": {"textfile": ""}})).metrics
    assert off.textfile is None and not off.enabled


@pytest.mark.parametrize("table, key, why", [
    ({"listen": "0.0.0.0:9464"}, "metrics.listen", "not a loopback address"),
    ({"listen": "192.0.2.7:9464"}, "metrics.listen", "not a loopback address"),
    ({"listen": "127.0.0.1"}, "metrics.listen", "must be host:port"),
    ({"listen": "127.0.0.1:70000"}, "metrics.listen", "must be host:port"),
    ({"interval_s": 0}, "metrics.interval_s", "between 1 and 3600"),
    ({"textfile": "metrics.txt"}, "metrics.textfile", "ending in .prom"),
    ({"port": 9464}, "metrics.port", "unknown key"),
])
def test_bad_metrics_names_the_key(tmp_path, table, key, why):
    with pytest.raises(ConfigError) as caught:
        load(write_config(tmp_path, tables={"metrics": table}))
    assert [k for k, _ in caught.value.problems] == [key]
    assert why in caught.value.problems[0][1]


def test_check_refuses_a_public_metrics_address(tmp_path):
    from harness import mfconsole

    path = write_config(tmp_path, tables={"metrics": {"listen": "0.0.0.0:9464"}})
    result = mfconsole("--config", str(path), "check")
    assert result.returncode != 0
    assert "metrics.listen" in result.stdout + result.stderr
