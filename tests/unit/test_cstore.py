"""Our hand-written C-STORE-RQ command set is, byte for byte, what pynetdicom (the
reference here) encodes for the same request."""

from io import BytesIO

import pytest
from pydicom.uid import generate_uid
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from mfconsole.dimse.cstore import command_set

COMMAND = 0x01


@pytest.mark.parametrize("priority", [0, 1, 2])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45", generate_uid(entropy_srcs=["mfconsole"])])
def test_command_set_identical_to_pynetdicom(priority, sop_instance):
    req = C_STORE()
    req.MessageID, req.Priority = 65535, priority
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", sop_instance
    req.DataSet = BytesIO(b"\x00" * 4)
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    theirs = b"".join(bytes(pdv[1][1:]) for p in message.encode_msg(1, 0)
                      for pdv in p.presentation_data_value_list if pdv[1][0] & COMMAND)
    assert command_set(65535, priority, req.AffectedSOPClassUID, sop_instance) == theirs
