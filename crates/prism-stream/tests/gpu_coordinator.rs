//! GPU-gated tests of the coordinator, buffers, streams and events.
//! Without a GPU each prints `SKIPPED` (see prism_testing).

use std::time::{Duration, Instant};

use prism_stream::{
    fma_chain_cpu, pattern, DeviceBuffer, Error, HostAllocFlags, Lane, ManagedGpuContext, OpId,
    OpStatus, PinnedBuffer, StreamPool, StreamPurpose,
};
use prism_testing::{gpu_or_skip, random_f32, scaled, under_sanitizer};

fn assert_fma(input: &[f32], out: &[f32], a: f32, b: f32, iters: u32) {
    let bad: Vec<usize> = (0..input.len())
        .filter(|&i| fma_chain_cpu(input[i], a, b, iters).to_bits() != out[i].to_bits())
        .take(5)
        .collect();
    assert!(
        bad.is_empty(),
        "outputs differ from the CPU reference at {bad:?} (first: got {} want {})",
        out[bad[0]],
        fma_chain_cpu(input[bad[0]], a, b, iters)
    );
}

#[test]
fn gpu_chain_upload_compute_download_matches_cpu() {
    let Some(mut ctx) = gpu_or_skip("gpu_chain_upload_compute_download_matches_cpu") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    let n = scaled(1 << 24, 1 << 16) + 3; // odd length: exercises the scalar tail
    let input = random_f32(1, n);
    let src = PinnedBuffer::from_slice(&gpu, &input, HostAllocFlags::DEFAULT).unwrap();
    let mut dst = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    let mut x = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let mut y = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let c = ctx.async_coordinator_mut().unwrap();
    let up = c.queue_upload(&src, &mut x, &[]).unwrap();
    let k = c
        .queue_compute("fma", &[up], |l| l.fma_chain(&x, &mut y, n, 1.5, -0.25, 3))
        .unwrap();
    let down = c.queue_download(&y, &mut dst, &[k]).unwrap();
    c.wait(down).unwrap();
    assert_fma(&input, dst.as_slice().unwrap(), 1.5, -0.25, 3);
    assert_eq!(c.status(down).unwrap(), OpStatus::Complete);
}

#[test]
fn gpu_dependency_orders_work_across_streams() {
    let Some(mut ctx) = gpu_or_skip("gpu_dependency_orders_work_across_streams") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    let n = 1 << 16;
    let src = PinnedBuffer::from_slice(&gpu, &random_f32(2, n), HostAllocFlags::DEFAULT).unwrap();
    let mut other = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let c = ctx.async_coordinator_mut().unwrap();
    // A long kernel, then an upload into an unrelated buffer that depends on it:
    // only the dependency can hold the upload back.
    let long = c
        .queue_compute("spin", &[], |l| l.spin(300_000_000))
        .unwrap();
    let up = c.queue_upload(&src, &mut other, &[long]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let seen: Vec<OpId> = c.poll().into_iter().map(|d| d.op).collect();
    assert!(
        !seen.contains(&up),
        "the dependent upload completed while its dependency was still running"
    );
    assert_eq!(c.status(up).unwrap(), OpStatus::Pending);
    c.wait(up).unwrap();
    c.poll();
    assert_eq!(
        c.status(long).unwrap(),
        OpStatus::Complete,
        "upload finished before the op it depends on"
    );
    // And without the dependency, the same upload does not wait.
    let long2 = c
        .queue_compute("spin", &[], |l| l.spin(300_000_000))
        .unwrap();
    let free = c.queue_upload(&src, &mut other, &[]).unwrap();
    c.wait(free).unwrap();
    if !under_sanitizer() {
        // compute-sanitizer serialises GPU work, so only check this outside it.
        assert_eq!(
            c.status(long2).unwrap(),
            OpStatus::Pending,
            "independent upload waited for an unrelated kernel"
        );
    }
    c.synchronize_all().unwrap();
}

#[test]
fn gpu_buffer_hazards_are_ordered_without_deps() {
    let Some(mut ctx) = gpu_or_skip("gpu_buffer_hazards_are_ordered_without_deps") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    let n = scaled(1 << 22, 1 << 14);
    let first = random_f32(3, n);
    let second = random_f32(4, n);
    let h1 = PinnedBuffer::from_slice(&gpu, &first, HostAllocFlags::DEFAULT).unwrap();
    let h2 = PinnedBuffer::from_slice(&gpu, &second, HostAllocFlags::DEFAULT).unwrap();
    let mut out = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    let mut x = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let mut y = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let c = ctx.async_coordinator_mut().unwrap();
    c.queue_upload(&h1, &mut x, &[]).unwrap();
    // Kernel reads x after a long spin; the next upload overwrites x (write-after-read)
    // and must wait for the kernel although nobody declared a dependency.
    c.queue_compute("spin+fma", &[], |l| {
        l.spin(100_000_000)?;
        l.fma_chain(&x, &mut y, n, 2.0, 1.0, 1)
    })
    .unwrap();
    c.queue_upload(&h2, &mut x, &[]).unwrap();
    let d = c.queue_download(&y, &mut out, &[]).unwrap();
    c.wait(d).unwrap();
    assert_fma(&first, out.as_slice().unwrap(), 2.0, 1.0, 1);
}

#[test]
fn gpu_poll_reports_incomplete_then_complete() {
    let Some(mut ctx) = gpu_or_skip("gpu_poll_reports_incomplete_then_complete") else {
        return;
    };
    let c = ctx.async_coordinator_mut().unwrap();
    let op = c
        .queue_compute("spin", &[], |l| l.spin(200_000_000))
        .unwrap();
    let t = Instant::now();
    assert!(
        c.poll().is_empty(),
        "poll reported the 200 ms kernel done at once"
    );
    if !under_sanitizer() {
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "poll blocked for {:?}",
            t.elapsed()
        );
    }
    assert_eq!(c.status(op).unwrap(), OpStatus::Pending);
    let err = c.wait_timeout(op, Duration::from_millis(10)).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    c.wait(op).unwrap();
    let done = c.poll();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].op, op);
    assert!(done[0].result.is_ok());
    assert!(c.poll().is_empty(), "an op was reported twice");
}

/// Many ops on three streams wait behind a long kernel: while it runs (checked
/// after each poll, so the check cannot race), `poll` reports nothing. Then,
/// as they drain, `poll` (which bisects each stream instead of probing every
/// op) reports every op exactly once, each stream's ops in queue order, and a
/// download it reports can be read at once and holds the CPU's answer.
#[test]
fn gpu_poll_reports_every_op_once_while_work_drains() {
    let Some(mut ctx) = gpu_or_skip("gpu_poll_reports_every_op_once_while_work_drains") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    let n = 4096;
    let ops = scaled(150, 30);
    let input = random_f32(7, n);
    let src = PinnedBuffer::from_slice(&gpu, &input, HostAllocFlags::DEFAULT).unwrap();
    let mut x = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let mut ys: Vec<DeviceBuffer<f32>> = (0..ops)
        .map(|_| DeviceBuffer::zeroed(&mut lane, n).unwrap())
        .collect();
    let mut outs: Vec<PinnedBuffer<f32>> = (0..ops)
        .map(|_| PinnedBuffer::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap())
        .collect();
    let c = ctx.async_coordinator_mut().unwrap();
    // Long enough to outlast queueing everything, also under compute-sanitizer.
    let hold_ns = if under_sanitizer() {
        3_000_000_000
    } else {
        300_000_000
    };
    let hold = c.queue_compute("hold", &[], |l| l.spin(hold_ns)).unwrap();
    let up = c.queue_upload(&src, &mut x, &[hold]).unwrap();
    let mut computes = vec![hold];
    let mut downloads = Vec::new();
    for (i, (y, out)) in ys.iter_mut().zip(outs.iter_mut()).enumerate() {
        let k = c
            .queue_compute("spin + fma", &[up], |l| {
                l.spin(200_000)?;
                l.fma_chain(&x, y, n, 1.0, i as f32, 1)
            })
            .unwrap();
        computes.push(k);
        downloads.push(c.queue_download(y, out, &[k]).unwrap());
    }
    let total = 2 + 2 * ops;
    // While the hold is still running after a poll, nothing queued can have
    // finished before or during that poll.
    let mut held_polls = 0;
    // The last poll's report, made when the hold may already have ended.
    let first_report = loop {
        let done = c.poll();
        let still_held = matches!(
            c.wait_timeout(hold, Duration::ZERO),
            Err(Error::Timeout { .. })
        );
        if !still_held {
            break done;
        }
        assert!(
            done.is_empty(),
            "poll reported {:?} while the kernel they wait for still ran",
            done.iter().map(|d| d.op).collect::<Vec<_>>()
        );
        held_polls += 1;
        std::thread::sleep(Duration::from_micros(200));
    };
    // compute-sanitizer may queue so slowly that the hold ends first.
    assert!(
        held_polls > 0 || under_sanitizer(),
        "the hold ended before queueing did"
    );
    // Per op id: the poll (count) that reported it.
    let mut reported_in: Vec<Option<usize>> = vec![None; total];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut polls = 0;
    let mut partial_polls = 0;
    let mut carried = Some(first_report);
    while reported_in.iter().any(Option::is_none) {
        assert!(Instant::now() < deadline, "ops never reported complete");
        let done = match carried.take() {
            Some(report) => report,
            None => c.poll(),
        };
        polls += 1;
        let unreported = reported_in.iter().filter(|r| r.is_none()).count();
        if !done.is_empty() && done.len() < unreported {
            partial_polls += 1;
        }
        for d in done {
            assert!(d.result.is_ok(), "{} failed: {:?}", d.op, d.result);
            let slot = &mut reported_in[d.op.index() as usize];
            assert!(slot.is_none(), "{} reported twice", d.op);
            *slot = Some(polls);
            if let Some(i) = downloads.iter().position(|&op| op == d.op) {
                let got = outs[i]
                    .as_slice()
                    .unwrap_or_else(|e| panic!("poll reported {} done, but: {e}", d.op));
                assert_fma(&input, got, 1.0, i as f32, 1);
            }
        }
    }
    for lane in [&computes, &downloads] {
        let order: Vec<usize> = lane
            .iter()
            .map(|op| reported_in[op.index() as usize].unwrap())
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] <= w[1]),
            "a stream's ops were reported out of queue order: {order:?}"
        );
    }
    assert!(c.poll().is_empty(), "an op was reported twice");
    if !under_sanitizer() {
        assert!(
            partial_polls > 0,
            "no poll saw the streams part-way through ({polls} polls)"
        );
    }
    eprintln!(
        "{total} ops: nothing reported over {held_polls} polls while held, then {polls} polls ({partial_polls} with some of the rest)"
    );
}

#[test]
fn gpu_pinned_buffer_is_locked_while_in_flight() {
    let Some(mut ctx) = gpu_or_skip("gpu_pinned_buffer_is_locked_while_in_flight") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    let n = 1 << 16;
    let mut d = DeviceBuffer::<u32>::zeroed(&mut lane, n).unwrap();
    let mut host = PinnedBuffer::<u32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    let c = ctx.async_coordinator_mut().unwrap();
    let k = c
        .queue_compute("spin+fill", &[], |l| {
            l.spin(200_000_000)?;
            l.fill_pattern(&mut d, n, 77)
        })
        .unwrap();
    let down = c.queue_download(&d, &mut host, &[k]).unwrap();
    // compute-sanitizer may finish the work before these checks: only outside it.
    if !under_sanitizer() {
        assert!(matches!(host.as_slice(), Err(Error::BufferInFlight { .. })));
        assert!(matches!(
            host.as_mut_slice(),
            Err(Error::BufferInFlight { .. })
        ));
    }
    c.wait(down).unwrap();
    let got = host.as_slice().unwrap();
    assert!(
        (0..n).all(|i| got[i] == pattern(77, i as u64)),
        "download did not carry the pattern"
    );
}

#[test]
fn gpu_drop_waits_for_queued_copies() {
    let Some(mut ctx) = gpu_or_skip("gpu_drop_waits_for_queued_copies") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    let n = 1 << 20;
    let mut d = DeviceBuffer::<u32>::zeroed(&mut lane, n).unwrap();
    let mut host = PinnedBuffer::<u32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    let c = ctx.async_coordinator_mut().unwrap();
    let k = c
        .queue_compute("spin", &[], |l| l.spin(200_000_000))
        .unwrap();
    c.queue_download(&d, &mut host, &[k]).unwrap();
    let t = Instant::now();
    drop(host); // must block until the download has finished writing it
    assert!(
        t.elapsed() >= Duration::from_millis(100) || under_sanitizer(),
        "pinned buffer freed after {:?}, while its download was queued behind a 200 ms kernel",
        t.elapsed()
    );
    let _ = &mut d;
    c.synchronize_all().unwrap();
}

#[test]
fn gpu_staged_upload_from_pageable_memory() {
    let Some(mut ctx) = gpu_or_skip("gpu_staged_upload_from_pageable_memory") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    let n = scaled(3 << 20, 1 << 12);
    let mut data = random_f32(5, n);
    let mut x = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let mut out = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    let c = ctx.async_coordinator_mut().unwrap();
    let k0 = c
        .queue_compute("spin", &[], |l| l.spin(50_000_000))
        .unwrap();
    let up = c.queue_upload_slice(&data, &mut x, &[k0]).unwrap();
    let expected = data.clone();
    data.iter_mut().for_each(|v| *v = f32::NAN); // the caller's memory is free on return
    let d = c.queue_download(&x, &mut out, &[up]).unwrap();
    c.wait(d).unwrap();
    assert!(out
        .as_slice()
        .unwrap()
        .iter()
        .zip(&expected)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn gpu_bad_input_gets_typed_errors() {
    let Some(mut ctx) = gpu_or_skip("gpu_bad_input_gets_typed_errors") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    assert!(matches!(
        DeviceBuffer::<f32>::zeroed(&mut lane, 0),
        Err(Error::ZeroLength { .. })
    ));
    assert!(matches!(
        PinnedBuffer::<f32>::new(&gpu, 0, HostAllocFlags::DEFAULT),
        Err(Error::ZeroLength { .. })
    ));
    if !under_sanitizer() {
        // compute-sanitizer rightly reports the failing cuMemAlloc as an API error.
        assert!(matches!(
            DeviceBuffer::<f32>::zeroed(&mut lane, 1 << 40),
            Err(Error::OutOfMemory { .. })
        ));
    }
    let small = PinnedBuffer::<f32>::new(&gpu, 8, HostAllocFlags::DEFAULT).unwrap();
    let big = PinnedBuffer::<f32>::new(&gpu, 16, HostAllocFlags::DEFAULT).unwrap();
    let mut d8 = DeviceBuffer::<f32>::zeroed(&mut lane, 8).unwrap();
    let mut d16 = DeviceBuffer::<f32>::zeroed(&mut lane, 16).unwrap();
    let c = ctx.async_coordinator_mut().unwrap();
    assert!(matches!(
        c.queue_upload(&big, &mut d8, &[]),
        Err(Error::LengthMismatch { .. })
    ));
    // An id of another coordinator is refused, whatever its index.
    let mut other = prism_stream::AsyncCoordinator::new(&gpu).unwrap();
    let mut foreign: Vec<OpId> = Vec::new();
    for _ in 0..3 {
        foreign.push(other.queue_upload(&small, &mut d16, &[]).unwrap());
    }
    other.synchronize_all().unwrap();
    for f in &foreign {
        assert!(matches!(
            c.queue_upload(&small, &mut d16, &[*f]),
            Err(Error::ForeignOp(id)) if id == *f
        ));
        assert!(matches!(c.wait(*f), Err(Error::ForeignOp(_))));
        assert!(matches!(c.status(*f), Err(Error::ForeignOp(_))));
    }
    assert!(matches!(
        c.queue_compute("too long", &[], |l| l
            .fma_chain_in_place(&mut d8, 9, 1.0, 0.0, 1)),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        c.queue_compute("zero", &[], |l| l
            .fma_chain_in_place(&mut d8, 0, 1.0, 0.0, 1)),
        Err(Error::ZeroLength { .. })
    ));
    c.synchronize_all().unwrap();
    let no_streams = ManagedGpuContext::new(0, false).unwrap();
    assert!(matches!(
        no_streams.async_coordinator(),
        Err(Error::StreamsDisabled { .. })
    ));
}

#[test]
fn gpu_stream_pool_round_robin_and_return() {
    let Some(ctx) = gpu_or_skip("gpu_stream_pool_round_robin_and_return") else {
        return;
    };
    let pool = StreamPool::new(ctx.gpu(), 2).unwrap();
    let a = pool.acquire(StreamPurpose::Compute).unwrap();
    let b = pool.acquire(StreamPurpose::Compute).unwrap();
    assert_ne!(
        a.stream_id(),
        b.stream_id(),
        "two acquisitions from two streams gave the same one"
    );
    assert_eq!(pool.in_use(StreamPurpose::Compute), 2);
    assert_eq!(pool.in_use(StreamPurpose::Upload), 0);
    drop(a);
    assert_eq!(pool.in_use(StreamPurpose::Compute), 1);
    let c = pool.acquire(StreamPurpose::Compute).unwrap();
    assert_ne!(
        c.stream_id(),
        b.stream_id(),
        "least-used stream not preferred"
    );
    // SAFETY: only the handle is compared; nothing is queued on the raw stream.
    let raw = unsafe { c.cuda_stream() }.cu_stream();
    assert!(!raw.is_null(), "handed out the legacy default stream");
    assert!(matches!(
        StreamPool::new(ctx.gpu(), 0),
        Err(Error::ZeroLength { .. })
    ));
    let sized = StreamPool::with_counts(ctx.gpu(), [1, 3, 1, 0]).unwrap();
    assert_eq!(
        StreamPurpose::ALL.map(|p| sized.len(p)),
        [1, 3, 1, 0],
        "with_counts made the wrong number of streams"
    );
    assert!(matches!(
        sized.acquire(StreamPurpose::Auxiliary),
        Err(Error::ZeroLength { .. })
    ));
    assert!(matches!(
        StreamPool::with_counts(ctx.gpu(), [1, 17, 1, 1]),
        Err(Error::LengthMismatch { actual: 17, .. })
    ));
}

#[test]
fn gpu_event_pool_reaches_steady_state() {
    let Some(mut ctx) = gpu_or_skip("gpu_event_pool_reaches_steady_state") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    let n = 1024;
    let src = PinnedBuffer::from_slice(&gpu, &random_f32(6, n), HostAllocFlags::DEFAULT).unwrap();
    let mut x = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let c = ctx.async_coordinator_mut().unwrap();
    let mut round = |c: &mut prism_stream::AsyncCoordinator| {
        for _ in 0..50 {
            let up = c.queue_upload(&src, &mut x, &[]).unwrap();
            c.queue_compute("fma", &[up], |l| {
                l.fma_chain_in_place(&mut x, n, 1.0, 1.0, 1)
            })
            .unwrap();
        }
        c.synchronize_all().unwrap();
        c.poll();
    };
    round(c);
    let after_first = gpu.pooled_events();
    round(c);
    round(c);
    assert!(
        gpu.pooled_events() <= after_first + 2,
        "event pool kept growing: {} -> {}",
        after_first,
        gpu.pooled_events()
    );
}

#[test]
fn gpu_zero_copy_gather_and_scatter_round_trip() {
    let Some(ctx) = gpu_or_skip("gpu_zero_copy_gather_and_scatter_round_trip") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    // Odd lengths: exercises the unaligned (byte) path as well as the 16-byte one.
    let lens: Vec<usize> = (0..scaled(300, 20))
        .map(|k| 1 + (k * 7919) % 5000)
        .collect();
    let inputs: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(k, &n)| random_f32(100 + k as u64, n))
        .collect();
    let items: Vec<PinnedBuffer<f32>> = inputs
        .iter()
        .map(|v| PinnedBuffer::from_slice(&gpu, v, HostAllocFlags::DEFAULT).unwrap())
        .collect();
    let mut outs: Vec<PinnedBuffer<f32>> = lens
        .iter()
        .map(|&n| {
            PinnedBuffer::from_slice(&gpu, &vec![f32::NAN; n], HostAllocFlags::DEFAULT).unwrap()
        })
        .collect();
    let total: usize = lens.iter().sum();
    let mut dev = DeviceBuffer::<f32>::zeroed(&mut lane, total).unwrap();
    let mut desc_in =
        PinnedBuffer::<u64>::new(&gpu, 3 * lens.len(), HostAllocFlags::DEFAULT).unwrap();
    let mut desc_out =
        PinnedBuffer::<u64>::new(&gpu, 3 * lens.len(), HostAllocFlags::DEFAULT).unwrap();
    let mut l = lane.launch();
    let refs: Vec<&PinnedBuffer<f32>> = items.iter().collect();
    assert_eq!(
        l.gather_pinned(&refs, &mut desc_in, &mut dev).unwrap(),
        total
    );
    l.fma_chain_in_place(&mut dev, total, 1.5, -0.25, 2)
        .unwrap();
    l.spin(50_000_000).unwrap(); // keeps the scatter pending while the host checks below
    let mut out_refs: Vec<&mut PinnedBuffer<f32>> = outs.iter_mut().collect();
    assert_eq!(
        l.scatter_pinned(&dev, &mut out_refs, &mut desc_out)
            .unwrap(),
        total
    );
    if !under_sanitizer() {
        // compute-sanitizer may have finished the work by now.
        assert!(
            matches!(outs[0].as_slice(), Err(Error::BufferInFlight { .. })),
            "output readable while the scatter may still write it"
        );
    }
    for (i, o) in inputs.iter().zip(&outs) {
        assert_fma(i, o.wait_slice().unwrap(), 1.5, -0.25, 2);
    }
}
