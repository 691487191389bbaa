"""Ledger admission and consistency check against a real SQLite file, no HTTP.

Bundles are built with meter.frame and signed with pycryptodome keys, exactly
as a meter would; the database is a temporary file reopened where durability
matters. Expected values are written out from the readings each test signs
(or from tests/vectors/frames.json), never read back from the ledger's code.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

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
VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "frames.json").read_text())


def R(seq, import_dwh=None, export_dwh=0, t_end=None, flags=0) -> tuple:
    """A reading: by default every INTERVAL s, 100.0 Wh per interval."""
    return (seq, T0 + INTERVAL * seq if t_end is None else t_end,
            1000 * seq if import_dwh is None else import_dwh, export_dwh, flags)


class Meter:
    """A device with its own key that signs bundles the way the firmware does."""

    def __init__(self, dev_eui: str = EUI):
        self.dev_eui = dev_eui
        self.key = ECC.generate(curve="Ed25519")
        self.public_key = self.key.public_key().export_key(format="raw")

    def bundle(self, *readings, key=None, sign_as=None) -> bytes:
        """Readings are seqs (default values) or R(...) tuples."""
        rs = [R(r) if isinstance(r, int) else r for r in readings]
        body = frame.encode_body(rs)
        signer = eddsa.new(key or self.key, "rfc8032")
        eui = bytes.fromhex(sign_as or self.dev_eui)
        return frame.assemble(body, signer.sign(frame.signed_message(eui, body)))

    def item(self, *readings, raw=None, **kw) -> dict:
        data = raw if raw is not None else self.bundle(*readings, **kw)
        return {"dev_eui": self.dev_eui, "bundle": data.hex()}

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


def per_reading(result):
    return [(r.seq, r.status) for r in result.readings]


def bundle_rows(db):
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT bundle_id, first_seq, last_seq, data FROM bundles "
                            "ORDER BY bundle_id").fetchall()
    conn.close()
    return rows


# -- stored, duplicate, overlap, conflict ----------------------------------

def test_bundle_is_stored_once_and_each_reading_points_at_it(adm, store, db, meter):
    data = meter.bundle(1, 2, 3)
    (res,) = adm.admit([meter.item(raw=data)])
    assert (res.status, res.stored, res.duplicate) == ("ok", 3, 0)
    assert per_reading(res) == [(1, "stored"), (2, "stored"), (3, "stored")]
    ids = [r.entry_id for r in res.readings]
    assert ids == sorted(ids) and len(set(ids)) == 3

    rows = store.readings(EUI)
    assert [(r.seq, r.t_end, r.import_dwh, r.entry_id) for r in rows] == [
        (1, T0 + 900, 1000, ids[0]), (2, T0 + 1800, 2000, ids[1]), (3, T0 + 2700, 3000, ids[2])]
    assert {r.bundle_id for r in rows} == {res.bundle_id}
    assert all(r.bundle == data for r in rows)  # the exact bytes, signature included
    assert bundle_rows(db) == [(res.bundle_id, 1, 3, data)]


def test_the_same_bundle_again_is_all_duplicates_with_the_original_entries(adm, db, meter):
    first = adm.admit([meter.item(5, 6)])[0]
    again = adm.admit([meter.item(5, 6), meter.item(7), meter.item(7)])
    assert statuses(again) == [("ok", None)] * 3
    assert again[0].bundle_id is None and (again[0].stored, again[0].duplicate) == (0, 2)
    assert [r.entry_id for r in again[0].readings] == [r.entry_id for r in first.readings]
    assert per_reading(again[1]) == [(7, "stored")] and per_reading(again[2]) == [(7, "duplicate")]
    assert again[2].readings[0].entry_id == again[1].readings[0].entry_id
    assert len(bundle_rows(db)) == 2  # 5..6 and 7, each once


def test_partial_overlap_stores_only_the_new_readings(adm, store, db, meter):
    first = adm.admit([meter.item(1, 2, 3)])[0]
    # A meter that rebundled after a reboot: 3 again, 4 and 5 new.
    second = adm.admit([meter.item(3, 4, 5)])[0]
    assert second.status == "ok" and second.bundle_id not in (None, first.bundle_id)
    assert per_reading(second) == [(3, "duplicate"), (4, "stored"), (5, "stored")]
    assert second.readings[0].entry_id == first.readings[2].entry_id
    rows = {r.seq: r.bundle_id for r in store.readings(EUI)}
    assert rows == {1: first.bundle_id, 2: first.bundle_id, 3: first.bundle_id,
                    4: second.bundle_id, 5: second.bundle_id}
    assert [(b[1], b[2]) for b in bundle_rows(db)] == [(1, 3), (3, 5)]
    assert check_store(store)["ok"]


def test_stored_seq_with_other_values_is_a_conflict_and_nothing_of_the_bundle_enters(
        adm, store, db, meter):
    adm.admit([meter.item(R(5, import_dwh=5000))])
    r = adm.admit([meter.item(R(5, import_dwh=5001), R(6, import_dwh=6000))])[0]
    assert (r.status, r.reason, r.bundle_id, r.readings) == ("rejected", "conflict", None, ())
    assert "seq 5" in r.message
    assert [(row.seq, row.import_dwh) for row in store.readings(EUI)] == [(5, 5000)]
    assert len(bundle_rows(db)) == 1


# -- signatures and devices ------------------------------------------------

def test_signature_by_another_key_is_rejected(adm, store, meter):
    intruder = ECC.generate(curve="Ed25519")
    r = adm.admit([meter.item(1, 2, key=intruder)])[0]
    assert (r.status, r.reason) == ("rejected", "bad_signature")
    assert EUI in r.message and "1..2" in r.message
    assert store.readings() == []


def test_bundle_replayed_under_another_eui_is_rejected(store):
    a, b = Meter("70b3d57ed0000001"), Meter("70b3d57ed0000002")
    adm = Admission(store)
    adm.enroll(a.enrollment())
    # Same key enrolled for both EUIs: only the signed EUI stops the replay.
    adm.enroll({"dev_eui": b.dev_eui, "public_key": a.public_key.hex()})
    replay = {"dev_eui": b.dev_eui, "bundle": a.item(1)["bundle"]}
    assert statuses(adm.admit([replay, a.item(1)])) == [("rejected", "bad_signature"),
                                                       ("ok", None)]


# Offsets in a 3-reading bundle: import_dwh of the first reading, the flags of
# the second, its import delta, a signature byte.
@pytest.mark.parametrize("offset", [12, frame.HEAD_LEN, frame.HEAD_LEN + 3, -5])
def test_any_flipped_bit_fails_verification(adm, store, meter, offset):
    data = bytearray(meter.bundle(1, 2, 3))
    data[offset] ^= 0x01
    assert adm.admit([meter.item(raw=bytes(data))])[0].reason == "bad_signature"
    assert store.readings() == []


def test_unknown_device_is_rejected(adm):
    stranger = Meter("0000000000000bad")
    r = adm.admit([stranger.item(1)])[0]
    assert (r.status, r.reason) == ("rejected", "unknown_device")
    assert "0000000000000bad" in r.message


def test_device_enrolled_later_is_admitted(adm, store):
    late = Meter("70b3d57ed00000ff")
    assert adm.admit([late.item(1)])[0].reason == "unknown_device"
    adm.enroll(late.enrollment())
    assert adm.admit([late.item(1)])[0].status == "ok"


@pytest.mark.parametrize("vector", VECTORS["bundles"], ids=lambda b: b["name"])
def test_vector_bundles_are_admitted_with_the_vector_readings(store, vector):
    # Each vector is a device's history on its own (they reuse seqs).
    adm = Admission(store)
    adm.enroll({"dev_eui": VECTORS["dev_eui"], "public_key": VECTORS["public_key"]})
    (res,) = adm.admit([{"dev_eui": VECTORS["dev_eui"], "bundle": vector["hex"]}])
    assert (res.status, res.stored) == ("ok", len(vector["readings"]))
    stored = [{"seq": r.seq, "t_end": r.t_end, "import_dwh": r.import_dwh,
               "export_dwh": r.export_dwh, "flags": r.flags}
              for r in store.readings(VECTORS["dev_eui"])]
    assert stored == vector["readings"]
    assert {r.bundle for r in store.readings(VECTORS["dev_eui"])} == {bytes.fromhex(vector["hex"])}


# -- order of registers and time ---------------------------------------------

def test_import_register_going_backwards_is_rejected(adm, meter):
    adm.admit([meter.item(R(10, import_dwh=10_000))])
    r = adm.admit([meter.item(R(11, import_dwh=9_999))])[0]
    assert (r.status, r.reason) == ("rejected", "registers_backwards")
    assert "import_dwh 9999" in r.message and "seq 10" in r.message


def test_export_register_going_backwards_is_rejected(adm, meter):
    adm.admit([meter.item(R(10, import_dwh=0, export_dwh=500))])
    assert adm.admit([meter.item(R(11, import_dwh=0, export_dwh=499))])[0].reason == \
        "registers_backwards"


def test_late_bundle_must_fit_between_its_stored_neighbours(adm, store, db, meter):
    adm.admit([meter.item(R(10, import_dwh=10_000)), meter.item(R(20, import_dwh=20_000))])
    too_high = adm.admit([meter.item(R(15, import_dwh=15_000), R(16, import_dwh=20_001))])[0]
    too_low = adm.admit([meter.item(R(14, import_dwh=9_999), R(15, import_dwh=15_000))])[0]
    assert too_high.reason == too_low.reason == "registers_backwards"
    assert "seq 20" in too_high.message and "seq 10" in too_low.message
    # Refused as a whole: the readings that fitted were not kept either.
    assert [r.seq for r in store.readings(EUI)] == [10, 20]
    assert len(bundle_rows(db)) == 2
    fits = adm.admit([meter.item(R(15, import_dwh=15_000), R(16, import_dwh=16_000))])[0]
    assert fits.status == "ok" and fits.stored == 2
    assert [r.seq for r in store.readings(EUI)] == [10, 15, 16, 20]


def test_equal_registers_are_allowed(adm, meter):
    results = adm.admit([meter.item(R(1, import_dwh=7), R(2, import_dwh=7))])
    assert statuses(results) == [("ok", None)] and results[0].stored == 2


def test_clock_going_backwards_is_rejected_unless_unsynced(adm, meter):
    adm.admit([meter.item(R(10, t_end=T0 + 9000))])
    r = adm.admit([meter.item(R(11, t_end=T0 + 8999))])[0]
    assert (r.status, r.reason) == ("rejected", "time_backwards")
    assert "seq 10" in r.message
    unsynced = adm.admit([meter.item(R(11, t_end=50_000, flags=frame.FLAG_CLOCK_UNSYNCED))])[0]
    assert unsynced.status == "ok" and unsynced.stored == 1
    # The unsynced reading does not become the reference for later ones.
    assert adm.admit([meter.item(R(12, t_end=T0 + 9900))])[0].stored == 1


# -- bytes and items that are not bundles ------------------------------------

@pytest.mark.parametrize("case", [c for c in VECTORS["invalid_uplinks"]
                                  if not c["hex"].startswith("12")], ids=lambda c: c["name"])
def test_undecodable_bundles_are_rejected_with_the_codec_reason(store, case):
    adm = Admission(store)
    adm.enroll({"dev_eui": VECTORS["dev_eui"], "public_key": VECTORS["public_key"]})
    r = adm.admit([{"dev_eui": VECTORS["dev_eui"], "bundle": case["hex"]}])[0]
    assert (r.status, r.reason, r.bundle_id) == ("rejected", case["reason"], None)
    assert r.message.startswith("bundle:")
    assert store.readings() == []


def test_a_fragment_is_not_a_bundle(adm, meter):
    piece = frame.fragment(meter.bundle(1, 2, 3), 51)[0]
    r = adm.admit([meter.item(raw=piece)])[0]
    assert (r.status, r.reason) == ("rejected", "type")


@pytest.mark.parametrize("item,field", [
    ("not an object", "item"),
    ({"bundle": "11"}, "dev_eui"),
    ({"dev_eui": EUI}, "bundle"),
    ({"dev_eui": EUI[:-1], "bundle": "11"}, "dev_eui"),
    ({"dev_eui": "zz" * 8, "bundle": "11"}, "dev_eui"),
    ({"dev_eui": EUI[:12] + " 01 ", "bundle": "11"}, "dev_eui"),
    ({"dev_eui": 7, "bundle": "11"}, "dev_eui"),
    ({"dev_eui": EUI, "bundle": "not hex!"}, "bundle"),
    ({"dev_eui": EUI, "bundle": "110"}, "bundle"),
    ({"dev_eui": EUI, "bundle": "11 03"}, "bundle"),
    ({"dev_eui": EUI, "bundle": 12345}, "bundle"),
    ({"dev_eui": EUI, "bundle": "11", "received_at": "yesterday"}, "received_at"),
    ({"dev_eui": EUI, "bundle": "11", "received_at": True}, "received_at"),
    ({"dev_eui": EUI, "bundle": "11", "received_at": -1}, "received_at"),
    ({"dev_eui": EUI, "bundle": "11", "received_at": 10 ** 400}, "received_at"),
    ({"dev_eui": EUI, "bundle": "11", "received_at": float("inf")}, "received_at"),
    ({"dev_eui": EUI, "bundle": "11", "gateway": ["gw"]}, "gateway"),
])
def test_malformed_items_name_the_field(adm, item, field):
    r = adm.admit([item])[0]
    assert (r.status, r.reason) == ("rejected", "malformed")
    assert r.message.startswith(field + ":")


def test_one_bad_item_does_not_spoil_the_batch(adm, store, meter):
    results = adm.admit([meter.item(1), {"dev_eui": EUI}, meter.item(2, 3)])
    assert statuses(results) == [("ok", None), ("rejected", "malformed"), ("ok", None)]
    assert [r.seq for r in store.readings(EUI)] == [1, 2, 3]


def test_one_refused_bundle_does_not_spoil_the_others_of_its_batch(adm, store, meter):
    results = adm.admit([meter.item(R(1, import_dwh=100), R(2, import_dwh=200)),
                         meter.item(R(3, import_dwh=150), R(4, import_dwh=400)),
                         meter.item(R(5, import_dwh=500))])
    assert statuses(results) == [("ok", None), ("rejected", "registers_backwards"),
                                 ("ok", None)]
    assert [r.seq for r in store.readings(EUI)] == [1, 2, 5]


def test_optional_context_is_stored_with_the_bundle(adm, store, meter):
    item = {**meter.item(1, 2), "dev_eui": EUI.upper(), "received_at": T0 + 905.5,
            "gateway": "gw-roof", "rssi": -80}
    assert adm.admit([item])[0].status == "ok"
    rows = store.readings(EUI)
    assert [(r.dev_eui, r.received_at, r.gateway) for r in rows] == [
        (EUI, T0 + 905.5, "gw-roof")] * 2


def test_batch_must_be_a_list_of_at_most_1000(adm, meter):
    with pytest.raises(Rejected) as exc:
        adm.admit({"bundles": []})
    assert exc.value.reason == "malformed"
    with pytest.raises(Rejected) as exc:
        adm.admit([meter.item(1)] * 1001)
    assert exc.value.reason == "too_many_items"
    assert len(adm.admit([meter.item(1)] * 1000)) == 1000


def test_every_outcome_is_counted(adm, store, meter):
    adm.admit([meter.item(1, 2), meter.item(2, 3), meter.item(4, key=ECC.generate(curve="Ed25519")),
               {"dev_eui": EUI}, Meter("0000000000000bad").item(1)])
    adm.admit([meter.item(R(1, import_dwh=1))])
    # Readings stored 1, 2, 3; duplicate 2; bundles stored 2; one of each refusal.
    assert store.counters() == {"stored": 3, "duplicate": 1, "bundles": 2,
                                "rejected:bad_signature": 1, "rejected:malformed": 1,
                                "rejected:unknown_device": 1, "rejected:conflict": 1}


def test_concurrent_batches_store_each_seq_once(adm, store, meter):
    items = [meter.item(s, s + 1) for s in range(1, 41, 2)]  # 20 bundles, seqs 1..40
    outcomes = []

    def worker(offset):
        outcomes.extend(adm.admit(items[offset:] + items[:offset]))

    threads = [threading.Thread(target=worker, args=(k * 5,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(r.stored for r in outcomes) == 40
    assert sum(r.duplicate for r in outcomes) == 120
    assert sum(r.bundle_id is not None for r in outcomes) == 20
    assert [r.seq for r in store.readings(EUI)] == list(range(1, 41))


# -- durability ------------------------------------------------------------------

def test_data_survives_close_and_reopen(db, meter):
    with Store(db) as s:
        adm = Admission(s)
        adm.enroll(meter.enrollment(community="north"))
        first = adm.admit([meter.item(1, 2)])[0]
    with Store(db) as s:
        assert [d.community for d in s.devices()] == ["north"]
        assert [r.seq for r in s.readings(EUI)] == [1, 2]
        adm = Admission(s)
        again = adm.admit([meter.item(2, 3)])[0]
        assert per_reading(again) == [(2, "duplicate"), (3, "stored")]
        assert again.readings[0].entry_id == first.readings[1].entry_id
        assert again.readings[1].entry_id > first.readings[1].entry_id
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


def test_store_refuses_a_ledger_of_single_reading_frames(tmp_path):
    old = tmp_path / "v1.db"
    with sqlite3.connect(old) as conn:
        conn.execute("CREATE TABLE readings (entry_id INTEGER PRIMARY KEY, frame BLOB)")
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    with pytest.raises(StoreError, match="single-reading frame"):
        Store(old)


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
    adm.admit([meter.item(1, 2, 3), meter.item(3, 4, 5), meter.item(6)])
    report = check_store(store)
    assert report == {"ok": True, "bundles": 3, "readings": 6, "devices": 1, "problems": [],
                      "problems_total": 0}


def test_check_finds_edited_columns_and_bundles(adm, store, db, meter):
    res = adm.admit([meter.item(1, 2), meter.item(3, 4), meter.item(5), meter.item(6)])
    entry_2 = res[0].readings[1].entry_id
    _tamper(db, "UPDATE readings SET import_dwh = 1 WHERE entry_id = ?", entry_2)
    forged = bytearray(meter.bundle(3, 4))
    forged[12] ^= 0x10  # inside import_dwh of seq 3
    _tamper(db, "UPDATE bundles SET data = ? WHERE bundle_id = ?", bytes(forged),
            res[1].bundle_id)
    _tamper(db, "UPDATE bundles SET data = ? WHERE bundle_id = ?", b"\x11\x00", res[2].bundle_id)
    _tamper(db, "UPDATE bundles SET last_seq = 7 WHERE bundle_id = ?", res[3].bundle_id)
    report = check_store(store)
    assert not report["ok"]
    found = {(p["kind"], p["bundle_id"], p["entry_id"]) for p in report["problems"]}
    assert found == {("column_mismatch", res[0].bundle_id, entry_2),
                     ("bad_signature", res[1].bundle_id, None),
                     ("undecodable", res[2].bundle_id, None),
                     ("column_mismatch", res[3].bundle_id, None)}


def test_check_finds_readings_the_bundles_do_not_prove(adm, store, db, meter):
    res = adm.admit([meter.item(1, 2), meter.item(3)])
    # A row moved to a bundle that does not hold its seq, a row whose bundle
    # is gone, and a bundle no row refers to any more.
    _tamper(db, "UPDATE readings SET bundle_id = ? WHERE seq = 3", res[0].bundle_id)
    _tamper(db, "INSERT INTO readings (dev_eui, seq, t_end, import_dwh, export_dwh, flags, "
                "bundle_id, stored_at) VALUES (?, 9, ?, 9000, 0, 0, 999, 0)", EUI, T0 + 8100)
    kinds = sorted((p["kind"], p["seq"], p["bundle_id"]) for p in check_store(store)["problems"])
    assert kinds == [("missing_bundle", 9, 999), ("not_in_bundle", 3, res[0].bundle_id),
                     ("unreferenced_bundle", None, res[1].bundle_id)]


def test_check_finds_order_violations_slipped_in_behind_admission(adm, store, db, meter):
    adm.admit([meter.item(R(1, import_dwh=100), R(2, import_dwh=200))])
    # A correctly signed bundle with a lower register, written around admission.
    sneaky = meter.bundle(R(3, import_dwh=150, t_end=T0))
    with sqlite3.connect(db) as conn:
        bid = conn.execute("INSERT INTO bundles (dev_eui, first_seq, last_seq, data, stored_at) "
                           "VALUES (?, 3, 3, ?, 0)", (EUI, sneaky)).lastrowid
        conn.execute("INSERT INTO readings (dev_eui, seq, t_end, import_dwh, export_dwh, flags, "
                     "bundle_id, stored_at) VALUES (?, 3, ?, 150, 0, 0, ?, 0)", (EUI, T0, bid))
    conn.close()
    kinds = {p["kind"] for p in check_store(store)["problems"] if p["seq"] == 3}
    assert kinds == {"registers_backwards", "time_backwards"}


def test_check_finds_bundles_of_devices_no_longer_enrolled(adm, store, db, meter):
    adm.admit([meter.item(1, 2)])
    _tamper(db, "DELETE FROM devices")
    report = check_store(store)
    assert [p["kind"] for p in report["problems"]] == ["unknown_device"]
    assert (report["devices"], report["bundles"], report["readings"]) == (0, 1, 2)
