"""The receipts' Merkle tree against RFC 6962/9162: known roots, every proof checked,
and every altered proof refused."""

from __future__ import annotations

import pytest

from tether.audit._merkle import (
    EMPTY_ROOT,
    Frontier,
    Tree,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

pytestmark = pytest.mark.store_independent

# The test vector of RFC 6962's reference implementation (certificate-transparency).
VECTOR = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
ROOTS = {
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}


def _mth(data: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1, written as the RFC states it (the reference to test against)."""
    if not data:
        return EMPTY_ROOT
    if len(data) == 1:
        return leaf_hash(data[0])
    k = 1
    while k * 2 < len(data):
        k *= 2
    return node_hash(_mth(data[:k]), _mth(data[k:]))


def test_known_roots() -> None:
    tree = Tree([leaf_hash(d) for d in VECTOR])
    for size, root in ROOTS.items():
        assert tree.root(size).hex() == root


def test_frontier_and_tree_agree_with_the_definition() -> None:
    data = [f"receipt {i}".encode() for i in range(70)]
    tree = Tree([leaf_hash(d) for d in data])
    frontier = Frontier()
    for n in range(71):
        assert tree.root(n) == _mth(data[:n]) == frontier.root()
        if n < 70:
            frontier.append(leaf_hash(data[n]))
    again = Frontier.from_hex(frontier.size, frontier.to_hex())
    assert again.root() == frontier.root()


def test_every_proof_verifies_and_no_altered_one_does() -> None:
    data = [f"r{i}".encode() for i in range(40)]
    leaves = [leaf_hash(d) for d in data]
    tree = Tree(leaves)
    for n in range(1, 41):
        root = tree.root(n)
        for m in range(n):
            path = tree.inclusion(m, n)
            assert verify_inclusion(m, n, leaves[m], path, root)
            if n > 1:
                assert not verify_inclusion(m, n, leaves[(m + 1) % n], path, root)
                assert not verify_inclusion((m + 1) % n, n, leaves[m], path, root)
            if path:
                bent = [path[0][:-1] + bytes([path[0][-1] ^ 1]), *path[1:]]
                assert not verify_inclusion(m, n, leaves[m], bent, root)
        for m in range(1, n + 1):
            proof = tree.consistency(m, n)
            assert verify_consistency(m, n, tree.root(m), root, proof)
            if m < n:
                assert not verify_consistency(m, n, tree.root(m - 1), root, proof)
                assert not verify_consistency(m, n, tree.root(m), tree.root(n - 1), proof)


def test_a_frontier_must_match_its_size() -> None:
    with pytest.raises(ValueError):
        Frontier(3, [leaf_hash(b"x")])
