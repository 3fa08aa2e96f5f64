"""C-STORE response latency while the retention purge runs, beside the same ingest
with no purge, in the same run.

    .venv/bin/python bench/purge.py                              # 100 000 objects, ~1-2 min
    .venv/bin/python bench/purge.py --objects 20000              # smaller data directory
    .venv/bin/python bench/purge.py --compare-single-transaction # + the old one-transaction purge

mfconsole runs in this process (Engine, as tests/conftest.py starts it) with a data
directory on disk. N "finished" objects are written straight into the store on its
writer thread (``store.call`` with the repository's ``Tx`` writes, chunks of 5000
rows): ``objects`` rows received 40 days ago with an inline blob, the same small sealed
blob in ``blob_data`` for each, and one ``delivered`` row in ``deliveries``. Nothing of that goes over DICOM.

A pynetdicom SCU in a child process (one association, TCP_NODELAY on its socket, as
tests/harness.py store_files does) C-STOREs small generated objects (tests/dicomgen.py,
a new SOP Instance UID each) one at a time; each ``send_c_store`` is timed with
time.perf_counter. Phases, in this order:

1. idle: 1500 stores (``--stores``), no purge;
2. purging: ``store.purge_expired(30)`` in a thread, as the engine's housekeeping runs it
   (batches of store.PURGE_BATCH objects, one transaction each, a short pause between);
   the SCU sends for as long as the purge runs, and the stores whose wait overlapped
   it count;
3. with ``--compare-single-transaction``: N more old objects are written, then the old
   behaviour, the whole purge in one transaction (``purge_expired(30, batch=10**9)``).

The listener's one DIMSE destination is paused, so each stored object gets its queued
delivery row (as in production) and no delivery worker competes for the writer. The
engine's own retention is set to 36500 days, so its housekeeping never purges the
seeded rows behind the benchmark's back.

Reported per phase: p50, p99, max and mean response time (ms), stores/s, and "other
CPU" as in bench/ingest.py; then purging / idle for p50 and p99; and how long the purge
took, how many objects it purged (it must be all N: checked in the database too).
Results go to stdout and bench/results/purge-<time>.json; the exit status is 0 whenever
the benchmark ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from ingest import busy_cpu_seconds, cpu_seconds, kernel_thread_cpu_seconds, save_results  # noqa: E402  (puts tests/ on sys.path)

import dicomgen  # noqa: E402
from harness import plant, write_config  # noqa: E402
from peers import LOOPBACK, _pdeathsig_prefix, free_port  # noqa: E402

AET = "MF_SCP"
DEST = "pacs"                 # write_config's default destination (127.0.0.1:1), paused
LISTENER = "modalities"       # write_config's listener name
RETENTION_DAYS = 30
AGE_DAYS = 40                 # seeded objects were received this long ago
SEED_CHUNK = 5000             # rows per store.call while seeding
SEED_BLOB = b"x" * 2000       # sealed once, stored for every seeded object
WARMUP_STORES = 100
GAP_S = 0.002                 # SCU pause between two stores (see scu_main)
SCU_TIMEOUT_S = 900           # DIMSE timeout of the SCU: a one-transaction purge may stall it
CT_PIXEL_BYTES = 128 * 128 * 2


# ---------------------------------------------------------------------------
# the SCU (child process: `purge.py _scu PORT --kind sr|ct`)


def scu_main(argv: list[str]) -> int:
    """Reads commands on stdin, answers on stdout:

    ``count N``  send N stores, answer ``RESULT {json}``
    ``until``    answer ``SENDING`` after the first store, then send until a ``stop`` line
                 arrives; answer ``RESULT {json}``
    ``quit``     release the association and exit

    Each store: generate a new object (not timed), time ``send_c_store``, then sleep
    GAP_S. The pause lets pynetdicom 3.0.4's reactor thread run after its checkpoint is
    set again: back-to-back sends hit its racy pause handshake (bench/README.md, forward.py)
    and lose a response to the reactor about once in 700 stores (a dimse_timeout stall)."""
    p = argparse.ArgumentParser(prog="purge.py _scu", description="internal: the timing SCU")
    p.add_argument("port", type=int)
    p.add_argument("--kind", choices=("sr", "ct"), default="sr")
    a = p.parse_args(argv)

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    from pynetdicom import AE, evt

    lost = [0]

    class _Lost(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Received unexpected" in record.getMessage():
                lost[0] += 1

    logging.getLogger("pynetdicom").addHandler(_Lost(level=logging.DEBUG))

    def make() -> Any:
        ds = dicomgen.make_sr() if a.kind == "sr" else dicomgen.make_image(pixel_bytes=CT_PIXEL_BYTES)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        return ds

    def nodelay(event: Any) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    sop_class = dicomgen.BASIC_TEXT_SR if a.kind == "sr" else dicomgen.CT_IMAGE
    ae = AE(ae_title="BENCH")
    ae.dimse_timeout = ae.network_timeout = SCU_TIMEOUT_S
    ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])

    def associate() -> Any:
        assoc = ae.associate(LOOPBACK, a.port, ae_title=AET, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
        if not assoc.is_established:
            raise SystemExit("association not established")
        return assoc

    assoc = associate()
    out = sys.stdout

    def answer(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    def send_loop(n: int | None, stop: threading.Event | None, on_first: Any = None) -> dict[str, Any]:
        nonlocal assoc
        samples: list[tuple[float, float]] = []   # (time.monotonic() at start, seconds)
        failures: list[str] = []
        lost0 = lost[0]
        while (n is None or len(samples) < n) and (stop is None or not stop.is_set()):
            ds = make()
            started = time.monotonic()
            t0 = time.perf_counter()
            status = assoc.send_c_store(ds)
            elapsed = time.perf_counter() - t0
            samples.append((started, elapsed))
            if len(samples) == 1 and on_first is not None:
                on_first()
            if not status or status.Status != 0:
                failures.append(f"store {len(samples)}: status {getattr(status, 'Status', None)} "
                                f"after {elapsed:.3f} s")
                if not assoc.is_established:
                    assoc = associate()
                if len(failures) > 20:
                    break
            time.sleep(GAP_S)
        if lost[0] > lost0:
            failures.append(f"{lost[0] - lost0} C-STORE response(s) taken by pynetdicom's reactor")
        return {"samples": samples, "failures": failures}

    answer("READY")
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "count":
            answer("RESULT " + json.dumps(send_loop(int(cmd[1]), None)))
        elif cmd[0] == "until":
            stop = threading.Event()

            def wait_stop() -> None:
                sys.stdin.readline()   # "stop"
                stop.set()

            threading.Thread(target=wait_stop, daemon=True).start()
            answer("RESULT " + json.dumps(send_loop(None, stop, on_first=lambda: answer("SENDING"))))
        elif cmd[0] == "quit":
            break
    assoc.release()
    return 0


class Scu:
    """The SCU child process, driven line by line."""

    def __init__(self, port: int, kind: str, log_path: Path):
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            _pdeathsig_prefix() + [sys.executable, str(Path(__file__).resolve()), "_scu", str(port),
                                   "--kind", kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
        self.log_path = log_path
        self._expect("READY")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _expect(self, word: str) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(word):
            self.proc.poll()
            raise RuntimeError(f"SCU said {line.strip()!r} (rc={self.proc.returncode}), expected "
                               f"{word}: " + self.log_path.read_text(errors="replace")[-1500:])
        return line[len(word):].strip()

    def count(self, n: int) -> dict[str, Any]:
        self._tell(f"count {n}")
        return json.loads(self._expect("RESULT"))

    def start(self) -> None:
        """Send until stop(); returns once the first store has been answered."""
        self._tell("until")
        self._expect("SENDING")

    def stop(self) -> dict[str, Any]:
        self._tell("stop")
        return json.loads(self._expect("RESULT"))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._tell("quit")
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


# ---------------------------------------------------------------------------
# the data directory


def seed(store: Any, n: int) -> float:
    """Write n finished objects, received AGE_DAYS ago, straight into the store (on its
    writer thread, SEED_CHUNK rows per transaction). Returns seconds taken."""
    from mfconsole.repository import Tx
    from mfconsole.repository.states import DELIVERED, INLINE

    sealed, sealed_meta = store.vault.seal_bytes(SEED_BLOB)
    received0 = time.time() - AGE_DAYS * 86400
    t0 = time.perf_counter()

    def insert(tx: Tx, start: int, count: int) -> None:
        study = f"2.25.{uuid.uuid4().int}"
        for i in range(count):
            received = received0 + (start + i) * 0.001
            oid = tx.insert_object(
                {"sop_instance_uid": f"2.25.{uuid.uuid4().int}", "version": 1,
                 "sop_class_uid": dicomgen.BASIC_TEXT_SR, "study_uid": study,
                 "series_uid": f"{study}.{(start + i) // 100}", "modality": "SR",
                 "transfer_syntax": "1.2.840.10008.1.2.1", "size": sealed_meta.size,
                 "digest": sealed_meta.digest, "blob": INLINE, "key_id": sealed_meta.key_id,
                 "listener": LISTENER, "calling_ae": "SEED", "peer": LOOPBACK, "received_at": received,
                 "superseded": 0}, sealed)
            [delivery_id] = tx.add_deliveries(oid, LISTENER, [(DEST, None)], received)
            tx.set_outcome(delivery_id, state=DELIVERED, attempts=1, retry_at=None, status=None,
                           label=None, reason=None, now=received + 1)

    for start in range(0, n, SEED_CHUNK):
        store.call(insert, start, min(SEED_CHUNK, n - start))
    checkpoint(store)
    return time.perf_counter() - t0


def checkpoint(store: Any) -> None:
    """Fold the WAL into the database, so every phase starts from a short WAL."""
    plant(store.reader(), "PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def expired(store: Any) -> tuple[int, int]:
    """(objects past the retention not yet purged, blob_data rows of purged objects)."""
    reads = store.reader()
    cutoff = time.time() - RETENTION_DAYS * 86400
    objects = reads.rows("objects")
    left = sum(1 for o in objects if o["purged_at"] is None and o["received_at"] is not None
               and o["received_at"] < cutoff)
    purged = {o["id"] for o in objects if o["purged_at"] is not None}
    blobs = sum(1 for b in reads.rows("blob_data") if b["object_id"] in purged)
    return left, blobs


# ---------------------------------------------------------------------------
# phases


@dataclass
class Phase:
    name: str
    stores: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    seconds: float
    stores_per_s: float
    engine_cpu_pct: float       # this process (engine + purge), % of one core
    other_cpu_pct: float        # processes outside the benchmark, % of all cores
    failures: list[str] = field(default_factory=list)
    purge: dict[str, Any] | None = None


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))]


class CpuWindow:
    """This process, the SCU and everything else, between start() and stop()."""

    def __init__(self, scu: Scu):
        self.scu = scu

    def start(self) -> None:
        self.k0, self.busy0 = kernel_thread_cpu_seconds(), busy_cpu_seconds()
        self.me0, self.scu0, self.t0 = self._me(), cpu_seconds(self.scu.pid), time.monotonic()

    def stop(self) -> tuple[float, float]:
        me, scu, busy, t1 = self._me(), cpu_seconds(self.scu.pid), busy_cpu_seconds(), time.monotonic()
        kernel = kernel_thread_cpu_seconds() - self.k0
        wall = max(t1 - self.t0, 1e-9)
        other = max(0.0, (busy - self.busy0) - (me - self.me0) - (scu - self.scu0) - kernel)
        return 100 * (me - self.me0) / wall, 100 * other / (wall * (os.cpu_count() or 1))

    @staticmethod
    def _me() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime


def summarize(name: str, latencies: list[float], seconds: float, cpu: tuple[float, float],
              failures: list[str], purge: dict[str, Any] | None = None) -> Phase:
    ms = sorted(1000 * v for v in latencies)
    return Phase(name, len(ms), percentile(ms, 0.50), percentile(ms, 0.99), ms[-1] if ms else float("nan"),
                 statistics.fmean(ms) if ms else float("nan"), seconds,
                 len(ms) / seconds if seconds > 0 else float("nan"),
                 round(cpu[0], 1), round(cpu[1], 1), failures, purge)


def idle_phase(scu: Scu, stores: int) -> Phase:
    window = CpuWindow(scu)
    window.start()
    out = scu.count(stores)
    cpu = window.stop()
    samples = out["samples"]
    seconds = samples[-1][0] + samples[-1][1] - samples[0][0]
    return summarize("idle", [lat for _, lat in samples], seconds, cpu, out["failures"])


def purge_phase(name: str, scu: Scu, store: Any, expected: int, batch: int) -> Phase:
    marks: list[tuple[float, int]] = []    # (time.monotonic(), purged so far) per round
    result: dict[str, Any] = {}

    def purge() -> None:
        try:
            result["purged"] = store.purge_expired(RETENTION_DAYS, batch=batch,
                                                   progress=lambda done: marks.append((time.monotonic(), done)))
        except Exception as exc:   # reported, never fatal for the other phases
            result["error"] = f"{exc.__class__.__name__}: {exc}"

    window = CpuWindow(scu)
    scu.start()                    # stores flow before the purge begins
    window.start()
    thread = threading.Thread(target=purge, name="bench-purge")
    t0 = time.monotonic()
    thread.start()
    thread.join()
    t1 = time.monotonic()
    cpu = window.stop()
    out = scu.stop()
    # Every store whose wait overlapped the purge (the one in flight when it began may
    # be the one a long transaction holds).
    during = [lat for started, lat in out["samples"] if started < t1 and started + lat > t0]
    failures = list(out["failures"])
    purged = result.get("purged", 0)
    left, blobs = expired(store)
    if "error" in result:
        failures.append(f"purge failed: {result['error']}")
    if purged != expected or left or blobs:
        failures.append(f"purged {purged} of {expected} objects; {left} expired objects left unpurged, "
                        f"{blobs} blob_data rows of purged objects left")
    # Rounds that purged something (the last round finds nothing and ends the loop).
    ends = [t for (t, done), prev in zip(marks, [0] + [d for _, d in marks]) if done > prev]
    gaps = [b - a for a, b in zip([t0] + ends, ends)]
    purge_info = {"batch": batch, "purged": purged, "expected": expected, "seconds": t1 - t0,
                  "objects_per_s": purged / (t1 - t0) if t1 > t0 else None,
                  "transactions": len(ends), "rounds": len(marks),
                  "between_batches_mean_ms": 1000 * statistics.fmean(gaps) if gaps else None,
                  "between_batches_max_ms": 1000 * max(gaps) if gaps else None,
                  "unpurged_left": left, "purged_blob_rows_left": blobs}
    return summarize(name, during, t1 - t0, cpu, failures, purge_info)


# ---------------------------------------------------------------------------
# report


def print_table(phases: list[Phase]) -> None:
    head = (f"{'phase':<30} {'stores':>6} {'p50 ms':>7} {'p99 ms':>8} {'max ms':>9} {'mean ms':>8} "
            f"{'stores/s':>8} {'engine CPU':>10} {'other CPU':>9}  check")
    print(head)
    print("-" * len(head))
    for ph in phases:
        check = "ok" if not ph.failures else "; ".join(ph.failures)[:100]
        print(f"{ph.name:<30} {ph.stores:>6} {ph.p50_ms:>7.2f} {ph.p99_ms:>8.2f} {ph.max_ms:>9.1f} "
              f"{ph.mean_ms:>8.2f} {ph.stores_per_s:>8.1f} {ph.engine_cpu_pct:>9.0f}% "
              f"{ph.other_cpu_pct:>8.0f}%  {check}")
    print(f"\nengine CPU: this process (engine + purge thread), % of one core; other CPU: processes "
          f"outside the benchmark (kernel threads excluded), % of all {os.cpu_count()} cores.")
    noisy = [ph.name for ph in phases if ph.other_cpu_pct > 10]
    if noisy:
        print(f"WARNING: {', '.join(noisy)} shared the machine with > 10% foreign load; re-run "
              f"on a quiet machine before reading much into the ratios.")


def ratios(phases: list[Phase]) -> list[dict[str, Any]]:
    idle = phases[0]
    return [{"phase": ph.name, "stores": ph.stores,
             "p50": ph.p50_ms / idle.p50_ms, "p99": ph.p99_ms / idle.p99_ms,
             "max": ph.max_ms / idle.max_ms} for ph in phases[1:]]


def print_ratios(rows: list[dict[str, Any]], phases: list[Phase]) -> None:
    print("\nresponse time while purging / idle (same run):")
    for row in rows:
        few = f"  (only {row['stores']} store(s): p50/p99 of a handful)" if row["stores"] < 100 else ""
        print(f"  {row['phase']:<30} p50 {row['p50']:6.2f}x   p99 {row['p99']:6.2f}x   "
              f"(max {row['max']:.1f}x){few}")
    print()
    for ph in phases:
        pg = ph.purge
        if pg is None:
            continue
        rate = f"{pg['objects_per_s']:.0f} objects/s" if pg["objects_per_s"] else "-"
        gaps = (f"; per batch (queue wait + transaction + pause): mean {pg['between_batches_mean_ms']:.1f} ms, "
                f"max {pg['between_batches_max_ms']:.1f} ms" if pg["transactions"] > 1 else "")
        print(f"  {ph.name}: purged {pg['purged']} of {pg['expected']} in {pg['seconds']:.2f} s "
              f"({rate}), {pg['transactions']} transaction(s){gaps}")
        if pg["purged"] != pg["expected"] or pg["unpurged_left"] or pg["purged_blob_rows_left"]:
            print(f"ERROR: {ph.name}: purged {pg['purged']} of {pg['expected']}; "
                  f"{pg['unpurged_left']} expired objects left unpurged, "
                  f"{pg['purged_blob_rows_left']} blob_data rows of purged objects left")


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_scu"]:
        return scu_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objects", type=int, default=100_000, help="finished objects to purge (default 100000)")
    p.add_argument("--stores", type=int, default=1500, help="stores in the idle phase (default 1500)")
    p.add_argument("--kind", choices=("sr", "ct"), default="sr",
                   help=f"what the SCU sends: Basic Text SRs (~1 KiB, default) or CTs "
                        f"({CT_PIXEL_BYTES // 1024} KiB pixel data); both are stored inline")
    p.add_argument("--compare-single-transaction", action="store_true",
                   help="also seed N more and purge them in one transaction (the old behaviour)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    if args.objects < 1 or args.stores < 1:
        p.error("--objects and --stores must be positive")

    from mfconsole.config import load
    from mfconsole.engine import outbox
    from mfconsole.engine.engine import Engine
    from mfconsole.engine.store import PURGE_BATCH, PURGE_PAUSE_S

    started = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="mfpurge-"))
    engine = scu = None
    phases: list[Phase] = []
    seeding: list[float] = []
    failures: list[str] = []
    interrupted = False
    try:
        port = free_port()
        # Long timeouts: the one-transaction purge may hold a store's response for seconds.
        cfg = load(write_config(scratch / "engine", port=port, ae_title=AET,
                                listener={"network_timeout_s": SCU_TIMEOUT_S, "dimse_timeout_s": SCU_TIMEOUT_S},
                                store={"retention_days": 36500}))
        engine = Engine(cfg, log_to_stderr=False)
        engine.start()
        store = engine.store
        store.call(lambda tx: outbox.pause(tx, DEST, "bench/purge.py", actor="bench"))

        seeding.append(seed(store, args.objects))
        left, _ = expired(store)
        print(f"seeded {args.objects} finished objects ({left} past retention) in {seeding[-1]:.1f} s; "
              f"data dir {sum(f.stat().st_size for f in cfg.engine.data_dir.rglob('*') if f.is_file()) / 2**20:.0f} MiB",
              flush=True)

        scu = Scu(port, args.kind, scratch / "scu.log")
        scu.count(WARMUP_STORES)
        phases.append(idle_phase(scu, args.stores))
        print(f"  idle: {phases[-1].stores} stores, p50 {phases[-1].p50_ms:.2f} ms, "
              f"p99 {phases[-1].p99_ms:.2f} ms", flush=True)
        checkpoint(store)
        name = f"purging, batches of {PURGE_BATCH}"
        phases.append(purge_phase(name, scu, store, args.objects, PURGE_BATCH))
        print(f"  {name}: {phases[-1].stores} stores, p50 {phases[-1].p50_ms:.2f} ms, "
              f"p99 {phases[-1].p99_ms:.2f} ms, purge {phases[-1].purge['seconds']:.1f} s", flush=True)

        if args.compare_single_transaction:
            seeding.append(seed(store, args.objects))
            print(f"seeded {args.objects} more in {seeding[-1]:.1f} s", flush=True)
            scu.count(WARMUP_STORES)
            name = "purging, one transaction (old)"
            phases.append(purge_phase(name, scu, store, args.objects, 10**9))
            print(f"  {name}: {phases[-1].stores} stores, max {phases[-1].max_ms:.0f} ms, "
                  f"purge {phases[-1].purge['seconds']:.1f} s", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; stopping", file=sys.stderr)
    except Exception as exc:
        failures.append(f"{exc.__class__.__name__}: {exc}")
        print(f"FAILED: {failures[-1][:500]}", file=sys.stderr)
    finally:
        if scu is not None:
            scu.close()
        if engine is not None:
            engine.stop()
        if args.keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n== bench/purge.py: {platform.node()}, {os.cpu_count()} CPU(s), loopback; "
          f"{args.objects} finished objects purged (retention {RETENTION_DAYS} days, "
          f"PURGE_BATCH {PURGE_BATCH}, PURGE_PAUSE_S {PURGE_PAUSE_S}); one SCU association, "
          f"{args.kind.upper()} objects, C-STORE response time ==\n")
    rows: list[dict[str, Any]] = []
    if phases:
        print_table(phases)
        rows = ratios(phases)
        print_ratios(rows, phases)
    for failure in failures:
        print(f"FAILED: {failure}")
    total = time.time() - started
    print(f"\ntotal run time {total:.0f} s")
    save_results("purge", [], {
        "started": started, "seconds": total, "interrupted": interrupted,
        "objects": args.objects, "idle_stores": args.stores, "kind": args.kind,
        "retention_days": RETENTION_DAYS, "seeded_age_days": AGE_DAYS,
        "purge_batch": PURGE_BATCH, "purge_pause_s": PURGE_PAUSE_S, "scu_gap_s": GAP_S,
        "seeding_seconds": seeding, "phases": [asdict(ph) for ph in phases], "ratios": rows,
        "failures": failures,
    })
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
