"""Ledger admission and consistency check against a real SQLite file, no HTTP.

Frames are built with meter.frame and signed with pycryptodome keys, exactly
as a meter would; the database is a temporary file reopened where durability
matters.
"""

from __future__ import annotations

import base64
import sqlite3
import threading

import pytest
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from ledger_node.admission import Admission, Rejected
from ledger_node.check import check_store
from ledger_node.store import Store, StoreError
from meter import frame

EUI = "70b3d57ed0000001"
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
INTERVAL = 900


class Meter:
    """A device with its own key that signs frames the way the firmware does."""

    def __init__(self, dev_eui: str = EUI):
        self.dev_eui = dev_eui
        self.key = ECC.generate(curve="Ed25519")
        self.public_key = self.key.public_key().export_key(format="raw")

    def frame(self, seq, import_dwh=None, export_dwh=0, t_end=None, flags=0, irms_ca=250,
              vrms_dv=2300, key=None, sign_as=None) -> bytes:
        body = frame.encode_body(
            seq=seq, t_end=T0 + INTERVAL * seq if t_end is None else t_end,
            interval_s=INTERVAL, import_dwh=1000 * seq if import_dwh is None else import_dwh,
            export_dwh=export_dwh, irms_ca=irms_ca, vrms_dv=vrms_dv, flags=flags)
        signer = eddsa.new(key or self.key, "rfc8032")
        eui = bytes.fromhex(sign_as or self.dev_eui)
        return frame.assemble(body, signer.sign(frame.signed_message(eui, body)))

    def item(self, seq=None, raw=None, **kw) -> dict:
        data = raw if raw is not None else self.frame(seq, **kw)
        return {"dev_eui": self.dev_eui, "frame": base64.b64encode(data).decode()}

    def enrollment(self, **extra) -> dict:
        return {"dev_eui": self.dev_eui, "public_key": self.public_key.hex(), **extra}


@pytest.fixture
def db(tmp_path):
    return tmp_path / "ledger.db"


@pytest.fixture
def store(db):
    with Store(db) as s:
        yield s


@pytest.fixture
def meter():
    return Meter()


@pytest.fixture
def adm(store, meter):
    a = Admission(store)
    a.enroll(meter.enrollment())
    return a


def statuses(results):
    return [(r.status, r.reason) for r in results]


# -- stored, duplicate, conflict ------------------------------------------

def test_valid_readings_are_stored_in_order_and_read_back(adm, store, meter):
    results = adm.admit([meter.item(s) for s in (1, 2, 3)])
    assert statuses(results) == [("stored", None)] * 3
    ids = [r.entry_id for r in results]
    assert ids == sorted(ids) and len(set(ids)) == 3

    rows = store.readings(EUI)
    assert [(r.seq, r.t_end, r.import_dwh, r.entry_id) for r in rows] == [
        (1, T0 + 900, 1000, ids[0]), (2, T0 + 1800, 2000, ids[1]), (3, T0 + 2700, 3000, ids[2])]
    assert rows[0].frame == meter.frame(1)  # the exact bytes, signature included


def test_identical_frame_again_is_a_duplicate_with_the_original_entry_id(adm, store, meter):
    first = adm.admit([meter.item(5)])[0]
    again = adm.admit([meter.item(5), meter.item(6), meter.item(6)])
    assert statuses(again) == [("duplicate", None), ("stored", None), ("duplicate", None)]
    assert again[0].entry_id == first.entry_id
    assert again[2].entry_id == again[1].entry_id
    assert len(store.readings(EUI)) == 2


def test_other_frame_with_a_stored_seq_is_a_conflict_and_keeps_the_original(adm, store, meter):
    adm.admit([meter.item(5, import_dwh=5000)])
    r = adm.admit([meter.item(5, import_dwh=5001)])[0]
    assert (r.status, r.reason, r.entry_id) == ("rejected", "conflict", None)
    assert "seq 5" in r.message
    assert [row.import_dwh for row in store.readings(EUI)] == [5000]


# -- signatures and devices ------------------------------------------------

def test_signature_by_another_key_is_rejected(adm, store, meter):
    intruder = ECC.generate(curve="Ed25519")
    r = adm.admit([meter.item(1, key=intruder)])[0]
    assert (r.status, r.reason) == ("rejected", "bad_signature")
    assert EUI in r.message
    assert store.readings() == []


def test_frame_replayed_under_another_eui_is_rejected(store):
    a, b = Meter("70b3d57ed0000001"), Meter("70b3d57ed0000002")
    adm = Admission(store)
    adm.enroll(a.enrollment())
    # Same key enrolled for both EUIs: only the signed EUI stops the replay.
    adm.enroll({"dev_eui": b.dev_eui, "public_key": a.public_key.hex()})
    replay = {"dev_eui": b.dev_eui, "frame": a.item(1)["frame"]}
    assert statuses(adm.admit([replay, a.item(1)])) == [("rejected", "bad_signature"),
                                                       ("stored", None)]


@pytest.mark.parametrize("offset", [1, 12, frame.BODY_LEN + 3, frame.READING_LEN - 1])
def test_any_flipped_bit_fails_verification(adm, meter, offset):
    data = bytearray(meter.frame(1))
    data[offset] ^= 0x01
    assert adm.admit([meter.item(raw=bytes(data))])[0].reason == "bad_signature"


def test_unknown_device_is_rejected(adm):
    stranger = Meter("0000000000000bad")
    r = adm.admit([stranger.item(1)])[0]
    assert (r.status, r.reason) == ("rejected", "unknown_device")
    assert "0000000000000bad" in r.message


def test_device_enrolled_later_is_admitted(adm, store):
    late = Meter("70b3d57ed00000ff")
    assert adm.admit([late.item(1)])[0].reason == "unknown_device"
    adm.enroll(late.enrollment())
    assert adm.admit([late.item(1)])[0].status == "stored"


# -- order of registers and time ---------------------------------------------

def test_import_register_going_backwards_is_rejected(adm, meter):
    adm.admit([meter.item(10, import_dwh=10_000)])
    r = adm.admit([meter.item(11, import_dwh=9_999)])[0]
    assert (r.status, r.reason) == ("rejected", "registers_backwards")
    assert "import_dwh 9999" in r.message and "seq 10" in r.message


def test_export_register_going_backwards_is_rejected(adm, meter):
    adm.admit([meter.item(10, import_dwh=0, export_dwh=500)])
    assert adm.admit([meter.item(11, import_dwh=0, export_dwh=499)])[0].reason == \
        "registers_backwards"


def test_late_reading_must_fit_between_its_neighbours(adm, store, meter):
    adm.admit([meter.item(10, import_dwh=10_000), meter.item(20, import_dwh=20_000)])
    too_high = adm.admit([meter.item(15, import_dwh=20_001)])[0]
    too_low = adm.admit([meter.item(15, import_dwh=9_999)])[0]
    assert too_high.reason == too_low.reason == "registers_backwards"
    assert "seq 20" in too_high.message and "seq 10" in too_low.message
    fits = adm.admit([meter.item(15, import_dwh=15_000)])[0]
    assert fits.status == "stored"
    assert [r.seq for r in store.readings(EUI)] == [10, 15, 20]


def test_equal_registers_are_allowed(adm, meter):
    results = adm.admit([meter.item(1, import_dwh=7), meter.item(2, import_dwh=7)])
    assert statuses(results) == [("stored", None)] * 2


def test_clock_going_backwards_is_rejected_unless_unsynced(adm, meter):
    adm.admit([meter.item(10, t_end=T0 + 9000)])
    r = adm.admit([meter.item(11, t_end=T0 + 8999)])[0]
    assert (r.status, r.reason) == ("rejected", "time_backwards")
    assert "seq 10" in r.message
    unsynced = adm.admit([meter.item(11, t_end=50_000, flags=frame.FLAG_CLOCK_UNSYNCED)])[0]
    assert unsynced.status == "stored"
    # The unsynced reading does not become the reference for later ones.
    assert adm.admit([meter.item(12, t_end=T0 + 9900)])[0].status == "stored"


# -- frames and items that are not readings ------------------------------------

@pytest.mark.parametrize("mutate,reason", [
    (lambda f: f[:-1], "truncated"),
    (lambda f: f[:frame.BODY_LEN], "truncated"),
    (lambda f: f + b"\x00", "oversized"),
    (lambda f: b"", "empty"),
    (lambda f: b"\x21" + f[1:], "version"),
    (lambda f: b"\x12" + f[1:], "type"),
])
def test_undecodable_frames_are_rejected_with_the_codec_reason(adm, store, meter, mutate,
                                                                reason):
    r = adm.admit([meter.item(raw=mutate(meter.frame(1)))])[0]
    assert (r.status, r.reason, r.entry_id) == ("rejected", reason, None)
    assert r.message.startswith("frame:")
    assert store.readings() == []


@pytest.mark.parametrize("item,field", [
    ("not an object", "item"),
    ({"frame": "AAAA"}, "dev_eui"),
    ({"dev_eui": EUI}, "frame"),
    ({"dev_eui": EUI[:-1], "frame": "AAAA"}, "dev_eui"),
    ({"dev_eui": "zz" * 8, "frame": "AAAA"}, "dev_eui"),
    ({"dev_eui": EUI[:12] + " 01 ", "frame": "AAAA"}, "dev_eui"),
    ({"dev_eui": 7, "frame": "AAAA"}, "dev_eui"),
    ({"dev_eui": EUI, "frame": "not base64!"}, "frame"),
    ({"dev_eui": EUI, "frame": 12345}, "frame"),
    ({"dev_eui": EUI, "frame": "AAAA", "received_at": "yesterday"}, "received_at"),
    ({"dev_eui": EUI, "frame": "AAAA", "received_at": True}, "received_at"),
    ({"dev_eui": EUI, "frame": "AAAA", "received_at": -1}, "received_at"),
    ({"dev_eui": EUI, "frame": "AAAA", "received_at": 10 ** 400}, "received_at"),
    ({"dev_eui": EUI, "frame": "AAAA", "received_at": float("inf")}, "received_at"),
    ({"dev_eui": EUI, "frame": "AAAA", "gateway": ["gw"]}, "gateway"),
])
def test_malformed_items_name_the_field(adm, item, field):
    r = adm.admit([item])[0]
    assert (r.status, r.reason) == ("rejected", "malformed")
    assert r.message.startswith(field + ":")


def test_one_bad_item_does_not_spoil_the_batch(adm, store, meter):
    results = adm.admit([meter.item(1), {"dev_eui": EUI}, meter.item(2)])
    assert statuses(results) == [("stored", None), ("rejected", "malformed"), ("stored", None)]
    assert [r.seq for r in store.readings(EUI)] == [1, 2]


def test_optional_context_is_stored_and_upper_case_eui_is_canonicalised(adm, store, meter):
    item = {**meter.item(1), "dev_eui": EUI.upper(), "received_at": T0 + 905.5,
            "gateway": "gw-roof", "rssi": -80}
    assert adm.admit([item])[0].status == "stored"
    (row,) = store.readings(EUI)
    assert (row.dev_eui, row.received_at, row.gateway) == (EUI, T0 + 905.5, "gw-roof")


def test_batch_must_be_a_list_of_at_most_1000(adm, meter):
    with pytest.raises(Rejected) as exc:
        adm.admit({"readings": []})
    assert exc.value.reason == "malformed"
    with pytest.raises(Rejected) as exc:
        adm.admit([meter.item(1)] * 1001)
    assert exc.value.reason == "too_many_items"
    assert len(adm.admit([meter.item(1)] * 1000)) == 1000


def test_every_outcome_is_counted_by_reason(adm, store, meter):
    adm.admit([meter.item(1), meter.item(1), meter.item(2, key=ECC.generate(curve="Ed25519")),
               {"dev_eui": EUI}, Meter("0000000000000bad").item(1)])
    adm.admit([meter.item(1, import_dwh=1)])
    assert store.counters() == {"stored": 1, "duplicate": 1, "rejected:bad_signature": 1,
                                "rejected:malformed": 1, "rejected:unknown_device": 1,
                                "rejected:conflict": 1}


def test_concurrent_batches_store_each_seq_once(adm, store, meter):
    items = [meter.item(s) for s in range(1, 41)]
    outcomes = []

    def worker(offset):
        outcomes.extend(adm.admit(items[offset:] + items[:offset]))

    threads = [threading.Thread(target=worker, args=(k * 10,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(r.status == "stored" for r in outcomes) == 40
    assert sum(r.status == "duplicate" for r in outcomes) == 120
    assert [r.seq for r in store.readings(EUI)] == list(range(1, 41))


# -- durability ------------------------------------------------------------------

def test_data_survives_close_and_reopen(db, meter):
    with Store(db) as s:
        adm = Admission(s)
        adm.enroll(meter.enrollment(community="north"))
        first = adm.admit([meter.item(1), meter.item(2)])
    with Store(db) as s:
        assert [d.community for d in s.devices()] == ["north"]
        assert [r.seq for r in s.readings(EUI)] == [1, 2]
        adm = Admission(s)
        again = adm.admit([meter.item(2), meter.item(3)])
        assert again[0].status == "duplicate" and again[0].entry_id == first[1].entry_id
        assert again[1].entry_id > first[1].entry_id
        assert s.counters()["stored"] == 3
        assert s.counters()["duplicate"] == 1
        assert check_store(s)["ok"]


def test_database_is_in_wal_mode(store, db):
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_store_refuses_what_is_not_a_ledger(tmp_path):
    with pytest.raises(StoreError, match="no ledger database"):
        Store(tmp_path / "missing.db", create=False)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        Store(junk)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not a ledger"):
        Store(other)
    newer = tmp_path / "newer.db"
    Store(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer"):
        Store(newer)


# -- enrollment ----------------------------------------------------------------

def test_enrollment_is_idempotent_and_refuses_another_key(store, meter):
    adm = Admission(store)
    first = adm.enroll(meter.enrollment(meter_model="SCT013-000", board="esp32"))
    assert first.created and first.device.public_key == meter.public_key
    same = adm.enroll(meter.enrollment())  # metadata left out is not compared
    assert not same.created and same.device.meter_model == "SCT013-000"
    with pytest.raises(Rejected) as exc:
        adm.enroll(Meter(EUI).enrollment())
    assert exc.value.reason == "key_conflict"
    with pytest.raises(Rejected) as exc:
        adm.enroll(meter.enrollment(board="rp2040"))
    assert exc.value.reason == "metadata_conflict" and "board" in exc.value.message
    assert [d.public_key for d in store.devices()] == [meter.public_key]


@pytest.mark.parametrize("body,field", [
    ({"public_key": "00" * 32}, "dev_eui"),
    ({"dev_eui": EUI}, "public_key"),
    ({"dev_eui": EUI, "public_key": "00" * 31}, "public_key"),
    ({"dev_eui": EUI, "public_key": "00" * 30 + " 00 "}, "public_key"),
    ({"dev_eui": EUI[:12] + " 01 ", "public_key": "00" * 32}, "dev_eui"),
    ({"dev_eui": EUI, "public_key": "ff" * 32}, "public_key"),  # not a curve point
    ({"dev_eui": EUI, "public_key": "00" * 32, "board": 3}, "board"),
    ([], "body"),
])
def test_malformed_enrollment_names_the_field(store, body, field):
    with pytest.raises(Rejected) as exc:
        Admission(store).enroll(body)
    assert exc.value.reason == "malformed"
    assert exc.value.message.startswith(field + ":")
    assert store.devices() == []


# -- consistency check -------------------------------------------------------

def _tamper(db, sql, *args):
    with sqlite3.connect(db) as conn:
        conn.execute(sql, args)
    conn.close()


def test_check_passes_on_admitted_data(adm, store, meter):
    adm.admit([meter.item(s) for s in range(1, 6)])
    report = check_store(store)
    assert report == {"ok": True, "readings": 5, "devices": 1, "problems": [],
                      "problems_total": 0}


def test_check_finds_edited_columns_and_frames(adm, store, db, meter):
    ids = [r.entry_id for r in adm.admit([meter.item(s) for s in range(1, 6)])]
    _tamper(db, "UPDATE readings SET import_dwh = 1 WHERE entry_id = ?", ids[1])
    forged = bytearray(meter.frame(4))
    forged[12] ^= 0x10  # inside import_dwh
    _tamper(db, "UPDATE readings SET frame = ? WHERE entry_id = ?", bytes(forged), ids[3])
    _tamper(db, "UPDATE readings SET frame = ? WHERE entry_id = ?", b"\x11\x00", ids[4])
    report = check_store(store)
    assert not report["ok"]
    found = {(p["kind"], p["entry_id"]) for p in report["problems"]}
    assert ("column_mismatch", ids[1]) in found
    assert ("bad_signature", ids[3]) in found
    assert ("undecodable", ids[4]) in found


def test_check_finds_order_violations_slipped_in_behind_admission(adm, store, db, meter):
    adm.admit([meter.item(1, import_dwh=100), meter.item(2, import_dwh=200)])
    # A correctly signed frame with a lower register, written around admission.
    sneaky = meter.frame(3, import_dwh=150, t_end=T0)
    _tamper(db, "INSERT INTO readings (dev_eui, seq, t_end, interval_s, import_dwh, "
                "export_dwh, irms_ca, vrms_dv, flags, frame, stored_at) "
                "VALUES (?, 3, ?, 900, 150, 0, 250, 2300, 0, ?, 0)", EUI, T0, sneaky)
    kinds = {p["kind"] for p in check_store(store)["problems"] if p["seq"] == 3}
    assert kinds == {"registers_backwards", "time_backwards"}


def test_check_finds_readings_of_devices_no_longer_enrolled(adm, store, db, meter):
    adm.admit([meter.item(1)])
    _tamper(db, "DELETE FROM devices")
    report = check_store(store)
    assert [p["kind"] for p in report["problems"]] == ["unknown_device"]
    assert report["devices"] == 0 and report["readings"] == 1
