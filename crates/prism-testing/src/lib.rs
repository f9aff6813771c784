//! prism's test conventions, for the workspace's own tests, examples and
//! benchmark (a dev-dependency; not part of the library's API). Depending
//! on it turns on prism-stream's `fault-injection` feature.
//!
//! A GPU test starts with `let Some(ctx) = prism_testing::gpu_or_skip("name") else { return };`
//! (and names itself `gpu_*`). Without a driver or device it prints
//! `SKIPPED <name>: <reason>` and returns, so `cargo test` passes on machines
//! without a GPU and says why. With `PRISM_REQUIRE_GPU=1` (set by
//! `cargo xtask gpu-test` and the bundle's run.sh) a missing GPU is a failure
//! instead, so a GPU run cannot pass by skipping.

use rand::{RngExt, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use prism_stream::{Error, ManagedGpuContext};

/// Environment variable that turns skips into failures.
pub const REQUIRE_GPU_VAR: &str = "PRISM_REQUIRE_GPU";

/// True when GPU tests must not skip.
pub fn gpu_required() -> bool {
    std::env::var(REQUIRE_GPU_VAR).is_ok_and(|v| v == "1")
}

/// Opens GPU 0 with streams, or reports the test skipped (see module docs).
pub fn gpu_or_skip(test: &str) -> Option<ManagedGpuContext> {
    match ManagedGpuContext::new(0, true) {
        Ok(ctx) => Some(ctx),
        Err(e @ (Error::DriverNotFound | Error::NoDevice)) => {
            assert!(
                !gpu_required(),
                "{test}: {REQUIRE_GPU_VAR}=1 but no GPU is usable: {e}"
            );
            eprintln!("SKIPPED {test}: {e}");
            None
        }
        Err(e) => panic!("{test}: opening GPU 0 failed: {e}"),
    }
}

/// Scale factor for GPU test sizes: `PRISM_TEST_SCALE=small` (used under
/// compute-sanitizer, which is ~100x slower) shrinks them.
pub fn scaled(full: usize, small: usize) -> usize {
    if std::env::var("PRISM_TEST_SCALE").is_ok_and(|v| v == "small") {
        small
    } else {
        full
    }
}

/// Deterministic random f32 in [-1, 1) from a seed, for test data: `rand`'s
/// uniform f32 in [0, 1) (24 random bits) scaled to [-1, 1), from a
/// `Xoshiro256PlusPlus` seeded with `seed` (`rand_xoshiro`, whose output
/// for a seed is fixed across releases), so a seed gives the same data on
/// every machine and every run.
pub fn random_f32(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    // Exact: x is a multiple of 2^-24 below 1, so 2x - 1 is representable.
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// True under compute-sanitizer (the bundle sets `PRISM_UNDER_SANITIZER=1`),
/// which serialises GPU work: tests skip assertions about concurrency then,
/// and check only correctness.
pub fn under_sanitizer() -> bool {
    std::env::var("PRISM_UNDER_SANITIZER").is_ok_and(|v| v == "1")
}

/// The bits of each value, for comparisons that tell `-0.0` from `0.0` and
/// one NaN from another (what "bit for bit" means in prism's tests).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// How long a test's spin kernel keeps a use pending: long enough that
/// unordered work would visibly overtake it (50 ms), short under
/// compute-sanitizer (2 ms), which serialises everything anyway.
pub fn spin_ns() -> u64 {
    if under_sanitizer() {
        2_000_000
    } else {
        50_000_000
    }
}

#[cfg(test)]
mod tests {
    use super::random_f32;

    #[test]
    fn random_f32_is_deterministic_and_in_range() {
        let a = random_f32(7, 10_000);
        assert_eq!(a, random_f32(7, 10_000));
        assert_ne!(a, random_f32(8, 10_000));
        assert!(a.iter().all(|x| (-1.0..1.0).contains(x)));
        // Both halves of the range are used.
        assert!(a.iter().any(|&x| x < -0.9) && a.iter().any(|&x| x > 0.9));
        // A prefix does not depend on the length asked for.
        assert_eq!(random_f32(7, 10)[..], a[..10]);
    }
}
