"""Gateway without a network: parsing ChirpStack events, verifying bundles, the
accepted-seq ranges and resend planning, command keys, the device key cache and
the durability of the gateway's SQLite state."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
from chirpstack_api import integration
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa
from google.protobuf import json_format

from gateway import chirpstack
from gateway.chirpstack import Rejected
from gateway.commands import CommandKeys, load_command_keys, parse_command_keys
from gateway.forwarder import backoff_delay
from gateway.ledger_client import LedgerClient
from gateway.outbox import Outbox
from gateway.registry import Registry, parse_devices, parse_latest_seqs
from gateway.seqs import MAX_RANGES, SeqRanges, plan_resend
from gateway.verify import Verifier
from meter import frame
from tools import runtime

DEV_A = "70b3d57ed0000a01"
DEV_B = "70b3d57ed0000b02"
T0 = 1_767_225_600
VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "frames.json").read_text())


def new_key():
    return ECC.generate(curve="ed25519")


def raw_public(key) -> bytes:
    return key.public_key().export_key(format="raw")


def signed(key, dev_eui: str, first: int, n: int = 1, import_dwh: int = 10_000) -> bytes:
    """A bundle of n readings from seq `first`, every 900 s, 250.0 Wh each."""
    body = frame.encode_body([(first + k, T0 + 900 * (first + k), import_dwh + 2500 * k, 0,
                               frame.FLAG_VOLTAGE_MEASURED) for k in range(n)])
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
    """What the gateway does with an uplink up to the outbox: parse, decode,
    and for a bundle verify the signature."""
    up = chirpstack.parse_uplink(topic(on_topic or dev_eui), payload)
    item = verifier.check(up)
    if isinstance(item, frame.Bundle):
        return verifier.verify_bundle(up.dev_eui, item)
    return item


# -- good bundles --------------------------------------------------------------

def test_good_bundle_is_verified_with_its_readings(keys, verifier):
    data = signed(keys[DEV_A], DEV_A, 42, n=3, import_dwh=123_456)
    b = check(verifier, DEV_A, event(DEV_A, data, dedup="d-1"))
    assert (b.first_seq, b.last_seq) == (42, 44)
    assert b.data() == data
    assert [r.import_dwh for r in b.readings] == [123_456, 125_956, 128_456]


def test_vector_bundles_verify_with_the_vector_key():
    v = Verifier({VECTORS["dev_eui"]: bytes.fromhex(VECTORS["public_key"])}.get)
    for vec in VECTORS["bundles"]:
        b = check(v, VECTORS["dev_eui"], event(VECTORS["dev_eui"], bytes.fromhex(vec["hex"])))
        assert [r.as_dict() for r in b.readings] == vec["readings"], vec["name"]


def test_a_fragment_is_decoded_not_verified(keys, verifier):
    pieces = frame.fragment(signed(keys[DEV_A], DEV_A, 7, n=3), 51)
    f = check(verifier, DEV_A, event(DEV_A, pieces[1]))
    assert isinstance(f, frame.Fragment)
    assert (f.tag, f.index, f.count) == (7, 1, len(pieces))


def test_event_json_variants_chirpstack_versions_send(keys, verifier):
    data = signed(keys[DEV_A], DEV_A, 1)
    doc = json.loads(event(DEV_A, data))
    # Upper-case EUI, explicit nulls, fields from a newer version.
    doc["deviceInfo"]["devEui"] = DEV_A.upper()
    doc["adr"] = None
    doc["regionConfigId"] = None
    doc["someFutureField"] = {"x": 1}
    b = check(verifier, DEV_A, json.dumps(doc).encode(), on_topic=DEV_A.upper())
    assert b.first_seq == 1


def test_urlsafe_base64_data_is_accepted(keys, verifier):
    # Find a bundle whose base64 contains characters that differ between alphabets.
    import base64
    for seq in range(1, 200):
        data = signed(keys[DEV_A], DEV_A, seq)
        std = base64.b64encode(data).decode()
        if "+" in std or "/" in std:
            break
    doc = json.loads(event(DEV_A, data))
    doc["data"] = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert check(verifier, DEV_A, json.dumps(doc).encode()).data() == data


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


# -- rejections while verifying the bundle ----------------------------------

def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


@pytest.mark.parametrize("make,reason", [
    (lambda k: event(DEV_A, b""), "empty"),
    (lambda k: event(DEV_A, signed(k, DEV_A, 1)[:-1]), "truncated"),
    (lambda k: event(DEV_A, signed(k, DEV_A, 1) + b"\x00"), "oversized"),
    (lambda k: event(DEV_A, b"\x21" + signed(k, DEV_A, 1)[1:]), "version"),
    (lambda k: event(DEV_A, b"\x18" + signed(k, DEV_A, 1)[1:]), "type"),  # a command
    (lambda k: event(DEV_A, signed(k, DEV_A, 1)[:1] + b"\x00" + signed(k, DEV_A, 1)[2:]),
     "field"),  # count 0
    (lambda k: event(DEV_A, bytes.fromhex("12006421") + bytes(10)), "field"),  # piece 2 of 2
    (lambda k: event(DEV_A, _flip(signed(k, DEV_A, 1), 70)), "bad_signature"),  # signature bit
    (lambda k: event(DEV_A, _flip(signed(k, DEV_A, 1), 12)), "bad_signature"),  # energy bit
    (lambda k: event(DEV_A, _flip(signed(k, DEV_A, 1, n=2), frame.HEAD_LEN)),
     "bad_signature"),  # flags of the second reading
    (lambda k: event(DEV_A, signed(new_key(), DEV_A, 1)), "bad_signature"),  # someone else's key
])
def test_bad_uplinks_are_rejected_with_reason(make, reason, keys, verifier):
    with pytest.raises(Rejected) as exc:
        check(verifier, DEV_A, make(keys[DEV_A]))
    assert exc.value.reason == reason
    assert exc.value.dev_eui == DEV_A
    assert str(exc.value)


@pytest.mark.parametrize("case", VECTORS["invalid_uplinks"], ids=lambda c: c["name"])
def test_invalid_vector_uplinks_get_the_codec_reason(case):
    v = Verifier({VECTORS["dev_eui"]: bytes.fromhex(VECTORS["public_key"])}.get)
    with pytest.raises(Rejected) as exc:
        check(v, VECTORS["dev_eui"], event(VECTORS["dev_eui"], bytes.fromhex(case["hex"])))
    assert exc.value.reason == case["reason"]


def test_bundle_replayed_under_another_device_fails(keys, verifier):
    # B's own bundle, sent as if from A: the EUI is part of what is signed.
    with pytest.raises(Rejected) as exc:
        check(verifier, DEV_A, event(DEV_A, signed(keys[DEV_B], DEV_B, 1)))
    assert exc.value.reason == "bad_signature"
    # A's key over B's EUI is not A's bundle either.
    with pytest.raises(Rejected) as exc:
        check(verifier, DEV_A, event(DEV_A, signed(keys[DEV_A], DEV_B, 1)))
    assert exc.value.reason == "bad_signature"


def test_unknown_device(verifier):
    dev = "0000000000000bad"
    assert not verifier.has_key(dev)
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
    assert check(v, DEV_A, event(DEV_A, signed(keys[DEV_A], DEV_A, 1))).first_seq == 1
    replacement = new_key()
    enrolled[DEV_A] = raw_public(replacement)
    assert check(v, DEV_A, event(DEV_A, signed(replacement, DEV_A, 2))).first_seq == 2
    with pytest.raises(Rejected) as exc:
        check(v, DEV_A, event(DEV_A, signed(keys[DEV_A], DEV_A, 3)))
    assert exc.value.reason == "bad_signature"


def test_deduplication_id_is_a_duplicate_only_after_remember(keys, verifier):
    payload = event(DEV_A, signed(keys[DEV_A], DEV_A, 5), dedup="dup-1")
    check(verifier, DEV_A, payload)
    # Not stored yet (say the disk was full): the same message must pass again.
    assert check(verifier, DEV_A, payload).first_seq == 5
    verifier.remember("dup-1")
    with pytest.raises(Rejected) as exc:
        check(verifier, DEV_A, payload)
    assert exc.value.reason == "duplicate" and "dup-1" in str(exc.value)


# -- accepted seqs, gaps, resend planning --------------------------------------

def test_ranges_merge_and_report_gaps_with_their_age():
    r = SeqRanges()
    r.add(1, 3, now=100.0)
    r.add(7, 9, now=200.0)  # 4..6 missing since 200
    r.add(13, 13, now=300.0)  # 10..12 missing since 300
    assert [(g.first, g.last, g.since) for g in r.gaps()] == [(4, 6, 200.0), (10, 12, 300.0)]
    assert r.missing() == 6 and r.highest == 13
    assert r.all_accepted(7, 9) and not r.all_accepted(6, 9) and r.accepted(5, 8) == 2
    r.add(5, 5, now=400.0)  # splits 4..6: both halves stay as old as the gap was
    assert [(g.first, g.last, g.since) for g in r.gaps()] == [(4, 4, 200.0), (6, 6, 200.0),
                                                              (10, 12, 300.0)]
    r.add(4, 6, now=500.0)  # overlapping and adjacent runs merge
    r.add(10, 12, now=500.0)
    assert [(x.lo, x.hi) for x in r.ranges] == [(1, 13)] and r.gaps() == []


def test_ranges_give_up_the_oldest_gaps_beyond_the_bound():
    r = SeqRanges()
    for k in range(MAX_RANGES + 5):
        r.add(10 * k, 10 * k, now=float(k))
    assert r.trim() == 5
    assert len(r.ranges) == MAX_RANGES and r.ranges[0].lo == 50
    # Below the lowest run nothing is known: not accepted, not a gap.
    assert not r.all_accepted(0, 0) and r.gaps()[0].first == 51


def test_resend_plan_waits_for_the_gap_to_settle_and_stops_asking():
    r = SeqRanges()
    r.add(1, 3, now=0.0)
    r.add(7, 9, now=1000.0)
    assert plan_resend(r, now=1500.0, after_s=600, max_asks=2) is None  # 500 s old
    assert plan_resend(r, now=1600.0, after_s=600, max_asks=2) == (4, 3)
    r.mark_asked(4, 6)
    assert plan_resend(r, now=1600.0, after_s=600, max_asks=2) == (4, 3)
    r.mark_asked(4, 6)
    assert plan_resend(r, now=1600.0, after_s=600, max_asks=2) is None  # given up


def test_resend_plan_joins_nearby_gaps_into_one_request():
    r = SeqRanges()
    for lo, hi in [(1, 3), (7, 8), (12, 30), (40, 41)]:
        r.add(lo, hi, now=0.0)
    # Gaps 4..6 (3 missing), 9..11 (3), 31..39 (9). Two readings held between
    # the first two gaps: one request. 19 held before the third: its own.
    assert plan_resend(r, now=10.0, after_s=1, max_asks=5) == (4, 8)
    r.mark_asked(4, 11)
    assert [g.asked for g in r.gaps()] == [1, 1, 0]
    assert plan_resend(r, now=10.0, after_s=1, max_asks=1) == (31, 9)


# -- command keys -----------------------------------------------------------------

def test_command_keys_file_is_checked_entry_by_entry(tmp_path):
    good = {DEV_A.upper(): "00112233445566778899aabbccddeeff"}
    assert parse_command_keys(good) == {DEV_A: bytes.fromhex("00112233445566778899aabbccddeeff")}
    for doc, words in [([], "JSON object"),
                       ({"70b3d57e": "00" * 16}, "'70b3d57e'"),
                       ({DEV_A: "00" * 15}, DEV_A),
                       ({DEV_A: 7}, "32 hex digits"),
                       ({DEV_A: "00" * 16, DEV_A.upper(): "11" * 16}, "twice")]:
        with pytest.raises(ValueError, match=words):
            parse_command_keys(doc)
    path = tmp_path / "keys.json"
    with pytest.raises(ValueError, match="cannot read"):
        load_command_keys(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: not JSON"):
        load_command_keys(path)


def test_command_keys_reload_when_the_file_changes_and_keep_the_old_on_error(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({DEV_A: "01" * 16}))
    os.chmod(path, 0o600)
    keys = CommandKeys(path)
    assert keys.get(DEV_A) == b"\x01" * 16 and keys.get(DEV_B) is None
    assert not keys.reload_if_changed()
    path.write_text(json.dumps({DEV_A: "01" * 16, DEV_B: "02" * 16}))
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert keys.reload_if_changed() and keys.get(DEV_B) == b"\x02" * 16
    path.write_text(json.dumps({DEV_A: "short"}))
    os.utime(path, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    assert not keys.reload_if_changed()
    assert len(keys) == 2 and keys.get(DEV_B) == b"\x02" * 16
    assert len(CommandKeys(None)) == 0


def test_keys_file_readable_by_others_is_warned_about(tmp_path, caplog):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({DEV_A: "00" * 16}))
    os.chmod(path, 0o644)
    with caplog.at_level("WARNING", logger="gateway.commands"):
        assert len(load_command_keys(path)) == 1
    assert "chmod 600" in caplog.text


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


def test_latest_seqs_say_what_the_ledger_holds():
    doc = {"devices": [{"dev_eui": DEV_A.upper(), "public_key": "11" * 32, "latest_seq": 41},
                       {"dev_eui": DEV_B, "public_key": "11" * 32, "latest_seq": None},
                       {"dev_eui": "70b3d57ed0000c03", "public_key": "11" * 32},
                       {"dev_eui": "70b3d57ed0000d04", "latest_seq": "many"},
                       {"dev_eui": "70b3d57ed0000e05", "latest_seq": True}]}
    # None: the ledger holds nothing (0); a missing or bad value: not known.
    assert parse_latest_seqs(doc) == {DEV_A: 41, DEV_B: 0}
    assert parse_latest_seqs({"items": []}) == {}


def test_registry_cache_round_trip(tmp_path, keys):
    cache = tmp_path / "devices.json"
    enrolled = {dev: raw_public(k) for dev, k in keys.items()}
    first = Registry(_offline_client(), cache)
    first.replace(enrolled, {DEV_A: 17, DEV_B: 0})
    assert first.key_for(DEV_A) == enrolled[DEV_A]
    assert (first.latest_seq(DEV_A), first.latest_seq(DEV_B)) == (17, 0)

    second = Registry(_offline_client(), cache)
    assert second.key_for(DEV_A) is None
    assert second.load_cache() == 2
    assert second.key_for(DEV_A) == enrolled[DEV_A] and second.key_for(DEV_B) == enrolled[DEV_B]
    assert (second.latest_seq(DEV_A), second.latest_seq(DEV_B)) == (17, 0)
    assert second.latest_seq("70b3d57ed0000c03") is None
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


# -- gateway state (outbox.sqlite) ------------------------------------------------

def test_outbox_survives_reopen(tmp_path, keys):
    path = tmp_path / "outbox.sqlite"
    bundles = {seq: signed(keys[DEV_A], DEV_A, seq, n=2) for seq in (1, 3, 5)}
    box = Outbox(path)
    for seq, data in bundles.items():
        assert box.store_bundle(DEV_A, data, seq, seq + 1, 1000.0 + seq)
    assert box.store_bundle(DEV_B, b"b-bundle", 1, 1, 1001.5)
    assert box.store_bundle(DEV_A, bundles[3], 3, 4, 9999.0) is False  # already queued
    box.close()

    box = Outbox(path)
    items = box.pending(10)
    assert [(i.dev_eui, i.first_seq, i.last_seq) for i in items] == [
        (DEV_A, 1, 2), (DEV_A, 3, 4), (DEV_A, 5, 6), (DEV_B, 1, 1)]
    assert [i.bundle for i in items[:3]] == [bundles[1], bundles[3], bundles[5]]
    assert items[1].received_at == 1003.0
    assert box.store_bundle(DEV_A, bundles[5], 5, 6, 1.0) is False  # still known after reopening
    assert box.depth() == 4
    assert [i.first_seq for i in box.pending(2)] == [1, 3]

    box.acknowledge([items[0].id, items[3].id])
    box.reject(items[1], "registers_backwards", "import went down")
    box.close()

    box = Outbox(path)
    assert [(i.dev_eui, i.first_seq) for i in box.pending(10)] == [(DEV_A, 5)]
    rejected = box.rejected()
    assert len(rejected) == 1
    assert (rejected[0]["first_seq"], rejected[0]["last_seq"]) == (3, 4)
    assert rejected[0]["reason"] == "registers_backwards"
    assert rejected[0]["message"] == "import went down"
    box.close()


def test_fragments_ranges_and_counters_are_durable(tmp_path):
    path = tmp_path / "outbox.sqlite"
    box = Outbox(path)
    assert box.add_fragment(DEV_A, 7, 3, 2, b"cc", 10.0, max_sets=8)[0] == "new"
    assert box.add_fragment(DEV_A, 7, 3, 0, b"aa", 11.0, max_sets=8)[0] == "new"
    status, pieces, evicted = box.add_fragment(DEV_A, 7, 3, 0, b"aa", 12.0, max_sets=8)
    assert (status, pieces, evicted) == ("same", {0: b"aa", 2: b"cc"}, [])
    assert box.add_fragment(DEV_A, 7, 3, 0, b"XX", 13.0, max_sets=8)[:2] == \
        ("conflict", {0: b"aa", 2: b"cc"})
    ranges = SeqRanges()
    ranges.add(1, 3, 5.0)
    ranges.add(7, 7, 6.0)
    box.store_bundle(DEV_A, b"bundle", 7, 7, 6.0, ranges, "app-9")
    assert box.next_command_counter(DEV_A, 100) == 100
    assert box.next_command_counter(DEV_A, 50) == 101  # the clock went back: still above
    box.close()

    box = Outbox(path)
    assert box.add_fragment(DEV_A, 7, 3, 1, b"bb", 20.0, max_sets=8)[1] == \
        {0: b"aa", 1: b"bb", 2: b"cc"}
    loaded = box.load_ranges()[DEV_A]
    assert [(r.lo, r.hi, r.gap_since) for r in loaded.ranges] == [(1, 3, 5.0), (7, 7, 6.0)]
    assert box.applications() == {DEV_A: "app-9"}
    assert box.next_command_counter(DEV_A, 50) == 102
    # Lost state: a fresh file still counts from the clock, above any earlier use.
    fresh = Outbox(tmp_path / "new.sqlite")
    assert fresh.next_command_counter(DEV_A, int(time.time())) >= int(time.time()) > 102
    fresh.close()
    box.close()


def test_fragment_sets_expire_and_are_bounded_per_device(tmp_path):
    box = Outbox(tmp_path / "outbox.sqlite")
    for tag in range(3):
        assert box.add_fragment(DEV_A, tag, 2, 0, b"p", 100.0 + tag, max_sets=3)[2] == []
    # A fourth set of the same device pushes out its oldest; other devices
    # have their own allowance.
    evicted = box.add_fragment(DEV_A, 3, 2, 0, b"p", 103.0, max_sets=3)[2]
    assert [(s.dev_eui, s.tag) for s in evicted] == [(DEV_A, 0)]
    assert box.add_fragment(DEV_B, 9, 2, 1, b"q", 200.0, max_sets=3)[2] == []
    assert box.fragment_sets() == 4
    stale = box.expire_fragments(received_before=102.5)
    assert sorted((s.dev_eui, s.tag, s.pieces) for s in stale) == [(DEV_A, 1, 1), (DEV_A, 2, 1)]
    assert box.fragment_sets() == 2
    box.close()


def test_eviction_reports_the_oldest_incomplete_set(tmp_path):
    box = Outbox(tmp_path / "outbox.sqlite")
    box.add_fragment(DEV_A, 1, 3, 0, b"a", 100.0, max_sets=2)
    box.add_fragment(DEV_A, 1, 3, 1, b"b", 101.0, max_sets=2)
    box.add_fragment(DEV_A, 2, 2, 0, b"c", 102.0, max_sets=2)
    _, _, evicted = box.add_fragment(DEV_A, 3, 2, 0, b"d", 103.0, max_sets=2)
    assert [(s.tag, s.count, s.pieces) for s in evicted] == [(1, 3, 2)]
    box.close()


def test_outbox_holds_each_bundle_until_every_ledger_node_answered(tmp_path):
    path = tmp_path / "outbox.sqlite"
    box = Outbox(path)
    one, two = box.set_ledgers(["http://a", "http://b"])
    for seq in (1, 2, 3):
        box.store_bundle(DEV_A, b"bundle-%d" % seq, seq, seq, float(seq))
    box.acknowledge([i.id for i in box.pending(10, one)], one)
    assert box.depth() == 3 and box.pending(10, one) == []
    assert [i.first_seq for i in box.pending(10, two)] == [1, 2, 3]
    box.reject(box.pending(10, two)[0], "bad_signature", "no", two, "http://b")
    box.acknowledge([i.id for i in box.pending(10, two)], two)
    assert box.depth() == 0
    assert [r["ledger"] for r in box.rejected()] == ["http://b"]

    # Bits survive a restart; a node taken out of the configuration holds
    # nothing back, and the node that gets its bit later starts from nothing.
    box.store_bundle(DEV_A, b"bundle-4", 4, 4, 4.0)
    box.acknowledge([i.id for i in box.pending(10, one)], one)
    box.close()
    box = Outbox(path)
    assert box.set_ledgers(["http://b", "http://a"]) == [two, one]
    assert box.depth() == 1  # 4: a has it, b not yet
    box.store_bundle(DEV_A, b"bundle-5", 5, 5, 5.0)
    box.acknowledge([i.id for i in box.pending(10, two)], two)  # b has 5 (and 4), a not 5
    assert box.set_ledgers(["http://a"]) == [one]
    assert [i.first_seq for i in box.pending(10, one)] == [5]
    assert box.depth() == 1
    a, c = box.set_ledgers(["http://a", "http://c"])
    assert a == one and c == two  # b's bit, reused
    # c starts from nothing: b's answer for 5 does not count as c's.
    assert [i.first_seq for i in box.pending(10, c)] == [5]
    box.acknowledge([i.id for i in box.pending(10, a)], a)
    box.acknowledge([i.id for i in box.pending(10, c)], c)
    assert box.depth() == 0
    box.close()


def test_outbox_refuses_a_newer_schema(tmp_path):
    import sqlite3
    path = tmp_path / "outbox.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(RuntimeError, match="schema 99"):
        Outbox(path)


def test_outbox_of_single_reading_frames_is_kept_aside(tmp_path):
    import sqlite3
    path = tmp_path / "outbox.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE pending (id INTEGER PRIMARY KEY, dev_eui TEXT, seq INTEGER, "
               "frame BLOB, received_at REAL)")
    db.execute("CREATE TABLE ledger_rejected (id INTEGER PRIMARY KEY)")
    db.execute("INSERT INTO pending (dev_eui, seq, frame, received_at) VALUES ('x', 1, x'11', 0)")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    box = Outbox(path)
    assert box.depth() == 0
    box.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT seq FROM v1_pending").fetchall() == [(1,)]
    db.close()


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
    url = "http://127.0.0.1:8480"
    with pytest.raises(ValueError, match="application_id"):
        Gateway("127.0.0.1", 1883, url, tmp_path, application_id="a/#")
    for kw, word in [({"resend_after_s": 0}, "resend_after_s"),
                     ({"fragment_ttl_s": float("nan")}, "fragment_ttl_s"),
                     ({"resend_min_interval_s": -1}, "resend_min_interval_s"),
                     ({"resend_max_per_day": -1}, "resend_max_per_day"),
                     ({"command_keys": tmp_path / "absent.json"}, "absent.json")]:
        with pytest.raises(ValueError, match=word):
            Gateway("127.0.0.1", 1883, url, tmp_path, **kw)


def test_command_topic_and_message():
    assert chirpstack.command_topic("app-1", DEV_A) == \
        f"application/app-1/device/{DEV_A}/command/down"
    doc = json.loads(chirpstack.command_message(DEV_A, 2, b"\x18\x01", item_id="i-1"))
    assert doc == {"id": "i-1", "devEui": DEV_A, "confirmed": False, "fPort": 2, "data": "GAE="}
