//! The misuse suite: for each way safe code could once make prism race the
//! GPU (issue #10), the misuse written as a user would write it, with the
//! public API only. Each test fails on the old design and passes now; holes
//! that became compile errors are in `compile_fail.rs`. GPU-gated: without
//! a GPU each prints `SKIPPED`.
//!
//! The checks that read results are robust to compute-sanitizer (which
//! serialises work): a host read either fails with `BufferInFlight` or
//! returns the final contents, never something in between.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use prism_stream::{
    DeviceBuffer, Error, Gpu, HostAllocFlags, Lane, PinnedBuffer, StreamPool, StreamPurpose,
};
use prism_testing::{gpu_or_skip, random_f32, scaled, under_sanitizer};

/// Either `BufferInFlight`, or exactly `want` (never stale or partial data).
fn in_flight_or_final(buf: &PinnedBuffer<f32>, want: &[f32], what: &str) -> bool {
    match buf.as_slice() {
        Err(Error::BufferInFlight { .. }) => true,
        Ok(got) => {
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: the host read the buffer before the GPU finished writing it"
            );
            false
        }
        Err(e) => panic!("{what}: {e}"),
    }
}

/// How a test leaves its launch scope.
#[derive(Debug, Clone, Copy)]
enum End {
    Dropped,
    Forgotten,
    /// Left through `?` from a function that fails after queueing.
    EarlyReturn,
}

/// Queues a spin and a scatter from `dev` into `out` in a scope, then fails.
fn scatter_then_fail(
    lane: &mut Lane,
    dev: &DeviceBuffer<f32>,
    out: &mut PinnedBuffer<f32>,
    desc: &mut PinnedBuffer<u64>,
) -> Result<(), Error> {
    let mut scope = lane.launch();
    scope.spin(300_000_000)?;
    scope.scatter_pinned(dev, &mut [out], desc)?;
    Err(Error::ZeroLength {
        what: "a later step of the user's function",
    })?;
    Ok(())
}

/// What a queued scatter uses: the output, what it must hold, and the
/// other buffers, all kept alive (freeing device or pinned memory makes the
/// driver synchronise the whole device, which would end the spin early).
struct Scattered {
    out: PinnedBuffer<f32>,
    want: Vec<f32>,
    _src: PinnedBuffer<f32>,
    _dev: DeviceBuffer<f32>,
    _desc: PinnedBuffer<u64>,
}

/// A scatter into a pinned output queued behind a long spin, in a launch
/// scope left as `end` says.
fn scatter_behind_spin(gpu: &Gpu, lane: &mut Lane, end: End) -> Scattered {
    let n = 4096;
    let input = random_f32(11, n);
    let src = PinnedBuffer::from_slice(gpu, &input, HostAllocFlags::DEFAULT).unwrap();
    let mut dev = DeviceBuffer::<f32>::zeroed(lane, n).unwrap();
    lane.copy_htod(&src, 0, &mut dev, 0, n).unwrap();
    let mut out = PinnedBuffer::from_slice(gpu, &vec![-1.0; n], HostAllocFlags::DEFAULT).unwrap();
    let mut desc = PinnedBuffer::<u64>::new(gpu, 3, HostAllocFlags::DEFAULT).unwrap();
    if let End::EarlyReturn = end {
        assert!(scatter_then_fail(lane, &dev, &mut out, &mut desc).is_err());
    } else {
        let mut scope = lane.launch();
        scope.spin(300_000_000).unwrap();
        scope
            .scatter_pinned(&dev, &mut [&mut out], &mut desc)
            .unwrap();
        match end {
            End::Forgotten => std::mem::forget(scope),
            _ => drop(scope),
        }
    }
    Scattered {
        out,
        want: input,
        _src: src,
        _dev: dev,
        _desc: desc,
    }
}

/// Hole 1: a launch scope that is dropped, forgotten, or left through `?`
/// used to record nothing, and the host read the old value.
#[test]
fn gpu_misuse_launch_scope_dropped_or_forgotten_still_fences() {
    let Some(ctx) = gpu_or_skip("gpu_misuse_launch_scope_dropped_or_forgotten_still_fences") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    for end in [End::Dropped, End::Forgotten, End::EarlyReturn] {
        let how = format!("{end:?} scope");
        let how = how.as_str();
        let Scattered { out, want, .. } = &scatter_behind_spin(&gpu, &mut lane, end);
        let pending = in_flight_or_final(out, want, how);
        if !under_sanitizer() {
            assert!(pending, "{how}: the scatter ran in under 300 ms?");
        }
        let got = out.wait_slice().unwrap();
        assert!(got
            .iter()
            .zip(want.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    // Freeing the output must wait for the scatter too.
    let Scattered {
        out,
        _src,
        _dev,
        _desc,
        ..
    } = scatter_behind_spin(&gpu, &mut lane, End::Forgotten);
    let t = Instant::now();
    drop(out);
    if !under_sanitizer() {
        assert!(
            t.elapsed() >= Duration::from_millis(100),
            "a pinned buffer under a queued scatter was freed after {:?}",
            t.elapsed()
        );
    }
}

/// Hole 1, through the coordinator: the compute closure queues a scatter and
/// then fails; the op is not created, but the buffer is still fenced.
#[test]
fn gpu_misuse_failed_compute_closure_keeps_its_kernels_fenced() {
    let Some(mut ctx) = gpu_or_skip("gpu_misuse_failed_compute_closure_keeps_its_kernels_fenced")
    else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let n = 4096;
    let input = random_f32(12, n);
    let src = PinnedBuffer::from_slice(&gpu, &input, HostAllocFlags::DEFAULT).unwrap();
    let mut out = PinnedBuffer::from_slice(&gpu, &vec![-1.0; n], HostAllocFlags::DEFAULT).unwrap();
    let mut desc = PinnedBuffer::<u64>::new(&gpu, 3, HostAllocFlags::DEFAULT).unwrap();
    let c = ctx.async_coordinator_mut().unwrap();
    let mut dev = c.zeroed::<f32>(n).unwrap();
    let up = c.queue_upload(&src, &mut dev, &[]).unwrap();
    let err = c
        .queue_compute("scatter then fail", &[up], |l| {
            l.spin(300_000_000)?;
            l.scatter_pinned(&dev, &mut [&mut out], &mut desc)?;
            Err(Error::ZeroLength {
                what: "a user's check after the scatter",
            })
        })
        .unwrap_err();
    assert!(matches!(err, Error::ZeroLength { .. }), "{err}");
    let pending = in_flight_or_final(&out, &input, "after a failed closure");
    if !under_sanitizer() {
        assert!(pending, "the scatter ran in under 300 ms?");
    }
    assert_eq!(out.wait_slice().unwrap(), &input[..]);
}

/// Hole 1: one descriptor buffer used for two gathers in one scope used to
/// be rewritten while the first kernel still read it. Now the second gather
/// is refused and the first one's result is intact.
#[test]
fn gpu_misuse_descriptor_reuse_is_refused_not_corrupted() {
    let Some(ctx) = gpu_or_skip("gpu_misuse_descriptor_reuse_is_refused_not_corrupted") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    let (a, b) = (random_f32(13, 1000), random_f32(14, 1000));
    let ha = PinnedBuffer::from_slice(&gpu, &a, HostAllocFlags::DEFAULT).unwrap();
    let hb = PinnedBuffer::from_slice(&gpu, &b, HostAllocFlags::DEFAULT).unwrap();
    let mut desc = PinnedBuffer::<u64>::new(&gpu, 3, HostAllocFlags::DEFAULT).unwrap();
    let mut d1 = DeviceBuffer::<f32>::zeroed(&mut lane, 1000).unwrap();
    let mut d2 = DeviceBuffer::<f32>::zeroed(&mut lane, 1000).unwrap();
    let mut back = PinnedBuffer::<f32>::new(&gpu, 1000, HostAllocFlags::DEFAULT).unwrap();
    let mut scope = lane.launch();
    scope.spin(200_000_000).unwrap();
    scope.gather_pinned(&[&ha], &mut desc, &mut d1).unwrap();
    let second = scope.gather_pinned(&[&hb], &mut desc, &mut d2);
    if !under_sanitizer() {
        assert!(
            matches!(second, Err(Error::BufferInFlight { .. })),
            "descriptors rewritten while a queued gather still reads them: {second:?}"
        );
    }
    drop(scope);
    lane.copy_dtoh(&d1, 0, &mut back, 0, 1000).unwrap();
    assert_eq!(
        back.wait_slice().unwrap(),
        &a[..],
        "the first gather was corrupted"
    );
}

/// Hole 2: lanes that share one pooled stream, used from several threads,
/// with fences handed to a checker on another stream. The checker's reads
/// must wait for each fill, whatever order the threads recorded in.
#[test]
fn gpu_misuse_threads_share_a_stream_and_keep_every_wait() {
    let Some(ctx) = gpu_or_skip("gpu_misuse_threads_share_a_stream_and_keep_every_wait") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let pool = StreamPool::with_counts(&gpu, [0, 1, 0, 1]).unwrap();
    let (n, rounds, threads) = (1 << 16, scaled(60, 6), 4);
    let (to_checker, checker_in) = mpsc::channel::<(u32, DeviceBuffer<u32>)>();
    let mut backs = Vec::new();
    for _ in 0..threads {
        backs.push(mpsc::channel::<DeviceBuffer<u32>>());
    }
    let mut checker = pool.acquire(StreamPurpose::Auxiliary).unwrap();
    let mut counters = DeviceBuffer::<u64>::zeroed(&mut checker, 2).unwrap();
    let mut host = PinnedBuffer::<u64>::new(&gpu, 2, HostAllocFlags::DEFAULT).unwrap();
    std::thread::scope(|s| {
        let mut returns = Vec::new();
        for (t, (back_tx, back_rx)) in backs.into_iter().enumerate() {
            returns.push(back_tx);
            let (pool, to_checker) = (&pool, to_checker.clone());
            s.spawn(move || {
                let mut lane = pool.acquire(StreamPurpose::Compute).unwrap();
                let mut buf = DeviceBuffer::<u32>::zeroed(&mut lane, n).unwrap();
                for r in 0..rounds {
                    let seed = (t * 1000 + r) as u32;
                    let mut l = lane.launch();
                    l.spin(((t + r) % 3) as u64 * 200_000).unwrap();
                    l.fill_pattern(&mut buf, n, seed).unwrap();
                    to_checker.send((seed, buf)).unwrap();
                    buf = back_rx.recv().unwrap();
                }
            });
        }
        drop(to_checker);
        for (seed, buf) in checker_in.iter() {
            let t = (seed / 1000) as usize;
            let mut l = checker.launch();
            l.check_pattern(&buf, n, seed, &mut counters).unwrap();
            drop(l);
            checker.copy_dtoh(&counters, 0, &mut host, 0, 2).unwrap();
            let got = host.wait_slice().unwrap();
            assert_eq!(
                got[0], 0,
                "seed {seed}: {} elements read before the fill that made them (first at {})",
                got[0], got[1]
            );
            returns[t].send(buf).unwrap();
        }
    });
}

/// Hole 4: prism's context keeps cudarc's event tracking, so `CudaSlice`s a
/// user makes there keep cudarc's cross-stream ordering.
#[test]
fn gpu_misuse_cudarc_context_keeps_event_tracking() {
    let Some(ctx) = gpu_or_skip("gpu_misuse_cudarc_context_keeps_event_tracking") else {
        return;
    };
    let cuda = ctx.gpu().cuda_context();
    assert!(
        cuda.is_event_tracking(),
        "prism handed out a tracking-disabled context"
    );
    let (s1, s2) = (cuda.new_stream().unwrap(), cuda.new_stream().unwrap());
    let n = scaled(1 << 24, 1 << 16);
    let data: Vec<f32> = random_f32(15, n);
    let slice = s1.clone_htod(&data).unwrap();
    // Read on another stream at once: cudarc's tracking orders it after the copy.
    let back = s2.clone_dtoh(&slice).unwrap();
    assert_eq!(back, data);
}

/// Hole 5: a copy on a stream of another context is refused before anything
/// is queued (it used to be queued, and then its fence failed to record).
#[test]
fn gpu_misuse_other_context_is_refused_before_queueing() {
    let Some(ctx) = gpu_or_skip("gpu_misuse_other_context_is_refused_before_queueing") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let other = Gpu::open_private(0).unwrap();
    assert!(!other.same_context(&gpu));
    let mut lane = Lane::new(&gpu).unwrap();
    let mut foreign_lane = Lane::new(&other).unwrap();
    let src = PinnedBuffer::from_slice(&gpu, &[1.0f32; 64], HostAllocFlags::DEFAULT).unwrap();
    let mut dev = DeviceBuffer::<f32>::zeroed(&mut lane, 64).unwrap();
    let err = foreign_lane
        .copy_htod(&src, 0, &mut dev, 0, 64)
        .unwrap_err();
    assert!(matches!(err, Error::WrongContext { .. }), "{err}");
    let mut out = PinnedBuffer::<f32>::new(&other, 64, HostAllocFlags::DEFAULT).unwrap();
    let err = lane.copy_dtoh(&dev, 0, &mut out, 0, 64).unwrap_err();
    assert!(matches!(err, Error::WrongContext { .. }), "{err}");
    let err = foreign_lane
        .launch()
        .fma_chain_in_place(&mut dev, 64, 1.0, 1.0, 1)
        .unwrap_err();
    assert!(matches!(err, Error::WrongContext { .. }), "{err}");
    // The refusals left both sides usable: a correct round trip works.
    let mut back = PinnedBuffer::<f32>::new(&gpu, 64, HostAllocFlags::DEFAULT).unwrap();
    lane.copy_htod(&src, 0, &mut dev, 0, 64).unwrap();
    lane.copy_dtoh(&dev, 0, &mut back, 0, 64).unwrap();
    assert_eq!(back.wait_slice().unwrap(), &[1.0f32; 64][..]);
    assert!(out.as_slice().is_ok());
    foreign_lane.synchronize().unwrap();
}

/// Hole 6: a new stream may get the handle of a destroyed one; fences of
/// the old stream must not count as the new stream's own.
#[test]
fn gpu_misuse_reused_stream_handle_is_not_the_same_stream() {
    let Some(ctx) = gpu_or_skip("gpu_misuse_reused_stream_handle_is_not_the_same_stream") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let n = 1 << 16;
    let mut checker_lane = Lane::new(&gpu).unwrap();
    let mut counters = DeviceBuffer::<u64>::zeroed(&mut checker_lane, 2).unwrap();
    let mut host = PinnedBuffer::<u64>::new(&gpu, 2, HostAllocFlags::DEFAULT).unwrap();
    let mut reused = 0;
    for round in 0..scaled(20, 3) {
        let mut a = Lane::new(&gpu).unwrap();
        // SAFETY: only the handle value is read; nothing is queued on it.
        let old = unsafe { a.cuda_stream() }.cu_stream() as usize;
        let mut buf = DeviceBuffer::<u32>::zeroed(&mut a, n).unwrap();
        let mut l = a.launch();
        l.spin(50_000_000).unwrap();
        l.fill_pattern(&mut buf, n, round as u32).unwrap();
        drop(l);
        let old_id = a.stream_id();
        drop(a); // destroys the stream; its work still runs
        let mut b = Lane::new(&gpu).unwrap();
        // SAFETY: as above.
        reused += usize::from(unsafe { b.cuda_stream() }.cu_stream() as usize == old);
        assert_ne!(b.stream_id(), old_id, "a stream id was reused");
        // The check on the new stream must wait for the fill on the old one.
        b.launch()
            .check_pattern(&buf, n, round as u32, &mut counters)
            .unwrap();
        b.copy_dtoh(&counters, 0, &mut host, 0, 2).unwrap();
        assert_eq!(host.wait_slice().unwrap()[0], 0, "read before the fill");
        drop(b);
    }
    eprintln!("the driver reused a destroyed stream's handle in {reused} rounds");
}

/// Hole 8: a coordinator whose ops are only waited on (never polled) keeps
/// its op table, event pool and staging bounded by the work in flight.
#[test]
fn gpu_misuse_memory_stays_bounded_by_work_in_flight() {
    let Some(mut ctx) = gpu_or_skip("gpu_misuse_memory_stays_bounded_by_work_in_flight") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let n = 1024;
    let src = PinnedBuffer::from_slice(&gpu, &random_f32(16, n), HostAllocFlags::DEFAULT).unwrap();
    let mut dst = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    let c = ctx.async_coordinator_mut().unwrap();
    let mut x = c.zeroed::<f32>(n).unwrap();
    let mut y = c.zeroed::<f32>(n).unwrap();
    let steps = scaled(20_000, 300);
    let (mut peak_ops, mut peak_events) = (0, 0);
    for k in 0..steps {
        let up = c.queue_upload(&src, &mut x, &[]).unwrap();
        let f = c
            .queue_compute("fma", &[up], |l| l.fma_chain(&x, &mut y, n, 1.0, 1.0, 1))
            .unwrap();
        let d = c.queue_download(&y, &mut dst, &[f]).unwrap();
        if k % 4 == 3 {
            c.wait(d).unwrap();
        }
        peak_ops = peak_ops.max(c.retained_ops());
        peak_events = peak_events.max(gpu.pooled_events());
    }
    c.synchronize_all().unwrap();
    eprintln!("{steps} steps: op table peaked at {peak_ops} entries, event pool at {peak_events}");
    // Bounded by the work in flight and the sweep's amortisation (it runs
    // when the pending ops double, from 256 on), not by the 3 x steps ops.
    assert!(peak_ops < 1100, "the op table grew to {peak_ops} entries");
    assert!(
        peak_events < 1200,
        "the event pool grew to {peak_events} events"
    );
    // A large pageable upload's staging does not stay pinned for ever: it
    // is freed at the next synchronize_all (freeing pinned memory makes the
    // driver synchronise the device, so only blocking calls trim).
    let big = vec![0.5f32; 80 << 20]; // 320 MiB, staged in 512 MiB
    let mut dbig = c.zeroed::<f32>(big.len()).unwrap();
    c.queue_upload_slice(&big, &mut dbig, &[]).unwrap();
    c.synchronize_all().unwrap();
    for _ in 0..8 {
        c.queue_upload_slice(&big[..1024], &mut x, &[]).unwrap();
        c.synchronize_all().unwrap();
    }
    let (_, bytes) = c.staging_held();
    assert!(
        bytes <= 256 << 20,
        "staging holds {bytes} bytes after small uploads"
    );
}

/// Hole 9: the safe constructor hands out zeroed memory, never stale bytes
/// (compute-sanitizer's initcheck runs over this too).
#[test]
fn gpu_misuse_fresh_device_buffer_reads_as_zeros() {
    let Some(ctx) = gpu_or_skip("gpu_misuse_fresh_device_buffer_reads_as_zeros") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    let n = scaled(1 << 24, 1 << 12);
    // Leave garbage behind in device memory first.
    {
        let mut dirty = DeviceBuffer::<u32>::zeroed(&mut lane, n).unwrap();
        lane.launch().fill_pattern(&mut dirty, n, 99).unwrap();
    }
    let fresh = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let mut out =
        PinnedBuffer::from_slice(&gpu, &vec![1.0f32; n], HostAllocFlags::DEFAULT).unwrap();
    lane.copy_dtoh(&fresh, 0, &mut out, 0, n).unwrap();
    assert!(out.wait_slice().unwrap().iter().all(|v| v.to_bits() == 0));
}

/// Found in review: a compute closure swaps the scope it was handed for one
/// on a lane of its own. The op must still end on the compute lane, so a
/// wait on it cannot settle (by stream order) the ops queued before it while
/// they still run.
#[test]
fn gpu_misuse_swapped_launch_scope_cannot_settle_earlier_ops() {
    let Some(mut ctx) = gpu_or_skip("gpu_misuse_swapped_launch_scope_cannot_settle_earlier_ops")
    else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let n = 4096;
    let input = random_f32(17, n);
    let src = PinnedBuffer::from_slice(&gpu, &input, HostAllocFlags::DEFAULT).unwrap();
    let mut out = PinnedBuffer::from_slice(&gpu, &vec![-1.0; n], HostAllocFlags::DEFAULT).unwrap();
    let mut desc = PinnedBuffer::<u64>::new(&gpu, 3, HostAllocFlags::DEFAULT).unwrap();
    let leaked: &'static mut Lane = Box::leak(Box::new(Lane::new(&gpu).unwrap()));
    let c = ctx.async_coordinator_mut().unwrap();
    let mut dev = c.zeroed::<f32>(n).unwrap();
    let up = c.queue_upload(&src, &mut dev, &[]).unwrap();
    let a = c
        .queue_compute("spin, scatter", &[up], |l| {
            l.spin(300_000_000)?;
            l.scatter_pinned(&dev, &mut [&mut out], &mut desc).map(drop)
        })
        .unwrap();
    let b = c
        .queue_compute("swapped", &[], move |s| {
            let mut mine = leaked.launch();
            mine.spin(1)?;
            std::mem::swap(s, &mut mine);
            Ok(())
        })
        .unwrap();
    c.wait(b).unwrap();
    // b ended on the compute lane, after a: a (and its scatter) finished.
    assert_eq!(c.status(a).unwrap(), prism_stream::OpStatus::Complete);
    let got = out.as_mut_slice().unwrap();
    assert!(
        got.iter()
            .zip(&input)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "the host got the output before the scatter wrote it"
    );
}
