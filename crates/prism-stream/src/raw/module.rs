//! prism's own kernels in one context: where they come from (the
//! launchers nvcc compiled, or the bundled PTX), the PTX module once loaded
//! ([`PtxKernels`]), loading them early ([`KernelState::preload`]), and
//! [`ModuleHold`], which unloads a module, prism's or a user's, only once
//! its context has finished its work.

use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, DriverError};
use cudarc::nvrtc::Ptx;
use prism_cuda_sys as sys;

use super::ctx::{ctx_synchronize, make_current};

/// The message of a launcher status code (`prism_error_string`).
pub(crate) fn code_message(code: i32) -> String {
    // SAFETY: prism_error_string returns a pointer to a static NUL-terminated
    // string for any code (both in the nvcc build and in the stub).
    unsafe { CStr::from_ptr(sys::prism_error_string(code)) }
        .to_string_lossy()
        .into_owned()
}

/// Per-context kernel state: the source in use and, once loaded, the PTX module.
#[derive(Debug)]
pub(crate) struct KernelState {
    /// True when prism's kernels come from the PTX.
    ptx_source: AtomicBool,
    /// Set once a load succeeds (a failed load is tried again next time).
    ptx: OnceLock<Arc<PtxKernels>>,
    /// Serialises loads, so a context loads the PTX once.
    loading: Mutex<()>,
}

impl KernelState {
    pub(crate) fn new() -> Self {
        Self {
            ptx_source: AtomicBool::new(!sys::KERNELS_BUILT),
            ptx: OnceLock::new(),
            loading: Mutex::new(()),
        }
    }

    /// True while prism's kernels come from the PTX.
    pub(crate) fn uses_ptx(&self) -> bool {
        self.ptx_source.load(Ordering::Acquire)
    }

    /// Chooses the PTX (`true`) or the launchers for later launches.
    pub(crate) fn set_uses_ptx(&self, ptx: bool) {
        self.ptx_source.store(ptx, Ordering::Release);
    }

    /// The PTX kernels, if loaded.
    pub(crate) fn loaded(&self) -> Option<Arc<PtxKernels>> {
        self.ptx.get().cloned()
    }

    /// The PTX kernels of `ctx`, loaded on first use (a failed load, out of
    /// memory say, is reported and tried again at the next use); one load
    /// at a time.
    pub(crate) fn ptx(&self, ctx: &Arc<CudaContext>) -> Result<Arc<PtxKernels>, DriverError> {
        if let Some(k) = self.ptx.get() {
            return Ok(Arc::clone(k));
        }
        let _loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = self.ptx.get() {
            return Ok(Arc::clone(k));
        }
        let _span = tracing::debug_span!("prism.kernels.load_ptx").entered();
        let k = Arc::new(PtxKernels::load(ctx)?);
        Ok(Arc::clone(self.ptx.get_or_init(|| k)))
    }

    /// Loads prism's kernels into `ctx` (current on the calling thread) so
    /// the first launch of each does not stall the host while CUDA loads
    /// its module (or, for PTX, while the driver compiles it). Any failure
    /// is left for the first launch to report (as a typed error there).
    pub(crate) fn preload(&self, ctx: &Arc<CudaContext>, ordinal: usize) {
        let failure = if self.uses_ptx() {
            self.ptx(ctx)
                .err()
                .map(|source| crate::Error::PtxLoad { source }.to_string())
        } else {
            // SAFETY: no arguments; the caller made `ctx` current, which is
            // all the runtime needs to load the module into it.
            let code = unsafe { sys::prism_preload_kernels() };
            (code != 0).then(|| code_message(code))
        };
        if let Some(why) = failure {
            tracing::warn!(
                device = ordinal,
                "loading prism's kernels failed ({why}); the first launch will say why"
            );
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
pub(crate) struct ModuleHold {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) module: Arc<CudaModule>,
}

impl Drop for ModuleHold {
    fn drop(&mut self) {
        if Arc::strong_count(&self.module) != 1 {
            return;
        }
        // The module is unloaded right after this (the field drops, and
        // cudarc's unload runs in the context left current here).
        let waited = make_current(self.ctx.cu_ctx()).and_then(|()| ctx_synchronize());
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
    pub(crate) fma_chain_vec4: CudaFunction,
    pub(crate) fma_chain_scalar: CudaFunction,
    pub(crate) fill_pattern: CudaFunction,
    pub(crate) check_pattern: CudaFunction,
    pub(crate) spin_ns: CudaFunction,
    // Launched only by the `fault-injection` feature's test hook.
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    pub(crate) fault: CudaFunction,
    pub(crate) group_sum: CudaFunction,
    pub(crate) clamp: CudaFunction,
    pub(crate) gather_bytes: CudaFunction,
    pub(crate) scatter_bytes: CudaFunction,
    /// Last: dropped after the functions.
    _hold: ModuleHold,
}

/// Every kernel the PTX must hold, by its `extern "C"` name.
const PTX_KERNEL_NAMES: [&str; 10] = [
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
    pub(crate) fn load(ctx: &Arc<CudaContext>) -> std::result::Result<Self, DriverError> {
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
}
