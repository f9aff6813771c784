//! Where prism's own kernels come from ([`KernelSource`]):
//! [`Gpu::kernel_source`], [`Gpu::set_kernel_source`], and the PTX kernels
//! of a handle (loaded through the driver layer's `KernelState`).

use std::sync::Arc;

use prism_cuda_sys as sys;

use crate::context::Gpu;
use crate::raw::PtxKernels;
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

impl Gpu {
    /// Where prism's own kernels come from on this handle.
    pub fn kernel_source(&self) -> KernelSource {
        if self.0.kernels.uses_ptx() {
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
        self.0.kernels.set_uses_ptx(source == KernelSource::Ptx);
        Ok(())
    }

    /// The PTX kernels of this handle, loaded on first use (a failed load,
    /// out of memory say, is reported and tried again at the next use).
    pub(super) fn ptx_kernels(&self) -> Result<Arc<PtxKernels>> {
        if let Some(k) = self.0.kernels.loaded() {
            return Ok(k);
        }
        self.check_usable()?;
        self.0
            .kernels
            .ptx(self.cuda_context())
            .map_err(|source| Error::PtxLoad { source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
