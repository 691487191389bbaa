"""Offline verification (ledger_node.verify): proof bundles against a policy,
audits of whole exported logs, and the `ledger-verify` command.

Logs are real: a Log on a temporary SQLite file, filled through Admission the
way the HTTP API fills it, with bundles built by meter.frame and signed by
PyNaCl keys as a meter signs them. A log that breaks the rules (which
admission would never produce) is made by appending entry bytes straight to
the Log, as a dishonest node could. Checkpoints are signed by calling
Log.sign_checkpoint and cosigned by real witness keys. Expected values come
from the readings each test signs, never from the verifier's output.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import struct

import pytest
from nacl.signing import SigningKey

from ledger_node import checkpoint as ckpt
from ledger_node import entries as E
from ledger_node import export, note, verify
from ledger_node.admission import Admission
from ledger_node.log import Log
from ledger_node.store import Store
from meter import frame

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
INTERVAL = 900
OWNER = "9f86d081884c7d65"
EUI_A = bytes.fromhex("70b3d57ed0000001")
EUI_B = bytes.fromhex("70b3d57ed0000002")
CT = 1_767_000_000  # cosignature timestamps


def R(seq, import_dwh=None, t_end=None, flags=0, export_dwh=0) -> tuple:
    """A reading: every INTERVAL s, 100.0 Wh per interval unless said."""
    return (seq, T0 + INTERVAL * seq if t_end is None else t_end,
            1000 * seq if import_dwh is None else import_dwh, export_dwh, flags)


class Meter:
    def __init__(self, eui: bytes, n: int):
        self.eui = eui
        self.key = SigningKey(bytes([n]) * 32)

    @property
    def public_key(self) -> bytes:
        return bytes(self.key.verify_key)

    def bundle(self, *readings, key: SigningKey | None = None) -> bytes:
        rs = [R(r) if isinstance(r, int) else r for r in readings]
        body = frame.encode_body(rs)
        return body + (key or self.key).sign(frame.signed_message(self.eui, body)).signature

    def entry(self, *readings, key=None) -> bytes:
        return b"\x01" + self.eui + self.bundle(*readings, key=key)


class Ledger:
    """A log on a SQLite file with its key, two witnesses and admission."""

    def __init__(self, path, quorum: int = 2):
        self.skey, self.vkey = note.generate_key("ledger.test.example")
        self.wkeys = [ckpt.generate_cosigner_key(f"witness-{c}.example") for c in "ab"]
        self.cosigners = [ckpt.Cosigner(s) for s, _ in self.wkeys]
        self.store = Store(path)
        self.log = Log(self.store, note.Signer(self.skey),
                       witnesses=[ckpt.CosignatureVerifier(v) for _, v in self.wkeys])
        self.adm = Admission(self.log, clock=lambda: T0)
        self.policy = ckpt.Policy(note.Verifier(self.vkey),
                                  [ckpt.CosignatureVerifier(v) for _, v in self.wkeys], quorum)

    def enroll(self, m: Meter) -> int:
        return self.adm.enroll({"dev_eui": m.eui.hex(), "public_key": m.public_key.hex(),
                                "owner": OWNER, "community": "lindenhof"}).entry

    def admit(self, m: Meter, *readings, key=None) -> int:
        (res,) = self.adm.admit([{"dev_eui": m.eui.hex(),
                                  "bundle": m.bundle(*readings, key=key).hex()}])
        assert res.status == "ok", res.message
        return res.entry

    def append_raw(self, data: bytes) -> int:
        """Append entry bytes without any rule: what a dishonest node could do."""
        with self.log.writing() as lt:
            return lt.append(data)

    def sign(self, cosign: int = 2) -> ckpt.Checkpoint:
        cp = self.log.sign_checkpoint()
        assert cp is not None
        for c in self.cosigners[:cosign]:
            self.log.add_cosignature(cp.size, c.cosign(cp, CT))
        return cp

    def export(self) -> bytes:
        buf = io.BytesIO()
        export.write_export(self.store, buf)
        return buf.getvalue()

    def close(self):
        self.store.close()


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.db")
    yield led
    led.close()


@pytest.fixture
def meter_a():
    return Meter(EUI_A, 1)


@pytest.fixture
def meter_b():
    return Meter(EUI_B, 2)


def audit_bytes(data: bytes, policy=None, **kw) -> dict:
    kw.setdefault("workers", 1)
    return verify.audit(export.read_export(io.BytesIO(data)), policy, **kw)


def kinds(report) -> list:
    return [(p["kind"], p["entry"]) for p in report["problems"]]


# -- proof bundles ------------------------------------------------------------------


@pytest.fixture
def proved(ledger, meter_a, meter_b):
    """Two devices, a few readings each, a checkpoint cosigned by both witnesses."""
    ledger.enroll(meter_a)  # entry 0
    ledger.enroll(meter_b)  # entry 1
    for s in range(1, 4):
        ledger.admit(meter_a, s)  # entries 2, 4, 6
        ledger.admit(meter_b, s)  # entries 3, 5, 7
    ledger.admit(meter_a, 4, 5, 6)  # entry 8
    ledger.sign()
    return ledger


def test_a_good_proof_bundle_verifies(proved):
    doc = export.proof_bundle(proved.log, 4)  # meter A, seq 2
    rep = verify.verify_proof_bundle(doc, proved.policy)
    assert rep["ok"], rep
    assert (rep["dev_eui"], rep["seq"], rep["t_end"], rep["import_dwh"], rep["export_dwh"],
            rep["flags"]) == (EUI_A.hex(), 2, T0 + 2 * INTERVAL, 2000, 0, 0)
    assert rep["entry"] == 4 and rep["checkpoint_size"] == 9
    assert sorted(rep["witnesses"]) == ["witness-a.example", "witness-b.example"]
    assert rep["device"]["key_entry"] == 0 and rep["device"]["revoked"] is None


def test_a_reading_inside_a_bundle_of_several(proved):
    doc = export.proof_bundle(proved.log, 8)
    doc["seq"] = 5
    rep = verify.verify_proof_bundle(doc, proved.policy)
    assert rep["ok"] and (rep["seq"], rep["import_dwh"], rep["t_end"]) == (5, 5000,
                                                                          T0 + 5 * INTERVAL)
    doc["seq"] = 7
    rep = verify.verify_proof_bundle(doc, proved.policy)
    assert not rep["ok"] and rep["kind"] == "seq"
    assert "seq 7 is not in entry 8, which holds seq 4..6" in rep["message"]


def _flip_hex(text: str, nibble: int = 0) -> str:
    c = text[nibble]
    return text[:nibble] + ("0" if c != "0" else "1") + text[nibble + 1:]


def _tamper_checkpoint_line(note_text: str, line: int, new: str) -> str:
    lines = note_text.split("\n")
    lines[line] = new
    return "\n".join(lines)


def refused(doc, policy) -> dict:
    rep = verify.verify_proof_bundle(doc, policy)
    assert rep["ok"] is False, rep
    return rep


def test_a_flipped_bit_in_the_entry_is_refused(proved):
    doc = export.proof_bundle(proved.log, 4)
    data = bytearray.fromhex(doc["entry"]["data"])
    data[30] ^= 0x01  # inside the reading's registers
    doc["entry"]["data"] = data.hex()
    rep = refused(doc, proved.policy)
    assert rep["kind"] == "inclusion"
    assert ("the reading's entry (entry 4) is not proven in the checkpoint of size 9"
            in rep["message"])
    assert "does not lead to the root" in rep["message"]


def test_a_changed_proof_hash_is_refused(proved):
    doc = export.proof_bundle(proved.log, 4)
    doc["entry"]["inclusion"][1] = _flip_hex(doc["entry"]["inclusion"][1], 10)
    rep = refused(doc, proved.policy)
    assert rep["kind"] == "inclusion" and "entry 4" in rep["message"]


def test_a_shortened_proof_is_refused(proved):
    doc = export.proof_bundle(proved.log, 4)
    del doc["entry"]["inclusion"][-1]
    rep = refused(doc, proved.policy)
    # A tree of 9 leaves: leaf 4 has 4 siblings on its path to the root.
    assert rep["kind"] == "inclusion" and "has 4 hashes, got 3" in rep["message"]


def test_a_changed_root_is_refused(proved):
    doc = export.proof_bundle(proved.log, 4)
    text = doc["checkpoint"]
    root_b64 = text.split("\n")[2]
    other = base64.b64encode(bytes(32)).decode()
    doc["checkpoint"] = text.replace(root_b64, other, 1)
    rep = refused(doc, proved.policy)
    assert rep["kind"] == "checkpoint" and "not a checkpoint of log" in rep["message"]


def test_a_changed_size_in_the_checkpoint_is_refused(proved):
    doc = export.proof_bundle(proved.log, 4)
    doc["checkpoint"] = _tamper_checkpoint_line(doc["checkpoint"], 1, "10")
    rep = refused(doc, proved.policy)
    assert rep["kind"] == "checkpoint" and "not a checkpoint of log" in rep["message"]


def test_a_cosignature_removed_below_quorum_is_refused(proved):
    doc = export.proof_bundle(proved.log, 4)
    doc["checkpoint"] = "".join(line + "\n" for line in doc["checkpoint"].splitlines()
                                if "witness-b.example" not in line)
    rep = refused(doc, proved.policy)
    assert rep["kind"] == "checkpoint"
    assert "1 valid cosignature(s) from policy witnesses, 2 needed" in rep["message"]
    # The same bundle is enough for a policy that asks for one witness.
    one = ckpt.Policy(proved.policy.log, proved.policy.witnesses, 1)
    assert verify.verify_proof_bundle(doc, one)["witnesses"] == ["witness-a.example"]


def test_another_logs_key_is_refused(proved):
    doc = export.proof_bundle(proved.log, 4)
    _, other_vkey = note.generate_key("ledger.test.example")
    policy = ckpt.Policy(note.Verifier(other_vkey), proved.policy.witnesses, 0)
    rep = refused(doc, policy)
    assert rep["kind"] == "checkpoint" and "not a checkpoint of log" in rep["message"]


def test_a_removed_enrollment_leaves_the_key_unknown(proved):
    doc = export.proof_bundle(proved.log, 4)
    assert [r["index"] for r in doc["registry"]] == [0]
    doc["registry"] = []
    rep = refused(doc, proved.policy)
    assert rep["kind"] == "registry" and "unknown_device" in rep["message"]
    assert EUI_A.hex() in rep["message"]


def test_a_registry_entry_of_another_device_is_refused(proved):
    doc = export.proof_bundle(proved.log, 4)
    other = export.proof_bundle(proved.log, 5)  # meter B's reading: B's enrollment
    doc["registry"].append(other["registry"][0])
    rep = refused(doc, proved.policy)
    assert rep["kind"] == "registry"
    assert f"registry[1] (entry 1) is of device {EUI_B.hex()}, not {EUI_A.hex()}" in rep["message"]


def test_registry_entries_out_of_order_are_refused(proved):
    doc = export.proof_bundle(proved.log, 4)
    doc["registry"] = doc["registry"] * 2
    rep = refused(doc, proved.policy)
    assert rep["kind"] == "registry" and "entry 0 after entry 0" in rep["message"]


def test_a_reading_signed_by_a_rotated_out_key_is_refused(ledger, meter_a):
    ledger.enroll(meter_a)  # 0
    ledger.admit(meter_a, 1, 2)  # 1
    new_key = SigningKey(bytes([9]) * 32)
    rotated = ledger.adm.rotate(EUI_A.hex(), {"public_key": bytes(new_key.verify_key).hex(),
                                              "from_seq": 10}).entry  # 2
    good = ledger.admit(meter_a, 10, key=new_key)  # 3
    # Admission refuses seq 11 signed by the old key; a dishonest node logs it anyway.
    bad = ledger.append_raw(meter_a.entry(11))  # 4
    ledger.sign()
    policy = ledger.policy

    rep = verify.verify_proof_bundle(export.proof_bundle(ledger.log, good), policy)
    assert rep["ok"] and rep["device"]["key_entry"] == rotated
    # Readings signed before the rotation still verify with the old key.
    old = verify.verify_proof_bundle(export.proof_bundle(ledger.log, 1), policy)
    assert old["ok"] and old["device"]["key_entry"] == 0 and old["import_dwh"] == 1000

    doc = export.proof_bundle(ledger.log, bad)
    assert [r["index"] for r in doc["registry"]] == [0, rotated]
    rep = refused(doc, policy)
    assert rep["kind"] == "signature" and "bad_signature" in rep["message"]
    assert "seq 11..11" in rep["message"]


def test_a_reading_before_a_revocation_stays_valid(ledger, meter_a):
    ledger.enroll(meter_a)
    entry = ledger.admit(meter_a, 1)
    revoked = ledger.adm.revoke(EUI_A.hex(), {"reason": "decommissioned"}).entry
    after = ledger.append_raw(meter_a.entry(2))  # refused by admission: the device is revoked
    ledger.sign()
    rep = verify.verify_proof_bundle(export.proof_bundle(ledger.log, entry), ledger.policy)
    assert rep["ok"] and rep["device"]["revoked"] == {"entry": revoked,
                                                       "reason": "decommissioned"}
    rep = refused(export.proof_bundle(ledger.log, after), ledger.policy)
    assert rep["kind"] == "registry" and "revoked_device" in rep["message"]


def _good_doc(proved):
    return export.proof_bundle(proved.log, 4)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("checkpoint"), "checkpoint: missing"),
    (lambda d: d.pop("entry"), "entry: missing"),
    (lambda d: d.update(format="meter-ledger-proof/9"), "format: 'meter-ledger-proof/9' is not"),
    (lambda d: d.update(checkpoint=17), "checkpoint: expected the signed note as a string"),
    (lambda d: d.update(seq="4"), "seq: expected an integer"),
    (lambda d: d.update(seq=True), "seq: expected an integer"),
    (lambda d: d.update(seq=-1), "seq: expected an integer"),
    (lambda d: d.update(entry=[]), "entry: expected an object, got an array"),
    (lambda d: d["entry"].pop("inclusion"), "entry.inclusion: missing"),
    (lambda d: d["entry"].update(index=-3), "entry.index: expected an entry index"),
    (lambda d: d["entry"].update(index=1.5), "entry.index: expected an entry index"),
    (lambda d: d["entry"].update(data="zz"), "entry.data: not an even number of hex digits"),
    (lambda d: d["entry"].update(data="0 1"), "entry.data: not an even number of hex digits"),
    (lambda d: d["entry"].update(data=None), "entry.data: expected a string of hex digits, "
                                             "got null"),
    (lambda d: d["entry"].update(inclusion="ab"), "entry.inclusion: expected an array"),
    (lambda d: d["entry"]["inclusion"].__setitem__(0, "abcd"), "entry.inclusion[0]: expected "
                                                               "32 bytes, got 2"),
    (lambda d: d.update(registry={}), "registry: expected an array, got an object"),
    (lambda d: d["registry"].append(7), "registry[1]: expected an object, got an integer"),
])
def test_a_malformed_document_is_a_clear_refusal(proved, edit, message):
    doc = copy.deepcopy(_good_doc(proved))
    edit(doc)
    rep = refused(doc, proved.policy)
    assert rep["kind"] == "malformed" and message in rep["message"], rep


@pytest.mark.parametrize("doc", [None, [], "text", 3])
def test_a_document_that_is_not_an_object_is_refused(proved, doc):
    rep = refused(doc, proved.policy)
    assert rep["kind"] == "malformed" and "a proof bundle is a JSON object" in rep["message"]


def test_a_garbled_checkpoint_note_is_refused(proved):
    doc = _good_doc(proved)
    doc["checkpoint"] = "not a note"
    rep = refused(doc, proved.policy)
    assert rep["kind"] == "checkpoint" and "malformed checkpoint note" in rep["message"]


def test_a_registry_entry_as_the_proved_entry_is_refused(proved):
    doc = export.proof_bundle(proved.log, 0)  # the enrollment itself
    doc["seq"] = 0  # the export leaves it null: there is no reading
    rep = refused(doc, proved.policy)
    assert rep["kind"] == "malformed" and "not a readings entry" in rep["message"]


# -- audits ---------------------------------------------------------------------------


@pytest.fixture
def busy(ledger, meter_a, meter_b):
    """Readings in order, out of order, resent and overlapping, a rotation, a
    revocation: everything admission lets in."""
    ledger.sign()  # size 0
    ledger.enroll(meter_a)
    ledger.enroll(meter_b)
    for s in range(1, 6):
        ledger.admit(meter_a, s)
    ledger.admit(meter_a, 8, 9)  # a gap ...
    ledger.admit(meter_a, 6, 7)  # ... filled later (a meter catching up)
    ledger.admit(meter_a, 9, 10)  # overlaps: 9 again with the same values, 10 new
    ledger.admit(meter_b, R(1, flags=frame.FLAG_CLOCK_UNSYNCED, t_end=5))  # free-running clock
    ledger.admit(meter_b, 2, 3)
    ledger.sign()
    new_key = SigningKey(bytes([7]) * 32)
    ledger.adm.rotate(EUI_B.hex(), {"public_key": bytes(new_key.verify_key).hex()})
    ledger.admit(meter_b, 4, 5, key=new_key)
    ledger.adm.revoke(EUI_A.hex(), {"reason": "replaced"})
    ledger.sign()
    return ledger


BUSY_ENTRIES = 2 + 5 + 3 + 1 + 1 + 1 + 1 + 1  # enrolls, A, A catch-up, B, rotate, B, revoke
BUSY_READINGS = 10 + 5  # distinct (device, seq)
BUSY_READINGS_ENTRIES = 5 + 3 + 2 + 1  # readings entries: A 5 + 3, B 1 + 1 + 1


def test_an_audit_of_a_good_export_is_clean(busy):
    rep = audit_bytes(busy.export(), busy.policy)
    assert rep["ok"], rep["problems"]
    assert (rep["entries"], rep["readings"], rep["devices"], rep["checkpoints"]) == (
        BUSY_ENTRIES, BUSY_READINGS, 2, 3)
    assert rep["signatures"] == BUSY_READINGS_ENTRIES
    assert rep["readings_in_entries"] == 16  # seq 9 of meter A is in two entries
    assert rep["checkpoint_signatures"] == 3 and rep["log_signatures_checked"]
    assert rep["witnessed_size"] == BUSY_ENTRIES and rep["unwitnessed_entries"] == 0
    assert sorted(rep["witnesses"]) == ["witness-a.example", "witness-b.example"]
    assert rep["root"] == busy.log.root.hex()


def test_the_worker_processes_find_the_same(busy, meter_b):
    busy.append_raw(meter_b.entry(R(30), key=SigningKey(bytes([5]) * 32)))  # bad signature
    data = busy.export()
    one = audit_bytes(data, busy.policy, workers=1)
    many = audit_bytes(data, busy.policy, workers=2, chunk=3)  # several jobs per worker
    assert many["signatures"] == one["signatures"] == BUSY_READINGS_ENTRIES
    assert kinds(many) == kinds(one)
    assert ("bad_signature", BUSY_ENTRIES) in kinds(many)


def test_without_a_policy_or_log_key_signatures_are_not_checked(busy):
    rep = audit_bytes(busy.export())
    assert rep["ok"] and rep["log_signatures_checked"] is False
    assert rep["checkpoint_signatures"] is None and rep["witnessed_size"] is None
    rep = audit_bytes(busy.export(), log_vkey=busy.vkey)
    assert rep["ok"] and rep["checkpoint_signatures"] == 3


def test_another_log_key_fails_every_checkpoint(busy):
    _, other = note.generate_key("ledger.test.example")
    rep = audit_bytes(busy.export(), log_vkey=other)
    assert [k for k, _ in kinds(rep)] == ["checkpoint_signature"] * 3


def test_no_checkpoint_at_quorum_is_a_problem(ledger, meter_a):
    ledger.enroll(meter_a)
    ledger.admit(meter_a, 1)
    ledger.sign(cosign=1)
    rep = audit_bytes(ledger.export(), ledger.policy)
    assert kinds(rep) == [("quorum", None)]
    assert "1 valid cosignature(s) from policy witnesses, 2 needed" in rep["problems"][0]["message"]


def test_entries_after_the_witnessed_checkpoint_are_reported_not_refused(ledger, meter_a):
    ledger.enroll(meter_a)
    ledger.admit(meter_a, 1)
    ledger.sign()  # size 2, cosigned by both
    ledger.admit(meter_a, 2)
    ledger.admit(meter_a, 3)
    ledger.sign(cosign=0)  # size 4, signed by the log alone
    rep = audit_bytes(ledger.export(), ledger.policy)
    assert rep["ok"], rep["problems"]
    assert (rep["signed_size"], rep["witnessed_size"], rep["unwitnessed_entries"]) == (4, 2, 2)


def test_a_truncated_export_is_refused(busy):
    data = busy.export()
    for cut in (len(data) - 1, len(data) - 9, len(data) // 2):
        rep = audit_bytes(data[:cut], busy.policy)
        assert not rep["ok"]
        assert [k for k, _ in kinds(rep)][0] == "export"
        assert "truncated" in rep["problems"][0]["message"]


def test_an_export_missing_its_last_entries_fails_the_checkpoint(busy):
    # Re-written by hand without the last entry, with a consistent end record:
    # only the checkpoints tell that an entry is missing.
    records = list(export.read_export(io.BytesIO(busy.export())))
    last_entry = max(i for i, r in enumerate(records) if r[0] == "entry")
    kept = records[:last_entry] + [r for r in records[last_entry + 1:] if r[0] == "checkpoint"]
    kept.append(("end", BUSY_ENTRIES - 1))
    rep = verify.audit(iter(kept), busy.policy, workers=1)
    assert ("checkpoint_size", None) in kinds(rep)
    assert f"checkpoint of size {BUSY_ENTRIES} but the log has {BUSY_ENTRIES - 1} entries" in \
        rep["problems"][0]["message"]


def test_a_changed_entry_in_an_export_fails_signature_and_roots(busy):
    records = list(export.read_export(io.BytesIO(busy.export())))
    # The third readings entry of meter A (entry 4): flip a bit of its signature.
    at = next(i for i, r in enumerate(records) if r[0] == "entry" and r[1] == 4)
    data = bytearray(records[at][2])
    data[-1] ^= 0x80
    records[at] = ("entry", 4, bytes(data))
    rep = verify.audit(iter(records), busy.policy, workers=1)
    found = kinds(rep)
    assert ("bad_signature", 4) in found
    # Every checkpoint from size 5 on has a root the entries no longer make.
    roots = [p for p in rep["problems"] if p["kind"] == "checkpoint_root"]
    assert len(roots) == 2 and rep["witnessed_size"] == 0


def dishonest(ledger, meter_a, *entries_data):
    ledger.enroll(meter_a)
    idx = [ledger.append_raw(d) for d in entries_data]
    ledger.sign()
    return idx


def test_a_seq_logged_twice_with_other_values_is_a_conflict(ledger, meter_a):
    first, second = dishonest(ledger, meter_a, meter_a.entry(1), meter_a.entry(R(1, 1500)))
    rep = audit_bytes(ledger.export(), ledger.policy)
    assert kinds(rep) == [("conflict", second)]
    assert f"seq 1 is logged in entry {first} with other values (import_dwh 1000 then 1500)" \
        in rep["problems"][0]["message"]


def test_the_same_values_twice_are_fine(ledger, meter_a):
    dishonest(ledger, meter_a, meter_a.entry(1, 2), meter_a.entry(2, 3), meter_a.entry(1))
    rep = audit_bytes(ledger.export(), ledger.policy)
    assert rep["ok"] and rep["readings"] == 3 and rep["readings_in_entries"] == 5


def test_registers_going_backwards_are_found(ledger, meter_a):
    _, back = dishonest(ledger, meter_a, meter_a.entry(1, 2), meter_a.entry(R(3, 1500)))
    rep = audit_bytes(ledger.export(), ledger.policy)
    assert kinds(rep) == [("registers_backwards", back)]
    assert "import_dwh 1500 at seq 3 is below 2000 logged at seq 2" in rep["problems"][0]["message"]


def test_export_register_going_backwards_is_found(ledger, meter_a):
    _, back = dishonest(ledger, meter_a, meter_a.entry(R(1, export_dwh=50)),
                        meter_a.entry(R(2, export_dwh=40)))
    rep = audit_bytes(ledger.export(), ledger.policy)
    assert kinds(rep) == [("registers_backwards", back)]
    assert "export_dwh 40 at seq 2 is below 50" in rep["problems"][0]["message"]


def test_time_going_backwards_is_found_unless_the_clock_was_unsynced(ledger, meter_a):
    unsynced = frame.FLAG_CLOCK_UNSYNCED
    idx = dishonest(ledger, meter_a,
                    meter_a.entry(1),
                    meter_a.entry(R(2, t_end=7, flags=unsynced)),  # free-running: exempt
                    meter_a.entry(R(3, t_end=T0)),  # before seq 1's t_end, clock synced
                    meter_a.entry(4))
    rep = audit_bytes(ledger.export(), ledger.policy)
    assert kinds(rep) == [("time_backwards", idx[2])]
    assert f"t_end {T0} at seq 3 is below {T0 + INTERVAL} logged at seq 1" in \
        rep["problems"][0]["message"]


def test_out_of_order_readings_are_checked_in_seq_order(ledger, meter_a):
    # 1, 4, then 2 and 3 filling the gap: fine; then 5 filled in below 4's
    # registers is not (checked when the device is sorted at the end).
    idx = dishonest(ledger, meter_a, meter_a.entry(1), meter_a.entry(4), meter_a.entry(2, 3),
                    meter_a.entry(6), meter_a.entry(R(5, 3500)), meter_a.entry(R(2, 2100)))
    rep = audit_bytes(ledger.export(), ledger.policy)
    assert kinds(rep) == [("conflict", idx[5]), ("registers_backwards", idx[4])]
    assert "import_dwh 3500 at seq 5 is below 4000 logged at seq 4" in \
        rep["problems"][1]["message"]
    assert rep["readings"] == 6


def test_readings_of_an_unknown_or_revoked_device_are_found(ledger, meter_a, meter_b):
    ledger.enroll(meter_a)
    unknown = ledger.append_raw(meter_b.entry(1))
    ledger.adm.revoke(EUI_A.hex(), {"reason": "key_compromise"})
    revoked = ledger.append_raw(meter_a.entry(1))
    ledger.sign()
    rep = audit_bytes(ledger.export(), ledger.policy)
    assert kinds(rep) == [("unknown_device", unknown), ("revoked_device", revoked)]


def test_registry_entries_that_break_the_rules_are_found(ledger, meter_a):
    ledger.enroll(meter_a)
    ledger.admit(meter_a, 1, 2, 3)
    rotate_low = E.encode(E.Rotate(EUI_A, bytes(SigningKey(bytes([8]) * 32).verify_key), T0, 2))
    enroll_again = E.encode(E.Enroll(EUI_A, meter_a.public_key, T0, 100, "", "", "lindenhof",
                                     OWNER))
    bad = [ledger.append_raw(rotate_low), ledger.append_raw(enroll_again)]
    ledger.sign()
    rep = audit_bytes(ledger.export(), ledger.policy)
    assert kinds(rep) == [("rotate_from_seq", bad[0]), ("already_enrolled", bad[1])]


def test_undecodable_entries_are_found(ledger, meter_a):
    idx = dishonest(ledger, meter_a, b"\x10settlement", meter_a.entry(1)[:-1], b"")
    rep = audit_bytes(ledger.export(), ledger.policy)
    assert [k for k, _ in kinds(rep)] == ["malformed_entry"] * 3
    assert [e for _, e in kinds(rep)] == idx
    assert "entry_type" in rep["problems"][0]["message"]


def test_problems_are_capped_but_all_counted(ledger, meter_a):
    wrong = SigningKey(bytes([4]) * 32)
    dishonest(ledger, meter_a, *[meter_a.entry(s, key=wrong) for s in range(1, 8)])
    rep = audit_bytes(ledger.export(), ledger.policy, max_problems=3)
    assert rep["problems_total"] == 7 and len(rep["problems"]) == 3
    assert [p["entry"] for p in rep["problems"]] == [1, 2, 3]


def test_an_export_without_any_checkpoint_proves_nothing(ledger, meter_a):
    ledger.enroll(meter_a)
    rep = audit_bytes(ledger.export())
    assert kinds(rep) == [("no_checkpoint", None)]


def test_the_audit_reads_a_large_log_in_chunks(ledger):
    # 60 devices x 3 readings through admission, audited with 2 processes and
    # small jobs: the counts are those of the log built here.
    meters = [Meter(bytes.fromhex(f"70b3d57e{n:08x}"), n + 10) for n in range(60)]
    for m in meters:
        ledger.enroll(m)
    for s in (1, 2, 3):
        items = [{"dev_eui": m.eui.hex(), "bundle": m.bundle(s).hex()} for m in meters]
        assert all(r.status == "ok" for r in ledger.adm.admit(items))
    ledger.sign()
    rep = audit_bytes(ledger.export(), ledger.policy, workers=2, chunk=16)
    assert rep["ok"], rep["problems"]
    assert (rep["entries"], rep["readings"], rep["devices"], rep["signatures"]) == (
        240, 180, 60, 180)


# -- the command ----------------------------------------------------------------------


@pytest.fixture
def files(proved, tmp_path):
    policy = tmp_path / "policy.toml"
    vkeys = ", ".join(f'"{v}"' for _, v in proved.wkeys)
    policy.write_text(f'log = "{proved.vkey}"\nquorum = 2\nwitnesses = [{vkeys}]\n')
    bundle = tmp_path / "proof.json"
    bundle.write_text(json.dumps(export.proof_bundle(proved.log, 4)))
    exp = tmp_path / "ledger.export"
    exp.write_bytes(proved.export())
    return {"policy": str(policy), "bundle": str(bundle), "export": str(exp), "tmp": tmp_path}


def test_cli_bundle_exit_codes(files, capsys):
    assert verify.main(["bundle", files["bundle"], "--policy", files["policy"]]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"verified: device {EUI_A.hex()} seq 2: t_end {T0 + 2 * INTERVAL}, "
                          "import 2000 dWh")

    assert verify.main(["bundle", files["bundle"], "--policy", files["policy"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["import_dwh"] == 2000

    doc = json.loads(open(files["bundle"]).read())
    doc["entry"]["inclusion"][0] = _flip_hex(doc["entry"]["inclusion"][0])
    bad = files["tmp"] / "bad.json"
    bad.write_text(json.dumps(doc))
    assert verify.main(["bundle", str(bad), "--policy", files["policy"]]) == 1
    assert capsys.readouterr().out.startswith("refused: inclusion: ")

    bad.write_text("{not json")
    assert verify.main(["bundle", str(bad), "--policy", files["policy"]]) == 1
    assert "refused: malformed: not a JSON document" in capsys.readouterr().out

    assert verify.main(["bundle", str(files["tmp"] / "none.json"), "--policy",
                        files["policy"]]) == 2
    assert "none.json" in capsys.readouterr().err


def test_cli_bad_policy_is_exit_2_with_every_fault(files, capsys):
    policy = files["tmp"] / "broken.toml"
    policy.write_text('log = "nonsense"\nquorum = 3\nwitnesses = [1]\n')
    assert verify.main(["bundle", files["bundle"], "--policy", str(policy)]) == 2
    err = capsys.readouterr().err
    assert "broken.toml: log: " in err and "broken.toml: witnesses[0]: " in err
    assert verify.main(["audit", files["export"], "--policy", str(files["tmp"] / "no.toml")]) == 2
    assert "no.toml: file: can not be read" in capsys.readouterr().err


def test_cli_audit_exit_codes(files, proved, capsys):
    assert verify.main(["audit", files["export"], "--policy", files["policy"],
                        "--workers", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "clean: 9 entries, 9 readings from 2 devices" in out[0]

    vkey_file = files["tmp"] / "log.vkey"
    vkey_file.write_text(proved.vkey + "\n")
    assert verify.main(["audit", files["export"], "--log-key", str(vkey_file), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["checkpoint_signatures"] == 1

    assert verify.main(["audit", files["export"]]) == 0
    assert "checkpoint signatures NOT checked" in capsys.readouterr().out

    truncated = files["tmp"] / "short.export"
    truncated.write_bytes(open(files["export"], "rb").read()[:-5])
    assert verify.main(["audit", str(truncated), "--policy", files["policy"]]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("export: ") and "truncated" in out[0]
    assert "1 problem(s)" in out[-1]

    notexport = files["tmp"] / "other.bin"
    notexport.write_bytes(b"SQLite format 3\x00")
    assert verify.main(["audit", str(notexport), "--policy", files["policy"]]) == 2
    assert "not a ledger export" in capsys.readouterr().err
    assert verify.main(["audit", str(files["tmp"] / "missing.export")]) == 2
    assert verify.main(["audit", files["export"], "--log-key", "not-a-key"]) == 2
    assert "--log-key" in capsys.readouterr().err
    assert verify.main(["audit", files["export"], "--workers", "0"]) == 2


def test_cli_runs_as_a_module(files):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "ledger_node.verify", "audit", files["export"],
                           "--policy", files["policy"]], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "clean" in done.stdout


def test_export_record_layout_is_what_the_audit_reads(busy):
    # The export format written out by hand: magic, then kind || u32 length || payload.
    data = busy.export()
    assert data.startswith(b"meter-ledger-export/1\n")
    assert data[-13:-8] == b"Z" + struct.pack(">I", 8)
    assert struct.unpack(">Q", data[-8:])[0] == BUSY_ENTRIES
