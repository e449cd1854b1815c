"""Lists of plain numbers travel packed (codec.c): exactly what pickle would give back."""
import enum
import math
import pickle
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyparallel import Pool, _core
from pyparallel._pool.local import wire as _serialize


class Color(enum.IntEnum):
    RED = 1


def roundtrip(seq):
    parts = _serialize.encode(7, _serialize.pack_numbers(seq))
    return _serialize.decode(bytearray(b"".join(bytes(memoryview(p)) for p in parts)))[1]


def same(a, b):
    """Equal item by item with the same types (nan equal to nan, -0.0 told from 0.0)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if type(x) is not type(y):
            return False
        if isinstance(x, float):
            if struct.pack("<d", x) != struct.pack("<d", y):
                return False
        elif x != y:
            return False
    return True


numbers = st.one_of(
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    st.lists(st.floats(allow_nan=True, allow_infinity=True)),
    st.lists(st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.text())),
    st.lists(st.integers(min_value=-(2**70), max_value=2**70)),
)


@settings(max_examples=200, deadline=None)
@given(numbers)
def test_roundtrip_matches_pickle(seq):
    expected = pickle.loads(pickle.dumps(seq, 5))
    assert same(roundtrip(seq), expected)
    assert same(roundtrip(tuple(seq)), list(expected))  # a tuple comes back as a list


@pytest.mark.parametrize("seq", [
    [1] * 100,
    [2**63 - 1, -(2**63)] * 50,
    [0.5, -0.0, math.inf, -math.inf, math.nan] * 20,
])
def test_packed_when_plain(seq):
    packed = _serialize.pack_numbers(seq)
    assert isinstance(packed, _serialize._Numbers)
    assert same(roundtrip(seq), seq)


@pytest.mark.parametrize("seq", [
    [True] * 100,                 # bool is an int subclass: pickle keeps it a bool
    [1] * 99 + [True],
    [Color.RED] * 100,            # so is IntEnum
    [1] * 99 + [2**63],           # past int64
    [1.0] * 99 + [1],             # mixed
    [1] * 99 + [1.0],
    [1] * 10,                     # short: pickle is as fast
])
def test_not_packed_otherwise(seq):
    assert _serialize.pack_numbers(seq) is seq
    assert same(roundtrip(seq), seq)


def test_unpack_rejects_bad_input():
    with pytest.raises(ValueError):
        _core.unpack_numbers("q", b"1234567")
    with pytest.raises(ValueError):
        _core.unpack_numbers("x", b"")
    with pytest.raises(TypeError):
        _core.unpack_numbers("q", 5)
    assert _core.pack_numbers([]) is None and _core.pack_numbers("abc") is None


def ident(x):
    return x


def test_pool_results_keep_their_types():
    seq = list(range(-500, 500)) + [2**62, True, Color.RED, 2**64, 1.5, -0.0]
    with Pool(2) as p:
        got = p.map(ident, seq, chunksize=100)
        assert same(got, seq)
        floats = [x / 7 for x in range(1000)]
        assert same(p.map(ident, floats), floats)
        assert same(p.apply(list, (range(1000),)), list(range(1000)))
        assert p.apply(tuple, (range(1000),)) == tuple(range(1000))  # a tuple stays a tuple
