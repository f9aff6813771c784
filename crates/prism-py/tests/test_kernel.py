"""``prism.Kernel``: the user's own PTX kernel as a stage.

The PTX is the Rust example's ``scale_add`` (``y[i] = fmaf(a, x[i], b)``,
signature ``(const float*, float*, unsigned long long n, float a, float
b)``). Its signature checks run everywhere; the runs need a GPU (skipped
without one, failed with ``PRISM_REQUIRE_GPU=1``) and are compared bit for
bit with the NumPy reference.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import prism
from conftest import assert_bits_equal, clamp_ref, fma_chain_ref, gpu_pipeline

PTX = (
    pathlib.Path(__file__).resolve().parents[2]
    / "prism-pipeline"
    / "examples"
    / "kernels"
    / "scale_add.ptx"
).read_text()


def test_kernel_signature_is_checked_against_the_ptx():
    k = prism.Kernel(PTX, "scale_add", [2.0, -1.0])
    assert k.name == "scale_add" and k.params == [2.0, -1.0] and not k.elementwise
    assert "scale_add" in repr(k)
    with pytest.raises(ValueError, match="no kernel named"):
        prism.Kernel(PTX, "scale_mul", [2.0, -1.0])
    with pytest.raises(ValueError, match="parameters"):
        prism.Kernel(PTX, "scale_add", [2.0])  # one float too few
    with pytest.raises(ValueError, match="parameters"):
        prism.Kernel(PTX, "scale_add")
    with pytest.raises(ValueError, match="NUL"):
        prism.Kernel(PTX, "scale\0add", [2.0, -1.0])
    with pytest.raises(ValueError, match="block"):
        prism.Kernel(PTX, "scale_add", [2.0, -1.0], block=0)
    odd = PTX.replace(".param .f32 scale_add_param_4", ".param .u64 scale_add_param_4")
    with pytest.raises(ValueError, match="PTX types"):
        prism.Kernel(odd, "scale_add", [2.0, -1.0])


def test_kernel_signature_check_is_not_fooled():
    """Text that would make prism pass a different argument list than the
    kernel takes is refused (found by review)."""
    # Byte arrays: the driver would copy more bytes than prism passes.
    arr = PTX.replace(".param .f32 scale_add_param_4", ".param .align 4 .b8 scale_add_param_4[8]")
    with pytest.raises(ValueError, match="bytes"):
        prism.Kernel(arr, "scale_add", [2.0, -1.0])
    # A commented-out declaration cannot stand in for the real one...
    fake = PTX + "\n// .visible .entry scale_add(.param .u64 a, .param .u64 b, .param .u64 n)\n"
    prism.Kernel(fake, "scale_add", [2.0, -1.0])  # the real one still counts
    with pytest.raises(ValueError, match="parameters"):
        prism.Kernel(fake, "scale_add", [])
    # ... nor can a `)` inside a comment cut the list short.
    cut = PTX.replace("scale_add_param_2,", "scale_add_param_2 /* ) */,")
    with pytest.raises(ValueError, match="parameters"):
        prism.Kernel(cut, "scale_add", [])
    prism.Kernel(cut, "scale_add", [2.0, -1.0])
    # Two entries of one name; a name that is a prefix of another.
    with pytest.raises(ValueError, match="more than once"):
        prism.Kernel(PTX + PTX[PTX.index(".visible .entry"):], "scale_add", [2.0, -1.0])
    longer = PTX.replace("scale_add", "scale_add2")
    with pytest.raises(ValueError, match="no kernel named"):
        prism.Kernel(longer, "scale_add", [2.0, -1.0])
    prism.Kernel(longer, "scale_add2", [2.0, -1.0])
    # nvcc's pointer annotations are read past.
    annotated = PTX.replace(".param .u64 scale_add_param_0", ".param .u64 .ptr .global .align 4 scale_add_param_0")
    prism.Kernel(annotated, "scale_add", [2.0, -1.0])


def test_kernel_has_no_host_form():
    p = prism.Pipeline(backend="host")
    p.add_stage(prism.Kernel(PTX, "scale_add", [2.0, -1.0]))
    with pytest.raises(prism.UnsupportedError) as e:
        p.run(np.ones(8, dtype=np.float32))
    assert e.value.stage == "scale_add"


@pytest.mark.parametrize("graphs", [False, True])
def test_gpu_kernel_stage_matches_the_reference(rng, graphs):
    p = gpu_pipeline(1 << 20, graphs=graphs)
    p.add_stage(prism.Kernel(PTX, "scale_add", [2.0, -1.0], elementwise=True, block=128))
    p.add_stage(prism.Clamp(lo=-3.0, hi=3.0))
    x = rng.standard_normal((3 << 20) + 7).astype(np.float32)
    want = clamp_ref(fma_chain_ref(x, 2.0, -1.0, 1), -3.0, 3.0)
    assert_bits_equal(p.run(x), want)
    assert_bits_equal(p.run(p.to_device(x)).numpy(), want)  # device run
    items = [x[:5], x[5:70000], x[70000:70001]]
    got = list(p.run_stream(items))
    assert_bits_equal(np.concatenate(got), want[:70001])


def test_gpu_kernel_in_a_graph(rng):
    p = gpu_pipeline(1 << 20)
    g = prism.Graph()
    a = g.stage(g.input, prism.Kernel(PTX, "scale_add", [0.5, 0.25]))
    b = g.stage(g.input, prism.Clamp(lo=0.0, hi=1.0))
    g.output(a)
    g.output(b)
    x = rng.standard_normal(1 << 20).astype(np.float32)
    ya, yb = p.run_graph(g, x)
    assert_bits_equal(ya, fma_chain_ref(x, 0.5, 0.25, 1))
    assert_bits_equal(yb, clamp_ref(x, 0.0, 1.0))
