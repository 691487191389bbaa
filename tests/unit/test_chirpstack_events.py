"""ChirpStack v4 integration events (up, ack, txack) in both marshalers, and
downlink commands, against the chirpstack-api message classes: events that
ChirpStack versions older and newer than ours send, a check that the quick
JSON path decides exactly as protobuf's own JSON parser, fuzzing, and the
modem simulator publishing protobuf events."""

from __future__ import annotations

import base64
import json
import re
import socket
import time
import uuid

import pytest
from chirpstack_api import common, gw, integration
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import chirpstack
from gateway.chirpstack import Rejected

DEV = "70b3d57ed0000a01"
OTHER = "70b3d57ed0000b02"
APP = "17c82e96-be03-4f38-aef3-f83d48582d97"
ITEM = "6f1b0b5e-2f55-4c53-9d0b-3c1a8d1f0e42"
DATA = bytes(range(7, 127))
# The reasons docs/gateway.md lists for a message the parser refuses.
REASONS = {"oversized_message", "malformed_json", "malformed_event", "topic_mismatch"}
LIMIT = 64 * 1024  # docs/gateway.md: payloads over 64 KiB are refused unparsed

FUZZ = settings(max_examples=150, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def topic(kind: str = "up", dev: str = DEV) -> str:
    return f"application/{APP}/device/{dev}/event/{kind}"


def device_info(dev: str = DEV) -> integration.DeviceInfo:
    info = integration.DeviceInfo(
        tenant_id="52f14cd4-c6f1-4fbd-8f87-4025e1d49242", tenant_name="ChirpStack",
        application_id=APP, application_name="smart-meters",
        device_profile_id="14855bf7-d10d-4aee-b618-ebfcb64dc7ad",
        device_profile_name="rak3172-meter", device_name="meter-" + dev, dev_eui=dev,
        device_class_enabled=common.CLASS_C)
    info.tags["site"] = "feeder-7"
    info.tags["building"] = "B12"
    return info


def uplink_event(dev: str = DEV, data: bytes = DATA, dedup: str = "3ac7e3c4-4401-4b8d-9386-"
                 "a5c902f9202d", f_cnt: int = 1234) -> integration.UplinkEvent:
    """An uplink as ChirpStack v4 reports it: device tags, three gateways with
    location, context and metadata, the radio parameters."""
    ev = integration.UplinkEvent(deduplication_id=dedup, device_info=device_info(dev),
                                 dev_addr="26011bda", adr=True, dr=5, f_cnt=f_cnt, f_port=1,
                                 data=data, region_config_id="eu868")
    ev.time.FromJsonString("2026-01-31T00:15:00.123456789Z")
    for i in range(3):
        rx = ev.rx_info.add(gateway_id="0016c001f15000%02x" % i, uplink_id=4217106255 - i,
                            rssi=-97 + i, snr=7.5 - i, channel=i, rf_chain=i % 2,
                            context=bytes([i, 2, 3, 4, 5, 6, 7, 8]), crc_status=gw.CRC_OK)
        rx.gw_time.FromJsonString("2026-01-31T00:15:00.100Z")
        rx.ns_time.FromJsonString("2026-01-31T00:15:00.120Z")
        rx.time_since_gps_epoch.FromJsonString("1453766118.100s")
        rx.location.latitude, rx.location.longitude, rx.location.altitude = 52.37 + i, 4.89, 12.0
        rx.metadata["region_config_id"] = "eu868"
        rx.metadata["region_common_name"] = "EU868"
    ev.tx_info.frequency = 868_100_000
    lora = ev.tx_info.modulation.lora
    lora.bandwidth, lora.spreading_factor, lora.code_rate = 125_000, 7, gw.CR_4_5
    return ev


def ack_event(dev: str = DEV, acknowledged: bool = True) -> integration.AckEvent:
    ev = integration.AckEvent(deduplication_id="0b8e0f3c-52a6-4f0a-9d55-2b1c3e4f5a6b",
                              device_info=device_info(dev), queue_item_id=ITEM,
                              acknowledged=acknowledged, f_cnt_down=41)
    ev.time.FromJsonString("2026-01-31T00:15:02.5Z")
    return ev


def txack_event(dev: str = DEV) -> integration.TxAckEvent:
    ev = integration.TxAckEvent(downlink_id=3_456_789, device_info=device_info(dev),
                                queue_item_id=ITEM, f_cnt_down=41, gateway_id="0016c001f1500001")
    ev.time.FromJsonString("2026-01-31T00:15:01Z")
    ev.tx_info.frequency, ev.tx_info.power = 869_525_000, 14
    lora = ev.tx_info.modulation.lora
    lora.bandwidth, lora.spreading_factor, lora.code_rate = 125_000, 12, gw.CR_4_5
    lora.polarization_inversion = True
    ev.tx_info.timing.delay.delay.FromJsonString("1s")
    return ev


def as_json(ev) -> bytes:
    return json_format.MessageToJson(ev).encode()  # what ChirpStack's JSON marshaler sends


def as_protobuf(ev) -> bytes:
    return ev.SerializeToString()


ENCODINGS = {"json": as_json, "protobuf": as_protobuf}
PARSERS = {"up": chirpstack.parse_uplink, "ack": chirpstack.parse_ack,
           "txack": chirpstack.parse_txack}
BUILDERS = {"up": uplink_event, "ack": ack_event, "txack": txack_event}


# -- both marshalers -----------------------------------------------------------

@pytest.mark.parametrize("encoding", ["json", "protobuf"])
@pytest.mark.parametrize("marshaler", ["auto", "explicit"])
def test_uplink_in_both_marshalers(encoding, marshaler):
    payload = ENCODINGS[encoding](uplink_event())
    up = chirpstack.parse_uplink(topic(), payload,
                                 encoding if marshaler == "explicit" else "auto")
    assert up == chirpstack.Uplink(dev_eui=DEV, application_id=APP,
                                   deduplication_id="3ac7e3c4-4401-4b8d-9386-a5c902f9202d",
                                   f_port=1, f_cnt=1234, data=DATA)


@pytest.mark.parametrize("encoding", ["json", "protobuf"])
@pytest.mark.parametrize("acknowledged", [True, False])
def test_ack_in_both_marshalers(encoding, acknowledged):
    payload = ENCODINGS[encoding](ack_event(acknowledged=acknowledged))
    for marshaler in ("auto", encoding):
        assert chirpstack.parse_ack(topic("ack"), payload, marshaler) == chirpstack.Ack(
            dev_eui=DEV, application_id=APP, queue_item_id=ITEM, acknowledged=acknowledged,
            f_cnt_down=41)


@pytest.mark.parametrize("encoding", ["json", "protobuf"])
def test_txack_in_both_marshalers(encoding):
    payload = ENCODINGS[encoding](txack_event())
    for marshaler in ("auto", encoding):
        assert chirpstack.parse_txack(topic("txack"), payload, marshaler) == chirpstack.TxAck(
            dev_eui=DEV, application_id=APP, queue_item_id=ITEM, f_cnt_down=41)


def test_the_other_marshalers_payload_is_refused():
    ev = uplink_event()
    with pytest.raises(Rejected) as exc:
        chirpstack.parse_uplink(topic(), as_json(ev), "protobuf")
    assert exc.value.reason == "malformed_event" and "protobuf" in str(exc.value)
    with pytest.raises(Rejected) as exc:
        chirpstack.parse_uplink(topic(), as_protobuf(ev), "json")
    assert exc.value.reason == "malformed_json"
    assert exc.value.dev_eui == DEV


def test_unknown_marshaler_is_a_programming_error():
    with pytest.raises(ValueError):
        chirpstack.parse_uplink(topic(), as_json(uplink_event()), "xml")


@pytest.mark.parametrize("encoding", ["json", "protobuf"])
@pytest.mark.parametrize("kind", ["up", "ack", "txack"])
def test_event_on_another_kinds_topic_or_device_is_refused(encoding, kind):
    payload = ENCODINGS[encoding](BUILDERS[kind]())
    wrong_kind = {"up": "ack", "ack": "txack", "txack": "up"}[kind]
    with pytest.raises(Rejected) as exc:
        PARSERS[kind](topic(wrong_kind), payload)
    assert exc.value.reason == "topic_mismatch" and exc.value.dev_eui == DEV
    with pytest.raises(Rejected) as exc:
        PARSERS[kind](topic(kind, OTHER), payload)
    assert exc.value.reason == "topic_mismatch"
    assert DEV in str(exc.value) and OTHER in str(exc.value)


@pytest.mark.parametrize("encoding", ["json", "protobuf"])
def test_event_without_a_valid_dev_eui_is_refused(encoding):
    for eui in ("", "70b3d57ed0000a0", "70b3d57ed0000a0g"):
        ev = ack_event()
        ev.device_info.dev_eui = eui
        with pytest.raises(Rejected) as exc:
            chirpstack.parse_ack(topic("ack"), ENCODINGS[encoding](ev))
        assert exc.value.reason == "malformed_event" and "devEui" in str(exc.value)


def test_garbage_in_auto_mode_is_explained_as_json():
    # Neither a JSON object nor a protobuf event: the JSON parser's account.
    for payload, reason, words in [(b"[1, 2]", "malformed_event", "list"),
                                   (b"\xff\xfe\x00", "malformed_json", "UTF-8"),
                                   (b"   ", "malformed_json", "not JSON"),
                                   (b"nul", "malformed_json", "not JSON")]:
        with pytest.raises(Rejected) as exc:
            chirpstack.parse_uplink(topic(), payload)
        assert (exc.value.reason, exc.value.dev_eui) == (reason, DEV), payload
        assert words in str(exc.value)


# -- other ChirpStack versions -------------------------------------------------

def test_json_as_chirpstack_v4_writes_it():
    # Hand-written in the layout ChirpStack v4's JSON marshaler produces
    # (offset time stamps, enum names, 64-bit values absent).
    doc = {
        "deduplicationId": "4c1a5b2f-0d7e-4d8b-a3a4-2f9c6b0e1d11",
        "time": "2026-03-01T10:15:00.775023242+00:00",
        "deviceInfo": {"tenantId": "52f14cd4-c6f1-4fbd-8f87-4025e1d49242",
                       "tenantName": "ChirpStack", "applicationId": APP,
                       "applicationName": "smart-meters",
                       "deviceProfileId": "14855bf7-d10d-4aee-b618-ebfcb64dc7ad",
                       "deviceProfileName": "rak3172-meter", "deviceName": "meter-1",
                       "devEui": DEV, "deviceClassEnabled": "CLASS_A",
                       "tags": {"site": "feeder-7"}},
        "devAddr": "00189440", "adr": True, "dr": 5, "fCnt": 10, "fPort": 1,
        "confirmed": False, "data": "qg==",
        "rxInfo": [{"gatewayId": "0016c001f153a14c", "uplinkId": 4217106255,
                    "nsTime": "2026-03-01T10:15:00.752935+00:00", "rssi": -36, "snr": 10.5,
                    "channel": 2, "location": {"latitude": 52.1, "longitude": 5.1},
                    "context": "E3OWOQ==", "metadata": {"region_config_id": "eu868"},
                    "crcStatus": "CRC_OK"}],
        "txInfo": {"frequency": 867100000,
                   "modulation": {"lora": {"bandwidth": 125000, "spreadingFactor": 7,
                                           "codeRate": "CR_4_5"}}},
        "regionConfigId": "eu868",
    }
    up = chirpstack.parse_uplink(topic(), json.dumps(doc).encode())
    assert (up.f_cnt, up.f_port, up.data, up.deduplication_id) == (
        10, 1, b"\xaa", "4c1a5b2f-0d7e-4d8b-a3a4-2f9c6b0e1d11")


def test_chirpstack_json_takes_the_quick_path(monkeypatch):
    # ParseDict is only for events in an unusual form; what ChirpStack (and
    # the simulator) write must not need it.
    def fail(*a, **kw):
        raise AssertionError("ParseDict used")
    monkeypatch.setattr(chirpstack.json_format, "ParseDict", fail)
    compact = json.dumps(json_format.MessageToDict(uplink_event()), separators=(",", ":"))
    for payload in (as_json(uplink_event()), compact.encode()):
        assert chirpstack.parse_uplink(topic(), payload).data == DATA
    assert chirpstack.parse_ack(topic("ack"), as_json(ack_event())).acknowledged
    assert chirpstack.parse_txack(topic("txack"), as_json(txack_event())).f_cnt_down == 41


def test_json_from_older_and_newer_versions():
    doc = json.loads(as_json(uplink_event()))
    # Newer: fields and enum values this build does not know, everywhere.
    doc["relayRxInfo"] = {"devEui": OTHER, "worChannel": 1}
    doc["futureField"] = {"a": [1, 2, {"b": None}]}
    doc["deviceInfo"]["deviceClassEnabled"] = "CLASS_Z"
    doc["deviceInfo"]["futureFlag"] = True
    doc["rxInfo"][0]["futureMetric"] = 1.5
    doc["rxInfo"][1]["crcStatus"] = "CRC_FUTURE"
    doc["txInfo"]["modulation"]["futureModulation"] = {"x": 1}
    # Older, or written differently: nulls, numbers as text, enum numbers.
    doc["adr"] = None
    doc["time"] = None
    doc["fCnt"] = "1234"
    doc["dr"] = 5.0
    doc["rxInfo"][2]["crcStatus"] = 1
    doc["rxInfo"][2]["uplinkId"] = "77"
    up = chirpstack.parse_uplink(topic(), json.dumps(doc).encode())
    assert (up.dev_eui, up.f_cnt, up.data) == (DEV, 1234, DATA)


def test_json_with_proto_field_names():
    # json_format writes these with preserving_proto_field_name; the parser
    # must take them as ChirpStack's own parser does.
    payload = json_format.MessageToJson(uplink_event(), preserving_proto_field_name=True)
    assert '"dev_eui"' in payload
    up = chirpstack.parse_uplink(topic(), payload.encode())
    assert (up.dev_eui, up.application_id, up.f_cnt, up.data) == (DEV, APP, 1234, DATA)


def test_field_under_both_names_is_decided_as_protobuf_decides():
    doc = json.loads(as_json(uplink_event()))
    doc["f_cnt"] = 99  # later in the object than fCnt: protobuf's parser keeps the last
    want = json_format.ParseDict(doc, integration.UplinkEvent(), ignore_unknown_fields=True)
    assert want.f_cnt == 99
    assert chirpstack.parse_uplink(topic(), json.dumps(doc).encode()).f_cnt == 99


def test_minimal_events_older_versions_send():
    # Only what the gateway needs: no time, no deduplicationId, no radio data.
    doc = {"deviceInfo": {"devEui": DEV}, "fPort": 1, "data": "AQI="}
    up = chirpstack.parse_uplink(topic(), json.dumps(doc).encode())
    assert up == chirpstack.Uplink(DEV, "", "", 1, 0, b"\x01\x02")
    ev = integration.UplinkEvent(f_port=1, data=b"\x01\x02")
    ev.device_info.dev_eui = DEV
    assert chirpstack.parse_uplink(topic(), as_protobuf(ev)) == up
    no_data = chirpstack.parse_uplink(topic(), b'{"deviceInfo": {"devEui": "%s"}}' % DEV.encode())
    assert (no_data.data, no_data.f_port) == (b"", 0)
    ack = integration.AckEvent()
    ack.device_info.dev_eui = DEV
    assert chirpstack.parse_ack(topic("ack"), as_protobuf(ack)) == chirpstack.Ack(
        DEV, "", "", False, 0)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _unknown_field(number: int, body: bytes) -> bytes:
    """A length-delimited field this build's classes do not know."""
    return _varint(number << 3 | 2) + _varint(len(body)) + body


def test_protobuf_from_a_newer_version():
    # Unknown fields at the top and inside deviceInfo (which the decoder merges).
    ev = uplink_event()
    info = ev.device_info.SerializeToString() + _unknown_field(40, b"future")
    payload = (as_protobuf(ev) + _unknown_field(99, b"\x01\x02\x03")
               + _varint(3 << 3 | 2) + _varint(len(info)) + info)
    up = chirpstack.parse_uplink(topic(), payload)
    assert (up.dev_eui, up.f_cnt, up.data) == (DEV, 1234, DATA)
    ack = as_protobuf(ack_event()) + _varint(20 << 3) + _varint(300)  # an unknown varint
    assert chirpstack.parse_ack(topic("ack"), ack, "protobuf").queue_item_id == ITEM


# -- the quick JSON path decides exactly as json_format.ParseDict --------------

def _strict_b64(text: str) -> bytes | None:
    padded = text + "=" * (-len(text) % 4)
    for alphabet in (padded, padded.replace("-", "+").replace("_", "/")):
        try:
            return base64.b64decode(alphabet, validate=True)
        except ValueError:  # not base64, or not even ASCII
            pass
    return None


def reference(kind: str, doc) -> object:
    """What an event should give: protobuf's JSON parser decides, then the
    gateway's own checks (docs/gateway.md). A reason, or the parsed fields."""
    cls = {"up": integration.UplinkEvent, "ack": integration.AckEvent,
           "txack": integration.TxAckEvent}[kind]
    ev = cls()
    try:
        json_format.ParseDict(doc, ev, ignore_unknown_fields=True)
    except Exception:  # noqa: BLE001 - ParseDict lets some conversion errors out raw
        return "malformed_event"
    data = None
    if kind == "up":
        raw = doc.get("data")
        data = _strict_b64(raw) if isinstance(raw, str) else b""
        if data is None:
            return "malformed_event"
    eui = ev.device_info.dev_eui.lower()
    if not re.fullmatch(r"[0-9a-f]{16}", eui):
        return "malformed_event"
    if eui != DEV:
        return "topic_mismatch"
    if kind == "up":
        return chirpstack.Uplink(eui, ev.device_info.application_id, ev.deduplication_id,
                                 ev.f_port, ev.f_cnt, data)
    if kind == "ack":
        return chirpstack.Ack(eui, ev.device_info.application_id, ev.queue_item_id,
                              ev.acknowledged, ev.f_cnt_down)
    return chirpstack.TxAck(eui, ev.device_info.application_id, ev.queue_item_id,
                            ev.f_cnt_down)


def outcome(kind: str, payload: bytes, marshaler: str = "auto") -> object:
    try:
        return PARSERS[kind](topic(kind), payload, marshaler)
    except Rejected as exc:
        assert exc.reason in REASONS, exc.reason
        return exc.reason


FIELD_NAMES = sorted({name for cls in (integration.UplinkEvent, integration.DeviceInfo,
                                       gw.UplinkRxInfo, common.Location, gw.UplinkTxInfo,
                                       gw.Modulation, gw.LoraModulationInfo,
                                       integration.AckEvent, integration.TxAckEvent,
                                       gw.DownlinkTxInfo, gw.Timing, gw.DelayTimingInfo)
                      for f in cls.DESCRIPTOR.fields for name in (f.name, f.json_name)})
EDGE_VALUES = [
    None, True, False, 0, 1, -1, 7, 1.0, 1.5, -0.0, 2 ** 31, 2 ** 32, 2 ** 53 + 1, 10 ** 30,
    10 ** 400, 1e39, 3.5e38, float("nan"), float("inf"), "", "7", "7.0", " 7", "1e3", "x",
    "NaN", "Infinity", "CRC_OK", "CLASS_C", "CR_4_5", "CLASS_Z", DEV, DEV.upper(), OTHER,
    "AQID", "AQI", "AQ", "A", "AQ==", "AQ=", "-_-_", "!!", "\ud800", "a\udfff", "\u00e9",
    "2026-02-28T23:59:59Z", "2026-02-29T00:00:00Z", "2024-02-29T00:00:00Z",
    "2026-04-31T00:00:00Z", "2026-01-31T10:00:00.123456789+05:30", "2026-1-31T10:00:00Z",
    "1899-12-31T23:59:59-23:59", "2026-01-31t10:00:00Z", "2026-01-31T10:00:00",
    "1s", "-0.5s", "1.0000000001s", "315576000001s", "[]", [], {}, [None], [1, "a"],
    {"a": 1}, {"@type": "x"}, {"lora": {}, "fsk": {}}, {"lora": {}, "lr_fhss": None},
    {"k": "\ud800"}, {"\udc00": "v"}, {"n": 10 ** 400}, {"n": [1, {"m": 2 ** 60}]},
    {"n": float("nan")}, {"n": [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]},
]
json_keys = (st.sampled_from(FIELD_NAMES) | st.text(max_size=6)
             | st.sampled_from(["[ext]", "[a.b]", "\ud800", "x\udfff", "@type"]))
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.text(max_size=12) | st.sampled_from(EDGE_VALUES))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(json_keys, inner, max_size=3),
    max_leaves=8)


@st.composite
def mutated_docs(draw, kind: str):
    """A realistic event's JSON with a few changes: a value replaced, a key
    dropped, added or renamed to its proto name, anywhere in the tree."""
    doc = json.loads(as_json(BUILDERS[kind]()))
    for _ in range(draw(st.integers(1, 3))):
        node = doc
        while True:  # walk down to a random container
            children = [c for c in (node.values() if isinstance(node, dict) else node)
                        if isinstance(c, (dict, list)) and c]
            if not children or draw(st.integers(0, 2)) == 0:
                break
            node = draw(st.sampled_from(children))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "rename"]))
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            continue
        key = draw(st.sampled_from(keys))
        if op == "replace":
            node[key] = draw(json_values)
        elif op == "delete":
            del node[key]
        elif op == "add" and isinstance(node, dict):
            node[draw(json_keys)] = draw(json_values)
        elif op == "rename" and isinstance(node, dict):
            snake = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), key)
            node[snake] = node.pop(key) if draw(st.booleans()) else node[key]
    return doc


@pytest.mark.parametrize("kind", ["up", "ack", "txack"])
@settings(max_examples=250, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_json_decided_exactly_as_protobufs_parser(kind, data):
    doc = data.draw(mutated_docs(kind))
    payload = json.dumps(doc).encode()
    assert outcome(kind, payload, "json") == reference(kind, doc)


def test_quick_path_edges_agree_with_protobufs_parser():
    # Values at the edges of what the quick check takes, one field at a time.
    base = json.loads(as_json(uplink_event()))
    places = [("fCnt",), ("dr",), ("time",), ("data",), ("devAddr",), ("deviceInfo", "devEui"),
              ("deviceInfo", "deviceName"), ("rxInfo", 0, "gatewayId"),
              ("deviceInfo", "deviceClassEnabled"), ("deviceInfo", "tags"),
              ("rxInfo", 0, "snr"), ("rxInfo", 0, "location", "latitude"),
              ("rxInfo", 1, "timeSinceGpsEpoch"), ("rxInfo", 2, "context"),
              ("rxInfo", 2, "gwTime"), ("txInfo", "modulation"), ("object",)]
    for place in places:
        for value in EDGE_VALUES:
            doc = json.loads(json.dumps(base))
            node = doc
            for step in place[:-1]:
                node = node[step]
            node[place[-1]] = value
            payload = json.dumps(doc).encode()
            assert outcome("up", payload, "json") == reference("up", doc), (place, value)


# -- fuzzing: nothing but Rejected ---------------------------------------------

@pytest.mark.parametrize("kind", ["up", "ack", "txack"])
@pytest.mark.parametrize("marshaler", ["auto", "json", "protobuf"])
@FUZZ
@given(payload=st.binary(max_size=300))
def test_random_bytes_are_only_ever_rejected(kind, marshaler, payload):
    outcome(kind, payload, marshaler)


@pytest.mark.parametrize("kind", ["up", "ack", "txack"])
@FUZZ
@given(value=json_values)
def test_random_json_is_only_ever_rejected(kind, value):
    payload = json.dumps(value).encode()
    for marshaler in ("auto", "json", "protobuf"):
        outcome(kind, payload, marshaler)


@st.composite
def damaged(draw, payload: bytes) -> bytes:
    b = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "truncate", "insert"]))
        if how == "flip" and b:
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif how == "truncate":
            del b[draw(st.integers(0, len(b))):]
        else:
            i = draw(st.integers(0, len(b)))
            b[i:i] = draw(st.binary(min_size=1, max_size=4))
    return bytes(b)


@pytest.mark.parametrize("kind", ["up", "ack", "txack"])
@pytest.mark.parametrize("encoding", ["json", "protobuf"])
@FUZZ
@given(data=st.data())
def test_damaged_events_are_only_ever_rejected(kind, encoding, data):
    payload = data.draw(damaged(ENCODINGS[encoding](BUILDERS[kind]())))
    for marshaler in ("auto", encoding):
        outcome(kind, payload, marshaler)


def _pad_protobuf(payload: bytes, total: int) -> bytes:
    """payload plus an unknown field, `total` bytes in all."""
    for filler in range(total - len(payload), -1, -1):
        padded = payload + _unknown_field(999, b"\x00" * filler)
        if len(padded) == total:
            return padded
    raise AssertionError("cannot pad")


@pytest.mark.parametrize("marshaler", ["auto", "json", "protobuf"])
def test_oversized_messages_are_refused_before_parsing(marshaler):
    ev = uplink_event()
    pad = {"json": lambda p, n: p + b" " * (n - len(p)), "protobuf": _pad_protobuf}
    for encoding in ("json", "protobuf") if marshaler == "auto" else (marshaler,):
        payload = ENCODINGS[encoding](ev)
        at_limit = pad[encoding](payload, LIMIT)
        assert len(at_limit) == LIMIT
        assert chirpstack.parse_uplink(topic(), at_limit, marshaler).data == DATA
        with pytest.raises(Rejected) as exc:
            chirpstack.parse_uplink(topic(), pad[encoding](payload, LIMIT + 1), marshaler)
        assert exc.value.reason == "oversized_message" and exc.value.dev_eui == DEV
    # Nesting that would exhaust a parser is never looked at.
    started = time.perf_counter()
    for parse in (chirpstack.parse_uplink, chirpstack.parse_ack, chirpstack.parse_txack):
        with pytest.raises(Rejected) as exc:
            parse(topic(), b"[" * 400_000 + b"]" * 400_000, marshaler)
        assert exc.value.reason == "oversized_message"
    assert time.perf_counter() - started < 0.5


# -- topics and downlink commands ------------------------------------------------

def test_event_topics():
    assert chirpstack.event_topic(APP, "ack") == f"application/{APP}/device/+/event/ack"
    assert chirpstack.event_topic("+", "txack") == "application/+/device/+/event/txack"
    assert chirpstack.uplink_topic(APP) == f"application/{APP}/device/+/event/up"
    assert chirpstack.topic_event(topic("txack", DEV.upper())) == (DEV, "txack")
    assert chirpstack.topic_event(f"application/{APP}/device/{DEV}/command/down") is None
    assert chirpstack.topic_event(f"application/{APP}/device/{DEV}/event/") is None
    assert chirpstack.topic_event(f"application/{APP}/device/{DEV}/event/up/x") is None
    assert chirpstack.topic_dev_eui(topic("up")) == DEV
    assert chirpstack.topic_dev_eui(topic("ack")) is None


def test_json_command_round_trips_through_protobufs_parser():
    expires = 1_767_225_600  # 2026-01-01T00:00:00Z
    raw = chirpstack.command_message(DEV, 2, b"\x18\x01", confirmed=True, item_id=ITEM,
                                     expires_at=expires)
    doc = json.loads(raw)
    assert doc["expiresAt"] == "2026-01-01T00:00:00Z"
    cmd = json_format.Parse(raw, integration.DownlinkCommand())
    assert (cmd.id, cmd.dev_eui, cmd.confirmed, cmd.f_port, cmd.data) == (
        ITEM, DEV, True, 2, b"\x18\x01")
    assert (cmd.expires_at.seconds, cmd.expires_at.nanos) == (expires, 0)
    # Fractions of a second survive too.
    cmd = json_format.Parse(chirpstack.command_message(DEV, 2, b"", expires_at=expires + 0.25),
                            integration.DownlinkCommand())
    assert (cmd.expires_at.seconds, cmd.expires_at.nanos) == (expires, 250_000_000)
    plain = json.loads(chirpstack.command_message(DEV, 2, b"\x01"))
    assert "expiresAt" not in plain and uuid.UUID(plain["id"])


def test_protobuf_command():
    raw = chirpstack.command_message(DEV, 2, b"\x18\x01", item_id=ITEM, expires_at=1_767_225_600,
                                     marshaler="protobuf")
    cmd = integration.DownlinkCommand()
    cmd.ParseFromString(raw)
    assert (cmd.id, cmd.dev_eui, cmd.confirmed, cmd.f_port, cmd.data) == (
        ITEM, DEV, False, 2, b"\x18\x01")
    assert cmd.expires_at.ToJsonString() == "2026-01-01T00:00:00Z"
    cmd.ParseFromString(chirpstack.command_message(DEV, 2, b"", marshaler="protobuf"))
    assert not cmd.HasField("expires_at")
    with pytest.raises(ValueError):
        chirpstack.command_message(DEV, 2, b"", marshaler="auto")
    with pytest.raises(ValueError):
        chirpstack.command_message(DEV, 2, b"", expires_at=float("nan"))


# -- the simulator publishes protobuf events ---------------------------------------

SIM_APP = "3f1c2b7a-5d4e-4c8f-9a61-0b2d7e9c4f10"


class _Line:
    """A modem's UART over TCP, as hardware/sim/mpy/sim_uart.py speaks it."""

    def __init__(self, port: int):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""
        self.send(f"#SIM-ATTACH deveui={DEV} joineui=0000000000000001 "
                  "appkey=2b7e151628aed2a6abf7158809cf4f3c")

    def send(self, line: str) -> None:
        self.s.sendall(line.encode() + b"\r\n")

    def until(self, want: str, timeout: float = 5.0) -> list[str]:
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                if raw.strip():
                    got.append(raw.decode().strip())
                    if got[-1].startswith(want):
                        return got
            self.s.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = self.s.recv(4096)
            except socket.timeout:
                raise AssertionError(f"no {want!r} within {timeout}s: {got}") from None
            assert chunk, f"connection closed waiting for {want!r}: {got}"
            self.buf += chunk


def test_simulator_publishes_protobuf_and_honours_expiry(start_modem_sim, mqtt_tap):
    sim = start_modem_sim(SIM_APP, speed=100.0, boot_banner=False, marshaler="protobuf")
    tap = mqtt_tap(f"application/{SIM_APP}/#", application_id=SIM_APP)
    modem = _Line(sim.port)
    modem.send("AT+JOIN=1:0:10:8")
    modem.until("+EVT:JOINED")
    modem.send("AT+SEND=1:0102a0")
    modem.until("+EVT:TX_DONE")
    up_topic, payload = tap.wait("up")
    assert not payload.lstrip().startswith(b"{")  # protobuf, not JSON
    for marshaler in ("auto", "protobuf"):
        up = chirpstack.parse_uplink(up_topic, payload, marshaler)
        assert (up.dev_eui, up.application_id, up.f_port, up.data) == (
            DEV, SIM_APP, 1, b"\x01\x02\xa0")

    # Class A: a downlink that expires while queued is dropped at the next
    # uplink, the live one behind it goes out.
    down = f"application/{SIM_APP}/device/{DEV}/command/down"
    stale, live = str(uuid.uuid4()), str(uuid.uuid4())
    tap.publish(down, chirpstack.command_message(DEV, 5, b"\xee", item_id=stale,
                                                 expires_at=time.time() + 0.3))
    tap.publish(down, chirpstack.command_message(DEV, 6, b"\x07", item_id=live,
                                                 expires_at=time.time() + 3600,
                                                 marshaler="protobuf"))
    deadline = time.monotonic() + 5
    while sim.counters["downlinks_queued"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.4)
    modem.send("AT+SEND=1:03")
    lines = modem.until("+EVT:TX_DONE")
    assert "+EVT:RX_1:-70:8:UNICAST:6:07" in lines
    assert not any(":5:EE" in ln for ln in lines)
    txack = chirpstack.parse_txack(*tap.wait("txack"))
    assert (txack.dev_eui, txack.queue_item_id) == (DEV, live)
    log_topic, log_payload = tap.wait("log")
    log = integration.LogEvent()
    log.ParseFromString(log_payload)
    assert (log.code, log.level, log.context["queue_item_id"]) == (
        integration.EXPIRED, integration.ERROR, stale)

    # Class C: already expired when it arrives; a confirmed one goes out at once.
    modem.send("AT+CLASS=C")
    modem.until("OK")
    tap.publish(down, chirpstack.command_message(DEV, 5, b"\xee", expires_at=time.time() - 60,
                                                 marshaler="protobuf"))
    tap.publish(down, chirpstack.command_message(DEV, 7, b"\x08", confirmed=True, item_id=ITEM))
    assert "+EVT:RX_C:-70:8:UNICAST:7:08" in modem.until("+EVT:RX_C")
    ack = chirpstack.parse_ack(*tap.wait("ack"))
    assert (ack.queue_item_id, ack.acknowledged) == (ITEM, True)
    assert sim.counters["downlinks_expired"] == 2
    assert sim.counters["downlinks_delivered"] == 2
    assert sim.counters["downlinks_rejected"] == 0


def test_simulator_refuses_bad_commands_in_either_encoding(start_modem_sim, mqtt_tap):
    sim = start_modem_sim(SIM_APP, speed=100.0, boot_banner=False, marshaler="protobuf")
    tap = mqtt_tap()
    down = f"application/{SIM_APP}/device/{DEV}/command/down"

    def pb(**fields) -> bytes:
        cmd = integration.DownlinkCommand(dev_eui=DEV, f_port=2, data=b"\x01")
        for name, value in fields.items():
            setattr(cmd, name, value)
        return cmd.SerializeToString()

    too_far = integration.DownlinkCommand(dev_eui=DEV, f_port=2)
    too_far.expires_at.seconds = 10 ** 12  # beyond year 9999
    ok = json.loads(chirpstack.command_message(DEV, 2, b"\x01"))
    bad = [
        (pb(dev_eui=OTHER), "dev_eui_mismatch"),
        (pb(dev_eui="70b3"), "dev_eui"),
        (pb(f_port=0), "f_port"),
        (pb(f_port=224), "f_port"),
        (pb(data=bytes(243)), "too_large"),
        (pb(id="queue-item-1"), "id"),
        (too_far.SerializeToString(), "expires_at"),
        (b"\x0a\xff", "json"),  # a truncated protobuf field
        (json.dumps({**ok, "expiresAt": "tomorrow"}).encode(), "expires_at"),
        (json.dumps({**ok, "expiresAt": 1767225600}).encode(), "expires_at"),
    ]
    for payload, _ in bad:
        tap.publish(down, payload)
    epoch = integration.DownlinkCommand(dev_eui=DEV, f_port=2)
    epoch.expires_at.seconds = 0  # set, and a valid time (long past)
    assert epoch.HasField("expires_at")
    tap.publish(down, epoch.SerializeToString())
    tap.publish(down, json.dumps({**ok, "expires_at": "2026-01-01T00:00:00+01:00"}).encode())
    deadline = time.monotonic() + 5
    while (sim.counters["downlinks_rejected"] + sim.counters["downlinks_queued"] < len(bad) + 2
           and time.monotonic() < deadline):
        time.sleep(0.01)
    want: dict[str, int] = {}
    for _, reason in bad:
        want[reason] = want.get(reason, 0) + 1
    assert dict(sim.rejections) == want
    assert sim.counters["downlinks_queued"] == 2
