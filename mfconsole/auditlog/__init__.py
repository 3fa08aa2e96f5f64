"""DICOM audit messages (PS3.15 A.5) sent as syslog over TLS (RFC 5424 / RFC 5425).

* ``message``: the ``AuditMessage`` XML of one audit record, built with xml.etree;
* ``events``: which of mfconsole's audit events become which DICOM audit message
  (docs/operations.md, "Audit export", has the table);
* ``syslog``: RFC 5424 framing (octet counting, RFC 5425 / RFC 6587) and a client
  that writes a batch and knows when the receiver has read all of it.

A protocol package: it never imports mfconsole.engine (the engine's exporter thread,
engine/audit_export.py, drives it).
"""
