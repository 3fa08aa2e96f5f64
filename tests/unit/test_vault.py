"""mfconsole.engine.vault: AES-256-GCM chunked blobs and the store key file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from harness import CANARY_NAME
from mfconsole.engine import vault as vault_mod
from mfconsole.engine.vault import (
    CHUNK,
    HEADER,
    KEY_BYTES,
    TAG,
    Vault,
    VaultError,
    key_id_of,
    load_or_create_key,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))


def payload(size: int) -> bytes:
    # Non-repeating content so a swapped or replayed chunk cannot decrypt to the same text.
    block = os.urandom(4096)
    return (block * (size // 4096 + 1))[:size] if size else b""


def seal(tmp_path: Path, data: bytes, keys: list[bytes] = [KEY_A], name: str = "blob") -> Path:
    path = tmp_path / name
    Vault(keys).seal_to_file(data, path)
    return path


def chunk_spans(blob: bytes, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """(start, end) of each sealed chunk in ``blob``."""
    spans, pos = [], HEADER.size
    while pos < len(blob):
        end = min(pos + chunk + TAG, len(blob))
        spans.append((pos, end))
        pos = end
    return spans


# -- round trips -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_round_trip(tmp_path, size):
    data = payload(size)
    v = Vault([KEY_A])
    path = tmp_path / "blob"
    result = v.seal_to_file(data, path)
    assert result.size == size
    assert result.key_id == key_id_of(KEY_A).hex() == v.key_id
    import hashlib
    import hmac
    # Keyed: no plain SHA-256 of the plaintext is stored (it would confirm guesses).
    assert result.digest != hashlib.sha256(data).hexdigest()
    assert result.digest == v.digest(data)
    assert result.digests == ((v.key_id, result.digest),)
    assert result.digest != Vault([KEY_B]).digest(data)
    assert len(result.digest) == 64 and hmac.compare_digest(result.digest, v.digest(data))
    assert v.open_bytes(path) == data
    chunks = list(v.open_chunks(path))
    assert all(len(c) <= CHUNK for c in chunks)
    assert b"".join(chunks) == data
    # Every chunk costs exactly one tag: the blob is header + data + tags, no more.
    n_chunks = max(1, -(-size // CHUNK))
    assert path.stat().st_size == HEADER.size + size + n_chunks * TAG
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_seal_accepts_memoryview_and_refuses_to_overwrite(tmp_path):
    data = payload(CHUNK + 7)
    v = Vault([KEY_A])
    path = tmp_path / "blob"
    v.seal_to_file(memoryview(bytearray(data)), path)
    assert v.open_bytes(path) == data
    with pytest.raises(FileExistsError):
        v.seal_to_file(b"other", path)
    assert v.open_bytes(path) == data


def test_no_plaintext_in_blob(tmp_path):
    canary = CANARY_NAME.encode()
    data = b"\x10\x00\x10\x00PN\x0c\x00" + canary + payload(CHUNK) + canary * 50
    blob = seal(tmp_path, data).read_bytes()
    assert canary not in blob
    assert canary[:6] not in blob


# -- tampering ---------------------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch):
    """A tiny chunk size so every byte of a multi-chunk blob can be flipped quickly."""
    monkeypatch.setattr(vault_mod, "CHUNK", 64)
    return 64


@pytest.mark.parametrize("size", [0, 1, 64, 3 * 64 + 5])
def test_flipping_any_byte_fails(tmp_path, small_chunks, size):
    path = seal(tmp_path, payload(size))
    original = path.read_bytes()
    v = Vault([KEY_A])
    for i in range(len(original)):
        tampered = bytearray(original)
        tampered[i] ^= 0x01
        path.write_bytes(bytes(tampered))
        with pytest.raises(VaultError):
            v.open_bytes(path)
    path.write_bytes(original)
    assert len(v.open_bytes(path)) == size


def test_tamper_real_chunk_size(tmp_path):
    data = payload(3 * CHUNK + 5)
    path = seal(tmp_path, data)
    original = path.read_bytes()
    v = Vault([KEY_A])
    positions = set(range(HEADER.size + 2))
    for start, end in chunk_spans(original):
        positions |= {start, start + 1, (start + end) // 2, end - TAG - 1, end - TAG, end - 1}
    for i in sorted(p for p in positions if 0 <= p < len(original)):
        tampered = bytearray(original)
        tampered[i] ^= 0x80
        path.write_bytes(bytes(tampered))
        with pytest.raises(VaultError):
            v.open_bytes(path)


@pytest.mark.parametrize("size", [CHUNK, 2 * CHUNK, 3 * CHUNK + 5])
def test_dropping_the_last_chunk_fails(tmp_path, size):
    path = seal(tmp_path, payload(size))
    blob = path.read_bytes()
    start, _ = chunk_spans(blob)[-1]
    path.write_bytes(blob[:start])
    with pytest.raises(VaultError):
        Vault([KEY_A]).open_bytes(path)


@pytest.mark.parametrize("cut", ["header", "mid_header", "empty", "mid_first", "mid_last",
                                 "tag_of_last", "one_byte"])
def test_truncation_fails(tmp_path, cut):
    path = seal(tmp_path, payload(3 * CHUNK + 5))
    blob = path.read_bytes()
    spans = chunk_spans(blob)
    length = {
        "header": HEADER.size,
        "mid_header": HEADER.size // 2,
        "empty": 0,
        "mid_first": HEADER.size + CHUNK // 2,
        "mid_last": spans[-1][0] + 3,
        "tag_of_last": len(blob) - TAG // 2,
        "one_byte": len(blob) - 1,
    }[cut]
    path.write_bytes(blob[:length])
    with pytest.raises(VaultError):
        Vault([KEY_A]).open_bytes(path)


def test_appended_bytes_fail(tmp_path):
    for size in (5, CHUNK):
        path = seal(tmp_path, payload(size), name=f"blob{size}")
        path.write_bytes(path.read_bytes() + b"\x00" * (TAG + 1))
        with pytest.raises(VaultError):
            Vault([KEY_A]).open_bytes(path)


def test_swapping_chunks_fails(tmp_path):
    path = seal(tmp_path, payload(3 * CHUNK + 5))
    blob = path.read_bytes()
    (a0, a1), (b0, b1) = chunk_spans(blob)[:2]
    swapped = blob[:a0] + blob[b0:b1] + blob[a0:a1] + blob[b1:]
    assert len(swapped) == len(blob)
    path.write_bytes(swapped)
    with pytest.raises(VaultError):
        Vault([KEY_A]).open_bytes(path)


def test_chunks_from_another_blob_fail(tmp_path):
    data = payload(2 * CHUNK + 1)
    one = seal(tmp_path, data, name="one").read_bytes()
    two_path = seal(tmp_path, data, name="two")
    two = two_path.read_bytes()
    start, end = chunk_spans(two)[1]
    two_path.write_bytes(two[:start] + one[start:end] + two[end:])
    with pytest.raises(VaultError):
        Vault([KEY_A]).open_bytes(two_path)


def test_foreign_file_and_absurd_chunk_size(tmp_path):
    path = tmp_path / "foreign"
    path.write_bytes(b"DICM" + b"\x00" * 100)
    with pytest.raises(VaultError, match="not a mfconsole blob"):
        Vault([KEY_A]).open_bytes(path)
    blob = seal(tmp_path, b"x").read_bytes()
    magic, kid, _, prefix = HEADER.unpack(blob[:HEADER.size])
    path.write_bytes(HEADER.pack(magic, kid, 0xFFFFFFFF, prefix) + blob[HEADER.size:])
    with pytest.raises(VaultError):
        Vault([KEY_A]).open_bytes(path)


# -- keys and rotation --------------------------------------------------------------


def test_rotation(tmp_path):
    data = CANARY_NAME.encode() + payload(CHUNK + 3)
    path = seal(tmp_path, data, keys=[KEY_A])
    rotated = Vault([KEY_B, KEY_A])
    assert rotated.open_bytes(path) == data
    assert rotated.key_id == key_id_of(KEY_B).hex()
    new = tmp_path / "new"
    assert rotated.seal_to_file(data, new).key_id == key_id_of(KEY_B).hex()
    assert Vault([KEY_B]).open_bytes(new) == data

    with pytest.raises(VaultError) as info:
        Vault([KEY_B]).open_bytes(path)
    message = str(info.value)
    assert key_id_of(KEY_A).hex() in message
    assert "not loaded" in message
    assert CANARY_NAME not in message
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_authentication_error_carries_no_data(tmp_path):
    data = CANARY_NAME.encode() * 10
    path = seal(tmp_path, data)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(VaultError) as info:
        Vault([KEY_A]).open_bytes(path)
    assert CANARY_NAME not in str(info.value)
    assert "authentication" in str(info.value)


def test_vault_refuses_no_key_or_wrong_key_size():
    with pytest.raises(VaultError):
        Vault([])
    with pytest.raises(VaultError, match="32"):
        Vault([b"k" * 16])


def test_key_file_created_private(tmp_path):
    path = tmp_path / "var" / "keys" / "store.key"
    key = load_or_create_key(path)
    assert len(key) == KEY_BYTES
    assert path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["store.key"]  # no temp left
    # Later starts read the same key.
    assert load_or_create_key(path) == key
    assert load_or_create_key(tmp_path / "other" / "store.key") != key


def test_key_file_created_private_under_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        path = tmp_path / "keys" / "store.key"
        load_or_create_key(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620])
def test_key_file_readable_by_others_refused(tmp_path, mode):
    path = tmp_path / "keys" / "store.key"
    load_or_create_key(path)
    os.chmod(path, mode)
    with pytest.raises(VaultError) as info:
        load_or_create_key(path)
    assert "chmod 600" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_file_wrong_size_refused(tmp_path, size):
    path = tmp_path / "keys" / "store.key"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"k" * size)
    os.chmod(path, 0o600)
    with pytest.raises(VaultError) as info:
        load_or_create_key(path)
    assert "32" in str(info.value)
    # The existing file is never replaced by a fresh key (old blobs would be lost).
    assert path.read_bytes() == b"k" * size


def test_a_vault_with_previous_keys_digests_under_each(tmp_path):
    data = payload(1000)
    rotated = Vault([KEY_B, KEY_A])
    _, result = rotated.seal_bytes(data)
    assert result.key_id == key_id_of(KEY_B).hex()
    assert dict(result.digests) == {key_id_of(KEY_B).hex(): Vault([KEY_B]).digest(data),
                                    key_id_of(KEY_A).hex(): Vault([KEY_A]).digest(data)}
    assert rotated.key_ids == [key_id_of(KEY_B).hex(), key_id_of(KEY_A).hex()]


@pytest.mark.parametrize("size", [0, 5, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 7])
def test_a_blob_sealed_in_pieces_opens_to_the_same_bytes(tmp_path, size):
    # Streaming ingest seals as fragments arrive (Vault.sealer): whatever the pieces,
    # the blob opens to the bytes, with the digest of a whole-object seal, and a size
    # that is a multiple of the chunk ends with a full last chunk as a one-shot seal does.
    import random

    data = payload(size)
    v = Vault([KEY_A])
    rng = random.Random(size)
    parts: list[bytes] = []
    sealer = v.sealer(parts.append)
    offset = 0
    while offset < size:
        n = rng.choice((1, 100, 65536, CHUNK, 2 * CHUNK + 3))
        sealer.update(memoryview(data)[offset:offset + n])
        offset += n
    result = sealer.finish()
    sealed = b"".join(parts)
    whole, whole_result = v.seal_bytes(data)
    assert v.open_sealed(sealed) == data
    assert (result.size, result.digest) == (whole_result.size, whole_result.digest) == (size, v.digest(data))
    assert len(sealed) == len(whole)   # same chunking, so the same length
