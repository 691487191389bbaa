"""The shared frame codec, in CPython and in MicroPython, against the same vectors."""

import json

import pytest

from meter import frame

VECTOR = dict(seq=7, t_end=1_767_225_600, interval_s=900, import_dwh=123_456,
              export_dwh=42, irms_ca=1234, vrms_dv=2301, flags=frame.FLAG_VOLTAGE_MEASURED)


def test_body_layout_is_big_endian_and_fixed():
    body = frame.encode_body(**VECTOR)
    assert len(body) == frame.BODY_LEN == 24
    assert body[0] == 0x11  # version 1, type reading
    assert body[1:5] == (7).to_bytes(4, "big")
    assert body[5:9] == (1_767_225_600).to_bytes(4, "big")
    assert body[9:11] == (900).to_bytes(2, "big")
    assert body[11:15] == (123_456).to_bytes(4, "big")
    assert body[15:19] == (42).to_bytes(4, "big")
    assert body[19:21] == (1234).to_bytes(2, "big")
    assert body[21:23] == (2301).to_bytes(2, "big")
    assert body[23] == 1


def test_roundtrip():
    body = frame.encode_body(**VECTOR)
    sig = bytes(range(64))
    r = frame.decode(frame.assemble(body, sig))
    assert r.as_dict() == VECTOR
    assert r.signature == sig and r.body == body
    assert r.import_wh == pytest.approx(12345.6)


@pytest.mark.parametrize("mutate,reason", [
    (lambda f: b"", "empty"),
    (lambda f: f[:-1], "truncated"),
    (lambda f: f + b"\0", "oversized"),
    (lambda f: b"\x21" + f[1:], "version"),
    (lambda f: b"\x12" + f[1:], "type"),
    (lambda f: f[:23] + b"\x80" + f[24:], "field"),
])
def test_malformed_frames_have_precise_reasons(mutate, reason):
    good = frame.assemble(frame.encode_body(**VECTOR), bytes(64))
    with pytest.raises(frame.FrameError) as exc:
        frame.decode(mutate(good))
    assert exc.value.reason == reason
    assert str(exc.value)


def test_encode_rejects_out_of_range():
    with pytest.raises(frame.FrameError, match="seq"):
        frame.encode_body(**{**VECTOR, "seq": -1})
    with pytest.raises(frame.FrameError, match="import_dwh"):
        frame.encode_body(**{**VECTOR, "import_dwh": 1 << 32})


def test_instantaneous_values_saturate():
    r = frame.decode(frame.assemble(frame.encode_body(**{**VECTOR, "irms_ca": 70_000}), bytes(64)))
    assert r.irms_ca == 0xFFFF


def test_signed_message_binds_device():
    body = frame.encode_body(**VECTOR)
    a = frame.signed_message(bytes.fromhex("0011223344556677"), body)
    b = frame.signed_message(bytes.fromhex("0011223344556678"), body)
    assert a != b and a.startswith(frame.SIGN_DOMAIN) and a.endswith(body)
    with pytest.raises(frame.FrameError):
        frame.signed_message(b"\x00" * 7, body)


def test_micropython_encodes_the_same_bytes(mpy):
    """The meter (MicroPython) and the gateway (CPython) must agree byte for byte."""
    out = mpy(
        "import json, binascii\n"
        "from meter import frame\n"
        f"v = json.loads({json.dumps(json.dumps(VECTOR))})\n"
        "b = frame.encode_body(v['seq'], v['t_end'], v['interval_s'], v['import_dwh'],"
        " v['export_dwh'], v['irms_ca'], v['vrms_dv'], v['flags'])\n"
        "print(binascii.hexlify(b).decode())\n"
        "r = frame.decode(b + bytes(64))\n"
        "print(json.dumps(r.as_dict()))\n"
        "try:\n"
        "    frame.decode(b)\n"
        "except frame.FrameError as e:\n"
        "    print(e.reason)\n"
    )
    hexbody, decoded, reason = out.splitlines()
    assert bytes.fromhex(hexbody) == frame.encode_body(**VECTOR)
    assert json.loads(decoded) == VECTOR
    assert reason == "truncated"
