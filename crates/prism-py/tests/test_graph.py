"""Stage graphs (prism.Graph, Pipeline.run_graph) on the host backend: every
output against a NumPy reference, bit for bit, and the typed errors."""

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


def _data(rng, n):
    return (rng.standard_normal(n) * 3.0).astype(np.float32)


# Branches read from the input: (stage, reference over x and the chunk size).
BRANCHES = [
    (prism.Fma(1.0001, -0.25, 7), lambda x, c: fma_chain_ref(x, 1.0001, -0.25, 7)),
    (prism.Clamp(-1.5, 2.0), lambda x, c: clamp_ref(x, -1.5, 2.0)),
    (prism.GroupSum(7), lambda x, c: group_sum_ref(x, 7, c)),
    (prism.Fma(0.5, 3.0, 1), lambda x, c: fma_chain_ref(x, 0.5, 3.0, 1)),
]

# (chunk elements, input elements): one partial chunk, several with a
# partial last one, exactly whole chunks, one element.
SIZES = [(1000, 10), (1000, 12345), (256, 4096), (64, 1)]


@pytest.mark.parametrize("chunk,n", SIZES)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_fan_out_to_k_outputs(rng, chunk, n, k):
    p = host_pipeline(chunk)
    g = prism.Graph()
    x = g.input()
    for i, (stage, _) in enumerate(BRANCHES[:k]):
        assert g.output(g.stage(x, stage)) == i
    assert (g.node_count, g.output_count) == (k + 1, k)
    data = _data(rng, n)
    outs = p.run_graph(g, data)
    assert isinstance(outs, list) and len(outs) == k
    wants = [ref(data, chunk) for _, ref in BRANCHES[:k]]
    assert p.graph_output_lens(g, n) == [len(w) for w in wants]
    for got, want in zip(outs, wants):
        assert_bits_equal(got, want)


def test_chains_taps_and_the_input_as_an_output(rng):
    # x -> fma -> clamp -> group_sum, with taps on fma and clamp, a second
    # branch clamp(x) -> fma, the input itself and one node output twice.
    chunk, n = 500, 2222
    p = host_pipeline(chunk)
    g = prism.Graph()
    x = g.input()
    f = g.stage(x, prism.Fma(2.0, -1.0, 3))
    c = g.stage(f, prism.Clamp(-4.0, 4.0))
    s = g.stage(c, prism.GroupSum(5))
    c2 = g.stage(x, prism.Clamp(0.0, 1.0))
    f2 = g.stage(c2, prism.Fma(1.5, 0.125, 2))
    order = [s, f, x, c, f2, s]
    assert [g.output(node) for node in order] == list(range(6))
    data = _data(rng, n)
    before = data.copy()
    outs = p.run_graph(g, data)
    rf = fma_chain_ref(data, 2.0, -1.0, 3)
    rc = clamp_ref(rf, -4.0, 4.0)
    rs = group_sum_ref(rc, 5, chunk)
    rf2 = fma_chain_ref(clamp_ref(data, 0.0, 1.0), 1.5, 0.125, 2)
    for got, want in zip(outs, [rs, rf, data, rc, rf2, rs]):
        assert_bits_equal(got, want)
    assert outs[0] is not outs[5]  # one node output twice: two arrays
    assert outs[2] is not data  # the input as an output is a copy
    assert_bits_equal(data, before)  # and the input is unchanged
    names = [st["name"] for st in p.stats()["stages"]]
    assert sorted(names) == sorted(g.name(node) for node in (f, c, s, c2, f2))


def test_only_the_input_as_the_output(rng):
    p = host_pipeline(300)
    g = prism.Graph()
    g.output(g.input())
    data = _data(rng, 1000)
    (y,) = p.run_graph(g, data)
    assert_bits_equal(y, data)


def test_repeated_stage_names_are_made_unique():
    g = prism.Graph()
    x = g.input()
    a = g.stage(x, prism.Clamp(0, 1))
    b = g.stage(x, prism.Clamp(0, 2))
    assert g.name(x) == "input" and g.name(a) == "clamp"
    assert g.name(b) != "clamp" and g.name(b).startswith("clamp")
    assert (x.index, a.index, b.index) == (0, 1, 2)
    c = g.stage(x, prism.Clamp(0, 3))
    assert c.index == 3 and c != a and c != b and a != b
    assert {a, b, c, a} == {a, b, c}  # hashable, equal to itself
    assert repr(b) == "Node(index=2)"


def test_outs_are_written_in_place(rng):
    chunk, n = 1000, 2500
    p = host_pipeline(chunk)
    g = prism.Graph()
    x = g.input()
    g.output(g.stage(x, prism.Fma(1.5, -2.0, 3)))
    g.output(g.stage(x, prism.GroupSum(10)))
    data = _data(rng, n)
    lens = p.graph_output_lens(g, n)
    assert lens == [2500, 250]
    outs = [np.full(m, np.nan, dtype=np.float32) for m in lens]
    ret = p.run_graph(g, data, outs=outs)
    assert isinstance(ret, list) and len(ret) == 2
    assert ret[0] is outs[0] and ret[1] is outs[1]
    assert_bits_equal(outs[0], fma_chain_ref(data, 1.5, -2.0, 3))
    assert_bits_equal(outs[1], group_sum_ref(data, 10, chunk))
    ret = p.run_graph(g, data, outs=tuple(outs))  # any iterable
    assert ret[0] is outs[0]


def test_graph_is_reused_and_runs_on_several_pipelines(rng):
    g = prism.Graph(concurrent_branches=False)
    assert g.concurrent_branches is False and prism.Graph().concurrent_branches
    x = g.input()
    g.output(g.stage(x, prism.Fma(0.75, 0.5, 4)))
    g.output(g.stage(x, prism.GroupSum(3)))
    for chunk in (100, 1000):
        p = host_pipeline(chunk)
        for n in (1, 999, 3001):
            data = _data(rng, n)
            a, b = p.run_graph(g, data)
            assert_bits_equal(a, fma_chain_ref(data, 0.75, 0.5, 4))
            assert_bits_equal(b, group_sum_ref(data, 3, chunk))
        assert p.stats()["runs"] == 3


def test_stats_count_graph_runs(rng):
    p = host_pipeline(1000)
    g = prism.Graph()
    x = g.input()
    g.output(g.stage(x, prism.Fma(1.0, 1.0, 10)))
    g.output(g.stage(x, prism.Clamp(0, 1)))
    p.run_graph(g, _data(rng, 4500))
    s = p.stats()
    assert (s["runs"], s["chunks"], s["bytes_in"]) == (1, 5, 4 * 4500)
    assert sorted(st["name"] for st in s["stages"]) == ["clamp", "fma"]


def test_empty_input_gives_empty_outputs():
    p = host_pipeline(100)
    g = prism.Graph()
    x = g.input()
    g.output(g.stage(x, prism.Fma(2.0, 1.0)))
    g.output(g.stage(x, prism.GroupSum(4)))
    outs = p.run_graph(g, np.zeros(0, dtype=np.float32))
    assert [(o.dtype, o.shape) for o in outs] == [(np.float32, (0,))] * 2


def test_a_graph_too_wide_for_a_gpu_slot_runs_on_the_host(rng):
    # 20 one-stage branches, each an output: 21 values alive at once, more
    # than a GPU ring slot holds (GraphError there); the host has no slots.
    g = prism.Graph()
    x = g.input()
    bounds = [(-0.5 - i, 0.25 * i) for i in range(20)]
    for lo, hi in bounds:
        g.output(g.stage(x, prism.Clamp(lo, hi)))
    with pytest.raises(prism.GraphError, match="16") as e:
        g.buffers_per_slot()
    assert (e.value.buffers, e.value.max_buffers) == (21, 16)
    assert isinstance(e.value, prism.ConfigError) and isinstance(e.value, ValueError)
    data = _data(rng, 3000)
    outs = host_pipeline(1000).run_graph(g, data)
    assert len(outs) == 20
    for (lo, hi), got in zip(bounds, outs):
        assert_bits_equal(got, clamp_ref(data, lo, hi))


@pytest.mark.parametrize("concurrent", [True, False])
def test_buffers_per_slot_of_small_graphs(concurrent):
    g = prism.Graph(concurrent_branches=concurrent)
    x = g.input()
    a = g.stage(x, prism.Fma(1, 1))
    g.output(g.stage(g.stage(a, prism.Clamp(0, 1)), prism.Fma(2, 2)))
    assert g.buffers_per_slot() == 2  # a chain: two, however long
    g.output(g.stage(x, prism.Clamp(0, 2)))
    # Three values alive at once (the input, the chain's, the branch's);
    # concurrent branches may get a buffer more so as not to wait.
    if concurrent:
        assert 3 <= g.buffers_per_slot() <= 4
    else:
        assert g.buffers_per_slot() == 3


# -- errors ---------------------------------------------------------------


def test_a_graph_with_no_outputs_is_a_typed_error():
    p = host_pipeline(100)
    g = prism.Graph()
    g.stage(g.input(), prism.Clamp(0, 1))
    for call in (
        lambda: p.run_graph(g, np.ones(10, dtype=np.float32)),
        lambda: p.run_graph(g, np.zeros(0, dtype=np.float32)),
        lambda: p.graph_output_lens(g, 10),
        g.buffers_per_slot,
    ):
        with pytest.raises(prism.NoOutputsError, match=r"Graph\.output") as e:
            call()
        assert isinstance(e.value, prism.GraphError)
        assert isinstance(e.value, prism.ConfigError)
    assert p.stats()["runs"] == 0  # a refused run adds nothing


def test_a_node_of_another_graph_is_a_graph_error():
    g1, g2 = prism.Graph(), prism.Graph()
    x1 = g1.input()
    a1 = g1.stage(x1, prism.Clamp(0, 1))
    b1 = g1.stage(a1, prism.Clamp(0, 1))
    x2 = g2.input()
    g2.stage(x2, prism.Clamp(0, 1))
    g2.stage(x2, prism.Clamp(0, 1))
    # Index 1 and 2 exist in g2 too: the node's graph is what is checked.
    assert x1 != x2  # the inputs of two graphs are different nodes
    for node in (x1, a1, b1):
        with pytest.raises(prism.GraphError, match="not a node of this graph") as e:
            g2.stage(node, prism.Fma(1, 1))
        assert (e.value.node, e.value.nodes) == (node.index, 3)
        with pytest.raises(prism.GraphError):
            g2.output(node)
        with pytest.raises(prism.GraphError):
            g2.name(node)
    assert (g2.node_count, g2.output_count) == (3, 0)  # nothing was added


def test_arguments_of_the_wrong_kind_are_type_errors():
    g = prism.Graph()
    x = g.input()
    with pytest.raises(TypeError, match="prism.Node"):
        g.stage(0, prism.Clamp(0, 1))
    with pytest.raises(TypeError, match="prism.Node"):
        g.output("input")
    with pytest.raises(TypeError, match="Graph.stage"):
        g.stage(x, "clamp")
    g.output(x)
    p = host_pipeline(100)
    with pytest.raises(TypeError):
        p.run_graph("graph", np.ones(3, dtype=np.float32))
    with pytest.raises(TypeError, match="outs"):
        p.run_graph(g, np.ones(3, dtype=np.float32), outs=5)


@pytest.mark.parametrize("count", [0, 1, 3, 4])
def test_outs_of_another_count_is_a_length_error(rng, count):
    p = host_pipeline(100)
    g = prism.Graph()
    x = g.input()
    g.output(g.stage(x, prism.Clamp(0, 1)))
    g.output(g.stage(x, prism.Fma(2, 1)))
    outs = [np.zeros(50, dtype=np.float32) for _ in range(count)]
    with pytest.raises(prism.LengthError, match="one array per output") as e:
        p.run_graph(g, _data(rng, 50), outs=outs)
    assert (e.value.expected, e.value.actual, e.value.output) == (2, count, None)
    assert not any(o.any() for o in outs)  # nothing written
    assert p.stats()["runs"] == 0


@pytest.mark.parametrize("which,length", [(0, 49), (1, 51), (1, 0), (0, 100)])
def test_an_out_of_the_wrong_length_is_a_length_error(rng, which, length):
    p = host_pipeline(100)
    g = prism.Graph()
    x = g.input()
    g.output(g.stage(x, prism.Clamp(0, 1)))
    g.output(x)
    outs = [np.zeros(50, dtype=np.float32) for _ in range(2)]
    outs[which] = np.zeros(length, dtype=np.float32)
    with pytest.raises(prism.LengthError) as e:
        p.run_graph(g, _data(rng, 50), outs=outs)
    assert (e.value.output, e.value.expected, e.value.actual) == (which, 50, length)
    assert not any(o.any() for o in outs)


def test_bad_out_arrays(rng):
    p = host_pipeline(100)
    g = prism.Graph()
    x = g.input()
    g.output(g.stage(x, prism.Clamp(0, 1)))
    g.output(g.stage(x, prism.Fma(2, 1)))
    data = _data(rng, 50)
    good = np.zeros(50, dtype=np.float32)
    with pytest.raises(TypeError, match=r"outs\[1\]"):
        p.run_graph(g, data, outs=[good, np.zeros(50, dtype=np.float64)])
    with pytest.raises(ValueError, match="contiguous"):
        p.run_graph(g, data, outs=[np.zeros(100, dtype=np.float32)[::2], good])
    ro = np.zeros(50, dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        p.run_graph(g, data, outs=[good, ro])
    with pytest.raises(ValueError, match="overlap"):
        p.run_graph(g, data, outs=[good, good])  # one array for two outputs
    with pytest.raises(ValueError, match="overlap"):
        p.run_graph(g, data, outs=[data, good])  # the input as an output
    both = np.zeros(100, dtype=np.float32)
    with pytest.raises(ValueError, match="overlap"):
        p.run_graph(g, data, outs=[both[:50], both[25:75]])
    assert not good.any() and not both.any()
    assert p.stats()["runs"] == 0


def test_a_graph_is_busy_while_a_stream_holds_the_pipeline(rng):
    p = host_pipeline(100)
    p.add_stage(prism.Clamp(0, 1))
    g = prism.Graph()
    g.output(g.input())
    with p.run_stream([np.ones(10, dtype=np.float32)]):
        with pytest.raises(prism.BusyError):
            p.run_graph(g, np.ones(10, dtype=np.float32))
    data = _data(rng, 10)
    assert_bits_equal(p.run_graph(g, data)[0], data)
