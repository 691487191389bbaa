# The frame codec: the one definition of the bytes a meter sends and receives.
#
# This module runs unchanged on MicroPython (the meter) and CPython (the
# gateway, the ledger node, the tools). Nothing else in the project may pack or
# unpack these bytes; docs/protocol.md describes the same layout for people and
# gateway/chirpstack_codec.js reads it inside ChirpStack (both are tested
# against the vectors in tests/vectors/frames.json).
#
# Uplink (fPort 1):
#   bundle    several consecutive readings under one Ed25519 signature. A
#             reading is a snapshot of the cumulative registers, so a lost
#             bundle loses time resolution, never energy, and every other
#             bundle still verifies on its own.
#   fragment  a piece of a bundle longer than the data rate carries (EU868
#             DR0-DR2 and US915 DR1 take 51/53 bytes; a signature alone is 64).
# Downlink (fPort 2):
#   command   relay, interval, time, resend; authenticated for one device with
#             a truncated HMAC-SHA256 under its command key, counter against
#             replay.
#
# Keep it portable: struct, hashlib; no typing; ints on the meter stay below
# 2**30 except the 32-bit wire fields (decoded outside the metering loop).

import hashlib
import struct

VERSION = 1

# Frame types (low nibble of the header byte).
TYPE_BUNDLE = 1
TYPE_FRAGMENT = 2
TYPE_COMMAND = 8

# LoRaWAN application ports.
PORT_READING = 1
PORT_COMMAND = 2

# Domain separation: a signature over readings (or a tag over a command) can
# never be mistaken for one over anything else this project signs.
SIGN_DOMAIN = b"SMR1"
COMMAND_DOMAIN = b"SMC1"

SIG_LEN = 64
DEV_EUI_LEN = 8
COMMAND_KEY_LEN = 16
TAG_LEN = 8

# Bundle body, big-endian: header B, count B, then the first reading in full
# (seq I, t_end I, import_dwh I, export_dwh I, flags B); each later reading
# as flags B then unsigned LEB128 varints dt_s, d_import_dwh, d_export_dwh.
_HEAD_FMT = ">BBIIIIB"
HEAD_LEN = 19
MAX_READINGS = 32
MIN_BUNDLE_LEN = HEAD_LEN + SIG_LEN
# The largest a bundle can get: every later reading at its widest.
MAX_BUNDLE_LEN = HEAD_LEN + (MAX_READINGS - 1) * 16 + SIG_LEN

# Fragment: header B, tag H (low 16 bits of the bundle's first seq),
# index << 4 | (count - 1) B, then the piece.
FRAG_HEAD_LEN = 4
MAX_FRAGMENTS = 16

# Command: header B, counter I, expires I (unix s, 0 = never), opcode B,
# arguments, tag (TAG_LEN bytes).
_CMD_FMT = ">BIIB"
CMD_HEAD_LEN = 10
OP_RELAY = 1  # mode B (RELAY_*), hold_s H (0: until the next command)
OP_INTERVAL = 2  # interval_s H
OP_TIME = 3  # unix_s I
OP_RESEND = 4  # first_seq I, count H
RELAY_OFF = 0
RELAY_ON = 1
RELAY_AUTO = 2
_ARGS = {OP_RELAY: ">BH", OP_INTERVAL: ">H", OP_TIME: ">I", OP_RESEND: ">IH"}
OP_NAMES = {OP_RELAY: "relay", OP_INTERVAL: "interval", OP_TIME: "time", OP_RESEND: "resend"}

FLAG_VOLTAGE_MEASURED = 0x01  # power is real power from a voltage channel
FLAG_CT_MISSING = 0x02  # no clamp or an open input was detected
FLAG_CT_REVERSED = 0x04  # clamp mounted backwards (negative power seen)
FLAG_CLOCK_UNSYNCED = 0x08  # t_end comes from the free-running clock
FLAG_CLIPPED = 0x10  # samples outside the ADC's linear range, or current above 125 % of the clamp's rating
FLAG_FREQ_RANGE = 0x20  # mains frequency outside +-5 % of nominal
FLAG_ADC_FAULT = 0x40  # ADC stuck: no variation at all
FLAG_RESTART = 0x80  # first reading after the meter (re)started: its interval began at power-up
_FLAGS_KNOWN = 0xFF

FLAG_NAMES = (
    (FLAG_VOLTAGE_MEASURED, "voltage_measured"),
    (FLAG_CT_MISSING, "ct_missing"),
    (FLAG_CT_REVERSED, "ct_reversed"),
    (FLAG_CLOCK_UNSYNCED, "clock_unsynced"),
    (FLAG_CLIPPED, "clipped"),
    (FLAG_FREQ_RANGE, "freq_range"),
    (FLAG_ADC_FAULT, "adc_fault"),
    (FLAG_RESTART, "restart"),
)

U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF


def flag_names(flags):
    return [name for bit, name in FLAG_NAMES if flags & bit]


class FrameError(ValueError):
    """Bytes that cannot be accepted. `reason` is a short stable code (a
    metrics label at the gateway and the ledger); the message says what was
    wrong."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self):
        return self.message


class Reading:
    """One register snapshot. Energy fields keep the wire units (0.1 Wh)."""

    def __init__(self, seq, t_end, import_dwh, export_dwh, flags):
        self.seq = seq
        self.t_end = t_end
        self.import_dwh = import_dwh
        self.export_dwh = export_dwh
        self.flags = flags

    @property
    def import_wh(self):
        return self.import_dwh / 10

    @property
    def export_wh(self):
        return self.export_dwh / 10

    def as_dict(self):
        return {"seq": self.seq, "t_end": self.t_end, "import_dwh": self.import_dwh,
                "export_dwh": self.export_dwh, "flags": self.flags}

    def __eq__(self, other):
        return isinstance(other, Reading) and self.as_dict() == other.as_dict()

    def __repr__(self):
        return "Reading(%d, %d, %d, %d, 0x%02x)" % (
            self.seq, self.t_end, self.import_dwh, self.export_dwh, self.flags)


class Bundle:
    """A decoded bundle: its readings, the signed body and the signature."""

    def __init__(self, readings, body, signature):
        self.readings = readings
        self.body = body
        self.signature = signature

    @property
    def first_seq(self):
        return self.readings[0].seq

    @property
    def last_seq(self):
        return self.readings[-1].seq

    def data(self):
        return self.body + self.signature


class Fragment:
    def __init__(self, tag, index, count, piece):
        self.tag = tag
        self.index = index
        self.count = count
        self.piece = piece


class Command:
    def __init__(self, counter, expires, opcode, args):
        self.counter = counter
        self.expires = expires
        self.opcode = opcode
        self.args = args

    @property
    def name(self):
        return OP_NAMES.get(self.opcode, "op%d" % self.opcode)

    def as_dict(self):
        return {"counter": self.counter, "expires": self.expires, "op": self.name,
                "args": list(self.args)}


def _check_range(name, value, hi, lo=0):
    if not isinstance(value, int) or value < lo or value > hi:
        raise FrameError("field", "%s=%r outside %d..%d" % (name, value, lo, hi))


def _header(ftype):
    return (VERSION << 4) | ftype


def frame_type(data):
    """The type nibble of a frame after checking its version; FrameError
    'empty' or 'version' otherwise."""
    if len(data) == 0:
        raise FrameError("empty", "empty frame")
    version = data[0] >> 4
    if version != VERSION:
        raise FrameError("version", "frame version %d, this codec reads %d" % (version, VERSION))
    return data[0] & 0x0F


# ---------------------------------------------------------------- varints

def _varint_len(v):
    n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


def _put_varint(buf, v):
    while v >= 0x80:
        buf.append((v & 0x7F) | 0x80)
        v >>= 7
    buf.append(v)


def _get_varint(data, i, end, name):
    v = 0
    shift = 0
    while True:
        if i >= end:
            raise FrameError("truncated", "bundle ends inside %s" % name)
        b = data[i]
        i += 1
        if shift == 28 and b > 0x0F:
            raise FrameError("field", "%s does not fit 32 bits" % name)
        v |= (b & 0x7F) << shift
        if not b & 0x80:
            if b == 0 and shift:
                raise FrameError("field", "%s is not minimally encoded" % name)
            return v, i
        shift += 7


# ---------------------------------------------------------------- bundles

def _check_reading(r):
    _check_range("seq", r[0], U32_MAX)
    _check_range("t_end", r[1], U32_MAX)
    _check_range("import_dwh", r[2], U32_MAX)
    _check_range("export_dwh", r[3], U32_MAX)
    _check_range("flags", r[4], _FLAGS_KNOWN)


def _fields(r):
    if isinstance(r, Reading):
        return (r.seq, r.t_end, r.import_dwh, r.export_dwh, r.flags)
    return r


def _step(prev, r):
    """(dt, d_import, d_export) from reading prev to reading r, checking that
    they may share a bundle: seq consecutive, time and registers not going
    backwards."""
    if r[0] != prev[0] + 1:
        raise FrameError("field", "seq %d follows %d: readings in a bundle are consecutive"
                         % (r[0], prev[0]))
    dt = r[1] - prev[1]
    di = r[2] - prev[2]
    de = r[3] - prev[3]
    if dt <= 0:
        raise FrameError("field", "t_end of seq %d is not after the previous reading" % r[0])
    if di < 0 or de < 0:
        raise FrameError("field", "registers of seq %d went backwards" % r[0])
    return dt, di, de


def can_follow(prev, r):
    """True when reading r may join a bundle whose last reading is prev."""
    try:
        _step(_fields(prev), _fields(r))
    except FrameError:
        return False
    return True


def reading_len(prev, r):
    """Bytes reading r adds to a bundle after prev (None: r starts one)."""
    if prev is None:
        return HEAD_LEN
    dt, di, de = _step(_fields(prev), _fields(r))
    return 1 + _varint_len(dt) + _varint_len(di) + _varint_len(de)


def encode_body(readings):
    """The signed part of a bundle: 1..MAX_READINGS consecutive readings,
    each a Reading or a (seq, t_end, import_dwh, export_dwh, flags) tuple."""
    n = len(readings)
    if not 1 <= n <= MAX_READINGS:
        raise FrameError("field", "a bundle holds 1..%d readings, not %d" % (MAX_READINGS, n))
    prev = _fields(readings[0])
    _check_reading(prev)
    buf = bytearray(struct.pack(_HEAD_FMT, _header(TYPE_BUNDLE), n, prev[0], prev[1],
                                prev[2], prev[3], prev[4]))
    for k in range(1, n):
        r = _fields(readings[k])
        _check_reading(r)
        dt, di, de = _step(prev, r)
        buf.append(r[4])
        _put_varint(buf, dt)
        _put_varint(buf, di)
        _put_varint(buf, de)
        prev = r
    return bytes(buf)


def signed_message(dev_eui, body):
    """What the device key signs: domain, device EUI (8 bytes), body.

    The EUI is signed but not sent: it comes from the network server, and a
    bundle replayed under another device's EUI fails verification."""
    if len(dev_eui) != DEV_EUI_LEN:
        raise FrameError("field", "dev_eui must be %d bytes, got %d" % (DEV_EUI_LEN, len(dev_eui)))
    return SIGN_DOMAIN + bytes(dev_eui) + bytes(body)


def assemble(body, signature):
    if len(signature) != SIG_LEN:
        raise FrameError("field", "signature must be %d bytes, got %d" % (SIG_LEN, len(signature)))
    return bytes(body) + bytes(signature)


def decode_bundle(data):
    """Parse a bundle (body + signature). FrameError reasons: empty, version,
    type, truncated, oversized, field. The signature is NOT checked here."""
    ftype = frame_type(data)
    if ftype != TYPE_BUNDLE:
        raise FrameError("type", "frame type %d is not a bundle (%d)" % (ftype, TYPE_BUNDLE))
    size = len(data)
    if size < MIN_BUNDLE_LEN:
        raise FrameError("truncated", "bundle is %d bytes, the shortest is %d"
                         % (size, MIN_BUNDLE_LEN))
    if size > MAX_BUNDLE_LEN:
        raise FrameError("oversized", "bundle is %d bytes, the longest is %d"
                         % (size, MAX_BUNDLE_LEN))
    _, n, seq, t_end, imp, exp, flags = struct.unpack(_HEAD_FMT, data[:HEAD_LEN])
    if not 1 <= n <= MAX_READINGS:
        raise FrameError("field", "bundle count %d outside 1..%d" % (n, MAX_READINGS))
    end = size - SIG_LEN
    readings = [Reading(seq, t_end, imp, exp, flags)]
    i = HEAD_LEN
    for k in range(1, n):
        if i >= end:
            raise FrameError("truncated", "bundle says %d readings, holds %d" % (n, k))
        flags = data[i]
        dt, i = _get_varint(data, i + 1, end, "dt of reading %d" % k)
        di, i = _get_varint(data, i, end, "d_import of reading %d" % k)
        de, i = _get_varint(data, i, end, "d_export of reading %d" % k)
        if dt == 0:
            raise FrameError("field", "reading %d has dt 0" % k)
        seq += 1
        t_end += dt
        imp += di
        exp += de
        if seq > U32_MAX or t_end > U32_MAX or imp > U32_MAX or exp > U32_MAX:
            raise FrameError("field", "reading %d overflows a 32-bit field" % k)
        readings.append(Reading(seq, t_end, imp, exp, flags))
    if i != end:
        raise FrameError("oversized", "%d bytes after %d readings before the signature"
                         % (end - i, n))
    return Bundle(readings, bytes(data[:end]), bytes(data[end:]))


# -------------------------------------------------------------- fragments

def fragment_layout(size, max_payload):
    """(count, piece): how a bundle of `size` bytes travels in payloads of at
    most max_payload bytes. (1, size) when it fits; else the fewest pieces
    that fit, of near-equal size (count may exceed MAX_FRAGMENTS here: the
    caller decides)."""
    if size <= max_payload:
        return 1, size
    room = max_payload - FRAG_HEAD_LEN
    if room < 1:
        raise FrameError("field", "a %d-byte payload cannot carry a fragment" % max_payload)
    count = (size + room - 1) // room
    return count, (size + count - 1) // count


def fragment(data, max_payload):
    """Split a bundle into frames of at most max_payload bytes. One frame
    (the bundle itself) when it fits; else 2..MAX_FRAGMENTS fragments of
    near-equal size."""
    size = len(data)
    count, piece = fragment_layout(size, max_payload)
    if count == 1:
        return [bytes(data)]
    if count > MAX_FRAGMENTS:
        raise FrameError("field", "a %d-byte bundle needs %d fragments of %d bytes, at most %d"
                         % (size, count, max_payload, MAX_FRAGMENTS))
    tag = struct.unpack(">I", data[2:6])[0] & 0xFFFF
    out = []
    for k in range(count):
        out.append(struct.pack(">BHB", _header(TYPE_FRAGMENT), tag, (k << 4) | (count - 1))
                   + bytes(data[k * piece:(k + 1) * piece]))
    return out


def decode_fragment(data):
    ftype = frame_type(data)
    if ftype != TYPE_FRAGMENT:
        raise FrameError("type", "frame type %d is not a fragment (%d)" % (ftype, TYPE_FRAGMENT))
    if len(data) <= FRAG_HEAD_LEN:
        raise FrameError("truncated", "fragment of %d bytes carries nothing" % len(data))
    _, tag, ic = struct.unpack(">BHB", data[:FRAG_HEAD_LEN])
    index = ic >> 4
    count = (ic & 0x0F) + 1
    if count < 2 or index >= count:
        raise FrameError("field", "fragment %d of %d" % (index, count))
    return Fragment(tag, index, count, bytes(data[FRAG_HEAD_LEN:]))


def reassemble(fragments):
    """The bundle bytes from one complete set of fragments (any order).
    FrameError 'fragment' when they do not form one bundle."""
    if not fragments:
        raise FrameError("fragment", "no fragments")
    f0 = fragments[0]
    pieces = [None] * f0.count
    for f in fragments:
        if f.tag != f0.tag or f.count != f0.count:
            raise FrameError("fragment", "fragments of different bundles")
        pieces[f.index] = f.piece
    if None in pieces:
        raise FrameError("fragment", "missing fragment %d of %d" % (pieces.index(None), f0.count))
    data = b"".join(pieces)
    if len(data) >= 6 and struct.unpack(">I", data[2:6])[0] & 0xFFFF != f0.tag:
        raise FrameError("fragment", "fragment tag %d does not match the bundle" % f0.tag)
    return data


def decode_uplink(data):
    """A Bundle or a Fragment from an fPort-1 payload."""
    ftype = frame_type(data)
    if ftype == TYPE_BUNDLE:
        return decode_bundle(data)
    if ftype == TYPE_FRAGMENT:
        return decode_fragment(data)
    raise FrameError("type", "frame type %d is not an uplink type" % ftype)


# --------------------------------------------------------------- commands

def _hmac_sha256(key, msg):
    # RFC 2104 with SHA-256 (MicroPython has hashlib.sha256 but no hmac).
    block = 64
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = bytes(key) + b"\x00" * (block - len(key))
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    inner.update(msg)
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    outer.update(inner.digest())
    return outer.digest()


def command_tag(key, dev_eui, head):
    if len(key) != COMMAND_KEY_LEN:
        raise FrameError("field", "command key must be %d bytes, got %d" % (COMMAND_KEY_LEN, len(key)))
    if len(dev_eui) != DEV_EUI_LEN:
        raise FrameError("field", "dev_eui must be %d bytes, got %d" % (DEV_EUI_LEN, len(dev_eui)))
    return _hmac_sha256(key, COMMAND_DOMAIN + bytes(dev_eui) + bytes(head))[:TAG_LEN]


def encode_command(key, dev_eui, counter, expires, opcode, *args):
    """A downlink command for one device, tagged with its command key."""
    fmt = _ARGS.get(opcode)
    if fmt is None:
        raise FrameError("field", "unknown opcode %r" % opcode)
    _check_range("counter", counter, U32_MAX, 1)
    _check_range("expires", expires, U32_MAX)
    try:
        head = struct.pack(_CMD_FMT, _header(TYPE_COMMAND), counter, expires, opcode) + struct.pack(fmt, *args)
    except (struct.error, TypeError, OverflowError, ValueError) as exc:
        raise FrameError("field", "arguments of %s: %s" % (OP_NAMES[opcode], exc))
    return head + command_tag(key, dev_eui, head)


def decode_command(key, dev_eui, data):
    """Check and parse a command. FrameError reasons: empty, version, type,
    truncated, oversized, opcode, auth (the tag does not verify). Replay and
    expiry are the receiver's to check (it knows its counter and clock)."""
    ftype = frame_type(data)
    if ftype != TYPE_COMMAND:
        raise FrameError("type", "frame type %d is not a command (%d)" % (ftype, TYPE_COMMAND))
    if len(data) < CMD_HEAD_LEN + TAG_LEN:
        raise FrameError("truncated", "command is %d bytes, the shortest is %d"
                         % (len(data), CMD_HEAD_LEN + TAG_LEN))
    _, counter, expires, opcode = struct.unpack(_CMD_FMT, data[:CMD_HEAD_LEN])
    fmt = _ARGS.get(opcode)
    if fmt is None:
        raise FrameError("opcode", "unknown opcode %d" % opcode)
    want = CMD_HEAD_LEN + struct.calcsize(fmt) + TAG_LEN
    if len(data) != want:
        raise FrameError("truncated" if len(data) < want else "oversized",
                         "%s command is %d bytes, expected %d" % (OP_NAMES[opcode], len(data), want))
    head = bytes(data[:-TAG_LEN])
    tag = command_tag(key, dev_eui, head)
    diff = 0
    for a, b in zip(tag, data[-TAG_LEN:]):
        diff |= a ^ b
    if diff:
        raise FrameError("auth", "command tag does not verify for this device")
    return Command(counter, expires, opcode, struct.unpack(fmt, head[CMD_HEAD_LEN:]))
