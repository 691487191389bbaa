"""Consistency check of a ledger database (ledger_node.check, `ledger-node check`).

A real log on a temporary SQLite file, filled through Admission with bundles
signed by PyNaCl keys as meters sign them; then the file is edited behind the
node's back with sqlite3, the way damage or tampering would change it, and
the check must name what changed. Expected entry indexes come from the
entries each test appended; stored-hash positions from the layout's formula
(leaf j's hash is stored hash 2j - popcount(j)), written out here.
"""

from __future__ import annotations

import sqlite3

import pytest
from nacl.signing import SigningKey

from ledger_node import cli, note
from ledger_node.admission import Admission
from ledger_node.check import check_store
from ledger_node.log import Log
from ledger_node.store import Store
from meter import frame

T0 = 1_767_225_600
INTERVAL = 900
OWNER = "9f86d081884c7d65"
EUI_A = bytes.fromhex("70b3d57ed0000001")
EUI_B = bytes.fromhex("70b3d57ed0000002")


def R(seq, import_dwh=None, t_end=None, flags=0) -> tuple:
    return (seq, T0 + INTERVAL * seq if t_end is None else t_end,
            1000 * seq if import_dwh is None else import_dwh, 0, flags)


class Meter:
    def __init__(self, eui: bytes, n: int):
        self.eui = eui
        self.key = SigningKey(bytes([n]) * 32)

    def item(self, *readings, key=None) -> dict:
        body = frame.encode_body([R(r) if isinstance(r, int) else r for r in readings])
        sig = (key or self.key).sign(frame.signed_message(self.eui, body)).signature
        return {"dev_eui": self.eui.hex(), "bundle": (body + sig).hex()}


class Built:
    """What the fixture logged, by entry index."""


@pytest.fixture
def built(tmp_path):
    """A log through admission: two devices, a gap filled later, an
    overlapping resend, a rotation, a revocation; three checkpoints. Then
    the store is closed so the test can edit the file."""
    b = Built()
    b.db = tmp_path / "ledger.db"
    skey, b.vkey = note.generate_key("ledger.check.example")
    store = Store(b.db)
    log = Log(store, note.Signer(skey))
    adm = Admission(log, clock=lambda: T0)
    a, m = Meter(EUI_A, 1), Meter(EUI_B, 2)

    def admit(meter, *readings, key=None):
        (res,) = adm.admit([meter.item(*readings, key=key)])
        assert res.status == "ok", res.message
        return res.entry

    log.sign_checkpoint()  # size 0
    for meter in (a, m):
        adm.enroll({"dev_eui": meter.eui.hex(),
                    "public_key": bytes(meter.key.verify_key).hex(),
                    "owner": OWNER, "community": "lindenhof"})  # entries 0, 1
    b.a = {s: admit(a, s) for s in (1, 2, 3)}  # entries 2, 3, 4
    b.a[8] = b.a[9] = admit(a, 8, 9)  # 5
    b.a[6] = b.a[7] = admit(a, 6, 7)  # 6: fills the gap
    b.a10 = admit(a, 9, 10)  # 7: seq 9 again, same values; the index keeps entry 5 for it
    b.a[10] = b.a10
    b.b = {1: admit(m, R(1, t_end=3, flags=frame.FLAG_CLOCK_UNSYNCED))}  # 8
    log.sign_checkpoint()  # size 9
    new_key = SigningKey(bytes([7]) * 32)
    b.rotate = adm.rotate(EUI_B.hex(), {"public_key": bytes(new_key.verify_key).hex()}).entry  # 9
    b.b[2] = b.b[3] = admit(m, 2, 3, key=new_key)  # 10
    b.revoke = adm.revoke(EUI_A.hex(), {"reason": "replaced"}).entry  # 11
    log.sign_checkpoint()  # size 12
    b.size = log.size
    store.close()
    return b


def check(built, **kw) -> dict:
    with Store(built.db, create=False) as store:
        return check_store(store, **kw)


def edit(built, sql: str, *args) -> None:
    conn = sqlite3.connect(built.db)
    with conn:
        conn.execute(sql, args)
    conn.close()


def kinds(report) -> list:
    return [(p["kind"], p["entry"]) for p in report["problems"]]


def leaf_position(j: int) -> int:
    """Where leaf j's own hash is stored: after the 2j - popcount(j) hashes of
    the first j leaves."""
    return 2 * j - bin(j).count("1")


def test_the_fixture_is_what_the_comments_say(built):
    assert (built.a[1], built.a[8], built.a[6], built.a10, built.b[1]) == (2, 5, 6, 7, 8)
    assert (built.rotate, built.b[2], built.revoke, built.size) == (9, 10, 11, 12)


def test_a_consistent_database_is_clean(built):
    rep = check(built)
    assert rep["ok"], rep["problems"]
    # Readings: A 1, 2, 3, 6, 7, 8, 9, 10 and B 1, 2, 3.
    assert (rep["entries"], rep["readings"], rep["devices"], rep["checkpoints"]) == (12, 11, 2, 3)
    assert rep["problems_total"] == 0 and rep["problems"] == []
    assert rep["signatures"] == 8  # readings entries: 2, 3, 4, 5, 6, 7, 8, 10
    assert rep["log_signatures_checked"] is False


def test_with_the_log_key_checkpoint_signatures_are_checked(built):
    rep = check(built, log_vkey=built.vkey)
    assert rep["ok"] and rep["checkpoint_signatures"] == 3
    _, other = note.generate_key("ledger.check.example")
    rep = check(built, log_vkey=other)
    assert [k for k, _ in kinds(rep)] == ["checkpoint_signature"] * 3


def test_a_changed_entry_is_found(built):
    idx = built.a[2]
    conn = sqlite3.connect(built.db)
    data = bytearray(conn.execute("SELECT data FROM entries WHERE idx = ?", (idx,)).fetchone()[0])
    conn.close()
    data[-1] ^= 0x01  # the signature's last byte
    edit(built, "UPDATE entries SET data = ? WHERE idx = ?", bytes(data), idx)
    rep = check(built)
    found = kinds(rep)
    assert ("bad_signature", idx) in found
    # The two checkpoints covering it (sizes 9 and 12) no longer match.
    assert ("checkpoint_root", 8) in found and ("checkpoint_root", 11) in found
    # The stored hashes were made from the old bytes: leaf 3's is the first to differ.
    assert ("hash_pages", idx) in found
    page = next(p for p in rep["problems"] if p["kind"] == "hash_pages")
    assert f"stored hash {leaf_position(idx)} (level 0" in page["message"]


def test_a_flipped_byte_in_a_hash_page_is_found(built):
    j = 6
    k = leaf_position(j)  # page 0: the log has far fewer than 256 hashes
    conn = sqlite3.connect(built.db)
    page = bytearray(conn.execute("SELECT data FROM hash_pages WHERE page = 0").fetchone()[0])
    conn.close()
    page[32 * k + 5] ^= 0x40
    edit(built, "UPDATE hash_pages SET data = ? WHERE page = 0", bytes(page))
    rep = check(built)
    assert kinds(rep) == [("hash_pages", j)]
    assert f"stored hash {k} (level 0, over entries {j}..{j})" in rep["problems"][0]["message"]


def test_a_truncated_hash_page_is_found(built):
    edit(built, "UPDATE hash_pages SET data = substr(data, 1, 32 * 5) WHERE page = 0")
    rep = check(built)
    assert [k for k, _ in kinds(rep)] == ["hash_pages"]
    assert "holds 5 hashes, the entries make 22" in rep["problems"][0]["message"]  # 2*12 - 2


def test_a_changed_index_row_is_found(built):
    edit(built, "UPDATE readings SET import_dwh = import_dwh + 1 WHERE seq = 3 AND dev = "
                "(SELECT dev FROM devices WHERE dev_eui = ?)", EUI_A)
    rep = check(built)
    assert kinds(rep) == [("index_mismatch", built.a[3])]
    p = rep["problems"][0]
    assert (p["dev_eui"], p["seq"]) == (EUI_A.hex(), 3)
    assert "import_dwh 3001 but the entries give 3000" in p["message"]


def test_an_index_row_pointing_at_a_later_copy_is_found(built):
    # Seq 9 is in entries 5 and 7; the index must point at the first.
    edit(built, "UPDATE readings SET entry = ? WHERE seq = 9 AND dev = "
                "(SELECT dev FROM devices WHERE dev_eui = ?)", built.a10, EUI_A)
    rep = check(built)
    assert kinds(rep) == [("index_mismatch", built.a[9])]
    assert f"entry {built.a10} but the entries give {built.a[9]}" in rep["problems"][0]["message"]


def test_a_deleted_index_row_is_found(built):
    edit(built, "DELETE FROM readings WHERE seq = 2 AND dev = "
                "(SELECT dev FROM devices WHERE dev_eui = ?)", EUI_B)
    rep = check(built)
    assert kinds(rep) == [("index_missing", built.b[2])]
    assert (rep["problems"][0]["dev_eui"], rep["problems"][0]["seq"]) == (EUI_B.hex(), 2)


def test_an_extra_index_row_is_found(built):
    edit(built, "INSERT INTO readings (dev, seq, t_end, import_dwh, export_dwh, flags, entry) "
                "SELECT dev, 50, 0, 0, 0, 0, 4 FROM devices WHERE dev_eui = ?", EUI_A)
    rep = check(built)
    assert kinds(rep) == [("index_extra", 4)]
    assert rep["problems"][0]["seq"] == 50


def test_a_changed_checkpoint_root_is_found(built):
    edit(built, "UPDATE checkpoints SET root = zeroblob(32) WHERE size = 9")
    rep = check(built)
    assert kinds(rep) == [("checkpoint_root", 8)]
    assert "the checkpoints row of size 9 has root 0000000000000000" in \
        rep["problems"][0]["message"]


def test_a_forgotten_registry_row_is_found(built):
    edit(built, "DELETE FROM registry WHERE idx = ?", built.rotate)
    rep = check(built)
    assert kinds(rep) == [("registry_index", built.rotate)]


def test_a_deleted_last_entry_is_found(built):
    edit(built, "DELETE FROM entries WHERE idx = ?", built.size - 1)
    rep = check(built)
    found = [k for k, _ in kinds(rep)]
    # The checkpoint of size 12 covers an entry that is gone, and the hash
    # page still holds the hashes it completed.
    assert found == ["checkpoint_size", "hash_pages"]
    assert "checkpoint of size 12 but the log has 11 entries" in rep["problems"][0]["message"]
    assert kinds(rep)[1] == ("hash_pages", built.size - 1)


def test_a_gap_in_the_entries_is_found(built):
    edit(built, "DELETE FROM entries WHERE idx = 4")
    rep = check(built)
    assert ("entry_index", 5) in kinds(rep)
    assert "entries 4..4 are missing" in rep["problems"][0]["message"]


def test_problems_are_capped(built):
    edit(built, "UPDATE readings SET flags = 1")
    rep = check(built, max_problems=2)
    assert rep["problems_total"] == 11 and len(rep["problems"]) == 2


def test_the_command_exits_by_the_report(built, capsys):
    assert cli.main(["check", "--db", str(built.db)]) == 0
    assert "12 entries, 11 readings from 2 devices: consistent" in capsys.readouterr().out
    edit(built, "UPDATE checkpoints SET root = zeroblob(32) WHERE size = 12")
    assert cli.main(["check", "--db", str(built.db)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("checkpoint_root: entry=11: ") and "1 problem(s)" in out
