"""`mfconsole handlers run` and the console's handler preview for a fhir destination:
the resource the shipped study_to_imagingstudy would send, as JSON (a reveal: values),
and its structure without values (routing-safe)."""

from __future__ import annotations

import json

from pydicom.data import get_testdata_file

from mfconsole import ops
from mfconsole.config import load
from mfconsole.engine.handlers import load as load_handler
from test_fhir_config import config


def test_handlers_run_prints_the_resource(tmp_path):
    cfg = load(config(tmp_path))
    text = ops.run_handler(cfg, "study_to_imagingstudy", get_testdata_file("CT_small.dcm"))
    head, rest = text.split("\n", 2)[:2], text.split("\n", 2)[2]
    assert head[0].startswith("# study_to_imagingstudy 1.0.0 (") and head[0].endswith(" for fhir (fhir)")
    assert head[1].startswith("FHIR ImagingStudy of ") and "conditional update" in head[1]
    resource = json.loads(rest)
    assert resource["resourceType"] == "ImagingStudy" and resource["numberOfInstances"] == 1


def test_the_structure_carries_no_value(tmp_path):
    from mfconsole.contract import Outbound
    from mfconsole.dicomfile import dataset_bytes

    cfg = load(config(tmp_path))
    handler = load_handler("study_to_imagingstudy", cfg.handlers_dir)
    data, ts = dataset_bytes(get_testdata_file("CT_small.dcm"))
    shape = ops.preview_structure(cfg, handler, Outbound("1.2.840.10008.5.1.4.1.1.2", "1.2.3", ts, data, ""))
    assert shape["kind"] == "fhir" and shape["resource_type"] == "ImagingStudy"
    assert (shape["series"], shape["instances"]) == (1, 1)
    assert "subject" in shape["elements"] and "1CT1" not in json.dumps(shape)


def test_the_console_shows_the_structure():
    from mfconsole.console.handlers import structure

    text = structure({"kind": "fhir", "resource_type": "ImagingStudy", "bytes": 783, "series": 2,
                      "instances": 5, "elements": ["identifier", "series"]}).plain
    assert text.startswith("a FHIR ImagingStudy of 783 bytes: 2 series, 5 instance(s)\n"
                           "  elements: identifier, series\n")
