"""Log entries: the bytes under each leaf of the ledger's Merkle log, and the
device registry replayed from them.

Every leaf's data is `type (1 byte) || payload`; integers are big-endian,
strings are one length byte then UTF-8 (every string the rules admit is
ASCII). The layout is compact, since bytes on disk per reading is a bar the
node must meet, and deterministic: `decode` accepts only what `encode` writes,
so an entry has exactly one byte form and its leaf hash is stable.

    0x01 readings  dev_eui (8) || bundle (the meter's bytes exactly: body + signature)
    0x02 enroll    dev_eui (8) || public_key (32) || at (u32 unix s) || ct_rating_a (u16)
                   || meter_model (str) || board (str) || community (str) || owner (str)
    0x03 rotate    dev_eui (8) || new public_key (32) || at (u32) || from_seq (u32)
    0x04 revoke    dev_eui (8) || at (u32) || reason (u8)
    0x10..         reserved for settlement records

No personal data enters the log, which can never be edited: `owner` is a
pseudonymous id (16-64 lower-case hex digits, for example an HMAC of the
customer number under a secret kept outside the log) and the other texts are
short printable ASCII.

`Registry` is the one statement of the key rules. The ledger's admission, the
witnesses and the offline audit all replay the same entries through it, so
they can not disagree about which key verifies which reading:

- enroll starts a device's key history with (from_seq 0, key);
- rotate adds (from_seq, new key); from_seq exceeds the previous from_seq and
  every seq already logged for the device, so a reading of seq s is verified
  with the key of the largest from_seq <= s: the old key stays valid for the
  seqs below the rotation and for nothing after it;
- revoke ends the device: no reading of any seq is accepted after it, and the
  device can not be enrolled again.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field, replace
from typing import Iterator, NamedTuple, Union

import nacl.bindings
import nacl.exceptions

from meter import frame

TYPE_READINGS = 0x01
TYPE_ENROLL = 0x02
TYPE_ROTATE = 0x03
TYPE_REVOKE = 0x04
# 0x10 and above are reserved for settlement records.

REVOKE_REASONS = {"unspecified": 0, "key_compromise": 1, "decommissioned": 2, "replaced": 3}
_REVOKE_NAMES = {code: name for name, code in REVOKE_REASONS.items()}

DEV_EUI_LEN = frame.DEV_EUI_LEN
PUBLIC_KEY_LEN = 32
U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF
MAX_TEXT_LEN = 40  # meter_model, board

OWNER_PATTERN = "[0-9a-f]{16,64}"
COMMUNITY_PATTERN = "[a-z0-9][a-z0-9_-]{0,31}"
_OWNER = re.compile(OWNER_PATTERN)
_COMMUNITY = re.compile(COMMUNITY_PATTERN)
_PRINTABLE = re.compile(r"[\x20-\x7e]*")

# EntryError reasons; a bad bundle inside a readings entry keeps frame's own
# (empty, truncated, oversized, version, type, field).
ENTRY_TYPE = "entry_type"
ENTRY_TRUNCATED = "entry_truncated"
ENTRY_TRAILING = "entry_trailing"
FIELD = "field"

# Refused reasons (stable: metrics labels and API error codes).
UNKNOWN_DEVICE = "unknown_device"
REVOKED_DEVICE = "revoked_device"
ALREADY_ENROLLED = "already_enrolled"
KEY_CONFLICT = "key_conflict"
METADATA_CONFLICT = "metadata_conflict"
ROTATE_SAME_KEY = "rotate_same_key"
ROTATE_FROM_SEQ = "rotate_from_seq"
BAD_SIGNATURE = "bad_signature"
STRADDLES_ROTATION = "straddles_rotation"
ENTRY_ORDER = "entry_order"

# Fixed parts after the type byte.
_ENROLL_HEAD = struct.Struct(">8s32sIH")
_ROTATE = struct.Struct(">8s32sII")
_REVOKE = struct.Struct(">8sIB")
_READINGS_HEAD = 1 + DEV_EUI_LEN

_ENROLL_TEXTS = ("meter_model", "board", "community", "owner")
# What must match for a repeated enrollment to be the same one (`at` is when
# it was asked for, and differs on every retry).
_ENROLL_FIELDS = ("ct_rating_a",) + _ENROLL_TEXTS


class EntryError(ValueError):
    """Bytes or fields that can not form a log entry. `reason` is a short
    stable code; the message names the field that was wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


class Refused(Exception):
    """An entry the registry rules do not allow (now, for this device).
    `reason` is a short stable code; the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


# -- field checks ------------------------------------------------------------
# Each returns the value in its canonical type and raises EntryError("field")
# with a message that starts with the field's name. The HTTP layer calls them
# on requests; the entry classes call them on construction, so an entry
# object that exists is one the log may hold.

def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fixed_bytes(name: str, value, size: int) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise EntryError(FIELD, f"{name}: expected {size} bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) != size:
        raise EntryError(FIELD, f"{name}: expected {size} bytes, got {len(value)}")
    return value


def check_dev_eui(value, name: str = "dev_eui") -> bytes:
    return _fixed_bytes(name, value, DEV_EUI_LEN)


def check_public_key(value, name: str = "public_key") -> bytes:
    """32 bytes that are a canonical Ed25519 point of the prime-order
    subgroup: a small-order key would accept forged signatures."""
    key = _fixed_bytes(name, value, PUBLIC_KEY_LEN)
    if not nacl.bindings.crypto_core_ed25519_is_valid_point(key):
        raise EntryError(FIELD, f"{name}: {key.hex()} is not a valid Ed25519 public key "
                                "(not a canonical point of the prime-order subgroup)")
    return key


def check_uint(name: str, value, lo: int, hi: int, unit: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EntryError(FIELD, f"{name}: expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise EntryError(FIELD, f"{name}: {value} outside {lo}..{hi}{unit}")
    return value


def check_at(value, name: str = "at") -> int:
    return check_uint(name, value, 0, U32_MAX, " (unix seconds)")


def check_ct_rating(value, name: str = "ct_rating_a") -> int:
    return check_uint(name, value, 1, U16_MAX, " amps")


def _string(name: str, value) -> str:
    if not isinstance(value, str):
        raise EntryError(FIELD, f"{name}: expected a string, got {type(value).__name__}")
    return value


def check_text(name: str, value) -> str:
    """meter_model, board: printable ASCII, at most MAX_TEXT_LEN characters
    (empty when not known)."""
    value = _string(name, value)
    if len(value) > MAX_TEXT_LEN:
        raise EntryError(FIELD, f"{name}: {len(value)} characters, at most {MAX_TEXT_LEN}")
    if not _PRINTABLE.fullmatch(value):
        i, c = next((i, c) for i, c in enumerate(value) if not " " <= c <= "~")
        raise EntryError(FIELD, f"{name}: character {c!r} at {i} is not printable ASCII")
    return value


def check_community(value, name: str = "community") -> str:
    value = _string(name, value)
    if not _COMMUNITY.fullmatch(value):
        raise EntryError(FIELD, f"{name}: {_short(value)} does not match {COMMUNITY_PATTERN} "
                                "(1-32 characters: lower-case letters, digits, '_', '-')")
    return value


def check_owner(value, name: str = "owner") -> str:
    value = _string(name, value)
    if not _OWNER.fullmatch(value):
        raise EntryError(FIELD, f"{name}: {_short(value)} is not 16-64 lower-case hex digits "
                                "(a pseudonymous id; no personal data enters the log)")
    return value


def check_seq(value, name: str = "seq") -> int:
    return check_uint(name, value, 0, U32_MAX)


def check_revoke_reason(value, name: str = "reason") -> str:
    if not isinstance(value, str) or value not in REVOKE_REASONS:
        raise EntryError(FIELD, f"{name}: {_short(value)} is not one of "
                                f"{', '.join(REVOKE_REASONS)}")
    return value


def validate_enroll_fields(dev_eui, public_key, at, ct_rating_a, meter_model, board,
                           community, owner) -> dict:
    """Every field of an enrollment checked in layout order; the canonical
    values by name. Raises EntryError("field") naming the first bad field."""
    return {
        "dev_eui": check_dev_eui(dev_eui),
        "public_key": check_public_key(public_key),
        "at": check_at(at),
        "ct_rating_a": check_ct_rating(ct_rating_a),
        "meter_model": check_text("meter_model", meter_model),
        "board": check_text("board", board),
        "community": check_community(community),
        "owner": check_owner(owner),
    }


def _set_all(obj, values: dict) -> None:
    for name, value in values.items():
        if getattr(obj, name) is not value:
            object.__setattr__(obj, name, value)


# -- entries -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ReadingsEntry:
    """A meter's bundle as the device signed it, under the EUI the network
    server reported (the EUI is signed, not sent)."""
    dev_eui: bytes
    bundle: bytes
    # The decoded bundle, filled on first use (decode() fills it at once).
    _decoded: frame.Bundle | None = field(default=None, init=False, repr=False, compare=False)

    TYPE = TYPE_READINGS

    def __post_init__(self):
        if type(self.dev_eui) is not bytes or len(self.dev_eui) != DEV_EUI_LEN:
            object.__setattr__(self, "dev_eui", check_dev_eui(self.dev_eui))
        if type(self.bundle) is not bytes:
            if not isinstance(self.bundle, (bytearray, memoryview)):
                raise EntryError(FIELD, f"bundle: expected bytes, got {type(self.bundle).__name__}")
            object.__setattr__(self, "bundle", bytes(self.bundle))

    def decoded(self) -> frame.Bundle:
        """The bundle decoded by meter.frame (signature not checked); raises
        EntryError with frame's reason when the bytes are not a bundle."""
        b = self._decoded
        if b is None:
            b = _decode_bundle(self.bundle)
            object.__setattr__(self, "_decoded", b)
        return b


@dataclass(frozen=True, slots=True)
class Enroll:
    dev_eui: bytes
    public_key: bytes
    at: int  # unix seconds
    ct_rating_a: int  # the clamp's rated current
    meter_model: str
    board: str
    community: str
    owner: str  # pseudonymous id

    TYPE = TYPE_ENROLL

    def __post_init__(self):
        _set_all(self, validate_enroll_fields(self.dev_eui, self.public_key, self.at,
                                              self.ct_rating_a, self.meter_model, self.board,
                                              self.community, self.owner))

    def fields(self) -> dict:
        """What a repeated enrollment must repeat to be the same one."""
        return {name: getattr(self, name) for name in _ENROLL_FIELDS}


@dataclass(frozen=True, slots=True)
class Rotate:
    dev_eui: bytes
    public_key: bytes  # the new key
    at: int
    from_seq: int  # first seq signed with the new key

    TYPE = TYPE_ROTATE

    def __post_init__(self):
        _set_all(self, {"dev_eui": check_dev_eui(self.dev_eui),
                        "public_key": check_public_key(self.public_key),
                        "at": check_at(self.at),
                        "from_seq": check_seq(self.from_seq, "from_seq")})


@dataclass(frozen=True, slots=True)
class Revoke:
    dev_eui: bytes
    at: int
    reason: str  # a key of REVOKE_REASONS

    TYPE = TYPE_REVOKE

    def __post_init__(self):
        _set_all(self, {"dev_eui": check_dev_eui(self.dev_eui), "at": check_at(self.at),
                        "reason": check_revoke_reason(self.reason)})


Entry = Union[ReadingsEntry, Enroll, Rotate, Revoke]


def _str(value: str) -> bytes:
    raw = value.encode()
    return bytes((len(raw),)) + raw


def readings_entry(dev_eui: bytes, bundle: bytes) -> bytes:
    """The entry bytes of a bundle the caller has already decoded and
    verified: nothing is checked again."""
    return b"\x01" + dev_eui + bundle


def encode(entry: Entry) -> bytes:
    """The leaf data of an entry. A readings entry's bundle is decoded first,
    so everything encode returns, decode accepts."""
    if isinstance(entry, ReadingsEntry):
        entry.decoded()
        return b"\x01" + entry.dev_eui + entry.bundle
    if isinstance(entry, Enroll):
        return (bytes((TYPE_ENROLL,))
                + _ENROLL_HEAD.pack(entry.dev_eui, entry.public_key, entry.at, entry.ct_rating_a)
                + b"".join(_str(getattr(entry, name)) for name in _ENROLL_TEXTS))
    if isinstance(entry, Rotate):
        return bytes((TYPE_ROTATE,)) + _ROTATE.pack(entry.dev_eui, entry.public_key, entry.at,
                                                     entry.from_seq)
    if isinstance(entry, Revoke):
        return bytes((TYPE_REVOKE,)) + _REVOKE.pack(entry.dev_eui, entry.at,
                                                     REVOKE_REASONS[entry.reason])
    raise TypeError(f"not a log entry: {type(entry).__name__}")


def _decode_bundle(data: bytes) -> frame.Bundle:
    try:
        return frame.decode_bundle(data)
    except frame.FrameError as exc:
        raise EntryError(exc.reason, f"bundle: {exc.message}") from None


def _fixed(data: bytes, fmt: struct.Struct, what: str) -> tuple:
    need = 1 + fmt.size
    if len(data) < need:
        raise EntryError(ENTRY_TRUNCATED, f"{what} entry is {len(data)} bytes, its fixed part "
                                          f"alone is {need}")
    return fmt.unpack_from(data, 1)


def _read_str(data: bytes, i: int, name: str) -> tuple[str, int]:
    if i >= len(data):
        raise EntryError(ENTRY_TRUNCATED, f"enroll entry ends before {name}")
    n = data[i]
    j = i + 1 + n
    if j > len(data):
        raise EntryError(ENTRY_TRUNCATED, f"enroll entry ends inside {name}: {n} bytes said, "
                                          f"{len(data) - i - 1} left")
    raw = data[i + 1:j]
    try:
        return raw.decode(), j
    except UnicodeDecodeError:
        raise EntryError(FIELD, f"{name}: not UTF-8: {_short(raw)}") from None


def _trailing(data: bytes, end: int, what: str) -> None:
    if len(data) != end:
        raise EntryError(ENTRY_TRAILING, f"{what} entry has {len(data) - end} bytes after its "
                                         f"last field")


def decode(data: bytes) -> Entry:
    """The entry in leaf data. Strict: only what encode writes is accepted, so
    encode(decode(data)) == data. Raises EntryError. The signature of a
    readings entry is not checked here (Registry.verify_readings does)."""
    if type(data) is not bytes:
        if not isinstance(data, (bytearray, memoryview)):
            raise TypeError(f"entry data must be bytes, not {type(data).__name__}")
        data = bytes(data)
    if not data:
        raise EntryError(ENTRY_TRUNCATED, "entry is empty")
    kind = data[0]
    if kind == TYPE_READINGS:
        if len(data) <= _READINGS_HEAD:
            raise EntryError(ENTRY_TRUNCATED, f"readings entry is {len(data)} bytes: no bundle "
                                              f"after the dev_eui")
        bundle = data[_READINGS_HEAD:]
        decoded = _decode_bundle(bundle)
        entry = ReadingsEntry(data[1:_READINGS_HEAD], bundle)
        object.__setattr__(entry, "_decoded", decoded)
        return entry
    if kind == TYPE_ENROLL:
        dev_eui, public_key, at, ct_rating_a = _fixed(data, _ENROLL_HEAD, "enroll")
        i = 1 + _ENROLL_HEAD.size
        texts = []
        for name in _ENROLL_TEXTS:
            text, i = _read_str(data, i, name)
            texts.append(text)
        _trailing(data, i, "enroll")
        return Enroll(dev_eui, public_key, at, ct_rating_a, *texts)
    if kind == TYPE_ROTATE:
        fields = _fixed(data, _ROTATE, "rotate")
        _trailing(data, 1 + _ROTATE.size, "rotate")
        return Rotate(*fields)
    if kind == TYPE_REVOKE:
        dev_eui, at, code = _fixed(data, _REVOKE, "revoke")
        _trailing(data, 1 + _REVOKE.size, "revoke")
        if code not in _REVOKE_NAMES:
            raise EntryError(FIELD, f"reason: code {code} unknown (0..{max(_REVOKE_NAMES)})")
        return Revoke(dev_eui, at, _REVOKE_NAMES[code])
    raise EntryError(ENTRY_TYPE, f"entry type 0x{kind:02x} unknown (0x01 readings, 0x02 enroll, "
                                 "0x03 rotate, 0x04 revoke; 0x10 and above are reserved for "
                                 "settlement records)")


# -- registry ------------------------------------------------------------------

class KeyPeriod(NamedTuple):
    from_seq: int  # first seq this key signs
    key: bytes
    entry: int  # index of the enroll or rotate entry that brought it


@dataclass(frozen=True, slots=True)
class DeviceState:
    """One device as the entries replayed so far leave it. Read-only: the
    registry replaces the whole object when an entry changes the device."""
    enroll: Enroll
    enrolled: int  # entry index
    keys: tuple[KeyPeriod, ...]  # by from_seq; the first from 0
    last_seq: int | None = None  # highest seq logged
    revoke: Revoke | None = None
    revoked: int | None = None  # entry index

    @property
    def dev_eui(self) -> bytes:
        return self.enroll.dev_eui

    @property
    def status(self) -> str:
        return "active" if self.revoked is None else "revoked"

    @property
    def revoke_reason(self) -> str | None:
        return None if self.revoke is None else self.revoke.reason

    @property
    def public_key(self) -> bytes:
        """The current key (it signs the seqs from keys[-1].from_seq on)."""
        return self.keys[-1].key

    @property
    def fields(self) -> dict:
        return self.enroll.fields()

    def as_dict(self) -> dict:
        """JSON-ready, for the HTTP API."""
        return {"dev_eui": self.dev_eui.hex(), "status": self.status,
                "public_key": self.public_key.hex(), **self.fields,
                "enrolled": {"entry": self.enrolled, "at": self.enroll.at},
                "keys": [{"from_seq": p.from_seq, "public_key": p.key.hex(), "entry": p.entry}
                         for p in self.keys],
                "last_seq": self.last_seq,
                "revoked": None if self.revoke is None else
                {"entry": self.revoked, "at": self.revoke.at, "reason": self.revoke.reason}}


def _period(keys: tuple[KeyPeriod, ...], seq: int, as_of: int | None) -> KeyPeriod:
    # Rotations are rare: a short scan from the newest beats bisecting.
    for p in reversed(keys):
        if p.from_seq <= seq and (as_of is None or p.entry < as_of):
            return p
    return keys[0]  # unreachable: keys[0] starts at seq 0 and precedes every reading


def _eui(dev_eui: bytes) -> str:
    return bytes(dev_eui).hex() if isinstance(dev_eui, (bytes, bytearray)) else repr(dev_eui)


_STATE_FORMAT = "ledger-registry/1"


class Registry:
    """Device key histories replayed from log entries; the same rules for
    admission, witnesses and audits.

    Entries are applied in log order. A refused entry leaves the registry
    unchanged. Changes replace a device's DeviceState in one dict assignment,
    so a thread verifying readings sees a device either before or after an
    entry, never halfway."""

    def __init__(self):
        self._devices: dict[bytes, DeviceState] = {}
        self._seen: dict[bytes, int] = {}  # highest seq logged per device
        self._entries: list[tuple[int, bytes]] = []  # registry entries applied, for to_json
        self.last_index = -1  # index of the last entry applied

    def __len__(self) -> int:
        return len(self._devices)

    def copy(self) -> "Registry":
        """An independent registry in the same state (device states are
        immutable, so copying the maps is enough)."""
        other = Registry()
        other._devices = dict(self._devices)
        other._seen = dict(self._seen)
        other._entries = list(self._entries)
        other.last_index = self.last_index
        return other

    def __contains__(self, dev_eui) -> bool:
        return dev_eui in self._devices

    def devices(self) -> Iterator[DeviceState]:
        for dev in list(self._devices):
            yield self.device(dev)

    def device(self, dev_eui: bytes) -> DeviceState | None:
        st = self._devices.get(dev_eui)
        if st is None:
            return None
        seen = self._seen.get(dev_eui)
        return st if seen is None else replace(st, last_seq=seen)

    # Applying entries

    def apply(self, entry: Entry, index: int) -> None:
        """Apply the entry at `index` of the log. Raises Refused (the registry
        is then unchanged) or, for readings, EntryError."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise TypeError(f"entry index must be a non-negative int, not {index!r}")
        if index <= self.last_index:
            raise Refused(ENTRY_ORDER, f"entry {index} after entry {self.last_index}: entries "
                                       "are applied in log order")
        if isinstance(entry, ReadingsEntry):
            bundle = self.verify_readings(entry)
            self.note_seq(entry.dev_eui, bundle.last_seq)
            self.last_index = index
            return
        dev = entry.dev_eui
        if isinstance(entry, Enroll):
            if self.check_enroll(entry) == "same":
                st = self._devices[dev]
                raise Refused(ALREADY_ENROLLED, f"device {dev.hex()} is already enrolled with "
                                                f"this key and fields (entry {st.enrolled})")
            new = DeviceState(entry, index, (KeyPeriod(0, entry.public_key, index),))
        elif isinstance(entry, Rotate):
            st = self.check_rotate(entry)
            new = replace(st, keys=st.keys + (KeyPeriod(entry.from_seq, entry.public_key, index),))
        elif isinstance(entry, Revoke):
            st = self._active(dev)
            new = replace(st, revoke=entry, revoked=index)
        else:
            raise TypeError(f"not a log entry: {type(entry).__name__}")
        self._entries.append((index, encode(entry)))
        self._devices[dev] = new
        self.last_index = index

    def check_enroll(self, e: Enroll) -> str:
        """Returns "new" when the device may be enrolled, "same" when this key and
        these fields are enrolled already (a retried enrollment: nothing to
        log). Raises Refused revoked_device, key_conflict, metadata_conflict."""
        st = self._devices.get(e.dev_eui)
        if st is None:
            return "new"
        dev = e.dev_eui.hex()
        if st.revoked is not None:
            raise Refused(REVOKED_DEVICE, f"device {dev} was revoked at entry {st.revoked} "
                                          f"({st.revoke.reason}) and can not be enrolled again")
        if e.public_key != st.enroll.public_key:
            raise Refused(KEY_CONFLICT, f"device {dev} is enrolled (entry {st.enrolled}) with "
                                        "another public key; a new key enters by rotation")
        mine, theirs = st.enroll.fields(), e.fields()
        differ = [name for name in _ENROLL_FIELDS if mine[name] != theirs[name]]
        if differ:
            raise Refused(METADATA_CONFLICT, f"device {dev} is enrolled (entry {st.enrolled}) "
                                             f"with other {', '.join(differ)}")
        return "same"

    def check_rotate(self, e: Rotate) -> DeviceState:
        """The device's state when the rotation may be applied; raises Refused
        unknown_device, revoked_device, rotate_same_key, rotate_from_seq."""
        st = self._active(e.dev_eui)
        dev = e.dev_eui.hex()
        for p in st.keys:
            if p.key == e.public_key:
                raise Refused(ROTATE_SAME_KEY, f"device {dev} already used this key from seq "
                                               f"{p.from_seq} (entry {p.entry}); a rotation "
                                               "brings a new key")
        current = st.keys[-1]
        if e.from_seq <= current.from_seq:
            raise Refused(ROTATE_FROM_SEQ, f"from_seq {e.from_seq} of device {dev} must be "
                                           f"greater than {current.from_seq}, where its current "
                                           f"key begins (entry {current.entry})")
        seen = self._seen.get(e.dev_eui)
        if seen is not None and e.from_seq <= seen:
            raise Refused(ROTATE_FROM_SEQ, f"from_seq {e.from_seq} of device {dev} must be "
                                           f"greater than {seen}, the highest seq logged for it")
        return st

    def check_revoke(self, e: Revoke) -> DeviceState:
        return self._active(e.dev_eui)

    def next_from_seq(self, dev_eui: bytes) -> int:
        """The smallest from_seq a rotation of the device may take now."""
        st = self._active(dev_eui)
        return max(st.keys[-1].from_seq, self._seen.get(dev_eui, -1)) + 1

    def note_seq(self, dev_eui: bytes, last_seq: int) -> None:
        """Record that readings up to last_seq of the device are logged (a
        later rotation must begin above them)."""
        if dev_eui not in self._devices:
            raise Refused(UNKNOWN_DEVICE, f"device {_eui(dev_eui)} is not enrolled")
        if check_seq(last_seq, "last_seq") > self._seen.get(dev_eui, -1):
            self._seen[dev_eui] = last_seq

    def _active(self, dev_eui: bytes) -> DeviceState:
        st = self._devices.get(dev_eui)
        if st is None:
            raise Refused(UNKNOWN_DEVICE, f"device {_eui(dev_eui)} is not enrolled")
        if st.revoked is not None:
            raise Refused(REVOKED_DEVICE, f"device {_eui(dev_eui)} was revoked at entry "
                                          f"{st.revoked} ({st.revoke.reason})")
        return st

    def _state_as_of(self, dev_eui: bytes, as_of: int | None) -> DeviceState:
        st = self._devices.get(dev_eui)
        if st is None or (as_of is not None and as_of <= st.enrolled):
            raise Refused(UNKNOWN_DEVICE, f"device {_eui(dev_eui)} is not enrolled"
                          + ("" if st is None else f" before entry {as_of}"))
        if st.revoked is not None and (as_of is None or as_of > st.revoked):
            raise Refused(REVOKED_DEVICE, f"device {_eui(dev_eui)} was revoked at entry "
                                          f"{st.revoked} ({st.revoke.reason})")
        return st

    # Keys and readings

    def key_for(self, dev_eui: bytes, seq: int, as_of: int | None = None) -> bytes:
        """The key that signs reading `seq` of the device. as_of: the index of
        the entry holding the reading, to check an old entry against a
        registry replayed past it (a device revoked later still verified
        then). Raises Refused unknown_device, revoked_device."""
        check_seq(seq)
        return _period(self._state_as_of(dev_eui, as_of).keys, seq, as_of).key

    def verify_readings(self, entry: ReadingsEntry, as_of: int | None = None) -> frame.Bundle:
        """The entry's bundle, decoded, once its signature verifies with the
        device's key for its seqs. A bundle is signed with one key, so one
        whose seqs straddle a rotation is refused. Raises EntryError (not a
        bundle) or Refused unknown_device, revoked_device, straddles_rotation,
        bad_signature."""
        b = entry.decoded()
        dev = entry.dev_eui
        keys = self._state_as_of(dev, as_of).keys
        if len(keys) == 1:
            p = keys[0]
        else:
            p = _period(keys, b.readings[0].seq, as_of)
            q = _period(keys, b.readings[-1].seq, as_of)
            if p is not q:
                raise Refused(STRADDLES_ROTATION, f"bundle of seq {b.first_seq}..{b.last_seq} "
                                                  f"of device {dev.hex()} straddles its key "
                                                  f"rotation at seq {q.from_seq} (entry "
                                                  f"{q.entry}): a bundle is signed by one key")
        try:
            nacl.bindings.crypto_sign_open(b.signature + frame.SIGN_DOMAIN + dev + b.body, p.key)
        except nacl.exceptions.BadSignatureError:
            raise Refused(BAD_SIGNATURE, f"signature of the bundle of seq {b.first_seq}.."
                                         f"{b.last_seq} does not verify with the key of device "
                                         f"{dev.hex()} for those seqs (entry {p.entry})") from None
        return b

    # Persistence

    def to_json(self) -> str:
        """The registry as JSON: the registry entries it applied and the
        highest seq logged per device. from_json replays the entries through
        the same rules, so a stored state can not hold what they refuse."""
        return json.dumps({
            "format": _STATE_FORMAT,
            "last_index": self.last_index,
            "entries": [[index, data.hex()] for index, data in self._entries],
            "last_seq": {dev.hex(): seq for dev, seq in sorted(self._seen.items())},
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Registry:
        """A registry from to_json's output; ValueError when it is not one."""
        try:
            state = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"registry state: not JSON ({exc})") from None
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"registry state: format is not {_STATE_FORMAT!r}")
        entries, seen, last = state.get("entries"), state.get("last_seq"), state.get("last_index")
        if not isinstance(entries, list) or not isinstance(seen, dict):
            raise ValueError("registry state: entries must be a list and last_seq an object")
        reg = cls()
        for item in entries:
            try:
                index, data = item
                entry = decode(bytes.fromhex(data))
                if isinstance(entry, ReadingsEntry):
                    raise EntryError(ENTRY_TYPE, "a readings entry is not kept in the registry")
                reg.apply(entry, index)
            except (TypeError, ValueError, Refused) as exc:
                raise ValueError(f"registry state: entry {_short(item)}: {exc}") from None
        for dev, seq in seen.items():
            try:
                reg.note_seq(bytes.fromhex(dev), seq)
            except (TypeError, ValueError, Refused) as exc:
                raise ValueError(f"registry state: last_seq of {_short(dev)}: {exc}") from None
        if isinstance(last, bool) or not isinstance(last, int) or last < reg.last_index:
            raise ValueError(f"registry state: last_index {_short(last)} is not an entry index "
                             f"at or after {reg.last_index}")
        reg.last_index = last
        return reg
