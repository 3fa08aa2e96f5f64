"""Alerts out of mfconsole: the [alerts] settings, the words of a message, and the
two channels that carry it (mail over SMTP with STARTTLS, a JSON webhook).

Protocol-free and below the engine: nothing here imports mfconsole.engine. The
engine decides when a condition started or cleared and keeps the messages durable
(mfconsole/engine/alerts.py, mfconsole/repository/alerts.py); this package only
says what a message reads and sends one, raising SendError with a routing-safe
reason when it cannot.
"""


class SendError(Exception):
    """A message was not handed over; the reason names hosts, codes and classes only."""
