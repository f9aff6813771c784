//! A kernel fault on one GPU of a multi-GPU run (its own test binary: the
//! fault kills that GPU's primary context for the rest of the process).

use prism_pipeline::{Error, Fma, GpuFn, MultiGpuPipeline, PipelineConfig};
use prism_stream::{fma_chain_cpu, Gpu};
use prism_testing::{gpu_or_skip, random_f32, scaled};

#[test]
fn gpu_multi_fault_injection_on_one_gpu_is_named_and_nothing_hangs() {
    let test = "gpu_multi_fault_injection_on_one_gpu_is_named_and_nothing_hangs";
    if gpu_or_skip(test).is_none() {
        return;
    }
    let count = prism_stream::device_count().unwrap();
    if count < 2 {
        eprintln!("SKIPPED {test}: needs 2 GPUs, this machine has {count}");
        return;
    }
    let last = count - 1;
    let config = PipelineConfig {
        chunk_bytes: scaled(1 << 20, 1 << 12),
        ..PipelineConfig::default()
    };
    let n = scaled(16 << 20, 1 << 15);
    let input = random_f32(31, n);
    let mut p =
        MultiGpuPipeline::<f32>::new(prism_pipeline::Backend::AllGpus, config.clone()).unwrap();
    p.add_stage_with(|gpu| {
        let faults = gpu.info().ordinal == last;
        let mut calls = 0u32;
        GpuFn::new(
            "faults on its third chunk",
            true,
            move |launch, x, y, len| {
                calls += 1;
                if faults && calls == 3 {
                    launch.fault_injection()?;
                }
                launch.fma_chain(x, y, len, 1.5, 0.25, 2)?;
                Ok(())
            },
        )
    });
    let mut out = vec![0f32; n];
    let started = std::time::Instant::now();
    let e = p.run(&input, &mut out).unwrap_err();
    println!("{e}");
    assert!(
        started.elapsed().as_secs() < 60,
        "the run took too long to stop"
    );
    match &e {
        Error::Device { ordinal, chunk, .. } => {
            assert_eq!(*ordinal, last);
            assert!(chunk.is_some(), "the error names no chunk: {e}");
        }
        other => panic!("expected a Device error, got {other:?}"),
    }
    drop(p);
    // The faulted GPU says it is unusable.
    assert!(matches!(
        Gpu::open(last),
        Err(prism_stream::Error::ContextPoisoned { .. })
    ));
    // The other GPUs: each either works and gives the right answer, or
    // says (typed) that it is unusable too; which one is the driver's
    // choice, so both are reported. A fresh private context on GPU 0 tells
    // a fault confined to contexts from one that reached the device.
    let want: Vec<f32> = input
        .iter()
        .map(|&x| fma_chain_cpu(x, 1.5, 0.25, 2))
        .collect();
    let check = |what: &str, gpu: prism_stream::Result<Gpu>| {
        let gpu = match gpu {
            Ok(g) => g,
            Err(e) => {
                println!("after the fault on GPU {last}: {what}: {e}");
                assert!(
                    matches!(e, prism_stream::Error::ContextPoisoned { .. }),
                    "{e:?}"
                );
                return;
            }
        };
        let mut q = MultiGpuPipeline::<f32>::with_gpus(&[gpu], config.clone()).unwrap();
        q.add_stage(Fma {
            a: 1.5,
            b: 0.25,
            iters: 2,
        });
        let mut out = vec![0f32; n];
        match q.run(&input, &mut out) {
            Ok(()) => {
                let bad = out
                    .iter()
                    .zip(&want)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                assert!(
                    bad.is_none(),
                    "{what}: element {} differs",
                    bad.unwrap_or(0)
                );
                println!("after the fault on GPU {last}: {what}: runs and matches the CPU");
            }
            Err(e) => {
                println!("after the fault on GPU {last}: {what}: the run fails: {e}");
                assert!(e.to_string().contains("unusable"), "{e:?}");
            }
        }
    };
    for o in 0..last {
        check(&format!("GPU {o} (primary context)"), Gpu::open(o));
        check(
            &format!("GPU {o} (a new private context)"),
            Gpu::open_private(o),
        );
    }
}
