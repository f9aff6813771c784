//! Kernel launches through a [`Lane`]: [`Launch`] holds prism's own
//! kernels (validating lengths and contexts), and [`Launch::kernel`] launches
//! the user's own kernels on prism buffers. Every launch goes through
//! [`Lane::enqueue`] (order.rs): it is ordered after the buffers' earlier
//! uses and its fence is noted on every buffer before the call returns, so
//! a scope that is dropped, forgotten or left with `?` loses nothing.
//!
//! prism's own kernels come from one of two [`KernelSource`]s: the launchers
//! nvcc compiled into prism-cuda-sys, or prism-cuda-sys's bundled PTX,
//! loaded into the context and launched by name through the driver API
//! (`cuLaunchKernel`) with the same grids the launchers compute
//! ([`ptx_grid`] and the methods below mirror `kernels/prism_kernels.cu`).

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{
    result, sys as cu, CudaContext, CudaFunction, CudaModule, DeviceRepr, DriverError, LaunchConfig,
};
use cudarc::nvrtc::Ptx;
use prism_cuda_sys as sys;

use crate::context::Gpu;
use crate::error::{check_len, DriverResultExt};
use crate::event::{capture_error_of_code, is_capture_error, relaxed_on_capture, Fence};
use crate::memory::{DeviceBuffer, Element, PinnedBuffer, Tracked};
use crate::order::{Access, Lane, Used};
use crate::{Error, Result};

/// Describes a launcher return code.
fn code_message(code: i32) -> String {
    // SAFETY: prism_error_string returns a pointer to a static NUL-terminated
    // string for any code (both in the nvcc build and in the stub).
    unsafe { CStr::from_ptr(sys::prism_error_string(code)) }
        .to_string_lossy()
        .into_owned()
}

/// Turns a launcher status code into an error; a launch failure other than
/// a rejected argument or a refusal during a stream capture (not a GPU
/// failure: `CaptureInProgress`) makes the context unusable.
fn check_code(gpu: &Gpu, kernel: &'static str, code: i32) -> Result<()> {
    match code {
        0 => Ok(()),
        c if c == sys::PRISM_ERR_KERNELS_NOT_BUILT as i32 => Err(Error::KernelsNotBuilt { kernel }),
        c => {
            if let Some(source) = capture_error_of_code(c) {
                return Err(Error::CaptureInProgress {
                    call: kernel,
                    source,
                });
            }
            let message = code_message(c);
            if c != sys::PRISM_ERR_INVALID_ARGUMENT as i32 {
                gpu.poison(&format!("kernel {kernel}: {message}"));
            }
            Err(Error::Kernel {
                kernel,
                code: c,
                message,
            })
        }
    }
}

/// Where prism's own kernels come from on a [`Gpu`] (see
/// [`Gpu::set_kernel_source`]). Both give bit-identical results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSource {
    /// The C launchers nvcc compiled into prism-cuda-sys (the CUDA runtime's
    /// `<<<>>>`): the default when the build had nvcc.
    Launchers,
    /// prism-cuda-sys's bundled PTX ([`prism_cuda_sys::KERNELS_PTX`]),
    /// compiled by the driver for this GPU when the context loads it, and
    /// launched through the driver API: the default in a build without
    /// nvcc, and the only source of the `cuda-12` build.
    Ptx,
}

impl KernelSource {
    /// What a new context uses: the launchers where this build has them.
    pub fn default_for_build() -> Self {
        if sys::KERNELS_BUILT {
            Self::Launchers
        } else {
            Self::Ptx
        }
    }
}

/// Per-context kernel state: the source in use and, once loaded, the PTX module.
#[derive(Debug)]
pub(crate) struct KernelState {
    /// True when prism's kernels come from the PTX.
    ptx_source: AtomicBool,
    /// Set once a load succeeds (a failed load is tried again next time).
    ptx: OnceLock<Arc<PtxKernels>>,
    /// Serialises loads, so a context loads the PTX once.
    loading: std::sync::Mutex<()>,
}

impl KernelState {
    pub(crate) fn new() -> Self {
        Self {
            ptx_source: AtomicBool::new(KernelSource::default_for_build() == KernelSource::Ptx),
            ptx: OnceLock::new(),
            loading: std::sync::Mutex::new(()),
        }
    }
}

/// A loaded module, unloaded only once its context has finished its work:
/// kernels such as `spin` use no buffer whose drop would wait for them, and
/// `cuModuleUnload` under a running kernel is not documented as safe. Its
/// holders declare it after their `CudaFunction`s, so it drops last.
///
/// The wait is `cuCtxSynchronize` called directly, never cudarc's
/// `CudaContext::synchronize`: that one starts with `bind_to_thread`, which
/// starts with `check_err`, which takes any error cudarc stashed in the
/// context object (`record_err`: a failed free or event destroy in one of
/// cudarc's `Drop`s, or the user's own) and returns it before anything is
/// waited for, so one stashed error made the module unload under its
/// running kernel (and swallowed the error meant for the user's next
/// cudarc call). The module is unloaded after the wait succeeded; after
/// any failure (a sticky error included: a context that reported a fault
/// may still run work queued in it, memory.rs) it is leaked rather than
/// unloaded early.
#[derive(Debug)]
struct ModuleHold {
    ctx: Arc<CudaContext>,
    module: Arc<CudaModule>,
}

impl Drop for ModuleHold {
    fn drop(&mut self) {
        if Arc::strong_count(&self.module) != 1 {
            return;
        }
        // The module is unloaded right after this (the field drops, and
        // cudarc's unload runs in the context left current here).
        let waited = crate::context::make_current(self.ctx.cu_ctx())
            .and_then(|()| relaxed_on_capture(result::ctx::synchronize));
        match waited {
            Ok(()) => {}
            // Even after a sticky error: on driver 580 a context that
            // reported a fault still ran work queued in it (memory.rs).
            Err(e) => {
                tracing::error!(
                    "leaking a module: waiting for its context failed ({e}), so a kernel of it may still run"
                );
                std::mem::forget(Arc::clone(&self.module));
            }
        }
    }
}

/// The kernels of the bundled PTX, loaded into one context.
#[derive(Debug)]
pub(crate) struct PtxKernels {
    fma_chain_vec4: CudaFunction,
    fma_chain_scalar: CudaFunction,
    fill_pattern: CudaFunction,
    check_pattern: CudaFunction,
    spin_ns: CudaFunction,
    // Launched only by the `fault-injection` feature's test hook.
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    fault: CudaFunction,
    group_sum: CudaFunction,
    clamp: CudaFunction,
    gather_bytes: CudaFunction,
    scatter_bytes: CudaFunction,
    /// Last: dropped after the functions.
    _hold: ModuleHold,
}

/// Every kernel the PTX must hold, by its `extern "C"` name.
pub const PTX_KERNEL_NAMES: [&str; 10] = [
    "prism_k_fma_chain_vec4",
    "prism_k_fma_chain_scalar",
    "prism_k_fill_pattern",
    "prism_k_check_pattern",
    "prism_k_spin_ns",
    "prism_k_fault",
    "prism_k_group_sum",
    "prism_k_clamp",
    "prism_k_gather_bytes",
    "prism_k_scatter_bytes",
];

impl PtxKernels {
    /// `cuModuleLoadData` of the bundled PTX (the driver compiles it for
    /// this GPU here), then every kernel by name.
    fn load(ctx: &Arc<CudaContext>) -> std::result::Result<Self, DriverError> {
        let module = ctx.load_module(Ptx::from_src(sys::KERNELS_PTX))?;
        let [v4, sc, fill, check, spin, fault, gs, clamp, gather, scatter] =
            PTX_KERNEL_NAMES.map(|name| module.load_function(name));
        Ok(Self {
            fma_chain_vec4: v4?,
            fma_chain_scalar: sc?,
            fill_pattern: fill?,
            check_pattern: check?,
            spin_ns: spin?,
            fault: fault?,
            group_sum: gs?,
            clamp: clamp?,
            gather_bytes: gather?,
            scatter_bytes: scatter?,
            _hold: ModuleHold {
                ctx: Arc::clone(ctx),
                module,
            },
        })
    }
}

impl Gpu {
    /// Where prism's own kernels come from on this handle.
    pub fn kernel_source(&self) -> KernelSource {
        if self.0.kernels.ptx_source.load(Ordering::Acquire) {
            KernelSource::Ptx
        } else {
            KernelSource::Launchers
        }
    }

    /// Chooses where prism's own kernels come from for later launches
    /// through this handle. [`KernelSource::Ptx`] loads the PTX now (once
    /// per handle) and reports a driver that cannot compile it;
    /// [`KernelSource::Launchers`] fails with [`Error::KernelsNotBuilt`] in
    /// a build without them. Switching is safe at any time: launches from
    /// either source are ordered by the same lanes.
    pub fn set_kernel_source(&self, source: KernelSource) -> Result<()> {
        match source {
            KernelSource::Launchers if !sys::KERNELS_BUILT => {
                return Err(Error::KernelsNotBuilt {
                    kernel: "(every launcher)",
                })
            }
            KernelSource::Launchers => {}
            KernelSource::Ptx => {
                self.ptx_kernels()?;
            }
        }
        self.0
            .kernels
            .ptx_source
            .store(source == KernelSource::Ptx, Ordering::Release);
        Ok(())
    }

    /// The PTX kernels of this handle, loaded on first use (a failed load,
    /// out of memory say, is reported and tried again at the next use).
    fn ptx_kernels(&self) -> Result<Arc<PtxKernels>> {
        let state = &self.0.kernels;
        if let Some(k) = state.ptx.get() {
            return Ok(Arc::clone(k));
        }
        self.check_usable()?;
        let _loading = state.loading.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = state.ptx.get() {
            return Ok(Arc::clone(k));
        }
        let _span = tracing::debug_span!("prism.kernels.load_ptx").entered();
        let k = Arc::new(
            PtxKernels::load(self.cuda_context()).map_err(|source| Error::PtxLoad { source })?,
        );
        Ok(Arc::clone(state.ptx.get_or_init(|| k)))
    }
}

/// Loads prism's kernels into `gpu`'s context (bound by the caller) so the
/// first launch of each does not stall the host while CUDA loads its module
/// (or, for PTX, while the driver compiles it). Any failure is left for
/// the first launch to report (as a typed error there).
pub(crate) fn preload(gpu: &Gpu) {
    let failure = match gpu.kernel_source() {
        KernelSource::Launchers => {
            // SAFETY: no arguments; the caller made `gpu`'s context current,
            // which is all the runtime needs to load the module into it.
            let code = unsafe { sys::prism_preload_kernels() };
            (code != 0).then(|| code_message(code))
        }
        KernelSource::Ptx => gpu.ptx_kernels().err().map(|e| e.to_string()),
    };
    if let Some(why) = failure {
        tracing::warn!(
            device = gpu.info().ordinal,
            "loading prism's kernels failed ({why}); the first launch will say why"
        );
    }
}

/// Threads per block of every grid-stride kernel (`kBlock` in the .cu file).
const BLOCK: u32 = 256;
/// Grid cap of grid-stride kernels (`kMaxBlocks`).
const MAX_BLOCKS: u64 = 65535 * 8;

/// Blocks for `work` items: `blocks_for` of `kernels/prism_kernels.cu`.
pub fn ptx_grid(work: u64) -> u32 {
    work.div_ceil(u64::from(BLOCK)).clamp(1, MAX_BLOCKS) as u32
}

/// Launches `f` with `grid` x `block` threads on `stream`.
///
/// # Safety
///
/// `params` must point at live values matching `f`'s parameters in number,
/// order and type; every buffer they name must be valid for what the
/// kernel does with it and ordered on `stream` (the caller's lane).
unsafe fn launch_ptx(
    f: &CudaFunction,
    grid: u32,
    block: u32,
    stream: cu::CUstream,
    params: &mut [*mut c_void],
) -> std::result::Result<(), DriverError> {
    // SAFETY: forwarded from the caller; `f` belongs to the lane's context
    // (the module was loaded into the lane's Gpu).
    unsafe {
        result::launch_kernel(
            f.cu_function(),
            (grid, 1, 1),
            (block, 1, 1),
            0,
            stream,
            params,
        )
    }
}

/// A pointer to a launch parameter, as `cuLaunchKernel` takes it.
fn param<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

/// Turns a failed driver launch into the launcher path's error: anything
/// but a rejected argument or a refusal during a stream capture
/// (`CaptureInProgress`) leaves the context unusable.
fn check_driver_launch(
    gpu: &Gpu,
    kernel: &'static str,
    outcome: std::result::Result<(), DriverError>,
) -> Result<()> {
    let Err(e) = outcome else { return Ok(()) };
    if is_capture_error(&e) {
        return Err(Error::CaptureInProgress {
            call: kernel,
            source: e,
        });
    }
    let message = e.to_string();
    if e.0 != cu::CUresult::CUDA_ERROR_INVALID_VALUE {
        gpu.poison(&format!("kernel {kernel}: {message}"));
    }
    Err(Error::Kernel {
        kernel,
        code: e.0 as i32,
        message,
    })
}

/// A kernel launch scope on one [`Lane`] (see [`Lane::launch`]; inside
/// [`AsyncCoordinator::queue_compute`](crate::AsyncCoordinator::queue_compute)
/// and pipeline stages it is handed to you). Each launch is ordered after
/// the earlier uses of the buffers it names and fenced before the method
/// returns; the scope itself holds nothing that could be lost.
#[derive(Debug)]
pub struct Launch<'l> {
    lane: &'l mut Lane,
    last: Option<Fence>,
}

impl Lane {
    /// Opens a launch scope on this lane.
    pub fn launch(&mut self) -> Launch<'_> {
        Launch {
            lane: self,
            last: None,
        }
    }
}

impl<'l> Launch<'l> {
    /// The fence of the last launch of this scope (`None` before the first).
    pub fn last_fence(&self) -> Option<&Fence> {
        self.last.as_ref()
    }

    /// The GPU of the scope's lane.
    pub fn gpu(&self) -> &Gpu {
        self.lane.gpu()
    }

    /// Makes the lane wait (on the GPU) for `fence` before its next launch.
    pub fn wait_for(&mut self, fence: &Fence) -> Result<()> {
        self.lane.wait_for(fence)
    }

    /// Records a fence after everything queued on the scope's lane so far,
    /// the waits of [`wait_for`](Self::wait_for) included, and makes it the
    /// scope's last: the end of a scope that joined other lanes' work.
    pub fn fence(&mut self) -> Result<Fence> {
        let f = self.lane.fence()?;
        self.last = Some(f.clone());
        Ok(f)
    }

    /// Issues the waits a kernel reading `buf` needs, now. Optional (every
    /// launch orders itself); useful before a timed fence, so the time
    /// measured excludes the wait. Nothing while capturing a graph (its
    /// launches order themselves).
    pub fn prepare_read<T: Element>(&mut self, buf: &DeviceBuffer<T>) -> Result<()> {
        if self.is_capturing() {
            return Ok(());
        }
        self.lane.order(&[buf.used(Access::Read, "device buffer")])
    }

    /// Issues the waits a kernel writing `buf` needs, now (see
    /// [`prepare_read`](Self::prepare_read)).
    pub fn prepare_write<T: Element>(&mut self, buf: &mut DeviceBuffer<T>) -> Result<()> {
        if self.is_capturing() {
            return Ok(());
        }
        self.lane.order(&[buf.used(Access::Write, "device buffer")])
    }

    /// True inside [`Lane::capture`]: the scope's work is recorded into a
    /// CUDA graph, and fences and waits are refused (the graph's launches
    /// are ordered and fenced as a whole).
    pub fn is_capturing(&self) -> bool {
        self.lane.capture.is_some()
    }

    /// Queues one op of this scope through the lane (ordered and fenced,
    /// or captured: [`Lane::enqueue_scoped`]) and keeps its fence as the
    /// scope's last.
    pub(crate) fn enqueue<R>(
        &mut self,
        uses: &[Used<'_>],
        op: impl FnOnce(cu::CUstream) -> Result<R>,
    ) -> Result<R> {
        let (end, r) = self.lane.enqueue_scoped(uses, op)?;
        if let Some(end) = end {
            self.last = Some(end);
        }
        Ok(r)
    }

    /// The fence after the scope's last op (one recorded now if it queued
    /// none), for the `Lane` methods built on a scope.
    pub(crate) fn finish(self) -> Result<Fence> {
        match self.last {
            Some(f) => Ok(f),
            None => self.lane.fence(),
        }
    }

    /// The scope's lane, for the modules that build ops on it.
    pub(crate) fn lane_mut(&mut self) -> &mut Lane {
        self.lane
    }

    /// Makes `fence` the scope's last (a graph launched on its lane).
    pub(crate) fn set_last(&mut self, fence: Fence) {
        self.last = Some(fence);
    }

    /// The lane and the scope's last fence, for outside work.
    pub(crate) fn parts(&mut self) -> (&mut Lane, &mut Option<Fence>) {
        (self.lane, &mut self.last)
    }

    /// Records a timed fence on the scope's lane (for per-stage GPU times).
    pub fn timed_fence(&mut self) -> Result<Fence> {
        self.lane.timed_fence()
    }

    /// Runs one of prism's kernels through the lane, from the GPU's
    /// [`KernelSource`]: `launcher` calls the nvcc launcher, `ptx` launches
    /// the same kernel(s) from the PTX with the same grid.
    fn run(
        &mut self,
        kernel: &'static str,
        uses: &[Used<'_>],
        launcher: impl FnOnce(sys::prism_stream_t) -> i32,
        ptx: impl FnOnce(&PtxKernels, cu::CUstream) -> std::result::Result<(), DriverError>,
    ) -> Result<()> {
        let gpu = self.lane.gpu().clone();
        // The status is checked once the fence is noted: a failed launch is
        // fenced like any other (enqueue fences every path).
        match gpu.kernel_source() {
            KernelSource::Launchers => {
                let code = self.enqueue(uses, |stream| Ok(launcher(stream.cast())))?;
                check_code(&gpu, kernel, code)
            }
            KernelSource::Ptx => {
                let kernels = gpu.ptx_kernels()?;
                let outcome = self.enqueue(uses, |stream| Ok(ptx(&kernels, stream)))?;
                check_driver_launch(&gpu, kernel, outcome)
            }
        }
    }

    /// `y[..n] = x[..n]` after `iters` steps of `v = fma(v, a, b)`.
    pub fn fma_chain(
        &mut self,
        x: &DeviceBuffer<f32>,
        y: &mut DeviceBuffer<f32>,
        n: usize,
        a: f32,
        b: f32,
        iters: u32,
    ) -> Result<()> {
        check_len("fma_chain input", n, x.len())?;
        check_len("fma_chain output", n, y.len())?;
        let iters = iters_i32(iters)?;
        let (xp, yp) = (x.addr(), y.addr());
        let uses = [
            x.used(Access::Read, "fma_chain input"),
            y.used(Access::Write, "fma_chain output"),
        ];
        self.run(
            "fma_chain",
            &uses,
            |stream| {
                // SAFETY: x and y are allocations of the lane's context (checked by
                // enqueue) with at least n elements (checked above), ordered after
                // their earlier uses and fenced before this call returns.
                unsafe {
                    sys::prism_fma_chain_f32(
                        xp as *const f32,
                        yp as *mut f32,
                        n as u64,
                        a,
                        b,
                        iters,
                        stream,
                    )
                }
            },
            |k, stream| ptx_fma_chain(k, stream, xp, yp, n as u64, a, b, iters),
        )
    }

    /// In place: `y[..n] = fma^iters(y[..n])`.
    pub fn fma_chain_in_place(
        &mut self,
        y: &mut DeviceBuffer<f32>,
        n: usize,
        a: f32,
        b: f32,
        iters: u32,
    ) -> Result<()> {
        check_len("fma_chain buffer", n, y.len())?;
        let iters = iters_i32(iters)?;
        let p = y.addr();
        let uses = [y.used(Access::Write, "fma_chain buffer")];
        self.run(
            "fma_chain",
            &uses,
            |stream| {
                // SAFETY: as in fma_chain; the launcher allows x == y (elementwise).
                unsafe {
                    sys::prism_fma_chain_f32(
                        p as *const f32,
                        p as *mut f32,
                        n as u64,
                        a,
                        b,
                        iters,
                        stream,
                    )
                }
            },
            |k, stream| ptx_fma_chain(k, stream, p, p, n as u64, a, b, iters),
        )
    }

    /// `buf[i] = pattern(seed, i)` for `i < n` (see [`pattern`]).
    pub fn fill_pattern(&mut self, buf: &mut DeviceBuffer<u32>, n: usize, seed: u32) -> Result<()> {
        check_len("fill_pattern buffer", n, buf.len())?;
        let p = buf.addr();
        let uses = [buf.used(Access::Write, "fill_pattern buffer")];
        self.run(
            "fill_pattern",
            &uses,
            |stream| {
                // SAFETY: buf has at least n elements; ordered and fenced by enqueue.
                unsafe { sys::prism_fill_pattern_u32(p as *mut u32, n as u64, seed, stream) }
            },
            |k, stream| {
                let (mut p, mut n, mut seed) = (p, n as u64, seed);
                let mut params = [param(&mut p), param(&mut n), param(&mut seed)];
                // SAFETY: (u32*, u64, u32) as the kernel declares; buf has n
                // elements, ordered and fenced by enqueue.
                unsafe { launch_ptx(&k.fill_pattern, ptx_grid(n), BLOCK, stream, &mut params) }
            },
        )
    }

    /// Counts mismatches of `buf[..n]` against the pattern into
    /// `counters[0]` (mismatches) and `counters[1]` (first bad index, u64::MAX if none).
    pub fn check_pattern(
        &mut self,
        buf: &DeviceBuffer<u32>,
        n: usize,
        seed: u32,
        counters: &mut DeviceBuffer<u64>,
    ) -> Result<()> {
        check_len("check_pattern buffer", n, buf.len())?;
        check_len("check_pattern counters", 2, counters.len())?;
        let (p, c) = (buf.addr(), counters.addr());
        let uses = [
            buf.used(Access::Read, "check_pattern buffer"),
            counters.used(Access::Write, "check_pattern counters"),
        ];
        let gpu = self.lane.gpu().clone();
        self.enqueue(&uses, |stream| {
            // SAFETY: counters has at least 2 u64 (16 bytes); both memsets stay
            // inside it and run on this stream before the kernel.
            unsafe {
                result::memset_d8_async(c, 0, 8, stream).call("cuMemsetD8Async")?;
                result::memset_d8_async(c + 8, 0xFF, 8, stream).call("cuMemsetD8Async")?;
            }
            match gpu.kernel_source() {
                KernelSource::Launchers => {
                    // SAFETY: buf has n elements, counters 2; ordered and fenced by enqueue.
                    let code = unsafe {
                        sys::prism_check_pattern_u32(
                            p as *const u32,
                            n as u64,
                            seed,
                            c as *mut _,
                            (c + 8) as *mut _,
                            stream.cast(),
                        )
                    };
                    check_code(&gpu, "check_pattern", code)
                }
                KernelSource::Ptx => {
                    let k = gpu.ptx_kernels()?;
                    let (mut p, mut n, mut seed, mut m, mut first) = (p, n as u64, seed, c, c + 8);
                    let mut params = [
                        param(&mut p),
                        param(&mut n),
                        param(&mut seed),
                        param(&mut m),
                        param(&mut first),
                    ];
                    // SAFETY: (u32*, u64, u32, u64*, u64*) as the kernel
                    // declares; buf has n elements and counters 2, ordered
                    // and fenced by enqueue.
                    let outcome = unsafe {
                        launch_ptx(&k.check_pattern, ptx_grid(n), BLOCK, stream, &mut params)
                    };
                    check_driver_launch(&gpu, "check_pattern", outcome)
                }
            }
        })
    }

    /// A kernel that keeps the stream busy for `ns` nanoseconds (tests, demos).
    pub fn spin(&mut self, ns: u64) -> Result<()> {
        self.run(
            "spin_ns",
            &[],
            // SAFETY: touches no memory; the stream is live (held by the lane).
            |stream| unsafe { sys::prism_spin_ns(ns, stream) },
            |k, stream| {
                let mut ns = ns;
                // SAFETY: (u64) as the kernel declares; touches no memory.
                unsafe { launch_ptx(&k.spin_ns, 1, 1, stream, &mut [param(&mut ns)]) }
            },
        )
    }

    /// A kernel that writes through an invalid address: the GPU faults and the
    /// context (the device's primary context, shared by every user of it in
    /// the process) becomes unusable. Only for testing error paths; use it
    /// on a context of its own ([`Gpu::open_private`]). Only with the
    /// `fault-injection` feature (off by default; prism-testing turns it on).
    #[cfg(feature = "fault-injection")]
    pub fn fault_injection(&mut self) -> Result<()> {
        self.run(
            "fault",
            &[],
            // SAFETY: the kernel faults on the GPU by design; no host memory and no
            // prism buffer is involved, and the fault is reported as a CUDA error.
            |stream| unsafe { sys::prism_fault(stream) },
            |k, stream| {
                // The launcher's address: one no allocation can have.
                let mut bad: u64 = 0x10;
                // SAFETY: as above: the store faults on the GPU, touching nothing.
                unsafe { launch_ptx(&k.fault, 1, 1, stream, &mut [param(&mut bad)]) }
            },
        )
    }

    /// `out[j] = sum(x[j*group .. min((j+1)*group, n)])`; `out` needs `ceil(n/group)` elements.
    pub fn group_sum(
        &mut self,
        x: &DeviceBuffer<f32>,
        n: usize,
        group: u32,
        out: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        if group == 0 {
            return Err(Error::ZeroLength {
                what: "group_sum group size",
            });
        }
        check_len("group_sum input", n, x.len())?;
        check_len("group_sum output", n.div_ceil(group as usize), out.len())?;
        let (xp, op) = (x.addr(), out.addr());
        let uses = [
            x.used(Access::Read, "group_sum input"),
            out.used(Access::Write, "group_sum output"),
        ];
        self.run(
            "group_sum",
            &uses,
            |stream| {
                // SAFETY: sizes checked above; ordered and fenced by enqueue.
                unsafe {
                    sys::prism_group_sum_f32(
                        xp as *const f32,
                        n as u64,
                        group,
                        op as *mut f32,
                        stream,
                    )
                }
            },
            |k, stream| {
                let (mut xp, mut n, mut group, mut op) = (xp, n as u64, group, op);
                let mut groups = n.div_ceil(u64::from(group));
                let grid = ptx_grid(groups);
                let mut params = [
                    param(&mut xp),
                    param(&mut n),
                    param(&mut group),
                    param(&mut op),
                    param(&mut groups),
                ];
                // SAFETY: (f32*, u64, u32, f32*, u64) as the kernel declares;
                // sizes checked above; ordered and fenced by enqueue.
                unsafe { launch_ptx(&k.group_sum, grid, BLOCK, stream, &mut params) }
            },
        )
    }

    /// Gathers `items` back to back into the front of `dst` with one kernel
    /// that reads the pinned host buffers directly over the bus (zero-copy),
    /// and returns the elements written. `desc` (at least 3 x items) holds the
    /// kernel's descriptors; it is written here, so it fails with
    /// `BufferInFlight` while an earlier gather or scatter still reads it.
    pub fn gather_pinned<T: Element>(
        &mut self,
        items: &[&PinnedBuffer<T>],
        desc: &mut PinnedBuffer<u64>,
        dst: &mut DeviceBuffer<T>,
    ) -> Result<usize> {
        let total = zero_copy_total(
            items.iter().map(|b| b.len()),
            "gathered pinned buffers",
            "gather destination",
            dst.len(),
        )?;
        let count = items.len() as u64;
        let grid = zero_copy_grid(count)?;
        let desc_ptr =
            self.write_descriptors(items.iter().copied(), desc, "gathered pinned buffer")?;
        let mut uses: Vec<Used<'_>> = Vec::with_capacity(items.len() + 2);
        uses.extend(
            items
                .iter()
                .map(|b| b.used(Access::Read, "gathered pinned buffer")),
        );
        uses.push(desc.used(Access::Read, "zero-copy descriptors"));
        let d = dst.addr();
        uses.push(dst.used(Access::Write, "gather destination"));
        self.run(
            "gather_bytes",
            &uses,
            |stream| {
                // SAFETY: desc holds 3 * count initialised descriptors in mapped
                // pinned memory; each names a live mapped pinned buffer of this
                // context and its size, all fenced by enqueue before this returns;
                // the offsets stay within dst (total <= dst.len(), checked above).
                unsafe {
                    sys::prism_gather_bytes(desc_ptr as *const u64, count, d as *mut u8, stream)
                }
            },
            |k, stream| {
                let (mut desc, mut d) = (desc_ptr, d);
                let mut params = [param(&mut desc), param(&mut d)];
                // SAFETY: (u64*, u8*) as the kernel declares, one block per
                // descriptor; as for the launcher above.
                unsafe { launch_ptx(&k.gather_bytes, grid, BLOCK, stream, &mut params) }
            },
        )?;
        Ok(total)
    }

    /// Scatters the front of `src` back to back into `items` with one kernel
    /// that writes the pinned host buffers directly (zero-copy). Host reads
    /// of `items` fail with `BufferInFlight` until the kernel completes.
    pub fn scatter_pinned<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        items: &mut [&mut PinnedBuffer<T>],
        desc: &mut PinnedBuffer<u64>,
    ) -> Result<usize> {
        let total = zero_copy_total(
            items.iter().map(|b| b.len()),
            "scattered pinned buffers",
            "scatter source",
            src.len(),
        )?;
        let count = items.len() as u64;
        let grid = zero_copy_grid(count)?;
        let desc_ptr =
            self.write_descriptors(items.iter().map(|b| &**b), desc, "scattered pinned buffer")?;
        let mut uses: Vec<Used<'_>> = Vec::with_capacity(items.len() + 2);
        let s = src.addr();
        uses.push(src.used(Access::Read, "scatter source"));
        uses.push(desc.used(Access::Read, "zero-copy descriptors"));
        uses.extend(
            items
                .iter()
                .map(|b| b.used(Access::Write, "scattered pinned buffer")),
        );
        self.run(
            "scatter_bytes",
            &uses,
            |stream| {
                // SAFETY: as in gather_pinned, with the roles swapped: every
                // descriptor names a live mapped pinned buffer that host code cannot
                // touch until the write fence noted by enqueue completes.
                unsafe {
                    sys::prism_scatter_bytes(s as *const u8, desc_ptr as *const u64, count, stream)
                }
            },
            |k, stream| {
                let (mut s, mut desc) = (s, desc_ptr);
                let mut params = [param(&mut s), param(&mut desc)];
                // SAFETY: (u8*, u64*) as the kernel declares, one block per
                // descriptor; as for the launcher above.
                unsafe { launch_ptx(&k.scatter_bytes, grid, BLOCK, stream, &mut params) }
            },
        )?;
        Ok(total)
    }

    /// Fills `desc` with one (mapped address, byte offset, bytes) triple per
    /// item, back to back; returns the mapped address of `desc` for the
    /// kernel. Checks every item first and writes nothing into `desc` on error.
    fn write_descriptors<'b, T: Element>(
        &self,
        items: impl ExactSizeIterator<Item = &'b PinnedBuffer<T>> + Clone,
        desc: &mut PinnedBuffer<u64>,
        what: &'static str,
    ) -> Result<cu::CUdeviceptr> {
        check_len("zero-copy items", items.len(), desc.len() / 3)?;
        if !desc.gpu().same(self.lane.gpu()) {
            return Err(Error::WrongContext {
                what: "zero-copy descriptors",
            });
        }
        let desc_ptr = desc.mapped().ok_or(Error::NotMapped {
            what: "zero-copy descriptors",
        })?;
        let size = std::mem::size_of::<T>() as u64;
        let overflow = || Error::LengthOverflow {
            what: "zero-copy descriptor bytes",
        };
        // Every item's bytes and their running sum, checked here, before
        // anything is written: the loop below then repeats sums that fit.
        let mut end = 0u64;
        for item in items.clone() {
            if !item.gpu().same(self.lane.gpu()) {
                return Err(Error::WrongContext { what });
            }
            item.mapped().ok_or(Error::NotMapped { what })?;
            let bytes = u64::try_from(item.len())
                .ok()
                .and_then(|n| n.checked_mul(size))
                .ok_or_else(overflow)?;
            end = end.checked_add(bytes).ok_or_else(overflow)?;
        }
        let d = desc.as_mut_slice()?;
        let mut offset = 0u64;
        for (k, item) in items.enumerate() {
            // Cannot wrap: every partial sum is at most `end`, computed
            // with checked arithmetic above.
            let bytes = item.len() as u64 * size;
            d[3 * k] = item.mapped().unwrap_or(0);
            d[3 * k + 1] = offset;
            d[3 * k + 2] = bytes;
            offset += bytes;
        }
        Ok(desc_ptr)
    }

    /// `y[i] = clamp(x[i], lo, hi)` for `i < n`.
    pub fn clamp(
        &mut self,
        x: &DeviceBuffer<f32>,
        y: &mut DeviceBuffer<f32>,
        n: usize,
        lo: f32,
        hi: f32,
    ) -> Result<()> {
        check_len("clamp input", n, x.len())?;
        check_len("clamp output", n, y.len())?;
        let (xp, yp) = (x.addr(), y.addr());
        let uses = [
            x.used(Access::Read, "clamp input"),
            y.used(Access::Write, "clamp output"),
        ];
        self.run(
            "clamp",
            &uses,
            |stream| {
                // SAFETY: x and y have >= n elements (checked), ordered and fenced by enqueue.
                unsafe {
                    sys::prism_clamp_f32(xp as *const f32, yp as *mut f32, n as u64, lo, hi, stream)
                }
            },
            |k, stream| ptx_clamp(k, stream, xp, yp, n as u64, lo, hi),
        )
    }

    /// In place: `y[i] = clamp(y[i], lo, hi)` for `i < n`.
    pub fn clamp_in_place(
        &mut self,
        y: &mut DeviceBuffer<f32>,
        n: usize,
        lo: f32,
        hi: f32,
    ) -> Result<()> {
        check_len("clamp buffer", n, y.len())?;
        let p = y.addr();
        let uses = [y.used(Access::Write, "clamp buffer")];
        self.run(
            "clamp",
            &uses,
            |stream| {
                // SAFETY: y has n elements; the launcher allows x == y; ordered and fenced.
                unsafe {
                    sys::prism_clamp_f32(p as *const f32, p as *mut f32, n as u64, lo, hi, stream)
                }
            },
            |k, stream| ptx_clamp(k, stream, p, p, n as u64, lo, hi),
        )
    }

    /// Starts a launch of the user's own `kernel` (loaded with
    /// [`Gpu::load_module`]) on this scope's lane. Name every prism buffer
    /// the kernel touches as an argument: reads with `arg`/`arg_pinned`,
    /// writes with `arg_mut`/`arg_pinned_mut`; prism then orders the kernel
    /// after their earlier uses and fences them, as for its own kernels.
    /// Only [`KernelCall::launch`] is unsafe (the arguments must match the
    /// kernel).
    pub fn kernel<'a>(&'a mut self, kernel: &'a Kernel) -> KernelCall<'a> {
        KernelCall {
            lane: &mut *self.lane,
            last: &mut self.last,
            kernel,
            params: Vec::new(),
            uses: Vec::new(),
            error: None,
        }
    }
}

/// A module of the user's own kernels, loaded into a GPU's context.
#[derive(Debug, Clone)]
pub struct Module {
    gpu: Gpu,
    hold: Arc<ModuleHold>,
}

/// One kernel of a [`Module`], launched with [`Launch::kernel`].
#[derive(Debug, Clone)]
pub struct Kernel {
    gpu: Gpu,
    name: String,
    function: CudaFunction,
    /// Declared after `function`, so the module outlives it.
    _hold: Arc<ModuleHold>,
}

impl Gpu {
    /// Loads PTX (or a cubin) into this GPU's context, for
    /// [`Launch::kernel`]. `Ptx::from_src(text)`, `Ptx::from_file(path)`.
    pub fn load_module(&self, ptx: Ptx) -> Result<Module> {
        self.check_usable()?;
        let module = self
            .cuda_context()
            .load_module(ptx)
            .call("cuModuleLoadData")?;
        Ok(Module {
            gpu: self.clone(),
            hold: Arc::new(ModuleHold {
                ctx: Arc::clone(self.cuda_context()),
                module,
            }),
        })
    }
}

impl Module {
    /// The kernel called `name` (its `extern "C"` name).
    pub fn kernel(&self, name: &str) -> Result<Kernel> {
        if name.contains('\0') {
            // cudarc would panic making a C string of it.
            return Err(Error::InvalidName {
                what: "kernel name",
                name: name.to_owned(),
            });
        }
        let function = self
            .hold
            .module
            .load_function(name)
            .call("cuModuleGetFunction")?;
        Ok(Kernel {
            gpu: self.gpu.clone(),
            name: name.to_owned(),
            function,
            _hold: Arc::clone(&self.hold),
        })
    }
}

impl Kernel {
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// One kernel parameter's bytes, kept by the call until the launch: a
/// buffer address or a value passed by value. 16-byte aligned storage, so
/// the driver may read any parameter type from it.
#[derive(Debug)]
struct Param(Box<[u128]>);

impl Param {
    fn of<V: DeviceRepr>(v: &V) -> Self {
        let size = std::mem::size_of::<V>();
        let mut words = vec![0u128; size.div_ceil(16).max(1)].into_boxed_slice();
        // SAFETY: `words` holds at least `size` bytes and does not overlap
        // `v`; copying the value's bytes moves no ownership (DeviceRepr
        // values are plain data the driver copies byte for byte).
        unsafe {
            std::ptr::copy_nonoverlapping(
                (v as *const V).cast::<u8>(),
                words.as_mut_ptr().cast::<u8>(),
                size,
            );
        }
        Self(words)
    }
}

/// A launch of the user's own kernel being assembled: arguments in the
/// kernel's parameter order, each method taking and returning the call, so
/// a launch is one expression:
///
/// ```no_run
/// # use prism_stream::{cudarc::driver::LaunchConfig, DeviceBuffer, Kernel, Launch};
/// # fn f(launch: &mut Launch<'_>, k: &Kernel, x: &DeviceBuffer<f32>, y: &mut DeviceBuffer<f32>) -> prism_stream::Result<()> {
/// let n = x.len();
/// // SAFETY: `scale(const float* x, float* y, unsigned long long n, float a)`
/// // reads x[..n] and writes y[..n], and y holds n elements.
/// unsafe {
///     launch.kernel(k).arg(x).arg_mut(y).value(n as u64).value(2.0f32)
///         .launch(LaunchConfig::for_num_elems(n as u32))
/// }
/// # }
/// ```
///
/// Made by [`Launch::kernel`].
#[derive(Debug)]
pub struct KernelCall<'a> {
    lane: &'a mut Lane,
    last: &'a mut Option<Fence>,
    kernel: &'a Kernel,
    params: Vec<Param>,
    uses: Vec<Used<'a>>,
    /// The first argument that could not be used (reported by `launch`).
    error: Option<Error>,
}

impl<'a> KernelCall<'a> {
    /// A device buffer the kernel reads (passed as its device address).
    pub fn arg<T: Element>(mut self, buf: &'a DeviceBuffer<T>) -> Self {
        self.params.push(Param::of(&buf.addr()));
        self.uses.push(buf.used(Access::Read, "kernel argument"));
        self
    }

    /// A device buffer the kernel writes (and may read).
    pub fn arg_mut<T: Element>(mut self, buf: &'a mut DeviceBuffer<T>) -> Self {
        self.params.push(Param::of(&buf.addr()));
        self.uses.push(buf.used(Access::Write, "kernel argument"));
        self
    }

    /// A pinned host buffer the kernel reads over the bus (its mapped address).
    pub fn arg_pinned<T: Element>(self, buf: &'a PinnedBuffer<T>) -> Self {
        self.pinned(buf, Access::Read)
    }

    /// A pinned host buffer the kernel writes over the bus; host reads of it
    /// fail with `BufferInFlight` until the kernel completes.
    pub fn arg_pinned_mut<T: Element>(self, buf: &'a mut PinnedBuffer<T>) -> Self {
        self.pinned(buf, Access::Write)
    }

    fn pinned<T: Element>(mut self, buf: &'a PinnedBuffer<T>, access: Access) -> Self {
        match buf.mapped() {
            Some(p) => self.params.push(Param::of(&p)),
            None => {
                self.params.push(Param::of(&0u64));
                self.error.get_or_insert(Error::NotMapped {
                    what: "pinned kernel argument",
                });
            }
        }
        self.uses.push(buf.used(access, "pinned kernel argument"));
        self
    }

    /// A value passed by value (a length, a scale factor, a `#[repr(C)]`
    /// struct): copied into the call, so temporaries are fine.
    pub fn value<V: DeviceRepr>(mut self, v: V) -> Self {
        self.params.push(Param::of(&v));
        self
    }

    /// Launches the kernel on the scope's lane, ordered after the earlier
    /// uses of every buffer argument; their fences are noted before this
    /// returns (inside [`Lane::capture`], it is recorded into the graph).
    ///
    /// # Safety
    ///
    /// The arguments must match the kernel's parameters in number, order and
    /// type; `cfg` must be a valid configuration for it; the kernel may read
    /// only the buffers passed with `arg`/`arg_pinned`, write only those
    /// passed with `arg_mut`/`arg_pinned_mut`, and stay within their lengths.
    pub unsafe fn launch(mut self, cfg: LaunchConfig) -> Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if !self.kernel.gpu.same(self.lane.gpu()) {
            return Err(Error::WrongContext {
                what: "kernel (loaded into another context)",
            });
        }
        let mut ptrs: Vec<*mut c_void> = self
            .params
            .iter_mut()
            .map(|p| p.0.as_mut_ptr().cast())
            .collect();
        let f = self.kernel.function.cu_function();
        let (end, ()) = self.lane.enqueue_scoped(&self.uses, |stream| {
            // SAFETY: the caller guarantees the arguments match the kernel and
            // the kernel touches only the buffers named (all of this context,
            // ordered and fenced, or captured, by the scope); `ptrs` points at
            // the parameter bytes in `params`, alive for the call.
            unsafe {
                result::launch_kernel(
                    f,
                    cfg.grid_dim,
                    cfg.block_dim,
                    cfg.shared_mem_bytes,
                    stream,
                    &mut ptrs,
                )
            }
            .call("cuLaunchKernel")
        })?;
        if let Some(end) = end {
            *self.last = Some(end);
        }
        Ok(())
    }
}

/// `prism_fma_chain_f32` through the PTX: the float4 kernel over the
/// aligned body, the scalar kernel over the rest.
#[allow(clippy::too_many_arguments)]
fn ptx_fma_chain(
    k: &PtxKernels,
    stream: cu::CUstream,
    x: u64,
    y: u64,
    n: u64,
    a: f32,
    b: f32,
    iters: i32,
) -> std::result::Result<(), DriverError> {
    let (mut a, mut b, mut iters) = (a, b, iters);
    let mut head = 0u64;
    if x.is_multiple_of(16) && y.is_multiple_of(16) {
        let mut n4 = n / 4;
        if n4 != 0 {
            let (mut x, mut y) = (x, y);
            let grid = ptx_grid(n4);
            let mut params = [
                param(&mut x),
                param(&mut y),
                param(&mut n4),
                param(&mut a),
                param(&mut b),
                param(&mut iters),
            ];
            // SAFETY: (float4*, float4*, u64, f32, f32, i32) as the kernel
            // declares; x and y are 16-byte aligned and hold n >= 4 * n4
            // floats (the caller's checks), ordered by the caller's lane.
            unsafe { launch_ptx(&k.fma_chain_vec4, grid, BLOCK, stream, &mut params) }?;
        }
        head = n4 * 4;
    }
    if head < n {
        let (mut x, mut y, mut head, mut n) = (x, y, head, n);
        let grid = ptx_grid(n - head);
        let mut params = [
            param(&mut x),
            param(&mut y),
            param(&mut head),
            param(&mut n),
            param(&mut a),
            param(&mut b),
            param(&mut iters),
        ];
        // SAFETY: (f32*, f32*, u64, u64, f32, f32, i32) as the kernel
        // declares; x and y hold n floats, ordered by the caller's lane.
        unsafe { launch_ptx(&k.fma_chain_scalar, grid, BLOCK, stream, &mut params) }?;
    }
    Ok(())
}

/// `prism_clamp_f32` through the PTX.
fn ptx_clamp(
    k: &PtxKernels,
    stream: cu::CUstream,
    x: u64,
    y: u64,
    n: u64,
    lo: f32,
    hi: f32,
) -> std::result::Result<(), DriverError> {
    let (mut x, mut y, mut n2, mut lo, mut hi) = (x, y, n, lo, hi);
    let mut params = [
        param(&mut x),
        param(&mut y),
        param(&mut n2),
        param(&mut lo),
        param(&mut hi),
    ];
    // SAFETY: (f32*, f32*, u64, f32, f32) as the kernel declares; x and y
    // hold n floats (the caller's checks), ordered by the caller's lane.
    unsafe { launch_ptx(&k.clamp, ptx_grid(n), BLOCK, stream, &mut params) }
}

/// One block per zero-copy descriptor: the launchers refuse more than
/// `i32::MAX` of them.
fn zero_copy_grid(count: u64) -> Result<u32> {
    u32::try_from(count)
        .ok()
        .filter(|&c| c <= i32::MAX as u32)
        .ok_or(Error::LengthMismatch {
            what: "zero-copy items (max i32::MAX)",
            expected: i32::MAX as usize,
            actual: count as usize,
        })
}

/// The elements a zero-copy gather or scatter moves: the sum of the items'
/// lengths, which must fit `capacity` (the device buffer's length). The sum
/// is checked, never wrapped: one pinned buffer listed many times must not
/// add up, modulo 2^64, to a small total that passes the capacity check, or
/// the kernel would copy every item's real bytes past the end of the device
/// buffer. `items` names the items in the overflow error, `what` the device
/// buffer in the capacity error.
fn zero_copy_total(
    lens: impl Iterator<Item = usize>,
    items: &'static str,
    what: &'static str,
    capacity: usize,
) -> Result<usize> {
    let mut total = 0usize;
    for len in lens {
        total = total
            .checked_add(len)
            .ok_or(Error::LengthOverflow { what: items })?;
    }
    check_len(what, total, capacity)?;
    Ok(total)
}

/// The launcher takes `iters` as an `int32_t`.
fn iters_i32(iters: u32) -> Result<i32> {
    i32::try_from(iters).map_err(|_| Error::LengthMismatch {
        what: "fma_chain iterations (max i32::MAX)",
        expected: i32::MAX as usize,
        actual: iters as usize,
    })
}

/// The CPU twin of the GPU fill/check pattern (see kernels/prism_kernels.h).
pub fn pattern(seed: u32, i: u64) -> u32 {
    let mut h = (i as u32) ^ ((i >> 32) as u32).wrapping_mul(0x9E37_79B9) ^ seed;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^= h >> 16;
    h
}

/// CPU reference of the fma chain kernel (same operation order, so results match bit for bit).
pub fn fma_chain_cpu(x: f32, a: f32, b: f32, iters: u32) -> f32 {
    let mut v = x;
    for _ in 0..iters {
        v = v.mul_add(a, b);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bundled PTX holds every kernel the driver path launches, for the
    /// oldest target and ISA prism promises (compute_75, PTX ISA 8.0).
    #[test]
    fn bundled_ptx_has_every_kernel_at_the_promised_isa() {
        let ptx = sys::KERNELS_PTX;
        assert!(ptx.lines().any(|l| l == ".version 8.0"), "PTX ISA 8.0");
        assert!(ptx.lines().any(|l| l == ".target sm_75"), "compute_75");
        for name in PTX_KERNEL_NAMES {
            assert!(
                ptx.contains(&format!(".visible .entry {name}(")),
                "{name} missing from kernels/prism_kernels.ptx"
            );
        }
        let entries = ptx.matches(".visible .entry ").count();
        assert_eq!(
            entries,
            PTX_KERNEL_NAMES.len(),
            "an entry without a launcher"
        );
    }

    /// The parameter lists of the PTX entries are the ones this file's
    /// driver-API launches pass (pointers and u64 as `.u64`, u32 and the
    /// `int` iteration count as `.u32`, floats as `.f32`): a kernel whose
    /// signature changes fails here, on the host, before the GPU test.
    #[test]
    fn bundled_ptx_parameters_match_the_driver_launches() {
        let expected: [(&str, &[&str]); 10] = [
            (
                "prism_k_fma_chain_vec4",
                &["u64", "u64", "u64", "f32", "f32", "u32"],
            ),
            (
                "prism_k_fma_chain_scalar",
                &["u64", "u64", "u64", "u64", "f32", "f32", "u32"],
            ),
            ("prism_k_fill_pattern", &["u64", "u64", "u32"]),
            (
                "prism_k_check_pattern",
                &["u64", "u64", "u32", "u64", "u64"],
            ),
            ("prism_k_spin_ns", &["u64"]),
            ("prism_k_fault", &["u64"]),
            ("prism_k_group_sum", &["u64", "u64", "u32", "u64", "u64"]),
            ("prism_k_clamp", &["u64", "u64", "u64", "f32", "f32"]),
            ("prism_k_gather_bytes", &["u64", "u64"]),
            ("prism_k_scatter_bytes", &["u64", "u64"]),
        ];
        for (name, params) in expected {
            let start = sys::KERNELS_PTX
                .find(&format!(".visible .entry {name}("))
                .unwrap_or_else(|| panic!("{name} missing"));
            let body = &sys::KERNELS_PTX[start..];
            let list = &body[..body.find(')').expect("a closing parenthesis")];
            let found: Vec<&str> = list
                .lines()
                .filter_map(|l| l.trim().strip_prefix(".param ."))
                .map(|l| l.split_whitespace().next().unwrap_or(""))
                .collect();
            assert_eq!(
                found, params,
                "{name}: PTX parameters vs the launch in kernels.rs"
            );
        }
    }

    /// `ptx_grid` is the .cu file's `blocks_for`.
    #[test]
    fn ptx_grid_matches_the_launchers() {
        assert_eq!(ptx_grid(0), 1);
        assert_eq!(ptx_grid(1), 1);
        assert_eq!(ptx_grid(256), 1);
        assert_eq!(ptx_grid(257), 2);
        assert_eq!(ptx_grid(u64::MAX), (65535 * 8) as u32);
        assert_eq!(zero_copy_grid(7).unwrap(), 7);
        assert!(zero_copy_grid(1 << 31).is_err());
    }

    /// One item listed `usize::MAX / len + 2` times: the plain sum wraps to
    /// `len` (in a release build), which fits the capacity. The checked sum
    /// reports the overflow instead, without collecting the items.
    #[test]
    fn zero_copy_total_never_wraps() {
        let len = 1usize << 40;
        let n = usize::MAX / len + 2;
        let wrapped = (0..n).fold(0usize, |s, _| s.wrapping_add(len));
        assert!(wrapped <= len, "the unchecked sum wraps to {wrapped}");
        let lens = std::iter::repeat_n(len, n);
        assert!(matches!(
            zero_copy_total(lens, "items", "destination", len),
            Err(Error::LengthOverflow { what: "items" })
        ));
        // Fine sums: checked against the capacity as before.
        assert_eq!(
            zero_copy_total([3, 4].into_iter(), "items", "destination", 7).unwrap(),
            7
        );
        assert!(matches!(
            zero_copy_total([3, 5].into_iter(), "items", "destination", 7),
            Err(Error::LengthMismatch {
                what: "destination",
                expected: 7,
                actual: 8
            })
        ));
        assert!(matches!(
            zero_copy_total(std::iter::empty(), "items", "destination", 7),
            Err(Error::ZeroLength { .. })
        ));
        // The largest sum that fits is not an overflow (only too long).
        assert!(matches!(
            zero_copy_total([usize::MAX - 1, 1].into_iter(), "items", "d", 7),
            Err(Error::LengthMismatch {
                actual: usize::MAX,
                ..
            })
        ));
    }

    #[test]
    fn default_source_follows_the_build() {
        let expected = if sys::KERNELS_BUILT {
            KernelSource::Launchers
        } else {
            KernelSource::Ptx
        };
        assert_eq!(KernelSource::default_for_build(), expected);
    }
}
