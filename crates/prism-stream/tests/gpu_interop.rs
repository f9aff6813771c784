//! cudarc interop on the GPU: `CudaSlice` ↔ `DeviceBuffer` and `CudaStream`
//! ↔ `Lane`, from every cudarc side a user may hold (prism's own context
//! object; a second object on the same primary context, with event
//! tracking on or off; one that only ever used the legacy default stream).
//! Each hand-over happens while the old owner's work is still running (a
//! spin kernel first), so a missing wait shows as wrong data; every output
//! is compared with a CPU reference on random data. Without a GPU each test
//! prints `SKIPPED`.

use std::sync::Arc;

use prism_stream::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use prism_stream::cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use prism_stream::{
    fma_chain_cpu, DeviceBuffer, Error, Gpu, HostAllocFlags, InteropError, Lane, PinnedBuffer,
};
use prism_testing::{gpu_or_skip, random_f32, scaled, under_sanitizer};

mod common;
use common::{assert_same_bits, busy, download, reference, A, B, ITERS, SPIN_NS};

/// The cudarc side of a test: the context object the user holds and how.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    /// `Gpu::cuda_context()`: event tracking on, streams of its own.
    PrismContext,
    /// `CudaContext::new(0)`: a second object on the same primary context,
    /// event tracking on, streams of its own.
    OwnTracked,
    /// The same with cudarc's event tracking off (the user orders streams).
    OwnUntracked,
    /// A second object whose slices live on the legacy default stream and
    /// which never made a stream (cudarc's single-stream mode).
    OwnDefaultStream,
}

const SIDES: [Side; 4] = [
    Side::PrismContext,
    Side::OwnTracked,
    Side::OwnUntracked,
    Side::OwnDefaultStream,
];

impl Side {
    /// The user's context object and the stream their slices live on.
    fn open(self, gpu: &Gpu) -> (Arc<CudaContext>, Arc<CudaStream>) {
        let ctx = match self {
            Side::PrismContext => Arc::clone(gpu.cuda_context()),
            _ => CudaContext::new(0).unwrap(),
        };
        if self == Side::OwnUntracked {
            // SAFETY: cudarc's contract for untracked slices: these tests
            // synchronise the allocating stream before another stream uses a
            // slice (`settle`), write no slice from two streams at once, and
            // drop slices only after their streams' work (a synchronize, or
            // a prism conversion, which waits for the whole context here).
            unsafe { ctx.disable_event_tracking() };
        }
        let stream = match self {
            Side::OwnDefaultStream => ctx.default_stream(),
            _ => ctx.new_stream().unwrap(),
        };
        (ctx, stream)
    }

    /// Does cudarc order this side's slices across streams itself (so the
    /// conversions order on the GPU rather than wait on the host)?
    fn tracked(self) -> bool {
        matches!(self, Side::PrismContext | Side::OwnTracked)
    }

    /// A second stream of the user's: of the same context object, except
    /// for the single-stream side, whose user takes one from prism's
    /// context object (so their object stays in single-stream mode).
    fn other_stream(self, gpu: &Gpu, ctx: &Arc<CudaContext>) -> Arc<CudaStream> {
        match self {
            Side::OwnDefaultStream => gpu.cuda_context().new_stream().unwrap(),
            _ => ctx.new_stream().unwrap(),
        }
    }
}

/// A slice of random data made by cudarc, handed to prism, run through a
/// prism kernel that starts only after a long spin, handed back to cudarc
/// at once and read there, on the slice's stream and on another stream.
#[test]
fn gpu_interop_round_trip_through_a_prism_kernel_matches_cpu() {
    let Some(ctx) = gpu_or_skip("gpu_interop_round_trip_through_a_prism_kernel_matches_cpu") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let n = scaled(1 << 22, 1 << 14) + 5;
    for (k, side) in SIDES.into_iter().enumerate() {
        let (cuda, stream) = side.open(&gpu);
        let input = random_f32(40 + k as u64, n);
        let x = stream.clone_htod(&input).unwrap();
        let x = DeviceBuffer::from_cuda_slice(&gpu, x).unwrap();
        // One more, adopted and dropped unused: prism frees cudarc's memory.
        drop(DeviceBuffer::from_cuda_slice(&gpu, stream.clone_htod(&input).unwrap()).unwrap());
        let mut lane = Lane::new(&gpu).unwrap();
        let mut y = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
        let mut l = lane.launch();
        l.spin(SPIN_NS).unwrap();
        l.fma_chain(&x, &mut y, n, A, B, ITERS).unwrap();
        let kernel = l.last_fence().unwrap().clone();
        drop(l);
        let y = y.into_cuda_slice(&stream).unwrap();
        if side.tracked() && !under_sanitizer() {
            assert!(
                !kernel.is_complete().unwrap(),
                "{side:?}: into_cuda_slice waited on the host where the GPU could order"
            );
        }
        let other = side.other_stream(&gpu, &cuda);
        if !side.tracked() {
            // cudarc's contract without tracking: the user orders streams.
            stream.synchronize().unwrap();
        }
        let on_other = other.clone_dtoh(&y).unwrap();
        let on_own = stream.clone_dtoh(&y).unwrap();
        let want = reference(&input);
        assert_same_bits(
            &format!("{side:?}, read on another stream"),
            &on_other,
            &want,
        );
        assert_same_bits(
            &format!("{side:?}, read on the slice's stream"),
            &on_own,
            &want,
        );
        // prism read x after the upload cudarc queued; x is still intact.
        assert_same_bits(
            &format!("{side:?}, adopted input"),
            &download(&gpu, &x),
            &input,
        );
        drop(y);
        stream.synchronize().unwrap();
    }
}

/// A slice whose last write is a cudarc copy on a stream kept busy by a
/// long spin, handed to prism at once: prism's first read sees the copy.
#[test]
fn gpu_interop_adopted_slice_waits_for_cudarc_writes_on_other_streams() {
    let Some(ctx) = gpu_or_skip("gpu_interop_adopted_slice_waits_for_cudarc_writes") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let n = scaled(1 << 22, 1 << 14) + 1;
    for (k, side) in SIDES.into_iter().enumerate() {
        let (cuda, stream) = side.open(&gpu);
        let input = random_f32(50 + k as u64, n);
        let src = stream.clone_htod(&input).unwrap();
        let mut slice: CudaSlice<f32> = stream.alloc_zeros(n).unwrap();
        stream.synchronize().unwrap();
        // The write: a device-to-device copy on another stream, after a spin.
        let slow = busy(&gpu, side.other_stream(&gpu, &cuda), SPIN_NS);
        slow.memcpy_dtod(&src, &mut slice).unwrap();
        let copied = slow.record_event(None).unwrap();
        let buf = DeviceBuffer::from_cuda_slice(&gpu, slice).unwrap();
        if side.tracked() && !under_sanitizer() {
            assert!(
                !copied.is_complete(),
                "{side:?}: from_cuda_slice waited on the host where the GPU could order"
            );
        }
        // A prism kernel reads it, and a copy: both after cudarc's write.
        let mut lane = Lane::new(&gpu).unwrap();
        let mut y = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
        lane.launch()
            .fma_chain(&buf, &mut y, n, A, B, ITERS)
            .unwrap();
        assert_same_bits(
            &format!("{side:?}, adopted slice"),
            &download(&gpu, &buf),
            &input,
        );
        assert_same_bits(
            &format!("{side:?}, kernel on it"),
            &download(&gpu, &y),
            &reference(&input),
        );
        slow.synchronize().unwrap();
        drop(src);
    }
}

/// A user's stream as a lane: work the user queued there first runs
/// first; the lane's kernels are ordered against prism's own lanes both
/// ways; the stream comes back and cudarc's work on it runs after the lane's.
#[test]
fn gpu_interop_adopted_stream_orders_against_prism_lanes() {
    let Some(ctx) = gpu_or_skip("gpu_interop_adopted_stream_orders_against_prism_lanes") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let n = scaled(1 << 22, 1 << 14) + 3;
    for (k, side) in SIDES.into_iter().enumerate() {
        let (cuda, stream) = side.open(&gpu);
        // The single-stream side's slices live on the legacy default
        // stream, which no lane takes: its user lends a stream of its own.
        let user = match side {
            Side::OwnDefaultStream => side.other_stream(&gpu, &cuda),
            _ => stream,
        };
        let input = random_f32(60 + k as u64, n);
        // cudarc work queued before the hand-over; the slice gives its
        // handle to the stream up as it becomes prism's.
        let x = user.clone_htod(&input).unwrap();
        let x = DeviceBuffer::from_cuda_slice(&gpu, x).unwrap();
        let mut adopted = Lane::from_cuda_stream(&gpu, user).unwrap();
        // A prism lane writes z after a spin; the adopted lane reads it.
        let mut own = Lane::new(&gpu).unwrap();
        let mut z = DeviceBuffer::<f32>::zeroed(&mut own, n).unwrap();
        let mut l = own.launch();
        l.spin(SPIN_NS).unwrap();
        l.fma_chain(&x, &mut z, n, 1.0, 0.0, 1).unwrap(); // z = x
        drop(l);
        let mut y = DeviceBuffer::<f32>::zeroed(&mut adopted, n).unwrap();
        let mut l = adopted.launch();
        l.spin(SPIN_NS / 3).unwrap();
        l.fma_chain(&z, &mut y, n, A, B, ITERS).unwrap();
        drop(l);
        // Another prism lane reads what the adopted lane wrote.
        let copied: Vec<f32> = input
            .iter()
            .map(|&v| fma_chain_cpu(v, 1.0, 0.0, 1))
            .collect();
        assert_same_bits(
            &format!("{side:?}, adopted lane's kernel"),
            &download(&gpu, &y),
            &reference(&copied),
        );
        // The adopted lane writes w after a spin; its stream goes back to
        // cudarc with w, which cudarc reads there at once.
        let mut w = DeviceBuffer::<f32>::zeroed(&mut adopted, n).unwrap();
        let mut l = adopted.launch();
        l.spin(SPIN_NS).unwrap();
        l.fma_chain(&x, &mut w, n, A, B, ITERS).unwrap();
        drop(l);
        let user = adopted.into_cuda_stream().unwrap();
        let w = w.into_cuda_slice(&user).unwrap();
        assert_same_bits(
            &format!("{side:?}, back on the returned stream"),
            &user.clone_dtoh(&w).unwrap(),
            &reference(&input),
        );
        drop(w);
        user.synchronize().unwrap();
    }
}

/// Every refusal names what was wrong and hands the object back intact.
#[test]
fn gpu_interop_refusals_hand_the_object_back() {
    let Some(ctx) = gpu_or_skip("gpu_interop_refusals_hand_the_object_back") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let n = 4096;
    let data = random_f32(70, n);
    let cuda = Arc::clone(gpu.cuda_context());
    let stream = cuda.new_stream().unwrap();

    // A slice of another context (a private one on the same GPU).
    let private = Gpu::open_private(0).unwrap();
    let foreign = private.cuda_context().new_stream().unwrap();
    let slice = foreign.clone_htod(&data).unwrap();
    let e = DeviceBuffer::from_cuda_slice(&gpu, slice).unwrap_err();
    assert!(
        matches!(e.error, Error::ForeignContext { .. }),
        "{}",
        e.error
    );
    let InteropError { value: slice, .. } = *e;
    assert_eq!(
        foreign.clone_dtoh(&slice).unwrap(),
        data,
        "the refused slice changed"
    );

    // A buffer handed to another context's stream.
    let mut lane = Lane::new(&gpu).unwrap();
    let mut buf = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let mut host = PinnedBuffer::from_slice(&gpu, &data, HostAllocFlags::DEFAULT).unwrap();
    lane.copy_htod(&host, 0, &mut buf, 0, n).unwrap();
    let e = buf.into_cuda_slice(&foreign).unwrap_err();
    assert!(
        matches!(e.error, Error::ForeignContext { .. }),
        "{}",
        e.error
    );
    let buf = e.value;
    assert_eq!(download(&gpu, &buf), data, "the refused buffer changed");

    // An empty slice (where the driver makes one: some refuse 0 bytes).
    if let Ok(empty) = stream.null::<f32>() {
        let e = DeviceBuffer::from_cuda_slice(&gpu, empty).unwrap_err();
        assert!(matches!(e.error, Error::ZeroLength { .. }), "{}", e.error);
    }

    // Streams a lane does not take: another context's, the default ones, a shared one.
    let e = Lane::from_cuda_stream(&gpu, Arc::clone(&foreign)).unwrap_err();
    assert!(
        matches!(e.error, Error::ForeignContext { .. }),
        "{}",
        e.error
    );
    for s in [cuda.default_stream(), cuda.per_thread_stream()] {
        let e = Lane::from_cuda_stream(&gpu, s).unwrap_err();
        assert!(
            matches!(e.error, Error::StreamRefused { .. }),
            "{}",
            e.error
        );
    }
    let shared = cuda.new_stream().unwrap();
    let e = Lane::from_cuda_stream(&gpu, Arc::clone(&shared)).unwrap_err();
    assert!(
        matches!(e.error, Error::StreamRefused { .. }),
        "{}",
        e.error
    );
    drop(e); // the refused clone of `shared`
    let on_it = shared.clone_htod(&data).unwrap(); // a slice holds a handle too
    let e = Lane::from_cuda_stream(&gpu, shared).unwrap_err();
    assert!(
        matches!(e.error, Error::StreamRefused { .. }),
        "{}",
        e.error
    );
    let shared = e.value;
    drop(DeviceBuffer::from_cuda_slice(&gpu, on_it).unwrap());
    let raw = shared.cu_stream();
    let lane_on_it = Lane::from_cuda_stream(&gpu, shared).expect("the last handle is taken");
    let back = lane_on_it.into_cuda_stream().unwrap();
    assert_eq!(back.cu_stream(), raw, "a different stream came back");

    // Streams being captured into a graph (relaxed mode: prism's own calls
    // on this thread stay allowed).
    let capturing = cuda.new_stream().unwrap();
    let slice = capturing.clone_htod(&data).unwrap();
    capturing.synchronize().unwrap();
    capturing
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .unwrap();
    let e = DeviceBuffer::from_cuda_slice(&gpu, slice).unwrap_err();
    assert!(
        matches!(e.error, Error::StreamCapturing { .. }),
        "{}",
        e.error
    );
    let slice = e.value;
    let e = buf.into_cuda_slice(&capturing).unwrap_err();
    assert!(
        matches!(e.error, Error::StreamCapturing { .. }),
        "{}",
        e.error
    );
    let buf = e.value;
    // prism's own lanes go on meanwhile.
    lane.copy_dtoh(&buf, 0, &mut host, 0, n).unwrap();
    assert_eq!(host.wait_slice().unwrap(), &data[..]);
    let _ = capturing.end_capture(CUgraphInstantiate_flags(0));
    let slice = DeviceBuffer::from_cuda_slice(&gpu, slice).expect("after the capture");
    assert_eq!(download(&gpu, &slice), data);
    let only = cuda.new_stream().unwrap();
    only.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .unwrap();
    let e = Lane::from_cuda_stream(&gpu, only).unwrap_err();
    assert!(
        matches!(e.error, Error::StreamCapturing { .. }),
        "{}",
        e.error
    );
    let _ = e.value.end_capture(CUgraphInstantiate_flags(0));
    let back = buf.into_cuda_slice(&stream).unwrap();
    assert_eq!(stream.clone_dtoh(&back).unwrap(), data);
}
