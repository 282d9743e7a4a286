"""SentencePiece's ``precompiled_charsmap`` (the normaliser table tokenizers' ``Precompiled``
normaliser reads) built from a per-character replacement table: a byte trie of every mapped
character, laid out as a Darts double array, and the pool of replacements. ``me5`` uses it to
write XLM-R's normalisation into the ``tokenizer.json`` of the me5-small teacher."""

from __future__ import annotations

import struct

import numpy as np

from kdnas_core.errors import TeacherError


def _normaliser_trie(norm: dict[int, str]) -> tuple[dict, bytes]:
    """A byte trie over the UTF-8 of every mapped character (the value, under key None, is the
    offset of its replacement) and the pool of NUL-terminated replacements."""
    pool, where, trie = bytearray(), {}, {}
    for codepoint in sorted(norm):
        out = norm[codepoint].encode("utf-8")
        if out not in where:
            where[out] = len(pool)
            pool += out + b"\0"
        node = trie
        for byte in chr(codepoint).encode("utf-8"):
            node = node.setdefault(byte, {})
        node[None] = where[out]
    return trie, bytes(pool)


class _DoubleArray:
    """A darts-clone double array built from a byte trie: the layout SentencePiece's
    ``precompiled_charsmap`` uses and tokenizers' ``Precompiled`` normaliser reads.

    Each unit holds a label (bits 0-7), a has-leaf flag (bit 8) and the offset to its
    children's base (bits 10-30); a value unit has bit 31 set. darts-clone checks only a
    child's label, so no two nodes may share a base.
    """

    def __init__(self):
        self.units = [0]
        self.used = bytearray(b"\1")
        self.free = 1  # every slot below it is used
        self.next_leaf = 1  # value slots of leaf-only nodes are handed out upwards from here
        self.bases: set[int] = set()

    def _first_free(self) -> int:
        while self.free < len(self.used) and self.used[self.free]:
            self.free += 1
        return self.free

    def _grow(self, slot: int) -> None:
        """Room for the whole 256-slot block ``slot`` lies in."""
        n = (slot | 0xFF) + 1
        if n > len(self.units):
            self.units.extend([0] * (n - len(self.units)))
            self.used.extend(bytes(n - len(self.used)))

    def _link(self, pos: int, base: int) -> None:
        if pos ^ base >= 1 << 21:
            raise TeacherError(f"normaliser table too large for a darts-clone double array ({pos ^ base})")
        self.units[pos] |= (pos ^ base) << 10

    def _claim_base(self, labels: list[int]) -> int:
        """The first unshared base whose slots base ^ label are all free, marked used."""
        base = max(1, self._first_free() - 0xFF)
        while True:
            self._grow(base)
            if base not in self.bases and all(not self.used[base ^ c] for c in labels):
                break
            base += 1
        self.bases.add(base)
        for c in labels:
            self.used[base ^ c] = 1
        return base

    def _claim_leaf(self) -> int:
        """A free, unshared slot for the value of a node that has nothing but a value."""
        slot = max(self.next_leaf, self._first_free())
        self._grow(slot)
        while slot in self.bases or self.used[slot]:
            slot += 1
            self._grow(slot)
        self.next_leaf = slot + 1
        self.bases.add(slot)
        self.used[slot] = 1
        return slot

    def place(self, pos: int, node: dict) -> None:
        """Lay out ``node``'s children (its value sits at label 0) below the unit at ``pos``."""
        base = self._claim_base(sorted(0 if k is None else k for k in node))
        self._link(pos, base)
        for key, child in node.items():
            if key is None:
                self.units[base] = child | (1 << 31)
            else:
                self.units[base ^ key] = key | ((1 << 8) if None in child else 0)
        for key, child in sorted((k, c) for k, c in node.items() if k is not None):
            if any(k is not None for k in child):
                self.place(base ^ key, child)
            else:
                leaf = self._claim_leaf()
                self.units[leaf] = child[None] | (1 << 31)
                self._link(base ^ key, leaf)


def precompiled_charsmap(norm: dict[int, str]) -> bytes:
    """SentencePiece's ``precompiled_charsmap`` for a per-character table: u32 size of the
    double array, the array, then the replacement pool."""
    trie, pool = _normaliser_trie(norm)
    array = _DoubleArray()
    array.place(0, trie)
    units = np.asarray(array.units, dtype="<u4").tobytes()
    return struct.pack("<I", len(units)) + units + pool
