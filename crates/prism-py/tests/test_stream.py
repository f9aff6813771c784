"""Pipeline.run_stream: one output per item, in order, on a worker thread."""

import numpy as np
import pytest

import prism
from conftest import assert_bits_equal, clamp_ref, fma_chain_ref, group_sum_ref, host_pipeline


def _items(rng, count, chunk):
    lengths = rng.integers(1, chunk + 1, count)
    lengths[:3] = [chunk, 1, chunk]  # full and tiny items too
    return [(rng.standard_normal(int(n)) * 2).astype(np.float32) for n in lengths]


def test_outputs_in_order(rng):
    chunk = 300
    p = host_pipeline(chunk, slots=4)
    p.add_stage(prism.Fma(1.25, -0.5, 3))
    p.add_stage(prism.Clamp(-3.0, 3.0))
    items = _items(rng, 200, chunk)
    outs = list(p.run_stream(items))
    assert len(outs) == len(items)
    for x, y in zip(items, outs):
        assert_bits_equal(y, clamp_ref(fma_chain_ref(x, 1.25, -0.5, 3), -3.0, 3.0))
    s = p.stats()
    assert s["runs"] == 1 and s["chunks"] == len(items)
    assert s["bytes_in"] == 4 * sum(len(x) for x in items)


def test_each_item_is_one_chunk_for_group_sum(rng):
    chunk = 128
    p = host_pipeline(chunk)
    p.add_stage(prism.GroupSum(5))
    items = _items(rng, 50, chunk)
    outs = list(p.run_stream(iter(items)))
    assert len(outs) == len(items)
    for x, y in zip(items, outs):
        assert_bits_equal(y, group_sum_ref(x, 5, chunk))


def test_a_generator_of_convertible_items(rng):
    p = host_pipeline(64)
    p.add_stage(prism.Fma(2.0, 0.0, 1))

    def gen():
        for k in range(1, 20):
            yield [float(k)] * k  # lists of Python floats: copied to float32

    outs = list(p.run_stream(gen()))
    assert [len(y) for y in outs] == list(range(1, 20))
    for k, y in enumerate(outs, start=1):
        np.testing.assert_array_equal(y, np.full(k, 2.0 * k, dtype=np.float32))


def test_an_empty_iterable_yields_nothing():
    p = host_pipeline(64)
    p.add_stage(prism.Clamp(0, 1))
    assert list(p.run_stream([])) == []
    assert p.stats()["runs"] == 1


class Boom(Exception):
    pass


def test_an_exception_from_the_iterable_is_raised_after_the_earlier_outputs(rng):
    p = host_pipeline(64)
    p.add_stage(prism.Fma(3.0, 1.0, 1))
    items = [rng.standard_normal(10).astype(np.float32) for _ in range(5)]

    def gen():
        yield from items
        raise Boom("item 5 is broken")

    it = p.run_stream(gen())
    got = []
    with pytest.raises(Boom, match="item 5"):
        for y in it:
            got.append(y)
    assert len(got) == 5
    for x, y in zip(items, got):
        assert_bits_equal(y, fma_chain_ref(x, 3.0, 1.0, 1))
    # The pipeline is free again.
    assert_bits_equal(p.run(items[0]), fma_chain_ref(items[0], 3.0, 1.0, 1))


@pytest.mark.parametrize("bad_len", [0, 65])
def test_items_must_fit_one_chunk(bad_len):
    p = host_pipeline(64)
    p.add_stage(prism.Clamp(0, 1))
    items = [np.ones(8, np.float32), np.ones(8, np.float32), np.ones(bad_len, np.float32)]
    it = p.run_stream(items)
    with pytest.raises(prism.LengthError) as e:
        list(it)
    assert (e.value.item, e.value.expected, e.value.actual) == (2, 64, bad_len)
    with pytest.raises(StopIteration):
        next(it)  # finished


def test_the_pipeline_is_busy_until_the_stream_ends(rng):
    p = host_pipeline(64, slots=2)
    p.add_stage(prism.Clamp(0, 1))
    items = [np.full(16, k, np.float32) for k in range(50)]
    it = p.run_stream(items)
    first = next(it)
    np.testing.assert_array_equal(first, np.zeros(16, np.float32))
    with pytest.raises(prism.BusyError, match="run_stream"):
        p.run(np.ones(4, np.float32))
    with pytest.raises(prism.BusyError):
        p.run_stream(items)
    with pytest.raises(prism.BusyError):
        p.stats()
    rest = list(it)
    assert len(rest) == 49
    assert p.stats()["chunks"] == 50  # free again


def test_close_stops_the_stream_and_frees_the_pipeline():
    p = host_pipeline(64, slots=2)
    p.add_stage(prism.Fma(1.0, 1.0, 1))
    pulled = []

    def gen():
        for k in range(1_000_000):
            pulled.append(k)
            yield np.full(8, k, np.float32)

    with p.run_stream(gen()) as it:
        for k, y in zip(range(3), it):
            np.testing.assert_array_equal(y, np.full(8, k + 1, np.float32))
    # Closed by the with block: few items were pulled beyond the three read.
    assert len(pulled) < 100
    with pytest.raises(StopIteration):
        next(it)
    it.close()  # idempotent
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(p.run(x), x + 1)
