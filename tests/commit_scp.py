#!/usr/bin/env python3
"""A Storage Commitment SCP (Push Model) with C-STORE: a *real network peer* for the
commitment tests, on pynetdicom.

Run as a subprocess::

    python tests/commit_scp.py --port N --record DIR [options]

or from a test through :class:`CommitSCP` (below), which starts the script with
``sys.executable`` and stops it by PID (the process handling of
``fault_scp.FaultSCP``).  Importing this module starts nothing.

Behaviour:

* listens on 127.0.0.1:PORT, AE title ``--ae-title`` (default COMMITSCP); accepts
  every storage SOP class (uncompressed syntaxes) and Storage Commitment Push Model;
  a C-STORE is answered Success and its SOP Instance UID remembered;
* N-ACTION-RQ (Request Storage Commitment) is answered Success, and its transaction
  is reported with an N-EVENT-REPORT-RQ:

  - ``--report same`` (default): on the same association, before the N-ACTION-RSP
    (sent from the handler: pynetdicom's reactor is then blocked in it, so nothing
    races for the N-EVENT-REPORT-RSP);
  - ``--report new``: on a new association to ``--report-to AET@HOST:PORT``, proposing
    the context with role selection (we are SCP), after the N-ACTION-RSP has gone;
  - ``--report never``: no report at all (the SCU's timeout);

* what is reported: every reference as committed if its instance was stored here;
  with ``--fail-reason 0xNNNN`` every reference of the first ``--fail-times`` N
  transactions (default 1; -1: all) is in the Failed SOP Sequence with that reason;
  an instance never stored is reported failed 0x0112 (no such object instance);
* records (``--record DIR``): ``stores.jsonl`` {"sop_instance_uid"},
  ``actions.jsonl`` {"n", "transaction_uid", "refs", "calling_ae"},
  ``reports.jsonl`` {"transaction_uid", "how", "event_type", "failed", "rsp_status"};
* prints ``fault_scp: listening on 127.0.0.1:PORT`` once listening; exits 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_scp import DEFAULT_AE_TITLE, READY_PREFIX, FaultSCP, _read_jsonl  # noqa: E402

SC_CLASS = "1.2.840.10008.1.20.1"
SC_INSTANCE = "1.2.840.10008.1.20.1.1"
UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


class CommitSCP(FaultSCP):
    """``tests/commit_scp.py`` as a child process (start, stop by PID, records)."""

    def __init__(self, *args: str, record_dir, ae_title: str = "COMMITSCP", **kw) -> None:
        super().__init__(None, *args, record_dir=record_dir, ae_title=ae_title, **kw)
        self.log_path = self.record_dir / "commit_scp.log"

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--port",
                str(self.port if self.port is not None else 0), "--ae-title", self.ae_title,
                "--record", str(self.record_dir), *self.args]

    def stores(self) -> list[dict]:
        return _read_jsonl(self.record_dir / "stores.jsonl")

    def actions(self) -> list[dict]:
        return _read_jsonl(self.record_dir / "actions.jsonl")

    def reports(self) -> list[dict]:
        return _read_jsonl(self.record_dir / "reports.jsonl")


# ==========================================================================
# the SCP (runs in the child process)
# ==========================================================================


def main(argv: list[str] | None = None) -> int:
    from pydicom.dataset import Dataset
    from pynetdicom import AE, AllStoragePresentationContexts, build_context, build_role, evt

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ae-title", default=DEFAULT_AE_TITLE)
    ap.add_argument("--record", required=True)
    ap.add_argument("--report", choices=("same", "new", "never"), default="same")
    ap.add_argument("--report-to", default="")
    ap.add_argument("--fail-reason", default="")
    ap.add_argument("--fail-times", type=int, default=1)
    a = ap.parse_args(argv)
    record = Path(a.record)
    record.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    stored: set[str] = set()
    state = {"actions": 0}
    fail_reason = int(a.fail_reason, 16) if a.fail_reason else None

    def write(name: str, entry: dict) -> None:
        with lock, open(record / name, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def report_of(txn: str, refs: list[tuple[str, str]], n: int) -> tuple[int, Dataset, list]:
        ds = Dataset()
        ds.TransactionUID = txn
        ok, failed = [], []
        for cls, inst in refs:
            item = Dataset()
            item.ReferencedSOPClassUID = cls
            item.ReferencedSOPInstanceUID = inst
            failing = fail_reason is not None and (a.fail_times < 0 or n <= a.fail_times)
            if failing or inst not in stored:
                item.FailureReason = fail_reason if failing else 0x0112
                failed.append(item)
            else:
                ok.append(item)
        if ok:
            ds.ReferencedSOPSequence = ok
        if failed:
            ds.FailedSOPSequence = failed
        return (2 if failed else 1), ds, [[str(i.ReferencedSOPInstanceUID), int(i.FailureReason)]
                                          for i in failed]

    def send_report(assoc, txn: str, refs, n: int, how: str) -> None:
        event_type, ds, failed = report_of(txn, refs, n)
        rsp = assoc.send_n_event_report(ds, event_type, SC_CLASS, SC_INSTANCE)
        status = rsp[0].Status if rsp and rsp[0] is not None and "Status" in rsp[0] else None
        write("reports.jsonl", {"transaction_uid": txn, "how": how, "event_type": event_type,
                                "failed": failed, "rsp_status": status})

    def report_new(txn: str, refs, n: int) -> None:
        aet, _, where = a.report_to.partition("@")
        host, _, port = where.rpartition(":")
        ae2 = AE(ae_title=a.ae_title)
        ae2.add_requested_context(SC_CLASS, UNCOMPRESSED)
        assoc = ae2.associate(host, int(port), ae_title=aet,
                              ext_neg=[build_role(SC_CLASS, scp_role=True, scu_role=False)])
        if not assoc.is_established:
            write("reports.jsonl", {"transaction_uid": txn, "how": "new", "event_type": None,
                                    "failed": [], "rsp_status": "association refused"})
            return
        try:
            send_report(assoc, txn, refs, n, "new")
        finally:
            assoc.release()

    def on_store(event):
        stored.add(str(event.request.AffectedSOPInstanceUID))
        write("stores.jsonl", {"sop_instance_uid": str(event.request.AffectedSOPInstanceUID)})
        return 0x0000

    def on_action(event):
        ds = event.action_information
        txn = str(ds.TransactionUID)
        refs = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                for i in ds.ReferencedSOPSequence]
        with lock:
            state["actions"] += 1
            n = state["actions"]
        write("actions.jsonl", {"n": n, "transaction_uid": txn, "refs": [r[1] for r in refs],
                                "calling_ae": event.assoc.requestor.ae_title})
        if a.report == "same":
            send_report(event.assoc, txn, refs, n, "same")
        elif a.report == "new":
            # After the N-ACTION-RSP: the report association opens once this returns.
            threading.Timer(0.05, report_new, (txn, refs, n)).start()
        return 0x0000, None

    ae = AE(ae_title=a.ae_title)
    ae.maximum_pdu_size = 0
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, UNCOMPRESSED)
    sc = build_context(SC_CLASS, UNCOMPRESSED)
    ae.add_supported_context(sc.abstract_syntax, UNCOMPRESSED, scu_role=True, scp_role=True)
    server = ae.start_server(("127.0.0.1", a.port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_N_ACTION, on_action)])
    port = server.socket.getsockname()[1]
    print(f"{READY_PREFIX}127.0.0.1:{port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
