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
        let device = dst.addr() + (dst_at * size) as u64;
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
        let device = src.addr() + (src_at * size) as u64;
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
        let (host, device) = (src.raw() as *const u8, dst.addr());
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
        let (ptr, bytes) = (buf.addr(), buf.num_bytes());
        let uses = [buf.used(Access::Write, "device buffer")];
        let (_, end, ()) = self.enqueue(&uses, false, |stream| {
            // SAFETY: ptr..ptr+bytes is exactly the allocation, of this context,
            // ordered and fenced by enqueue.
            unsafe { result::memset_d8_async(ptr, 0, bytes, stream) }.call("cuMemsetD8Async")
        })?;
        Ok(end)
    }
}

impl Lane {
    /// Copies `src[src_at..src_at + n]` into `dst[dst_at..dst_at + n]` on
    /// the GPU (device to device), after the last write of `src`'s range
    /// and every earlier use of `dst`'s. Both buffers belong to this lane's
    /// context.
    pub fn copy_dtod<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        src_at: usize,
        dst: &mut DeviceBuffer<T>,
        dst_at: usize,
        n: usize,
    ) -> Result<Fence> {
        let mut scope = self.launch();
        scope.copy_dtod(src, src_at, dst, dst_at, n)?;
        scope.finish()
    }

    /// Sets every element of `buf[at..at + n]` to `value` on the GPU
    /// (`cuMemsetD8/D16/D32Async`, after the range's earlier uses). Elements
    /// of 1, 2 or 4 bytes take any value; wider ones only a value whose
    /// bytes repeat a 4-byte pattern (zero, say), else `Unsupported`.
    pub fn fill<T: Element>(
        &mut self,
        buf: &mut DeviceBuffer<T>,
        at: usize,
        n: usize,
        value: T,
    ) -> Result<Fence> {
        let mut scope = self.launch();
        scope.fill(buf, at, n, value)?;
        scope.finish()
    }

    /// Uploads `data` (ordinary, pageable memory) into `dst[at..]`, after
    /// the range's earlier uses. The driver copies `data` into its own
    /// staging before this returns, so `data` is free again at once; the
    /// transfer to the device runs later in stream order. Slower than a
    /// copy from a [`PinnedBuffer`] ([`copy_htod`](Self::copy_htod)), and it
    /// blocks the calling thread while the driver stages the bytes: use it
    /// for parameters, small tables and one-off inputs.
    pub fn upload_slice<T: Element>(
        &mut self,
        data: &[T],
        dst: &mut DeviceBuffer<T>,
        at: usize,
    ) -> Result<Fence> {
        let mut scope = self.launch();
        scope.upload_slice(data, dst, at)?;
        scope.finish()
    }
}

/// The byte offset and length of `n` elements of `T` at `at`, checked
/// against a buffer of `len` elements.
pub(crate) fn range_bytes<T>(
    what: &'static str,
    at: usize,
    n: usize,
    len: usize,
) -> Result<(usize, usize)> {
    check_len(what, n, usize::MAX)?;
    let end = at.checked_add(n).ok_or(crate::Error::LengthMismatch {
        what,
        expected: len,
        actual: usize::MAX,
    })?;
    check_len(what, end, len)?;
    let size = std::mem::size_of::<T>();
    Ok((at * size, n * size))
}

/// The memset that writes `value` into every element: (element width of
/// the memset in bytes, its pattern), or `None` when no memset can.
pub(crate) fn memset_pattern<T: Element>(value: T) -> Option<(usize, u32)> {
    let bytes = crate::as_bytes(std::slice::from_ref(&value));
    match bytes.len() {
        1 => Some((1, u32::from(bytes[0]))),
        2 => Some((2, u32::from(u16::from_ne_bytes([bytes[0], bytes[1]])))),
        n if n % 4 == 0 => {
            let first = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            bytes
                .chunks_exact(4)
                .all(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) == first)
                .then_some((4, first))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memset_patterns_cover_every_width_they_can() {
        assert_eq!(memset_pattern(7u8), Some((1, 7)));
        assert_eq!(memset_pattern(0x1234u16), Some((2, 0x1234)));
        assert_eq!(memset_pattern(1.0f32), Some((4, 1.0f32.to_bits())));
        assert_eq!(memset_pattern(0u64), Some((4, 0)));
        assert_eq!(memset_pattern(0x0000_0001_0000_0001u64), Some((4, 1)));
        assert_eq!(memset_pattern(1u64), None, "halves differ");
        assert_eq!(memset_pattern(1.0f64), None);
    }

    #[test]
    fn ranges_are_checked_without_overflow() {
        assert_eq!(range_bytes::<f32>("r", 2, 3, 5).unwrap(), (8, 12));
        assert!(range_bytes::<f32>("r", 3, 3, 5).is_err());
        assert!(range_bytes::<f32>("r", 0, 0, 5).is_err());
        assert!(range_bytes::<f32>("r", usize::MAX, 2, 5).is_err());
    }
}
