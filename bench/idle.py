"""What idle TCP connections cost a listener: `mfconsole serve`, N connections that
never send an A-ASSOCIATE-RQ (a port scanner, a broken client, a flood).

    .venv/bin/python bench/idle.py              # 0, 100 and 1000 idle connections
    .venv/bin/python bench/idle.py --counts 0,100 --objects 100

For each N: the serve process's threads and CPU (utime + stime, /proc/PID/stat) over
5 s with the connections open, how long an echoscu takes meanwhile, and how long a
storescu of --objects SRs (one association, TCP_NODELAY=1; median of --repeat runs,
the first storing, the others answered as duplicates) takes, with its ratio to
the same run with no idle connection (issue 16's bounds: echoscu < 1 s, storescu at
most 1.2x, CPU < 0.05 cores, no thread per connection).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

import dicomgen  # noqa: E402
from harness import ServeProcess, run, write_config  # noqa: E402
from peers import free_port, require_tool  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def measure(count: int, files: list[Path], scratch: Path, repeat: int) -> dict:
    port = free_port()
    config = write_config(scratch / f"idle-{count}", port=port, listener={"acse_timeout_s": 120})
    serve = ServeProcess(config, port).start()
    idle: list[socket.socket] = []
    try:
        pid = serve.proc.pid
        base = threads(pid)
        for _ in range(count):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(2)   # let the listener take them all
        c0, t0 = cpu_s(pid), time.monotonic()
        time.sleep(5)
        cpu = (cpu_s(pid) - c0) / (time.monotonic() - t0)
        grown = threads(pid) - base
        e0 = time.monotonic()
        res = run([require_tool("echoscu"), "-aet", "BENCH", "-aec", "MF_SCP", "127.0.0.1", str(port)])
        echo = time.monotonic() - e0
        times, ok = [], True
        for _ in range(repeat):   # the same objects again: stored as duplicates, the same work
            s0 = time.monotonic()
            sent = run([require_tool("storescu"), "-aet", "BENCH", "-aec", "MF_SCP", "127.0.0.1",
                        str(port), *map(str, files)], env={**os.environ, "TCP_NODELAY": "1"}, timeout=600)
            times.append(time.monotonic() - s0)
            ok = ok and sent.returncode == 0
        store = statistics.median(times)
        return {"idle": count, "threads_added": grown, "cpu_cores": round(cpu, 3),
                "echo_s": round(echo, 3), "echo_ok": res.returncode == 0,
                "storescu_s": round(store, 3), "storescu_ok": ok}
    finally:
        for s in idle:
            s.close()
        serve.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="0,100,1000")
    p.add_argument("--objects", type=int, default=300, help="SRs in the storescu run")
    p.add_argument("--repeat", type=int, default=5, help="storescu runs per case (median)")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    scratch = Path(tempfile.mkdtemp(prefix="mfidle-"))
    files = dicomgen.write_corpus(scratch / "sr", args.objects)
    print(f"{'idle':>5} {'threads added':>14} {'CPU (cores)':>12} {'echoscu s':>10} "
          f"{'storescu s':>11} {'vs 0 idle':>10}")
    baseline = None
    for count in (int(c) for c in args.counts.split(",")):
        r = measure(count, files, scratch, args.repeat)
        if count == 0:
            baseline = r["storescu_s"]
        ratio = f"{r['storescu_s'] / baseline:>9.2f}x" if baseline else f"{'':>10}"
        problems = ("" if r["echo_ok"] else "  ECHO FAILED") + ("" if r["storescu_ok"] else "  STORESCU FAILED")
        print(f"{count:>5} {r['threads_added']:>14} {r['cpu_cores']:>12.3f} {r['echo_s']:>10.3f} "
              f"{r['storescu_s']:>11.3f} {ratio}{problems}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
