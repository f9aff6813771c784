//! Where prism's own kernels come from ([`KernelSource`]): the per-context
//! [`KernelState`] (the source in use, the PTX once loaded), the loaded
//! PTX kernels ([`PtxKernels`]), [`Gpu::set_kernel_source`] and
//! [`preload`]; and [`ModuleHold`], which unloads a module, prism's or a
//! user's, only once its context has finished its work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{result, CudaContext, CudaFunction, CudaModule, DriverError};
use cudarc::nvrtc::Ptx;
use prism_cuda_sys as sys;

use super::launch::code_message;
use crate::context::Gpu;
use crate::event::relaxed_on_capture;
use crate::{Error, Result};

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
pub(super) struct ModuleHold {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) module: Arc<CudaModule>,
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
    pub(super) fma_chain_vec4: CudaFunction,
    pub(super) fma_chain_scalar: CudaFunction,
    pub(super) fill_pattern: CudaFunction,
    pub(super) check_pattern: CudaFunction,
    pub(super) spin_ns: CudaFunction,
    // Launched only by the `fault-injection` feature's test hook.
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    pub(super) fault: CudaFunction,
    pub(super) group_sum: CudaFunction,
    pub(super) clamp: CudaFunction,
    pub(super) gather_bytes: CudaFunction,
    pub(super) scatter_bytes: CudaFunction,
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
    pub(super) fn ptx_kernels(&self) -> Result<Arc<PtxKernels>> {
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
