"""Self-checks for the real-peer fixtures in tests/peers.py."""

from __future__ import annotations

import io
import json
import os
import subprocess

import httpx
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import peers

CT_SMALL = get_testdata_file("CT_small.dcm")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # still exists (maybe a zombie not yet reaped by us -- should not happen)
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1].startswith("Z")


def storescu(dcmtk, ae: str, port: int, *files: str, extra=()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk["storescu"], "-aet", "MFTEST", "-aec", ae, *extra, "127.0.0.1", str(port), *files],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_storescu_to_storescp(dcmtk, storescp):
    assert storescp.received_files() == []
    res = storescu(dcmtk, storescp.ae_title, storescp.port, CT_SMALL)
    assert res.returncode == 0, res.stdout + res.stderr

    files = storescp.received_files()
    assert len(files) == 1, files
    expected = pydicom.dcmread(CT_SMALL).SOPInstanceUID
    assert pydicom.dcmread(files[0]).SOPInstanceUID == expected

    # a second send of the same object is kept as a separate file (+uf)
    assert storescu(dcmtk, storescp.ae_title, storescp.port, CT_SMALL).returncode == 0
    assert len(storescp.wait_for_files(2)) == 2

    res = subprocess.run(
        [dcmtk["echoscu"], "-aec", storescp.ae_title, "127.0.0.1", str(storescp.port)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr

    pid = storescp.pid
    storescp.stop()
    assert not storescp.running and _gone(pid)
    assert "storing DICOM file" in storescp.log_text()


def test_storescp_refuse_mode(dcmtk, storescp_factory):
    scp = storescp_factory("--refuse")
    res = storescu(dcmtk, scp.ae_title, scp.port, CT_SMALL)
    assert res.returncode != 0
    assert "Association Rejected" in res.stdout + res.stderr
    assert scp.received_files() == []
    assert scp.running  # storescp survives and keeps refusing


def test_storescu_to_orthanc(dcmtk, orthanc_module):
    o = orthanc_module
    res = storescu(dcmtk, o.ae_title, o.dicom_port, CT_SMALL)
    assert res.returncode == 0, res.stdout + res.stderr
    uid = pydicom.dcmread(CT_SMALL).SOPInstanceUID
    assert uid in o.sop_instance_uids()
    (oid,) = [i for i in o.instances() if o.instance_tags(i)["SOPInstanceUID"] == uid]
    assert pydicom.dcmread(io.BytesIO(o.instance_file(oid))).SOPInstanceUID == uid


def test_orthanc_stow_rs(orthanc_module):
    o = orthanc_module
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    body, ctype = peers.multipart_related([buf.getvalue()])
    assert ctype.startswith('multipart/related; type="application/dicom"; boundary=')

    before = o.count()
    r = httpx.post(
        f"{o.dicomweb_url}/studies",
        content=body,
        headers={"Content-Type": ctype, "Accept": "application/dicom+json"},
        trust_env=False,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    result = r.json()
    # FailedSOPSequence: Orthanc's plugin always includes it, empty on success
    assert not result.get("00081198", {}).get("Value"), json.dumps(result)
    refs = result["00081199"]["Value"]  # ReferencedSOPSequence
    assert [x["00081155"]["Value"][0] for x in refs] == [ds.SOPInstanceUID]
    assert ds.SOPInstanceUID in o.sop_instance_uids()
    assert o.count() == before + 1


def test_orthanc_restart_keeps_data_and_ports(dcmtk, orthanc, capsys):
    with capsys.disabled():
        print(f"\n[peers] Orthanc startup took {orthanc.startup_seconds:.2f}s")
    assert orthanc.startup_seconds < 15

    assert orthanc.count() == 0
    assert storescu(dcmtk, orthanc.ae_title, orthanc.dicom_port, CT_SMALL).returncode == 0
    assert orthanc.count() == 1
    ports, pid = (orthanc.http_port, orthanc.dicom_port), orthanc.pid

    orthanc.stop()
    assert _gone(pid)
    assert not peers.port_open("127.0.0.1", ports[1])
    res = storescu(dcmtk, orthanc.ae_title, ports[1], CT_SMALL)
    assert res.returncode != 0  # outage is visible to a sender

    orthanc.start()
    assert (orthanc.http_port, orthanc.dicom_port) == ports
    assert orthanc.pid != pid
    assert orthanc.sop_instance_uids() == [pydicom.dcmread(CT_SMALL).SOPInstanceUID]
