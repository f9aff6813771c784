//! Soundness of sequences a user can write with the public API that once
//! let prism and the GPU race (found by review): a global-mode capture
//! elsewhere, a module unloaded under a stashed cudarc error, a gather
//! whose addresses wrap. Each test failed before its fix (see the test's
//! comment). GPU-gated: without a GPU each prints `SKIPPED`. The case of
//! a fault in another context faults on purpose, so it lives in its own
//! binary, `fault_injection_other_context.rs`.

use std::sync::Mutex;
use std::time::Instant;

use prism_stream::cudarc::driver::sys::{
    CUgraphInstantiate_flags, CUresult, CUstreamCaptureMode, CUstreamCaptureStatus,
};
use prism_stream::cudarc::driver::{DriverError, LaunchConfig};
use prism_stream::cudarc::nvrtc::Ptx;
use prism_stream::{
    fma_chain_cpu, pattern, DeviceBuffer, Error, HostAllocFlags, Lane, PinnedBuffer, Probe,
};
use prism_testing::{gpu_or_skip, random_f32, scaled, under_sanitizer};

/// The tests of this binary run one at a time: a capture in global mode
/// changes what the driver allows on every thread of the process.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bytes of memory the kernel reports available (`MemAvailable`), if it says.
fn host_memory_available() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Hole 4: `gather_pinned` summed the items' lengths with a plain `sum`.
/// One 8 GiB pinned buffer listed `usize::MAX / 2^33 + 2` times adds up
/// to 2^64 + 2^33 elements, which wraps to 2^33 in a release build: the
/// check against the destination's length then compares the wrapped
/// total. Here the destination is small, so before the fix a release build
/// failed for the wrong reason (`LengthMismatch` of the destination, which
/// this test rejects) and a debug build panicked on the overflow. With a
/// little under 2^31 items (the grid's limit) of a little over 2^33 bytes,
/// a destination as long as the wrapped total and a descriptor buffer for
/// every item (about 190 GiB of host memory in all, within reach of the
/// 8-GPU hosts), the kernel would have written every item's bytes far past
/// the end of the destination. Now the checked sum refuses it
/// (`LengthOverflow`) before anything is written or launched.
#[test]
fn gpu_gather_of_one_item_listed_until_the_lengths_wrap_is_refused() {
    let test = "gpu_gather_of_one_item_listed_until_the_lengths_wrap_is_refused";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let _serial = serial();
    if under_sanitizer() {
        eprintln!("SKIPPED {test}: needs 24 GiB of host memory, not run under compute-sanitizer");
        return;
    }
    const LEN: usize = 1 << 33;
    let n = usize::MAX / LEN + 2;
    let need = LEN + n * std::mem::size_of::<&PinnedBuffer<u8>>();
    match host_memory_available() {
        Some(free) if free >= need + (8 << 30) => {}
        free => {
            eprintln!(
                "SKIPPED {test}: needs {} GiB of free host memory, {:?} GiB available",
                (need >> 30) + 8,
                free.map(|f| f >> 30)
            );
            return;
        }
    }
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    let item = PinnedBuffer::<u8>::new(&gpu, LEN, HostAllocFlags::DEFAULT).unwrap();
    let items = vec![&item; n];
    let mut desc = PinnedBuffer::<u64>::new(&gpu, 12, HostAllocFlags::DEFAULT).unwrap();
    let mut dst = DeviceBuffer::<u8>::zeroed(&mut lane, 1 << 20).unwrap();
    dst.wait_idle().unwrap();
    let mut scope = lane.launch();
    let r = scope.gather_pinned(&items, &mut desc, &mut dst);
    assert!(
        matches!(
            r,
            Err(Error::LengthOverflow {
                what: "gathered pinned buffers"
            })
        ),
        "{r:?}"
    );
    assert!(scope.last_fence().is_none(), "a kernel was queued");
    drop(scope);
    assert!(
        desc.as_slice().unwrap().iter().all(|&d| d == 0),
        "descriptors were written"
    );
    assert!(dst.is_idle().unwrap());
}

/// A result prism may give while a stream capture is in progress: the
/// answer, or the typed refusal; never `ContextPoisoned`.
fn answered_or_refused<T: std::fmt::Debug>(what: &str, r: &Result<T, Error>) {
    assert!(
        matches!(r, Ok(_) | Err(Error::CaptureInProgress { .. })),
        "{what} during a stream capture: {r:?}"
    );
}

/// Hole 3: a stream capture in global mode makes the driver refuse event
/// queries and waits in the whole process (`CUDA_ERROR_STREAM_CAPTURE_*`).
/// Before the fix prism took the refusal for a GPU failure: a fence's
/// `is_complete` said `ContextPoisoned`, and the coordinator's `poll`
/// reported its pending ops failed and poisoned the context for good, so
/// `check_usable` and all later work failed after the capture ended.
/// Now a refused query is not-ready (or `CaptureInProgress`), a blocking
/// wait is made again in relaxed capture mode, nothing is poisoned, and
/// the work queued before and during the capture completes correctly.
#[test]
fn gpu_capture_elsewhere_does_not_poison_the_context() {
    let test = "gpu_capture_elsewhere_does_not_poison_the_context";
    let Some(mut ctx) = gpu_or_skip(test) else {
        return;
    };
    let _serial = serial();
    const SPIN_NS: u64 = 1_000_000_000;
    let n = scaled(1 << 20, 1 << 12);
    let gpu = ctx.gpu().clone();
    let input = random_f32(33, n);
    let want: Vec<f32> = input
        .iter()
        .map(|&x| fma_chain_cpu(x, 1.5, 0.25, 3))
        .collect();
    let same = |got: &[f32]| {
        got.iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    };

    // Work queued before the capture, still running during it.
    let c = ctx.async_coordinator_mut().unwrap();
    let hin = PinnedBuffer::from_slice(&gpu, &input, HostAllocFlags::DEFAULT).unwrap();
    let mut d = c.zeroed::<f32>(n).unwrap();
    let mut e = c.zeroed::<f32>(n).unwrap();
    let mut hout = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    let spin = c.queue_compute("spin", &[], |l| l.spin(SPIN_NS)).unwrap();
    let up = c.queue_upload(&hin, &mut d, &[spin]).unwrap();
    let fma = c
        .queue_compute("fma", &[up], |l| l.fma_chain(&d, &mut e, n, 1.5, 0.25, 3))
        .unwrap();
    let down = c.queue_download(&e, &mut hout, &[fma]).unwrap();
    let mut lane = Lane::new(&gpu).unwrap();
    let mut d2 = DeviceBuffer::<u32>::zeroed(&mut lane, n).unwrap();
    lane.launch().spin(SPIN_NS).unwrap();
    let lane_fence = lane.fence().unwrap();

    // A capture in global mode, on a cudarc stream of the same context.
    let cap = gpu.cuda_context().new_stream().unwrap();
    cap.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
        .unwrap();

    let complete = lane_fence.is_complete();
    let idle = hout.is_idle();
    let read = hout.as_slice().map(&same);
    let polled = c.poll();
    let status = c.status(down).unwrap();
    let filled = lane.launch().fill_pattern(&mut d2, n, 9);
    let usable = gpu.check_usable();
    let waited = c.wait(spin);
    println!(
        "during the capture: is_complete {complete:?}, is_idle {idle:?}, as_slice {read:?}, \
         poll {polled:?}, status {status:?}, fill {filled:?}, wait {waited:?}"
    );
    answered_or_refused("Fence::is_complete", &complete);
    answered_or_refused("PinnedBuffer::is_idle", &idle);
    assert!(
        matches!(
            read,
            Ok(true) | Err(Error::BufferInFlight { .. } | Error::CaptureInProgress { .. })
        ),
        "as_slice during the capture: {read:?}"
    );
    assert!(
        polled.iter().all(|p| p.result.is_ok()),
        "poll reported failures during the capture: {polled:?}"
    );
    assert!(
        !matches!(status, prism_stream::OpStatus::Failed(_)),
        "the download was marked failed: {status:?}"
    );
    answered_or_refused("fill_pattern", &filled);
    assert!(usable.is_ok(), "the context was poisoned: {usable:?}");
    answered_or_refused("AsyncCoordinator::wait", &waited);

    // The capture ends (its graph, likely invalidated, is discarded).
    let _ = gpu.cuda_context().check_err();
    let ended = cap.end_capture(CUgraphInstantiate_flags(0));
    println!(
        "the capture ended: {:?}",
        ended.as_ref().map(Option::is_some)
    );
    drop(ended);
    assert_eq!(
        cap.capture_status().unwrap(),
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
    );

    // Everything queued before and during the capture completes, correctly.
    gpu.check_usable().unwrap();
    c.wait(down).unwrap();
    assert!(same(hout.as_slice().unwrap()), "the download differs");
    let late = c.poll();
    assert!(late.iter().all(|p| p.result.is_ok()), "{late:?}");
    assert_eq!(lane_fence.synchronize(), Probe::Complete);
    if filled.is_err() {
        lane.launch().fill_pattern(&mut d2, n, 9).unwrap();
    }
    let mut back = PinnedBuffer::<u32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    lane.copy_dtoh(&d2, 0, &mut back, 0, n).unwrap();
    let got = back.wait_slice().unwrap();
    assert!(
        (0..n).all(|i| got[i] == pattern(9, i as u64)),
        "the fill differs"
    );

    // New work on the same context runs as before.
    let mut hout2 = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    let up = c.queue_upload(&hin, &mut d, &[]).unwrap();
    let fma = c
        .queue_compute("fma again", &[up], |l| {
            l.fma_chain(&d, &mut e, n, 1.5, 0.25, 3)
        })
        .unwrap();
    let down = c.queue_download(&e, &mut hout2, &[fma]).unwrap();
    c.wait(down).unwrap();
    assert!(
        same(hout2.as_slice().unwrap()),
        "the second download differs"
    );
    gpu.check_usable().unwrap();
}

/// Hole 5: dropping the last handle of a module waited for its context
/// with cudarc's `CudaContext::synchronize`, which returns an error cudarc
/// stashed in the context object (`record_err`, public, and what cudarc's
/// own `Drop`s do when a call fails) before waiting for anything. With an
/// error stashed, the module was unloaded at once, under its running
/// kernel: right after the drop the kernel's fence was still pending, and
/// the stashed error, meant for the user's next cudarc call, was gone.
/// Now the drop waits through `cuCtxSynchronize` itself: the kernel has
/// completed when it returns, and the stashed error is still there.
#[test]
fn gpu_module_drop_waits_for_its_kernel_despite_a_stashed_cudarc_error() {
    let test = "gpu_module_drop_waits_for_its_kernel_despite_a_stashed_cudarc_error";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let _serial = serial();
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    // prism's own PTX, loaded as a user module: its spin kernel uses no
    // buffer, so no buffer's drop waits for it.
    let module = gpu
        .load_module(Ptx::from_src(prism_cuda_sys::KERNELS_PTX))
        .unwrap();
    let spin = module.kernel("prism_k_spin_ns").unwrap();
    let ns: u64 = 500_000_000;
    let mut scope = lane.launch();
    let call = scope.kernel(&spin).value(ns);
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: prism_k_spin_ns takes one u64 (`.param .u64` in the PTX),
    // passed by value, and touches no memory.
    unsafe { call.launch(one) }.unwrap();
    let running = scope.last_fence().cloned().unwrap();
    drop(scope);

    let cu = gpu.cuda_context();
    cu.record_err::<()>(Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE)));
    let t = Instant::now();
    drop(spin);
    drop(module);
    let took = t.elapsed();
    let complete = running.is_complete();
    let stashed = cu.check_err();
    println!(
        "dropping the module took {took:?}; its kernel complete: {complete:?}; stash {stashed:?}"
    );
    assert!(
        matches!(complete, Ok(true)),
        "the module was unloaded after {took:?}, while its kernel still ran ({complete:?})"
    );
    assert_eq!(
        stashed.err().map(|e| e.0),
        Some(CUresult::CUDA_ERROR_INVALID_VALUE),
        "the error cudarc stashed for its caller was taken"
    );
}

/// `from_slice` / `upload_slice` over page-locked memory (a `PinnedBuffer`'s
/// slice: safe code can borrow one): the driver copies such memory
/// asynchronously, so before the fix the borrow ended with the copy still
/// queued behind a spin and the host's next write went into the upload.
/// Found by review; not yet run on a GPU.
#[test]
fn gpu_upload_from_a_page_locked_slice_is_over_before_the_borrow_ends() {
    let _serial = serial();
    let Some(ctx) =
        gpu_or_skip("gpu_upload_from_a_page_locked_slice_is_over_before_the_borrow_ends")
    else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(1 << 22, 1 << 12) + 1;
    let data = random_f32(0x5EED, n);
    let mut pinned = PinnedBuffer::from_slice(gpu, &data, HostAllocFlags::DEFAULT).unwrap();
    let mut lane = Lane::new(gpu).unwrap();
    lane.launch().spin(200_000_000).unwrap();
    let up = DeviceBuffer::from_slice(&mut lane, pinned.as_slice().unwrap()).unwrap();
    let mut again = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    lane.launch().spin(200_000_000).unwrap();
    lane.upload_slice(pinned.as_slice().unwrap(), &mut again, 0)
        .unwrap();
    // The borrows ended: safe code may write the memory now.
    pinned.as_mut_slice().unwrap().fill(0.0);
    for (what, buf) in [("from_slice", &up), ("upload_slice", &again)] {
        let got = lane.read_async(buf, 0, n).unwrap().wait().unwrap();
        let bad = (0..n).find(|&i| got[i].to_bits() != data[i].to_bits());
        assert!(
            bad.is_none(),
            "{what}: element {bad:?} is the host's later write, not the data"
        );
    }
}
