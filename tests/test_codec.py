"""Lists of plain numbers travel packed (codec.c): exactly what pickle would give back."""
import enum
import math
import pickle
import struct
import sys

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


# ---- records: lists of plain tuples (or strs) packed in one buffer ----

def rec_roundtrip(seq):
    packed = _serialize.pack_numbers(seq)
    parts = _serialize.encode(7, packed)
    return packed, _serialize.decode(bytearray(b"".join(bytes(memoryview(p)) for p in parts)))[1]


def same_deep(a, b):
    """Equal with the same types all the way down (floats bit for bit)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_deep(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return a == b


field = st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(),
                  st.text(), st.none(), st.booleans())
fields = st.one_of(field, st.integers(), st.binary(), st.tuples(st.integers()))


@settings(max_examples=150, deadline=None)
@given(st.one_of(
    st.lists(st.tuples(field, field, field), min_size=64, max_size=100),
    st.lists(st.tuples(fields, fields), min_size=64, max_size=100),
    st.lists(st.text(), min_size=64, max_size=100),
    st.lists(st.one_of(st.text(), st.tuples(field)), min_size=64, max_size=100),
))
def test_records_roundtrip_matches_pickle(seq):
    expected = pickle.loads(pickle.dumps(seq, 5))
    _, got = rec_roundtrip(seq)
    assert same_deep(got, expected)
    seq = tuple(seq)
    packed, got = rec_roundtrip(tuple(seq))
    # a packed tuple comes back as a list (the receiver only iterates over it)
    assert same_deep(got, expected if packed is not seq else tuple(expected))


@pytest.mark.parametrize("seq", [
    [("type1", i) for i in range(100)],
    [("type1", i, i * 3.5, None, True, False) for i in range(100)],
    [(f"name{i}", "\udc80 lone surrogate", "日本", "\U0001f600", "") for i in range(100)],
    ["word"] * 50 + ["other", "\xe9t\xe9"] * 25,
    [(2**63 - 1, -(2**63))] * 100,
])
def test_records_packed_when_plain(seq):
    packed, got = rec_roundtrip(seq)
    assert isinstance(packed, _serialize._Records)
    assert same_deep(got, list(seq))


class Tag(str):
    pass


@pytest.mark.parametrize("seq", [
    [("a", i) for i in range(99)] + [("a", 2**63)],      # past int64
    [("a", i) for i in range(99)] + [("a", 1.0)],        # a field changes kind
    [("a", i) for i in range(99)] + [("a", 1, 1)],       # another length
    [("a", i) for i in range(99)] + [["a", 1]],          # a list among the tuples
    [(Tag("a"), i) for i in range(100)],                 # a str subclass
    [(Color.RED, 1)] * 100,                              # an int subclass
    [("a", (1, 2))] * 100,                               # nested
    [()] * 100,
    [tuple(range(33))] * 100,                            # longer than the codec takes
    [("a", i) for i in range(10)],                       # short: pickle is as fast
])
def test_records_not_packed_otherwise(seq):
    packed, got = rec_roundtrip(seq)
    assert packed is seq
    assert same_deep(got, list(seq))


def test_records_share_repeated_fields():
    seq = [("type1", i) for i in range(100)]
    got = _core.unpack_records(_core.pack_records(seq))
    assert got == seq and len({id(t[0]) for t in got}) == 1


def test_records_runs_no_python_code():
    class Evil(int):
        def __index__(self):
            raise AssertionError("pack_records ran Python code")

        __int__ = __index__

    assert _core.pack_records([("a", 1), ("a", Evil(2))]) is None


def test_unpack_records_rejects_bad_input():
    good = _core.pack_records([("ab", 1), ("ab", 2), ("cd", 3)])
    for bad in (b"", b"R", good[:-1], good + b"\0", b"X" + good[1:],
                good[:2] + b"z" + good[3:], good[:8] + b"\xff" * 8 + good[16:]):
        with pytest.raises(ValueError):
            _core.unpack_records(bad)
    with pytest.raises(TypeError):
        _core.unpack_records(5)
    assert _core.pack_records([]) is None and _core.pack_records("abc") is None


def kind_weight(item):
    kind, i = item
    return (kind, i, i * {"type1": 3}[kind])


def test_pool_records_both_ways():
    items = [("type1", i) for i in range(5000)]
    with Pool(2) as p:
        got = p.map(kind_weight, items)
        assert got == [kind_weight(x) for x in items]
        assert all(type(t) is tuple for t in got)
        assert p.starmap(max, [(i, -i) for i in range(1000)]) == list(range(1000))
        words = [f"w{i}" for i in range(1000)]
        assert p.map(str.upper, words) == [w.upper() for w in words]


def test_records_unpack_in_parts_matches_whole():
    seq = [("same", i, "x" if i % 3 else f"v{i}") for i in range(2000)]
    buf = _core.pack_records(seq)
    for part in (1, 7, 512, 1999, 2000, 5000):
        got, state = [], None
        while True:
            items, state = _core.unpack_records(buf, state, part)
            got.extend(items)
            if state is None:
                break
        assert got == seq
    assert list(_serialize.iter_records(buf)) == seq
    words = ["a", "a", "b"] * 100
    assert list(_serialize.iter_records(_core.pack_records(words))) == words


def test_records_parts_reject_bad_state():
    buf = _core.pack_records([("a", i) for i in range(100)])
    _, state = _core.unpack_records(buf, None, 10)
    for bad in ((10**9,) + state[1:], (state[0], 10**9) + state[2:], state[:2], "x"):
        with pytest.raises(ValueError, match="bad state"):
            _core.unpack_records(buf, bad, 10)
    with pytest.raises(ValueError):
        _core.unpack_records(buf, None, 0)
    with pytest.raises(ValueError):
        list(_serialize.iter_records(buf[:-3]))


def test_packed_arguments_arrive_as_an_iterator():
    # A chunk of records reaches the worker's map unpacked a part at a time; what the
    # function sees is the same: each item, in order.
    items = [("k", i) for i in range(3000)]
    with Pool(2) as p:
        assert p.map(kind_weight2, items, chunksize=1500) == [("k", i, 2 * i) for i in range(3000)]
        assert p.starmap(pow, [(i, 2) for i in range(3000)], chunksize=1000) == \
            [i * i for i in range(3000)]


def kind_weight2(item):
    kind, i = item
    return (kind, i, 2 * i)


@pytest.mark.parametrize("seq", [
    [("a", i, i * 0.5) for i in range(300)],
    [f"w{i % 7}" for i in range(300)],
    [("a", i) for i in range(100)] + [("a", 2**64)] + [("b", i) for i in range(50)],  # switch
    [("a", 1), [1, 2]] + [("a", i) for i in range(100)],
    [2**70] + [("a", 1)] * 10,
    [1, 2, 3],                    # numbers: a list (pack_numbers takes those)
    [],
])
def test_pack_iter_is_the_list_or_its_packing(seq):
    got = _core.pack_iter(iter(seq))
    if type(got) is bytes:
        assert _core.unpack_records(got) == seq
        assert _core.pack_records(seq) == got
    else:
        assert type(got) is list and same_deep(got, list(seq))


def test_pack_iter_propagates_errors():
    def gen():
        yield ("a", 1)
        yield ("a", 2)
        raise KeyError("boom")

    with pytest.raises(KeyError):
        _core.pack_iter(gen())
    with pytest.raises(TypeError):
        _core.pack_iter(5)


def test_pack_a_range_of_the_items_in_place():
    seq = [("k", i, i / 2) for i in range(100)]
    assert _core.unpack_records(_core.pack_records(seq, 10, 30)) == seq[10:30]
    assert _core.unpack_records(_core.pack_records(seq, 90)) == seq[90:]
    assert _core.unpack_records(_core.pack_records(seq, 0, None)) == seq
    nums = list(range(50))
    assert _core.unpack_numbers(*_core.pack_numbers(nums, 5, 9)) == [5, 6, 7, 8]
    assert _core.pack_records(seq, 3, 3) is None and _core.pack_numbers(nums, 7, 7) is None
    assert _core.pack_records([("k", 1), "x"], 0, 2) is None  # a field changing kind
    for bad in ((-1, 3), (5, 4), (0, 101), (101, None)):
        with pytest.raises(ValueError, match="start and stop"):
            _core.pack_records(seq, *bad)
        with pytest.raises(ValueError, match="start and stop"):
            _core.pack_numbers(list(range(100)), *bad)
    with pytest.raises(TypeError):
        _core.pack_records(seq, "1", 3)
    with pytest.raises(TypeError):
        _core.pack_numbers(nums, 0, 1, 2)
    # packing reads the items in place: it takes no reference to any of them
    before = [sys.getrefcount(t) for t in seq[10:30]]
    packed = _core.pack_records(seq, 10, 30)
    assert [sys.getrefcount(t) for t in seq[10:30]] == before and packed
