"""What handlers are given: the contract types (api), the SR content tree (sr) and
tolerant DICOM value parsing (values). The engine that loads and runs handlers lives
in mfconsole/engine/handlers.py; the handlers themselves in the top-level handlers/."""
