"""mfconsole's own DICOM upper layer (PS3.8): every association mfconsole makes or takes.

pdu.py reads and writes the PDUs, dimse.py the command sets an SCP of Storage and
Verification needs, negotiation.py answers an A-ASSOCIATE-RQ, acceptor.py is the
listener (every connection of a listener served from one asyncio event loop: no
thread per connection; ingest runs in a small pool) and incoming.py streams a large
object into its blob as it arrives. requestor.py is the requestor side (one blocking
socket per association), sender.py the C-STORE SCU of a dimse destination on it and
echo.py the C-ECHO and context probe of ``echo`` / ``test``.
Protocol code: it never imports mfconsole.engine (tests/unit/test_layering.py).
"""
