//! The user's own kernels: [`Gpu::load_module`] loads a [`Module`],
//! [`Module::kernel`] finds a [`Kernel`] in it by name, and
//! [`Launch::kernel`] starts a [`KernelCall`] that names the buffers the
//! kernel uses, so its launch is ordered and fenced like prism's own.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{result, CudaFunction, DeviceRepr, LaunchConfig};
use cudarc::nvrtc::Ptx;

use super::launch::Launch;
use crate::context::Gpu;
use crate::error::DriverResultExt;
use crate::lane::Lane;
use crate::memory::{DeviceBuffer, Element, PinnedBuffer, Tracked};
use crate::order::Fence;
use crate::order::{Access, Used};
use crate::raw::ModuleHold;
use crate::{Error, Result};

impl<'l> Launch<'l> {
    /// Starts a launch of the user's own `kernel` (loaded with
    /// [`Gpu::load_module`]) on this scope's lane. Name every prism buffer
    /// the kernel touches as an argument: reads with `arg`/`arg_pinned`,
    /// writes with `arg_mut`/`arg_pinned_mut`; prism then orders the kernel
    /// after their earlier uses and fences them, as for its own kernels.
    /// Only [`KernelCall::launch`] is unsafe (the arguments must match the
    /// kernel).
    pub fn kernel<'a>(&'a mut self, kernel: &'a Kernel) -> KernelCall<'a> {
        let (lane, last) = self.parts();
        KernelCall {
            lane,
            last,
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
    ///
    /// PTX source or a path with a NUL byte is [`Error::InvalidName`]
    /// (cudarc would panic). A cubin (`Ptx::from_binary`) goes to the
    /// driver as cudarc passes it: it must be a whole, valid image.
    pub fn load_module(&self, ptx: Ptx) -> Result<Module> {
        self.check_usable()?;
        let ctx = self.cuda_context();
        let loaded =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.load_module(ptx)))
                .map_err(|payload| Error::InvalidName {
                    what: "PTX source or file path",
                    name: payload
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_else(|| "refused by cudarc".to_owned()),
                })?;
        let module = loaded.call("cuModuleLoadData")?;
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
