"""Where one object's time goes inside mfconsole: the engine runs in-process with timing
wrappers around each ingest stage, while DCMTK storescu sends the SR (or CT) corpus.

    .venv/bin/python bench/ingest_breakdown.py [--corpus sr|ct] [--senders 1|4] [--count N]
    .venv/bin/python bench/ingest_breakdown.py --experiment syncfs

Printed per stage: calls, mean and p95 wall milliseconds, and the share of the C-STORE
handler's wall time. "handler" is the whole C-STORE handling of one data set (scan,
seal, wait for the group commit): on the listener's event loop for small objects;
"response gap" is the time from a handler's
return to the next handler's start on the same association (encoding and sending the
response, the sender's next request, receiving and reassembling it). "everything else"
is the process's CPU outside the handler and the writer: mostly the listener's event
loop (PDU reads, DIMSE decoding, responses). Also: group commit
sizes and fsync counts per thread kind. Wrappers add a few microseconds per call;
throughput here is indicative only. The repository's code is not modified: the
wrappers are installed on the imported modules of this process.

--experiment NAME (repeatable) monkeypatches a candidate fix into this process only,
to size it before anyone implements it properly:

  one-blob-dir   new blobs go to one directory, so a group commit fsyncs one directory
                 instead of one per object (256-way fan-out today).
  syncfs         association threads do not fsync their blob; the writer calls
                 syncfs(data_dir) once per group before the SQLite commit.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ingest  # noqa: E402  (puts tests/ on sys.path too)
from harness import write_config  # noqa: E402
from peers import free_port  # noqa: E402

TIMES: dict[str, list[float]] = collections.defaultdict(list)
CPU: dict[str, float] = collections.defaultdict(float)   # thread CPU seconds per stage
LOCK = threading.Lock()


def record(name: str, seconds: float, cpu: float = 0.0) -> None:
    with LOCK:
        TIMES[name].append(seconds)
        CPU[name] += cpu


def timed(owner: Any, attr: str, name: str) -> None:
    original = getattr(owner, attr, None)
    if original is None:   # the engine changed shape: time what still exists
        print(f"note: {getattr(owner, '__name__', owner)}.{attr} not found; not timed",
              file=sys.stderr)
        return

    def wrapper(*args: Any, **kw: Any) -> Any:
        t, c = time.perf_counter(), time.thread_time()
        try:
            return original(*args, **kw)
        finally:
            record(name, time.perf_counter() - t, time.thread_time() - c)

    setattr(owner, attr, wrapper)


def install() -> None:
    from mfconsole.dimse import listener as listener_mod
    from mfconsole.engine import store as store_mod
    from mfconsole.engine import vault as vault_mod
    from mfconsole.ul import acceptor as acceptor_mod

    last_end: dict[Any, float] = {}

    # The whole handling of one C-STORE data set on the listener's connection: scanned
    # and sealed on the event loop (small objects) or its worker pool, then the wait
    # for the group commit. Wall time only: on the loop, thread CPU is everyone's.
    original_store = acceptor_mod._Connection._store

    async def store(self: Any, *args: Any, **kw: Any) -> Any:
        key, t = self.info.key, time.perf_counter()
        if key in last_end:
            record("response gap (upper layer + sender)", t - last_end[key])
        try:
            return await original_store(self, *args, **kw)
        finally:
            end = time.perf_counter()
            record("handler (total)", end - t)
            last_end[key] = end

    acceptor_mod._Connection._store = store
    original_wait = listener_mod.Committing.wait_async

    async def wait_async(self: Any) -> Any:
        t = time.perf_counter()
        try:
            return await original_wait(self)
        finally:
            record("  wait for group commit", time.perf_counter() - t)

    listener_mod.Committing.wait_async = wait_async
    timed(listener_mod, "scan_dataset", "  scan_dataset")
    timed(store_mod.Store, "seal", "  Store.seal (encrypt + write + fsync)")
    timed(store_mod.Store, "_commit_group", "writer: commit group")
    timed(store_mod, "fsync_dir", "writer:   fsync blob dirs")
    timed(store_mod.Store, "_insert", "writer:   insert rows (per object)")

    sizes: list[int] = []
    original_group = store_mod.Store._commit_group

    def commit_group(self: Any, batch: list) -> None:
        sizes.append(sum(1 for j in batch if j.kind == "ingest"))
        return original_group(self, batch)

    store_mod.Store._commit_group = commit_group
    install.sizes = sizes  # type: ignore[attr-defined]

    fsyncs: collections.Counter[str] = collections.Counter()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        t, c = time.perf_counter(), time.thread_time()
        try:
            real_fsync(fd)
        finally:
            kind = threading.current_thread().name.split("-")[0].split("@")[0]
            fsyncs[kind] += 1
            record(f"os.fsync ({kind} thread)", time.perf_counter() - t, time.thread_time() - c)

    vault_mod.os.fsync = fsync  # vault_mod.os is the os module: also covers fsync_dir
    install.fsyncs = fsyncs  # type: ignore[attr-defined]


def experiment(name: str) -> None:
    import ctypes

    from mfconsole.engine import store as store_mod
    from mfconsole.engine import vault as vault_mod

    if name == "one-blob-dir":
        def seal(self: Any, data: Any) -> tuple[str, Any]:
            import uuid

            rel = f"00/{uuid.uuid4().hex}.blob"
            path = self.blob_root / rel
            path.parent.mkdir(exist_ok=True, mode=0o700)
            return rel, self.vault.seal_to_file(data, path)

        store_mod.Store.seal = seal
    elif name == "syncfs":
        libc = ctypes.CDLL(None, use_errno=True)

        class _NoFsyncOs:   # vault's view of os: everything but fsync is the real one
            def __getattr__(self, attr: str) -> Any:
                return getattr(os, attr)

            @staticmethod
            def fsync(fd: int) -> None:
                pass

        vault_mod.os = _NoFsyncOs()  # type: ignore[assignment]

        def sync_data_dir(path: Any) -> None:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if libc.syncfs(fd) != 0:
                    raise OSError(ctypes.get_errno(), "syncfs failed")
            finally:
                os.close(fd)

        original_group = store_mod.Store._commit_group

        def commit_group(self: Any, batch: list) -> None:
            if any(j.kind == "ingest" for j in batch):
                sync_data_dir(self.blob_root)
            return original_group(self, batch)

        store_mod.Store._commit_group = commit_group
        store_mod.fsync_dir = lambda path: None   # covered by the syncfs
    else:
        raise SystemExit(f"unknown experiment {name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="sr", choices=("sr", "ct"))
    p.add_argument("--count", type=int, default=None)
    p.add_argument("--senders", type=int, default=4, choices=(1, 4))
    p.add_argument("--experiment", action="append", default=[],
                   choices=("one-blob-dir", "syncfs"))
    args = p.parse_args(argv)
    count = args.count or (1000 if args.corpus == "sr" else 200)

    for name in args.experiment:
        experiment(name)
    install()
    from mfconsole.config import load
    from mfconsole.engine.engine import Engine

    scratch = Path(tempfile.mkdtemp(prefix="mfbreakdown-"))
    engine = None
    try:
        kw = {"pixel_bytes": 512 * 512 * 2} if args.corpus == "ct" else {}
        folders = ingest.build_corpus(scratch / args.corpus, args.corpus, count, **kw)
        use = [folders[0].parent] if args.senders == 1 else folders
        port = free_port()
        cfg = load(write_config(scratch / "serve", port=port, ae_title="MF_SCP"))
        engine = Engine(cfg, log_to_stderr=False)
        engine.start()

        target = ingest.Receiver(scratch)
        target.ae_title, target.port = "MF_SCP", port
        TIMES.clear()
        cpu0 = time.process_time()
        elapsed, problems = ingest.send(target, use, nodelay=True)
        cpu = time.process_time() - cpu0
        rows = engine.store.reader().object_count()
    finally:
        if engine is not None:
            engine.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    known = CPU.get("handler (total)", 0.0) + CPU.get("writer: commit group", 0.0)
    print("mfconsole in-process"
          f"{' + ' + ' + '.join(args.experiment) if args.experiment else ''}, "
          f"{args.corpus.upper()} x{args.senders}: {count} objects in "
          f"{elapsed:.2f} s = {count / elapsed:.1f}/s, CPU {1000 * cpu / count:.2f} ms/object "
          f"(whole process), {rows} rows{'; ' + '; '.join(problems) if problems else ''}\n")
    handler_total = sum(TIMES.get("handler (total)", [0.0])) or 1.0
    print(f"{'stage':<44} {'calls':>6} {'mean ms':>8} {'p95 ms':>8} {'% handler':>9} "
          f"{'CPU ms/object':>13}")
    order = ["handler (total)", "  scan_dataset", "  Store.seal (encrypt + write + fsync)",
             "  wait for group commit", "response gap (upper layer + sender)",
             "writer: commit group", "writer:   fsync blob dirs", "writer:   insert rows (per object)",
]
    order += sorted(k for k in TIMES if k not in order)
    for name in order:
        values = sorted(TIMES.get(name, []))
        if not values:
            continue
        mean = sum(values) / len(values)
        p95 = values[int(0.95 * (len(values) - 1))]
        share = 100 * sum(values) / handler_total
        cpu_col = f"{1000 * CPU[name] / count:>13.3f}" if CPU.get(name) else f"{'':>13}"
        print(f"{name:<44} {len(values):>6} {1000 * mean:>8.3f} {1000 * p95:>8.3f} {share:>8.1f}% "
              f"{cpu_col}")
    print(f"{'everything else (upper layer threads or event loop, GC)':<70} "
          f"{1000 * (cpu - known) / count:>13.3f}")
    sizes = install.sizes  # type: ignore[attr-defined]
    ingest_groups = [s for s in sizes if s]
    if ingest_groups:
        hist = collections.Counter(min(s, 8) for s in ingest_groups)
        print(f"\ngroup commits with objects: {len(ingest_groups)}, mean {sum(ingest_groups) / len(ingest_groups):.2f} "
              f"objects/commit; sizes " + ", ".join(f"{k}{'+' if k == 8 else ''}: {v}" for k, v in sorted(hist.items())))
    print("fsync calls by thread: " + ", ".join(f"{k} {v} ({v / count:.2f}/object)"
                                                for k, v in install.fsyncs.items()))  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
