"""Admission rules of the ledger node: what may enter the ledger, and why not.

Plain functions and one class, no HTTP: the input is the already-parsed JSON
(dicts and lists), the output is one `Result` per bundle. Nothing from outside
is stored before it has been decoded with `meter.frame` and its signature
verified against the enrolled key, even when a gateway already checked it.

A bundle is admitted or refused as a whole: its readings share one signature,
so the ledger either holds all the new ones with the bundle that proves them,
or none. Readings already stored (a resend, a second gateway, a bundle that
overlaps an earlier one) are answered as duplicates with their original
entry; a stored seq with other values is a conflict.

Two phases per batch: parsing, decoding and signature verification run
without any lock (they are the CPU cost); only the checks against what is
already stored (duplicate, conflict, register and clock order) and the
inserts run inside one write transaction, one savepoint per bundle. Results,
counters and log lines are produced only after that transaction has committed.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass

from meter import frame

from . import signing
from .store import Device, Store, StoredReading, WriteTxn

log = logging.getLogger("ledger_node.admission")

MAX_BATCH = 1000
MAX_TEXT_LEN = 200  # meter_model, board, community, gateway

OK = "ok"  # a bundle: admitted (its new readings stored, the others duplicates)
REJECTED = "rejected"  # a bundle: nothing of it stored
STORED = "stored"  # a reading: stored now
DUPLICATE = "duplicate"  # a reading: stored before, with the same values
BUNDLES = "bundles"  # counter: bundles stored

# Stable rejection reasons (metrics labels, API contract). Frame decoding
# adds its own: empty, truncated, oversized, version, type, field.
MALFORMED = "malformed"
UNKNOWN_DEVICE = "unknown_device"
BAD_SIGNATURE = "bad_signature"
CONFLICT = "conflict"
REGISTERS_BACKWARDS = "registers_backwards"
TIME_BACKWARDS = "time_backwards"
TOO_MANY_ITEMS = "too_many_items"  # the whole batch, not one item

# Enrollment refusals.
KEY_CONFLICT = "key_conflict"
METADATA_CONFLICT = "metadata_conflict"

_REGISTERS = ("import_dwh", "export_dwh")
_DEVICE_TEXT_FIELDS = ("meter_model", "board", "community")
_HEX = re.compile(r"[0-9a-fA-F]*")


class Rejected(Exception):
    """Input refused for `reason` (a stable code); `message` says what was wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class ReadingResult:
    seq: int
    status: str  # STORED or DUPLICATE
    entry_id: int


@dataclass(frozen=True, slots=True)
class Result:
    status: str  # OK or REJECTED
    bundle_id: int | None = None  # None when nothing new was stored
    readings: tuple[ReadingResult, ...] = ()
    reason: str | None = None
    message: str | None = None

    @property
    def stored(self) -> int:
        return sum(r.status == STORED for r in self.readings)

    @property
    def duplicate(self) -> int:
        return sum(r.status == DUPLICATE for r in self.readings)

    def as_dict(self) -> dict:
        return {"status": self.status, "bundle_id": self.bundle_id, "stored": self.stored,
                "duplicate": self.duplicate,
                "readings": [{"seq": r.seq, "status": r.status, "entry_id": r.entry_id}
                             for r in self.readings],
                "reason": self.reason, "message": self.message}


@dataclass(frozen=True, slots=True)
class Submission:
    """One well-formed item of a bundles batch, not yet verified."""
    dev_eui: str
    data: bytes  # the bundle: body + signature
    received_at: float | None
    gateway: str | None


@dataclass(frozen=True, slots=True)
class Enrollment:
    created: bool
    device: Device


# -- parsing ---------------------------------------------------------------

def parse_hex(value, field: str, nbytes: int) -> bytes:
    if not isinstance(value, str):
        raise Rejected(MALFORMED, f"{field}: expected a string of {2 * nbytes} hex digits, "
                                  f"got {type(value).__name__}")
    if len(value) != 2 * nbytes:
        raise Rejected(MALFORMED, f"{field}: expected {2 * nbytes} hex digits, "
                                  f"got {len(value)} characters")
    # bytes.fromhex alone would skip spaces and return fewer bytes.
    if not _HEX.fullmatch(value):
        raise Rejected(MALFORMED, f"{field}: not hexadecimal: {value!r}")
    return bytes.fromhex(value)


def parse_dev_eui(value, field: str = "dev_eui") -> str:
    """The canonical form of a DevEUI: 16 lower-case hex digits."""
    return parse_hex(value, field, frame.DEV_EUI_LEN).hex()


def _optional_text(raw: dict, field: str) -> str | None:
    value = raw.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Rejected(MALFORMED, f"{field}: expected a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT_LEN:
        raise Rejected(MALFORMED, f"{field}: longer than {MAX_TEXT_LEN} characters")
    return value


def parse_submission(raw) -> Submission:
    """Check the shape of one bundles item. Unknown keys are ignored so
    gateways may send extra context without breaking older nodes."""
    if not isinstance(raw, dict):
        raise Rejected(MALFORMED, f"item: expected an object, got {type(raw).__name__}")
    for field in ("dev_eui", "bundle"):
        if field not in raw:
            raise Rejected(MALFORMED, f"{field}: missing")
    dev_eui = parse_dev_eui(raw["dev_eui"])
    encoded = raw["bundle"]
    if not isinstance(encoded, str):
        raise Rejected(MALFORMED, f"bundle: expected a string of hex digits, got "
                                  f"{type(encoded).__name__}")
    if len(encoded) % 2 or not _HEX.fullmatch(encoded):
        raise Rejected(MALFORMED, f"bundle: not an even number of hex digits: {encoded!r:.60}")
    data = bytes.fromhex(encoded)
    received_at = raw.get("received_at")
    if received_at is not None:
        if isinstance(received_at, bool) or not isinstance(received_at, (int, float)):
            raise Rejected(MALFORMED, f"received_at: expected unix seconds as a number, "
                                      f"got {type(received_at).__name__}")
        try:
            received_at = float(received_at)
        except OverflowError:
            received_at = math.inf
        if not math.isfinite(received_at) or received_at < 0:
            raise Rejected(MALFORMED, f"received_at: {raw['received_at']!r:.40} is not a time")
    return Submission(dev_eui, data, received_at, _optional_text(raw, "gateway"))


def parse_device(raw) -> Device:
    """The device described by an enrollment request."""
    if not isinstance(raw, dict):
        raise Rejected(MALFORMED, f"body: expected an object, got {type(raw).__name__}")
    for field in ("dev_eui", "public_key"):
        if field not in raw:
            raise Rejected(MALFORMED, f"{field}: missing")
    dev_eui = parse_dev_eui(raw["dev_eui"])
    public_key = parse_hex(raw["public_key"], "public_key", signing.PUBLIC_KEY_LEN)
    try:
        signing.import_public_key(public_key)
    except ValueError as exc:
        raise Rejected(MALFORMED, f"public_key: not an Ed25519 public key ({exc})") from None
    texts = {f: _optional_text(raw, f) for f in _DEVICE_TEXT_FIELDS}
    return Device(dev_eui, public_key, **texts)


# -- admission -------------------------------------------------------------

class Admission:
    """Admits readings and enrolls devices against one Store."""

    def __init__(self, store: Store):
        self.store = store
        # Enrolled keys never change, so a verifying key once loaded stays valid.
        self._keys: dict[str, object] = {}

    # Enrollment

    def enroll(self, raw) -> Enrollment:
        """Enroll a device. Raises Rejected: malformed input, or the EUI is
        already enrolled with another key (key_conflict) or other metadata
        (metadata_conflict). Re-enrolling the same key is idempotent; metadata
        left out of the request is not compared."""
        wanted = parse_device(raw)
        with self.store.writing() as tx:
            existing = tx.device(wanted.dev_eui)
            if existing is None:
                device = Device(wanted.dev_eui, wanted.public_key, wanted.meter_model,
                                wanted.board, wanted.community, time.time())
                tx.insert_device(device)
                created = True
            else:
                _check_same_device(existing, wanted)
                device, created = existing, False
        if created:
            log.info("enrolled device %s", device.dev_eui)
        return Enrollment(created, device)

    # Bundles

    def admit(self, items: list) -> list[Result]:
        """Admit a batch of bundles; one Result per item, in order. Raises
        Rejected (malformed) only when `items` itself is not a list of at most
        MAX_BATCH entries; every item-level problem becomes a result."""
        if not isinstance(items, list):
            raise Rejected(MALFORMED, f"bundles: expected a list, got {type(items).__name__}")
        if len(items) > MAX_BATCH:
            raise Rejected(TOO_MANY_ITEMS,
                           f"bundles: {len(items)} items, at most {MAX_BATCH} per batch")
        results: list[Result | None] = [None] * len(items)
        verified: list[tuple[int, Submission, frame.Bundle]] = []
        for i, raw in enumerate(items):
            try:
                sub, bundle = self._verify(raw)
            except Rejected as exc:
                results[i] = Result(REJECTED, reason=exc.reason, message=exc.message)
            else:
                verified.append((i, sub, bundle))

        with self.store.writing() as tx:
            for i, sub, bundle in verified:
                try:
                    with tx.savepoint():
                        results[i] = _place(tx, sub, bundle)
                except Rejected as exc:
                    results[i] = Result(REJECTED, reason=exc.reason, message=exc.message)
            counts = Counter()
            for r in results:
                if r.status == REJECTED:
                    counts[f"{REJECTED}:{r.reason}"] += 1
                else:
                    counts[STORED] += r.stored
                    counts[DUPLICATE] += r.duplicate
                    counts[BUNDLES] += r.bundle_id is not None
            for name, n in counts.items():
                if n:
                    tx.count(name, n)

        for i, r in enumerate(results):
            if r.status == REJECTED:
                raw = items[i]
                dev = raw.get("dev_eui") if isinstance(raw, dict) else None
                log.warning("rejected item %d of batch (dev_eui=%.40r): %s: %s",
                            i, dev, r.reason, r.message)
        return results

    def _verify(self, raw) -> tuple[Submission, frame.Bundle]:
        sub = parse_submission(raw)
        try:
            bundle = frame.decode_bundle(sub.data)
        except frame.FrameError as exc:
            raise Rejected(exc.reason, f"bundle: {exc.message}") from None
        key = self._key(sub.dev_eui)
        if not signing.verify_bundle(key, bytes.fromhex(sub.dev_eui), bundle):
            raise Rejected(BAD_SIGNATURE, f"signature of the bundle of seq {bundle.first_seq}.."
                                          f"{bundle.last_seq} does not verify with the key "
                                          f"enrolled for {sub.dev_eui}")
        return sub, bundle

    def _key(self, dev_eui: str):
        key = self._keys.get(dev_eui)
        if key is None:
            device = self.store.device(dev_eui)
            if device is None:
                raise Rejected(UNKNOWN_DEVICE, f"device {dev_eui} is not enrolled")
            key = signing.import_public_key(device.public_key)
            self._keys[dev_eui] = key
        return key


def _check_same_device(existing: Device, wanted: Device) -> None:
    if existing.public_key != wanted.public_key:
        raise Rejected(KEY_CONFLICT, f"device {existing.dev_eui} is enrolled with another "
                                     "public key")
    differ = [f for f in _DEVICE_TEXT_FIELDS
              if getattr(wanted, f) is not None and getattr(wanted, f) != getattr(existing, f)]
    if differ:
        raise Rejected(METADATA_CONFLICT, f"device {existing.dev_eui} is enrolled with other "
                                          f"{', '.join(differ)}")


def _place(tx: WriteTxn, sub: Submission, bundle: frame.Bundle) -> Result:
    """Decide a verified bundle against what is stored, and store its new
    readings with it. Raises Rejected; the caller's savepoint then undoes
    whatever this bundle had inserted."""
    dev = sub.dev_eui
    known: dict[int, StoredReading] = {}
    for r in bundle.readings:
        existing = tx.reading_at(dev, r.seq)
        if existing is None:
            continue
        if _values(existing) != _values(r):
            raise Rejected(CONFLICT, f"seq {r.seq} of {dev} is already stored as entry "
                                     f"{existing.entry_id} with other values")
        known[r.seq] = existing
    if len(known) == len(bundle.readings):
        return Result(OK, None, tuple(ReadingResult(s, DUPLICATE, e.entry_id)
                                      for s, e in known.items()))
    bundle_id = tx.insert_bundle(dev, bundle.first_seq, bundle.last_seq, bundle.data(),
                                 sub.received_at, sub.gateway)
    out = []
    for r in bundle.readings:
        if r.seq in known:
            out.append(ReadingResult(r.seq, DUPLICATE, known[r.seq].entry_id))
            continue
        _check_order(tx, dev, r)
        out.append(ReadingResult(r.seq, STORED, tx.insert_reading(dev, r.as_dict(), bundle_id)))
    return Result(OK, bundle_id, tuple(out))


def _values(r) -> tuple:
    return (r.t_end, r.import_dwh, r.export_dwh, r.flags)


def _check_order(tx: WriteTxn, dev: str, reading: frame.Reading) -> None:
    # Readings may arrive out of order (a meter catching up after an outage,
    # a resent bundle), so a new one is placed between its stored neighbours
    # by seq; earlier readings of the same bundle are already among them.
    seq = reading.seq
    below, above = tx.nearest_below(dev, seq), tx.nearest_above(dev, seq)
    for name in _REGISTERS:
        value = getattr(reading, name)
        if below is not None and value < getattr(below, name):
            raise Rejected(REGISTERS_BACKWARDS, _order_msg(name, value, seq, "below", below))
        if above is not None and value > getattr(above, name):
            raise Rejected(REGISTERS_BACKWARDS, _order_msg(name, value, seq, "above", above))
    # A meter without time sync stamps readings from its free-running clock;
    # those carry FLAG_CLOCK_UNSYNCED and are left out of the time order.
    unsynced = frame.FLAG_CLOCK_UNSYNCED
    if not reading.flags & unsynced:
        below = tx.nearest_below(dev, seq, without_flags=unsynced)
        above = tx.nearest_above(dev, seq, without_flags=unsynced)
        if below is not None and reading.t_end < below.t_end:
            raise Rejected(TIME_BACKWARDS, _order_msg("t_end", reading.t_end, seq, "below", below))
        if above is not None and reading.t_end > above.t_end:
            raise Rejected(TIME_BACKWARDS, _order_msg("t_end", reading.t_end, seq, "above", above))


def _order_msg(name: str, value: int, seq: int, side: str, other: StoredReading) -> str:
    return (f"{name} {value} at seq {seq} is {side} {getattr(other, name)} stored at seq "
            f"{other.seq} (entry {other.entry_id})")
