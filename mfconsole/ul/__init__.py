"""mfconsole's own DICOM upper layer (PS3.8), acceptor side.

pdu.py reads and writes the PDUs, dimse.py the command sets an SCP of Storage and
Verification needs, acceptor.py serves every connection of a listener from one
asyncio event loop (no thread per connection; ingest runs in a small pool).
Protocol code: it never imports mfconsole.engine (tests/unit/test_layering.py).
"""
