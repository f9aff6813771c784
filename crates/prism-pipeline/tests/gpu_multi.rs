//! GPU-gated tests of the multi-GPU pipeline. Without a GPU each prints
//! SKIPPED; tests that need two GPUs print SKIPPED on a one-GPU machine
//! (where the others run the multi-GPU path over GPU 0 alone).

use prism_pipeline::{
    Backend, Clamp, Error, Fma, GpuFn, GroupSum, MultiGpuPipeline, PipelineConfig,
    PipelineStageManager, StageError,
};
use prism_stream::{fma_chain_cpu, Gpu, HostAllocFlags, PinnedBuffer};
use prism_testing::{gpu_or_skip, random_f32, scaled, under_sanitizer};

const FMA: Fma = Fma {
    a: 1.25,
    b: -0.5,
    iters: 3,
};
const CLAMP: Clamp = Clamp { lo: -1.0, hi: 1.0 };

fn config(chunk_elems: usize) -> PipelineConfig {
    PipelineConfig {
        chunk_bytes: chunk_elems * 4,
        ..PipelineConfig::default()
    }
}

/// Every GPU, or `None` (SKIPPED) with fewer than `min`.
fn gpus_or_skip(test: &str, min: usize) -> Option<Vec<Gpu>> {
    gpu_or_skip(test)?;
    let n = prism_stream::device_count().unwrap();
    if n < min {
        eprintln!("SKIPPED {test}: needs {min} GPUs, this machine has {n}");
        return None;
    }
    Some((0..n).map(|o| Gpu::open(o).unwrap()).collect())
}

fn reference(x: f32) -> f32 {
    fma_chain_cpu(x, FMA.a, FMA.b, FMA.iters).clamp(CLAMP.lo, CLAMP.hi)
}

fn expect_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad = got
        .iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    assert!(
        bad.is_none(),
        "{what}: element {} differs",
        bad.unwrap_or(0)
    );
}

fn multi(gpus: &[Gpu], chunk: usize) -> MultiGpuPipeline<f32> {
    let mut p = MultiGpuPipeline::with_gpus(gpus, config(chunk)).unwrap();
    p.add_stage(FMA);
    p.add_stage(CLAMP);
    p
}

/// Every input mode over every GPU, each output compared bit for bit with
/// the CPU reference, in input order.
#[test]
fn gpu_multi_every_mode_matches_cpu_in_order() {
    let Some(gpus) = gpus_or_skip("gpu_multi_every_mode_matches_cpu_in_order", 1) else {
        return;
    };
    let n = scaled(32 << 20, 1 << 15) + 17;
    let chunk = scaled(1 << 20, 1 << 11);
    let input = random_f32(21, n);
    let want: Vec<f32> = input.iter().map(|&x| reference(x)).collect();
    let mut p = multi(&gpus, chunk);
    let spread = |p: &MultiGpuPipeline<f32>, what: &str| {
        let per = p.get_stats().chunks_per_gpu();
        println!("{what}: chunks per GPU {per:?}");
        if gpus.len() > 1 && !under_sanitizer() {
            assert!(
                per.iter().all(|&c| c > 0),
                "{what}: a GPU took no chunk: {per:?}"
            );
        }
    };

    // Pageable.
    let mut out = vec![f32::NAN; n];
    p.run(&input, &mut out).unwrap();
    expect_bits("run", &out, &want);
    println!("{}", p.get_stats());
    assert_eq!(p.get_stats().chunks, n.div_ceil(chunk) as u64);
    spread(&p, "run");

    // Pinned, portable.
    p.reset_stats();
    let src = PinnedBuffer::from_slice(&gpus[0], &input, HostAllocFlags::PORTABLE).unwrap();
    let mut dst = PinnedBuffer::<f32>::new(&gpus[0], n, HostAllocFlags::PORTABLE).unwrap();
    p.run_pinned(&src, &mut dst).unwrap();
    expect_bits("run_pinned", dst.wait_slice().unwrap(), &want);
    spread(&p, "run_pinned");
    // Again into the same buffers (every GPU's earlier uses are tracked).
    p.run_pinned(&src, &mut dst).unwrap();
    expect_bits("run_pinned again", dst.wait_slice().unwrap(), &want);

    // Items of random lengths, each into its own output.
    let mut lens = Vec::new();
    let mut at = 0;
    let mut k = 0usize;
    while at < n {
        let len = (1 + (k * 7919) % chunk).min(n - at);
        lens.push(len);
        at += len;
        k += 1;
    }
    let mut outs: Vec<Vec<f32>> = lens.iter().map(|&l| vec![f32::NAN; l]).collect();
    let mut ins = Vec::new();
    let mut at = 0;
    for &l in &lens {
        ins.push(&input[at..at + l]);
        at += l;
    }
    let count = p
        .run_items(
            ins.iter()
                .copied()
                .zip(outs.iter_mut().map(|o| o.as_mut_slice())),
        )
        .unwrap();
    assert_eq!(count, lens.len() as u64);
    expect_bits("run_items", &outs.concat(), &want);

    // A stream: the sink must see chunks 0, 1, 2, ... in order.
    let mut fed = 0usize;
    let source = prism_pipeline::fill_with(|dst: &mut [f32]| {
        let len = dst.len().min(n - fed);
        dst[..len].copy_from_slice(&input[fed..fed + len]);
        fed += len;
        Ok::<_, std::convert::Infallible>(len)
    });
    let mut got = Vec::with_capacity(n);
    let mut next = 0u64;
    let sink = prism_pipeline::sink_fn(|index: u64, data: &[f32]| {
        assert_eq!(index, next, "chunk out of order");
        next += 1;
        got.extend_from_slice(data);
        Ok::<_, std::convert::Infallible>(())
    });
    let counts = p.run_stream(source, sink).unwrap();
    expect_bits("run_stream", &got, &want);
    assert_eq!(counts.chunks, n.div_ceil(chunk) as u64);
    assert_eq!(counts.elements_out, n as u64);
    spread(&p, "all modes");
}

/// A stage that changes the length and sees chunk boundaries: outputs by
/// position, whatever GPU made them.
#[test]
fn gpu_multi_group_sums_land_in_place() {
    let Some(gpus) = gpus_or_skip("gpu_multi_group_sums_land_in_place", 1) else {
        return;
    };
    let n = scaled(16 << 20, 1 << 14) + 5;
    let chunk = scaled(1 << 19, 1 << 10);
    let input = random_f32(22, n);
    let mut p = MultiGpuPipeline::<f32>::with_gpus(&gpus, config(chunk)).unwrap();
    p.add_stage(Clamp { lo: -0.5, hi: 0.5 });
    p.add_stage(GroupSum { group: 8 });
    let mut want = Vec::new();
    for c in input.chunks(chunk) {
        for g in c.chunks(8) {
            want.push(g.iter().fold(0.0f32, |acc, v| acc + v.clamp(-0.5, 0.5)));
        }
    }
    let mut out = vec![f32::NAN; p.total_output_len(n)];
    p.run(&input, &mut out).unwrap();
    expect_bits("group sums (pageable)", &out, &want);
    let src = PinnedBuffer::from_slice(&gpus[0], &input, HostAllocFlags::PORTABLE).unwrap();
    let mut dst =
        PinnedBuffer::<f32>::new(&gpus[0], p.total_output_len(n), HostAllocFlags::PORTABLE)
            .unwrap();
    p.run_pinned(&src, &mut dst).unwrap();
    expect_bits("group sums (pinned)", dst.wait_slice().unwrap(), &want);
    let mut short = vec![0f32; 3];
    assert!(matches!(
        p.run(&input, &mut short),
        Err(Error::OutputLength { .. })
    ));
}

/// With one GPU the multi-GPU path gives the single-GPU result bit for bit.
#[test]
fn gpu_multi_one_gpu_is_bit_identical_to_the_single_gpu_manager() {
    let Some(gpus) = gpus_or_skip("gpu_multi_one_gpu_is_bit_identical", 1) else {
        return;
    };
    let n = scaled(8 << 20, 1 << 14) + 3;
    let chunk = scaled(1 << 19, 1 << 10);
    let input = random_f32(23, n);
    let mut single = PipelineStageManager::<f32>::with_gpu(&gpus[0], config(chunk)).unwrap();
    let mut one = MultiGpuPipeline::<f32>::with_ordinals(&[0], config(chunk)).unwrap();
    for s in [0, 1] {
        if s == 0 {
            single.add_stage(FMA);
            one.add_stage(FMA);
        } else {
            single.add_stage(GroupSum { group: 16 });
            one.add_stage(GroupSum { group: 16 });
        }
    }
    let m = single.total_output_len(n);
    assert_eq!(m, one.total_output_len(n));
    let (mut a, mut b) = (vec![f32::NAN; m], vec![f32::NAN; m]);
    single.run(&input, &mut a).unwrap();
    one.run(&input, &mut b).unwrap();
    expect_bits("one GPU vs single (pageable)", &b, &a);
    let src = PinnedBuffer::from_slice(&gpus[0], &input, HostAllocFlags::DEFAULT).unwrap();
    let mut da = PinnedBuffer::<f32>::new(&gpus[0], m, HostAllocFlags::DEFAULT).unwrap();
    let mut db = PinnedBuffer::<f32>::new(&gpus[0], m, HostAllocFlags::DEFAULT).unwrap();
    single.run_pinned(&src, &mut da).unwrap();
    one.run_pinned(&src, &mut db).unwrap();
    expect_bits(
        "one GPU vs single (pinned)",
        db.wait_slice().unwrap(),
        da.wait_slice().unwrap(),
    );
    assert_eq!(one.get_stats().devices.len(), 1);
    assert_eq!(one.get_stats().runs, 2);
}

/// A failing stage on one GPU: the run stops with an error naming that GPU
/// and the chunk, the other GPUs drain, nothing hangs, and a failed run
/// adds nothing to the stats.
#[test]
fn gpu_multi_a_failing_stage_names_its_gpu_and_chunk() {
    let Some(gpus) = gpus_or_skip("gpu_multi_a_failing_stage_names_its_gpu_and_chunk", 1) else {
        return;
    };
    let last = gpus.last().unwrap().info().ordinal;
    let n = scaled(8 << 20, 1 << 14);
    let chunk = scaled(1 << 18, 1 << 10);
    let input = random_f32(24, n);
    let mut p = MultiGpuPipeline::<f32>::with_gpus(&gpus, config(chunk)).unwrap();
    p.add_stage_with(|gpu| {
        let mut calls = 0u32;
        let fails = gpu.info().ordinal == last;
        GpuFn::new(
            "fails on its third chunk",
            true,
            move |launch, x, y, len| {
                calls += 1;
                if fails && calls == 3 {
                    return Err(StageError::from("injected failure"));
                }
                launch.fma_chain(x, y, len, 1.0, 0.0, 1)?;
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
        Error::Device {
            ordinal,
            chunk: Some(c),
            source,
        } => {
            assert_eq!(*ordinal, last);
            assert!(
                matches!(&**source, Error::Stage { chunk, .. } if chunk == c),
                "inner error {source}"
            );
            if gpus.len() == 1 {
                assert_eq!(*c, 2, "the third chunk of a one-GPU run");
            } else {
                assert!(*c < n.div_ceil(chunk) as u64);
            }
        }
        other => panic!("expected a Device error, got {other:?}"),
    }
    assert_eq!(p.get_stats().runs, 0, "a failed run adds nothing");
    assert!(p.get_stats().devices.iter().all(|d| d.chunks == 0));
    // Every GPU still works (a stage error is not a GPU fault).
    let mut q = multi(&gpus, chunk);
    q.run(&input, &mut out).unwrap();
    let want: Vec<f32> = input.iter().map(|&x| reference(x)).collect();
    expect_bits("after a failed run", &out, &want);
}

/// A failing sink and a failing source in a multi-GPU stream.
#[test]
fn gpu_multi_stream_source_and_sink_failures() {
    let Some(gpus) = gpus_or_skip("gpu_multi_stream_source_and_sink_failures", 1) else {
        return;
    };
    let chunk = scaled(1 << 18, 1 << 10);
    let mut p = multi(&gpus, chunk);
    // The source fails at its 6th chunk: chunks 0..5 still reach the sink, in order.
    let mut calls = 0u32;
    let source = prism_pipeline::fill_with(|dst: &mut [f32]| {
        calls += 1;
        if calls == 6 {
            return Err("source broke".to_owned());
        }
        dst.fill(calls as f32 * 0.01);
        Ok(dst.len())
    });
    let mut seen = Vec::new();
    let sink = prism_pipeline::sink_fn(|index: u64, data: &[f32]| {
        assert_eq!(
            data[0].to_bits(),
            reference((index + 1) as f32 * 0.01).to_bits()
        );
        seen.push(index);
        Ok::<_, std::convert::Infallible>(())
    });
    let e = p.run_stream(source, sink).unwrap_err();
    assert!(matches!(e, Error::Source { chunk: 5, .. }), "{e}");
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    // The sink fails on chunk 3: the run stops with an error naming a GPU and chunk 3.
    let mut fed = 0u32;
    let source = prism_pipeline::fill_with(|dst: &mut [f32]| {
        fed += 1;
        if fed > 40 {
            return Ok::<_, std::convert::Infallible>(0);
        }
        dst.fill(0.5);
        Ok(dst.len())
    });
    let sink = prism_pipeline::sink_fn(|index: u64, _data: &[f32]| {
        if index == 3 {
            return Err("sink broke".to_owned());
        }
        Ok(())
    });
    let e = p.run_stream(source, sink).unwrap_err();
    println!("{e}");
    // The sink's failure is the caller's, not a GPU's: not wrapped.
    assert!(matches!(e, Error::Sink { chunk: 3, .. }), "{e}");
}

#[test]
fn gpu_multi_typed_errors_for_bad_gpu_lists() {
    let Some(gpus) = gpus_or_skip("gpu_multi_typed_errors_for_bad_gpu_lists", 1) else {
        return;
    };
    let count = gpus.len();
    assert!(matches!(
        MultiGpuPipeline::<f32>::with_ordinals(&[0, 0], PipelineConfig::default()),
        Err(Error::DuplicateGpu { ordinal: 0 })
    ));
    assert!(matches!(
        MultiGpuPipeline::<f32>::with_gpus(
            &[gpus[0].clone(), gpus[0].clone()],
            PipelineConfig::default()
        ),
        Err(Error::DuplicateGpu { ordinal: 0 })
    ));
    assert!(matches!(
        MultiGpuPipeline::<f32>::with_ordinals(&[count], PipelineConfig::default()),
        Err(Error::Stream(prism_stream::Error::InvalidDevice { ordinal, .. })) if ordinal == count
    ));
    assert!(matches!(
        MultiGpuPipeline::<f32>::with_gpus(&[], PipelineConfig::default()),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        PipelineStageManager::<f32>::new(Backend::AllGpus, PipelineConfig::default()),
        Err(Error::Config(_))
    ));
    let p = MultiGpuPipeline::<f32>::new(Backend::AllGpus, PipelineConfig::default()).unwrap();
    assert_eq!(p.gpus().len(), count);
    // Empty input, and fewer chunks than GPUs.
    let mut q = multi(&gpus, 1 << 12);
    q.run(&[], &mut []).unwrap();
    let input = random_f32(27, 100);
    let mut out = vec![f32::NAN; 100];
    q.run(&input, &mut out).unwrap();
    let want: Vec<f32> = input.iter().map(|&x| reference(x)).collect();
    expect_bits("one short chunk", &out, &want);
    assert_eq!(q.get_stats().chunks, 1);
    let mut none: Vec<(&[f32], &mut [f32])> = Vec::new();
    assert_eq!(q.run_items(none.drain(..)).unwrap(), 0);
    let too_long = vec![0f32; (1 << 12) + 1];
    let mut too_long_out = vec![0f32; too_long.len()];
    let runs = q.get_stats().runs;
    assert!(matches!(
        q.run_items([(&too_long[..], &mut too_long_out[..])]),
        Err(Error::ItemTooLong { item: 0, .. })
    ));
    assert_eq!(q.get_stats().runs, runs, "a refused run adds nothing");
    if count > 1 {
        // A buffer of GPU 0 that is not portable cannot be copied by GPU 1.
        let mut p = multi(&gpus, 1 << 12);
        let src = PinnedBuffer::<f32>::new(&gpus[0], 1 << 14, HostAllocFlags::DEFAULT).unwrap();
        let mut dst =
            PinnedBuffer::<f32>::new(&gpus[0], 1 << 14, HostAllocFlags::PORTABLE).unwrap();
        assert!(matches!(
            p.run_pinned(&src, &mut dst),
            Err(Error::NotPortable {
                what: "input",
                owner: 0
            })
        ));
        let src = PinnedBuffer::<f32>::new(&gpus[0], 1 << 14, HostAllocFlags::PORTABLE).unwrap();
        let mut dst = PinnedBuffer::<f32>::new(&gpus[0], 1 << 14, HostAllocFlags::DEFAULT).unwrap();
        assert!(matches!(
            p.run_pinned(&src, &mut dst),
            Err(Error::NotPortable {
                what: "output",
                owner: 0
            })
        ));
        // A registered Vec may be portable too.
        let v = PinnedBuffer::register_portable(&gpus[0], random_f32(28, 1 << 14)).unwrap();
        let mut w = PinnedBuffer::register_portable(&gpus[0], vec![0f32; 1 << 14]).unwrap();
        p.run_pinned(&v, &mut w).unwrap();
        let want: Vec<f32> = v
            .wait_slice()
            .unwrap()
            .iter()
            .map(|&x| reference(x))
            .collect();
        expect_bits("registered portable", w.wait_slice().unwrap(), &want);
    }
}

/// Scheduling by measured speed: a GPU whose stage takes far longer takes
/// fewer chunks, and the run still finishes with every output right.
#[test]
fn gpu_multi_a_slow_gpu_takes_fewer_chunks() {
    let Some(gpus) = gpus_or_skip("gpu_multi_a_slow_gpu_takes_fewer_chunks", 2) else {
        return;
    };
    if under_sanitizer() {
        eprintln!(
            "SKIPPED gpu_multi_a_slow_gpu_takes_fewer_chunks: timing under compute-sanitizer"
        );
        return;
    }
    let n = 32 << 20;
    let chunk = 1 << 18;
    let input = random_f32(25, n);
    let mut p = MultiGpuPipeline::<f32>::with_gpus(&gpus, config(chunk)).unwrap();
    p.add_stage_with(|gpu| {
        let slow = gpu.info().ordinal == 0;
        GpuFn::new("fma, slow on GPU 0", true, move |launch, x, y, len| {
            if slow {
                launch.spin(5_000_000)?; // 5 ms per chunk
            }
            launch.fma_chain(x, y, len, FMA.a, FMA.b, FMA.iters)?;
            Ok(())
        })
    });
    p.add_stage(CLAMP);
    let mut out = vec![0f32; n];
    // A first run allocates staging and touches `out`; the second is measured.
    p.run(&input, &mut out).unwrap();
    p.reset_stats();
    out.fill(f32::NAN);
    p.run(&input, &mut out).unwrap();
    let want: Vec<f32> = input.iter().map(|&x| reference(x)).collect();
    expect_bits("slow GPU run", &out, &want);
    let per = p.get_stats().chunks_per_gpu();
    println!("chunks per GPU with GPU 0 slowed: {per:?}");
    println!("{}", p.get_stats());
    let others: u64 = per[1..].iter().sum();
    assert!(per[0] * 2 < others, "the slow GPU took {per:?}");
}

/// The trace of a multi-GPU run: one process per GPU, on one clock.
#[test]
fn gpu_multi_trace_has_one_process_per_gpu() {
    let Some(gpus) = gpus_or_skip("gpu_multi_trace_has_one_process_per_gpu", 1) else {
        return;
    };
    let n = scaled(8 << 20, 1 << 14);
    let chunk = scaled(1 << 19, 1 << 10);
    let input = random_f32(26, n);
    let mut p = MultiGpuPipeline::<f32>::with_gpus(&gpus, config(chunk).with_trace(true)).unwrap();
    p.add_stage(FMA);
    let mut out = vec![0f32; n];
    p.run(&input, &mut out).unwrap();
    let trace = p.to_chrome_trace();
    let events = trace["traceEvents"].as_array().unwrap();
    let names: Vec<&str> = events
        .iter()
        .filter(|e| e["name"] == "process_name")
        .map(|e| e["args"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), gpus.len(), "{names:?}");
    let spans = events.iter().filter(|e| e["ph"] == "X").count() as u64;
    assert!(spans >= 3 * n.div_ceil(chunk) as u64, "{spans} spans");
    // Spans carry the run's chunk numbers: each chunk uploaded once, on
    // one GPU (one process), whatever GPU took it.
    let chunks = n.div_ceil(chunk);
    let mut uploads = vec![Vec::new(); chunks];
    for e in events.iter().filter(|e| e["ph"] == "X" && e["tid"] == 1) {
        let c = e["args"]["chunk"].as_u64().unwrap() as usize;
        uploads[c].push(e["pid"].as_u64().unwrap());
    }
    assert!(
        uploads.iter().all(|u| u.len() == 1),
        "uploads per chunk: {uploads:?}"
    );
    if let Ok(dir) = std::env::var("PRISM_TRACE_DIR") {
        p.write_chrome_trace(format!("{dir}/multi-gpu-trace.json"))
            .unwrap();
    }
}
