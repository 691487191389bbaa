"""The meter's SHA-512 and Ed25519, run in the real MicroPython interpreter.

References, none of them the code under test: the FIPS 180-2 examples and
RFC 8032 section 7.1 vectors typed below, CPython's hashlib, and
pycryptodome. Each group of checks is one interpreter launch (a fixture
with module scope) that reads its inputs as JSON on stdin and prints its
results as one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess

import pytest
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from tools import runtime

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493


def run_mpy(code: str, data) -> dict:
    # The results travel as one JSON line of a few tens of KB: more heap
    # than the unix port's default, nothing to do with the code under test.
    res = runtime.run_micropython(None, code=code, input=json.dumps(data).encode(),
                                  heapsize="8M", timeout=120)
    out = res.stdout.decode()
    if res.returncode != 0:
        pytest.fail(f"MicroPython exited {res.returncode}:\n{out}\n{res.stderr.decode()}")
    return json.loads(out.strip().splitlines()[-1])


def rfc_hex(text: str) -> bytes:
    """Hex laid out as in the RFC: any whitespace between groups."""
    return bytes.fromhex("".join(text.split()))


# --- SHA-512 ---------------------------------------------------------------

# FIPS 180-2 appendix C examples, the NIST 448-bit message (56 bytes: the
# padding still fits one block) and the empty message.
SHA512_KAT = [
    (b"abc",
     "ddaf35a193617aba cc417349ae204131 12e6fa4e89a97ea2 0a9eeee64b55d39a"
     "2192992a274fc1a8 36ba3c23a3feebbd 454d4423643ce80e 2a9ac94fa54ca49f"),
    (b"",
     "cf83e1357eefb8bd f1542850d66d8007 d620e4050b5715dc 83f4a921d36ce9ce"
     "47d0d13c5d85f2b0 ff8318d2877eec2f 63b931bd47417a81 a538327af927da3e"),
    (b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmno"
     b"ijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
     "8e959b75dae313da 8cf4f72814fc143f 8f7779c6eb9f7fa1 7299aeadb6889018"
     "501d289e4900f7e4 331b99dec4b5433a c7d329eeb6dd2654 5e96e55b874be909"),
    (b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
     "204a8fc6dda82f0a 0ced7beb8e08a416 57c16ef468b228a8 279be331a703c335"
     "96fd15c13b1b07f9 aa1d3bea57789ca0 31ad85c7a71dd703 54ec631238ca3445"),
]

SHA_SCRIPT = r"""
import sys, json
from binascii import hexlify, unhexlify
from meter.crypto import sha512 as mod
from meter.crypto.sha512 import PureSha512

data = json.loads(sys.stdin.read())
out = {"fast_path": mod.sha512 is not PureSha512}

def hx(b):
    return hexlify(b).decode()

out["kat"] = [[PureSha512(unhexlify(m)).hexdigest(), hx(mod.sha512(unhexlify(m)).digest())]
              for m in data["kat"]]
out["lengths"] = [PureSha512(unhexlify(m)).hexdigest() for m in data["lengths"]]

chunked = []
for m, cuts in data["chunked"]:
    m = unhexlify(m)
    h = PureSha512()
    prev = 0
    for c in cuts + [len(m)]:
        # Alternate the buffer types a caller may hand in.
        part = m[prev:c]
        h.update(bytearray(part) if c & 1 else memoryview(part))
        prev = c
    chunked.append(h.hexdigest())
out["chunked"] = chunked

h = PureSha512(b"abc")
d1 = h.digest()
d2 = h.digest()
h.update(b"def")
out["again"] = [hx(d1), hx(d2), h.hexdigest()]

pieces = []
for m in data["pieces"]:
    m = unhexlify(m)
    h = PureSha512()
    n = 0
    for _ in h.update_steps(m):
        n += 1
    for _ in h.digest_steps():
        n += 1
    pieces.append([n, hx(h.digest())])
out["pieces"] = pieces
print(json.dumps(out))
"""

_rng = random.Random(20170101)
# Every length up to 300 covers the padding edge cases: 111/112 (does the
# length still fit in the last block), 127/128, 239/240, 255/256.
SHA_LENGTHS = [_rng.randbytes(n) for n in range(0, 301)]
SHA_CHUNKED = []
for _n in (0, 1, 127, 128, 129, 255, 256, 257, 500, 1000):
    _m = _rng.randbytes(_n)
    SHA_CHUNKED.append((_m, sorted(_rng.randrange(0, _n + 1) for _ in range(5))))
SHA_PIECES = [_rng.randbytes(n) for n in (0, 100, 111, 112, 128, 300)]


@pytest.fixture(scope="module")
def sha_run():
    return run_mpy(SHA_SCRIPT, {
        "kat": [m.hex() for m, _ in SHA512_KAT],
        "lengths": [m.hex() for m in SHA_LENGTHS],
        "chunked": [[m.hex(), cuts] for m, cuts in SHA_CHUNKED],
        "pieces": [m.hex() for m in SHA_PIECES],
    })


def test_sha512_fips_known_answers(sha_run):
    for (msg, want), (pure, chosen) in zip(SHA512_KAT, sha_run["kat"], strict=True):
        want = "".join(want.split())
        assert pure == want, msg
        assert chosen == want, msg  # whichever implementation the port picked


def test_sha512_matches_cpython_for_every_length_to_300(sha_run):
    for msg, got in zip(SHA_LENGTHS, sha_run["lengths"], strict=True):
        assert got == hashlib.sha512(msg).hexdigest(), f"length {len(msg)}"


def test_sha512_incremental_updates_with_any_split_and_buffer_type(sha_run):
    for (msg, cuts), got in zip(SHA_CHUNKED, sha_run["chunked"], strict=True):
        assert got == hashlib.sha512(msg).hexdigest(), f"length {len(msg)} cut at {cuts}"


def test_sha512_digest_does_not_end_the_hash(sha_run):
    d1, d2, d3 = sha_run["again"]
    assert d1 == d2 == hashlib.sha512(b"abc").hexdigest()
    assert d3 == hashlib.sha512(b"abcdef").hexdigest()


def test_sha512_steps_are_seven_per_block(sha_run):
    for msg, (n, digest) in zip(SHA_PIECES, sha_run["pieces"], strict=True):
        blocks = (len(msg) + 17 + 127) // 128  # with the 0x80 byte and 16-byte length
        assert n == 7 * blocks, f"length {len(msg)}"
        assert digest == hashlib.sha512(msg).hexdigest()


# --- Ed25519 ---------------------------------------------------------------

# RFC 8032 section 7.1: (name, SECRET KEY, PUBLIC KEY, MESSAGE, SIGNATURE).
RFC8032 = [
    ("TEST 1",
     """9d61b19deffd5a60ba844af492ec2cc4
        4449c5697b326919703bac031cae7f60""",
     """d75a980182b10ab7d54bfed3c964073a
        0ee172f3daa62325af021a68f707511a""",
     "",
     """e5564300c360ac729086e2cc806e828a
        84877f1eb8e5d974d873e06522490155
        5fb8821590a33bacc61e39701cf9b46b
        d25bf5f0595bbe24655141438e7a100b"""),
    ("TEST 2",
     """4ccd089b28ff96da9db6c346ec114e0f
        5b8a319f35aba624da8cf6ed4fb8a6fb""",
     """3d4017c3e843895a92b70aa74d1b7ebc
        9c982ccf2ec4968cc0cd55f12af4660c""",
     "72",
     """92a009a9f0d4cab8720e820b5f642540
        a2b27b5416503f8fb3762223ebdb69da
        085ac1e43e15996e458f3613d0f11d8c
        387b2eaeb4302aeeb00d291612bb0c00"""),
    ("TEST 3",
     """c5aa8df43f9f837bedb7442f31dcb7b1
        66d38535076f094b85ce3a2e0b4458f7""",
     """fc51cd8e6218a1a38da47ed00230f058
        0816ed13ba3303ac5deb911548908025""",
     "af82",
     """6291d657deec24024827e69c3abe01a3
        0ce548a284743a445e3680d7db5ac3ac
        18ff9b538d16f290ae67f760984dc659
        4a7c15e9716ed28dc027beceea1ec40a"""),
    ("TEST 1024",
     """f5e5767cf153319517630f226876b86c
        8160cc583bc013744c6bf255f5cc0ee5""",
     """278117fc144c72340f67d0f2316e8386
        ceffbf2b2428c9c51fef7c597f1d426e""",
     """08b8b2b733424243760fe426a4b54908
        632110a66c2f6591eabd3345e3e4eb98
        fa6e264bf09efe12ee50f8f54e9f77b1
        e355f6c50544e23fb1433ddf73be84d8
        79de7c0046dc4996d9e773f4bc9efe57
        38829adb26c81b37c93a1b270b20329d
        658675fc6ea534e0810a4432826bf58c
        941efb65d57a338bbd2e26640f89ffbc
        1a858efcb8550ee3a5e1998bd177e93a
        7363c344fe6b199ee5d02e82d522c4fe
        ba15452f80288a821a579116ec6dad2b
        3b310da903401aa62100ab5d1a36553e
        06203b33890cc9b832f79ef80560ccb9
        a39ce767967ed628c6ad573cb116dbef
        efd75499da96bd68a8a97b928a8bbc10
        3b6621fcde2beca1231d206be6cd9ec7
        aff6f6c94fcd7204ed3455c68c83f4a4
        1da4af2b74ef5c53f1d8ac70bdcb7ed1
        85ce81bd84359d44254d95629e9855a9
        4a7c1958d1f8ada5d0532ed8a5aa3fb2
        d17ba70eb6248e594e1a2297acbbb39d
        502f1a8c6eb6f1ce22b3de1a1f40cc24
        554119a831a9aad6079cad88425de6bd
        e1a9187ebb6092cf67bf2b13fd65f270
        88d78b7e883c8759d2c4f5c65adb7553
        878ad575f9fad878e80a0c9ba63bcbcc
        2732e69485bbc9c90bfbd62481d9089b
        eccf80cfe2df16a2cf65bd92dd597b07
        07e0917af48bbb75fed413d238f5555a
        7a569d80c3414a8d0859dc65a46128ba
        b27af87a71314f318c782b23ebfe808b
        82b0ce26401d2e22f04d83d1255dc51a
        ddd3b75a2b1ae0784504df543af8969b
        e3ea7082ff7fc9888c144da2af58429e
        c96031dbcad3dad9af0dcbaaaf268cb8
        fcffead94f3c7ca495e056a9b47acdb7
        51fb73e666c6c655ade8297297d07ad1
        ba5e43f1bca32301651339e22904cc8c
        42f58c30c04aafdb038dda0847dd988d
        cda6f3bfd15c4b4c4525004aa06eeff8
        ca61783aacec57fb3d1f92b0fe2fd1a8
        5f6724517b65e614ad6808d6f6ee34df
        f7310fdc82aebfd904b01e1dc54b2927
        094b2db68d6f903b68401adebf5a7e08
        d78ff4ef5d63653a65040cf9bfd4aca7
        984a74d37145986780fc0b16ac451649
        de6188a7dbdf191f64b5fc5e2ab47b57
        f7f7276cd419c17a3ca8e1b939ae49e4
        88acba6b965610b5480109c8b17b80e1
        b7b750dfc7598d5d5011fd2dcc5600a3
        2ef5b52a1ecc820e308aa342721aac09
        43bf6686b64b2579376504ccc493d97e
        6aed3fb0f9cd71a43dd497f01f17c0e2
        cb3797aa2a2f256656168e6c496afc5f
        b93246f6b1116398a346f1a641f3b041
        e989f7914f90cc2c7fff357876e506b5
        0d334ba77c225bc307ba537152f3f161
        0e4eafe595f6d9d90d11faa933a15ef1
        369546868a7f3a45a96768d40fd9d034
        12c091c6315cf4fde7cb68606937380d
        b2eaaa707b4c4185c32eddcdd306705e
        4dc1ffc872eeee475a64dfac86aba41c
        0618983f8741c5ef68d3a101e8a3b8ca
        c60c905c15fc910840b94c00a0b9d0""",
     """0aab4c900501b3e24d7cdf4663326a3a
        87df5e4843b2cbdb67cbf6e460fec350
        aa5371b1508f9f4528ecea23c436d94b
        5e8fcd4f681e30a6ac00a9704a188a03"""),
    ("TEST SHA(abc)",
     """833fe62409237b9d62ec77587520911e
        9a759cec1d19755b7da901b96dca3d42""",
     """ec172b93ad5e563bf4932c70e1245034
        c35467ef2efd4d64ebf819683467e2bf""",
     """ddaf35a193617abacc417349ae204131
        12e6fa4e89a97ea20a9eeee64b55d39a
        2192992a274fc1a836ba3c23a3feebbd
        454d4423643ce80e2a9ac94fa54ca49f""",
     """dc2a4459e7369633a52b1bf277839a00
        201009a3efbf3ecb69bea2186c26b589
        09351fc9ac90b3ecfdfbc7c66431e030
        3dca179c138ac17ad9bef1177331a704"""),
]
RFC_VECTORS = [(name, rfc_hex(sk), rfc_hex(pk), rfc_hex(msg), rfc_hex(sig))
               for name, sk, pk, msg, sig in RFC8032]

# Message lengths around the SHA-512 block edges of both hashes a signature
# takes: 32 + n bytes (nonce) and 64 + n bytes (challenge).
RANDOM_LENGTHS = [0, 1, 7, 36, 47, 48, 63, 64, 79, 80, 95, 96, 111, 112, 127, 128,
                  200, 256, 300, 1000]
_rng = random.Random(8032)
RANDOM_CASES = [(_rng.randbytes(32), _rng.randbytes(n)) for n in RANDOM_LENGTHS]

# The signer cases: a frame-sized message (domain + DevEUI + 24-byte body)
# and the lengths where the step count changes.
SIGNER_LENGTHS = [0, 36, 47, 48, 79, 80, 128, 1023]
SIGNER_CASES = [(_rng.randbytes(32), _rng.randbytes(n)) for n in SIGNER_LENGTHS]
FIRST_SEED, FIRST_MSG = _rng.randbytes(32), _rng.randbytes(36)


def pycryptodome_sign(seed: bytes, msg: bytes) -> tuple[bytes, bytes]:
    key = ECC.construct(curve="Ed25519", seed=seed)
    return (key.public_key().export_key(format="raw"),
            eddsa.new(key, "rfc8032").sign(msg))


def pycryptodome_verifies(pub: bytes, msg: bytes, sig: bytes) -> bool:
    key = eddsa.import_public_key(pub)
    try:
        eddsa.new(key, "rfc8032").verify(msg, sig)
    except ValueError:
        return False
    return True


def flip(b: bytes, bit: int) -> bytes:
    out = bytearray(b)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def le32(n: int) -> bytes:
    return n.to_bytes(32, "little")


IDENTITY = le32(1)  # the neutral point (0, 1), canonical
# With A and R the neutral point, [S]B = R + [k]A holds exactly when S = 0
# mod L, whatever the message: a verifier that skipped the S < L check or
# decoded non-canonical points leniently would accept the variants below.
VERIFY_CASES: list[tuple[str, bytes, bytes, bytes, bool]] = [
    ("neutral A and R, S = 0", IDENTITY, b"m", IDENTITY + le32(0), True),
    ("S = L", IDENTITY, b"m", IDENTITY + le32(L), False),
    ("S = 2L", IDENTITY, b"m", IDENTITY + le32(2 * L), False),
    ("R with y = p + 1", IDENTITY, b"m", le32(P + 1) + le32(0), False),
    ("R with x = 0 and the sign bit set", IDENTITY, b"m", le32(1 | 1 << 255) + le32(0), False),
    ("A with y = p + 1", le32(P + 1), b"m", IDENTITY + le32(0), False),
    ("A with x = 0 and the sign bit set", le32(1 | 1 << 255), b"m", IDENTITY + le32(0), False),
    # (y**2 - 1) / (d y**2 + 1) is not a square mod p for y = 2.
    ("A not on the curve (y = 2)", le32(2), b"m", IDENTITY + le32(0), False),
]
for _i, (_seed, _msg) in enumerate(RANDOM_CASES[:6]):
    _pub, _sig = pycryptodome_sign(_seed, _msg)
    _s = int.from_bytes(_sig[32:], "little")
    VERIFY_CASES += [
        (f"good {_i}", _pub, _msg, _sig, True),
        (f"S + L {_i}", _pub, _msg, _sig[:32] + le32(_s + L), False),
        (f"flipped R bit {_i}", _pub, _msg, flip(_sig, _rng.randrange(256)), False),
        (f"flipped S bit {_i}", _pub, _msg, flip(_sig, 256 + _rng.randrange(253)), False),
        (f"flipped key bit {_i}", flip(_pub, _rng.randrange(256)), _msg, _sig, False),
        (f"other message {_i}", _pub, _msg + b"\0", _sig, False),
    ]
    if _msg:
        VERIFY_CASES.append((f"flipped message bit {_i}", _pub,
                             flip(_msg, _rng.randrange(8 * len(_msg))), _sig, False))

ED_SCRIPT = r"""
import sys, json
from binascii import hexlify, unhexlify
from meter.crypto import ed25519, sha512

data = json.loads(sys.stdin.read())
out = {"fast_sha": sha512.sha512 is not sha512.PureSha512}

def hx(b):
    return hexlify(b).decode()

def drive(s):
    while not s.step():
        pass
    return s

# First, before anything has built the fixed-base table.
s = drive(ed25519.Signer(unhexlify(data["first"][0]), unhexlify(data["first"][1])))
out["first"] = [hx(s.signature), s.steps]

out["rfc"] = []
for seed, msg in data["rfc"]:
    seed, msg = unhexlify(seed), unhexlify(msg)
    out["rfc"].append([hx(ed25519.public_key(seed)), hx(ed25519.sign(seed, msg))])

out["random"] = []
for seed, msg in data["random"]:
    seed, msg = unhexlify(seed), unhexlify(msg)
    key = ed25519.SigningKey(seed)
    out["random"].append([hx(ed25519.public_key(seed)), hx(ed25519.sign(seed, msg)),
                          hx(key.public), hx(key.sign(msg))])

out["verify"] = [ed25519.verify(unhexlify(p), unhexlify(m), unhexlify(g))
                 for p, m, g in data["verify"]]

out["signer"] = []
for seed, msg in data["signer"]:
    seed, msg = unhexlify(seed), unhexlify(msg)
    a = drive(ed25519.Signer(seed, msg))
    steps = a.steps
    again = a.step()  # finished: stays finished, does no more work
    key = ed25519.SigningKey(seed)
    b = drive(key.signer(msg))
    out["signer"].append({"seed": [hx(a.signature), steps], "again": [again, a.steps],
                          "key": [hx(b.signature), b.steps],
                          "sign": hx(ed25519.sign(seed, msg))})

# Two signatures in progress at once, advanced alternately.
(s1, m1), (s2, m2) = [(unhexlify(a), unhexlify(b)) for a, b in data["signer"][:2]]
x = ed25519.Signer(s1, m1)
y = ed25519.Signer(ed25519.SigningKey(s2), m2)
dx = dy = False
while not (dx and dy):
    dx = dx or x.step()
    dy = dy or y.step()
out["interleaved"] = [hx(x.signature), hx(y.signature)]

# The message is copied: reusing the caller's buffer mid-signature is harmless.
seed, msg = [unhexlify(v) for v in data["signer"][1]]
buf = bytearray(msg)
s = ed25519.Signer(seed, buf)
s.step()
for i in range(len(buf)):
    buf[i] ^= 0xFF
out["reused_buffer"] = hx(drive(s).signature)

# A step that fails (here: no heap) keeps failing; it never reports success.
import micropython
s = ed25519.Signer(ed25519.SigningKey(bytes(32)), b"m")
s.step()
failures = []
micropython.heap_lock()
try:
    s.step()
except MemoryError:
    failures.append("MemoryError")
micropython.heap_unlock()
for _ in range(2):
    try:
        s.step()
        failures.append("no error")
    except MemoryError:
        failures.append("MemoryError")
out["failed_signer"] = [failures, s.signature]

def error(f):
    try:
        f()
    except Exception as e:
        return [type(e).__name__, str(e)]
    return None

seed = bytes(32)
sig = ed25519.sign(seed, b"m")
pub = ed25519.public_key(seed)
out["errors"] = [
    error(lambda: ed25519.sign(bytes(31), b"m")),
    error(lambda: ed25519.public_key(bytes(33))),
    error(lambda: ed25519.Signer(bytes(31), b"m")),
    error(lambda: ed25519.sign(seed, "text")),
    error(lambda: ed25519.verify(pub, b"m", sig[:63])),
    error(lambda: ed25519.verify(pub[:31], b"m", sig)),
    error(lambda: ed25519.verify(pub, None, sig)),
]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ed_run():
    return run_mpy(ED_SCRIPT, {
        "first": [FIRST_SEED.hex(), FIRST_MSG.hex()],
        "rfc": [[sk.hex(), msg.hex()] for _, sk, _, msg, _ in RFC_VECTORS],
        "random": [[seed.hex(), msg.hex()] for seed, msg in RANDOM_CASES],
        "verify": [[p.hex(), m.hex(), s.hex()] for _, p, m, s, _ in VERIFY_CASES],
        "signer": [[seed.hex(), msg.hex()] for seed, msg in SIGNER_CASES],
    })


def test_rfc8032_vectors_are_typed_correctly():
    # Guards the transcription above: an independent implementation agrees.
    for name, sk, pk, msg, sig in RFC_VECTORS:
        assert pycryptodome_sign(sk, msg) == (pk, sig), name


@pytest.mark.parametrize("index", range(len(RFC8032)), ids=[v[0] for v in RFC8032])
def test_rfc8032_section_7_1(ed_run, index):
    name, _, pk, _, sig = RFC_VECTORS[index]
    got_pk, got_sig = ed_run["rfc"][index]
    assert got_pk == pk.hex(), name
    assert got_sig == sig.hex(), name


def test_keys_and_signatures_byte_identical_to_pycryptodome(ed_run):
    for (seed, msg), got in zip(RANDOM_CASES, ed_run["random"], strict=True):
        pk, sig = pycryptodome_sign(seed, msg)
        assert got == [pk.hex(), sig.hex(), pk.hex(), sig.hex()], f"message length {len(msg)}"
        assert pycryptodome_verifies(bytes.fromhex(got[0]), msg, bytes.fromhex(got[1]))


def test_verify_accepts_good_and_rejects_tampered_or_non_canonical(ed_run):
    got = dict(zip([c[0] for c in VERIFY_CASES], ed_run["verify"], strict=True))
    want = {name: expected for name, _, _, _, expected in VERIFY_CASES}
    assert got == want
    # The tampered real signatures are invalid for pycryptodome too.
    for name, pub, msg, sig, expected in VERIFY_CASES:
        if name.startswith(("good", "S + L", "flipped S", "flipped R", "other", "flipped m")):
            assert pycryptodome_verifies(pub, msg, sig) == expected, name


def _blocks(n: int) -> int:
    """SHA-512 compressions for an n-byte message (0x80 byte, 16-byte length)."""
    return (n + 17 + 127) // 128


def documented_steps(n: int, *, seed: bool, first: bool, fast_sha: bool) -> int:
    """Signer.step() calls for an n-byte message, as docs/crypto.md states."""
    if fast_sha:  # a C hashlib.sha512: one step per 128 bytes per part, one per digest
        c = (n + 127) // 128
        steps = 49 + 2 * c + (45 if seed else 0)
    else:  # the pure-Python hash: seven steps per compressed block
        steps = 7 * (_blocks(32 + n) + _blocks(64 + n)) + 44 + (50 if seed else 0)
    return steps + (83 if first else 0)


def test_first_signer_builds_the_table_in_steps_too(ed_run):
    sig, steps = ed_run["first"]
    assert sig == pycryptodome_sign(FIRST_SEED, FIRST_MSG)[1].hex()
    assert steps == documented_steps(36, seed=True, first=True, fast_sha=ed_run["fast_sha"])


def test_signer_matches_sign_with_the_documented_step_count(ed_run):
    fast = ed_run["fast_sha"]
    for (seed, msg), got in zip(SIGNER_CASES, ed_run["signer"], strict=True):
        want = pycryptodome_sign(seed, msg)[1].hex()
        n = len(msg)
        assert got["sign"] == want, n
        assert got["seed"] == [want, documented_steps(n, seed=True, first=False, fast_sha=fast)], n
        assert got["key"] == [want, documented_steps(n, seed=False, first=False, fast_sha=fast)], n
        assert got["again"] == [True, got["seed"][1]], n


def test_step_counts_where_hashlib_has_sha512(tmp_path):
    """A port built with hashlib.sha512 takes the other hashing branch. No port here has one,
    so MicroPython is given a hashlib whose sha512 is the pure implementation, and the
    crypto modules are imported afresh: the branch runs, with its own step counts."""
    # A C hashlib object has update() and digest() only: wrap the pure one to look like it.
    (tmp_path / "hashlib_with_sha512.py").write_text(
        "from hashlib import *\n"
        "_impl = None\n"
        "class sha512:\n"
        "    def __init__(self, data=b''):\n"
        "        self._h = _impl(data)\n"
        "    def update(self, b):\n"
        "        self._h.update(b)\n"
        "    def digest(self):\n"
        "        return self._h.digest()\n")
    code = """
import sys, json
from binascii import hexlify, unhexlify
sys.path.insert(0, %r)
from meter.crypto.sha512 import PureSha512
import hashlib_with_sha512
hashlib_with_sha512._impl = PureSha512
sys.modules["hashlib"] = hashlib_with_sha512
del sys.modules["meter.crypto.sha512"]
__import__("meter.crypto.sha512")
__import__("meter.crypto.ed25519")
sha512 = sys.modules["meter.crypto.sha512"]
ed25519 = sys.modules["meter.crypto.ed25519"]
assert sha512.sha512 is hashlib_with_sha512.sha512, "the hashlib branch was not taken"
ed25519.precompute()
out = []
for seed_hex, msg_hex in json.loads(sys.stdin.read()):
    seed, msg = unhexlify(seed_hex), unhexlify(msg_hex)
    row = []
    for key in (seed, ed25519.SigningKey(seed)):
        s = ed25519.Signer(key, msg)
        while not s.step():
            pass
        row.append([hexlify(s.signature).decode(), s.steps])
    out.append(row)
print(json.dumps(out))
""" % str(tmp_path)
    got = run_mpy(code, [[seed.hex(), msg.hex()] for seed, msg in SIGNER_CASES])
    for (seed, msg), row in zip(SIGNER_CASES, got, strict=True):
        want = pycryptodome_sign(seed, msg)[1].hex()
        (sig_seed, steps_seed), (sig_key, steps_key) = row
        assert sig_seed == want and sig_key == want, len(msg)
        assert steps_seed == documented_steps(len(msg), seed=True, first=False, fast_sha=True)
        assert steps_key == documented_steps(len(msg), seed=False, first=False, fast_sha=True)


def test_two_signers_in_progress_do_not_disturb_each_other(ed_run):
    want = [pycryptodome_sign(seed, msg)[1].hex() for seed, msg in SIGNER_CASES[:2]]
    assert ed_run["interleaved"] == want


def test_signer_copies_the_message(ed_run):
    seed, msg = SIGNER_CASES[1]
    assert ed_run["reused_buffer"] == pycryptodome_sign(seed, msg)[1].hex()


def test_a_failed_signer_never_reports_finished(ed_run):
    assert ed_run["failed_signer"] == [["MemoryError"] * 3, None]


def test_bad_arguments_are_named_in_the_error(ed_run):
    assert ed_run["errors"] == [
        ["ValueError", "seed must be 32 bytes, got 31"],
        ["ValueError", "seed must be 32 bytes, got 33"],
        ["ValueError", "seed must be 32 bytes, got 31"],
        ["TypeError", "message must be bytes, not str"],
        ["ValueError", "signature must be 64 bytes, got 63"],
        ["ValueError", "public key must be 32 bytes, got 31"],
        ["TypeError", "message must be bytes, not NoneType"],
    ]


def test_compiles_for_both_boards(tmp_path):
    for arch in ("xtensawin", "armv6m"):
        for name in ("__init__", "sha512", "ed25519"):
            src = runtime.FIRMWARE / "meter" / "crypto" / f"{name}.py"
            res = subprocess.run([runtime.mpy_cross(), f"-march={arch}", "-o",
                                  str(tmp_path / f"{name}-{arch}.mpy"), str(src)],
                                 capture_output=True, timeout=60)
            assert res.returncode == 0, res.stderr.decode()
