"""The HTTP plumbing stow and fhir share (mfconsole/httpdest): what each kind's Target
is built from, and the words for a request that got no answer."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from mfconsole.contract import DESTINATION, TRANSIENT
from mfconsole.fhir import client as fhir
from mfconsole.fhir.kind import KIND as FHIR_KIND
from mfconsole.httpdest.session import network_failure
from mfconsole.httpdest.target import origin
from mfconsole.stow import client as stow
from mfconsole.stow.kind import KIND as STOW_KIND


@pytest.mark.parametrize("target,kind", [(stow.Target, STOW_KIND), (fhir.Target, FHIR_KIND)])
def test_every_target_field_is_a_key_of_its_kind(target, kind):
    # Target.from_destination reads each field from the destination key of its name.
    assert {f.name for f in dataclasses.fields(target)} <= kind.keys()


def test_origin_names_scheme_host_and_port_only():
    assert origin("https://archive.example/dicom-web?token=x") == "https://archive.example:443"
    assert origin("http://[::1]:8042/fhir") == "http://[::1]:8042"


@pytest.mark.parametrize("module,sender,resent,dropped", [
    (stow, stow.StowSender, "the objects may be stored: they are sent again (STOW is idempotent)",
     "the objects may be stored: they are sent again (STOW is idempotent)"),
    (fhir, fhir.FhirSender,
     "the resource may be stored: it is sent again (a conditional update is idempotent)",
     "the resource is sent again (a conditional update is idempotent)")])
def test_a_lost_answer_says_what_is_sent_again(module, sender, resent, dropped):
    target = module.Target(url="http://127.0.0.1:8080/x", response_timeout_s=5)
    session = sender(target, None).session
    timeout = network_failure(httpx.ReadTimeout("t"), target, session.resent, session.resent_after_drop)
    drop = network_failure(httpx.RemoteProtocolError("r"), target, session.resent,
                           session.resent_after_drop)
    assert timeout.reason == ("no answer from http://127.0.0.1:8080 within response_timeout_s=5; "
                              + resent)
    assert drop.reason == ("http://127.0.0.1:8080 closed the connection without a complete "
                           "answer; " + dropped)
    assert timeout.ambiguous and drop.ambiguous
    refused = network_failure(httpx.ConnectError("c"), target, session.resent)
    assert (refused.persistence, refused.scope) == (TRANSIENT, DESTINATION)
