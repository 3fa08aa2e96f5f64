"""What handlers are given: the contract types (api) and the SR content tree (sr);
tolerant DICOM value parsing, shared with mfconsole/hl7, is mfconsole/dicomvalues.py.
The engine that loads and runs handlers lives in mfconsole/engine/handlers.py; the
handlers themselves in the top-level handlers/."""
