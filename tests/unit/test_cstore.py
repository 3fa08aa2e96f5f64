"""Our hand-written C-STORE-RQ is what pynetdicom would have sent, fragment for
fragment, at every PDU size (including the boundaries)."""

from io import BytesIO

import pytest
from pydicom.uid import generate_uid
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from mfconsole.dimse.cstore import command_set, pdata


@pytest.mark.parametrize("max_pdu", [0, 100, 1000, 16384])
@pytest.mark.parametrize("size", [1, 93, 94, 95, 1000, 40_000])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45", generate_uid()])
def test_pdata_identical_to_pynetdicom(max_pdu, size, sop_instance):
    data = bytes(i % 251 for i in range(size))
    req = C_STORE()
    req.MessageID, req.Priority = 65535, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", sop_instance
    req.DataSet = BytesIO(data)
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    theirs = [p.presentation_data_value_list for p in message.encode_msg(5, max_pdu)]
    command = command_set(65535, 2, req.AffectedSOPClassUID, sop_instance)
    ours = [p.presentation_data_value_list for p in pdata(5, command, data, max_pdu)]
    assert ours == theirs
