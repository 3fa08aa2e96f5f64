"""Key custody: which keys a start needs, and never a new key by accident.

A store that holds objects can only be read with the keys that sealed them. So a
start checks, before anything is opened, that ``[store].key_file`` and
``previous_key_files`` provide every key id the database names; a missing or
different key file is a refusal that names the key ids and the fix, never a fresh key
(which would leave every queued object unreadable). A key is created only for a store
that holds nothing, or by ``mfconsole keys new``.
"""

from __future__ import annotations

from pathlib import Path

from mfconsole.engine.store import has_blob_files, sealed_key_ids
from mfconsole.repository import db_path
from mfconsole.engine.vault import Vault, VaultError, create_key, key_id_of, load_key


class KeyCustodyError(Exception):
    """The keys configured cannot open this store; the message says what to do."""


def _describe(ids: dict[str, int]) -> str:
    return ", ".join(f"{k} ({n} object{'s' if n != 1 else ''})" for k, n in sorted(ids.items()))


def open_vault(store_cfg, data_dir: Path) -> Vault:
    """The vault for this data directory: the sealing key first, then the previous
    keys. Creates the sealing key only when the store holds nothing at all."""
    needed = sealed_key_ids(db_path(data_dir))
    holds_objects = bool(needed) or has_blob_files(data_dir / "blobs")
    key_file = store_cfg.key_file
    if not key_file.exists() and not key_file.is_symlink():
        if holds_objects:
            raise KeyCustodyError(
                f"store.key_file {key_file} is missing, and the store holds objects sealed with "
                f"key id(s) {_describe(needed) or 'unknown (blob files without a database)'}: "
                "put the key file back from your key backup. A new key cannot read them; "
                "mfconsole never makes one for a store that holds objects")
        try:
            current = create_key(key_file)
        except (OSError, VaultError) as exc:
            raise KeyCustodyError(f"store.key_file {key_file}: cannot create it "
                                  f"({getattr(exc, 'strerror', None) or exc})") from None
    else:
        current = _load("store.key_file", key_file)
    keys = [current]
    for i, path in enumerate(store_cfg.previous_key_files):
        keys.append(_load(f"store.previous_key_files[{i}]", path))
    held = {key_id_of(k).hex() for k in keys}
    missing = {k: n for k, n in needed.items() if k not in held}
    if missing:
        raise KeyCustodyError(
            f"the store holds objects sealed with key id(s) {_describe(missing)} that neither "
            f"store.key_file ({key_id_of(current).hex()}) nor store.previous_key_files provide: "
            "point key_file at the right key, or list the old key file in previous_key_files "
            "(then `mfconsole rekey` moves everything to the new key)")
    return Vault(keys)


def _load(where: str, path: Path) -> bytes:
    try:
        return load_key(path)
    except FileNotFoundError:
        raise KeyCustodyError(f"{where} {path} is missing") from None
    except OSError as exc:
        raise KeyCustodyError(f"{where} {path}: {exc.strerror}") from None
    except VaultError as exc:
        raise KeyCustodyError(f"{where}: {exc}") from None


def new_key(path: Path) -> str:
    """``mfconsole keys new``: a new key file (never over an existing one); returns its
    key id."""
    try:
        return key_id_of(create_key(path)).hex()
    except VaultError as exc:
        raise KeyCustodyError(str(exc)) from None
    except OSError as exc:
        raise KeyCustodyError(f"cannot create {path}: {exc.strerror}") from None
