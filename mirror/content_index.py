"""The target's persistent content index: BLAKE3 prefix of a 4 KiB block -> where a replica of this
data directory holds it (the source volume uuid the replica mirrors, and the block number).

One SQLite database per data directory (``.vdisk-content-index.sqlite``, WAL), shared by every
replica, so a clone mirrored into a new replica finds the blocks of the template replicated before.
It is a hint, never trusted: a reference is checked against the BLAKE3 of the bytes read before
they are copied (reduce.resolve). Kept true as replicas change: every block a dedup session writes
is indexed (a location holds one digest, a digest one location), zeroed or trimmed ranges and
references found stale are removed, and a session that does not maintain the index (no dedup
negotiated) drops its replica's entries first. A crash loses at most the last updates (they are
rebuilt as blocks are written again); a damaged database is moved aside and started afresh.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .reduce import _ZERO_BLOCK, BLOCK, digest
from .wire.codec import DEDUP_ENTRY, DEDUP_PREFIX
from .wire.events import Flush, Write, Zero

log = logging.getLogger("vdisk.target")
INDEX_FILE = ".vdisk-content-index.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (h BLOB PRIMARY KEY, vol BLOB NOT NULL, blk INTEGER NOT NULL) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS blocks_at ON blocks (vol, blk);
"""


class ContentIndex:
    """Thread-safe (one connection behind a lock); every method may block: call from worker threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as e:
            aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
            log.warning("content index %s is damaged (%s): moved to %s, starting afresh", path, e, aside)
            path.rename(aside)
            for suffix in ("-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a hint: losing the last updates in a crash is fine
            db.executescript(_SCHEMA)
            db.execute("PRAGMA quick_check(1)").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM blocks").fetchone()[0])

    def update(self, vol: bytes, batch: Sequence[Write | Zero | Flush]) -> None:
        """Record what a batch applied to the replica of ``vol`` (in order)."""
        puts: list[tuple[bytes, bytes, int]] = []
        dels: list[tuple[bytes, int, int]] = []
        for ev in batch:
            t = type(ev)
            if t is Write:
                off, data = ev.offset, memoryview(ev.data)  # type: ignore[union-attr]
                n = len(data)
                if not n:
                    continue
                first, last = off // BLOCK, (off + n - 1) // BLOCK
                dels.append((vol, first, last))  # partial blocks too: they no longer hold what was indexed
                pos = (-off) % BLOCK
                while pos + BLOCK <= n:
                    blk = data[pos:pos + BLOCK]
                    if blk != _ZERO_BLOCK:
                        puts.append((digest(blk)[:DEDUP_PREFIX], vol, (off + pos) // BLOCK))
                    pos += BLOCK
            elif t is Zero and ev.length:  # type: ignore[union-attr]
                dels.append((vol, ev.offset // BLOCK, (ev.offset + ev.length - 1) // BLOCK))  # type: ignore[union-attr]
        if not puts and not dels:
            return
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            try:
                db.executemany("DELETE FROM blocks WHERE vol = ? AND blk BETWEEN ? AND ?", dels)
                # REPLACE: the digest's older location and the location's older digest both go.
                db.executemany("INSERT OR REPLACE INTO blocks (h, vol, blk) VALUES (?, ?, ?)", puts)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def lookup(self, prefixes: bytes) -> bytes:
        """One 25-byte entry per 16-byte prefix: found, volume uuid, offset (a DedupReply)."""
        out = bytearray(DEDUP_ENTRY * (len(prefixes) // DEDUP_PREFIX))
        with self._lock:
            cur = self._db.cursor()
            for i in range(len(prefixes) // DEDUP_PREFIX):
                row = cur.execute("SELECT vol, blk FROM blocks WHERE h = ?",
                                  (prefixes[i * DEDUP_PREFIX:(i + 1) * DEDUP_PREFIX],)).fetchone()
                if row is not None and len(row[0]) == 16:
                    e = i * DEDUP_ENTRY
                    out[e] = 1
                    out[e + 1:e + 17] = row[0]
                    out[e + 17:e + 25] = (row[1] * BLOCK).to_bytes(8, "big")
        return bytes(out)

    def forget(self, vol: bytes, offset: int, length: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM blocks WHERE vol = ? AND blk BETWEEN ? AND ?",
                             (vol, offset // BLOCK, (offset + max(length, 1) - 1) // BLOCK))

    def drop(self, vol: bytes) -> None:
        """Forget every block of one replica (it is written by a session that does not index)."""
        with self._lock:
            self._db.execute("DELETE FROM blocks WHERE vol = ?", (vol,))
