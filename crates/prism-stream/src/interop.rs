//! Interop with cudarc: a `CudaSlice` becomes a [`DeviceBuffer`] and back,
//! and a cudarc `CudaStream` becomes a [`Lane`] and back. Ownership moves;
//! nothing is copied. A refused conversion hands the object back unchanged
//! in an [`InteropError`].
//!
//! # Soundness
//!
//! Each conversion keeps prism's contract (no use of memory the GPU still
//! writes, no free of memory it still uses, no skipped ordering) on top of
//! cudarc's own:
//!
//! - **Slice to buffer.** prism's first use must come after every pending
//!   use of the slice. prism orders it after the point at which cudarc's
//!   own `Drop` would free the slice: its stream, after that stream waited
//!   for the slice's last tracked read and write elsewhere (cudarc's
//!   `device_ptr_mut` makes those waits, as `Drop` and `leak` do). A fence
//!   recorded there becomes the buffer's first write, so every later use
//!   waits for it on the GPU, and `Drop` before freeing. Where cudarc does
//!   not track the slice's uses across streams (its context's event
//!   tracking off, or no stream of its own created yet) or the stream is a
//!   default stream (the legacy one, or the per-thread one, which differs
//!   from thread to thread), prism cannot know which streams used it and
//!   waits on the host for the whole context (`cuCtxSynchronize`) instead.
//!   cudarc gives the allocation up (`leak`), so it frees nothing; prism's
//!   `Drop` frees it with `cuMemFree`, which accepts `cuMemAllocAsync`'s
//!   memory once every access completed (CUDA Programming Guide, "Stream
//!   Ordered Memory Allocator").
//! - **Buffer to slice.** cudarc's uses (on any stream) and its free must
//!   come after every pending use of the buffer. The receiving stream waits
//!   on the GPU for all of the buffer's fences, reads and writes; then the
//!   slice's write event is recorded there (through cudarc's
//!   `device_ptr_mut`), so cudarc orders the slice's uses on its other
//!   streams after it, and its `Drop` frees on that stream (`cuMemFreeAsync`
//!   accepts `cuMemAlloc`'s memory). Where cudarc would not honour the
//!   event for the slice's whole life (tracking off, no stream of its own
//!   yet, or a default stream, whose handle keeps no stream count up), and
//!   whenever a wait or the record fails, prism waits on the host for every
//!   use instead, so nothing of prism's is left running.
//! - **Stream to lane and back.** A lane takes a stream only when prism
//!   gets the sole handle to it (`Arc::get_mut`): cudarc's safe
//!   `begin_capture` on a stream a lane still used would put prism's
//!   copies and kernels into a graph that runs whenever the user launches
//!   it, after prism believed them done. The default streams are refused
//!   (one is a different stream on every thread; prism never uses the
//!   legacy one), and so is a stream in capture. `into_cuda_stream` hands
//!   the stream back only from a lane that shares it with no other, and
//!   consumes that lane, so prism queues nothing more there; fences it
//!   recorded keep their meaning.
//!
//! No prism stream ever waits on an event recorded during a capture (such
//! a wait would pull it into the capture): fences are only recorded on
//! prism's streams, on lanes' streams held alone and checked not to be
//! capturing, and here on a slice's stream, where a record that a capture
//! swallowed is detected and discarded (`order::fence_foreign`). A wait
//! that a capturing stream refuses (the driver rejects waits on uncaptured
//! events there) falls back to the host wait.
//!
//! What stays cudarc's: two cudarc `CudaContext` objects on one CUDA
//! context each keep their own stream count and tracking flag, and a
//! slice used through one and freed through the other is ordered only as
//! well as cudarc orders its own `Drop`; prism orders after whatever
//! cudarc's `Drop` would wait for. cudarc's unsafe APIs
//! (`wrap_borrowed_stream`, `disable_event_tracking`, `upgrade_device_ptr`)
//! keep their written contracts: a conversion counts as the slice being
//! freed (from) or allocated (into) on the stream named.

use std::sync::Arc;

use cudarc::driver::sys::{self, CUstreamCaptureStatus};
use cudarc::driver::{result, CudaContext, CudaSlice, CudaStream, DevicePtrMut, DriverError};

use crate::context::Gpu;
use crate::error::DriverResultExt;
use crate::lane::Lane;
use crate::memory::{DeviceBuffer, Element};
use crate::order::Fence;
use crate::order::{fence_foreign, note_made_by, order_foreign_after_all};
use crate::{Error, Result};

/// A refused conversion between a cudarc object and a prism one: why, and
/// the object handed in, unchanged (nothing changed hands). The
/// conversions return it boxed (the objects are large; refusals are rare).
#[derive(Debug)]
pub struct InteropError<V> {
    pub error: Error,
    /// What was handed in: the `CudaSlice`, the `DeviceBuffer`, the
    /// `CudaStream` or the `Lane`.
    pub value: V,
}

impl<V> std::fmt::Display for InteropError<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (the object was handed back)", self.error)
    }
}

impl<V: std::fmt::Debug> std::error::Error for InteropError<V> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<V> From<InteropError<V>> for Error {
    /// The error alone (the object handed back is dropped).
    fn from(e: InteropError<V>) -> Self {
        e.error
    }
}

impl<V> From<Box<InteropError<V>>> for Error {
    /// The error alone (the object handed back is dropped), so `?` works
    /// in functions returning prism's [`Error`].
    fn from(e: Box<InteropError<V>>) -> Self {
        e.error
    }
}

/// Does `ctx` (a cudarc context object) wrap `gpu`'s CUDA context?
fn is_context(gpu: &Gpu, ctx: &CudaContext) -> bool {
    gpu.key() == ctx.cu_ctx() as usize
}

/// Handles with a fixed meaning rather than a stream object: the legacy
/// default stream (null, `CU_STREAM_LEGACY`) and the per-thread default
/// stream (`CU_STREAM_PER_THREAD`, a different stream on every thread).
pub(crate) fn is_default_stream(raw: sys::CUstream) -> bool {
    (raw as usize) <= 2
}

/// Does cudarc order this stream's slices across streams itself (event
/// tracking on and the context in multi-stream mode), and is the stream an
/// object of its own?
fn cudarc_tracks(stream: &CudaStream) -> bool {
    stream.context().is_managing_stream_synchronization() && !is_default_stream(stream.cu_stream())
}

/// Fails with `StreamCapturing` while `stream` is being captured into a
/// graph. The caller made the stream's context current.
pub(crate) fn check_not_capturing(stream: &CudaStream, what: &'static str) -> Result<()> {
    // SAFETY: `stream` is a live stream (borrowed) of the current context;
    // the query only writes its out-parameter.
    let status =
        unsafe { result::stream::is_capturing(stream.cu_stream()) }.call("cuStreamIsCapturing")?;
    if status == CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        Ok(())
    } else {
        Err(Error::StreamCapturing { what })
    }
}

/// Takes out the error cudarc stashed in `ctx` (one a `Drop` or a guard
/// could not return), if any.
fn take_stashed(ctx: &CudaContext) -> Option<DriverError> {
    ctx.check_err().err()
}

/// Puts a stashed error back, so the user's next cudarc call still reports it.
fn restash(ctx: &CudaContext, e: Option<DriverError>) {
    if let Some(e) = e {
        ctx.record_err::<()>(Err(e));
    }
}

/// Blocks until everything queued in `gpu`'s context is done, on every
/// stream (cudarc's and prism's).
fn synchronize_context(gpu: &Gpu) -> Result<()> {
    gpu.bind()?;
    result::ctx::synchronize().call("cuCtxSynchronize")
}

impl<T: Element> DeviceBuffer<T> {
    /// Takes over a cudarc `CudaSlice` of `gpu`'s context, without a copy.
    /// prism's first use of the buffer waits for the slice's pending work:
    /// on the GPU, through a fence recorded on the slice's stream after it
    /// waited for the slice's last tracked uses elsewhere (what cudarc's own
    /// `Drop` waits for); or, where cudarc does not track the slice across
    /// streams (event tracking off, no stream of its own yet) or the slice
    /// lives on a default stream, after a host wait for the whole context.
    /// The buffer frees the memory when it drops, after its uses.
    ///
    /// Refused, with the slice handed back: a slice of another context
    /// (`ForeignContext`), an empty one (`ZeroLength`), a slice whose stream
    /// is being captured into a graph (`StreamCapturing`), an unusable
    /// context.
    pub fn from_cuda_slice(
        gpu: &Gpu,
        mut slice: CudaSlice<T>,
    ) -> std::result::Result<Self, Box<InteropError<CudaSlice<T>>>> {
        let _span =
            tracing::debug_span!("prism.interop.from_cuda_slice", len = slice.len()).entered();
        let fence = match Self::adoption_fence(gpu, &mut slice) {
            Ok(fence) => fence,
            Err(error) => {
                return Err(Box::new(InteropError {
                    error,
                    value: slice,
                }))
            }
        };
        let (len, bytes) = (slice.len(), slice.num_bytes());
        // cudarc gives the allocation up: it frees nothing from here on.
        let ptr = slice.leak();
        let buf = Self::adopt(gpu, ptr, len);
        if let Some(fence) = fence {
            note_made_by(buf.uses(), bytes, &fence);
        }
        Ok(buf)
    }

    /// Checks `slice` and orders what prism does with it after its pending
    /// work: `Some(fence)` recorded on its stream, or `None` after a host
    /// wait for the whole context. Changes nothing of the slice's ownership.
    fn adoption_fence(gpu: &Gpu, slice: &mut CudaSlice<T>) -> Result<Option<Fence>> {
        if !is_context(gpu, slice.context()) {
            return Err(Error::ForeignContext {
                what: "the CudaSlice",
            });
        }
        if slice.is_empty() {
            return Err(Error::ZeroLength { what: "CudaSlice" });
        }
        gpu.check_usable()?;
        gpu.bind()?;
        let stream = Arc::clone(slice.stream());
        check_not_capturing(&stream, "the CudaSlice's stream")?;
        if cudarc_tracks(&stream) {
            let ctx = stream.context();
            let stale = take_stashed(ctx);
            // The waits cudarc's `Drop` makes before it frees: the slice's
            // stream waits for the slice's last tracked read and write on
            // other streams. (The guard then records a write on that stream;
            // harmless, the slice's events go with it.) cudarc stashes a
            // failed wait instead of returning it.
            let (_, guard) = slice.device_ptr_mut(&stream);
            drop(guard);
            let failed = take_stashed(ctx);
            restash(ctx, stale.or(failed));
            if failed.is_none() {
                match fence_foreign(gpu, &stream, "the CudaSlice's stream") {
                    Ok(fence) => return Ok(Some(fence)),
                    Err(e @ Error::StreamCapturing { .. }) => return Err(e),
                    // Ordered on the host below instead.
                    Err(_) => {}
                }
            }
        }
        synchronize_context(gpu)?;
        Ok(None)
    }

    /// Hands the buffer to cudarc as a `CudaSlice` on `stream` (of the
    /// buffer's context), without a copy. Nothing cudarc queues on the
    /// slice, on any stream, and not its free, runs before prism's pending
    /// uses of the buffer: `stream` waits for all of them on the GPU and
    /// the slice's write event is recorded after those waits; where cudarc
    /// would not honour that event for the slice's whole life (event
    /// tracking off, no stream of its own yet, a default stream) or a wait
    /// fails, prism waits for them on the host first.
    ///
    /// Refused, with the buffer handed back: a stream of another context
    /// (`ForeignContext`), a stream being captured into a graph
    /// (`StreamCapturing`), a failed GPU use of the buffer or an unusable
    /// context.
    pub fn into_cuda_slice(
        self,
        stream: &Arc<CudaStream>,
    ) -> std::result::Result<CudaSlice<T>, Box<InteropError<Self>>> {
        let _span =
            tracing::debug_span!("prism.interop.into_cuda_slice", len = self.len()).entered();
        if self.is_shared() {
            return Err(Box::new(InteropError {
                error: Error::InGraph {
                    what: "device buffer handed to cudarc",
                },
                value: self,
            }));
        }
        if self.alloc().is_foreign() {
            // cudarc would free memory that another library owns.
            return Err(Box::new(InteropError {
                error: Error::Unsupported {
                    what: "handing another library's memory (DeviceBuffer::from_foreign) to cudarc",
                    instead: "copy it into a buffer of prism's own first (Launch::copy_dtod)",
                },
                value: self,
            }));
        }
        match self.hand_over(stream) {
            Ok(slice) => {
                // The slice owns the memory now. No graph holds the
                // allocation (checked above, and nothing can capture one
                // from a buffer moved in here), so `disown` gives it up; were
                // it still shared, leaking it beats a double free.
                if let Err(still) = self.disown() {
                    std::mem::forget(still);
                }
                Ok(slice)
            }
            Err(error) => Err(Box::new(InteropError { error, value: self })),
        }
    }

    /// Orders the hand-over and makes the slice; the buffer still owns the
    /// memory until the caller disowns it (on error the slice is given up
    /// with `leak` before returning, so it frees nothing).
    fn hand_over(&self, stream: &Arc<CudaStream>) -> Result<CudaSlice<T>> {
        let gpu = self.gpu();
        if !is_context(gpu, stream.context()) {
            return Err(Error::ForeignContext {
                what: "the CUDA stream",
            });
        }
        gpu.check_usable()?;
        gpu.bind()?;
        check_not_capturing(stream, "the CUDA stream")?;
        let on_gpu = cudarc_tracks(stream) && order_foreign_after_all(self.uses(), stream).is_ok();
        if !on_gpu {
            self.wait_idle()?;
        }
        let ctx = stream.context();
        // cudarc's `upgrade_device_ptr` unwraps the creation of the slice's
        // events, which fails on an error stashed in the context: none is
        // left now, and the context is current.
        let stale = take_stashed(ctx);
        if let Err(source) = ctx.bind_to_thread() {
            restash(ctx, stale);
            return Err(Error::Driver {
                call: "cuCtxSetCurrent",
                source,
            });
        }
        let (ptr, len) = (self.addr(), self.len());
        // SAFETY: `ptr` is a live allocation of `len` elements of T (a
        // DeviceBuffer's contents are initialised, and every bit pattern is a
        // valid T) in `stream`'s context (checked above). The buffer gives it
        // up right after this succeeds (`disown`), so the slice is its only
        // owner and cudarc frees it once, on `stream`: cuMemFreeAsync (or,
        // without memory pools, cuMemFree after a stream sync), both of which
        // accept cuMemAlloc's memory. Every earlier use is complete or ordered
        // before `stream`'s next work (the waits above). On error the slice
        // gives the pointer up (`leak`) and the buffer keeps it.
        //
        // cudarc unwraps the creation of the slice's two events inside
        // `upgrade_device_ptr`; an error arriving between the clear above
        // and that call (another thread's, or an asynchronous fault) would
        // panic there. Nothing has changed hands yet, so the panic is caught
        // and reported as the driver error it stands for.
        let upgraded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
            stream.upgrade_device_ptr::<T>(ptr, len)
        }));
        let mut slice = match upgraded {
            Ok(slice) => slice,
            Err(_) => {
                // cudarc consumed the error it panicked on; the buffer is
                // untouched and stays the caller's.
                restash(ctx, stale);
                return Err(Error::Driver {
                    call: "cuEventCreate (in cudarc's upgrade_device_ptr, which panicked)",
                    source: DriverError(sys::CUresult::CUDA_ERROR_UNKNOWN),
                });
            }
        };
        let mut outcome = Ok(());
        if on_gpu {
            // Records the slice's write event on `stream`, after the waits:
            // cudarc orders the slice's uses on other streams after it.
            let (_, guard) = slice.device_ptr_mut(stream);
            drop(guard);
            if let Some(e) = take_stashed(ctx) {
                // The record may have failed: wait on the host instead.
                restash(ctx, stale.or(Some(e)));
                outcome = self.wait_idle();
            } else {
                restash(ctx, stale);
            }
        } else {
            restash(ctx, stale);
        }
        match outcome {
            Ok(()) => Ok(slice),
            Err(e) => {
                let _ = slice.leak();
                Err(e)
            }
        }
    }
}

impl Lane {
    /// A lane on a cudarc stream of `gpu`'s context, which prism takes over:
    /// `stream` must be the only handle to it (`Arc::strong_count` 1, no
    /// `Weak`), so nothing else can queue work on it or capture it into a
    /// CUDA graph while prism uses it. Work queued there earlier runs
    /// first (stream order). [`into_cuda_stream`](Self::into_cuda_stream)
    /// gives it back. A `CudaSlice` made on the stream holds a handle to it:
    /// convert or drop such slices first.
    ///
    /// Refused, with the stream handed back: a stream of another context
    /// (`ForeignContext`); a default stream, a shared one (`StreamRefused`);
    /// one being captured (`StreamCapturing`); an unusable context.
    pub fn from_cuda_stream(
        gpu: &Gpu,
        mut stream: Arc<CudaStream>,
    ) -> std::result::Result<Self, Box<InteropError<Arc<CudaStream>>>> {
        let _span = tracing::debug_span!("prism.interop.from_cuda_stream").entered();
        let refused = |error, stream| {
            Err(Box::new(InteropError {
                error,
                value: stream,
            }))
        };
        if !is_context(gpu, stream.context()) {
            return refused(
                Error::ForeignContext {
                    what: "the CUDA stream",
                },
                stream,
            );
        }
        if is_default_stream(stream.cu_stream()) {
            return refused(
                Error::StreamRefused {
                    reason: "it is a default stream (the legacy one, which prism never uses, or the per-thread one, a different stream on every thread); make one with CudaContext::new_stream",
                },
                stream,
            );
        }
        if Arc::get_mut(&mut stream).is_none() {
            return refused(
                Error::StreamRefused {
                    reason: "other handles to it exist (clones of the Arc, CudaSlices or graphs made on it); a lane needs the only one",
                },
                stream,
            );
        }
        if let Err(e) = gpu
            .check_usable()
            .and_then(|()| gpu.bind())
            .and_then(|()| check_not_capturing(&stream, "the CUDA stream"))
        {
            return refused(e, stream);
        }
        Ok(Self::adopt(gpu, stream))
    }

    /// The lane's CUDA stream, for cudarc's own work; the lane is consumed,
    /// so prism queues nothing more there. Work cudarc queues on it runs
    /// after everything the lane queued (stream order). Refused, with the
    /// lane handed back, when other lanes share the stream (those a
    /// [`StreamPool`](crate::StreamPool) hands out).
    pub fn into_cuda_stream(self) -> std::result::Result<Arc<CudaStream>, Box<InteropError<Self>>> {
        self.into_stream().map_err(|lane| {
            Box::new(InteropError {
                error: Error::StreamRefused {
                    reason: "other lanes share it (a StreamPool's lanes do)",
                },
                value: *lane,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_stream_handles_are_recognised() {
        for raw in [0usize, 1, 2] {
            assert!(is_default_stream(raw as sys::CUstream), "{raw}");
        }
        assert!(!is_default_stream(0x7f00_1234_5000usize as sys::CUstream));
    }

    #[test]
    fn a_refusal_hands_the_value_back_and_converts_to_the_error() {
        let e = InteropError {
            error: Error::ForeignContext {
                what: "the CudaSlice",
            },
            value: vec![1u8, 2, 3],
        };
        let text = e.to_string();
        assert!(text.contains("another CUDA context"), "{text}");
        assert!(text.contains("handed back"), "{text}");
        assert_eq!(e.value, [1, 2, 3]);
        let plain: Error = e.into();
        assert!(matches!(plain, Error::ForeignContext { .. }));
    }
}
