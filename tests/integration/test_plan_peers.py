"""`mfconsole reload --plan` against `mfconsole serve` with real peers: 1 000 SRs sent with
DCMTK storescu as CT1 and MR1 while both DCMTK storescp destinations are paused, a changed
config.toml on disk (a header rule that discards, a rule that sends MR1 to both, a handler
that filters), and the plan printed by the command line: exact counts per destination and
rule, no delivery row created, nothing received by the peers, the running configuration
not reloaded, and the canary PHI nowhere in the plan, the log or the audit trail."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import dicomgen
from harness import CANARY_ID, CANARY_NAME, holds, mfconsole, poll, write_config
from peers import require_tool

from mfconsole.control import SOCKET_NAME, request

FAST = {"retry_initial_s": 0.2, "retry_max_s": 1.0, "connect_timeout_s": 2, "acse_timeout_s": 5,
        "dimse_timeout_s": 5}
QA_SITE = "QA Phantom Site"      # matched by the new rule, never printed
CT1, PHANTOMS, MR1 = 600, 200, 400
DROP_SERIES_0 = '''VERSION = "1.0"


def handle(obj, ctx):
    """Series 0 is the scanner's localizer series here: not for the archive."""
    return None if str(obj.dataset.get("SeriesNumber", "")) == "0" else obj.dataset
'''


def dest(name: str, scp) -> dict:
    return {"name": name, "kind": "dimse", "host": "127.0.0.1", "port": scp.port, "ae_title": scp.ae_title,
            **FAST}


def corpus(folder: Path) -> tuple[list[Path], list[Path]]:
    """CT1's SRs (the first PHANTOMS from the QA site) and MR1's (series 0..3 in turn)."""
    ct, mr = [], []
    for i in range(CT1):
        ds = dicomgen.make_sr()
        ds.InstitutionName = QA_SITE if i < PHANTOMS else "Hospital A"
        ct.append(dicomgen.save(ds, folder / "ct" / f"{i:04d}.dcm"))
    for i in range(MR1):
        ds = dicomgen.make_sr()
        ds.SeriesNumber = i % 4
        mr.append(dicomgen.save(ds, folder / "mr" / f"{i:04d}.dcm"))
    return ct, mr


def storescu(port: int, aet: str, files: list[Path]) -> None:
    res = subprocess.run([require_tool("storescu"), "-aet", aet, "-aec", "MF_SCP", "127.0.0.1", str(port),
                          *map(str, files)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def audit_rows(srv) -> list[dict]:
    with srv.db() as reads:
        return reads.rows("audit")


def line(text: str, name: str) -> str:
    found = re.search(rf"^  {re.escape(name)}\s+(\+\d+ / -\d+)\s", text, re.M)
    assert found, f"no line for {name} in:\n{text}"
    return found.group(1)


def test_reload_plan_on_1000_objects_prints_the_counts_and_sends_nothing(serve_factory, storescp_factory,
                                                                          tmp_path):
    pacs = storescp_factory(ae_title="PACS", name="pacs")
    archive = storescp_factory(ae_title="ARCHIVE", name="archive")
    dests = [dest("pacs", pacs), dest("archive", archive)]
    old_rules = [{"name": "ct", "when": {"calling_aet": ["CT1"]}, "to": ["pacs"]}]
    srv = serve_factory(destinations=dests, routes=[], rules=old_rules, routing={"fallback": ["archive"]})
    config = srv.config
    for name in ("pacs", "archive"):
        res = mfconsole("--config", str(config), "pause", name)
        assert res.returncode == 0, res.stderr
    ct, mr = corpus(tmp_path / "corpus")
    storescu(srv.port, "CT1", ct)
    storescu(srv.port, "MR1", mr)
    with srv.db() as reads:
        assert len(reads.rows("objects")) == CT1 + MR1
        deliveries = reads.rows("deliveries")
    assert len(deliveries) == CT1 + MR1 and {d["state"] for d in deliveries} == {"pending"}

    # config.toml changed on disk, not reloaded: the phantoms discarded (a header rule),
    # MR1 to pacs as well, and to the archive through a handler that filters series 0.
    (config.parent / "handlers").mkdir()
    (config.parent / "handlers" / "drop_series0.py").write_text(DROP_SERIES_0)
    write_config(config.parent, port=srv.port, destinations=dests, routes=[], routing={
        "fallback": ["archive"], "match": "all"}, rules=[
        {"name": "qa-phantoms", "when": {"institution_name": "^QA Phantom"}, "action": "discard"},
        {"name": "ct", "when": {"calling_aet": ["CT1"]}, "to": ["pacs"]},
        {"name": "mr", "when": {"calling_aet": ["MR1"]}, "to": ["pacs"]},
        {"name": "mr-archive", "when": {"calling_aet": ["MR1"]}, "to": ["archive"], "handler": "drop_series0"}])

    res = mfconsole("--config", str(config), "reload", "--plan", timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr          # 1: a reload would change things
    text = res.stdout
    assert f"objects received in the last 24 h: {CT1 + MR1};" in text
    assert line(text, "pacs") == f"+{MR1} / -{PHANTOMS}"         # MR1 newly; the phantoms no longer
    assert line(text, "archive") == "+0 / -0"
    assert line(text, "(discarded)") == f"+{PHANTOMS} / -0"
    assert line(text, "(unrouted)") == "+0 / -0"
    assert f"(unchanged {CT1 - PHANTOMS}; {CT1} -> {CT1 - PHANTOMS + MR1})" in text
    assert f"handler changes {MR1} (none -> drop_series0 {MR1})" in text
    assert f"archive: run on {MR1}: filtered {MR1 // 4}, errors 0, outcome changes {MR1 // 4}" in text
    rules = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"^  (\S+)\s+(\d+) -> (\d+)", text, re.M)}
    assert rules == {"qa-phantoms": (0, PHANTOMS), "ct": (CT1, CT1 - PHANTOMS), "mr": (0, MR1),
                     "mr-archive": (0, MR1), "(fallback)": (MR1, 0)}
    assert "pacs would newly go: #" in text and " MR1 SR · Basic Text SR Storage · " in text

    as_json = mfconsole("--config", str(config), "reload", "--plan", "--json", "--hours", "1", timeout=300)
    assert as_json.returncode == 1, as_json.stderr
    plan = json.loads(as_json.stdout)
    pacs_plan = next(d for d in plan["destinations"] if d["name"] == "pacs")
    assert (pacs_plan["added"], pacs_plan["removed"], plan["objects"]) == (MR1, PHANTOMS, CT1 + MR1)

    # Nothing sent, no delivery created, nothing reloaded.
    with srv.db() as reads:
        assert reads.rows("deliveries") == deliveries
        assert len(reads.rows("objects")) == CT1 + MR1
        audit = reads.rows("audit")
    assert not [a for a in audit if a["event"] in ("reloaded", "reload_refused", "delivered")]
    plans = poll(lambda: [a for a in audit_rows(srv) if a["event"] == "routing_plan"],
                 message="the routing_plan audit rows")
    assert plans and plans[0]["status"] == "changes" and "via control socket" in plans[0]["actor"]
    snap = request(srv.data_dir / SOCKET_NAME, "snapshot")
    assert [r["name"] for r in snap["routing"]["rules"]] == ["ct"]            # still the running rules
    assert holds(lambda: not pacs.received_files() and not archive.received_files(), 1.0)
    # The next MR1 object is routed by the running rules: the archive, as before.
    extra = dicomgen.save(dicomgen.make_sr(), tmp_path / "extra.dcm")
    storescu(srv.port, "MR1", [extra])
    with srv.db() as reads:
        new = [d for d in reads.rows("deliveries") if d["id"] not in {x["id"] for x in deliveries}]
    assert [(d["destination"], d["handler"]) for d in new] == [("archive", None)]

    # Canary PHI and the matched header value: in no output, log or audit row.
    with srv.db() as reads:
        rows = json.dumps(reads.rows("audit"), default=str)
    logs = (srv.data_dir / "logs" / "mfconsole.log").read_text() + srv.log_path.read_text()
    for value in (CANARY_NAME, CANARY_ID, QA_SITE, "Hospital A"):
        for where in (text, as_json.stdout, res.stderr, logs, rows):
            assert value not in where, value
