"""Where a receiver spends its time during ingest: py-spy over `mfconsole serve` (or the
bare pynetdicom SCP), and/or strace syscall counts for any receiver.

    .venv/bin/python bench/profile_ingest.py                      # mfconsole, SR x4, py-spy
    .venv/bin/python bench/profile_ingest.py --corpus ct --senders 1
    .venv/bin/python bench/profile_ingest.py --receiver bare-pynetdicom
    .venv/bin/python bench/profile_ingest.py --receiver orthanc --strace   # fsyncs per object

py-spy (``.venv/bin/pip install py-spy``; needs ptrace rights) samples every thread
that holds the GIL (``--gil``, the resource pynetdicom and the engine compete for on a
2-core box; ``--all-threads`` samples every non-idle thread instead), with the native
frames left out. Printed: the top functions by self samples and by inclusive samples,
as a share of all samples. The raw collapsed stacks are kept under bench/results/ for
flamegraph tools. Nothing here is a timed test; throughput under a profiler or strace
is lower than in bench/ingest.py.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ingest  # noqa: E402  (puts tests/ on sys.path too)

FRAME_FILE = re.compile(r" \((?P<file>[^)]*)\)$")


def short(frame: str) -> str:
    """'func (/long/path/site-packages/pynetdicom/dul.py)' -> 'func (pynetdicom/dul.py)'."""
    m = FRAME_FILE.search(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return frame[:m.start()] + f" ({path})"


def summarize(raw: Path, top: int) -> None:
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [short(f) for f in stack.split(";")]
        # py-spy puts "process ..." / "thread (...)" pseudo-frames first
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        self_counts[frames[-1]] += n
        for f in set(frames):
            incl_counts[f] += n
    print(f"\n{total} samples")
    print(f"\ntop {top} by self samples:")
    for frame, n in self_counts.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {frame}")
    print(f"\ntop {top} by inclusive samples:")
    for frame, n in incl_counts.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {frame}")


def strace_summary(path: Path, objects: int) -> None:
    text = path.read_text(errors="replace")
    print("\nstrace -c -f (receiver, during the transfer):")
    print(text)
    for call in ("fsync", "fdatasync", "write", "pwrite64", "sendto", "recvfrom", "read",
                 "setsockopt", "futex", "openat"):
        m = re.search(rf"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?{call}$", text, re.M)
        if m:
            print(f"  {call:<10} {int(m[1]) / objects:6.2f} per object")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--receiver", default="mfconsole", choices=sorted(ingest.FACTORIES))
    p.add_argument("--corpus", default="sr", choices=("sr", "ct"))
    p.add_argument("--count", type=int, default=None, help="objects (default 1000 SR / 200 CT)")
    p.add_argument("--senders", type=int, default=4, choices=(1, 4))
    p.add_argument("--nagle", action="store_true", help="stock DCMTK (Nagle on)")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--all-threads", action="store_true",
                   help="sample every non-idle thread, not only the one holding the GIL")
    p.add_argument("--strace", action="store_true", help="count syscalls instead of py-spy")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)

    count = args.count or (1000 if args.corpus == "sr" else 200)
    scratch = Path(tempfile.mkdtemp(prefix="mfprofile-"))
    out_dir = ingest.BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    receiver = None
    tracer: subprocess.Popen | None = None
    try:
        kw = {"pixel_bytes": 512 * 512 * 2} if args.corpus == "ct" else {}
        folders = ingest.build_corpus(scratch / args.corpus, args.corpus, count, **kw)
        use = [folders[0].parent] if args.senders == 1 else folders
        workdir = scratch / "rx"
        workdir.mkdir()
        receiver = ingest.FACTORIES[args.receiver](workdir)
        receiver.start(nodelay=not args.nagle)
        time.sleep(0.3)
        pid = receiver.pid
        if args.strace:
            out = out_dir / f"strace-{args.receiver}-{stamp}.txt"
            tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
                                      stderr=subprocess.DEVNULL)
        else:
            spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
            if spy is None:
                sys.exit("py-spy not found: .venv/bin/pip install py-spy")
            out = out_dir / f"pyspy-{args.receiver}-{args.corpus}x{args.senders}-{stamp}.txt"
            cmd = [spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--format", "raw",
                   "--nolineno", "--output", str(out)]
            cmd += [] if args.all_threads else ["--gil"]
            tracer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)   # attach
        cpu0 = ingest.cpu_seconds(pid)
        elapsed, problems = ingest.send(receiver, use, nodelay=not args.nagle)
        cpu1 = ingest.cpu_seconds(pid)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=60)
        tracer = None
        held = receiver.count()
        print(f"{args.receiver} {args.corpus.upper()} x{args.senders} "
              f"nagle {'on' if args.nagle else 'off'}: {count} objects in {elapsed:.2f} s "
              f"({count / elapsed:.1f}/s under the tracer), CPU {1000 * (cpu1 - cpu0) / count:.2f} "
              f"ms/object, receiver holds {held if held is not None else 'n/a'}"
              f"{'; ' + '; '.join(problems) if problems else ''}")
        if args.strace:
            strace_summary(out, count)
        else:
            summarize(out, args.top)
        print(f"\nraw output: {out.relative_to(ingest.REPO)}")
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.send_signal(signal.SIGINT)
            try:
                tracer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                tracer.kill()
                tracer.wait()
        if receiver is not None:
            receiver.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
