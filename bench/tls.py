"""Ingest over TLS beside cleartext, in the same run: what TLS costs mfconsole's
listener, with DCMTK storescp measured the same way as the reference.

    .venv/bin/python bench/tls.py            # 1000 SRs, 100 CTs (~2 min on 2 cores)
    .venv/bin/python bench/tls.py --quick    # 200 SRs, 40 CTs
    .venv/bin/python bench/tls.py --repeat 3 # median of 3 fresh runs per case

Receivers: mfconsole in cleartext, with TLS (server certificate only) and with mTLS
(client certificates required and verified); storescp in cleartext and with TLS. The
senders are DCMTK ``storescu`` processes (``+tla`` / ``+tls KEY CERT``, ``+cf CA``),
one association each, as in bench/ingest.py, whose receivers, sender runs, CPU and
count checks this reuses (cases: SR x1, SR x4, SR x4 with stock Nagle-on senders —
mfconsole only, capped at 400 objects —, CT x4). Certificates: a throwaway RSA-2048
PKI from tests/tlsgen.py; every connection negotiates TLS 1.3 (AES-256-GCM).

Prints objects/s per case, then TLS / cleartext per receiver as ratios; results go to
bench/results/tls-<time>.json. The exit status is 0 whenever the benchmark ran.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ingest   # bench/ingest.py (this folder is sys.path[0]); puts tests/ on sys.path too
from harness import write_config
from tlsgen import make_pki

PKI: dict[str, Path] = {}
RECEIVERS = ("mfconsole", "mfconsole-tls", "mfconsole-mtls", "storescp", "storescp-tls")
BASELINE = {"mfconsole-tls": "mfconsole", "mfconsole-mtls": "mfconsole", "storescp-tls": "storescp"}


def anonymous() -> list[str]:
    return ["+tla", "+cf", str(PKI["ca.crt"])]


def with_certificate() -> list[str]:
    return ["+tls", str(PKI["client.key"]), str(PKI["client.crt"]), "+cf", str(PKI["ca.crt"])]


class MfconsoleTLS(ingest.MfconsoleReceiver):
    name = "mfconsole-tls"
    notes = "as mfconsole, listener tls = { cert_file, key_file }"
    mtls = False

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        tls: dict[str, Any] = {"cert_file": str(PKI["server.crt"]), "key_file": str(PKI["server.key"])}
        if self.mtls:
            tls |= {"require_client_cert": True, "ca_file": str(PKI["ca.crt"])}
        self.config = write_config(workdir, port=self.port, ae_title=self.ae_title,
                                   listener={"tls": tls})
        self.sender_args = with_certificate() if self.mtls else anonymous()


class MfconsoleMTLS(MfconsoleTLS):
    name = "mfconsole-mtls"
    notes = "as mfconsole-tls, plus require_client_cert (verified against ca_file)"
    mtls = True


class StorescpTLS(ingest.StorescpReceiver):
    name = "storescp-tls"
    notes = "as storescp, +tls (BCP 195 non-downgrading profile), client certificate optional"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.peer = ingest._QuietStoreSCP(
            workdir / "received", ae_title=self.ae_title, port=self.port,
            extra_args=["+tls", str(PKI["server.key"]), str(PKI["server.crt"]),
                        "+cf", str(PKI["ca.crt"]), "-vc"])
        self.sender_args = anonymous()


ingest.FACTORIES.update({"mfconsole-tls": MfconsoleTLS, "mfconsole-mtls": MfconsoleMTLS,
                         "storescp-tls": StorescpTLS})
_storescu_cmd = ingest.storescu_cmd


def storescu_cmd(receiver: Any, folder: Path) -> list[str]:
    """bench/ingest.py's storescu command with the receiver's TLS options, if any."""
    cmd = _storescu_cmd(receiver, folder)
    return cmd[:1] + getattr(receiver, "sender_args", []) + cmd[1:]


ingest.storescu_cmd = storescu_cmd   # ingest.send() builds its commands with it


def print_ratios(results: list[ingest.Result]) -> list[dict[str, Any]]:
    by = {(r.receiver, r.label): r for r in results}
    rows = []
    print("\nTLS objects/s divided by the same receiver's cleartext objects/s (1.00 = free):")
    for label in dict.fromkeys(r.label for r in results):
        parts = []
        for name, base in BASELINE.items():
            r, b = by.get((name, label)), by.get((base, label))
            if r is None or b is None:
                continue
            row = {"case": label, "receiver": name, "ratio": r.objects_per_s / b.objects_per_s,
                   "cpu_ms_per_object_delta": r.cpu_ms_per_object - b.cpu_ms_per_object}
            rows.append(row)
            parts.append(f"{name} / {base} = {row['ratio']:.2f} "
                         f"({row['cpu_ms_per_object_delta']:+.2f} CPU ms/object)")
        if parts:
            print(f"  {label:<12} " + "   ".join(parts))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200 SRs, 40 CTs")
    p.add_argument("--repeat", type=int, default=1, help="runs per case, median reported")
    p.add_argument("--receivers", default=",".join(RECEIVERS),
                   help=f"comma-separated subset of {','.join(RECEIVERS)}")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.receivers.split(",") if n.strip()]
    unknown = set(names) - set(RECEIVERS)
    if unknown:
        p.error(f"unknown receiver(s): {', '.join(sorted(unknown))}")
    n_sr, n_ct = (200, 40) if args.quick else (1000, 100)
    for tool in ("storescu", "storescp"):
        ingest.require_tool(tool)

    started = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="mfbench-tls-"))
    live: list[Any] = []
    results: list[ingest.Result] = []
    failures: list[str] = []
    try:
        PKI.update(make_pki(scratch / "pki"))
        sr = ingest.build_corpus(scratch / "sr", "sr", n_sr)
        ct = ingest.build_corpus(scratch / "ct", "ct", n_ct, pixel_bytes=512 * 512 * 2)
        n_nagle = min(n_sr, ingest.NAGLE_CAP)
        sr_nagle = sr if n_nagle == n_sr else ingest.subset(sr, n_nagle, scratch / "sr-nagle")
        print(f"corpus: {n_sr} SRs, {n_ct} CTs (512 KiB); receivers: {', '.join(names)}", flush=True)
        cases = [("SR", [sr[0].parent], n_sr, False), ("SR", sr, n_sr, False),
                 ("SR", sr_nagle, n_nagle, True), ("CT", ct, n_ct, False)]
        for corpus, folders, count, nagle in cases:
            for name in names:
                if nagle and not name.startswith("mfconsole"):
                    continue   # stock DCMTK peers crawl at ~11 objects/s with Nagle on
                try:
                    r = ingest.run_repeated(args.repeat, name, corpus, folders, count, nagle=nagle,
                                            scratch=scratch, live=live)
                except Exception as exc:   # one broken receiver must not void the others
                    failures.append(f"{name} {corpus}: {exc.__class__.__name__}: {exc}")
                    print(f"  {name:<16} FAILED: {failures[-1][:300]}", flush=True)
                    continue
                results.append(r)
                print(f"  {name:<16} {r.label:<12} {r.objects_per_s:8.1f} objects/s  "
                      f"{r.cpu_ms_per_object:6.2f} CPU ms/object  other CPU {r.other_cpu_pct:.0f}%"
                      f"{'  ' + '; '.join(r.problems) if r.problems else ''}", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping receivers", file=sys.stderr)
    finally:
        for receiver in list(live):
            receiver.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n== bench/tls.py{' --quick' if args.quick else ''}: {platform.node()}, "
          f"{os.cpu_count()} CPU(s), loopback ==\n")
    ingest.print_table(results)
    rows = print_ratios(results)
    for failure in failures:
        print(f"FAILED: {failure}")
    total = time.time() - started
    print(f"\ntotal run time {total:.0f} s")
    ingest.save_results("tls", ["storescu"], {
        "started": started, "seconds": total, "quick": args.quick, "repeat": args.repeat,
        "receiver_notes": {n: ingest.FACTORIES[n].notes for n in names},
        "results": [asdict(r) for r in results], "ratios": rows, "failures": failures,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
