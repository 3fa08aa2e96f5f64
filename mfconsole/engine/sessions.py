"""Outbound connections on the associations board, beside the inbound ones: a sender
wrapped so that each connection it makes to a destination shows while it lasts and
stays among the recent ones after (objects, bytes, how it ended). Protocol-neutral:
it sees only the contract (prepare, send_many, close), so every destination kind's
connections show the same way."""

from __future__ import annotations

import time
from typing import Any, Sequence

from mfconsole.contract import Outbound, Outcome, Queued, Sender


class Watched:
    """A Sender that reports its connections to ``board`` (the engine's
    AssociationBoard) as outbound associations of ``destination``."""

    def __init__(self, inner: Sender, board: Any, destination: str, target: str,
                 calling_ae: str = "", called_ae: str = ""):
        self.inner = inner
        self.board = board
        self.destination, self.target = destination, target
        self.calling_ae, self.called_ae = calling_ae, called_ae
        self.max_batch = inner.max_batch
        self.min_group = getattr(inner, "min_group", inner.max_batch[0])
        self.in_order = inner.in_order
        # The inner sender presents each object's calling AE (send_as = "calling_ae").
        self.by_calling_ae = getattr(inner, "by_calling_ae", False)
        self._open = False
        self._used = time.monotonic()

    def _begin(self) -> None:
        if not self._open:
            info = self.board.open(id(self), self.destination, self.target, direction="out")
            info.status, info.calling_ae, info.called_ae = "active", self.calling_ae, self.called_ae
            self._open = True

    def _end(self, status: str, reason: str = "") -> None:
        if self._open:
            self.board.close(id(self), status, reason)
            self._open = False

    def prepare(self, items: Sequence[Queued]) -> Outcome | None:
        refused = self.inner.prepare(items)
        self._used = time.monotonic()
        if refused is not None:
            self._begin()
            self._end("rejected", refused.reason)
        else:
            self._begin()
        return refused

    def send_many(self, objs: list[Outbound]) -> list[Outcome]:
        self._begin()
        outcomes = self.inner.send_many(objs)
        self._used = time.monotonic()
        info = self.board.get(id(self))
        if info is not None:
            if self.by_calling_ae:    # the calling AE title this association presents
                info.calling_ae = getattr(self.inner, "presented", self.calling_ae)
            for obj, outcome in zip(objs, outcomes):
                if outcome.is_success:
                    info.objects += 1
                    info.bytes += len(obj.data)
                else:
                    info.refused += 1
                    info.reason = f"{outcome.status}: {outcome.reason}"
            if any(o.ambiguous for o in outcomes):
                self._end("aborted", outcomes[-1].reason)
        return outcomes

    def close(self) -> None:
        self.inner.close()
        self._end("released")

    def close_if_idle(self, idle_s: float) -> None:
        self.inner.close_if_idle(idle_s)
        if time.monotonic() - self._used >= idle_s:      # the inner sender closed it too
            self._end("released", "idle")
