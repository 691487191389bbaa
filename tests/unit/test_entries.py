"""Log entries (ledger_node.entries): their bytes, and the registry of device keys.

Expected bytes are assembled here with struct from the layout table of the
design (type byte, big-endian integers, length-prefixed strings), never taken
from encode(). Bundles are built with meter.frame and signed with real
Ed25519 keys (PyNaCl), the way the firmware signs them.
"""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from ledger_node import entries as E
from meter import frame

EUI = bytes.fromhex("70b3d57ed0000001")
EUI2 = bytes.fromhex("70b3d57ed0000002")
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
OWNER = "9f86d081884c7d65"  # 16 hex digits
INTERVAL = 900

FUZZ = settings(max_examples=150, derandomize=True, deadline=None)


def signing_key(n: int) -> SigningKey:
    return SigningKey(bytes([n]) * 32)


KEY_A, KEY_B, KEY_C = signing_key(1), signing_key(2), signing_key(3)
PK_A, PK_B, PK_C = (bytes(k.verify_key) for k in (KEY_A, KEY_B, KEY_C))


def reading(seq: int) -> tuple:
    return (seq, T0 + INTERVAL * seq, 1000 * seq, 0, 0)


def bundle(key: SigningKey, *seqs: int, sign_as: bytes = EUI) -> bytes:
    """A bundle of consecutive readings signed as the meter does."""
    body = frame.encode_body([reading(s) for s in seqs])
    return body + key.sign(frame.signed_message(sign_as, body)).signature


def enroll(dev=EUI, key=PK_A, **kw) -> E.Enroll:
    fields = dict(at=T0, ct_rating_a=60, meter_model="emon-ct4", board="esp32-c3",
                  community="lindenhof", owner=OWNER)
    fields.update(kw)
    return E.Enroll(dev, key, **fields)


def lstr(length_byte: int, text: bytes) -> bytes:
    """A length-prefixed string, the length written out by the caller."""
    assert length_byte == len(text)  # guards the test's own arithmetic
    return bytes([length_byte]) + text


# -- an independent Ed25519 point decoder (RFC 8032 section 5.1.3) ----------------

P = 2**255 - 19
D = -121665 * pow(121666, P - 2, P) % P


def on_curve(y: int) -> bool:
    """True when some x puts (x, y) on edwards25519."""
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * pow(2, (P - 1) // 4, P) % P
    return (x * x - x2) % P == 0


OFF_CURVE_Y = next(y for y in range(2, 100) if not on_curve(y))
OFF_CURVE_KEY = OFF_CURVE_Y.to_bytes(32, "little")
IDENTITY_KEY = (1).to_bytes(32, "little")  # the neutral point: order 1


# -- byte layouts -------------------------------------------------------------------

def test_readings_layout_is_type_eui_and_the_bundle_exactly():
    data = bundle(KEY_A, 7)
    want = b"\x01" + EUI + data
    assert len(data) == 83 and len(want) == 92
    assert E.encode(E.ReadingsEntry(EUI, data)) == want
    assert E.readings_entry(EUI, data) == want
    entry = E.decode(want)
    assert entry == E.ReadingsEntry(EUI, data)
    b = entry.decoded()
    assert (b.first_seq, b.last_seq, b.signature) == (7, 7, data[-64:])
    assert b.readings[0].as_dict() == {"seq": 7, "t_end": T0 + 6300, "import_dwh": 7000,
                                       "export_dwh": 0, "flags": 0}


def test_enroll_layout():
    e = enroll(at=T0 + 5, ct_rating_a=100, meter_model="SDM120 clone", board="",
               community="solar_2", owner="ab" * 32)
    want = (struct.pack(">B8s32sIH", 0x02, EUI, PK_A, T0 + 5, 100)
            + lstr(12, b"SDM120 clone") + lstr(0, b"") + lstr(7, b"solar_2")
            + lstr(64, b"ab" * 32))
    assert E.encode(e) == want
    assert len(want) == 1 + 8 + 32 + 4 + 2 + 13 + 1 + 8 + 65
    assert E.decode(want) == e


def test_enroll_layout_written_out_in_hex():
    e = E.Enroll(EUI, PK_A, 0x01020304, 0x0506, "m", "b", "c", "0123456789abcdef")
    want = bytes.fromhex("02" "70b3d57ed0000001" + PK_A.hex() + "01020304" "0506"
                         "016d" "0162" "0163" "10" + b"0123456789abcdef".hex())
    assert E.encode(e) == want and E.decode(want) == e


def test_rotate_layout():
    r = E.Rotate(EUI, PK_B, T0 + 60, 0x00ABCDEF)
    want = struct.pack(">B8s32sII", 0x03, EUI, PK_B, T0 + 60, 0x00ABCDEF)
    assert len(want) == 49
    assert E.encode(r) == want and E.decode(want) == r


@pytest.mark.parametrize("name,code", [("unspecified", 0), ("key_compromise", 1),
                                       ("decommissioned", 2), ("replaced", 3)])
def test_revoke_layout_and_reason_codes(name, code):
    r = E.Revoke(EUI, T0 + 99, name)
    want = struct.pack(">B8sIB", 0x04, EUI, T0 + 99, code)
    assert len(want) == 14
    assert E.encode(r) == want and E.decode(want) == r
    assert E.REVOKE_REASONS[name] == code


def test_type_constants():
    assert (E.TYPE_READINGS, E.TYPE_ENROLL, E.TYPE_ROTATE, E.TYPE_REVOKE) == (1, 2, 3, 4)


def test_decode_takes_bytearray_and_memoryview():
    data = struct.pack(">B8s32sII", 0x03, EUI, PK_B, 5, 6)
    assert E.decode(bytearray(data)) == E.decode(memoryview(data)) == E.Rotate(EUI, PK_B, 5, 6)
    with pytest.raises(TypeError):
        E.decode(data.hex())


# -- roundtrips -------------------------------------------------------------------

public_keys = st.binary(min_size=32, max_size=32).map(lambda s: bytes(SigningKey(s).verify_key))
euis = st.binary(min_size=8, max_size=8)
u32 = st.integers(0, 2**32 - 1)
texts = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)

enrolls = st.builds(E.Enroll, euis, public_keys, u32, st.integers(1, 65535), texts, texts,
                    st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True),
                    st.from_regex(r"[0-9a-f]{16,64}", fullmatch=True))
rotates = st.builds(E.Rotate, euis, public_keys, u32, u32)
revokes = st.builds(E.Revoke, euis, u32, st.sampled_from(sorted(E.REVOKE_REASONS)))


@st.composite
def readings_entries(draw):
    """A decodable bundle of 1..32 readings (signature bytes arbitrary: decode
    does not verify)."""
    n = draw(st.integers(1, frame.MAX_READINGS))
    seq = draw(st.integers(0, 2**32 - n))
    t, imp, exp = (draw(st.integers(0, 2**31)) for _ in range(3))
    rs = []
    for k in range(n):
        rs.append((seq + k, t, imp, exp, draw(st.integers(0, 255))))
        t += draw(st.integers(1, 2**20))
        imp += draw(st.integers(0, 2**20))
        exp += draw(st.integers(0, 2**20))
    data = frame.encode_body(rs) + draw(st.binary(min_size=64, max_size=64))
    return E.ReadingsEntry(draw(euis), data)


any_entry = st.one_of(readings_entries(), enrolls, rotates, revokes)


@FUZZ
@given(any_entry)
def test_roundtrip_is_exact(entry):
    data = E.encode(entry)
    back = E.decode(data)
    assert back == entry and type(back) is type(entry)
    assert E.encode(back) == data
    assert data[0] == {E.ReadingsEntry: 1, E.Enroll: 2, E.Rotate: 3, E.Revoke: 4}[type(entry)]


@FUZZ
@given(any_entry)
def test_every_truncation_is_refused(entry):
    data = E.encode(entry)
    for n in range(len(data)):
        with pytest.raises(E.EntryError) as exc:
            E.decode(data[:n])
        if isinstance(entry, E.ReadingsEntry) and n > 9:
            # The bundle's own codec speaks once there is a bundle to read.
            assert exc.value.reason == "truncated"
        else:
            assert exc.value.reason == "entry_truncated", (n, exc.value)


@FUZZ
@given(any_entry, st.binary(min_size=1, max_size=20))
def test_every_trailing_byte_is_refused(entry, extra):
    data = E.encode(entry) + extra
    with pytest.raises(E.EntryError) as exc:
        E.decode(data)
    # Bytes after a bundle shift where its signature begins: frame refuses
    # the body then as longer than its readings.
    want = "oversized" if isinstance(entry, E.ReadingsEntry) else "entry_trailing"
    assert exc.value.reason == want


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_entry_error(data):
    try:
        entry = E.decode(data)
    except E.EntryError as exc:
        assert exc.reason and str(exc)
    else:
        assert E.encode(entry) == data


@pytest.mark.parametrize("kind", [0x00, 0x05, 0x0F, 0x10, 0x11, 0x81, 0xFF])
def test_unknown_entry_types_are_refused(kind):
    with pytest.raises(E.EntryError) as exc:
        E.decode(bytes([kind]) + EUI + bundle(KEY_A, 1))
    assert exc.value.reason == "entry_type"
    assert f"0x{kind:02x}" in str(exc.value)


def test_every_unknown_type_byte_is_refused():
    for kind in set(range(256)) - {1, 2, 3, 4}:
        with pytest.raises(E.EntryError) as exc:
            E.decode(bytes([kind]) + bytes(60))
        assert exc.value.reason == "entry_type"


def test_empty_entry_and_readings_without_bundle():
    for data in (b"", b"\x01", b"\x01" + EUI):
        with pytest.raises(E.EntryError) as exc:
            E.decode(data)
        assert exc.value.reason == "entry_truncated"


@pytest.mark.parametrize("frame_bytes,reason", [
    (bytes([0x21]) + bytes(82), "version"),  # frame version 2
    (bytes([0x12, 2, 0, 0]), "type"),  # a fragment, not a bundle
    (bytes([0x11, 0]) + bytes(81), "field"),  # a bundle of 0 readings
])
def test_a_readings_entry_keeps_the_frame_reason(frame_bytes, reason):
    with pytest.raises(E.EntryError) as exc:
        E.decode(b"\x01" + EUI + frame_bytes)
    assert exc.value.reason == reason and str(exc.value).startswith("bundle: ")


def test_encode_checks_a_readings_bundle():
    with pytest.raises(E.EntryError) as exc:
        E.encode(E.ReadingsEntry(EUI, bundle(KEY_A, 1)[:-1]))
    assert exc.value.reason == "truncated"


@pytest.mark.parametrize("code", [4, 5, 0x80, 0xFF])
def test_unknown_revoke_reason_code_is_refused(code):
    with pytest.raises(E.EntryError) as exc:
        E.decode(struct.pack(">B8sIB", 0x04, EUI, T0, code))
    assert exc.value.reason == "field" and str(exc.value).startswith("reason: ")


def _enroll_bytes(meter_model=b"m", board=b"b", community=b"c", owner=OWNER.encode(), key=PK_A):
    return (struct.pack(">B8s32sIH", 0x02, EUI, key, T0, 60)
            + b"".join(bytes([len(s)]) + s for s in (meter_model, board, community, owner)))


@pytest.mark.parametrize("kw,message", [
    ({"meter_model": b"m" * 41}, "meter_model: 41 characters, at most 40"),
    ({"board": b"\xff\xfe"}, "board: not UTF-8"),
    ({"board": "pláca".encode()}, "board: character 'á' at 2 is not printable ASCII"),
    ({"community": b"Lindenhof"}, "community: 'Lindenhof' does not match"),
    ({"owner": OWNER.upper().encode()}, "owner: '9F86D081884C7D65' is not 16-64 lower-case hex"),
    ({"key": IDENTITY_KEY}, "public_key: " + IDENTITY_KEY.hex() + " is not a valid Ed25519"),
])
def test_decoded_enroll_fields_are_validated(kw, message):
    with pytest.raises(E.EntryError) as exc:
        E.decode(_enroll_bytes(**kw))
    assert exc.value.reason == "field"
    assert str(exc.value).startswith(message)


def test_decoded_rotate_key_is_validated():
    with pytest.raises(E.EntryError) as exc:
        E.decode(struct.pack(">B8s32sII", 0x03, EUI, OFF_CURVE_KEY, T0, 10))
    assert exc.value.reason == "field" and str(exc.value).startswith("public_key: ")


# -- field validation ---------------------------------------------------------------

GOOD = dict(dev_eui=EUI, public_key=PK_A, at=T0, ct_rating_a=60, meter_model="emon-ct4",
            board="esp32-c3", community="lindenhof", owner=OWNER)


@pytest.mark.parametrize("name,value,message", [
    ("dev_eui", EUI[:7], "dev_eui: expected 8 bytes, got 7"),
    ("dev_eui", EUI + b"\x00", "dev_eui: expected 8 bytes, got 9"),
    ("dev_eui", EUI.hex(), "dev_eui: expected 8 bytes, got str"),
    ("public_key", PK_A[:31], "public_key: expected 32 bytes, got 31"),
    ("public_key", None, "public_key: expected 32 bytes, got NoneType"),
    ("public_key", IDENTITY_KEY, f"public_key: {IDENTITY_KEY.hex()} is not a valid Ed25519 "
                                 "public key"),
    ("public_key", OFF_CURVE_KEY, f"public_key: {OFF_CURVE_KEY.hex()} is not a valid Ed25519 "
                                  "public key"),
    ("at", -1, "at: -1 outside 0..4294967295 (unix seconds)"),
    ("at", 2**32, "at: 4294967296 outside 0..4294967295 (unix seconds)"),
    ("at", True, "at: expected an integer, got bool"),
    ("at", 1.5e9, "at: expected an integer, got float"),
    ("ct_rating_a", 0, "ct_rating_a: 0 outside 1..65535 amps"),
    ("ct_rating_a", 65536, "ct_rating_a: 65536 outside 1..65535 amps"),
    ("ct_rating_a", "60", "ct_rating_a: expected an integer, got str"),
    ("meter_model", "x" * 41, "meter_model: 41 characters, at most 40"),
    ("meter_model", "a\nb", "meter_model: character '\\n' at 1 is not printable ASCII"),
    ("meter_model", "\x7f", "meter_model: character '\\x7f' at 0 is not printable ASCII"),
    ("meter_model", None, "meter_model: expected a string, got NoneType"),
    ("board", "ESP32 \u2013 C3", "board: character '\u2013' at 6 is not printable ASCII"),
    ("board", "b" * 50, "board: 50 characters, at most 40"),
    ("community", "", "community: '' does not match [a-z0-9][a-z0-9_-]{0,31}"),
    ("community", "Lindenhof", "community: 'Lindenhof' does not match"),
    ("community", "-solar", "community: '-solar' does not match"),
    ("community", "_solar", "community: '_solar' does not match"),
    ("community", "a" * 33, "community: '" + "a" * 33 + "' does not match"),
    ("community", "solar park", "community: 'solar park' does not match"),
    ("community", "solar\n", "community: 'solar\\n' does not match"),
    ("community", 7, "community: expected a string, got int"),
    ("owner", OWNER[:15], f"owner: '{OWNER[:15]}' is not 16-64 lower-case hex digits"),
    ("owner", "a" * 65, "owner: '" + "a" * 65 + "' is not 16-64 lower-case hex digits"),
    ("owner", OWNER.upper(), f"owner: '{OWNER.upper()}' is not 16-64 lower-case hex digits"),
    ("owner", "Jane Doe, 4 Mill Lane", "owner: 'Jane Doe, 4 Mill Lane' is not 16-64 lower-case"),
    ("owner", "g" * 16, "owner: 'gggggggggggggggg' is not 16-64"),
    ("owner", b"9f86d081884c7d65", "owner: expected a string, got bytes"),
])
def test_enroll_field_messages(name, value, message):
    fields = {**GOOD, name: value}
    for make in (lambda: E.validate_enroll_fields(**fields), lambda: E.Enroll(**fields)):
        with pytest.raises(E.EntryError) as exc:
            make()
        assert exc.value.reason == "field"
        assert str(exc.value).startswith(message), str(exc.value)
        assert exc.value.message == str(exc.value)


@pytest.mark.parametrize("name,value", [
    ("at", 0), ("at", 2**32 - 1), ("ct_rating_a", 1), ("ct_rating_a", 65535),
    ("meter_model", ""), ("meter_model", "~" * 40), ("board", " !#$%&'()*+,-./:;<=>?@[]^_`{|}"),
    ("community", "0"), ("community", "a" + "-_" * 15 + "z"), ("owner", "0" * 64),
    ("owner", "abcdef0123456789a"),
])
def test_enroll_boundaries_accepted(name, value):
    fields = {**GOOD, name: value}
    assert E.validate_enroll_fields(**fields)[name] == value
    e = E.Enroll(**fields)
    assert E.decode(E.encode(e)) == e


def test_bytes_like_fields_become_bytes():
    e = E.Enroll(**{**GOOD, "dev_eui": bytearray(EUI), "public_key": memoryview(PK_A)})
    assert type(e.dev_eui) is bytes and type(e.public_key) is bytes
    assert e == E.Enroll(**GOOD)
    r = E.ReadingsEntry(bytearray(EUI), bytearray(bundle(KEY_A, 1)))
    assert type(r.dev_eui) is bytes and type(r.bundle) is bytes


@pytest.mark.parametrize("make,message", [
    (lambda: E.Rotate(EUI, PK_B, T0, -1), "from_seq: -1 outside 0..4294967295"),
    (lambda: E.Rotate(EUI, PK_B, T0, 2**32), "from_seq: 4294967296 outside 0..4294967295"),
    (lambda: E.Rotate(EUI, IDENTITY_KEY, T0, 5), "public_key: "),
    (lambda: E.Rotate(EUI[:4], PK_B, T0, 5), "dev_eui: expected 8 bytes, got 4"),
    (lambda: E.Revoke(EUI, T0, "stolen"),
     "reason: 'stolen' is not one of unspecified, key_compromise, decommissioned, replaced"),
    (lambda: E.Revoke(EUI, T0, 1), "reason: 1 is not one of"),
    (lambda: E.Revoke(EUI, -5, "replaced"), "at: -5 outside"),
    (lambda: E.ReadingsEntry(EUI[:7], b"x"), "dev_eui: expected 8 bytes, got 7"),
    (lambda: E.ReadingsEntry(EUI, "11ab"), "bundle: expected bytes, got str"),
])
def test_rotate_revoke_readings_field_messages(make, message):
    with pytest.raises(E.EntryError) as exc:
        make()
    assert exc.value.reason == "field" and str(exc.value).startswith(message), str(exc.value)


def test_entries_are_immutable():
    e = enroll()
    with pytest.raises(AttributeError):
        e.owner = "0" * 16


# -- registry -------------------------------------------------------------------------

def refused(reason: str, fn, *args, **kw) -> E.Refused:
    with pytest.raises(E.Refused) as exc:
        fn(*args, **kw)
    assert exc.value.reason == reason, exc.value
    assert str(exc.value) == exc.value.message
    return exc.value


class Log:
    """A registry fed entries in log order, the way a replay does."""

    def __init__(self):
        self.reg = E.Registry()
        self.size = 0

    def add(self, entry) -> int:
        index = self.size
        self.reg.apply(entry, index)
        self.size += 1
        return index

    def readings(self, key, *seqs, dev=EUI, sign_as=None) -> int:
        return self.add(E.ReadingsEntry(dev, bundle(key, *seqs, sign_as=sign_as or dev)))

    def verify(self, key, *seqs, dev=EUI, sign_as=None, as_of=None):
        entry = E.decode(E.readings_entry(dev, bundle(key, *seqs, sign_as=sign_as or dev)))
        return self.reg.verify_readings(entry, as_of=as_of)


@pytest.fixture
def log() -> Log:
    lg = Log()
    lg.add(enroll())
    return lg


def test_enroll_then_readings_verify(log):
    b = log.verify(KEY_A, 1, 2, 3)
    assert [r.seq for r in b.readings] == [1, 2, 3]
    assert log.reg.key_for(EUI, 0) == PK_A and log.reg.key_for(EUI, 2**32 - 1) == PK_A
    dev = log.reg.device(EUI)
    assert dev.status == "active" and dev.enrolled == 0 and dev.revoked is None
    assert dev.keys == ((0, PK_A, 0),) and dev.public_key == PK_A
    assert dev.fields == {"ct_rating_a": 60, "meter_model": "emon-ct4", "board": "esp32-c3",
                          "community": "lindenhof", "owner": OWNER}
    assert log.reg.device(EUI2) is None and len(log.reg) == 1 and EUI in log.reg


def test_enroll_twice_the_same_is_same_and_never_logged_twice(log):
    assert log.reg.check_enroll(enroll()) == "same"
    assert log.reg.check_enroll(enroll(at=T0 + 3600)) == "same"  # a retry asked later
    assert log.reg.check_enroll(enroll(dev=EUI2)) == "new"
    before = log.reg.to_json()
    refused("already_enrolled", log.reg.apply, enroll(at=T0 + 1), 1)
    assert log.reg.to_json() == before


def test_enroll_with_another_key_is_a_key_conflict(log):
    err = refused("key_conflict", log.reg.check_enroll, enroll(key=PK_B))
    assert EUI.hex() in err.message
    refused("key_conflict", log.reg.apply, enroll(key=PK_B), 1)
    assert log.reg.key_for(EUI, 5) == PK_A


def test_enroll_with_other_fields_names_them(log):
    err = refused("metadata_conflict", log.reg.check_enroll,
                  enroll(owner="0" * 16, ct_rating_a=100))
    assert "ct_rating_a" in err.message and "owner" in err.message
    assert "community" not in err.message


def test_rotation_boundary(log):
    log.readings(KEY_A, 1, 2, 3)
    rot = log.add(E.Rotate(EUI, PK_B, T0 + 10, 10))
    assert [log.reg.key_for(EUI, s) for s in (0, 3, 9, 10, 11, 2**32 - 1)] == \
        [PK_A, PK_A, PK_A, PK_B, PK_B, PK_B]
    # The old key still signs the seqs below the rotation (a meter catching up) ...
    assert log.verify(KEY_A, 9).first_seq == 9
    assert log.verify(KEY_A, 4, 5, 6, 7, 8, 9).last_seq == 9
    # ... and nothing at or after it.
    refused("bad_signature", log.verify, KEY_A, 10)
    refused("bad_signature", log.verify, KEY_A, 11, 12)
    refused("bad_signature", log.verify, KEY_B, 9)
    assert log.verify(KEY_B, 10, 11).first_seq == 10
    dev = log.reg.device(EUI)
    assert dev.keys == ((0, PK_A, 0), (10, PK_B, rot)) and dev.public_key == PK_B


@pytest.mark.parametrize("key", [KEY_A, KEY_B])
def test_a_bundle_straddling_a_rotation_is_refused(log, key):
    log.add(E.Rotate(EUI, PK_B, T0, 10))
    err = refused("straddles_rotation", log.verify, key, 8, 9, 10)
    assert "8..10" in err.message and "seq 10" in err.message


def test_rotation_from_seq_must_exceed_every_logged_seq(log):
    log.readings(KEY_A, 5, 6, 7)
    log.readings(KEY_A, 2)  # late, below the highest
    assert log.reg.device(EUI).last_seq == 7
    assert log.reg.next_from_seq(EUI) == 8
    for from_seq in (0, 3, 7):
        err = refused("rotate_from_seq", log.reg.apply, E.Rotate(EUI, PK_B, T0, from_seq),
                      log.size)
        assert "7" in err.message
    log.add(E.Rotate(EUI, PK_B, T0, 8))
    assert log.reg.key_for(EUI, 7) == PK_A and log.reg.key_for(EUI, 8) == PK_B


def test_rotation_from_seq_must_exceed_the_previous_rotation(log):
    log.add(E.Rotate(EUI, PK_B, T0, 100))
    assert log.reg.next_from_seq(EUI) == 101
    for from_seq in (50, 100):
        refused("rotate_from_seq", log.reg.apply, E.Rotate(EUI, PK_C, T0, from_seq), log.size)
    log.add(E.Rotate(EUI, PK_C, T0, 101))
    assert [log.reg.key_for(EUI, s) for s in (99, 100, 101)] == [PK_A, PK_B, PK_C]
    refused("straddles_rotation", log.verify, KEY_B, 100, 101)
    assert log.verify(KEY_B, 100).first_seq == 100


def test_first_rotation_needs_from_seq_above_zero():
    lg = Log()
    lg.add(enroll())
    refused("rotate_from_seq", lg.reg.apply, E.Rotate(EUI, PK_B, T0, 0), 1)
    assert lg.reg.next_from_seq(EUI) == 1
    lg.add(E.Rotate(EUI, PK_B, T0, 1))
    assert lg.reg.key_for(EUI, 0) == PK_A and lg.reg.key_for(EUI, 1) == PK_B


def test_rotation_to_a_key_already_used_is_refused(log):
    refused("rotate_same_key", log.reg.apply, E.Rotate(EUI, PK_A, T0, 10), 1)
    log.add(E.Rotate(EUI, PK_B, T0, 10))
    refused("rotate_same_key", log.reg.apply, E.Rotate(EUI, PK_B, T0, 20), log.size)
    refused("rotate_same_key", log.reg.apply, E.Rotate(EUI, PK_A, T0, 20), log.size)


def test_revoke_refuses_every_seq_afterwards_and_reenrollment(log):
    log.readings(KEY_A, 1, 2)
    log.add(E.Rotate(EUI, PK_B, T0, 10))
    rev = log.add(E.Revoke(EUI, T0 + 50, "key_compromise"))
    for seq in (0, 1, 9, 10, 11, 2**32 - 1):
        refused("revoked_device", log.reg.key_for, EUI, seq)
    refused("revoked_device", log.verify, KEY_A, 3)
    refused("revoked_device", log.verify, KEY_B, 10)
    for e in (enroll(), enroll(key=PK_C), enroll(key=PK_C, owner="1" * 16)):
        err = refused("revoked_device", log.reg.check_enroll, e)
        assert "can not be enrolled again" in err.message
        refused("revoked_device", log.reg.apply, e, log.size)
    refused("revoked_device", log.reg.apply, E.Rotate(EUI, PK_C, T0, 20), log.size)
    refused("revoked_device", log.reg.apply, E.Revoke(EUI, T0, "replaced"), log.size)
    refused("revoked_device", log.reg.next_from_seq, EUI)
    dev = log.reg.device(EUI)
    assert (dev.status, dev.revoked, dev.revoke_reason, dev.last_seq) == \
        ("revoked", rev, "key_compromise", 2)


def test_entries_before_a_revocation_still_verify_as_of_their_index(log):
    early = log.readings(KEY_A, 1)
    log.add(E.Rotate(EUI, PK_B, T0, 10))
    rev = log.add(E.Revoke(EUI, T0, "decommissioned"))
    assert log.verify(KEY_A, 1, as_of=early).first_seq == 1
    assert log.reg.key_for(EUI, 12, as_of=rev) == PK_B
    # Before the rotation was logged, seq 12 still belonged to the first key.
    assert log.reg.key_for(EUI, 12, as_of=early + 1) == PK_A
    refused("revoked_device", log.verify, KEY_A, 1, as_of=rev + 1)
    refused("unknown_device", log.reg.key_for, EUI, 1, as_of=0)  # the enroll itself


def test_unknown_device_is_refused_everywhere(log):
    refused("unknown_device", log.verify, KEY_A, 1, dev=EUI2)
    refused("unknown_device", log.reg.key_for, EUI2, 1)
    refused("unknown_device", log.reg.note_seq, EUI2, 1)
    refused("unknown_device", log.reg.apply, E.Rotate(EUI2, PK_B, T0, 5), 1)
    refused("unknown_device", log.reg.apply, E.Revoke(EUI2, T0, "unspecified"), 1)
    refused("unknown_device", log.reg.apply,
            E.ReadingsEntry(EUI2, bundle(KEY_A, 1, sign_as=EUI2)), 1)


def test_bad_signatures_are_refused(log):
    data = bytearray(bundle(KEY_A, 1, 2))
    data[-1] ^= 0x01
    refused("bad_signature", log.reg.verify_readings, E.ReadingsEntry(EUI, bytes(data)))
    data = bytearray(bundle(KEY_A, 1, 2))
    data[5] ^= 0x01  # the body: seq 1 becomes 257
    refused("bad_signature", log.reg.verify_readings, E.ReadingsEntry(EUI, bytes(data)))
    refused("bad_signature", log.verify, KEY_C, 1)  # a key never enrolled


def test_a_bundle_replayed_under_another_dev_eui_is_refused(log):
    # The second device even holds the same key: the EUI is signed, so the
    # first device's bundle still does not verify as the second's.
    log.add(enroll(dev=EUI2))
    theirs = bundle(KEY_A, 1)
    assert log.reg.verify_readings(E.ReadingsEntry(EUI, theirs)).first_seq == 1
    refused("bad_signature", log.reg.verify_readings, E.ReadingsEntry(EUI2, theirs))
    assert log.verify(KEY_A, 1, dev=EUI2).first_seq == 1


def test_a_malformed_bundle_raises_entry_error(log):
    with pytest.raises(E.EntryError) as exc:
        log.reg.verify_readings(E.ReadingsEntry(EUI, bundle(KEY_A, 1)[:50]))
    assert exc.value.reason == "truncated"


def test_applying_readings_notes_their_seqs(log):
    log.readings(KEY_A, 3, 4)
    assert log.reg.device(EUI).last_seq == 4
    log.reg.note_seq(EUI, 2)  # lower: the highest stays
    assert log.reg.device(EUI).last_seq == 4
    log.reg.note_seq(EUI, 9)
    assert log.reg.next_from_seq(EUI) == 10
    with pytest.raises(E.EntryError):
        log.reg.note_seq(EUI, 2**32)
    # A refused readings entry notes nothing.
    refused("bad_signature", log.readings, KEY_B, 50)
    assert log.reg.device(EUI).last_seq == 9


def test_entries_apply_in_log_order_only(log):
    refused("entry_order", log.reg.apply, enroll(dev=EUI2), 0)
    log.add(enroll(dev=EUI2))
    refused("entry_order", log.reg.apply, E.Revoke(EUI2, T0, "replaced"), log.size - 1)
    with pytest.raises(TypeError):
        log.reg.apply(E.Revoke(EUI2, T0, "replaced"), -1)
    log.reg.apply(E.Revoke(EUI2, T0, "replaced"), log.size + 40)  # gaps: readings between
    assert log.reg.last_index == log.size + 40


def test_a_refused_entry_leaves_the_registry_unchanged(log):
    log.readings(KEY_A, 1)
    log.add(E.Rotate(EUI, PK_B, T0, 5))
    before = log.reg.to_json()
    for entry in (enroll(key=PK_C), E.Rotate(EUI, PK_C, T0, 5), E.Rotate(EUI, PK_B, T0, 9),
                  E.Revoke(EUI2, T0, "replaced"), E.ReadingsEntry(EUI, bundle(KEY_A, 6))):
        with pytest.raises(E.Refused):
            log.reg.apply(entry, log.size)
        assert log.reg.to_json() == before


def test_device_state_as_dict(log):
    log.readings(KEY_A, 1)
    log.add(E.Rotate(EUI, PK_B, T0 + 7, 5))
    log.add(E.Revoke(EUI, T0 + 9, "replaced"))
    assert log.reg.device(EUI).as_dict() == {
        "dev_eui": EUI.hex(), "status": "revoked", "public_key": PK_B.hex(),
        "ct_rating_a": 60, "meter_model": "emon-ct4", "board": "esp32-c3",
        "community": "lindenhof", "owner": OWNER, "enrolled": {"entry": 0, "at": T0},
        "keys": [{"from_seq": 0, "public_key": PK_A.hex(), "entry": 0},
                 {"from_seq": 5, "public_key": PK_B.hex(), "entry": 2}],
        "last_seq": 1, "revoked": {"entry": 3, "at": T0 + 9, "reason": "replaced"}}
    assert [d.dev_eui for d in log.reg.devices()] == [EUI]


def test_registry_json_roundtrip(log):
    log.readings(KEY_A, 1, 2)
    log.add(E.Rotate(EUI, PK_B, T0, 10))
    log.add(enroll(dev=EUI2, key=PK_C))
    log.readings(KEY_C, 40, dev=EUI2)
    log.add(E.Revoke(EUI2, T0, "decommissioned"))
    text = log.reg.to_json()
    json.loads(text)
    back = E.Registry.from_json(text)
    assert back.to_json() == text
    for dev in (EUI, EUI2):
        assert back.device(dev) == log.reg.device(dev)
    assert back.last_index == log.reg.last_index == log.size - 1
    assert back.key_for(EUI, 9) == PK_A and back.key_for(EUI, 10) == PK_B
    refused("revoked_device", back.key_for, EUI2, 40)
    refused("rotate_from_seq", back.apply, E.Rotate(EUI, PK_C, T0, 10), log.size)
    refused("entry_order", back.apply, enroll(dev=bytes(8)), log.size - 1)


def test_registry_json_that_breaks_the_rules_is_refused(log):
    log.add(E.Rotate(EUI, PK_B, T0, 10))
    state = json.loads(log.reg.to_json())
    swapped = dict(state, entries=state["entries"][::-1])  # rotate before enroll
    with pytest.raises(ValueError, match="unknown_device|not enrolled"):
        E.Registry.from_json(json.dumps(swapped))
    bad_hex = dict(state, entries=[[0, "zz"]])
    with pytest.raises(ValueError, match="registry state"):
        E.Registry.from_json(json.dumps(bad_hex))
    readings = dict(state, entries=[[0, E.readings_entry(EUI, bundle(KEY_A, 1)).hex()]])
    with pytest.raises(ValueError, match="readings entry"):
        E.Registry.from_json(json.dumps(readings))
    with pytest.raises(ValueError, match="last_index"):
        E.Registry.from_json(json.dumps(dict(state, last_index=0)))
    with pytest.raises(ValueError, match="format"):
        E.Registry.from_json(json.dumps(dict(state, format="other")))
    with pytest.raises(ValueError, match="not JSON"):
        E.Registry.from_json("{")
    with pytest.raises(ValueError, match="last_seq"):
        E.Registry.from_json(json.dumps(dict(state, last_seq={EUI2.hex(): 3})))
