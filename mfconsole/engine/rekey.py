"""Re-seal every stored object under the current store key (``mfconsole rekey``).

After a rotation (a new ``[store].key_file``, the old one listed in
``previous_key_files``) new objects are sealed with the new key, and the old key is
still needed for everything stored before. Rekeying opens each of those with its old
key and seals it again with the new one, in small batches: blobs are sealed outside
any transaction, then one short transaction swaps the rows (only where the row still
points at the blob that was read, so a concurrent purge or a second rekey never loses
anything), and the old blob files are removed after the commit. It runs while the
engine serves (SQLite serialises the two writers; the engine's reader retries a blob
that moved under it), it can be stopped at any point and resumed, and it is audited.
Once ``status`` shows no object under an old key id, that key file can be retired.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from mfconsole.repository import Reads, connect, migrate, transaction
from mfconsole.repository.states import INLINE
from mfconsole.engine.vault import Vault, VaultError, fsync_dir

log = logging.getLogger("mfconsole.rekey")

BATCH = 100


def remaining(reads: Reads, key_id: str) -> int:
    return reads.not_sealed_with(key_id)


def rekey(db_path: Path, blob_root: Path, vault: Vault, *, batch: int = BATCH,
          progress: Callable[[int, int], None] | None = None,
          stop: threading.Event | None = None, actor: str = "operator") -> tuple[int, int]:
    """Re-seal objects not under ``vault``'s sealing key. Returns (re-sealed, failed):
    an object that cannot be opened (its key is not loaded, or the blob is damaged) is
    left as it is and counted, never lost."""
    conn = connect(db_path)
    migrate(conn)      # a data directory no engine of this version opened yet
    target = vault.key_id
    done = failed = 0
    cursor = 0
    try:
        reads = Reads(conn)
        total = remaining(reads, target)
        if total:
            _audit(conn, "rekey_started", f"by {actor}: {total} object(s) to re-seal under key {target}")
        while stop is None or not stop.is_set():
            rows = reads.to_reseal(target, cursor, batch)
            if not rows:
                break
            cursor = rows[-1]["id"]
            resealed = []
            for row in rows:
                try:
                    if row["blob"] == INLINE:
                        plain = vault.open_sealed(row["sealed"], f"of object {row['id']}")
                        sealed, result = vault.seal_bytes(plain)
                        resealed.append((row, INLINE, sealed, result))
                    else:
                        plain = vault.open_bytes(blob_root / row["blob"])
                        rel = f"{time.strftime('%Y%m%d%H', time.gmtime())}/{uuid.uuid4().hex}.blob"
                        (blob_root / rel).parent.mkdir(exist_ok=True, mode=0o700)
                        result = vault.seal_to_file(plain, blob_root / rel)
                        resealed.append((row, rel, None, result))
                except (VaultError, OSError) as exc:
                    failed += 1
                    log.error("rekey: object %d cannot be opened (%s); left as it is",
                              row["id"], exc.__class__.__name__)
            for folder in {(blob_root / rel).parent for _, rel, _, _ in resealed if rel != INLINE}:
                fsync_dir(folder)
            old_files, stale = _swap(conn, resealed)
            for rel in old_files + stale:
                (blob_root / rel).unlink(missing_ok=True)
            done += len(resealed) - len(stale)
            if progress is not None:
                progress(done, total)
        if done or failed:
            _audit(conn, "rekeyed", f"by {actor}: {done} object(s) re-sealed under key {target}"
                                    + (f"; {failed} could not be opened" if failed else ""))
    finally:
        conn.close()
    return done, failed


def _swap(conn, resealed: list) -> tuple[list[str], list[str]]:
    """One transaction: point each row at its new blob, where it still points at the
    one that was read. Returns (old blob files to remove, new ones that lost a race).
    A rollback leaves new blob files behind: they are quarantined at the next start."""
    old_files: list[str] = []
    stale: list[str] = []
    with transaction(conn) as tx:
        for row, rel, sealed, result in resealed:
            if not tx.reseal(row["id"], row["blob"], row["key_id"], rel, result.key_id,
                             result.digest, sealed):
                if rel != INLINE:
                    stale.append(rel)
            elif rel != INLINE:
                old_files.append(row["blob"])
    return old_files, stale


def _audit(conn, event: str, detail: str) -> None:
    with transaction(conn) as tx:
        tx.audit(event, detail=detail)
