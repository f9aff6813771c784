//! The allocation behind a device buffer: freed only once every recorded
//! use has completed (a host-side wait), and only by its last holder.

use cudarc::driver::sys;

use super::{lock, UseCell};
use crate::context::Gpu;

/// The allocation behind a [`DeviceBuffer`](crate::DeviceBuffer): the device memory and its use
/// list. Shared (`Arc`) between the buffer and the CUDA graphs captured
/// over it ([`CapturedGraph`](crate::CapturedGraph)), so memory a graph may
/// still write is never freed under it; freed when the last holder drops,
/// after every recorded use completed.
#[derive(Debug)]
pub(crate) struct DeviceAlloc {
    pub(crate) gpu: Gpu,
    /// 0 once handed to cudarc (`disown`): nothing to free.
    ptr: sys::CUdeviceptr,
    pub(crate) uses: UseCell,
    /// Memory another library owns (`DeviceBuffer::from_foreign`): what
    /// keeps it allocated, dropped instead of freeing the memory, and only
    /// after every recorded use completed.
    owner: Option<Owner>,
}

/// What keeps another library's memory allocated while prism uses it.
pub(crate) type Owner = Box<dyn std::any::Any + Send + Sync>;

impl DeviceAlloc {
    /// Owns `ptr`, an allocation of `gpu`'s context (from `cuMemAlloc`, or
    /// given up by cudarc), with no recorded use yet.
    pub(crate) fn new(gpu: &Gpu, ptr: sys::CUdeviceptr) -> Self {
        Self {
            gpu: gpu.clone(),
            ptr,
            uses: UseCell::default(),
            owner: None,
        }
    }

    /// Uses `ptr`, memory of `gpu`'s context that `owner` keeps allocated:
    /// `Drop` waits for every recorded use, then drops `owner` (never
    /// frees the memory itself).
    pub(crate) fn foreign(gpu: &Gpu, ptr: sys::CUdeviceptr, owner: Owner) -> Self {
        Self {
            gpu: gpu.clone(),
            ptr,
            uses: UseCell::default(),
            owner: Some(owner),
        }
    }

    /// True for memory another library owns (`foreign`): it must never be
    /// handed on as prism's own (to cudarc, which would free it).
    pub(crate) fn is_foreign(&self) -> bool {
        self.owner.is_some()
    }

    /// The device address.
    pub(crate) fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    /// Gives the memory up without freeing it (its new owner frees it);
    /// the use list goes, its fences back to the pool.
    pub(crate) fn disown(mut self) -> sys::CUdeviceptr {
        std::mem::replace(&mut self.ptr, 0)
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        if self.ptr == 0 {
            // Handed to cudarc (`disown`): its new owner frees it.
            return;
        }
        // Wait for every queued use first: freeing memory a kernel or copy still
        // touches would corrupt whatever is allocated there next.
        if !lock(&self.uses).release(self.gpu.key(), "device buffer") {
            // The GPU may still use it: the owner must keep it allocated.
            if let Some(owner) = self.owner.take() {
                std::mem::forget(owner);
            }
            return;
        }
        if let Some(owner) = self.owner.take() {
            // Another library's memory: its owner frees it (or not).
            drop(owner);
            return;
        }
        if self.gpu.bind().is_ok() {
            // SAFETY: `ptr` is an allocation of this context, owned by this
            // allocation alone: from cuMemAlloc, or adopted from a cudarc slice
            // (cuMemAllocAsync or cuMemAlloc; cuMemFree frees either once every
            // access has completed, and cudarc gave it up). Every recorded use
            // has completed (waited above; after a failed wait `release`
            // says no and nothing is freed), and it is freed only here, when
            // the last holder (the buffer or a captured graph) lets go.
            let _ = unsafe { crate::raw::device_free(self.ptr) };
        }
    }
}
