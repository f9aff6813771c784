//! The GPU context: opening a device, device facts, the poison flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUdevice_attribute as Attr, CUresult};
use cudarc::driver::{CudaContext, DriverError};

use crate::error::is_sticky;
use crate::error::DriverResultExt;
use crate::raw::{ctx_synchronize, EventPool, KernelState};
use crate::{Error, Result};

/// Contexts a sticky error killed (a CUDA context accepts nothing more after,
/// e.g., an illegal address), by context address, with the first reason
/// seen: every handle on such a context, including ones opened later,
/// refuses work with that reason. An entry goes when `Gpu::open` finds the
/// context at that address healthy again (the primary context was
/// released and made anew).
static DEAD: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());
/// Fast path: no context has died in this process.
static ANY_DEAD: AtomicBool = AtomicBool::new(false);

fn dead_list() -> std::sync::MutexGuard<'static, Vec<(usize, String)>> {
    DEAD.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records that the context with driver handle `key` reported a sticky
/// error (seen with that context current): every handle on it refuses work.
pub(crate) fn note_dead(key: usize, reason: &str) {
    let mut dead = dead_list();
    if !dead.iter().any(|(k, _)| *k == key) {
        dead.push((key, reason.to_owned()));
    }
    ANY_DEAD.store(true, Ordering::Release);
}

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
    /// The host NUMA node closest to the device, where the driver reports
    /// one (`CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID`; `None` on single-node hosts
    /// and older drivers).
    pub host_numa_node: Option<i32>,
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
    /// Where prism's own kernels come from, and the loaded PTX.
    pub(crate) kernels: KernelState,
}

impl Gpu {
    /// Opens device `ordinal`'s primary context. cudarc's per-slice event
    /// tracking stays on: prism's own buffers are not cudarc slices (they
    /// order themselves through lanes), and `CudaSlice`s a user makes in
    /// this context keep cudarc's cross-stream ordering.
    pub fn open(ordinal: usize) -> Result<Self> {
        let _span = tracing::debug_span!("prism.gpu.open", ordinal).entered();
        Self::check_ordinal(ordinal)?;
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| open_error(e, ordinal, "cuDevicePrimaryCtxRetain"))?;
        Self::wrap(ctx, ordinal)
    }

    /// Opens device `ordinal` in a new CUDA context of its own (not the
    /// device's primary context): its buffers and lanes do not mix with
    /// those of other handles (`WrongContext`), and a sticky fault in it
    /// leaves other contexts usable.
    pub fn open_private(ordinal: usize) -> Result<Self> {
        let _span = tracing::debug_span!("prism.gpu.open_private", ordinal).entered();
        Self::check_ordinal(ordinal)?;
        let ctx = CudaContext::new_non_primary(ordinal, 0)
            .map_err(|e| open_error(e, ordinal, "cuCtxCreate"))?;
        Self::wrap(ctx, ordinal)
    }

    fn check_ordinal(ordinal: usize) -> Result<()> {
        let count = device_count()?;
        if count == 0 {
            return Err(Error::NoDevice);
        }
        if ordinal >= count {
            return Err(Error::InvalidDevice { ordinal, count });
        }
        Ok(())
    }

    fn wrap(ctx: Arc<CudaContext>, ordinal: usize) -> Result<Self> {
        let attr = |a| ctx.attribute(a).call("cuDeviceGetAttribute");
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().call("cuDeviceGetName")?,
            compute_capability: ctx.compute_capability().call("cuDeviceGetAttribute")?,
            total_memory: ctx.total_mem().call("cuDeviceTotalMem")?,
            copy_engines: attr(Attr::CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT)?,
            multiprocessors: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            host_numa_node: host_numa_node(&ctx),
        };
        let events = EventPool::new(Arc::clone(&ctx));
        let key = ctx.cu_ctx() as usize;
        ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        match sticky_error() {
            Some(now) => {
                // Dead: say so now instead of failing at the first call.
                let reason = dead_list()
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map_or_else(|| now.clone(), |(_, r)| r.clone());
                return Err(Error::ContextPoisoned {
                    reason: format!("device {ordinal}'s context is unusable: {reason}"),
                });
            }
            None => dead_list().retain(|(k, _)| *k != key),
        }
        let gpu = Self(Arc::new(GpuInner {
            ctx,
            events,
            info,
            poison: Mutex::new(None),
            poisoned: AtomicBool::new(false),
            kernels: KernelState::new(),
        }));
        gpu.bind()?;
        if gpu.check_usable().is_ok() {
            gpu.0.kernels.preload(&gpu.0.ctx, ordinal);
        }
        Ok(gpu)
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.0.info
    }

    /// The cudarc context (event tracking on), for cudarc's own safe API.
    /// To launch your own kernels on prism buffers, use
    /// [`Gpu::load_module`] and [`Launch::kernel`](crate::Launch::kernel).
    pub fn cuda_context(&self) -> &Arc<CudaContext> {
        &self.0.ctx
    }

    /// Makes this context current on the calling thread (cheap when it
    /// already is). Unlike cudarc's `bind_to_thread` it leaves an error
    /// cudarc stashed in the context object alone, for cudarc to report to
    /// its own caller: prism's calls report their own errors.
    pub fn bind(&self) -> Result<()> {
        let ctx = self.0.ctx.cu_ctx();
        let current = cudarc::driver::result::ctx::get_current().call("cuCtxGetCurrent")?;
        if current != Some(ctx) {
            // SAFETY: `ctx` is a live context: `self` holds the cudarc
            // context object that owns (or retains) it.
            unsafe { cudarc::driver::result::ctx::set_current(ctx) }.call("cuCtxSetCurrent")?;
        }
        Ok(())
    }

    /// Idle events in the pool (diagnostics: steady state should stop growing it).
    pub fn pooled_events(&self) -> usize {
        self.0.events.idle()
    }

    /// CUDA events this context's pool created so far (diagnostics: in a
    /// steady state the pool recycles them and this stops growing).
    pub fn events_created(&self) -> usize {
        self.0.events.created()
    }

    /// (free, total) device memory in bytes (`cuMemGetInfo`).
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        cudarc::driver::result::mem_get_info().call("cuMemGetInfo")
    }

    /// Fails if an earlier GPU error made the context unusable (found
    /// through this handle, or a sticky error found through any handle on
    /// the same context).
    pub fn check_usable(&self) -> Result<()> {
        if !self.0.poisoned.load(Ordering::Acquire) {
            if !ANY_DEAD.load(Ordering::Acquire) {
                return Ok(());
            }
            let key = self.0.ctx.cu_ctx() as usize;
            let dead = dead_list().iter().find(|(k, _)| *k == key).cloned();
            match dead {
                None => return Ok(()),
                Some((_, reason)) => self.mark(&reason),
            }
        }
        match &*self.0.poison.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(reason) => Err(Error::ContextPoisoned {
                reason: reason.clone(),
            }),
        }
    }

    /// Marks the context unusable (CUDA errors such as illegal addresses are
    /// sticky). When the context itself reports a sticky error, every other
    /// handle on it (and every later `Gpu::open` of it) learns it too.
    pub fn poison(&self, reason: &str) {
        self.mark(reason);
        if self.bind().is_ok() && sticky_error().is_some() {
            note_dead(self.key(), reason);
        }
    }

    /// This handle's flag only.
    fn mark(&self, reason: &str) {
        let mut p = self.0.poison.lock().unwrap_or_else(|p| p.into_inner());
        if p.is_none() {
            tracing::error!(reason, "GPU context is now unusable");
            *p = Some(reason.to_owned());
            self.0.poisoned.store(true, Ordering::Release);
        }
    }

    /// Blocks until all work in the context is done (`cuCtxSynchronize`,
    /// called directly: cudarc's `synchronize` returns an error cudarc
    /// stashed in its context object without waiting). A wait refused
    /// because a stream capture is in progress elsewhere is made again in
    /// relaxed capture mode; one that conflicts with a capture in this
    /// context fails with `CaptureInProgress`.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        ctx_synchronize().call("cuCtxSynchronize")
    }

    /// True when both handles use the same CUDA context (two `Gpu::open(0)`
    /// share the device's primary context, so their buffers work together).
    pub fn same_context(&self, other: &Gpu) -> bool {
        self.same(other)
    }

    /// The context's driver handle, as a key.
    pub(crate) fn key(&self) -> usize {
        self.0.ctx.cu_ctx() as usize
    }

    pub(crate) fn same(&self, other: &Gpu) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.ctx.cu_ctx() == other.0.ctx.cu_ctx()
    }
}

/// A failed context creation: a sticky error means a fault earlier in this
/// process left the driver refusing work (on some drivers a fault on one
/// GPU does so on every GPU of the process).
fn open_error(e: DriverError, ordinal: usize, call: &'static str) -> Error {
    if is_sticky(&e) {
        Error::ContextPoisoned {
            reason: format!(
                "device {ordinal}: the CUDA driver refuses new contexts after a fault earlier in this process ({call}: {e})"
            ),
        }
    } else {
        Error::Driver { call, source: e }
    }
}

/// The sticky error of the context current on this thread, if it has one,
/// without waiting for anything: a query of the legacy default stream
/// (which prism never uses) returns at once, with the context's sticky
/// error if it died.
fn sticky_error() -> Option<String> {
    // SAFETY: a null stream is the legacy default stream of the current
    // context (the caller made one current); a query neither waits nor
    // changes any state.
    let r = unsafe { sys::cuStreamQuery(std::ptr::null_mut()) };
    match r {
        CUresult::CUDA_SUCCESS | CUresult::CUDA_ERROR_NOT_READY => None,
        e => {
            let e = DriverError(e);
            is_sticky(&e).then(|| e.to_string())
        }
    }
}

/// The host NUMA node nearest the device, where the driver knows it (the
/// attribute exists from CUDA 12.2 on; -1 means no node).
#[cfg(feature = "cuda-13")]
fn host_numa_node(ctx: &CudaContext) -> Option<i32> {
    ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID)
        .ok()
        .filter(|&n| n >= 0)
}

/// CUDA 12.0's bindings have no host NUMA attribute.
#[cfg(not(feature = "cuda-13"))]
fn host_numa_node(_ctx: &CudaContext) -> Option<i32> {
    None
}
