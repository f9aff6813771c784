//! Issue #21: soundness holes found by review, each as a user could meet
//! it with the public API. Each test fails before its fix (see the test's
//! comment) and passes after. GPU-gated: without a GPU each prints
//! `SKIPPED`. Hole 2 faults a context on purpose, so it lives in its own
//! binary, `fault_injection_holes.rs`.

use prism_stream::testing::{gpu_or_skip, under_sanitizer};
use prism_stream::{DeviceBuffer, Error, HostAllocFlags, Lane, PinnedBuffer};

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
