"""The ChirpStack payload codec (gateway/chirpstack_codec.js) under the real node binary.

Checked against every vector in tests/vectors/frames.json (expected values from the vectors
and docs/protocol.md, not from either codec) and against the Python codec (meter/frame.py) on
random frames: valid bundles and commands, their fragments, and random corruptions, where
both must give the same fields or the same error. All calls go to one node process
(tests/unit/chirpstack_codec_runner.js), which evaluates the codec as ChirpStack does.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from meter import frame

REPO = Path(__file__).resolve().parents[2]
CODEC = REPO / "gateway" / "chirpstack_codec.js"
RUNNER = Path(__file__).with_name("chirpstack_codec_runner.js")
VECTORS = json.loads((REPO / "tests" / "vectors" / "frames.json").read_text())
BUNDLES = {b["name"]: b for b in VECTORS["bundles"]}
COMMANDS = {c["name"]: c for c in VECTORS["commands"]}
INVALID = {v["name"]: v for v in VECTORS["invalid_uplinks"]}

# docs/protocol.md, "Flags": bit k of the flags byte.
FLAG_BITS = ["voltage_measured", "ct_missing", "ct_reversed", "clock_unsynced", "clipped",
             "freq_range", "adc_fault", "restart"]
# docs/protocol.md, "Command": opcode name -> argument widths in bytes.
ARG_WIDTHS = {"relay": (1, 2), "interval": (2,), "time": (4,), "resend": (4, 2)}
OPCODES = {"relay": 1, "interval": 2, "time": 3, "resend": 4}
U32_MAX = 2**32 - 1
RECV_TIME = "2026-01-01T00:16:03.250Z"

# Every call the module makes, by key: built at import, sent to node once (fixture `js`).
CALLS: dict[str, dict] = {}


def call(key: str, fn: str, input: dict, fresh: bool = False) -> str:
    assert key not in CALLS, key
    CALLS[key] = {"fn": fn, "input": input, "fresh": fresh}
    return key


def uplink(data: bytes, fport: int = 1) -> dict:
    return {"bytes": list(data), "fPort": fport, "recvTime": RECV_TIME, "variables": {}}


def downlink(data: bytes, fport: int = 2) -> dict:
    return {"bytes": list(data), "fPort": fport}


def error_text(exc: frame.FrameError) -> str:
    return f"{exc.reason}: {exc.message}"


# ------------------------------------------------------------------ what to expect

def reading_from_vector(r: dict) -> dict:
    return {**r, "flag_names": [n for k, n in enumerate(FLAG_BITS) if r["flags"] >> k & 1],
            "import_wh": r["import_dwh"] / 10, "export_wh": r["export_dwh"] / 10}


def python_uplink(data: bytes) -> dict:
    """What decodeUplink must return for data, according to meter/frame.py."""
    try:
        obj = frame.decode_uplink(data)
    except frame.FrameError as exc:
        return {"errors": [error_text(exc)]}
    if isinstance(obj, frame.Bundle):
        return {"data": {"type": "bundle", "count": len(obj.readings),
                         "readings": [reading_from_vector(r.as_dict()) for r in obj.readings],
                         "signature": obj.signature.hex()}, "warnings": []}
    return {"data": {"type": "fragment", "tag": obj.tag, "index": obj.index, "count": obj.count,
                     "piece": obj.piece.hex()}, "warnings": []}


def python_downlink(data: bytes, key: bytes, eui: bytes) -> dict:
    """What decodeDownlink must return for data: frame.decode_command's verdict, except that
    the codec cannot check the tag, so a command failing only 'auth' is decoded."""
    try:
        frame.decode_command(key, eui, data)
    except frame.FrameError as exc:
        if exc.reason != "auth":
            return {"errors": [error_text(exc)]}
    head = data[:-frame.TAG_LEN]
    cmd = frame.decode_command(key, eui, head + frame.command_tag(key, eui, head))
    return {"data": {**cmd.as_dict(), "tag": data[-frame.TAG_LEN:].hex()}, "warnings": []}


# ------------------------------------------------------------------ vector calls

for name, b in BUNDLES.items():
    # Vectors run exactly as ChirpStack evaluates a codec: a fresh context per frame.
    call(f"bundle/{name}", "decodeUplink", uplink(bytes.fromhex(b["hex"])), fresh=True)
    for k, f in enumerate(b["fragments_51"]):
        call(f"fragment/{name}/{k}", "decodeUplink", uplink(bytes.fromhex(f)), fresh=True)
for name, c in COMMANDS.items():
    data = {"counter": c["counter"], "expires": c["expires"], "op": c["op"], "args": c["args"],
            "tag": c["hex"][-2 * frame.TAG_LEN:]}
    call(f"encode/{name}", "encodeDownlink", {"data": data, "variables": {}}, fresh=True)
    call(f"decode/{name}", "decodeDownlink", downlink(bytes.fromhex(c["hex"])), fresh=True)
for name, v in INVALID.items():
    call(f"invalid/{name}", "decodeUplink", uplink(bytes.fromhex(v["hex"])), fresh=True)

GOOD = bytes.fromhex(BUNDLES["three_quarter_hours"]["hex"])
RELAY = COMMANDS["relay_off_for_an_hour"]
call("port/uplink_on_2", "decodeUplink", uplink(GOOD, fport=2))
call("port/uplink_on_3", "decodeUplink", uplink(GOOD, fport=3))
call("port/command_on_1", "decodeDownlink", downlink(bytes.fromhex(RELAY["hex"]), fport=1))
call("input/bytes_not_array", "decodeDownlink", {"bytes": RELAY["hex"], "fPort": 2})
call("input/byte_too_big", "decodeUplink", {**uplink(GOOD), "bytes": [0x11, 256] + [0] * 81})
call("input/no_data", "encodeDownlink", {"variables": {}})


# ---------------------------------------------------------- hand-made bundle edges

def body_with_second(flags: int, dt: bytes, di: bytes, de: bytes, *, seq=7, t_end=1000,
                     imp=0, exp=0) -> bytes:
    """A two-reading bundle written out by hand (docs/protocol.md, "Bundle")."""
    head = struct.pack(">BBIIIIB", 0x11, 2, seq, t_end, imp, exp, 0)
    return head + bytes([flags]) + dt + di + de + bytes(64)


EDGES = {
    # The widest varint that fits: 0xffffffff in five bytes, into a register starting at 0.
    "varint_u32_max": (body_with_second(0, b"\x01", b"\xff\xff\xff\xff\x0f", b"\x00"), None),
    "varint_33_bits": (body_with_second(0, b"\x01", b"\xff\xff\xff\xff\x1f", b"\x00"), "field"),
    "varint_six_bytes": (body_with_second(0, b"\x01", b"\x80\x80\x80\x80\x80\x01", b"\x00"),
                         "field"),
    "varint_not_minimal": (body_with_second(0, b"\x01", b"\x80\x00", b"\x00"), "field"),
    "dt_zero": (body_with_second(0, b"\x00", b"\x00", b"\x00"), "field"),
    "register_overflow": (body_with_second(0, b"\x01", b"\x01", b"\x00", imp=U32_MAX), "field"),
    "seq_overflow": (body_with_second(0, b"\x01", b"\x00", b"\x00", seq=U32_MAX), "field"),
    "t_end_reaches_u32_max": (body_with_second(0, b"\x01", b"\x00", b"\x00",
                                               t_end=U32_MAX - 1), None),
    "ends_inside_varint": (body_with_second(0, b"\x01", b"\x00", b"\x80"), "truncated"),
    "count_33": (bytes([0x11, 33]) + GOOD[2:], "field"),
    "longest_plus_one": (GOOD[:19] + bytes(frame.MAX_BUNDLE_LEN - 19 - 64 + 1) + bytes(64),
                         "oversized"),
    "fragment_head_only": (bytes.fromhex("12006421"), "truncated"),
    "fragment_count_one": (bytes.fromhex("1200640000"), "field"),
    "fragment_sixteen_of_sixteen": (bytes.fromhex("120064ffff"), None),
}
for name, (data, _reason) in EDGES.items():
    call(f"edge/{name}", "decodeUplink", uplink(data))


# ---------------------------------------------------------- encodeDownlink refusals

def bad_command(counter=1, expires=0, op="relay", args=(1, 60), **extra) -> dict:
    return {"counter": counter, "expires": expires, "op": op, "args": list(args),
            "tag": "0011223344556677", **extra}


# Each also goes through frame.encode_command, which must refuse it too.
REFUSED_BY_BOTH = {
    "counter_zero": bad_command(counter=0),
    "counter_negative": bad_command(counter=-1),
    "counter_33_bits": bad_command(counter=2**32),
    "counter_fraction": bad_command(counter=1.5),
    "counter_string": bad_command(counter="5"),
    "expires_negative": bad_command(expires=-1),
    "expires_33_bits": bad_command(expires=2**32),
    "relay_one_arg": bad_command(args=(1,)),
    "relay_three_args": bad_command(args=(1, 2, 3)),
    "relay_mode_256": bad_command(args=(256, 0)),
    "relay_hold_65536": bad_command(args=(0, 65536)),
    "interval_negative": bad_command(op="interval", args=(-1,)),
    "interval_fraction": bad_command(op="interval", args=(300.5,)),
    "time_33_bits": bad_command(op="time", args=(2**32,)),
    "resend_count_65536": bad_command(op="resend", args=(1, 65536)),
    "resend_seq_33_bits": bad_command(op="resend", args=(2**32, 1)),
}
# Only the ChirpStack side has these inputs: named ops, a tag passed in.
REFUSED_BY_JS = {
    "no_tag": {k: v for k, v in bad_command().items() if k != "tag"},
    "tag_null": bad_command(tag=None),
    "tag_short": bad_command(tag="00112233445566"),
    "tag_long": bad_command(tag="001122334455667788"),
    "tag_not_hex": bad_command(tag="00112233445566zz"),
    "tag_number": bad_command(tag=1234),
    "op_unknown": bad_command(op="reboot"),
    "op_missing": {k: v for k, v in bad_command().items() if k != "op"},
    "op_from_prototype": bad_command(op="constructor"),
    "op_proto": bad_command(op="__proto__"),
    "op_number": bad_command(op=1),
    "args_not_list": {**bad_command(), "args": {"mode": 1, "hold_s": 60}},
    "data_not_object": "relay on",
}
for name, data in (REFUSED_BY_BOTH | REFUSED_BY_JS).items():
    call(f"refuse/{name}", "encodeDownlink", {"data": data, "variables": {}})


# ---------------------------------------------------------- randomized cross-check

RNG = random.Random(20260101)
# Bit lengths that give every varint length (1..5 bytes) and its boundaries.
WIDTHS = (0, 1, 6, 7, 8, 13, 14, 15, 20, 21, 22, 27, 28, 29, 31, 32)


def random_readings(rng: random.Random) -> list[tuple]:
    n = rng.randint(1, frame.MAX_READINGS)
    fields = []
    for lo in (0, 1, 0, 0):  # seq steps are fixed; dt >= 1; registers may stand still
        room = U32_MAX - (n - 1) * lo
        steps = []
        for _ in range(n - 1):
            d = min(rng.getrandbits(rng.choice(WIDTHS)), room)
            room -= d
            steps.append(d + lo)
        start = rng.choice([0, room, rng.randint(0, room)])
        vals = [start]
        for d in steps:
            vals.append(vals[-1] + d)
        fields.append(vals)
    seq0 = rng.choice([0, U32_MAX - (n - 1), rng.randint(0, U32_MAX - (n - 1))])
    return [(seq0 + k, fields[1][k], fields[2][k], fields[3][k], rng.randrange(256))
            for k in range(n)]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(8)
    i = rng.randrange(len(b))
    if kind == 0:
        b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        b[i] = rng.randrange(256)
    elif kind == 2:
        del b[rng.randrange(len(b) + 1):]
    elif kind == 3:
        b += rng.randbytes(rng.randint(1, 3))
    elif kind == 4:
        del b[i]
    elif kind == 5:
        b.insert(i, rng.choice([0x00, 0x7F, 0x80, 0xFF, rng.randrange(256)]))
    elif kind == 6 and len(b) > 1:
        b[1] = rng.randrange(40)  # the bundle count
    else:
        b[i:i + 3] = bytes(rng.choice([0x00, 0x80, 0xFF]) for _ in range(3))
    return bytes(b)


RANDOM_UPLINKS: dict[str, bytes] = {}
valid = []
for n in range(300):
    data = frame.assemble(frame.encode_body(random_readings(RNG)), RNG.randbytes(64))
    valid.append(data)
    RANDOM_UPLINKS[f"random/bundle/{n}"] = data
    try:
        pieces = frame.fragment(data, RNG.choice([51, 53, 115]))
    except frame.FrameError:
        pieces = []
    for k, p in enumerate(pieces if len(pieces) > 1 else []):
        RANDOM_UPLINKS[f"random/bundle/{n}/fragment/{k}"] = p
        valid.append(p)
for n in range(600):
    RANDOM_UPLINKS[f"random/mutant/{n}"] = mutate(RNG, RNG.choice(valid))
for key, data in RANDOM_UPLINKS.items():
    call(key, "decodeUplink", uplink(data))

RANDOM_COMMANDS: dict[str, tuple[bytes, bytes, bytes]] = {}
for n in range(200):
    op = RNG.choice(sorted(ARG_WIDTHS))
    args = [RNG.getrandbits(8 * w) for w in ARG_WIDTHS[op]]
    key, eui = RNG.randbytes(16), RNG.randbytes(8)
    data = frame.encode_command(key, eui, RNG.randint(1, U32_MAX),
                                RNG.choice([0, RNG.randint(0, U32_MAX)]), OPCODES[op], *args)
    RANDOM_COMMANDS[f"random/command/{n}"] = (data, key, eui)
    RANDOM_COMMANDS[f"random/command_mutant/{n}"] = (mutate(RNG, data), key, eui)
for name, (data, key, eui) in RANDOM_COMMANDS.items():
    call(name + "/decode", "decodeDownlink", downlink(data))
    if "mutant" not in name:
        tagless = frame.decode_command(key, eui, data).as_dict()
        call(name + "/encode", "encodeDownlink",
             {"data": {**tagless, "tag": data[-frame.TAG_LEN:].hex()}, "variables": {}})


# ------------------------------------------------------------------ the node run

@pytest.fixture(scope="module")
def js() -> dict:
    """Every call's result by key, from one node process."""
    # The same lookup tools/firmware_check.py makes for pyright: node on PATH.
    node = shutil.which("node")
    if not node:
        pytest.fail("node (Node.js) is not on PATH: the ChirpStack codec is tested under node. "
                    "Install Node.js (README: prerequisites; `make deps` also needs it for npm).")
    keys = list(CALLS)
    request = {"codec": str(CODEC), "calls": [CALLS[k] for k in keys]}
    proc = subprocess.run([node, str(RUNNER)], input=json.dumps(request), capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"{RUNNER.name} exited {proc.returncode}:\n{proc.stderr}")
    out = json.loads(proc.stdout)
    results = {}
    for key, res in zip(keys, out["results"], strict=True):
        if "exception" in res:
            pytest.fail(f"{key}: the codec threw instead of returning errors:\n{res['exception']}")
        results[key] = res["result"]
    results["_meta"] = {"max_ms": out["max_ms"], "leaked_globals": out["leaked_globals"]}
    return results


# ------------------------------------------------------------------ vector tests

@pytest.mark.parametrize("name", list(BUNDLES))
def test_bundle_vectors_decode_to_their_readings(js, name):
    b = BUNDLES[name]
    out = js[f"bundle/{name}"]
    assert "errors" not in out, out
    assert out["warnings"] == []
    data = out["data"]
    assert data["type"] == "bundle"
    assert data["count"] == len(b["readings"])
    assert data["readings"] == [reading_from_vector(r) for r in b["readings"]]
    assert data["signature"] == b["hex"][-2 * frame.SIG_LEN:]


@pytest.mark.parametrize("name", list(BUNDLES))
def test_fragment_vectors_decode_and_join_to_their_bundle(js, name):
    b = BUNDLES[name]
    frags = [js[f"fragment/{name}/{k}"]["data"] for k in range(len(b["fragments_51"]))]
    count = len(frags)
    assert count >= 2
    for k, f in enumerate(frags):
        assert f["type"] == "fragment"
        assert (f["tag"], f["index"], f["count"]) == (b["readings"][0]["seq"] & 0xFFFF, k, count)
        assert len(f["piece"]) // 2 + 4 <= 51
    assert "".join(f["piece"] for f in frags) == b["hex"]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_vectors_encode_to_their_bytes_and_decode_back(js, name):
    c = COMMANDS[name]
    enc = js[f"encode/{name}"]
    assert "errors" not in enc, enc
    assert enc["fPort"] == 2
    assert bytes(enc["bytes"]).hex() == c["hex"]
    dec = js[f"decode/{name}"]
    assert dec["data"] == {"counter": c["counter"], "expires": c["expires"], "op": c["op"],
                           "args": c["args"], "tag": c["hex"][-2 * frame.TAG_LEN:]}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_uplink_vectors_give_errors_with_their_reason(js, name):
    out = js[f"invalid/{name}"]
    assert set(out) == {"errors"}, out
    [message] = out["errors"]
    assert message.startswith(INVALID[name]["reason"] + ": "), message
    assert len(message) > len(INVALID[name]["reason"]) + 2


def test_error_message_names_what_was_wrong(js):
    assert js["invalid/count_says_more"] == {"errors": ["truncated: bundle says 4 readings, holds 3"]}


def test_frames_on_the_wrong_port_are_refused(js):
    for key in ("port/uplink_on_2", "port/uplink_on_3", "port/command_on_1"):
        [message] = js[key]["errors"]
        assert message.startswith("type: "), (key, message)


def test_malformed_input_objects_give_errors(js):
    assert js["input/bytes_not_array"]["errors"][0].startswith("field: ")
    assert js["input/byte_too_big"]["errors"][0].startswith("field: ")
    assert js["input/no_data"]["errors"][0].startswith("field: ")


@pytest.mark.parametrize("name", list(EDGES))
def test_varint_and_size_edges_agree_with_python(js, name):
    data, reason = EDGES[name]
    out = js[f"edge/{name}"]
    if reason is None:
        assert "data" in out, out
    else:
        assert out["errors"][0].startswith(reason + ": "), out
    assert out == python_uplink(data)


def test_edge_values_are_exact_beyond_31_bits(js):
    # JavaScript's bitwise operators are signed 32-bit: these would come out negative.
    readings = js["edge/varint_u32_max"]["data"]["readings"]
    assert readings[1]["import_dwh"] == U32_MAX
    assert js["edge/t_end_reaches_u32_max"]["data"]["readings"][1]["t_end"] == U32_MAX
    assert js["bundle/wide_deltas"]["data"]["readings"][0]["seq"] == 4_000_000_000


# ------------------------------------------------------------------ encode refusals

@pytest.mark.parametrize("name", list(REFUSED_BY_BOTH))
def test_encode_refuses_what_the_python_codec_refuses(js, name):
    d = REFUSED_BY_BOTH[name]
    with pytest.raises(frame.FrameError) as exc:
        frame.encode_command(bytes(16), bytes(8), d["counter"], d["expires"], OPCODES[d["op"]],
                             *d["args"])
    assert exc.value.reason == "field"
    [message] = js[f"refuse/{name}"]["errors"]
    assert message.startswith("field: "), message


@pytest.mark.parametrize("name", list(REFUSED_BY_JS))
def test_encode_refuses_bad_ops_and_missing_tags(js, name):
    out = js[f"refuse/{name}"]
    assert set(out) == {"errors"}, out
    assert out["errors"][0].startswith("field: ")


def test_encode_without_tag_says_the_gateway_computes_it(js):
    [message] = js["refuse/no_tag"]["errors"]
    assert "tag" in message and "gateway" in message


# ------------------------------------------------------------------ randomized

def test_random_uplinks_decode_like_the_python_codec(js):
    mismatches = []
    verdicts = set()
    for key, data in RANDOM_UPLINKS.items():
        want = python_uplink(data)
        verdicts.add(want["errors"][0].split(":")[0] if "errors" in want else want["data"]["type"])
        if js[key] != want:
            mismatches.append(f"{key} {data.hex()}\n  js:     {js[key]}\n  python: {want}")
    assert not mismatches, f"{len(mismatches)} differ, first:\n" + "\n".join(mismatches[:3])
    # The corpus must reach every verdict, or the comparison proves little.
    assert {"bundle", "fragment", "version", "type", "truncated", "oversized",
            "field"} <= verdicts, verdicts


def test_random_commands_encode_and_decode_like_the_python_codec(js):
    mismatches = []
    verdicts = set()
    for name, (data, key, eui) in RANDOM_COMMANDS.items():
        want = python_downlink(data, key, eui)
        verdicts.add(want["errors"][0].split(":")[0] if "errors" in want else "ok")
        got = js[name + "/decode"]
        if got != want:
            mismatches.append(f"{name} decode {data.hex()}\n  js: {got}\n  python: {want}")
        if "mutant" not in name:
            enc = js[name + "/encode"]
            if enc != {"bytes": list(data), "fPort": 2}:
                mismatches.append(f"{name} encode {data.hex()}\n  js: {enc}")
    assert not mismatches, f"{len(mismatches)} differ, first:\n" + "\n".join(mismatches[:3])
    assert {"ok", "version", "type", "truncated", "oversized", "opcode"} <= verdicts, verdicts


# ------------------------------------------------------------------ how it runs

def test_codec_is_pure_and_fast(js):
    # Nothing may survive between frames in ChirpStack, and each call has 100 ms.
    assert js["_meta"]["leaked_globals"] == []
    assert js["_meta"]["max_ms"] < 100


def test_codec_source_is_plain_es5():
    # QuickJS would take newer syntax, but the codec is meant to paste into any
    # LoRaWAN Payload Codec runtime; and Node-only names would not exist there.
    code = re.sub(r"/\*.*?\*/|//[^\n]*", "", CODEC.read_text(), flags=re.S)
    for pattern in (r"\blet\s", r"\bconst\s", r"\bclass\s", r"=>", "`", r"\.\.\.", r"\bBigInt\b",
                    r"\brequire\b", r"\bBuffer\b", r"\bmodule\b", r"\bexports\b", r"\bDate\b",
                    r"Math\.random"):
        assert not re.search(pattern, code), pattern
    for fn in ("decodeUplink", "encodeDownlink", "decodeDownlink"):
        assert re.search(rf"^function {fn}\(input\) {{", code, re.M), fn
