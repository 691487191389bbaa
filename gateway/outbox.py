"""The gateway's durable state (SQLite, WAL, synchronous=FULL), one file.

  pending          verified bundles waiting for the ledger nodes, one row per
                   bundle, with a bit per ledger node that has answered for it
  ledger_rejected  bundles a ledger node refused, with its reason
  dead_letters     MQTT messages the gateway refused, as received, with the reason
  fragments        pieces of bundles still incomplete, by (dev_eui, tag, count, index)
  accepted         per device, the seqs accepted so far as ranges (gateway.seqs)
  devices          per device, the ChirpStack application and the command counter
  commands         the downlink commands sent, and whether each was delivered
  ledgers          which bit of `pending.delivered` stands for which ledger node

The uplinks of one batch of MQTT messages are committed in one transaction
(`batch`) before any of those messages is acknowledged to the broker: a
fragment, a bundle together with the ranges it adds and the removal of the
fragments it was joined from, a refused message in the dead-letter store. A
crash leaves all of a batch or none, and one fsync per batch instead of one
per uplink is what an SD card lives longer with. A bundle leaves `pending`
only when every configured ledger node has answered for it (it has the
readings, or it refused them and the bundle went to `ledger_rejected`), so
nothing verified is ever simply dropped.
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
from typing import Any, Iterable, Iterator

from gateway.seqs import SeqRange, SeqRanges

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3

# Refused messages are kept as received up to this many bytes (an oversized
# one is kept in part: enough to see what it was).
DEAD_LETTER_PAYLOAD = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dev_eui     TEXT    NOT NULL,
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    bundle      BLOB    NOT NULL,
    received_at REAL    NOT NULL,
    delivered   INTEGER NOT NULL DEFAULT 0,
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
    rejected_at REAL    NOT NULL,
    ledger      TEXT
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL    NOT NULL,
    topic       TEXT    NOT NULL,
    dev_eui     TEXT,
    reason      TEXT    NOT NULL,
    message     TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    payload     BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_reason ON dead_letters (reason, id);
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
    sent_at     REAL    NOT NULL,
    item_id     TEXT,
    state       TEXT    NOT NULL DEFAULT 'sent',
    attempts    INTEGER NOT NULL DEFAULT 1,
    tried_at    REAL,
    settled_at  REAL,
    data        BLOB,
    application_id TEXT
);
CREATE INDEX IF NOT EXISTS commands_by_device ON commands (dev_eui, opcode, sent_at);
CREATE INDEX IF NOT EXISTS commands_by_item ON commands (item_id);
CREATE INDEX IF NOT EXISTS commands_open ON commands (state) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS ledgers (
    bit         INTEGER PRIMARY KEY,
    url         TEXT    NOT NULL UNIQUE
);
"""

# Schema 1 queued single-reading frames of the retired frame format. They
# cannot be decoded any more; they are kept, renamed, for an operator to look
# at, and nothing new is written there.
_FROM_V1 = """
ALTER TABLE pending RENAME TO v1_pending;
ALTER TABLE ledger_rejected RENAME TO v1_ledger_rejected;
"""

# Schema 2 -> 3: delivery to several ledger nodes, dead letters (new table),
# downlink delivery tracking. Commands sent before were not tracked: they
# stay in the log as 'sent'.
_FROM_V2 = """
ALTER TABLE pending ADD COLUMN delivered INTEGER NOT NULL DEFAULT 0;
ALTER TABLE ledger_rejected ADD COLUMN ledger TEXT;
ALTER TABLE commands ADD COLUMN item_id TEXT;
ALTER TABLE commands ADD COLUMN state TEXT NOT NULL DEFAULT 'sent';
ALTER TABLE commands ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
ALTER TABLE commands ADD COLUMN tried_at REAL;
ALTER TABLE commands ADD COLUMN settled_at REAL;
ALTER TABLE commands ADD COLUMN data BLOB;
ALTER TABLE commands ADD COLUMN application_id TEXT;
"""

# The bit a gateway with one ledger node, and the tests of a bare outbox, use.
DEFAULT_LEDGER_BIT = 1


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


@dataclass(frozen=True)
class Downlink:
    """A command sent to a meter and not yet settled (acknowledged, expired,
    given up)."""
    id: int
    dev_eui: str
    counter: int
    opcode: int
    args: list
    expires: int
    item_id: str
    state: str
    attempts: int
    tried_at: float
    data: bytes
    application_id: str | None


class Outbox:
    """Thread-safe: the MQTT worker writes, the forwarders take, the status
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
        elif version == 2:
            self._db.executescript("BEGIN;" + _FROM_V2 + "COMMIT;")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._required = DEFAULT_LEDGER_BIT
        self._depth = self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]

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

    @contextmanager
    def batch(self) -> Iterator["Batch"]:
        """One transaction for many changes (the uplinks of one batch of MQTT
        messages); committed when the block ends, rolled back when it raises."""
        with self._txn() as db:
            b = Batch(db)
            yield b
        self._depth += b.queued

    # -- ledger nodes --------------------------------------------------------

    def set_ledgers(self, urls: list[str]) -> list[int]:
        """The bit of each ledger node, in order, assigned once per URL and
        kept across restarts. A bundle is complete when every bit of these
        ledgers is set; bundles that only a ledger no longer configured still
        lacked are removed now."""
        if not urls or len(set(urls)) != len(urls):
            raise ValueError(f"ledger URLs must be one or more distinct URLs, got {urls!r}")
        if len(urls) > 30:
            raise ValueError("at most 30 ledger nodes")
        with self._txn() as db:
            known = dict(db.execute("SELECT url, bit FROM ledgers"))
            # A node no longer configured frees its bit, cleared everywhere,
            # so a node that gets the bit later starts from nothing.
            for url, bit in list(known.items()):
                if url not in urls:
                    db.execute("UPDATE pending SET delivered = delivered & ~? "
                               "WHERE delivered & ? != 0", (bit, bit))
                    db.execute("DELETE FROM ledgers WHERE url = ?", (url,))
                    del known[url]
            if len(urls) == 1 and not known:
                known[urls[0]] = DEFAULT_LEDGER_BIT
                db.execute("INSERT INTO ledgers (bit, url) VALUES (?, ?)",
                           (DEFAULT_LEDGER_BIT, urls[0]))
            bits = []
            for url in urls:
                bit = known.get(url)
                if bit is None:
                    used = set(known.values())
                    bit = next(1 << i for i in range(30) if 1 << i not in used)
                    known[url] = bit
                    db.execute("INSERT INTO ledgers (bit, url) VALUES (?, ?)", (bit, url))
                    # A ledger added later gets what is still pending, not the
                    # history the others already hold.
                bits.append(bit)
            required = 0
            for bit in bits:
                required |= bit
            db.execute("DELETE FROM pending WHERE delivered & ? = ?", (required, required))
            self._required = required
            self._depth = db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
        return bits

    # -- bundles -----------------------------------------------------------

    def store_bundle(self, dev_eui: str, bundle: bytes, first_seq: int, last_seq: int,
                     received_at: float, ranges: SeqRanges | None = None,
                     application_id: str | None = None, drop_tag: int | None = None) -> bool:
        """Queue a verified bundle and, in the same transaction, save the
        device's accepted ranges, its application id, and drop the fragment
        sets with tag `drop_tag` (the set it was joined from, or pieces of it
        from an earlier try). False when a bundle with the same seqs was
        already queued (nothing is queued then, the rest is saved)."""
        with self.batch() as b:
            return b.store_bundle(dev_eui, bundle, first_seq, last_seq, received_at, ranges,
                                  application_id, drop_tag)

    def pending(self, limit: int, bit: int = DEFAULT_LEDGER_BIT, after_id: int = 0
                ) -> list[Pending]:
        """The oldest queued bundles the ledger with this bit has not answered
        for, in arrival order, from id `after_id` on."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, dev_eui, first_seq, last_seq, bundle, received_at FROM pending "
                "WHERE id > ? AND delivered & ? = 0 ORDER BY id LIMIT ?",
                (after_id, bit, limit)).fetchall()
        return [Pending(*row) for row in rows]

    def acknowledge(self, ids: Iterable[int], bit: int = DEFAULT_LEDGER_BIT) -> None:
        """The ledger with this bit holds the readings of these bundles; a
        bundle every ledger has answered for leaves the queue."""
        ids = [(i,) for i in ids]
        if not ids:
            return
        with self._txn() as db:
            self._depth -= _settle(db, ids, bit, self._required)

    def reject(self, item: Pending, reason: str, message: str, bit: int = DEFAULT_LEDGER_BIT,
               ledger: str | None = None) -> None:
        """The ledger with this bit refused the bundle: kept aside with its
        answer; for that ledger the bundle is settled."""
        with self._txn() as db:
            db.execute(
                "INSERT INTO ledger_rejected (dev_eui, first_seq, last_seq, bundle, received_at, "
                "reason, message, rejected_at, ledger) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item.dev_eui, item.first_seq, item.last_seq, item.bundle, item.received_at,
                 reason, message, time.time(), ledger))
            self._depth -= _settle(db, [(item.id,)], bit, self._required)

    def depth(self) -> int:
        """Bundles some ledger node has yet to answer for (kept in memory:
        counting a million rows on an SD card for every status request is
        what this avoids)."""
        return self._depth

    def oldest_pending_at(self) -> float | None:
        with self._lock:
            return self._db.execute("SELECT received_at FROM pending ORDER BY id LIMIT 1"
                                    ).fetchone()[0] if self._depth else None

    def rejected(self) -> list[dict]:
        """Bundles a ledger refused, oldest first."""
        cols = ("dev_eui", "first_seq", "last_seq", "reason", "message", "rejected_at", "ledger")
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(cols)} FROM ledger_rejected ORDER BY id").fetchall()
        return [dict(zip(cols, r)) for r in rows]

    # -- dead letters --------------------------------------------------------

    def dead_letter_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]

    def prune_dead_letters(self, before: float, keep: int) -> int:
        """Drop refused messages older than `before` and beyond the newest
        `keep`; returns how many went."""
        with self._txn() as db:
            n = db.execute("DELETE FROM dead_letters WHERE received_at < ?", (before,)).rowcount
            n += db.execute("DELETE FROM dead_letters WHERE id <= (SELECT MAX(id) FROM "
                            "dead_letters) - ?", (keep,)).rowcount
        return n

    # -- fragments ---------------------------------------------------------

    def add_fragment(self, dev_eui: str, tag: int, count: int, index: int, piece: bytes,
                     received_at: float, max_sets: int
                     ) -> tuple[str, dict[int, bytes], list[FragmentSet]]:
        with self.batch() as b:
            return b.add_fragment(dev_eui, tag, count, index, piece, received_at, max_sets)

    def drop_fragments(self, dev_eui: str, tag: int, count: int | None = None) -> int:
        with self.batch() as b:
            return b.drop_fragments(dev_eui, tag, count)

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
                    sent_at: float, item_id: str | None = None, data: bytes | None = None,
                    application_id: str | None = None, tracked: bool = False) -> int:
        """Record a command as sent; `tracked` ones wait for the meter's
        acknowledgement (state 'pending') and are retried. Returns its row id."""
        with self._txn() as db:
            cur = db.execute(
                "INSERT INTO commands (dev_eui, counter, opcode, args, expires, sent_at, item_id, "
                "state, attempts, tried_at, data, application_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
                (dev_eui, counter, opcode, json.dumps(list(args)), expires, sent_at, item_id,
                 "pending" if tracked else "sent", sent_at, data, application_id))
            return cur.lastrowid

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
        cols = ("dev_eui", "counter", "opcode", "args", "expires", "sent_at", "item_id", "state",
                "attempts", "settled_at")
        sql = f"SELECT {', '.join(cols)} FROM commands"
        args: tuple = ()
        if dev_eui is not None:
            sql += " WHERE dev_eui = ?"
            args = (dev_eui,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [dict(zip(cols, r), args=json.loads(r[3])) for r in rows]

    def open_downlinks(self) -> list[Downlink]:
        """Commands waiting for the meter's acknowledgement."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, dev_eui, counter, opcode, args, expires, item_id, state, attempts, "
                "tried_at, data, application_id FROM commands WHERE state = 'pending' "
                "ORDER BY id").fetchall()
        return [Downlink(r[0], r[1], r[2], r[3], json.loads(r[4]), *r[5:]) for r in rows]

    def open_downlink_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM commands WHERE state = 'pending'"
                                    ).fetchone()[0]

    def retry_downlink(self, row_id: int, item_id: str, tried_at: float) -> None:
        with self._txn() as db:
            db.execute("UPDATE commands SET item_id = ?, attempts = attempts + 1, tried_at = ? "
                       "WHERE id = ?", (item_id, tried_at, row_id))

    def settle_downlink(self, row_id: int, state: str, at: float) -> None:
        with self._txn() as db:
            db.execute("UPDATE commands SET state = ?, settled_at = ? WHERE id = ?",
                       (state, at, row_id))

    def prune_commands(self, sent_before: float) -> None:
        """Forget settled commands sent before `sent_before` (open ones stay
        until they are settled)."""
        with self._txn() as db:
            db.execute("DELETE FROM commands WHERE sent_at < ? AND state != 'pending'",
                       (sent_before,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Batch:
    """The changes of one transaction (Outbox.batch). `savepoint` isolates
    one message: a bug while handling it undoes its own changes only."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db
        self.queued = 0  # bundles added to `pending`

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        self._db.execute("SAVEPOINT msg")
        queued = self.queued
        try:
            yield
        except sqlite3.Error:
            raise  # the whole batch is retried
        except BaseException:
            self._db.execute("ROLLBACK TO msg")
            self._db.execute("RELEASE msg")
            self.queued = queued
            raise
        self._db.execute("RELEASE msg")

    def store_bundle(self, dev_eui: str, bundle: bytes, first_seq: int, last_seq: int,
                     received_at: float, ranges: SeqRanges | None = None,
                     application_id: str | None = None, drop_tag: int | None = None) -> bool:
        db = self._db
        cur = db.execute(
            "INSERT OR IGNORE INTO pending (dev_eui, first_seq, last_seq, bundle, received_at) "
            "VALUES (?, ?, ?, ?, ?)", (dev_eui, first_seq, last_seq, bytes(bundle), received_at))
        queued = cur.rowcount == 1
        self.queued += queued
        if ranges is not None:
            _save_ranges(db, dev_eui, ranges)
        if application_id:
            db.execute("INSERT INTO devices (dev_eui, application_id) VALUES (?, ?) "
                       "ON CONFLICT (dev_eui) DO UPDATE SET application_id = excluded.application_id",
                       (dev_eui, application_id))
        if drop_tag is not None:
            db.execute("DELETE FROM fragments WHERE dev_eui = ? AND tag = ?", (dev_eui, drop_tag))
        return queued

    def add_fragment(self, dev_eui: str, tag: int, count: int, index: int, piece: bytes,
                     received_at: float, max_sets: int
                     ) -> tuple[str, dict[int, bytes], list[FragmentSet]]:
        """Keep one piece. Returns (status, the pieces of its set held now,
        sets evicted to stay within max_sets per device). status: "new",
        "same" (this piece was already held), "conflict" (another piece is
        held for this index; the one held stays)."""
        db = self._db
        evicted: list[FragmentSet] = []
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
        if count is None:
            cur = self._db.execute("DELETE FROM fragments WHERE dev_eui = ? AND tag = ?",
                                   (dev_eui, tag))
        else:
            cur = self._db.execute("DELETE FROM fragments WHERE dev_eui = ? AND tag = ? AND "
                                   "count = ?", (dev_eui, tag, count))
        return cur.rowcount

    def dead_letter(self, received_at: float, topic: str, dev_eui: str | None, reason: str,
                    message: str, payload: bytes) -> None:
        self._db.execute(
            "INSERT INTO dead_letters (received_at, topic, dev_eui, reason, message, size, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (received_at, topic[:500], dev_eui, reason, message[:1000], len(payload),
             bytes(payload[:DEAD_LETTER_PAYLOAD])))

    def settle_item(self, item_id: str, state: str, at: float) -> bool:
        """Settle the open command sent as ChirpStack queue item `item_id`
        (acked, transmitted). False when no open command has that id (a
        repeated event, an item of another application)."""
        return self._db.execute("UPDATE commands SET state = ?, settled_at = ? WHERE item_id = ? "
                                "AND state = 'pending'", (state, at, item_id)).rowcount == 1


    def nack_item(self, item_id: str) -> bool:
        """The meter did not acknowledge queue item `item_id`: its command is
        due for another attempt now. False when no open command has that id."""
        return self._db.execute("UPDATE commands SET tried_at = 0 WHERE item_id = ? AND "
                                "state = 'pending'", (item_id,)).rowcount == 1


def _settle(db: sqlite3.Connection, ids: list[tuple[int]], bit: int, required: int) -> int:
    """Set `bit` on these pending rows and remove the ones now answered for by
    every ledger; returns how many were removed."""
    if required == bit:
        return db.executemany("DELETE FROM pending WHERE id = ?", ids).rowcount
    db.executemany("UPDATE pending SET delivered = delivered | ? WHERE id = ?",
                   [(bit, i) for (i,) in ids])
    return db.executemany("DELETE FROM pending WHERE id = ? AND delivered & ? = ?",
                          [(i, required, required) for (i,) in ids]).rowcount


def _save_ranges(db: sqlite3.Connection, dev_eui: str, ranges: SeqRanges) -> None:
    db.execute("DELETE FROM accepted WHERE dev_eui = ?", (dev_eui,))
    db.executemany("INSERT INTO accepted (dev_eui, lo, hi, gap_since, asked) VALUES (?, ?, ?, ?, ?)",
                   [(dev_eui, r.lo, r.hi, r.gap_since, r.asked) for r in ranges.ranges])


# -- read-only views for the command line (the daemon may be running) ---------

def _readonly(path: str | os.PathLike) -> sqlite3.Connection:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no gateway state at {os.fspath(path)}")
    db = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True)
    db.execute("PRAGMA busy_timeout=5000")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION:
        db.close()
        raise RuntimeError(f"{os.fspath(path)} has schema {version}; start the gateway once "
                           f"to upgrade it to {SCHEMA_VERSION}")
    return db


def read_dead_letters(path: str | os.PathLike, *, reason: str | None = None,
                      dev_eui: str | None = None, since: float | None = None,
                      limit: int = 100) -> list[dict[str, Any]]:
    """Refused messages, newest first, optionally of one reason or device,
    received at or after `since`."""
    where, args = [], []
    if reason is not None:
        where.append("reason = ?")
        args.append(reason)
    if dev_eui is not None:
        where.append("dev_eui = ?")
        args.append(dev_eui.lower())
    if since is not None:
        where.append("received_at >= ?")
        args.append(since)
    cols = ("id", "received_at", "topic", "dev_eui", "reason", "message", "size", "payload")
    sql = (f"SELECT {', '.join(cols)} FROM dead_letters"
           + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?")
    db = _readonly(path)
    try:
        rows = db.execute(sql, (*args, limit)).fetchall()
    finally:
        db.close()
    return [dict(zip(cols, r), payload=bytes(r[7])) for r in rows]


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What the state file says, for `meter-gateway status` when the daemon
    does not answer."""
    db = _readonly(path)
    try:
        one = lambda sql: db.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "queue_depth": one("SELECT COUNT(*) FROM pending"),
            "oldest_pending_at": one("SELECT MIN(received_at) FROM pending"),
            "dead_letters": one("SELECT COUNT(*) FROM dead_letters"),
            "dead_letters_by_reason": dict(db.execute(
                "SELECT reason, COUNT(*) FROM dead_letters GROUP BY reason ORDER BY reason")),
            "ledger_rejected": one("SELECT COUNT(*) FROM ledger_rejected"),
            "fragment_sets": one("SELECT COUNT(*) FROM (SELECT 1 FROM fragments "
                                 "GROUP BY dev_eui, tag, count)"),
            "downlinks_pending": one("SELECT COUNT(*) FROM commands WHERE state = 'pending'"),
            "devices": one("SELECT COUNT(DISTINCT dev_eui) FROM accepted"),
        }
    finally:
        db.close()
