"""FHIR R4 destinations: each resource a study-level handler makes (e.g. an
ImagingStudy) goes as a conditional update,
``PUT {url}/{resourceType}?identifier=urn:dicom:uid|urn:oid:{study_uid}``, so a resend
updates the one resource instead of creating another.

kind.py declares the destination's keys, client.py is the Sender the delivery
framework drives (mfconsole/contract.py), status.py the table of what a FHIR server's
answer means. Knows nothing of SQLite or the engine; the HTTP plumbing (egress-pinned
connection, credentials, TLS) is mfconsole/httpdest's, shared with STOW.
"""
