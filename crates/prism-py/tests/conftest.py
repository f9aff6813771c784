"""NumPy references of prism's built-in stages, bit for bit, and helpers."""

from __future__ import annotations

import os

import numpy as np
import pytest

import prism


def fma_f32(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """``fma(x, a, b)`` in float32 with one rounding, as prism's stages
    (``f32::mul_add`` on the host, ``fmaf`` on the GPU), for float32 ``x``.

    NumPy has no fused multiply-add. The product of two float32 values is
    exact in float64; the float64 sum ``p + b`` is rounded once more, so
    rounding it to float32 afterwards could round twice. Instead the sum is
    rounded to odd (its exact error from TwoSum moves an even result one
    ulp towards the exact value): with 53 >= 24 + 2 bits, rounding that to
    float32 is the correctly rounded fma (Boldo & Melquiond, "Emulation of
    FMA and correctly rounded sums: proved algorithms using rounding to
    odd", IEEE TC 2008). ``test_fma_reference_is_correctly_rounded`` checks
    this against exact rational arithmetic.
    """
    p = x.astype(np.float64) * np.float64(np.float32(a))  # exact
    b64 = np.float64(np.float32(b))
    s = p + b64
    with np.errstate(invalid="ignore"):
        bb = s - p
        err = (p - (s - bb)) + (b64 - bb)  # s + err == p + b exactly
        inexact = np.isfinite(s) & np.isfinite(err) & (err != 0)
    even = (s.view(np.int64) & 1) == 0
    towards = np.where(err > 0, np.inf, -np.inf)
    s = np.where(inexact & even, np.nextafter(s, towards), s)
    return s.astype(np.float32)


def fma_chain_ref(x: np.ndarray, a: float, b: float, iters: int) -> np.ndarray:
    """prism's ``Fma(a, b, iters)``: ``iters`` steps of ``y = fma(y, a, b)``."""
    y = np.asarray(x, dtype=np.float32).copy()
    for _ in range(iters):
        y = fma_f32(y, a, b)
    return y


def clamp_ref(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """prism's ``Clamp(lo, hi)``: ``fminf(fmaxf(x, lo), hi)`` (NaN-ignoring)."""
    return np.fmin(np.fmax(x, np.float32(lo)), np.float32(hi)).astype(np.float32)


def group_sum_ref(x: np.ndarray, group: int, chunk: int) -> np.ndarray:
    """prism's ``GroupSum(group)`` over chunks of ``chunk`` elements: each
    group summed from 0.0, one element after another, in float32; groups
    never span chunks."""
    outs = []
    for start in range(0, len(x), chunk):
        c = x[start : start + chunk]
        groups = -(-len(c) // group)
        padded = np.zeros(groups * group, dtype=np.float32)
        padded[: len(c)] = c  # +0.0 padding leaves a sum from +0.0 unchanged
        m = padded.reshape(groups, group)
        acc = np.zeros(groups, dtype=np.float32)
        for j in range(group):
            acc = acc + m[:, j]  # float32 + float32: one float32 rounding
        outs.append(acc)
    return np.concatenate(outs) if outs else np.zeros(0, dtype=np.float32)


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    """Same dtype, length and bits (finite data: no NaN payload questions)."""
    assert got.dtype == np.float32 and want.dtype == np.float32
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = np.flatnonzero(got.view(np.int32) != want.view(np.int32))
    assert diff.size == 0, (
        f"{diff.size} of {got.size} elements differ; first at {diff[0]}: "
        f"got {got[diff[0]]!r}, want {want[diff[0]]!r}"
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(24)


def host_pipeline(chunk_elems: int = 1000, **kwargs) -> prism.Pipeline:
    """A host-backend pipeline of ``chunk_elems`` float32 per chunk."""
    kwargs.setdefault("host_threads", 2)
    return prism.Pipeline(backend="host", chunk_bytes=4 * chunk_elems, **kwargs)


def gpu_pipeline(chunk_bytes: int, **kwargs) -> prism.Pipeline:
    """A GPU pipeline, or a skip (a failure with PRISM_REQUIRE_GPU=1)."""
    try:
        p = prism.Pipeline(backend="gpu", chunk_bytes=chunk_bytes, **kwargs)
    except prism.NoDeviceError as e:
        if os.environ.get("PRISM_REQUIRE_GPU") == "1":
            raise
        pytest.skip(f"no GPU: {e}")
    assert p.backend == "gpu"
    return p
