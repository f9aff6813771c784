//! Asynchronous copies and memsets, queued through a [`Lane`]. Each one is
//! a thin wrapper over `Lane::enqueue` (`lane.rs`), which orders it, records
//! its fence and notes the fence on both buffers: this module only checks
//! lengths and computes addresses.

use cudarc::driver::{result, sys};

use crate::error::{check_len, DriverResultExt};
use crate::lane::Lane;
use crate::memory::{DeviceBuffer, Element, PinnedBuffer, Tracked};
use crate::order::Fence;
use crate::order::{Access, Used};
use crate::Result;

impl<T: Element> DeviceBuffer<T> {
    /// Allocates `len` elements and queues their zeroing on `lane` (later
    /// uses on any stream are ordered after it). Zero length and
    /// out-of-memory are typed errors.
    pub fn zeroed(lane: &mut Lane, len: usize) -> Result<Self> {
        // SAFETY: the memset queued below writes every byte before any other
        // use can be queued (the buffer is not yet shared), and every later
        // use is ordered after it through the write fence it records. If
        // queueing fails, the buffer is dropped unread.
        let mut buf = unsafe { Self::uninit(lane.gpu(), len)? };
        lane.zero(&mut buf)?;
        Ok(buf)
    }

    /// Allocates `data.len()` elements and queues their upload from `data`
    /// on `lane`, without zeroing them first. `data` is ordinary (pageable)
    /// memory: the driver copies it into its own staging before this
    /// returns, so `data` is free again at once; the transfer to the device
    /// runs in stream order on the lane (later uses on any stream wait for
    /// it). For large or repeated uploads, copy from a
    /// [`PinnedBuffer`] with [`Lane::copy_htod`] instead.
    pub fn from_slice(lane: &mut Lane, data: &[T]) -> Result<Self> {
        // SAFETY: the upload queued below writes every element before any
        // other use can be queued (the buffer is not yet shared); later uses
        // are ordered after its write fence. If it fails, the buffer is
        // dropped unread.
        let mut buf = unsafe { Self::uninit(lane.gpu(), data.len())? };
        lane.upload_slice(data, &mut buf, 0)?;
        Ok(buf)
    }
}

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
    /// transfer to the device runs later in stream order. Memory the driver
    /// copies asynchronously (page-locked, such as a [`PinnedBuffer`]'s
    /// slice, or managed) is waited for before this returns, since `data`
    /// is borrowed only for the call. Slower than a copy from a
    /// [`PinnedBuffer`] ([`copy_htod`](Self::copy_htod)), and it blocks the
    /// calling thread while the driver stages the bytes: use it for
    /// parameters, small tables and one-off inputs.
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

/// One item of a batched copy ([`Lane::copy_batch_htod`],
/// [`Lane::copy_batch_dtoh`]): `len` elements at element `host_at` of the
/// item's pinned buffer and at element `device_at` of the device buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchItem {
    /// First element of the item in its pinned buffer.
    pub host_at: usize,
    /// First element of the item in the device buffer.
    pub device_at: usize,
    /// Elements to copy (not zero).
    pub len: usize,
}

impl BatchItem {
    /// `len` elements at `host_at` in the pinned buffer, at `device_at` on
    /// the device.
    pub fn new(host_at: usize, device_at: usize, len: usize) -> Self {
        Self {
            host_at,
            device_at,
            len,
        }
    }

    /// All of `buf`, at `device_at` on the device.
    pub fn whole<T: Element>(buf: &PinnedBuffer<T>, device_at: usize) -> Self {
        Self::new(0, device_at, buf.len())
    }
}

/// What a batched copy checked: the device elements its items span
/// (`lo..hi`, the hull of their ranges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchSpan {
    pub(crate) lo: usize,
    pub(crate) hi: usize,
}

/// Checks a batch before anything is queued: at least one item, none
/// empty, each inside its pinned buffer (`host_lens[k]` elements) and the
/// device buffer (`device_len` elements), every sum checked; with
/// `disjoint_device`, no two items' device ranges overlap (a batch that
/// writes the device buffer). Host ranges of a batch that writes them are
/// disjoint by construction (each pinned buffer is borrowed `&mut` once).
pub(crate) fn check_batch(
    items: &[(usize, BatchItem)],
    device_len: usize,
    disjoint_device: bool,
) -> Result<BatchSpan> {
    if items.is_empty() {
        return Err(crate::Error::ZeroLength {
            what: "batched copy (no items)",
        });
    }
    let (mut lo, mut hi) = (usize::MAX, 0usize);
    for &(host_len, it) in items {
        check_len("batched copy item", it.len, usize::MAX)?;
        let host_end = it.host_at.saturating_add(it.len);
        check_len("batched copy item's pinned range", host_end, host_len)?;
        let dev_end = it.device_at.saturating_add(it.len);
        check_len("batched copy item's device range", dev_end, device_len)?;
        lo = lo.min(it.device_at);
        hi = hi.max(dev_end);
    }
    if disjoint_device {
        check_disjoint(items.iter().map(|(_, it)| (it.device_at, it.len)))?;
    }
    Ok(BatchSpan { lo, hi })
}

/// `(start, len)` ranges (none empty, none wrapping) must not overlap;
/// ranges that come in order are checked without sorting.
fn check_disjoint(ranges: impl ExactSizeIterator<Item = (usize, usize)> + Clone) -> Result<()> {
    let overlap = |first: usize, second: usize| crate::Error::Overlap {
        what: "a batched copy's device destinations",
        first: first.min(second),
        second: first.max(second),
    };
    let mut end = 0usize;
    let sorted = ranges.clone().all(|(at, len)| {
        let ok = at >= end;
        end = at + len;
        ok
    });
    if sorted {
        return Ok(());
    }
    let mut order: Vec<(usize, usize, usize)> = ranges
        .enumerate()
        .map(|(k, (at, len))| (at, at + len, k))
        .collect();
    order.sort_unstable();
    for w in order.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(overlap(w[0].2, w[1].2));
        }
    }
    Ok(())
}

/// Whether this build and the driver can queue batched copies: `Ok`, or
/// `DriverUnsupported` saying why not. Asked once per process.
pub fn batch_copies_supported() -> Result<()> {
    use std::sync::OnceLock;
    static SUPPORT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    if !crate::driver_available() {
        return Err(crate::Error::DriverNotFound);
    }
    SUPPORT
        .get_or_init(batch::probe)
        .clone()
        .map_err(|reason| crate::Error::DriverUnsupported {
            what: "a batched copy (cuMemcpyBatchAsync)",
            reason,
        })
}

/// The driver call of a batched copy, per CUDA version of the bindings.
mod batch {
    use cudarc::driver::sys;

    /// The driver version, as `cuDriverGetVersion` gives it (13000 = 13.0).
    fn driver_version() -> Option<i32> {
        let mut v = 0i32;
        // SAFETY: writes one int; the caller checked that libcuda loads.
        let r = unsafe { sys::cuDriverGetVersion(&mut v) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    /// CUDA 13 headers map `cuMemcpyBatchAsync` to `cuMemcpyBatchAsync_v2`
    /// (no `failIdx` argument), which cudarc's CUDA 13 bindings call.
    #[cfg(feature = "cuda-13")]
    pub(super) fn probe() -> Result<(), String> {
        let v = driver_version().ok_or("cuDriverGetVersion failed")?;
        if v < 13000 {
            return Err(format!(
                "the driver supports CUDA {}.{}, and this build (feature cuda-13) calls cuMemcpyBatchAsync_v2, which needs a CUDA 13 driver",
                v / 1000,
                v % 1000 / 10
            ));
        }
        // cudarc's dynamic loader panics on a missing symbol: look first.
        // SAFETY: culib only dlopens libcuda (present: the caller checked);
        // looking a symbol up runs no code of it.
        let found = unsafe {
            sys::culib()
                .get::<unsafe extern "C" fn()>(b"cuMemcpyBatchAsync_v2\0")
                .is_ok()
        };
        if !found {
            return Err("the driver library has no cuMemcpyBatchAsync_v2".into());
        }
        Ok(())
    }

    /// CUDA 12.0's bindings (feature `cuda-12`) have no batched copy.
    #[cfg(not(feature = "cuda-13"))]
    pub(super) fn probe() -> Result<(), String> {
        let _ = driver_version;
        Err("this build binds CUDA 12.0's driver API (feature cuda-12), which has no cuMemcpyBatchAsync; build with feature cuda-13 for a CUDA 13 driver".into())
    }

    /// Queues `dsts[k] <- srcs[k]` (`sizes[k]` bytes each) on `stream` as
    /// one batch, every source read in stream order.
    ///
    /// # Safety
    ///
    /// The three slices have one length; each (src, dst, size) names
    /// memory the copy may read and write (page-locked host memory or
    /// device memory of the stream's context, current on this thread)
    /// that stays alive and otherwise unused until the stream reaches the
    /// copy; [`probe`] returned `Ok`.
    #[cfg(feature = "cuda-13")]
    pub(super) unsafe fn memcpy(
        dsts: &mut [sys::CUdeviceptr],
        srcs: &mut [sys::CUdeviceptr],
        sizes: &mut [usize],
        stream: sys::CUstream,
    ) -> Result<(), sys::CUresult> {
        let hint = sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_INVALID,
            id: 0,
        };
        // One attribute for every copy: sources accessed in stream order
        // (after the waits prism issued on the stream), no location hints
        // (they apply to managed memory only), default flags.
        let mut attr = sys::CUmemcpyAttributes {
            srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint: hint,
            dstLocHint: hint,
            flags: 0,
        };
        let mut first = 0usize;
        // SAFETY: the caller's contract; the arrays and the attribute are
        // only read during the call (the driver copies the descriptions).
        let r = unsafe {
            sys::cuMemcpyBatchAsync_v2(
                dsts.as_mut_ptr(),
                srcs.as_mut_ptr(),
                sizes.as_mut_ptr(),
                sizes.len(),
                &mut attr,
                &mut first,
                1,
                stream,
            )
        };
        match r {
            sys::CUresult::CUDA_SUCCESS => Ok(()),
            e => Err(e),
        }
    }

    /// Never called: [`probe`] fails first in this build.
    ///
    /// # Safety
    ///
    /// None needed; it queues nothing.
    #[cfg(not(feature = "cuda-13"))]
    pub(super) unsafe fn memcpy(
        _dsts: &mut [sys::CUdeviceptr],
        _srcs: &mut [sys::CUdeviceptr],
        _sizes: &mut [usize],
        _stream: sys::CUstream,
    ) -> Result<(), sys::CUresult> {
        Err(sys::CUresult::CUDA_ERROR_NOT_SUPPORTED)
    }
}

impl Lane {
    /// Copies every item's range of its pinned buffer into its place in
    /// `dst` with one driver call (`cuMemcpyBatchAsync`: the driver spreads
    /// the items over its copy engines; far fewer fixed costs than one
    /// copy per small item). Items may come from any number of pinned
    /// buffers, several from one buffer, in any order; their device ranges
    /// must not overlap (`Overlap`). Ordered like [`copy_htod`](Self::copy_htod):
    /// after the last write of every source range and every earlier use of
    /// `dst`'s span (the hull of the items' device ranges), and fenced on
    /// all of them before it returns: host writes to a source fail with
    /// `BufferInFlight` until the returned fence completes, and no buffer
    /// is freed before.
    ///
    /// Fails with `DriverUnsupported`, queueing nothing, where the driver
    /// or this build lacks batched copies (see [`batch_copies_supported`]);
    /// with `ZeroLength` for no items or an empty item, `LengthMismatch`
    /// for a range outside its buffer, `WrongContext` for a buffer of
    /// another context (a portable pinned buffer is allowed).
    ///
    /// [`batch_copies_supported`]: crate::batch_copies_supported
    pub fn copy_batch_htod<T: Element>(
        &mut self,
        items: &[(&PinnedBuffer<T>, BatchItem)],
        dst: &mut DeviceBuffer<T>,
    ) -> Result<Fence> {
        self.batch_htod(items, dst, false).map(|(_, end)| end)
    }

    /// [`copy_batch_htod`](Self::copy_batch_htod) with optional timing, as
    /// [`copy_htod_timed`](Self::copy_htod_timed).
    pub fn copy_batch_htod_timed<T: Element>(
        &mut self,
        items: &[(&PinnedBuffer<T>, BatchItem)],
        dst: &mut DeviceBuffer<T>,
        timed: bool,
    ) -> Result<(Option<Fence>, Fence)> {
        self.batch_htod(items, dst, timed)
    }

    /// Copies each item's place in `src` into its range of its own pinned
    /// buffer with one driver call (`cuMemcpyBatchAsync`). Each pinned
    /// buffer appears once (it is borrowed `&mut`); device ranges may
    /// overlap (they are only read). Ordered after the last write of
    /// `src`'s span and every earlier use of each destination range, and
    /// fenced on all of them before it returns: host reads of a
    /// destination fail with `BufferInFlight` (and `wait_slice` waits)
    /// until the returned fence completes. Errors as for
    /// [`copy_batch_htod`](Self::copy_batch_htod).
    pub fn copy_batch_dtoh<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        items: &mut [(&mut PinnedBuffer<T>, BatchItem)],
    ) -> Result<Fence> {
        self.batch_dtoh(src, items, false).map(|(_, end)| end)
    }

    /// [`copy_batch_dtoh`](Self::copy_batch_dtoh) with optional timing, as
    /// [`copy_htod_timed`](Self::copy_htod_timed).
    pub fn copy_batch_dtoh_timed<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        items: &mut [(&mut PinnedBuffer<T>, BatchItem)],
        timed: bool,
    ) -> Result<(Option<Fence>, Fence)> {
        self.batch_dtoh(src, items, timed)
    }

    fn batch_htod<T: Element>(
        &mut self,
        items: &[(&PinnedBuffer<T>, BatchItem)],
        dst: &mut DeviceBuffer<T>,
        timed: bool,
    ) -> Result<(Option<Fence>, Fence)> {
        let checked: Vec<(usize, BatchItem)> = items.iter().map(|(b, it)| (b.len(), *it)).collect();
        let span = check_batch(&checked, dst.len(), true)?;
        batch_copies_supported()?;
        let size = std::mem::size_of::<T>();
        let base = dst.addr();
        let n = items.len();
        let (mut dsts, mut srcs, mut sizes) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut uses: Vec<Used<'_>> = Vec::with_capacity(n + 1);
        for (buf, it) in items {
            srcs.push(buf.raw().wrapping_add(it.host_at) as sys::CUdeviceptr);
            dsts.push(base + (it.device_at * size) as u64);
            sizes.push(it.len * size);
            uses.push(buf.used_range(
                Access::Read,
                "batched copy's pinned source",
                it.host_at * size,
                (it.host_at + it.len) * size,
            ));
        }
        uses.push(dst.used_range(
            Access::Write,
            "batched copy's device destination",
            span.lo * size,
            span.hi * size,
        ));
        let (start, end, ()) = self.enqueue(&uses, timed, |stream| {
            // SAFETY: every source is `sizes[k]` bytes inside a page-locked
            // buffer and every destination inside `dst`, an allocation of
            // this context (bounds checked by check_batch, the context by
            // enqueue, which made it current); the destinations are
            // disjoint. All are ordered after their conflicting uses and
            // recorded with this copy's fence before enqueue returns, so
            // none is written by the host nor freed until the copy ends.
            // The probe above succeeded.
            batch_result(unsafe { batch::memcpy(&mut dsts, &mut srcs, &mut sizes, stream) })
        })?;
        Ok((start, end))
    }

    fn batch_dtoh<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        items: &mut [(&mut PinnedBuffer<T>, BatchItem)],
        timed: bool,
    ) -> Result<(Option<Fence>, Fence)> {
        let checked: Vec<(usize, BatchItem)> = items.iter().map(|(b, it)| (b.len(), *it)).collect();
        let span = check_batch(&checked, src.len(), false)?;
        batch_copies_supported()?;
        let size = std::mem::size_of::<T>();
        let base = src.addr();
        let n = items.len();
        let (mut dsts, mut srcs, mut sizes) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut uses: Vec<Used<'_>> = Vec::with_capacity(n + 1);
        uses.push(src.used_range(
            Access::Read,
            "batched copy's device source",
            span.lo * size,
            span.hi * size,
        ));
        for (buf, it) in items.iter() {
            dsts.push(buf.raw().wrapping_add(it.host_at) as sys::CUdeviceptr);
            srcs.push(base + (it.device_at * size) as u64);
            sizes.push(it.len * size);
            uses.push(buf.used_range(
                Access::Write,
                "batched copy's pinned destination",
                it.host_at * size,
                (it.host_at + it.len) * size,
            ));
        }
        let (start, end, ()) = self.enqueue(&uses, timed, |stream| {
            // SAFETY: as in batch_htod with the roles swapped: each
            // destination is `sizes[k]` bytes inside its own page-locked
            // buffer (each borrowed &mut once, so they are disjoint), which
            // host code cannot read or free until the write fence recorded
            // by enqueue completes.
            batch_result(unsafe { batch::memcpy(&mut dsts, &mut srcs, &mut sizes, stream) })
        })?;
        Ok((start, end))
    }
}

/// A batched copy's driver status: `CUDA_ERROR_NOT_SUPPORTED` is the typed
/// `DriverUnsupported` a caller falls back on; anything else a driver error.
fn batch_result(r: std::result::Result<(), sys::CUresult>) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(sys::CUresult::CUDA_ERROR_NOT_SUPPORTED) => Err(crate::Error::DriverUnsupported {
            what: "a batched copy (cuMemcpyBatchAsync)",
            reason: "the driver refused it (CUDA_ERROR_NOT_SUPPORTED)".into(),
        }),
        Err(code) => Err(cudarc::driver::DriverError(code)).call("cuMemcpyBatchAsync"),
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

    fn it(host_at: usize, device_at: usize, len: usize) -> BatchItem {
        BatchItem::new(host_at, device_at, len)
    }

    #[test]
    fn batches_are_checked_before_queueing() {
        // Back to back from three buffers, one of them twice.
        let ok = [(10, it(0, 0, 10)), (7, it(2, 10, 5)), (10, it(3, 15, 1))];
        assert_eq!(
            check_batch(&ok, 16, true).unwrap(),
            BatchSpan { lo: 0, hi: 16 }
        );
        // Out of order and with gaps: the span is the hull.
        let gaps = [(4, it(0, 20, 4)), (4, it(0, 3, 4))];
        assert_eq!(
            check_batch(&gaps, 24, true).unwrap(),
            BatchSpan { lo: 3, hi: 24 }
        );
        assert!(matches!(
            check_batch(&[], 16, true),
            Err(crate::Error::ZeroLength { .. })
        ));
        assert!(matches!(
            check_batch(&[(4, it(0, 0, 0))], 16, true),
            Err(crate::Error::ZeroLength { .. })
        ));
        // Past the pinned buffer, past the device buffer, wrapping sums.
        assert!(matches!(
            check_batch(&[(4, it(1, 0, 4))], 16, true),
            Err(crate::Error::LengthMismatch {
                expected: 4,
                actual: 5,
                ..
            })
        ));
        assert!(matches!(
            check_batch(&[(4, it(0, 13, 4))], 16, true),
            Err(crate::Error::LengthMismatch {
                expected: 16,
                actual: 17,
                ..
            })
        ));
        assert!(check_batch(&[(4, it(usize::MAX, 0, 2))], 16, true).is_err());
        assert!(check_batch(&[(4, it(0, usize::MAX, 2))], 16, true).is_err());
    }

    #[test]
    fn overlapping_destinations_are_refused_only_where_written() {
        let clash = [(8, it(0, 0, 8)), (8, it(0, 12, 4)), (8, it(0, 7, 2))];
        match check_batch(&clash, 32, true) {
            Err(crate::Error::Overlap { first, second, .. }) => {
                assert_eq!((first, second), (0, 2));
            }
            other => panic!("{other:?}"),
        }
        // The same device ranges read by a download are fine.
        assert!(check_batch(&clash, 32, false).is_ok());
        // Touching is not overlapping, in any order.
        let touch = [(4, it(0, 4, 4)), (4, it(0, 0, 4)), (4, it(0, 8, 4))];
        assert!(check_batch(&touch, 12, true).is_ok());
        // One item inside another, and two identical ranges.
        assert!(check_batch(&[(8, it(0, 0, 8)), (2, it(0, 3, 2))], 8, true).is_err());
        assert!(check_batch(&[(2, it(0, 5, 2)), (2, it(0, 5, 2))], 8, true).is_err());
    }

    #[test]
    fn ranges_are_checked_without_overflow() {
        assert_eq!(range_bytes::<f32>("r", 2, 3, 5).unwrap(), (8, 12));
        assert!(range_bytes::<f32>("r", 3, 3, 5).is_err());
        assert!(range_bytes::<f32>("r", 0, 0, 5).is_err());
        assert!(range_bytes::<f32>("r", usize::MAX, 2, 5).is_err());
    }
}
