"""mfconsole: the DICOM imaging lane of an interface engine."""

__version__ = "0.1.0"

# Implementation Class UID of our associations and of the files we write (PS3.7 D.3.3.2,
# PS3.10 7.1). UUID-derived (PS3.5 B.2): mfconsole has no UID root of its own.
IMPLEMENTATION_CLASS_UID = "2.25.231883744796475215234759421753028933647"
