"""An on-disk store of compressed prefix caches, keyed by the model and the prefix's token ids.

Layout: `root/<n>/<key>.kvp`, one directory per stored prefix length n, key = blake2b-256 of (model
identity, token ids). Looking up a prompt hashes it once, taking the digest at each stored length,
and tries the longest first, so a hit costs one file read however many entries there are.

Safe to share between processes without locks:
- a writer writes a temporary file in the entry's directory, fsyncs it and `os.replace`s it in, so
  readers see the old entry or the new one, never half of one; racing writers of one key each leave
  a whole entry;
- every entry carries its length and a checksum: a file that is short or damaged anyway (a crash
  before the data reached the disk) is deleted and never returned;
- a killed writer's temporary file is never read, and is deleted once it is older than `STALE_SECONDS`;
- eviction (least recently used first, by modification time, which a hit refreshes) tolerates entries
  vanishing under it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
import time
from pathlib import Path

import numpy as np

from ..errors import KVShrinkError
from .codec import checksum

SUFFIX, TEMP_SUFFIX = ".kvp", ".tmp"
STALE_SECONDS = 600  # a temporary file this old has lost its writer
_MAGIC = b"KVPS"
_FRAME = struct.Struct("<4sI16s")  # magic, prefix length, blake2b-128 of the payload


class PrefixStore:
    """`put(token_ids, blob)` and `longest_prefix(token_ids) -> (n, blob) | None` under `root`, holding at
    most `max_bytes` (entries are dropped least recently used first).

    model_identity: anything whose `str` names what the blobs depend on (a `ModelIdentity`, or a string
    that adds e.g. the calibration); stores for different models can share a root."""

    def __init__(self, root, model_identity, max_bytes: int):
        if max_bytes <= 0:
            raise KVShrinkError(f"prefix store size must be > 0 bytes (got {max_bytes})")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._identity = hashlib.blake2b(str(model_identity).encode(), digest_size=16).digest()

    def put(self, token_ids, blob: bytes) -> bool:
        """Store `blob` for this exact prefix (replacing any entry); False if it exceeds the whole store."""
        tokens = _tokens(token_ids)
        if len(tokens) == 0:
            raise KVShrinkError("cannot store an empty prefix")
        data = _FRAME.pack(_MAGIC, len(tokens), checksum(blob)) + blob
        if len(data) > self.max_bytes:
            return False
        folder = self.root / str(len(tokens))
        folder.mkdir(exist_ok=True)
        path = folder / (self._key(tokens) + SUFFIX)
        tmp = folder / f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(folder)  # the rename itself survives a crash
        self._evict()
        return True

    def longest_prefix(self, token_ids) -> tuple[int, bytes] | None:
        """The longest stored prefix of `token_ids` (n >= 1 tokens) and its blob, or None."""
        tokens = _tokens(token_ids)
        lengths = sorted(n for n in self._lengths() if n <= len(tokens))
        digest, done, keys = self._hasher(), 0, {}
        for n in lengths:  # one pass over the tokens, a digest at each stored length
            digest.update(tokens[done:n].tobytes())
            done, keys[n] = n, digest.copy().hexdigest()
        for n in reversed(lengths):
            blob = self._read(self.root / str(n) / (keys[n] + SUFFIX), n)
            if blob is not None:
                return n, blob
        return None

    def remove(self, token_ids) -> None:
        tokens = _tokens(token_ids)
        (self.root / str(len(tokens)) / (self._key(tokens) + SUFFIX)).unlink(missing_ok=True)

    def entries(self) -> list[tuple[Path, os.stat_result]]:
        """Complete entries and their stats (temporary files left out)."""
        return [(path, st) for path, st in self._files() if path.suffix == SUFFIX]

    # -- internals -------------------------------------------------------------------------------------------
    def _hasher(self):
        h = hashlib.blake2b(digest_size=32)
        h.update(self._identity)
        return h

    def _key(self, tokens: np.ndarray) -> str:
        h = self._hasher()
        h.update(tokens.tobytes())
        return h.hexdigest()

    def _lengths(self) -> list[int]:
        return [int(e.name) for e in os.scandir(self.root) if e.name.isdigit() and e.is_dir()]

    def _files(self):
        """(path, stat) of every file in the store; files vanishing meanwhile (evicted elsewhere) are skipped."""
        for n in self._lengths():
            with os.scandir(self.root / str(n)) as it:
                for entry in it:
                    try:
                        yield Path(entry.path), entry.stat()
                    except FileNotFoundError:
                        pass

    def _read(self, path: Path, n: int) -> bytes | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        head = data[:_FRAME.size]
        blob = data[_FRAME.size:]
        if len(head) < _FRAME.size or _FRAME.unpack(head) != (_MAGIC, n, checksum(blob)):
            path.unlink(missing_ok=True)  # damaged: a miss now and from now on
            return None
        try:
            os.utime(path)  # recently used
        except FileNotFoundError:
            pass
        return blob

    def _evict(self) -> None:
        """Delete stale temporary files, then the least recently used entries down to `max_bytes`."""
        now = time.time()
        for path, st in self._files():
            if path.suffix == TEMP_SUFFIX and now - st.st_mtime > STALE_SECONDS:
                path.unlink(missing_ok=True)
        entries = sorted(self.entries(), key=lambda e: e[1].st_mtime_ns)
        total = sum(st.st_size for _, st in entries)
        for path, st in entries:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= st.st_size


def _tokens(token_ids) -> np.ndarray:
    return np.asarray(token_ids, dtype="<i8").reshape(-1)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
