//! Device and page-locked host memory: allocation, freeing, registration
//! of host memory in place, and the device address of mapped host memory.
//! Each call needs the allocation's context current (the caller binds
//! it); an out-of-memory failure becomes [`Error::OutOfMemory`] naming
//! what was being allocated.

use std::ffi::c_void;

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{result, DriverError};

use crate::Error;

/// What an allocation was for, for its error.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AllocFor {
    /// The kind of memory: "device", "page-locked host".
    pub(crate) memory: &'static str,
    /// The buffer: "device buffer", "pinned host buffer", ...
    pub(crate) what: &'static str,
}

impl AllocFor {
    fn error(self, e: DriverError, bytes: usize, call: &'static str) -> Error {
        if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            Error::OutOfMemory {
                memory: self.memory,
                bytes,
                what: self.what,
            }
        } else {
            Error::Driver { call, source: e }
        }
    }
}

/// `cuMemAlloc` of `bytes` in the current context. The caller frees it
/// once ([`device_free`]).
pub(crate) fn device_alloc(bytes: usize, what: AllocFor) -> crate::Result<sys::CUdeviceptr> {
    // SAFETY: cuMemAlloc has no precondition beyond a current context (its
    // absence is the driver's error); it only writes the new address.
    unsafe { result::malloc_sync(bytes) }.map_err(|e| what.error(e, bytes, "cuMemAlloc"))
}

/// `cuMemFree`.
///
/// # Safety
///
/// `ptr` is an allocation of the current context (from `cuMemAlloc` or
/// `cuMemAllocAsync`), freed only here, and no queued GPU work uses it.
pub(crate) unsafe fn device_free(ptr: sys::CUdeviceptr) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { result::free_sync(ptr) }
}

/// `cuMemHostAlloc` of `bytes` page-locked bytes (flags `CU_MEMHOSTALLOC_*`)
/// in the current context. The memory is uninitialised; the caller frees
/// it once ([`host_free`]).
pub(crate) fn host_alloc(bytes: usize, flags: u32, what: AllocFor) -> crate::Result<*mut u8> {
    // SAFETY: cuMemHostAlloc has no precondition beyond a current context;
    // it only writes the new address.
    unsafe { result::malloc_host(bytes, flags) }
        .map(|p| p.cast::<u8>())
        .map_err(|e| what.error(e, bytes, "cuMemHostAlloc"))
}

/// `cuMemFreeHost`.
///
/// # Safety
///
/// `ptr` came from [`host_alloc`] in the current context, is freed only
/// here, and neither the GPU nor the host uses it any more.
pub(crate) unsafe fn host_free(ptr: *mut u8) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { result::free_host(ptr.cast::<c_void>()) }
}

/// `cuMemHostRegister` of `bytes` at `ptr` (flags
/// `CU_MEMHOSTREGISTER_*`) in the current context.
///
/// # Safety
///
/// `ptr..ptr + bytes` is host memory the caller owns and keeps allocated,
/// neither moved nor freed, until [`host_unregister`] succeeded.
pub(crate) unsafe fn host_register(
    ptr: *mut u8,
    bytes: usize,
    flags: u32,
    what: AllocFor,
) -> crate::Result<()> {
    // SAFETY: the caller's contract.
    let r = unsafe { sys::cuMemHostRegister_v2(ptr.cast::<c_void>(), bytes, flags) };
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(what.error(DriverError(r), bytes, "cuMemHostRegister"))
    }
}

/// `cuMemHostUnregister`.
///
/// # Safety
///
/// `ptr` starts a range [`host_register`] registered in the current
/// context, and no queued GPU work uses it.
pub(crate) unsafe fn host_unregister(ptr: *mut u8) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    let r = unsafe { sys::cuMemHostUnregister(ptr.cast::<c_void>()) };
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(DriverError(r))
    }
}

/// The device address of page-locked host memory mapped into the current
/// context (`cuMemHostGetDevicePointer`), or 0 when the driver gives none.
pub(crate) fn mapped_address(host: *mut u8) -> sys::CUdeviceptr {
    let mut mapped: sys::CUdeviceptr = 0;
    // SAFETY: the call only looks `host` up among the driver's page-locked
    // ranges (an unknown address is its error) and writes the out-parameter.
    let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut mapped, host.cast::<c_void>(), 0) };
    if r == CUresult::CUDA_SUCCESS {
        mapped
    } else {
        0
    }
}

/// What the driver knows of a device address (`cuPointerGetAttribute`):
/// the allocation around it and where it lives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PointerFacts {
    /// The context it was allocated in (null for memory of the virtual
    /// memory API, which belongs to no context).
    pub(crate) context: usize,
    /// The device it lives on.
    pub(crate) device: i32,
    /// `CU_MEMORYTYPE_*`: device (2) or host (1); managed memory reports
    /// device or host and sets `managed`.
    pub(crate) memory_type: u32,
    pub(crate) managed: bool,
    /// The allocation (or mapped range) holding it: start and length in bytes.
    pub(crate) range: (sys::CUdeviceptr, usize),
}

/// The facts of `ptr`, an address another library handed over. An address
/// the driver does not know (host memory, garbage) is its error
/// (`CUDA_ERROR_INVALID_VALUE`), never a fault: the call only looks the
/// address up in the driver's tables.
pub(crate) fn pointer_facts(
    ptr: sys::CUdeviceptr,
) -> Result<PointerFacts, (&'static str, DriverError)> {
    use sys::CUpointer_attribute as A;
    fn get<V: Default>(
        ptr: sys::CUdeviceptr,
        attr: A,
        call: &'static str,
    ) -> Result<V, (&'static str, DriverError)> {
        let mut v = V::default();
        // SAFETY: the out-parameter is a live `V` of the size the driver
        // writes for `attr` (each call below pairs an attribute with its
        // documented type: a context handle, an int, an unsigned int, a
        // device address, a size_t); the driver only reads its own tables.
        let r =
            unsafe { sys::cuPointerGetAttribute((&mut v as *mut V).cast::<c_void>(), attr, ptr) };
        if r == CUresult::CUDA_SUCCESS {
            Ok(v)
        } else {
            Err((call, DriverError(r)))
        }
    }
    let q = "cuPointerGetAttribute";
    let context: usize = get(ptr, A::CU_POINTER_ATTRIBUTE_CONTEXT, q)?;
    let device: i32 = get(ptr, A::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, q)?;
    let memory_type: u32 = get(ptr, A::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, q)?;
    let managed: u32 = get(ptr, A::CU_POINTER_ATTRIBUTE_IS_MANAGED, q)?;
    let start: sys::CUdeviceptr = get(ptr, A::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, q)?;
    let size: usize = get(ptr, A::CU_POINTER_ATTRIBUTE_RANGE_SIZE, q)?;
    Ok(PointerFacts {
        context,
        device,
        memory_type,
        managed: managed != 0,
        range: (start, size),
    })
}

/// False only when the driver reports host address `ptr` as unknown to it
/// (`CUDA_ERROR_INVALID_VALUE`: pageable memory, which the driver stages
/// before a copy call returns); true when it knows it (page-locked by
/// `cuMemHostAlloc` or `cuMemHostRegister`, or managed: copies from it run
/// asynchronously) and on any other answer (no context current, ...), so
/// that a caller waits whenever it cannot be sure. The query only looks the
/// address up, never faults. The caller made the context current.
pub(crate) fn host_known_to_driver(ptr: *const u8) -> bool {
    let mut ty: u32 = 0;
    // SAFETY: the out-parameter is a live u32 (the attribute's type); the
    // driver only reads its own tables.
    let r = unsafe {
        sys::cuPointerGetAttribute(
            (&mut ty as *mut u32).cast::<c_void>(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr as sys::CUdeviceptr,
        )
    };
    r != CUresult::CUDA_ERROR_INVALID_VALUE
}

/// The access the current context's device has to the memory at `ptr`
/// (`CU_POINTER_ATTRIBUTE_ACCESS_FLAGS`: 0 none, 1 read, 3 read and
/// write), for any device memory: `cuMemAlloc`'s, a memory pool's, a
/// virtual-memory-API mapping. The caller made the context current.
pub(crate) fn access_flags(ptr: sys::CUdeviceptr) -> Result<u32, DriverError> {
    let mut flags: u32 = 0;
    // SAFETY: the out-parameter is a live u32 (the attribute's type); the
    // driver only reads its own tables.
    let r = unsafe {
        sys::cuPointerGetAttribute(
            (&mut flags as *mut u32).cast::<c_void>(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_ACCESS_FLAGS,
            ptr,
        )
    };
    if r == CUresult::CUDA_SUCCESS {
        Ok(flags)
    } else {
        Err(DriverError(r))
    }
}
