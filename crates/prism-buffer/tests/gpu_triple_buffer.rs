//! GPU-gated tests of the GPU triple buffer. Without a GPU each prints SKIPPED.

use prism_buffer::{ChunkId, Error, GpuTripleBufferExt, SlotState, Step, TripleBuffer};
use prism_stream::{fma_chain_cpu, Launch};
use prism_testing::{gpu_or_skip, random_f32, scaled, under_sanitizer};

const A: f32 = 1.000_1;
const B: f32 = 0.25;
const ITERS: u32 = 4;

/// Streams `input` through `tb` in chunks of `chunk` elements with an fma
/// kernel; `before_download` may enqueue extra work on the download stream.
/// Returns (chunks checked, times upload found no free slot).
fn stream_through(
    tb: &mut TripleBuffer<f32>,
    input: &[f32],
    chunk: usize,
    mut before_download: impl FnMut(&mut TripleBuffer<f32>),
) -> (u64, u64) {
    let chunks: Vec<&[f32]> = input.chunks(chunk).collect();
    let (mut next_up, mut next_out, mut blocked) = (0usize, 0u64, 0u64);
    while (next_out as usize) < chunks.len() {
        let mut progressed = false;
        if next_up < chunks.len() {
            match tb.upload(chunks[next_up]) {
                Ok(id) => {
                    assert_eq!(id, ChunkId(next_up as u64));
                    next_up += 1;
                    progressed = true;
                }
                Err(Error::NoSlotReady {
                    step: Step::Upload, ..
                }) => blocked += 1,
                Err(e) => panic!("upload: {e}"),
            }
        }
        if tb.get_process_buffer().is_some() {
            tb.process(|l: &mut Launch<'_>, buf, n| l.fma_chain_in_place(buf, n, A, B, ITERS))
                .unwrap();
            progressed = true;
        }
        if tb.get_download_buffer().is_some() {
            before_download(tb);
            tb.download().unwrap();
            progressed = true;
        }
        let check = |id: ChunkId, out: &[f32]| {
            let src = chunks[id.0 as usize];
            assert_eq!(
                out.len(),
                src.len(),
                "chunk {} came back with the wrong length",
                id.0
            );
            let bad = src
                .iter()
                .zip(out)
                .position(|(x, y)| fma_chain_cpu(*x, A, B, ITERS).to_bits() != y.to_bits());
            assert!(
                bad.is_none(),
                "chunk {} element {} differs from the CPU reference",
                id.0,
                bad.unwrap_or(0)
            );
            id
        };
        let got = if progressed {
            tb.take_output(check).unwrap()
        } else {
            tb.wait_output(check).unwrap()
        };
        if let Some(id) = got {
            assert_eq!(id, ChunkId(next_out), "chunks came out of order");
            next_out += 1;
        }
    }
    assert_eq!(tb.in_flight(), 0);
    (next_out, blocked)
}

#[test]
fn gpu_triple_buffer_streams_1gib_with_overlap() {
    let Some(ctx) = gpu_or_skip("gpu_triple_buffer_streams_1gib_with_overlap") else {
        return;
    };
    let total = scaled(1 << 28, 1 << 18); // 1 GiB of f32
    let chunk = scaled(1 << 24, 1 << 14); // 64 MiB
    let input = random_f32(42, total);
    let mut tb = ctx.create_triple_buffer::<f32>(chunk).unwrap();
    // Phase 1, correctness: every output element of the 1 GiB is checked
    // against the CPU. The host's per-chunk copying and checking dominate here.
    let t = std::time::Instant::now();
    let (chunks, _) = stream_through(&mut tb, &input, chunk, |_| {});
    assert_eq!(chunks as usize, total.div_ceil(chunk));
    println!(
        "prism triple buffer: {} MiB in {chunks} chunks, every element checked, host wall {:.1} ms",
        (total * 4) >> 20,
        t.elapsed().as_secs_f64() * 1e3
    );

    // Phase 2, overlap: the same 1 GiB of chunk traffic with the host doing no
    // per-chunk copy (each slot re-sends the pinned data it holds, outputs are
    // not read), so the GPU timeline shows what the three streams do at once.
    tb.enable_timing().unwrap();
    let n_chunks = total.div_ceil(chunk);
    let (mut up, mut out) = (0, 0);
    while out < n_chunks {
        if up < n_chunks && tb.get_upload_buffer().is_some() {
            tb.upload_with(chunk, |_| {}).unwrap();
            up += 1;
        }
        if tb.get_process_buffer().is_some() {
            tb.process(|l: &mut Launch<'_>, buf, n| l.fma_chain_in_place(buf, n, A, B, ITERS))
                .unwrap();
        }
        if tb.get_download_buffer().is_some() {
            tb.download().unwrap();
        }
        let blocked = up == n_chunks || tb.get_upload_buffer().is_none();
        let got = if blocked {
            tb.wait_output(|id, _| id).unwrap()
        } else {
            tb.take_output(|id, _| id).unwrap()
        };
        if let Some(id) = got {
            assert_eq!(
                id.0 as usize,
                chunks as usize + out,
                "chunks came out of order"
            );
            out += 1;
        }
    }
    let spans = tb.take_timeline();
    assert_eq!(spans.len(), 3 * n_chunks);
    assert!(tb.take_timeline().is_empty(), "spans were handed out twice");
    let busy: f64 = spans.iter().map(|s| s.end_ms - s.start_ms).sum();
    let first = spans
        .iter()
        .map(|s| s.start_ms)
        .fold(f64::INFINITY, f64::min);
    let last = spans.iter().map(|s| s.end_ms).fold(0.0, f64::max);
    let wall = last - first;
    let per = |step| {
        spans
            .iter()
            .filter(|s| s.step == step)
            .map(|s| s.end_ms - s.start_ms)
            .sum::<f64>()
    };
    println!(
        "prism triple buffer overlap: {} MiB in {n_chunks} chunks, GPU wall {wall:.2} ms; step sums: upload {:.2} ms, process {:.2} ms, download {:.2} ms; sum {busy:.2} ms = {:.2}x the wall time",
        (total * 4) >> 20,
        per(Step::Upload),
        per(Step::Process),
        per(Step::Download),
        busy / wall
    );
    if !under_sanitizer() {
        assert!(
            busy > 1.3 * wall,
            "steps did not overlap: their GPU times sum to {busy:.2} ms over a {wall:.2} ms wall"
        );
    }
    assert!(tb.get_states().iter().all(|s| s.state == SlotState::Free));
}

#[test]
fn gpu_triple_buffer_slow_download_waits_and_stays_correct() {
    let Some(ctx) = gpu_or_skip("gpu_triple_buffer_slow_download_waits_and_stays_correct") else {
        return;
    };
    let total = scaled(1 << 22, 1 << 14);
    let chunk = scaled(1 << 18, 1 << 11);
    let input = random_f32(7, total);
    let mut tb = ctx.create_triple_buffer::<f32>(chunk).unwrap();
    let (chunks, blocked) = stream_through(&mut tb, &input, chunk, |tb| {
        // A 2 ms kernel ahead of every download: the download lane is the bottleneck.
        tb.lane_mut(Step::Download)
            .launch()
            .spin(2_000_000)
            .unwrap();
    });
    assert_eq!(chunks as usize, total.div_ceil(chunk));
    // compute-sanitizer serialises the work, so a slot may always be free.
    assert!(
        blocked > 0 || under_sanitizer(),
        "uploads never had to wait for a slot, so the slow download exercised nothing"
    );
    println!("prism triple buffer (slow download): {chunks} chunks correct; upload found no free slot {blocked} times");
}

#[test]
fn gpu_triple_buffer_bad_input() {
    let Some(ctx) = gpu_or_skip("gpu_triple_buffer_bad_input") else {
        return;
    };
    let gpu = ctx.gpu();
    assert!(matches!(
        TripleBuffer::<f32>::new(gpu, 0),
        Err(Error::ZeroLength { .. })
    ));
    assert!(matches!(
        TripleBuffer::<f32>::with_slots(gpu, 16, 9),
        Err(Error::InvalidSlotCount { .. })
    ));
    assert!(matches!(
        TripleBuffer::<f32>::with_slots(gpu, 16, 1),
        Err(Error::InvalidSlotCount { .. })
    ));
    let mut tb = TripleBuffer::<f32>::with_slots(gpu, 16, 2).unwrap();
    assert!(matches!(
        tb.upload(&[0.0; 17]),
        Err(Error::ChunkTooLong {
            len: 17,
            capacity: 16
        })
    ));
    assert!(matches!(tb.upload(&[]), Err(Error::ZeroLength { .. })));
    assert!(matches!(
        tb.process(|_, _, _| Ok(())),
        Err(Error::NoSlotReady {
            step: Step::Process,
            ..
        })
    ));
    assert!(matches!(
        tb.download(),
        Err(Error::NoSlotReady {
            step: Step::Download,
            ..
        })
    ));
    tb.upload(&[1.0; 16]).unwrap();
    tb.upload(&[2.0; 8]).unwrap();
    assert!(
        matches!(
            tb.upload(&[3.0; 4]),
            Err(Error::NoSlotReady {
                step: Step::Upload,
                ..
            })
        ),
        "a third chunk went into a 2-slot ring"
    );
    let no_streams = prism_stream::ManagedGpuContext::new(0, false).unwrap();
    assert!(no_streams.create_triple_buffer::<f32>(16).is_err());
}

/// Issue #10, hole 1: a `process` closure that queues a kernel and then
/// fails used to leave the kernel unrecorded, so dropping the buffer freed
/// device memory the kernel was still writing. Now the kernel is fenced as
/// it is queued: the drop waits for it, and the chunk can be processed again.
#[test]
fn gpu_misuse_failed_process_keeps_its_kernels_fenced() {
    let Some(ctx) = gpu_or_skip("gpu_misuse_failed_process_keeps_its_kernels_fenced") else {
        return;
    };
    let n = 1 << 16;
    let input = random_f32(9, n);
    let mut tb = ctx.create_triple_buffer::<f32>(n).unwrap();
    tb.upload(&input).unwrap();
    let err = tb
        .process(|l, buf, len| {
            l.spin(300_000_000)?;
            l.fma_chain_in_place(buf, len, A, B, ITERS)?;
            Err(prism_stream::Error::ZeroLength {
                what: "a user's check after the kernel",
            })
        })
        .unwrap_err();
    assert!(
        matches!(err, Error::Stream(prism_stream::Error::ZeroLength { .. })),
        "{err}"
    );
    assert_eq!(
        tb.get_process_buffer().map(|s| s.0),
        Some(0),
        "a failed process must leave the chunk waiting to be processed"
    );
    let t = std::time::Instant::now();
    drop(tb);
    if !under_sanitizer() {
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(100),
            "the ring was freed after {:?}, under a 300 ms kernel that writes it",
            t.elapsed()
        );
    }
}
