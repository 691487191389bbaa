"""Admission (ledger_node.admission) and the log it appends to (ledger_node.log), no HTTP.

A real SQLite file under a real Log, reopened where durability matters.
Bundles are built with meter.frame and signed with PyNaCl keys as a meter
signs them. Expected entry bytes are assembled from the layout of the design
(type 0x01, the DevEUI, the meter's bytes); expected roots are recomputed
here with hashlib and merkle.root_of (the plain recursive definition, not
the Frontier the log keeps); expected readings are the ones each test signs
or the published vectors (tests/vectors/frames.json).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import struct
import threading
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from ledger_node import checkpoint as ckpt
from ledger_node import merkle, note
from ledger_node.admission import Admission, Rejected
from ledger_node.log import Log, LogHalted
from ledger_node.store import Store
from meter import frame

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
NOW = T0 + 86_400
OWNER = "5e3f1c0a9b8d7e6f"
SKEY, VKEY = note.generate_key("ledger.test/unit")
VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "frames.json").read_text())
UNSYNCED = frame.FLAG_CLOCK_UNSYNCED


def R(seq: int, import_dwh: int | None = None, t_end: int | None = None, flags: int = 0,
      export_dwh: int = 0) -> tuple:
    """A reading: by default every 900 s, 100.0 Wh (1000 dWh) per interval."""
    return (seq, T0 + 900 * seq if t_end is None else t_end,
            1000 * seq if import_dwh is None else import_dwh, export_dwh, flags)


def leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


class Meter:
    def __init__(self, dev_eui: str, seed: int):
        self.dev_eui = dev_eui
        self.eui = bytes.fromhex(dev_eui)
        self.key = SigningKey(bytes([seed]) * 32)
        self.public_key = bytes(self.key.verify_key)

    def bundle(self, *readings, key: SigningKey | None = None) -> bytes:
        """Readings are seqs (default values) or R(...) tuples."""
        body = frame.encode_body([R(r) if isinstance(r, int) else r for r in readings])
        sig = (key or self.key).sign(frame.signed_message(self.eui, body)).signature
        return frame.assemble(body, sig)

    def item(self, *readings, raw: bytes | None = None, **kw) -> dict:
        return {"dev_eui": self.dev_eui,
                "bundle": (raw if raw is not None else self.bundle(*readings, **kw)).hex()}

    def entry(self, *readings, **kw) -> bytes:
        return b"\x01" + self.eui + self.bundle(*readings, **kw)

    def enrollment(self, **over) -> dict:
        return {"dev_eui": self.dev_eui, "public_key": self.public_key.hex(), "owner": OWNER,
                "community": "north", **over}


M1 = Meter("70b3d57ed0000001", 1)
M2 = Meter("70b3d57ed0000002", 2)
NEW_KEY = SigningKey(bytes([41]) * 32)
INTRUDER = SigningKey(bytes([99]) * 32)


def open_log(db) -> tuple[Store, Log]:
    store = Store(db)
    return store, Log(store, note.Signer(SKEY), clock=lambda: NOW)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "ledger.db"


@pytest.fixture
def opened(db):
    logs = []

    def opener():
        store, lg = open_log(db)
        logs.append((store, lg))
        return store, lg

    yield opener
    for store, lg in logs:
        lg.stop()
        store.close()


@pytest.fixture
def log(opened):
    return opened()[1]


@pytest.fixture
def adm(log):
    a = Admission(log, clock=lambda: NOW)
    assert a.enroll(M1.enrollment()).entry == 0
    return a


def outcome(results) -> list[tuple]:
    return [(r.status, r.reason) for r in results]


def readings_of(result) -> dict:
    return {r.seq: (r.status, r.entry) for r in result.readings}


def stored_entries(log: Log) -> list[bytes]:
    with log.store.reader() as r:
        return [d for _, d in r.entries(0, log.size)]


def index_of(log: Log, m: Meter) -> dict:
    """seq -> (t_end, import_dwh, export_dwh, flags, entry) from the readings index."""
    with log.store.reader() as r:
        return {x.seq: (x.t_end, x.import_dwh, x.export_dwh, x.flags, x.entry)
                for dev, x in r.iter_index() if dev == m.eui}


def counters(log: Log) -> dict:
    with log.store.reader() as r:
        return r.counters()


# -- what enters the log ---------------------------------------------------------------


def test_an_admitted_bundle_is_one_entry_of_the_meters_bytes(adm, log):
    (res,) = adm.admit([M1.item(1, 2, 3)])
    assert (res.status, res.entry, res.stored, res.duplicate) == ("ok", 1, 3, 0)
    assert readings_of(res) == {1: ("stored", 1), 2: ("stored", 1), 3: ("stored", 1)}
    enroll = (struct.pack(">B8s32sIH", 2, M1.eui, M1.public_key, NOW, 100)
              + b"\x00" + b"\x00" + b"\x05north" + b"\x10" + OWNER.encode())
    assert stored_entries(log) == [enroll, M1.entry(1, 2, 3)]
    assert index_of(log, M1) == {s: (T0 + 900 * s, 1000 * s, 0, 0, 1) for s in (1, 2, 3)}


@pytest.mark.parametrize("vector", VECTORS["bundles"], ids=lambda b: b["name"])
def test_the_published_vectors_are_admitted_with_their_readings(log, vector):
    # Each vector is a device's history on its own (they reuse seqs).
    adm = Admission(log, clock=lambda: NOW)
    adm.enroll({"dev_eui": VECTORS["dev_eui"], "public_key": VECTORS["public_key"],
                "owner": OWNER, "community": "north"})
    (res,) = adm.admit([{"dev_eui": VECTORS["dev_eui"], "bundle": vector["hex"]}])
    assert (res.status, res.entry, res.stored) == ("ok", 1, len(vector["readings"]))
    want = {r["seq"]: (r["t_end"], r["import_dwh"], r["export_dwh"], r["flags"], 1)
            for r in vector["readings"]}
    with log.store.reader() as r:
        got = {x.seq: (x.t_end, x.import_dwh, x.export_dwh, x.flags, x.entry)
               for _, x in r.iter_index()}
        assert r.entry(1) == b"\x01" + bytes.fromhex(VECTORS["dev_eui"] + vector["hex"])
    assert got == want


def test_received_at_and_gateway_are_kept_beside_the_entry(adm, log):
    item = {**M1.item(1, 2), "dev_eui": M1.dev_eui.upper(), "received_at": T0 + 905.5,
            "gateway": "gw-roof", "rssi": -80}
    assert outcome(adm.admit([item])) == [("ok", None)]
    with log.store.reader() as r:
        rows = r.readings(M1.eui)
    assert [(x.dev_eui, x.seq, x.received_ms, x.gateway) for x in rows] == [
        (M1.eui, 1, (T0 + 905) * 1000 + 500, "gw-roof"), (M1.eui, 2, (T0 + 905) * 1000 + 500,
                                                          "gw-roof")]
    # Outside the signed data, so outside the entry.
    assert stored_entries(log)[1] == M1.entry(1, 2)


# -- duplicates, overlaps, conflicts ---------------------------------------------------


def test_the_same_bundle_again_appends_nothing_and_points_at_the_original(adm, log):
    first = adm.admit([M1.item(5, 6)])[0]
    again = adm.admit([M1.item(5, 6), M1.item(7), M1.item(7)])
    assert outcome(again) == [("ok", None)] * 3
    assert (again[0].entry, again[0].stored, again[0].duplicate) == (None, 0, 2)
    assert readings_of(again[0]) == {5: ("duplicate", first.entry), 6: ("duplicate", first.entry)}
    # The same bundle twice in one batch: the second finds the first.
    assert readings_of(again[1]) == {7: ("stored", 2)}
    assert again[2].entry is None and readings_of(again[2]) == {7: ("duplicate", 2)}
    assert log.size == 3


def test_a_partly_duplicate_bundle_appends_an_entry_for_its_new_readings(adm, log):
    first = adm.admit([M1.item(1, 2, 3)])[0]
    # A meter that rebundled after a reboot: 2 and 3 again, 4 and 5 new.
    second = adm.admit([M1.item(2, 3, 4, 5)])[0]
    assert (second.status, second.entry, second.stored, second.duplicate) == ("ok", 2, 2, 2)
    assert readings_of(second) == {2: ("duplicate", 1), 3: ("duplicate", 1), 4: ("stored", 2),
                                   5: ("stored", 2)}
    # The entry is the meter's bundle whole (its signature covers all four);
    # the index keeps pointing at the first entry that logged a seq.
    assert stored_entries(log)[2] == M1.entry(2, 3, 4, 5)
    assert {s: v[4] for s, v in index_of(log, M1).items()} == {1: first.entry, 2: 1, 3: 1,
                                                               4: 2, 5: 2}


def test_a_logged_seq_with_other_values_is_a_conflict_and_nothing_enters(adm, log):
    adm.admit([M1.item(1, 2, 3)])
    for values in (R(3, import_dwh=3001), R(3, t_end=T0 + 2701), R(3, flags=0x01),
                   R(3, export_dwh=1)):
        (res,) = adm.admit([M1.item(values, R(4, export_dwh=values[3]))])
        assert (res.status, res.reason, res.entry) == ("rejected", "conflict", None)
        assert "seq 3" in res.message and "entry 1" in res.message
    assert log.size == 2 and 4 not in index_of(log, M1)


# -- order rules, out-of-order arrival ---------------------------------------------------


def test_a_late_bundle_fills_a_gap_only_where_it_fits(adm, log):
    assert outcome(adm.admit([M1.item(1), M1.item(10)])) == [("ok", None)] * 2
    # Between 1 (1000 dWh, T0+900) and 10 (10000 dWh, T0+9000).
    assert outcome(adm.admit([M1.item(R(4, import_dwh=10_001))])) == [
        ("rejected", "registers_backwards")]
    assert outcome(adm.admit([M1.item(R(4, import_dwh=999))])) == [
        ("rejected", "registers_backwards")]
    assert outcome(adm.admit([M1.item(R(4, export_dwh=1))])) == [
        ("rejected", "registers_backwards")]
    assert outcome(adm.admit([M1.item(R(4, t_end=T0 + 9001))])) == [
        ("rejected", "time_backwards")]
    assert outcome(adm.admit([M1.item(R(4, t_end=T0 + 899))])) == [
        ("rejected", "time_backwards")]
    # Equal to a neighbour is not backwards.
    results = adm.admit([M1.item(R(4, import_dwh=1000, t_end=T0 + 9000)),
                         M1.item(R(5, import_dwh=10_000, t_end=T0 + 9000))])
    assert [(r.status, r.entry) for r in results] == [("ok", 3), ("ok", 4)]
    # What filled the gap is now the neighbour of what comes later into it:
    # seq 4 holds 1000 dWh, so seq 3 can not hold more.
    assert outcome(adm.admit([M1.item(R(3, import_dwh=1001))])) == [
        ("rejected", "registers_backwards")]
    assert outcome(adm.admit([M1.item(R(3, import_dwh=1000))])) == [("ok", None)]
    assert outcome(adm.admit([M1.item(R(6, import_dwh=9_999))])) == [
        ("rejected", "registers_backwards")]
    assert sorted(index_of(log, M1)) == [1, 3, 4, 5, 10]


def test_a_rejected_reading_names_its_neighbour(adm):
    adm.admit([M1.item(R(10, t_end=T0 + 9000))])
    (res,) = adm.admit([M1.item(R(11, t_end=T0 + 8999))])
    assert res.reason == "time_backwards"
    assert "seq 10" in res.message and "entry 1" in res.message


def test_unsynced_readings_are_left_out_of_the_time_order(adm, log):
    adm.admit([M1.item(1), M1.item(R(2, t_end=50, flags=UNSYNCED)),
               M1.item(R(3, t_end=40, flags=UNSYNCED)), M1.item(5)])
    assert sorted(index_of(log, M1)) == [1, 2, 3, 5]
    # A synced reading is compared with the nearest synced ones (1 and 5), not
    # with the free-running stamps of 2 and 3 beside it.
    assert outcome(adm.admit([M1.item(R(4, t_end=T0 + 800))])) == [("rejected", "time_backwards")]
    assert outcome(adm.admit([M1.item(R(4, t_end=T0 + 4501))])) == [
        ("rejected", "time_backwards")]
    assert outcome(adm.admit([M1.item(R(4, t_end=T0 + 1000))])) == [("ok", None)]
    # Their registers still count: they are measurements, whatever the clock.
    assert outcome(adm.admit([M1.item(R(6, import_dwh=4999, flags=UNSYNCED))])) == [
        ("rejected", "registers_backwards")]
    assert outcome(adm.admit([M1.item(R(6, t_end=7, flags=UNSYNCED))])) == [("ok", None)]


# -- batches and counters ----------------------------------------------------------------


def test_a_batch_mixing_good_and_bad_items(adm, log):
    assert adm.enroll(M2.enrollment()).entry == 1
    results = adm.admit([
        M1.item(1, 2),  # entry 2
        {"dev_eui": M1.dev_eui},  # malformed: decided before the transaction
        M1.item(R(2, import_dwh=1), 3),  # conflict with the first item
        M1.item(3, key=INTRUDER),  # bad signature
        M2.item(1),  # entry 3
        M1.item(2, 3),  # entry 4, 2 duplicate of the first item
        Meter("00000000000000ff", 7).item(1),  # unknown device
        M1.item(R(4, import_dwh=10)),  # below seq 3 of the previous item
    ])
    assert outcome(results) == [("ok", None), ("rejected", "malformed"), ("rejected", "conflict"),
                                ("rejected", "bad_signature"), ("ok", None), ("ok", None),
                                ("rejected", "unknown_device"),
                                ("rejected", "registers_backwards")]
    assert [r.entry for r in results] == [2, None, None, None, 3, 4, None, None]
    assert readings_of(results[5]) == {2: ("duplicate", 2), 3: ("stored", 4)}
    assert stored_entries(log)[2:] == [M1.entry(1, 2), M2.entry(1), M1.entry(2, 3)]
    assert counters(log) == {"entries": 3, "stored": 4, "duplicate": 1,
                             "rejected:malformed": 1, "rejected:conflict": 1,
                             "rejected:bad_signature": 1, "rejected:unknown_device": 1,
                             "rejected:registers_backwards": 1}
    # A batch refused item by item is counted all the same.
    adm.admit([{"dev_eui": "xx"}, M1.item(1, 2)])
    assert counters(log)["rejected:malformed"] == 2 and counters(log)["duplicate"] == 3


@pytest.mark.parametrize("item, field", [
    ("not an object", "item"),
    ({"bundle": "11"}, "dev_eui"),
    ({"dev_eui": M1.dev_eui}, "bundle"),
    ({"dev_eui": M1.dev_eui[:-1], "bundle": "11"}, "dev_eui"),
    ({"dev_eui": M1.dev_eui[:12] + " 01 ", "bundle": "11"}, "dev_eui"),
    ({"dev_eui": 7, "bundle": "11"}, "dev_eui"),
    ({"dev_eui": M1.dev_eui, "bundle": "11 03"}, "bundle"),
    ({"dev_eui": M1.dev_eui, "bundle": "110"}, "bundle"),
    ({"dev_eui": M1.dev_eui, "bundle": 12345}, "bundle"),
    ({"dev_eui": M1.dev_eui, "bundle": "11", "received_at": "yesterday"}, "received_at"),
    ({"dev_eui": M1.dev_eui, "bundle": "11", "received_at": True}, "received_at"),
    ({"dev_eui": M1.dev_eui, "bundle": "11", "received_at": -1}, "received_at"),
    ({"dev_eui": M1.dev_eui, "bundle": "11", "received_at": 10 ** 400}, "received_at"),
    ({"dev_eui": M1.dev_eui, "bundle": "11", "gateway": ["gw"]}, "gateway"),
    ({"dev_eui": M1.dev_eui, "bundle": "11", "gateway": "g" * 201}, "gateway"),
    ({"dev_eui": M1.dev_eui, "bundle": "11", "gateway": "gw-\ud800"}, "gateway"),
])
def test_a_malformed_item_names_its_field(adm, log, item, field):
    (res,) = adm.admit([item])
    assert (res.status, res.reason) == ("rejected", "malformed")
    assert res.message.startswith(field + ":"), res.message
    assert log.size == 1


@pytest.mark.parametrize("case", [c for c in VECTORS["invalid_uplinks"]
                                  if not c["hex"].startswith("12")], ids=lambda c: c["name"])
def test_bytes_that_are_not_a_bundle_get_the_codecs_reason(adm, case):
    (res,) = adm.admit([{"dev_eui": M1.dev_eui, "bundle": case["hex"]}])
    assert (res.status, res.reason) == ("rejected", case["reason"])
    assert res.message.startswith("bundle:")


@pytest.mark.parametrize("offset", [0, 1, 20, 40, -64, -1])
def test_any_flipped_bit_is_refused(adm, offset):
    data = bytearray(M1.bundle(1, 2))
    data[offset] ^= 0x04
    (res,) = adm.admit([M1.item(raw=bytes(data))])
    assert res.status == "rejected" and res.entry is None


def test_the_batch_itself_must_be_a_list_of_at_most_1000(adm):
    with pytest.raises(Rejected) as exc:
        adm.admit({"bundles": []})
    assert exc.value.reason == "malformed"
    with pytest.raises(Rejected) as exc:
        adm.admit([M1.item(1)] * 1001)
    assert exc.value.reason == "too_many_items"
    assert len(adm.admit([M1.item(1)] * 1000)) == 1000


def test_concurrent_batches_log_each_seq_once(adm, log):
    items = [M1.item(s, s + 1) for s in range(1, 41, 2)]  # 20 bundles, seqs 1..40
    outcomes = []

    def worker(offset):
        outcomes.extend(adm.admit(items[offset:] + items[:offset]))

    threads = [threading.Thread(target=worker, args=(k * 5,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(outcomes) == 80
    assert sum(r.stored for r in outcomes) == 40 and sum(r.duplicate for r in outcomes) == 120
    assert sum(r.entry is not None for r in outcomes) == 20
    assert sorted(index_of(log, M1)) == list(range(1, 41))
    assert log.size == 21


# -- the registry through admission -----------------------------------------------------


def test_enrollment_is_idempotent_and_never_changes(adm, log):
    again = adm.enroll(M1.enrollment())
    assert (again.created, again.entry) == (False, None)
    for over, reason in [({"public_key": M2.public_key.hex()}, "key_conflict"),
                         ({"community": "south"}, "metadata_conflict"),
                         ({"owner": "5e3f1c0a9b8d7e6e"}, "metadata_conflict")]:
        with pytest.raises(Rejected) as exc:
            adm.enroll(M1.enrollment(**over))
        assert exc.value.reason == reason
    assert log.size == 1


def test_rotation_and_revocation_decide_which_key_verifies(adm, log):
    adm.admit([M1.item(1, 2)])
    change = adm.rotate(M1.dev_eui, {"public_key": bytes(NEW_KEY.verify_key).hex()})
    assert change.entry == 2
    assert [k["from_seq"] for k in change.device["keys"]] == [0, 3]
    assert outcome(adm.admit([M1.item(3), M1.item(3, key=NEW_KEY), M1.item(1, 2),
                              M1.item(4, 5, key=NEW_KEY)])) == [
        ("rejected", "bad_signature"), ("ok", None), ("ok", None), ("ok", None)]
    # By default a rotation begins past the highest seq logged: 6.
    change = adm.rotate(M1.dev_eui, {"public_key": M2.public_key.hex()})
    assert change.device["keys"][-1]["from_seq"] == 6
    assert outcome(adm.admit([M1.item(5, 6, key=NEW_KEY)])) == [("rejected", "straddles_rotation")]
    adm.revoke(M1.dev_eui, {"reason": "replaced"})
    assert outcome(adm.admit([M1.item(6, key=M2.key), M1.item(1, 2)])) == [
        ("rejected", "revoked_device"), ("rejected", "revoked_device")]
    with pytest.raises(Rejected) as exc:
        adm.enroll(M1.enrollment())
    assert exc.value.reason == "revoked_device"


# -- the tree -----------------------------------------------------------------------------


def test_size_and_root_are_those_of_the_stored_entries(adm, log):
    assert (log.size, log.root) == (1, merkle.root_of([leaf(stored_entries(log)[0])]))
    for k in range(1, 40, 3):
        adm.admit([M1.item(k, k + 1), M1.item(k + 2)])
        data = stored_entries(log)
        assert log.size == len(data)
        assert log.root == merkle.root_of([leaf(d) for d in data])
    assert log.size == 27
    # Proofs read from the hash pages agree with the plain definition.
    data = stored_entries(log)
    root = merkle.root_of([leaf(d) for d in data])
    for i in (0, 13, 26):
        merkle.check_inclusion(log.prove_inclusion(i, 27), i, 27, leaf(data[i]), root)
    old = merkle.root_of([leaf(d) for d in data[:11]])
    merkle.check_consistency(log.prove_consistency(11, 27), 11, 27, old, root)


def test_a_reopened_log_has_the_same_tree_registry_and_seqs(db, opened):
    store, lg = opened()
    adm = Admission(lg, clock=lambda: NOW)
    adm.enroll(M1.enrollment())
    adm.rotate(M1.dev_eui, {"public_key": bytes(NEW_KEY.verify_key).hex(), "from_seq": 200})
    # Enough entries for the stored hashes to fill more than one hash page.
    adm.admit([M1.item(s) for s in range(1, 160)])
    size, root = lg.size, lg.root
    assert size == 161 and merkle.stored_hash_count(size) > 256
    lg.stop()
    store.close()

    store, lg = opened()
    assert (lg.size, lg.root) == (size, root)
    assert root == merkle.root_of([leaf(d) for d in stored_entries(lg)])
    adm = Admission(lg, clock=lambda: NOW)
    # The registry was replayed: the rotation at 200 holds, seq 159 is known.
    assert outcome(adm.admit([M1.item(159), M1.item(200), M1.item(R(160, import_dwh=1))])) == [
        ("ok", None), ("rejected", "bad_signature"), ("rejected", "registers_backwards")]
    assert outcome(adm.admit([M1.item(200, key=NEW_KEY)])) == [("ok", None)]
    assert adm.rotate(M1.dev_eui, {"public_key": M2.public_key.hex()}).device["keys"][-1][
        "from_seq"] == 201
    assert lg.root == merkle.root_of([leaf(d) for d in stored_entries(lg)])


# -- checkpoints and the guard ---------------------------------------------------------


def test_a_checkpoint_is_signed_only_when_the_log_has_grown(adm, log):
    cp = log.sign_checkpoint()
    assert (cp.origin, cp.size, cp.root) == ("ledger.test/unit", 1,
                                             leaf(stored_entries(log)[0]))
    assert log.sign_checkpoint() is None
    adm.admit([M1.item(1, 2)])
    adm.admit([M1.item(1, 2)])  # nothing new
    cp2 = log.sign_checkpoint()
    assert cp2.size == 2 and cp2.root == merkle.root_of([leaf(d) for d in stored_entries(log)])
    assert log.sign_checkpoint() is None
    text = log.checkpoint_note()
    body, _ = note.open_note(text, [note.Verifier(VKEY)])
    assert ckpt.Checkpoint.parse(body) == cp2
    assert ckpt.Checkpoint.parse(note.open_note(log.checkpoint_note(1), [note.Verifier(VKEY)])[
        0]) == cp


def test_an_empty_log_signs_the_empty_tree(log):
    cp = log.sign_checkpoint()
    assert (cp.size, cp.root) == (0, hashlib.sha256(b"").digest())
    assert log.sign_checkpoint() is None


def _flip_page(db, page: int) -> None:
    """Flip a bit in every stored hash of one hash page, behind the log's back."""
    with sqlite3.connect(db) as conn:
        (data,) = conn.execute("SELECT data FROM hash_pages WHERE page = ?", (page,)).fetchone()
        edited = bytearray(data)
        for i in range(0, len(edited), 32):
            edited[i] ^= 0x80
        conn.execute("UPDATE hash_pages SET data = ? WHERE page = ?", (bytes(edited), page))
    conn.close()


def test_a_log_whose_stored_tree_changed_under_a_signed_checkpoint_halts_at_start(db, opened):
    store, lg = opened()
    adm = Admission(lg, clock=lambda: NOW)
    adm.enroll(M1.enrollment())
    adm.admit([M1.item(1), M1.item(2)])
    assert lg.sign_checkpoint().size == 3
    lg.stop()
    store.close()
    _flip_page(db, 0)

    store, lg = opened()
    assert lg.halted and "size 3" in lg.halted
    assert lg.sign_checkpoint() is None
    with pytest.raises(LogHalted):
        with lg.writing():
            pass
    with pytest.raises(LogHalted):
        Admission(lg).admit([M1.item(3)])
    assert lg.size == 3
    with store.reader() as r:
        assert [c.size for c in r.checkpoints()] == [3]


def test_the_running_signer_will_not_sign_over_an_edited_tree(db, opened):
    store, lg = opened()
    adm = Admission(lg, clock=lambda: NOW)
    adm.enroll(M1.enrollment())
    adm.admit([M1.item(s) for s in range(1, 200)])
    assert lg.sign_checkpoint().size == 200
    assert merkle.stored_hash_count(200) > 256  # page 0 is full: read from the file
    _flip_page(db, 0)
    adm.admit([M1.item(200)])
    assert lg.sign_checkpoint() is None
    assert lg.halted and "size 200" in lg.halted
    with pytest.raises(LogHalted):
        adm.admit([M1.item(201)])
    with store.reader() as r:
        assert r.latest_checkpoint().size == 200
