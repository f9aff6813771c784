//! Asynchronous copies and memsets, queued through a [`Lane`]. Each one is
//! a thin wrapper over [`Lane::enqueue`] (order.rs), which orders it, records
//! its fence and notes the fence on both buffers: this module only checks
//! lengths and computes addresses.

use cudarc::driver::result;

use crate::error::{check_len, DriverResultExt};
use crate::event::Fence;
use crate::memory::{DeviceBuffer, Element, PinnedBuffer, Tracked};
use crate::order::{Access, Lane};
use crate::Result;

impl Lane {
    /// Copies `src[src_at..src_at + n]` into `dst[dst_at..dst_at + n]`,
    /// after the last write of `src` and every earlier use of `dst`
    /// (GPU-side waits). Returns the copy's completion fence, also recorded
    /// on both buffers: host writes to `src` fail with `BufferInFlight`
    /// until it completes, and neither buffer is freed before.
    pub fn copy_htod<T: Element>(
        &mut self,
        src: &PinnedBuffer<T>,
        src_at: usize,
        dst: &mut DeviceBuffer<T>,
        dst_at: usize,
        n: usize,
    ) -> Result<Fence> {
        self.htod(src, src_at, dst, dst_at, n, false)
            .map(|(_, end)| end)
    }

    /// [`copy_htod`](Self::copy_htod) that, with `timed`, also returns a
    /// timed start fence recorded after the GPU-side waits and right before
    /// the copy, and makes the end fence timed, so
    /// `end.elapsed_ms_since(&start)` is the copy's own GPU time.
    pub fn copy_htod_timed<T: Element>(
        &mut self,
        src: &PinnedBuffer<T>,
        src_at: usize,
        dst: &mut DeviceBuffer<T>,
        dst_at: usize,
        n: usize,
        timed: bool,
    ) -> Result<(Option<Fence>, Fence)> {
        self.htod(src, src_at, dst, dst_at, n, timed)
    }

    /// Copies `src[src_at..src_at + n]` into `dst[dst_at..dst_at + n]`,
    /// after the last write of `src` and every earlier use of `dst`. Host
    /// reads of `dst` fail with `BufferInFlight` until the returned fence
    /// completes.
    pub fn copy_dtoh<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        src_at: usize,
        dst: &mut PinnedBuffer<T>,
        dst_at: usize,
        n: usize,
    ) -> Result<Fence> {
        self.dtoh(src, src_at, dst, dst_at, n, false)
            .map(|(_, end)| end)
    }

    /// [`copy_dtoh`](Self::copy_dtoh) with optional timing, as
    /// [`copy_htod_timed`](Self::copy_htod_timed).
    pub fn copy_dtoh_timed<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        src_at: usize,
        dst: &mut PinnedBuffer<T>,
        dst_at: usize,
        n: usize,
        timed: bool,
    ) -> Result<(Option<Fence>, Fence)> {
        self.dtoh(src, src_at, dst, dst_at, n, timed)
    }

    /// Both upload forms; `timed` adds the start fence.
    fn htod<T: Element>(
        &mut self,
        src: &PinnedBuffer<T>,
        src_at: usize,
        dst: &mut DeviceBuffer<T>,
        dst_at: usize,
        n: usize,
        timed: bool,
    ) -> Result<(Option<Fence>, Fence)> {
        check_len("upload length", n, usize::MAX)?;
        check_len("upload source", src_at.saturating_add(n), src.len())?;
        check_len("upload destination", dst_at.saturating_add(n), dst.len())?;
        let size = std::mem::size_of::<T>();
        let host = src.raw().wrapping_add(src_at) as *const u8;
        let device = dst.device_ptr() + (dst_at * size) as u64;
        let uses = [
            src.used_range(
                Access::Read,
                "pinned source buffer",
                src_at * size,
                (src_at + n) * size,
            ),
            dst.used_range(
                Access::Write,
                "device destination buffer",
                dst_at * size,
                (dst_at + n) * size,
            ),
        ];
        let (start, end, ()) = self.enqueue(&uses, timed, |stream| {
            // SAFETY: host points to n initialised elements inside src (bounds
            // checked above) of page-locked memory; device to n elements inside
            // dst, an allocation of this context (enqueue checked the context).
            // Both are ordered after their conflicting uses and recorded with
            // this copy's fence before enqueue returns, so neither is written
            // by the host nor freed until the copy completes.
            unsafe {
                let host = std::slice::from_raw_parts(host, n * size);
                result::memcpy_htod_async(device, host, stream)
            }
            .call("cuMemcpyHtoDAsync")
        })?;
        Ok((start, end))
    }

    /// Both download forms; `timed` adds the start fence.
    fn dtoh<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        src_at: usize,
        dst: &mut PinnedBuffer<T>,
        dst_at: usize,
        n: usize,
        timed: bool,
    ) -> Result<(Option<Fence>, Fence)> {
        check_len("download length", n, usize::MAX)?;
        check_len("download source", src_at.saturating_add(n), src.len())?;
        check_len("download destination", dst_at.saturating_add(n), dst.len())?;
        let size = std::mem::size_of::<T>();
        let host = dst.raw().wrapping_add(dst_at).cast::<u8>();
        let device = src.device_ptr() + (src_at * size) as u64;
        let uses = [
            src.used_range(
                Access::Read,
                "device source buffer",
                src_at * size,
                (src_at + n) * size,
            ),
            dst.used_range(
                Access::Write,
                "pinned destination buffer",
                dst_at * size,
                (dst_at + n) * size,
            ),
        ];
        let (start, end, ()) = self.enqueue(&uses, timed, |stream| {
            // SAFETY: as in htod with the roles swapped: host is n elements
            // inside dst (page-locked), which host code cannot read or free
            // until the write fence recorded by enqueue completes.
            unsafe {
                let host = std::slice::from_raw_parts_mut(host, n * size);
                result::memcpy_dtoh_async(host, device, stream)
            }
            .call("cuMemcpyDtoHAsync")
        })?;
        Ok((start, end))
    }

    /// Uploads the first `bytes` bytes of `src` into the front of `dst`
    /// (the coordinator's staged uploads of pageable data of any type).
    pub(crate) fn htod_bytes<T: Element>(
        &mut self,
        src: &PinnedBuffer<u8>,
        dst: &mut DeviceBuffer<T>,
        bytes: usize,
    ) -> Result<Fence> {
        check_len("upload source", bytes, src.len())?;
        check_len("upload destination", bytes, dst.num_bytes())?;
        let (host, device) = (src.raw() as *const u8, dst.device_ptr());
        let uses = [
            src.used(Access::Read, "pinned staging buffer"),
            dst.used(Access::Write, "device destination buffer"),
        ];
        let (_, end, ()) = self.enqueue(&uses, false, |stream| {
            // SAFETY: as in htod: `bytes` bytes of each buffer, bounds checked above.
            unsafe {
                let host = std::slice::from_raw_parts(host, bytes);
                result::memcpy_htod_async(device, host, stream)
            }
            .call("cuMemcpyHtoDAsync")
        })?;
        Ok(end)
    }

    /// Zeroes all of `buf` on the GPU, after its earlier uses.
    pub fn zero<T: Element>(&mut self, buf: &mut DeviceBuffer<T>) -> Result<Fence> {
        let (ptr, bytes) = (buf.device_ptr(), buf.num_bytes());
        let uses = [buf.used(Access::Write, "device buffer")];
        let (_, end, ()) = self.enqueue(&uses, false, |stream| {
            // SAFETY: ptr..ptr+bytes is exactly the allocation, of this context,
            // ordered and fenced by enqueue.
            unsafe { result::memset_d8_async(ptr, 0, bytes, stream) }.call("cuMemsetD8Async")
        })?;
        Ok(end)
    }
}
