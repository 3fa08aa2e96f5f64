"""What rules cost ingest: `mfconsole serve` routing by its [[routes]] alone beside the
same with N generated [[rules]], in the same run on the same corpus, printed as ratios.

    .venv/bin/python bench/rules.py               # 1000 SRs + 200 CTs, 10 rules, median of 3
    .venv/bin/python bench/rules.py --quick       # 400 SRs + 40 CTs, one round
    .venv/bin/python bench/rules.py --rules 50 --repeat 5

Cases (each a fresh receiver in a fresh folder; senders are bench/ingest.py's: 4 DCMTK
storescu with TCP_NODELAY=1, the corpus split into 4 folders):

- routes: `mfconsole serve` as bench/ingest.py runs it (one route to an unreachable
          destination: every object gets a queued delivery row)
- rules:  the same with N rules that all fail on their last `when` key, so every rule
          is evaluated whole for every object (the worst case of match = "first"): each
          first matches the modality, then a pattern on a header attribute every object
          carries (PatientID, StudyDate: the scan reads them, the router decodes and
          searches them), then fails on the calling AE title; the fallback (the route)
          takes every object

The bar: rules within 10 % of routes (ratio >= 0.90). Shared 2-core machines move
throughput by +-25 % from run to run: the rounds are interleaved and the median is
reported; CPU ms per object moves much less.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import ingest  # noqa: E402  (bench/ingest.py: receivers, corpus, senders, one case)
from ingest import MfconsoleReceiver, Receiver, build_corpus, run_case, write_config  # noqa: E402

TARGET = 0.90
RULES = 10


def generated_rules(n: int) -> list[dict[str, Any]]:
    """N rules that each evaluate every key and match no object."""
    attributes = ({"PatientID": "."}, {"StudyDate": "^20"})
    return [{"name": f"rule-{i}",
             "when": {"modality": ["SR", "CT", "MR"], "tags": attributes[i % 2],
                      "calling_aet": [f"NOPE{i}"]},
             "to": ["pacs"]} for i in range(n)]


class RoutesReceiver(MfconsoleReceiver):
    name = "routes"


class RulesReceiver(MfconsoleReceiver):
    name = "rules"
    notes = f"mfconsole serve with {RULES} rules evaluated whole per object, the route as fallback"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.config = write_config(workdir, port=self.port, ae_title=self.ae_title,
                                   store={"max_object_mb": 1024}, rules=generated_rules(RULES))


CASES = {"routes": RoutesReceiver, "rules": RulesReceiver}
ingest.FACTORIES.update(CASES)     # run_case builds receivers by name


def main(argv: list[str] | None = None) -> int:
    global RULES
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rules", type=int, default=RULES, help=f"generated rules (default {RULES})")
    p.add_argument("--sr", type=int, default=1000, help="SRs per case (default 1000)")
    p.add_argument("--ct", type=int, default=200, help="CTs per case (default 200)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--quick", action="store_true", help="400 SRs, 40 CTs, one round")
    args = p.parse_args(argv)
    RULES = args.rules
    if args.quick:
        args.sr, args.ct, args.repeat = 400, 40, 1
    if shutil.which("storescu") is None:
        print("bench/rules.py needs storescu (apt-get install dcmtk)", file=sys.stderr)
        return 2
    started = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="mfbench-rules-"))
    live: list[Receiver] = []
    corpora = {"SR": args.sr, "CT": args.ct}
    runs: dict[tuple[str, str], list[Any]] = {(c, n): [] for c in corpora for n in CASES}
    try:
        folders = {"SR": build_corpus(scratch / "sr", "sr", args.sr),
                   "CT": build_corpus(scratch / "ct", "ct", args.ct, pixel_bytes=512 * 512 * 2)}
        names = list(CASES)
        for round_ in range(args.repeat):
            for corpus, count in corpora.items():
                # Interleaved and alternated: drift on a shared machine hits both alike.
                for name in names[round_ % 2:] + names[:round_ % 2]:
                    r = run_case(name, corpus, folders[corpus], count, nagle=False, scratch=scratch,
                                 live=live)
                    runs[(corpus, name)].append(r)
                    print(f"  round {round_ + 1} {corpus} {name:<7} {r.objects_per_s:7.1f} objects/s  "
                          f"{r.cpu_ms_per_object:5.2f} CPU ms/object  other CPU {r.other_cpu_pct:.0f}%"
                          + (f"  {'; '.join(r.problems)}" if r.problems else ""), flush=True)
    finally:
        for receiver in list(live):
            receiver.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n== bench/rules.py: {RULES} rules vs routes alone, 4 storescu senders, "
          f"median of {args.repeat} ==")
    summary: dict[str, Any] = {}
    for corpus, count in corpora.items():
        rate = {n: statistics.median(r.objects_per_s for r in runs[(corpus, n)]) for n in CASES}
        cpu = {n: statistics.median(r.cpu_ms_per_object for r in runs[(corpus, n)]) for n in CASES}
        ratio = rate["rules"] / rate["routes"]
        summary[corpus] = {"objects": count, "objects_per_s": rate, "cpu_ms_per_object": cpu,
                           "ratio": ratio}
        print(f"  {corpus} x{count}: routes {rate['routes']:7.1f} objects/s ({cpu['routes']:.2f} CPU ms), "
              f"rules {rate['rules']:7.1f} objects/s ({cpu['rules']:.2f} CPU ms)  "
              f"rules / routes = {ratio:.2f} ({'PASS' if ratio >= TARGET else 'MISS'}: target >= {TARGET})")
    out = BENCH / "results" / f"rules-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"started": started, "rules": RULES, "repeat": args.repeat,
                               "objects_per_s": {f"{c} {n}": [r.objects_per_s for r in rs]
                                                 for (c, n), rs in runs.items()},
                               "summary": summary}, indent=2))
    print(f"results: {out.relative_to(BENCH.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
