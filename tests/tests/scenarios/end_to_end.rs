//! The design's end-to-end flow on GPU 0, in the order a user meets it:
//! `ManagedGpuContext::new(0, true)` (through `gpu_or_skip`), its
//! `AsyncCoordinator` (uploads from pageable and pinned memory, computes
//! ordered by op-id dependencies, downloads, `poll` and `wait`), a
//! `TripleBuffer` from `create_triple_buffer`, then a pipeline from
//! `create_pipeline_manager`. Every output is compared bit for bit with
//! the CPU.

use std::time::{Duration, Instant};

use prism_buffer::{ChunkId, GpuTripleBufferExt};
use prism_pipeline::{BackendKind, Clamp, Fma, GpuPipelineExt, PipelineConfig};
use prism_stream::{fma_chain_cpu, HostAllocFlags, Launch, OpStatus, PinnedBuffer};
use prism_testing::{gpu_or_skip, random_f32, scaled};
use prism_tests::{assert_same_bits, clamp_cpu, ScaledGroupSum};

const A: f32 = 1.000_1;
const B: f32 = -0.5;
const ITERS: u32 = 3;
const LO: f32 = -0.5;
const HI: f32 = 0.5;

fn fma_cpu(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| fma_chain_cpu(v, A, B, ITERS)).collect()
}

#[test]
fn gpu_end_to_end_coordinator_triple_buffer_pipeline() {
    let Some(mut ctx) = gpu_or_skip("gpu_end_to_end_coordinator_triple_buffer_pipeline") else {
        return;
    };
    assert!(ctx.streams_enabled());
    println!("device: {:?}", ctx.device_info());
    let gpu = ctx.gpu().clone();

    // 1. The coordinator: x <- a (pageable, staged), y <- b (pinned);
    //    x = fma(x) after its upload; z = clamp(x) after that; y = fma(y)
    //    after its upload; z and y downloaded after their kernels.
    let n = scaled(1 << 22, 1 << 14) + 3;
    let (a, b) = (random_f32(201, n), random_f32(202, n));
    let b_pinned = PinnedBuffer::from_slice(&gpu, &b, HostAllocFlags::DEFAULT).unwrap();
    let mut z_out = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    let mut y_out = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    assert!(ctx.async_coordinator().is_ok());
    let c = ctx.async_coordinator_mut().unwrap();
    let mut x = c.zeroed::<f32>(n).unwrap();
    let mut y = c.zeroed::<f32>(n).unwrap();
    let mut z = c.zeroed::<f32>(n).unwrap();
    let up_a = c.queue_upload_slice(&a, &mut x, &[]).unwrap();
    let up_b = c.queue_upload(&b_pinned, &mut y, &[]).unwrap();
    let fma_x = c
        .queue_compute("fma x", &[up_a], |l| {
            l.fma_chain_in_place(&mut x, n, A, B, ITERS)
        })
        .unwrap();
    let clamp_z = c
        .queue_compute("clamp z", &[fma_x], |l| l.clamp(&x, &mut z, n, LO, HI))
        .unwrap();
    let fma_y = c
        .queue_compute("fma y", &[up_b], |l| {
            l.fma_chain_in_place(&mut y, n, A, B, ITERS)
        })
        .unwrap();
    let down_z = c.queue_download(&z, &mut z_out, &[clamp_z]).unwrap();
    let down_y = c.queue_download(&y, &mut y_out, &[fma_y]).unwrap();
    // poll (never blocks) until y's download is observed, then wait for z's.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    while c.status(down_y).unwrap() != OpStatus::Complete {
        for done in c.poll() {
            assert!(done.result.is_ok(), "{}: {:?}", done.name, done.result);
            seen.push(done.name);
        }
        assert!(Instant::now() < deadline, "y's download never completed");
        std::thread::sleep(Duration::from_micros(200));
    }
    c.wait(down_z).unwrap();
    c.synchronize_all().unwrap();
    // Once polled, the coordinator reports every op exactly once, those
    // that wait and synchronize_all saw finish included.
    seen.extend(c.poll().into_iter().map(|d| d.name));
    assert_eq!(seen.len(), 7, "ops reported by poll: {seen:?}");
    for op in [up_a, up_b, fma_x, clamp_z, fma_y, down_z, down_y] {
        assert_eq!(c.status(op).unwrap(), OpStatus::Complete);
    }
    let want_y = fma_cpu(&b);
    let want_z: Vec<f32> = fma_cpu(&a)
        .into_iter()
        .map(|v| clamp_cpu(v, LO, HI))
        .collect();
    assert_same_bits("coordinator: y", y_out.as_slice().unwrap(), &want_y);
    assert_same_bits("coordinator: z", z_out.as_slice().unwrap(), &want_z);

    // 2. The triple buffer: chunks uploaded, processed in place, downloaded
    //    and taken in order, the host never waiting while it can issue.
    let chunk = scaled(1 << 20, 1 << 12);
    let input = random_f32(203, scaled(16 << 20, 1 << 16) + 5);
    let want = fma_cpu(&input);
    let mut tb = ctx.create_triple_buffer::<f32>(chunk).unwrap();
    let chunks: Vec<&[f32]> = input.chunks(chunk).collect();
    let mut got = Vec::with_capacity(input.len());
    let (mut next_up, mut next_out) = (0, 0u64);
    while (next_out as usize) < chunks.len() {
        let mut progressed = false;
        if next_up < chunks.len() && tb.get_upload_buffer().is_some() {
            assert_eq!(tb.upload(chunks[next_up]).unwrap(), ChunkId(next_up as u64));
            next_up += 1;
            progressed = true;
        }
        if tb.get_process_buffer().is_some() {
            tb.process(|l: &mut Launch<'_>, buf, len| l.fma_chain_in_place(buf, len, A, B, ITERS))
                .unwrap();
            progressed = true;
        }
        if tb.get_download_buffer().is_some() {
            tb.download().unwrap();
            progressed = true;
        }
        let take = |id: ChunkId, out: &[f32]| {
            got.extend_from_slice(out);
            id
        };
        let taken = if progressed {
            tb.take_output(take).unwrap()
        } else {
            tb.wait_output(take).unwrap()
        };
        if let Some(id) = taken {
            assert_eq!(id, ChunkId(next_out), "triple buffer: chunks out of order");
            next_out += 1;
        }
    }
    assert_eq!(tb.in_flight(), 0);
    assert_same_bits("triple buffer", &got, &want);

    // 3. The pipeline on the same context: prism's stages and a user's own.
    let mut p = ctx
        .create_pipeline_manager::<f32>(PipelineConfig {
            chunk_bytes: chunk * 4,
            ..PipelineConfig::default()
        })
        .unwrap();
    assert_eq!(p.backend(), BackendKind::Gpu);
    let sums = ScaledGroupSum {
        group: 8,
        scale: 0.125,
        offset: 0.0,
    };
    p.add_stage(Fma {
        a: A,
        b: B,
        iters: ITERS,
    });
    p.add_stage(Clamp { lo: LO, hi: HI });
    p.add_stage(sums);
    let clamped: Vec<f32> = want.iter().map(|&v| clamp_cpu(v, LO, HI)).collect();
    let want = sums.reference(&clamped, chunk);
    let mut out = vec![f32::NAN; p.total_output_len(input.len())];
    p.run(&input, &mut out).unwrap();
    assert_same_bits("pipeline: run", &out, &want);
    println!("{}", p.get_stats());
    let src = PinnedBuffer::from_slice(&gpu, &input, HostAllocFlags::DEFAULT).unwrap();
    let mut dst = PinnedBuffer::<f32>::new(&gpu, want.len(), HostAllocFlags::DEFAULT).unwrap();
    p.run_pinned(&src, &mut dst).unwrap();
    assert_same_bits("pipeline: run_pinned", dst.wait_slice().unwrap(), &want);
}
