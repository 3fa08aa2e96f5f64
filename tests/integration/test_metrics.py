"""The metrics export of `mfconsole serve` with a real PACS (DCMTK storescp): the text
file is what `promtool check metrics` accepts and counts what flowed; with the PACS
stopped the destination reads down and its oldest pending delivery ages from one
write to the next; the loopback endpoint serves the same families; a clean stop
leaves mfconsole_up 0. Objects carry canary PHI: neither it nor any UID is in the text."""

from __future__ import annotations

import re
import subprocess
import urllib.error
import urllib.request

import dicomgen
from harness import CANARY_ID, CANARY_NAME, poll, store_files
from peers import free_port, require_tool
from pydicom import dcmread
from test_forward_dimse import dimse_dest

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$")


def samples(text: str) -> dict[str, float]:
    """Series ('name{labels}' as written) -> value."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            out[match.group(1)] = float(match.group(2))
    return out


def families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def read(path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_metrics_follow_the_pacs_without_phi(serve_factory, storescp_factory, tmp_path):
    promtool = require_tool("promtool")
    scp = storescp_factory()
    http_port = free_port()
    serve = serve_factory(destinations=[dimse_dest(scp.port, retry_initial_s=0.2, retry_max_s=0.5,
                                                   down_after=2)],
                          tables={"metrics": {"interval_s": 1, "textfile": "prom/mfconsole.prom",
                                              "listen": f"127.0.0.1:{http_port}"}})
    textfile = serve.config.parent / "prom" / "mfconsole.prom"
    files = [dicomgen.save(dicomgen.make_image(pixel_bytes=64), tmp_path / f"in{i}.dcm")
             for i in range(3)]
    uids = set()
    for f in files:
        ds = dcmread(f)
        uids |= {str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)}
    size = sum(f.stat().st_size for f in files[:1])

    store_files(serve.port, files[:1])
    scp.wait_for_files(1)
    flowing = poll(lambda: (s := samples(read(textfile)))
                   .get('mfconsole_destination_delivered_total{destination="pacs"}') == 1 and s,
                   timeout=20, message="a write counting the delivery")
    assert flowing["mfconsole_up"] == 1 and flowing["mfconsole_health"] == 0
    assert flowing['mfconsole_listener_objects_total{listener="modalities"}'] == 1
    assert flowing['mfconsole_listener_associations_total{listener="modalities"}'] >= 1
    # Bytes as received: the data set as sent, a little under the file (its preamble).
    assert 0 < flowing['mfconsole_listener_received_bytes_total{listener="modalities"}'] <= size
    assert flowing['mfconsole_destination_state{destination="pacs",state="up"}'] == 1
    assert flowing['mfconsole_destination_send_seconds_count{destination="pacs"}'] == 1
    assert flowing["mfconsole_store_objects"] == 1
    assert flowing["mfconsole_store_commit_seconds_count"] >= 1
    checked = subprocess.run([promtool, "check", "metrics"], input=read(textfile),
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    scp.stop()
    store_files(serve.port, files[1:])
    down = 'mfconsole_destination_state{destination="pacs",state="down"}'
    oldest = 'mfconsole_destination_oldest_pending_seconds{destination="pacs"}'
    first = poll(lambda: (s := samples(read(textfile))).get(down) == 1 and s.get(oldest, 0) > 0 and s,
                 timeout=20, message="a write with pacs down and deliveries pending")
    assert first['mfconsole_destination_state{destination="pacs",state="up"}'] == 0
    assert first['mfconsole_destination_queue{destination="pacs",state="pending"}'] == 2
    assert first['mfconsole_destination_retries_total{destination="pacs"}'] >= 2
    later = poll(lambda: (s := samples(read(textfile))).get(oldest, 0) > first[oldest] and s,
                 timeout=10, message="a later write with the oldest pending delivery older")
    assert later[down] == 1 and later["mfconsole_health"] == 1

    # The endpoint: the same families, its content type; nothing but /metrics.
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        served = answer.read().decode()
    assert families(served) == families(read(textfile)) and len(families(served)) > 20
    assert samples(served)[down] == 1
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=10)
        raise AssertionError("/ answered")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404

    for text in (read(textfile), served):
        assert CANARY_NAME not in text and CANARY_ID not in text
        assert "ZZCANARY" not in text
        assert not any(uid in text for uid in uids)
        assert not re.search(r"\d+\.\d+\.\d+\.\d+\.\d+", text), "something UID-shaped"

    serve.stop()
    assert samples(read(textfile)) == {"mfconsole_up": 0}


def test_counters_survive_a_restart(engine_factory, tmp_path):
    engine = engine_factory(folder="engine")
    textfile = engine.config.metrics.textfile
    files = [dicomgen.save(dicomgen.make_image(pixel_bytes=64), tmp_path / f"in{i}.dcm")
             for i in range(2)]
    store_files(engine.listeners[0].address[1], files)
    engine.stop()
    again = engine_factory(folder="engine")          # the same data directory
    assert again.config.metrics.textfile == textfile
    first = samples(read(textfile))                 # written at start, before any interval
    assert first["mfconsole_up"] == 1
    assert first['mfconsole_listener_objects_total{listener="modalities"}'] == 2
    assert first['mfconsole_listener_associations_total{listener="modalities"}'] == 1
    assert first["mfconsole_store_objects"] == 2


def test_an_unwritable_textfile_is_logged_once_and_routing_goes_on(engine_factory, tmp_path):
    folder = tmp_path / "engine"
    folder.mkdir()
    (folder / "blocked").write_text("a file where the directory should be\n")
    engine = engine_factory(folder="engine", tables={"metrics": {"textfile": "blocked/mf.prom",
                                                                 "interval_s": 1}})
    poll(lambda: engine.metrics.rounds >= 3, timeout=10, message="three collections")
    assert engine.metrics.writes == 0 and "mfconsole_up 1" in engine.metrics.text
    log = (engine.data_dir / "logs" / "mfconsole.log").read_text()
    assert log.count("metrics: cannot write") == 1, log
    files = [dicomgen.save(dicomgen.make_image(pixel_bytes=64), tmp_path / "in.dcm")]
    assert store_files(engine.listeners[0].address[1], files)
