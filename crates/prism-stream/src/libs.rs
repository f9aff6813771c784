//! NVIDIA's libraries inside outside work: a cuBLAS handle ([`Blas`],
//! feature `cublas`) and a cuFFT plan ([`FftPlan`], feature `cufft`), made
//! on a lane without `unsafe` and lent to a [`Work`] block, which binds
//! them to the block's stream at every use. The libraries load at run time
//! (`libcublas.so`, `libcufft.so`, from the CUDA toolkit or the `nvidia-*`
//! wheels); a missing one is a cudarc panic at the first call, so check
//! with [`Blas::new`] / [`FftPlan`]'s constructors early.
//!
//! Only the binding is prism's: the calls themselves (`gemm`, `exec_c2c`)
//! are cudarc's, made on [`Work::view`] / [`Work::view_mut`] views inside
//! an [`Outside::run`](crate::Outside::run) block, whose `# Safety` covers
//! what prism cannot check (shapes and strides within the buffers).

#[cfg(any(feature = "cublas", feature = "cufft"))]
use std::sync::Arc;

#[cfg(any(feature = "cublas", feature = "cufft"))]
use crate::{context::Gpu, order::Lane, outside::Work, Error, Result};

/// A cuBLAS handle for outside work on this GPU (feature `cublas`).
#[cfg(feature = "cublas")]
#[derive(Debug)]
pub struct Blas {
    handle: cudarc::cublas::CudaBlas,
    gpu: Gpu,
}

#[cfg(feature = "cublas")]
impl Blas {
    /// A handle of `lane`'s context (bound to `lane`'s stream until a
    /// [`Work`] block rebinds it to its own).
    pub fn new(lane: &Lane) -> Result<Self> {
        lane.gpu().check_usable()?;
        lane.gpu().bind()?;
        let handle =
            cudarc::cublas::CudaBlas::new(Arc::clone(lane.core_stream())).map_err(|e| {
                Error::Library {
                    library: "cuBLAS",
                    message: format!("cublasCreate: {e:?}"),
                }
            })?;
        Ok(Self {
            handle,
            gpu: lane.gpu().clone(),
        })
    }
}

/// A cuFFT plan for outside work on this GPU (feature `cufft`).
#[cfg(feature = "cufft")]
pub struct FftPlan {
    plan: cudarc::cufft::CudaFft,
    gpu: Gpu,
}

#[cfg(feature = "cufft")]
impl std::fmt::Debug for FftPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FftPlan")
            .field("handle", &self.plan.handle())
            .field("device", &self.gpu.info().ordinal)
            .finish()
    }
}

#[cfg(feature = "cufft")]
impl FftPlan {
    /// A 1-D plan: `batch` transforms of `nx` points each, of type `ty`
    /// (`CUFFT_C2C`, `CUFFT_R2C`, ...), on `lane`'s context.
    pub fn plan_1d(
        lane: &Lane,
        nx: i32,
        ty: cudarc::cufft::sys::cufftType,
        batch: i32,
    ) -> Result<Self> {
        lane.gpu().check_usable()?;
        lane.gpu().bind()?;
        let plan = cudarc::cufft::CudaFft::plan_1d(nx, ty, batch, Arc::clone(lane.core_stream()))
            .map_err(|e| Error::Library {
            library: "cuFFT",
            message: format!("cufftPlan1d({nx}, {ty:?}, {batch}): {e:?}"),
        })?;
        Ok(Self {
            plan,
            gpu: lane.gpu().clone(),
        })
    }
}

#[cfg(any(feature = "cublas", feature = "cufft"))]
impl Work<'_> {
    /// `blas`, bound to this block's stream, for cudarc's cuBLAS calls on
    /// this block's views.
    #[cfg(feature = "cublas")]
    pub fn blas<'b>(&self, blas: &'b mut Blas) -> Result<&'b cudarc::cublas::CudaBlas> {
        self.same_context(&blas.gpu)?;
        // SAFETY: the handle is borrowed exclusively and bound to the
        // stream of this outside-work block, whose ordering covers what
        // is queued on it until the block's fence; every block rebinds it.
        unsafe { blas.handle.set_stream(Arc::clone(self.stream())) }.map_err(|e| {
            Error::Library {
                library: "cuBLAS",
                message: format!("cublasSetStream: {e:?}"),
            }
        })?;
        Ok(&blas.handle)
    }

    /// `plan`, bound to this block's stream, for cudarc's cuFFT calls on
    /// this block's views.
    #[cfg(feature = "cufft")]
    pub fn fft<'b>(&self, plan: &'b mut FftPlan) -> Result<&'b cudarc::cufft::CudaFft> {
        self.same_context(&plan.gpu)?;
        // SAFETY: as for `blas`: exclusive borrow, this block's stream.
        unsafe { plan.plan.set_stream(Arc::clone(self.stream())) }.map_err(|e| Error::Library {
            library: "cuFFT",
            message: format!("cufftSetStream: {e:?}"),
        })?;
        Ok(&plan.plan)
    }

    #[cfg(any(feature = "cublas", feature = "cufft"))]
    fn same_context(&self, gpu: &Gpu) -> Result<()> {
        if self.stream().context().cu_ctx() != gpu.cuda_context().cu_ctx() {
            return Err(Error::WrongContext {
                what: "library handle (made on another context)",
            });
        }
        Ok(())
    }
}
