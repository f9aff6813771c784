//! Tests of the streaming pipeline on the GPU (`gpu_*`: without a GPU each
//! prints SKIPPED); the scenarios that are not about the GPU alone (items,
//! a failing stage) are written once and also run on the host backend
//! (`host_*`, runs everywhere).

use prism_pipeline::{
    BackendKind, Clamp, Error, Fma, GpuFn, GpuPipelineExt, GroupSum, PinnedItemsCopy,
    PipelineConfig, PipelineStageManager, SpanKind,
};
use prism_stream::{fma_chain_cpu, HostAllocFlags, ManagedGpuContext, PinnedBuffer};
use prism_testing::{gpu_or_skip, random_f32, scaled, under_sanitizer};

mod common;
use common::TestBackend;

fn manager(ctx: &ManagedGpuContext, chunk_elems: usize, trace: bool) -> PipelineStageManager<f32> {
    let config = PipelineConfig {
        chunk_bytes: chunk_elems * 4,
        trace,
        ..PipelineConfig::default()
    };
    ctx.create_pipeline_manager::<f32>(config).unwrap()
}

fn expect_fma_clamp(input: &[f32], out: &[f32]) {
    assert_eq!(input.len(), out.len());
    let bad = input.iter().zip(out).position(|(x, y)| {
        fma_chain_cpu(*x, 1.25, -0.5, 3).clamp(-1.0, 1.0).to_bits() != y.to_bits()
    });
    assert!(
        bad.is_none(),
        "element {} differs from the CPU reference",
        bad.unwrap_or(0)
    );
}

#[test]
fn gpu_pipeline_pageable_run_matches_cpu_and_traces() {
    let Some(ctx) = gpu_or_skip("gpu_pipeline_pageable_run_matches_cpu_and_traces") else {
        return;
    };
    let n = scaled(64 << 20, 1 << 16) + 17; // 256 MiB of f32 plus a ragged tail
    let chunk = scaled(4 << 20, 1 << 12);
    let input = random_f32(11, n);
    let mut p = manager(&ctx, chunk, true);
    assert_eq!(p.backend(), BackendKind::Gpu);
    p.add_stage(Fma {
        a: 1.25,
        b: -0.5,
        iters: 3,
    });
    p.add_stage(Clamp { lo: -1.0, hi: 1.0 });
    let mut out = vec![f32::NAN; n];
    p.run(&input, &mut out).unwrap();
    expect_fma_clamp(&input, &out);
    let stats = p.get_stats().clone();
    println!("{stats}");
    // Both stages are elementwise: the run ramps its chunk sizes.
    let chunks = p.chunk_plan(n).len() as u64;
    if chunk >= 1 << 14 {
        assert!(chunks > n.div_ceil(chunk) as u64);
    }
    assert_eq!(stats.chunks, chunks);
    assert!(stats.upload_ms > 0.0 && stats.download_ms > 0.0 && stats.compute_ms() > 0.0);
    assert!(
        stats.compute_busy_ms > 0.0 && stats.compute_busy_ms <= stats.compute_ms() + 1e-6,
        "busy {} vs sum {}",
        stats.compute_busy_ms,
        stats.compute_ms()
    );
    let spans = &p.timeline().spans;
    let gpu = |l: SpanKind| matches!(l, SpanKind::Upload | SpanKind::Compute | SpanKind::Download);
    assert_eq!(
        spans.iter().filter(|s| gpu(s.lane)).count() as u64,
        chunks * 4,
        "one span per upload, stage and download"
    );
    // The host lanes: each chunk's staging copy in and out, named by chunk,
    // inside the run.
    let copies: Vec<_> = spans
        .iter()
        .filter(|s| s.lane == SpanKind::HostCopy)
        .collect();
    assert_eq!(
        copies.len() as u64,
        chunks * 2,
        "one copy in and one out per chunk"
    );
    for c in 0..chunks {
        assert_eq!(
            copies.iter().filter(|s| s.chunk == c).count(),
            2,
            "chunk {c}"
        );
    }
    let last_gpu_end = spans
        .iter()
        .filter(|s| gpu(s.lane))
        .map(|s| s.end_ms)
        .fold(0.0, f64::max);
    let first_copy_out = copies
        .iter()
        .filter(|s| s.name.contains("out"))
        .map(|s| s.start_ms)
        .fold(f64::INFINITY, f64::min);
    assert!(
        first_copy_out < last_gpu_end,
        "copies out overlap the GPU work ({first_copy_out} vs {last_gpu_end})"
    );
    assert!(spans
        .iter()
        .all(|s| s.end_ms >= s.start_ms && s.start_ms >= 0.0));
    assert_eq!(
        spans.iter().filter(|s| s.lane == SpanKind::Compute).count() as u64,
        chunks * 2
    );
    let trace = p.timeline().to_chrome_trace();
    let events = trace["traceEvents"].as_array().unwrap();
    assert_eq!(
        events.iter().filter(|e| e["ph"] == "X").count(),
        spans.len()
    );
    assert!(events.iter().any(|e| e["name"] == "process_name"
        && e["args"]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("prism on "))));
    let path = std::env::temp_dir().join("prism-gpu-test.trace.json");
    p.timeline().write_chrome_trace(&path).unwrap();
    let back: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // Same events back (timestamps are floats: compare them loosely).
    let back_events = back["traceEvents"].as_array().unwrap();
    assert_eq!(back_events.len(), events.len());
    for (b, e) in back_events.iter().zip(events) {
        assert_eq!(
            (&b["name"], &b["tid"], &b["ph"], &b["args"]),
            (&e["name"], &e["tid"], &e["ph"], &e["args"])
        );
        let (bt, et) = (
            b["ts"].as_f64().unwrap_or(0.0),
            e["ts"].as_f64().unwrap_or(0.0),
        );
        assert!(
            (bt - et).abs() <= 1e-6 * et.abs().max(1.0),
            "ts {bt} vs {et}"
        );
    }
    // Reuse: a second run on the same manager accumulates stats.
    p.run(&input, &mut out).unwrap();
    expect_fma_clamp(&input, &out);
    assert_eq!(p.get_stats().runs, 2);
    p.reset_stats();
    assert_eq!(p.get_stats().runs, 0);
}

#[test]
fn gpu_pipeline_pinned_run_with_a_shrinking_stage() {
    let Some(ctx) = gpu_or_skip("gpu_pipeline_pinned_run_with_a_shrinking_stage") else {
        return;
    };
    let n = scaled(16 << 20, 1 << 14) + 5;
    let chunk = scaled(1 << 20, 1 << 10);
    let input = random_f32(12, n);
    let mut p = manager(&ctx, chunk, false);
    p.add_stage(Clamp { lo: -0.5, hi: 0.5 });
    p.add_stage(GroupSum { group: 8 });
    let src = PinnedBuffer::from_slice(ctx.gpu(), &input, HostAllocFlags::DEFAULT).unwrap();
    let mut dst =
        PinnedBuffer::<f32>::new(ctx.gpu(), p.total_output_len(n), HostAllocFlags::DEFAULT)
            .unwrap();
    p.run_pinned(&src, &mut dst).unwrap();
    let got = dst.wait_slice().unwrap();
    let mut want = Vec::new();
    for c in input.chunks(chunk) {
        for g in c.chunks(8) {
            want.push(g.iter().fold(0.0f32, |acc, v| acc + v.clamp(-0.5, 0.5)));
        }
    }
    assert_eq!(got.len(), want.len());
    let bad = got
        .iter()
        .zip(&want)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    assert!(
        bad.is_none(),
        "group {} differs from the CPU reference",
        bad.unwrap_or(0)
    );
    let mut wrong = PinnedBuffer::<f32>::new(ctx.gpu(), 3, HostAllocFlags::DEFAULT).unwrap();
    assert!(matches!(
        p.run_pinned(&src, &mut wrong),
        Err(Error::OutputLength { .. })
    ));
}

/// Items of uneven lengths through fma and clamp come back into their own
/// outputs, each equal to the CPU's; on the GPU many items share a chunk.
fn items_come_back_into_their_own_outputs(b: &TestBackend, count: usize, chunk: usize) {
    let mut p = b.manager(PipelineConfig {
        chunk_bytes: chunk * 4,
        // The host's items run two at a time at most.
        slots: if b.is_gpu() {
            PipelineConfig::default().slots
        } else {
            2
        },
        ..PipelineConfig::default()
    });
    p.add_stage(Fma {
        a: 1.25,
        b: -0.5,
        iters: 3,
    });
    p.add_stage(Clamp { lo: -1.0, hi: 1.0 });
    let inputs: Vec<Vec<f32>> = (0..count)
        .map(|k| random_f32(k as u64, 1 + (k * 7919) % 4096))
        .collect();
    let mut outputs: Vec<Vec<f32>> = inputs.iter().map(|v| vec![f32::NAN; v.len()]).collect();
    let n = p
        .run_items(
            inputs
                .iter()
                .map(|v| v.as_slice())
                .zip(outputs.iter_mut().map(|v| v.as_mut_slice())),
        )
        .unwrap();
    assert_eq!(n as usize, count);
    for (i, o) in inputs.iter().zip(&outputs) {
        expect_fma_clamp(i, o);
    }
    if b.is_gpu() {
        assert!(
            p.get_stats().chunks < count as u64,
            "items were not batched: {} chunks for {count} items",
            p.get_stats().chunks
        );
    }
}

#[test]
fn host_items_come_back_into_their_own_outputs() {
    items_come_back_into_their_own_outputs(&TestBackend::Host, 50, 4096);
}

#[test]
fn gpu_pipeline_items_are_batched_and_scattered() {
    let Some(b) = TestBackend::gpu_or_skip("gpu_pipeline_items_are_batched_and_scattered") else {
        return;
    };
    items_come_back_into_their_own_outputs(&b, scaled(2048, 64), scaled(1 << 20, 4096));
}

/// A stage failing on chunk 2 of 10 stops the run naming itself, its chunk
/// and its error; the failed run adds nothing to the stats; the manager
/// runs again without the stage and matches the CPU.
fn failing_stage_drains_and_pipeline_is_reusable(b: &TestBackend, chunk: usize) {
    let mut p = b.manager(PipelineConfig {
        chunk_bytes: chunk * 4,
        // One host thread: the host runs the chunks one after another, so
        // the stage's third call is chunk 2 there too.
        host_threads: if b.is_gpu() {
            PipelineConfig::default().host_threads
        } else {
            1
        },
        ..PipelineConfig::default()
    });
    let fma = p.add_stage(Fma {
        a: 1.25,
        b: -0.5,
        iters: 3,
    });
    let clamp = p.add_stage(Clamp { lo: -1.0, hi: 1.0 });
    b.add_failing_copy(&mut p, "flaky", 3, "deliberate stage failure");
    let input = random_f32(13, 10 * chunk);
    let mut out = vec![0.0; input.len()];
    match p.run(&input, &mut out) {
        Err(Error::Stage {
            stage,
            chunk,
            source,
        }) => {
            assert_eq!((stage.as_str(), chunk), ("flaky", 2));
            assert_eq!(source.to_string(), "deliberate stage failure");
        }
        other => panic!("expected a stage error, got {other:?}"),
    }
    // The failed run added nothing to the stats: no run, no bytes, no step
    // or stage times (on either backend).
    let s = p.get_stats();
    assert_eq!((s.runs, s.bytes_in, s.bytes_out), (0, 0, 0), "{s:?}");
    assert!(
        s.upload_ms == 0.0
            && s.download_ms == 0.0
            && s.compute_ms() == 0.0
            && s.compute_busy_ms == 0.0
            && s.stages.is_empty(),
        "{s:?}"
    );
    p.set_order(&[fma, clamp]).unwrap();
    p.run(&input, &mut out).unwrap();
    expect_fma_clamp(&input, &out);
    let s = p.get_stats();
    assert_eq!(s.runs, 1);
    if b.is_gpu() {
        assert!(
            s.upload_ms > 0.0 && s.bound_ms() <= s.wall_ms * 1.05,
            "{s:?}"
        );
    }
}

#[test]
fn host_failing_stage_drains_and_pipeline_is_reusable() {
    failing_stage_drains_and_pipeline_is_reusable(&TestBackend::Host, 10);
}

#[test]
fn gpu_pipeline_failing_stage_drains_and_pipeline_is_reusable() {
    let Some(b) =
        TestBackend::gpu_or_skip("gpu_pipeline_failing_stage_drains_and_pipeline_is_reusable")
    else {
        return;
    };
    failing_stage_drains_and_pipeline_is_reusable(&b, 1 << 12);
}

#[test]
fn gpu_pipeline_overlaps_streams() {
    let Some(ctx) = gpu_or_skip("gpu_pipeline_overlaps_streams") else {
        return;
    };
    let n = scaled(256 << 20, 1 << 16); // 1 GiB
    let mut p = manager(&ctx, scaled(16 << 20, 1 << 12), false);
    p.add_stage(Fma {
        a: 1.0001,
        b: 0.5,
        iters: 1,
    });
    let src =
        PinnedBuffer::from_slice(ctx.gpu(), &random_f32(14, n), HostAllocFlags::DEFAULT).unwrap();
    let mut dst = PinnedBuffer::<f32>::new(ctx.gpu(), n, HostAllocFlags::DEFAULT).unwrap();
    p.run_pinned(&src, &mut dst).unwrap(); // warm-up
    p.reset_stats();
    p.run_pinned(&src, &mut dst).unwrap();
    let s = p.get_stats();
    println!("{s}");
    if !under_sanitizer() {
        let serial = s.upload_ms + s.compute_ms() + s.download_ms;
        assert!(
            serial > 1.3 * s.wall_ms,
            "no overlap: steps sum to {serial:.2} ms, wall {:.2} ms",
            s.wall_ms
        );
    }
}

#[test]
fn gpu_pipeline_pinned_items_use_zero_copy_gather_and_scatter() {
    let Some(ctx) = gpu_or_skip("gpu_pipeline_pinned_items_use_zero_copy_gather_and_scatter")
    else {
        return;
    };
    let count = scaled(4096, 64);
    let mut p = manager(&ctx, scaled(1 << 20, 4096), true);
    p.add_stage(Fma {
        a: 1.25,
        b: -0.5,
        iters: 3,
    });
    p.add_stage(Clamp { lo: -1.0, hi: 1.0 });
    let gpu = ctx.gpu();
    let inputs: Vec<Vec<f32>> = (0..count)
        .map(|k| random_f32(7 + k as u64, 1 + (k * 7919) % scaled(4096, 256)))
        .collect();
    let items: Vec<PinnedBuffer<f32>> = inputs
        .iter()
        .map(|v| PinnedBuffer::from_slice(gpu, v, HostAllocFlags::DEFAULT).unwrap())
        .collect();
    let mut outs: Vec<PinnedBuffer<f32>> = inputs
        .iter()
        .map(|v| {
            PinnedBuffer::from_slice(gpu, &vec![f32::NAN; v.len()], HostAllocFlags::DEFAULT)
                .unwrap()
        })
        .collect();
    let n = p
        .run_items_pinned(items.iter().zip(outs.iter_mut()))
        .unwrap();
    assert_eq!(n as usize, count);
    for (i, o) in inputs.iter().zip(&outs) {
        expect_fma_clamp(i, o.wait_slice().unwrap());
    }
    let s = p.get_stats();
    assert!(
        s.chunks < count as u64 / 4,
        "items were not batched: {} chunks for {count} items",
        s.chunks
    );
    let gathers = p
        .timeline()
        .spans
        .iter()
        .filter(|s| s.lane == SpanKind::Upload)
        .count() as u64;
    assert_eq!(gathers, s.chunks, "one gather per chunk");
    println!("{s}");
}

/// `run_items_pinned` by batched copies, by the zero-copy kernels and in
/// `Auto`: bit for bit the same, and the CPU's; items of odd sizes, some
/// allocated pinned and some registered `Vec`s. The outputs are read at
/// once (either `BufferInFlight` or final), and fed straight into a second
/// run (its uploads must wait for the first run's downloads).
#[test]
fn gpu_pipeline_pinned_items_batched_copies_match_the_kernels() {
    let Some(ctx) = gpu_or_skip("gpu_pipeline_pinned_items_batched_copies_match_the_kernels")
    else {
        return;
    };
    let batched = prism_stream::batch_copies_supported().is_ok();
    let count = scaled(2000, 64);
    let mut p = manager(&ctx, scaled(1 << 20, 4096), true);
    p.add_stage(Fma {
        a: 1.25,
        b: -0.5,
        iters: 3,
    });
    p.add_stage(Clamp { lo: -1.0, hi: 1.0 });
    let gpu = ctx.gpu();
    let inputs: Vec<Vec<f32>> = (0..count)
        .map(|k| random_f32(70 + k as u64, 1 + (k * 7919) % scaled(4099, 255)))
        .collect();
    let items: Vec<PinnedBuffer<f32>> = inputs
        .iter()
        .enumerate()
        .map(|(k, v)| {
            if k % 3 == 0 {
                PinnedBuffer::register(gpu, v.clone()).unwrap()
            } else {
                PinnedBuffer::from_slice(gpu, v, HostAllocFlags::DEFAULT).unwrap()
            }
        })
        .collect();
    let fresh = |inputs: &[Vec<f32>]| -> Vec<PinnedBuffer<f32>> {
        inputs
            .iter()
            .map(|v| {
                PinnedBuffer::from_slice(gpu, &vec![f32::NAN; v.len()], HostAllocFlags::DEFAULT)
                    .unwrap()
            })
            .collect()
    };
    let twice: Vec<Vec<f32>> = inputs
        .iter()
        .map(|v| {
            v.iter()
                .map(|x| {
                    let y = fma_chain_cpu(*x, 1.25, -0.5, 3).clamp(-1.0, 1.0);
                    fma_chain_cpu(y, 1.25, -0.5, 3).clamp(-1.0, 1.0)
                })
                .collect()
        })
        .collect();
    let mut results = Vec::new();
    for mode in [
        PinnedItemsCopy::Kernels,
        PinnedItemsCopy::Batched,
        PinnedItemsCopy::Auto,
    ] {
        p.set_pinned_items_copy(Some(mode));
        let mut outs = fresh(&inputs);
        p.reset_stats();
        let r = p.run_items_pinned(items.iter().zip(outs.iter_mut()));
        if mode == PinnedItemsCopy::Batched && !batched {
            assert!(
                matches!(
                    r,
                    Err(Error::Stream(prism_stream::Error::DriverUnsupported { .. }))
                ),
                "{r:?}"
            );
            continue;
        }
        assert_eq!(r.unwrap() as usize, count, "{mode:?}");
        let paths = p.pinned_items_paths();
        let chunks = p.get_stats().chunks;
        println!("{mode:?}: {paths:?}, {chunks} chunks");
        // Read at once: in flight, or already final.
        for (i, o) in inputs.iter().zip(&outs).step_by(97) {
            match o.as_slice() {
                Err(prism_stream::Error::BufferInFlight { .. }) => {}
                Ok(got) => expect_fma_clamp(i, got),
                Err(e) => panic!("{mode:?}: {e}"),
            }
        }
        // Straight into a second run, no host wait between.
        let mut outs2 = fresh(&inputs);
        p.reset_stats();
        p.run_items_pinned(outs.iter().zip(outs2.iter_mut()))
            .unwrap();
        let paths2 = p.pinned_items_paths();
        let chunks2 = p.get_stats().chunks;
        for (k, (i, o)) in inputs.iter().zip(&outs).enumerate() {
            let got = o.wait_slice().unwrap();
            expect_fma_clamp(i, got);
            let again = outs2[k].wait_slice().unwrap();
            assert!(
                again
                    .iter()
                    .zip(&twice[k])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{mode:?}: item {k} of the second run"
            );
        }
        let by_batch = mode != PinnedItemsCopy::Kernels && batched;
        for (paths, chunks) in [(paths, chunks), (paths2, chunks2)] {
            let want = if by_batch {
                (chunks, 0, chunks, 0)
            } else {
                (0, chunks, 0, chunks)
            };
            assert_eq!(
                (
                    paths.uploads_batched,
                    paths.uploads_kernel,
                    paths.downloads_batched,
                    paths.downloads_kernel
                ),
                want,
                "{mode:?}"
            );
        }
        // One upload span per chunk, whichever path ran.
        let uploads = p
            .timeline()
            .spans
            .iter()
            .filter(|s| s.lane == SpanKind::Upload)
            .count() as u64;
        assert_eq!(uploads, chunks2, "{mode:?}: one upload per chunk");
        results.push(
            outs.iter()
                .map(|o| o.as_slice().unwrap().iter().map(|x| x.to_bits()).collect())
                .collect::<Vec<Vec<u32>>>(),
        );
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]));
    for b in items {
        if b.is_registered() {
            b.into_vec().unwrap();
        }
    }
}

#[test]
fn gpu_pipeline_registered_vecs_run_repeatedly_and_come_back() {
    let Some(ctx) = gpu_or_skip("gpu_pipeline_registered_vecs_run_repeatedly_and_come_back") else {
        return;
    };
    let n = scaled(32 << 20, 1 << 16) + 5; // 128 MiB of f32 and a ragged tail
    let chunk = scaled(8 << 20, 1 << 12);
    let gpu = ctx.gpu();
    let mut p = manager(&ctx, chunk, false);
    p.add_stage(Fma {
        a: 1.25,
        b: -0.5,
        iters: 3,
    });
    p.add_stage(Clamp { lo: -1.0, hi: 1.0 });
    match PinnedBuffer::<f32>::register(gpu, Vec::new()) {
        Err(e) => assert!(matches!(e.error, prism_stream::Error::ZeroLength { .. })),
        Ok(_) => panic!("an empty vector registered"),
    }
    // A failed registration hands the vector back: two small vectors on one
    // page make the driver refuse the second (when the allocator put them
    // there), and its data must survive.
    let first = PinnedBuffer::register(gpu, vec![1u8; 64]).unwrap();
    match PinnedBuffer::register(gpu, vec![2u8; 64]) {
        Ok(second) => drop(second),
        Err(e) => {
            assert_eq!(e.data, vec![2u8; 64], "{}", e.error);
        }
    }
    drop(first);
    // Debug shows the kind and length, not the contents.
    let dbg = format!("{:?}", PinnedBuffer::register(gpu, vec![7u32; 3]).unwrap());
    assert!(dbg.contains("registered") && !dbg.contains('7'), "{dbg}");
    let mut input = PinnedBuffer::register(gpu, random_f32(21, n)).unwrap();
    let mut output = PinnedBuffer::register(gpu, vec![f32::NAN; n]).unwrap();
    assert!(input.is_registered() && output.is_registered());
    // Several runs over the same registered vectors, new data each time.
    for round in 0..3u64 {
        input
            .as_mut_slice()
            .unwrap()
            .copy_from_slice(&random_f32(22 + round, n));
        p.run_pinned(&input, &mut output).unwrap();
        expect_fma_clamp(input.as_slice().unwrap(), output.as_slice().unwrap());
    }
    // The vectors come back unregistered, with the last round's data.
    let last_in = input.into_vec().unwrap();
    let last_out = output.into_vec().unwrap();
    expect_fma_clamp(&last_in, &last_out);
    // Registering the same memory again works once it was released.
    let again = PinnedBuffer::register(gpu, last_out).unwrap();
    // An allocated buffer's into_vec copies.
    let copy = PinnedBuffer::from_slice(gpu, &last_in[..1000], HostAllocFlags::DEFAULT)
        .unwrap()
        .into_vec()
        .unwrap();
    assert_eq!(copy, last_in[..1000]);
    // Dropping a registered buffer with a copy in flight waits for it.
    let mut lane = prism_stream::Lane::new(gpu).unwrap();
    let mut dev = prism_stream::DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    lane.copy_htod(&again, 0, &mut dev, 0, n).unwrap();
    drop(again);
    lane.synchronize().unwrap();
}

#[test]
fn gpu_pipeline_adaptive_configuration_picks_by_input_and_matches_cpu() {
    let Some(ctx) =
        gpu_or_skip("gpu_pipeline_adaptive_configuration_picks_by_input_and_matches_cpu")
    else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(40 << 20, 1 << 16) + 3;
    let mut p = ctx
        .create_pipeline_manager::<f32>(PipelineConfig::auto())
        .unwrap();
    p.add_stage(Fma {
        a: 1.25,
        b: -0.5,
        iters: 3,
    });
    p.add_stage(Clamp { lo: -1.0, hi: 1.0 });
    let input = random_f32(31, n);
    let mut out = vec![f32::NAN; n];
    p.run(&input, &mut out).unwrap();
    expect_fma_clamp(&input, &out);
    let s = p.get_stats();
    assert!(s.adaptive);
    let chunk = ((n * 4) / 8).clamp(4 << 20, 16 << 20) / 4 * 4;
    assert_eq!((s.chunk_bytes, s.slots), (chunk, 4), "pageable choice");
    // Pinned: 16 MiB at most, and at least 8 chunks of 4 MiB or more.
    let pin_in = PinnedBuffer::from_slice(gpu, &input, HostAllocFlags::DEFAULT).unwrap();
    let mut pin_out = PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::DEFAULT).unwrap();
    p.run_pinned(&pin_in, &mut pin_out).unwrap();
    expect_fma_clamp(&input, pin_out.wait_slice().unwrap());
    let s = p.get_stats();
    assert_eq!((s.chunk_bytes, s.slots), (chunk, 4), "pinned choice");
    // The choice was for those runs only: the configuration is unchanged.
    assert_eq!(
        p.config().chunk_bytes,
        PipelineConfig::default().chunk_bytes
    );
    // A stage that is not elementwise keeps the configured sizes.
    let config = PipelineConfig {
        chunk_bytes: 1 << 20,
        slots: 2,
        ..PipelineConfig::auto()
    };
    let mut q = ctx.create_pipeline_manager::<f32>(config).unwrap();
    q.add_stage(GroupSum { group: 4 });
    let mut sums = vec![0f32; q.total_output_len(n)];
    q.run(&input, &mut sums).unwrap();
    let s = q.get_stats();
    assert_eq!((s.chunk_bytes, s.slots), (1 << 20, 2));
    assert!(
        !s.adaptive,
        "nothing was chosen for a chain that is not elementwise"
    );
}

/// `PipelineConfig::graphs`: each slot's stage chain captured once per
/// chunk length and replayed gives the same bits as queueing the stages,
/// counts its launches and captures, shows as one "graph: ..." span, and
/// leaves chains with a stage that is not capturable alone.
#[test]
fn gpu_pipeline_chain_graphs_replay_the_same_bits() {
    let Some(ctx) = gpu_or_skip("gpu_pipeline_chain_graphs_replay_the_same_bits") else {
        return;
    };
    let n = scaled(16 << 20, 1 << 14) + 5;
    let chunk = scaled(1 << 20, 1 << 10);
    let input = random_f32(21, n);
    let run = |graphs: bool, extra: bool| {
        let config = PipelineConfig {
            chunk_bytes: chunk * 4,
            graphs,
            ..PipelineConfig::default()
        };
        let mut p = ctx.create_pipeline_manager::<f32>(config).unwrap();
        p.add_stage(Fma {
            a: 1.25,
            b: -0.5,
            iters: 3,
        });
        p.add_stage(Clamp { lo: -1.0, hi: 1.0 });
        if extra {
            // A closure stage: not capturable, so the chain runs as usual.
            p.add_stage(GpuFn::new(
                "copy",
                true,
                |l: &mut prism_stream::Launch<'_>, x, y, n| Ok(l.copy_dtod(x, 0, y, 0, n)?),
            ));
        }
        let mut out = vec![f32::NAN; n];
        for _ in 0..2 {
            p.run(&input, &mut out).unwrap();
        }
        (out, p.get_stats().clone())
    };
    let (plain, s0) = run(false, false);
    let (graphed, s1) = run(true, false);
    expect_fma_clamp(&input, &plain);
    expect_fma_clamp(&input, &graphed);
    assert_eq!(s0.graph_launches, 0);
    assert_eq!(
        s1.graph_launches, s1.chunks,
        "every chunk's stages were replayed"
    );
    assert!(s1.graph_captures >= 1);
    assert!(
        s1.graph_captures < s1.chunks / 2,
        "{} captures for {} chunks: the second run should replay the first's",
        s1.graph_captures,
        s1.chunks
    );
    assert!(
        s1.stages.iter().any(|s| s.name == "graph: fma+clamp"),
        "{s1}"
    );
    println!("{s1}");
    let (mixed, s2) = run(true, true);
    expect_fma_clamp(&input, &mixed);
    assert_eq!(
        s2.graph_launches, 0,
        "a chain with a closure stage is not captured"
    );
}

/// A chain over data already on the GPU (`run_device`): the same chunks as
/// `run` (a group never spans two), the output stays on the device, and it
/// equals the CPU reference bit for bit; a shorter output and the host
/// backend are typed errors; a second call reuses the scratch buffers.
#[test]
fn gpu_pipeline_run_device_matches_cpu() {
    let Some(ctx) = gpu_or_skip("gpu_pipeline_run_device_matches_cpu") else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(8 << 20, 1 << 14) + 5;
    let input = random_f32(0xDE, n);
    // A chunk that is no multiple of the group: groups end at chunk ends.
    let chunk = (1 << 16) + 3;
    let mut p = manager(&ctx, chunk, false);
    p.add_stage(Clamp { lo: -0.5, hi: 0.5 });
    p.add_stage(GroupSum { group: 8 });
    let mut lane = prism_stream::Lane::new(gpu).unwrap();
    let x = prism_stream::DeviceBuffer::from_slice(&mut lane, &input).unwrap();
    let want: Vec<f32> = input
        .chunks(chunk)
        .flat_map(|c| c.chunks(8))
        .map(|g| g.iter().fold(0.0f32, |acc, v| acc + v.clamp(-0.5, 0.5)))
        .collect();
    assert_eq!(want.len(), p.total_output_len(n));
    for round in 0..2 {
        let mut y = prism_stream::DeviceBuffer::<f32>::zeroed(&mut lane, want.len() + 3).unwrap();
        let written = p.run_device(&x, &mut y).unwrap();
        assert_eq!(written, want.len());
        let got = lane.read_async(&y, 0, y.len()).unwrap().wait().unwrap();
        let bad = (0..want.len()).find(|&i| got[i].to_bits() != want[i].to_bits());
        assert!(
            bad.is_none(),
            "round {round}: group {bad:?} differs from the CPU reference"
        );
        assert!(
            got[want.len()..].iter().all(|&v| v == 0.0),
            "wrote past its output"
        );
    }
    let mut short = prism_stream::DeviceBuffer::<f32>::zeroed(&mut lane, 1).unwrap();
    assert!(matches!(
        p.run_device(&x, &mut short),
        Err(Error::OutputLength { .. })
    ));
    let mut host =
        PipelineStageManager::<f32>::new(prism_pipeline::Backend::Host, PipelineConfig::default())
            .unwrap();
    host.add_stage(Clamp { lo: -0.5, hi: 0.5 });
    assert!(matches!(
        host.run_device(&x, &mut short),
        Err(Error::Unsupported { .. })
    ));
}
