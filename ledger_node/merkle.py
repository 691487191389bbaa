"""The ledger's Merkle tree: RFC 6962 / RFC 9162 hashing, stored-hash layout, proofs.

Pure functions, no I/O. Storage is a callable `read(indexes) -> hashes` over
the *stored hashes*: the hash of every complete (perfect) subtree, numbered
in the order the subtrees become complete while leaves are appended. This is
the layout of Go's golang.org/x/mod/sumdb/tlog (after Crosby and Wallach,
"Efficient Data Structures for Tamper-Evident Logging", section 3.3), so a
tree of n leaves has exactly 2n - popcount(n) stored hashes, appending a leaf
only ever appends hashes, and every proof or root needs O(log n) of them.

Tree hashes (RFC 9162 section 2.1.1):
    MTH({})    = SHA-256()
    leaf       = SHA-256(0x00 || data)
    node       = SHA-256(0x01 || left || right)
    MTH(D[n])  = node(MTH(D[0:k]), MTH(D[k:n])), k the largest power of two < n

Proofs are lists of 32-byte hashes in RFC 9162 order (PATH / SUBPROOF: the
hash nearest the leaf first); the check functions accept that list or the
same hashes concatenated into one bytes object, and follow the verification
algorithms of RFC 9162 sections 2.1.3.2 and 2.1.4.2 after an exact length
check, so a proof of the wrong length fails with a message saying so.

Storage contract: each prove/tree_hash/load call makes at most one `read`
call, with strictly increasing indexes, all below stored_hash_count(size);
`read` returns one 32-byte hash per index, in the same order.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

ReadHashes = Callable[[Sequence[int]], Sequence[bytes]]

_sha256 = hashlib.sha256
_BYTES_LIKE = (bytes, bytearray, memoryview)


class ProofError(ValueError):
    """A proof, or the sizes, index or hashes it is checked against, do not match."""


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data): the hash of one log entry."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): the hash of an interior node."""
    return _sha256(b"\x01" + left + right).digest()


# ---------------------------------------------------------------------------
# Stored-hash layout
#
# Appending leaf m stores its leaf hash and then the hash of every perfect
# subtree that leaf completes (one per trailing 1 bit of m). So leaf m's hash
# lands after all the hashes of the first m leaves, at
#     stored_hash_count(m) = sum over levels l of floor(m / 2^l) = 2m - popcount(m),
# and the node (level, k), whose last leaf is m = (k + 1) * 2^level - 1, is the
# level-th hash written after it.


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def stored_hash_index(level: int, n: int) -> int:
    """Where the hash of the n-th subtree of 2**level leaves is stored."""
    if not (_is_count(level) and _is_count(n)):
        raise ValueError(f"stored_hash_index needs level >= 0 and n >= 0, got ({level!r}, {n!r})")
    last = ((n + 1) << level) - 1
    return 2 * last - last.bit_count() + level


def split_stored_hash_index(index: int) -> tuple[int, int]:
    """The (level, n) of a stored hash index: the inverse of stored_hash_index."""
    if not _is_count(index):
        raise ValueError(f"a stored hash index is an int >= 0, got {index!r}")
    # Find the last leaf m whose own hash is stored at or before index. Its
    # position 2m - popcount(m) grows with m and is at most 2m, so m starts
    # at index // 2 and is at most log2(index) further on.
    m = index // 2
    at = 2 * m - m.bit_count()
    while True:
        after = 2 * (m + 1) - (m + 1).bit_count()
        if after > index:
            break
        m, at = m + 1, after
    level = index - at  # the level-th hash written with leaf m
    return level, m >> level


def stored_hash_count(n: int) -> int:
    """How many hashes are stored for a tree of n leaves."""
    if not _is_count(n):
        raise ValueError(f"a tree size is an int >= 0, got {n!r}")
    return 2 * n - n.bit_count()


def _node_index(lo: int, level: int) -> int:
    # The perfect subtree [lo, lo + 2**level) is stored with its last leaf.
    last = lo + (1 << level) - 1
    return 2 * last - last.bit_count() + level


def _range_indexes(lo: int, hi: int, out: list[int]) -> None:
    """Append the stored indexes of the perfect subtrees that make up
    [lo, hi), largest (leftmost) first. Every range the RFC tree shape
    produces here starts at a multiple of its first subtree's size."""
    while lo < hi:
        level = (hi - lo).bit_length() - 1
        out.append(_node_index(lo, level))
        lo += 1 << level


def _fold(hashes: Sequence[bytes], start: int, end: int) -> bytes:
    """MTH of a range from the hashes of its perfect subtrees (left to right):
    each split of the RFC tree puts the largest one on the left."""
    h = hashes[end - 1]
    for i in range(end - 2, start - 1, -1):
        h = node_hash(hashes[i], h)
    return h


def _read(read: ReadHashes, indexes: list[int]) -> list[bytes]:
    """The hashes at indexes, in that order, with one call to read."""
    if not indexes:
        return []
    wanted = sorted(indexes)
    got = read(wanted)
    if len(got) != len(wanted):
        raise RuntimeError(f"hash storage returned {len(got)} hashes for {len(wanted)} indexes")
    out = []
    for h in got:
        if len(h) != HASH_SIZE:
            raise RuntimeError(f"hash storage returned a hash of {len(h)} bytes")
        out.append(h if type(h) is bytes else bytes(h))
    if wanted == indexes:
        return out
    table = dict(zip(wanted, out))
    return [table[i] for i in indexes]


def _check_size(size, what: str = "size") -> None:
    if not _is_count(size):
        raise ValueError(f"{what} must be an int >= 0, got {size!r}")


def tree_hash(n: int, read: ReadHashes) -> bytes:
    """The root (MTH) of the first n leaves, from at most popcount(n) stored hashes."""
    _check_size(n, "tree size")
    if n == 0:
        return EMPTY_ROOT
    indexes: list[int] = []
    _range_indexes(0, n, indexes)
    hashes = _read(read, indexes)
    return _fold(hashes, 0, len(hashes))


# ---------------------------------------------------------------------------
# Proofs. Both walk down from the root as RFC 9162 PATH and SUBPROOF recurse,
# one step per level, noting for each step which stored hashes make up the
# sibling subtree; one read fetches them all. A sibling is a single stored
# hash except the one right of the split where the walk leaves the tree's
# right edge, which is folded from at most log2(n) perfect subtrees.


def _assemble(read: ReadHashes, indexes: list[int], spans: list[tuple[int, int]]) -> list[bytes]:
    hashes = _read(read, indexes)
    # spans were noted root first; the proof lists the hash nearest the leaf first.
    return [hashes[a] if b - a == 1 else _fold(hashes, a, b) for a, b in reversed(spans)]


def prove_inclusion(index: int, size: int, read: ReadHashes) -> list[bytes]:
    """PATH(index, D[0:size]): the audit path of leaf index in the tree of size leaves."""
    _check_size(index, "index")
    _check_size(size)
    if index >= size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    indexes: list[int] = []
    spans: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        level = (hi - lo - 1).bit_length() - 1
        mid = lo + (1 << level)
        start = len(indexes)
        if index < mid:
            _range_indexes(mid, hi, indexes)
            hi = mid
        else:
            indexes.append(_node_index(lo, level))
            lo = mid
        spans.append((start, len(indexes)))
    return _assemble(read, indexes, spans)


def prove_consistency(old: int, new: int, read: ReadHashes) -> list[bytes]:
    """PROOF(old, D[0:new]): the tree of new leaves extends the tree of old leaves.

    Empty when old == new or old == 0 (every tree extends the empty tree)."""
    _check_size(old, "old size")
    _check_size(new, "new size")
    if old > new:
        raise ValueError(f"old size {old} is larger than new size {new}")
    if old == 0 or old == new:
        return []
    indexes: list[int] = []
    spans: list[tuple[int, int]] = []
    lo, hi = 0, new
    while old != hi:
        level = (hi - lo - 1).bit_length() - 1
        mid = lo + (1 << level)
        start = len(indexes)
        if old <= mid:
            _range_indexes(mid, hi, indexes)
            hi = mid
        else:
            indexes.append(_node_index(lo, level))
            lo = mid
        spans.append((start, len(indexes)))
    if lo:
        # SUBPROOF(m, D[m], false): the old tree's root is not the subtree
        # reached here, so that subtree's hash starts the proof. It is perfect:
        # hi was set by a step to the left.
        spans.append((len(indexes), len(indexes) + 1))
        indexes.append(_node_index(lo, (hi - lo).bit_length() - 1))
    return _assemble(read, indexes, spans)


def _proof_hashes(proof) -> list[bytes]:
    if isinstance(proof, _BYTES_LIKE):
        raw = bytes(proof)
        if len(raw) % HASH_SIZE:
            raise ProofError(f"a proof is a multiple of {HASH_SIZE} bytes, got {len(raw)}")
        return [raw[i:i + HASH_SIZE] for i in range(0, len(raw), HASH_SIZE)]
    if isinstance(proof, str) or not isinstance(proof, (list, tuple)):
        raise ProofError(f"a proof is a list of {HASH_SIZE}-byte hashes or their concatenation, "
                         f"got {type(proof).__name__}")
    out = []
    for i, h in enumerate(proof):
        if not isinstance(h, _BYTES_LIKE) or len(h) != HASH_SIZE:
            raise ProofError(f"proof hash {i} is not a {HASH_SIZE}-byte hash")
        out.append(bytes(h))
    return out


def _hash_arg(h, what: str) -> bytes:
    if not isinstance(h, _BYTES_LIKE) or len(h) != HASH_SIZE:
        got = f"{len(h)} bytes" if isinstance(h, _BYTES_LIKE) else type(h).__name__
        raise ProofError(f"{what} must be a {HASH_SIZE}-byte hash, got {got}")
    return bytes(h)


def _size_arg(value, what: str) -> int:
    if not _is_count(value):
        raise ProofError(f"{what} must be an int >= 0, got {value!r}")
    return value


def _inclusion_length(index: int, size: int) -> int:
    # Below the level where the paths to leaf index and to the last leaf
    # meet, every level contributes a sibling; above it, only the levels where
    # the path comes from the right (a 1 bit of index) do.
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def _consistency_length(old: int, new: int) -> int:
    # The same walk as prove_consistency, counting instead of reading.
    count, lo, hi = 0, 0, new
    while old != hi:
        mid = lo + (1 << ((hi - lo - 1).bit_length() - 1))
        if old <= mid:
            hi = mid
        else:
            lo = mid
        count += 1
    return count + (1 if lo else 0)


def check_inclusion(proof, index: int, size: int, leaf: bytes, root: bytes) -> None:
    """Raise ProofError unless proof shows leaf (a leaf hash) at index in the
    tree of size leaves whose root is root (RFC 9162 section 2.1.3.2)."""
    path = _proof_hashes(proof)
    r = _hash_arg(leaf, "leaf hash")
    root = _hash_arg(root, "root")
    _size_arg(index, "index")
    _size_arg(size, "tree size")
    if index >= size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")
    want = _inclusion_length(index, size)
    if len(path) != want:
        raise ProofError(f"an inclusion proof of leaf {index} in a tree of size {size} "
                         f"has {want} hashes, got {len(path)}")
    # The length is exact from here on, so the two `sn` tests below cannot
    # fire; they stay so this loop is RFC 9162's algorithm step by step.
    fn, sn = index, size - 1
    for p in path:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # The last node of a level with no right sibling moves up unpaired.
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the path to the root")
    if r != root:
        raise ProofError(f"inclusion proof of leaf {index} does not lead to the root "
                         f"of the tree of size {size}")


def check_consistency(proof, old: int, new: int, old_root: bytes, new_root: bytes) -> None:
    """Raise ProofError unless proof shows the tree (new, new_root) extends the
    tree (old, old_root) (RFC 9162 section 2.1.4.2).

    old == new needs an empty proof and equal roots; old == 0 needs an empty
    proof and old_root == EMPTY_ROOT (any tree extends the empty one)."""
    path = _proof_hashes(proof)
    old_root = _hash_arg(old_root, "old root")
    new_root = _hash_arg(new_root, "new root")
    _size_arg(old, "old size")
    _size_arg(new, "new size")
    if old > new:
        raise ProofError(f"old size {old} is larger than new size {new}")
    if old == 0 or old == new:
        if path:
            raise ProofError(f"a consistency proof from size {old} to {new} is empty, "
                             f"got {len(path)} hashes")
        if old == 0 and old_root != EMPTY_ROOT:
            raise ProofError("the root of the empty tree is SHA-256 of nothing")
        if old == new and old_root != new_root:
            raise ProofError(f"trees of the same size {old} with different roots")
        return
    want = _consistency_length(old, new)
    if len(path) != want:
        raise ProofError(f"a consistency proof from size {old} to {new} has {want} hashes, "
                         f"got {len(path)}")
    if old & (old - 1) == 0:
        # The old tree is one perfect subtree of the new one: its root is the
        # proof's implicit first hash.
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than the path to the root")
    if fr != old_root:
        raise ProofError(f"consistency proof does not lead to the old root (size {old})")
    if sr != new_root:
        raise ProofError(f"consistency proof does not lead to the new root (size {new})")


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over the given leaf hashes, straight from the definition: O(n),
    for tests and for checking a small tree end to end."""
    hashes = list(leaf_hashes)
    if not hashes:
        return EMPTY_ROOT

    def mth(lo: int, hi: int) -> bytes:
        if hi - lo == 1:
            return hashes[lo]
        mid = lo + (1 << ((hi - lo - 1).bit_length() - 1))
        return node_hash(mth(lo, mid), mth(mid, hi))

    return mth(0, len(hashes))


class Frontier:
    """The right edge of a growing tree: the roots of the perfect subtrees
    that make up its leaves, largest (leftmost) first, one per 1 bit of size.

    This is all an appender needs: a new leaf merges with the edge's smallest
    subtrees exactly as far as it completes them, and those merged hashes are
    the stored hashes the leaf adds, in the layout's order.
    """

    __slots__ = ("size", "_edge")

    def __init__(self, size: int = 0, edge: Sequence[bytes] = ()):
        if not _is_count(size):
            raise ValueError(f"a tree size is an int >= 0, got {size!r}")
        hashes = []
        for h in edge:
            if not isinstance(h, _BYTES_LIKE) or len(h) != HASH_SIZE:
                raise ValueError(f"the frontier holds {HASH_SIZE}-byte hashes")
            hashes.append(bytes(h))
        if len(hashes) != size.bit_count():
            raise ValueError(f"a tree of size {size} has {size.bit_count()} frontier hashes, "
                             f"got {len(hashes)}")
        self.size = size
        self._edge = hashes

    @property
    def edge(self) -> tuple[bytes, ...]:
        return tuple(self._edge)

    @classmethod
    def load(cls, n: int, read: ReadHashes) -> "Frontier":
        """The frontier of the first n leaves, from popcount(n) stored hashes."""
        _check_size(n, "tree size")
        indexes: list[int] = []
        _range_indexes(0, n, indexes)
        return cls(n, _read(read, indexes))

    def append(self, leaf: bytes) -> list[bytes]:
        """Add a leaf by its leaf hash; return the stored hashes it completes:
        the leaf hash, then one node per subtree it completes, to be stored from
        index stored_hash_count(size before the append) on."""
        if type(leaf) is not bytes or len(leaf) != HASH_SIZE:
            raise ValueError(f"append takes a {HASH_SIZE}-byte leaf hash")
        out = [leaf]
        h, n, edge = leaf, self.size, self._edge
        while n & 1:
            h = node_hash(edge.pop(), h)
            out.append(h)
            n >>= 1
        edge.append(h)
        self.size += 1
        return out

    def root(self) -> bytes:
        if not self._edge:
            return EMPTY_ROOT
        return _fold(self._edge, 0, len(self._edge))

    def copy(self) -> "Frontier":
        twin = Frontier.__new__(Frontier)
        twin.size = self.size
        twin._edge = list(self._edge)
        return twin

    def to_bytes(self) -> bytes:
        """size (u64, big-endian) followed by the edge hashes."""
        return self.size.to_bytes(8, "big") + b"".join(self._edge)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Frontier":
        if len(data) < 8:
            raise ValueError(f"a frontier is at least 8 bytes, got {len(data)}")
        size = int.from_bytes(data[:8], "big")
        want = 8 + HASH_SIZE * size.bit_count()
        if len(data) != want:
            raise ValueError(f"a frontier of size {size} is {want} bytes, got {len(data)}")
        raw = bytes(data[8:])
        return cls(size, [raw[i:i + HASH_SIZE] for i in range(0, len(raw), HASH_SIZE)])

    def __eq__(self, other) -> bool:
        if not isinstance(other, Frontier):
            return NotImplemented
        return self.size == other.size and self._edge == other._edge

    def __repr__(self) -> str:
        return f"Frontier(size={self.size}, root={self.root().hex()[:16]}...)"


class MemoryHashes:
    """Stored hashes in a list: a ReadHashes for tests, witnesses and audits."""

    __slots__ = ("_hashes",)

    def __init__(self, hashes: Sequence[bytes] = ()):
        self._hashes: list[bytes] = []
        self.append(hashes)

    def append(self, hashes: Sequence[bytes]) -> None:
        """Add stored hashes at the end (what Frontier.append returns)."""
        hashes = list(hashes)
        for h in hashes:
            if type(h) is not bytes or len(h) != HASH_SIZE:
                raise ValueError(f"stored hashes are {HASH_SIZE}-byte bytes")
        self._hashes.extend(hashes)

    def __call__(self, indexes: Sequence[int]) -> list[bytes]:
        stored = self._hashes
        if indexes and (min(indexes) < 0 or max(indexes) >= len(stored)):
            raise IndexError(f"stored hashes {min(indexes)}..{max(indexes)} asked for, "
                             f"{len(stored)} stored")
        return [stored[i] for i in indexes]

    def __len__(self) -> int:
        return len(self._hashes)
