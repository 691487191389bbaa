"""The shared frame codec (docs/protocol.md), in CPython and in MicroPython, against the
vectors in tests/vectors/frames.json and against layouts written out by hand here."""

import json
import random
import struct
from pathlib import Path

import pytest
from Crypto.Signature import eddsa

from meter import frame
from tools import frame_vectors

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "frames.json").read_text())
EUI = bytes.fromhex(VECTORS["dev_eui"])
CMD_KEY = bytes.fromhex(VECTORS["command_key"])


def _tuples(readings):
    return [(r["seq"], r["t_end"], r["import_dwh"], r["export_dwh"], r["flags"]) for r in readings]


def test_vectors_file_is_current():
    assert frame_vectors.main(["--check"]) == 0


def test_worked_example_of_the_protocol_page_byte_by_byte():
    readings = [(100, 1_767_226_500, 12345, 0, 8), (101, 1_767_227_400, 14845, 0, 8),
                (102, 1_767_228_300, 17345, 0, 8)]
    body = frame.encode_body(readings)
    want = (bytes([0x11, 3]) + struct.pack(">IIII", 100, 1_767_226_500, 12345, 0) + b"\x08"
            + bytes([0x08, 0x84, 0x07, 0xC4, 0x13, 0x00]) * 2)
    assert body == want and len(body) == 31
    assert len(frame.assemble(body, bytes(64))) == 95


@pytest.mark.parametrize("v", VECTORS["bundles"], ids=lambda v: v["name"])
def test_bundle_vectors_decode_and_verify(v):
    data = bytes.fromhex(v["hex"])
    b = frame.decode_bundle(data)
    assert [r.as_dict() for r in b.readings] == v["readings"]
    assert frame.encode_body(_tuples(v["readings"])) == b.body
    pub = eddsa.import_public_key(bytes.fromhex(VECTORS["public_key"]))
    eddsa.new(pub, "rfc8032").verify(frame.signed_message(EUI, b.body), b.signature)
    pieces = [frame.decode_fragment(bytes.fromhex(h)) for h in v["fragments_51"]]
    if len(data) <= 51:
        assert v["fragments_51"] == [v["hex"]]
    else:
        assert all(len(bytes.fromhex(h)) <= 51 for h in v["fragments_51"])
        random.Random(1).shuffle(pieces)
        assert frame.reassemble(pieces) == data


@pytest.mark.parametrize("v", VECTORS["invalid_uplinks"], ids=lambda v: v["name"])
def test_invalid_vectors_have_precise_reasons(v):
    with pytest.raises(frame.FrameError) as exc:
        frame.decode_uplink(bytes.fromhex(v["hex"]))
    assert exc.value.reason == v["reason"] and str(exc.value)


@pytest.mark.parametrize("v", VECTORS["commands"], ids=lambda v: v["name"])
def test_command_vectors(v):
    data = bytes.fromhex(v["hex"])
    c = frame.decode_command(CMD_KEY, EUI, data)
    assert (c.counter, c.expires, c.name, list(c.args)) == (v["counter"], v["expires"], v["op"],
                                                           v["args"])
    head = data[:-8]
    import hashlib
    import hmac
    assert data[-8:] == hmac.new(CMD_KEY, b"SMC1" + EUI + head, hashlib.sha256).digest()[:8]


def test_command_is_bound_to_key_device_and_every_byte():
    data = frame.encode_command(CMD_KEY, EUI, 9, 0, frame.OP_RELAY, frame.RELAY_OFF, 60)
    for bad_key, bad_eui in ((bytes(16), EUI), (CMD_KEY, bytes(8))):
        with pytest.raises(frame.FrameError) as exc:
            frame.decode_command(bad_key, bad_eui, data)
        assert exc.value.reason == "auth"
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            mutated = bytearray(data)
            mutated[i] ^= bit
            with pytest.raises(frame.FrameError):
                frame.decode_command(CMD_KEY, EUI, bytes(mutated))


def test_longest_command_fits_the_smallest_downlink():
    longest = max(len(frame.encode_command(CMD_KEY, EUI, 1, 0, op, *args)) for op, args in (
        (frame.OP_RELAY, (1, 0)), (frame.OP_INTERVAL, (900,)), (frame.OP_TIME, (1,)),
        (frame.OP_RESEND, (1, 1))))
    assert longest == 24 <= 51


def test_bundles_refuse_what_cannot_share_a_signature():
    ok = (1, 1000, 10, 0, 0)
    for nxt, what in (((3, 2000, 20, 0, 0), "consecutive"), ((2, 1000, 20, 0, 0), "t_end"),
                      ((2, 2000, 9, 0, 0), "backwards")):
        assert not frame.can_follow(ok, nxt)
        with pytest.raises(frame.FrameError, match=what):
            frame.encode_body([ok, nxt])
    assert frame.can_follow(ok, (2, 1001, 10, 0, 0))
    with pytest.raises(frame.FrameError):
        frame.encode_body([])
    with pytest.raises(frame.FrameError):
        frame.encode_body([(k, 10 * k + 10, 0, 0, 0) for k in range(33)])
    with pytest.raises(frame.FrameError, match="seq"):
        frame.encode_body([(1 << 32, 1, 0, 0, 0)])


def test_random_bundles_roundtrip_and_every_fragmentation_reassembles():
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 32)
        seq, t, imp, exp = rng.randrange(1 << 31), rng.randrange(1 << 31), rng.randrange(1 << 30), 0
        readings = []
        for _k in range(n):
            readings.append((seq, t, imp, exp, rng.randrange(256)))
            seq, t = seq + 1, t + rng.choice((1, 60, 900, 3600, 100_000))
            imp += rng.choice((0, 1, 127, 128, 2500, 16384, 1 << 21))
            exp += rng.choice((0, 0, 5, 300_000))
        data = frame.assemble(frame.encode_body(readings), rng.randbytes(64))
        b = frame.decode_bundle(data)
        assert [(r.seq, r.t_end, r.import_dwh, r.export_dwh, r.flags) for r in b.readings] == readings
        for mp in (51, 53, 115, 222):
            frames = frame.fragment(data, mp)
            assert all(len(f) <= mp for f in frames)
            if len(frames) > 1:
                pieces = [frame.decode_fragment(f) for f in frames]
                rng.shuffle(pieces)
                assert frame.reassemble(pieces) == data


def test_fragments_of_different_bundles_do_not_mix():
    a = bytes.fromhex(VECTORS["bundles"][0]["fragments_51"][0])
    b = bytes.fromhex(VECTORS["bundles"][2]["fragments_51"][1])
    with pytest.raises(frame.FrameError) as exc:
        frame.reassemble([frame.decode_fragment(a), frame.decode_fragment(b)])
    assert exc.value.reason == "fragment"
    with pytest.raises(frame.FrameError) as exc:
        frame.reassemble([frame.decode_fragment(a)])
    assert exc.value.reason == "fragment"


def test_random_mutations_never_crash_the_decoder():
    rng = random.Random(3)
    good = [bytes.fromhex(v["hex"]) for v in VECTORS["bundles"]]
    for _ in range(3000):
        d = bytearray(rng.choice(good))
        for _k in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            if op == 0 and d:
                d[rng.randrange(len(d))] = rng.randrange(256)
            elif op == 1 and d:
                del d[rng.randrange(len(d)):]
            else:
                d += rng.randbytes(rng.randint(1, 8))
        try:
            frame.decode_uplink(bytes(d))
        except frame.FrameError as exc:
            assert exc.reason in ("empty", "version", "type", "truncated", "oversized", "field")


def test_micropython_matches_every_vector(mpy):
    """The meter (MicroPython) and the gateway (CPython) agree byte for byte."""
    out = mpy(
        "import json, binascii\n"
        "from meter import frame\n"
        f"V = json.loads({json.dumps(json.dumps(VECTORS))})\n"
        "eui = binascii.unhexlify(V['dev_eui']); key = binascii.unhexlify(V['command_key'])\n"
        "res = {'bodies': [], 'decoded': [], 'frags': [], 'cmds': [], 'reasons': []}\n"
        "for v in V['bundles']:\n"
        "    rs = [(r['seq'], r['t_end'], r['import_dwh'], r['export_dwh'], r['flags']) for r in v['readings']]\n"
        "    data = binascii.unhexlify(v['hex'])\n"
        "    res['bodies'].append(binascii.hexlify(frame.encode_body(rs)).decode())\n"
        "    res['decoded'].append([r.as_dict() for r in frame.decode_bundle(data).readings])\n"
        "    res['frags'].append([binascii.hexlify(f).decode() for f in frame.fragment(data, 51)])\n"
        "ops = dict((n, o) for o, n in frame.OP_NAMES.items())\n"
        "for c in V['commands']:\n"
        "    res['cmds'].append(binascii.hexlify(frame.encode_command(key, eui, c['counter'], c['expires'], ops[c['op']], *c['args'])).decode())\n"
        "for v in V['invalid_uplinks']:\n"
        "    try:\n"
        "        frame.decode_uplink(binascii.unhexlify(v['hex']))\n"
        "        res['reasons'].append(None)\n"
        "    except frame.FrameError as e:\n"
        "        res['reasons'].append(e.reason)\n"
        "print(json.dumps(res))\n"
    )
    res = json.loads(out.strip().splitlines()[-1])
    for v, body, dec, frags in zip(VECTORS["bundles"], res["bodies"], res["decoded"], res["frags"]):
        assert v["hex"].startswith(body) and len(v["hex"]) == len(body) + 128
        assert dec == v["readings"]
        assert frags == v["fragments_51"]
    assert res["cmds"] == [c["hex"] for c in VECTORS["commands"]]
    assert res["reasons"] == [v["reason"] for v in VECTORS["invalid_uplinks"]]
