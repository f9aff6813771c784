//! The ops of a launch scope beyond kernels: device-to-device copies,
//! memsets, uploads from pageable memory and small read-backs. Each is a
//! thin wrapper over [`Launch::enqueue`] (and so over
//! `Lane::enqueue`): this module checks lengths and computes addresses; the
//! ordering, fencing and capture are the lane's (`lane.rs`). They sit on the scope, so
//! a stage, a coordinator op and a captured graph can use them; the
//! `Lane` methods of the same names (copy.rs) open a scope for one op.

use cudarc::driver::result;

use crate::copy::{memset_pattern, range_bytes};
use crate::error::DriverResultExt;
use crate::kernels::Launch;
use crate::memory::SlotPool;
use crate::memory::{DeviceBuffer, Element, PinnedBuffer, Tracked};
use crate::order::{Access, Used};
use crate::raw;
use crate::readback::Readback;
use crate::{Error, Result};

impl Launch<'_> {
    /// Copies `src[src_at..src_at + n]` into `dst[dst_at..dst_at + n]`
    /// (device to device), after the last write of `src`'s range and every
    /// earlier use of `dst`'s.
    pub fn copy_dtod<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        src_at: usize,
        dst: &mut DeviceBuffer<T>,
        dst_at: usize,
        n: usize,
    ) -> Result<()> {
        let (so, bytes) = range_bytes::<T>("device-to-device source", src_at, n, src.len())?;
        let (d_o, _) = range_bytes::<T>("device-to-device destination", dst_at, n, dst.len())?;
        let (s, d) = (src.addr() + so as u64, dst.addr() + d_o as u64);
        let uses = [
            src.used_range(Access::Read, "device source buffer", so, so + bytes),
            dst.used_range(Access::Write, "device destination buffer", d_o, d_o + bytes),
        ];
        self.enqueue(&uses, |stream| {
            // SAFETY: s and d address `bytes` bytes inside two distinct
            // allocations of this context (bounds checked above; `&` and
            // `&mut` borrows cannot alias), ordered and fenced (or captured)
            // by the scope.
            unsafe { result::memcpy_dtod_async(d, s, bytes, stream) }.call("cuMemcpyDtoDAsync")
        })
    }

    /// Sets `buf[at..at + n]` to `value` (see [`Lane::fill`](crate::Lane::fill)).
    pub fn fill<T: Element>(
        &mut self,
        buf: &mut DeviceBuffer<T>,
        at: usize,
        n: usize,
        value: T,
    ) -> Result<()> {
        let (off, bytes) = range_bytes::<T>("fill", at, n, buf.len())?;
        let (width, pattern) = memset_pattern(value).ok_or(Error::Unsupported {
            what: "a fill with a value whose bytes do not repeat a 1-, 2- or 4-byte pattern",
            instead: "fill with a kernel of your own, or fill 4-byte halves separately",
        })?;
        let p = buf.addr() + off as u64;
        let uses = [buf.used_range(Access::Write, "device buffer", off, off + bytes)];
        self.enqueue(&uses, |stream| {
            let count = bytes / width;
            // SAFETY: p..p+bytes lies inside the allocation (checked above),
            // of this context, ordered and fenced (or captured) by the scope;
            // `count` elements of `width` bytes cover exactly that range.
            unsafe {
                match width {
                    1 => result::memset_d8_async(p, pattern as u8, count, stream),
                    2 => cudarc::driver::sys::cuMemsetD16Async(p, pattern as u16, count, stream)
                        .result(),
                    _ => cudarc::driver::sys::cuMemsetD32Async(p, pattern, count, stream).result(),
                }
            }
            .call("cuMemsetAsync")
        })
    }

    /// Uploads `data` from ordinary memory into `dst[at..]` (see
    /// [`Lane::upload_slice`](crate::Lane::upload_slice)). Not inside a
    /// capture: a graph cannot hold pageable memory.
    pub fn upload_slice<T: Element>(
        &mut self,
        data: &[T],
        dst: &mut DeviceBuffer<T>,
        at: usize,
    ) -> Result<()> {
        if self.is_capturing() {
            return Err(Error::NotCapturable {
                what: "an upload from pageable memory",
                reason: "the graph would read the slice at every launch, after it is gone",
            });
        }
        let (off, bytes) = range_bytes::<T>("upload", at, data.len(), dst.len())?;
        let d = dst.addr() + off as u64;
        let uses = [dst.used_range(Access::Write, "device destination buffer", off, off + bytes)];
        let src = crate::as_bytes(data);
        // Page-locked (or managed) memory is copied asynchronously: `data`
        // is borrowed only for this call, so the copy must be over before
        // it returns. Pageable memory is staged by the driver in the call.
        // (The query answers for the current context: bind it first; any
        // answer but "unknown address" counts as page-locked.)
        self.gpu().bind()?;
        let (first, last) = (src.as_ptr(), src.as_ptr().wrapping_add(bytes - 1));
        let locked = raw::host_known_to_driver(first) || raw::host_known_to_driver(last);
        self.enqueue(&uses, |stream| {
            // SAFETY: d..d+bytes lies inside dst (checked above), ordered and
            // fenced by the scope; `src` is `bytes` initialised bytes borrowed
            // for the call. For pageable memory the driver stages the bytes
            // before the call returns; for memory the driver knows (page-locked,
            // managed) the copy's fence is waited for below, before the
            // borrow ends. Either way nothing reads `src` after this returns.
            unsafe { result::memcpy_htod_async(d, src, stream) }.call("cuMemcpyHtoDAsync")
        })?;
        if locked {
            if let Some(fence) = self.last_fence() {
                fence.wait()?;
            }
        }
        Ok(())
    }

    /// Reads `buf[at..at + n]` back to the host without blocking: the copy
    /// goes into a small pinned slot of the lane's pool, ordered after the
    /// range's last write, and the returned [`Readback`] waits for that copy
    /// alone (`wait`, `try_get`, or `.await`). Later work queued on any lane
    /// does not wait for the host to read it. Inside a capture, use
    /// [`Capture::read_back`](crate::Capture::read_back).
    pub fn read_async<T: Element>(
        &mut self,
        buf: &DeviceBuffer<T>,
        at: usize,
        n: usize,
    ) -> Result<Readback<T>> {
        if self.is_capturing() {
            return Err(Error::NotCapturable {
                what: "Launch::read_async",
                reason: "each launch of a graph needs its own slot; use Capture::read_back",
            });
        }
        let (off, bytes) = range_bytes::<T>("read-back", at, n, buf.len())?;
        let pool = self.lane_mut().slot_pool();
        let slot = self.copy_into_slot(&pool, buf, off, bytes)?;
        let fence = match self.last_fence() {
            Some(f) => f.clone(),
            None => self.lane_mut().fence()?,
        };
        Ok(Readback::new(slot, fence, n, pool))
    }

    /// Copies the `bytes` bytes at byte `off` of `buf` into a slot of
    /// `pool` (the one step of `read_async` and `Capture::read_back`): the
    /// copy is ordered after the range's last write; the slot is named as
    /// written, except in a capture, whose launches order the graph's
    /// slots themselves. A failed copy puts the slot back.
    pub(crate) fn copy_into_slot<T: Element>(
        &mut self,
        pool: &SlotPool,
        buf: &DeviceBuffer<T>,
        off: usize,
        bytes: usize,
    ) -> Result<PinnedBuffer<u8>> {
        let slot = pool.take(buf.gpu(), bytes)?;
        let (src, host) = (buf.addr() + off as u64, slot.raw());
        let read = buf.used_range(Access::Read, "device source buffer", off, off + bytes);
        let written = slot.used_range(Access::Write, "read-back slot", 0, bytes);
        let uses: &[Used<'_>] = if self.is_capturing() {
            &[read]
        } else {
            &[read, written]
        };
        let queued = self.enqueue(uses, |stream| {
            // SAFETY: src..src+bytes lies inside buf (the caller checked the
            // range); `host` is the slot's page-locked memory of at least
            // `bytes` bytes. Outside a capture the slot is fenced here and
            // host code reads it only through a Readback once that fence
            // completed; in a capture the graph holds the slot until a
            // launch hands it to a Readback (re-pointing the node first if
            // needed), and the graph keeps buf alive.
            unsafe {
                let host = std::slice::from_raw_parts_mut(host, bytes);
                result::memcpy_dtoh_async(host, src, stream)
            }
            .call("cuMemcpyDtoHAsync")
        });
        match queued {
            Ok(()) => Ok(slot),
            Err(e) => {
                pool.put(slot);
                Err(e)
            }
        }
    }
}
