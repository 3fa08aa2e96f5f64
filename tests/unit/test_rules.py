"""Rules ([[rules]], [routing]): read from config.toml with key paths, decided per
object from its association and header (mfconsole/rules.py, engine/router.py), and
shown by `mfconsole routes explain`."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from harness import CANARY_ID, CANARY_NAME, run, write_config
from mfconsole.config import ConfigError, load
from mfconsole.dimse.dataset_scan import scan_dataset
from mfconsole.engine.router import Router, RuleCounts
from mfconsole.rules import Facts, decode, peer_address

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.22"


def dest(name: str, port: int, kind: str = "dimse") -> dict[str, Any]:
    if kind == "mllp":
        return {"name": name, "kind": "mllp", "host": "127.0.0.1", "port": port}
    return {"name": name, "kind": "dimse", "host": "127.0.0.1", "port": port, "ae_title": name.upper()}


DESTS = [dest("pacs", 11113), dest("pacs2", 11114), dest("archive", 11115)]


def config(folder: Path, rules: list[dict[str, Any]] | None = None, *, routing: dict | None = None,
           routes: list[dict[str, Any]] | None = None, **kw: Any) -> Path:
    return write_config(folder, destinations=kw.pop("destinations", DESTS),
                        routes=routes if routes is not None else [{"from": "modalities", "to": ["archive"]}],
                        rules=rules, routing=routing, **kw)


def problems(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value.problems


def dataset(modality: str = "CT", sop_class: str = CT, charset: str | None = None,
            **attrs: Any) -> Dataset:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.PatientName, ds.PatientID = CANARY_NAME, CANARY_ID
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def encoded(ds: Dataset, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def decide(router: Router, ds: Dataset, *, listener: str = "modalities", calling: str = "CT1",
           called: str = "MF_SCP", peer: str = "127.0.0.1:50000", implicit: bool = False):
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    summary = scan_dataset(encoded(ds, implicit), ts, wanted=router.header_tags)
    return router.decide(summary, {"listener": listener, "calling_ae": calling, "called_ae": called,
                                   "peer": peer})


def where(decision) -> list[str]:
    return [r.destination for r in decision.routes]


# -- reading config.toml: every problem with its key path ---------------------------------

def rule(name: str = "r", **keys: Any) -> dict[str, Any]:
    return {"name": name, **({"to": ["pacs"]} if "to" not in keys and "action" not in keys else {}),
            **keys}


CONFIG_ERRORS = [
    ("unknown_destination", [rule(to=["pacs", "pacss"])], {}, "rules[0].to[1]",
     "names no destination ('pacss'); did you mean 'pacs'?"),
    ("bad_regex", [rule(), rule("b"), rule("c", when={"study_description": "(unclosed"})], {},
     "rules[2].when.study_description", "not a valid regular expression"),
    ("bad_regex_in_tags", [rule(when={"tags": {"(0009,0010)": "[z-a]"}})], {},
     'rules[0].when.tags."(0009,0010)"', "not a valid regular expression"),
    ("to_and_action", [rule(to=["pacs"], action="discard")], {}, "rules[0].action",
     "cannot be given with `to`"),
    ("neither_to_nor_action", [{"name": "r", "when": {"modality": "CT"}}], {}, "rules[0].to",
     "is required"),
    ("action_not_discard", [rule(action="drop")], {}, "rules[0].action", 'must be "discard"'),
    ("handler_with_discard", [rule(action="discard", handler="x")], {}, "rules[0].handler",
     "only applies with `to`"),
    ("bad_cidr", [rule(when={"peer": ["10.1.0.0/16", "10.1.2.3/16"]})], {}, "rules[0].when.peer[1]",
     "host bits"),
    ("not_an_address", [rule(when={"peer": "pacs.example.org"})], {}, "rules[0].when.peer",
     "IP address or CIDR"),
    ("duplicate_name", [rule("a"), rule("a")], {}, "rules[1].name", "already used by rules[0]"),
    ("missing_name", [{"to": ["pacs"]}], {}, "rules[0].name", "is required"),
    ("unknown_listener_in_from", [rule(**{"from": ["modalitys"]})], {}, "rules[0].from[0]",
     "names no listener ('modalitys'); did you mean 'modalities'?"),
    ("unknown_when_key", [rule(when={"calling_aets": ["CT1"]})], {}, "rules[0].when.calling_aets",
     "unknown key (did you mean 'calling_aet'?)"),
    ("listener_in_when", [rule(when={"listener": "modalities"})], {}, "rules[0].when.listener",
     "rule's `from`"),
    ("unknown_rule_key", [rule(whn={"modality": "CT"})], {}, "rules[0].whn",
     "unknown key (did you mean 'when'?)"),
    ("bad_ae_title", [rule(when={"calling_aet": ["A" * 17]})], {}, "rules[0].when.calling_aet[0]",
     "at most 16"),
    ("lower_case_modality", [rule(when={"modality": ["ct"]})], {}, "rules[0].when.modality[0]",
     "upper case"),
    ("unknown_sop_class_keyword", [rule(when={"sop_class": ["CTImageStorag"]})], {},
     "rules[0].when.sop_class[0]", "did you mean 'CTImageStorage'?"),
    ("unknown_tag_keyword", [rule(when={"tags": {"InstitutionNam": "x"}})], {},
     "rules[0].when.tags.InstitutionNam", "did you mean 'InstitutionName'?"),
    ("binary_tag", [rule(when={"tags": {"Rows": "512"}})], {}, "rules[0].when.tags.Rows",
     "VR US: rules match text values only"),
    ("sequence_tag", [rule(when={"tags": {"ReferencedStudySequence": "x"}})], {},
     "rules[0].when.tags.ReferencedStudySequence", "VR SQ"),
    ("file_meta_tag", [rule(when={"tags": {"(0002,0010)": "x"}})], {},
     'rules[0].when.tags."(0002,0010)"', "file meta"),
    ("when_not_a_table", [rule(when="CT")], {}, "rules[0].when", "must be a table"),
    ("regex_not_a_string", [rule(when={"institution_name": ["^A"]})], {},
     "rules[0].when.institution_name", "a string"),
    ("match_mode", [rule()], {"match": "any"}, "routing.match", 'must be "first" or "all"'),
    ("fallback_unknown", [rule()], {"fallback": ["archiv"]}, "routing.fallback[0]",
     "did you mean 'archive'?"),
    ("unknown_routing_key", [rule()], {"default": ["pacs"]}, "routing.default", "unknown key"),
]


@pytest.mark.parametrize("case", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors_name_the_key(tmp_path, case):
    _, rules, routing, key, why = case
    found = problems(config(tmp_path, rules, routing=routing or None,
                            routes=[] if "fallback" in routing else None))
    assert [k for k, _ in found] == [key], found
    assert why in found[0][1], found


def test_every_problem_at_once_and_check_says_so(tmp_path):
    path = config(tmp_path, [rule("a", to=["nope"]), rule("a", when={"modality": "CT", "colour": 1}),
                             rule("c", when={"station_name": "*"})])
    keys = [k for k, _ in problems(path)]
    assert keys == ["rules[0].to[0]", "rules[1].name", "rules[1].when.colour",
                    "rules[2].when.station_name"]
    res = run([sys.executable, "-m", "mfconsole", "--config", str(path), "check"])
    assert res.returncode == 2
    for key in keys:
        assert f"  {key}: " in res.stderr


def test_fallback_replaces_routes(tmp_path):
    found = problems(config(tmp_path, [rule()], routing={"fallback": ["archive"]}))
    assert found[0][0] == "routing.fallback" and "replaces the 1 [[routes]] entry" in found[0][1]
    cfg = load(config(tmp_path / "ok", [rule()], routing={"fallback": []}, routes=[]))
    assert cfg.routing.fallback == ()


def test_hl7_destinations_need_a_handler(tmp_path):
    dests = DESTS + [dest("ehr", 2575, "mllp")]
    found = problems(config(tmp_path, [rule(to=["pacs", "ehr"])], destinations=dests))
    assert found == [("rules[0].handler", found[0][1])] and "ehr (mllp) takes HL7" in found[0][1]
    found = problems(config(tmp_path / "f", [rule()], routes=[], destinations=dests,
                            routing={"fallback": ["pacs", "ehr"]}))
    assert [k for k, _ in found] == ["routing.fallback[1]"]
    (tmp_path / "h" / "handlers").mkdir(parents=True)
    (tmp_path / "h" / "handlers" / "to_hl7.py").write_text("VERSION = '1'\ndef handle(obj, ctx):\n    return None\n")
    cfg = load(config(tmp_path / "h", [rule(to=["ehr"], handler="to_hl7")], destinations=dests))
    assert cfg.rules[0].handler == "to_hl7"


def test_a_bad_destination_does_not_cascade_into_rules(tmp_path):
    dests = [dict(DESTS[0], ae_title="A" * 17), *DESTS[1:]]      # pacs declared, but invalid
    assert [k for k, _ in problems(config(tmp_path, [rule(to=["pacs"])], destinations=dests))] == \
        ["destinations[0].ae_title"]


def test_without_rules_routing_is_the_routes(tmp_path):
    cfg = load(config(tmp_path, routes=[{"from": "modalities", "to": ["pacs", "archive"]}]))
    router = Router(cfg)
    assert router.header_tags == frozenset()
    d = decide(router, dataset())
    assert where(d) == ["pacs", "archive"] and d.words == "" and d.nowhere() is None


# -- deciding ------------------------------------------------------------------------------

def test_first_match_decides_in_order(tmp_path):
    cfg = load(config(tmp_path, [
        rule("ct-from-ct1", when={"calling_aet": ["CT1"], "modality": ["CT"]}, to=["pacs"]),
        rule("any-ct", when={"modality": "CT"}, to=["pacs2"]),
        rule("mr", when={"modality": ["MR"], "sop_class": ["MRImageStorage"]}, to=["pacs2"]),
    ]))
    router = Router(cfg)
    d = decide(router, dataset("CT"))
    assert (where(d), d.rules, d.words) == (["pacs"], ("ct-from-ct1",), "rule ct-from-ct1")
    assert where(decide(router, dataset("CT"), calling="CT2")) == ["pacs2"]
    assert where(decide(router, dataset("MR", MR), calling="MR1")) == ["pacs2"]
    # MR modality with another SOP class: no rule; the listener's [[routes]] take it.
    d = decide(router, dataset("MR", SR))
    assert (where(d), d.rules, d.words, d.nowhere()) == (["archive"], (), "fallback", None)


def test_all_matches_union_and_discard_veto(tmp_path):
    rules = [rule("ct", when={"modality": ["CT"]}, to=["pacs", "archive"]),
             rule("ct1", when={"calling_aet": "CT1"}, to=["archive", "pacs2"]),
             rule("qa", when={"station_name": "^QA"}, action="discard")]
    router = Router(load(config(tmp_path, rules, routing={"match": "all"})))
    d = decide(router, dataset("CT"))
    assert where(d) == ["pacs", "archive", "pacs2"] and d.words == "rules ct, ct1"
    d = decide(router, dataset("CT", StationName="QA_CT"))
    assert (d.routes, d.discarded, d.rules) == ((), True, ("qa",))
    assert d.nowhere() == ("discarded_by_rule", "qa", "rule qa discards it: stored, sent nowhere")


def test_same_destination_with_two_handlers_gets_two_deliveries(tmp_path):
    for name in ("h1", "h2"):
        (tmp_path / "handlers").mkdir(exist_ok=True)
        (tmp_path / "handlers" / f"{name}.py").write_text("VERSION = '1'\ndef handle(o, c):\n    return o\n")
    router = Router(load(config(tmp_path, [rule("a", to=["pacs"], handler="h1"),
                                           rule("b", to=["pacs"], handler="h2"),
                                           rule("c", to=["pacs"], handler="h1")],
                                routing={"match": "all"})))
    assert [(r.destination, r.handler) for r in decide(router, dataset()).routes] == \
        [("pacs", "h1"), ("pacs", "h2")]


def test_fallback_default_explicit_and_empty(tmp_path):
    only_mr = [rule("mr", when={"modality": "MR"}, to=["pacs2"])]
    by_routes = Router(load(config(tmp_path / "a", only_mr)))
    assert where(decide(by_routes, dataset("CT"))) == ["archive"]
    explicit = Router(load(config(tmp_path / "b", only_mr, routes=[], routing={"fallback": ["pacs"]})))
    assert where(decide(explicit, dataset("CT"))) == ["pacs"]
    nowhere = Router(load(config(tmp_path / "c", only_mr, routes=[], routing={"fallback": []})))
    d = decide(nowhere, dataset("CT"))
    assert d.routes == () and d.nowhere()[0] == "unrouted" and d.words == "fallback (empty)"
    # No rules at all but an empty fallback: everything is audited as unrouted.
    assert decide(Router(load(config(tmp_path / "d", routes=[], routing={"fallback": []}))),
                  dataset()).nowhere()[0] == "unrouted"


def test_from_limits_rules_to_listeners(tmp_path):
    path = config(tmp_path, [rule("second-only", **{"from": ["second"]}, to=["pacs2"])],
                  more_listeners=[{"name": "second", "ae_title": "MF_TWO"}],
                  routes=[{"from": "modalities", "to": ["archive"]}, {"from": "second", "to": ["pacs"]}])
    router = Router(load(path))
    assert where(decide(router, dataset())) == ["archive"]           # its routes: no rule applies
    assert where(decide(router, dataset(), listener="second")) == ["pacs2"]


@pytest.mark.parametrize("peer,hit", [
    ("10.1.2.3:104", True), ("10.2.0.1:104", False), ("::ffff:10.1.9.9:5000", True),
    ("fd00::17:5000", True), ("fd01::1:5000", False), ("[fd00::5]:104", True), ("", False),
    ("nonsense", False)])
def test_peer_cidrs_v4_v6_and_mapped(tmp_path, peer, hit):
    router = Router(load(config(tmp_path, [rule("lan", when={"peer": ["10.1.0.0/16", "fd00::/64"]})])))
    assert where(decide(router, dataset(), peer=peer)) == (["pacs"] if hit else ["archive"])


def test_peer_address_parsing():
    assert str(peer_address("127.0.0.1")) == "127.0.0.1"
    assert str(peer_address("::1")) == "::1"
    assert str(peer_address("[fd00::1]")) == "fd00::1"
    assert str(peer_address("::ffff:10.0.0.1")) == "10.0.0.1"
    assert peer_address("host") is None and peer_address("") is None


def test_called_aet_and_sop_class_by_uid(tmp_path):
    router = Router(load(config(tmp_path, [rule("sr", when={"called_aet": ["MF_SR"], "sop_class": [SR]})])))
    assert where(decide(router, dataset("SR", SR), called="MF_SR")) == ["pacs"]
    assert where(decide(router, dataset("SR", SR), called="MF_SCP")) == ["archive"]


@pytest.mark.parametrize("implicit", [False, True])
def test_header_attributes_by_regex(tmp_path, implicit):
    router = Router(load(config(tmp_path, [
        rule("hosp-a", when={"institution_name": "^Hosp.*A$"}, to=["pacs"]),
        rule("chest", when={"study_description": "(?i)chest", "series_description": "AX"}, to=["pacs2"]),
        rule("private", when={"tags": {"(0009,0010)": "^GEMS", "BodyPartExamined": "HEAD"}},
             to=["archive"]),
    ], routes=[], routing={"fallback": []})))
    assert router.header_tags == {0x00080080, 0x00081030, 0x0008103E, 0x00090010, 0x00180015}
    assert where(decide(router, dataset(InstitutionName="Hospital A"), implicit=implicit)) == ["pacs"]
    # re.search, case-sensitive, on the value with its padding removed
    assert where(decide(router, dataset(InstitutionName="hospital A"), implicit=implicit)) == []
    assert where(decide(router, dataset(InstitutionName="Hosp A "), implicit=implicit)) == ["pacs"]
    assert where(decide(router, dataset(StudyDescription="CT Chest w/o", SeriesDescription="1 AX 5mm"),
                        implicit=implicit)) == ["pacs2"]
    assert where(decide(router, dataset(StudyDescription="CT Chest"), implicit=implicit)) == []
    ds = dataset(BodyPartExamined="HEAD")
    ds.add_new(0x00090010, "LO", "GEMS_IDEN_01")
    assert where(decide(router, ds, implicit=implicit)) == ["archive"]
    # An absent attribute matches no pattern, not even one that matches empty text.
    empty = Router(load(config(tmp_path / "e", [rule(when={"station_name": "^$"})])))
    assert where(decide(empty, dataset())) == ["archive"]
    assert where(decide(empty, dataset(StationName=""))) == ["pacs"]


@pytest.mark.parametrize("charset,value,pattern", [
    ("ISO_IR 100", "Hôpital Süd", "^Hôpital Süd$"),
    ("ISO_IR 192", "Больница №1", "^Больница"),
    ("ISO_IR 144", "Больница", "^Больница$"),
    (None, "Plain", "^Plain$"),
])
def test_values_decoded_with_the_specific_character_set(tmp_path, charset, value, pattern):
    router = Router(load(config(tmp_path, [rule(when={"institution_name": pattern})])))
    assert where(decide(router, dataset(charset=charset, InstitutionName=value))) == ["pacs"]


def test_decode_fallbacks():
    assert decode("Süd".encode("latin-1"), None) == "Süd"          # no charset: Latin-1
    assert decode("Süd".encode("latin-1"), b"NONSENSE") == "Süd"   # unknown: never raises
    assert decode("日本".encode("utf-8"), b"ISO_IR 192") == "日本"
    assert decode(b"A\\B", b"ISO_IR 100 ") == "A\\B"               # several values stay joined


def test_facts_never_show_values():
    facts = Facts(listener="l", values={0x00100010: CANARY_NAME.encode()})
    assert CANARY_NAME not in repr(facts) and facts.text(0x00100010) == CANARY_NAME


def test_counts_per_rule(tmp_path):
    router = Router(load(config(tmp_path, [rule("ct", when={"modality": "CT"}),
                                           rule("qa", when={"modality": "OT"}, action="discard")],
                                routes=[], routing={"fallback": []})))
    counts = RuleCounts()
    for modality in ("CT", "CT", "OT", "MR"):
        counts.add(decide(router, dataset(modality)))
    assert counts.view() == {"rules": {"ct": {"sent": 2, "discarded": 0},
                                       "qa": {"sent": 0, "discarded": 1}},
                             "fallback": 0, "unrouted": 1}
    plain = RuleCounts()
    plain.add(decide(Router(load(config(tmp_path / "p"))), dataset()))
    assert plain.view() == {"rules": {}, "fallback": 0, "unrouted": 0}   # routes alone: not counted


# -- mfconsole routes explain ---------------------------------------------------------------

def part10(folder: Path, name: str, ds: Dataset, ts: str = ExplicitVRLittleEndian) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID or generate_uid()
    ds.file_meta.TransferSyntaxUID = ts
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def explain(path: Path, file: Path, *args: str):
    return run([sys.executable, "-m", "mfconsole", "--config", str(path), "routes", "explain",
                str(file), *args])


@pytest.fixture
def explained(tmp_path):
    path = config(tmp_path, [
        rule("ct-hosp-a", when={"calling_aet": ["CT1"], "modality": ["CT"],
                                "institution_name": "^Hosp.*A$"}, to=["pacs"]),
        rule("lan-mr", when={"peer": ["10.1.0.0/16"], "modality": "MR"}, to=["pacs2"]),
        rule("qa", when={"station_name": "^QA"}, action="discard"),
        rule("second-only", **{"from": ["second"]}, to=["pacs"]),
    ], more_listeners=[{"name": "second", "ae_title": "MF_TWO"}], routes=[],
        routing={"fallback": ["archive"]})
    return path


def test_explain_names_the_rule_and_destinations(tmp_path, explained):
    ct = part10(tmp_path, "ct.dcm", dataset("CT", InstitutionName="Hospital A"))
    res = explain(explained, ct, "--calling", "CT1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "decision: rule ct-hosp-a -> pacs"
    line = next(x for x in res.stdout.splitlines() if x.strip().startswith("ct-hosp-a"))
    assert re.search(r"matches\s+calling_aet yes  modality yes  institution_name yes", line)
    assert "not for this listener: second-only" in res.stdout
    # Another calling AE: no rule, the fallback; the keys that failed are named.
    res = explain(explained, ct, "--calling", "CT9")
    assert res.stdout.splitlines()[-1] == "decision: fallback -> archive"
    assert "calling_aet no" in res.stdout
    mr = part10(tmp_path, "mr.dcm", dataset("MR", MR), ImplicitVRLittleEndian)
    assert explain(explained, mr, "--peer", "10.1.4.4").stdout.splitlines()[-1] == \
        "decision: rule lan-mr -> pacs2"
    qa = part10(tmp_path, "qa.dcm", dataset("OT", StationName="QA1"))
    assert explain(explained, qa).stdout.splitlines()[-1] == \
        "decision: discarded by rule qa -> nowhere (stored, audited)"
    assert explain(explained, ct, "--listener", "second").stdout.splitlines()[-1] == \
        "decision: rule second-only -> pacs"
    for res in (explain(explained, ct, "--calling", "CT1"), explain(explained, qa)):
        assert CANARY_NAME not in res.stdout + res.stderr and CANARY_ID not in res.stdout + res.stderr
        assert "Hospital" not in res.stdout and "QA1" not in res.stdout


def test_explain_without_rules_shows_the_routes(tmp_path):
    path = config(tmp_path)
    res = explain(path, part10(tmp_path, "ct.dcm", dataset()))
    assert res.returncode == 0 and res.stdout.splitlines()[-1] == "decision: [[routes]] of modalities -> archive"


def test_explain_refuses_what_it_cannot_read(tmp_path, explained):
    missing = explain(explained, tmp_path / "nope.dcm")
    assert missing.returncode == 2 and "cannot be read" in missing.stderr
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00" + b"not a dataset at all")
    res = explain(explained, junk)
    assert res.returncode == 2 and "junk.dcm" in res.stderr, res.stderr
    assert "'not'" not in res.stderr and "dataset at all" not in res.stderr   # no value quoted
    no_uid = dataset()
    del no_uid.SOPInstanceUID
    no_uid.SOPInstanceUID = ""
    res = explain(explained, part10(tmp_path, "bad.dcm", no_uid))
    assert res.returncode == 2 and "would refuse it (0xA900" in res.stderr, res.stderr
    unknown = explain(explained, part10(tmp_path, "ct.dcm", dataset()), "--listener", "third")
    assert unknown.returncode == 2 and "no listener named 'third'" in unknown.stderr
    port = explain(explained, tmp_path / "ct.dcm", "--peer", "10.1.2.3:104")
    assert port.returncode == 2 and "--peer '10.1.2.3:104' is not an IP address" in port.stderr


def test_rule_handlers_are_loaded_and_listed(tmp_path):
    from mfconsole.engine.engine import handler_names
    from mfconsole.ops import list_handlers

    (tmp_path / "handlers").mkdir()
    (tmp_path / "handlers" / "tag_it.py").write_text("VERSION = '1'\ndef handle(obj, ctx):\n    return obj\n")
    cfg = load(config(tmp_path, [rule("tagged", to=["pacs2"], handler="tag_it")]))
    assert handler_names(cfg) == {"tag_it"}
    assert list_handlers(cfg)[0]["routes"] == ["rule tagged -> pacs2"]


def test_the_readme_example_is_valid(tmp_path):
    from harness import REPO

    text = (REPO / "README.md").read_text()
    section = text[text.index("### Routing rules"):]
    example = section[section.index("```toml\n") + 8:section.index("```\n", section.index("```toml"))]
    handler_dir = tmp_path / "handlers"
    handler_dir.mkdir()
    (handler_dir / "sr_to_oru.py").write_text("VERSION = '1'\ndef handle(obj, ctx):\n    return None\n")
    path = config(tmp_path, destinations=DESTS + [dest("ehr", 2575, "mllp")], routes=[])
    path.write_text(path.read_text() + "\n" + example)
    cfg = load(path)
    assert [r.name for r in cfg.rules] == ["qa-phantoms", "stroke", "ct-to-pacs", "hospital-a-reports"]
    router = Router(cfg)
    report = dataset("SR", "1.2.840.10008.5.1.4.1.1.88.11", InstitutionName="Hospital A")
    assert [(r.destination, r.handler) for r in decide(router, report).routes] == \
        [("ehr", "sr_to_oru")]
    assert decide(router, dataset("CT", InstitutionName="QA Phantom 3")).discarded
    assert where(decide(router, dataset("CT"), calling="CT2")) == ["pacs"]
    assert where(decide(router, dataset("MR", MR))) == ["archive"]
    stroke = decide(router, dataset("CT", StudyDescription="CT Head Stroke"), calling="CT2")
    assert [(r.destination, r.priority) for r in stroke.routes] == [("pacs", 1)]
