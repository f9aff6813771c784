"""Pipeline.run on the host backend: every output against a NumPy reference."""

import json

import numpy as np
import pytest

import prism
from conftest import (
    assert_bits_equal,
    clamp_ref,
    fma_chain_ref,
    group_sum_ref,
    host_pipeline,
)

# (chunk elements, input elements): one chunk, exactly one, several full
# ones, a last partial chunk, one element.
SIZES = [(1000, 10), (1000, 1000), (1000, 4000), (1000, 12345), (64, 1), (4096, 100_003)]


def _data(rng, n):
    return (rng.standard_normal(n) * 3.0).astype(np.float32)


@pytest.mark.parametrize("chunk,n", SIZES)
def test_fma_then_clamp(rng, chunk, n):
    p = host_pipeline(chunk)
    assert p.backend == "host" and p.device == ""
    assert p.add_stage(prism.Fma(a=1.0001, b=-0.25, iters=7)) == 0
    assert p.add_stage(prism.Clamp(lo=-2.5, hi=4.0)) == 1
    x = _data(rng, n)
    y = p.run(x)
    want = clamp_ref(fma_chain_ref(x, 1.0001, -0.25, 7), -2.5, 4.0)
    assert_bits_equal(y, want)
    assert p.output_len(n) == n


@pytest.mark.parametrize("chunk,n", SIZES)
@pytest.mark.parametrize("group", [1, 3, 8, 33])
def test_group_sum_per_chunk(rng, chunk, n, group):
    p = host_pipeline(chunk)
    p.add_stage(prism.Fma(0.5, 1.0, 2))
    p.add_stage(prism.GroupSum(group))
    x = _data(rng, n)
    y = p.run(x)
    want = group_sum_ref(fma_chain_ref(x, 0.5, 1.0, 2), group, chunk)
    assert p.output_len(n) == len(want)
    assert_bits_equal(y, want)


def test_clamp_of_special_values():
    p = host_pipeline(7)
    p.add_stage(prism.Clamp(-1.0, 1.0))
    x = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 0.5, -3.0, 2.0, 1e-45, -1e38], np.float32)
    y = p.run(x)
    np.testing.assert_array_equal(y, clamp_ref(x, -1.0, 1.0))
    assert not np.isnan(y).any()  # fmaxf: a NaN input gives lo


def test_set_order_runs_the_stages_in_that_order(rng):
    p = host_pipeline(500)
    fma = p.add_stage(prism.Fma(2.0, 1.0, 1))
    clamp = p.add_stage(prism.Clamp(0.0, 1.0))
    p.set_order([clamp, fma])
    x = _data(rng, 1234)
    assert_bits_equal(p.run(x), fma_chain_ref(clamp_ref(x, 0.0, 1.0), 2.0, 1.0, 1))
    p.set_order([fma])
    assert_bits_equal(p.run(x), fma_chain_ref(x, 2.0, 1.0, 1))


def test_out_is_written_in_place(rng):
    p = host_pipeline(1000)
    p.add_stage(prism.Fma(1.5, -2.0, 3))
    x = _data(rng, 2500)
    out = np.full(2500, np.nan, dtype=np.float32)
    ret = p.run(x, out=out)
    assert ret is out
    assert_bits_equal(out, fma_chain_ref(x, 1.5, -2.0, 3))


def test_out_with_a_shrinking_stage(rng):
    p = host_pipeline(100)
    p.add_stage(prism.GroupSum(10))
    x = _data(rng, 1050)
    out = np.empty(p.output_len(1050), dtype=np.float32)
    assert len(out) == 105 + 0  # 10 chunks of 100 -> 10 each, 50 -> 5
    p.run(x, out=out)
    assert_bits_equal(out, group_sum_ref(x, 10, 100))


@pytest.mark.parametrize("wrong", [0, 99, 101, 1000])
def test_out_of_the_wrong_length_is_a_length_error(rng, wrong):
    p = host_pipeline(1000)
    p.add_stage(prism.Clamp(0.0, 1.0))
    out = np.zeros(wrong, dtype=np.float32)
    with pytest.raises(prism.LengthError) as e:
        p.run(_data(rng, 100), out=out)
    assert (e.value.expected, e.value.actual) == (100, wrong)
    assert isinstance(e.value, ValueError) and isinstance(e.value, prism.PrismError)
    assert "100" in str(e.value)
    assert not out.any()  # nothing written


def test_bad_out_arrays(rng):
    p = host_pipeline(1000)
    p.add_stage(prism.Clamp(0.0, 1.0))
    x = _data(rng, 100)
    with pytest.raises(TypeError):
        p.run(x, out=np.zeros(100, dtype=np.float64))
    with pytest.raises(ValueError, match="contiguous"):
        p.run(x, out=np.zeros(200, dtype=np.float32)[::2])
    ro = np.zeros(100, dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        p.run(x, out=ro)
    with pytest.raises(ValueError, match="overlap"):
        p.run(x, out=x)  # in place is refused: input is borrowed read-only


def test_inputs_that_numpy_converts_are_copied(rng):
    p = host_pipeline(256)
    p.add_stage(prism.Fma(3.0, 0.5, 2))
    x64 = rng.standard_normal(1000)
    want = fma_chain_ref(x64.astype(np.float32), 3.0, 0.5, 2)
    assert_bits_equal(p.run(x64), want)  # float64
    assert_bits_equal(p.run(list(x64)), want)  # a list
    wide = np.zeros(2000, dtype=np.float32)
    wide[::2] = x64
    assert_bits_equal(p.run(wide[::2]), want)  # a strided view
    big_endian = x64.astype(">f4")
    assert_bits_equal(p.run(big_endian), want)
    with pytest.raises(ValueError, match="1-D"):
        p.run(np.zeros((10, 10), dtype=np.float32))
    with pytest.raises(TypeError):
        p.run("not numbers")


def test_input_is_not_modified(rng):
    p = host_pipeline(100)
    p.add_stage(prism.Fma(2.0, 2.0, 5))
    x = _data(rng, 1000)
    before = x.copy()
    p.run(x)
    assert_bits_equal(x, before)


def test_empty_input_is_an_empty_run():
    # As prism's Rust `run`: an empty input is a valid run of no chunk.
    p = host_pipeline(100)
    p.add_stage(prism.Fma(2.0, 1.0, 1))
    y = p.run(np.zeros(0, dtype=np.float32))
    assert y.dtype == np.float32 and y.shape == (0,)
    s = p.stats()
    assert (s["runs"], s["chunks"], s["bytes_in"]) == (1, 0, 0)


def test_stats_count_the_runs(rng):
    p = host_pipeline(1000)
    p.add_stage(prism.Fma(1.0, 1.0, 50))
    p.add_stage(prism.GroupSum(4))
    assert p.stats()["runs"] == 0
    x = _data(rng, 12345)
    y = p.run(x)
    p.run(x[:500])
    s = p.stats()
    assert s["backend"] == "host" and s["device"] == ""
    assert s["runs"] == 2
    assert s["chunks"] == 13 + 1
    assert s["bytes_in"] == 4 * (12345 + 500)
    assert s["bytes_out"] == 4 * (len(y) + 125)
    assert [st["name"] for st in s["stages"]] == ["fma", "group_sum"]
    assert all(st["ms"] > 0 for st in s["stages"])
    assert s["wall_ms"] > 0 and s["timed"] is True
    assert s["compute_ms"] == pytest.approx(sum(st["ms"] for st in s["stages"]))
    assert s["bottleneck"] == "compute"
    assert s["throughput_gbps"] > 0
    assert s["chunk_bytes"] == 4000 and s["slots"] == 3
    p.reset_stats()
    s = p.stats()
    assert (s["runs"], s["chunks"], s["bytes_in"], s["wall_ms"]) == (0, 0, 0, 0.0)
    assert s["backend"] == "host"


def test_trace_is_chrome_json():
    p = host_pipeline(100, trace=True)
    p.add_stage(prism.Clamp(0, 1))
    p.run(np.ones(1000, dtype=np.float32))
    trace = json.loads(p.trace())
    events = trace["traceEvents"]
    assert {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "prism"}} in events
    # The host backend records no spans (GPU only, for now): metadata only.
    assert [e for e in events if e["ph"] != "M"] == []


def test_properties_and_reprs():
    p = prism.Pipeline("host", chunk_bytes=4096, slots=4, host_threads=1, timing=False)
    assert (p.chunk_bytes, p.slots, p.host_threads, p.timing) == (4096, 4, 1, False)
    assert (p.adaptive, p.graphs) == (False, False)
    q = prism.Pipeline("host", adaptive=True, graphs=True)
    assert (q.adaptive, q.graphs) == (True, True)
    assert "host" in repr(p)
    f = prism.Fma(2.0, 1.0, 3)
    assert (f.a, f.b, f.iters, f.name) == (2.0, 1.0, 3, "fma")
    assert f == prism.Fma(2.0, 1.0, 3) and f != prism.Fma(2.0, 1.0, 4)
    assert repr(f) == "Fma(a=2.0, b=1.0, iters=3)"
    assert prism.Fma(0.1, 0.0).a == np.float32(0.1)  # rounded to float32
    assert (prism.Clamp(-1, 1).lo, prism.Clamp(-1, 1).hi) == (-1.0, 1.0)
    assert prism.GroupSum(5).group == 5
    assert p.add_stage(prism.GroupSum(5)) == 0
    with pytest.raises(TypeError, match="add_stage"):
        p.add_stage("fma")


def test_a_misaligned_input_is_copied(rng):
    # A float32 array over a byte buffer at an odd offset (as Dask's
    # deserialized arrays can be): contiguous, but not aligned, which
    # numpy.ascontiguousarray leaves as it is.
    x = _data(rng, 1001)
    raw = bytearray(4 * len(x) + 1)
    misaligned = np.frombuffer(raw, dtype=np.float32, offset=1)
    misaligned_w = np.frombuffer(memoryview(raw)[1:], dtype=np.float32)
    misaligned_w[:] = x  # (a writeable view of the same bytes)
    assert not misaligned.flags.aligned and misaligned.flags.c_contiguous
    p = host_pipeline(2048)  # a stream item is one chunk at most
    p.add_stage(prism.Fma(3.0, 0.5, 2))
    assert_bits_equal(p.run(misaligned), fma_chain_ref(x, 3.0, 0.5, 2))
    (y,) = p.run_stream([misaligned])
    assert_bits_equal(y, fma_chain_ref(x, 3.0, 0.5, 2))
    g = prism.Graph()
    g.output(g.input())
    assert_bits_equal(p.run_graph(g, misaligned)[0], x)


def test_register_on_the_host_runs_as_the_array(rng):
    p = prism.Pipeline("host", chunk_bytes=4096)
    p.add_stage(prism.Fma(a=2.0, b=1.0))
    x = rng.standard_normal(10_000).astype(np.float32)
    out = np.full_like(x, np.nan)
    with p.register(x) as xr, p.register(out) as outr:
        assert (xr.pinned, len(xr)) == (False, len(x))  # nothing to pin on the host
        assert xr.array is x and "Registered(len=10000" in repr(xr)
        assert p.run(xr, out=outr) is outr
        assert_bits_equal(out, fma_chain_ref(x, 2.0, 1.0, 1))
        # One registered, one plain: as the arrays.
        out2 = np.empty_like(x)
        p.run(xr, out=out2)
        assert_bits_equal(out2, out)
        assert_bits_equal(p.run(xr), out)
    xr.close()  # closing twice does nothing
    # Closed: still its array on the host.
    assert_bits_equal(p.run(xr), out)


def test_register_refuses_what_it_cannot_pin_in_place():
    p = prism.Pipeline("host")
    with pytest.raises(TypeError, match="float32"):
        p.register(np.zeros(8, dtype=np.float64))
    with pytest.raises(TypeError, match="float32"):
        p.register([1.0, 2.0])
    with pytest.raises(ValueError, match="C-contiguous"):
        p.register(np.zeros(16, dtype=np.float32)[::2])
    ro = np.zeros(8, dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        p.register(ro)
    unaligned = np.frombuffer(bytearray(4 * 9), dtype=np.float32, count=8, offset=1)
    with pytest.raises(ValueError, match="aligned"):
        p.register(unaligned)
