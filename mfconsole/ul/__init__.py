"""mfconsole's own DICOM upper layer (PS3.8).

pdu.py reads and writes the PDUs, dimse.py the command sets an SCP of Storage and
Verification needs, acceptor.py serves every connection of a listener from one
asyncio event loop (no thread per connection; ingest runs in a small pool).
requestor.py is the requestor side (one blocking socket per association) and
sender.py the C-STORE SCU on it (``upper_layer = "mfconsole"`` on a dimse destination).
Protocol code: it never imports mfconsole.engine (tests/unit/test_layering.py).
"""
