//! Portable pinned buffers shared by the lanes of several contexts (what a
//! multi-GPU run does), on one GPU with two private contexts: a copy on one
//! context waits on the GPU for the other context's earlier write of the
//! same bytes, and copies of disjoint bytes do not wait for each other.
//! GPU-gated: without a GPU each prints `SKIPPED`.

use prism_stream::{pattern, DeviceBuffer, Error, Gpu, HostAllocFlags, Lane, PinnedBuffer, Probe};
use prism_testing::{gpu_or_skip, under_sanitizer};

const N: usize = 1 << 20;

/// `dev` on `lane` filled with `pattern(seed, i)`, after a spin of `ns`.
fn slow_fill(lane: &mut Lane, ns: u64, seed: u32) -> DeviceBuffer<u32> {
    let mut dev = DeviceBuffer::<u32>::zeroed(lane, N).unwrap();
    let mut l = lane.launch();
    l.spin(ns).unwrap();
    l.fill_pattern(&mut dev, N, seed).unwrap();
    dev
}

#[test]
fn gpu_portable_copy_waits_for_another_contexts_write_of_the_same_bytes() {
    let Some(_ctx) = gpu_or_skip("gpu_portable_copy_waits_for_another_contexts_write") else {
        return;
    };
    let (a, b) = (Gpu::open_private(0).unwrap(), Gpu::open_private(0).unwrap());
    assert!(!a.same_context(&b));
    let (mut la, mut lb) = (Lane::new(&a).unwrap(), Lane::new(&b).unwrap());
    let mut shared = PinnedBuffer::<u32>::new(&a, N, HostAllocFlags::PORTABLE).unwrap();
    // Context A: 200 ms of spin, then the pattern, then into `shared`.
    let src = slow_fill(&mut la, 200_000_000, 7);
    la.copy_dtoh(&src, 0, &mut shared, 0, N).unwrap();
    // Context B, at once (no host wait): `shared` into its own memory and
    // back out. Without a GPU-side wait on A's event it would read zeros.
    let mut dst = DeviceBuffer::<u32>::zeroed(&mut lb, N).unwrap();
    lb.copy_htod(&shared, 0, &mut dst, 0, N).unwrap();
    let mut back = PinnedBuffer::<u32>::new(&b, N, HostAllocFlags::DEFAULT).unwrap();
    lb.copy_dtoh(&dst, 0, &mut back, 0, N).unwrap();
    let got = back.wait_slice().unwrap();
    let bad = (0..N).find(|&i| got[i] != pattern(7, i as u64));
    assert!(
        bad.is_none(),
        "element {} read before context A wrote it",
        bad.unwrap_or(0)
    );
    // A non-portable buffer of context A is refused on B's lane.
    let plain = PinnedBuffer::<u32>::new(&a, N, HostAllocFlags::DEFAULT).unwrap();
    assert!(matches!(
        lb.copy_htod(&plain, 0, &mut dst, 0, N),
        Err(Error::WrongContext { .. })
    ));
}

#[test]
fn gpu_portable_copies_of_disjoint_bytes_do_not_wait_for_each_other() {
    let Some(_ctx) = gpu_or_skip("gpu_portable_copies_of_disjoint_bytes_do_not_wait") else {
        return;
    };
    if under_sanitizer() {
        eprintln!("SKIPPED gpu_portable_copies_of_disjoint_bytes_do_not_wait: timing under compute-sanitizer");
        return;
    }
    let (a, b) = (Gpu::open_private(0).unwrap(), Gpu::open_private(0).unwrap());
    let (mut la, mut lb) = (Lane::new(&a).unwrap(), Lane::new(&b).unwrap());
    let mut shared = PinnedBuffer::<u32>::new(&a, 2 * N, HostAllocFlags::PORTABLE).unwrap();
    // A writes the first half after 500 ms of spin.
    let src = slow_fill(&mut la, 500_000_000, 3);
    let slow = la.copy_dtoh(&src, 0, &mut shared, 0, N).unwrap();
    // B writes the second half and reads it back: it must not wait for A.
    let mut dev = DeviceBuffer::<u32>::zeroed(&mut lb, N).unwrap();
    lb.launch().fill_pattern(&mut dev, N, 4).unwrap();
    lb.copy_dtoh(&dev, 0, &mut shared, N, N).unwrap();
    let mut dev2 = DeviceBuffer::<u32>::zeroed(&mut lb, N).unwrap();
    let fast = lb.copy_htod(&shared, N, &mut dev2, 0, N).unwrap();
    assert!(matches!(fast.synchronize(), Probe::Complete));
    assert!(
        !slow.is_complete().unwrap(),
        "context B's copies of the second half waited for context A's write of the first"
    );
    // The host may not read the buffer while A's write is pending.
    assert!(matches!(
        shared.as_slice(),
        Err(Error::BufferInFlight { .. })
    ));
    let got = shared.wait_slice().unwrap();
    assert!((0..N).all(|i| got[i] == pattern(3, i as u64)));
    assert!((0..N).all(|i| got[N + i] == pattern(4, i as u64)));
}
