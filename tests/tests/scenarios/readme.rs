//! README.md's "Example", as written there, on random
//! data (a quarter of the README's 1 << 24 elements, plus an odd tail), on
//! `Backend::Host` and on `Backend::Auto`. Both run anywhere: `Auto` takes
//! GPU 0 where there is one (and must, under `PRISM_REQUIRE_GPU=1`), else
//! the host.

use prism_pipeline::{Backend, BackendKind, Fma, PipelineConfig, PipelineStageManager};
use prism_stream::{fma_chain_cpu, PinnedBuffer};
use prism_testing::{gpu_required, random_f32, scaled};
use prism_tests::assert_same_bits;

const STAGE: Fma = Fma {
    a: 2.0,
    b: 1.0,
    iters: 1,
};

/// The README's code with `backend` and `input`; returns the manager and
/// the output.
fn readme_example(
    backend: Backend,
    input: &[f32],
) -> Result<(PipelineStageManager<f32>, Vec<f32>), prism_pipeline::Error> {
    let mut p = PipelineStageManager::<f32>::new(backend, PipelineConfig::default())?;
    p.add_stage(Fma {
        a: 2.0,
        b: 1.0,
        iters: 1,
    }); // y = fma(x, 2, 1)
    let mut output = vec![0.0; p.total_output_len(input.len())];
    p.run(input, &mut output)?; // pageable slices; run_pinned takes PinnedBuffers
    println!("{}", p.get_stats()); // backend, per-step times, bound, overlap efficiency
    Ok((p, output))
}

fn reference(input: &[f32]) -> Vec<f32> {
    input
        .iter()
        .map(|&x| fma_chain_cpu(x, STAGE.a, STAGE.b, STAGE.iters))
        .collect()
}

fn input() -> Vec<f32> {
    random_f32(0x2EAD, scaled((1 << 22) + 3, (1 << 14) + 3))
}

#[test]
fn readme_example_on_host_matches_cpu() {
    let input = input();
    let (p, output) = readme_example(Backend::Host, &input).unwrap();
    assert_eq!(p.backend(), BackendKind::Host);
    assert_same_bits("README example, host", &output, &reference(&input));
    let stats = p.get_stats();
    assert_eq!(stats.runs, 1);
    // 16 MiB chunks (PipelineConfig::default()), no ramp on the host.
    let chunk = PipelineConfig::default().chunk_bytes / 4;
    assert_eq!(stats.chunks, input.len().div_ceil(chunk) as u64);
    assert_eq!(stats.bytes_in, (input.len() * 4) as u64);
    assert!(stats.to_string().contains("host backend"), "{stats}");
}

#[test]
fn readme_example_on_auto_matches_cpu() {
    let input = input();
    let want = reference(&input);
    let (mut p, output) = readme_example(Backend::Auto, &input).unwrap();
    if gpu_required() {
        assert_eq!(
            p.backend(),
            BackendKind::Gpu,
            "PRISM_REQUIRE_GPU=1, but Backend::Auto chose the host"
        );
    }
    println!("Backend::Auto chose {}", p.backend());
    assert_same_bits("README example, Backend::Auto", &output, &want);

    // The README's next step on a GPU: a Vec page-locked in place,
    // streamed with run_pinned, and handed back.
    let Some(gpu) = p.gpu().cloned() else {
        return;
    };
    let pinned_in = PinnedBuffer::register(&gpu, input.clone()).unwrap();
    let mut pinned_out = PinnedBuffer::register(&gpu, vec![f32::NAN; want.len()]).unwrap();
    p.run_pinned(&pinned_in, &mut pinned_out).unwrap();
    let output = pinned_out.into_vec().unwrap();
    assert_same_bits("README example, run_pinned", &output, &want);
    let handed_back = pinned_in.into_vec().unwrap();
    assert_same_bits("registered input, handed back", &handed_back, &input);
}
