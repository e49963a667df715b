"""The receipts' Merkle tree (RFC 9162 §2.1): roots, inclusion and consistency proofs.

Leaves are hashed ``SHA-256(0x00 || receipt)``, nodes ``SHA-256(0x01 || left || right)``;
the tree of ``n`` leaves splits at the largest power of two below ``n``. The hashing and
the proof checks live in :mod:`tether.audit._verifier` (the standalone verifier); this
module builds: a :class:`Frontier` (the ``O(log n)`` right edge that extends a tree one
leaf at a time and gives its root) and a :class:`Tree` over known leaf hashes (proofs).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tether.audit._verifier import (
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

EMPTY_ROOT = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")

__all__ = [
    "EMPTY_ROOT",
    "Frontier",
    "Tree",
    "leaf_hash",
    "node_hash",
    "verify_consistency",
    "verify_inclusion",
]


class Frontier:
    """The roots of the perfect subtrees of a tree of ``size`` leaves, largest first
    (one per set bit of ``size``): enough to append leaves and compute the root."""

    __slots__ = ("nodes", "size")

    def __init__(self, size: int = 0, nodes: Sequence[bytes] = ()) -> None:
        if len(nodes) != bin(size).count("1"):
            raise ValueError("a frontier has one node per set bit of its size")
        self.size = size
        self.nodes = list(nodes)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash."""
        node, size = leaf, self.size
        while size & 1:
            node = node_hash(self.nodes.pop(), node)
            size >>= 1
        self.nodes.append(node)
        self.size += 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def root(self) -> bytes:
        if not self.nodes:
            return EMPTY_ROOT
        node = self.nodes[-1]
        for left in reversed(self.nodes[:-1]):
            node = node_hash(left, node)
        return node

    def copy(self) -> Frontier:
        return Frontier(self.size, self.nodes)

    def to_hex(self) -> list[str]:
        return [n.hex() for n in self.nodes]

    @classmethod
    def from_hex(cls, size: int, nodes: Sequence[str]) -> Frontier:
        return cls(size, [bytes.fromhex(n) for n in nodes])


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


class Tree:
    """A tree over known leaf hashes, with every perfect aligned subtree precomputed
    (``levels[j][i]`` covers leaves ``[i * 2**j, (i + 1) * 2**j)``)."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self.levels: list[list[bytes]] = [list(leaves)]
        while len(self.levels[-1]) > 1:
            below = self.levels[-1]
            self.levels.append(
                [node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
            )

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def _hash(self, lo: int, hi: int) -> bytes:
        """MTH of leaves ``[lo, hi)``; ``lo`` is aligned to the subtree the recursion is in."""
        n = hi - lo
        if n & (n - 1) == 0:
            level = n.bit_length() - 1
            return self.levels[level][lo >> level]
        k = _split(n)
        return node_hash(self._hash(lo, lo + k), self._hash(lo + k, hi))

    def root(self, size: int | None = None) -> bytes:
        n = self.size if size is None else size
        if not 0 <= n <= self.size:
            raise ValueError(f"the tree has {self.size} leaves, not {n}")
        return EMPTY_ROOT if n == 0 else self._hash(0, n)

    def inclusion(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.3.1: the audit path of leaf ``index`` in the tree of ``size``."""
        n = self.size if size is None else size
        if not 0 <= index < n <= self.size:
            raise ValueError("no such leaf in that tree")
        path: list[bytes] = []
        lo, hi, m = 0, n, index
        while hi - lo > 1:
            k = _split(hi - lo)
            if m < k:
                path.append(self._hash(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._hash(lo, lo + k))
                lo, m = lo + k, m - k
        path.reverse()
        return path

    def consistency(self, first: int, second: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.4.1: the proof that the tree of ``first`` leaves is a prefix of
        the tree of ``second``."""
        n = self.size if second is None else second
        if not 0 < first <= n <= self.size:
            raise ValueError("no such pair of trees")
        proof: list[bytes] = []
        lo, hi, m, whole = 0, n, first, True
        while True:
            if m == hi - lo:
                if not whole:
                    proof.append(self._hash(lo, hi))
                break
            k = _split(hi - lo)
            if m <= k:
                proof.append(self._hash(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._hash(lo, lo + k))
                lo, m, whole = lo + k, m - k, False
        proof.reverse()
        return proof
