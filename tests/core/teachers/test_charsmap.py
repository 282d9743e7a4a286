"""The normaliser table of the me5-small tokenizer, built without SentencePiece's tools."""

import pytest

from kdnas_core.errors import TeacherError
from kdnas_core.teachers.charsmap import _DoubleArray, precompiled_charsmap


def test_a_small_table_compiles_to_bytes():
    blob = precompiled_charsmap({0xFF21: "A", 0x00A0: " "})
    assert isinstance(blob, bytes) and b"A" in blob


def test_an_offset_beyond_the_double_arrays_reach_is_one_line():
    """darts-clone keeps a child's offset in 21 bits: a table that would need more is refused
    with a TeacherError instead of a trie that silently maps the wrong characters."""
    arr = _DoubleArray()
    arr._grow(0)
    with pytest.raises(TeacherError) as err:
        arr._link(0, 1 << 21)
    assert "too large" in str(err.value) and "\n" not in str(err.value)
