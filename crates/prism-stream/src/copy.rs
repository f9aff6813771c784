//! Tracked asynchronous copies between pinned host and device buffers, on
//! any stream. The coordinator and prism-buffer's triple buffer use these.

use std::sync::Arc;

use cudarc::driver::{result, CudaStream};

use crate::context::Gpu;
use crate::error::check_len;
use crate::error::DriverResultExt;
use crate::event::{Fence, WaitClock};
use crate::memory::{lock, DeviceBuffer, Element, PinnedBuffer, Uses};
use crate::{Error, Result};

/// Copies `src[..n]` into `dst[..n]` on `stream`, after every earlier use of
/// `dst` and the last write of `src` (GPU-side waits, skipping those `clock`
/// already implies). Returns the copy's completion fence, also recorded on
/// both buffers.
pub fn copy_htod<T: Element>(
    stream: &Arc<CudaStream>,
    clock: &mut WaitClock,
    src: &PinnedBuffer<T>,
    dst: &mut DeviceBuffer<T>,
    n: usize,
) -> Result<Fence> {
    copy_htod_timed(stream, clock, src, dst, n, false).map(|(_, end)| end)
}

/// [`copy_htod`] that, with `timed`, also returns a timed fence recorded after
/// the GPU-side waits and right before the copy, and makes the end fence timed:
/// `end.elapsed_ms_since(&start)` is then the copy's own GPU time.
pub fn copy_htod_timed<T: Element>(
    stream: &Arc<CudaStream>,
    clock: &mut WaitClock,
    src: &PinnedBuffer<T>,
    dst: &mut DeviceBuffer<T>,
    n: usize,
    timed: bool,
) -> Result<(Option<Fence>, Fence)> {
    copy_htod_at(stream, clock, src, 0, dst, n, timed)
}

/// [`copy_htod_timed`] from `src[src_offset..src_offset + n]` into `dst[..n]`.
pub fn copy_htod_at<T: Element>(
    stream: &Arc<CudaStream>,
    clock: &mut WaitClock,
    src: &PinnedBuffer<T>,
    src_offset: usize,
    dst: &mut DeviceBuffer<T>,
    n: usize,
    timed: bool,
) -> Result<(Option<Fence>, Fence)> {
    check_len("upload source", src_offset.saturating_add(n), src.len())?;
    check_len("upload length", n, usize::MAX)?;
    check_len("upload destination", n, dst.len())?;
    let gpu = dst.gpu().clone();
    if !gpu.same(src.gpu()) {
        return Err(Error::WrongContext {
            what: "pinned source buffer",
        });
    }
    gpu.check_usable()?;
    gpu.bind()?;
    // Locks are taken pinned first, then device, in both directions.
    let mut su = lock(&src.uses);
    let mut du = lock(&dst.uses);
    ordered_copy(&gpu, stream, clock, &mut su, &mut du, timed, || {
        // SAFETY: src is page-locked memory with >= src_offset + n initialised
        // elements (checked above), so the offset pointer and range are in bounds; it stays
        // allocated and unwritten by the host until the fence recorded after
        // this copy completes (Drop and the host accessors check it).
        let host =
            unsafe { std::slice::from_raw_parts((src.raw() as *const T).add(src_offset), n) };
        // SAFETY: dst is a device allocation of >= n elements of the current
        // context, ordered after all its earlier uses, and tracked until this copy
        // completes; host is valid as above.
        unsafe { result::memcpy_htod_async(dst.device_ptr(), host, stream.cu_stream()) }
            .call("cuMemcpyHtoDAsync")
    })
}

/// Copies `src[..n]` into `dst[..n]` on `stream`, after the last write of
/// `src` and every earlier use of `dst`. Host reads of `dst` fail with
/// `BufferInFlight` until the returned fence completes.
pub fn copy_dtoh<T: Element>(
    stream: &Arc<CudaStream>,
    clock: &mut WaitClock,
    src: &DeviceBuffer<T>,
    dst: &mut PinnedBuffer<T>,
    n: usize,
) -> Result<Fence> {
    copy_dtoh_timed(stream, clock, src, dst, n, false).map(|(_, end)| end)
}

/// [`copy_dtoh`] with optional timing, as [`copy_htod_timed`].
pub fn copy_dtoh_timed<T: Element>(
    stream: &Arc<CudaStream>,
    clock: &mut WaitClock,
    src: &DeviceBuffer<T>,
    dst: &mut PinnedBuffer<T>,
    n: usize,
    timed: bool,
) -> Result<(Option<Fence>, Fence)> {
    copy_dtoh_at(stream, clock, src, dst, 0, n, timed)
}

/// [`copy_dtoh_timed`] from `src[..n]` into `dst[dst_offset..dst_offset + n]`.
pub fn copy_dtoh_at<T: Element>(
    stream: &Arc<CudaStream>,
    clock: &mut WaitClock,
    src: &DeviceBuffer<T>,
    dst: &mut PinnedBuffer<T>,
    dst_offset: usize,
    n: usize,
    timed: bool,
) -> Result<(Option<Fence>, Fence)> {
    check_len("download source", n, src.len())?;
    check_len(
        "download destination",
        dst_offset.saturating_add(n),
        dst.len(),
    )?;
    let gpu = src.gpu().clone();
    if !gpu.same(dst.gpu()) {
        return Err(Error::WrongContext {
            what: "pinned destination buffer",
        });
    }
    gpu.check_usable()?;
    gpu.bind()?;
    // Locks are taken pinned first, then device, in both directions.
    let mut du = lock(&dst.uses);
    let mut su = lock(&src.uses);
    ordered_copy(&gpu, stream, clock, &mut su, &mut du, timed, || {
        // SAFETY: dst is page-locked with >= dst_offset + n elements (checked above),
        // so the offset range is in bounds; the write fence recorded after this
        // copy keeps host code (accessors, Drop) away until the copy completes.
        let host = unsafe { std::slice::from_raw_parts_mut(dst.raw().add(dst_offset), n) };
        // SAFETY: src has >= n elements, ordered after its last writer, tracked until done.
        unsafe { result::memcpy_dtoh_async(host, src.device_ptr(), stream.cu_stream()) }
            .call("cuMemcpyDtoHAsync")
    })
}

/// The part both directions share, with both buffers' use lists locked:
/// order the copy after `read`'s last writer and every use of `write` (GPU
/// waits), take a timed start fence if asked, `enqueue` the copy, record the
/// end fence and note it on both buffers.
fn ordered_copy(
    gpu: &Gpu,
    stream: &CudaStream,
    clock: &mut WaitClock,
    read: &mut Uses,
    write: &mut Uses,
    timed: bool,
    enqueue: impl FnOnce() -> Result<()>,
) -> Result<(Option<Fence>, Fence)> {
    read.order_read(stream, clock)?;
    write.order_write(stream, clock)?;
    let start = if timed {
        Some(gpu.timed_fence(stream)?)
    } else {
        None
    };
    enqueue()?;
    let fence = gpu.fence_after(stream, clock, timed)?;
    read.add_read(&fence);
    write.set_write(&fence);
    Ok((start, fence))
}
