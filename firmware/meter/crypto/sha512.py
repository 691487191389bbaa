# SHA-512 (FIPS 180-4) for Ed25519 on boards whose MicroPython has no
# hashlib.sha512.
#
# `sha512(data=b"")` gives an object with update(data), digest() and
# hexdigest(). When the port's hashlib has sha512 it is used as is (C is far
# faster); otherwise the pure-Python PureSha512 below stands in. PureSha512 is
# always importable so it can be checked on any port.
#
# Speed notes, because every 64-bit word is a heap-allocated big int on the
# 32-bit targets (small ints are 31-bit there):
# - rounds are unrolled eight at a time so the working variables change
#   roles instead of being shuffled through a tuple each round;
# - a rotation of x is read off x | x << 64 (one shift per rotation), and
#   masks to 64 bits are applied only where a value is stored: bits above 63
#   never reach the low 64 bits through +, ^, &, |, so intermediate results
#   may carry garbage up there;
# - the round constants, the message schedule list and the block buffer are
#   made once (per module or per object) and reused.

import hashlib
import struct

_M64 = 0xFFFFFFFFFFFFFFFF

_K = (
    0x428a2f98d728ae22, 0x7137449123ef65cd, 0xb5c0fbcfec4d3b2f,
    0xe9b5dba58189dbbc, 0x3956c25bf348b538, 0x59f111f1b605d019,
    0x923f82a4af194f9b, 0xab1c5ed5da6d8118, 0xd807aa98a3030242,
    0x12835b0145706fbe, 0x243185be4ee4b28c, 0x550c7dc3d5ffb4e2,
    0x72be5d74f27b896f, 0x80deb1fe3b1696b1, 0x9bdc06a725c71235,
    0xc19bf174cf692694, 0xe49b69c19ef14ad2, 0xefbe4786384f25e3,
    0xfc19dc68b8cd5b5, 0x240ca1cc77ac9c65, 0x2de92c6f592b0275,
    0x4a7484aa6ea6e483, 0x5cb0a9dcbd41fbd4, 0x76f988da831153b5,
    0x983e5152ee66dfab, 0xa831c66d2db43210, 0xb00327c898fb213f,
    0xbf597fc7beef0ee4, 0xc6e00bf33da88fc2, 0xd5a79147930aa725,
    0x6ca6351e003826f, 0x142929670a0e6e70, 0x27b70a8546d22ffc,
    0x2e1b21385c26c926, 0x4d2c6dfc5ac42aed, 0x53380d139d95b3df,
    0x650a73548baf63de, 0x766a0abb3c77b2a8, 0x81c2c92e47edaee6,
    0x92722c851482353b, 0xa2bfe8a14cf10364, 0xa81a664bbc423001,
    0xc24b8b70d0f89791, 0xc76c51a30654be30, 0xd192e819d6ef5218,
    0xd69906245565a910, 0xf40e35855771202a, 0x106aa07032bbd1b8,
    0x19a4c116b8d2d0c8, 0x1e376c085141ab53, 0x2748774cdf8eeb99,
    0x34b0bcb5e19b48a8, 0x391c0cb3c5c95a63, 0x4ed8aa4ae3418acb,
    0x5b9cca4f7763e373, 0x682e6ff3d6b2b8a3, 0x748f82ee5defb2fc,
    0x78a5636f43172f60, 0x84c87814a1f0ab72, 0x8cc702081a6439ec,
    0x90befffa23631e28, 0xa4506cebde82bde9, 0xbef9a3f7b2c67915,
    0xc67178f2e372532b, 0xca273eceea26619c, 0xd186b8c721c0c207,
    0xeada7dd6cde0eb1e, 0xf57d4f7fee6ed178, 0x6f067aa72176fba,
    0xa637dc5a2c898a6, 0x113f9804bef90dae, 0x1b710b35131c471b,
    0x28db77f523047d84, 0x32caab7b40c72493, 0x3c9ebe0a15c9bebc,
    0x431d67c49c100d4c, 0x4cc5d4becb3e42b6, 0x597f299cfc657e2a,
    0x5fcb6fab3ad6faec, 0x6c44198c4a475817,
)

_IV = (
    0x6a09e667f3bcc908, 0xbb67ae8584caa73b,
    0x3c6ef372fe94f82b, 0xa54ff53a5f1d36f1,
    0x510e527fade682d1, 0x9b05688c2b3e6c1f,
    0x1f83d9abfb41bd6b, 0x5be0cd19137e2179,
)


def _compress_gen(st, w, block, off):
    """Process one 128-byte block at block[off:] into the eight-word state
    list st, using w (a list of 80) as scratch for the message schedule.
    Yields after each of seven similar pieces of work (half the schedule, or
    sixteen rounds), so a caller can interleave other work."""
    m = _M64
    k = _K
    v = struct.unpack_from(">16Q", block, off)
    for t in range(16):
        w[t] = v[t]
    for t in range(16, 80):
        x = w[t - 15]
        x2 = x | (x << 64)
        y = w[t - 2]
        y2 = y | (y << 64)
        w[t] = (w[t - 16] + ((x2 >> 1) ^ (x2 >> 8) ^ (x >> 7)) + w[t - 7]
                + ((y2 >> 19) ^ (y2 >> 61) ^ (y >> 6))) & m
        if t == 47:
            yield
    yield
    a, b, c, d, e, f, g, h = st
    for i in range(0, 80, 8):
        x = e | (e << 64)
        t = (h + ((x >> 14) ^ (x >> 18) ^ (x >> 41)) + (g ^ (e & (f ^ g)))
             + k[i] + w[i])
        d = (d + t) & m
        x = a | (a << 64)
        h = (t + ((x >> 28) ^ (x >> 34) ^ (x >> 39)) + ((a & b) | (c & (a | b)))) & m
        x = d | (d << 64)
        t = (g + ((x >> 14) ^ (x >> 18) ^ (x >> 41)) + (f ^ (d & (e ^ f)))
             + k[i + 1] + w[i + 1])
        c = (c + t) & m
        x = h | (h << 64)
        g = (t + ((x >> 28) ^ (x >> 34) ^ (x >> 39)) + ((h & a) | (b & (h | a)))) & m
        x = c | (c << 64)
        t = (f + ((x >> 14) ^ (x >> 18) ^ (x >> 41)) + (e ^ (c & (d ^ e)))
             + k[i + 2] + w[i + 2])
        b = (b + t) & m
        x = g | (g << 64)
        f = (t + ((x >> 28) ^ (x >> 34) ^ (x >> 39)) + ((g & h) | (a & (g | h)))) & m
        x = b | (b << 64)
        t = (e + ((x >> 14) ^ (x >> 18) ^ (x >> 41)) + (d ^ (b & (c ^ d)))
             + k[i + 3] + w[i + 3])
        a = (a + t) & m
        x = f | (f << 64)
        e = (t + ((x >> 28) ^ (x >> 34) ^ (x >> 39)) + ((f & g) | (h & (f | g)))) & m
        x = a | (a << 64)
        t = (d + ((x >> 14) ^ (x >> 18) ^ (x >> 41)) + (c ^ (a & (b ^ c)))
             + k[i + 4] + w[i + 4])
        h = (h + t) & m
        x = e | (e << 64)
        d = (t + ((x >> 28) ^ (x >> 34) ^ (x >> 39)) + ((e & f) | (g & (e | f)))) & m
        x = h | (h << 64)
        t = (c + ((x >> 14) ^ (x >> 18) ^ (x >> 41)) + (b ^ (h & (a ^ b)))
             + k[i + 5] + w[i + 5])
        g = (g + t) & m
        x = d | (d << 64)
        c = (t + ((x >> 28) ^ (x >> 34) ^ (x >> 39)) + ((d & e) | (f & (d | e)))) & m
        x = g | (g << 64)
        t = (b + ((x >> 14) ^ (x >> 18) ^ (x >> 41)) + (a ^ (g & (h ^ a)))
             + k[i + 6] + w[i + 6])
        f = (f + t) & m
        x = c | (c << 64)
        b = (t + ((x >> 28) ^ (x >> 34) ^ (x >> 39)) + ((c & d) | (e & (c | d)))) & m
        x = f | (f << 64)
        t = (a + ((x >> 14) ^ (x >> 18) ^ (x >> 41)) + (h ^ (f & (g ^ h)))
             + k[i + 7] + w[i + 7])
        e = (e + t) & m
        x = b | (b << 64)
        a = (t + ((x >> 28) ^ (x >> 34) ^ (x >> 39)) + ((b & c) | (d & (b | c)))) & m
        if i & 8 and i != 72:
            yield
    st[0] = (st[0] + a) & m
    st[1] = (st[1] + b) & m
    st[2] = (st[2] + c) & m
    st[3] = (st[3] + d) & m
    st[4] = (st[4] + e) & m
    st[5] = (st[5] + f) & m
    st[6] = (st[6] + g) & m
    st[7] = (st[7] + h) & m
    yield


def _compress(st, w, block, off):
    for _ in _compress_gen(st, w, block, off):
        pass


class PureSha512:
    """SHA-512 in Python. Same interface as hashlib.sha512 minus copy(), plus
    update_steps() and digest_steps(): generators doing the same work in
    pieces of at most half a message schedule or sixteen rounds, yielding
    after each piece (seven per 128-byte block). Run them to the end before
    using the object again."""

    digest_size = 64
    block_size = 128

    def __init__(self, data=b""):
        self._st = list(_IV)
        self._w = [0] * 80
        self._buf = bytearray(128)
        self._fill = 0  # bytes waiting in _buf for a full block
        self._len = 0  # message length so far, in bytes
        if data:
            self.update(data)

    def update(self, data):
        for _ in self.update_steps(data):
            pass

    def digest(self):
        for _ in self.digest_steps():
            pass
        return self._out

    def hexdigest(self):
        return "".join("%02x" % b for b in self.digest())

    def update_steps(self, data):
        n = len(data)
        if not n:
            return
        self._len += n
        mv = memoryview(data)
        pos = 0
        fill = self._fill
        if fill:
            pos = min(128 - fill, n)
            self._buf[fill:fill + pos] = mv[:pos]
            fill += pos
            if fill < 128:
                self._fill = fill
                return
            self._fill = 0
            yield from _compress_gen(self._st, self._w, self._buf, 0)
        # Whole blocks are read straight from the caller's buffer: no copy.
        while n - pos >= 128:
            yield from _compress_gen(self._st, self._w, mv, pos)
            pos += 128
        fill = n - pos
        if fill:
            self._buf[0:fill] = mv[pos:]
        self._fill = fill

    def digest_steps(self):
        """Yields between pieces; the digest is then in self._out (also the
        generator's return value)."""
        # Pads into a scratch copy so the object can still be updated and
        # digested again, as with hashlib.
        fill = self._fill
        nblocks = 1 if fill < 112 else 2
        tail = bytearray(128 * nblocks)
        tail[0:fill] = self._buf[0:fill]
        tail[fill] = 0x80
        bits = self._len * 8
        struct.pack_into(">QQ", tail, 128 * nblocks - 16, bits >> 64, bits & _M64)
        st = list(self._st)
        yield from _compress_gen(st, self._w, tail, 0)
        if nblocks == 2:
            yield from _compress_gen(st, self._w, tail, 128)
        self._out = struct.pack(">8Q", *st)
        return self._out


# The port's own SHA-512 when it has one (C is far faster); the boards' hashlib
# usually offers only sha256/sha1/md5.
sha512 = getattr(hashlib, "sha512", None) or PureSha512
