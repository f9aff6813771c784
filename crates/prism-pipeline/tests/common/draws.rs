//! Seeded random draws for the randomized differential tests: proptest's
//! seedable generator (ChaCha) and the few draws they use, so a seed
//! replays the same configuration on every machine.

use proptest::prelude::Rng;
use proptest::test_runner::{RngAlgorithm, TestRng};

/// The draws the generators use.
pub trait Draw {
    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64;
    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool;
    /// Uniform in `lo..hi`.
    fn float(&mut self, lo: f32, hi: f32) -> f32;
}

impl Draw for TestRng {
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn float(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u32() >> 8) as f32 / (1u32 << 24) as f32)
    }
}

/// The generator of `seed`; `salt` keeps two tests' seeds apart.
pub fn rng(seed: u64, salt: u8) -> TestRng {
    let mut bytes = [0u8; 32];
    for (i, b) in seed.to_le_bytes().iter().enumerate() {
        bytes[i] = *b;
        bytes[31 - i] = b.wrapping_mul(salt);
    }
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

/// A random size in `lo..=hi`, spread evenly over the orders of magnitude.
pub fn log_size(r: &mut TestRng, lo: usize, hi: usize) -> usize {
    let (l, h) = ((lo.max(1) as f64).ln(), (hi.max(1) as f64).ln());
    let v = (l + (h - l) * r.float(0.0, 1.0) as f64).exp() as usize;
    v.clamp(lo, hi)
}
