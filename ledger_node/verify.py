"""Offline verification, without the ledger node and without a network:
a reading's proof bundle against a trust policy, and an audit of a whole
exported log.

    ledger-verify bundle proof.json --policy policy.toml [--json]
    ledger-verify audit ledger.export [--policy policy.toml] [--log-key VKEY]
                        [--workers N] [--json]

Exit codes: 0 verified / clean, 1 proof refused / problems found, 2 could not
run (a missing file, an unusable policy, a file that is not an export).

A **proof bundle** (ledger_node.export) is checked step by step, and the
first step that fails refuses it with a message saying what did not match:
the checkpoint's log signature, origin and witness quorum (checkpoint.py);
an inclusion proof of the reading's entry and of each of the device's
registry entries to that checkpoint's root; the registry replayed from those
entries (entries.Registry, the same rules as admission and witnesses); the
device's signature over the bundle with the key the registry gives for its
seqs as of the entry; and finally that the bundle holds the seq asked for.

An **audit** replays the whole log: every entry decodes, every registry
change follows the key rules, every reading entry's device signature
verifies with the key the registry held at its index, each device's readings
obey admission's rules (a seq logged twice has the same values; in seq order
registers never go backwards, nor does t_end between clock-synced readings),
and the tree recomputed from the entries has the root of every checkpoint,
which proves all the checkpoints consistent with each other. The checkpoints'
log signatures are checked with the policy's key (or --log-key), and the
newest checkpoint with the policy's quorum of witness cosignatures says how
much of the log the witnesses vouch for.

Ed25519 verification is nearly all of an audit's cost (about 45 us per
signature against about 10 us for everything else an entry needs), so it runs
in worker processes on chunks of (key, signed message) pairs, while this
process reads, decodes, replays the registry, checks the order rules and
recomputes the tree. `ledger-node check` (ledger_node.check) runs the same
audit over a database.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
import threading
import time
from array import array
from bisect import bisect_left
from collections import deque
from typing import Iterable, Iterator

import nacl.bindings
import nacl.exceptions

from meter import frame

from . import checkpoint as ckpt
from . import entries, export, merkle, note
from .admission import CONFLICT, REGISTERS_BACKWARDS, TIME_BACKWARDS

EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2

MAX_PROBLEMS = 1000  # listed in a report; all are counted
CHUNK = 4096  # signatures per job sent to a worker process
_IN_FLIGHT = 3  # jobs queued per worker: enough to keep them busy, bounded memory
_JOB_TIMEOUT_S = 120.0  # one job takes a fraction of a second

# Problem kinds besides the registry's refusal reasons (unknown_device,
# revoked_device, bad_signature, straddles_rotation, already_enrolled, ...)
# and admission's order rules (conflict, registers_backwards, time_backwards).
MALFORMED_ENTRY = "malformed_entry"
ENTRY_INDEX = "entry_index"
EXPORT = "export"
CHECKPOINT_MALFORMED = "checkpoint_malformed"
CHECKPOINT_SIGNATURE = "checkpoint_signature"
CHECKPOINT_ROOT = "checkpoint_root"
CHECKPOINT_SIZE = "checkpoint_size"
NO_CHECKPOINT = "no_checkpoint"
QUORUM = "quorum"

_UNSYNCED = frame.FLAG_CLOCK_UNSYNCED
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*\Z")


# -- proof bundles -------------------------------------------------------------

class _Refused(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def _hex_bytes(value, where: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise _Refused("malformed", f"{where}: expected a string of hex digits, got "
                                    f"{_json_type(value)}")
    # bytes.fromhex alone would skip spaces.
    if not _HEX.match(value):
        raise _Refused("malformed", f"{where}: not an even number of hex digits: {value[:40]!r}")
    raw = bytes.fromhex(value)
    if size is not None and len(raw) != size:
        raise _Refused("malformed", f"{where}: expected {size} bytes, got {len(raw)}")
    return raw


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _index(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Refused("malformed", f"{where}: expected an entry index (an integer >= 0), got "
                                    f"{_json_type(value)} {value!r:.40}")
    return value


def _proved_item(item, where: str) -> tuple[int, bytes, list[bytes]]:
    if not isinstance(item, dict):
        raise _Refused("malformed", f"{where}: expected an object, got {_json_type(item)}")
    for key in ("index", "data", "inclusion"):
        if key not in item:
            raise _Refused("malformed", f"{where}.{key}: missing")
    index = _index(item["index"], f"{where}.index")
    data = _hex_bytes(item["data"], f"{where}.data")
    proof = item["inclusion"]
    if not isinstance(proof, list):
        raise _Refused("malformed", f"{where}.inclusion: expected an array of hashes, got "
                                    f"{_json_type(proof)}")
    hashes = [_hex_bytes(h, f"{where}.inclusion[{i}]", merkle.HASH_SIZE)
              for i, h in enumerate(proof)]
    return index, data, hashes


def _parse_bundle(doc) -> tuple[str, int, tuple, list[tuple]]:
    if not isinstance(doc, dict):
        raise _Refused("malformed", f"a proof bundle is a JSON object, got {_json_type(doc)}")
    for key in ("format", "checkpoint", "seq", "entry", "registry"):
        if key not in doc:
            raise _Refused("malformed", f"{key}: missing")
    if doc["format"] != export.PROOF_FORMAT:
        raise _Refused("malformed", f"format: {doc['format']!r:.60} is not "
                                    f"{export.PROOF_FORMAT!r}")
    if not isinstance(doc["checkpoint"], str):
        raise _Refused("malformed", f"checkpoint: expected the signed note as a string, got "
                                    f"{_json_type(doc['checkpoint'])}")
    seq = doc["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= entries.U32_MAX:
        raise _Refused("malformed", f"seq: expected an integer in 0..{entries.U32_MAX}, got "
                                    f"{_json_type(seq)} {seq!r:.40}")
    entry = _proved_item(doc["entry"], "entry")
    if not isinstance(doc["registry"], list):
        raise _Refused("malformed", f"registry: expected an array, got "
                                    f"{_json_type(doc['registry'])}")
    registry = [_proved_item(item, f"registry[{i}]") for i, item in enumerate(doc["registry"])]
    return doc["checkpoint"], seq, entry, registry


def verify_proof_bundle(doc: dict, policy: ckpt.Policy) -> dict:
    """Check a proof bundle (the parsed JSON) against a policy.

    Returns {"ok": True, "dev_eui", "seq", "t_end", "import_dwh",
    "export_dwh", "flags", "flag_names", "entry", "checkpoint_size", "origin",
    "witnesses", "device"} for the reading, or {"ok": False, "kind",
    "message"} saying which check refused it (kind: malformed, checkpoint,
    inclusion, registry, signature, seq). Never raises for bad input.

    What a proof bundle can not show: that no revocation of the device (or
    rotation of its key) was logged after the checkpoint; only a newer
    checkpoint's bundle can. Nor can it show that it lists every registry
    entry of the device before the checkpoint: a log that left one out would
    be caught by the witnesses and audits that replay the whole log, not
    here. And the tree size and root every proof is checked against must come
    from one and the same signed checkpoint: both are taken from the note
    whose signatures were verified, never from anywhere else in the document.
    """
    try:
        return _verify_bundle(doc, policy)
    except _Refused as exc:
        return {"ok": False, "kind": exc.kind, "message": exc.message}


def _verify_bundle(doc, policy: ckpt.Policy) -> dict:
    signed, seq, (index, data, proof), registry_items = _parse_bundle(doc)
    try:
        cp, witnesses = ckpt.verify_checkpoint(signed, policy)
    except ckpt.CheckpointError as exc:
        raise _Refused("checkpoint", f"checkpoint: {exc}") from None

    def included(i: int, d: bytes, p: list[bytes], what: str) -> None:
        try:
            merkle.check_inclusion(p, i, cp.size, merkle.leaf_hash(d), cp.root)
        except merkle.ProofError as exc:
            raise _Refused("inclusion", f"{what} (entry {i}) is not proven in the checkpoint of "
                                        f"size {cp.size}: {exc}") from None

    included(index, data, proof, "the reading's entry")
    for n, (i, d, p) in enumerate(registry_items):
        included(i, d, p, f"registry[{n}]")

    try:
        entry = entries.decode(data)
    except entries.EntryError as exc:
        raise _Refused("malformed", f"entry {index}: {exc}") from None
    if not isinstance(entry, entries.ReadingsEntry):
        raise _Refused("malformed", f"entry {index} is a {type(entry).__name__.lower()} entry, "
                                    "not a readings entry")
    dev = entry.dev_eui

    registry = entries.Registry()
    last = -1
    for n, (i, d, _) in enumerate(registry_items):
        if i <= last:
            raise _Refused("registry", f"registry[{n}]: entry {i} after entry {last}; registry "
                                       "entries are listed once each, in index order")
        if i == index:
            raise _Refused("registry", f"registry[{n}]: entry {i} is the reading's own entry")
        last = i
        try:
            change = entries.decode(d)
        except entries.EntryError as exc:
            raise _Refused("registry", f"registry[{n}] (entry {i}): {exc}") from None
        if isinstance(change, entries.ReadingsEntry):
            raise _Refused("registry", f"registry[{n}] (entry {i}) is a readings entry, not an "
                                       "enroll, rotate or revoke")
        if change.dev_eui != dev:
            raise _Refused("registry", f"registry[{n}] (entry {i}) is of device "
                                       f"{change.dev_eui.hex()}, not {dev.hex()} whose reading "
                                       "this is")
        try:
            registry.apply(change, i)
        except entries.Refused as exc:
            raise _Refused("registry", f"registry[{n}] (entry {i}): {exc.reason}: {exc}") from None

    try:
        bundle = registry.verify_readings(entry, as_of=index)
    except entries.Refused as exc:
        kind = "signature" if exc.reason in (entries.BAD_SIGNATURE,
                                             entries.STRADDLES_ROTATION) else "registry"
        raise _Refused(kind, f"entry {index}: {exc.reason}: {exc}") from None

    reading = next((r for r in bundle.readings if r.seq == seq), None)
    if reading is None:
        raise _Refused("seq", f"seq {seq} is not in entry {index}, which holds seq "
                              f"{bundle.first_seq}..{bundle.last_seq} of {dev.hex()}")
    state = registry.device(dev)
    return {
        "ok": True, "dev_eui": dev.hex(), "seq": reading.seq, "t_end": reading.t_end,
        "import_dwh": reading.import_dwh, "export_dwh": reading.export_dwh,
        "flags": reading.flags, "flag_names": frame.flag_names(reading.flags),
        "entry": index, "checkpoint_size": cp.size, "origin": cp.origin,
        "witnesses": witnesses,
        "device": {"community": state.enroll.community, "owner": state.enroll.owner,
                   "key_entry": _key_entry(state, reading.seq, index),
                   "revoked": None if state.revoked is None else
                   {"entry": state.revoked, "reason": state.revoke_reason}},
    }


def _key_entry(state: entries.DeviceState, seq: int, as_of: int) -> int:
    """The entry that brought the key the reading was verified with."""
    found = state.keys[0]
    for p in state.keys:
        if p.from_seq <= seq and p.entry < as_of:
            found = p
    return found.entry


# -- the audit -------------------------------------------------------------------

def _verify_chunk(items: list[tuple[bytes, bytes]]) -> list[int]:
    """Positions of the (public key, signed message) pairs that do not
    verify. Runs in the worker processes (and in this one for small logs)."""
    bad = []
    open_ = nacl.bindings.crypto_sign_open
    for i, (key, signed) in enumerate(items):
        try:
            open_(signed, key)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            bad.append(i)
    return bad


class _Device:
    """One device's readings: every distinct seq with its values and the
    first entry that holds it, as columns (a few bytes per reading instead
    of a Python object). While the readings arrive in seq order the rules
    are checked on the fly against the last one; a device whose readings
    arrive out of order (a meter catching up after an outage) is sorted and
    checked once at the end."""

    __slots__ = ("seq", "t_end", "imp", "exp", "flags", "entry", "in_order",
                 "synced_t", "synced_seq", "synced_entry")

    def __init__(self):
        self.seq = array("q")
        self.t_end = array("q")
        self.imp = array("q")
        self.exp = array("q")
        self.flags = array("q")
        self.entry = array("q")
        self.in_order = True
        self.synced_t = -1  # the newest clock-synced reading so far (in-order devices)
        self.synced_seq = -1
        self.synced_entry = -1

    def __len__(self) -> int:
        return len(self.seq)

    def append(self, seq: int, t_end: int, imp: int, exp: int, flags: int, entry: int) -> None:
        self.seq.append(seq)
        self.t_end.append(t_end)
        self.imp.append(imp)
        self.exp.append(exp)
        self.flags.append(flags)
        self.entry.append(entry)

    def row(self, i: int) -> tuple:
        return (self.seq[i], self.t_end[i], self.imp[i], self.exp[i], self.flags[i],
                self.entry[i])


class Problems:
    """Problems found: the first max_problems listed, all counted."""

    def __init__(self, max_problems: int):
        self.max_problems = max_problems
        self.listed: list[dict] = []
        self.total = 0

    def add(self, kind: str, message: str, entry: int | None = None,
            dev_eui: bytes | None = None, seq: int | None = None) -> None:
        self.total += 1
        if len(self.listed) < self.max_problems:
            self.listed.append({"kind": kind, "entry": entry,
                                "dev_eui": None if dev_eui is None else dev_eui.hex(),
                                "seq": seq, "message": message})


class Auditor:
    """The audit's state, fed entry by entry and checkpoint by checkpoint.

    `audit` drives it over an export; ledger_node.check drives it over a
    database, with `on_hashes` receiving the stored hashes each entry
    completes (merkle.Frontier.append) to compare with the hash pages.
    Entries come in log order; checkpoints may come before the entry that
    completes their size (they are checked when the tree reaches it)."""

    def __init__(self, policy: ckpt.Policy | None = None, log_vkey: str | None = None, *,
                 workers: int | None = None, chunk: int = CHUNK,
                 max_problems: int = MAX_PROBLEMS, problems: Problems | None = None,
                 on_hashes=None):
        self.policy = policy
        if policy is not None:
            self.log_verifier: note.Verifier | None = policy.log
        elif log_vkey is not None:
            self.log_verifier = note.Verifier(log_vkey)  # raises NoteError
        else:
            self.log_verifier = None
        self.workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self.chunk = max(1, chunk)
        self.problems = problems if problems is not None else Problems(max_problems)
        self.on_hashes = on_hashes
        self.started = time.perf_counter()

        self.frontier = merkle.Frontier()
        self.registry = entries.Registry()
        self.registry_entries: list[int] = []  # indexes of enroll/rotate/revoke entries
        self.devices: dict[bytes, _Device] = {}
        self.next_index = 0
        self.readings_in_entries = 0
        self.signatures = 0  # device signatures that verified
        self.ended: int | None = None

        self.checkpoints = 0
        self.checkpoint_signatures = 0
        self.signed_size: int | None = None  # largest checkpoint whose root matched
        self.witnessed: tuple[int, list[str]] | None = None  # (size, witnesses) with quorum
        self._quorum_miss: tuple[int, str] | None = None  # the newest checkpoint without
        self._pending_cps: dict[int, list[tuple[ckpt.Checkpoint, str]]] = {}

        self._items: list[tuple[bytes, bytes]] = []  # signatures of the chunk being filled
        self._meta: list[tuple[int, bytes, int, int]] = []  # (entry, dev_eui, first, last)
        self._held: list[tuple[list, list]] = []  # full chunks waiting for the pool to start
        self._jobs: deque = deque()  # (items, meta, AsyncResult)
        self._pool = None

    # Entries

    def entry(self, index: int, data: bytes) -> None:
        if index != self.next_index:
            gap = (f" (entries {self.next_index}..{index - 1} are missing)"
                   if index > self.next_index else "")
            self.problems.add(ENTRY_INDEX, f"entry {index} where entry {self.next_index} was "
                                           f"due{gap}: the tree is computed over the entries in "
                                           "the order they come", index)
        self.next_index = index + 1
        usable = True
        if type(data) is not bytes:
            if isinstance(data, (bytearray, memoryview)):
                data = bytes(data)
            else:
                self.problems.add(MALFORMED_ENTRY, f"entry data is {type(data).__name__}, not "
                                                   "bytes", index)
                data, usable = b"", False
        completed = self.frontier.append(merkle.leaf_hash(data))
        if self.on_hashes is not None:
            self.on_hashes(completed)
        if self._pending_cps and self.frontier.size in self._pending_cps:
            for cp, text in self._pending_cps.pop(self.frontier.size):
                self._check_checkpoint(cp, text)
        if not usable:
            return
        try:
            e = entries.decode(data)
        except entries.EntryError as exc:
            self.problems.add(MALFORMED_ENTRY, f"{exc.reason}: {exc}", index)
            return
        if type(e) is entries.ReadingsEntry:
            self._readings(index, e)
        else:
            self._registry_change(index, e)

    def _registry_change(self, index: int, change) -> None:
        self.registry_entries.append(index)
        try:
            self.registry.apply(change, index)
        except entries.Refused as exc:
            self.problems.add(exc.reason, f"{type(change).__name__.lower()} refused by the "
                                          f"registry rules: {exc}", index, change.dev_eui)

    def _readings(self, index: int, e: entries.ReadingsEntry) -> None:
        b = e.decoded()
        dev = e.dev_eui
        first, last = b.first_seq, b.last_seq
        reg = self.registry
        # The registry holds exactly the entries before this one, so it is in
        # its state as of this index; the key of a bundle is decided by the
        # registry (key_for), a straddling bundle refused by it too.
        try:
            key = reg.key_for(dev, first, as_of=index)
            if last != first and reg.key_for(dev, last, as_of=index) != key:
                reg.verify_readings(e, as_of=index)
        except entries.Refused as exc:
            self.problems.add(exc.reason, str(exc), index, dev, first)
            return
        # The seqs count for later rotations (from_seq must exceed them) as
        # the log holds them, even should the signature turn out bad: that
        # is reported here, against this entry.
        reg.note_seq(dev, last)
        self._items.append((key, b.signature + frame.SIGN_DOMAIN + dev + b.body))
        self._meta.append((index, dev, first, last))
        if len(self._items) >= self.chunk:
            self._send()

        d = self.devices.get(dev)
        if d is None:
            d = self.devices[dev] = _Device()
        self.readings_in_entries += len(b.readings)
        for r in b.readings:
            self._reading(d, dev, index, r)

    def _reading(self, d: _Device, dev: bytes, index: int, r) -> None:
        seq = r.seq
        seqs = d.seq
        if d.in_order and (not seqs or seq > seqs[-1]):
            if seqs:
                for name, col in (("import_dwh", d.imp), ("export_dwh", d.exp)):
                    value = getattr(r, name)
                    if value < col[-1]:
                        self.problems.add(REGISTERS_BACKWARDS, _order_msg(
                            name, value, seq, col[-1], seqs[-1], d.entry[-1]), index, dev, seq)
            if not r.flags & _UNSYNCED:
                if r.t_end < d.synced_t:
                    self.problems.add(TIME_BACKWARDS, _order_msg(
                        "t_end", r.t_end, seq, d.synced_t, d.synced_seq, d.synced_entry),
                        index, dev, seq)
                d.synced_t, d.synced_seq, d.synced_entry = r.t_end, seq, index
            d.append(seq, r.t_end, r.import_dwh, r.export_dwh, r.flags, index)
            return
        if d.in_order:
            at = bisect_left(seqs, seq)
            if seqs[at] == seq:  # logged before (a resent or overlapping bundle)
                logged = d.row(at)
                if logged[1:5] != (r.t_end, r.import_dwh, r.export_dwh, r.flags):
                    self.problems.add(CONFLICT, _conflict_msg(seq, logged[5], logged[1:5], r),
                                      index, dev, seq)
                return
            d.in_order = False
        d.append(seq, r.t_end, r.import_dwh, r.export_dwh, r.flags, index)

    def _finish_device(self, dev: bytes, d: _Device) -> None:
        """Sort an out-of-order device by seq (stable: the first entry of a
        seq stays first), check the rules over it and keep each seq once."""
        order = sorted(range(len(d)), key=d.seq.__getitem__)
        rows = [d.row(i) for i in order]
        kept: list[tuple] = []
        synced = None
        for row in rows:
            seq, t_end, imp, exp, flags, entry = row
            if kept and kept[-1][0] == seq:
                first = kept[-1]
                if first[1:5] != row[1:5]:
                    self.problems.add(CONFLICT, _conflict_msg(seq, first[5], first[1:5],
                                                              _Values(*row[1:5])),
                                      entry, dev, seq)
                continue
            if kept:
                prev = kept[-1]
                for name, col in (("import_dwh", 2), ("export_dwh", 3)):
                    if row[col] < prev[col]:
                        self._blame(REGISTERS_BACKWARDS, name, dev, row, prev, col)
            if not flags & _UNSYNCED:
                if synced is not None and t_end < synced[1]:
                    self._blame(TIME_BACKWARDS, "t_end", dev, row, synced, 1)
                synced = row
            kept.append(row)
        d.__init__()
        for row in kept:
            d.append(*row)

    def _blame(self, kind: str, name: str, dev: bytes, row: tuple, below: tuple,
               col: int) -> None:
        # Of two readings out of order, admission refuses the one logged
        # later, so that is the one reported.
        if row[5] >= below[5]:
            msg = _order_msg(name, row[col], row[0], below[col], below[0], below[5])
            self.problems.add(kind, msg, row[5], dev, row[0])
        else:
            msg = (f"{name} {below[col]} at seq {below[0]} is above {row[col]} logged at seq "
                   f"{row[0]} (entry {row[5]})")
            self.problems.add(kind, msg, below[5], dev, below[0])

    # Signatures

    def _send(self) -> None:
        items, meta = self._items, self._meta
        self._items, self._meta = [], []
        if self._pool is None and self.workers > 1:
            if not self._held:
                # One chunk may be the whole log: no pool is started for it.
                self._held.append((items, meta))
                return
            self._pool = self._start_pool()
            held, self._held = self._held, []
            for held_items, held_meta in held:
                self._submit(held_items, held_meta)
        self._submit(items, meta)

    def _start_pool(self):
        # fork is the quickest start, but forking a process that runs other
        # threads (the HTTP server's GET /v1/check) may copy a lock some
        # thread holds; such a process spawns fresh interpreters instead.
        method = "fork" if threading.active_count() == 1 else "spawn"
        try:
            return multiprocessing.get_context(method).Pool(self.workers)
        except (OSError, ValueError):
            self.workers = 1
            return None

    def _submit(self, items: list, meta: list) -> None:
        if self._pool is None:
            self._settle(meta, _verify_chunk(items))
            return
        self._jobs.append((items, meta, self._pool.apply_async(_verify_chunk, (items,))))
        while len(self._jobs) > _IN_FLIGHT * self.workers:
            self._collect()

    def _collect(self) -> None:
        """Settle the oldest job. A pool whose workers can not start (a
        spawned interpreter that can not import the main module) never
        answers: after a generous wait its jobs are verified here."""
        items, meta, job = self._jobs.popleft()
        try:
            bad = job.get(timeout=_JOB_TIMEOUT_S)
        except multiprocessing.TimeoutError:
            self.close()
            self.workers = 1
            bad = _verify_chunk(items)
            for items_, meta_, _ in self._jobs:
                self._settle(meta_, _verify_chunk(items_))
            self._jobs.clear()
        self._settle(meta, bad)

    def _settle(self, meta: list, bad: list[int]) -> None:
        self.signatures += len(meta) - len(bad)
        for i in bad:
            index, dev, first, last = meta[i]
            self.problems.add(entries.BAD_SIGNATURE,
                              f"signature of the bundle of seq {first}..{last} does not verify "
                              f"with the key of device {dev.hex()} for those seqs", index, dev,
                              first)

    def _drain(self) -> None:
        if self._pool is None:
            # Too few signatures to be worth starting worker processes.
            for items, meta in self._held + [(self._items, self._meta)]:
                self._settle(meta, _verify_chunk(items))
            self._held, self._items, self._meta = [], [], []
        elif self._items:
            self._send()
        try:
            while self._jobs:
                self._collect()
        finally:
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    # Checkpoints

    def checkpoint(self, signed: str) -> None:
        self.checkpoints += 1
        try:
            text, _ = note.split(signed)
            cp = ckpt.Checkpoint.parse(text)
        except (note.NoteError, ckpt.CheckpointError) as exc:
            self.problems.add(CHECKPOINT_MALFORMED, f"checkpoint after {self.frontier.size} "
                                                    f"entries: {exc}")
            return
        size = self.frontier.size
        if cp.size == size:
            self._check_checkpoint(cp, signed)
        elif cp.size > size:
            self._pending_cps.setdefault(cp.size, []).append((cp, signed))
        else:
            self.problems.add(CHECKPOINT_SIZE, f"checkpoint of size {cp.size} comes after entry "
                                               f"{size - 1}, not right after the entry that "
                                               "completes it: its root can not be checked",
                              cp.size - 1 if cp.size else None)

    def _check_checkpoint(self, cp: ckpt.Checkpoint, signed: str) -> None:
        at = cp.size - 1 if cp.size else None
        root = self.frontier.root()
        root_ok = cp.root == root
        if not root_ok:
            self.problems.add(CHECKPOINT_ROOT, f"checkpoint of size {cp.size} has root "
                                               f"{cp.root.hex()[:16]}..., the entries make "
                                               f"{root.hex()[:16]}...", at)
        v = self.log_verifier
        if v is None:
            if root_ok:
                self.signed_size = max(self.signed_size or 0, cp.size)
            return
        try:
            note.open_note(signed, [v])
        except note.NoteError as exc:
            self.problems.add(CHECKPOINT_SIGNATURE, f"checkpoint of size {cp.size}: not signed "
                                                    f"by the log key {v.name}+{v.key_id.hex()}: "
                                                    f"{exc}", at)
            return
        if cp.origin != v.name:
            self.problems.add(CHECKPOINT_SIGNATURE, f"checkpoint of size {cp.size}: origin "
                                                    f"{cp.origin!r} is not the log key's name "
                                                    f"{v.name!r}", at)
            return
        self.checkpoint_signatures += 1
        if not root_ok:
            return
        self.signed_size = max(self.signed_size or 0, cp.size)
        if self.policy is None:
            return
        try:
            _, witnesses = ckpt.verify_checkpoint(signed, self.policy)
        except ckpt.CheckpointError as exc:
            if self._quorum_miss is None or cp.size >= self._quorum_miss[0]:
                self._quorum_miss = (cp.size, str(exc))
            return
        if self.witnessed is None or cp.size >= self.witnessed[0]:
            self.witnessed = (cp.size, witnesses)

    def end(self, count: int) -> None:
        self.ended = count
        if count != self.next_index:
            self.problems.add(EXPORT, f"the end record counts {count} entries, "
                                      f"{self.next_index} were read")

    # The report

    def finish(self, expect_end: bool = False) -> dict:
        self._drain()
        size = self.frontier.size
        for cp_size in sorted(self._pending_cps):
            for cp, _ in self._pending_cps[cp_size]:
                self.problems.add(CHECKPOINT_SIZE, f"checkpoint of size {cp.size} but the log "
                                                   f"has {size} entries: entries are missing",
                                  None)
        self._pending_cps = {}
        if expect_end and self.ended is None:
            self.problems.add(EXPORT, f"the export ends after {size} entries without its end "
                                      "record (truncated)")
        for dev, d in self.devices.items():
            if not d.in_order:
                self._finish_device(dev, d)
        if self.checkpoints == 0:
            self.problems.add(NO_CHECKPOINT, "no signed checkpoint: nothing ties these entries "
                                             "to the log's key")
        elif self.policy is not None and self.witnessed is None:
            detail = ""
            if self._quorum_miss is not None:
                detail = f" (newest, of size {self._quorum_miss[0]}: {self._quorum_miss[1]})"
            self.problems.add(QUORUM, f"no checkpoint whose root matches has the policy's quorum "
                                      f"of {self.policy.quorum} witness cosignature(s){detail}")
        readings = sum(len(d) for d in self.devices.values())
        witnessed_size = None if self.witnessed is None else self.witnessed[0]
        return {
            "ok": self.problems.total == 0,
            "entries": size,
            "readings": readings,
            "readings_in_entries": self.readings_in_entries,
            "devices": len(self.registry),
            "checkpoints": self.checkpoints,
            "signatures": self.signatures,
            "checkpoint_signatures": (self.checkpoint_signatures
                                      if self.log_verifier is not None else None),
            "log_signatures_checked": self.log_verifier is not None,
            "signed_size": self.signed_size,
            "witnessed_size": witnessed_size,
            "witnesses": [] if self.witnessed is None else self.witnessed[1],
            "unwitnessed_entries": None if witnessed_size is None else size - witnessed_size,
            "root": self.frontier.root().hex(),
            "workers": self.workers,
            "seconds": round(time.perf_counter() - self.started, 3),
            "problems_total": self.problems.total,
            "problems": self.problems.listed,
        }

    def sorted_readings(self) -> Iterator[tuple]:
        """After finish(): every distinct reading as (dev_eui, seq, t_end,
        import_dwh, export_dwh, flags, first entry), in (dev_eui, seq) order."""
        for dev in sorted(self.devices):
            d = self.devices[dev]
            for i in range(len(d)):
                yield (dev,) + d.row(i)


class _Values:
    __slots__ = ("t_end", "import_dwh", "export_dwh", "flags")

    def __init__(self, t_end, import_dwh, export_dwh, flags):
        self.t_end, self.import_dwh, self.export_dwh, self.flags = (t_end, import_dwh,
                                                                    export_dwh, flags)


def _order_msg(name: str, value: int, seq: int, other: int, other_seq: int,
               other_entry: int) -> str:
    return (f"{name} {value} at seq {seq} is below {other} logged at seq {other_seq} "
            f"(entry {other_entry})")


def _conflict_msg(seq: int, first_entry: int, logged: tuple, r) -> str:
    names = ("t_end", "import_dwh", "export_dwh", "flags")
    now = (r.t_end, r.import_dwh, r.export_dwh, r.flags)
    differ = ", ".join(f"{n} {a} then {b}" for n, a, b in zip(names, logged, now) if a != b)
    return f"seq {seq} is logged in entry {first_entry} with other values ({differ})"


def audit(records: Iterable[tuple], policy: ckpt.Policy | None = None,
          workers: int | None = os.cpu_count(), *, log_vkey: str | None = None,
          max_problems: int = MAX_PROBLEMS, chunk: int = CHUNK) -> dict:
    """Audit a whole log from export.read_export records (or any iterable of
    the same tuples): ("entry", index, data), ("checkpoint", note text),
    ("end", count). The report: {"ok", "entries", "readings", "devices",
    "checkpoints", "signatures", "checkpoint_signatures",
    "log_signatures_checked", "signed_size", "witnessed_size", "witnesses",
    "seconds", "problems_total", "problems": [{"kind", "entry", "dev_eui",
    "seq", "message"}]}. A malformed or truncated export is a problem (kind
    export), reported with everything checked up to there.

    Checkpoint signatures are checked with the policy's log key, else with
    log_vkey, else not at all (log_signatures_checked is then false). The
    newest checkpoint with the policy's quorum of cosignatures gives
    witnessed_size; the entries after it (signed by the log alone, not yet
    cosigned when the export was taken) are unwitnessed_entries, not a
    problem; a log with no checkpoint at quorum is one."""
    a = Auditor(policy, log_vkey, workers=workers, chunk=chunk, max_problems=max_problems)
    try:
        try:
            for record in records:
                kind = record[0] if isinstance(record, tuple) and record else None
                if kind == "entry" and len(record) == 3 and type(record[1]) is int:
                    a.entry(record[1], record[2])
                elif kind == "checkpoint" and len(record) == 2:
                    a.checkpoint(record[1])
                elif kind == "end" and len(record) == 2:
                    a.end(record[1])
                else:
                    a.problems.add(EXPORT, f"unknown record {str(record)[:60]}")
        except export.ExportError as exc:
            a.problems.add(EXPORT, str(exc))
            a.ended = -1  # said already
        return a.finish(expect_end=True)
    finally:
        a.close()


# -- command line ------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ledger-verify",
                                description="Check a ledger proof bundle or audit an exported "
                                            "log, offline.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="check one reading's proof bundle against a policy")
    b.add_argument("file", help="proof bundle JSON (GET /v1/proof-bundle)")
    b.add_argument("--policy", required=True, help="trust policy (TOML: log, witnesses, quorum)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    a = sub.add_parser("audit", help="check a whole exported log")
    a.add_argument("export", help="export file (ledger-node export)")
    a.add_argument("--policy", help="trust policy (TOML); without it, --log-key")
    a.add_argument("--log-key", metavar="VKEY",
                   help="the log's verifier key (or a file holding it) when there is no policy; "
                        "without either, checkpoint signatures are not checked")
    a.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes verifying signatures (default: one per CPU)")
    a.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _load_policy(path: str) -> ckpt.Policy | None:
    try:
        return ckpt.load_policy(path)
    except ckpt.PolicyError as exc:
        print(f"ledger-verify: {exc}", file=sys.stderr)
        return None


def _bundle_cli(args) -> int:
    policy = _load_policy(args.policy)
    if policy is None:
        return EXIT_ERROR
    try:
        raw = open(args.file, "rb").read()
    except OSError as exc:
        print(f"ledger-verify: {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        result = {"ok": False, "kind": "malformed", "message": f"not a JSON document: {exc}"}
    except RecursionError:
        result = {"ok": False, "kind": "malformed", "message": "JSON nested too deeply"}
    else:
        result = verify_proof_bundle(doc, policy)
    if args.json:
        print(json.dumps(result, indent=2))
    elif result["ok"]:
        r = result
        flags = f" flags 0x{r['flags']:02x} ({', '.join(r['flag_names'])})" if r["flags"] else ""
        witnesses = ", ".join(r["witnesses"]) or "no witness"
        print(f"verified: device {r['dev_eui']} seq {r['seq']}: t_end {r['t_end']}, import "
              f"{r['import_dwh']} dWh, export {r['export_dwh']} dWh{flags}; entry {r['entry']} "
              f"of checkpoint {r['origin']} size {r['checkpoint_size']}, cosigned by {witnesses}")
    else:
        print(f"refused: {result['kind']}: {result['message']}")
    return EXIT_OK if result["ok"] else EXIT_PROBLEMS


def _log_key(value: str) -> str | None:
    try:
        return note.Verifier(value).vkey
    except note.NoteError as exc:
        first = exc
    try:
        text = open(value, encoding="utf-8").read().strip()
    except (OSError, UnicodeDecodeError):
        print(f"ledger-verify: --log-key: not a verifier key ({first}) nor a file holding one",
              file=sys.stderr)
        return None
    try:
        return note.Verifier(text).vkey
    except note.NoteError as exc:
        print(f"ledger-verify: --log-key: {value}: {exc}", file=sys.stderr)
        return None


def _audit_cli(args) -> int:
    policy = log_vkey = None
    if args.policy:
        policy = _load_policy(args.policy)
        if policy is None:
            return EXIT_ERROR
    if args.log_key:
        log_vkey = _log_key(args.log_key)
        if log_vkey is None:
            return EXIT_ERROR
        if policy is not None and log_vkey != policy.log.vkey:
            print("ledger-verify: --log-key differs from the policy's log key", file=sys.stderr)
            return EXIT_ERROR
    if args.workers < 1:
        print("ledger-verify: --workers must be at least 1", file=sys.stderr)
        return EXIT_ERROR
    try:
        f = open(args.export, "rb")
    except OSError as exc:
        print(f"ledger-verify: {args.export}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    with f:
        if f.read(len(export.EXPORT_MAGIC)) != export.EXPORT_MAGIC:
            print(f"ledger-verify: {args.export}: not a ledger export (the first line is not "
                  f"{export.EXPORT_MAGIC.decode().strip()!r})", file=sys.stderr)
            return EXIT_ERROR
        f.seek(0)
        report = audit(export.read_export(f), policy, args.workers, log_vkey=log_vkey)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for line in problem_lines(report):
            print(line)
        print(_verdict(args.export, report))
    return EXIT_OK if report["ok"] else EXIT_PROBLEMS


def problem_lines(report: dict) -> list[str]:
    """A report's problems, one line each, as `ledger-verify` and
    `ledger-node check` print them."""
    lines = []
    for p in report["problems"]:
        where = " ".join(f"{k}={p[k]}" for k in ("entry", "dev_eui", "seq")
                         if p.get(k) is not None)
        lines.append(f"{p['kind']}: {where + ': ' if where else ''}{p['message']}")
    hidden = report["problems_total"] - len(report["problems"])
    if hidden:
        lines.append(f"... and {hidden} more problems")
    return lines


def _verdict(name: str, r: dict) -> str:
    verdict = "clean" if r["ok"] else f"{r['problems_total']} problem(s)"
    if not r["log_signatures_checked"]:
        sigs = "checkpoint signatures NOT checked (no policy or --log-key)"
    else:
        sigs = f"{r['checkpoint_signatures']} checkpoint signatures"
    witnessed = ""
    if r["witnessed_size"] is not None:
        witnessed = (f", witnessed up to size {r['witnessed_size']} by "
                     f"{', '.join(r['witnesses']) or 'the log key alone (quorum 0)'}")
    return (f"{name}: {verdict}: {r['entries']} entries, {r['readings']} readings from "
            f"{r['devices']} devices, {r['checkpoints']} checkpoints, {r['signatures']} device "
            f"signatures verified, {sigs}{witnessed}; {r['seconds']} s")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bundle":
        return _bundle_cli(args)
    return _audit_cli(args)


if __name__ == "__main__":
    sys.exit(main())
