//! Adversarial review of prism-stream (branch `break-stream`): each test
//! writes, with the public API, a sequence that would make prism and the
//! GPU touch the same memory at once, free memory still in use, skip an
//! ordering, or panic on bad input, *if* the suspected hole named in its
//! comment is real. A test fails when the hole is real; it passes when
//! prism holds. GPU tests are named `gpu_adversarial_*` and print `SKIPPED`
//! without a GPU (`prism_testing::gpu_or_skip`); the tests without the
//! prefix need no GPU and really run everywhere.
//!
//! Races are detected as in `gpu_misuse.rs`: a long-running kernel (prism's
//! `spin`, or a slow `fma_chain`) keeps a conflicting use pending while the
//! code under test reads, reuses or frees the memory; the values are then
//! checked against what a correct ordering allows (never a mix of old and
//! new, never stale data), or against a typed error.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use prism_stream::cudarc::driver::sys::CUresult;
use prism_stream::cudarc::driver::{CudaContext, DriverError, LaunchConfig, PushKernelArg};
use prism_stream::cudarc::nvrtc::Ptx;
use prism_stream::{
    AsyncCoordinator, BatchItem, DeviceBuffer, Error, Gpu, HostAllocFlags, Lane, OpGraph,
    PinnedBuffer, StreamPurpose,
};
use prism_testing::{bits, gpu_or_skip, random_f32, scaled, spin_ns, under_sanitizer};

/// Runs `f`, turning a panic into a test failure that names `what` (bad
/// input must give a typed error, never a panic).
fn no_panic<R>(what: &str, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!("{what}: panicked instead of returning a typed error: {msg}");
        }
    }
}

/// Asserts `r` is an error (any typed one), naming `what`.
#[track_caller]
fn refused<T: std::fmt::Debug>(what: &str, r: prism_stream::Result<T>) {
    assert!(
        r.is_err(),
        "{what}: accepted ({r:?}), expected a typed error"
    );
}

// ---------------------------------------------------------------------
// Hole 1 (found by review): the use list was not held from `order` to `note`.
//
// `Lane::enqueue` (src/lane.rs) orders an op (`Lane::order` locks each
// buffer's use list, reads the fences it must wait for, unlocks), then
// enqueues it, records its fence, and only then locks the lists again to
// note the fence. Between the two, another thread's op on the same buffer
// neither sees this op nor is seen by it. The rules' model
// (src/order/mod.rs tests) assumes "a write needs the buffer exclusively",
// which holds for `&mut DeviceBuffer` but not for a `CapturedGraph`: it
// holds the allocation (`Arc<DeviceAlloc>`) and writes it through
// `&mut CapturedGraph`, while other threads read the buffer through `&`.
// A graph write and a kernel read queued at the same time on two threads
// then run concurrently on the GPU. (Worse, the write's `note` drops read
// entries inside its extent that it never waited for, so later writers
// and `Drop` do not wait for that read either.)
//
// Fixed by ordering rule 7 (src/order/claim.rs): `enqueue` claims the
// op's buffers from `order` to `note`; a conflicting op of another thread
// waits for the claim's release.
// ---------------------------------------------------------------------

/// Safe code only: thread A reads `x` with a slow kernel (`fma_chain` with
/// a = 1, b = 0 copies `x` into `z` exactly, wave by wave), thread B
/// launches a captured graph that overwrites `x`, both released at once.
/// A correct ordering gives `z` all old (B waited for A's read) or all new
/// (A waited for B's write); a mix means the two ran at the same time.
#[test]
fn gpu_adversarial_graph_write_on_one_thread_races_a_read_on_another() {
    let test = "gpu_adversarial_graph_write_on_one_thread_races_a_read_on_another";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(1 << 22, 1 << 12);
    let iters = scaled(10_000, 4);
    let rounds = scaled(300, 4);
    let mut main = Lane::new(gpu).unwrap();
    let mut x = DeviceBuffer::<f32>::zeroed(&mut main, n).unwrap();
    let s = DeviceBuffer::from_slice(&mut main, &vec![2.0f32; n]).unwrap();
    let mut z = DeviceBuffer::<f32>::zeroed(&mut main, n).unwrap();
    // Copies run on the copy engines, so the graph's write can land while
    // the kernel's waves still read x.
    let mut lane_b = Lane::with_purpose(gpu, StreamPurpose::Upload).unwrap();
    let (mut graph, ()) = lane_b
        .capture(|c| c.copy_dtod(&s, 0, &mut x, 0, n))
        .unwrap();
    let mut lane_a = Lane::new(gpu).unwrap();
    for round in 0..rounds {
        main.fill(&mut x, 0, n, 1.0f32).unwrap();
        main.fill(&mut z, 0, n, 0.0f32).unwrap();
        x.wait_idle().unwrap();
        z.wait_idle().unwrap();
        let go = AtomicBool::new(false);
        let (xr, zr) = (&x, &mut z);
        let (la, lb, g) = (&mut lane_a, &mut lane_b, &mut graph);
        std::thread::scope(|scope| {
            let a = scope.spawn(|| {
                while !go.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                la.launch().fma_chain(xr, zr, n, 1.0, 0.0, iters as u32)
            });
            let b = scope.spawn(|| {
                while !go.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                g.launch(lb).map(|_| ())
            });
            std::thread::sleep(Duration::from_millis(1));
            go.store(true, Ordering::Release);
            a.join().unwrap().unwrap();
            b.join().unwrap().unwrap();
        });
        let got = main.read_async(&z, 0, n).unwrap().wait().unwrap();
        let old = got.iter().filter(|&&v| v == 1.0).count();
        let new = got.iter().filter(|&&v| v == 2.0).count();
        assert_eq!(old + new, n, "round {round}: values neither old nor new");
        assert!(
            old == n || new == n,
            "round {round}: a graph write on one thread ran during a kernel reading the \
             buffer on another ({old} elements read before it, {new} after): neither op \
             was ordered after the other (Lane::enqueue notes the fence after unlocking)"
        );
    }
}

/// The same hole made deterministic: an outside-work block holds its lane
/// between `order` and `note` for as long as its closure runs (its
/// contract asks nothing about time). Inside it, lane A reads the first
/// half of `x` at once and the second half after a 30 ms spin; while the
/// closure still runs, thread B launches a graph that overwrites `x`.
/// B's launch started after A's block was ordered, so a correct prism makes
/// B wait for A's read (or B's launch wait for A's note): both halves old.
#[test]
fn gpu_adversarial_graph_launched_during_an_outside_block_waits_for_its_reads() {
    let test = "gpu_adversarial_graph_launched_during_an_outside_block_waits_for_its_reads";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let n = scaled(1 << 20, 1 << 10);
    let half = n / 2;
    let mut main = Lane::new(&gpu).unwrap();
    let x = DeviceBuffer::from_slice(&mut main, &vec![1.0f32; n]).unwrap();
    let s = DeviceBuffer::from_slice(&mut main, &vec![2.0f32; n]).unwrap();
    let mut z = DeviceBuffer::<f32>::zeroed(&mut main, n).unwrap();
    let mut x = x;
    let mut lane_b = Lane::with_purpose(&gpu, StreamPurpose::Upload).unwrap();
    let (mut graph, ()) = lane_b
        .capture(|c| c.copy_dtod(&s, 0, &mut x, 0, n))
        .unwrap();
    main.synchronize().unwrap();
    // prism's own spin kernel, launched through cudarc inside the block.
    let module = gpu
        .cuda_context()
        .load_module(Ptx::from_src(prism_cuda_sys::KERNELS_PTX))
        .unwrap();
    let spin = module.load_function("prism_k_spin_ns").unwrap();
    let mut lane_a = Lane::new(&gpu).unwrap();
    let (tx, rx) = mpsc::channel::<()>();
    let spin_for = spin_ns().min(30_000_000);
    std::thread::scope(|scope| {
        let b = scope.spawn(move || {
            rx.recv().unwrap();
            graph.launch(&mut lane_b).map(|_| ())
        });
        let mut o = lane_a.outside();
        let xi = o.read(&x);
        let zi = o.write(&mut z);
        // SAFETY: the block reads x and writes z (both named), within their
        // lengths, only on the block's stream, keeps no address, and neither
        // synchronises nor captures the stream; the spin touches no memory.
        let r = unsafe {
            o.run(|w| {
                let (xp, _) = w.ptr(xi).unwrap();
                let (zp, _) = w.ptr_mut(&zi).unwrap();
                let raw = w.stream().cu_stream();
                let bytes = half * 4;
                prism_stream::cudarc::driver::result::memcpy_dtod_async(zp, xp, bytes, raw)
                    .unwrap();
                let ns = spin_for;
                let mut launch = w.stream().launch_builder(&spin);
                launch.arg(&ns);
                launch.launch(LaunchConfig::for_num_elems(1)).unwrap();
                prism_stream::cudarc::driver::result::memcpy_dtod_async(
                    zp + bytes as u64,
                    xp + bytes as u64,
                    (n - half) * 4,
                    raw,
                )
                .unwrap();
                // The block is queued; B launches now, while it is open.
                std::thread::sleep(Duration::from_millis(2));
                tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            })
        };
        r.unwrap();
        b.join().unwrap().unwrap();
    });
    let got = main.read_async(&z, 0, n).unwrap().wait().unwrap();
    let first_new = got[..half].iter().filter(|&&v| v == 2.0).count();
    let second_new = got[half..].iter().filter(|&&v| v == 2.0).count();
    assert_eq!(
        (first_new, second_new),
        (0, 0),
        "a graph launched while an outside block was open overwrote x under its queued \
         reads (the block's uses are noted only when it returns)"
    );
}

// ---------------------------------------------------------------------
// Suspected hole 2: `Work::on_stream` (src/outside.rs) orders a view used
// on another stream with `let _ = self.stream.synchronize();`, cudarc's
// `CudaStream::synchronize`, which starts with `bind_to_thread` →
// `check_err`: an error cudarc stashed in the lane's context object (a
// failed cudarc `Drop`, or anyone's safe `record_err`) is returned at once,
// *without waiting*, and the `let _` drops it. The view is then used on the
// other stream before the lane's pending waits (the buffer's last writer)
// completed. prism avoids exactly this elsewhere (`Lane::synchronize`,
// `ModuleHold`), calling the driver directly.
// ---------------------------------------------------------------------

#[test]
fn gpu_adversarial_outside_view_on_another_stream_waits_despite_a_stashed_cudarc_error() {
    let test =
        "gpu_adversarial_outside_view_on_another_stream_waits_despite_a_stashed_cudarc_error";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let n = scaled(1 << 16, 1 << 8);
    let data = random_f32(41, n);
    let (mut a, mut b) = (Lane::new(&gpu).unwrap(), Lane::new(&gpu).unwrap());
    let mut x = DeviceBuffer::<f32>::zeroed(&mut a, n).unwrap();
    a.synchronize().unwrap();
    // x gets its data late: behind a spin on lane a.
    a.launch().spin(spin_ns()).unwrap();
    a.upload_slice(&data, &mut x, 0).unwrap();
    // A second cudarc object on the same (primary) context, with its own
    // error slot: the copy's own bind does not consume the stashed error.
    let other_ctx = CudaContext::new(gpu.info().ordinal).unwrap();
    if other_ctx.cu_ctx() != gpu.cuda_context().cu_ctx() {
        eprintln!("SKIPPED {test}: the GPU handle is not on the primary context");
        return;
    }
    let other = other_ctx.new_stream().unwrap();
    let mut o = b.outside();
    let xi = o.read(&x);
    let lane_ctx = gpu.cuda_context().clone();
    // SAFETY: the block reads x (named) through a view handed to a cudarc
    // call on another stream, which the module docs say is ordered; it
    // keeps no address and touches nothing else of prism's.
    let got = unsafe {
        o.run(|w| {
            let xv = w.view(xi).unwrap();
            // What a failed cudarc Drop elsewhere leaves behind.
            lane_ctx.record_err::<()>(Err(DriverError(CUresult::CUDA_ERROR_UNKNOWN)));
            other.clone_dtoh(&xv)
        })
    }
    .unwrap()
    .unwrap();
    let _ = lane_ctx.check_err();
    assert_eq!(
        bits(&got),
        bits(&data),
        "a view used on another stream read x before its pending write: the host wait \
         (cudarc's CudaStream::synchronize) returned a stashed error without waiting"
    );
}

// ---------------------------------------------------------------------
// Suspected hole 3: `Gpu::load_module` (src/kernels/user.rs) hands any
// `Ptx` to cudarc's `load_module`, which unwraps `CString::new` (a NUL in
// PTX source or a path panics) and passes `Ptx::from_binary`'s bytes to
// `cuModuleLoadData` as is: an empty vector is a dangling pointer, bytes
// without a NUL let the driver read past the end. Safe code, bad input:
// it must be a typed error, never a panic or a crash.
// ---------------------------------------------------------------------

#[test]
fn gpu_adversarial_load_module_with_a_nul_is_a_typed_error() {
    let Some(ctx) = gpu_or_skip("gpu_adversarial_load_module_with_a_nul_is_a_typed_error") else {
        return;
    };
    let gpu = ctx.gpu();
    let r = no_panic("load_module(Ptx::from_src with a NUL)", || {
        gpu.load_module(Ptx::from_src(".version 8.0\0.target sm_75"))
            .map(|_| ())
    });
    refused("PTX source with a NUL", r);
    let r = no_panic("load_module(Ptx::from_file with a NUL)", || {
        gpu.load_module(Ptx::from_file("/tmp/prism\0adversarial.ptx"))
            .map(|_| ())
    });
    refused("PTX path with a NUL", r);
    let r = no_panic("load_module(Ptx::from_file of a missing file)", || {
        gpu.load_module(Ptx::from_file("/nonexistent/prism/adversarial.ptx"))
            .map(|_| ())
    });
    refused("missing PTX file", r);
    // A kernel name the module lacks, and an empty one.
    let m = gpu
        .load_module(Ptx::from_src(prism_cuda_sys::KERNELS_PTX))
        .unwrap();
    refused(
        "missing kernel",
        no_panic("kernel(\"nope\")", || m.kernel("nope")),
    );
    refused(
        "empty kernel name",
        no_panic("kernel(\"\")", || m.kernel("")),
    );
    refused(
        "NUL in kernel name",
        no_panic("kernel(\"a\\0b\")", || m.kernel("a\0b")),
    );
}

/// Env var that makes the child tests below do their work (run alone in a
/// child process, so a crash fails the parent test instead of killing the
/// whole test binary).
const CHILD_VAR: &str = "PRISM_ADVERSARIAL_CHILD";

fn run_child(child_test: &str) -> std::process::ExitStatus {
    let exe = std::env::current_exe().unwrap();
    std::process::Command::new(exe)
        .args(["--exact", child_test, "--nocapture", "--test-threads=1"])
        .env(CHILD_VAR, "1")
        .status()
        .unwrap()
}

#[test]
fn gpu_adversarial_load_module_of_an_empty_or_unterminated_binary_is_refused() {
    let test = "gpu_adversarial_load_module_of_an_empty_or_unterminated_binary_is_refused";
    if gpu_or_skip(test).is_none() {
        return;
    }
    for child in [
        "gpu_adversarial_child_load_empty_binary",
        "gpu_adversarial_child_load_unterminated_binary",
    ] {
        let status = run_child(child);
        assert!(
            status.success(),
            "{child}: Gpu::load_module crashed or panicked on a bad binary ({status}); \
             it must refuse it with a typed error"
        );
    }
}

/// Child of the test above (does nothing unless run by it).
#[test]
fn gpu_adversarial_child_load_empty_binary() {
    if std::env::var(CHILD_VAR).is_err() {
        return;
    }
    let Some(ctx) = gpu_or_skip("gpu_adversarial_child_load_empty_binary") else {
        return;
    };
    let r = ctx
        .gpu()
        .load_module(Ptx::from_binary(Vec::new()))
        .map(|_| ());
    refused("empty module image", r);
    refused("empty cubin", ctx.gpu().load_cubin(&[]).map(|_| ()));
}

/// Child of the test above (does nothing unless run by it).
#[test]
fn gpu_adversarial_child_load_unterminated_binary() {
    if std::env::var(CHILD_VAR).is_err() {
        return;
    }
    let Some(ctx) = gpu_or_skip("gpu_adversarial_child_load_unterminated_binary") else {
        return;
    };
    // Not ELF, not a fatbin, no NUL: the driver takes it for PTX text and
    // reads until a NUL, past the vector's end.
    let bytes = b".version 8.0 .target sm_75 .address_size 64 garbage".to_vec();
    let r = ctx
        .gpu()
        .load_module(Ptx::from_binary(bytes.clone()))
        .map(|_| ());
    refused("unterminated module image", r);
    refused(
        "unterminated cubin",
        ctx.gpu().load_cubin(&bytes).map(|_| ()),
    );
    // A cubin cut short: its headers point past its end.
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[0x28..0x30].copy_from_slice(&64u64.to_le_bytes());
    elf[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
    elf[0x3C..0x3E].copy_from_slice(&4u16.to_le_bytes());
    refused("truncated cubin", ctx.gpu().load_cubin(&elf).map(|_| ()));
}

// ---------------------------------------------------------------------
// Checks of paths that looked sound; each fails if they are not.
// ---------------------------------------------------------------------

/// `PinnedBuffer::register_external` (another language's array, kept alive
/// by an owner): dropped while a download into it is queued behind a spin,
/// the buffer drops its owner only after the copy landed (the owner sees
/// the downloaded values).
#[test]
fn gpu_adversarial_external_owner_outlives_a_queued_download() {
    let test = "gpu_adversarial_external_owner_outlives_a_queued_download";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    struct Owner {
        data: Vec<f32>,
        saw: std::sync::Arc<std::sync::Mutex<Option<Vec<u32>>>>,
    }
    impl Drop for Owner {
        fn drop(&mut self) {
            *self.saw.lock().unwrap() = Some(bits(&self.data));
        }
    }
    let gpu = ctx.gpu();
    let n = scaled(1 << 20, 1 << 10);
    let data = random_f32(43, n);
    let mut lane = Lane::new(gpu).unwrap();
    let dev = DeviceBuffer::from_slice(&mut lane, &data).unwrap();
    let saw = std::sync::Arc::new(std::sync::Mutex::new(None));
    let mut storage = vec![0.0f32; n];
    let ptr = storage.as_mut_ptr();
    let owner = Owner {
        data: storage,
        saw: saw.clone(),
    };
    // SAFETY: `ptr` is the heap memory of `owner.data` (moving the Vec into
    // the owner did not move it), initialised, kept alive by the owner,
    // and touched by nothing else until the buffer drops the owner.
    let mut host =
        unsafe { PinnedBuffer::register_external(gpu, ptr, n, Box::new(owner)) }.unwrap();
    assert!(host.is_registered());
    lane.launch().spin(spin_ns()).unwrap();
    lane.copy_dtoh(&dev, 0, &mut host, 0, n).unwrap();
    drop(host);
    assert_eq!(
        saw.lock().unwrap().take(),
        Some(bits(&data)),
        "the owner was dropped before the queued download landed"
    );
    // Zero elements: a typed error, nothing registered.
    let owner = Box::new(());
    // SAFETY: no element is read or written (the call is refused).
    let r = unsafe {
        PinnedBuffer::<f32>::register_external(
            gpu,
            std::ptr::NonNull::dangling().as_ptr(),
            0,
            owner,
        )
    };
    assert!(matches!(r, Err(Error::ZeroLength { .. })), "{r:?}");
}

/// `PinnedBuffer::register` then `into_vec` while a download into it is
/// queued behind a spin: the vector comes back only after the copy.
#[test]
fn gpu_adversarial_registered_vec_into_vec_waits_for_a_queued_download() {
    let test = "gpu_adversarial_registered_vec_into_vec_waits_for_a_queued_download";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(1 << 20, 1 << 10);
    let data = random_f32(42, n);
    let mut lane = Lane::new(gpu).unwrap();
    let dev = DeviceBuffer::from_slice(&mut lane, &data).unwrap();
    let mut host = PinnedBuffer::register(gpu, vec![0.0f32; n]).unwrap();
    lane.launch().spin(spin_ns()).unwrap();
    lane.copy_dtoh(&dev, 0, &mut host, 0, n).unwrap();
    assert!(
        matches!(host.as_slice(), Err(Error::BufferInFlight { .. })) || under_sanitizer(),
        "a registered vector was readable under a queued download"
    );
    let back = host.into_vec().unwrap();
    assert_eq!(
        bits(&back),
        bits(&data),
        "into_vec returned before the copy"
    );
}

/// `into_cuda_slice` while another lane's download still reads the buffer
/// (behind a spin): cudarc's memset on the slice must come after it.
#[test]
fn gpu_adversarial_into_cuda_slice_waits_for_another_lanes_pending_read() {
    let test = "gpu_adversarial_into_cuda_slice_waits_for_another_lanes_pending_read";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(1 << 20, 1 << 10);
    let data = random_f32(43, n);
    let mut lane = Lane::new(gpu).unwrap();
    let x = DeviceBuffer::from_slice(&mut lane, &data).unwrap();
    let mut out = PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::DEFAULT).unwrap();
    lane.launch().spin(spin_ns()).unwrap();
    lane.copy_dtoh(&x, 0, &mut out, 0, n).unwrap();
    let stream = gpu.cuda_context().new_stream().unwrap();
    let mut slice = x.into_cuda_slice(&stream).unwrap();
    stream.memset_zeros(&mut slice).unwrap();
    let got = out.wait_slice().unwrap();
    assert_eq!(
        bits(got),
        bits(&data),
        "cudarc's memset on the handed-over slice overtook prism's pending read"
    );
    drop(slice);
}

/// A captured graph dropped, with the buffers it uses, while its launch
/// still spins: the launch's read-back still gets the right values, and
/// memory allocated right after is not written by the dying graph.
#[test]
fn gpu_adversarial_graph_and_its_buffers_dropped_while_running() {
    let test = "gpu_adversarial_graph_and_its_buffers_dropped_while_running";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(1 << 16, 1 << 8);
    let data = random_f32(44, n);
    let mut lane = Lane::new(gpu).unwrap();
    let s = DeviceBuffer::from_slice(&mut lane, &data).unwrap();
    let mut x = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let (mut graph, key) = lane
        .capture(|c| {
            c.spin(spin_ns())?;
            c.copy_dtod(&s, 0, &mut x, 0, n)?;
            c.read_back(&x, 0, n)
        })
        .unwrap();
    let mut other = Lane::new(gpu).unwrap();
    let mut run = graph.launch(&mut other).unwrap();
    let values = run.read_back(key).unwrap();
    drop(run);
    drop(graph);
    drop(s);
    drop(x);
    let mut fresh = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    lane.fill(&mut fresh, 0, n, 7.0f32).unwrap();
    assert_eq!(bits(&values.wait().unwrap()), bits(&data));
    let f = lane.read_async(&fresh, 0, n).unwrap().wait().unwrap();
    assert!(
        f.iter().all(|&v| v == 7.0),
        "a dropped graph wrote freed memory"
    );
}

/// A read-back slot whose `Readback` was dropped or forgotten while its
/// copy (behind a spin on one lane) is pending must not be handed to a
/// graph launched on another lane that shares the pool: the graph's values
/// must come back, not `BufferInFlight` nor the other copy's bytes.
#[test]
fn gpu_adversarial_pending_readback_slots_are_not_reused_by_a_graph() {
    let test = "gpu_adversarial_pending_readback_slots_are_not_reused_by_a_graph";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let gpu = ctx.gpu();
    let n = 64;
    let mut lane = Lane::new(gpu).unwrap();
    let x = DeviceBuffer::from_slice(&mut lane, &vec![1.0f32; n]).unwrap();
    let mut y = DeviceBuffer::from_slice(&mut lane, &vec![5.0f32; n]).unwrap();
    let (mut graph, key) = lane
        .capture(|c| {
            c.fill(&mut y, 0, n, 9.0f32)?;
            c.read_back(&y, 0, n)
        })
        .unwrap();
    lane.synchronize().unwrap();
    let mut other = Lane::new(gpu).unwrap();
    // First launch: its slot goes back to the pool when the launch drops.
    drop(graph.launch(&mut other).unwrap());
    other.synchronize().unwrap();
    lane.launch().spin(spin_ns()).unwrap();
    for k in 0..8 {
        let r = lane.read_async(&x, 0, n).unwrap();
        if k % 2 == 0 {
            drop(r);
        } else {
            std::mem::forget(r);
        }
    }
    for k in 0..4 {
        let mut run = graph.launch(&mut other).unwrap();
        let r = run.read_back(key).unwrap();
        let got = r.wait();
        match got {
            Ok(v) => assert!(v.iter().all(|&e| e == 9.0), "launch {k}: {v:?}"),
            Err(e) => panic!("launch {k}: the graph got a slot still being written: {e}"),
        }
    }
}

/// Ids of another coordinator are refused, never read as complete.
#[test]
fn gpu_adversarial_coordinator_refuses_another_coordinators_ops() {
    let test = "gpu_adversarial_coordinator_refuses_another_coordinators_ops";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let gpu = ctx.gpu();
    let mut c1 = AsyncCoordinator::new(gpu).unwrap();
    let mut c2 = AsyncCoordinator::new(gpu).unwrap();
    let mut a = c1.zeroed::<f32>(1024).unwrap();
    let mut b = c2.zeroed::<f32>(1024).unwrap();
    let op1 = no_panic("queue_compute", || {
        c1.queue_compute("spin", &[], |l| l.spin(spin_ns()))
    })
    .unwrap();
    let _ = c2.queue_fill(&mut b, 1.0f32, &[]).unwrap();
    assert!(matches!(c2.wait(op1), Err(Error::ForeignOp(_))));
    assert!(matches!(c2.status(op1), Err(Error::ForeignOp(_))));
    assert!(matches!(c2.op_future(op1), Err(Error::ForeignOp(_))));
    assert!(matches!(
        c2.queue_fill(&mut b, 2.0f32, &[op1]),
        Err(Error::ForeignOp(_))
    ));
    assert!(matches!(
        c2.wait_timeout(op1, Duration::from_millis(1)),
        Err(Error::ForeignOp(_))
    ));
    c1.queue_fill(&mut a, 3.0f32, &[op1]).unwrap();
    c1.synchronize_all().unwrap();
    c2.synchronize_all().unwrap();
}

/// Bad lengths and offsets in every copy, fill, read and kernel method: a
/// typed error each, never a panic, and nothing queued.
#[test]
fn gpu_adversarial_huge_zero_and_overflowing_arguments_are_typed_errors() {
    let test = "gpu_adversarial_huge_zero_and_overflowing_arguments_are_typed_errors";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let gpu = ctx.gpu();
    let n = 1024;
    let mut lane = Lane::new(gpu).unwrap();
    let mut d = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let e = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let mut p = PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::DEFAULT).unwrap();
    let big = [usize::MAX, usize::MAX / 2, usize::MAX / 8 + 1];
    for &at in &[0, 1, n - 1, n, usize::MAX] {
        for &len in &[
            0usize,
            1,
            n,
            usize::MAX,
            usize::MAX - at.min(usize::MAX - 1),
        ] {
            if at.checked_add(len).is_some_and(|end| end <= n) && len > 0 {
                continue;
            }
            let w = format!("at {at}, n {len}");
            refused(&w, no_panic(&w, || lane.copy_htod(&p, at, &mut d, 0, len)));
            refused(&w, no_panic(&w, || lane.copy_htod(&p, 0, &mut d, at, len)));
            refused(&w, no_panic(&w, || lane.copy_dtoh(&e, at, &mut p, 0, len)));
            refused(&w, no_panic(&w, || lane.copy_dtoh(&e, 0, &mut p, at, len)));
            refused(&w, no_panic(&w, || lane.copy_dtod(&e, at, &mut d, 0, len)));
            refused(&w, no_panic(&w, || lane.copy_dtod(&e, 0, &mut d, at, len)));
            refused(&w, no_panic(&w, || lane.fill(&mut d, at, len, 1.0f32)));
            refused(&w, no_panic(&w, || lane.read_async(&e, at, len)));
            let items = [(&p, BatchItem::new(at, 0, len))];
            refused(&w, no_panic(&w, || lane.copy_batch_htod(&items, &mut d)));
            let items = [(&p, BatchItem::new(0, at, len))];
            refused(&w, no_panic(&w, || lane.copy_batch_htod(&items, &mut d)));
        }
    }
    refused(
        "read_value past the end",
        no_panic("read_value", || lane.read_value(&e, n)),
    );
    refused(
        "read_value at usize::MAX",
        no_panic("read_value", || lane.read_value(&e, usize::MAX)),
    );
    refused(
        "empty upload",
        no_panic("upload", || lane.upload_slice(&[], &mut d, 0)),
    );
    refused(
        "upload past the end",
        no_panic("upload", || lane.upload_slice(&[1.0f32; 2], &mut d, n - 1)),
    );
    refused(
        "upload at usize::MAX",
        no_panic("upload", || {
            lane.upload_slice(&[1.0f32], &mut d, usize::MAX)
        }),
    );
    refused("fill of an 8-byte non-pattern", {
        let mut w = DeviceBuffer::<u64>::zeroed(&mut lane, 4).unwrap();
        no_panic("fill u64", || lane.fill(&mut w, 0, 4, 1u64))
    });
    for &len in &big {
        let w = format!("buffer of {len} elements");
        refused(
            &w,
            no_panic(&w, || DeviceBuffer::<f64>::zeroed(&mut lane, len)),
        );
        refused(
            &w,
            no_panic(&w, || {
                PinnedBuffer::<f64>::new(gpu, len, HostAllocFlags::DEFAULT)
            }),
        );
    }
    refused(
        "empty device buffer",
        no_panic("zeroed(0)", || DeviceBuffer::<f32>::zeroed(&mut lane, 0)),
    );
    refused(
        "empty pinned buffer",
        no_panic("new(0)", || {
            PinnedBuffer::<f32>::new(gpu, 0, HostAllocFlags::DEFAULT)
        }),
    );
    refused(
        "empty from_slice",
        no_panic("from_slice(&[])", || {
            DeviceBuffer::<f32>::from_slice(&mut lane, &[])
        }),
    );
    let r = no_panic("register(vec![])", || {
        PinnedBuffer::<f32>::register(gpu, Vec::new())
    });
    assert!(r.is_err(), "an empty vector was registered");
    // Kernels: lengths past either buffer, zero, and the iteration cap.
    let mut scope = lane.launch();
    for &len in &[0usize, n + 1, usize::MAX] {
        let w = format!("kernel length {len}");
        refused(
            &w,
            no_panic(&w, || scope.fma_chain(&e, &mut d, len, 1.0, 0.0, 1)),
        );
        refused(
            &w,
            no_panic(&w, || scope.fma_chain_in_place(&mut d, len, 1.0, 0.0, 1)),
        );
        refused(&w, no_panic(&w, || scope.clamp(&e, &mut d, len, 0.0, 1.0)));
        refused(&w, no_panic(&w, || scope.group_sum(&e, len, 4, &mut d)));
    }
    refused(
        "group 0",
        no_panic("group_sum", || scope.group_sum(&e, n, 0, &mut d)),
    );
    refused(
        "iterations past i32::MAX",
        no_panic("fma_chain", || {
            scope.fma_chain(&e, &mut d, n, 1.0, 0.0, u32::MAX)
        }),
    );
    drop(scope);
    // Nothing above was queued: the buffers are idle at once.
    assert!(p.is_idle().unwrap());
    lane.synchronize().unwrap();
}

/// Inside a capture, the scope swapped for a launch scope of another lane
/// (a leaked one, so its lifetime fits): the swapped-in scope's ops run at
/// once, ordered as usual, `read_back` is refused, and the graph made from
/// what was captured is sound to launch.
#[test]
fn gpu_adversarial_capture_scope_swapped_for_another_lanes_scope() {
    let test = "gpu_adversarial_capture_scope_swapped_for_another_lanes_scope";
    let Some(ctx) = gpu_or_skip(test) else {
        return;
    };
    let gpu: Gpu = ctx.gpu().clone();
    let n = 256;
    let mut lane = Lane::new(&gpu).unwrap();
    let mut x = DeviceBuffer::from_slice(&mut lane, &vec![1.0f32; n]).unwrap();
    let mut y = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let leaked: &'static mut Lane = Box::leak(Box::new(Lane::new(&gpu).unwrap()));
    let captured = lane.capture(|c| {
        let mut theirs = leaked.launch();
        std::mem::swap(&mut **c, &mut theirs);
        // Now `c` queues on the leaked lane, `theirs` records the graph.
        c.spin(spin_ns())?;
        c.fill(&mut x, 0, n, 3.0f32)?;
        let rb = c.read_back(&x, 0, n);
        theirs.copy_dtod(&x, 0, &mut y, 0, n)?;
        std::mem::swap(&mut **c, &mut theirs);
        Ok(rb.is_err())
    });
    match captured {
        Ok((mut graph, read_back_refused)) => {
            assert!(
                read_back_refused,
                "read_back on a swapped scope was accepted"
            );
            graph.launch(&mut lane).unwrap().wait().unwrap();
        }
        Err(e) => eprintln!("{test}: the capture was refused ({e}); fine"),
    }
    // Whatever ran, y is all old or all new, and x is 3 (the fill ran).
    let yv = lane.read_async(&y, 0, n).unwrap().wait().unwrap();
    assert!(
        yv.iter().all(|&v| v == 3.0) || yv.iter().all(|&v| v == 0.0),
        "y mixed: {yv:?}"
    );
    let xv = lane.read_async(&x, 0, n).unwrap().wait().unwrap();
    assert!(
        xv.iter().all(|&v| v == 3.0),
        "the fill on the swapped scope was lost"
    );
}

// ---------------------------------------------------------------------
// Host tests: no GPU needed, run everywhere.
// ---------------------------------------------------------------------

/// Without a driver every entry point that needs one says so (typed);
/// with one, they answer without panicking.
#[test]
fn entry_points_give_typed_answers_without_a_gpu() {
    let driver = prism_stream::driver_available();
    let r = no_panic(
        "batch_copies_supported",
        prism_stream::batch_copies_supported,
    );
    if !driver {
        assert!(matches!(r, Err(Error::DriverNotFound)), "{r:?}");
    }
    let r = no_panic("device_count", prism_stream::device_count);
    if !driver {
        assert!(matches!(r, Err(Error::DriverNotFound)), "{r:?}");
    }
    for ordinal in [usize::MAX, 4096, (i32::MAX as usize) + 1] {
        let r = no_panic("Gpu::open", || Gpu::open(ordinal));
        assert!(r.is_err(), "Gpu::open({ordinal}) succeeded");
        let r = no_panic("Gpu::open_private", || Gpu::open_private(ordinal));
        assert!(r.is_err(), "Gpu::open_private({ordinal}) succeeded");
    }
}

/// NVTX ranges with odd names (NUL, long multi-byte text) never panic.
#[test]
fn nvtx_ranges_with_odd_names_do_not_panic() {
    no_panic("nvtx", || {
        let _a = prism_stream::nvtx::Range::new("a\0b");
        let long = "é".repeat(1000);
        let _b = prism_stream::nvtx::Range::new(&long);
        let _c = prism_stream::nvtx::Range::fmt(format_args!("{long}\0{long}"));
        let _d = prism_stream::nvtx::Range::new("");
    });
}

/// The op table refuses ids of another table, ids not handed out yet and
/// self-dependencies with typed errors (no GPU: fences are plain values).
#[test]
fn op_graph_refuses_foreign_future_and_self_ids() {
    let mut g1: OpGraph<u32> = OpGraph::new();
    let mut g2: OpGraph<u32> = OpGraph::new();
    let a = g1.insert("a", 1);
    let b = g2.insert("b", 2);
    assert!(matches!(g1.status(b), Err(Error::ForeignOp(_))));
    assert!(matches!(g2.status(a), Err(Error::ForeignOp(_))));
    assert!(matches!(
        g1.check_deps(&[b], |_| Ok(())),
        Err(Error::ForeignOp(_))
    ));
    assert!(g1.fence(b).is_none());
    let next = g1.next_id();
    assert!(matches!(
        g1.check_deps(&[next], |_| Ok(())),
        Err(Error::DependencyCycle { .. })
    ));
    let later = g1.op_id(next.index() + 5);
    assert!(matches!(
        g1.check_deps(&[later], |_| Ok(())),
        Err(Error::UnknownOp(_))
    ));
    assert!(matches!(g1.status(later), Err(Error::UnknownOp(_))));
    assert!(g1.finish(b, prism_stream::Probe::Complete).is_err());
    let _ = g2.finish(b, prism_stream::Probe::Complete);
}
