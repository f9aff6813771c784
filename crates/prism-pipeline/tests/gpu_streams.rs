//! GPU-gated tests of the ring engine's newer modes: `run_stream` with
//! uneven chunks, failing and panicking sources, sinks and stages;
//! `execute_iteration` (pageable and pinned) overlapping and returning in
//! order, `flush`, the blocking small step; and timing that holds events
//! for the chunks in flight only. Without a GPU each prints SKIPPED. A
//! failed iteration and chunks a stage empties are written once and also
//! run on the host backend (`host_*`, runs everywhere).

use prism_pipeline::{
    fill_with, from_iter, sink_fn, BoxError, Clamp, Error, Fma, GpuFn, GpuPipelineExt, GroupSum,
    HostFn, PipelineConfig, PipelineStageManager,
};
use prism_stream::{fma_chain_cpu, HostAllocFlags, ManagedGpuContext, PinnedBuffer};
use prism_testing::{gpu_or_skip, random_f32, scaled, under_sanitizer};

mod common;
use common::TestBackend;

fn manager(
    ctx: &ManagedGpuContext,
    chunk_elems: usize,
    slots: usize,
    timing: bool,
) -> PipelineStageManager<f32> {
    let config = PipelineConfig {
        chunk_bytes: chunk_elems * 4,
        slots,
        timing,
        ..PipelineConfig::default()
    };
    ctx.create_pipeline_manager::<f32>(config).unwrap()
}

fn fma_clamp(p: &mut PipelineStageManager<f32>) {
    p.add_stage(Fma {
        a: 1.25,
        b: -0.5,
        iters: 3,
    });
    p.add_stage(Clamp { lo: -1.0, hi: 1.0 });
}

fn cpu(x: f32) -> f32 {
    fma_chain_cpu(x, 1.25, -0.5, 3).clamp(-1.0, 1.0)
}

fn same_as_cpu(input: &[f32], out: &[f32]) -> bool {
    input.len() == out.len()
        && input
            .iter()
            .zip(out)
            .all(|(x, y)| cpu(*x).to_bits() == y.to_bits())
}

#[test]
fn gpu_stream_of_uneven_chunks_matches_cpu_in_order() {
    let Some(ctx) = gpu_or_skip("gpu_stream_of_uneven_chunks_matches_cpu_in_order") else {
        return;
    };
    let chunk = scaled(1 << 20, 1 << 10);
    let mut p = manager(&ctx, chunk, 3, true);
    fma_clamp(&mut p);
    // Chunk lengths from 1 to a full chunk, in place into the pinned slot.
    let lens: Vec<usize> = (0..scaled(40, 8))
        .map(|k| 1 + (k * 7919 + 13) % chunk)
        .collect();
    let inputs: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(k, &n)| random_f32(30 + k as u64, n))
        .collect();
    let mut next = inputs.iter();
    let source = fill_with(|dst: &mut [f32]| {
        Ok::<_, BoxError>(match next.next() {
            Some(c) => {
                dst[..c.len()].copy_from_slice(c);
                c.len()
            }
            None => 0,
        })
    });
    let mut k = 0usize;
    let counts = p
        .run_stream(
            source,
            sink_fn(|index, out: &[f32]| {
                assert_eq!(index, k as u64, "chunks out of order");
                assert!(
                    same_as_cpu(&inputs[k], out),
                    "chunk {k} differs from the CPU"
                );
                k += 1;
                Ok::<_, BoxError>(())
            }),
        )
        .unwrap();
    assert_eq!((counts.chunks as usize, k), (lens.len(), lens.len()));
    assert_eq!(counts.elements_in as usize, lens.iter().sum::<usize>());
    println!("{}", p.get_stats());
    // A shrinking stage: packed input from an iterator of Vecs.
    let mut p = manager(&ctx, chunk, 4, false);
    p.add_stage(GroupSum { group: 16 });
    let all: Vec<f32> = inputs.concat();
    let mut got = Vec::new();
    p.run_stream(
        from_iter(inputs.clone()),
        sink_fn(|_, out: &[f32]| {
            got.extend_from_slice(out);
            Ok::<_, BoxError>(())
        }),
    )
    .unwrap();
    let want: Vec<f32> = all
        .chunks(chunk)
        .flat_map(|c| {
            c.chunks(16)
                .map(|g| g.iter().fold(0.0f32, |a, v| a + v))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(got.len(), want.len());
    assert!(got
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn gpu_stream_failures_are_errors_and_the_manager_recovers() {
    let Some(ctx) = gpu_or_skip("gpu_stream_failures_are_errors_and_the_manager_recovers") else {
        return;
    };
    let chunk = scaled(1 << 16, 1 << 10);
    let mut p = manager(&ctx, chunk, 3, true);
    fma_clamp(&mut p);
    let input = random_f32(40, chunk * 10);
    // The source fails at chunk 4: chunks 0..4 are delivered, nothing after.
    let mut calls = 0;
    let mut delivered = Vec::new();
    let err = p
        .run_stream(
            fill_with(|dst: &mut [f32]| {
                calls += 1;
                if calls == 5 {
                    return Err::<usize, BoxError>("sensor unplugged".into());
                }
                let k = calls - 1;
                dst.copy_from_slice(&input[k * chunk..(k + 1) * chunk]);
                Ok(chunk)
            }),
            sink_fn(|index, out: &[f32]| {
                let k = index as usize;
                assert!(same_as_cpu(&input[k * chunk..(k + 1) * chunk], out));
                delivered.push(index);
                Ok::<_, BoxError>(())
            }),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Source { chunk: 4, .. }), "{err}");
    assert_eq!(delivered, vec![0, 1, 2, 3]);
    // The sink fails at chunk 2: the run stops with its error.
    let err = p
        .run_stream(
            from_iter([&input[..]]),
            sink_fn(|index, _: &[f32]| {
                if index == 2 {
                    Err::<(), BoxError>("disk full".into())
                } else {
                    Ok(())
                }
            }),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Sink { chunk: 2, .. }), "{err}");
    // A panicking GPU stage: its name, chunk and message come back.
    let mut calls = 0;
    let panicky = p.add_stage(GpuFn::new(
        "panicky",
        true,
        move |l: &mut prism_stream::Launch<'_>,
              i: &prism_stream::DeviceBuffer<f32>,
              o: &mut prism_stream::DeviceBuffer<f32>,
              n| {
            calls += 1;
            if calls == 3 {
                panic!("stage lost its mind");
            }
            Ok(l.clamp(i, o, n, f32::MIN, f32::MAX)?)
        },
    ));
    let mut out = vec![0.0; input.len()];
    let err = p.run(&input, &mut out).unwrap_err();
    match &err {
        Error::StagePanicked {
            stage,
            chunk,
            message,
        } => {
            assert_eq!((stage.as_str(), *chunk), ("panicky", 2));
            assert!(message.contains("lost its mind"), "{message}");
        }
        other => panic!("expected StagePanicked, got {other}"),
    }
    // Everything still works.
    p.set_order(&[0, 1]).unwrap();
    p.run(&input, &mut out).unwrap();
    assert!(same_as_cpu(&input, &out));
    let _ = panicky;
}

#[test]
fn gpu_execute_iteration_overlaps_and_returns_in_order() {
    let Some(ctx) = gpu_or_skip("gpu_execute_iteration_overlaps_and_returns_in_order") else {
        return;
    };
    let chunk = scaled(1 << 20, 1 << 10);
    let slots = 3;
    let mut p = manager(&ctx, chunk, slots, true);
    fma_clamp(&mut p);
    assert!(
        p.flush().unwrap().is_empty(),
        "flush with nothing submitted"
    );
    let steps = scaled(16, 6);
    let inputs: Vec<Vec<f32>> = (0..steps)
        .map(|k| random_f32(50 + k as u64, 1 + (k * 104_729) % chunk))
        .collect();
    let mut outputs: Vec<Option<Vec<f32>>> = vec![None; steps];
    let mut returned = 0usize;
    for (k, input) in inputs.iter().enumerate() {
        let done = p.execute_iteration(input).unwrap();
        for c in done {
            assert_eq!(c.index as usize, returned, "outputs out of order");
            outputs[returned] = c.data;
            returned += 1;
        }
        // Never more than slots - 1 chunks left in flight after a call;
        // once the ring is full, chunk k - (slots - 1) is back.
        assert!(p.pending_iterations() < slots);
        if k + 1 >= slots {
            assert!(returned > k + 1 - slots, "call {k}: only {returned} back");
        }
    }
    // A whole run is refused while chunks are in flight.
    let mut scratch = vec![0.0; 4];
    if p.pending_iterations() > 0 {
        assert!(matches!(
            p.run(&[1.0; 4], &mut scratch),
            Err(Error::IterationPending { .. })
        ));
    }
    for c in p.flush().unwrap() {
        assert_eq!(c.index as usize, returned);
        outputs[returned] = c.data;
        returned += 1;
    }
    assert_eq!(returned, steps);
    assert_eq!(p.pending_iterations(), 0);
    for (k, (input, out)) in inputs.iter().zip(&outputs).enumerate() {
        assert!(
            same_as_cpu(input, out.as_deref().unwrap_or(&[])),
            "chunk {k} differs"
        );
    }
    println!("{}", p.get_stats());
    // After a flush a whole run works again, and a new session starts at 0.
    p.run(&[1.0; 4], &mut scratch).unwrap();
    let again = p.execute_iteration(&inputs[0]).unwrap();
    let rest = p.flush().unwrap();
    assert_eq!(
        again
            .iter()
            .chain(&rest)
            .map(|c| c.index)
            .collect::<Vec<_>>(),
        vec![0]
    );
}

#[test]
fn gpu_execute_iteration_pinned_queues_whole_round_trips() {
    let Some(ctx) = gpu_or_skip("gpu_execute_iteration_pinned_queues_whole_round_trips") else {
        return;
    };
    let chunk = scaled(1 << 20, 1 << 10);
    let steps = scaled(24, 6);
    let n = chunk * steps;
    let mut p = manager(&ctx, chunk, 3, true);
    fma_clamp(&mut p);
    let input = random_f32(60, n);
    let src = PinnedBuffer::from_slice(ctx.gpu(), &input, HostAllocFlags::DEFAULT).unwrap();
    let mut dst =
        PinnedBuffer::from_slice(ctx.gpu(), &vec![f32::NAN; n], HostAllocFlags::DEFAULT).unwrap();
    let mut back = Vec::new();
    for k in 0..steps {
        let done = p
            .execute_iteration_pinned(&src, k * chunk..(k + 1) * chunk, &mut dst, k * chunk)
            .unwrap();
        back.extend(done.iter().map(|c| {
            assert!(c.data.is_none());
            c.index
        }));
    }
    back.extend(p.flush().unwrap().iter().map(|c| c.index));
    assert_eq!(back, (0..steps as u64).collect::<Vec<_>>());
    assert!(same_as_cpu(&input, dst.as_slice().unwrap()));
    let s = p.get_stats();
    println!("{s}");
    if !under_sanitizer() {
        let serial = s.upload_ms + s.compute_ms() + s.download_ms;
        assert!(
            serial > 1.3 * s.wall_ms,
            "execute_iteration_pinned did not overlap: steps sum to {serial:.2} ms, wall {:.2} ms",
            s.wall_ms
        );
    }
    // An output range past the buffer is refused before anything is queued.
    assert!(matches!(
        p.execute_iteration_pinned(&src, 0..chunk, &mut dst, n - chunk + 1),
        Err(Error::OutputLength { .. })
    ));
    assert_eq!(p.pending_iterations(), 0);
}

#[test]
fn gpu_blocking_small_steps_match_cpu() {
    let Some(ctx) = gpu_or_skip("gpu_blocking_small_steps_match_cpu") else {
        return;
    };
    let mut p = manager(&ctx, 1 << 14, 3, false);
    fma_clamp(&mut p);
    for k in 0..scaled(200, 20) {
        let input = random_f32(70 + k as u64, 1 + (k * 37) % 4096);
        let out = p.execute_iteration_blocking(&input).unwrap();
        assert!(same_as_cpu(&input, &out), "step {k} differs");
    }
    // The pinned form, into the middle of a larger output.
    let input = random_f32(77, 5000);
    let src = PinnedBuffer::from_slice(ctx.gpu(), &input, HostAllocFlags::DEFAULT).unwrap();
    let mut dst =
        PinnedBuffer::from_slice(ctx.gpu(), &vec![f32::NAN; 6000], HostAllocFlags::DEFAULT)
            .unwrap();
    let n = p
        .execute_iteration_blocking_pinned(&src, 1000..4000, &mut dst, 2000)
        .unwrap();
    assert_eq!(n, 3000);
    let got = dst.as_slice().unwrap();
    assert!(same_as_cpu(&input[1000..4000], &got[2000..5000]));
    assert!(got[..2000].iter().chain(&got[5000..]).all(|v| v.is_nan()));
    // Not while a non-blocking session has chunks in flight.
    let mut outs = p.execute_iteration(&[0.5; 64]).unwrap();
    if p.pending_iterations() > 0 {
        assert!(matches!(
            p.execute_iteration_blocking(&[0.5; 64]),
            Err(Error::IterationPending { .. })
        ));
    }
    outs.extend(p.flush().unwrap());
    assert_eq!(outs.len(), 1);
    assert!(same_as_cpu(
        &[0.5; 64],
        outs[0].data.as_deref().unwrap_or(&[])
    ));
}

#[test]
fn gpu_long_timed_runs_hold_events_for_the_chunks_in_flight_only() {
    let Some(ctx) = gpu_or_skip("gpu_long_timed_runs_hold_events_for_the_chunks_in_flight_only")
    else {
        return;
    };
    let chunk = 1 << 10;
    let chunks = scaled(3000, 100);
    let mut p = manager(&ctx, chunk, 3, true);
    fma_clamp(&mut p);
    let input = random_f32(80, chunk * chunks);
    let mut out = vec![0.0; input.len()];
    p.run(&input, &mut out).unwrap();
    assert!(same_as_cpu(&input, &out));
    let pooled = ctx.gpu().pooled_events();
    println!("{chunks} timed chunks: {pooled} idle events pooled afterwards");
    // Timed runs keep two events per step until the chunk retires: the pool
    // grows to what the ring holds at once, not to 2 x 4 x chunks.
    assert!(pooled < 200, "{pooled} events pooled after {chunks} chunks");
    assert_eq!(p.get_stats().chunks as usize, chunks);
}

/// A stage that fails on the fourth of eight iterations: that chunk's
/// index is skipped, the chunks before it are not lost (the GPU still has
/// them in flight and hands them back later, the host returned each at
/// once), and every chunk that comes back matches the CPU.
fn a_failed_iteration_keeps_the_chunks_before_it(b: &TestBackend, chunk: usize) {
    let mut p = b.manager(PipelineConfig {
        chunk_bytes: chunk * 4,
        slots: 3,
        timing: true,
        ..PipelineConfig::default()
    });
    fma_clamp(&mut p);
    // Fails on its fourth chunk (index 3), after chunks 0..3 were queued.
    b.add_failing_copy(&mut p, "picky", 4, "chunk rejected");
    let steps = 8;
    let inputs: Vec<Vec<f32>> = (0..steps)
        .map(|k| random_f32(90 + k as u64, chunk - k * 7))
        .collect();
    let mut back = Vec::new();
    for (k, input) in inputs.iter().enumerate() {
        match p.execute_iteration(input) {
            Ok(done) => {
                if !b.is_gpu() {
                    // The host runs each chunk at once and hands it back.
                    let indices: Vec<u64> = done.iter().map(|c| c.index).collect();
                    assert_eq!(indices, vec![k as u64], "call {k}");
                }
                back.extend(done);
            }
            Err(err) => {
                assert_eq!(k, 3);
                assert!(
                    matches!(&err, Error::Stage { stage, chunk: 3, .. } if stage == "picky"),
                    "{err}"
                );
                // Chunks 0..3 are not lost: still pending, handed back later.
                assert!(p.pending_iterations() <= 3);
            }
        }
    }
    let rest = p.flush().unwrap();
    if !b.is_gpu() {
        assert!(rest.is_empty(), "the host has nothing left to flush");
    }
    back.extend(rest);
    assert_eq!(
        back.iter().map(|c| c.index).collect::<Vec<_>>(),
        vec![0, 1, 2, 4, 5, 6, 7],
        "the failed chunk's index is skipped, the others come back in order"
    );
    for c in &back {
        assert!(
            same_as_cpu(&inputs[c.index as usize], c.data.as_deref().unwrap_or(&[])),
            "chunk {} differs",
            c.index
        );
    }
    assert_eq!(p.pending_iterations(), 0);
}

#[test]
fn host_a_failed_iteration_keeps_the_chunks_before_it() {
    a_failed_iteration_keeps_the_chunks_before_it(&TestBackend::Host, 64);
}

#[test]
fn gpu_a_failed_iteration_keeps_the_chunks_before_it() {
    let Some(b) = TestBackend::gpu_or_skip("gpu_a_failed_iteration_keeps_the_chunks_before_it")
    else {
        return;
    };
    a_failed_iteration_keeps_the_chunks_before_it(&b, scaled(1 << 18, 1 << 10));
}

/// Drops chunks shorter than 1000 elements (output length 0); passes the
/// others through (on the host a copy, on the GPU a clamp to the whole
/// range).
struct DropShort;

impl prism_pipeline::Stage<f32> for DropShort {
    fn name(&self) -> &str {
        "drop-short"
    }
    fn output_len(&self, n: usize) -> usize {
        if n < 1000 {
            0
        } else {
            n
        }
    }
    fn elementwise(&self) -> bool {
        false
    }
    fn has_gpu(&self) -> bool {
        true
    }
    fn has_host(&self) -> bool {
        true
    }
    fn host(&self, i: &[f32], o: &mut [f32]) -> Result<(), prism_pipeline::StageError> {
        o.copy_from_slice(&i[..o.len()]);
        Ok(())
    }
    fn gpu(
        &mut self,
        l: &mut prism_stream::Launch<'_>,
        i: &prism_stream::DeviceBuffer<f32>,
        o: &mut prism_stream::DeviceBuffer<f32>,
        n: usize,
    ) -> Result<(), prism_pipeline::StageError> {
        if n < 1000 {
            return Ok(());
        }
        Ok(l.clamp(i, o, n, f32::MIN, f32::MAX)?)
    }
}

/// Chunks of eight lengths, four of them under 1000 elements, through
/// `DropShort`, fma and clamp: the short ones come back empty (from a
/// stream, from `execute_iteration`, and on the GPU from
/// `execute_iteration_pinned`, which leaves their output ranges alone), the
/// others match the CPU. On the host a last stage reports the lengths it
/// ran on: the stages after `DropShort` skip the chunks it emptied.
fn chunks_a_stage_empties_come_back_empty(b: &TestBackend) {
    let chunk = 1 << 12;
    let mut p = b.manager(PipelineConfig {
        chunk_bytes: chunk * 4,
        slots: 3,
        timing: true,
        ..PipelineConfig::default()
    });
    p.add_stage(DropShort);
    fma_clamp(&mut p);
    let ran_on = (!b.is_gpu()).then(|| {
        // Stages are Send: the last stage reports the lengths it saw.
        let (tx, rx) = std::sync::mpsc::channel::<usize>();
        p.add_stage(HostFn::new(
            "after",
            true,
            move |i: &[f32], o: &mut [f32]| {
                tx.send(i.len()).unwrap();
                o.copy_from_slice(i);
                Ok(())
            },
        ));
        rx
    });
    let lens = [chunk, 10, 999, 1000, 1, chunk, 500, 2000];
    let inputs: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(k, &n)| random_f32(120 + k as u64, n))
        .collect();
    let want = |k: usize| -> Vec<f32> {
        if lens[k] < 1000 {
            Vec::new()
        } else {
            inputs[k].iter().map(|x| cpu(*x)).collect()
        }
    };
    // A stream whose source gives these lengths.
    let mut next = 0;
    let mut seen = Vec::new();
    let counts = p
        .run_stream(
            fill_with(|dst: &mut [f32]| {
                let Some(input) = inputs.get(next) else {
                    return Ok::<_, BoxError>(0);
                };
                next += 1;
                dst[..input.len()].copy_from_slice(input);
                Ok(input.len())
            }),
            sink_fn(|k, out: &[f32]| {
                seen.push((k, out.to_vec()));
                Ok::<_, BoxError>(())
            }),
        )
        .unwrap();
    // fill_with ends at the first 0, so every chunk here is non-empty.
    assert_eq!(counts.chunks as usize, lens.len());
    assert_eq!(seen.len(), lens.len(), "every chunk reaches the sink");
    for (k, out) in &seen {
        let w = want(*k as usize);
        assert!(
            out.len() == w.len() && out.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()),
            "stream chunk {k}: {} elements back, {} wanted",
            out.len(),
            w.len()
        );
    }
    // execute_iteration, pageable.
    let mut back = Vec::new();
    for input in &inputs {
        back.extend(p.execute_iteration(input).unwrap());
    }
    back.extend(p.flush().unwrap());
    assert_eq!(back.len(), lens.len());
    for c in &back {
        let w = want(c.index as usize);
        let got = c.data.as_deref().unwrap_or(&[1.0]);
        assert!(
            got.len() == w.len() && got.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()),
            "iteration chunk {} differs",
            c.index
        );
    }
    if let Some(rx) = ran_on {
        // The stream's chunks ran on several threads: compare sorted.
        let mut seen: Vec<usize> = rx.try_iter().collect();
        let mut want: Vec<usize> = lens.iter().copied().filter(|&n| n >= 1000).collect();
        want.extend(want.clone());
        seen.sort_unstable();
        want.sort_unstable();
        assert_eq!(seen, want, "the later stage ran on an empty chunk");
    }
    let Some(gpu) = b.gpu() else {
        return;
    };
    // execute_iteration_pinned: an emptied chunk leaves its output range alone.
    let n: usize = lens.iter().sum();
    let all: Vec<f32> = inputs.concat();
    let src = PinnedBuffer::from_slice(gpu, &all, HostAllocFlags::DEFAULT).unwrap();
    let mut dst =
        PinnedBuffer::from_slice(gpu, &vec![f32::NAN; n], HostAllocFlags::DEFAULT).unwrap();
    let mut at = 0;
    for &len in &lens {
        p.execute_iteration_pinned(&src, at..at + len, &mut dst, at)
            .unwrap();
        at += len;
    }
    p.flush().unwrap();
    let got = dst.as_slice().unwrap();
    let mut at = 0;
    for (k, &len) in lens.iter().enumerate() {
        let part = &got[at..at + len];
        if len < 1000 {
            assert!(
                part.iter().all(|v| v.is_nan()),
                "pinned chunk {k} was written"
            );
        } else {
            assert!(same_as_cpu(&inputs[k], part), "pinned chunk {k} differs");
        }
        at += len;
    }
}

#[test]
fn host_chunks_a_stage_empties_come_back_empty() {
    chunks_a_stage_empties_come_back_empty(&TestBackend::Host);
}

#[test]
fn gpu_chunks_a_stage_empties_come_back_empty() {
    let Some(b) = TestBackend::gpu_or_skip("gpu_chunks_a_stage_empties_come_back_empty") else {
        return;
    };
    chunks_a_stage_empties_come_back_empty(&b);
}
