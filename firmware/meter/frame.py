# The signed frame codec: the one definition of the bytes a meter sends.
#
# This module runs unchanged on MicroPython (the meter) and CPython (the
# gateway, the ledger node, the tools). Nothing else in the project may pack or
# unpack a frame; docs/protocol.md describes the same layout for people.
#
# Keep it portable: only `struct`, no typing, no f-string tricks, integers that
# stay below 2**30 on the meter.

import struct

VERSION = 1

# Frame types (low nibble of the header byte).
TYPE_READING = 1

# LoRaWAN application port readings travel on.
PORT_READING = 1

# Domain separation for signatures: a signature over a reading can never be
# mistaken for a signature over anything else this project signs.
SIGN_DOMAIN = b"SMR1"

SIG_LEN = 64
DEV_EUI_LEN = 8

# Reading body, big-endian:
#   B header (version << 4 | type)
#   I seq          sequence number, only grows, survives reboots
#   I t_end        unix seconds (UTC) at the end of the interval
#   H interval_s   interval length in seconds
#   I import_dwh   cumulative imported energy, 0.1 Wh units
#   I export_dwh   cumulative exported energy, 0.1 Wh units
#   H irms_ca      mean RMS current over the interval, 0.01 A units
#   H vrms_dv      mean RMS voltage over the interval, 0.1 V units (0: none)
#   B flags        FLAG_* below
_BODY_FMT = ">BIIHIIHHB"
BODY_LEN = struct.calcsize(_BODY_FMT)
READING_LEN = BODY_LEN + SIG_LEN

FLAG_VOLTAGE_MEASURED = 0x01  # power is real power from a voltage channel
FLAG_CT_MISSING = 0x02  # no clamp or an open input was detected
FLAG_CT_REVERSED = 0x04  # clamp mounted backwards (negative power seen)
FLAG_CLOCK_UNSYNCED = 0x08  # t_end comes from the free-running clock
FLAG_CLIPPED = 0x10  # samples outside the ADC's linear range, or current above 125 % of the clamp's rating
FLAG_FREQ_RANGE = 0x20  # mains frequency outside +-5 % of nominal
FLAG_ADC_FAULT = 0x40  # ADC stuck: no variation at all
_FLAGS_KNOWN = 0x7F

FLAG_NAMES = (
    (FLAG_VOLTAGE_MEASURED, "voltage_measured"),
    (FLAG_CT_MISSING, "ct_missing"),
    (FLAG_CT_REVERSED, "ct_reversed"),
    (FLAG_CLOCK_UNSYNCED, "clock_unsynced"),
    (FLAG_CLIPPED, "clipped"),
    (FLAG_FREQ_RANGE, "freq_range"),
    (FLAG_ADC_FAULT, "adc_fault"),
)


def flag_names(flags):
    return [name for bit, name in FLAG_NAMES if flags & bit]

U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF


class FrameError(ValueError):
    """A frame that cannot be accepted. `reason` is a short stable code
    (used as a metrics label); the message says what was wrong."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self):
        return self.message


class Reading:
    """A decoded reading frame. Energy fields keep the wire units; the
    properties give SI values."""

    def __init__(self, seq, t_end, interval_s, import_dwh, export_dwh,
                 irms_ca, vrms_dv, flags, body=b"", signature=b""):
        self.seq = seq
        self.t_end = t_end
        self.interval_s = interval_s
        self.import_dwh = import_dwh
        self.export_dwh = export_dwh
        self.irms_ca = irms_ca
        self.vrms_dv = vrms_dv
        self.flags = flags
        self.body = body
        self.signature = signature

    @property
    def import_wh(self):
        return self.import_dwh / 10

    @property
    def export_wh(self):
        return self.export_dwh / 10

    def as_dict(self):
        return {
            "seq": self.seq,
            "t_end": self.t_end,
            "interval_s": self.interval_s,
            "import_dwh": self.import_dwh,
            "export_dwh": self.export_dwh,
            "irms_ca": self.irms_ca,
            "vrms_dv": self.vrms_dv,
            "flags": self.flags,
        }


def _check_range(name, value, hi):
    if not isinstance(value, int) or value < 0 or value > hi:
        raise FrameError("field", "%s=%r outside 0..%d" % (name, value, hi))


def encode_body(seq, t_end, interval_s, import_dwh, export_dwh,
                irms_ca, vrms_dv, flags):
    """The unsigned part of a reading frame (BODY_LEN bytes)."""
    _check_range("seq", seq, U32_MAX)
    _check_range("t_end", t_end, U32_MAX)
    _check_range("interval_s", interval_s, U16_MAX)
    _check_range("import_dwh", import_dwh, U32_MAX)
    _check_range("export_dwh", export_dwh, U32_MAX)
    # Instantaneous values saturate rather than fail: a 700 A surge must not
    # stop the energy registers from being sent.
    if irms_ca > U16_MAX:
        irms_ca = U16_MAX
    if vrms_dv > U16_MAX:
        vrms_dv = U16_MAX
    _check_range("irms_ca", irms_ca, U16_MAX)
    _check_range("vrms_dv", vrms_dv, U16_MAX)
    _check_range("flags", flags, _FLAGS_KNOWN)
    return struct.pack(_BODY_FMT, (VERSION << 4) | TYPE_READING, seq, t_end,
                       interval_s, import_dwh, export_dwh, irms_ca, vrms_dv,
                       flags)


def signed_message(dev_eui, body):
    """What the device key signs: domain, device EUI (8 bytes), body.

    The EUI is signed but not sent: it comes from the network server, and a
    frame replayed under another device's EUI fails verification."""
    if len(dev_eui) != DEV_EUI_LEN:
        raise FrameError("field", "dev_eui must be %d bytes, got %d"
                         % (DEV_EUI_LEN, len(dev_eui)))
    return SIGN_DOMAIN + bytes(dev_eui) + bytes(body)


def assemble(body, signature):
    if len(body) != BODY_LEN:
        raise FrameError("field", "body must be %d bytes, got %d"
                         % (BODY_LEN, len(body)))
    if len(signature) != SIG_LEN:
        raise FrameError("field", "signature must be %d bytes, got %d"
                         % (SIG_LEN, len(signature)))
    return bytes(body) + bytes(signature)


def decode(frame):
    """Parse a reading frame. Raises FrameError with reason one of
    'empty', 'truncated', 'oversized', 'version', 'type', 'field'."""
    n = len(frame)
    if n == 0:
        raise FrameError("empty", "empty frame")
    header = frame[0]
    version = header >> 4
    ftype = header & 0x0F
    if version != VERSION:
        raise FrameError("version", "frame version %d, this codec reads %d"
                         % (version, VERSION))
    if ftype != TYPE_READING:
        raise FrameError("type", "frame type %d is not a reading (%d)"
                         % (ftype, TYPE_READING))
    if n < READING_LEN:
        raise FrameError("truncated", "reading frame is %d bytes, expected %d"
                         % (n, READING_LEN))
    if n > READING_LEN:
        raise FrameError("oversized", "reading frame is %d bytes, expected %d"
                         % (n, READING_LEN))
    (_, seq, t_end, interval_s, imp, exp, irms_ca, vrms_dv,
     flags) = struct.unpack(_BODY_FMT, frame[:BODY_LEN])
    if flags & ~_FLAGS_KNOWN:
        raise FrameError("field", "unknown flag bits 0x%02x" %
                         (flags & ~_FLAGS_KNOWN))
    if interval_s == 0:
        raise FrameError("field", "interval_s is 0")
    return Reading(seq, t_end, interval_s, imp, exp, irms_ca, vrms_dv, flags,
                   bytes(frame[:BODY_LEN]), bytes(frame[BODY_LEN:]))
