"""Encryption at rest: AES-256-GCM blobs, sealed in chunks.

Blob layout (all integers big endian)::

    magic "MFV1" | key id (8 bytes) | chunk size (u32) | salt (16 bytes)
    chunk 0 ciphertext+tag | chunk 1 ... | last chunk (may be empty)

Every blob is sealed under its own key, HKDF-SHA256(store key, salt): with a fresh
random 128-bit salt per blob, a GCM nonce is never reused under one key however many
blobs a store key seals (random 96-bit nonces under one key would cap it at a few
billion invocations; 64-bit ones at about 90 000 blobs). Chunk n uses nonce = n and
associated data = header || n || last-flag, so chunks cannot be reordered, dropped or
the blob truncated without the tag failing. Chunking keeps memory to one chunk beyond
the object the association already holds and lets 200 MiB objects stream to disk.
The key id (first 8 bytes of SHA-256 of the store key) lets keys rotate: a blob names
the key that sealed it.

The digest that detects duplicates is keyed (HMAC-SHA256 under a key derived from the
store key): an unkeyed hash of a small object whose unknown fields are low-entropy PHI
would confirm guesses. A digest is meaningful only with its key id; while several keys
are loaded every seal computes one per key, so a duplicate is recognised across a
rotation.

A sealed blob is the same bytes whether it is a file (large objects) or a value in
the database (small ones); see store.py.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"MFV1"
HEADER = struct.Struct(">4s8sI16s")
NONCE = struct.Struct(">8xI")       # 96-bit nonce: the chunk counter
HKDF_INFO = b"mfconsole blob key v1"
DIGEST_INFO = b"mfconsole digest key v1"
# Search tokens: keyed hashes of patient identifiers (accession number, patient ID)
# that let an operator find objects by them while the values stay only in the sealed
# blob. A key of their own, so a token reveals nothing about digests or blobs.
SEARCH_INFO = b"mfconsole search token v1"
# Patient identifiers in exported audit messages ([audit_export] patient_id_hash): a key
# of their own, so an ARR's pseudonyms cannot be matched against search tokens.
AUDIT_INFO = b"mfconsole audit pseudonym v1"
CHUNK = 1024 * 1024
TAG = 16
KEY_BYTES = 32
# A header is authenticated only when its first chunk is; bound the chunk size it
# claims before reading that many bytes from a tampered or foreign file.
MAX_CHUNK = 64 * 1024 * 1024


class VaultError(Exception):
    """Key or blob problem; messages never contain object data."""


@dataclass(frozen=True)
class SealResult:
    size: int          # plaintext bytes
    digest: str        # HMAC-SHA256 of the plaintext under the sealing key's digest key, hex
    key_id: str
    digests: tuple[tuple[str, str], ...] = ()   # (key id, digest) under every loaded key


def load_or_create_key(path: Path) -> bytes:
    """Read the store key, creating it first if there is none. Only for a store that
    holds nothing (see engine start: keys are never made for a store with objects)."""
    if not path.exists() and not path.is_symlink():
        create_key(path)
    return load_key(path)


def create_key(path: Path) -> bytes:
    """32 random bytes (mode 0600, folder 0700). The key is written to a temporary file
    and linked into place, so a crash never leaves an empty or short key file behind,
    and an existing key is never replaced (VaultError)."""
    parent = path.parent
    if not parent.is_dir():
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(parent, 0o700)  # mkdir's mode is filtered by the umask
        _fsync_dir(parent.parent)
    if path.exists() or path.is_symlink():
        raise VaultError(f"key file {path} already exists; a key is never overwritten")
    _create_key(path)
    return load_key(path)


def load_key(path: Path) -> bytes:
    """Read a store key file (regular, not readable by group or others, 32 bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise VaultError(f"key file {path} is missing") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise VaultError(f"key file {path} is not a regular file")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise VaultError(f"key file {path} is accessible by group or others "
                             f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}")
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise VaultError(f"key file {path} holds {'more than ' if len(key) > KEY_BYTES else ''}"
                         f"{min(len(key), KEY_BYTES)} bytes; an AES-256 key is {KEY_BYTES}. "
                         "Restore it from backup (a new key cannot read old blobs)")
    return key


def _create_key(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        key = os.urandom(KEY_BYTES)
        written = 0
        while written < KEY_BYTES:
            written += os.write(fd, key[written:])
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            os.link(tmp, path)  # atomic and never replaces a key another process made
        except FileExistsError:
            pass
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def key_id_of(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:8]


class Vault:
    """Seals and opens blobs. Thread-safe: AESGCM objects are stateless."""

    def __init__(self, keys: list[bytes]):
        if not keys:
            raise VaultError("no key")
        for key in keys:
            if len(key) != KEY_BYTES:
                raise VaultError(f"a store key is {len(key)} bytes; AES-256 needs {KEY_BYTES}")
        # The first key seals; every key can open what it sealed.
        self._active = key_id_of(keys[0])
        self._keys = {key_id_of(k): k for k in keys}
        self._digest_keys = {kid.hex(): HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                                             info=DIGEST_INFO).derive(k)
                             for kid, k in self._keys.items()}
        self._search_keys = {kid.hex(): HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                                             info=SEARCH_INFO).derive(k)
                             for kid, k in self._keys.items()}
        self._audit_key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                               info=AUDIT_INFO).derive(self._keys[self._active])

    @property
    def key_id(self) -> str:
        return self._active.hex()

    @property
    def key_ids(self) -> list[str]:
        """Every loaded key id, the sealing one first."""
        return [self.key_id] + [k.hex() for k in self._keys if k != self._active]

    def digest(self, data: memoryview | bytes, key_id: str | None = None) -> str:
        """The keyed digest of ``data`` under ``key_id`` (default: the sealing key)."""
        return hmac.new(self._digest_keys[key_id or self.key_id], data, hashlib.sha256).hexdigest()

    def search_token(self, kind: str, value: bytes | str, key_id: str | None = None) -> str:
        """The keyed hash of an identifier (``kind``: "accession" or "patient_id")
        under ``key_id`` (default: the sealing key). Padding and letter case do not
        matter: ``acc 123`` typed by an operator finds ``ACC 123`` as sent."""
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        message = kind.encode() + b"\0" + raw.strip(b"\x00 ").upper()
        return hmac.new(self._search_keys[key_id or self.key_id], message, hashlib.sha256).hexdigest()[:32]

    def audit_pseudonym(self, value: bytes | str) -> str:
        """HMAC-SHA256 (hex) of a patient identifier under a key derived from the
        sealing key: the same patient has the same pseudonym in every exported audit
        message until the store key is rotated. Padding does not matter."""
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        return hmac.new(self._audit_key, raw.strip(b"\x00 "), hashlib.sha256).hexdigest()

    def search_tokens(self, kind: str, value: bytes | str) -> list[str]:
        """The tokens of an identifier under every loaded key: objects stored before a
        key rotation carry tokens of the key that sealed them."""
        return [self.search_token(kind, value, kid) for kid in self.key_ids]

    def seal_to_file(self, data: memoryview | bytes, path: Path) -> SealResult:
        """Encrypt ``data`` to ``path`` and fsync the file (not its directory: the
        caller fsyncs directories once per group commit)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as out:
                result = self._seal(data, out.write)
                out.flush()
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return result

    def seal_bytes(self, data: memoryview | bytes) -> tuple[bytes, SealResult]:
        """Encrypt ``data`` into a blob held in memory (small objects, stored in the
        database by the caller)."""
        parts: list[bytes] = []
        result = self._seal(data, parts.append)
        return b"".join(parts), result

    def _seal(self, data: memoryview | bytes, write: Callable[[bytes], object]) -> SealResult:
        sealer = self.sealer(write)
        sealer.update(data)
        return sealer.finish()

    def sealer(self, write: Callable[[bytes], object]) -> "Sealer":
        """A blob sealed as its plaintext arrives in pieces (streaming ingest)."""
        return Sealer(self, write)

    @staticmethod
    def _blob_key(store_key: bytes, salt: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt,
                    info=HKDF_INFO).derive(store_key)

    def open_chunks(self, path: Path) -> Iterator[bytes]:
        """Yield the plaintext of ``path`` chunk by chunk, authenticating each."""
        with open(path, "rb") as src:
            yield from self._open_stream(src, str(path), os.fstat(src.fileno()).st_size)

    def open_bytes(self, path: Path) -> bytes:
        return b"".join(self.open_chunks(path))

    def open_sealed(self, sealed: bytes, label: str = "inline blob") -> bytes:
        """Plaintext of a blob held in memory (see seal_bytes)."""
        return b"".join(self._open_stream(io.BytesIO(sealed), label, len(sealed)))

    def _open_stream(self, src: BinaryIO, label: str, size: int) -> Iterator[bytes]:
        """``size``: the blob's length. Each read asks for no more than is left: a
        read of a whole chunk (1 MiB) for a smaller last chunk would allocate fresh
        memory, page-faulted in, for every object (most objects are one short chunk)."""
        left = size - HEADER.size
        header = src.read(HEADER.size)
        if len(header) != HEADER.size:
            raise VaultError(f"blob {label} is truncated")
        magic, key_id, chunk_size, salt = HEADER.unpack(header)
        if magic != MAGIC:
            raise VaultError(f"blob {label} is not a mfconsole blob")
        if not 0 < chunk_size <= MAX_CHUNK:
            raise VaultError(f"blob {label} has a corrupt header (chunk size {chunk_size})")
        store_key = self._keys.get(key_id)
        if store_key is None:
            raise VaultError(f"blob {label} was sealed with key {key_id.hex()}, which is not loaded")
        cipher = AESGCM(self._blob_key(store_key, salt))
        counter = 0

        def read() -> bytes:
            nonlocal left
            got = src.read(max(0, min(chunk_size + TAG, left)))
            left -= len(got)
            return got

        pending = read()
        while True:
            following = read() if len(pending) == chunk_size + TAG else b""
            last = not following
            try:
                yield cipher.decrypt(NONCE.pack(counter), pending,
                                     header + struct.pack(">I?", counter, last))
            except Exception:
                raise VaultError(f"blob {label} failed authentication at chunk {counter}") from None
            if last:
                return
            pending = following
            counter += 1


class Sealer:
    """Seals one blob whose plaintext arrives in pieces, writing each chunk as soon as
    it is known not to be the last: at most one chunk of plaintext is held. The blob is
    byte-for-byte the format above (a blob whose size is a multiple of the chunk size
    ends with a full last chunk, not an empty one)."""

    def __init__(self, vault: Vault, write: Callable[[bytes], object]):
        salt = os.urandom(16)
        self._header = HEADER.pack(MAGIC, vault._active, CHUNK, salt)
        self._cipher = AESGCM(vault._blob_key(vault._keys[vault._active], salt))
        self._digests = {kid: hmac.new(k, digestmod=hashlib.sha256)
                         for kid, k in vault._digest_keys.items()}
        self._key_id = vault.key_id
        self._write = write
        self._pending = bytearray()   # plaintext of the chunk not yet sealed
        self._counter = 0
        self.size = 0
        write(self._header)

    def update(self, data: memoryview | bytes) -> None:
        with memoryview(data) as raw, raw.cast("B") as view:
            self.size += len(view)
            offset, total = 0, len(view)
            while offset < total:
                if len(self._pending) == CHUNK:   # more follows it: not the last chunk
                    self._chunk(self._pending, last=False)
                    self._pending = bytearray()
                if not self._pending and total - offset > CHUNK:
                    self._chunk(view[offset:offset + CHUNK], last=False)   # no copy
                    offset += CHUNK
                    continue
                take = min(CHUNK - len(self._pending), total - offset)
                self._pending += view[offset:offset + take]
                offset += take

    def finish(self) -> SealResult:
        self._chunk(self._pending, last=True)
        self._pending = bytearray()
        done = tuple((kid, d.hexdigest()) for kid, d in self._digests.items())
        return SealResult(size=self.size, digest=dict(done)[self._key_id], key_id=self._key_id,
                          digests=done)

    def _chunk(self, plain: memoryview | bytearray, last: bool) -> None:
        for digest in self._digests.values():
            digest.update(plain)
        aad = self._header + struct.pack(">I?", self._counter, last)
        self._write(self._cipher.encrypt(NONCE.pack(self._counter), plain, aad))
        self._counter += 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = _fsync_dir
