"""Admission rules of the ledger node: what may enter the log, and why not.

Plain functions and one class, no HTTP: the input is the already-parsed JSON
(dicts and lists), the output is one `Result` per bundle. Nothing from outside
enters the log before it has been decoded with `meter.frame` and its
signature verified with the key the registry holds for that device and seq,
even when a gateway already checked it.

A bundle is admitted or refused as a whole: its readings share one signature,
so the log either holds all the new ones in one entry, or none. Readings
already logged (a resend, a second gateway, a bundle that overlaps an earlier
one) are answered as duplicates with the entry that holds them; a logged seq
with other values is a conflict. The node is idempotent on (device, seq).

Two phases per batch: parsing, decoding and signature verification run
without any lock and in parallel across request threads (libsodium releases
the GIL); only the checks against what is logged already (duplicate,
conflict, register and clock order) and the appends run inside one write
transaction. Everything an entry depends on is checked before it is
appended (ledger_node.log.LogTxn). Results, counters and log lines are
produced only after that transaction has committed.

Registry changes (enroll, rotate, revoke) are log entries too
(ledger_node.entries); they are decided against the registry as the
transaction sees it.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass

from meter import frame

from . import entries
from .log import Log, LogHalted, LogTxn
from .store import IndexedReading

log = logging.getLogger("ledger_node.admission")

MAX_BATCH = 1000
MAX_GATEWAY_LEN = 200

OK = "ok"  # a bundle: admitted (its new readings logged, the others duplicates)
REJECTED = "rejected"  # a bundle: nothing of it logged
STORED = "stored"  # a reading: logged now
DUPLICATE = "duplicate"  # a reading: logged before, with the same values
ENTRIES = "entries"  # counter: readings entries appended

# Stable rejection reasons (metrics labels, API contract). Frame decoding
# adds its own (empty, truncated, oversized, version, type, field), the
# registry its own (unknown_device, revoked_device, bad_signature,
# straddles_rotation).
MALFORMED = "malformed"
CONFLICT = "conflict"
REGISTERS_BACKWARDS = "registers_backwards"
TIME_BACKWARDS = "time_backwards"
TOO_MANY_ITEMS = "too_many_items"  # the whole batch, not one item

_REGISTERS = ("import_dwh", "export_dwh")
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
    entry: int


@dataclass(frozen=True, slots=True)
class Result:
    status: str  # OK or REJECTED
    entry: int | None = None  # the entry appended now; None when nothing new was logged
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
        return {"status": self.status, "entry": self.entry, "stored": self.stored,
                "duplicate": self.duplicate,
                "readings": [{"seq": r.seq, "status": r.status, "entry": r.entry}
                             for r in self.readings],
                "reason": self.reason, "message": self.message}


@dataclass(frozen=True, slots=True)
class Submission:
    """One well-formed item of a bundles batch, not yet verified."""
    dev_eui: bytes
    data: bytes  # the bundle: body + signature
    received_ms: int | None
    gateway: str | None


@dataclass(frozen=True, slots=True)
class RegistryChange:
    """The outcome of an enroll, rotate or revoke request."""
    created: bool  # False: the same enrollment was logged before (nothing appended)
    entry: int | None  # the entry appended now
    device: dict


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


def parse_dev_eui(value, field: str = "dev_eui") -> bytes:
    return parse_hex(value, field, frame.DEV_EUI_LEN)


def _optional_text(raw: dict, field: str, max_len: int) -> str | None:
    value = raw.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Rejected(MALFORMED, f"{field}: expected a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise Rejected(MALFORMED, f"{field}: longer than {max_len} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected(MALFORMED, f"{field}: not valid Unicode text (a lone surrogate)") from None
    return value


def _int_field(raw: dict, field: str, lo: int, hi: int, default=None) -> int:
    value = raw.get(field, default)
    if value is None:
        raise Rejected(MALFORMED, f"{field}: missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise Rejected(MALFORMED, f"{field}: expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise Rejected(MALFORMED, f"{field}: {value} is outside {lo}..{hi}")
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
    received_ms = None
    if received_at is not None:
        if isinstance(received_at, bool) or not isinstance(received_at, (int, float)):
            raise Rejected(MALFORMED, f"received_at: expected unix seconds as a number, "
                                      f"got {type(received_at).__name__}")
        try:
            seconds = float(received_at)
        except OverflowError:
            seconds = math.inf
        if not math.isfinite(seconds) or not 0 <= seconds < 2 ** 40:
            raise Rejected(MALFORMED, f"received_at: {raw['received_at']!r:.40} is not a time")
        received_ms = int(seconds * 1000)
    return Submission(dev_eui, data, received_ms, _optional_text(raw, "gateway", MAX_GATEWAY_LEN))


def _entry_error(exc: entries.EntryError) -> Rejected:
    return Rejected(exc.reason, f"bundle: {exc.message}")


# -- admission -------------------------------------------------------------

class Admission:
    """Admits readings and registry changes into one Log."""

    def __init__(self, log_: Log, clock=time.time):
        self.log = log_
        self._clock = clock

    # Bundles

    def admit(self, items: list) -> list[Result]:
        """Admit a batch of bundles; one Result per item, in order. Raises
        Rejected (malformed) only when `items` itself is not a list of at most
        MAX_BATCH entries; every item-level problem becomes a result."""
        if self.log.halted:
            raise LogHalted(self.log.halted)
        if not isinstance(items, list):
            raise Rejected(MALFORMED, f"bundles: expected a list, got {type(items).__name__}")
        if len(items) > MAX_BATCH:
            raise Rejected(TOO_MANY_ITEMS,
                           f"bundles: {len(items)} items, at most {MAX_BATCH} per batch")
        results: list[Result | None] = [None] * len(items)
        verified: list[tuple[int, Submission, frame.Bundle, bytes]] = []
        registry = self.log.registry
        for i, raw in enumerate(items):
            try:
                sub = parse_submission(raw)
                bundle, key = _verify(registry, sub)
            except Rejected as exc:
                results[i] = Result(REJECTED, reason=exc.reason, message=exc.message)
            else:
                verified.append((i, sub, bundle, key))

        counts = Counter()
        if verified:
            with self.log.writing() as lt:
                for i, sub, bundle, key in verified:
                    try:
                        results[i] = _place(lt, sub, bundle, key)
                    except Rejected as exc:
                        results[i] = Result(REJECTED, reason=exc.reason, message=exc.message)
                counts = _tally(results)
                for name, n in counts.items():
                    lt.tx.count(name, n)
        else:
            counts = _tally(results)
            if counts:
                with self.log.store.writing() as tx:
                    for name, n in counts.items():
                        tx.count(name, n)

        for i, r in enumerate(results):
            if r.status == REJECTED:
                raw = items[i]
                dev = raw.get("dev_eui") if isinstance(raw, dict) else None
                log.warning("rejected item %d of batch (dev_eui=%.40r): %s: %s",
                            i, dev, r.reason, r.message)
        return results

    # Registry

    def enroll(self, raw) -> RegistryChange:
        """Enroll a device. Re-enrolling the same key and fields appends
        nothing; any difference is refused (the log never changes an
        enrollment: rotate the key, or revoke)."""
        if not isinstance(raw, dict):
            raise Rejected(MALFORMED, f"body: expected an object, got {type(raw).__name__}")
        change = self._registry_entry("enroll", raw)
        with self.log.writing() as lt:
            try:
                same = lt.registry.check_enroll(change) == "same"
            except entries.Refused as exc:
                raise Rejected(exc.reason, exc.message) from None
            if same:
                return RegistryChange(False, None, device_dict(lt.registry, change.dev_eui))
            idx = _registry_append(lt, change)
            device = device_dict(lt.registry, change.dev_eui)
        log.info("enrolled device %s as entry %d", change.dev_eui.hex(), idx)
        return RegistryChange(True, idx, device)

    def rotate(self, dev_eui_hex: str, raw) -> RegistryChange:
        """Give a device a new key from `from_seq` (default: one past the
        highest seq logged for it)."""
        dev_eui = parse_dev_eui(dev_eui_hex)
        if not isinstance(raw, dict):
            raise Rejected(MALFORMED, f"body: expected an object, got {type(raw).__name__}")
        with self.log.writing() as lt:
            try:
                default_from = lt.registry.next_from_seq(dev_eui)
            except entries.Refused as exc:
                raise Rejected(exc.reason, exc.message) from None
            _path_names_device(raw)
            change = self._registry_entry("rotate", dict(raw, dev_eui=dev_eui.hex()),
                                          default_from=default_from)
            idx = _registry_append(lt, change)
            device = device_dict(lt.registry, dev_eui)
        log.warning("rotated the key of %s from seq %d as entry %d", dev_eui.hex(),
                    change.from_seq, idx)
        return RegistryChange(True, idx, device)

    def revoke(self, dev_eui_hex: str, raw) -> RegistryChange:
        dev_eui = parse_dev_eui(dev_eui_hex)
        if not isinstance(raw, dict):
            raise Rejected(MALFORMED, f"body: expected an object, got {type(raw).__name__}")
        _path_names_device(raw)
        change = self._registry_entry("revoke", dict(raw, dev_eui=dev_eui.hex()))
        with self.log.writing() as lt:
            idx = _registry_append(lt, change)
            device = device_dict(lt.registry, dev_eui)
        log.warning("revoked %s (%s) as entry %d", dev_eui.hex(), raw.get("reason"), idx)
        return RegistryChange(True, idx, device)

    def _registry_entry(self, kind: str, raw: dict, default_from: int = 0):
        """The entry a registry request asks for, every field checked."""
        at = int(self._clock())
        try:
            if kind == "enroll":
                known = {"dev_eui", "public_key", "meter_model", "board", "ct_rating_a",
                         "community", "owner"}
                _no_unknown(raw, known)
                for field in ("dev_eui", "public_key", "owner", "community"):
                    if field not in raw:
                        raise Rejected(MALFORMED, f"{field}: missing")
                return entries.Enroll(
                    dev_eui=parse_dev_eui(raw["dev_eui"]),
                    public_key=parse_hex(raw["public_key"], "public_key", 32), at=at,
                    ct_rating_a=_int_field(raw, "ct_rating_a", 1, 0xFFFF, default=100),
                    meter_model=_text(raw, "meter_model"), board=_text(raw, "board"),
                    community=_text(raw, "community"), owner=_text(raw, "owner"))
            if kind == "rotate":
                _no_unknown(raw, {"dev_eui", "public_key", "from_seq"})
                if "public_key" not in raw:
                    raise Rejected(MALFORMED, "public_key: missing")
                return entries.Rotate(
                    dev_eui=parse_dev_eui(raw["dev_eui"]),
                    public_key=parse_hex(raw["public_key"], "public_key", 32), at=at,
                    from_seq=_int_field(raw, "from_seq", 0, 0xFFFFFFFF, default=default_from))
            _no_unknown(raw, {"dev_eui", "reason"})
            reason = raw.get("reason", "unspecified")
            if not isinstance(reason, str) or reason not in entries.REVOKE_REASONS:
                raise Rejected(MALFORMED, f"reason: {reason!r:.40} is not one of "
                                          f"{', '.join(entries.REVOKE_REASONS)}")
            return entries.Revoke(parse_dev_eui(raw["dev_eui"]), at, reason)
        except entries.EntryError as exc:
            raise Rejected(MALFORMED, exc.message) from None


def _path_names_device(raw: dict) -> None:
    if "dev_eui" in raw:
        raise Rejected(MALFORMED, "dev_eui: unknown field (the path names the device)")


def _no_unknown(raw: dict, known: set) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise Rejected(MALFORMED, f"{unknown[0]}: unknown field (expected: "
                                  f"{', '.join(sorted(known))})")


def _text(raw: dict, field: str) -> str:
    value = raw.get(field, "")
    if not isinstance(value, str):
        raise Rejected(MALFORMED, f"{field}: expected a string, got {type(value).__name__}")
    return value


def _registry_append(lt: LogTxn, change) -> int:
    try:
        return lt.append_registry(change)
    except entries.Refused as exc:
        raise Rejected(exc.reason, exc.message) from None


def device_dict(registry: entries.Registry, dev_eui: bytes) -> dict:
    """A device as the API shows it, from the registry replayed from the log.
    `latest_seq` (the highest seq logged) lets a gateway that starts without
    state tell the readings the log holds from a gap worth asking for."""
    d = registry.device(dev_eui).as_dict()
    d["latest_seq"] = d["last_seq"]
    return d


def _verify(registry: entries.Registry, sub: Submission) -> tuple[frame.Bundle, bytes]:
    """Decode and verify one bundle; returns it with the key that verified it."""
    try:
        bundle = registry.verify_readings(entries.ReadingsEntry(sub.dev_eui, sub.data))
        key = registry.key_for(sub.dev_eui, bundle.first_seq)
    except entries.Refused as exc:
        raise Rejected(exc.reason, exc.message) from None
    except entries.EntryError as exc:
        raise _entry_error(exc) from None
    return bundle, key


def _tally(results) -> Counter:
    counts = Counter()
    for r in results:
        if r is None:
            continue
        if r.status == REJECTED:
            counts[f"{REJECTED}:{r.reason}"] += 1
        else:
            counts[STORED] += r.stored
            counts[DUPLICATE] += r.duplicate
            counts[ENTRIES] += r.entry is not None
    return +counts


def _place(lt: LogTxn, sub: Submission, bundle: frame.Bundle, key: bytes) -> Result:
    """Decide a verified bundle against what is logged, and append it when it
    brings a new reading. Raises Rejected before anything is written."""
    dev_eui = sub.dev_eui
    try:
        # The registry may have changed since the bundle was verified
        # (a rotation or revocation committed by another request).
        if lt.registry.key_for(dev_eui, bundle.first_seq) != key:
            bundle, key = _verify(lt.registry, sub)
    except entries.Refused as exc:
        raise Rejected(exc.reason, exc.message) from None
    dev = lt.tx.device_id(dev_eui)
    known: dict[int, IndexedReading] = {}
    for r in bundle.readings:
        existing = lt.tx.reading_at(dev, r.seq)
        if existing is None:
            continue
        if _values(existing) != _values(r):
            raise Rejected(CONFLICT, f"seq {r.seq} of {dev_eui.hex()} is already logged in "
                                     f"entry {existing.entry} with other values")
        known[r.seq] = existing
    if len(known) == len(bundle.readings):
        return Result(OK, None, tuple(ReadingResult(s, DUPLICATE, e.entry)
                                      for s, e in known.items()))
    new = [r for r in bundle.readings if r.seq not in known]
    for r in new:
        _check_order(lt.tx, dev, r)
    idx = lt.append(entries.readings_entry(dev_eui, sub.data), sub.received_ms, sub.gateway)
    lt.tx.put_readings([(dev, r.seq, r.t_end, r.import_dwh, r.export_dwh, r.flags, idx)
                        for r in new])
    lt.note_seq(dev_eui, bundle.last_seq)
    return Result(OK, idx, tuple(
        ReadingResult(r.seq, DUPLICATE, known[r.seq].entry) if r.seq in known
        else ReadingResult(r.seq, STORED, idx) for r in bundle.readings))


def _values(r) -> tuple:
    return (r.t_end, r.import_dwh, r.export_dwh, r.flags)


def _check_order(tx, dev: int, reading: frame.Reading) -> None:
    # Readings may arrive out of order (a meter catching up after an outage,
    # a resent bundle), so a new one is placed between its logged neighbours
    # by seq. The bundle's own readings are consecutive and ordered already
    # (the codec refuses any other), so only logged neighbours are compared.
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


def _order_msg(name: str, value: int, seq: int, side: str, other: IndexedReading) -> str:
    return (f"{name} {value} at seq {seq} is {side} {getattr(other, name)} logged at seq "
            f"{other.seq} (entry {other.entry})")
