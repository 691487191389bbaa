"""SQLite storage of the ledger node: the log's entries and tree hashes, the readings index, checkpoints.

Everything that touches SQL lives here, behind a narrow interface. The log
itself is two tables: `entries` (the leaf data, ledger_node.entries) and
`hash_pages` (every stored hash of the RFC 6962 tree, in the order of
ledger_node.merkle's stored-hash layout, 256 hashes of 32 bytes to a page).
Everything else is derived from the entries and can be rebuilt from them:
`readings` indexes the readings of each entry by (device, seq) for queries
and the admission rules, `registry` lists the entries that change the device
registry so the node replays them at start, `checkpoints` and `cosignatures`
keep what the node signed and what witnesses cosigned.

Writes go through one transaction object handed out by `Store.writing()`
under a single writer lock; reads open their own short-lived read-only
connections, so a long audit never holds up admission (WAL lets readers and
the writer run side by side). Durability: WAL with synchronous=FULL, so a
transaction is on disk when `writing()` returns, before any answer is sent.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

SCHEMA_VERSION = 3

HASHES_PER_PAGE = 256
HASH_SIZE = 32
PAGE_BYTES = HASHES_PER_PAGE * HASH_SIZE

# Kept as one script so docs/ledger.md can quote it and a reviewer sees the
# whole layout at once.
SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx         INTEGER PRIMARY KEY,
    data        BLOB NOT NULL,
    received_ms INTEGER,
    gateway     INTEGER
);
CREATE TABLE IF NOT EXISTS hash_pages (
    page INTEGER PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    dev     INTEGER PRIMARY KEY,
    dev_eui BLOB NOT NULL UNIQUE CHECK (length(dev_eui) = 8)
);
CREATE TABLE IF NOT EXISTS registry (
    idx INTEGER PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS readings (
    dev        INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    t_end      INTEGER NOT NULL,
    import_dwh INTEGER NOT NULL,
    export_dwh INTEGER NOT NULL,
    flags      INTEGER NOT NULL,
    entry      INTEGER NOT NULL,
    PRIMARY KEY (dev, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS readings_by_time ON readings (dev, t_end);
CREATE TABLE IF NOT EXISTS gateways (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS checkpoints (
    size      INTEGER PRIMARY KEY,
    root      BLOB NOT NULL CHECK (length(root) = 32),
    note      TEXT NOT NULL,
    signed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cosignatures (
    size        INTEGER NOT NULL,
    witness     TEXT NOT NULL,
    line        TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (size, witness)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

_READING_COLS = "seq, t_end, import_dwh, export_dwh, flags, entry"


class StoreError(Exception):
    """The database cannot be used (missing, other schema, closed)."""


@dataclass(frozen=True, slots=True)
class IndexedReading:
    """A row of the readings index: one reading and the entry that holds it."""
    seq: int
    t_end: int
    import_dwh: int
    export_dwh: int
    flags: int
    entry: int


@dataclass(frozen=True, slots=True)
class QueriedReading:
    """A reading with the entry that proves it, for queries."""
    dev_eui: bytes
    seq: int
    t_end: int
    import_dwh: int
    export_dwh: int
    flags: int
    entry: int
    data: bytes | None  # the entry's bytes (None when the entry is missing)
    received_ms: int | None
    gateway: str | None


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    size: int
    root: bytes
    note: str  # the signed note, without cosignatures
    signed_at: float


class WriteTxn:
    """The operations the log and admission may perform inside one write transaction."""

    def __init__(self, store: "Store", conn: sqlite3.Connection):
        self._store = store
        self._conn = conn

    # -- the log -------------------------------------------------------------

    def put_entry(self, idx: int, data: bytes, received_ms: int | None,
                  gateway: int | None) -> None:
        self._conn.execute("INSERT INTO entries (idx, data, received_ms, gateway) "
                           "VALUES (?, ?, ?, ?)", (idx, data, received_ms, gateway))

    def put_hash_page(self, page: int, data: bytes) -> None:
        self._conn.execute("INSERT OR REPLACE INTO hash_pages (page, data) VALUES (?, ?)",
                           (page, data))

    def mark_registry(self, idx: int) -> None:
        self._conn.execute("INSERT INTO registry (idx) VALUES (?)", (idx,))

    # -- the readings index ----------------------------------------------------

    def device_id(self, dev_eui: bytes) -> int:
        """The compact id of a device in the readings index (created on first use)."""
        ids = self._store._dev_ids
        dev = ids.get(dev_eui)
        if dev is not None:
            return dev
        row = self._conn.execute("SELECT dev FROM devices WHERE dev_eui = ?",
                                 (dev_eui,)).fetchone()
        if row is None:
            dev = self._conn.execute("INSERT INTO devices (dev_eui) VALUES (?)",
                                     (dev_eui,)).lastrowid
        else:
            dev = row[0]
        # A rolled-back insert leaves a stale id in the cache; the next
        # insert of the same EUI would then point at nothing, so the cache
        # is only filled for ids read back from a committed row (below).
        self._store._pending_ids[dev_eui] = dev
        return dev

    def gateway_id(self, name: str | None) -> int | None:
        if name is None:
            return None
        gw = self._store._gateway_ids.get(name)
        if gw is not None:
            return gw
        row = self._conn.execute("SELECT id FROM gateways WHERE name = ?", (name,)).fetchone()
        gw = row[0] if row else self._conn.execute(
            "INSERT INTO gateways (name) VALUES (?)", (name,)).lastrowid
        self._store._pending_gateways[name] = gw
        return gw

    def reading_at(self, dev: int, seq: int) -> IndexedReading | None:
        row = self._conn.execute(f"SELECT {_READING_COLS} FROM readings WHERE dev = ? AND seq = ?",
                                 (dev, seq)).fetchone()
        return IndexedReading(*row) if row else None

    def nearest_below(self, dev: int, seq: int, without_flags: int = 0) -> IndexedReading | None:
        """The indexed reading with the highest seq below `seq` among those
        with none of `without_flags` set."""
        row = self._conn.execute(
            f"SELECT {_READING_COLS} FROM readings WHERE dev = ? AND seq < ? AND (flags & ?) = 0 "
            "ORDER BY seq DESC LIMIT 1", (dev, seq, without_flags)).fetchone()
        return IndexedReading(*row) if row else None

    def nearest_above(self, dev: int, seq: int, without_flags: int = 0) -> IndexedReading | None:
        row = self._conn.execute(
            f"SELECT {_READING_COLS} FROM readings WHERE dev = ? AND seq > ? AND (flags & ?) = 0 "
            "ORDER BY seq ASC LIMIT 1", (dev, seq, without_flags)).fetchone()
        return IndexedReading(*row) if row else None

    def put_readings(self, rows: Sequence[tuple]) -> None:
        """(dev, seq, t_end, import_dwh, export_dwh, flags, entry) rows."""
        self._conn.executemany(
            "INSERT INTO readings (dev, seq, t_end, import_dwh, export_dwh, flags, entry) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    # -- checkpoints -----------------------------------------------------------

    def put_checkpoint(self, size: int, root: bytes, note: str, signed_at: float) -> None:
        self._conn.execute("INSERT INTO checkpoints (size, root, note, signed_at) "
                           "VALUES (?, ?, ?, ?)", (size, root, note, signed_at))

    def put_cosignature(self, size: int, witness: str, line: str, received_at: float) -> bool:
        """False when this witness's cosignature of that size is stored already."""
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO cosignatures (size, witness, line, received_at) "
            "VALUES (?, ?, ?, ?)", (size, witness, line, received_at))
        return cur.rowcount == 1

    def prune_checkpoints(self, keep_sizes: Sequence[int], below_size: int) -> int:
        """Delete checkpoints (and their cosignatures) smaller than
        `below_size` except those in `keep_sizes`; returns how many went."""
        keep = ",".join(str(int(s)) for s in keep_sizes) or "-1"
        self._conn.execute(f"DELETE FROM cosignatures WHERE size < ? AND size NOT IN ({keep})",
                           (below_size,))
        return self._conn.execute(
            f"DELETE FROM checkpoints WHERE size < ? AND size NOT IN ({keep})",
            (below_size,)).rowcount

    def checkpoint_sizes(self) -> list[tuple[int, float]]:
        return self._conn.execute("SELECT size, signed_at FROM checkpoints ORDER BY size").fetchall()

    # -- savepoints and counters -------------------------------------------------

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


class Store:
    """One ledger database file. Thread-safe; one instance per process."""

    def __init__(self, path: str | Path, *, create: bool = True, busy_timeout_s: float = 10.0):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise StoreError(f"no ledger database at {self.path}")
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._closed = False
        # Compact ids never change once committed, so they are cached; ids
        # handed out inside a transaction join the cache only when it commits.
        self._dev_ids: dict[bytes, int] = {}
        self._gateway_ids: dict[str, int] = {}
        self._pending_ids: dict[bytes, int] = {}
        self._pending_gateways: dict[str, int] = {}
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
            return sqlite3.connect(uri, uri=True, isolation_level=None,
                                   timeout=self._busy_timeout_s, check_same_thread=False)
        return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=self._busy_timeout_s)

    def _prepare(self, create: bool) -> None:
        conn = self._conn
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
        # FULL: in WAL mode NORMAL may lose the last commits on power loss,
        # and an admitted reading must outlive the response that reported it.
        conn.execute("PRAGMA synchronous = FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version} is newer than this "
                             f"ledger node ({SCHEMA_VERSION})")
        if version == SCHEMA_VERSION:
            return
        if version in (1, 2):
            raise StoreError(f"{self.path}: schema version {version} is a ledger database "
                             "from before the Merkle log; this ledger node keeps a verifiable "
                             "log and cannot open it. Keep the file with the release that "
                             "wrote it and start a new database")
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
                yield WriteTxn(self, conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._pending_ids.clear()
                self._pending_gateways.clear()
                raise
            self._dev_ids.update(self._pending_ids)
            self._gateway_ids.update(self._pending_gateways)
            self._pending_ids.clear()
            self._pending_gateways.clear()

    # -- reads ---------------------------------------------------------------

    @contextmanager
    def reader(self) -> Iterator["Reader"]:
        """A read-only connection with one consistent snapshot for the block."""
        self._check_open()
        with closing(self._connect(readonly=True)) as conn:
            conn.execute("BEGIN")
            try:
                yield Reader(conn)
            finally:
                conn.execute("ROLLBACK")

    def writer_reader(self) -> "Reader":
        """Reads on the writer's connection, for use inside `writing()` or at start."""
        return Reader(self._conn)


class Reader:
    """Queries on one connection (a read-only snapshot, or the writer's)."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def size(self) -> int:
        row = self._conn.execute("SELECT max(idx) FROM entries").fetchone()
        return 0 if row[0] is None else row[0] + 1

    def hash_pages(self, pages: Sequence[int]) -> dict[int, bytes]:
        out = {}
        for start in range(0, len(pages), 500):
            chunk = list(pages[start:start + 500])
            marks = ",".join("?" * len(chunk))
            for page, data in self._conn.execute(
                    f"SELECT page, data FROM hash_pages WHERE page IN ({marks})", chunk):
                out[page] = bytes(data)
        return out

    def entry(self, idx: int) -> bytes | None:
        row = self._conn.execute("SELECT data FROM entries WHERE idx = ?", (idx,)).fetchone()
        return None if row is None else bytes(row[0])

    def entries(self, start: int, end: int) -> list[tuple[int, bytes]]:
        return [(i, bytes(d)) for i, d in self._conn.execute(
            "SELECT idx, data FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
            (start, end))]

    def iter_entries(self, start: int = 0, end: int | None = None,
                     chunk: int = 10_000) -> Iterator[tuple[int, bytes]]:
        """Every entry from `start` in order, read in chunks so a long export
        does not hold one giant result set."""
        i = start
        while end is None or i < end:
            stop = i + chunk if end is None else min(i + chunk, end)
            rows = self.entries(i, stop)
            if not rows:
                return
            yield from rows
            i = rows[-1][0] + 1

    def registry_entries(self) -> list[tuple[int, bytes]]:
        return [(i, bytes(d)) for i, d in self._conn.execute(
            "SELECT e.idx, e.data FROM registry r JOIN entries e ON e.idx = r.idx ORDER BY e.idx")]

    def device_ids(self) -> dict[bytes, int]:
        return {bytes(eui): dev for dev, eui in self._conn.execute(
            "SELECT dev, dev_eui FROM devices")}

    def latest_seqs(self) -> dict[bytes, int]:
        return {bytes(eui): seq for eui, seq in self._conn.execute(
            "SELECT d.dev_eui, max(r.seq) FROM readings r JOIN devices d ON d.dev = r.dev "
            "GROUP BY r.dev")}

    def latest_per_device(self) -> dict[bytes, tuple]:
        """dev_eui -> (readings, seq, t_end, import_dwh, export_dwh) of the
        reading with the highest seq."""
        return {bytes(eui): tuple(rest) for eui, *rest in self._conn.execute(
            "SELECT d.dev_eui, m.n, r.seq, r.t_end, r.import_dwh, r.export_dwh "
            "FROM (SELECT dev, max(seq) AS seq, count(*) AS n FROM readings GROUP BY dev) m "
            "JOIN readings r ON r.dev = m.dev AND r.seq = m.seq "
            "JOIN devices d ON d.dev = m.dev")}

    def reading(self, dev_eui: bytes, seq: int) -> IndexedReading | None:
        row = self._conn.execute(
            f"SELECT r.{_READING_COLS.replace(', ', ', r.')} FROM readings r "
            "JOIN devices d ON d.dev = r.dev WHERE d.dev_eui = ? AND r.seq = ?",
            (dev_eui, seq)).fetchone()
        return IndexedReading(*row) if row else None

    def readings(self, dev_eui: bytes | None = None, t_from: float | None = None,
                 t_to: float | None = None, limit: int | None = 1000) -> list[QueriedReading]:
        """Readings ordered by (dev_eui, seq), with t_from <= t_end < t_to,
        each with the bytes of its entry; all of them when limit is None."""
        where, args = [], []
        if dev_eui is not None:
            where.append("d.dev_eui = ?")
            args.append(dev_eui)
        if t_from is not None:
            where.append("r.t_end >= ?")
            args.append(t_from)
        if t_to is not None:
            where.append("r.t_end < ?")
            args.append(t_to)
        sql = ("SELECT d.dev_eui, r.seq, r.t_end, r.import_dwh, r.export_dwh, r.flags, r.entry, "
               "e.data, e.received_ms, g.name FROM readings r JOIN devices d ON d.dev = r.dev "
               "LEFT JOIN entries e ON e.idx = r.entry LEFT JOIN gateways g ON g.id = e.gateway")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY d.dev_eui, r.seq LIMIT ?"
        args.append(-1 if limit is None else limit)  # SQLite: a negative limit is none
        return [QueriedReading(bytes(r[0]), *r[1:7], None if r[7] is None else bytes(r[7]),
                               r[8], r[9]) for r in self._conn.execute(sql, args)]

    def iter_index(self) -> Iterator[tuple[bytes, IndexedReading]]:
        """The whole readings index in (dev_eui, seq) order, for checks."""
        for row in self._conn.execute(
                f"SELECT d.dev_eui, r.{_READING_COLS.replace(', ', ', r.')} FROM readings r "
                "JOIN devices d ON d.dev = r.dev ORDER BY d.dev_eui, r.seq"):
            yield bytes(row[0]), IndexedReading(*row[1:])

    def counts(self) -> dict:
        c = self._conn
        return {
            "entries": self.size(),
            "readings": c.execute("SELECT count(*) FROM readings").fetchone()[0],
            "devices": c.execute("SELECT count(*) FROM devices").fetchone()[0],
            "checkpoints": c.execute("SELECT count(*) FROM checkpoints").fetchone()[0],
        }

    def counters(self) -> dict[str, int]:
        return dict(self._conn.execute("SELECT name, value FROM counters ORDER BY name"))

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        row = self._conn.execute("SELECT size, root, note, signed_at FROM checkpoints "
                                 "ORDER BY size DESC LIMIT 1").fetchone()
        return None if row is None else StoredCheckpoint(row[0], bytes(row[1]), row[2], row[3])

    def checkpoint(self, size: int) -> StoredCheckpoint | None:
        row = self._conn.execute("SELECT size, root, note, signed_at FROM checkpoints "
                                 "WHERE size = ?", (size,)).fetchone()
        return None if row is None else StoredCheckpoint(row[0], bytes(row[1]), row[2], row[3])

    def checkpoints(self) -> list[StoredCheckpoint]:
        return [StoredCheckpoint(s, bytes(r), n, t) for s, r, n, t in self._conn.execute(
            "SELECT size, root, note, signed_at FROM checkpoints ORDER BY size")]

    def cosignatures(self, size: int) -> list[tuple[str, str]]:
        """(witness name, signature line) of one checkpoint, by name."""
        return self._conn.execute("SELECT witness, line FROM cosignatures WHERE size = ? "
                                  "ORDER BY witness", (size,)).fetchall()

    def best_checkpoint(self, min_size: int = 0) -> StoredCheckpoint | None:
        """The checkpoint of at least `min_size` with the most cosignatures,
        the newest among equals: what a proof is best shown against."""
        row = self._conn.execute(
            "SELECT c.size, c.root, c.note, c.signed_at FROM checkpoints c "
            "LEFT JOIN cosignatures s ON s.size = c.size WHERE c.size >= ? "
            "GROUP BY c.size ORDER BY count(s.witness) DESC, c.size DESC LIMIT 1",
            (min_size,)).fetchone()
        return None if row is None else StoredCheckpoint(row[0], bytes(row[1]), row[2], row[3])
