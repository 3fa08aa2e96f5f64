"""mfconsole's pynetdicom adaptations are applied to mfconsole's own AEs and
associations only (mfconsole/dimse/pynetdicom_adapt.py): with mfconsole imported
and its listener running, a plain pynetdicom AE in the same process behaves like
stock pynetdicom.

Each test runs both side by side, on loopback, in this process: the mfconsole
listener (and the sender's AE) with its adaptations, and a stock pynetdicom AE
without them, given the very same input.
"""

from __future__ import annotations

import importlib
import inspect
import socket
import sys
import threading
from typing import Any

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification

import dicomgen
from mfconsole.config import ListenerConfig
from mfconsole.dimse import pynetdicom_adapt as adapt
from mfconsole.dimse import sockets
from mfconsole.dimse.listener import AssociationBoard, Listener

CT = "1.2.840.10008.5.1.4.1.1.2"
PRIVATE = "1.3.12.2.1107.5.9.1"   # Siemens CSA Non-Image Storage
TS = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


class Sink:
    """The engine's side of the listener: takes every object, remembers what it got."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, str]] = []
        self.events: list[tuple[str, dict]] = []
        self.lock = threading.Lock()

    def ingest(self, data: Any, summary: Any, meta: dict) -> str:
        with self.lock:
            self.stored.append((summary.sop_class_uid, summary.sop_instance_uid))
        return "stored"

    def audit(self, event: str, **fields: Any) -> None:
        with self.lock:
            self.events.append((event, fields))


@pytest.fixture
def listener():
    cfg = ListenerConfig(name="modalities", ae_title="MF_SCP", host="127.0.0.1", port=0,
                         acse_timeout_s=5, dimse_timeout_s=10, network_timeout_s=10)
    lst = Listener(cfg, Sink(), AssociationBoard(), max_object_bytes=64 * 1024 * 1024)
    lst.start()
    yield lst
    lst.stop(5)


@pytest.fixture
def stock_scp():
    """A plain pynetdicom SCP: CT storage and Verification, nothing of mfconsole's."""
    ae = AE(ae_title="MF_SCP")
    ae.add_supported_context(CT, TS)
    ae.add_supported_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    stored: list[str] = []

    def on_store(event: Any) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    server.stored = stored
    yield server
    server.shutdown()


def image(sop_class: str = CT) -> Any:
    ds = dicomgen.make_image(sop_class=sop_class, pixel_bytes=2048)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def port(server_or_listener: Any) -> int:
    if isinstance(server_or_listener, Listener):
        return server_or_listener.address[1]
    return server_or_listener.server_address[1]


def scu(calling: str, *contexts: str) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for uid in contexts:
        ae.add_requested_context(uid, TS)
    return ae


def bind_certificate_to(aets: set[str]):
    """What the listener's EVT_CONN_OPEN does for a TLS client certificate bound to
    ``aets`` in tls.client_cert_aets: the titles go on the association."""
    def on_open(event: Any) -> None:
        event.assoc.cert_aets = frozenset(aets)
        event.assoc.cert_names = "ct1.modality.test"
    return on_open


# -- nothing of pynetdicom is replaced ------------------------------------------------

def test_pynetdicom_is_as_shipped_with_mfconsole_loaded_and_listening(listener):
    import pynetdicom
    from pynetdicom import acse, presentation, transport

    for name in ("mfconsole.dimse.sender", "mfconsole.engine.engine", "mfconsole.cli"):
        importlib.import_module(name)   # all of mfconsole that could touch pynetdicom

    # What the adaptations used to replace, by name.
    assert acse.ACSE._negotiate_as_acceptor.__module__ == "pynetdicom.acse"
    assert acse.ACSE._negotiate_as_acceptor.__qualname__ == "ACSE._negotiate_as_acceptor"
    assert transport.AssociationSocket._create_socket.__qualname__ == "AssociationSocket._create_socket"
    assert acse.negotiate_unrestricted is presentation.negotiate_unrestricted
    assert _config.UNRESTRICTED_STORAGE_SERVICE is False
    # And in general: no function of pynetdicom's modules or classes comes from elsewhere.
    foreign = []
    for name, module in sorted(sys.modules.items()):
        if not (name == "pynetdicom" or name.startswith("pynetdicom.")) or module is None:
            continue
        for attr, value in vars(module).items():
            places = [(attr, value)]
            if inspect.isclass(value) and value.__module__.startswith("pynetdicom"):
                places += [(f"{attr}.{k}", v) for k, v in vars(value).items()]
            for where, obj in places:
                target = obj.fget if isinstance(obj, property) else obj
                if inspect.isfunction(target) and target.__module__.startswith("mfconsole"):
                    foreign.append(f"{name}.{where} is {target.__module__}.{target.__qualname__}")
    assert not foreign, foreign
    assert pynetdicom.__version__ == adapt.PINNED_VERSION


# -- cert binding: the listener's associations only -----------------------------------

def test_cert_binding_applies_to_the_listener_not_to_a_stock_scp(listener, stock_scp):
    # The same binding on both servers' associations: only "CT1" may call.
    listener.server.bind(evt.EVT_CONN_OPEN, bind_certificate_to({"CT1"}))
    stock_scp.bind(evt.EVT_CONN_OPEN, bind_certificate_to({"CT1"}))

    # The listener refuses another calling AE title, A-ASSOCIATE-RJ 1/1/3 ...
    assoc = scu("OTHER", Verification).associate("127.0.0.1", port(listener), ae_title="MF_SCP")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    [(event, fields)] = [e for e in listener.sink.events if e[0] == "association_rejected"]
    assert "client certificate" in fields["detail"] and fields["calling_ae"] == "OTHER"
    # ... and takes the bound one.
    assoc = scu("CT1", Verification).associate("127.0.0.1", port(listener), ae_title="MF_SCP")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    # The stock SCP does not know of the binding: it accepts anyone, as pynetdicom does.
    assoc = scu("OTHER", Verification).associate("127.0.0.1", port(stock_scp), ae_title="MF_SCP")
    assert assoc.is_established
    assert type(assoc.acse).__module__ == "pynetdicom.acse"
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


# -- private SOP classes: stored by the listener, refused by a stock SCP --------------

def test_private_sop_classes_are_stored_by_the_listener_only(listener, stock_scp):
    ds = image(PRIVATE)

    assoc = scu("MODALITY", PRIVATE).associate("127.0.0.1", port(listener), ae_title="MF_SCP")
    assert assoc.is_established
    assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [PRIVATE]
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    assert listener.sink.stored == [(PRIVATE, str(ds.SOPInstanceUID))]

    # pynetdicom's own behaviour: a context it does not support is refused (with
    # mfconsole's old process-wide _config.UNRESTRICTED_STORAGE_SERVICE it was taken).
    assoc = scu("MODALITY", PRIVATE, Verification).associate("127.0.0.1", port(stock_scp),
                                                             ae_title="MF_SCP")
    assert assoc.is_established
    assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [Verification]
    assert PRIVATE in [str(cx.abstract_syntax) for cx in assoc.rejected_contexts]
    assoc.release()
    assert stock_scp.stored == []


def test_known_storage_still_works_on_both(listener, stock_scp):
    for server in (listener, stock_scp):
        ds = image()
        assoc = scu("MODALITY", CT).associate("127.0.0.1", port(server), ae_title="MF_SCP")
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    assert listener.sink.stored[-1][0] == CT and len(stock_scp.stored) == 1


# -- sockets: the sender's AE only ----------------------------------------------------

def test_our_socket_class_is_on_the_senders_ae_only(stock_scp):
    seen: dict[str, Any] = {}

    def on_open(which: str):
        def handler(event: Any) -> None:
            conn = adapt.connection(event.assoc)
            seen[which] = (type(conn), conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return handler

    for which, ae in (("sender", adapt.SenderAE(ae_title="MFCONSOLE")), ("stock", AE(ae_title="SCU"))):
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port(stock_scp), ae_title="MF_SCP",
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_open(which))])
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    assert seen["sender"][0] is sockets.QuickAckSocket and seen["sender"][1] != 0
    assert seen["stock"][0] is socket.socket and seen["stock"][1] == 0
