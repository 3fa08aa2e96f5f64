"""Routing decided at ingest: the deliveries one object gets, before the store's
commit, so the object and its deliveries are committed together.

Without [[rules]] (and without [routing].fallback) a listener's objects go where its
[[routes]] say, as they always have. With rules, the rules that apply to the listener
decide (mfconsole/rules.py: the first that matches, or every one with match = "all");
an object none matches goes to the fallback: [routing].fallback, or when that is
absent the listener's [[routes]]. An object a rule discards, or that no rule matches
when the fallback is empty, is stored and sent nowhere, with an audit row saying so.
"""

from __future__ import annotations

import threading
from collections import Counter
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mfconsole import rules as rules_mod
from mfconsole.config import Config
from mfconsole.dimse.dataset_scan import HeaderSummary
from mfconsole.engine.store import Route
from mfconsole.rules import Facts, Rule

# Audit events of objects stored and sent nowhere on purpose. Not "discarded": that
# event is an operator discarding a dead letter, and should not drown in these.
DISCARDED_BY_RULE = "discarded_by_rule"
UNROUTED = "unrouted"


def routes_by_listener(config: Config) -> dict[str, tuple[Route, ...]]:
    """Every destination a listener's objects go to by [[routes]]. A destination named
    by two routes of the same listener gets one delivery per distinct handler, never
    two identical."""
    table: dict[str, list[Route]] = {item.name: [] for item in config.listeners}
    for route in config.routes:
        for dest in route.to:
            r = Route(destination=dest, handler=route.handler)
            if r not in table[route.from_listener]:
                table[route.from_listener].append(r)
    return {name: tuple(rs) for name, rs in table.items()}


@dataclass(frozen=True)
class Decision:
    """Where one object goes, and why."""
    routes: tuple[Route, ...]
    rules: tuple[str, ...] = ()     # the rules that decided; none: the fallback did
    discarded: bool = False         # by rules[0]
    ruled: bool = False             # rules or [routing].fallback are configured

    @property
    def words(self) -> str:
        """What decided, for the `stored` audit row ("" when routes alone did)."""
        if not self.ruled:
            return ""
        if self.discarded:
            return f"discarded by rule {self.rules[0]}"
        if self.rules:
            urgent = any(r.priority for r in self.routes)
            return (("rule " if len(self.rules) == 1 else "rules ") + ", ".join(self.rules)
                    + ("; urgent" if urgent else ""))   # ";": never in a rule name
        return "fallback" if self.routes else "fallback (empty)"

    def nowhere(self) -> tuple[str, str | None, str] | None:
        """(event, status, detail) of the audit row of an object sent nowhere on
        purpose; rule names only, never a value of the object."""
        if self.discarded:
            return (DISCARDED_BY_RULE, self.rules[0],
                    f"rule {self.rules[0]} discards it: stored, sent nowhere")
        if self.ruled and not self.routes:
            return (UNROUTED, None, "no rule matched and the fallback ([routing].fallback) "
                                    "is empty: stored, sent nowhere")
        return None


@dataclass(frozen=True)
class _Plan:
    """A listener's rules, and what its unmatched objects get."""
    rules: tuple[Rule, ...]
    fallback: Decision


class Router:
    """The routing of one configuration (a reload makes a new one: the next object
    uses it, an association in progress included)."""

    def __init__(self, config: Config):
        self.match = config.routing.match
        # Study-stable destinations: their deliveries are made held (engine/holds.py).
        self._holds = {d.name: (d.stable_after_s, d.late_instance)
                       for d in config.destinations if d.study_stable}
        # What the header scan must read for these rules (nothing more without them).
        self.header_tags = rules_mod.header_tags(config.rules)
        ruled = bool(config.rules) or config.routing.fallback is not None
        routes = routes_by_listener(config)
        self._plans: dict[str, _Plan] = {}
        for lc in config.listeners:
            fallback = (routes.get(lc.name, ()) if config.routing.fallback is None
                        else tuple(Route(d) for d in config.routing.fallback))
            self._plans[lc.name] = _Plan(tuple(r for r in config.rules if r.applies_to(lc.name)),
                                         Decision(fallback, ruled=ruled))
            self._plans[lc.name] = dataclasses.replace(
                self._plans[lc.name], fallback=self._held(self._plans[lc.name].fallback))
        # One decision per rule, made once (match = "first" picks one of these).
        self._single = {rule.name: self._held(_decision((rule,))) for rule in config.rules}

    def decide(self, summary: HeaderSummary, meta: dict[str, Any]) -> Decision:
        """Where an object goes (``meta``: what the listener hands the engine)."""
        plan = self._plans.get(meta["listener"])
        if plan is None:
            return Decision(())
        if not plan.rules:
            return plan.fallback       # no rule applies: no facts to gather
        return self.decide_for(facts_of(summary, meta), plan)

    def decide_for(self, facts: Facts, plan: _Plan | None = None) -> Decision:
        plan = plan or self._plans[facts.listener]
        found = rules_mod.matching(plan.rules, self.match, facts)
        if not found:
            return plan.fallback
        if len(found) == 1:
            return self._single[found[0].name]
        return self._held(_decision(found))

    def _held(self, decision: Decision) -> Decision:
        """The decision with each route to a study-stable destination marked as held."""
        if not any(r.destination in self._holds for r in decision.routes):
            return decision
        return dataclasses.replace(decision, routes=tuple(
            dataclasses.replace(r, hold_s=self._holds[r.destination][0],
                                late=self._holds[r.destination][1])
            if r.destination in self._holds else r for r in decision.routes))

    def rules_of(self, listener: str) -> tuple[Rule, ...]:
        return self._plans[listener].rules


def _decision(found: tuple[Rule, ...]) -> Decision:
    if found[0].discard:
        return Decision((), rules=(found[0].name,), discarded=True, ruled=True)
    routes: dict[tuple[str, str | None], Route] = {}
    for rule in found:
        for dest in rule.to:
            # The same destination and handler: once (match = "all" may find several),
            # made by the first rule (whose coercion then applies to it), urgent if any
            # rule sending it there is.
            key = (dest, rule.handler)
            if key not in routes:
                routes[key] = Route(dest, rule.handler, rule.name, rule.priority)
            elif rule.priority > routes[key].priority:
                routes[key] = dataclasses.replace(routes[key], priority=rule.priority)
    return Decision(tuple(routes.values()), rules=tuple(r.name for r in found), ruled=True)


def facts_of(summary: HeaderSummary, meta: dict[str, Any], peer: str | None = None) -> Facts:
    """``meta["peer"]`` is "address:port" as the listener writes it (IPv6 unbracketed:
    the port is what follows the last colon); ``peer`` an address alone (explain)."""
    if peer is None:
        peer = meta.get("peer", "").rpartition(":")[0]
    return Facts(listener=meta["listener"], calling_aet=meta.get("calling_ae", ""),
                 called_aet=meta.get("called_ae", ""), peer=peer,
                 modality=summary.modality, sop_class_uid=summary.sop_class_uid,
                 values=summary.wanted)


@dataclass
class RuleCounts:
    """Objects routing decided since the engine started (a reload keeps the counts):
    per rule, those it sent and those it discarded; those the fallback took, and those
    that went nowhere. Duplicates are not counted (nothing new is routed for them)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _n: Counter = field(default_factory=Counter)

    def add(self, decision: Decision) -> None:
        if not decision.ruled:
            return
        with self._lock:
            if decision.discarded:
                self._n[("rule", decision.rules[0], "discarded")] += 1
            elif decision.rules:
                for name in decision.rules:
                    self._n[("rule", name, "sent")] += 1
            else:
                self._n[("fallback", "", "sent" if decision.routes else "unrouted")] += 1

    def view(self) -> dict[str, Any]:
        """{"rules": {name: {"sent": n, "discarded": n}}, "fallback": n, "unrouted": n}"""
        with self._lock:
            counts = dict(self._n)
        out: dict[str, Any] = {"rules": {}, "fallback": 0, "unrouted": 0}
        for (what, name, outcome), n in counts.items():
            if what == "rule":
                out["rules"].setdefault(name, {"sent": 0, "discarded": 0})[outcome] = n
            else:
                out["fallback" if outcome == "sent" else "unrouted"] = n
        return out


@dataclass
class Explanation:
    """What `mfconsole routes explain` shows: each rule of the listener with the
    `when` keys that matched and those that did not, and the decision."""
    listener: str
    match: str
    rules: list[tuple[Rule, list[tuple[str, bool]]]]
    decision: Decision


def explain(config: Config, summary: HeaderSummary, *, listener: str, calling: str = "",
            called: str = "", peer: str = "") -> Explanation:
    router = Router(config)
    facts = facts_of(summary, {"listener": listener, "calling_ae": calling, "called_ae": called},
                     peer=peer)
    checks = [(rule, rule.checks(facts)) for rule in router.rules_of(listener)]
    return Explanation(listener, router.match, checks, router.decide_for(facts))
