"""Peak memory of the mfconsole upper layer under concurrent large objects, with the
in-flight budget (store.inflight_mb) — the bound it puts on what associations hold.

    .venv/bin/python bench/ul_inflight.py [--objects 8] [--size-mb 60] [--budget-mb 64]

Starts `mfconsole serve` in a subprocess, sends
``--objects`` objects of ``--size-mb`` each at once (one DCMTK storescu per object),
samples the server's VmRSS every 20 ms, then re-sends what was refused (0xA700) one
at a time until everything is stored, and checks the stored bytes (SHA-256 of the
decrypted blob against the data set bytes sent). Prints the peak RSS growth over
the idle server, the number refused in the concurrent round, and the time taken.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pydicom import dcmread  # noqa: E402

import dicomgen  # noqa: E402
from harness import ServeProcess, stored_sha256, write_config  # noqa: E402
from peers import require_tool  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def storescu(port: int, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("storescu"), "-xe", "-aet", "BENCH", "-aec", "MF_SCP",
                           "127.0.0.1", str(port), str(path)], capture_output=True, text=True,
                          timeout=600)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objects", type=int, default=8)
    p.add_argument("--size-mb", type=int, default=60)
    p.add_argument("--budget-mb", type=int, default=64)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ul-inflight-") as tmp:
        root = Path(tmp)
        files = [dicomgen.save(dicomgen.make_image(pixel_bytes=args.size_mb * 1024 * 1024),
                               root / "in" / f"{i}.dcm") for i in range(args.objects)]
        expected = {}
        for f in files:
            data, _ = dicomgen.dataset_bytes(f)
            expected[str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = \
                hashlib.sha256(data).hexdigest()
        config = write_config(root / "serve", listener={
            "max_associations": args.objects + 2,
            "network_timeout_s": 60}, store={"inflight_mb": args.budget_mb,
                                            "max_object_mb": args.size_mb * 2},
            destinations=[], routes=[])
        port = int(config.read_text().split("port = ")[1].split()[0])
        server = ServeProcess(config, port).start()
        try:
            assert server.proc is not None
            pid = server.proc.pid
            time.sleep(1.0)
            base = rss_kib(pid)
            peak = base
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, rss_kib(pid))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.monotonic()
            threads = [threading.Thread(target=storescu, args=(port, f)) for f in files]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            concurrent_s = time.monotonic() - t0
            stored = stored_sha256(server.data_dir)
            refused = len(files) - len(stored)
            # What was refused is re-sent (a sender's retry), one at a time.
            for f in files:
                uid = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                if uid not in stored:
                    storescu(port, f)
            total_s = time.monotonic() - t0
            done.set()
            sampler.join()
            final = stored_sha256(server.data_dir)
        finally:
            server.stop()
        ok = final == expected
        print(f"objects={args.objects} size_mb={args.size_mb} budget_mb={args.budget_mb} "
              f"refused_in_concurrent_round={refused} all_stored_byte_exact={ok} "
              f"concurrent_s={concurrent_s:.1f} total_s={total_s:.1f} "
              f"rss_idle_mib={base / 1024:.0f} rss_peak_growth_mib={(peak - base) / 1024:.0f}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
