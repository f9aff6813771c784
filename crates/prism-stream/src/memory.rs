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
use std::sync::{Arc, Mutex};

use cudarc::driver::sys;
use cudarc::driver::DriverError;

use crate::context::Gpu;
use crate::error::is_capture_error;
use crate::order::Fence;
use crate::order::{lock, Access, DeviceAlloc, Extent, UseCell, Used, Uses};
use crate::raw::{self, AllocFor};
use crate::{Error, Result};

/// Plain data that can live on the GPU and be viewed as bytes.
///
/// # Safety
///
/// Implement it only for types that are `Copy`, have no padding bytes and
/// no pointers or references, for which **every** bit pattern is a valid
/// value, and whose layout is the same on the host and in device code.
/// prism reads device bytes into such values and zero-fills them. `bool`
/// (only 0 and 1 are valid), `char`, references and structs with padding
/// must not implement it.
pub unsafe trait Element: Copy + Send + Sync + 'static {}

macro_rules! elements {
    ($($t:ty),*) => {$(
        // SAFETY: a primitive integer or float: no padding, every bit pattern valid.
        unsafe impl Element for $t {}
    )*};
}
elements!(u8, i8, u16, i16, u32, i32, u64, i64, u128, i128, usize, isize, f32, f64);
elements!(half::f16, half::bf16);

/// The bytes of a slice of plain data.
pub fn as_bytes<T: Element>(s: &[T]) -> &[u8] {
    // SAFETY: Element's contract: no padding and no pointers, so every byte
    // of `s` is initialised; the view covers exactly `s` and borrows it.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// The bytes of a slice of plain data, writable: any bytes written make
/// valid elements (every bit pattern of an `Element` is valid).
pub fn as_bytes_mut<T: Element>(s: &mut [T]) -> &mut [u8] {
    let len = std::mem::size_of_val(s);
    // SAFETY: as in as_bytes; and every bit pattern is a valid T (Element's
    // contract), so whatever is written through the view leaves valid Ts.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), len) }
}

/// Copies `src` into the front of `dst` (up to the shorter length) with
/// non-temporal stores on x86_64 (`prism_copy_stream`): the destination's
/// lines are not read into the cache first, so a large copy moves a third
/// less memory traffic than `copy_from_slice`, and leaves the cache to
/// others. Meant for copies larger than the cache (staging); small copies
/// are better served by `copy_from_slice`.
pub fn copy_streaming<T: Element>(dst: &mut [T], src: &[T]) {
    let n = dst.len().min(src.len());
    let bytes = std::mem::size_of_val(&src[..n]);
    // SAFETY: `src` and `dst` are valid for `bytes` bytes (slices of at
    // least n elements), cannot overlap (a shared and an exclusive borrow
    // never alias), and every bit pattern copied is a valid T (Element).
    unsafe {
        prism_cuda_sys::prism_copy_stream(dst.as_mut_ptr().cast(), src.as_ptr().cast(), bytes)
    };
}

/// A `Vec` of `len` zeroed elements (zero bits are a valid `Element`).
pub fn zeroed_vec<T: Element>(len: usize) -> Vec<T> {
    let mut v = Vec::<T>::with_capacity(len);
    // SAFETY: the allocation holds `len` elements; zero bytes are a valid T
    // (Element's contract), so after write_bytes all `len` are initialised.
    unsafe {
        std::ptr::write_bytes(v.as_mut_ptr(), 0, len);
        v.set_len(len);
    }
    v
}

/// Page-locked bytes prism holds right now (allocated or registered by
/// `PinnedBuffer`s, not yet freed or unregistered).
static PAGE_LOCKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Page-locked host bytes held by prism's `PinnedBuffer`s in this process
/// (diagnostics: a long run's pinned memory should stay flat).
pub fn pinned_bytes() -> u64 {
    PAGE_LOCKED.load(std::sync::atomic::Ordering::Relaxed)
}

fn count_pinned(bytes: usize, add: bool) {
    use std::sync::atomic::Ordering::Relaxed;
    if add {
        PAGE_LOCKED.fetch_add(bytes as u64, Relaxed);
    } else {
        PAGE_LOCKED.fetch_sub(bytes as u64, Relaxed);
    }
}

/// How a buffer names itself in errors.
pub(crate) trait Tracked {
    fn cell(&self) -> &UseCell;
    fn owner(&self) -> &Gpu;
    /// Size in bytes.
    fn byte_len(&self) -> usize;
    /// May lanes of other contexts copy to and from it?
    fn portable(&self) -> bool {
        false
    }
    /// The shared allocation of a device buffer (kept alive by CUDA graphs
    /// captured over it); `None` for host memory, which graphs may not use.
    fn keep(&self) -> Option<&Arc<DeviceAlloc>> {
        None
    }
    /// A use of the whole buffer, by this context's lanes only.
    fn used(&self, access: Access, what: &'static str) -> Used<'_> {
        Used {
            cell: self.cell(),
            gpu: self.owner(),
            access,
            extent: Extent::whole(self.byte_len()),
            portable: false,
            what,
            keep: self.keep(),
        }
    }
    /// A copy's use of the bytes `start..end` (by a lane of any context
    /// when the buffer is portable).
    fn used_range(&self, access: Access, what: &'static str, start: usize, end: usize) -> Used<'_> {
        Used {
            cell: self.cell(),
            gpu: self.owner(),
            access,
            extent: Extent::range(start, end),
            portable: self.portable(),
            what,
            keep: self.keep(),
        }
    }
}

impl Uses<Fence> {
    fn check_stuck(&self) -> Result<()> {
        if self.stuck {
            return Err(Error::ContextPoisoned {
                reason: "a GPU operation on this buffer could not be tracked; it stays locked"
                    .into(),
            });
        }
        Ok(())
    }

    /// Is a recorded write still pending? A fence whose context reports a
    /// sticky error is an error here, never "done": on driver 580 a fault
    /// in one context makes every context of the process report it, and
    /// work already queued in those contexts still ran afterwards (a copy
    /// into a portable buffer changed a view handed out after the fault;
    /// H100, run 55). So nothing a failed context queued is assumed to
    /// have stopped.
    fn writer_pending(&mut self, _own: usize) -> Result<bool> {
        self.check_stuck()?;
        for (_, w) in &self.writes {
            if !w.is_complete()? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn any_pending(&mut self, own: usize) -> Result<bool> {
        if self.writer_pending(own)? {
            return Ok(true);
        }
        for (_, r) in &self.reads {
            if !r.is_complete()? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Blocks until every recorded use has completed. A wait that a stream
    /// capture refused (see [`Fence::synchronize`]) is `CaptureInProgress`,
    /// and every use stays recorded.
    fn wait_all(&mut self, own: usize) -> Result<()> {
        match self.wait_all_raw(own) {
            Ok(()) => Ok(()),
            Err((_, _, Some(source))) => Err(Error::CaptureInProgress {
                call: "cuEventSynchronize",
                source,
            }),
            Err((reason, _, None)) => Err(Error::ContextPoisoned { reason }),
        }
    }

    /// [`wait_all`](Self::wait_all); an error says whether the GPU may still
    /// be using the buffer (always `true`: after any failed wait, a sticky
    /// error included, queued work may still run, see
    /// [`writer_pending`](Self::writer_pending)), and holds the capture's
    /// refusal when that was the only failure. Nothing is forgotten unless
    /// every wait succeeded.
    #[allow(clippy::type_complexity)]
    fn wait_all_raw(
        &mut self,
        _own: usize,
    ) -> std::result::Result<(), (String, bool, Option<DriverError>)> {
        if self.stuck {
            return Err((
                "a GPU operation on this buffer could not be tracked".into(),
                true,
                None,
            ));
        }
        let mut failure: Option<(String, bool, Option<DriverError>)> = None;
        for f in self.all() {
            // The wait is made with the fence's own context current, so an
            // error is that context's (not the calling thread's).
            if let Err(e) = f.synchronize_raw() {
                let capture = is_capture_error(&e).then_some(e);
                match &mut failure {
                    Some((reason, _, refused)) => {
                        if capture.is_none() && refused.is_some() {
                            // A real failure outranks a capture's refusal.
                            *reason = e.to_string();
                            *refused = None;
                        }
                    }
                    None => failure = Some((e.to_string(), true, capture)),
                }
            }
        }
        match failure {
            None => {
                self.writes.clear();
                self.reads.clear();
                Ok(())
            }
            Some(f) => Err(f),
        }
    }

    /// For `Drop`: may the allocation be freed? Waits for every use; after
    /// a failed wait, never (the memory is leaked: a context that reported
    /// a fault may still run what was queued in it).
    pub(crate) fn release(&mut self, own: usize, what: &'static str) -> bool {
        match self.wait_all_raw(own) {
            Ok(()) => true,
            Err((reason, _, _)) => {
                tracing::error!(
                    reason,
                    "leaking a {what}: the GPU may still be using it and waiting for it failed"
                );
                false
            }
        }
    }
}

pub(crate) fn byte_len<T>(len: usize, what: &'static str) -> Result<usize> {
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

/// A device allocation of `len` elements of `T`, always initialised: the
/// safe constructors zero it ([`zeroed`](Self::zeroed), a queued memset) or
/// fill it from host data ([`from_slice`](Self::from_slice), a queued
/// copy). It remembers the fences of the queued operations that use it:
/// later operations on other streams wait for them on the GPU, and the
/// memory is freed only after all of them (and after every CUDA graph
/// captured over it is gone).
///
/// Its device address is reachable only through `unsafe`
/// ([`device_ptr`](Self::device_ptr)) or inside an outside-work block
/// ([`Lane::outside`](crate::Lane::outside)), so safe code cannot hand it to
/// work prism does not order.
#[derive(Debug)]
pub struct DeviceBuffer<T: Element> {
    alloc: Arc<DeviceAlloc>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Element> DeviceBuffer<T> {
    /// Allocates `len` elements without initialising them.
    ///
    /// # Safety
    ///
    /// The contents are whatever the device memory held. The caller must
    /// write every element (an upload, a kernel) before anything reads it:
    /// a download or kernel that reads unwritten elements hands stale
    /// device bytes to the program (compute-sanitizer's initcheck reports it).
    pub unsafe fn uninit(gpu: &Gpu, len: usize) -> Result<Self> {
        let bytes = byte_len::<T>(len, "device buffer")?;
        gpu.check_usable()?;
        gpu.bind()?;
        // Freed exactly once, when the allocation drops (`DeviceAlloc`).
        let ptr = raw::device_alloc(
            bytes,
            AllocFor {
                memory: "device",
                what: "device buffer",
            },
        )?;
        Ok(Self::adopt(gpu, ptr, len))
    }

    /// Takes over `len` elements at `ptr`, an allocation of `gpu`'s context
    /// that cudarc gave up (`interop.rs`). The caller notes the fence after
    /// which its contents are ready, or has waited for every earlier use.
    pub(crate) fn adopt(gpu: &Gpu, ptr: sys::CUdeviceptr, len: usize) -> Self {
        Self {
            alloc: Arc::new(DeviceAlloc::new(gpu, ptr)),
            len,
            _t: PhantomData,
        }
    }

    /// Uses `len` elements at `ptr`, memory another library owns and
    /// `owner` keeps allocated (`foreign.rs`): `Drop` waits for every use,
    /// then drops `owner` instead of freeing. The caller notes the fence
    /// after which its contents are ready, or they are ready now.
    pub(crate) fn adopt_foreign(
        gpu: &Gpu,
        ptr: sys::CUdeviceptr,
        len: usize,
        owner: crate::order::Owner,
    ) -> Self {
        Self {
            alloc: Arc::new(DeviceAlloc::foreign(gpu, ptr, owner)),
            len,
            _t: PhantomData,
        }
    }

    /// Gives the allocation up without freeing it (to cudarc,
    /// `interop.rs`): the use list goes (its fences back to the pool) and
    /// nothing is freed. The caller made the new owner's stream wait for
    /// every use, or waited for them, and checked [`is_shared`](Self::is_shared)
    /// is false (otherwise the buffer comes back).
    pub(crate) fn disown(self) -> std::result::Result<sys::CUdeviceptr, Self> {
        match Arc::try_unwrap(self.alloc) {
            Ok(alloc) => Ok(alloc.disown()),
            Err(alloc) => Err(Self {
                alloc,
                len: self.len,
                _t: PhantomData,
            }),
        }
    }

    /// True while a captured CUDA graph also holds the allocation.
    pub(crate) fn is_shared(&self) -> bool {
        Arc::strong_count(&self.alloc) > 1
    }

    pub(crate) fn uses(&self) -> &UseCell {
        &self.alloc.uses
    }

    pub(crate) fn alloc(&self) -> &Arc<DeviceAlloc> {
        &self.alloc
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

    /// The device address, for prism's own ordered ops.
    pub(crate) fn addr(&self) -> sys::CUdeviceptr {
        self.alloc.ptr()
    }

    /// The raw device address.
    ///
    /// # Safety
    ///
    /// The address carries no ordering and no lifetime: the caller must not
    /// let any work read or write it unless that work is ordered after every
    /// conflicting use prism queued and prism's later uses are ordered after
    /// it, and must not use it after the buffer (and every graph captured
    /// over it) is gone. The safe ways to hand a buffer to GPU work are
    /// [`KernelCall::arg`](crate::KernelCall::arg) (your kernels) and
    /// [`Outside::read`](crate::Outside::read) / [`write`](crate::Outside::write)
    /// (library calls and other work prism does not enqueue), which order it.
    pub unsafe fn device_ptr(&self) -> sys::CUdeviceptr {
        self.alloc.ptr()
    }

    pub fn gpu(&self) -> &Gpu {
        &self.alloc.gpu
    }

    /// True when no queued operation uses this buffer.
    pub fn is_idle(&self) -> Result<bool> {
        lock(&self.alloc.uses)
            .any_pending(self.alloc.gpu.key())
            .map(|p| !p)
    }

    /// Blocks until no queued operation uses this buffer.
    pub fn wait_idle(&self) -> Result<()> {
        lock(&self.alloc.uses).wait_all(self.alloc.gpu.key())
    }
}

impl<T: Element> Tracked for DeviceBuffer<T> {
    fn cell(&self) -> &UseCell {
        &self.alloc.uses
    }
    fn owner(&self) -> &Gpu {
        &self.alloc.gpu
    }
    fn byte_len(&self) -> usize {
        self.num_bytes()
    }
    fn keep(&self) -> Option<&Arc<DeviceAlloc>> {
        Some(&self.alloc)
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
    /// Host-readable and usable by every GPU's copies (a multi-GPU run's
    /// pinned input and output).
    pub const PORTABLE: Self = Self {
        portable: true,
        write_combined: false,
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

/// Where a pinned buffer's memory came from.
enum Backing<T> {
    /// `cuMemHostAlloc`: freed with `cuMemFreeHost`.
    Allocated,
    /// A user's vector page-locked in place (`cuMemHostRegister`): kept
    /// here untouched (its heap memory is what `ptr` points to) until it is
    /// unregistered and handed back or dropped.
    Registered(Vec<T>),
    /// Memory another owner keeps alive (an array of another language),
    /// page-locked in place: the owner is dropped only after the memory is
    /// unregistered, never while the GPU may use it.
    External(#[allow(dead_code)] Box<dyn std::any::Any + Send + Sync>), // held, never read
    /// Handed back by `into_vec`: nothing left to release.
    Released,
}

/// Page-locked host memory: the only host memory the GPU copies from and to
/// asynchronously. Either allocated page-locked ([`new`](Self::new), not
/// write-combined unless asked for) or a `Vec` page-locked in place
/// ([`register`](Self::register)). Its `Debug` shows where it came from and
/// its length, never its contents (which the GPU may be writing).
pub struct PinnedBuffer<T: Element> {
    gpu: Gpu,
    ptr: *mut T,
    len: usize,
    flags: HostAllocFlags,
    /// The device-side address of the mapping (0 if the driver gave none).
    mapped: sys::CUdeviceptr,
    backing: Backing<T>,
    pub(crate) uses: UseCell,
}

impl<T: Element> std::fmt::Debug for PinnedBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backing = match self.backing {
            Backing::Allocated => "allocated",
            Backing::Registered(_) => "registered",
            Backing::External(_) => "registered (external owner)",
            Backing::Released => "released",
        };
        f.debug_struct("PinnedBuffer")
            .field("backing", &backing)
            .field("len", &self.len)
            .field("flags", &self.flags)
            .field("device", &self.gpu.info().ordinal)
            .finish_non_exhaustive()
    }
}

/// A failed [`PinnedBuffer::register`]: why, and the vector, unchanged.
#[derive(Debug)]
pub struct RegisterError<T> {
    pub error: Error,
    pub data: Vec<T>,
}

impl<T> std::fmt::Display for RegisterError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "registering {} elements failed: {}",
            self.data.len(),
            self.error
        )
    }
}

impl<T: std::fmt::Debug> std::error::Error for RegisterError<T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<T> From<RegisterError<T>> for Error {
    /// The error alone (the vector is dropped).
    fn from(e: RegisterError<T>) -> Self {
        e.error
    }
}

// SAFETY: the buffer owns its allocation; host access goes through &self/&mut
// self accessors that check GPU use, so moving it between threads is as safe
// as moving a Vec<T> (T: Send). The use list is behind a Mutex.
unsafe impl<T: Element> Send for PinnedBuffer<T> {}
// SAFETY: shared references only give out &[T] (T: Sync) after the last GPU
// writer completed; GPU copies are ordered through fences, not host references.
unsafe impl<T: Element> Sync for PinnedBuffer<T> {}

impl<T: Element> PinnedBuffer<T> {
    /// Allocates `len` zeroed elements of page-locked memory.
    pub fn new(gpu: &Gpu, len: usize, flags: HostAllocFlags) -> Result<Self> {
        let bytes = byte_len::<T>(len, "pinned host buffer")?;
        gpu.bind()?;
        let host = raw::host_alloc(
            bytes,
            flags.bits(),
            AllocFor {
                memory: "page-locked host",
                what: "pinned host buffer",
            },
        )?;
        let ptr = host.cast::<T>();
        // SAFETY: `host` points to `bytes` writable bytes just allocated; zero
        // bits are a valid T (Element's contract: every bit pattern is), so
        // the buffer is initialised before any slice of it is made.
        unsafe { std::ptr::write_bytes(host, 0, bytes) };
        count_pinned(bytes, true);
        Ok(Self {
            gpu: gpu.clone(),
            ptr,
            len,
            flags,
            mapped: raw::mapped_address(host),
            backing: Backing::Allocated,
            uses: UseCell::default(),
        })
    }

    /// Page-locks `data` in place (`cuMemHostRegister`), without a copy: the
    /// GPU then copies to and from it at the link's speed, with no staging.
    /// Registering costs host time (about 55 ms per GiB on the H100 host,
    /// and about a third of that again to unregister, in
    /// [`into_vec`](Self::into_vec) or on drop), so it pays for buffers used
    /// in several runs; for one run, pass the slice to `run` instead (it
    /// stages through a small pinned ring). `data` must not be empty, and
    /// its memory must not share pages with memory registered already
    /// (the driver then refuses with `CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED`).
    /// On failure the vector comes back in the error, unchanged.
    pub fn register(gpu: &Gpu, data: Vec<T>) -> std::result::Result<Self, RegisterError<T>> {
        match Self::try_register(gpu, data, false) {
            Ok(b) => Ok(b),
            Err((error, data)) => Err(RegisterError { error, data }),
        }
    }

    /// [`register`](Self::register), portable: every GPU's copies may use
    /// it (a multi-GPU run's input or output).
    pub fn register_portable(
        gpu: &Gpu,
        data: Vec<T>,
    ) -> std::result::Result<Self, RegisterError<T>> {
        match Self::try_register(gpu, data, true) {
            Ok(b) => Ok(b),
            Err((error, data)) => Err(RegisterError { error, data }),
        }
    }

    /// Page-locks `len` elements at `ptr` in place, memory that `owner`
    /// keeps alive (a NumPy array, say), as [`register`](Self::register)
    /// does for a `Vec`. `owner` is dropped after the memory is
    /// unregistered (on drop, once every GPU use completed), or never if
    /// unregistering fails.
    ///
    /// # Safety
    ///
    /// `ptr` must be aligned for `T` and point to `len` initialised
    /// elements (`len * size_of::<T>()` at most `isize::MAX` bytes) that
    /// stay allocated, at that address, while `owner` lives, and that
    /// nothing but the returned buffer reads or writes until it is dropped
    /// (prism's GPU copies write them; a concurrent access elsewhere is a
    /// data race). [`into_vec`](Self::into_vec) of such a buffer copies.
    pub unsafe fn register_external(
        gpu: &Gpu,
        ptr: *mut T,
        len: usize,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<Self> {
        // SAFETY: the caller guarantees `ptr`/`len` are initialised memory
        // kept alive by `owner`, which moves into the returned buffer and is
        // dropped only after the memory is unregistered.
        unsafe { Self::pin_in_place(gpu, ptr, len, false, owner, Backing::External) }
            .map_err(|(e, _owner)| e)
    }

    fn try_register(
        gpu: &Gpu,
        mut data: Vec<T>,
        portable: bool,
    ) -> std::result::Result<Self, (Error, Vec<T>)> {
        let (ptr, len) = (data.as_mut_ptr(), data.len());
        // SAFETY: `ptr` and `len` describe the vector's initialised heap
        // memory, owned here. The vector moves into the returned buffer (its
        // heap memory does not move) and is neither touched, resized nor
        // freed until the memory is unregistered (Drop or into_vec), after
        // every GPU use completed.
        unsafe { Self::pin_in_place(gpu, ptr, len, portable, data, Backing::Registered) }
    }

    /// Page-locks `len` elements at `ptr` in place and makes the buffer
    /// over them, `holder` (what keeps the memory alive) becoming its
    /// backing; on failure nothing is registered and `holder` comes back.
    ///
    /// # Safety
    ///
    /// `ptr` points to `len` initialised elements, aligned, that `holder`
    /// keeps allocated at that address and that nothing but the returned
    /// buffer touches until it is dropped.
    unsafe fn pin_in_place<H>(
        gpu: &Gpu,
        ptr: *mut T,
        len: usize,
        portable: bool,
        holder: H,
        backing: impl FnOnce(H) -> Backing<T>,
    ) -> std::result::Result<Self, (Error, H)> {
        let bytes = match byte_len::<T>(len, "registered host buffer") {
            Ok(b) => b,
            Err(e) => return Err((e, holder)),
        };
        if let Err(e) = gpu.check_usable().and_then(|()| gpu.bind()) {
            return Err((e, holder));
        }
        let flags = if portable {
            sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_PORTABLE
        } else {
            sys::CU_MEMHOSTREGISTER_DEVICEMAP
        };
        let what = AllocFor {
            memory: "page-locked host",
            what: "registered host buffer",
        };
        // SAFETY: `ptr` and `bytes` describe initialised memory that
        // `holder` keeps alive (the caller's guarantee); `holder` becomes
        // the buffer's backing, released only after unregistering.
        if let Err(e) = unsafe { raw::host_register(ptr.cast::<u8>(), bytes, flags, what) } {
            return Err((e, holder));
        }
        count_pinned(bytes, true);
        Ok(Self {
            gpu: gpu.clone(),
            ptr,
            len,
            flags: HostAllocFlags {
                portable,
                write_combined: false,
            },
            mapped: raw::mapped_address(ptr.cast::<u8>()),
            backing: backing(holder),
            uses: UseCell::default(),
        })
    }

    /// True for memory page-locked in place ([`register`](Self::register),
    /// [`register_external`](Self::register_external)).
    pub fn is_registered(&self) -> bool {
        matches!(self.backing, Backing::Registered(_) | Backing::External(_))
    }

    /// The contents as a `Vec`, after every queued GPU use completed: a
    /// registered buffer gives its vector back, unregistered, without a
    /// copy; an allocated one is copied into a new vector.
    pub fn into_vec(mut self) -> Result<Vec<T>> {
        self.wait_idle()?;
        match std::mem::replace(&mut self.backing, Backing::Released) {
            Backing::Registered(data) => {
                // A failed unregister is logged; the vector stays valid
                // memory either way.
                let _ = unregister(&self.gpu, self.ptr, self.len);
                Ok(data)
            }
            other => {
                self.backing = other;
                Ok(self.as_slice()?.to_vec())
            }
        }
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
        if lock(&self.uses).writer_pending(self.gpu.key())? {
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
        if lock(&self.uses).any_pending(self.gpu.key())? {
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
        lock(&self.uses).any_pending(self.gpu.key()).map(|p| !p)
    }

    /// Blocks until no queued operation uses the buffer.
    pub fn wait_idle(&self) -> Result<()> {
        lock(&self.uses).wait_all(self.gpu.key())
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
    ///
    /// # Safety
    ///
    /// As for [`DeviceBuffer::device_ptr`]: work that uses the address must
    /// be ordered against every conflicting use prism queued (and the
    /// host's reads and writes through [`as_slice`](Self::as_slice) /
    /// [`as_mut_slice`](Self::as_mut_slice)), and must not outlive the
    /// buffer. Pass the buffer to [`KernelCall::arg_pinned`](crate::KernelCall::arg_pinned)
    /// instead, which orders the kernel and fences it.
    pub unsafe fn mapped_ptr(&self) -> Option<sys::CUdeviceptr> {
        self.mapped()
    }

    /// The mapped device address, for prism's own ordered ops.
    pub(crate) fn mapped(&self) -> Option<sys::CUdeviceptr> {
        (self.mapped != 0).then_some(self.mapped)
    }

    pub(crate) fn raw(&self) -> *mut T {
        self.ptr
    }
}

impl<T: Element> Tracked for PinnedBuffer<T> {
    fn cell(&self) -> &UseCell {
        &self.uses
    }
    fn owner(&self) -> &Gpu {
        &self.gpu
    }
    fn byte_len(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
    fn portable(&self) -> bool {
        self.flags.portable
    }
}

impl<T: Element> Drop for PinnedBuffer<T> {
    fn drop(&mut self) {
        if !lock(&self.uses).release(self.gpu.key(), "pinned buffer") {
            // The GPU may still use the memory: a registered vector (or an
            // external owner) must not be freed either.
            std::mem::forget(std::mem::replace(&mut self.backing, Backing::Released));
            return;
        }
        match &self.backing {
            Backing::Allocated => {
                if self.gpu.bind().is_ok() {
                    // SAFETY: allocated by cuMemHostAlloc in this context, every
                    // queued copy using it has completed (waited above), freed
                    // only here.
                    if unsafe { raw::host_free(self.ptr.cast::<u8>()) }.is_ok() {
                        count_pinned(self.len * std::mem::size_of::<T>(), false);
                    }
                }
            }
            Backing::Registered(_) | Backing::External(_) => {
                if !unregister(&self.gpu, self.ptr, self.len) {
                    // Still registered: freeing it could leave the driver a
                    // stale registration of memory the allocator reuses.
                    std::mem::forget(std::mem::replace(&mut self.backing, Backing::Released));
                }
                // Otherwise the vector (or owner) is dropped after this, as
                // the field drops.
            }
            Backing::Released => {}
        }
    }
}

/// Unregisters memory registered by `PinnedBuffer::register` once no GPU
/// operation uses it; false if that failed (the pages stay locked).
fn unregister<T>(gpu: &Gpu, ptr: *mut T, len: usize) -> bool {
    if gpu.bind().is_err() {
        tracing::warn!("could not bind the context to unregister host memory");
        return false;
    }
    // SAFETY: `ptr` is the start of a range registered in this context by
    // `PinnedBuffer::register`, unregistered only here, after every queued
    // use of it completed.
    if let Err(e) = unsafe { raw::host_unregister(ptr.cast::<u8>()) } {
        tracing::warn!(%e, "cuMemHostUnregister failed; the pages stay locked");
        return false;
    }
    count_pinned(len * std::mem::size_of::<T>(), false);
    true
}

/// Idle slots a pool keeps; more are freed (which synchronises the device,
/// so the bound is generous).
const SLOTS_KEPT: usize = 64;
/// The smallest slot (a read of one value still gets a cache line or more).
const SLOT_MIN: usize = 256;

/// Pinned slots for read-backs, shared by a lane (or a captured graph) and
/// the [`Readback`](crate::Readback)s it handed out.
#[derive(Debug, Default)]
pub(crate) struct SlotPool {
    idle: Mutex<Vec<PinnedBuffer<u8>>>,
}

impl SlotPool {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// An idle slot of at least `bytes` bytes (the smallest that fits and
    /// whose last copy completed), or a new one.
    pub(crate) fn take(&self, gpu: &Gpu, bytes: usize) -> Result<PinnedBuffer<u8>> {
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let mut pick: Option<usize> = None;
            for (i, s) in idle.iter().enumerate() {
                if s.len() >= bytes
                    && s.gpu().same_context(gpu)
                    && pick.is_none_or(|p| s.len() < idle[p].len())
                    && s.is_idle().unwrap_or(false)
                {
                    pick = Some(i);
                }
            }
            if let Some(p) = pick {
                return Ok(idle.swap_remove(p));
            }
        }
        PinnedBuffer::new(
            gpu,
            bytes.max(SLOT_MIN).next_power_of_two(),
            HostAllocFlags::DEFAULT,
        )
    }

    /// The idle slot at host address `at`, if it is in the pool and its
    /// last copy completed (a graph prefers the slot its node points at).
    pub(crate) fn take_at(&self, at: *mut u8) -> Option<PinnedBuffer<u8>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let i = idle
            .iter()
            .position(|s| s.raw() == at && s.is_idle().unwrap_or(false))?;
        Some(idle.swap_remove(i))
    }

    /// Returns a slot (its pending copy, if any, keeps it from being handed
    /// out until it completes).
    pub(crate) fn put(&self, slot: PinnedBuffer<u8>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < SLOTS_KEPT {
            idle.push(slot);
        }
        // Else it drops here (after its uses, as every PinnedBuffer does).
    }
}
