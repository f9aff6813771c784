"""The GPU backend from Python: the same references as the host tests.

Without a GPU these tests are skipped and say why; with
``PRISM_REQUIRE_GPU=1`` (the GPU machine's runs) a missing GPU fails them
instead. Every output is compared bit for bit with the NumPy reference.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import prism
from conftest import (
    assert_bits_equal,
    clamp_ref,
    fma_chain_ref,
    gpu_pipeline,
    group_sum_ref,
)


@pytest.mark.parametrize("n", [1, 4095, 1 << 20, (16 << 20) + 3])
def test_gpu_run_matches_the_reference(rng, n):
    p = gpu_pipeline(4 << 20, timing=True)
    p.add_stage(prism.Fma(a=1.000244, b=-0.5, iters=8))
    p.add_stage(prism.Clamp(lo=-2.0, hi=2.0))
    x = rng.standard_normal(n).astype(np.float32)
    y = p.run(x)
    assert_bits_equal(y, clamp_ref(fma_chain_ref(x, 1.000244, -0.5, 8), -2.0, 2.0))
    s = p.stats()
    assert s["runs"] == 1 and s["bytes_in"] == 4 * n, s


def test_gpu_group_sum_never_spans_chunks(rng):
    chunk = 1 << 16
    p = gpu_pipeline(4 * chunk)
    p.add_stage(prism.GroupSum(group=100))
    x = rng.standard_normal(5 * chunk + 777).astype(np.float32)
    assert_bits_equal(p.run(x), group_sum_ref(x, 100, chunk))


def test_gpu_run_into_out_and_stream(rng):
    p = gpu_pipeline(1 << 20)
    p.add_stage(prism.Fma(a=2.0, b=1.0))
    x = rng.standard_normal(3 << 20).astype(np.float32)
    out = np.full(len(x), np.nan, dtype=np.float32)
    assert p.run(x, out=out) is out
    assert_bits_equal(out, fma_chain_ref(x, 2.0, 1.0, 1))
    items = [rng.standard_normal(k).astype(np.float32) for k in (1, 1000, 1 << 18, 5)]
    got = list(p.run_stream(items))
    assert len(got) == len(items)
    for g, it in zip(got, items):
        assert_bits_equal(g, fma_chain_ref(it, 2.0, 1.0, 1))


def test_gpu_adaptive_and_graphs_runs(rng):
    # The adaptive configuration picks 4 slots and chunks of an eighth of
    # the input (4 to 16 MiB) whatever was asked; graphs replay each chunk's
    # stages. Same bits either way.
    n = (40 << 20) // 4 + 11
    x = rng.standard_normal(n).astype(np.float32)
    want = clamp_ref(fma_chain_ref(x, 1.5, 0.25, 3), -4.0, 4.0)
    for kwargs in ({"adaptive": True}, {"graphs": True}, {"adaptive": True, "graphs": True}):
        p = gpu_pipeline(1 << 20, **kwargs)
        p.add_stage(prism.Fma(a=1.5, b=0.25, iters=3))
        p.add_stage(prism.Clamp(lo=-4.0, hi=4.0))
        assert_bits_equal(p.run(x), want)
        s = p.stats()
        assert s["adaptive"] == kwargs.get("adaptive", False), (kwargs, s)
        if kwargs.get("adaptive"):
            assert s["slots"] == 4 and (4 << 20) <= s["chunk_bytes"] <= (16 << 20), s
        assert (s["graph_launches"] > 0) == kwargs.get("graphs", False), (kwargs, s)


def test_gpu_registered_arrays_run_with_no_staging(rng):
    p = gpu_pipeline(1 << 20, timing=True)
    p.add_stage(prism.Fma(a=1.000244, b=-0.5, iters=2))
    n = (5 << 20) + 3
    x = rng.standard_normal(n).astype(np.float32)
    out = np.full(n, np.nan, dtype=np.float32)
    want = fma_chain_ref(x, 1.000244, -0.5, 2)
    with p.register(x) as xr, p.register(out) as outr:
        assert xr.pinned and outr.pinned and xr.array is x
        for _ in range(2):
            out.fill(np.nan)
            assert p.run(xr, out=outr) is outr
            assert_bits_equal(out, want)
        assert p.stats()["host_copy_ms"] == 0.0  # nothing staged
        with pytest.raises(ValueError, match="overlap"):
            p.run(xr, out=xr)
        # The same memory twice: the driver refuses, typed.
        with pytest.raises(ValueError, match="registered already"):
            p.register(x)
        # While registered, plain calls over the same memory still run
        # (staged): the borrow flags are free between runs.
        assert_bits_equal(p.run(xr.array), want)
        with pytest.raises(prism.LengthError):
            short = np.empty(n - 1, dtype=np.float32)
            with p.register(short) as sr:
                p.run(xr, out=sr)
    assert not xr.pinned
    # Closed: runs as its arrays (staged).
    out.fill(np.nan)
    assert p.run(xr, out=outr) is outr
    assert_bits_equal(out, want)
    # A host pipeline given GPU-registered arrays runs them as arrays.
    h = prism.Pipeline("host")
    h.add_stage(prism.Fma(a=1.000244, b=-0.5, iters=2))
    with p.register(x) as xr2, p.register(out) as outr2:
        out.fill(np.nan)
        h.run(xr2, out=outr2)
        assert_bits_equal(out, want)
    # A plain array still runs (staged); the registered memory was released.
    assert_bits_equal(p.run(x), want)
    with p.register(x) as again:
        assert again.pinned


def test_gpu_graph_fan_out(rng):
    p = gpu_pipeline(1 << 20)
    g = prism.Graph()
    x = g.input()
    a = g.stage(x, prism.Fma(a=0.5, b=0.25, iters=3))
    b = g.stage(x, prism.Clamp(lo=-0.5, hi=0.5))
    c = g.stage(a, prism.Clamp(lo=-1.0, hi=1.0))
    for node in (a, b, c):
        g.output(node)
    data = rng.standard_normal((2 << 20) + 9).astype(np.float32)
    ya, yb, yc = p.run_graph(g, data)
    ra = fma_chain_ref(data, 0.5, 0.25, 3)
    assert_bits_equal(ya, ra)
    assert_bits_equal(yb, clamp_ref(data, -0.5, 0.5))
    assert_bits_equal(yc, clamp_ref(ra, -1.0, 1.0))


def test_gpu_run_releases_the_gil(rng):
    p = gpu_pipeline(1 << 20)
    # fma(y, 1, 0) is y (no -0.0 in normal samples): a long kernel whose
    # reference is its input.
    p.add_stage(prism.Fma(a=1.0, b=0.0, iters=20000))
    x = rng.standard_normal(16 << 20).astype(np.float32)
    ticks = 0
    stop = threading.Event()

    def count():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    t = threading.Thread(target=count)
    t.start()
    try:
        y = p.run(x)
    finally:
        stop.set()
        t.join()
    assert_bits_equal(y, x)
    assert ticks > 1000, ticks
