//! A user's own stage (`prism_tests::ScaledGroupSum`: both forms, shrinks
//! the data, not elementwise) between two of prism's, on the host backend
//! (runs anywhere) and on the GPU (gated). Pageable `run` and `run_stream`
//! from uneven slices, each output compared bit for bit with the CPU.

use prism_pipeline::{
    from_iter, sink_fn, Backend, BackendKind, BoxError, Clamp, Fma, PipelineConfig,
    PipelineStageManager,
};
use prism_stream::fma_chain_cpu;
use prism_testing::{gpu_or_skip, random_f32, scaled};
use prism_tests::{assert_same_bits, clamp_cpu, ScaledGroupSum};

const FMA: Fma = Fma {
    a: 1.5,
    b: -0.25,
    iters: 2,
};
const SUMS: ScaledGroupSum = ScaledGroupSum {
    group: 16,
    scale: 0.0625,
    offset: 0.5,
};
const CLAMP: Clamp = Clamp {
    lo: -0.75,
    hi: 0.75,
};

/// Chunks of 1000 elements: not a multiple of the group, so every chunk
/// ends with a short group.
const CHUNK: usize = 1000;

fn config() -> PipelineConfig {
    PipelineConfig {
        chunk_bytes: CHUNK * 4,
        ..PipelineConfig::default()
    }
}

/// Fma → ScaledGroupSum → Clamp on the CPU, chunk by chunk.
fn reference(input: &[f32]) -> Vec<f32> {
    let fma: Vec<f32> = input
        .iter()
        .map(|&x| fma_chain_cpu(x, FMA.a, FMA.b, FMA.iters))
        .collect();
    SUMS.reference(&fma, CHUNK)
        .into_iter()
        .map(|s| clamp_cpu(s, CLAMP.lo, CLAMP.hi))
        .collect()
}

/// Adds the stages to `p`, runs `run` and `run_stream` over `n` random
/// elements and compares both with the CPU.
fn check_custom_stage(p: &mut PipelineStageManager<f32>, n: usize, what: &str) {
    p.add_stage(FMA);
    p.add_stage(SUMS);
    p.add_stage(CLAMP);
    let input = random_f32(0xC057, n);
    let want = reference(&input);
    assert_eq!(
        p.total_output_len(n),
        want.len(),
        "{what}: total_output_len"
    );

    let mut out = vec![f32::NAN; want.len()];
    p.run(&input, &mut out).unwrap();
    assert_same_bits(&format!("{what}: run"), &out, &want);
    assert_eq!(p.get_stats().chunks, n.div_ceil(CHUNK) as u64);
    println!("{}", p.get_stats());

    // Uneven slices, packed into full chunks; outputs arrive in order.
    let mut got = Vec::with_capacity(want.len());
    let mut next = 0;
    let counts = p
        .run_stream(
            from_iter(input.chunks(777)),
            sink_fn(|k, out: &[f32]| {
                assert_eq!(k, next, "{what}: chunks out of order");
                next += 1;
                got.extend_from_slice(out);
                Ok::<_, BoxError>(())
            }),
        )
        .unwrap();
    assert_eq!(counts.chunks, n.div_ceil(CHUNK) as u64);
    assert_same_bits(&format!("{what}: run_stream"), &got, &want);
}

#[test]
fn custom_stage_on_host_matches_cpu() {
    let mut p = PipelineStageManager::<f32>::new(Backend::Host, config()).unwrap();
    assert_eq!(p.backend(), BackendKind::Host);
    check_custom_stage(&mut p, 100_003, "host");
}

#[test]
fn gpu_custom_stage_matches_cpu() {
    let Some(_ctx) = gpu_or_skip("gpu_custom_stage_matches_cpu") else {
        return;
    };
    let mut p = PipelineStageManager::<f32>::new(Backend::Gpu, config()).unwrap();
    assert_eq!(p.backend(), BackendKind::Gpu);
    check_custom_stage(&mut p, scaled(4_000_003, 20_003), "GPU");
}
