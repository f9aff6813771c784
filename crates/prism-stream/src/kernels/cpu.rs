//! CPU references of prism's kernels, computed the same way, so GPU
//! results can be compared with them bit for bit.

/// The CPU twin of the GPU fill/check pattern (see kernels/prism_kernels.h).
pub fn pattern(seed: u32, i: u64) -> u32 {
    let mut h = (i as u32) ^ ((i >> 32) as u32).wrapping_mul(0x9E37_79B9) ^ seed;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^= h >> 16;
    h
}

/// CPU reference of the fma chain kernel (same operation order, so results match bit for bit).
pub fn fma_chain_cpu(x: f32, a: f32, b: f32, iters: u32) -> f32 {
    let mut v = x;
    for _ in 0..iters {
        v = v.mul_add(a, b);
    }
    v
}
