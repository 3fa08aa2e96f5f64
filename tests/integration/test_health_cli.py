"""`mfconsole health` against a running `mfconsole serve` and a real PACS (DCMTK
storescp): 0 "ok" while everything flows; the PACS stopped with objects queued → 1,
a line naming the destination down and one for the oldest pending delivery; the PACS
back → 0 again; the engine stopped → 2. Lines carry names and numbers only."""

from __future__ import annotations

import json

import dicomgen
from harness import CANARY_ID, CANARY_NAME, mfconsole, poll, store_files
from test_forward_dimse import dimse_dest


def health(serve):
    result = mfconsole("--config", str(serve.config), "health")
    return result.returncode, result.stdout


def test_health_follows_the_pacs_and_the_engine(serve_factory, storescp_factory, tmp_path):
    scp = storescp_factory()
    serve = serve_factory(destinations=[dimse_dest(scp.port, retry_initial_s=0.2, retry_max_s=0.5,
                                                   down_after=2)],
                          tables={"health": {"oldest_pending_s": 1}})
    files = [dicomgen.save(dicomgen.make_image(pixel_bytes=64),
                           tmp_path / f"in{i}.dcm") for i in range(3)]
    store_files(serve.port, files[:1])
    scp.wait_for_files(1)
    assert health(serve) == (0, "ok\n")

    scp.stop()
    store_files(serve.port, files[1:])
    code, out = poll(lambda: (h := health(serve))[0] == 1 and "pacs: down" in h[1]
                     and "oldest pending" in h[1] and h, timeout=20)
    lines = out.splitlines()
    assert all(line.startswith("degraded: destination pacs: ") for line in lines), out
    assert CANARY_NAME not in out and CANARY_ID not in out
    # status says the same, first thing.
    text = mfconsole("--config", str(serve.config), "status").stdout
    assert text.splitlines()[1].startswith("health: degraded (") and "  degraded: destination pacs: down" in text
    got = json.loads(mfconsole("--config", str(serve.config), "status", "--json").stdout)["health"]
    assert got["severity"] == 1 and "destination_down:pacs" in [p["key"] for p in got["problems"]]

    scp.start()
    scp.wait_for_files(3, timeout=30)
    assert poll(lambda: health(serve) == (0, "ok\n"), timeout=20)

    serve.stop()
    code, out = health(serve)
    assert code == 2 and "down: engine: not running" in out
