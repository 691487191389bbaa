"""The Merkle core (ledger_node.merkle) against published vectors and the RFC's own definitions.

Expected values come from two places only: tests/vectors/rfc6962.json (the
RFC 6962 test tree of transparency-dev/merkle, see its "sources"), and the
tiny reference functions below, written straight from RFC 6962 section 2.1
(MTH, PATH, PROOF/SUBPROOF) and from the definition of the stored-hash
layout ("every complete subtree, in the order appending completes it").
Nothing expected is read back from the module under test.
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger_node import merkle
from ledger_node.merkle import (
    EMPTY_ROOT, Frontier, MemoryHashes, ProofError, check_consistency, check_inclusion,
    leaf_hash, node_hash, prove_consistency, prove_inclusion, root_of,
    split_stored_hash_index, stored_hash_count, stored_hash_index, tree_hash,
)

V = json.loads((Path(__file__).parent.parent / "vectors" / "rfc6962.json").read_text())
H = bytes.fromhex
LEAF_INPUTS = [H(x) for x in V["leaf_inputs"]]
NODES = [[H(x) for x in level] for level in V["node_hashes"]]
ROOTS = [H(x) for x in V["roots"]]


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# --- Reference: RFC 6962 section 2.1, over D = DATA[lo:hi] -------------------

N_BIG = 300
DATA = [b"entry %d" % i for i in range(N_BIG)]


def split_point(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


@lru_cache(maxsize=None)
def ref_mth(lo: int, hi: int) -> bytes:
    n = hi - lo
    if n == 0:
        return sha256(b"")
    if n == 1:
        return sha256(b"\x00" + DATA[lo])
    k = split_point(n)
    return sha256(b"\x01" + ref_mth(lo, lo + k) + ref_mth(lo + k, hi))


def ref_path(m: int, lo: int, hi: int) -> list[bytes]:
    n = hi - lo
    if n == 1:
        return []
    k = split_point(n)
    if m < k:
        return ref_path(m, lo, lo + k) + [ref_mth(lo + k, hi)]
    return ref_path(m - k, lo + k, hi) + [ref_mth(lo, lo + k)]


def ref_subproof(m: int, lo: int, hi: int, b: bool) -> list[bytes]:
    n = hi - lo
    if m == n:
        return [] if b else [ref_mth(lo, hi)]
    k = split_point(n)
    if m <= k:
        return ref_subproof(m, lo, lo + k, b) + [ref_mth(lo + k, hi)]
    return ref_subproof(m - k, lo + k, hi, False) + [ref_mth(lo, lo + k)]


def ref_proof(m: int, n: int) -> list[bytes]:
    return ref_subproof(m, 0, n, True)


def ref_layout(n: int) -> list[tuple[int, int]]:
    """(level, k) of every complete subtree of n leaves, in the order appending completes them."""
    order = []
    for i in range(n):
        order.append((0, i))
        level = 1
        while (i + 1) % (2 ** level) == 0:
            order.append((level, (i + 1) // 2 ** level - 1))
            level += 1
    return order


LAYOUT = ref_layout(N_BIG)
# How many stored hashes exist once n leaves are in: position of the last hash
# completed by leaf n - 1, plus one.
COMPLETED = [0] * (N_BIG + 1)
for _pos, (_level, _k) in enumerate(LAYOUT):
    COMPLETED[((_k + 1) << _level)] = _pos + 1


class Reader:
    """A ReadHashes over a MemoryHashes that holds the storage contract to account:
    one call per operation, strictly increasing indexes, nothing past the tree."""

    def __init__(self, store: MemoryHashes, limit: int):
        self.store, self.limit, self.calls, self.indexes = store, limit, 0, []

    def __call__(self, indexes):
        self.calls += 1
        indexes = list(indexes)
        assert indexes == sorted(set(indexes)), indexes
        assert all(0 <= i < self.limit for i in indexes), (indexes, self.limit)
        self.indexes = indexes
        return self.store(indexes)


@pytest.fixture(scope="module")
def big():
    """The stored hashes of DATA, built leaf by leaf with a Frontier, and the
    frontier at every size."""
    store, f, snapshots = MemoryHashes(), Frontier(), [Frontier()]
    for data in DATA:
        store.append(f.append(leaf_hash(data)))
        snapshots.append(f.copy())
    return store, snapshots


def vector_store() -> MemoryHashes:
    store, f = MemoryHashes(), Frontier()
    for data in LEAF_INPUTS:
        store.append(f.append(leaf_hash(data)))
    return store


def flip(b: bytes, bit: int) -> bytes:
    out = bytearray(b)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# --- Hashing -----------------------------------------------------------------

def test_hasher_vectors():
    h = V["hasher"]
    assert EMPTY_ROOT == H(h["empty_root"])
    assert leaf_hash(b"") == H(h["empty_leaf"])
    assert leaf_hash(h["leaf"]["data_ascii"].encode()) == H(h["leaf"]["hash"])
    node = h["node"]
    assert node_hash(node["left_ascii"].encode(), node["right_ascii"].encode()) == H(node["hash"])
    assert merkle.HASH_SIZE == 32


def test_node_hashes_of_the_vector_tree():
    assert [leaf_hash(d) for d in LEAF_INPUTS] == NODES[0]
    for level in range(1, len(NODES)):
        for k, want in enumerate(NODES[level]):
            assert node_hash(NODES[level - 1][2 * k], NODES[level - 1][2 * k + 1]) == want


def test_roots_of_the_vector_tree():
    leaves = [leaf_hash(d) for d in LEAF_INPUTS]
    store, f = MemoryHashes(), Frontier()
    assert root_of([]) == ROOTS[0] == f.root() == tree_hash(0, store)
    for n in range(1, 9):
        store.append(f.append(leaves[n - 1]))
        assert root_of(leaves[:n]) == ROOTS[n]
        assert f.root() == ROOTS[n]
        assert tree_hash(n, store) == ROOTS[n]


def test_frontier_edge_is_the_vector_compact_range():
    f = Frontier()
    for n, nodes in enumerate(V["compact_trees"]):
        if n:
            f.append(leaf_hash(LEAF_INPUTS[n - 1]))
        assert f.edge == tuple(NODES[level][k] for level, k in nodes)


# --- Proof vectors -------------------------------------------------------------

def test_inclusion_vectors():
    store = vector_store()
    for v in V["inclusion_proofs"]:
        i, n, want = v["index"], v["size"], [H(x) for x in v["proof"]]
        assert prove_inclusion(i, n, store) == want, v
        check_inclusion(want, i, n, NODES[0][i], ROOTS[n])
        check_inclusion(b"".join(want), i, n, NODES[0][i], ROOTS[n])


def test_consistency_vectors():
    store = vector_store()
    for v in V["consistency_proofs"]:
        m, n, want = v["old"], v["new"], [H(x) for x in v["proof"]]
        assert prove_consistency(m, n, store) == want, v
        check_consistency(want, m, n, ROOTS[m], ROOTS[n])
        check_consistency(b"".join(want), m, n, ROOTS[m], ROOTS[n])


SOME_HASH = H("abacaba000000000000000000000000000000000000000000060061e00123456")


def inclusion_probes(i, n, proof, leaf, root):
    """Variations of a valid inclusion proof that must all be refused."""
    probes = [
        ("index - 1", proof, i - 1, n, leaf, root),
        ("index + 1", proof, i + 1, n, leaf, root),
        ("index ^ 2", proof, i ^ 2, n, leaf, root),
        ("size * 2", proof, i, n * 2, leaf, root),
        ("size // 2", proof, i, n // 2, leaf, root),
        ("wrong leaf", proof, i, n, sha256(b"WrongLeaf"), root),
        ("empty root", proof, i, n, leaf, EMPTY_ROOT),
        ("random root", proof, i, n, leaf, SOME_HASH),
        ("short leaf", proof, i, n, leaf[:31], root),
        ("long root", proof, i, n, leaf, root + b"\x00"),
        ("trailing root", proof + [root], i, n, leaf, root),
        ("preceding root", [root] + proof, i, n, leaf, root),
        ("trailing short hash", proof + [b""], i, n, leaf, root),
    ]
    if proof:
        probes.append(("removed component", proof[:-1], i, n, leaf, root))
        probes.append(("truncated bytes", b"".join(proof)[:-1], i, n, leaf, root))
    if len(proof) > 1:
        probes.append(("reversed order", proof[::-1], i, n, leaf, root))
        probes.append(("inserted component", [proof[0], SOME_HASH] + proof[1:], i, n, leaf, root))
    return probes


def consistency_probes(m, n, proof, r1, r2):
    probes = [
        ("old - 1", proof, m - 1, n, r1, r2),
        ("old + 1", proof, m + 1, n, r1, r2),
        ("old ^ 2", proof, m ^ 2, n, r1, r2),
        ("new * 2", proof, m, n * 2, r1, r2),
        ("new // 2", proof, m, n // 2, r1, r2),
        ("wrong old root", proof, m, n, sha256(b"WrongRoot"), r2),
        ("wrong new root", proof, m, n, r1, sha256(b"WrongRoot")),
        ("swapped roots", proof, m, n, r2, r1),
        ("empty proof", [], m, n, r1, r2),
        ("trailing old root", proof + [r1], m, n, r1, r2),
        ("trailing new root", proof + [r2], m, n, r1, r2),
        ("preceding old root", [r1] + proof, m, n, r1, r2),
        ("preceding new root", [r2] + proof, m, n, r1, r2),
        ("preceding proof[0]", [proof[0]] + proof, m, n, r1, r2),
        ("truncated proof", proof[:-1], m, n, r1, r2),
        ("short hash", proof[:-1] + [proof[-1][:31]], m, n, r1, r2),
    ]
    return probes


def test_inclusion_vectors_refuse_every_corruption():
    for v in V["inclusion_proofs"]:
        i, n, proof = v["index"], v["size"], [H(x) for x in v["proof"]]
        for desc, p, pi, pn, leaf, root in inclusion_probes(i, n, proof, NODES[0][i], ROOTS[n]):
            with pytest.raises(ProofError):
                check_inclusion(p, pi, pn, leaf, root)
                pytest.fail(f"{desc} accepted for {v}")


def test_consistency_vectors_refuse_every_corruption():
    for v in V["consistency_proofs"]:
        m, n, proof = v["old"], v["new"], [H(x) for x in v["proof"]]
        if not proof:
            continue
        for desc, p, pm, pn, r1, r2 in consistency_probes(m, n, proof, ROOTS[m], ROOTS[n]):
            with pytest.raises(ProofError):
                check_consistency(p, pm, pn, r1, r2)
                pytest.fail(f"{desc} accepted for {v}")


def test_single_leaf_tree():
    h = leaf_hash(b"data")
    check_inclusion([], 0, 1, h, h)
    with pytest.raises(ProofError):
        check_inclusion([], 0, 1, h, EMPTY_ROOT)
    with pytest.raises(ProofError):
        check_inclusion([], 0, 1, b"", h)
    with pytest.raises(ProofError):
        check_inclusion([], 0, 1, h, b"")


# --- Against the RFC definitions at every size --------------------------------

def test_tree_hash_and_frontier_root_at_every_size(big):
    store, snapshots = big
    for n in range(N_BIG + 1):
        reader = Reader(store, COMPLETED[n])
        assert tree_hash(n, reader) == ref_mth(0, n)
        assert reader.calls == (1 if n else 0)
        assert len(reader.indexes) == bin(n).count("1")
        assert snapshots[n].root() == ref_mth(0, n)
        assert snapshots[n].size == n


def test_every_leaf_at_every_size_up_to_300(big):
    store, _ = big
    leaves = [ref_mth(i, i + 1) for i in range(N_BIG)]
    for n in range(1, N_BIG + 1):
        root = ref_mth(0, n)
        reader = Reader(store, COMPLETED[n])
        for i in range(n):
            reader.calls = 0
            proof = prove_inclusion(i, n, reader)
            assert proof == ref_path(i, 0, n), (i, n)
            assert reader.calls == (1 if n > 1 else 0)
            check_inclusion(proof, i, n, leaves[i], root)
            # The same proof does not place a neighbour at this index.
            with pytest.raises(ProofError):
                check_inclusion(proof, i, n, leaves[(i + 1) % N_BIG], root)


def test_every_consistency_pair_up_to_120(big):
    store, _ = big
    for n in range(0, 121):
        new_root = ref_mth(0, n)
        reader = Reader(store, COMPLETED[n])
        for m in range(0, n + 1):
            reader.calls = 0
            proof = prove_consistency(m, n, reader)
            assert proof == (ref_proof(m, n) if m else []), (m, n)
            assert reader.calls == (1 if 0 < m < n else 0)
            check_consistency(proof, m, n, ref_mth(0, m), new_root)
            if 0 < m < n:
                # Neither an unrelated old tree nor one of another size passes.
                with pytest.raises(ProofError):
                    check_consistency(proof, m, n, ref_mth(1, m + 1), new_root)
                with pytest.raises(ProofError):
                    check_consistency(proof, m, n, ref_mth(0, m), ref_mth(0, n - 1))


SAMPLE_INCLUSION = [(0, 1), (0, 2), (5, 8), (6, 7), (37, 300), (255, 256), (299, 300), (128, 129),
                    (100, 257), (63, 191)]
SAMPLE_CONSISTENCY = [(1, 2), (2, 5), (6, 8), (6, 7), (4, 300), (37, 300), (255, 257), (128, 300),
                      (299, 300), (100, 101)]


@pytest.mark.parametrize("i,n", SAMPLE_INCLUSION)
def test_inclusion_refuses_any_flipped_bit(big, i, n):
    store, _ = big
    proof, leaf, root = prove_inclusion(i, n, store), ref_mth(i, i + 1), ref_mth(0, n)
    check_inclusion(proof, i, n, leaf, root)
    for j in range(len(proof)):
        for bit in range(256):
            bad = proof[:j] + [flip(proof[j], bit)] + proof[j + 1:]
            with pytest.raises(ProofError):
                check_inclusion(bad, i, n, leaf, root)
    for bit in range(256):
        with pytest.raises(ProofError):
            check_inclusion(proof, i, n, flip(leaf, bit), root)
        with pytest.raises(ProofError):
            check_inclusion(proof, i, n, leaf, flip(root, bit))
    for desc, p, pi, pn, pleaf, proot in inclusion_probes(i, n, proof, leaf, root):
        with pytest.raises(ProofError):
            check_inclusion(p, pi, pn, pleaf, proot)
            pytest.fail(desc)


@pytest.mark.parametrize("m,n", SAMPLE_CONSISTENCY)
def test_consistency_refuses_any_flipped_bit(big, m, n):
    store, _ = big
    proof, r1, r2 = prove_consistency(m, n, store), ref_mth(0, m), ref_mth(0, n)
    check_consistency(proof, m, n, r1, r2)
    for j in range(len(proof)):
        for bit in range(256):
            bad = proof[:j] + [flip(proof[j], bit)] + proof[j + 1:]
            with pytest.raises(ProofError):
                check_consistency(bad, m, n, r1, r2)
    for bit in range(256):
        with pytest.raises(ProofError):
            check_consistency(proof, m, n, flip(r1, bit), r2)
        with pytest.raises(ProofError):
            check_consistency(proof, m, n, r1, flip(r2, bit))
    for desc, p, pm, pn, pr1, pr2 in consistency_probes(m, n, proof, r1, r2):
        with pytest.raises(ProofError):
            check_consistency(p, pm, pn, pr1, pr2)
            pytest.fail(desc)


# --- Sizes, indexes and argument shapes ----------------------------------------

def test_check_inclusion_refuses_sizes_and_indexes_out_of_range():
    h = leaf_hash(b"x")
    for index, size in [(0, 0), (1, 0), (1, 1), (2, 1), (8, 8), (9, 8)]:
        with pytest.raises(ProofError, match=f"leaf {index} is not in a tree of size {size}"):
            check_inclusion([], index, size, h, h)
    with pytest.raises(ProofError, match="index must be an int >= 0"):
        check_inclusion([], -1, 1, h, h)
    for bad in [1.0, "0", None, True]:
        with pytest.raises(ProofError):
            check_inclusion([], bad, 1, h, h)
        with pytest.raises(ProofError):
            check_inclusion([], 0, bad, h, h)


def test_check_inclusion_says_when_the_length_is_wrong():
    # Leaf 5 of 8 has three siblings on its path (vectors: inclusion_proofs).
    store = vector_store()
    proof = prove_inclusion(5, 8, store)
    for bad in [proof[:2], proof + [ROOTS[8]], []]:
        with pytest.raises(ProofError, match=f"has 3 hashes, got {len(bad)}"):
            check_inclusion(bad, 5, 8, NODES[0][5], ROOTS[8])
    # 6 -> 8 has three hashes too.
    proof = prove_consistency(6, 8, store)
    with pytest.raises(ProofError, match="has 3 hashes, got 2"):
        check_consistency(proof[1:], 6, 8, ROOTS[6], ROOTS[8])


def test_check_inclusion_refuses_malformed_proofs():
    store = vector_store()
    proof = prove_inclusion(5, 8, store)
    raw = b"".join(proof)
    for bad in [raw[:-1], raw + b"\x00", "".join(p.hex() for p in proof), [p.hex() for p in proof],
                proof[:2] + [proof[2][:31]], proof[:2] + [proof[2] + b"\x00"], None, 5,
                {0: proof[0]}]:
        with pytest.raises(ProofError):
            check_inclusion(bad, 5, 8, NODES[0][5], ROOTS[8])
    check_inclusion(tuple(proof), 5, 8, NODES[0][5], ROOTS[8])
    check_inclusion(bytearray(raw), 5, 8, NODES[0][5], ROOTS[8])


def test_check_consistency_sizes_and_trivial_cases():
    r3, r5 = ROOTS[3], ROOTS[5]
    store = vector_store()
    proof = prove_consistency(3, 5, store)
    check_consistency(proof, 3, 5, r3, r5)
    # Sizes whose trees have another shape. (A proof does not pin the sizes
    # beyond the shape they give the path: 3 -> 6 computes the same hashes as
    # 3 -> 5. The signed checkpoint binds size and root together.)
    for old, new in [(5, 3), (-1, 5), (3, -5), (4, 5), (2, 5), (3, 10), (3, 4), (0, 5), (5, 5)]:
        with pytest.raises(ProofError):
            check_consistency(proof, old, new, r3, r5)
    # old == new: an empty proof and the same root, nothing else.
    check_consistency([], 5, 5, r5, r5)
    with pytest.raises(ProofError):
        check_consistency([], 5, 5, r3, r5)
    with pytest.raises(ProofError):
        check_consistency([r5], 5, 5, r5, r5)
    # From the empty tree: an empty proof and the root of the empty tree.
    check_consistency([], 0, 5, EMPTY_ROOT, r5)
    check_consistency([], 0, 0, EMPTY_ROOT, EMPTY_ROOT)
    with pytest.raises(ProofError):
        check_consistency([], 0, 5, r3, r5)
    with pytest.raises(ProofError):
        check_consistency([EMPTY_ROOT], 0, 5, EMPTY_ROOT, r5)
    with pytest.raises(ProofError):
        check_consistency([], 0, 0, EMPTY_ROOT, r5)
    for bad_root in [b"", r3[:31], r3 + b"\x00", r3.hex()]:
        with pytest.raises(ProofError):
            check_consistency(proof, 3, 5, bad_root, r5)
        with pytest.raises(ProofError):
            check_consistency(proof, 3, 5, r3, bad_root)


def test_prove_refuses_sizes_and_indexes_out_of_range():
    store = vector_store()
    for index, size in [(0, 0), (8, 8), (3, 2), (-1, 4), (0, -1)]:
        with pytest.raises(ValueError):
            prove_inclusion(index, size, store)
    for old, new in [(5, 3), (-1, 3), (1, -1)]:
        with pytest.raises(ValueError):
            prove_consistency(old, new, store)
    with pytest.raises(ValueError):
        tree_hash(-1, store)
    # A size past what is stored is the store's error, not a silent wrong answer.
    with pytest.raises(IndexError):
        prove_inclusion(0, 9, store)
    with pytest.raises(IndexError):
        tree_hash(9, store)


def test_a_reader_that_breaks_its_contract_is_an_error():
    store = vector_store()
    with pytest.raises(RuntimeError):
        tree_hash(7, lambda idx: store(idx)[:-1])
    with pytest.raises(RuntimeError):
        prove_inclusion(2, 7, lambda idx: [h[:31] for h in store(idx)])
    with pytest.raises(IndexError):
        store([-1])
    # memoryviews of a page are fine and come back as bytes.
    proof = prove_inclusion(2, 7, lambda idx: [memoryview(h) for h in store(idx)])
    assert all(type(p) is bytes for p in proof)
    check_inclusion(proof, 2, 7, NODES[0][2], ROOTS[7])


# --- Stored-hash layout -----------------------------------------------------------

# Worked out by hand from the definition for 8 leaves: leaf 1 completes (1, 0),
# leaf 3 completes (1, 1) then (2, 0), leaf 7 completes (1, 3), (2, 1), (3, 0).
LAYOUT_8 = [(0, 0), (0, 1), (1, 0), (0, 2), (0, 3), (1, 1), (2, 0), (0, 4), (0, 5), (1, 2),
            (0, 6), (0, 7), (1, 3), (2, 1), (3, 0)]
COUNTS_8 = [0, 1, 3, 4, 7, 8, 10, 11, 15]


def test_stored_hash_index_of_eight_leaves():
    assert [stored_hash_index(level, k) for level, k in LAYOUT_8] == list(range(15))
    assert [split_stored_hash_index(i) for i in range(15)] == LAYOUT_8
    assert [stored_hash_count(n) for n in range(9)] == COUNTS_8


def test_vector_tree_is_stored_in_layout_order():
    store = vector_store()
    assert len(store) == 15
    for level, hashes in enumerate(NODES):
        for k, want in enumerate(hashes):
            assert store([stored_hash_index(level, k)]) == [want]


def test_stored_hash_index_matches_the_layout_definition():
    for pos, (level, k) in enumerate(LAYOUT):
        assert stored_hash_index(level, k) == pos
        assert split_stored_hash_index(pos) == (level, k)
    for n in range(N_BIG + 1):
        assert stored_hash_count(n) == COMPLETED[n]


def test_split_stored_hash_index_roundtrip_far_out():
    rng = random.Random(6962)
    for level in range(64):
        for k in [0, 1, 2, 3, rng.randrange(1 << 20), rng.randrange(1 << 40), (1 << 44) - 1]:
            assert split_stored_hash_index(stored_hash_index(level, k)) == (level, k)
    for i in list(range(5000)) + [rng.randrange(1 << 50) for _ in range(2000)]:
        assert stored_hash_index(*split_stored_hash_index(i)) == i
    for bad in [-1, 1.5, None]:
        with pytest.raises(ValueError):
            split_stored_hash_index(bad)
        with pytest.raises(ValueError):
            stored_hash_index(0, bad)
        with pytest.raises(ValueError):
            stored_hash_count(bad)


# --- Frontier -----------------------------------------------------------------------

def test_frontier_appends_exactly_the_layout(big):
    store, _ = big
    want = [ref_mth(k << level, (k + 1) << level) for level, k in LAYOUT]
    assert store(list(range(len(store)))) == want
    f, got = Frontier(), []
    for i, data in enumerate(DATA):
        before = len(got)
        got += f.append(leaf_hash(data))
        assert before == COMPLETED[i]
    assert got == want


def test_frontier_load_and_bytes(big):
    store, snapshots = big
    for n in range(N_BIG + 1):
        reader = Reader(store, COMPLETED[n])
        loaded = Frontier.load(n, reader)
        assert loaded == snapshots[n]
        assert loaded.root() == ref_mth(0, n)
        assert Frontier.from_bytes(snapshots[n].to_bytes()) == snapshots[n]
        assert len(snapshots[n].to_bytes()) == 8 + 32 * bin(n).count("1")
    # 5 leaves: the subtrees [0, 4) and [4, 5) after the big-endian size.
    assert snapshots[5].to_bytes() == (5).to_bytes(8, "big") + ref_mth(0, 4) + ref_mth(4, 5)
    # A loaded frontier keeps growing the same tree.
    f = Frontier.load(100, store)
    assert f.append(leaf_hash(DATA[100])) == store(list(range(COMPLETED[100], COMPLETED[101])))


def test_frontier_refuses_malformed_state():
    good = Frontier(3, [ref_mth(0, 2), ref_mth(2, 3)])
    raw = good.to_bytes()
    for bad in [raw[:-1], raw + b"\x00", raw[:7], b"", (4).to_bytes(8, "big") + raw[8:]]:
        with pytest.raises(ValueError):
            Frontier.from_bytes(bad)
    with pytest.raises(ValueError):
        Frontier(3, [ref_mth(0, 2)])
    with pytest.raises(ValueError):
        Frontier(2, [b"short"])
    with pytest.raises(ValueError):
        Frontier(-1)
    with pytest.raises(ValueError):
        good.append(b"\x00" * 31)
    with pytest.raises(ValueError):
        MemoryHashes([b"\x00" * 33])


def test_frontier_copy_is_independent():
    f = Frontier()
    f.append(leaf_hash(b"a"))
    twin = f.copy()
    twin.append(leaf_hash(b"b"))
    assert (f.size, twin.size) == (1, 2)
    assert f.root() == leaf_hash(b"a")
    assert twin.root() == node_hash(leaf_hash(b"a"), leaf_hash(b"b"))


# --- At scale: a tree of identical leaves has one known hash per perfect level ---

LEVEL = [leaf_hash(b"same")]
for _ in range(64):
    LEVEL.append(node_hash(LEVEL[-1], LEVEL[-1]))


@lru_cache(maxsize=None)
def same_mth(n: int) -> bytes:
    if n == 1:
        return LEVEL[0]
    k = split_point(n)
    return node_hash(same_mth(k), same_mth(n - k))


@pytest.mark.parametrize("n", [10**6, 2**40, 2**40 + 1, 10**12 + 12345, 2**62 - 3])
def test_huge_trees_read_only_log_n_hashes(n):
    calls = []

    def read(indexes):
        calls.append(list(indexes))
        assert indexes == sorted(set(indexes))
        assert all(0 <= i < 2 * n - bin(n).count("1") for i in indexes)
        return [LEVEL[split_stored_hash_index(i)[0]] for i in indexes]

    bound = 2 * n.bit_length() + 2
    assert tree_hash(n, read) == same_mth(n)
    for index in [0, 1, n // 3, n // 2, n - 2, n - 1]:
        calls.clear()
        proof = prove_inclusion(index, n, read)
        assert len(calls) == 1 and len(calls[0]) <= bound
        check_inclusion(proof, index, n, LEVEL[0], same_mth(n))
    for old in [1, 2, 3, n // 3, n // 2 + 1, n - 1]:
        calls.clear()
        proof = prove_consistency(old, n, read)
        assert len(calls) == 1 and len(calls[0]) <= bound
        check_consistency(proof, old, n, same_mth(old), same_mth(n))


# --- Property: an append-only log is always consistent, a rewritten one never ----

@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.binary(max_size=12), min_size=1, max_size=70),
       data=st.data())
def test_append_only_logs_are_consistent(entries, data):
    new = len(entries)
    old = data.draw(st.integers(0, new), label="old")
    store, f, roots = MemoryHashes(), Frontier(), [EMPTY_ROOT]
    for e in entries:
        store.append(f.append(leaf_hash(e)))
        roots.append(f.root())
    leaves = [leaf_hash(e) for e in entries]
    assert roots[old] == root_of(leaves[:old]) == tree_hash(old, store)
    assert roots[new] == root_of(leaves)
    proof = prove_consistency(old, new, store)
    check_consistency(proof, old, new, roots[old], roots[new])
    index = data.draw(st.integers(0, new - 1), label="index")
    check_inclusion(prove_inclusion(index, new, store), index, new, leaves[index], roots[new])
    if old:
        # Rewriting any entry the old tree already had breaks consistency.
        j = data.draw(st.integers(0, old - 1), label="rewritten")
        forged = leaves[:j] + [leaf_hash(entries[j] + b"!")] + leaves[j + 1:]
        with pytest.raises(ProofError):
            check_consistency(proof, old, new, root_of(forged[:old]), roots[new])
        if old < new:
            with pytest.raises(ProofError):
                check_consistency(proof, old, new, roots[old], root_of(forged))
