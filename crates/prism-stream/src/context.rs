//! The GPU context: opening a device, device facts, the poison flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{CudaContext, CudaStream};

use crate::coordinator::AsyncCoordinator;
use crate::error::DriverResultExt;
use crate::event::{EventPool, Fence, WaitClock};
use crate::{Error, Result};

/// Facts about the device a user needs to size work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for Hopper.
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    /// Copy engines: 2 or more lets H2D and D2H copies run at the same time.
    pub copy_engines: i32,
    pub multiprocessors: i32,
}

/// Is a CUDA driver present? Never panics (cudarc's dynamic loader panics
/// on first use when libcuda is missing; this checks first).
pub fn driver_available() -> bool {
    // SAFETY: is_culib_present only tries to dlopen libcuda and reports success;
    // it calls no CUDA function.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of CUDA devices, or a typed error when there is no driver.
pub fn device_count() -> Result<usize> {
    if !driver_available() {
        return Err(Error::DriverNotFound);
    }
    let n = CudaContext::device_count().call("cuDeviceGetCount")?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// A cheap, cloneable handle to an open device: what buffers and streams hold.
#[derive(Debug, Clone)]
pub struct Gpu(pub(crate) Arc<GpuInner>);

#[derive(Debug)]
pub(crate) struct GpuInner {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) events: Arc<EventPool>,
    pub(crate) info: DeviceInfo,
    poison: Mutex<Option<String>>,
    /// Fast path of `check_usable`: set once `poison` holds a reason.
    poisoned: AtomicBool,
}

impl Gpu {
    /// Opens device `ordinal`'s primary context, with cudarc's per-buffer
    /// event tracking disabled (prism orders all work with its own events).
    pub fn open(ordinal: usize) -> Result<Self> {
        let _span = tracing::debug_span!("prism.gpu.open", ordinal).entered();
        let count = device_count()?;
        if count == 0 {
            return Err(Error::NoDevice);
        }
        if ordinal >= count {
            return Err(Error::InvalidDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).call("cuDevicePrimaryCtxRetain")?;
        // SAFETY: called right after the context is made, before this handle
        // allocates or creates a stream. From here on prism owns all ordering:
        // every buffer records the fences of the ops that use it and its Drop
        // waits for them, so nothing is freed or reused while the GPU uses it.
        unsafe { ctx.disable_event_tracking() };
        let attr = |a| ctx.attribute(a).call("cuDeviceGetAttribute");
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().call("cuDeviceGetName")?,
            compute_capability: ctx.compute_capability().call("cuDeviceGetAttribute")?,
            total_memory: ctx.total_mem().call("cuDeviceTotalMem")?,
            copy_engines: attr(Attr::CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT)?,
            multiprocessors: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        };
        let events = EventPool::new(Arc::clone(&ctx));
        Ok(Self(Arc::new(GpuInner {
            ctx,
            events,
            info,
            poison: Mutex::new(None),
            poisoned: AtomicBool::new(false),
        })))
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.0.info
    }

    /// The cudarc context, for users who launch their own modules.
    pub fn cuda_context(&self) -> &Arc<CudaContext> {
        &self.0.ctx
    }

    /// Makes this context current on the calling thread (cheap when it already is).
    pub fn bind(&self) -> Result<()> {
        self.0.ctx.bind_to_thread().call("cuCtxSetCurrent")
    }

    /// A new non-blocking stream (never the legacy default stream).
    pub fn new_stream(&self, priority: i32) -> Result<Arc<CudaStream>> {
        self.0
            .ctx
            .new_stream_with_priority(priority)
            .call("cuStreamCreateWithPriority")
    }

    /// Records an ordering fence (timing disabled) on `stream`.
    pub fn fence(&self, stream: &CudaStream) -> Result<Fence> {
        self.0.events.record(stream, false, &WaitClock::default())
    }

    /// Records an ordering fence on `stream`, whose waits so far `clock` holds
    /// (so streams that wait on this fence also learn what it implies).
    pub fn fence_after(
        &self,
        stream: &CudaStream,
        clock: &WaitClock,
        timed: bool,
    ) -> Result<Fence> {
        self.0.events.record(stream, timed, clock)
    }

    /// Records a timed fence on `stream` (for GPU-time statistics).
    pub fn timed_fence(&self, stream: &CudaStream) -> Result<Fence> {
        self.0.events.record(stream, true, &WaitClock::default())
    }

    /// Idle events in the pool (diagnostics: steady state should stop growing it).
    pub fn pooled_events(&self) -> usize {
        self.0.events.idle()
    }

    /// Fails if an earlier GPU error made the context unusable.
    pub fn check_usable(&self) -> Result<()> {
        if !self.0.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        match &*self.0.poison.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(reason) => Err(Error::ContextPoisoned {
                reason: reason.clone(),
            }),
        }
    }

    /// Marks the context unusable (CUDA errors such as illegal addresses are sticky).
    pub fn poison(&self, reason: &str) {
        let mut p = self.0.poison.lock().unwrap_or_else(|p| p.into_inner());
        if p.is_none() {
            tracing::error!(reason, "GPU context is now unusable");
            *p = Some(reason.to_owned());
            self.0.poisoned.store(true, Ordering::Release);
        }
    }

    /// Blocks until all work on the device is done.
    pub fn synchronize(&self) -> Result<()> {
        self.0.ctx.synchronize().call("cuCtxSynchronize")
    }

    /// True when both handles use the same CUDA context (two `Gpu::open(0)`
    /// share the device's primary context, so their buffers work together).
    pub(crate) fn same(&self, other: &Gpu) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.ctx.cu_ctx() == other.0.ctx.cu_ctx()
    }
}

/// The entry point: an open device, and (with streams enabled) its coordinator.
#[derive(Debug)]
pub struct ManagedGpuContext {
    gpu: Gpu,
    coordinator: Option<AsyncCoordinator>,
}

impl ManagedGpuContext {
    /// Opens GPU `device`. Typed errors for no driver, no device, a bad
    /// ordinal. `enable_streams` creates the upload/compute/download streams
    /// of the [`AsyncCoordinator`].
    pub fn new(device: usize, enable_streams: bool) -> Result<Self> {
        let gpu = Gpu::open(device)?;
        let coordinator = if enable_streams {
            Some(AsyncCoordinator::new(&gpu)?)
        } else {
            None
        };
        Ok(Self { gpu, coordinator })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn device_info(&self) -> &DeviceInfo {
        self.gpu.info()
    }

    pub fn streams_enabled(&self) -> bool {
        self.coordinator.is_some()
    }

    pub fn async_coordinator(&self) -> Result<&AsyncCoordinator> {
        self.coordinator.as_ref().ok_or(Error::StreamsDisabled {
            what: "async coordinator",
        })
    }

    pub fn async_coordinator_mut(&mut self) -> Result<&mut AsyncCoordinator> {
        self.coordinator.as_mut().ok_or(Error::StreamsDisabled {
            what: "async coordinator",
        })
    }
}
