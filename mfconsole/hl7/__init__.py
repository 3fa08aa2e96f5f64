"""HL7 v2 message building: escaping (escape), segments and messages (message), data
types from DICOM values (datatypes), and the MSH/PID/ORC/OBR/OBX header of an ORU^R01
from any DICOM header (header)."""
