//! A stage whose kernel faults: the run returns an error instead of hanging.
//! Its own binary (the fault poisons the process's CUDA context); the bundle
//! keeps it out of compute-sanitizer (name: fault_injection).

use prism_pipeline::{Fma, GpuFn, GpuPipelineExt, PipelineConfig};
use prism_testing::{gpu_or_skip, random_f32};

#[test]
fn gpu_fault_injection_in_a_stage_is_an_error_not_a_hang() {
    let Some(ctx) = gpu_or_skip("gpu_fault_injection_in_a_stage_is_an_error_not_a_hang") else {
        return;
    };
    let config = PipelineConfig {
        chunk_bytes: 4 << 12,
        ..PipelineConfig::default()
    };
    let mut p = ctx.create_pipeline_manager::<f32>(config).unwrap();
    p.add_stage(Fma {
        a: 1.0,
        b: 1.0,
        iters: 1,
    });
    p.add_stage(GpuFn::new(
        "faulting",
        true,
        |l: &mut prism_stream::Launch<'_>,
         _: &prism_stream::DeviceBuffer<f32>,
         _: &mut prism_stream::DeviceBuffer<f32>,
         _| { Ok(l.fault_injection()?) },
    ));
    let input = random_f32(1, 10 << 12);
    let mut out = vec![0.0; input.len()];
    let t = std::time::Instant::now();
    let err = p.run(&input, &mut out).unwrap_err();
    eprintln!("fault reported as: {err}");
    assert!(
        err.to_string().to_lowercase().contains("illegal"),
        "unexpected error: {err}"
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(30));
    // The context is unusable now, and says so instead of hanging.
    assert!(p.run(&input, &mut out).is_err());
}
