//! NVIDIA's libraries inside outside work: a cuBLAS handle ([`Blas`],
//! feature `cublas`) and a cuFFT plan ([`FftPlan`], feature `cufft`), made
//! on a lane without `unsafe` and lent to a [`Work`] block, which binds
//! them to the block's stream at every use. The libraries load at run time
//! (`libcublas.so`, `libcufft.so`, from the CUDA toolkit or the `nvidia-*`
//! wheels, found through the loader's path, e.g. `LD_LIBRARY_PATH`).
//! [`Blas::available`] / [`FftPlan::available`] say whether one loads, and
//! [`Blas::new`] / [`FftPlan::plan_1d`] report a missing one as
//! [`Error::Library`] (cudarc itself would panic at its first call).
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
    /// Can libcublas be loaded? Never panics, and calls no cuBLAS function.
    pub fn available() -> bool {
        // SAFETY: is_culib_present only tries to dlopen libcublas (under the
        // names cudarc would load) and reports success; it calls nothing in it.
        unsafe { cudarc::cublas::sys::is_culib_present() }
    }

    /// A handle of `lane`'s context (bound to `lane`'s stream until a
    /// [`Work`] block rebinds it to its own). [`Error::Library`] when
    /// libcublas cannot be loaded ([`available`](Self::available)).
    pub fn new(lane: &Lane) -> Result<Self> {
        if !Self::available() {
            return Err(not_found("cuBLAS", "cublas"));
        }
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
    /// Can libcufft be loaded? Never panics, and calls no cuFFT function.
    pub fn available() -> bool {
        // SAFETY: is_culib_present only tries to dlopen libcufft (under the
        // names cudarc would load) and reports success; it calls nothing in it.
        unsafe { cudarc::cufft::sys::is_culib_present() }
    }

    /// A 1-D plan: `batch` transforms of `nx` points each, of type `ty`
    /// (`CUFFT_C2C`, `CUFFT_R2C`, ...), on `lane`'s context.
    /// [`Error::Library`] when libcufft cannot be loaded
    /// ([`available`](Self::available)).
    pub fn plan_1d(
        lane: &Lane,
        nx: i32,
        ty: cudarc::cufft::sys::cufftType,
        batch: i32,
    ) -> Result<Self> {
        if !Self::available() {
            return Err(not_found("cuFFT", "cufft"));
        }
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

/// The error for a library that cannot be loaded, with the file names
/// cudarc looks for.
#[cfg(any(feature = "cublas", feature = "cufft"))]
fn not_found(library: &'static str, name: &str) -> Error {
    use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
    let plain = format!("{DLL_PREFIX}{name}{DLL_SUFFIX}");
    let names: Vec<String> = cudarc::get_lib_name_candidates(name)
        .into_iter()
        .filter(|n| n.starts_with(&plain))
        .collect();
    Error::Library {
        library,
        message: format!(
            "{plain} could not be loaded (looked for {} and cudarc's other names): install \
             the CUDA toolkit's library or the matching nvidia-* wheel, and put its folder \
             on the loader's path (e.g. LD_LIBRARY_PATH=/usr/local/cuda/lib64)",
            names.join(", ")
        ),
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

#[cfg(all(test, any(feature = "cublas", feature = "cufft")))]
mod tests {
    use super::*;

    /// Without the library (as on CI) the checks answer false instead of
    /// cudarc's panic; with it, true. Either way they return.
    #[test]
    fn library_checks_never_panic() {
        #[cfg(feature = "cublas")]
        let _ = Blas::available();
        #[cfg(feature = "cufft")]
        let _ = FftPlan::available();
    }

    #[test]
    fn a_missing_library_is_named_with_where_to_put_it() {
        let msg = not_found("cuFFT", "cufft").to_string();
        assert!(msg.starts_with("cuFFT failed: "), "{msg}");
        assert!(
            msg.contains("cufft") && msg.contains("LD_LIBRARY_PATH"),
            "{msg}"
        );
    }
}
