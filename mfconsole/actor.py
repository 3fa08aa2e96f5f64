"""Who did it: the person behind an operator action, in words for the audit trail.

``"alice (uid 1000, via sudo from bob) via control socket"``. The uid is what the
kernel says (SO_PEERCRED, or our own); the login uid (``/proc/PID/loginuid``, set by
PAM at login and kept across sudo) is too. ``SUDO_USER`` is what the process's
environment says, so it is a hint, not a proof. Everything beyond the uid is best
effort: unreadable or odd values are left out, never an error.
"""

from __future__ import annotations

import os
import pwd
import re

UNSET_LOGINUID = 0xFFFFFFFF
_USER_NAME = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,63}\$?$")


def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def describe(uid: int, *, sudo_user: str | None = None, loginuid: int | None = None,
             via: str = "") -> str:
    name = user_name(uid) or "unknown user"
    facts = [f"uid {uid}"]
    if sudo_user and _USER_NAME.match(sudo_user) and sudo_user != name:
        facts.append(f"via sudo from {sudo_user}")
    if loginuid is not None and loginuid not in (UNSET_LOGINUID, uid):
        login = user_name(loginuid) or f"uid {loginuid}"
        if login != sudo_user:
            facts.append(f"logged in as {login}")
    return f"{name} ({', '.join(facts)})" + (f" via {via}" if via else "")


def of_process(pid: int | None, uid: int, *, via: str = "") -> str:
    """The actor behind another process (a control socket's peer)."""
    if pid is None or pid <= 0:
        return describe(uid, via=via)
    return describe(uid, sudo_user=_environ_value(pid, b"SUDO_USER"), loginuid=_loginuid(str(pid)),
                    via=via)


def local(via: str) -> str:
    """The actor behind this process (the CLI writing the database itself)."""
    return describe(os.getuid(), sudo_user=os.environ.get("SUDO_USER"), loginuid=_loginuid("self"),
                    via=via)


def _loginuid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/loginuid", "rb") as f:
            return int(f.read(16).strip())
    except (OSError, ValueError):
        return None


def _environ_value(pid: int, key: bytes) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read(256 * 1024)
    except OSError:
        return None
    for entry in data.split(b"\0"):
        if entry.startswith(key + b"="):
            return entry[len(key) + 1:].decode("ascii", errors="replace")[:64]
    return None
