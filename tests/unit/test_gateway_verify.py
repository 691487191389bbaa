"""Gateway without a network: parsing ChirpStack events, verifying signatures,
duplicates, the device key cache and the durability of the outbox."""

from __future__ import annotations

import json
import uuid

import pytest
from chirpstack_api import integration
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa
from google.protobuf import json_format

from gateway import chirpstack
from gateway.chirpstack import Rejected
from gateway.forwarder import backoff_delay
from gateway.ledger_client import LedgerClient
from gateway.outbox import Outbox
from gateway.registry import Registry, parse_devices
from gateway.verify import SEQ_WINDOW, Verifier
from meter import frame
from tools import runtime

DEV_A = "70b3d57ed0000a01"
DEV_B = "70b3d57ed0000b02"
FIELDS = dict(t_end=1_767_225_600, interval_s=900, import_dwh=10_000, export_dwh=0,
              irms_ca=523, vrms_dv=2305, flags=frame.FLAG_VOLTAGE_MEASURED)


def new_key():
    return ECC.generate(curve="ed25519")


def raw_public(key) -> bytes:
    return key.public_key().export_key(format="raw")


def signed(key, dev_eui: str, seq: int, **over) -> bytes:
    body = frame.encode_body(**{**FIELDS, "seq": seq, **over})
    sig = eddsa.new(key, "rfc8032").sign(frame.signed_message(bytes.fromhex(dev_eui), body))
    return frame.assemble(body, sig)


def topic(dev_eui: str) -> str:
    return f"application/app-1/device/{dev_eui}/event/up"


def event(dev_eui: str, data: bytes, f_port: int = frame.PORT_READING,
          dedup: str | None = None) -> bytes:
    ev = integration.UplinkEvent(deduplication_id=dedup or str(uuid.uuid4()), f_port=f_port,
                                 f_cnt=7, data=data)
    ev.device_info.dev_eui = dev_eui
    ev.device_info.application_id = "app-1"
    ev.device_info.device_name = "meter"
    ev.rx_info.add(gateway_id="0016c001f1500001", rssi=-97, snr=7.5)
    return json_format.MessageToJson(ev).encode()


@pytest.fixture
def keys():
    return {DEV_A: new_key(), DEV_B: new_key()}


@pytest.fixture
def verifier(keys):
    enrolled = {dev: raw_public(k) for dev, k in keys.items()}
    return Verifier(enrolled.get)


def check(verifier, dev_eui, payload, on_topic=None):
    up = chirpstack.parse_uplink(topic(on_topic or dev_eui), payload)
    return verifier.verify(up)


# -- good frames -------------------------------------------------------------

def test_good_frame_is_verified_with_its_fields(keys, verifier):
    data = signed(keys[DEV_A], DEV_A, 42, import_dwh=123_456)
    v = check(verifier, DEV_A, event(DEV_A, data, dedup="d-1"))
    assert v.dev_eui == DEV_A and v.seq == 42
    assert v.frame == data
    assert v.deduplication_id == "d-1"
    assert v.reading.import_dwh == 123_456 and v.reading.interval_s == 900


def test_event_json_variants_chirpstack_versions_send(keys, verifier):
    data = signed(keys[DEV_A], DEV_A, 1)
    doc = json.loads(event(DEV_A, data))
    # Upper-case EUI, explicit nulls, fields from a newer version.
    doc["deviceInfo"]["devEui"] = DEV_A.upper()
    doc["adr"] = None
    doc["regionConfigId"] = None
    doc["someFutureField"] = {"x": 1}
    v = check(verifier, DEV_A, json.dumps(doc).encode(), on_topic=DEV_A.upper())
    assert v.dev_eui == DEV_A and v.seq == 1


def test_urlsafe_base64_data_is_accepted(keys, verifier):
    # Find a frame whose base64 contains characters that differ between alphabets.
    import base64
    for seq in range(1, 200):
        data = signed(keys[DEV_A], DEV_A, seq)
        std = base64.b64encode(data).decode()
        if "+" in std or "/" in std:
            break
    doc = json.loads(event(DEV_A, data))
    doc["data"] = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert check(verifier, DEV_A, json.dumps(doc).encode()).frame == data


# -- rejections while parsing the event --------------------------------------

def _event_doc(**over):
    doc = {"deduplicationId": "x", "deviceInfo": {"devEui": DEV_A}, "fPort": 1, "data": "EQ=="}
    doc.update(over)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("payload,reason,words", [
    (b"\xff\xfe{}", "malformed_json", "UTF-8"),
    (b"{not json", "malformed_json", "not JSON"),
    (b"", "malformed_json", "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "oversized_message", "limit"),
    (b"[" * 30_000 + b"]" * 30_000, "malformed_json", "JSON"),
    (b'{"data": "' + b"A" * 70_000 + b'"}', "oversized_message", "70"),
    (b"[1, 2, 3]", "malformed_event", "list"),
    (b'"up"', "malformed_event", "str"),
    (_event_doc(fPort="one"), "malformed_event", "fPort"),
    (_event_doc(deviceInfo=5), "malformed_event", "deviceInfo"),
    (_event_doc(rxInfo={}), "malformed_event", "rxInfo"),
    (_event_doc(deviceInfo={}), "malformed_event", "devEui"),
    (_event_doc(deviceInfo={"devEui": "70b3d57ed0000a0z"}), "malformed_event", "devEui"),
    (_event_doc(data="!!not base64!!"), "malformed_event", "base64"),
    (_event_doc(deviceInfo={"devEui": DEV_B}), "topic_mismatch", DEV_B),
])
def test_bad_events_are_rejected_with_reason(payload, reason, words, verifier):
    with pytest.raises(Rejected) as exc:
        check(verifier, DEV_A, payload)
    assert exc.value.reason == reason
    assert words in str(exc.value)
    assert exc.value.dev_eui == DEV_A  # the topic names the device even when the payload cannot


def test_message_on_a_non_uplink_topic_is_refused():
    with pytest.raises(Rejected) as exc:
        chirpstack.parse_uplink(f"application/a/device/{DEV_A}/event/join", _event_doc())
    assert exc.value.reason == "topic_mismatch"


def test_uplink_topic():
    assert chirpstack.uplink_topic() == "application/+/device/+/event/up"
    assert chirpstack.uplink_topic("5f0e") == "application/5f0e/device/+/event/up"


# -- rejections while verifying the reading ----------------------------------

def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


@pytest.mark.parametrize("make,reason", [
    (lambda k: event(DEV_A, signed(k, DEV_A, 1), f_port=2), "wrong_port"),
    (lambda k: event(DEV_A, signed(k, DEV_A, 1), f_port=0), "wrong_port"),
    (lambda k: event(DEV_A, b""), "empty"),
    (lambda k: event(DEV_A, signed(k, DEV_A, 1)[:-1]), "truncated"),
    (lambda k: event(DEV_A, signed(k, DEV_A, 1) + b"\x00"), "oversized"),
    (lambda k: event(DEV_A, b"\x21" + signed(k, DEV_A, 1)[1:]), "version"),
    (lambda k: event(DEV_A, b"\x12" + signed(k, DEV_A, 1)[1:]), "type"),
    (lambda k: event(DEV_A, signed(k, DEV_A, 1)[:23] + b"\x80" + signed(k, DEV_A, 1)[24:]),
     "field"),
    (lambda k: event(DEV_A, _flip(signed(k, DEV_A, 1), 70)), "bad_signature"),  # signature bit
    (lambda k: event(DEV_A, _flip(signed(k, DEV_A, 1), 12)), "bad_signature"),  # energy bit
    (lambda k: event(DEV_A, signed(new_key(), DEV_A, 1)), "bad_signature"),  # someone else's key
])
def test_bad_readings_are_rejected_with_reason(make, reason, keys, verifier):
    with pytest.raises(Rejected) as exc:
        check(verifier, DEV_A, make(keys[DEV_A]))
    assert exc.value.reason == reason
    assert exc.value.dev_eui == DEV_A
    assert str(exc.value)


def test_frame_replayed_under_another_device_fails(keys, verifier):
    # B's own frame, sent as if from A: the EUI is part of what is signed.
    with pytest.raises(Rejected) as exc:
        check(verifier, DEV_A, event(DEV_A, signed(keys[DEV_B], DEV_B, 1)))
    assert exc.value.reason == "bad_signature"
    # A's key over B's EUI is not A's reading either.
    with pytest.raises(Rejected) as exc:
        check(verifier, DEV_A, event(DEV_A, signed(keys[DEV_A], DEV_B, 1)))
    assert exc.value.reason == "bad_signature"


def test_unknown_device(verifier):
    dev = "0000000000000bad"
    with pytest.raises(Rejected) as exc:
        check(verifier, dev, event(dev, signed(new_key(), dev, 1)))
    assert exc.value.reason == "unknown_device"
    assert dev in str(exc.value)


def test_enrolled_key_that_is_not_a_curve_point():
    v = Verifier({DEV_A: b"\xff" * 32}.get)
    with pytest.raises(Rejected) as exc:
        check(v, DEV_A, event(DEV_A, signed(new_key(), DEV_A, 1)))
    assert exc.value.reason == "bad_key"


def test_reenrolled_key_replaces_the_cached_one(keys):
    enrolled = {DEV_A: raw_public(keys[DEV_A])}
    v = Verifier(enrolled.get)
    assert check(v, DEV_A, event(DEV_A, signed(keys[DEV_A], DEV_A, 1))).seq == 1
    replacement = new_key()
    enrolled[DEV_A] = raw_public(replacement)
    assert check(v, DEV_A, event(DEV_A, signed(replacement, DEV_A, 2))).seq == 2
    with pytest.raises(Rejected) as exc:
        check(v, DEV_A, event(DEV_A, signed(keys[DEV_A], DEV_A, 3)))
    assert exc.value.reason == "bad_signature"


# -- duplicates ---------------------------------------------------------------

def test_duplicates_only_after_remember(keys, verifier):
    payload = event(DEV_A, signed(keys[DEV_A], DEV_A, 5), dedup="dup-1")
    v = check(verifier, DEV_A, payload)
    # Not stored yet (say the disk was full): the same message must pass again.
    assert check(verifier, DEV_A, payload).seq == 5
    verifier.remember(v.dev_eui, v.seq, v.deduplication_id)
    with pytest.raises(Rejected) as exc:
        check(verifier, DEV_A, payload)
    assert exc.value.reason == "duplicate" and "dup-1" in str(exc.value)
    # Same reading relayed under a new deduplication id.
    with pytest.raises(Rejected) as exc:
        check(verifier, DEV_A, event(DEV_A, signed(keys[DEV_A], DEV_A, 5), dedup="dup-2"))
    assert exc.value.reason == "duplicate" and "seq 5" in str(exc.value)


def test_duplicate_seq_is_per_device(keys, verifier):
    verifier.remember(DEV_A, 5)
    assert check(verifier, DEV_B, event(DEV_B, signed(keys[DEV_B], DEV_B, 5))).seq == 5


def test_forged_frame_with_a_used_seq_is_a_bad_signature(keys, verifier):
    verifier.remember(DEV_A, 5)
    with pytest.raises(Rejected) as exc:
        check(verifier, DEV_A, event(DEV_A, signed(new_key(), DEV_A, 5)))
    assert exc.value.reason == "bad_signature"


def test_out_of_order_seqs_inside_the_window(keys, verifier):
    def accept(seq):
        v = check(verifier, DEV_A, event(DEV_A, signed(keys[DEV_A], DEV_A, seq)))
        verifier.remember(v.dev_eui, v.seq)

    def is_duplicate(seq):
        try:
            check(verifier, DEV_A, event(DEV_A, signed(keys[DEV_A], DEV_A, seq)))
        except Rejected as exc:
            assert exc.reason == "duplicate"
            return True
        return False

    oldest = 2001 - SEQ_WINDOW + 1  # the last seq the window still covers below 2001
    for seq in [2000, 1997, 1999, 2001, oldest]:
        accept(seq)
    assert [is_duplicate(s) for s in (1997, 1999, 2000, 2001, oldest)] == [True] * 5
    assert [is_duplicate(s) for s in (1998, 2002, oldest + 1, oldest - 1)] == [False] * 4
    accept(2200)
    assert [is_duplicate(s) for s in (1997, 2001, 2200)] == [True] * 3
    # `oldest` has slid out of the window behind 2200: the gateway no longer
    # knows it and lets the ledger (which answers "duplicate") decide.
    assert not is_duplicate(oldest)


# -- device key registry -------------------------------------------------------

def _devices_doc(pairs):
    return {"devices": [{"dev_eui": d, "public_key": k, "meter_model": "x"} for d, k in pairs]}


def test_parse_devices_keeps_good_entries_and_names_bad_ones():
    good_key = "11" * 32
    keys, problems = parse_devices(_devices_doc([
        (DEV_A.upper(), good_key.upper()),
        ("70b3d57e", good_key),
        (DEV_B, "11" * 31),
        (None, good_key),
    ]) | {"cursor": None})
    assert keys == {DEV_A: bytes.fromhex(good_key)}
    assert len(problems) == 3
    assert "70b3d57e" in problems[0] and DEV_B in problems[1] and "None" in problems[2]
    with pytest.raises(ValueError):
        parse_devices({"items": []})


def _offline_client():
    # Nothing listens on this loopback port: every call fails like a ledger that is down.
    return LedgerClient(f"http://127.0.0.1:{runtime.free_port()}", timeout=2)


def test_registry_cache_round_trip(tmp_path, keys):
    cache = tmp_path / "devices.json"
    enrolled = {dev: raw_public(k) for dev, k in keys.items()}
    first = Registry(_offline_client(), cache)
    first.replace(enrolled)
    assert first.key_for(DEV_A) == enrolled[DEV_A]

    second = Registry(_offline_client(), cache)
    assert second.key_for(DEV_A) is None
    assert second.load_cache() == 2
    assert second.key_for(DEV_A) == enrolled[DEV_A] and second.key_for(DEV_B) == enrolled[DEV_B]
    # The ledger is down: the refresh fails, says why, and the cached keys stay.
    assert second.refresh() is False
    assert second.last_error
    assert len(second) == 2 and second.key_for(DEV_B) == enrolled[DEV_B]


def test_registry_ignores_a_damaged_cache(tmp_path):
    cache = tmp_path / "devices.json"
    cache.write_text('{"devices": [')
    reg = Registry(_offline_client(), cache)
    assert reg.load_cache() == 0 and len(reg) == 0


def test_unknown_device_refresh_is_rate_limited(tmp_path):
    now = [1000.0]
    reg = Registry(_offline_client(), tmp_path / "d.json", refresh_interval=300,
                   unknown_gap=10, clock=lambda: now[0])
    assert reg.refresh_if_stale() is False  # tried (first time) and failed
    first_error = reg.last_error
    assert first_error
    reg.last_error = None
    now[0] += 5
    assert reg.refresh_for_unknown(DEV_A) is False
    assert reg.last_error is None  # within the gap: the ledger was not asked
    now[0] += 6
    assert reg.refresh_for_unknown(DEV_A) is False
    assert reg.last_error  # asked again after the gap
    reg.last_error = None
    now[0] += 100
    assert reg.refresh_if_stale() is False
    assert reg.last_error is None  # periodic refresh waits the full interval


# -- outbox ---------------------------------------------------------------------

def test_outbox_survives_reopen(tmp_path, keys):
    path = tmp_path / "outbox.sqlite"
    frames = {seq: signed(keys[DEV_A], DEV_A, seq) for seq in (1, 2, 3)}
    box = Outbox(path)
    for seq, data in frames.items():
        assert box.put(DEV_A, seq, data, 1000.0 + seq)
    assert box.put(DEV_B, 1, b"b-frame", 1001.5)
    assert box.put(DEV_A, 2, frames[2], 9999.0) is False  # already queued
    box.close()

    box = Outbox(path)
    items = box.pending(10)
    assert [(i.dev_eui, i.seq) for i in items] == [(DEV_A, 1), (DEV_A, 2), (DEV_A, 3), (DEV_B, 1)]
    assert [i.frame for i in items[:3]] == [frames[1], frames[2], frames[3]]
    assert items[1].received_at == 1002.0
    assert box.put(DEV_A, 3, frames[3], 1.0) is False  # still known after reopening
    assert box.depth() == 4
    assert [i.seq for i in box.pending(2)] == [1, 2]

    box.acknowledge([items[0].id, items[3].id])
    box.reject(items[1], "registers_backwards", "import went down")
    box.close()

    box = Outbox(path)
    assert [(i.dev_eui, i.seq) for i in box.pending(10)] == [(DEV_A, 3)]
    rejected = box.rejected()
    assert len(rejected) == 1
    assert rejected[0]["seq"] == 2 and rejected[0]["reason"] == "registers_backwards"
    assert rejected[0]["message"] == "import went down"
    box.close()


def test_outbox_refuses_a_newer_schema(tmp_path):
    import sqlite3
    path = tmp_path / "outbox.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(RuntimeError, match="schema 99"):
        Outbox(path)


# -- retry pacing ---------------------------------------------------------------

@pytest.mark.parametrize("failures,low,high", [
    (1, 0.25, 0.5), (2, 0.5, 1.0), (4, 2.0, 4.0), (7, 15.0, 30.0), (500, 15.0, 30.0),
])
def test_backoff_doubles_up_to_the_cap_with_jitter(failures, low, high):
    assert backoff_delay(failures, 0.5, 30.0, rng=lambda: 0.0) == low
    assert backoff_delay(failures, 0.5, 30.0, rng=lambda: 1.0) == high
    assert low <= backoff_delay(failures, 0.5, 30.0) <= high


# -- configuration ---------------------------------------------------------------

def test_configuration_errors_name_the_setting(tmp_path):
    from gateway.daemon import Gateway
    with pytest.raises(ValueError, match="ledger URL"):
        LedgerClient("127.0.0.1:8480")
    with pytest.raises(ValueError, match="application_id"):
        Gateway("127.0.0.1", 1883, "http://127.0.0.1:8480", tmp_path, application_id="a/#")
