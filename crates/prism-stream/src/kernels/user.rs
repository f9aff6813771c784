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
    /// (cudarc would panic). A binary (`Ptx::from_binary`) is refused
    /// (`Unsupported`): the driver reads an image without its length, so
    /// a short or malformed one makes it read past the end; load cubins
    /// and fatbins with [`load_cubin`](Self::load_cubin), which checks
    /// them first.
    pub fn load_module(&self, ptx: Ptx) -> Result<Module> {
        if is_binary(&ptx) {
            return Err(Error::Unsupported {
                what: "a binary image in load_module (Ptx::from_binary)",
                instead: "load a cubin or fatbin with Gpu::load_cubin(&bytes), which checks that the image is whole before the driver reads it",
            });
        }
        self.load_checked(ptx)
    }

    /// Loads a cubin (an ELF image from `nvcc -cubin` or `ptxas`) or a
    /// fatbin (`nvcc -fatbin`) into this GPU's context. The driver reads an
    /// image without being told its length, so prism first checks that
    /// everything the image's headers point at lies inside `image`: an
    /// empty, truncated or foreign image is refused (`ZeroLength`,
    /// `InvalidImage`) instead of being read past its end. The checks
    /// cover the headers' bounds, not the code: a whole image the driver
    /// cannot use is its error (`Driver`).
    pub fn load_cubin(&self, image: &[u8]) -> Result<Module> {
        check_image(image)?;
        self.load_checked(Ptx::from_binary(image.to_vec()))
    }

    fn load_checked(&self, ptx: Ptx) -> Result<Module> {
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

/// Whether cudarc holds `ptx` as a binary image (`Ptx::from_binary`): its
/// kind is private, so this reads the start of its `Debug` form.
fn is_binary(ptx: &Ptx) -> bool {
    use std::fmt::Write;
    /// Keeps the first bytes written, then refuses more (so a large image
    /// is not formatted whole).
    struct Head(String);
    impl Write for Head {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let room = 16usize.saturating_sub(self.0.len());
            self.0.push_str(&s[..s.len().min(room)]);
            if self.0.len() >= 16 {
                Err(std::fmt::Error)
            } else {
                Ok(())
            }
        }
    }
    let mut head = Head(String::new());
    let _ = write!(head, "{ptx:?}");
    head.0.starts_with("Ptx(Binary")
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const FATBIN_MAGIC: u32 = 0xBA55_ED50;

fn bad_image(reason: &'static str) -> Error {
    Error::InvalidImage { reason }
}

fn le16(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(u16::from_le_bytes(
        b.get(at..at + 2)?.try_into().ok()?,
    )))
}

fn le32(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(u32::from_le_bytes(
        b.get(at..at + 4)?.try_into().ok()?,
    )))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// `count` entries of `size` bytes from `offset` lie within `len` bytes.
fn table_fits(offset: u64, size: u64, count: u64, len: u64) -> bool {
    size.checked_mul(count)
        .and_then(|b| b.checked_add(offset))
        .is_some_and(|end| end <= len)
}

/// Checks that a cubin (64-bit little-endian ELF) or fatbin image holds
/// everything its headers point at.
pub(crate) fn check_image(image: &[u8]) -> Result<()> {
    if image.is_empty() {
        return Err(Error::ZeroLength {
            what: "cubin or fatbin image",
        });
    }
    let len = image.len() as u64;
    if image.starts_with(ELF_MAGIC) {
        if image.get(4) != Some(&2) || image.get(5) != Some(&1) {
            return Err(bad_image("an ELF image that is not 64-bit little-endian"));
        }
        let short = || bad_image("an ELF image shorter than its header");
        let (phoff, shoff) = (
            le64(image, 0x20).ok_or_else(short)?,
            le64(image, 0x28).ok_or_else(short)?,
        );
        let (phentsize, phnum) = (
            le16(image, 0x36).ok_or_else(short)?,
            le16(image, 0x38).ok_or_else(short)?,
        );
        let (shentsize, shnum) = (
            le16(image, 0x3A).ok_or_else(short)?,
            le16(image, 0x3C).ok_or_else(short)?,
        );
        if !table_fits(phoff, phentsize, phnum, len) {
            return Err(bad_image(
                "its program header table runs past the image's end",
            ));
        }
        if !table_fits(shoff, shentsize, shnum, len) {
            return Err(bad_image(
                "its section header table runs past the image's end",
            ));
        }
        if shnum > 0 && shentsize < 64 {
            return Err(bad_image("its section headers are shorter than ELF64's"));
        }
        for k in 0..shnum {
            // shoff + k * shentsize + 64 <= len: checked above.
            let at = usize::try_from(shoff + k * shentsize).map_err(|_| short())?;
            let kind = le32(image, at + 4).ok_or_else(short)?;
            let (offset, size) = (
                le64(image, at + 24).ok_or_else(short)?,
                le64(image, at + 32).ok_or_else(short)?,
            );
            // SHT_NOBITS (8) occupies no bytes of the file.
            if kind != 8 && !table_fits(offset, size, 1, len) {
                return Err(bad_image("a section runs past the image's end"));
            }
        }
        return Ok(());
    }
    if le32(image, 0) == Some(u64::from(FATBIN_MAGIC)) {
        let short = || bad_image("a fatbin shorter than its header");
        let header = le16(image, 6).ok_or_else(short)?;
        let body = le64(image, 8).ok_or_else(short)?;
        if header < 16 || !table_fits(header, body, 1, len) {
            return Err(bad_image(
                "a fatbin whose recorded size runs past the image's end",
            ));
        }
        return Ok(());
    }
    Err(bad_image(
        "neither a cubin (ELF) nor a fatbin; load PTX text with load_module(Ptx::from_src(...))",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal ELF64 image: header, one section header table of
    /// `sections` (type, offset, size) entries right after it, then `body`
    /// bytes.
    fn elf(sections: &[(u32, u64, u64)], body: usize) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(ELF_MAGIC);
        b[4] = 2;
        b[5] = 1;
        b[0x28..0x30].copy_from_slice(&64u64.to_le_bytes());
        b[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        b[0x3C..0x3E].copy_from_slice(&(sections.len() as u16).to_le_bytes());
        for &(kind, offset, size) in sections {
            let mut h = [0u8; 64];
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[24..32].copy_from_slice(&offset.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&h);
        }
        b.resize(b.len() + body, 0xAB);
        b
    }

    #[test]
    fn whole_images_pass_and_broken_ones_are_refused() {
        let good = elf(&[(1, 128, 16), (8, 0, 1 << 40)], 32);
        check_image(&good).unwrap();
        assert!(matches!(check_image(&[]), Err(Error::ZeroLength { .. })));
        for bad in [
            elf(&[(1, 128, 33)], 32),               // a section past the end
            elf(&[(1, u64::MAX, 2)], 32),           // an overflowing one
            good[..100].to_vec(),                   // the table cut short
            good[..10].to_vec(),                    // the header cut short
            b".version 8.0 .target sm_75".to_vec(), // PTX text, no NUL
        ] {
            assert!(
                matches!(check_image(&bad), Err(Error::InvalidImage { .. })),
                "{bad:?}"
            );
        }
        let mut fat = FATBIN_MAGIC.to_le_bytes().to_vec();
        fat.extend_from_slice(&[1, 0, 16, 0]);
        fat.extend_from_slice(&8u64.to_le_bytes());
        fat.extend_from_slice(&[0; 8]);
        check_image(&fat).unwrap();
        assert!(check_image(&fat[..20]).is_err());
    }

    #[test]
    fn binaries_are_told_from_text() {
        assert!(is_binary(&Ptx::from_binary(vec![0; 1 << 20])));
        assert!(!is_binary(&Ptx::from_src(".version 8.0")));
        assert!(!is_binary(&Ptx::from_file("kernels.ptx")));
    }

    proptest! {
        /// Every prefix of a whole image is refused (the driver would read
        /// past its end), and no input panics.
        #[test]
        fn no_prefix_of_an_image_passes(cut in 0usize..240, noise in proptest::collection::vec(any::<u8>(), 0..300)) {
            // The last section ends at the image's end (64 + 2 * 64 + 48).
            let good = elf(&[(1, 192, 16), (2, 208, 32)], 48);
            prop_assume!(cut < good.len());
            prop_assert!(check_image(&good[..cut]).is_err());
            let _ = check_image(&noise);
        }
    }
}
