//! Outside work: GPU work that prism does not enqueue itself (a cuBLAS or
//! cuFFT call, a launch through cudarc or a C launcher, another library's
//! kernels) run on a prism lane, ordered like prism's own ops. The caller
//! names the buffers the work reads and writes ([`Outside::read`],
//! [`Outside::write`]); [`Outside::run`] makes the lane wait for their
//! conflicting earlier uses, hands the closure the lane's stream and views
//! of the named buffers, and fences them after the closure returned, as
//! `Lane::enqueue` (`lane.rs`) does for every op: the work sits between the
//! waits and the fence in stream order. Inside a capture
//! ([`Lane::capture`](crate::Lane::capture)) the work is recorded into the
//! graph like any other op of the scope.
//!
//! The views ([`DeviceView`], [`DeviceViewMut`]) implement cudarc's
//! `DevicePtr`/`DevicePtrMut`, so cudarc's library wrappers take them
//! directly. They exist only inside the closure (their lifetime is the
//! closure's borrow of [`Work`]), so no address outlives the ordering.
//! A view handed to a call on another stream is still ordered, slowly: the
//! host waits for the lane before it and for that stream after it.

use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::{sys, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};

use crate::error::DriverResultExt;
use crate::kernels::Launch;
use crate::lane::Lane;
use crate::memory::{DeviceBuffer, Element, Tracked};
use crate::order::Fence;
use crate::order::{Access, Used};
use crate::{Error, Result};

static NEXT_SCOPE: AtomicU64 = AtomicU64::new(1);

/// Outside work being set up on a lane: the buffers it uses, then
/// [`run`](Self::run). Made by [`Launch::outside`] (inside a stage, a
/// coordinator op or a capture) or [`Lane::outside`].
#[derive(Debug)]
pub struct Outside<'a> {
    lane: &'a mut Lane,
    last: Option<&'a mut Option<Fence>>,
    uses: Vec<Used<'a>>,
    /// (address, elements) of each named buffer, in naming order.
    bufs: Vec<(sys::CUdeviceptr, usize)>,
    id: u64,
    #[cfg(feature = "cublas")]
    blas: Option<crate::libs::Lent<'a, cudarc::cublas::CudaBlas>>,
    #[cfg(feature = "cufft")]
    fft: Option<crate::libs::Lent<'a, cudarc::cufft::CudaFft>>,
}

/// A buffer named for reading in an [`Outside`] block; turned into a view
/// inside [`Outside::run`] with [`Work::view`].
#[derive(Debug)]
pub struct Arg<T> {
    index: usize,
    scope: u64,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Arg<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Arg<T> {}

/// A buffer named for writing in an [`Outside`] block; turned into its one
/// mutable view inside [`Outside::run`] with [`Work::view_mut`] (it is
/// consumed, so no two mutable views of one buffer exist).
#[derive(Debug)]
pub struct ArgMut<T> {
    index: usize,
    scope: u64,
    _t: PhantomData<fn() -> T>,
}

impl<T> ArgMut<T> {
    /// A read view's handle of the same buffer (the work may read what it writes).
    pub fn as_read(&self) -> Arg<T> {
        Arg {
            index: self.index,
            scope: self.scope,
            _t: PhantomData,
        }
    }
}

impl Launch<'_> {
    /// Starts outside work on this scope's lane (see [`Outside`]).
    pub fn outside(&mut self) -> Outside<'_> {
        let (lane, last) = self.parts();
        Outside::new(lane, Some(last))
    }
}

impl Lane {
    /// Starts outside work on this lane (see [`Outside`]).
    pub fn outside(&mut self) -> Outside<'_> {
        Outside::new(self, None)
    }
}

impl<'a> Outside<'a> {
    fn new(lane: &'a mut Lane, last: Option<&'a mut Option<Fence>>) -> Self {
        Self {
            lane,
            last,
            uses: Vec::new(),
            bufs: Vec::new(),
            id: NEXT_SCOPE.fetch_add(1, Ordering::Relaxed),
            #[cfg(feature = "cublas")]
            blas: None,
            #[cfg(feature = "cufft")]
            fft: None,
        }
    }

    /// Names the cuBLAS handle the work uses (feature `cublas`; one per
    /// block, the last named wins): its workspace is ordered like a buffer
    /// the block writes, and [`Work::blas`] gives it bound to the block's
    /// stream. Not inside a capture (the graph would outlive its
    /// workspace).
    #[cfg(feature = "cublas")]
    pub fn blas(&mut self, blas: &'a mut crate::libs::Blas) {
        let (used, lent) = blas.split();
        self.uses.push(used);
        self.blas = Some(lent);
    }

    /// Names the cuFFT plan the work uses (feature `cufft`; one per block):
    /// its work area is ordered like a buffer the block writes, and
    /// [`Work::fft`] gives it bound to the block's stream. Not inside a
    /// capture.
    #[cfg(feature = "cufft")]
    pub fn fft(&mut self, plan: &'a mut crate::libs::FftPlan) {
        let (used, lent) = plan.split();
        self.uses.push(used);
        self.fft = Some(lent);
    }

    /// Names a device buffer the work reads (all of it).
    pub fn read<T: Element>(&mut self, buf: &'a DeviceBuffer<T>) -> Arg<T> {
        self.uses
            .push(buf.used(Access::Read, "outside work's input"));
        self.bufs.push((buf.addr(), buf.len()));
        Arg {
            index: self.bufs.len() - 1,
            scope: self.id,
            _t: PhantomData,
        }
    }

    /// Names a device buffer the work writes (and may read).
    pub fn write<T: Element>(&mut self, buf: &'a mut DeviceBuffer<T>) -> ArgMut<T> {
        self.uses
            .push(buf.used(Access::Write, "outside work's output"));
        self.bufs.push((buf.addr(), buf.len()));
        ArgMut {
            index: self.bufs.len() - 1,
            scope: self.id,
            _t: PhantomData,
        }
    }

    /// Runs `work`, which enqueues GPU work on the lane's stream
    /// ([`Work::stream`]) using the named buffers ([`Work::view`],
    /// [`Work::view_mut`], [`Work::ptr`]): after their conflicting earlier
    /// uses, fenced on each before this returns (or recorded into the
    /// graph, inside a capture). What `work` returns comes back; a panic in
    /// it is resumed after the fences are noted.
    ///
    /// The block holds its buffers until it returns: another thread's op
    /// that conflicts with one of them (either writes, the bytes overlap)
    /// waits for it. An op queued from inside `work` that conflicts with
    /// this block's buffers, or meets another thread's op being queued on
    /// its own, is refused with [`Error::BufferBusy`] (waiting could
    /// deadlock). The refusal is per thread: `work` must not wait for
    /// other threads (joined helpers, locks, channels) that queue prism
    /// work on the block's buffers, which would wait for the block.
    ///
    /// # Safety
    ///
    /// prism cannot see what `work` enqueues. The caller guarantees that
    /// it touches device or host memory prism manages only through the
    /// buffers named here, reads only those named with `read`, stays within
    /// their lengths, and enqueues only on the lane's stream (work put on
    /// another stream through a raw handle is not ordered; a view passed to
    /// a cudarc call on another stream is, see the module docs); that it
    /// keeps no address of a named buffer after it returns; and that it
    /// does not synchronise, capture, or destroy the lane's stream, nor
    /// record or wait on events there that prism's ordering does not know
    /// of. Work that only uses memory of its own (cudarc slices, a
    /// library's workspace) is ordered by its own means.
    pub unsafe fn run<R>(mut self, work: impl FnOnce(&mut Work<'_>) -> R) -> Result<R> {
        let capturing = self.lane.capture.is_some();
        let stream = Arc::clone(self.lane.core_stream());
        let (bufs, id) = (std::mem::take(&mut self.bufs), self.id);
        #[cfg(feature = "cublas")]
        let blas = self.blas.take();
        #[cfg(feature = "cufft")]
        let fft = self.fft.take();
        let (end, outcome) = self.lane.enqueue_scoped(&self.uses, |_raw| {
            let mut w = Work {
                stream: &stream,
                bufs: &bufs,
                scope: id,
                capturing,
                foreign: std::cell::Cell::new(false),
                #[cfg(feature = "cublas")]
                blas: match blas {
                    Some(b) => Some(b.bind(&stream)?),
                    None => None,
                },
                #[cfg(feature = "cufft")]
                fft: match fft {
                    Some(p) => Some(p.bind(&stream)?),
                    None => None,
                },
            };
            let r = catch_unwind(AssertUnwindSafe(|| work(&mut w)));
            if capturing && w.foreign.get() {
                return Ok(Err(Error::NotCapturable {
                    what: "outside work on another stream",
                    reason: "only the capturing lane's stream is recorded",
                }));
            }
            if w.foreign.get() {
                // A view used on another stream: that stream's work must
                // end before the lane's next op. cudarc's guards synchronise
                // it, unless cudarc had an error stashed; the driver's
                // context-wide wait does not depend on cudarc's state.
                crate::raw::ctx_synchronize().call("cuCtxSynchronize")?;
            }
            Ok(Ok(r))
        })?;
        if let (Some(end), Some(last)) = (end, self.last.as_mut()) {
            **last = Some(end);
        }
        match outcome? {
            Ok(r) => Ok(r),
            Err(panic) => resume_unwind(panic),
        }
    }
}

/// What the closure of [`Outside::run`] gets: the lane's stream and views
/// of the named buffers, valid for the closure only.
pub struct Work<'w> {
    stream: &'w Arc<CudaStream>,
    bufs: &'w [(sys::CUdeviceptr, usize)],
    scope: u64,
    capturing: bool,
    foreign: std::cell::Cell<bool>,
    #[cfg(feature = "cublas")]
    blas: Option<&'w cudarc::cublas::CudaBlas>,
    #[cfg(feature = "cufft")]
    fft: Option<&'w cudarc::cufft::CudaFft>,
}

impl std::fmt::Debug for Work<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Work")
            .field("stream", &self.stream.cu_stream())
            .field("buffers", &self.bufs.len())
            .field("capturing", &self.capturing)
            .finish_non_exhaustive()
    }
}

impl<'w> Work<'w> {
    /// The cuBLAS handle named with [`Outside::blas`], bound to this
    /// block's stream, for cudarc's cuBLAS calls on this block's views.
    #[cfg(feature = "cublas")]
    pub fn blas(&self) -> Result<&cudarc::cublas::CudaBlas> {
        self.blas.ok_or(Error::WrongScope {
            what: "cuBLAS handle (not named with Outside::blas)",
            scope: "outside-work block",
        })
    }

    /// The cuFFT plan named with [`Outside::fft`], bound to this block's
    /// stream.
    #[cfg(feature = "cufft")]
    pub fn fft(&self) -> Result<&cudarc::cufft::CudaFft> {
        self.fft.ok_or(Error::WrongScope {
            what: "cuFFT plan (not named with Outside::fft)",
            scope: "outside-work block",
        })
    }

    /// The lane's stream: enqueue the work here (library handles bound to
    /// it, cudarc launches, a C launcher taking `cu_stream()`).
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.stream
    }

    fn slot(&self, index: usize, scope: u64) -> Result<(sys::CUdeviceptr, usize)> {
        if scope != self.scope {
            return Err(Error::WrongScope {
                what: "outside-work argument",
                scope: "outside-work block",
            });
        }
        self.bufs.get(index).copied().ok_or(Error::WrongScope {
            what: "outside-work argument",
            scope: "outside-work block",
        })
    }

    /// A read view of a named buffer (cudarc's `DevicePtr`).
    pub fn view<T: Element>(&self, arg: Arg<T>) -> Result<DeviceView<'_, T>> {
        let (ptr, len) = self.slot(arg.index, arg.scope)?;
        Ok(DeviceView {
            ptr,
            len,
            work: self,
            _t: PhantomData,
        })
    }

    /// The mutable view of a buffer named with `write` (cudarc's
    /// `DevicePtrMut`).
    pub fn view_mut<T: Element>(&self, arg: ArgMut<T>) -> Result<DeviceViewMut<'_, T>> {
        let (ptr, len) = self.slot(arg.index, arg.scope)?;
        Ok(DeviceViewMut {
            ptr,
            len,
            work: self,
            _t: PhantomData,
        })
    }

    /// A read view of a named buffer as elements of `U` (cuFFT's
    /// `float2` over interleaved `f32`, say): the buffer's bytes must be a
    /// whole number of `U`s.
    pub fn view_as<T: Element, U>(&self, arg: Arg<T>) -> Result<DeviceView<'_, U>> {
        let (ptr, len) = self.slot(arg.index, arg.scope)?;
        Ok(DeviceView {
            ptr,
            len: recount::<T, U>(len)?,
            work: self,
            _t: PhantomData,
        })
    }

    /// The mutable view of a buffer named with `write`, as elements of `U`.
    pub fn view_mut_as<T: Element, U>(&self, arg: ArgMut<T>) -> Result<DeviceViewMut<'_, U>> {
        let (ptr, len) = self.slot(arg.index, arg.scope)?;
        Ok(DeviceViewMut {
            ptr,
            len: recount::<T, U>(len)?,
            work: self,
            _t: PhantomData,
        })
    }

    /// The raw address and length (elements) of a named buffer, for a C
    /// launcher or a raw driver call on [`stream`](Self::stream).
    pub fn ptr<T: Element>(&self, arg: Arg<T>) -> Result<(sys::CUdeviceptr, usize)> {
        self.slot(arg.index, arg.scope)
    }

    /// [`ptr`](Self::ptr) of a buffer named with `write`.
    pub fn ptr_mut<T: Element>(&self, arg: &ArgMut<T>) -> Result<(sys::CUdeviceptr, usize)> {
        self.slot(arg.index, arg.scope)
    }

    /// Orders a view's use on `other` (not the lane's stream): the host
    /// waits for the lane now, and cudarc's guard synchronises `other`
    /// after the call. Inside a capture it is refused after the closure.
    fn on_stream<'s>(&'s self, other: &'s CudaStream) -> SyncOnDrop<'s> {
        if other.cu_stream() == self.stream.cu_stream() {
            return SyncOnDrop::Sync(None);
        }
        self.foreign.set(true);
        if self.capturing {
            return SyncOnDrop::Sync(None);
        }
        tracing::warn!(
            "a prism buffer's view used on another stream: the host waits for both streams"
        );
        // Through the driver, not cudarc's `synchronize`, which returns an
        // error cudarc stashed in its context object without waiting. A
        // failed wait leaves a sticky error the lane's next op reports.
        let _ = crate::raw::stream_synchronize(self.stream);
        // cudarc's guard synchronises `other` when it drops, through cudarc
        // (which may skip the wait the same way): `run` also waits for the
        // whole context, through the driver, after the closure.
        SyncOnDrop::Sync(Some(other))
    }
}

/// `len` elements of `T` as elements of `U`.
fn recount<T, U>(len: usize) -> Result<usize> {
    let (t, u) = (std::mem::size_of::<T>(), std::mem::size_of::<U>());
    let bytes = len * t;
    if u == 0 || !bytes.is_multiple_of(u) {
        return Err(Error::LengthMismatch {
            what: "view of another element type (bytes must be a whole number of them)",
            expected: bytes.div_ceil(u.max(1)) * u.max(1),
            actual: bytes,
        });
    }
    Ok(bytes / u)
}

/// A read view of a prism buffer inside outside work: cudarc's
/// `DevicePtr`, so cudarc's library calls (cuFFT, cuBLAS helpers) take it.
#[derive(Debug)]
pub struct DeviceView<'w, T> {
    ptr: sys::CUdeviceptr,
    len: usize,
    work: &'w Work<'w>,
    _t: PhantomData<fn() -> T>,
}

/// A mutable view of a prism buffer inside outside work: cudarc's
/// `DevicePtrMut`.
#[derive(Debug)]
pub struct DeviceViewMut<'w, T> {
    ptr: sys::CUdeviceptr,
    len: usize,
    work: &'w Work<'w>,
    _t: PhantomData<fn() -> T>,
}

impl<T> DeviceSlice<T> for DeviceView<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        self.work.stream
    }
}

impl<T> DeviceSlice<T> for DeviceViewMut<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        self.work.stream
    }
}

impl<T> DevicePtr<T> for DeviceView<'_, T> {
    fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, self.work.on_stream(stream))
    }
}

impl<T> DevicePtr<T> for DeviceViewMut<'_, T> {
    fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, self.work.on_stream(stream))
    }
}

impl<T> DevicePtrMut<T> for DeviceViewMut<'_, T> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        stream: &'a CudaStream,
    ) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, self.work.on_stream(stream))
    }
}
