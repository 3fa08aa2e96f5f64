"""FHIR R4 validation for the tests, with fhir.resources.

fhir.resources 7+ models FHIR R5 at its top level; its ``R4B`` subpackage is FHIR
4.3.0, which keeps R4's (4.0.1) resources for everything mfconsole sends (ImagingStudy,
Reference, Identifier, Coding: R4B changed medication definitions, subscriptions and
evidence resources only; R5 reshaped ImagingStudy — series.modality a
CodeableConcept), so R4B is the R4 validator (there is no R4 package in 7+).
pydantic checks cardinality (series.modality, instance.sopClass required) and the
primitive types (id, unsignedInt, dateTime patterns).
"""

from __future__ import annotations

import re
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

# FHIR R4's dateTime regex (datatypes.html#dateTime): a time needs seconds and an offset.
DATETIME = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]"
    r"|14:00)))?)?)?")


def validate(resource: dict[str, Any]) -> Any:
    """The model of ``resource`` (raises pydantic's ValidationError when it is not
    valid R4), plus the dateTime pattern on ImagingStudy's started elements (the model
    parses dateTime leniently)."""
    model = get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    if resource["resourceType"] == "ImagingStudy":
        for when in [resource.get("started")] + [s.get("started") for s in resource.get("series", [])]:
            if when is not None:
                assert DATETIME.fullmatch(when), f"not an R4 dateTime: {when}"
    return model
