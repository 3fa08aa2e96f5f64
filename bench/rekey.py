"""Rekey: how fast `mfconsole rekey` re-seals a store, and what it costs ingest.

An in-process engine stores SR_COUNT small SRs (sealed in the database) and CT_COUNT
images of 512 KiB (blob files) under key A; the configuration is then rotated (key B
current, A previous), the engine restarted, and the rekey runs beside it while a
pynetdicom sender (in its own process, one association) stores more SRs and times
each C-STORE. The same sender runs first without a rekey, for the ratio.

    .venv/bin/python bench/rekey.py [--sr 2000] [--ct 100] [--stores 600]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

import dicomgen  # noqa: E402
from harness import store_files, write_config  # noqa: E402

from mfconsole.config import load  # noqa: E402
from mfconsole.engine import outbox  # noqa: E402
from mfconsole.engine.engine import Engine  # noqa: E402


def timed_stores(port: int, folder: str, count: int, out: "multiprocessing.Queue") -> None:
    """One association; the response time of each C-STORE, in ms."""
    import socket

    from pydicom import dcmread
    from pynetdicom import AE, evt

    files = dicomgen.write_corpus(Path(folder), count)
    head = dcmread(files[0], stop_before_pixels=True)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(head.SOPClassUID, [str(head.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="MF_SCP", evt_handlers=[(
        evt.EVT_CONN_OPEN, lambda e: e.assoc.dul.socket.socket.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))])
    times = []
    for path in files:
        t0, w0 = time.perf_counter(), time.time()
        assert int(assoc.send_c_store(path).Status) == 0
        times.append((w0, (time.perf_counter() - t0) * 1000))
        time.sleep(0.002)   # pynetdicom 3.0.4 misses a response now and then back to back
    assoc.release()
    out.put(times)


def measure(port: int, folder: Path, count: int) -> list[tuple[float, float]]:
    """(wall-clock start, response ms) of each C-STORE."""
    # spawn, not fork: the engine's threads may hold locks a forked child would inherit.
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=timed_stores, args=(port, str(folder), count, queue))
    proc.start()
    times = queue.get(timeout=600)
    proc.join()
    return times


def summary(name: str, times: list[float]) -> str:
    q = statistics.quantiles(times, n=100)
    return f"{name:<22} {len(times):>6} {q[49]:>8.2f} {q[98]:>8.2f} {max(times):>8.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sr", type=int, default=2000)
    p.add_argument("--ct", type=int, default=100)
    p.add_argument("--stores", type=int, default=600)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = write_config(root / "e", destinations=[{"name": "pacs", "kind": "dimse",
                              "host": "127.0.0.1", "port": 1, "ae_title": "PACS"}],
                              egress={"allowed_tcp": ["127.0.0.1:1"]})
        engine = Engine(load(config), log_to_stderr=False)
        engine.start()
        engine.store.call(outbox.pause, "pacs", "bench")
        port = engine.listeners[0].address[1]
        t0 = time.perf_counter()
        for n in range(0, args.sr, 500):
            store_files(port, dicomgen.write_corpus(root / f"sr{n}", min(500, args.sr - n)))
        store_files(port, dicomgen.write_corpus(root / "ct", args.ct, kind="ct", pixel_bytes=512 * 1024))
        print(f"stored {args.sr} SR + {args.ct} CT (512 KiB) in {time.perf_counter() - t0:.1f} s")
        idle = measure(port, root / "idle", args.stores)
        engine.stop()

        from mfconsole.engine.keys import new_key
        new_key(config.parent / "keys" / "b.key")
        text = config.read_text().replace('key_file = "var/keys/store.key"',
                                          'key_file = "keys/b.key"\nprevious_key_files = ["var/keys/store.key"]')
        config.write_text(text)
        engine = Engine(load(config), log_to_stderr=False)
        engine.start()
        port = engine.listeners[0].address[1]
        from mfconsole import ops
        result: dict = {}

        stored = lambda: engine.store.reader().object_count()
        before = stored()

        def rekey() -> None:
            while stored() < before + 50:   # the sender is storing first
                time.sleep(0.05)
            t, result["from"] = time.perf_counter(), time.time()
            result["done"], result["failed"], result["left"] = ops.rekey(engine.config)
            result["s"], result["to"] = time.perf_counter() - t, time.time()

        worker = threading.Thread(target=rekey)
        worker.start()
        during_all = measure(port, root / "during", args.stores)
        worker.join()
        # Only the stores whose answer overlapped the rekey.
        during = [ms for w, ms in during_all if w <= result["to"] and w + ms / 1000 >= result["from"]]
        idle = [ms for _, ms in idle]
        engine.stop()
    mb = (args.ct * 512 * 1024 + args.sr * 4000) / 1e6
    print(f"rekey: {result['done']} re-sealed, {result['failed']} failed, {result['left']} left, "
          f"in {result['s']:.1f} s ({result['done'] / result['s']:.0f} objects/s, ~{mb / result['s']:.0f} MB/s)")
    print(f"{'C-STORE response':<22} {'stores':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    print(summary("idle", idle))
    print(summary("during rekey", during))
    print(f"ratio during/idle: p50 {statistics.median(during) / statistics.median(idle):.2f}x  "
          f"p99 {statistics.quantiles(during, n=100)[98] / statistics.quantiles(idle, n=100)[98]:.2f}x")
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
