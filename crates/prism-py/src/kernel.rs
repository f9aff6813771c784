//! `prism.Kernel`: a stage running the user's own CUDA kernel, given as
//! PTX text (from nvcc, NVRTC or CuPy's `RawKernel`). The kernel's signature
//! is fixed, so that prism can pass it a chunk and check the PTX against it
//! before anything runs:
//!
//! ```c
//! extern "C" __global__ void name(const float *in, float *out,
//!                                 unsigned long long n, float p0, float p1, ...);
//! ```
//!
//! `out[i]` for `i < n` from `in[0..n)`; one float parameter per value of
//! `params`. The module is loaded into a GPU's context on the stage's first
//! chunk there (a pipeline or a stage graph), and again for another context.

use prism_pipeline::{Stage, StageError};
use prism_stream::cudarc::driver::LaunchConfig;
use prism_stream::cudarc::nvrtc::Ptx;
use prism_stream::{DeviceBuffer, Gpu, Kernel as GpuKernel, Launch};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// A stage running your own CUDA kernel from PTX, on the GPU backend only.
///
/// Args:
///     ptx: the PTX text of a module holding the kernel.
///     name: the kernel's ``extern "C"`` name (its ``.entry`` in the PTX).
///     params: float32 values passed after ``n``, in order.
///     elementwise: ``out[i]`` depends on ``in[i]`` alone (lets
///         ``run_stream`` batch small items into one chunk). Default false:
///         say true only for such kernels (a stencil or a scan batched
///         with other items would read its neighbours' data).
///     block: threads per block (default 256); the grid covers ``n``.
///
/// The kernel must be ``extern "C" __global__ void name(const float *in,
/// float *out, unsigned long long n, float p0, ...)``, read ``in[0..n)``
/// and write ``out[0..n)`` only (guard with ``if (i < n)``), and use no
/// dynamic shared memory (it is launched with 0 bytes). PTX from nvcc,
/// NVRTC or CuPy's ``RawKernel`` fits; Triton and Numba kernels take other
/// parameters. prism checks the PTX's one ``.entry`` of that name for that
/// parameter list (two pointers, ``n``, one float per ``params`` value, no
/// byte arrays; comments ignored) and raises ``ValueError`` otherwise;
/// what the kernel does with them it cannot check: a kernel writing past
/// ``n`` corrupts other memory, as in CUDA C++.
///
/// Raises:
///     ValueError: no ``.entry name`` in the PTX, or one whose parameters
///         differ from the signature above; a NUL byte; ``block`` not in
///         1..=1024.
#[pyclass(module = "prism._prism", frozen)]
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    ptx: String,
    /// The kernel's name.
    #[pyo3(get)]
    name: String,
    /// The float32 parameters after ``n``.
    #[pyo3(get)]
    params: Vec<f32>,
    /// Whether ``out[i]`` depends on ``in[i]`` alone.
    #[pyo3(get)]
    elementwise: bool,
    /// Threads per block.
    #[pyo3(get)]
    block: u32,
}

#[pymethods]
impl Kernel {
    #[new]
    #[pyo3(signature = (ptx, name, params = Vec::new(), *, elementwise = false, block = 256))]
    fn new(
        ptx: String,
        name: String,
        params: Vec<f32>,
        elementwise: bool,
        block: u32,
    ) -> PyResult<Self> {
        if ptx.contains('\0') || name.contains('\0') {
            return Err(PyValueError::new_err(
                "the PTX and the kernel name must not contain a NUL byte",
            ));
        }
        if !(1..=1024).contains(&block) {
            return Err(PyValueError::new_err(format!(
                "block must be 1 to 1024 threads, not {block}"
            )));
        }
        check_signature(&ptx, &name, params.len()).map_err(PyValueError::new_err)?;
        Ok(Self {
            ptx,
            name,
            params,
            elementwise,
            block,
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Kernel(name={:?}, params={:?}, elementwise={}, block={})",
            self.name, self.params, self.elementwise, self.block
        )
    }
}

/// The PTX types of a parameter: a pointer or `n` (64-bit), or a float.
fn is_64(ty: &str) -> bool {
    matches!(ty, ".u64" | ".b64" | ".s64")
}
fn is_f32(ty: &str) -> bool {
    matches!(ty, ".f32" | ".b32")
}

/// `ptx` without its comments (`//` to the end of the line, `/* */`),
/// each replaced by a space.
fn strip_comments(ptx: &str) -> String {
    let mut out = String::with_capacity(ptx.len());
    let mut rest = ptx;
    loop {
        let line = rest.find("//");
        let block = rest.find("/*");
        match (line, block) {
            (None, None) => {
                out.push_str(rest);
                return out;
            }
            (Some(l), b) if b.is_none_or(|b| l < b) => {
                out.push_str(&rest[..l]);
                out.push(' ');
                rest = rest[l..].find('\n').map_or("", |e| &rest[l + e..]);
            }
            (_, Some(b)) => {
                out.push_str(&rest[..b]);
                out.push(' ');
                // An unterminated comment runs to the end.
                rest = rest[b + 2..]
                    .find("*/")
                    .map_or("", |e| &rest[b + 2 + e + 2..]);
            }
            (Some(_), None) => unreachable!("covered by the arm above"),
        }
    }
}

/// Checks that `ptx` declares exactly one `.entry name(...)` taking two
/// 64-bit pointers, a 64-bit `n` and `floats` 32-bit floats, each a plain
/// scalar (no `[N]` byte array); says what differs otherwise. Comments are
/// ignored, so text in them can neither add nor hide an entry.
fn check_signature(ptx: &str, name: &str, floats: usize) -> Result<(), String> {
    let code = strip_comments(ptx);
    let mut entries = Vec::new();
    let mut found: Vec<Option<String>> = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find(".entry") {
        let after = &rest[at + ".entry".len()..];
        rest = after;
        if !after.starts_with(char::is_whitespace) {
            continue; // `.entry` inside a longer token
        }
        let head = after.trim_start();
        let end = head
            .find(|c: char| c == '(' || c == '{' || c.is_whitespace())
            .unwrap_or(head.len());
        let entry = &head[..end];
        entries.push(entry.to_owned());
        if entry == name {
            // The list is the parentheses before the body's `{`.
            let body = head.find('{').unwrap_or(head.len());
            let decl = &head[end..body];
            found.push(match (decl.find('('), decl.rfind(')')) {
                (Some(o), Some(c)) if o < c => Some(decl[o + 1..c].to_owned()),
                (None, None) => Some(String::new()),
                _ => None,
            });
        }
    }
    let list = match found.as_slice() {
        [] => {
            return Err(format!(
                "the PTX has no kernel named {name:?} (its .entry names: {entries:?})"
            ))
        }
        [Some(list)] => list,
        [None] => {
            return Err(format!(
                "the PTX's .entry {name:?} has no readable parameter list"
            ))
        }
        _ => return Err(format!("the PTX declares .entry {name:?} more than once")),
    };
    let params: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if let Some(p) = params.iter().find(|p| p.contains('[')) {
        return Err(format!(
            "kernel {name:?} takes a parameter passed as bytes ({p:?}); prism passes only pointers, n and floats"
        ));
    }
    let types: Vec<&str> = params
        .iter()
        .map(|p| {
            p.split_whitespace()
                .find(|t| {
                    t.starts_with('.')
                        && !matches!(
                            *t,
                            ".param" | ".ptr" | ".global" | ".const" | ".local" | ".shared"
                        )
                        && !t.starts_with(".align")
                })
                .unwrap_or("?")
        })
        .collect();
    let want = 3 + floats;
    let fits = types.len() == want
        && types[..3].iter().all(|t| is_64(t))
        && types[3..].iter().all(|t| is_f32(t));
    if fits {
        Ok(())
    } else {
        Err(format!(
            "kernel {name:?} takes parameters of PTX types {types:?}; prism calls it as (const float *in, float *out, unsigned long long n{}), that is {want} parameters [.u64, .u64, .u64{}]",
            ", float".repeat(floats),
            ", .f32".repeat(floats),
        ))
    }
}

/// The stage prism runs: the spec and the kernel, loaded per context.
#[derive(Debug)]
pub(crate) struct KernelStage {
    spec: Kernel,
    loaded: Option<(Gpu, GpuKernel)>,
}

impl Kernel {
    pub(crate) fn stage(&self) -> KernelStage {
        KernelStage {
            spec: self.clone(),
            loaded: None,
        }
    }
}

impl KernelStage {
    fn kernel(&mut self, gpu: &Gpu) -> prism_stream::Result<&GpuKernel> {
        if !self
            .loaded
            .as_ref()
            .is_some_and(|(g, _)| g.same_context(gpu))
        {
            let k = gpu
                .load_module(Ptx::from_src(self.spec.ptx.clone()))?
                .kernel(&self.spec.name)?;
            self.loaded = Some((gpu.clone(), k));
        }
        match &self.loaded {
            Some((_, k)) => Ok(k),
            None => Err(prism_stream::Error::Unsupported {
                what: "a kernel that did not load",
                instead: "nothing",
            }),
        }
    }
}

impl Stage<f32> for KernelStage {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn elementwise(&self) -> bool {
        self.spec.elementwise
    }

    /// The same launch for every chunk of a length: graphs may replay it.
    fn capturable(&self) -> bool {
        true
    }

    fn has_gpu(&self) -> bool {
        true
    }

    fn gpu(
        &mut self,
        launch: &mut Launch<'_>,
        input: &DeviceBuffer<f32>,
        output: &mut DeviceBuffer<f32>,
        len: usize,
    ) -> Result<(), StageError> {
        let n = u32::try_from(len).map_err(|_| {
            StageError::from(format!(
                "a chunk of {len} elements is too long for one launch"
            ))
        })?;
        if input.len() < len || output.len() < len {
            return Err("a chunk longer than its buffers".into());
        }
        let (block, params) = (self.spec.block, self.spec.params.clone());
        let gpu = launch.gpu().clone();
        let kernel = self.kernel(&gpu)?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(block), 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut call = launch
            .kernel(kernel)
            .arg(input)
            .arg_mut(output)
            .value(len as u64);
        for p in params {
            call = call.value(p);
        }
        #[allow(unsafe_code)] // the user's kernel (Cargo.toml's lint note)
        let launched = {
            // SAFETY: the arguments match the signature `prism.Kernel`
            // requires and checked in the PTX (two pointers, n, one f32 per
            // parameter); both buffers hold at least `len` elements (checked
            // above) and the grid covers `len`. That the kernel reads and
            // writes only `[0, len)` is the user's contract, documented on
            // the class, as for any CUDA kernel.
            unsafe { call.launch(cfg) }
        };
        launched?;
        Ok(())
    }
}
