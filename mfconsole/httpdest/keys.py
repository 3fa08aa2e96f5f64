"""The keys every HTTP destination kind declares alike: its url (under an
[egress].allowed_http prefix) and its credentials, read from files at every request.
A kind's subclass words the url for its protocol and adds its own keys;
config.check_http_peer rules them across (egress, cleartext, credentials).

Loads no sender (no httpx): a kind's module imports it when the configuration loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mfconsole.config import (DestinationConfig, http_prefix_problem, not_empty,
                              readable_secret_problem, setting)


@dataclass(frozen=True, kw_only=True)
class HttpDestination(DestinationConfig):
    url: str = setting(doc="The server's base URL, under an [egress].allowed_http prefix.",
                       check=http_prefix_problem, label="url")
    bearer_token_file: Path | None = setting(
        None, doc="Bearer token (the whole file), read at every request; chmod 600.",
        check=readable_secret_problem)
    username: str | None = setting(None, doc="Basic authentication: the user name (with "
                                   "password_file).", check=not_empty)
    password_file: Path | None = setting(None, doc="Basic authentication: the password, in a "
                                         "file read at every request; chmod 600.",
                                         check=readable_secret_problem)
