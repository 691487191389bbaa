"""The gateway's durable state (SQLite, WAL, synchronous=FULL), one file.

  pending          verified bundles waiting for the ledger, one row per bundle
  ledger_rejected  bundles the ledger refused, with its reason
  fragments        pieces of bundles still incomplete, by (dev_eui, tag, count, index)
  accepted         per device, the seqs accepted so far as ranges (gateway.seqs)
  devices          per device, the ChirpStack application and the command counter
  commands         the downlink commands sent (rate limits, audit)

An uplink is committed here before its MQTT message is acknowledged: a
fragment on its own, a bundle together with the ranges it adds and the
removal of the fragments it was joined from, so a crash leaves either all of
that or none. A bundle leaves `pending` only when the ledger has answered for
it: `acknowledge` (the ledger has its readings), or `reject` (moved to
`ledger_rejected`), so nothing verified is ever simply dropped.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

from gateway.seqs import SeqRange, SeqRanges

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dev_eui     TEXT    NOT NULL,
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    bundle      BLOB    NOT NULL,
    received_at REAL    NOT NULL,
    UNIQUE (dev_eui, first_seq, last_seq)
);
CREATE TABLE IF NOT EXISTS ledger_rejected (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dev_eui     TEXT    NOT NULL,
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    bundle      BLOB    NOT NULL,
    received_at REAL    NOT NULL,
    reason      TEXT    NOT NULL,
    message     TEXT    NOT NULL,
    rejected_at REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS fragments (
    dev_eui     TEXT    NOT NULL,
    tag         INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    idx         INTEGER NOT NULL,
    piece       BLOB    NOT NULL,
    received_at REAL    NOT NULL,
    PRIMARY KEY (dev_eui, tag, count, idx)
);
CREATE TABLE IF NOT EXISTS accepted (
    dev_eui     TEXT    NOT NULL,
    lo          INTEGER NOT NULL,
    hi          INTEGER NOT NULL,
    gap_since   REAL    NOT NULL,
    asked       INTEGER NOT NULL,
    PRIMARY KEY (dev_eui, lo)
);
CREATE TABLE IF NOT EXISTS devices (
    dev_eui         TEXT    PRIMARY KEY,
    application_id  TEXT,
    command_counter INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS commands (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dev_eui     TEXT    NOT NULL,
    counter     INTEGER NOT NULL,
    opcode      INTEGER NOT NULL,
    args        TEXT    NOT NULL,
    expires     INTEGER NOT NULL,
    sent_at     REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_by_device ON commands (dev_eui, opcode, sent_at);
"""

# Schema 1 queued single-reading frames of the retired frame format. They
# cannot be decoded any more; they are kept, renamed, for an operator to look
# at, and nothing new is written there.
_FROM_V1 = """
ALTER TABLE pending RENAME TO v1_pending;
ALTER TABLE ledger_rejected RENAME TO v1_ledger_rejected;
"""


@dataclass(frozen=True)
class Pending:
    id: int
    dev_eui: str
    first_seq: int
    last_seq: int
    bundle: bytes
    received_at: float


@dataclass(frozen=True)
class FragmentSet:
    dev_eui: str
    tag: int
    count: int
    pieces: int  # how many pieces were held


class Outbox:
    """Thread-safe: the MQTT worker writes, the forwarder takes, the status
    server counts, all through one connection guarded by a lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        # Autocommit mode; multi-statement changes use explicit transactions.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: an uplink acknowledged to the broker must survive a power cut,
        # not only a process crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self._db.close()
            raise RuntimeError(f"outbox {self.path} has schema {version}, "
                               f"this gateway knows {SCHEMA_VERSION}")
        if version == 1:
            self._db.executescript("BEGIN;" + _FROM_V1 + "COMMIT;")
            left = self._db.execute("SELECT COUNT(*) FROM v1_pending").fetchone()[0]
            if left:
                log.warning("outbox %s: %d readings of the retired single-reading frame format "
                            "were never delivered; kept in table v1_pending", self.path, left)
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # -- bundles -----------------------------------------------------------

    def store_bundle(self, dev_eui: str, bundle: bytes, first_seq: int, last_seq: int,
                     received_at: float, ranges: SeqRanges | None = None,
                     application_id: str | None = None, drop_tag: int | None = None) -> bool:
        """Queue a verified bundle and, in the same transaction, save the
        device's accepted ranges, its application id, and drop the fragment
        sets with tag `drop_tag` (the set it was joined from, or pieces of it
        from an earlier try). False when a bundle with the same seqs was
        already queued (nothing is queued then, the rest is saved)."""
        with self._txn() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO pending (dev_eui, first_seq, last_seq, bundle, received_at) "
                "VALUES (?, ?, ?, ?, ?)", (dev_eui, first_seq, last_seq, bytes(bundle),
                                           received_at))
            queued = cur.rowcount == 1
            if ranges is not None:
                _save_ranges(db, dev_eui, ranges)
            if application_id:
                _save_application(db, dev_eui, application_id)
            if drop_tag is not None:
                db.execute("DELETE FROM fragments WHERE dev_eui = ? AND tag = ?",
                           (dev_eui, drop_tag))
        return queued

    def pending(self, limit: int) -> list[Pending]:
        """The oldest queued bundles, in arrival order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, dev_eui, first_seq, last_seq, bundle, received_at FROM pending "
                "ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [Pending(*row) for row in rows]

    def acknowledge(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        if not ids:
            return
        with self._txn() as db:
            db.executemany("DELETE FROM pending WHERE id = ?", [(i,) for i in ids])

    def reject(self, item: Pending, reason: str, message: str) -> None:
        with self._txn() as db:
            db.execute(
                "INSERT INTO ledger_rejected (dev_eui, first_seq, last_seq, bundle, received_at, "
                "reason, message, rejected_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (item.dev_eui, item.first_seq, item.last_seq, item.bundle, item.received_at,
                 reason, message, time.time()))
            db.execute("DELETE FROM pending WHERE id = ?", (item.id,))

    def depth(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]

    def rejected(self) -> list[dict]:
        """Bundles the ledger refused, oldest first."""
        cols = ("dev_eui", "first_seq", "last_seq", "reason", "message", "rejected_at")
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(cols)} FROM ledger_rejected ORDER BY id").fetchall()
        return [dict(zip(cols, r)) for r in rows]

    # -- fragments ---------------------------------------------------------

    def add_fragment(self, dev_eui: str, tag: int, count: int, index: int, piece: bytes,
                     received_at: float, max_sets: int
                     ) -> tuple[str, dict[int, bytes], list[FragmentSet]]:
        """Keep one piece. Returns (status, the pieces of its set held now,
        sets evicted to stay within max_sets per device). status: "new",
        "same" (this piece was already held), "conflict" (another piece is
        held for this index; the one held stays)."""
        evicted: list[FragmentSet] = []
        with self._txn() as db:
            row = db.execute("SELECT piece FROM fragments WHERE dev_eui = ? AND tag = ? AND "
                             "count = ? AND idx = ?", (dev_eui, tag, count, index)).fetchone()
            if row is None:
                status = "new"
                db.execute("INSERT INTO fragments (dev_eui, tag, count, idx, piece, received_at) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           (dev_eui, tag, count, index, bytes(piece), received_at))
                sets = db.execute(
                    "SELECT tag, count, COUNT(*), MIN(received_at) AS first FROM fragments "
                    "WHERE dev_eui = ? GROUP BY tag, count ORDER BY first, tag",
                    (dev_eui,)).fetchall()
                for s_tag, s_count, n, _ in sets[:max(0, len(sets) - max_sets)]:
                    if (s_tag, s_count) == (tag, count):
                        continue
                    db.execute("DELETE FROM fragments WHERE dev_eui = ? AND tag = ? AND count = ?",
                               (dev_eui, s_tag, s_count))
                    evicted.append(FragmentSet(dev_eui, s_tag, s_count, n))
            else:
                status = "same" if bytes(row[0]) == bytes(piece) else "conflict"
            pieces = dict(db.execute(
                "SELECT idx, piece FROM fragments WHERE dev_eui = ? AND tag = ? AND count = ?",
                (dev_eui, tag, count)).fetchall())
        return status, {i: bytes(p) for i, p in pieces.items()}, evicted

    def drop_fragments(self, dev_eui: str, tag: int, count: int | None = None) -> int:
        """Remove the set (tag, count), or every set with that tag; returns
        how many pieces went."""
        with self._txn() as db:
            if count is None:
                cur = db.execute("DELETE FROM fragments WHERE dev_eui = ? AND tag = ?",
                                 (dev_eui, tag))
            else:
                cur = db.execute("DELETE FROM fragments WHERE dev_eui = ? AND tag = ? AND "
                                 "count = ?", (dev_eui, tag, count))
            return cur.rowcount

    def expire_fragments(self, received_before: float) -> list[FragmentSet]:
        """Remove the sets whose first piece came before `received_before`."""
        with self._txn() as db:
            stale = db.execute(
                "SELECT dev_eui, tag, count, COUNT(*) FROM fragments GROUP BY dev_eui, tag, count "
                "HAVING MIN(received_at) < ?", (received_before,)).fetchall()
            db.executemany("DELETE FROM fragments WHERE dev_eui = ? AND tag = ? AND count = ?",
                           [s[:3] for s in stale])
        return [FragmentSet(*s) for s in stale]

    def fragment_sets(self) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM (SELECT 1 FROM fragments GROUP BY dev_eui, tag, count)"
            ).fetchone()[0]

    # -- accepted seqs and devices -----------------------------------------

    def save_ranges(self, dev_eui: str, ranges: SeqRanges) -> None:
        with self._txn() as db:
            _save_ranges(db, dev_eui, ranges)

    def load_ranges(self) -> dict[str, SeqRanges]:
        with self._lock:
            rows = self._db.execute(
                "SELECT dev_eui, lo, hi, gap_since, asked FROM accepted ORDER BY dev_eui, lo"
            ).fetchall()
        out: dict[str, list[SeqRange]] = {}
        for dev, lo, hi, since, asked in rows:
            out.setdefault(dev, []).append(SeqRange(lo, hi, since, asked))
        return {dev: SeqRanges(rs) for dev, rs in out.items()}

    def applications(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute(
                "SELECT dev_eui, application_id FROM devices WHERE application_id IS NOT NULL"))

    def next_command_counter(self, dev_eui: str, now_s: int) -> int:
        """The counter for the next command to the device: above every one
        used before, and at least the current unix time, so it keeps growing
        even if this file is lost and the gateway starts from nothing."""
        with self._txn() as db:
            row = db.execute("SELECT command_counter FROM devices WHERE dev_eui = ?",
                             (dev_eui,)).fetchone()
            counter = max((row[0] if row else 0) + 1, now_s)
            db.execute("INSERT INTO devices (dev_eui, command_counter) VALUES (?, ?) "
                       "ON CONFLICT (dev_eui) DO UPDATE SET command_counter = excluded.command_counter",
                       (dev_eui, counter))
        return counter

    # -- commands ----------------------------------------------------------

    def log_command(self, dev_eui: str, counter: int, opcode: int, args: tuple, expires: int,
                    sent_at: float) -> None:
        with self._txn() as db:
            db.execute("INSERT INTO commands (dev_eui, counter, opcode, args, expires, sent_at) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (dev_eui, counter, opcode, json.dumps(list(args)), expires, sent_at))

    def commands_since(self, dev_eui: str, opcode: int, since: float) -> tuple[int, float | None]:
        """(how many commands of this opcode went to the device since
        `since`, when the last of them went, whenever that was)."""
        with self._lock:
            n = self._db.execute("SELECT COUNT(*) FROM commands WHERE dev_eui = ? AND opcode = ? "
                                 "AND sent_at >= ?", (dev_eui, opcode, since)).fetchone()[0]
            last = self._db.execute("SELECT MAX(sent_at) FROM commands WHERE dev_eui = ? AND "
                                    "opcode = ?", (dev_eui, opcode)).fetchone()[0]
        return n, last

    def commands(self, dev_eui: str | None = None) -> list[dict]:
        cols = ("dev_eui", "counter", "opcode", "args", "expires", "sent_at")
        sql = f"SELECT {', '.join(cols)} FROM commands"
        args: tuple = ()
        if dev_eui is not None:
            sql += " WHERE dev_eui = ?"
            args = (dev_eui,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [dict(zip(cols, r), args=json.loads(r[3])) for r in rows]

    def prune_commands(self, sent_before: float) -> None:
        with self._txn() as db:
            db.execute("DELETE FROM commands WHERE sent_at < ?", (sent_before,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _save_ranges(db: sqlite3.Connection, dev_eui: str, ranges: SeqRanges) -> None:
    db.execute("DELETE FROM accepted WHERE dev_eui = ?", (dev_eui,))
    db.executemany("INSERT INTO accepted (dev_eui, lo, hi, gap_since, asked) VALUES (?, ?, ?, ?, ?)",
                   [(dev_eui, r.lo, r.hi, r.gap_since, r.asked) for r in ranges.ranges])


def _save_application(db: sqlite3.Connection, dev_eui: str, application_id: str) -> None:
    db.execute("INSERT INTO devices (dev_eui, application_id) VALUES (?, ?) "
               "ON CONFLICT (dev_eui) DO UPDATE SET application_id = excluded.application_id",
               (dev_eui, application_id))
