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
use crate::{
    context::Gpu,
    lane::Lane,
    order::{lock, Access, Extent, UseCell, Used},
    Error, Result,
};

/// A cuBLAS handle for outside work on this GPU (feature `cublas`). Name
/// it in a block ([`Outside::blas`](crate::Outside::blas)) and take it
/// there with [`Work::blas`]: like a buffer it writes, the handle's
/// workspace is ordered between blocks (two blocks on different lanes do
/// not use it at once), and the handle is destroyed only after its last
/// block's work completed.
#[cfg(feature = "cublas")]
#[derive(Debug)]
pub struct Blas {
    /// `None` only once leaked in `Drop` (a wait for its work failed).
    handle: Option<cudarc::cublas::CudaBlas>,
    gpu: Gpu,
    uses: UseCell,
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
            handle: Some(handle),
            gpu: lane.gpu().clone(),
            uses: UseCell::default(),
        })
    }

    /// The handle as an op's use (written: its workspace, whole) and the
    /// handle itself, for an outside-work block.
    pub(crate) fn split(&mut self) -> (Used<'_>, Lent<'_, cudarc::cublas::CudaBlas>) {
        let Self { handle, gpu, uses } = self;
        let (gpu, uses): (&Gpu, &UseCell) = (gpu, uses);
        (
            handle_use(uses, gpu, "cuBLAS handle (its workspace)"),
            Lent { handle, gpu },
        )
    }
}

/// A library handle lent to one outside-work block (the part of a [`Blas`]
/// or [`FftPlan`] the block binds to its stream).
#[cfg(any(feature = "cublas", feature = "cufft"))]
pub(crate) struct Lent<'a, H> {
    handle: &'a mut Option<H>,
    gpu: &'a Gpu,
}

#[cfg(any(feature = "cublas", feature = "cufft"))]
impl<H> std::fmt::Debug for Lent<'_, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent")
            .field("device", &self.gpu.info().ordinal)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "cublas")]
impl<'a> Lent<'a, cudarc::cublas::CudaBlas> {
    /// Binds the handle to `stream` (the block's) and gives it for the block.
    pub(crate) fn bind(
        self,
        stream: &Arc<cudarc::driver::CudaStream>,
    ) -> Result<&'a cudarc::cublas::CudaBlas> {
        same_context(stream, self.gpu)?;
        let handle = self.handle.as_mut().ok_or(Error::Library {
            library: "cuBLAS",
            message: "the handle was released".into(),
        })?;
        // SAFETY: the handle is borrowed exclusively and bound to the
        // stream of the outside-work block it was named in, which orders it
        // after the handle's earlier blocks and fences it; every block
        // rebinds it.
        unsafe { handle.set_stream(Arc::clone(stream)) }.map_err(|e| Error::Library {
            library: "cuBLAS",
            message: format!("cublasSetStream: {e:?}"),
        })?;
        Ok(handle)
    }
}

#[cfg(feature = "cublas")]
impl Drop for Blas {
    fn drop(&mut self) {
        // The workspace may still be in use: wait for the handle's blocks
        // first; if that cannot be known, leak the handle.
        if !lock(&self.uses).release(self.gpu.key(), "cuBLAS handle") {
            std::mem::forget(self.handle.take());
        }
    }
}

/// A cuFFT plan for outside work on this GPU (feature `cufft`). Name it in
/// a block ([`Outside::fft`](crate::Outside::fft)) and take it there with
/// [`Work::fft`]: its work area is ordered between blocks like a buffer
/// the block writes, and the plan is destroyed only after its last
/// block's work completed.
#[cfg(feature = "cufft")]
pub struct FftPlan {
    /// `None` only once leaked in `Drop`.
    plan: Option<cudarc::cufft::CudaFft>,
    gpu: Gpu,
    uses: UseCell,
}

#[cfg(feature = "cufft")]
impl std::fmt::Debug for FftPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FftPlan")
            .field("handle", &self.plan.as_ref().map(|p| p.handle()))
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
            plan: Some(plan),
            gpu: lane.gpu().clone(),
            uses: UseCell::default(),
        })
    }

    /// The plan as an op's use (written: its work area, whole) and the
    /// plan itself, for an outside-work block.
    pub(crate) fn split(&mut self) -> (Used<'_>, Lent<'_, cudarc::cufft::CudaFft>) {
        let Self { plan, gpu, uses } = self;
        let (gpu, uses): (&Gpu, &UseCell) = (gpu, uses);
        (
            handle_use(uses, gpu, "cuFFT plan (its work area)"),
            Lent { handle: plan, gpu },
        )
    }
}

#[cfg(feature = "cufft")]
impl<'a> Lent<'a, cudarc::cufft::CudaFft> {
    /// Binds the plan to `stream` (the block's) and gives it for the block.
    pub(crate) fn bind(
        self,
        stream: &Arc<cudarc::driver::CudaStream>,
    ) -> Result<&'a cudarc::cufft::CudaFft> {
        same_context(stream, self.gpu)?;
        let plan = self.handle.as_mut().ok_or(Error::Library {
            library: "cuFFT",
            message: "the plan was released".into(),
        })?;
        // SAFETY: as for `Blas::bind`: exclusive borrow, the stream of the
        // block that ordered it.
        unsafe { plan.set_stream(Arc::clone(stream)) }.map_err(|e| Error::Library {
            library: "cuFFT",
            message: format!("cufftSetStream: {e:?}"),
        })?;
        Ok(plan)
    }
}

#[cfg(feature = "cufft")]
impl Drop for FftPlan {
    fn drop(&mut self) {
        if !lock(&self.uses).release(self.gpu.key(), "cuFFT plan") {
            std::mem::forget(self.plan.take());
        }
    }
}

/// A library handle as an op's use: written whole (its scratch memory),
/// never captured into a graph (the graph would outlive its workspace).
#[cfg(any(feature = "cublas", feature = "cufft"))]
fn handle_use<'a>(cell: &'a UseCell, gpu: &'a Gpu, what: &'static str) -> Used<'a> {
    Used {
        cell,
        gpu,
        access: Access::Write,
        extent: Extent::whole(1),
        portable: false,
        what,
        keep: None,
    }
}

#[cfg(any(feature = "cublas", feature = "cufft"))]
fn same_context(stream: &Arc<cudarc::driver::CudaStream>, gpu: &Gpu) -> Result<()> {
    if stream.context().cu_ctx() != gpu.cuda_context().cu_ctx() {
        return Err(Error::WrongContext {
            what: "library handle (made on another context)",
        });
    }
    Ok(())
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
