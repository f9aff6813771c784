"""The NumPy references themselves: the fma emulation is correctly rounded,
and the tests built on it can tell a fused from an unfused multiply-add."""

from fractions import Fraction

import numpy as np

from conftest import fma_f32


def _correctly_rounded(exact: Fraction, r: np.float32) -> bool:
    """``r`` is the float32 nearest ``exact`` (ties to even)."""
    down = np.nextafter(r, np.float32(-np.inf))
    up = np.nextafter(r, np.float32(np.inf))
    d = abs(exact - Fraction(float(r)))
    for n in (down, up):
        if not np.isfinite(n):
            continue
        dn = abs(exact - Fraction(float(n)))
        if dn < d:
            return False
        if dn == d and (int(np.float32(r).view(np.int32)) & 1):
            return False  # a tie must go to the even neighbour
    return True


def test_fma_reference_is_correctly_rounded(rng):
    n = 3000
    x = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    a = np.float32(0.7071067811865476)
    b = np.float32(-1.2345678)
    got = fma_f32(x, a, b)
    for xi, gi in zip(x, got):
        exact = Fraction(float(xi)) * Fraction(float(a)) + Fraction(float(b))
        assert _correctly_rounded(exact, gi), (xi, gi)


def test_fma_reference_differs_from_an_unfused_multiply_add(rng):
    # Values where the product's low bits matter: one rounding (fused)
    # and two (x*a, then +b, each in float32) must disagree somewhere,
    # or the bit-for-bit comparisons could not catch an unfused stage.
    x = rng.uniform(-4, 4, 100_000).astype(np.float32)
    a, b = np.float32(1.0000001), np.float32(-0.3333333)
    fused = fma_f32(x, a, b)
    unfused = (x * a + b).astype(np.float32)
    assert np.count_nonzero(fused != unfused) > 0
