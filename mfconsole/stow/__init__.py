"""DICOMweb STOW-RS destinations: POST ``{url}/studies`` with
``multipart/related; type="application/dicom"``.

multipart.py builds the request body (each stored data set, unchanged, inside a
Part 10 file), response.py reads the archive's answer into one Outcome per instance
with the tables of status.py, client.py is the Sender the delivery framework drives
(mfconsole/contract.py). Knows nothing of SQLite.
"""
