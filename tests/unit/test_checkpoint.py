"""Checkpoints, cosignature/v1 and the k-of-n policy (ledger_node.checkpoint).

The published vectors (tests/vectors/notes.json) include a real checkpoint of
a staging CT log with its Ed25519 log signature and four cosignatures by
public witnesses: our verifier must accept it as published and refuse every
alteration. Message formats are also checked independently with PyNaCl and
struct, so a shared mistake between signer and verifier can not pass.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path

import pytest
from nacl.signing import SigningKey, VerifyKey

from ledger_node import checkpoint as ckpt
from ledger_node import note
from ledger_node.checkpoint import (
    Checkpoint,
    CheckpointError,
    Cosigner,
    CosignatureVerifier,
    Policy,
    PolicyError,
)

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "notes.json").read_text("utf-8"))
REAL = VECTORS["cosigned_checkpoints"][0]
SOFA = VECTORS["cosignature_examples"][0]
EM = "\u2014"
ROOT = hashlib.sha256(b"\x00leaf").digest()


def real_policy(quorum: int, witnesses=None) -> Policy:
    ws = REAL["witnesses"] if witnesses is None else witnesses
    return Policy(note.Verifier(REAL["log_vkey"]), [CosignatureVerifier(w["vkey"]) for w in ws], quorum)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Log:
    """A log key and witnesses made fresh for a test."""

    def __init__(self, origin: str = "ledger.example/log", witnesses: int = 3):
        skey, self.vkey = note.generate_key(origin)
        self.signer = note.Signer(skey)
        self.cosigners = [Cosigner(ckpt.generate_cosigner_key(f"w{i}.example")[0])
                          for i in range(witnesses)]

    def policy(self, quorum: int) -> Policy:
        return Policy(note.Verifier(self.vkey), [c.verifier() for c in self.cosigners], quorum)

    def checkpoint(self, size: int = 7, root: bytes = ROOT) -> Checkpoint:
        return Checkpoint(self.signer.name, size, root)

    def signed(self, cp: Checkpoint, cosigners=(), timestamp: int = 1_767_225_600) -> str:
        lines = [c.cosign(cp, timestamp) for c in cosigners]
        return ckpt.add_cosignatures(ckpt.sign_checkpoint(cp, self.signer), lines)


# --- checkpoint body ------------------------------------------------------


def test_go_tlog_tree_vector():
    v = next(c for c in VECTORS["checkpoints"] if c["name"] == "go_tlog_format_tree")
    root = hashlib.sha256(b"\x00" + v["root_is_leaf_hash_of"].encode()).digest()
    cp = Checkpoint.parse(v["text"])
    assert (cp.origin, cp.size, cp.root, cp.extensions) == (v["origin"], v["size"], root, ())
    assert Checkpoint(v["origin"], v["size"], root).body() == v["text"]


@pytest.mark.parametrize("v", VECTORS["checkpoints"], ids=lambda v: v["name"])
def test_published_checkpoints_parse_and_round_trip(v):
    cp = Checkpoint.parse(v["text"])
    assert (cp.origin, cp.size) == (v["origin"], v["size"])
    assert cp.body() == v["text"]


@pytest.mark.parametrize("v", VECTORS["bad_checkpoints"], ids=lambda v: v["why"])
def test_published_bad_checkpoints_refused(v):
    with pytest.raises(CheckpointError):
        Checkpoint.parse(v["text"])


R64 = b64(ROOT)


@pytest.mark.parametrize("text, fragment", [
    ("", "does not end with a newline"),
    ("log\n1\n", "has 2 line"),
    ("log\n", "has 1 line"),
    ("\n1\n" + R64 + "\n", "origin is empty"),
    ("log\n01\n" + R64 + "\n", "without sign or leading zeros"),
    ("log\n00\n" + R64 + "\n", "without sign or leading zeros"),
    ("log\n+1\n" + R64 + "\n", "without sign or leading zeros"),
    ("log\n-0\n" + R64 + "\n", "without sign or leading zeros"),
    ("log\n 1\n" + R64 + "\n", "without sign or leading zeros"),
    ("log\n1_000\n" + R64 + "\n", "without sign or leading zeros"),
    ("log\n\u0661\n" + R64 + "\n", "without sign or leading zeros"),  # Arabic-Indic digit one
    ("log\n\n" + R64 + "\n", "without sign or leading zeros"),
    ("log\n18446744073709551616\n" + R64 + "\n", "larger than 2\\^64-1"),
    ("log\n1\n" + b64(ROOT[:31]) + "\n", "root hash is 31 bytes"),
    ("log\n1\n" + b64(ROOT + b"\x00") + "\n", "root hash is 33 bytes"),
    ("log\n1\n" + R64[:-1] + "\n", "not standard padded base64"),
    # the character before "=" carries 2 unused bits; setting one keeps the bytes
    ("log\n1\n" + R64[:-2] + chr(ord(R64[-2]) + 1) + "=\n", "not canonical base64"),
    ("log\n1\n\n", "root hash is empty"),
    ("log\n1\n" + R64 + "\n\n", "extension line 1 is empty"),
    ("log\n1\n" + R64 + "\next\n\n", "extension line 2 is empty"),
    ("log\n1\n" + R64, "does not end with a newline"),
    ("log\r\n1\n" + R64 + "\n", "control character 0x0d"),
])
def test_malformed_checkpoint_refused(text, fragment):
    with pytest.raises(CheckpointError, match=fragment):
        Checkpoint.parse(text)


def test_size_bounds_and_extensions_round_trip():
    top = Checkpoint.parse(f"log\n18446744073709551615\n{R64}\n")
    assert top.size == 2**64 - 1
    assert Checkpoint.parse(f"log\n0\n{R64}\n").size == 0
    text = f"example.com/log 42\n3\n{R64}\nfirst extension\nsecond \u2014 one\n"
    cp = Checkpoint.parse(text)
    assert cp.extensions == ("first extension", "second \u2014 one")
    assert cp.body() == text


@pytest.mark.parametrize("kwargs, fragment", [
    ({"origin": ""}, "origin is empty"),
    ({"origin": "a\nb"}, "origin contains a newline"),
    ({"size": -1}, "not an integer in 0..2\\^64-1"),
    ({"size": 2**64}, "not an integer"),
    ({"size": True}, "not an integer"),
    ({"root": ROOT[:16]}, "not 32 bytes"),
    ({"extensions": ("",)}, "extension line 1 is empty"),
    ({"extensions": ("a\nb",)}, "not one line"),
    ({"extensions": ("bell\x07",)}, "control character 0x07"),
])
def test_checkpoint_constructor_refuses(kwargs, fragment):
    args = {"origin": "log", "size": 1, "root": ROOT} | kwargs
    with pytest.raises(CheckpointError, match=fragment):
        Checkpoint(**args)


# --- cosignature/v1 format ------------------------------------------------


def test_c2sp_cosignature_signed_message_and_timestamp():
    assert ckpt.cosignature_message(SOFA["body"], SOFA["timestamp"]) == SOFA["signed_message"].encode()
    text, sigs = note.split(SOFA["note"])
    assert text == SOFA["body"]
    witness = next(s for s in sigs if s.name == SOFA["witness"])
    assert ckpt.cosignature_timestamp(witness.signature) == SOFA["timestamp"]


@pytest.mark.parametrize("v", VECTORS["cosignature_timestamps"], ids=lambda v: str(v["timestamp"]))
def test_transparency_dev_timestamp_vectors(v):
    sig = base64.b64decode(v["base64"])[4:]
    if v["timestamp"] is None:
        with pytest.raises(CheckpointError, match="72 bytes after the key ID, got 64"):
            ckpt.cosignature_timestamp(sig)
    else:
        assert ckpt.cosignature_timestamp(sig) == v["timestamp"]


def test_published_cosigner_key_parses_with_its_id():
    v = next(k for k in VECTORS["vkeys"] if k["alg"] == 4)
    w = CosignatureVerifier(v["vkey"])
    assert (w.name, w.key_id.hex(), w.vkey) == (v["key_name"], v["key_id"], v["vkey"])


def test_generated_cosigner_key_uses_type_4_in_id_and_encoding():
    skey, vkey = ckpt.generate_cosigner_key("witness.example/w1")
    name, hex_id, key64 = vkey.split("+", 2)
    raw = base64.b64decode(key64)
    assert raw[0] == 0x04 and len(raw) == 33
    assert hashlib.sha256(name.encode() + b"\n" + b"\x04" + raw[1:]).digest()[:4].hex() == hex_id
    sname, shex, seed64 = skey.split("+", 4)[2:]
    seed = base64.b64decode(seed64)
    assert (sname, shex, seed[0]) == (name, hex_id, 0x04)
    assert bytes(SigningKey(seed[1:]).verify_key) == raw[1:]
    assert Cosigner(skey).vkey == vkey


def test_cosignature_line_layout_checked_independently():
    skey, vkey = ckpt.generate_cosigner_key("witness.example/w1")
    cp = Checkpoint("ledger.example/log", 12, ROOT, ("ext",))
    line = Cosigner(skey).cosign(cp, 1_767_225_600)
    assert line.startswith(f"{EM} witness.example/w1 ") and line.endswith("\n")
    raw = base64.b64decode(line.split(" ")[2])
    kid, (ts,), sig = raw[:4], struct.unpack(">Q", raw[4:12]), raw[12:]
    assert len(raw) == 76 and kid.hex() == vkey.split("+")[1] and ts == 1_767_225_600
    message = (b"cosignature/v1\ntime 1767225600\nledger.example/log\n12\n"
               + b64(ROOT).encode() + b"\next\n")
    pub = base64.b64decode(vkey.split("+", 2)[2])[1:]
    VerifyKey(pub).verify(message, sig)  # raises if the message format were wrong
    assert CosignatureVerifier(vkey).verify(cp.body(), raw[4:]) == 1_767_225_600


def test_cosignature_timestamp_bounds():
    skey, vkey = ckpt.generate_cosigner_key("w.example")
    c, v = Cosigner(skey), CosignatureVerifier(vkey)
    cp = Checkpoint("log", 1, ROOT)
    zero = note.parse_signature_line(c.cosign(cp, 0))
    assert v.verify(cp.body(), zero.signature) == 0
    for bad in (-1, 2**63, 1.5, True):
        with pytest.raises(CheckpointError, match="timestamp"):
            c.cosign(cp, bad)
    # A timestamp of 2^63 signed by the key itself is still refused.
    seed = base64.b64decode(skey.split("+", 4)[4])[1:]
    message = b"cosignature/v1\ntime 9223372036854775808\n" + cp.body().encode()
    sig = SigningKey(seed).sign(message).signature
    assert v.verify(cp.body(), struct.pack(">Q", 2**63) + sig) is None
    with pytest.raises(CheckpointError, match="larger than 2\\^63-1"):
        ckpt.cosignature_timestamp(struct.pack(">Q", 2**63) + sig)


def test_cosignature_for_one_checkpoint_refused_on_another():
    log = Log(witnesses=1)
    w = log.cosigners[0]
    cp1, cp2 = log.checkpoint(7), log.checkpoint(8)
    line = w.cosign(cp1, 1_767_225_600)
    sig = note.parse_signature_line(line).signature
    assert w.verifier().verify(cp1.body(), sig) == 1_767_225_600
    assert w.verifier().verify(cp2.body(), sig) is None
    assert w.verifier().verify(Checkpoint(cp1.origin, 7, ROOT, ("x",)).body(), sig) is None
    moved = ckpt.add_cosignatures(ckpt.sign_checkpoint(cp2, log.signer), [line])
    with pytest.raises(CheckpointError,
                       match=r"has 0 valid cosignature\(s\) from policy witnesses, 1 needed \(cosigned "
                             r"by: none; cosignatures that do not verify: w0.example\)"):
        ckpt.verify_checkpoint(moved, log.policy(1))


def test_altered_timestamp_does_not_verify():
    log = Log(witnesses=1)
    cp = log.checkpoint()
    sig = note.parse_signature_line(log.cosigners[0].cosign(cp, 1000)).signature
    later = struct.pack(">Q", 1001) + sig[8:]
    assert log.cosigners[0].verifier().verify(cp.body(), later) is None


def test_plain_note_keys_refused_as_witness_keys_and_back():
    plain = next(k["vkey"] for k in VECTORS["vkeys"] if k["alg"] == 1)
    with pytest.raises(note.NoteError, match=r"type Ed25519 \(0x01\), expected cosignature/v1"):
        CosignatureVerifier(plain)
    skey, _ = note.generate_key("log.example")
    with pytest.raises(note.NoteError, match=r"type Ed25519 \(0x01\), expected cosignature/v1"):
        Cosigner(skey)
    cosigner_vkey = next(k["vkey"] for k in VECTORS["vkeys"] if k["alg"] == 4)
    with pytest.raises(note.NoteError, match=r"expected Ed25519 \(0x01\)"):
        note.Verifier(cosigner_vkey)


def test_note_signature_by_a_witness_name_does_not_count():
    # A type 0x01 key with the witness's name has another key ID: ignored.
    log = Log(witnesses=1)
    cp = log.checkpoint()
    impostor = note.Signer(note.generate_key("w0.example")[0])
    signed = ckpt.add_cosignatures(ckpt.sign_checkpoint(cp, log.signer), [])
    signed += impostor.sign(cp.body())
    with pytest.raises(CheckpointError,
                       match=r"0 valid cosignature\(s\).*1 needed \(cosigned by: none\)"):
        ckpt.verify_checkpoint(signed, log.policy(1))


# --- the real witnessed checkpoint ----------------------------------------


def test_real_checkpoint_verifies_with_all_four_witnesses():
    cp, names = ckpt.verify_checkpoint(REAL["note"], real_policy(4))
    assert cp.body() == REAL["body"]
    assert cp.origin == "arche2025h1.staging.ct.transparency.dev" and cp.size == 1432088532
    assert names == [CosignatureVerifier(w["vkey"]).name for w in REAL["witnesses"]]


def test_real_cosignature_timestamps():
    got = ckpt.cosigned_by(REAL["note"], [CosignatureVerifier(w["vkey"]) for w in REAL["witnesses"]])
    assert list(got.values()) == [w["timestamp"] for w in REAL["witnesses"]]


def test_real_cosignature_opens_through_open_note():
    remora = next(CosignatureVerifier(w["vkey"]) for w in REAL["witnesses"]
                  if w["vkey"].startswith("remora.n621.de+"))
    text, sigs = note.open_note(REAL["note"], [remora])
    assert text == REAL["body"] and [s.name for s in sigs] == ["remora.n621.de"]
    altered = REAL["note"].replace("\n1432088532\n", "\n1432088531\n")
    with pytest.raises(note.NoteError, match=r"remora.n621.de\+da77ade7 does not verify"):
        note.open_note(altered, [remora])


def test_real_checkpoint_with_a_cosignature_removed_misses_quorum():
    lines = REAL["note"].splitlines(keepends=True)
    without = "".join(line for line in lines if not line.startswith(f"{EM} remora.n621.de "))
    assert ckpt.verify_checkpoint(without, real_policy(3))[1] == [
        "transparency.dev/DEV:witness-little-garden", "witness1.smartit.nu/witness1",
        "witness.stagemole.eu"]
    with pytest.raises(CheckpointError,
                       match=r"has 3 valid cosignature\(s\) from policy witnesses, 4 needed"):
        ckpt.verify_checkpoint(without, real_policy(4))


@pytest.mark.parametrize("old, new", [
    ("\n1432088532\n", "\n1432088533\n"),
    ("U7WM79jr", "U7WM79js"),
    ("arche2025h1.staging.ct.transparency.dev\n1", "arche2025h1.staging.ct.transparency.dev \n1"),
])
def test_real_checkpoint_altered_body_refused(old, new):
    altered = REAL["note"].replace(old, new, 1)
    with pytest.raises(CheckpointError, match=r"signature by arche2025h1.staging.ct.transparency.dev"
                                              r"\+ba2f06c0 does not verify"):
        ckpt.verify_checkpoint(altered, real_policy(1))


def test_real_checkpoint_without_log_signature_refused():
    lines = REAL["note"].splitlines(keepends=True)
    log_line = f"{EM} arche2025h1.staging.ct.transparency.dev ui8G"
    without = "".join(line for line in lines if not line.startswith(log_line))
    with pytest.raises(CheckpointError, match=r"not a checkpoint of log arche2025h1.*ba2f06c0: "
                                              "note has no signature by a known key"):
        ckpt.verify_checkpoint(without, real_policy(0))


def test_real_checkpoint_under_another_log_key_refused():
    other = Policy(note.Verifier(note.generate_key("arche2025h1.staging.ct.transparency.dev")[1]), [], 0)
    with pytest.raises(CheckpointError, match="no signature by a known key"):
        ckpt.verify_checkpoint(REAL["note"], other)


# --- signing, cosigning and quorum with fresh keys ------------------------


def test_sign_cosign_verify_round_trip():
    log = Log(witnesses=3)
    cp = log.checkpoint(12345)
    signed = log.signed(cp, log.cosigners[:2])
    assert signed.startswith(cp.body() + "\n" + f"{EM} ledger.example/log ")
    got, names = ckpt.verify_checkpoint(signed, log.policy(2))
    assert got == cp and names == ["w0.example", "w1.example"]
    assert ckpt.verify_checkpoint(signed, log.policy(0))[1] == ["w0.example", "w1.example"]
    with pytest.raises(CheckpointError, match=r"has 2 valid cosignature\(s\) from policy witnesses, "
                                              r"3 needed "
                                              r"\(cosigned by: w0.example, w1.example\)"):
        ckpt.verify_checkpoint(signed, log.policy(3))


def test_quorum_zero_needs_only_the_log_signature():
    log = Log(witnesses=0)
    cp = log.checkpoint(0, hashlib.sha256(b"").digest())
    assert ckpt.verify_checkpoint(ckpt.sign_checkpoint(cp, log.signer), log.policy(0)) == (cp, [])


def test_repeated_cosignature_of_one_witness_counts_once():
    log = Log(witnesses=2)
    cp = log.checkpoint()
    signed = ckpt.sign_checkpoint(cp, log.signer)
    w0 = log.cosigners[0]
    twice = signed + w0.cosign(cp, 100) + w0.cosign(cp, 200)
    with pytest.raises(CheckpointError, match=r"has 1 valid cosignature\(s\).*2 needed"):
        ckpt.verify_checkpoint(twice, log.policy(2))


def test_cosigner_can_sign_through_note_sign():
    log = Log(witnesses=1)
    cp = log.checkpoint()
    signed = note.sign(cp.body(), log.signer, log.cosigners[0])
    assert ckpt.verify_checkpoint(signed, log.policy(1))[1] == ["w0.example"]


def test_origin_must_be_the_log_key_name():
    log = Log()
    cp = Checkpoint("another.example/log", 1, ROOT)
    with pytest.raises(CheckpointError,
                       match="log key name 'ledger.example/log' is not the checkpoint origin"):
        ckpt.sign_checkpoint(cp, log.signer)
    signed = note.sign(cp.body(), log.signer)  # signed anyway, by hand
    with pytest.raises(CheckpointError, match="origin 'another.example/log' is not the log's key name"):
        ckpt.verify_checkpoint(signed, log.policy(0))


def test_log_signed_text_that_is_not_a_checkpoint_refused():
    log = Log()
    signed = note.sign("ledger.example/log\n1\n", log.signer)
    with pytest.raises(CheckpointError, match="needs origin, tree size and root hash"):
        ckpt.verify_checkpoint(signed, log.policy(0))


def test_malformed_note_refused_as_checkpoint_error():
    log = Log()
    signed = log.signed(log.checkpoint())
    for bad in (signed[:-1], signed.replace(EM, "-"), signed + "\n"):
        with pytest.raises(CheckpointError, match="malformed checkpoint note"):
            ckpt.verify_checkpoint(bad, log.policy(0))


def test_invalid_line_of_one_witness_does_not_sink_a_quorum():
    log = Log(witnesses=3)
    cp = log.checkpoint()
    good = log.signed(cp, log.cosigners[:2])
    forged = note.signature_line("w2.example", log.cosigners[2].key_id, bytes(72))
    cp_out, names = ckpt.verify_checkpoint(good + forged, log.policy(2))
    assert names == ["w0.example", "w1.example"]
    with pytest.raises(CheckpointError, match="cosignatures that do not verify: w2.example"):
        ckpt.verify_checkpoint(good + forged, log.policy(3))


def test_add_cosignatures_is_idempotent_and_checks_lines():
    log = Log(witnesses=2)
    cp = log.checkpoint()
    signed = ckpt.sign_checkpoint(cp, log.signer)
    lines = [c.cosign(cp, 5) for c in log.cosigners]
    once = ckpt.add_cosignatures(signed, lines)
    assert once == signed + "".join(lines)
    assert ckpt.add_cosignatures(once, lines) == once
    assert ckpt.add_cosignatures(once, [log.cosigners[0].cosign(cp, 6)]) == once  # the first stays
    with pytest.raises(CheckpointError,
                       match="not a cosignature/v1 signature \\(64 bytes after the key ID"):
        ckpt.add_cosignatures(signed, [log.signer.sign(cp.body())])
    with pytest.raises(CheckpointError, match="does not start with an em dash"):
        ckpt.add_cosignatures(signed, ["- w0.example AAAA\n"])
    with pytest.raises(CheckpointError, match="no blank line"):
        ckpt.add_cosignatures(cp.body(), lines)


def test_add_cosignatures_keeps_at_most_100_signatures():
    log = Log(witnesses=0)
    cp = log.checkpoint()
    signed = ckpt.sign_checkpoint(cp, log.signer)
    lines = [note.signature_line(f"w{i}.example", i.to_bytes(4, "big"), bytes(72)) for i in range(99)]
    full = ckpt.add_cosignatures(signed, lines)
    assert len(note.split(full)[1]) == 100
    with pytest.raises(CheckpointError, match="101 signatures, at most 100"):
        ckpt.add_cosignatures(full, [note.signature_line("one.more", b"\0\0\0\1", bytes(72))])
    # repeated lines of one key count as lines
    repeated = ckpt.add_cosignatures(signed, lines[:97]) + lines[0] + lines[1]
    assert len(note.split(repeated)[1]) == 100
    with pytest.raises(CheckpointError, match="101 signatures, at most 100"):
        ckpt.add_cosignatures(repeated, [lines[97]])


# --- policy ---------------------------------------------------------------


def policy_text(log_vkey: str, witnesses: list[str], quorum=1, extra: str = "") -> str:
    items = ", ".join(json.dumps(w) for w in witnesses)
    return f'log = "{log_vkey}"\nquorum = {quorum}\nwitnesses = [{items}]\n{extra}'


def test_policy_file_loads(tmp_path):
    log = Log(witnesses=2)
    path = tmp_path / "policy.toml"
    path.write_text("# who we trust\n" + policy_text(log.vkey, [c.vkey for c in log.cosigners], 2))
    p = ckpt.load_policy(path)
    assert p.log.vkey == log.vkey and p.quorum == 2
    assert [w.vkey for w in p.witnesses] == [c.vkey for c in log.cosigners]
    signed = log.signed(log.checkpoint(), log.cosigners)
    assert ckpt.verify_checkpoint(signed, p)[1] == ["w0.example", "w1.example"]


def test_real_policy_text():
    text = policy_text(REAL["log_vkey"], [w["vkey"] for w in REAL["witnesses"]], 3)
    assert len(ckpt.verify_checkpoint(REAL["note"], ckpt.parse_policy(text))[1]) == 4


def test_policy_without_witnesses_key_means_log_only():
    log = Log(witnesses=0)
    p = ckpt.parse_policy(f'log = "{log.vkey}"\nquorum = 0\n')
    assert p.witnesses == [] and p.quorum == 0


def errors_of(text: str) -> dict[str, str]:
    with pytest.raises(PolicyError) as e:
        ckpt.parse_policy(text, "p.toml")
    for key, message in e.value.errors:
        assert f"p.toml: {key}: {message}" in str(e.value)
    return dict(e.value.errors)


def test_policy_reports_every_error_with_its_key():
    log = Log(witnesses=2)
    w0, w1 = (c.vkey for c in log.cosigners)
    dup_name = note.encode_vkey("w0.example", 4, bytes(SigningKey.generate().verify_key))
    same_key = note.encode_vkey("w9.example", 4, log.cosigners[1].public_key)
    text = (f'log = "{w0}"\nquorum = 9\nwitnesses = ["{w0}", "{w1}", "{dup_name}", "{same_key}", '
            f'"nonsense", 3, "{log.vkey}"]\nlogs = "typo"\n')
    errors = errors_of(text)
    assert set(errors) == {"logs", "log", "quorum", "witnesses[2]", "witnesses[3]", "witnesses[4]",
                           "witnesses[5]", "witnesses[6]"}
    assert "unknown key" in errors["logs"]
    assert "expected Ed25519 (0x01)" in errors["log"]
    assert errors["quorum"] == "9 is more than the 7 witness(es) listed"
    assert errors["witnesses[2]"] == "witness name 'w0.example' is also witnesses[0]"
    assert "same public key as witnesses[1]" in errors["witnesses[3]"]
    assert "not <name>+<key ID>+<base64 key>" in errors["witnesses[4]"]
    assert errors["witnesses[5]"] == "must be a verifier key string, got an integer"
    assert "expected cosignature/v1 Ed25519 (0x04)" in errors["witnesses[6]"]


@pytest.mark.parametrize("quorum, message", [
    ("-1", "-1 is negative"),
    ("3", "3 is more than the 2 witness(es) listed"),
    ("true", "must be an integer, got bool"),
    ('"2"', "must be an integer, got str"),
    ("1.0", "must be an integer, got float"),
])
def test_policy_quorum_errors(quorum, message):
    log = Log(witnesses=2)
    errors = errors_of(policy_text(log.vkey, [c.vkey for c in log.cosigners], quorum))
    assert errors == {"quorum": message}


def test_policy_missing_and_mistyped_keys():
    assert set(errors_of("")) == {"log", "quorum"}
    log = Log(witnesses=1)
    errors = errors_of(f'log = 5\nquorum = 1\nwitnesses = "{log.cosigners[0].vkey}"\n')
    assert errors["log"] == "must be a verifier key string, got an integer"
    assert errors["witnesses"] == "must be a list of verifier key strings, got a string"
    assert errors["quorum"] == "1 is more than the 0 witness(es) listed"


def test_policy_refuses_the_log_as_its_own_witness():
    log = Log(witnesses=1)
    own = note.encode_vkey("log-as-witness.example", 4, log.signer.public_key)
    errors = errors_of(policy_text(log.vkey, [own], 1))
    assert errors == {"witnesses[0]": "is the log's own key; a log can not witness itself"}


def test_policy_toml_syntax_error():
    assert list(errors_of("log = \n")) == ["toml"]


def test_load_policy_missing_file(tmp_path):
    with pytest.raises(PolicyError, match=r"missing\.toml: file: can not be read"):
        ckpt.load_policy(tmp_path / "missing.toml")


def test_policy_constructor_validates():
    log = Log(witnesses=1)
    w = log.cosigners[0].verifier()
    with pytest.raises(PolicyError, match="quorum: 2 is more than the 1 witness"):
        Policy(note.Verifier(log.vkey), [w], 2)
    with pytest.raises(PolicyError,
                       match="witnesses\\[1\\]: witness name 'w0.example' is also witnesses\\[0\\]"):
        Policy(note.Verifier(log.vkey), [w, w], 1)
    with pytest.raises(PolicyError, match="witnesses\\[0\\]: must be a CosignatureVerifier"):
        Policy(note.Verifier(log.vkey), [note.Verifier(log.vkey)], 0)
