//! Outside work (issue #21): GPU work prism does not enqueue itself, run on
//! a prism lane with the buffers it reads and writes named, is ordered
//! after their earlier uses and fenced for their later ones. Also the lane
//! ops a user meets first: `DeviceBuffer::from_slice`, `fill`,
//! `copy_dtod`, `read_value`/`read_async`, and the coordinator's
//! `queue_fill`/`queue_copy`/`queue_read` and user errors. Every output is
//! compared with a CPU reference. GPU-gated.

use std::time::{Duration, Instant};

use prism_stream::{AsyncCoordinator, DeviceBuffer, Error, Lane};
use prism_testing::{bits, gpu_or_skip, random_f32, scaled, spin_ns, under_sanitizer};

#[test]
fn gpu_outside_work_is_ordered_after_earlier_writes_and_before_later_reads() {
    let Some(ctx) =
        gpu_or_skip("gpu_outside_work_is_ordered_after_earlier_writes_and_before_later_reads")
    else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(1 << 22, 1 << 12);
    let data = random_f32(1, n);
    let (mut a, mut b, mut c) = (
        Lane::new(gpu).unwrap(),
        Lane::new(gpu).unwrap(),
        Lane::new(gpu).unwrap(),
    );
    let mut x = DeviceBuffer::<f32>::zeroed(&mut a, n).unwrap();
    let mut y = DeviceBuffer::<f32>::zeroed(&mut a, n).unwrap();
    a.synchronize().unwrap();
    // Lane a: a long spin, then x = data. Unordered, the copy below would
    // read zeros.
    a.launch().spin(spin_ns()).unwrap();
    a.upload_slice(&data, &mut x, 0).unwrap();
    // Lane b: cudarc's own safe copy through the views, x -> y.
    let mut o = b.outside();
    let (xi, yi) = (o.read(&x), o.write(&mut y));
    // SAFETY: the closure copies x into y (same length) on the block's stream.
    unsafe {
        o.run(|w| {
            let (xv, mut yv) = (w.view(xi)?, w.view_mut(yi)?);
            w.stream()
                .memcpy_dtod(&xv, &mut yv)
                .map_err(|e| Error::Driver {
                    call: "memcpy_dtod",
                    source: e,
                })
        })
    }
    .unwrap()
    .unwrap();
    // Lane c reads y: it must wait for lane b's outside work.
    let got = c.read_async(&y, 0, n).unwrap().wait().unwrap();
    assert_eq!(bits(&got), bits(&data), "outside work ran out of order");
}

#[test]
fn gpu_outside_work_is_fenced_for_later_writers() {
    let Some(ctx) = gpu_or_skip("gpu_outside_work_is_fenced_for_later_writers") else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(1 << 20, 1 << 10);
    let data = random_f32(2, n);
    let (mut a, mut b) = (Lane::new(gpu).unwrap(), Lane::new(gpu).unwrap());
    let x = DeviceBuffer::from_slice(&mut a, &data).unwrap();
    let mut y = DeviceBuffer::<f32>::zeroed(&mut a, n).unwrap();
    // Lane a: spin, then the outside copy x -> y; lane b then overwrites x.
    // Unfenced, b's fill would land before a's copy read x.
    a.launch().spin(spin_ns()).unwrap();
    let mut o = a.outside();
    let (xi, yi) = (o.read(&x), o.write(&mut y));
    // SAFETY: a copy of x into y on the block's stream.
    unsafe {
        o.run(|w| {
            let (xv, mut yv) = (w.view(xi).unwrap(), w.view_mut(yi).unwrap());
            w.stream().memcpy_dtod(&xv, &mut yv).unwrap();
        })
    }
    .unwrap();
    let mut x = x;
    b.fill(&mut x, 0, n, 7.0f32).unwrap();
    let y_now = b.read_async(&y, 0, n).unwrap().wait().unwrap();
    assert_eq!(
        bits(&y_now),
        bits(&data),
        "a later write overtook the outside read"
    );
    let x_now = b.read_value(&x, n - 1).unwrap();
    assert_eq!(x_now, 7.0);
}

#[test]
fn gpu_outside_view_on_another_stream_is_still_ordered() {
    let Some(ctx) = gpu_or_skip("gpu_outside_view_on_another_stream_is_still_ordered") else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(1 << 20, 1 << 10);
    let data = random_f32(3, n);
    let (mut a, mut b) = (Lane::new(gpu).unwrap(), Lane::new(gpu).unwrap());
    let mut x = DeviceBuffer::<f32>::zeroed(&mut a, n).unwrap();
    let mut y = DeviceBuffer::<f32>::zeroed(&mut a, n).unwrap();
    a.synchronize().unwrap();
    a.launch().spin(spin_ns()).unwrap();
    a.upload_slice(&data, &mut x, 0).unwrap();
    let other = gpu.cuda_context().new_stream().unwrap();
    let mut o = b.outside();
    let (xi, yi) = (o.read(&x), o.write(&mut y));
    // SAFETY: a copy x -> y; on another stream, which the views order by
    // host waits (the module docs' slow path).
    unsafe {
        o.run(|w| {
            let (xv, mut yv) = (w.view(xi).unwrap(), w.view_mut(yi).unwrap());
            other.memcpy_dtod(&xv, &mut yv).unwrap();
        })
    }
    .unwrap();
    let got = a.read_async(&y, 0, n).unwrap().wait().unwrap();
    assert_eq!(bits(&got), bits(&data));
}

#[test]
fn gpu_outside_refusals_name_what_is_wrong() {
    let Some(ctx) = gpu_or_skip("gpu_outside_refusals_name_what_is_wrong") else {
        return;
    };
    let gpu = ctx.gpu();
    let mut a = Lane::new(gpu).unwrap();
    let x = DeviceBuffer::<f32>::zeroed(&mut a, 64).unwrap();
    let y = DeviceBuffer::<f32>::zeroed(&mut a, 64).unwrap();
    // An argument of one block used in another.
    let mut first = a.outside();
    let stale = first.read(&x);
    // SAFETY: the closure enqueues nothing.
    unsafe { first.run(|_| ()) }.unwrap();
    let mut second = a.outside();
    let _ = second.read(&y);
    // SAFETY: the closure enqueues nothing.
    let r = unsafe { second.run(|w| w.view(stale).map(|_| ())) }.unwrap();
    assert!(matches!(r, Err(Error::WrongScope { .. })), "{r:?}");
    // A buffer of another context.
    let other = prism_stream::Gpu::open_private(0).unwrap();
    let z = DeviceBuffer::<f32>::zeroed(&mut Lane::new(&other).unwrap(), 64).unwrap();
    let mut o = a.outside();
    let _ = o.read(&z);
    // SAFETY: the closure enqueues nothing.
    let r = unsafe { o.run(|_| ()) };
    assert!(matches!(r, Err(Error::WrongContext { .. })), "{r:?}");
    // Typed views of another element size.
    let mut o = a.outside();
    let xi = o.read(&x);
    // SAFETY: the closure enqueues nothing.
    let lens = unsafe {
        o.run(|w| {
            use prism_stream::cudarc::driver::DeviceSlice;
            let pairs = w.view_as::<f32, [f32; 2]>(xi).map(|v| v.len());
            let bad = w.view_as::<f32, [u8; 3]>(xi).map(|v| v.len());
            (pairs, bad)
        })
    }
    .unwrap();
    assert_eq!(lens.0.unwrap(), 32);
    assert!(matches!(lens.1, Err(Error::LengthMismatch { .. })));
}

#[test]
fn gpu_outside_panic_still_fences_the_buffers() {
    let Some(ctx) = gpu_or_skip("gpu_outside_panic_still_fences_the_buffers") else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(1 << 20, 1 << 10);
    let data = random_f32(4, n);
    let mut a = Lane::new(gpu).unwrap();
    let x = DeviceBuffer::from_slice(&mut a, &data).unwrap();
    let mut y = DeviceBuffer::<f32>::zeroed(&mut a, n).unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        a.launch().spin(spin_ns()).unwrap();
        let mut o = a.outside();
        let (xi, yi) = (o.read(&x), o.write(&mut y));
        // SAFETY: a copy x -> y on the block's stream, then a panic.
        let _ = unsafe {
            o.run(|w| {
                let (xv, mut yv) = (w.view(xi).unwrap(), w.view_mut(yi).unwrap());
                w.stream().memcpy_dtod(&xv, &mut yv).unwrap();
                panic!("the user's closure panics after queueing work");
            })
        };
    }));
    assert!(caught.is_err());
    // The copy's fence was noted before the panic resumed: y is in use
    // until the spin and copy finish, and then holds x.
    assert!(
        !y.is_idle().unwrap(),
        "the panicking block's work went unfenced"
    );
    let got = Lane::new(gpu)
        .unwrap()
        .read_async(&y, 0, n)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(bits(&got), bits(&data));
}

#[test]
fn gpu_lane_ops_fill_copy_upload_and_read() {
    let Some(ctx) = gpu_or_skip("gpu_lane_ops_fill_copy_upload_and_read") else {
        return;
    };
    let gpu = ctx.gpu();
    let mut lane = Lane::new(gpu).unwrap();
    let n = scaled(1 << 20, 4096);
    let data = random_f32(5, n);
    let x = DeviceBuffer::from_slice(&mut lane, &data).unwrap();
    let mut y = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    lane.copy_dtod(&x, 10, &mut y, 20, n - 30).unwrap();
    lane.fill(&mut y, 0, 20, -2.5f32).unwrap();
    let got = lane.read_async(&y, 0, n).unwrap().wait().unwrap();
    let mut want = vec![0.0f32; n];
    want[..20].fill(-2.5);
    want[20..n - 10].copy_from_slice(&data[10..n - 20]);
    assert_eq!(bits(&got), bits(&want));
    // Every memset width.
    let mut b8 = DeviceBuffer::<u8>::zeroed(&mut lane, 33).unwrap();
    lane.fill(&mut b8, 1, 31, 0xA5u8).unwrap();
    let mut b16 = DeviceBuffer::<u16>::zeroed(&mut lane, 33).unwrap();
    lane.fill(&mut b16, 0, 33, 0xBEEFu16).unwrap();
    let mut b64 = DeviceBuffer::<u64>::from_slice(&mut lane, &[9u64; 5]).unwrap();
    lane.fill(&mut b64, 1, 3, 0u64).unwrap();
    let r8 = lane.read_async(&b8, 0, 33).unwrap().wait().unwrap();
    assert_eq!(r8[0], 0);
    assert!(r8[1..32].iter().all(|&v| v == 0xA5));
    assert_eq!(r8[32], 0);
    assert!(lane
        .read_async(&b16, 0, 33)
        .unwrap()
        .wait()
        .unwrap()
        .iter()
        .all(|&v| v == 0xBEEF));
    assert_eq!(
        lane.read_async(&b64, 0, 5).unwrap().wait().unwrap(),
        vec![9, 0, 0, 0, 9]
    );
    // Refusals: a wide value no memset can write, ranges past the end.
    assert!(matches!(
        lane.fill(&mut b64, 0, 1, 1u64),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        lane.fill(&mut y, n - 1, 2, 0.0),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        lane.copy_dtod(&x, 1, &mut y, 0, n),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        lane.read_async(&x, 0, 0),
        Err(Error::ZeroLength { .. })
    ));
    assert!(matches!(
        DeviceBuffer::<f32>::from_slice(&mut lane, &[]),
        Err(Error::ZeroLength { .. })
    ));
}

#[test]
fn gpu_read_value_waits_for_its_own_copy_only() {
    let Some(ctx) = gpu_or_skip("gpu_read_value_waits_for_its_own_copy_only") else {
        return;
    };
    if under_sanitizer() {
        return; // timing
    }
    let gpu = ctx.gpu();
    let (mut a, mut b) = (Lane::new(gpu).unwrap(), Lane::new(gpu).unwrap());
    let x = DeviceBuffer::from_slice(&mut a, &[1.0f32, 2.0, 3.0]).unwrap();
    a.synchronize().unwrap();
    // Lane b is busy for 0.5 s with work that does not touch x.
    b.launch().spin(500_000_000).unwrap();
    let t = Instant::now();
    let v = a.read_value(&x, 2).unwrap();
    let waited = t.elapsed();
    assert_eq!(v, 3.0);
    assert!(
        waited < Duration::from_millis(250),
        "read_value waited {waited:?} for unrelated work"
    );
    // A non-blocking read is not ready while its writer still runs.
    let mut y = DeviceBuffer::<f32>::zeroed(&mut a, 3).unwrap();
    a.launch().spin(200_000_000).unwrap();
    a.copy_dtod(&x, 0, &mut y, 0, 3).unwrap();
    let r = a.read_async(&y, 0, 3).unwrap();
    assert!(!r.is_ready().unwrap());
    assert!(r.try_get().unwrap().is_none());
    assert_eq!(r.wait().unwrap(), vec![1.0, 2.0, 3.0]);
    b.synchronize().unwrap();
}

#[derive(Debug)]
struct MyError(u32);
impl std::fmt::Display for MyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "my error {}", self.0)
    }
}
impl std::error::Error for MyError {}

#[test]
fn gpu_coordinator_fill_copy_read_and_user_errors() {
    let Some(ctx) = gpu_or_skip("gpu_coordinator_fill_copy_read_and_user_errors") else {
        return;
    };
    let gpu = ctx.gpu();
    let mut c = AsyncCoordinator::new(gpu).unwrap();
    let n = scaled(1 << 20, 4096);
    let data = random_f32(6, n);
    let mut x = c.zeroed::<f32>(n).unwrap();
    let mut y = c.zeroed::<f32>(n).unwrap();
    let up = c.queue_upload_slice(&data, &mut x, &[]).unwrap();
    let cp = c.queue_copy(&x, &mut y, n, &[up]).unwrap();
    let f = c.queue_fill(&mut x, 0.5f32, &[cp]).unwrap();
    let (_, ry) = c.queue_read(&y, 0, n, &[cp]).unwrap();
    let (_, rx) = c.queue_read(&x, n - 2, 2, &[f]).unwrap();
    assert_eq!(bits(&ry.wait().unwrap()), bits(&data));
    assert_eq!(rx.wait().unwrap(), vec![0.5, 0.5]);
    // The user's own error comes back named after the op, downcastable.
    let fallible = |k: u32| -> Result<(), MyError> { Err(MyError(k)) };
    let r = c.queue_compute("my op", &[], |_l| fallible(7).map_err(Error::user));
    match r {
        Err(Error::User { op, source }) => {
            assert_eq!(op, "queue_compute: my op");
            assert_eq!(source.downcast_ref::<MyError>().map(|e| e.0), Some(7));
        }
        other => panic!("expected a user error, got {other:?}"),
    }
    c.synchronize_all().unwrap();
}

#[test]
fn gpu_readbacks_can_be_awaited() {
    let Some(ctx) = gpu_or_skip("gpu_readbacks_can_be_awaited") else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(1 << 16, 256);
    let data = random_f32(7, n);
    let mut lane = Lane::new(gpu).unwrap();
    let x = DeviceBuffer::from_slice(&mut lane, &data).unwrap();
    lane.launch().spin(spin_ns()).unwrap();
    let reads: Vec<_> = (0..32)
        .map(|k| lane.read_async(&x, k, n - k).unwrap())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let got = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for (k, r) in reads.into_iter().enumerate() {
            set.spawn(async move { (k, r.await) });
        }
        let mut out = Vec::new();
        while let Some(j) = set.join_next().await {
            out.push(j.unwrap());
        }
        out
    });
    assert_eq!(got.len(), 32);
    for (k, v) in got {
        assert_eq!(bits(&v.unwrap()), bits(&data[k..]), "read {k}");
    }
}
