"""mfconsole: the DICOM imaging lane of an interface engine."""

__version__ = "0.1.0"
