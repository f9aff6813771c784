//! Device buffers and page-locked host buffers that know which queued GPU
//! operations use them.
//!
//! Each buffer keeps the fence of the last operation that wrote it and of
//! those that read it since. Operations on other streams wait for them on the
//! GPU (`cuStreamWaitEvent`): read-after-write, write-after-read and
//! write-after-write hazards are ordered without any host synchronisation.
//! Safe host code cannot touch a pinned buffer the GPU is still using (the
//! accessors return [`Error::BufferInFlight`]), and `Drop` waits for every
//! recorded use before freeing, so nothing is freed while the GPU may touch it.

use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{result, CudaStream, DeviceRepr, DriverError, ValidAsZeroBits};

use crate::context::Gpu;
use crate::event::{Fence, WaitClock};
use crate::graph::Probe;
use crate::{Error, Result};

/// Plain data that can live on the GPU: copyable, valid as all-zero bits.
pub trait Element: DeviceRepr + ValidAsZeroBits + Copy + Send + Sync + 'static {}
impl<T: DeviceRepr + ValidAsZeroBits + Copy + Send + Sync + 'static> Element for T {}

/// The GPU operations that use one buffer.
#[derive(Debug, Default)]
pub(crate) struct Uses {
    last_write: Option<Fence>,
    reads: Vec<Fence>,
}

/// Shared handle to a buffer's [`Uses`] (kernel launches collect these).
///
/// Lock order: a copy holds its pinned buffer's cell, then its device
/// buffer's, across ordering, the driver call and recording (so the three
/// are atomic against other threads queueing on the same buffers); the event
/// pool's mutex is only ever taken inside. No other code holds two cells at
/// once. A host accessor (`as_slice`, `is_idle`, ...) called from another
/// thread meanwhile waits for that queueing call, not for the GPU.
pub(crate) type UseCell = Arc<Mutex<Uses>>;

pub(crate) fn lock(cell: &UseCell) -> MutexGuard<'_, Uses> {
    cell.lock().unwrap_or_else(|p| p.into_inner())
}

impl Uses {
    /// Before an op on `stream` reads the buffer: wait for its last writer.
    pub(crate) fn order_read(&self, stream: &CudaStream, clock: &mut WaitClock) -> Result<()> {
        match &self.last_write {
            Some(w) => w.gpu_wait_clocked(stream, clock),
            None => Ok(()),
        }
    }

    /// Before an op on `stream` writes the buffer: wait for every use.
    pub(crate) fn order_write(&self, stream: &CudaStream, clock: &mut WaitClock) -> Result<()> {
        self.order_read(stream, clock)?;
        self.reads
            .iter()
            .try_for_each(|r| r.gpu_wait_clocked(stream, clock))
    }

    /// Records a read. A newer read on the same stream supersedes an older
    /// one (stream order), so this holds at most one fence per stream.
    pub(crate) fn add_read(&mut self, fence: &Fence) {
        let key = fence.stream_key();
        match self.reads.iter_mut().find(|r| r.stream_key() == key) {
            Some(r) => *r = fence.clone(),
            None => self.reads.push(fence.clone()),
        }
    }

    pub(crate) fn set_write(&mut self, fence: &Fence) {
        self.reads.clear();
        self.last_write = Some(fence.clone());
    }

    fn writer_pending(&self) -> Result<bool> {
        match &self.last_write {
            None => Ok(false),
            Some(w) => w.is_complete().map(|done| !done),
        }
    }

    fn any_pending(&self) -> Result<bool> {
        if self.writer_pending()? {
            return Ok(true);
        }
        for r in &self.reads {
            if !r.is_complete()? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Blocks until every recorded use has completed.
    fn wait_all(&mut self) -> Probe {
        let mut outcome = Probe::Complete;
        for f in self.last_write.iter().chain(self.reads.iter()) {
            if let Probe::Failed(r) = f.synchronize() {
                outcome = Probe::Failed(r);
            }
        }
        if outcome == Probe::Complete {
            self.last_write = None;
            self.reads.clear();
        }
        outcome
    }
}

fn alloc_error(
    e: DriverError,
    memory: &'static str,
    bytes: usize,
    what: &'static str,
    call: &'static str,
) -> Error {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory {
            memory,
            bytes,
            what,
        }
    } else {
        Error::Driver { call, source: e }
    }
}

fn byte_len<T>(len: usize, what: &'static str) -> Result<usize> {
    if len == 0 {
        return Err(Error::ZeroLength { what });
    }
    len.checked_mul(std::mem::size_of::<T>())
        .ok_or(Error::OutOfMemory {
            memory: "addressable",
            bytes: usize::MAX,
            what,
        })
}

/// A device allocation of `len` elements of `T`.
#[derive(Debug)]
pub struct DeviceBuffer<T: Element> {
    gpu: Gpu,
    ptr: sys::CUdeviceptr,
    len: usize,
    pub(crate) uses: UseCell,
    _t: PhantomData<T>,
}

impl<T: Element> DeviceBuffer<T> {
    /// Allocates `len` elements (contents undefined until written). Zero length
    /// and out-of-memory are typed errors.
    pub fn new(gpu: &Gpu, len: usize) -> Result<Self> {
        let bytes = byte_len::<T>(len, "device buffer")?;
        gpu.check_usable()?;
        gpu.bind()?;
        // SAFETY: the context is current on this thread (bind above); cuMemAlloc
        // has no other precondition. The pointer is freed exactly once, in Drop.
        let ptr = unsafe { result::malloc_sync(bytes) }
            .map_err(|e| alloc_error(e, "device", bytes, "device buffer", "cuMemAlloc"))?;
        Ok(Self {
            gpu: gpu.clone(),
            ptr,
            len,
            uses: UseCell::default(),
            _t: PhantomData,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn num_bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// The raw device address, for users who launch their own kernels through
    /// cudarc. Declare the use with [`Launch::reads`](crate::Launch::reads) /
    /// [`Launch::writes`](crate::Launch::writes) so prism orders and frees it correctly.
    pub fn device_ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Blocks until no queued operation uses this buffer.
    pub fn wait_idle(&self) -> Result<()> {
        match lock(&self.uses).wait_all() {
            Probe::Failed(reason) => Err(Error::ContextPoisoned { reason }),
            _ => Ok(()),
        }
    }
}

impl<T: Element> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // Wait for every queued use first: freeing memory a kernel or copy still
        // touches would corrupt whatever is allocated there next.
        if let Probe::Failed(reason) = lock(&self.uses).wait_all() {
            tracing::warn!(reason, "freeing a device buffer after a GPU error");
        }
        if self.gpu.bind().is_ok() {
            // SAFETY: `ptr` came from cuMemAlloc in this context, every recorded
            // use has completed (waited above; after a sticky error the context
            // runs nothing more), and it is freed only here.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// How page-locked host memory is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostAllocFlags {
    /// Usable by every context (several GPUs).
    pub portable: bool,
    /// Write-combined: fastest for upload-only buffers, very slow for the host to read.
    pub write_combined: bool,
}

impl HostAllocFlags {
    /// Readable by the host at full speed (the default).
    pub const DEFAULT: Self = Self {
        portable: false,
        write_combined: false,
    };
    /// For buffers the host only writes and the GPU only reads.
    pub const UPLOAD_ONLY: Self = Self {
        portable: false,
        write_combined: true,
    };

    fn bits(self) -> u32 {
        // Always mapped: kernels can then read and write the buffer directly
        // (prism's zero-copy gather/scatter of many small buffers).
        let mut f = sys::CU_MEMHOSTALLOC_DEVICEMAP;
        if self.portable {
            f |= sys::CU_MEMHOSTALLOC_PORTABLE;
        }
        if self.write_combined {
            f |= sys::CU_MEMHOSTALLOC_WRITECOMBINED;
        }
        f
    }
}

/// Page-locked host memory: the only host memory the GPU copies from and to
/// asynchronously. Not write-combined unless asked for.
#[derive(Debug)]
pub struct PinnedBuffer<T: Element> {
    gpu: Gpu,
    ptr: *mut T,
    len: usize,
    flags: HostAllocFlags,
    /// The device-side address of the mapping (0 if the driver gave none).
    mapped: sys::CUdeviceptr,
    pub(crate) uses: UseCell,
}

// SAFETY: the buffer owns its allocation; host access goes through &self/&mut
// self accessors that check GPU use, so moving it between threads is as safe
// as moving a Vec<T> (T: Send).
unsafe impl<T: Element> Send for PinnedBuffer<T> {}
// SAFETY: shared references only give out &[T] (T: Sync) after the last GPU
// writer completed; GPU copies are ordered through fences, not host references.
unsafe impl<T: Element> Sync for PinnedBuffer<T> {}

impl<T: Element> PinnedBuffer<T> {
    /// Allocates `len` zeroed elements of page-locked memory.
    pub fn new(gpu: &Gpu, len: usize, flags: HostAllocFlags) -> Result<Self> {
        let bytes = byte_len::<T>(len, "pinned host buffer")?;
        gpu.bind()?;
        // SAFETY: the context is current; cuMemHostAlloc has no other precondition.
        let raw = unsafe { result::malloc_host(bytes, flags.bits()) }.map_err(|e| {
            alloc_error(
                e,
                "page-locked host",
                bytes,
                "pinned host buffer",
                "cuMemHostAlloc",
            )
        })?;
        let ptr = raw.cast::<T>();
        // SAFETY: `raw` points to `bytes` writable bytes just allocated; zero
        // bits are a valid T (Element: ValidAsZeroBits), so the buffer is
        // initialised before any slice of it is made.
        unsafe { std::ptr::write_bytes(raw.cast::<u8>(), 0, bytes) };
        let mut mapped: sys::CUdeviceptr = 0;
        // SAFETY: `raw` was returned by cuMemHostAlloc with DEVICEMAP in this
        // context; the call only writes the out-parameter.
        if unsafe { sys::cuMemHostGetDevicePointer_v2(&mut mapped, raw, 0) }
            != CUresult::CUDA_SUCCESS
        {
            mapped = 0;
        }
        Ok(Self {
            gpu: gpu.clone(),
            ptr,
            len,
            flags,
            mapped,
            uses: UseCell::default(),
        })
    }

    /// Allocates and fills from `data`.
    pub fn from_slice(gpu: &Gpu, data: &[T], flags: HostAllocFlags) -> Result<Self> {
        let mut b = Self::new(gpu, data.len(), flags)?;
        b.as_mut_slice()?.copy_from_slice(data);
        Ok(b)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn flags(&self) -> HostAllocFlags {
        self.flags
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Reads the contents. `BufferInFlight` while a queued download still writes it.
    pub fn as_slice(&self) -> Result<&[T]> {
        if lock(&self.uses).writer_pending()? {
            return Err(Error::BufferInFlight {
                what: "pinned host buffer (a download into it is pending)",
            });
        }
        // SAFETY: ptr/len describe an initialised allocation owned by self; no
        // GPU write is pending (checked above) and a new one needs &mut self.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, self.len) })
    }

    /// Writes the contents. `BufferInFlight` while any queued copy uses it.
    pub fn as_mut_slice(&mut self) -> Result<&mut [T]> {
        if lock(&self.uses).any_pending()? {
            return Err(Error::BufferInFlight {
                what: "pinned host buffer (a queued copy still uses it)",
            });
        }
        // SAFETY: as in as_slice, and no GPU read is pending either, so the
        // host is the only user; &mut self makes the borrow exclusive.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) })
    }

    /// True when no queued operation uses the buffer.
    pub fn is_idle(&self) -> Result<bool> {
        lock(&self.uses).any_pending().map(|p| !p)
    }

    /// Blocks until no queued operation uses the buffer.
    pub fn wait_idle(&self) -> Result<()> {
        match lock(&self.uses).wait_all() {
            Probe::Failed(reason) => Err(Error::ContextPoisoned { reason }),
            _ => Ok(()),
        }
    }

    /// Waits for pending GPU use, then gives the contents.
    pub fn wait_slice(&self) -> Result<&[T]> {
        self.wait_idle()?;
        self.as_slice()
    }

    /// Waits for pending GPU use, then gives mutable contents.
    pub fn wait_mut_slice(&mut self) -> Result<&mut [T]> {
        self.wait_idle()?;
        self.as_mut_slice()
    }

    /// The address kernels use to read or write this buffer directly over the
    /// bus (zero-copy), or `None` if the driver could not map it.
    pub fn mapped_ptr(&self) -> Option<sys::CUdeviceptr> {
        (self.mapped != 0).then_some(self.mapped)
    }

    pub(crate) fn raw(&self) -> *mut T {
        self.ptr
    }
}

impl<T: Element> Drop for PinnedBuffer<T> {
    fn drop(&mut self) {
        if let Probe::Failed(reason) = lock(&self.uses).wait_all() {
            tracing::warn!(reason, "freeing a pinned buffer after a GPU error");
        }
        if self.gpu.bind().is_ok() {
            // SAFETY: allocated by cuMemHostAlloc in this context, every queued
            // copy using it has completed (waited above), freed only here.
            let _ = unsafe { result::free_host(self.ptr.cast()) };
        }
    }
}
