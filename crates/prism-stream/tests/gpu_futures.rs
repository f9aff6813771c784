//! GPU completion awaited from async Rust (tokio): many fences awaited at
//! once on one completion thread, and a coordinator op's future. Without a
//! GPU each test prints `SKIPPED` (see prism_testing).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prism_stream::{
    fma_chain_cpu, AsyncCoordinator, DeviceBuffer, Error, Fence, HostAllocFlags, Lane, OpStatus,
    PinnedBuffer,
};
use prism_testing::{gpu_or_skip, random_f32, scaled};
use rand::{RngExt, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_time()
        .build()
        .unwrap()
}

/// Threads of this process named `prism-complete` (Linux: from
/// `/proc/self/task/*/comm`); `None` where there is no `/proc`.
fn completion_threads() -> Option<usize> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    Some(
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim_end() == "prism-complete")
            .count(),
    )
}

/// One round trip: host → device → host, checked against its source.
struct RoundTrip {
    src: PinnedBuffer<f32>,
    dst: PinnedBuffer<f32>,
    _dev: DeviceBuffer<f32>,
}

#[test]
fn gpu_futures_two_hundred_fences_awaited_on_one_thread() {
    let Some(ctx) = gpu_or_skip("gpu_futures_two_hundred_fences_awaited_on_one_thread") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(21);
    let n = scaled(1 << 16, 1 << 10);
    let mut lanes: Vec<Lane> = (0..4).map(|_| Lane::new(&gpu).unwrap()).collect();
    let mut fences: Vec<Fence> = Vec::new();
    let mut trips: Vec<RoundTrip> = Vec::new();
    for (l, lane) in lanes.iter_mut().enumerate() {
        let mut ops = 0;
        // A long head start: everything after it is still queued when awaited.
        let mut scope = lane.launch();
        scope.spin(50_000_000).unwrap();
        fences.push(scope.last_fence().unwrap().clone());
        ops += 1;
        while ops < 50 {
            if ops + 2 <= 50 && rng.random_range(0..3u32) == 0 {
                let data = random_f32(1000 * l as u64 + ops as u64, n);
                let src = PinnedBuffer::from_slice(&gpu, &data, HostAllocFlags::DEFAULT).unwrap();
                let mut dst = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
                let mut dev = DeviceBuffer::<f32>::zeroed(lane, n).unwrap();
                fences.push(lane.copy_htod(&src, 0, &mut dev, 0, n).unwrap());
                fences.push(lane.copy_dtoh(&dev, 0, &mut dst, 0, n).unwrap());
                trips.push(RoundTrip {
                    src,
                    dst,
                    _dev: dev,
                });
                ops += 2;
            } else {
                let mut scope = lane.launch();
                scope.spin(rng.random_range(10_000..500_000u64)).unwrap();
                fences.push(scope.last_fence().unwrap().clone());
                ops += 1;
            }
        }
    }
    assert_eq!(fences.len(), 200);

    let rt = runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, most) = (Arc::clone(&stop), Arc::clone(&most));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                if let Some(k) = completion_threads() {
                    most.fetch_max(k, Ordering::AcqRel);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for (i, f) in fences.iter().enumerate() {
            // Both ways of awaiting: `completion()` and `IntoFuture`.
            if i % 2 == 0 {
                let wait = f.completion();
                set.spawn(async move { (i, wait.await) });
            } else {
                let f = f.clone();
                set.spawn(async move { (i, f.await) });
            }
        }
        while let Some(joined) = set.join_next().await {
            let (i, result) = joined.unwrap();
            result.unwrap_or_else(|e| panic!("fence {i}: {e}"));
        }
    });
    // The thread outlives the waits by its idle second.
    let after = completion_threads();
    stop.store(true, Ordering::Release);
    sampler.join().unwrap();
    if let Some(after) = after {
        assert_eq!(after, 1, "one completion thread for 200 waits");
        assert_eq!(
            most.load(Ordering::Acquire),
            1,
            "more than one completion thread during the waits"
        );
    }
    for (i, f) in fences.iter().enumerate() {
        assert!(
            f.is_complete().unwrap(),
            "fence {i} resolved but is not complete"
        );
    }
    for (k, t) in trips.iter().enumerate() {
        assert_eq!(
            t.dst.as_slice().unwrap(),
            t.src.as_slice().unwrap(),
            "round trip {k} came back different"
        );
    }
}

#[test]
fn gpu_futures_op_future_of_a_coordinator_op() {
    let Some(mut ctx) = gpu_or_skip("gpu_futures_op_future_of_a_coordinator_op") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let n = scaled(1 << 20, 1 << 12);
    let input = random_f32(3, n);
    let src = PinnedBuffer::from_slice(&gpu, &input, HostAllocFlags::DEFAULT).unwrap();
    let mut dst = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    let c = ctx.async_coordinator_mut().unwrap();
    let mut x = c.zeroed::<f32>(n).unwrap();
    let mut y = c.zeroed::<f32>(n).unwrap();
    let up = c.queue_upload(&src, &mut x, &[]).unwrap();
    let k = c
        .queue_compute("spin + fma", &[up], |l| {
            l.spin(30_000_000)?;
            l.fma_chain(&x, &mut y, n, 1.5, -0.25, 3)
        })
        .unwrap();
    let down = c.queue_download(&y, &mut dst, &[k]).unwrap();
    let rt = runtime();
    // Send + 'static: spawned while the coordinator stays usable here.
    let downloaded = rt.spawn(c.op_future(down).unwrap());
    let computed = rt.spawn(c.op_future(k).unwrap());
    assert_eq!(c.status(down).unwrap(), OpStatus::Pending);
    rt.block_on(async {
        computed.await.unwrap().unwrap();
        downloaded.await.unwrap().unwrap();
    });
    // Resolved means complete: the download's data is there.
    let out = dst.as_slice().unwrap();
    for i in 0..n {
        assert_eq!(
            out[i].to_bits(),
            fma_chain_cpu(input[i], 1.5, -0.25, 3).to_bits(),
            "element {i}"
        );
    }
    // The coordinator learns it at its next poll; a finished op's future
    // resolves at once.
    c.poll();
    assert_eq!(c.status(down).unwrap(), OpStatus::Complete);
    rt.block_on(c.op_future(down).unwrap()).unwrap();
    rt.block_on(c.op_future(up).unwrap()).unwrap();
    // Op ids of another coordinator are refused.
    let other = AsyncCoordinator::new(&gpu).unwrap();
    assert!(matches!(other.op_future(down), Err(Error::ForeignOp(id)) if id == down));
}
