"""The coercion step of a destination's deliveries, at send time (mfconsole/coerce.py
says what the operations do).

It runs after the handler step: the handler reads the object as stored (as it always
has), and what the configuration says the peer must get (a prefixed Patient ID, an
Issuer of Patient ID) holds whatever a handler returns. The operations are the rule's
that made the delivery, looked up by name in the configuration running now (a reload
changes them for every delivery not yet sent, as it does a handler), then the
destination's own. A delivery whose rule is no longer configured is dead-lettered
rather than sent without its coercion: an uncoerced Patient ID could merge two
patients at the PACS. HL7 destinations are not coerced: their handler makes the
message from the object as stored.

What the delivery records is what changed: attributes and operations, never values.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping

from mfconsole import coerce
from mfconsole.contract import MESSAGE, PERMANENT, Outbound, Outcome
from mfconsole.kinds import kind_of


class Coercer:
    """The coercion of one destination's deliveries. ``rules()``: the rules configured
    now, by name."""

    def __init__(self, destination: Any, rules: Callable[[], Mapping[str, Any]]):
        self.destination = destination
        self.rules = rules
        self.dicom = kind_of(destination).produces == "dicom"
        self.own: coerce.Coercion = tuple(getattr(destination, "coerce", ()) or ())

    def operations(self, rule_name: str | None) -> coerce.Coercion | Outcome:
        """The operations a delivery made by ``rule_name`` gets here, or the Outcome
        that settles it when its rule is gone."""
        ops: coerce.Coercion = ()
        if rule_name:
            rule = self.rules().get(rule_name)
            if rule is None:
                return Outcome(PERMANENT, MESSAGE, "rule removed",
                               f"routed by rule {rule_name}, which is no longer configured: its "
                               "coercion cannot be applied; restore the rule (mfconsole reload), "
                               "then replay")
            ops = tuple(rule.coerce)
        return ops + self.own

    def __call__(self, item: Any, obj: Outbound) -> tuple[Outbound | Outcome, str | None]:
        """(the copy to send, or the Outcome that settles the delivery; what changed,
        None when no coercion applies)."""
        if not self.dicom:
            return obj, None
        ops = self.operations(item.rule)
        if isinstance(ops, Outcome):
            return ops, None
        if not ops:
            return obj, None
        try:
            result = coerce.apply(ops, obj.data, obj.transfer_syntax)
        except coerce.CoercionError as exc:
            return Outcome(PERMANENT, MESSAGE, "coercion",
                           f"coercion not made: {exc}; the object is kept: fix the coercion "
                           "(mfconsole reload), then replay"), None
        return (replace(obj, data=result.data) if result.changes else obj), result.words
