# Ed25519 signatures (RFC 8032 section 5.1, pure Ed25519) in plain MicroPython.
#
# The meter signs every reading with a key that is made on the board and
# never leaves it; the gateway and the ledger hold only the public key. This
# module therefore exposes the public key and signatures, never the seed or
# the secret scalar.
#
#   public_key(seed) -> 32 bytes
#   sign(seed, msg) -> 64 bytes, byte-identical to RFC 8032 (deterministic)
#   verify(public, msg, sig) -> bool (strict: S < L, canonical A and R)
#   SigningKey(seed): expands the seed once; .public, .sign(msg), .signer(msg)
#   Signer(seed_or_key, msg): step() -> True when finished; .signature
#   precompute(): build the fixed-base table now rather than on first use
#
# Signer exists so a meter can sign between sampling bursts: each step() does
# a bounded amount of work (see docs/crypto.md for the numbers). sign() and
# SigningKey are the same code run to completion.
#
# Arithmetic (why it looks the way it does):
# - Field elements are Python ints; only products are reduced (% P). Sums and
#   differences stay unreduced (they may be negative) because a product
#   reduces them anyway, and each reduction is a big-int division.
# - Points are extended twisted Edwards coordinates (X, Y, Z, T) with
#   x = X/Z, y = Y/Z, xy = T/Z, and the a = -1 formulas of RFC 8032 section
#   5.1.4, which are complete: no special cases for the identity or doubling.
# - Fixed-base multiplication [s]B uses a Lim-Lee comb: _V combs of _W teeth,
#   _COLS columns. The table holds _V * 2**_W affine points in "Niels" form
#   (y+x, y-x, 2dxy), built once on first use (about 260 point operations and
#   an inversion) and kept for the life of the program (about 8 KB on the
#   64-bit unix port, less on a 32-bit board). A multiplication is then
#   _COLS - 1 doublings and _V * _COLS mixed additions.
#   Table entry 0 is the identity, so every column costs the same whatever the
#   scalar's bits are.
# - Inversion is Fermat's a**(p-2) through the usual addition chain (254
#   squarings, 11 multiplications), written out so it can be split into steps
#   and because it beats the built-in three-argument pow here.
# - Heavy routines are generators that yield after a bounded piece of work;
#   the one-shot API drives them to the end with _run().
#
# Not constant-time: big-int arithmetic in MicroPython takes time that depends
# on operand sizes. The forger this guards against is remote and sees radio
# frames, not microsecond timings; whoever holds the board can read its flash
# anyway.

# The fallback lets CPython run this module too (the tests use that to cover
# the C-hashlib path); pyright objects only to the two signatures differing.
try:
    from micropython import const  # pyright: ignore[reportAssignmentType]
except ImportError:
    def const(x):
        return x

from meter.crypto.sha512 import sha512

# Curve constants of RFC 8032 section 5.1: p, the group order L, d, 2d,
# sqrt(-1) = 2**((p-1)/4) and the base point B = (x, 4/5) with x even.
_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
_D2 = 16295367250680780974490674513165176452449235426866156013048779062215315747161
_SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752
_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960

# Comb shape: _W * _V * _COLS = 256 bits, _COLS a multiple of 8 so every tooth
# of a column reads the same bit position of a whole byte of the scalar.
_W = const(4)
_V = const(2)
_COLS = const(32)
_ROW_BYTES = const(4)  # _COLS // 8: bytes between two teeth of a comb
_COMB_BYTES = const(16)  # _W * _ROW_BYTES: bytes between two combs

_SQ_RUN = const(25)  # squarings per step inside an inversion
_HASH_CHUNK = const(128)  # bytes per step when hashing with a C hashlib

_IDENTITY = (0, 1, 1, 0)

_TABLE = None  # [_V][2**_W] of (y+x, y-x, 2dxy), built by _build_table_gen()


def _run(gen):
    """Drive a step generator to its end and return its value."""
    try:
        while True:
            next(gen)
    except StopIteration as e:
        return e.value


# Field helpers ------------------------------------------------------------

def _sqn(x, n):
    """x ** (2 ** n) mod P."""
    P = _P
    for _ in range(n):
        x = x * x % P
    return x


def _pow2250_gen(z):
    """(z ** (2**250 - 1), z ** 11), the shared head of the inversion and
    square-root chains. Yields after at most _SQ_RUN squarings."""
    P = _P
    z2 = z * z % P
    z9 = _sqn(z2, 2) * z % P
    z11 = z9 * z2 % P
    z5 = z11 * z11 % P * z9 % P  # 2**5 - 1
    z10 = _sqn(z5, 5) * z5 % P  # 2**10 - 1
    z20 = _sqn(z10, 10) * z10 % P
    yield
    z40 = _sqn(z20, 20) * z20 % P
    yield
    z50 = _sqn(z40, 10) * z10 % P
    yield
    t = z50
    for _ in range(50 // _SQ_RUN):
        t = _sqn(t, _SQ_RUN)
        yield
    z100 = t * z50 % P
    t = z100
    for _ in range(100 // _SQ_RUN):
        t = _sqn(t, _SQ_RUN)
        yield
    t = t * z100 % P  # 2**200 - 1
    for _ in range(50 // _SQ_RUN):
        t = _sqn(t, _SQ_RUN)
        yield
    return t * z50 % P, z11


def _inv_gen(z):
    """z ** (p - 2) = 1/z mod P (0 for z = 0)."""
    t, z11 = yield from _pow2250_gen(z)
    return _sqn(t, 5) * z11 % _P  # 2**255 - 32 + 11 = p - 2


# Points -------------------------------------------------------------------

def _dbl(p):
    X, Y, Z, _ = p
    P = _P
    a = X * X % P
    b = Y * Y % P
    c = 2 * Z * Z
    h = a + b
    e = X + Y
    e = h - e * e % P
    g = a - b
    f = c + g
    return e * f % P, g * h % P, f * g % P, e * h % P


def _add(p, q):
    """p + q, both extended."""
    X1, Y1, Z1, T1 = p
    X2, Y2, Z2, T2 = q
    P = _P
    a = (Y1 - X1) * (Y2 - X2) % P
    b = (Y1 + X1) * (Y2 + X2) % P
    c = T1 * T2 % P * _D2 % P
    d = 2 * Z1 * Z2 % P
    e = b - a
    f = d - c
    g = d + c
    h = b + a
    return e * f % P, g * h % P, f * g % P, e * h % P


def _add_cached(p, q):
    """p + q with q as (Y+X, Y-X, 2Z, 2dT)."""
    X1, Y1, Z1, T1 = p
    ypx, ymx, z2, t2d = q
    P = _P
    a = (Y1 - X1) * ymx % P
    b = (Y1 + X1) * ypx % P
    c = T1 * t2d % P
    d = Z1 * z2 % P
    e = b - a
    f = d - c
    g = d + c
    h = b + a
    return e * f % P, g * h % P, f * g % P, e * h % P


def _cached(p):
    X, Y, Z, T = p
    return (Y + X) % _P, (Y - X) % _P, 2 * Z % _P, T * _D2 % _P


def _encode_gen(p):
    X, Y, Z, _ = p
    zi = yield from _inv_gen(Z)
    x = X * zi % _P
    y = Y * zi % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _decode(s):
    """The point encoded by 32 bytes s, or None when s is not the canonical
    encoding of a curve point (RFC 8032 section 5.1.3)."""
    P = _P
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= P:
        return None
    yy = y * y % P
    u = yy - 1
    v = _D * yy + 1
    v3 = v * v % P * v % P
    uv7 = u * v3 % P * v3 % P * v % P
    t, _ = _run(_pow2250_gen(uv7))
    x = u * v3 % P * (_sqn(t, 2) * uv7 % P) % P  # (uv7) ** ((p - 5) / 8)
    vxx = v * x % P * x % P
    u %= P
    if vxx != u:
        if vxx != P - u:
            return None
        x = x * _SQRT_M1 % P
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = P - x
    return x, y, 1, x * y % P


# Fixed-base comb ----------------------------------------------------------

def _build_table_gen():
    """Fill and return _TABLE. Entry idx of comb c is the sum, over the set
    bits i of idx, of [2 ** (_COLS * (c * _W + i))] B."""
    global _TABLE
    P = _P
    teeth = [(_BX, _BY, 1, _BX * _BY % P)]
    for _ in range(1, _W * _V):
        p = teeth[-1]
        for n in range(_COLS):
            p = _dbl(p)
            if n & 3 == 3:
                yield
        teeth.append(p)
    ext = []  # extended points in table order, identities left out
    for c in range(_V):
        row = [(0, 1, 1, 0)] * (1 << _W)
        for idx in range(1, 1 << _W):
            i = 0
            while not (idx >> i) & 1:
                i += 1
            q = teeth[c * _W + i]
            rest = idx & (idx - 1)
            row[idx] = _add(row[rest], q) if rest else q
            ext.append(row[idx])
            if idx & 3 == 3:
                yield
    teeth = row = None  # free them before the next allocations
    # Montgomery's trick: one inversion for all the Z coordinates.
    n = len(ext)
    prods = [0] * n
    acc = 1
    for i in range(n):
        acc = acc * ext[i][2] % P
        prods[i] = acc
    inv = yield from _inv_gen(acc)
    niels = [(1, 1, 0)] * n
    for i in range(n - 1, -1, -1):
        X, Y, Z, _ = ext[i]
        ext[i] = _IDENTITY  # frees the point now: peak memory counts on a board
        zi = inv * prods[i - 1] % P if i else inv
        inv = inv * Z % P
        x = X * zi % P
        y = Y * zi % P
        niels[i] = (_compact((y + x) % P), _compact((y - x) % P),
                    _compact(x * y % P * _D2 % P))
        if i & 3 == 0:
            yield
    per = (1 << _W) - 1
    table = []
    for c in range(_V):
        table.append([(1, 1, 0)] + niels[c * per:(c + 1) * per])
    _TABLE = table
    return table


def _compact(v):
    """The same int in a right-sized buffer: a remainder keeps the dividend's
    allocation, twice what a field element needs, and the table is long-lived."""
    return int.from_bytes(v.to_bytes(32, "little"), "little")


def _base_mul_gen(s):
    """[s]B for 0 <= s < 2**256, extended coordinates. Yields once per comb
    column (one doubling and _V mixed additions)."""
    table = _TABLE
    if table is None:
        table = yield from _build_table_gen()
    P = _P
    sb = s.to_bytes(32, "little")
    X, Y, Z, T = 0, 1, 1, 0
    for j in range(_COLS - 1, -1, -1):
        if j != _COLS - 1:
            # Doubling (RFC 8032 5.1.4), inlined: this loop is the hot path.
            a = X * X % P
            b = Y * Y % P
            c = 2 * Z * Z
            h = a + b
            e = X + Y
            e = h - e * e % P
            g = a - b
            f = c + g
            X = e * f % P
            Y = g * h % P
            Z = f * g % P
            T = e * h % P
        o = j >> 3
        sh = j & 7
        # The index reads the four teeth (_W = 4) of each comb.
        for comb in range(_V):
            k = o + comb * _COMB_BYTES
            idx = (((sb[k] >> sh) & 1)
                   | (((sb[k + _ROW_BYTES] >> sh) & 1) << 1)
                   | (((sb[k + 2 * _ROW_BYTES] >> sh) & 1) << 2)
                   | (((sb[k + 3 * _ROW_BYTES] >> sh) & 1) << 3))
            ypx, ymx, xy2d = table[comb][idx]
            # Mixed addition with an affine Niels point (Z2 = 1).
            a = (Y - X) * ymx % P
            b = (Y + X) * ypx % P
            c = T * xy2d % P
            d = 2 * Z
            e = b - a
            f = d - c
            g = d + c
            h = b + a
            X = e * f % P
            Y = g * h % P
            Z = f * g % P
            T = e * h % P
        yield
    return X, Y, Z, T


def _var_mul(k, p):
    """[k]p for 0 <= k < 2**256 with a 4-bit fixed window (verify only)."""
    cached = [_cached(_IDENTITY), _cached(p)]
    q = p
    for _ in range(14):
        q = _add(q, p)
        cached.append(_cached(q))
    kb = k.to_bytes(32, "little")
    r = _IDENTITY
    for i in range(31, -1, -1):
        byte = kb[i]
        for nib in (byte >> 4, byte & 15):
            r = _dbl(_dbl(_dbl(_dbl(r))))
            r = _add_cached(r, cached[nib])
    return r


# Keys and signatures ------------------------------------------------------

def _check_bytes(name, value):
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError("%s must be bytes, not %s" % (name, type(value).__name__))


def _check_len(name, value, n):
    _check_bytes(name, value)
    if len(value) != n:
        raise ValueError("%s must be %d bytes, got %d" % (name, n, len(value)))


def _hash_gen(*parts):
    """SHA-512 of the concatenated parts. With the pure-Python hash a yield
    follows each seventh of a block; with a C hashlib, every _HASH_CHUNK
    bytes and the final digest."""
    h = sha512()
    stepped = hasattr(h, "update_steps")
    for part in parts:
        if stepped:
            yield from h.update_steps(part)
        else:
            for off in range(0, len(part), _HASH_CHUNK):
                h.update(part[off:off + _HASH_CHUNK])
                yield
    if stepped:
        d = yield from h.digest_steps()
    else:
        d = h.digest()
        yield
    return d


def _expand_gen(seed):
    """(secret scalar a, nonce prefix) from a 32-byte seed (RFC 8032 5.1.5)."""
    h = yield from _hash_gen(seed)
    a = int.from_bytes(h[:32], "little") & ((1 << 254) - 8) | (1 << 254)
    return a, h[32:]


def _public_gen(a):
    p = yield from _base_mul_gen(a)
    pub = yield from _encode_gen(p)
    return pub


class SigningKey:
    """A seed expanded once: keep one for the life of the meter so each
    signature costs one fixed-base multiplication instead of two."""

    def __init__(self, seed):
        _check_len("seed", seed, 32)
        self._a, self._prefix = _run(_expand_gen(bytes(seed)))
        self.public = _run(_public_gen(self._a))

    def sign(self, msg):
        _check_bytes("message", msg)
        return _run(_sign_gen(self._a, self._prefix, self.public, bytes(msg)))

    def signer(self, msg):
        return Signer(self, msg)


def _sign_gen(a, prefix, pub, msg):
    """RFC 8032 5.1.6 with (a, prefix, A) known."""
    h = yield from _hash_gen(prefix, msg)
    r = int.from_bytes(h, "little") % _L
    p = yield from _base_mul_gen(r)
    rb = yield from _encode_gen(p)
    h = yield from _hash_gen(rb, pub, msg)
    k = int.from_bytes(h, "little") % _L
    return rb + ((r + k * a) % _L).to_bytes(32, "little")


def _sign_seed_gen(seed, msg):
    a, prefix = yield from _expand_gen(seed)
    pub = yield from _public_gen(a)
    sig = yield from _sign_gen(a, prefix, pub, msg)
    return sig


class Signer:
    """One signature, computed a bounded piece at a time.

    key is a 32-byte seed or a SigningKey (cheaper: the public key is already
    known). Call step() until it returns True, then read .signature. The work
    per step and the number of steps are in docs/crypto.md."""

    def __init__(self, key, msg):
        _check_bytes("message", msg)
        msg = bytes(msg)  # the caller may reuse its buffer while we work
        if isinstance(key, SigningKey):
            self._gen = _sign_gen(key._a, key._prefix, key.public, msg)
        else:
            _check_len("seed", key, 32)
            self._gen = _sign_seed_gen(bytes(key), msg)
        self.signature = None
        self.steps = 0  # step() calls so far, the finishing one included
        self._error = None

    def step(self):
        """Do one bounded piece of the work. True once .signature is set.
        An error (MemoryError, say) is raised again by every later call, so
        a failed signer can never look finished."""
        gen = self._gen
        if gen is None:
            if self._error is not None:
                raise self._error
            return True
        self.steps += 1
        try:
            next(gen)
        except StopIteration as e:
            self.signature = e.value
            self._gen = None
            return True
        except Exception as e:
            self._gen = None
            self._error = e
            raise
        return False


def precompute():
    """Build the fixed-base table now (a board may call this at boot, so
    that the first reading's signature takes its usual number of steps)."""
    if _TABLE is None:
        _run(_build_table_gen())


def public_key(seed):
    """The 32-byte public key of a 32-byte seed."""
    return SigningKey(seed).public


def sign(seed, msg):
    """The 64-byte Ed25519 signature of msg under a 32-byte seed."""
    _check_len("seed", seed, 32)
    _check_bytes("message", msg)
    return _run(_sign_seed_gen(bytes(seed), bytes(msg)))


def verify(public, msg, sig):
    """True if sig is a valid signature of msg under the 32-byte public key.

    Strict: rejects S >= L, a non-canonical or off-curve public key and a
    non-canonical R. Uses the cofactorless equation [S]B = R + [k]A, like the
    RFC's reference code. Wrong lengths are a caller error (ValueError)."""
    _check_len("public key", public, 32)
    _check_len("signature", sig, 64)
    _check_bytes("message", msg)
    public = bytes(public)
    sig = bytes(sig)
    s = int.from_bytes(sig[32:], "little")
    if s >= _L:
        return False
    a = _decode(public)
    if a is None:
        return False
    k = int.from_bytes(_run(_hash_gen(sig[:32], public, bytes(msg))), "little") % _L
    sb = _run(_base_mul_gen(s))
    ka = _var_mul(k, a)
    neg = (-ka[0], ka[1], ka[2], -ka[3])
    return _run(_encode_gen(_add(sb, neg))) == sig[:32]
