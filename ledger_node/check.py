"""Consistency check of a ledger database: `ledger-node check --db` and GET /v1/check.

Runs the offline audit (ledger_node.verify.Auditor: every entry decodes, the
registry replays by its rules, every device signature verifies with the key
the registry held at that entry, each device's readings obey admission's
order rules, the tree recomputed from the entries has every stored
checkpoint's root) over the database's entries and checkpoints, and then
checks what only the database has, all of which must be derivable from the
entries:

- the hash pages hold exactly the stored hashes recomputed from the entries
  (merkle.Frontier.append, in the stored-hash layout), since proofs and the
  checkpoint signer read the tree from them;
- each checkpoint row's root column is the root in its signed note;
- the registry table marks exactly the enroll, rotate and revoke entries
  (the node replays only those at start);
- the readings index holds every reading of the entries once, pointing at
  the first entry that holds it, with that entry's values, and nothing else.

The database does not know the log's verifier key, so checkpoint signatures
are checked only when the caller passes it (`log_vkey`); roots and their
consistency are checked either way.
"""

from __future__ import annotations

import os

from . import checkpoint as ckpt
from . import merkle, note
from .store import HASH_SIZE, HASHES_PER_PAGE, PAGE_BYTES, Reader, Store
from .verify import (CHECKPOINT_MALFORMED, CHECKPOINT_ROOT, MAX_PROBLEMS, Auditor,
                     Problems)

HASH_PAGES = "hash_pages"
REGISTRY_INDEX = "registry_index"
INDEX_MISSING = "index_missing"
INDEX_EXTRA = "index_extra"
INDEX_MISMATCH = "index_mismatch"

_PAGES_PER_READ = 64
_COLUMNS = ("t_end", "import_dwh", "export_dwh", "flags", "entry")


def check_store(store: Store, max_problems: int = MAX_PROBLEMS, *,
                log_vkey: str | None = None, workers: int | None = None) -> dict:
    """The consistency report: {"ok", "entries", "readings", "devices",
    "checkpoints", "problems_total", "problems": [{"kind", "entry",
    "dev_eui", "seq", "message"}]} and the audit's other counts (see
    ledger_node.verify.audit). Reads one snapshot, so the node may keep
    appending meanwhile."""
    with store.reader() as r:
        problems = Problems(max_problems)
        pages = _HashPages(r, problems)
        a = Auditor(None, log_vkey, workers=workers if workers is not None else os.cpu_count(),
                    problems=problems, on_hashes=pages.add)
        try:
            for stored in r.checkpoints():
                a.checkpoint(_stored_note(r, stored, problems))
            for idx, data in r.iter_entries():
                a.entry(idx, data)
            report = a.finish()
        finally:
            a.close()
        pages.finish()
        _check_registry_table(r, a, problems)
        _check_index(r, a, problems)
    report["ok"] = problems.total == 0
    report["problems_total"] = problems.total
    report["problems"] = problems.listed
    return report


def _stored_note(r: Reader, stored, problems: Problems) -> str:
    """The checkpoint note with its cosignatures, after checking the row's
    root column against the note (the log's consistency guard trusts the
    column)."""
    at = stored.size - 1 if stored.size else None
    try:
        cp = ckpt.Checkpoint.parse(note.split(stored.note)[0])
    except (note.NoteError, ckpt.CheckpointError):
        pass  # the audit reports the malformed note
    else:
        if cp.size != stored.size:
            problems.add(CHECKPOINT_ROOT, f"the checkpoints row of size {stored.size} holds a "
                                          f"note of size {cp.size}", at)
        elif cp.root != stored.root:
            problems.add(CHECKPOINT_ROOT, f"the checkpoints row of size {stored.size} has root "
                                          f"{stored.root.hex()[:16]}..., its signed note "
                                          f"{cp.root.hex()[:16]}...", at)
    lines = [line for _, line in r.cosignatures(stored.size)]
    if not lines:
        return stored.note
    try:
        return ckpt.add_cosignatures(stored.note, lines)
    except ckpt.CheckpointError as exc:
        problems.add(CHECKPOINT_MALFORMED, f"cosignatures of the checkpoint of size "
                                           f"{stored.size}: {exc}", at)
        return stored.note


class _HashPages:
    """Compares the stored hashes the entries make (fed in order by the
    audit) with the hash pages, one page at a time."""

    def __init__(self, r: Reader, problems: Problems):
        self.r = r
        self.problems = problems
        self.buf = bytearray()
        self.page = 0
        self.cache: dict[int, bytes] = {}

    def add(self, hashes: list[bytes]) -> None:
        self.buf += b"".join(hashes)
        if len(self.buf) >= PAGE_BYTES:
            want = bytes(self.buf[:PAGE_BYTES])
            del self.buf[:PAGE_BYTES]
            self._compare(want)
            self.page += 1

    def _stored(self, page: int) -> bytes | None:
        if page not in self.cache:
            self.cache = self.r.hash_pages(list(range(page, page + _PAGES_PER_READ)))
            self.cache.setdefault(page, None)
        return self.cache[page]

    def _compare(self, want: bytes) -> None:
        page = self.page
        got = self._stored(page)
        if got == want:
            return
        first = page * HASHES_PER_PAGE
        if got is None:
            self.problems.add(HASH_PAGES, f"hash page {page} (stored hashes {first}.."
                                          f"{first + len(want) // HASH_SIZE - 1}) is missing",
                              _entry_of(first))
            return
        for i in range(0, min(len(got), len(want)), HASH_SIZE):
            if got[i:i + HASH_SIZE] != want[i:i + HASH_SIZE]:
                k = first + i // HASH_SIZE
                level, n = merkle.split_stored_hash_index(k)
                lo, hi = n << level, ((n + 1) << level) - 1
                self.problems.add(HASH_PAGES, f"hash page {page}: stored hash {k} (level "
                                              f"{level}, over entries {lo}..{hi}) is not the "
                                              "hash recomputed from the entries", hi)
                return
        self.problems.add(HASH_PAGES, f"hash page {page} holds {len(got) // HASH_SIZE} hashes"
                                      f"{' and a partial one' if len(got) % HASH_SIZE else ''}, "
                                      f"the entries make {len(want) // HASH_SIZE}",
                          _entry_of(first + min(len(got), len(want)) // HASH_SIZE))

    def finish(self) -> None:
        # The last page holds exactly the hashes made so far (the log
        # rewrites it whole at each commit); no page follows it.
        if self.buf:
            self._compare(bytes(self.buf))
            self.page += 1
        extra = self.r.hash_pages([self.page])
        if extra:
            self.problems.add(HASH_PAGES, f"hash page {self.page} is stored, but the entries "
                                          f"fill only {self.page} page(s)")


def _entry_of(stored_index: int) -> int:
    """The entry whose append wrote a stored hash."""
    level, n = merkle.split_stored_hash_index(stored_index)
    return ((n + 1) << level) - 1


def _check_registry_table(r: Reader, a: Auditor, problems: Problems) -> None:
    marked = [idx for idx, _ in r.registry_entries()]
    logged = a.registry_entries
    for idx in sorted(set(logged) - set(marked)):
        problems.add(REGISTRY_INDEX, f"entry {idx} is a registry change the registry table does "
                                     "not mark: the node would not replay it at start", idx)
    for idx in sorted(set(marked) - set(logged)):
        problems.add(REGISTRY_INDEX, f"the registry table marks entry {idx}, which is not an "
                                     "enroll, rotate or revoke", idx)


def _check_index(r: Reader, a: Auditor, problems: Problems) -> None:
    """Merge the readings of the entries with the readings index, both in
    (dev_eui, seq) order."""
    logged = a.sorted_readings()
    indexed = ((dev, x.seq, x.t_end, x.import_dwh, x.export_dwh, x.flags, x.entry)
               for dev, x in r.iter_index())
    want, got = next(logged, None), next(indexed, None)
    while want is not None or got is not None:
        if got is None or (want is not None and want[:2] < got[:2]):
            problems.add(INDEX_MISSING, f"seq {want[1]} of entry {want[6]} is not in the "
                                        "readings index", want[6], want[0], want[1])
            want = next(logged, None)
        elif want is None or got[:2] < want[:2]:
            problems.add(INDEX_EXTRA, f"the readings index has seq {got[1]} (entry {got[6]}), "
                                      "which no entry of the device holds", got[6], got[0],
                         got[1])
            got = next(indexed, None)
        else:
            if want != got:
                differ = ", ".join(f"{name} {g} but the entries give {w}" for name, g, w
                                   in zip(_COLUMNS, got[2:], want[2:]) if g != w)
                problems.add(INDEX_MISMATCH, f"readings index row of seq {want[1]}: {differ}",
                             want[6], want[0], want[1])
            want, got = next(logged, None), next(indexed, None)
