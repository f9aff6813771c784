"""The GIL is released while prism works.

A Python thread counts while it can run. With a switch interval far longer
than the test, the interpreter never takes the GIL from a thread that holds
it: the counter can only move while the main thread is inside prism if
prism released the GIL. Without the release the count is exactly unchanged
(the check fails); with it, the counter, which sleeps 1 ms between steps,
moves many times during a run of a few hundred milliseconds.
"""

import sys
import threading
import time

import numpy as np

import prism
from conftest import assert_bits_equal, fma_chain_ref, host_pipeline


class Counter:
    def __init__(self):
        self.count = 0
        self.stop = False
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self.started.set()
        while not self.stop:
            self.count += 1
            time.sleep(0.001)  # gives the GIL back voluntarily

    def __enter__(self):
        self.old = sys.getswitchinterval()
        sys.setswitchinterval(1000.0)
        self.thread.start()
        self.started.wait()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        sys.setswitchinterval(self.old)


# fma(y, 1, 0) == y exactly: many steps of it keep a host thread busy for
# a few hundred milliseconds while the reference stays cheap.
SPIN = prism.Fma(1.0, 0.0, 20_000)


def _long_pipeline():
    p = host_pipeline(1 << 16, host_threads=1)
    p.add_stage(SPIN)
    p.add_stage(prism.Fma(0.5, 0.25, 1))
    return p


def _want(x):
    return fma_chain_ref(x, 0.5, 0.25, 1)


def test_run_releases_the_gil():
    p = _long_pipeline()
    x = np.linspace(-1, 1, 1 << 18, dtype=np.float32)
    with Counter() as c:
        before = c.count
        t0 = time.perf_counter()
        y = p.run(x)  # no Python code in between: only a release lets c run
        elapsed = time.perf_counter() - t0
        during = c.count - before
    assert during > 0, f"no progress in {elapsed:.3f} s inside run: the GIL was held"
    assert_bits_equal(y, _want(x))


def test_waiting_for_a_stream_output_releases_the_gil():
    p = _long_pipeline()
    items = [np.linspace(-1, 1, 1 << 16, dtype=np.float32) * k for k in range(4)]
    with Counter() as c:
        before = c.count
        outs = list(p.run_stream(items))
        during = c.count - before
    assert during > 0
    assert len(outs) == len(items)
    for x, y in zip(items, outs):
        assert_bits_equal(y, _want(x))


def test_run_graph_releases_the_gil():
    g = prism.Graph()
    x = g.input()
    g.output(g.stage(g.stage(x, SPIN), prism.Fma(0.5, 0.25, 1)))
    g.output(x)
    p = host_pipeline(1 << 16, host_threads=1)
    data = np.linspace(-1, 1, 1 << 18, dtype=np.float32)
    with Counter() as c:
        before = c.count
        outs = p.run_graph(g, data)
        during = c.count - before
    assert during > 0, "no progress inside run_graph: the GIL was held"
    assert_bits_equal(outs[0], _want(data))
    assert_bits_equal(outs[1], data)
