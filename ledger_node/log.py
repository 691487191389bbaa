"""The verifiable log: appending entries, the tree's hashes, signed checkpoints and their cosignatures.

`Log` joins the pure Merkle core (ledger_node.merkle) to the SQLite store
(ledger_node.store). Appends happen inside `Log.writing()`, one SQLite
transaction: each entry's leaf hash is pushed onto the in-memory right edge
of the tree (`merkle.Frontier`), and the stored hashes it completes are
written to the hash pages in the same transaction as the entry, so the tree
and the entries can never disagree after a crash. The committed size and
root are published only after the commit.

A checkpoint (C2SP tlog-checkpoint: origin, size, root) is signed by a
background thread at a steady cadence (1 s by default) when the log has
grown. Before signing, the log checks that the tree it is about to sign
still has, at the size of its latest checkpoint, the root it signed then.
If that fails (the file was edited, hash pages lost) the log is halted: it
signs nothing more and admits nothing more, and says why in /v1/health,
because a signature over an inconsistent tree is exactly what witnesses and
auditors exist to catch. The same check runs at start.

Witnesses (ledger_node.witness) send cosignatures of checkpoints back; the
log keeps those that verify under a witness key it is configured with and
serves them with the checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from . import checkpoint as ckpt
from . import entries, merkle, note
from .store import (HASHES_PER_PAGE, HASH_SIZE, PAGE_BYTES, Reader, Store, StoreError,
                    StoredCheckpoint, WriteTxn)

log = logging.getLogger("ledger_node.log")

DEFAULT_CHECKPOINT_INTERVAL_S = 1.0
# Checkpoints kept besides those of the last KEEP_CHECKPOINTS_FOR_S, the first
# one signed in every hour and the newest cosigned one (older ones are pruned:
# one a second would pile up).
KEEP_RECENT_CHECKPOINTS = 64
KEEP_CHECKPOINTS_FOR_S = 900
_PAGE_CACHE = 2048  # full hash pages (8 KiB each) kept in memory for proofs


class LogHalted(StoreError):
    """The stored tree disagrees with a checkpoint the log has signed."""


class CosignatureRefused(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class _Committed:
    """What readers may rely on: the committed size and root, and the hash
    page that is still filling (its committed prefix)."""
    size: int
    root: bytes
    tail_page: int
    tail: bytes


class LogTxn:
    """Appends to the log inside one write transaction (see Log.writing).

    Check before writing: an exception after the first append aborts the
    whole transaction, so callers decide everything an entry depends on
    before appending it."""

    def __init__(self, owner: "Log", tx: WriteTxn):
        self._log = owner
        self.tx = tx
        self.frontier = owner._frontier.copy()
        c = owner._committed
        self._page = c.tail_page
        self._tail = bytearray(c.tail)
        self._tail_dirty = False
        self._registry: entries.Registry | None = None  # copied on first change
        self._seqs: dict[bytes, int] = {}  # highest seq appended per device
        self.appended = 0

    @property
    def size(self) -> int:
        return self.frontier.size

    @property
    def registry(self) -> entries.Registry:
        """The registry as this transaction sees it."""
        return self._registry if self._registry is not None else self._log.registry

    def append(self, data: bytes, received_ms: int | None = None,
               gateway: str | None = None) -> int:
        """Append one entry; returns its index."""
        idx = self.frontier.size
        completed = self.frontier.append(merkle.leaf_hash(data))
        self.tx.put_entry(idx, data, received_ms, self.tx.gateway_id(gateway))
        for h in completed:
            self._tail += h
            if len(self._tail) == PAGE_BYTES:
                self.tx.put_hash_page(self._page, bytes(self._tail))
                self._page += 1
                self._tail = bytearray()
                self._tail_dirty = False
            else:
                self._tail_dirty = True
        self.appended += 1
        return idx

    def append_registry(self, change) -> int:
        """Apply an enroll/rotate/revoke to this transaction's registry (raises
        entries.Refused, nothing appended) and append it."""
        if self._registry is None:
            self._registry = self._log.registry.copy()
        idx = self.frontier.size
        self._registry.apply(change, idx)
        self.append(entries.encode(change))
        self.tx.mark_registry(idx)
        return idx

    def note_seq(self, dev_eui: bytes, seq: int) -> None:
        if seq > self._seqs.get(dev_eui, -1):
            self._seqs[dev_eui] = seq

    def _finish(self) -> None:
        if self._tail_dirty:
            self.tx.put_hash_page(self._page, bytes(self._tail))


class Log:
    """The log of one ledger database, signed with one note key."""

    def __init__(self, store: Store, signer: note.Signer, *,
                 witnesses: Sequence[ckpt.CosignatureVerifier] = (),
                 checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S,
                 keep_recent: int = KEEP_RECENT_CHECKPOINTS, clock=time.time):
        self.store = store
        self.signer = signer
        self.origin = signer.name
        self.witnesses = {w.name: w for w in witnesses}
        self.checkpoint_interval_s = checkpoint_interval_s
        self.keep_recent = keep_recent
        self._clock = clock
        self.halted: str | None = None
        self._pages: OrderedDict[int, bytes] = OrderedDict()
        self._pages_lock = threading.Lock()
        self._hash_reader = None  # a read-only connection for hash pages
        self._sign_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._signed_since_prune = 0
        self._open()

    # -- start ---------------------------------------------------------------

    def _open(self) -> None:
        with self.store.writing() as tx:
            reader = self.store.writer_reader()
            size = reader.size()
            count = merkle.stored_hash_count(size)
            page, fill = divmod(count, HASHES_PER_PAGE)
            got = reader.hash_pages([page]).get(page, b"")
            if len(got) < fill * HASH_SIZE:
                raise StoreError(f"{self.store.path}: the tree's hash pages end before the "
                                 f"{size} entries they must cover")
            tail = got[:fill * HASH_SIZE]
            self._committed = _Committed(size, b"", page, tail)
            self._frontier = merkle.Frontier.load(size, self._read_with(reader))
            self._committed = _Committed(size, self._frontier.root(), page, tail)
            self.registry = entries.Registry()
            for idx, data in reader.registry_entries():
                self.registry.apply(entries.decode(data), idx)
            for dev_eui, seq in reader.latest_seqs().items():
                self.registry.note_seq(dev_eui, seq)
            last = reader.latest_checkpoint()
            self._last_checkpoint = last
            if last is not None:
                problem = self._inconsistency(last, self._read_with(reader))
                if problem:
                    self._halt(problem)
            del tx  # nothing written: the transaction only holds the writer lock

    # -- appends -----------------------------------------------------------------

    @contextmanager
    def writing(self) -> Iterator[LogTxn]:
        """One transaction of appends; published when it has committed."""
        if self.halted:
            raise LogHalted(self.halted)
        with self.store.writing() as tx:
            lt = LogTxn(self, tx)
            yield lt
            lt._finish()
        if lt.appended:
            self._frontier = lt.frontier
            self._committed = _Committed(lt.frontier.size, lt.frontier.root(), lt._page,
                                         bytes(lt._tail))
        if lt._registry is not None:
            self.registry = lt._registry
        for dev_eui, seq in lt._seqs.items():
            self.registry.note_seq(dev_eui, seq)

    # -- reading the tree --------------------------------------------------------

    @property
    def size(self) -> int:
        return self._committed.size

    @property
    def root(self) -> bytes:
        return self._committed.root

    def _read_with(self, reader: Reader):
        """A merkle.ReadHashes over one connection (for start and the guard)."""
        def read(indexes):
            c = self._committed
            pages = reader.hash_pages(sorted({i // HASHES_PER_PAGE for i in indexes}
                                             - {c.tail_page}))
            return [_pick(c.tail if i // HASHES_PER_PAGE == c.tail_page
                          else pages.get(i // HASHES_PER_PAGE, b""), i) for i in indexes]
        return read

    def read_hashes(self, indexes: Sequence[int]) -> list[bytes]:
        """merkle.ReadHashes over the committed tree: full pages from a cache
        (they never change), the filling page from memory."""
        c = self._committed
        want = {i // HASHES_PER_PAGE for i in indexes} - {c.tail_page}
        with self._pages_lock:
            found = {p: self._pages[p] for p in want if p in self._pages}
            missing = sorted(want - found.keys())
            if missing:
                if self._hash_reader is None:
                    self._hash_reader = self.store._connect(readonly=True)
                loaded = Reader(self._hash_reader).hash_pages(missing)
                for p, data in loaded.items():
                    if len(data) == PAGE_BYTES:
                        self._pages[p] = data
                found.update(loaded)
            for p in found:
                if p in self._pages:
                    self._pages.move_to_end(p)
            while len(self._pages) > _PAGE_CACHE:
                self._pages.popitem(last=False)
        return [_pick(c.tail if i // HASHES_PER_PAGE == c.tail_page
                      else found.get(i // HASHES_PER_PAGE, b""), i) for i in indexes]

    def prove_inclusion(self, index: int, size: int) -> list[bytes]:
        self._check_size(size)
        if not 0 <= index < size:
            raise ValueError(f"index {index} is not in a tree of size {size}")
        return merkle.prove_inclusion(index, size, self.read_hashes)

    def prove_consistency(self, old: int, new: int) -> list[bytes]:
        self._check_size(new)
        if not 0 <= old <= new:
            raise ValueError(f"size {old} is not between 0 and {new}")
        return merkle.prove_consistency(old, new, self.read_hashes)

    def tree_hash(self, size: int) -> bytes:
        self._check_size(size)
        return merkle.tree_hash(size, self.read_hashes)

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self._committed.size:
            raise ValueError(f"size {size} is beyond the log's {self._committed.size} entries")

    # -- checkpoints ---------------------------------------------------------------

    def _inconsistency(self, last, read) -> str | None:
        size = self._committed.size
        if last.size > size:
            return (f"the log has {size} entries but a checkpoint of size {last.size} was "
                    "signed: entries were lost")
        root = merkle.tree_hash(last.size, read)
        if root != last.root:
            return (f"the tree at size {last.size} no longer has the root that was signed "
                    f"({last.root.hex()[:16]}..., now {root.hex()[:16]}...)")
        return None

    def _halt(self, problem: str) -> None:
        self.halted = problem
        log.critical("log halted, nothing more is signed or admitted: %s", problem)

    def sign_checkpoint(self) -> ckpt.Checkpoint | None:
        """Sign a checkpoint of the committed tree when it has grown since the
        last one (or when there is none yet); None when nothing was signed."""
        with self._sign_lock:
            if self.halted:
                return None
            c = self._committed
            last = self._last_checkpoint
            if last is not None and last.size == c.size:
                return None
            if last is not None:
                problem = self._inconsistency(last, self.read_hashes)
                if problem:
                    self._halt(problem)
                    return None
            cp = ckpt.Checkpoint(self.origin, c.size, c.root)
            signed = ckpt.sign_checkpoint(cp, self.signer)
            now = self._clock()
            with self.store.writing() as tx:
                tx.put_checkpoint(c.size, c.root, signed, now)
                self._signed_since_prune += 1
                if self._signed_since_prune >= 16:
                    self._prune(tx)
                    self._signed_since_prune = 0
            self._last_checkpoint = StoredCheckpoint(c.size, c.root, signed, now)
            return cp

    def _prune(self, tx: WriteTxn) -> None:
        sizes = tx.checkpoint_sizes()
        if len(sizes) <= self.keep_recent:
            return
        keep = {s for s, _ in sizes[-self.keep_recent:]}
        # A witness catching up on a long backlog cosigns a checkpoint some
        # minutes old; it must still be there when the cosignature arrives.
        recent = self._clock() - KEEP_CHECKPOINTS_FOR_S
        keep.update(s for s, at in sizes if at >= recent)
        hours = set()
        for s, at in sizes:
            hour = int(at // 3600)
            if hour not in hours:
                hours.add(hour)
                keep.add(s)
        cosigned = self.store.writer_reader().best_checkpoint()
        if cosigned is not None:
            keep.add(cosigned.size)
        tx.prune_checkpoints(sorted(keep), sizes[-1][0])

    def checkpoint_note(self, size: int | None = None) -> str | None:
        """A signed checkpoint with the cosignatures it has: the latest, or
        the retained one of `size`; None when there is none."""
        with self.store.reader() as r:
            stored = r.latest_checkpoint() if size is None else r.checkpoint(size)
            if stored is None:
                return None
            lines = [line for _, line in r.cosignatures(stored.size)]
        return ckpt.add_cosignatures(stored.note, lines) if lines else stored.note

    def add_cosignature(self, size: int, line: str) -> tuple[str, bool]:
        """Keep a witness's cosignature of the retained checkpoint of `size`.
        Returns (witness name, stored now); raises CosignatureRefused."""
        try:
            sig = note.parse_signature_line(line.rstrip("\n"))
        except note.NoteError as exc:
            raise CosignatureRefused("malformed", f"cosignature: {exc}") from None
        name = sig.name
        witness = self.witnesses.get(name)
        if witness is None or witness.key_id != sig.key_id:
            raise CosignatureRefused("unknown_witness",
                                     f"cosignature: {name!r} with key id {sig.key_id.hex()} is "
                                     "not a witness of this log")
        with self.store.reader() as r:
            stored = r.checkpoint(size)
        if stored is None:
            raise CosignatureRefused("unknown_checkpoint",
                                     f"size: no retained checkpoint of size {size}")
        body = ckpt.Checkpoint(self.origin, stored.size, stored.root).body()
        if witness.verify(body, sig.signature) is None:
            raise CosignatureRefused("bad_cosignature",
                                     f"cosignature of {name} does not verify over the "
                                     f"checkpoint of size {size}")
        with self.store.writing() as tx:
            fresh = tx.put_cosignature(size, name, line.rstrip("\n") + "\n", self._clock())
        return name, fresh

    # -- the signer thread -------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self.sign_checkpoint()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="checkpoints", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.checkpoint_interval_s):
            try:
                self.sign_checkpoint()
            except Exception:  # a full disk must not end checkpointing for good
                log.exception("signing a checkpoint failed; trying again")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._pages_lock:
            if self._hash_reader is not None:
                self._hash_reader.close()
                self._hash_reader = None


def _pick(page: bytes, index: int) -> bytes:
    off = (index % HASHES_PER_PAGE) * HASH_SIZE
    h = page[off:off + HASH_SIZE]
    if len(h) != HASH_SIZE:
        raise StoreError(f"stored hash {index} is missing from the hash pages")
    return h
