"""C2SP signed notes (ledger_node.note) against the published vectors of Go's
golang.org/x/mod/sumdb/note, the C2SP spec and transparency-dev/formats
(tests/vectors/notes.json), and every malformed variant we know of.

Ed25519 is deterministic, so a published signer key must reproduce the
published note byte for byte. Expected values come from the vectors file or
are derived here with hashlib, base64 and PyNaCl directly, never from the
module under test.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from nacl.signing import VerifyKey

from ledger_node import note
from ledger_node.note import NoteError, Signer, Verifier

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "notes.json").read_text("utf-8"))
NOTES = {v["name"]: v for v in VECTORS["notes"]}
PETER = NOTES["go_peter_neumann"]
ENOCH = NOTES["go_enoch_root_second_signature"]
SIGNED = [v for v in VECTORS["notes"] if "skey" in v]
EM = "\u2014"

TEXT = PETER["text"]
PETER_SIG = PETER["note"][len(TEXT) + 1:]  # "— PeterNeumann ...\n"
ENOCH_SIG = ENOCH["note"][len(TEXT) + 1 + len(PETER_SIG):]


def peter() -> Verifier:
    return Verifier(PETER["vkey"])


def enoch() -> Verifier:
    return Verifier(ENOCH["vkey"])


def expect(fragment: str):
    return pytest.raises(NoteError, match=fragment)


# --- published vectors ----------------------------------------------------


@pytest.mark.parametrize("v", SIGNED, ids=lambda v: v["name"])
def test_signer_key_matches_published_verifier_key(v):
    s = Signer(v["skey"])
    assert s.name == v["key_name"]
    assert s.key_id == bytes.fromhex(v["key_id"])
    assert s.vkey == v["vkey"]


@pytest.mark.parametrize("v", SIGNED, ids=lambda v: v["name"])
def test_sign_reproduces_published_note_byte_for_byte(v):
    assert note.sign(v["text"], Signer(v["skey"])) == v["note"]


@pytest.mark.parametrize("v", VECTORS["notes"], ids=lambda v: v["name"])
def test_open_published_note(v):
    text, sigs = note.open_note(v["note"], [Verifier(v["vkey"])])
    assert text == v["text"]
    assert [(s.name, s.key_id.hex()) for s in sigs] == [(v["key_name"], v["key_id"])]


@pytest.mark.parametrize("v", VECTORS["notes"], ids=lambda v: v["name"])
def test_open_accepts_utf8_bytes(v):
    text, _ = note.open_note(v["note"].encode("utf-8"), [Verifier(v["vkey"])])
    assert text == v["text"]


def test_doubly_signed_note_verified_and_unknown_signatures():
    both = ENOCH["note"]
    text, sigs = note.open_note(both, [peter()])
    assert text == TEXT and [s.name for s in sigs] == ["PeterNeumann"]
    _, sigs = note.open_note(both, [peter(), enoch()])
    assert [(s.name, s.key_id.hex()) for s in sigs] == [("PeterNeumann", "c74f20a3"),
                                                         ("EnochRoot", "af0cfe78")]
    with expect(r"no signature by a known key "
                r"\(signed by PeterNeumann\+c74f20a3, EnochRoot\+af0cfe78\)"):
        note.open_note(both, [])


def test_split_gives_published_key_ids_and_signature_bytes():
    text, sigs = note.split(ENOCH["note"])
    assert text == TEXT
    raw = base64.b64decode(PETER_SIG.split(" ")[2])
    assert sigs[0] == ("PeterNeumann", bytes.fromhex("c74f20a3"), raw[4:])
    assert sigs[0].line == PETER_SIG
    assert sigs[1].name == "EnochRoot" and sigs[1].key_id == bytes.fromhex("af0cfe78")
    assert len(sigs[1].signature) == 64


@pytest.mark.parametrize("v", VECTORS["notes"] + VECTORS["vkeys"], ids=lambda v: v["vkey"][:20])
def test_key_id_is_sha256_of_name_type_and_key(v):
    name, hex_id, key64 = v["vkey"].split("+", 2)
    raw = base64.b64decode(key64)
    assert hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4].hex() == v["key_id"]  # the vector
    assert note.key_id(name, raw[0], raw[1:]) == bytes.fromhex(v["key_id"])  # our function


def test_c2sp_example_public_key():
    v = NOTES["c2sp_signed_note_example"]
    assert Verifier(v["vkey"]).public_key.hex() == v["public_key_hex"]


@pytest.mark.parametrize("v", [v for v in VECTORS["vkeys"] if v["alg"] == 1] + VECTORS["notes"],
                         ids=lambda v: v["vkey"][:20])
def test_verifier_key_round_trips(v):
    verifier = Verifier(v["vkey"])
    assert verifier.vkey == v["vkey"]
    assert verifier.name == v["key_name"] and verifier.key_id.hex() == v["key_id"]


@pytest.mark.parametrize("v", VECTORS["bad_vkeys"], ids=lambda v: v["why"])
def test_published_bad_verifier_keys_refused(v):
    with pytest.raises(NoteError):
        Verifier(v["vkey"])


def test_verify_method_on_published_signature():
    raw = base64.b64decode(PETER_SIG.split(" ")[2])
    v = peter()
    assert v.verify(TEXT, raw[4:]) is True
    assert v.verify(TEXT + "x\n", raw[4:]) is False
    flipped = bytes([raw[4] ^ 1]) + raw[5:]
    assert v.verify(TEXT, flipped) is False
    assert v.verify(TEXT, raw[4:-1]) is False


# --- key strings: every mangling refused (as Go's TestNewVerifier/TestNewSigner) ---


def _manglings(key: str):
    for i in range(len(key) + 1):
        for j in range(i + 1, len(key) + 1):
            if (i, j) != (0, len(key)):
                yield key[i:j]
    for i in range(len(key)):
        yield key[:i] + chr(ord(key[i]) + 1) + key[i + 1:]


def test_every_mangled_verifier_key_refused():
    accepted = []
    for k in _manglings(PETER["vkey"]):
        try:
            Verifier(k)
        except NoteError:
            continue
        accepted.append(k)
    assert accepted == []


def test_every_mangled_signer_key_refused():
    accepted = []
    for k in _manglings(PETER["skey"]):
        try:
            Signer(k)
        except NoteError:
            continue
        accepted.append(k)
    assert accepted == []


def test_signer_key_errors_never_show_the_secret():
    secret = PETER["skey"].split("+", 4)[4]
    for bad in (PETER["skey"].replace("c74f20a3", "c74f20a4"),
                PETER["skey"][:-2] + "==",
                PETER["skey"].replace("+AYEK", "+AoEK")):
        with pytest.raises(NoteError) as e:
            Signer(bad)
        assert secret not in str(e.value) and secret[:12] not in str(e.value)
    assert secret not in repr(Signer(PETER["skey"]))


def test_key_of_the_other_type_refused_with_clear_message():
    cosigner_vkey = next(v["vkey"] for v in VECTORS["vkeys"] if v["alg"] == 4)
    with expect(r"signature type cosignature/v1 Ed25519 \(0x04\), expected Ed25519 \(0x01\)"):
        Verifier(cosigner_vkey)
    seed = base64.b64decode(PETER["skey"].split("+", 4)[4])[1:]
    with expect("signature type cosignature/v1"):
        Signer(note.encode_skey("PeterNeumann", note.ALG_COSIGNATURE_V1, seed))


def test_invalid_curve_point_refused():
    name = "bad.example/point"
    point = bytes(32)  # the identity's encoding is y=0: not a usable public key
    with expect("not a valid Ed25519 public key"):
        Verifier(note.encode_vkey(name, note.ALG_ED25519, point))


@pytest.mark.parametrize("name", ["", "a+b", "a b", "a\tb", "a\u00a0b", "a\u2028b", "a\x00b"])
def test_invalid_key_names_refused(name):
    with pytest.raises(NoteError):
        note.generate_key(name)


def test_uppercase_hex_key_id_accepted_as_go_does():
    name, hex_id, key64 = PETER["vkey"].split("+", 2)
    v = Verifier(f"{name}+{hex_id.upper()}+{key64}")
    assert v.vkey == PETER["vkey"]


# --- round trips ----------------------------------------------------------


def test_generated_key_signs_and_opens():
    skey, vkey = note.generate_key("ledger.example/log")
    assert skey.startswith("PRIVATE+KEY+ledger.example/log+")
    name, hex_id, key64 = vkey.split("+", 2)
    raw = base64.b64decode(key64)
    assert name == "ledger.example/log" and raw[0] == 0x01 and len(raw) == 33
    assert hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4].hex() == hex_id
    s = Signer(skey)
    assert s.vkey == vkey and s.verifier() == Verifier(vkey)

    text = "origin\n1\nline with ünïcode and em dash \u2014 inside\n"
    signed = note.sign(text, s)
    line = signed[len(text) + 1:]
    assert line.startswith(f"{EM} ledger.example/log ") and line.endswith("\n")
    sig = base64.b64decode(line.split(" ")[2])
    assert sig[:4].hex() == hex_id and len(sig) == 68
    VerifyKey(raw[1:]).verify(text.encode(), sig[4:])  # independent Ed25519 check
    assert note.open_note(signed, [Verifier(vkey)])[0] == text


def test_text_with_blank_lines_round_trips():
    s = Signer(PETER["skey"])
    text = "first\n\nthird after a blank line\n"
    assert note.open_note(note.sign(text, s), [peter()])[0] == text


def test_many_signers_round_trip_and_identical_verifiers_are_not_ambiguous():
    keys = [note.generate_key(f"k{i}.example") for i in range(5)]
    signed = note.sign(TEXT, *[Signer(sk) for sk, _ in keys])
    verifiers = [Verifier(vk) for _, vk in keys]
    _, sigs = note.open_note(signed, verifiers + verifiers[:2])
    assert [s.name for s in sigs] == [f"k{i}.example" for i in range(5)]


# --- malformed notes: each refused with what is wrong ---------------------


@pytest.mark.parametrize("bad, fragment", [
    # Go's TestOpen badMsgs
    (TEXT, "no blank line"),
    (TEXT + "\n", "no signature lines"),
    (TEXT + "\n" + PETER_SIG[:-1], "does not end with a newline"),
    ("\x01" + TEXT + "\n" + PETER_SIG, "control character 0x01 at offset 0"),
    (TEXT + "\n" + PETER_SIG.replace("PeterNeumann", "Bad Name"),
     "signature of 'Bad' is not standard padded base64"),
    (TEXT + "\n" + PETER_SIG + "Unexpected line.\n", "does not start with an em dash"),
    # further variants
    (TEXT + "\n" + PETER_SIG.replace(EM, "-"), "does not start with an em dash"),
    (TEXT + "\n" + PETER_SIG.replace(EM + " ", EM), "does not start with an em dash"),
    (TEXT + "\n" + f"{EM} PeterNeumann\n", "no space between key name and signature"),
    (TEXT + "\n" + f"{EM}  x08go/ZJ==\n", "signature key name is empty"),
    (TEXT + "\n" + f"{EM} Peter+Neumann x08go/ZJkuBS9UG/Sffc\n", "contains '\\+'"),
    (TEXT + "\n" + PETER_SIG[:-2] + "\n", "not standard padded base64"),  # truncated
    (TEXT + "\n" + PETER_SIG[:-3] + "\n", "not standard padded base64"),  # truncated
    (TEXT + "\n" + PETER_SIG[:-4] + "B==\n", "not canonical base64"),
    (TEXT + "\n" + f"{EM} PeterNeumann x08g\n", "shorter than a key ID and a signature"),
    (TEXT + "\n" + f"{EM} PeterNeumann \n", "signature of 'PeterNeumann' is empty"),
    (TEXT.replace("\n", "\r\n") + "\r\n" + PETER_SIG.replace("\n", "\r\n"), "control character 0x0d"),
    # an extra blank line at the end
    (TEXT + "\n" + PETER_SIG + "\n", "no signature lines after its last blank line"),
    (TEXT + "\n" + PETER_SIG + f"{EM} \n", "no space between key name and signature"),
    ("", "no blank line"),
])
def test_malformed_note_refused(bad, fragment):
    with expect(fragment):
        note.split(bad)
    with expect(fragment):
        note.open_note(bad, [peter()])


def test_base64_truncated_at_a_quad_boundary_does_not_verify():
    # Four characters fewer is still base64, of a shorter signature.
    short = TEXT + "\n" + PETER_SIG[:-5] + "\n"
    assert len(note.split(short)[1][0].signature) == 88 // 4 * 3 - 4  # 88 base64 characters
    with expect(r"signature by PeterNeumann\+c74f20a3 does not verify"):
        note.open_note(short, [peter()])


def test_invalid_utf8_refused():
    with expect("not valid UTF-8"):
        note.open_note(b"\xff" + (TEXT + "\n" + PETER_SIG).encode(), [peter()])
    with expect("not valid UTF-8"):
        note.split(TEXT + "\ud800\n\n" + PETER_SIG)


def test_more_than_100_signatures_refused_even_without_known_keys():
    for verifiers in ([peter()], []):
        with expect("101 signatures, at most 100"):
            note.open_note(TEXT + "\n" + PETER_SIG * 101, verifiers)


def test_100_repeated_signatures_accepted_and_counted_once():
    _, sigs = note.open_note(TEXT + "\n" + PETER_SIG * 100, [peter()])
    assert len(sigs) == 1


def test_signature_over_other_text_refused():
    with expect(r"signature by PeterNeumann\+c74f20a3 does not verify"):
        note.open_note("another text\n\n" + PETER_SIG, [peter()])


def test_corrupted_signature_of_known_key_rejects_whole_note():
    # Go's TestOpen "Invalid signature": four characters inserted
    bad = TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with expect(r"signature by PeterNeumann\+c74f20a3 does not verify"):
        note.open_note(bad, [peter()])
    # a good EnochRoot signature does not rescue it
    with expect("PeterNeumann.*does not verify"):
        note.open_note(bad + ENOCH_SIG, [peter(), enoch()])


def test_wrong_key_id_is_an_unknown_key():
    # Go's wrongHash: the key ID no longer matches, so the line is ignored
    wrong = PETER_SIG.replace("x08g", "xxxx")
    with expect(r"no signature by a known key \(signed by PeterNeumann\+c7"):
        note.open_note(TEXT + "\n" + wrong, [peter()])
    misnamed = PETER_SIG.replace("PeterNeumann", "CarmenSandiego")
    with expect(r"no signature by a known key \(signed by CarmenSandiego\+c74f20a3\)"):
        note.open_note(TEXT + "\n" + misnamed, [peter()])


def test_unknown_key_refused():
    skey, _ = note.generate_key("stranger.example")
    signed = note.sign(TEXT, Signer(skey))
    with expect(r"no signature by a known key \(signed by stranger\.example\+"):
        note.open_note(signed, [peter()])


def test_extra_blank_lines_between_text_and_signatures_change_the_text():
    # The text ends at the last blank line: a second blank line becomes part of
    # the text, which the signature does not cover.
    with expect("PeterNeumann.*does not verify"):
        note.open_note(TEXT + "\n\n" + PETER_SIG, [peter()])
    # A blank line between two signatures moves the first into the text.
    split_sigs = TEXT + "\n" + PETER_SIG + "\n" + ENOCH_SIG
    with expect("EnochRoot.*does not verify"):
        note.open_note(split_sigs, [peter(), enoch()])
    with expect("no signature by a known key"):
        note.open_note(split_sigs, [peter()])


def test_ambiguous_verifiers_refused_when_used():
    impostor = SimpleNamespace(name="PeterNeumann", key_id=bytes.fromhex("c74f20a3"),
                               vkey="PeterNeumann+c74f20a3+other", verify=lambda text, sig: True)
    with expect(r"ambiguous key PeterNeumann\+c74f20a3"):
        note.open_note(PETER["note"], [peter(), impostor])
    # while no signature uses the shared key, the other keys still work
    example = NOTES["c2sp_signed_note_example"]
    opened = note.open_note(example["note"], [Verifier(example["vkey"]), peter(), impostor])
    assert opened[0] == example["text"]


# --- signing refuses what could not be opened ------------------------------


@pytest.mark.parametrize("text, fragment", [
    ("abc", "does not end with a newline"),
    ("", "does not end with a newline"),
    ("a\rb\n", "control character 0x0d"),
    ("tab\there\n", "control character 0x09"),
])
def test_sign_refuses_bad_text(text, fragment):
    with expect(fragment):
        note.sign(text, Signer(PETER["skey"]))
    with expect(fragment):
        Signer(PETER["skey"]).sign(text)


def test_sign_needs_a_signer_and_at_most_100():
    with expect("at least one signer"):
        note.sign(TEXT)
    s = Signer(PETER["skey"])
    with expect("101 signers"):
        note.sign(TEXT, *[s] * 101)


def test_parse_signature_line():
    sig = note.parse_signature_line(PETER_SIG)
    assert sig.name == "PeterNeumann" and sig.key_id.hex() == "c74f20a3"
    assert note.parse_signature_line(PETER_SIG[:-1]) == sig
    with expect("one line"):
        note.parse_signature_line(PETER_SIG + PETER_SIG)
