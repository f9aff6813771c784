//! Device memory shared with other libraries by raw handles: a device
//! address and a CUDA stream, as DLPack (`__dlpack__(stream=…)`), the CUDA
//! array interface or a C++ caller hand them over. Nothing is copied.
//!
//! - [`DeviceBuffer::from_foreign`] uses memory another library owns as a
//!   prism buffer. prism's first use waits (on the GPU) for the work queued
//!   on the producer's stream; `Drop` waits for prism's last use, then
//!   drops the owner (which frees nothing of prism's: the library frees
//!   its memory when its own object goes).
//! - [`DeviceBuffer::export`] lends a prism buffer to other libraries for
//!   good ([`Exported`]): each consumer's stream waits on the GPU for
//!   prism's pending work on it ([`Exported::share_with`]), prism queues
//!   nothing more on it, and the memory is freed only once the consumers'
//!   work is done.
//!
//! # Soundness
//!
//! A raw stream handle or device address is only as good as the library
//! that gave it, so taking either is `unsafe`
//! ([`ForeignStream::from_raw`], [`DeviceBuffer::from_foreign`]); the rest
//! is checked here, with typed errors: the driver must know the address
//! (`cuPointerGetAttribute`), as device (or managed) memory of this GPU's
//! context or device, with the whole range inside one allocation and
//! aligned for the element type; a stream must belong to the GPU's context
//! (`cuStreamGetCtx`). Every ordering decision is the tracking layer's
//! (`order`): a fence recorded on a foreign stream (`fence_foreign`), a
//! foreign stream made to wait for a buffer's uses
//! (`order_foreign_after_all`).
//!
//! When an [`Exported`] buffer drops, prism cannot know which work its
//! consumers queued on it unless they queued it on the legacy default
//! stream (DLPack's stream 1: PyTorch's and CuPy's default), whose handle
//! stays valid for the life of the process. Then the free waits (on the
//! host) for a fence recorded there: that stream's work so far, not work
//! the consumers queue on streams of their own later, which is theirs to
//! order before they let go. Shared with any other stream (a handle that
//! may be gone by then), or with none (DLPack's -1: the consumer orders
//! itself), the free waits for the whole context (`cuCtxSynchronize`)
//! first. Memory prism allocated is then freed with `cuMemFree`, which
//! itself waits for the device; memory taken with `from_foreign` goes back
//! to its owner without that.
//!
//! Handing memory over is ordered on the GPU (a stream waits on an event)
//! where the driver allows it; a stream being captured, DLPack's stream
//! -1, or a failed record fall back to waits on the host.

use std::sync::{Arc, Mutex};

use cudarc::driver::sys;
use cudarc::driver::CudaStream;

use crate::context::Gpu;
use crate::error::DriverResultExt;
use crate::interop::{check_not_capturing, InteropError};
use crate::memory::{byte_len, DeviceBuffer, Element};
use crate::order::{
    fence_foreign, fence_foreign_after_all, note_made_by, order_foreign_after_all, Owner,
};
use crate::raw;
use crate::{Error, Result};

/// A CUDA stream of another library, named by its raw handle: PyTorch's
/// `torch.cuda.Stream.cuda_stream`, CuPy's `Stream.ptr`, a `cudaStream_t`
/// from C++, or one of the default streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForeignStream {
    raw: usize,
}

impl ForeignStream {
    /// The legacy default stream (`CU_STREAM_LEGACY`, DLPack's stream 1):
    /// valid in every context for the life of the process.
    pub const LEGACY: ForeignStream = ForeignStream { raw: 1 };

    /// The calling thread's per-thread default stream
    /// (`CU_STREAM_PER_THREAD`, DLPack's stream 2): a different stream on
    /// every thread, so prism uses it only within the call it is passed to.
    pub const PER_THREAD: ForeignStream = ForeignStream { raw: 2 };

    /// The stream with handle `raw`. 0 is refused (`Unsupported`): it means
    /// the legacy or the per-thread default stream depending on how the
    /// caller was compiled; pass 1 or 2.
    ///
    /// # Safety
    ///
    /// Unless `raw` is 1 or 2, it is the handle of a CUDA stream that stays
    /// alive (not destroyed) during every prism call it is passed to.
    pub unsafe fn from_raw(raw: usize) -> Result<Self> {
        if raw == 0 {
            return Err(Error::Unsupported {
                what: "stream handle 0 (legacy or per-thread default, depending on the caller's build)",
                instead: "pass 1 for the legacy default stream or 2 for the per-thread one",
            });
        }
        Ok(Self { raw })
    }

    /// The raw handle.
    pub fn raw(&self) -> usize {
        self.raw
    }

    /// True for the legacy default stream.
    pub fn is_legacy(&self) -> bool {
        self.raw == 1
    }

    /// The stream as cudarc's (borrowed: dropping it destroys nothing),
    /// checked to belong to `gpu`'s context unless it is a default stream.
    /// The caller made the context current.
    fn borrow(&self, gpu: &Gpu) -> Result<Arc<CudaStream>> {
        let handle = self.raw as sys::CUstream;
        if self.raw > 2 {
            // SAFETY: `from_raw`'s contract: a live stream handle for the
            // length of the call this borrow is made in.
            let ctx = unsafe { raw::stream_context(handle) }.call("cuStreamGetCtx")?;
            if ctx as usize != gpu.key() {
                return Err(Error::ForeignContext { what: "the stream" });
            }
        }
        // SAFETY: a default-stream constant, or a live stream of this
        // context (checked above; alive for this call by `from_raw`'s
        // contract). The borrowed handle is dropped before the call that
        // made it returns, and a borrowed cudarc stream destroys nothing.
        Ok(unsafe { gpu.cuda_context().wrap_borrowed_stream(handle) })
    }
}

impl<T: Element> DeviceBuffer<T> {
    /// Uses `len` elements at `ptr`, device memory another library owns
    /// (a PyTorch or CuPy tensor through DLPack, a C++ allocation), without
    /// a copy. prism's first use waits on the GPU for the work queued on
    /// `ready` so far (a fence recorded there); `None` says the contents
    /// are ready now. When the buffer drops (after every prism use
    /// completed) `owner` drops; prism never frees the memory itself.
    ///
    /// Refused before anything is taken over (`owner` then drops at
    /// once): zero elements (`ZeroLength`); an address the driver does not
    /// know, host memory, memory of another device, a range running past
    /// its allocation, an address misaligned for `T` (`ForeignMemory`);
    /// memory or a stream of another context (`ForeignContext`); a `ready`
    /// stream being captured into a graph (`StreamCapturing`).
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len * size_of::<T>()` is device memory whose contents
    /// are initialised once the work on `ready` is done, and `owner` keeps
    /// it allocated until `owner` drops. While the buffer lives, no other
    /// code writes that memory, nor reads it while a prism op may write it,
    /// unless that code orders itself after prism's uses (its stream waits
    /// on prism's fences) and prism's later uses after it.
    pub unsafe fn from_foreign(
        gpu: &Gpu,
        ptr: sys::CUdeviceptr,
        len: usize,
        ready: Option<ForeignStream>,
        owner: Owner,
    ) -> Result<Self> {
        let _span = tracing::debug_span!("prism.foreign.from_foreign", len).entered();
        let bytes = byte_len::<T>(len, "memory handed over by another library")?;
        gpu.check_usable()?;
        gpu.bind()?;
        check_foreign_range(gpu, ptr, bytes, std::mem::align_of::<T>())?;
        let fence = match ready {
            None => None,
            Some(stream) => {
                let cu = stream.borrow(gpu)?;
                check_not_capturing(&cu, "the producer's stream")?;
                match fence_foreign(gpu, &cu, "the producer's stream") {
                    Ok(fence) => Some(fence),
                    Err(e @ Error::StreamCapturing { .. }) => return Err(e),
                    Err(_) => {
                        // The record failed: wait for the whole context
                        // on the host instead (the producer's stream is in it).
                        gpu.synchronize()?;
                        None
                    }
                }
            }
        };
        let buf = Self::adopt_foreign(gpu, ptr, len, owner);
        if let Some(fence) = fence {
            note_made_by(buf.uses(), bytes, &fence);
        }
        Ok(buf)
    }

    /// Makes `stream` wait on the GPU for every use prism queued on this
    /// buffer so far, reads and writes: work another library queues there
    /// next comes after them. For memory taken with
    /// [`from_foreign`](Self::from_foreign) that its owner goes on using
    /// (a tensor prism read, which its library may write next). A stream
    /// being captured, or a wait the driver refuses, is served by a host
    /// wait for those uses instead.
    pub fn order_stream_after(&self, stream: ForeignStream) -> Result<()> {
        let gpu = self.gpu();
        gpu.check_usable()?;
        gpu.bind()?;
        let cu = stream.borrow(gpu)?;
        let on_gpu = check_not_capturing(&cu, "the stream").is_ok()
            && order_foreign_after_all(self.uses(), &cu).is_ok();
        if on_gpu {
            Ok(())
        } else {
            self.wait_idle()
        }
    }

    /// Orders every later prism use of this buffer (and its free) after
    /// the work queued on `stream` so far. For memory taken with
    /// [`from_foreign`](Self::from_foreign) that its owner may have written
    /// since (call it before each use; the counterpart of
    /// [`order_stream_after`](Self::order_stream_after)). On the GPU:
    /// `stream` first waits for prism's uses so far (its next work comes
    /// after them too), then a fence recorded there is noted as a write of
    /// the whole buffer. A stream being captured is refused
    /// (`StreamCapturing`); a wait or record the driver refuses is replaced
    /// by host waits (prism's uses, then the whole context).
    pub fn order_after_stream(&self, stream: ForeignStream) -> Result<()> {
        let gpu = self.gpu();
        gpu.check_usable()?;
        gpu.bind()?;
        let cu = stream.borrow(gpu)?;
        check_not_capturing(&cu, "the stream")?;
        match fence_foreign_after_all(self.uses(), gpu, &cu, self.num_bytes(), "the stream") {
            Ok(()) => Ok(()),
            Err(e @ (Error::StreamCapturing { .. } | Error::ContextPoisoned { .. })) => Err(e),
            Err(_) => {
                self.wait_idle()?;
                gpu.synchronize()
            }
        }
    }

    /// Lends the buffer to other libraries for good: prism queues nothing
    /// more on it, each consumer orders itself after prism's pending work
    /// ([`Exported::share_with`]), and the memory is freed when the
    /// [`Exported`] drops, after the consumers' work (see the module
    /// docs). Refused, with the buffer handed back, while a captured CUDA
    /// graph holds it (`InGraph`: the graph would write it behind the
    /// consumers' backs).
    pub fn export(self) -> std::result::Result<Exported<T>, Box<InteropError<Self>>> {
        if self.is_shared() {
            return Err(Box::new(InteropError {
                error: Error::InGraph {
                    what: "device buffer exported to another library",
                },
                value: self,
            }));
        }
        Ok(Exported {
            buf: Some(self),
            consumers: Mutex::new(Consumers::default()),
        })
    }
}

/// Checks that the driver knows `bytes` bytes at `ptr` as device memory
/// of `gpu` (its context, or its device for memory of no context: a memory
/// pool's or a virtual-memory-API mapping), inside one allocation (or, for
/// memory of no context, a run of adjacent ranges this device may read and
/// write), aligned to `align`. The context is current.
fn check_foreign_range(gpu: &Gpu, ptr: sys::CUdeviceptr, bytes: usize, align: usize) -> Result<()> {
    let refuse = |reason: String| Err(Error::ForeignMemory { reason });
    if ptr == 0 {
        return refuse("a null device address".into());
    }
    if !ptr.is_multiple_of(align as u64) {
        return refuse(format!(
            "the address {ptr:#x} is not aligned to the element type ({align} bytes)"
        ));
    }
    let Some(end) = ptr.checked_add(bytes as u64) else {
        return refuse(format!("{bytes} bytes from {ptr:#x} wrap around"));
    };
    let ordinal = gpu.info().ordinal;
    let mut at = ptr;
    loop {
        let facts = match raw::pointer_facts(at) {
            Ok(f) => f,
            Err((call, e)) => {
                return refuse(format!(
                    "the driver does not know the address {at:#x} as GPU memory ({call}: {e})"
                ))
            }
        };
        if facts.context != 0 && facts.context != gpu.key() {
            return Err(Error::ForeignContext { what: "the memory" });
        }
        if facts.device < 0 || facts.device as usize != ordinal {
            return refuse(format!(
                "the memory lives on device {}, this GPU is device {ordinal}",
                facts.device
            ));
        }
        if facts.memory_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 && !facts.managed {
            return refuse(format!(
                "the address {at:#x} is host memory (memory type {}), not device memory",
                facts.memory_type
            ));
        }
        let (start, size) = facts.range;
        let limit = start.saturating_add(size as u64);
        if facts.context == 0 {
            // Memory of no context (a memory pool's, a virtual-memory-API
            // mapping): this device must be allowed to read and write it
            // (ACCESS_FLAG_READWRITE = 3).
            match raw::access_flags(at) {
                Ok(3) => {}
                Ok(flags) => {
                    return refuse(format!(
                        "device {ordinal} may not read and write the memory at {at:#x} (access flags {flags})"
                    ))
                }
                Err(e) => {
                    return refuse(format!(
                        "the access to the memory at {at:#x} is unknown (cuPointerGetAttribute: {e})"
                    ))
                }
            }
        }
        if at < start || limit <= at {
            return refuse(format!(
                "the driver places {at:#x} outside its own range ({size} bytes from {start:#x})"
            ));
        }
        if end <= limit {
            return Ok(());
        }
        if facts.context != 0 {
            // One allocation of a context holds the whole range, or none.
            return refuse(format!(
                "{bytes} bytes from {ptr:#x} run past the allocation holding it ({size} bytes from {start:#x})"
            ));
        }
        // The next mapping must start where this one ends.
        at = limit;
    }
}

/// Who an [`Exported`] buffer was shared with.
#[derive(Debug, Default, Clone, Copy)]
struct Consumers {
    /// Shared with the legacy default stream.
    legacy: bool,
    /// Shared with a stream whose handle may not outlive the buffer, or
    /// with no stream at all (the consumer orders itself).
    unknown: bool,
}

/// A device buffer lent to other libraries ([`DeviceBuffer::export`]):
/// prism queues nothing more on it; its address goes to each consumer
/// with [`share_with`](Self::share_with); it is freed when this drops,
/// after the consumers' work (the module docs say how that is known).
#[derive(Debug)]
pub struct Exported<T: Element> {
    /// `Some` until `Drop`.
    buf: Option<DeviceBuffer<T>>,
    consumers: Mutex<Consumers>,
}

impl<T: Element> Exported<T> {
    /// Elements.
    pub fn len(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }

    /// Always false (a device buffer holds at least one element).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The GPU it lives on.
    pub fn gpu(&self) -> Option<&Gpu> {
        self.buf.as_ref().map(|b| b.gpu())
    }

    /// The device address (valid while this lives). Work using it must be
    /// ordered after [`share_with`](Self::share_with) on its stream.
    pub fn device_ptr(&self) -> sys::CUdeviceptr {
        self.buf.as_ref().map_or(0, |b| b.addr())
    }

    /// The buffer back, while no consumer was ever given it
    /// ([`share_with`](Self::share_with) never succeeded); else the export
    /// itself.
    pub fn reclaim(mut self) -> std::result::Result<DeviceBuffer<T>, Self> {
        let c = *self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        if c.legacy || c.unknown {
            return Err(self);
        }
        match self.buf.take() {
            Some(buf) => Ok(buf),
            None => Err(self),
        }
    }

    /// Readies the buffer for a consumer on `stream`: the stream waits on
    /// the GPU for prism's pending uses (no host wait), so work queued
    /// there next may read and write it. `None` (DLPack's stream -1: the
    /// consumer orders itself): prism's uses are waited for on the host.
    /// A stream being captured, or a wait the driver refuses, is also
    /// served by the host wait.
    pub fn share_with(&self, stream: Option<ForeignStream>) -> Result<()> {
        let buf = self.buf.as_ref().ok_or(Error::Unsupported {
            what: "sharing a dropped export",
            instead: "nothing",
        })?;
        let gpu = buf.gpu();
        gpu.check_usable()?;
        gpu.bind()?;
        let on_gpu = match stream {
            Some(s) => {
                let cu = s.borrow(gpu)?;
                check_not_capturing(&cu, "the consumer's stream").is_ok()
                    && order_foreign_after_all(buf.uses(), &cu).is_ok()
            }
            None => false,
        };
        if !on_gpu {
            buf.wait_idle()?;
        }
        // Recorded only once the consumer may use the buffer.
        let mut c = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        match stream {
            Some(s) if s.is_legacy() => c.legacy = true,
            _ => c.unknown = true,
        }
        Ok(())
    }
}

impl<T: Element> Drop for Exported<T> {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else {
            return;
        };
        let c = *self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        let gpu = buf.gpu().clone();
        let mut whole_context = c.unknown;
        if c.legacy && !whole_context {
            // The consumers' work so far on the legacy stream becomes the
            // buffer's last write: its `Drop` waits for it before freeing.
            let fenced = gpu.bind().is_ok()
                && ForeignStream::LEGACY
                    .borrow(&gpu)
                    .and_then(|cu| {
                        let (cell, bytes) = (buf.uses(), buf.num_bytes());
                        fence_foreign_after_all(cell, &gpu, &cu, bytes, "the legacy default stream")
                    })
                    .is_ok();
            whole_context = !fenced;
        }
        if whole_context {
            if let Err(e) = gpu.synchronize() {
                tracing::error!(
                    error = %e,
                    "leaking an exported device buffer: waiting for its consumers failed"
                );
                std::mem::forget(buf);
                return;
            }
        }
        // Waits for every recorded use, then frees (or drops its owner).
        drop(buf);
    }
}
