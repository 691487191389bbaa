"""ChirpStack v4 MQTT integration: events in, downlink commands out.

Turns one MQTT message from ChirpStack's JSON or protobuf marshaler into an
`Uplink`, `Ack` or `TxAck`, or raises `Rejected` with a stable reason code,
and builds the `command/down` message that queues a downlink. The message
classes are the ones ChirpStack publishes (`chirpstack_api.integration`);
nothing here touches the network, so every rejection can be exercised without
a broker.

JSON events are checked exactly as `json_format.ParseDict(...,
ignore_unknown_fields=True)` checks them, but without building the whole
message: ParseDict walks every gateway's metadata in Python and costs a few
hundred microseconds per uplink, more than the signature check. An event in
the form ChirpStack writes (right JSON types, values in range) is recognised
by a quick walk over the dict that accepts only what ParseDict accepts; any
other event goes through ParseDict itself, which decides and explains.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import sys
import uuid
from dataclasses import dataclass

from chirpstack_api import integration
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

# Far above any LoRaWAN uplink event (a 242-byte payload plus metadata from a
# dozen gateways is a few KiB); anything bigger is refused before parsing so a
# rogue publisher cannot make the daemon parse megabytes.
MAX_MESSAGE_BYTES = 64 * 1024

MARSHALERS = ("auto", "json", "protobuf")
# Every reason parse_uplink, parse_ack and parse_txack give.
REASONS = ("oversized_message", "malformed_json", "malformed_event", "topic_mismatch")

_DEV_EUI = re.compile(r"[0-9a-f]{16}\Z")
_JSON_SPACE = b" \t\r\n"  # what JSON (and json.loads) skips before a value


class Rejected(Exception):
    """An event the gateway will not use. `reason` is a short stable code
    (a metrics label); the message says what was wrong."""

    def __init__(self, reason: str, message: str, dev_eui: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.dev_eui = dev_eui

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Uplink:
    dev_eui: str  # 16 lowercase hex digits
    application_id: str
    deduplication_id: str  # "" when the network server did not send one
    f_port: int
    f_cnt: int
    data: bytes


@dataclass(frozen=True)
class Ack:
    """The device answered a confirmed downlink (`acknowledged`), or did not
    within the network server's timeout (acknowledged false)."""
    dev_eui: str
    application_id: str
    queue_item_id: str
    acknowledged: bool
    f_cnt_down: int


@dataclass(frozen=True)
class TxAck:
    """A gateway took the downlink for transmission; it says nothing about
    the device having received it."""
    dev_eui: str
    application_id: str
    queue_item_id: str
    f_cnt_down: int


def uplink_topic(application_id: str = "+") -> str:
    """The subscription for uplink events of one application (or all: "+")."""
    return event_topic(application_id, "up")


def event_topic(application_id: str, event: str) -> str:
    """The subscription for one kind of event (up, ack, txack, log, ...) of
    one application (or all: "+")."""
    return f"application/{application_id}/device/+/event/{event}"


def valid_application_id(value: str) -> bool:
    """An application id that may go into MQTT topics: a wildcard or a level
    separator would address other devices' queues."""
    return (isinstance(value, str) and 0 < len(value) <= 200
            and not any(c in value for c in "/+#\0"))


def command_topic(application_id: str, dev_eui: str) -> str:
    """Where ChirpStack takes downlinks to enqueue for one device."""
    return f"application/{application_id}/device/{dev_eui}/command/down"


def topic_event(topic: str) -> tuple[str, str] | None:
    """(device EUI lower-cased, event kind) of an event topic, else None."""
    parts = topic.split("/")
    if (len(parts) == 6 and parts[0] == "application" and parts[2] == "device"
            and parts[4] == "event" and parts[5]):
        return parts[3].lower(), parts[5]
    return None


def topic_dev_eui(topic: str) -> str | None:
    """The device EUI named by an uplink event topic, lower-cased."""
    named = topic_event(topic)
    return named[0] if named is not None and named[1] == "up" else None


def command_message(dev_eui: str, f_port: int, data: bytes, confirmed: bool = False,
                    item_id: str | None = None, expires_at: float | None = None,
                    marshaler: str = "json") -> bytes:
    """A `DownlinkCommand` as ChirpStack's integration takes it, JSON or
    protobuf (the marshaler ChirpStack is configured with). The id comes back
    in the `txack` and `ack` events of the transmission. `expires_at` (unix
    seconds): ChirpStack drops the downlink instead of sending it later."""
    if marshaler not in ("json", "protobuf"):
        raise ValueError(f"marshaler must be 'json' or 'protobuf', got {marshaler!r}")
    cmd = integration.DownlinkCommand(id=item_id or str(uuid.uuid4()), dev_eui=dev_eui,
                                      confirmed=confirmed, f_port=f_port, data=data)
    if expires_at is not None:
        if not math.isfinite(expires_at) or expires_at < 0:
            raise ValueError(f"expires_at must be unix seconds, got {expires_at!r}")
        # Whole seconds and the fraction apart: unix time in nanoseconds is
        # beyond a double's precision.
        seconds = math.floor(expires_at)
        nanos = round((expires_at - seconds) * 1e9)
        if nanos >= 1_000_000_000:
            seconds, nanos = seconds + 1, 0
        cmd.expires_at.seconds, cmd.expires_at.nanos = seconds, nanos
    if marshaler == "protobuf":
        return cmd.SerializeToString()
    doc = {"id": cmd.id, "devEui": dev_eui, "confirmed": confirmed, "fPort": f_port,
           "data": base64.b64encode(data).decode()}
    if expires_at is not None:
        doc["expiresAt"] = cmd.expires_at.ToJsonString()  # RFC 3339, UTC ("...Z")
    return json.dumps(doc).encode()


def _strict_b64(value: str) -> bytes:
    # protobuf's JSON parser silently drops characters outside the alphabet;
    # a payload mangled in transit must be refused, not half-decoded.
    # Raises ValueError (binascii.Error, or a non-ASCII character).
    padded = value + "=" * (-len(value) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except binascii.Error:
        return base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)


# -- the quick check: "ParseDict would accept this" ----------------------------
#
# Each checker answers True only for values ParseDict converts without an
# error; False means "not sure", never "bad": ParseDict then decides. So the
# checkers may be narrower than ParseDict (they are: no numbers as strings, no
# enum numbers, no time stamps before 1900, ...) but never wider.
# tests/unit/test_chirpstack_events.py compares the two on mutated events.

_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads leaves only unpaired ones
_TIMESTAMP = re.compile(
    r"([0-9]{4})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T(?:[01][0-9]|2[0-3]):[0-5][0-9]"
    r":[0-5][0-9](?:\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])\Z")
_DURATION = re.compile(r"-?[0-9]{1,11}(?:\.[0-9]{1,9})?s\Z")
_INT64_TEXT = re.compile(r"-?[0-9]{1,20}\Z")
_MONTH_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_FLOAT_MAX = 3.4028234663852886e38
_EXACT_INT = 2 ** 53  # ints that convert to a double without loss or overflow
_STRUCT_DEPTH = 16  # far below ParseDict's recursion limit (100 messages)
_FD = FieldDescriptor
_INT_RANGES = {
    _FD.TYPE_INT32: (-2 ** 31, 2 ** 31 - 1), _FD.TYPE_SINT32: (-2 ** 31, 2 ** 31 - 1),
    _FD.TYPE_SFIXED32: (-2 ** 31, 2 ** 31 - 1), _FD.TYPE_UINT32: (0, 2 ** 32 - 1),
    _FD.TYPE_FIXED32: (0, 2 ** 32 - 1), _FD.TYPE_INT64: (-2 ** 63, 2 ** 63 - 1),
    _FD.TYPE_SINT64: (-2 ** 63, 2 ** 63 - 1), _FD.TYPE_SFIXED64: (-2 ** 63, 2 ** 63 - 1),
    _FD.TYPE_UINT64: (0, 2 ** 64 - 1), _FD.TYPE_FIXED64: (0, 2 ** 64 - 1),
}
_64_BIT = {_FD.TYPE_INT64, _FD.TYPE_SINT64, _FD.TYPE_SFIXED64, _FD.TYPE_UINT64, _FD.TYPE_FIXED64}
# Well-known types ParseDict converts specially and the quick check leaves to it.
_LEFT_TO_PARSEDICT = {"google.protobuf.Any", "google.protobuf.FieldMask",
                      "google.protobuf.Value", "google.protobuf.ListValue",
                      "google.protobuf.DoubleValue", "google.protobuf.FloatValue",
                      "google.protobuf.Int64Value", "google.protobuf.UInt64Value",
                      "google.protobuf.Int32Value", "google.protobuf.UInt32Value",
                      "google.protobuf.BoolValue", "google.protobuf.StringValue",
                      "google.protobuf.BytesValue"}


def _text_ok(v) -> bool:
    return type(v) is str and (v.isascii() or _SURROGATE.search(v) is None)


def _bytes_ok(v) -> bool:
    if type(v) is not str:
        return False
    try:  # exactly what ParseDict does with a bytes field
        encoded = v.encode("utf-8")
        base64.urlsafe_b64decode(encoded + b"=" * (4 - len(encoded) % 4))
    except ValueError:
        return False
    return True


def _timestamp_ok(v) -> bool:
    if type(v) is not str:
        return False
    m = _TIMESTAMP.match(v)
    if m is None:
        return False
    # Fixed-width digits compare as text; clear of Timestamp's limits
    # (years 1 to 9999) whatever the offset.
    year, month, day = m.group(1, 2, 3)
    if not "1900" <= year <= "9998":
        return False
    if day <= "28":
        return True
    year_n, month_n, day_n = int(year), int(month), int(day)
    if day_n > _MONTH_DAYS[month_n]:
        return False
    return not (month_n == 2 and day_n == 29
                and (year_n % 4 != 0 or (year_n % 100 == 0 and year_n % 400 != 0)))


def _duration_ok(v) -> bool:
    return type(v) is str and _DURATION.match(v) is not None


def _struct_value_ok(v, depth: int) -> bool:
    t = type(v)
    if t is str:
        return v.isascii() or _SURROGATE.search(v) is None
    if v is None or t is bool:
        return True
    if t is int:
        return -_EXACT_INT <= v <= _EXACT_INT
    if t is float:
        return math.isfinite(v)
    if depth >= _STRUCT_DEPTH:
        return False
    if t is dict:
        return all(_text_ok(k) and _struct_value_ok(x, depth + 1) for k, x in v.items())
    if t is list:
        return all(_struct_value_ok(x, depth + 1) for x in v)
    return False


def _struct_ok(v) -> bool:
    return type(v) is dict and _struct_value_ok(v, 0)


def _never(v) -> bool:
    return False


# How the quick check tests one field's value: the common kinds inline (a
# function call per field is most of the time spent), the rest by a function.
_STR, _INT, _NUM, _BOOL, _ENUM, _FN = range(6)


def _scalar_spec(field) -> tuple:
    t = field.type
    if t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        if t in _64_BIT:  # protobuf JSON writes 64-bit integers as strings
            def check(v):
                if type(v) is str and _INT64_TEXT.match(v) is not None:
                    v = int(v)
                return type(v) is int and lo <= v <= hi
            return _FN, check
        return _INT, (lo, hi)
    if t == _FD.TYPE_FLOAT:
        return _NUM, _FLOAT_MAX  # NaN fails every comparison, infinities the bound
    if t == _FD.TYPE_DOUBLE:
        return _NUM, sys.float_info.max
    if t == _FD.TYPE_BOOL:
        return _BOOL, None
    if t == _FD.TYPE_STRING:
        return _STR, None
    if t == _FD.TYPE_BYTES:
        return _FN, _bytes_ok
    if t == _FD.TYPE_ENUM:
        return _ENUM, frozenset(field.enum_type.values_by_name)
    return _FN, _never


def _as_function(spec: tuple):
    code, arg = spec
    if code == _STR:
        return _text_ok
    if code == _INT:
        lo, hi = arg
        return lambda v: type(v) is int and lo <= v <= hi
    if code == _NUM:
        return lambda v: ((type(v) is float and -arg <= v <= arg)
                          or (type(v) is int and -_EXACT_INT <= v <= _EXACT_INT))
    if code == _BOOL:
        return lambda v: type(v) is bool
    if code == _ENUM:
        return lambda v: type(v) is str and v in arg
    return arg


def _message_checker(desc, building: set):
    """The quick check for a JSON object of message type `desc`."""
    name = desc.full_name
    if name == "google.protobuf.Timestamp":
        return _timestamp_ok
    if name == "google.protobuf.Duration":
        return _duration_ok
    if name == "google.protobuf.Struct":
        return _struct_ok
    if name in _LEFT_TO_PARSEDICT or name in building:
        return _never  # a recursive message type too: ParseDict bounds its depth
    building = building | {name}
    fields: dict[str, tuple] = {}
    for f in desc.fields:
        code, arg = _field_spec(f, building)
        oneof = f.containing_oneof.name if f.containing_oneof is not None else None
        fields[f.name] = (code, arg, oneof)
    for f in desc.fields:  # ParseDict looks a key up by JSON name first
        fields[f.json_name] = fields[f.name]

    def check_message(v) -> bool:
        if type(v) is not dict:
            return False
        oneofs = None
        for key, x in v.items():
            spec = fields.get(key)
            if spec is None:
                # Unknown fields are ignored, but ParseDict reads "[...]" as an
                # extension and fails to look up a name with a lone surrogate.
                if key[:1] == "[" or not (key.isascii() or _SURROGATE.search(key) is None):
                    return False
                continue
            if x is None:
                continue  # null: the field keeps its default
            code, arg, oneof = spec
            if oneof is not None:
                if oneofs is None:
                    oneofs = {oneof}
                elif oneof in oneofs:
                    return False
                else:
                    oneofs.add(oneof)
            if code == _STR:
                if type(x) is not str or not (x.isascii() or _SURROGATE.search(x) is None):
                    return False
            elif code == _INT:
                if type(x) is not int or not arg[0] <= x <= arg[1]:
                    return False
            elif code == _FN:
                if not arg(x):
                    return False
            elif code == _NUM:
                if type(x) is float:
                    if not -arg <= x <= arg:
                        return False
                elif type(x) is not int or not -_EXACT_INT <= x <= _EXACT_INT:
                    return False
            elif code == _ENUM:
                if type(x) is not str or x not in arg:
                    return False
            elif type(x) is not bool:
                return False
        return True
    return check_message


def _field_spec(field, building: set) -> tuple:
    if field.type == _FD.TYPE_MESSAGE:
        entry = field.message_type
        if entry.GetOptions().map_entry:
            key_f, value_f = entry.fields_by_name["key"], entry.fields_by_name["value"]
            if key_f.type != _FD.TYPE_STRING:
                return _FN, _never
            value_check = (_message_checker(value_f.message_type, building)
                           if value_f.type == _FD.TYPE_MESSAGE
                           else _as_function(_scalar_spec(value_f)))

            def check_map(v) -> bool:
                if type(v) is not dict:
                    return False
                for k, x in v.items():
                    if not (_text_ok(k) and value_check(x)):
                        return False
                return True
            return _FN, check_map
        item_check = _message_checker(entry, building)
        if not field.is_repeated:
            return _FN, item_check
    else:
        spec = _scalar_spec(field)
        if not field.is_repeated:
            return spec
        item_check = _as_function(spec)

    def check_list(v) -> bool:
        if type(v) is not list:
            return False
        for x in v:
            if not item_check(x):  # null included: not allowed in a list
                return False
        return True
    return _FN, check_list


class _Ambiguous(Exception):
    """A field given under both its JSON and its proto name: which one wins
    is ParseDict's business."""


def _get(doc: dict, json_name: str, proto_name: str, default):
    if json_name in doc:
        if proto_name != json_name and proto_name in doc:
            raise _Ambiguous
        value = doc[json_name]
    else:
        value = doc.get(proto_name)
    return default if value is None else value


class _EventKind:
    """One event message type: how to check it and the fields the gateway
    reads from it (all of them scalars, some in deviceInfo)."""

    def __init__(self, cls, topic_kind: str, topic_words: str, reads: tuple):
        self.cls = cls
        self.name = cls.DESCRIPTOR.name
        self.a_name = ("an " if self.name[0] in "AEIOU" else "a ") + self.name
        self.topic_kind = topic_kind  # the last topic level: up, ack, txack
        self.topic_words = topic_words  # "an uplink event topic"
        self.quick_check = _message_checker(cls.DESCRIPTOR, set())
        fields = cls.DESCRIPTOR.fields_by_name
        info = fields["device_info"]
        self.info_names = (info.json_name, info.name)
        self.reads = tuple((fields[n].json_name, n, fields[n].default_value) for n in reads)
        self.info_reads = tuple((info.message_type.fields_by_name[n].json_name, n)
                                for n in ("dev_eui", "application_id"))

    def read_doc(self, doc: dict) -> dict:
        """The fields from a JSON object the quick check passed (so each is
        null or of its field's type). Raises _Ambiguous."""
        values = {name: _get(doc, json_name, name, default)
                  for json_name, name, default in self.reads}
        info = _get(doc, *self.info_names, {})
        for json_name, name in self.info_reads:
            values[name] = _get(info, json_name, name, "")
        return values

    def read_message(self, msg) -> dict:
        values = {name: getattr(msg, name) for _, name, _ in self.reads}
        for _, name in self.info_reads:
            values[name] = getattr(msg.device_info, name)
        return values


_UP = _EventKind(integration.UplinkEvent, "up", "an uplink event topic",
                 ("deduplication_id", "f_port", "f_cnt", "data"))
_ACK = _EventKind(integration.AckEvent, "ack", "an ack event topic",
                  ("queue_item_id", "acknowledged", "f_cnt_down"))
_TXACK = _EventKind(integration.TxAckEvent, "txack", "a txack event topic",
                    ("queue_item_id", "f_cnt_down"))


def _json_doc(payload: bytes, topic_eui: str | None, also: str = "") -> dict:
    try:
        doc = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise Rejected("malformed_json", f"payload is not UTF-8: {exc}{also}",
                       topic_eui) from None
    except (ValueError, RecursionError) as exc:
        raise Rejected("malformed_json", f"payload is not JSON: {exc}{also}", topic_eui) from None
    if not isinstance(doc, dict):
        raise Rejected("malformed_event", "event is a JSON %s, not an object%s"
                       % (type(doc).__name__, also), topic_eui)
    return doc


def _parse_dict(doc: dict, kind: _EventKind, topic_eui: str | None):
    """The slow path: ParseDict decides and explains."""
    event = kind.cls()
    try:
        json_format.ParseDict(doc, event, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise Rejected("malformed_event", f"not {kind.a_name}: {exc}", topic_eui) from None
    except Exception as exc:  # noqa: BLE001 - see below
        # ParseDict lets some errors out as they are: an integer too large
        # for a double (OverflowError), a lone surrogate as an enum name
        # (SystemError from the C extension). Input, not a bug here.
        raise Rejected("malformed_event", f"not {kind.a_name}: {type(exc).__name__}: {exc}",
                       topic_eui) from None
    return event


def _decode(topic: str, payload, marshaler: str, kind: _EventKind):
    """-> (the fields read, device EUI the topic names or None, the JSON
    object or None for protobuf)."""
    if marshaler not in MARSHALERS:
        raise ValueError(f"marshaler must be one of {', '.join(MARSHALERS)}, got {marshaler!r}")
    named = topic_event(topic)
    topic_eui = named[0] if named is not None and named[1] == kind.topic_kind else None
    if len(payload) > MAX_MESSAGE_BYTES:
        raise Rejected("oversized_message", "message is %d bytes, limit %d"
                       % (len(payload), MAX_MESSAGE_BYTES), topic_eui)
    payload = bytes(payload)
    if marshaler == "auto":
        # A JSON event is an object; a protobuf event starts with a field tag,
        # which is never "{" (ChirpStack writes fields 1-3 first). Blank is no
        # event in either and reads best as JSON.
        head = payload.lstrip(_JSON_SPACE)[:1]
        marshaler = "json" if head in (b"{", b"") else "auto-protobuf"
    if marshaler == "json":
        doc = _json_doc(payload, topic_eui)
        values = None
        if kind.quick_check(doc):
            try:
                values = kind.read_doc(doc)
            except _Ambiguous:
                pass
        if values is None:
            values = kind.read_message(_parse_dict(doc, kind, topic_eui))
    else:
        event = kind.cls()
        try:
            event.ParseFromString(payload)
        except DecodeError as exc:
            if marshaler == "auto-protobuf":
                # Neither marshaler's: a JSON text gone wrong is likelier than
                # a protobuf one, and the JSON parser says better what is wrong.
                _json_doc(payload, topic_eui, f" (nor a protobuf {kind.name})")
            raise Rejected("malformed_event", f"not a protobuf {kind.name}: {exc}",
                           topic_eui) from None
        values, doc = kind.read_message(event), None
    return values, topic_eui, doc


def _check_device(values: dict, kind: _EventKind, topic: str, topic_eui: str | None) -> None:
    """The event's device must be a DevEUI and the one its topic names."""
    raw_eui = values["dev_eui"]
    dev_eui = raw_eui.lower()
    if not _DEV_EUI.match(dev_eui):
        raise Rejected("malformed_event", "deviceInfo.devEui %r is not 16 hex digits"
                       % raw_eui, topic_eui)
    if topic_eui is None:
        raise Rejected("topic_mismatch", f"topic {topic!r} is not {kind.topic_words}", dev_eui)
    if topic_eui != dev_eui:
        raise Rejected("topic_mismatch", f"devEui {dev_eui} in the event, {topic_eui} in the topic",
                       topic_eui)
    values["dev_eui"] = dev_eui


def parse_uplink(topic: str, payload: bytes, marshaler: str = "auto") -> Uplink:
    """Parse an `.../event/up` message, JSON or protobuf (`marshaler`: "json",
    "protobuf", or "auto": JSON when the payload starts with "{" after
    whitespace). Raises Rejected with reason one of oversized_message,
    malformed_json, malformed_event, topic_mismatch."""
    v, topic_eui, doc = _decode(topic, payload, marshaler, _UP)
    data = v["data"]
    if doc is not None:
        raw = doc.get("data")
        data = b""  # null or absent
        if isinstance(raw, str):
            try:
                data = _strict_b64(raw)
            except ValueError:
                raise Rejected("malformed_event", "data is not valid base64", topic_eui) from None
    _check_device(v, _UP, topic, topic_eui)
    return Uplink(dev_eui=v["dev_eui"], application_id=v["application_id"],
                  deduplication_id=v["deduplication_id"], f_port=v["f_port"], f_cnt=v["f_cnt"],
                  data=data)


def parse_ack(topic: str, payload: bytes, marshaler: str = "auto") -> Ack:
    """Parse an `.../event/ack` message (the device's answer to a confirmed
    downlink). Marshalers and rejections as parse_uplink."""
    v, topic_eui, _ = _decode(topic, payload, marshaler, _ACK)
    _check_device(v, _ACK, topic, topic_eui)
    return Ack(dev_eui=v["dev_eui"], application_id=v["application_id"],
               queue_item_id=v["queue_item_id"], acknowledged=v["acknowledged"],
               f_cnt_down=v["f_cnt_down"])


def parse_txack(topic: str, payload: bytes, marshaler: str = "auto") -> TxAck:
    """Parse an `.../event/txack` message (a gateway took the downlink for
    transmission). Marshalers and rejections as parse_uplink."""
    v, topic_eui, _ = _decode(topic, payload, marshaler, _TXACK)
    _check_device(v, _TXACK, topic, topic_eui)
    return TxAck(dev_eui=v["dev_eui"], application_id=v["application_id"],
                 queue_item_id=v["queue_item_id"], f_cnt_down=v["f_cnt_down"])
