"""Durable queue of verified readings waiting for the ledger (SQLite, WAL).

A reading is committed here before its MQTT message is acknowledged, and
leaves only when the ledger has answered for it: `acknowledge` for stored or
duplicate (the ledger has it either way), `reject` moves it to
`ledger_rejected` with the ledger's reason, so nothing verified is ever simply
dropped. One row per (dev_eui, seq): the same reading cannot be queued twice,
even across restarts.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Iterable

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dev_eui     TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    frame       BLOB    NOT NULL,
    received_at REAL    NOT NULL,
    UNIQUE (dev_eui, seq)
);
CREATE TABLE IF NOT EXISTS ledger_rejected (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dev_eui     TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    frame       BLOB    NOT NULL,
    received_at REAL    NOT NULL,
    reason      TEXT    NOT NULL,
    message     TEXT    NOT NULL,
    rejected_at REAL    NOT NULL
);
"""


@dataclass(frozen=True)
class Pending:
    id: int
    dev_eui: str
    seq: int
    frame: bytes
    received_at: float


class Outbox:
    """Thread-safe: the MQTT worker puts, the forwarder takes, the status
    server counts, all through one connection guarded by a lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        # Autocommit mode; multi-statement changes use explicit transactions.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a reading acknowledged to the broker must survive a power cut,
        # not only a process crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self._db.close()
            raise RuntimeError(f"outbox {self.path} has schema {version}, "
                               f"this gateway knows {SCHEMA_VERSION}")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def put(self, dev_eui: str, seq: int, frame: bytes, received_at: float) -> bool:
        """Queue a reading; False when that (dev_eui, seq) is already queued."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO pending (dev_eui, seq, frame, received_at) "
                "VALUES (?, ?, ?, ?)", (dev_eui, seq, bytes(frame), received_at))
            return cur.rowcount == 1

    def pending(self, limit: int) -> list[Pending]:
        """The oldest queued readings, in arrival order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, dev_eui, seq, frame, received_at FROM pending "
                "ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [Pending(*row) for row in rows]

    def acknowledge(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        if not ids:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM pending WHERE id = ?", [(i,) for i in ids])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def reject(self, item: Pending, reason: str, message: str) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO ledger_rejected (dev_eui, seq, frame, received_at, reason, "
                    "message, rejected_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (item.dev_eui, item.seq, item.frame, item.received_at, reason, message,
                     time.time()))
                self._db.execute("DELETE FROM pending WHERE id = ?", (item.id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def depth(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]

    def rejected(self) -> list[dict]:
        """Readings the ledger refused, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT dev_eui, seq, reason, message, rejected_at FROM ledger_rejected "
                "ORDER BY id").fetchall()
        return [dict(zip(("dev_eui", "seq", "reason", "message", "rejected_at"), r))
                for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
