//! `MultiGpuPipeline` over every GPU of the machine (one GPU is enough: the
//! multi-GPU path then runs over it alone): prism's stages and a user's
//! own (made per GPU by `add_stage_with`), through `run`, `run_pinned`
//! (portable buffers) and `run_stream`, each output compared bit for bit
//! with the CPU, in input order.

use prism_pipeline::PipelineConfig;
use prism_pipeline::{from_iter, sink_fn, Backend, BoxError, Clamp, Fma, MultiGpuPipeline};
use prism_stream::{device_count, fma_chain_cpu, HostAllocFlags, PinnedBuffer};
use prism_testing::{gpu_or_skip, random_f32, scaled, under_sanitizer};
use prism_tests::{assert_same_bits, clamp_cpu, ScaledGroupSum};

const FMA: Fma = Fma {
    a: 0.999,
    b: 0.125,
    iters: 4,
};
const CLAMP: Clamp = Clamp { lo: -2.0, hi: 2.0 };
const SUMS: ScaledGroupSum = ScaledGroupSum {
    group: 32,
    scale: 0.03125,
    offset: -0.125,
};

#[test]
fn gpu_multi_gpu_pipeline_over_every_gpu_matches_cpu() {
    let Some(_ctx) = gpu_or_skip("gpu_multi_gpu_pipeline_over_every_gpu_matches_cpu") else {
        return;
    };
    let gpus = device_count().unwrap();
    let chunk = scaled(1 << 20, 1 << 12) + 16; // not a multiple of the group
    let n = scaled(24 << 20, 1 << 16) + 7;
    let config = PipelineConfig {
        chunk_bytes: chunk * 4,
        ..PipelineConfig::default()
    };
    let mut p = MultiGpuPipeline::<f32>::new(Backend::AllGpus, config).unwrap();
    assert_eq!(p.gpus().len(), gpus, "Backend::AllGpus takes every GPU");
    p.add_stage(FMA);
    p.add_stage_with(|_gpu| SUMS);
    p.add_stage(CLAMP);

    let input = random_f32(0x3A17, n);
    let fma: Vec<f32> = input
        .iter()
        .map(|&x| fma_chain_cpu(x, FMA.a, FMA.b, FMA.iters))
        .collect();
    let want: Vec<f32> = SUMS
        .reference(&fma, chunk)
        .into_iter()
        .map(|s| clamp_cpu(s, CLAMP.lo, CLAMP.hi))
        .collect();
    assert_eq!(p.total_output_len(n), want.len());
    let chunks = n.div_ceil(chunk) as u64;
    let spread = |p: &MultiGpuPipeline<f32>, what: &str| {
        let per = p.get_stats().chunks_per_gpu();
        println!("{what}: chunks per GPU {per:?}");
        assert_eq!(per.len(), gpus, "{what}: one count per GPU");
        assert_eq!(per.iter().sum::<u64>(), chunks, "{what}: chunks");
        if gpus > 1 && !under_sanitizer() {
            assert!(per.iter().all(|&c| c > 0), "{what}: a GPU took no chunk");
        }
    };

    let mut out = vec![f32::NAN; want.len()];
    p.run(&input, &mut out).unwrap();
    assert_same_bits("multi-GPU run", &out, &want);
    spread(&p, "run");
    println!("{}", p.get_stats());

    p.reset_stats();
    let gpu0 = p.gpus()[0].clone();
    let src = PinnedBuffer::from_slice(&gpu0, &input, HostAllocFlags::PORTABLE).unwrap();
    let mut dst = PinnedBuffer::<f32>::new(&gpu0, want.len(), HostAllocFlags::PORTABLE).unwrap();
    p.run_pinned(&src, &mut dst).unwrap();
    assert_same_bits("multi-GPU run_pinned", dst.wait_slice().unwrap(), &want);
    spread(&p, "run_pinned");

    p.reset_stats();
    let mut got = Vec::with_capacity(want.len());
    let mut next = 0;
    let counts = p
        .run_stream(
            from_iter(input.chunks(100_003)),
            sink_fn(|k, out: &[f32]| {
                assert_eq!(k, next, "multi-GPU run_stream: chunks out of order");
                next += 1;
                got.extend_from_slice(out);
                Ok::<_, BoxError>(())
            }),
        )
        .unwrap();
    assert_eq!(counts.chunks, chunks);
    assert_same_bits("multi-GPU run_stream", &got, &want);
    spread(&p, "run_stream");
}
