"""SQLite storage for the ledger node: enrolled devices, admitted bundles and readings, counters.

Everything that touches SQL lives here, behind a narrow interface: writes go
through one transaction object handed out by `Store.writing()` under a single
writer lock; reads open their own short-lived connections so a long consistency
check never holds up admission (WAL mode lets readers and the writer run side
by side). Each admitted bundle's bytes are kept once, exactly as the meter
signed them; every reading row points at the bundle that proves it, and its
columns are an index for queries that `ledger_node.check` re-derives from the
bundle to catch any edit made behind the node's back.

Durability: WAL with synchronous=FULL, so a transaction is on disk when
`writing()` returns, before any HTTP response is sent.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SCHEMA_VERSION = 2

# Kept as one script so docs/ledger.md can quote it and a reviewer sees the
# whole layout at once.
SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    dev_eui     TEXT PRIMARY KEY CHECK (length(dev_eui) = 16),
    public_key  BLOB NOT NULL CHECK (length(public_key) = 32),
    meter_model TEXT,
    board       TEXT,
    community   TEXT,
    enrolled_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bundles (
    bundle_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    dev_eui     TEXT NOT NULL REFERENCES devices(dev_eui),
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    data        BLOB NOT NULL,
    received_at REAL,
    gateway     TEXT,
    stored_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS bundles_by_seq ON bundles (dev_eui, first_seq);
CREATE TABLE IF NOT EXISTS readings (
    entry_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    dev_eui     TEXT NOT NULL REFERENCES devices(dev_eui),
    seq         INTEGER NOT NULL,
    t_end       INTEGER NOT NULL,
    import_dwh  INTEGER NOT NULL,
    export_dwh  INTEGER NOT NULL,
    flags       INTEGER NOT NULL,
    bundle_id   INTEGER NOT NULL REFERENCES bundles(bundle_id),
    stored_at   REAL NOT NULL,
    UNIQUE (dev_eui, seq)
);
CREATE INDEX IF NOT EXISTS readings_by_time ON readings (dev_eui, t_end);
CREATE INDEX IF NOT EXISTS readings_by_bundle ON readings (bundle_id);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

_READING_COLS = "entry_id, dev_eui, seq, t_end, import_dwh, export_dwh, flags, bundle_id, stored_at"
# A reading with the bundle that proves it, for queries.
_READING_JOIN = ("r.entry_id, r.dev_eui, r.seq, r.t_end, r.import_dwh, r.export_dwh, r.flags, "
                 "r.bundle_id, r.stored_at, b.data, b.received_at, b.gateway "
                 "FROM readings r LEFT JOIN bundles b ON b.bundle_id = r.bundle_id")
_BUNDLE_COLS = "bundle_id, dev_eui, first_seq, last_seq, data, received_at, gateway, stored_at"
_DEVICE_COLS = "dev_eui, public_key, meter_model, board, community, enrolled_at"


class StoreError(Exception):
    """The database cannot be used (missing, newer schema, closed)."""


@dataclass(frozen=True, slots=True)
class Device:
    dev_eui: str  # 16 lower-case hex digits
    public_key: bytes  # raw Ed25519 public key, 32 bytes
    meter_model: str | None = None
    board: str | None = None
    community: str | None = None
    enrolled_at: float | None = None

    def as_dict(self) -> dict:
        return {
            "dev_eui": self.dev_eui,
            "public_key": self.public_key.hex(),
            "meter_model": self.meter_model,
            "board": self.board,
            "community": self.community,
            "enrolled_at": self.enrolled_at,
        }


@dataclass(frozen=True, slots=True)
class StoredReading:
    entry_id: int
    dev_eui: str
    seq: int
    t_end: int
    import_dwh: int
    export_dwh: int
    flags: int
    bundle_id: int
    stored_at: float
    # From the bundle, in queries that join it (None when it is missing).
    bundle: bytes | None = None
    received_at: float | None = None
    gateway: str | None = None


@dataclass(frozen=True, slots=True)
class StoredBundle:
    bundle_id: int
    dev_eui: str
    first_seq: int
    last_seq: int
    data: bytes  # body + signature, as the meter signed them
    received_at: float | None
    gateway: str | None
    stored_at: float


def _device(row) -> Device:
    return Device(row[0], bytes(row[1]), row[2], row[3], row[4], row[5])


def _reading(row) -> StoredReading:
    if len(row) > 9:
        return StoredReading(*row[:9], None if row[9] is None else bytes(row[9]), *row[10:])
    return StoredReading(*row)


def _bundle(row) -> StoredBundle:
    return StoredBundle(*row[:4], bytes(row[4]), *row[5:])


class WriteTxn:
    """The operations admission may perform inside one write transaction."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def device(self, dev_eui: str) -> Device | None:
        row = self._conn.execute(
            f"SELECT {_DEVICE_COLS} FROM devices WHERE dev_eui = ?", (dev_eui,)).fetchone()
        return _device(row) if row else None

    def insert_device(self, device: Device) -> None:
        self._conn.execute(
            f"INSERT INTO devices ({_DEVICE_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
            (device.dev_eui, device.public_key, device.meter_model, device.board,
             device.community, device.enrolled_at))

    def reading_at(self, dev_eui: str, seq: int) -> StoredReading | None:
        row = self._conn.execute(
            f"SELECT {_READING_COLS} FROM readings WHERE dev_eui = ? AND seq = ?",
            (dev_eui, seq)).fetchone()
        return _reading(row) if row else None

    def nearest_below(self, dev_eui: str, seq: int, without_flags: int = 0) -> StoredReading | None:
        """The stored reading with the highest seq below `seq` among those
        with none of `without_flags` set."""
        row = self._conn.execute(
            f"SELECT {_READING_COLS} FROM readings WHERE dev_eui = ? AND seq < ? "
            "AND (flags & ?) = 0 ORDER BY seq DESC LIMIT 1",
            (dev_eui, seq, without_flags)).fetchone()
        return _reading(row) if row else None

    def nearest_above(self, dev_eui: str, seq: int, without_flags: int = 0) -> StoredReading | None:
        row = self._conn.execute(
            f"SELECT {_READING_COLS} FROM readings WHERE dev_eui = ? AND seq > ? "
            "AND (flags & ?) = 0 ORDER BY seq ASC LIMIT 1",
            (dev_eui, seq, without_flags)).fetchone()
        return _reading(row) if row else None

    def insert_bundle(self, dev_eui: str, first_seq: int, last_seq: int, data: bytes,
                      received_at: float | None, gateway: str | None) -> int:
        """Store a verified bundle's bytes; returns the new bundle_id."""
        cur = self._conn.execute(
            "INSERT INTO bundles (dev_eui, first_seq, last_seq, data, received_at, gateway, "
            "stored_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (dev_eui, first_seq, last_seq, bytes(data), received_at, gateway, time.time()))
        return cur.lastrowid

    def insert_reading(self, dev_eui: str, fields: dict, bundle_id: int) -> int:
        """Store one reading of a stored bundle; `fields` are its decoded
        values (meter.frame.Reading.as_dict()). Returns the new entry_id."""
        cur = self._conn.execute(
            "INSERT INTO readings (dev_eui, seq, t_end, import_dwh, export_dwh, flags, bundle_id, "
            "stored_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (dev_eui, fields["seq"], fields["t_end"], fields["import_dwh"],
             fields["export_dwh"], fields["flags"], bundle_id, time.time()))
        return cur.lastrowid

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Part of the transaction that is undone on its own when the block
        raises (one bundle of a batch)."""
        self._conn.execute("SAVEPOINT item")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK TO item")
            self._conn.execute("RELEASE item")
            raise
        self._conn.execute("RELEASE item")

    def count(self, name: str, n: int = 1) -> None:
        self._conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value", (name, n))


class Snapshot:
    """A consistent read-only view for the consistency check."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def devices(self) -> list[Device]:
        return [_device(r) for r in self._conn.execute(
            f"SELECT {_DEVICE_COLS} FROM devices ORDER BY dev_eui")]

    def device_euis(self) -> list[str]:
        """Every DevEUI that is enrolled or has data, in order."""
        return [r[0] for r in self._conn.execute(
            "SELECT dev_eui FROM devices UNION SELECT dev_eui FROM bundles "
            "UNION SELECT dev_eui FROM readings ORDER BY 1")]

    def bundles(self, dev_eui: str) -> Iterator[StoredBundle]:
        for row in self._conn.execute(
                f"SELECT {_BUNDLE_COLS} FROM bundles WHERE dev_eui = ? ORDER BY bundle_id",
                (dev_eui,)):
            yield _bundle(row)

    def readings(self, dev_eui: str) -> Iterator[StoredReading]:
        """The device's readings in seq order."""
        for row in self._conn.execute(
                f"SELECT {_READING_COLS} FROM readings WHERE dev_eui = ? ORDER BY seq, entry_id",
                (dev_eui,)):
            yield _reading(row)


class Store:
    """One ledger database file. Thread-safe; one instance per process."""

    def __init__(self, path: str | Path, *, create: bool = True, busy_timeout_s: float = 10.0):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise StoreError(f"no ledger database at {self.path}")
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._conn = self._connect(readonly=False)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open: {exc}") from exc
        try:
            self._prepare(create)
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreError(f"{self.path}: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    def _connect(self, readonly: bool) -> sqlite3.Connection:
        if readonly:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None,
                                   timeout=self._busy_timeout_s)
        else:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=self._busy_timeout_s)
        return conn

    def _prepare(self, create: bool) -> None:
        conn = self._conn
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
        # FULL: in WAL mode NORMAL may lose the last commits on power loss,
        # and an admitted reading must outlive the response that reported it.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version} is newer than this "
                             f"ledger node ({SCHEMA_VERSION})")
        if version == SCHEMA_VERSION:
            return
        if version == 1:
            raise StoreError(f"{self.path}: schema version 1 holds readings in the retired "
                             "single-reading frame format, which this ledger node cannot "
                             "verify; keep that file with the release that wrote it and start "
                             "a new database")
        if version == 0:
            has_tables = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
            if has_tables:
                raise StoreError(f"{self.path}: not a ledger database (tables without a version)")
            if not create:
                raise StoreError(f"{self.path}: empty database, not a ledger")
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        # Taking the writer lock lets a transaction in flight finish first.
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: store is closed")

    # -- writes --------------------------------------------------------------

    @contextmanager
    def writing(self) -> Iterator[WriteTxn]:
        """One write transaction under the writer lock; committed (and synced)
        when the block exits normally, rolled back otherwise."""
        with self._lock:
            self._check_open()
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield WriteTxn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # -- reads ---------------------------------------------------------------

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        self._check_open()
        with closing(self._connect(readonly=True)) as conn:
            yield conn

    @contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        with self._reader() as conn:
            conn.execute("BEGIN")
            try:
                yield Snapshot(conn)
            finally:
                conn.execute("ROLLBACK")

    def device(self, dev_eui: str) -> Device | None:
        with self._reader() as conn:
            row = conn.execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE dev_eui = ?",
                               (dev_eui,)).fetchone()
        return _device(row) if row else None

    def devices(self) -> list[Device]:
        with self._reader() as conn:
            return [_device(r) for r in conn.execute(
                f"SELECT {_DEVICE_COLS} FROM devices ORDER BY dev_eui")]

    def latest_seqs(self) -> dict[str, int]:
        """The highest stored seq of each device that has readings."""
        with self._reader() as conn:
            return dict(conn.execute("SELECT dev_eui, max(seq) FROM readings GROUP BY dev_eui"))

    def readings(self, dev_eui: str | None = None, t_from: float | None = None,
                 t_to: float | None = None, limit: int | None = 1000) -> list[StoredReading]:
        """Readings ordered by (dev_eui, seq), with t_from <= t_end < t_to,
        each with its bundle's bytes, receipt time and gateway; all of them
        when limit is None."""
        where, args = [], []
        if dev_eui is not None:
            where.append("r.dev_eui = ?")
            args.append(dev_eui)
        if t_from is not None:
            where.append("r.t_end >= ?")
            args.append(t_from)
        if t_to is not None:
            where.append("r.t_end < ?")
            args.append(t_to)
        sql = f"SELECT {_READING_JOIN}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.dev_eui, r.seq LIMIT ?"
        args.append(-1 if limit is None else limit)  # SQLite: a negative limit is none
        with self._reader() as conn:
            return [_reading(r) for r in conn.execute(sql, args)]

    def counters(self) -> dict[str, int]:
        with self._reader() as conn:
            return dict(conn.execute("SELECT name, value FROM counters ORDER BY name"))

    def summary(self) -> dict:
        """Row counts and, per device, the reading with the highest seq."""
        with self._reader() as conn:
            conn.execute("BEGIN")
            try:
                n_devices = conn.execute("SELECT count(*) FROM devices").fetchone()[0]
                n_bundles = conn.execute("SELECT count(*) FROM bundles").fetchone()[0]
                n_readings = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
                latest = conn.execute(
                    "SELECT r.dev_eui, m.n, r.seq, r.t_end, r.import_dwh, r.export_dwh "
                    "FROM readings r JOIN (SELECT dev_eui, max(seq) AS seq, count(*) AS n "
                    "FROM readings GROUP BY dev_eui) m "
                    "ON r.dev_eui = m.dev_eui AND r.seq = m.seq ORDER BY r.dev_eui").fetchall()
            finally:
                conn.execute("ROLLBACK")
        per_device = {
            dev: {"readings": n, "latest_seq": seq, "latest_t_end": t_end,
                  "import_dwh": imp, "export_dwh": exp}
            for dev, n, seq, t_end, imp, exp in latest
        }
        return {"devices": n_devices, "bundles": n_bundles, "readings": n_readings,
                "per_device": per_device}
