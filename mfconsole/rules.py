"""Routing rules: which destinations an object goes to, decided at ingest from what
came with it (the association and a few top-level header attributes).

```toml
[[rules]]                       # in order; for every listener unless `from` names some
name = "ct-to-pacs"
from = ["modalities"]
when = { calling_aet = ["CT1"], modality = ["CT"] }    # every key must match
to = ["pacs"]                   # or: action = "discard"
priority = "urgent"             # optional: ahead of the destination's queue
[routing]
match = "first"                 # or "all"
fallback = ["archive"]          # unmatched objects; absent: the listener's [[routes]]
```

This module reads those tables (``read``, called by config.py with its reader) and
decides (``matching``) for the facts of one object (``Facts``). It imports nothing of
mfconsole at load time, so config.py can import it; the engine's router turns the
matching rules into deliveries, and ``mfconsole routes explain`` shows the same
decision for a file.

Header attributes are matched with ``re.search`` (anywhere in the value, unless the
pattern anchors itself), case-sensitively (``(?i)`` in a pattern turns that off),
against the value as text: decoded with the object's Specific Character Set
(0008,0005) when it has one, else as ASCII with bytes above 0x7F read as Latin-1;
leading and trailing spaces and NUL padding removed; several values stay joined by
their backslash. An attribute the object does not have (or whose value is longer than
256 bytes, or a sequence) matches no pattern. Only top-level attributes are read.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Union

from mfconsole.names import ae_title_problem, attribute_named, name_problem

RULE_KEYS = frozenset({"name", "from", "when", "to", "action", "handler", "coerce",
                       "priority"})
ROUTING_KEYS = frozenset({"match", "fallback"})
# Header attributes by name; any other top-level attribute goes in `tags`.
NAMED_ATTRIBUTES = {
    "study_description": 0x00081030,
    "series_description": 0x0008103E,
    "institution_name": 0x00080080,
    "station_name": 0x00081010,
}
WHEN_KEYS = frozenset({"calling_aet", "called_aet", "peer", "modality", "sop_class", "tags",
                       *NAMED_ATTRIBUTES})
# `when` keys a reader may reach for that are spelled another way here.
WHEN_HINTS = {
    "listener": "is not a when key: name the listeners in the rule's `from` "
                '(from = ["modalities"])',
}
MATCH_MODES = ("first", "all")
DISCARD = "discard"
# A rule's `priority`: the value a delivery row carries (deliveries.priority). Urgent
# deliveries are claimed before the rest of a destination's queue.
NORMAL, URGENT = 0, 1
PRIORITIES = {"normal": NORMAL, "urgent": URGENT}

SPECIFIC_CHARACTER_SET = 0x00080005
# VRs whose values are text (PS3.5 6.2): the only ones a pattern can sensibly match.
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                      "TM", "UC", "UI", "UR", "UT"})
_MODALITY = re.compile(r"^[A-Z0-9_ ]{1,16}$")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


# -- what one object brings --------------------------------------------------------------

class Facts:
    """What the rules may look at for one object. ``values``: raw top-level values of
    the attributes the rules name (HeaderSummary.wanted), decoded only when a rule
    asks, once. May hold patient data: nothing here is ever logged or printed."""

    __slots__ = ("listener", "calling_aet", "called_aet", "peer", "modality", "sop_class_uid",
                 "_values", "_texts", "_address")

    def __init__(self, *, listener: str, calling_aet: str = "", called_aet: str = "",
                 peer: str = "", modality: str | None = None, sop_class_uid: str = "",
                 values: dict[int, bytes] | None = None):
        self.listener = listener
        self.calling_aet = calling_aet.strip()
        self.called_aet = called_aet.strip()
        self.peer = peer                 # the sender's address (no port)
        self.modality = modality
        self.sop_class_uid = sop_class_uid
        self._values = values or {}
        self._texts: dict[int, str | None] = {}
        self._address: IPAddress | None | bool = False    # False: not parsed yet

    def address(self) -> IPAddress | None:
        """The peer's IP address (an IPv4-mapped IPv6 address as its IPv4 one)."""
        if self._address is False:
            self._address = peer_address(self.peer)
        return self._address  # type: ignore[return-value]

    def text(self, tag: int) -> str | None:
        """The attribute's value as text (see the module docstring), None if absent."""
        if tag not in self._texts:
            raw = self._values.get(tag)
            self._texts[tag] = None if raw is None else decode(
                raw, self._values.get(SPECIFIC_CHARACTER_SET)).strip(" \x00")
        return self._texts[tag]


def peer_address(peer: str) -> IPAddress | None:
    """The IP address ``peer`` writes (IPv6 with or without brackets), None if none."""
    text = peer.strip().removeprefix("[").removesuffix("]").split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped     # a dual-stack listener's IPv4 peer
    return address


def decode(raw: bytes, charset: bytes | None) -> str:
    """Text of a raw value under a Specific Character Set value (raw too, may be
    absent): pydicom's decoding, including ISO 2022 code extensions; without a
    character set, or with one that cannot decode it, ASCII read as Latin-1."""
    terms = [t.strip() for t in charset.decode("latin-1").split("\\")] if charset else []
    if not any(terms):
        return raw.decode("latin-1")
    from pydicom.charset import convert_encodings, decode_bytes

    try:
        return decode_bytes(raw, convert_encodings([t or "ISO_IR 6" for t in terms]), {0x5C})
    except Exception:    # an unknown or broken character set: never refuse to route for it
        return raw.decode("latin-1")


# -- conditions --------------------------------------------------------------------------

@dataclass(frozen=True)
class OneOf:
    """``key`` matches when the object's ``field`` is one of ``values``."""
    key: str
    field: str
    values: frozenset[str]

    def test(self, facts: Facts) -> bool:
        return getattr(facts, self.field) in self.values


@dataclass(frozen=True)
class PeerIn:
    key: str
    networks: tuple[IPNetwork, ...]

    def test(self, facts: Facts) -> bool:
        address = facts.address()
        return address is not None and any(address in n for n in self.networks
                                           if n.version == address.version)


@dataclass(frozen=True)
class Matches:
    """A pattern on a top-level attribute (re.search on its text)."""
    key: str                 # as written: "institution_name", "tags.InstitutionName"
    tag: int
    pattern: re.Pattern[str]

    def test(self, facts: Facts) -> bool:
        text = facts.text(self.tag)
        return text is not None and self.pattern.search(text) is not None


Condition = Union[OneOf, PeerIn, Matches]


@dataclass(frozen=True)
class Rule:
    name: str
    when: tuple[Condition, ...] = ()          # all must match; none: every object
    to: tuple[str, ...] = ()                  # destinations (empty when it discards)
    handler: str | None = None                # for each of them, as a route's handler
    discard: bool = False
    listeners: tuple[str, ...] = ()           # `from`; empty: every listener
    # Coercion of the copies its deliveries send (mfconsole/coerce.py), looked up by the
    # rule's name at send time: what the current configuration says runs.
    coerce: tuple[Any, ...] = ()
    priority: int = NORMAL                    # of the deliveries it makes (URGENT: first)

    def applies_to(self, listener: str) -> bool:
        return not self.listeners or listener in self.listeners

    def matches(self, facts: Facts) -> bool:
        for condition in self.when:
            if not condition.test(facts):
                return False
        return True

    def checks(self, facts: Facts) -> list[tuple[str, bool]]:
        """Every `when` key and whether it matches (for `routes explain`)."""
        return [(c.key, c.test(facts)) for c in self.when]


@dataclass(frozen=True)
class Routing:
    match: str = "first"
    # Destinations for objects no rule matches; None: each listener's [[routes]].
    fallback: tuple[str, ...] | None = None


def matching(rules: Iterable[Rule], match: str, facts: Facts) -> tuple[Rule, ...]:
    """The rules that decide for ``facts`` (rules that apply to its listener only):
    ``first``: the first that matches; ``all``: every one that matches, unless one of
    them discards, which then decides alone (a discard is a veto). Empty: the
    fallback decides."""
    if match == "first":
        for rule in rules:
            if rule.matches(facts):
                return (rule,)
        return ()
    found = tuple(rule for rule in rules if rule.matches(facts))
    for rule in found:
        if rule.discard:
            return (rule,)
    return found


def header_tags(rules: Iterable[Rule]) -> frozenset[int]:
    """The top-level attributes the rules match on: what the scan must read."""
    return frozenset(c.tag for rule in rules for c in rule.when if isinstance(c, Matches))


# -- reading config.toml -----------------------------------------------------------------

HandlerCheck = Callable[[str, "str | None", "tuple[str, ...]"], bool]
CoercionReader = Callable[[str, Any], "tuple[Any, ...]"]


def read(r: Any, raw_rules: Any, raw_routing: Any, *, listeners: set[str], destinations: set[str],
         hl7: set[str], routes: int, handler_problem: HandlerCheck,
         read_coercion: CoercionReader = lambda p, raw: ()) -> tuple[tuple[Rule, ...], Routing]:
    """[[rules]] and [routing] with config.py's reader ``r`` (problems with key paths).
    ``listeners``/``destinations``: every name declared; ``hl7``: the destinations that
    take HL7 messages (only a handler makes those); ``routes``: how many [[routes]] there
    are; ``handler_problem(path, handler, to)`` records what is wrong with the handler
    of the table at ``path`` for destinations ``to`` (as for a route), True if anything;
    ``read_coercion(path, raw)`` reads a `coerce` list (mfconsole/coerce.py)."""
    out: list[Rule] = []
    names: dict[str, int] = {}
    if not isinstance(raw_rules, list):
        r.fail("rules", "must be an array of tables ([[rules]])")
        raw_rules = []
    for i, item in enumerate(raw_rules):
        p = f"rules[{i}]"
        t = r.table(item, p, RULE_KEYS)
        if not isinstance(item, dict):
            continue
        before = len(r.problems)
        name = r.get(t, p, "name", str, check=_name)
        if name is not None:
            if name in names:
                r.fail(f"{p}.name", f"'{name}' is already used by rules[{names[name]}]")
            else:
                names[name] = i
        sources = _names(r, t, p, "from", listeners, "listener")
        when = _when(r, t.get("when", {}), f"{p}.when") if "when" in t else ()
        to, discard, handler = _action(r, t, p, destinations, handler_problem)
        coerce = _coerce(r, t, p, to, discard, hl7, read_coercion) if "coerce" in t else ()
        priority = _priority(r, t, p)
        if len(r.problems) == before:
            out.append(Rule(name=name, when=when, to=to, handler=handler, discard=discard,
                            listeners=sources, coerce=coerce, priority=priority))
    return tuple(out), _routing(r, raw_routing, destinations, hl7, routes)


def _coerce(r: Any, t: dict[str, Any], p: str, to: tuple[str, ...], discard: bool, hl7: set[str],
            read_coercion: CoercionReader) -> tuple[Any, ...]:
    """A rule's `coerce`: only for a rule that sends DICOM somewhere (coercion changes
    the header of the copy a DICOM destination gets; an HL7 destination's handler reads
    the object as stored)."""
    coerce = read_coercion(f"{p}.coerce", t["coerce"])
    if discard:
        r.fail(f"{p}.coerce", "only applies with `to` (a discarding rule sends nothing)")
    elif to and all(d in hl7 for d in to):
        r.fail(f"{p}.coerce", f"applies to DICOM destinations only: {', '.join(to)} take"
               f"{'s' if len(to) == 1 else ''} what a handler makes (HL7 messages, FHIR "
               "resources) from the object as stored")
    return coerce


def _routing(r: Any, raw: Any, destinations: set[str], hl7: set[str], routes: int) -> Routing:
    t = r.table(raw, "routing", ROUTING_KEYS)
    match = r.get(t, "routing", "match", str, "first",
                  lambda v: None if v in MATCH_MODES else 'must be "first" or "all"') or "first"
    fallback = None
    if "fallback" in t:
        fallback = _names(r, t, "routing", "fallback", destinations, "destination", empty=True)
        for j, name in enumerate(fallback or ()):
            if name in hl7:
                r.fail(f"routing.fallback[{j}]", f"'{name}' takes what only a handler makes "
                       "(HL7 messages, FHIR resources): send there with a rule that names one "
                       "(handler = …)")
        if routes:
            r.fail("routing.fallback", f"replaces the {routes} [[routes]] entr"
                   f"{'y' if routes == 1 else 'ies'} (they are the fallback when it is absent): "
                   "remove those, or remove fallback to keep them")
    return Routing(match=match, fallback=fallback)


def _action(r: Any, t: dict[str, Any], p: str, destinations: set[str],
            handler_problem: HandlerCheck) -> tuple[tuple[str, ...], bool, str | None]:
    """(to, discard, handler) of a rule: exactly one of `to` and action = "discard"."""
    action = r.get(t, p, "action", str, None,
                   lambda v: None if v == DISCARD else 'must be "discard" (or give `to` instead)')
    handler = r.get(t, p, "handler", str, None)
    if "to" in t and "action" in t:
        r.fail(f"{p}.action", "cannot be given with `to`: a rule either sends (to = [...]) "
                              'or discards (action = "discard")')
        return (), False, None
    if "to" not in t:
        if "action" not in t:
            r.fail(f"{p}.to", 'is required: the destinations, or action = "discard"')
        if handler is not None:
            r.fail(f"{p}.handler", "only applies with `to` (a discarding rule sends nothing)")
        return (), action == DISCARD, None
    to = _names(r, t, p, "to", destinations, "destination") or ()
    if to and handler_problem(p, handler, to):
        return (), False, None
    return to, False, handler


def _priority(r: Any, t: dict[str, Any], p: str) -> int:
    """priority = "urgent" | "normal" (absent: normal); only on a rule that sends."""
    word = r.get(t, p, "priority", str, "normal",
                 lambda v: None if v in PRIORITIES else 'must be "urgent" or "normal"')
    if "priority" in t and "action" in t and "to" not in t and word is not None:
        r.fail(f"{p}.priority", "only applies with `to` (a discarding rule sends nothing)")
    return PRIORITIES.get(word or "normal", NORMAL)


def _names(r: Any, t: dict[str, Any], p: str, key: str, known: set[str], what: str,
           empty: bool = False) -> tuple[str, ...] | None:
    """A list of names of known listeners or destinations, each once (a single string
    is a list of one); None when absent."""
    if key not in t:
        return () if key == "from" else None
    where = f"{p}.{key}"
    value = t[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        r.fail(where, f"must be a list of {what} names")
        return None
    if not value and not empty:
        r.fail(where, f"must name at least one {what}")
        return None
    out: list[str] = []
    for j, name in enumerate(value):
        if not isinstance(name, str):
            r.fail(f"{where}[{j}]", "must be a string")
        elif name in out:
            r.fail(f"{where}[{j}]", f"names {what} '{name}' twice")
        elif name not in known:
            hint = _closest(name, known)
            r.fail(f"{where}[{j}]", f"names no {what} ('{name}')"
                   + (f"; did you mean '{hint}'?" if hint else ""))
        else:
            out.append(name)
    return tuple(out)


def _when(r: Any, raw: Any, p: str) -> tuple[Condition, ...]:
    if not isinstance(raw, dict):
        r.fail(p, "must be a table, e.g. when = { modality = [\"CT\"] }")
        return ()
    for key in raw:
        if key in WHEN_HINTS:
            r.fail(f"{p}.{key}", WHEN_HINTS[key])
    r.table({k: v for k, v in raw.items() if k not in WHEN_HINTS}, p, WHEN_KEYS)
    out: list[Condition] = []
    for key, value in raw.items():
        where = f"{p}.{key}"
        if key in ("calling_aet", "called_aet"):
            values = _strings(r, where, value, _ae_title)
            if values is not None:
                out.append(OneOf(key, key, frozenset(v.strip() for v in values)))
        elif key == "modality":
            values = _strings(r, where, value, _modality)
            if values is not None:
                out.append(OneOf(key, "modality", frozenset(values)))
        elif key == "sop_class":
            values = _strings(r, where, value, _sop_class_problem)
            if values is not None:
                out.append(OneOf(key, "sop_class_uid", frozenset(sop_class_uid(v) for v in values)))
        elif key == "peer":
            values = _strings(r, where, value, _network_problem)
            if values is not None:
                out.append(PeerIn(key, tuple(ipaddress.ip_network(v) for v in values)))
        elif key in NAMED_ATTRIBUTES:
            pattern = _pattern(r, where, value)
            if pattern is not None:
                out.append(Matches(key, NAMED_ATTRIBUTES[key], pattern))
        elif key == "tags":
            out += _tags(r, where, value)
    return tuple(out)


def _tags(r: Any, p: str, raw: Any) -> list[Matches]:
    """tags = { InstitutionName = "^Hosp", "(0009,0010)" = "^GEMS" }: any top-level
    attribute, by keyword or (group,element), each with a pattern."""
    if not isinstance(raw, dict) or not raw:
        r.fail(p, 'must be a table of attributes and patterns, e.g. '
                  'tags = { InstitutionName = "^Hosp", "(0009,0010)" = "^GEMS" }')
        return []
    out = []
    for name, value in raw.items():
        where = f'{p}."{name}"' if not name.isidentifier() else f"{p}.{name}"
        tag, why = attribute_tag(name)
        if why:
            r.fail(where, why)
            continue
        pattern = _pattern(r, where, value)
        if pattern is not None:
            out.append(Matches(f"tags.{name}", tag, pattern))
    return out


def attribute_tag(name: str) -> tuple[int, str | None]:
    """(tag, None) for a keyword or "(gggg,eeee)" a rule may match on, else (0, why)."""
    from pydicom.datadict import dictionary_VR

    tag, why = attribute_named(name)
    if why:
        return 0, why
    group = tag >> 16
    if group <= 0x0002 or group == 0xFFFE or tag == 0x7FE00010 or tag == SPECIFIC_CHARACTER_SET:
        return 0, "is not an attribute a rule can match (command, file meta, item or pixel data)"
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return tag, None     # private or unknown: matched as text
    if vr not in TEXT_VRS:
        return 0, f"has VR {vr}: rules match text values only"
    return tag, None


def _pattern(r: Any, where: str, value: Any) -> re.Pattern[str] | None:
    if not isinstance(value, str):
        r.fail(where, "must be a regular expression (a string)")
        return None
    try:
        return re.compile(value)
    except re.error as exc:
        r.fail(where, f"is not a valid regular expression: {exc.msg} at position {exc.pos}")
        return None


def _strings(r: Any, where: str, value: Any, check: Callable[[str], str | None]
             ) -> list[str] | None:
    """A string or a list of strings, each checked; None when any is wrong."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        r.fail(where, "must be a string or a non-empty list of strings")
        return None
    ok = True
    for j, item in enumerate(values):
        at = f"{where}[{j}]" if isinstance(value, list) else where
        why = "must be a string" if not isinstance(item, str) else check(item)
        if why:
            r.fail(at, why)
            ok = False
    return values if ok else None


_ae_title = ae_title_problem
_name = name_problem


def _modality(value: str) -> str | None:
    return None if _MODALITY.match(value) else (
        "must be a modality code as objects carry it (CT, MR, SR…: upper case, at most 16 characters)")


def _network_problem(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        return f"must be an IP address or CIDR range (host bits zero): {exc}"
    return None


@functools.cache
def _sop_classes() -> dict[str, str]:
    """SOP class keyword -> UID, from pydicom's UID dictionary."""
    from pydicom.uid import UID_dictionary

    return {entry[4]: uid for uid, entry in UID_dictionary.items()
            if entry[1] == "SOP Class" and entry[4]}


def sop_class_uid(value: str) -> str:
    return _sop_classes().get(value, value)


def _sop_class_problem(value: str) -> str | None:
    if _UID.match(value) and len(value) <= 64:
        return None
    classes = _sop_classes()
    if value in classes:
        return None
    hint = difflib.get_close_matches(value, classes, n=1, cutoff=0.8)
    return ("must be a SOP Class UID or keyword (e.g. CTImageStorage)"
            + (f"; did you mean '{hint[0]}'?" if hint else ""))


def _closest(name: str, known: set[str]) -> str | None:
    found = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return found[0] if found else None
