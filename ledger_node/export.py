"""What leaves the ledger node to be checked elsewhere: proof bundles and whole-log exports.

A **proof bundle** lets anyone check one reading without trusting the node
(`ledger-verify bundle`): the entry that holds the reading, the device's
registry entries (which key signs which seqs, and whether it was revoked),
an inclusion proof for each, and the signed checkpoint with the witnesses'
cosignatures that the proofs lead to.

    {"format": "meter-ledger-proof/1",
     "checkpoint": "<signed note with cosignature lines>",
     "seq": 1234,
     "entry": {"index": 17, "data": "<hex>", "inclusion": ["<hex>", ...]},
     "registry": [{"index": 3, "data": "<hex>", "inclusion": [...]}, ...]}

A **log export** is the whole log in one file, for an offline audit
(`ledger-verify audit`): the first line `meter-ledger-export/1`, then
records `kind (1 byte) || length (u32 big-endian) || payload`: `E` an entry
(consecutive from index 0), `C` a signed checkpoint with its cosignatures
(UTF-8), placed right after the entry that completes its size, and `Z` the
end (payload: the number of entries as u64), so a truncated file is told
from a short log.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, Iterator

from . import checkpoint as ckpt
from . import entries
from .store import Reader, Store

PROOF_FORMAT = "meter-ledger-proof/1"
EXPORT_MAGIC = b"meter-ledger-export/1\n"
ENTRY, CHECKPOINT, END = b"E", b"C", b"Z"
_HEAD = struct.Struct(">cI")
MAX_RECORD = 1 << 20  # an entry is at most a few hundred bytes; a note a few KiB


class ExportError(ValueError):
    """The export file is malformed or truncated."""


# -- proof bundles ------------------------------------------------------------

def proof_bundle(log_, index: int, seq: int | None = None) -> dict | None:
    """The proof bundle of entry `index` against the retained checkpoint that
    covers it with the most cosignatures (the newest among equals); None
    when no signed checkpoint covers the entry yet."""
    with log_.store.reader() as r:
        stored = r.best_checkpoint(min_size=index + 1)
        if stored is None:
            return None
        data = r.entry(index)
        if data is None:
            return None
        entry = entries.decode(data)
        state = log_.registry.device(entry.dev_eui)
        registry = []
        if state is not None:
            wanted = [state.enrolled] + [p.entry for p in state.keys[1:]]
            if state.revoked is not None:
                wanted.append(state.revoked)
            registry = [(i, r.entry(i)) for i in sorted(set(wanted)) if i < stored.size]
        lines = [line for _, line in r.cosignatures(stored.size)]
    note_text = ckpt.add_cosignatures(stored.note, lines) if lines else stored.note

    def proved(i: int, d: bytes) -> dict:
        return {"index": i, "data": d.hex(),
                "inclusion": [h.hex() for h in log_.prove_inclusion(i, stored.size)]}

    if seq is None and isinstance(entry, entries.ReadingsEntry):
        seq = entry.decoded().first_seq
    return {"format": PROOF_FORMAT, "checkpoint": note_text, "seq": seq,
            "entry": proved(index, data),
            "registry": [proved(i, d) for i, d in registry]}


# -- whole-log exports -----------------------------------------------------------

def write_export(source: Store | Reader, out: BinaryIO) -> int:
    """Write the whole log to `out`; returns the number of entries. Reads
    one snapshot, so the node may keep appending meanwhile."""
    if isinstance(source, Store):
        with source.reader() as r:
            return write_export(r, out)
    r = source
    size = r.size()
    notes: dict[int, list[str]] = {}
    for stored in r.checkpoints():
        if stored.size <= size:
            lines = [line for _, line in r.cosignatures(stored.size)]
            notes.setdefault(stored.size, []).append(
                ckpt.add_cosignatures(stored.note, lines) if lines else stored.note)
    out.write(EXPORT_MAGIC)

    def record(kind: bytes, payload: bytes) -> None:
        out.write(_HEAD.pack(kind, len(payload)))
        out.write(payload)

    for text in notes.get(0, ()):
        record(CHECKPOINT, text.encode())
    count = 0
    for idx, data in r.iter_entries(0, size):
        if idx != count:
            raise ExportError(f"entry {count} is missing from the database")
        record(ENTRY, data)
        count += 1
        for text in notes.get(count, ()):
            record(CHECKPOINT, text.encode())
    record(END, struct.pack(">Q", count))
    return count


def read_export(f: BinaryIO) -> Iterator[tuple]:
    """("entry", index, data), ("checkpoint", note text) and finally
    ("end", count). Raises ExportError when the file is not an export, is
    truncated or its records are malformed."""
    magic = f.read(len(EXPORT_MAGIC))
    if magic != EXPORT_MAGIC:
        raise ExportError("not a ledger export: the first line is not "
                          f"{EXPORT_MAGIC.decode().strip()!r}")
    index = 0
    while True:
        head = f.read(_HEAD.size)
        if len(head) < _HEAD.size:
            raise ExportError(f"export ends after {index} entries without its end record "
                              "(truncated)")
        kind, length = _HEAD.unpack(head)
        if length > MAX_RECORD:
            raise ExportError(f"record after entry {index} claims {length} bytes")
        payload = f.read(length)
        if len(payload) != length:
            raise ExportError(f"record after entry {index} is truncated")
        if kind == ENTRY:
            yield ("entry", index, payload)
            index += 1
        elif kind == CHECKPOINT:
            try:
                yield ("checkpoint", payload.decode("utf-8"))
            except UnicodeDecodeError:
                raise ExportError(f"checkpoint after entry {index} is not UTF-8") from None
        elif kind == END:
            if length != 8 or struct.unpack(">Q", payload)[0] != index:
                raise ExportError(f"end record does not match the {index} entries read")
            if f.read(1):
                raise ExportError("data after the end record")
            yield ("end", index)
            return
        else:
            raise ExportError(f"unknown record kind {kind!r} after entry {index}")
