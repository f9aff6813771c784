//! `prism.Pipeline`: a `PipelineStageManager<f32>` behind a mutex.

use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use numpy::{PyArray1, PyArrayMethods};
use prism_pipeline::{Backend, BackendKind, PipelineConfig, StageGraph};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::convert::{contiguous_f32, out_f32};
use crate::device::{from_cuda_tensor, DeviceArray, Held};
use crate::dlpack::{self, DL_CUDA, DL_CUDA_MANAGED};
use crate::errors::{self, pipeline_error};
use crate::graph::Graph;
use crate::register::Registered;
use crate::stages::Builtin;
use crate::stream::StreamIter;
use crate::{Manager, Shared};

/// Stages in an order, and the machinery to stream float32 data through
/// them in chunks: on a GPU (uploads, stages and downloads of different
/// chunks overlapped) or, on the host backend, on CPU threads.
///
/// Args:
///     backend: ``"auto"`` (GPU 0 if a driver and a device are present,
///         else the host), ``"gpu"`` (GPU 0; ``NoDeviceError`` /
///         ``DriverNotFoundError`` without one) or ``"host"``.
///     chunk_bytes: bytes of input per chunk (default 16 MiB; a multiple
///         of 4, at least 4).
///     slots: chunks in flight at once, 2 to 8 (default 3).
///     host_threads: CPU threads of the pipeline (default: every core):
///         staging copies on the GPU, the stages on the host backend.
///     timing: time every step for ``stats()`` (default on).
///     trace: keep the last run's spans for ``trace()`` (GPU backend).
///     adaptive: let each GPU run of elementwise stages pick its own chunk
///         size and ring depth (16 MiB chunks, or an eighth of the input
///         down to 4 MiB, and 4 slots), whatever ``chunk_bytes`` and
///         ``slots`` say; ``stats()`` shows the choice (default off).
///     graphs: run each chunk's stages as a CUDA graph, captured once per
///         slot and chunk length and replayed (less host time per chunk;
///         GPU backend, whole runs; default off).
///
/// Raises:
///     ConfigError: a value out of range (also ``ValueError``).
///     NoDeviceError: ``backend="gpu"`` without a usable GPU.
///
/// A pipeline runs one call at a time: a call made while another thread
/// runs it, or while a ``run_stream`` iterator is alive and not exhausted
/// or closed, raises ``BusyError``.
#[pyclass(module = "prism._prism", frozen)]
#[derive(Debug)]
pub(crate) struct Pipeline {
    shared: Shared,
    backend: &'static str,
    device: String,
    config: PipelineConfig,
    /// The GPU of a GPU pipeline (for `register`, which needs no run).
    gpu: Option<prism_stream::Gpu>,
    /// The lane that allocates and uploads device arrays.
    lane: Mutex<Option<prism_stream::Lane>>,
}

impl Pipeline {
    /// The manager's slot, or `BusyError` while another thread runs it.
    fn lock(&self, py: Python<'_>) -> PyResult<MutexGuard<'_, Option<Manager>>> {
        match self.shared.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::WouldBlock) => Err(errors::plain(
                py,
                "BusyError",
                "the pipeline is running in another thread",
            )),
            Err(TryLockError::Poisoned(_)) => Err(errors::plain(
                py,
                "PrismError",
                "the pipeline is unusable: an earlier call panicked inside prism",
            )),
        }
    }

    /// Runs `f` on the manager, or `BusyError` when it is in use.
    fn with<R>(&self, py: Python<'_>, f: impl FnOnce(&mut Manager) -> R) -> PyResult<R> {
        match self.lock(py)?.as_mut() {
            Some(pm) => Ok(f(pm)),
            None => Err(stream_busy(py)),
        }
    }
}

impl Pipeline {
    /// The GPU, or `UnsupportedError` on the host backend.
    fn gpu_for(&self, py: Python<'_>, what: &str) -> PyResult<&prism_stream::Gpu> {
        self.gpu.as_ref().ok_or_else(|| {
            errors::plain(
                py,
                "UnsupportedError",
                format!("{what} needs a GPU pipeline (backend=\"gpu\"); this one runs on the host"),
            )
        })
    }

    /// Runs `f` with the pipeline's device lane (made on first use).
    fn with_lane<R>(
        &self,
        gpu: &prism_stream::Gpu,
        f: impl FnOnce(&mut prism_stream::Lane) -> prism_stream::Result<R>,
    ) -> prism_stream::Result<R> {
        let mut g = self.lane.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(prism_stream::Lane::new(gpu)?);
        }
        match g.as_mut() {
            Some(lane) => f(lane),
            None => Err(prism_stream::Error::Unsupported {
                what: "a device lane",
                instead: "nothing",
            }),
        }
    }

    /// `run` over data on the GPU: a new `DeviceArray` from `run_device`.
    fn run_on_device<'py>(
        &self,
        py: Python<'py>,
        input: &DeviceArray,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if out.is_some() {
            return Err(PyTypeError::new_err(
                "out is for host arrays: a run over device data returns a new DeviceArray",
            ));
        }
        let gpu = self.gpu_for(py, "a run over device data")?.clone();
        if !gpu.same_context(input.gpu()) {
            return Err(PyValueError::new_err(
                "the device array lives on another GPU than the pipeline's",
            ));
        }
        let foreign = input.is_foreign();
        let held = input.lock(py)?;
        let result = match &*held {
            Held::Empty => Held::Empty,
            Held::Buffer(buf) => self
                .with(py, |pm| {
                    py.detach(|| -> prism_pipeline::Result<Held> {
                        let total = pm.total_output_len(buf.len());
                        if total == 0 {
                            return Ok(Held::Empty);
                        }
                        let mut out = self.with_lane(&gpu, |lane| {
                            prism_stream::DeviceBuffer::zeroed(lane, total)
                        })?;
                        if !foreign {
                            pm.run_device(buf, &mut out)?;
                            return Ok(Held::Buffer(out));
                        }
                        // Another library's tensor: prism reads after the
                        // owner's work on the legacy stream (PyTorch's and
                        // CuPy's default) so far, and the owner's next work
                        // there waits for prism's reads, even after a run
                        // that failed part way.
                        let legacy = prism_stream::ForeignStream::LEGACY;
                        buf.order_after_stream(legacy)?;
                        let run = pm.run_device(buf, &mut out);
                        let after = buf.order_stream_after(legacy);
                        run?;
                        after?;
                        Ok(Held::Buffer(out))
                    })
                })?
                .map_err(|e| pipeline_error(py, &e))?,
            Held::Exported(_) => unreachable!("`lock` refuses exported arrays"),
        };
        drop(held);
        Ok(Bound::new(py, DeviceArray::new(&gpu, result))?.into_any())
    }
}

/// `BusyError` for a pipeline whose manager a `run_stream` holds.
fn stream_busy(py: Python<'_>) -> PyErr {
    errors::plain(
        py,
        "BusyError",
        "a run_stream iterator is using the pipeline: exhaust it or call its close() first",
    )
}

#[pymethods]
impl Pipeline {
    #[new]
    #[pyo3(signature = (backend = "auto", *, chunk_bytes = None, slots = None, host_threads = None, timing = None, trace = false, adaptive = false, graphs = false))]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments
    fn new(
        py: Python<'_>,
        backend: &str,
        chunk_bytes: Option<i128>,
        slots: Option<i128>,
        host_threads: Option<i128>,
        timing: Option<bool>,
        trace: bool,
        adaptive: bool,
        graphs: bool,
    ) -> PyResult<Self> {
        // Sizes as Python ints of any sign: a negative or huge one is a
        // ConfigError naming it, as a zero is (not Python's OverflowError).
        let size = |name: &str, v: Option<i128>, default: usize| -> PyResult<usize> {
            match v {
                None => Ok(default),
                Some(n) => usize::try_from(n).map_err(|_| {
                    errors::plain(
                        py,
                        "ConfigError",
                        format!(
                            "{name} must be a non-negative size that fits this machine, not {n}"
                        ),
                    )
                }),
            }
        };
        let kind = match backend {
            "auto" => Backend::Auto,
            "gpu" => Backend::Gpu,
            "host" => Backend::Host,
            other => {
                return Err(errors::plain(
                    py,
                    "ConfigError",
                    format!("backend must be \"auto\", \"gpu\" or \"host\", not {other:?}"),
                ))
            }
        };
        let defaults = PipelineConfig::default();
        let config = PipelineConfig {
            chunk_bytes: size("chunk_bytes", chunk_bytes, defaults.chunk_bytes)?,
            slots: size("slots", slots, defaults.slots)?,
            host_threads: size("host_threads", host_threads, defaults.host_threads)?,
            timing: timing.unwrap_or(defaults.timing),
            trace,
            adaptive,
            graphs,
            ..defaults
        };
        let cfg = config.clone();
        // Opening a GPU takes a while: without the GIL.
        let pm = py
            .detach(move || Manager::new(kind, cfg))
            .map_err(|e| pipeline_error(py, &e))?;
        let backend = match pm.backend() {
            BackendKind::Gpu => "gpu",
            BackendKind::Host => "host",
        };
        let device = pm.get_stats().device.clone();
        let gpu = pm.gpu().cloned();
        Ok(Self {
            shared: Arc::new(Mutex::new(Some(pm))),
            backend,
            device,
            config,
            gpu,
            lane: Mutex::new(None),
        })
    }

    /// The backend the pipeline runs on: ``"gpu"`` or ``"host"`` (what
    /// ``"auto"`` chose).
    #[getter]
    fn backend(&self) -> &'static str {
        self.backend
    }

    /// The GPU's name (``""`` on the host backend).
    #[getter]
    fn device(&self) -> &str {
        &self.device
    }

    /// Bytes of input per chunk.
    #[getter]
    fn chunk_bytes(&self) -> usize {
        self.config.chunk_bytes
    }

    /// Chunks in flight at once.
    #[getter]
    fn slots(&self) -> usize {
        self.config.slots
    }

    /// CPU threads of the pipeline.
    #[getter]
    fn host_threads(&self) -> usize {
        self.config.host_threads
    }

    /// Whether every step is timed for ``stats()``.
    #[getter]
    fn timing(&self) -> bool {
        self.config.timing
    }

    /// Whether each GPU run picks its own chunk size and ring depth.
    #[getter]
    fn adaptive(&self) -> bool {
        self.config.adaptive
    }

    /// Whether each chunk's stages run as a replayed CUDA graph.
    #[getter]
    fn graphs(&self) -> bool {
        self.config.graphs
    }

    /// Adds a stage (``Fma``, ``Clamp`` or ``GroupSum``), run after the
    /// earlier ones unless ``set_order`` says otherwise; returns its index.
    fn add_stage(&self, py: Python<'_>, stage: &Bound<'_, PyAny>) -> PyResult<usize> {
        let stage = Builtin::extract(stage, "add_stage")?;
        self.with(py, |pm| stage.add_to(pm))
    }

    /// Runs only the stages at ``order`` (indices from ``add_stage``), in
    /// that order. An empty order raises ``NoStagesError``; an unknown or
    /// repeated index ``ConfigError``.
    fn set_order(&self, py: Python<'_>, order: Vec<usize>) -> PyResult<()> {
        self.with(py, |pm| pm.set_order(&order))?
            .map_err(|e| pipeline_error(py, &e))
    }

    /// Page-locks ``array`` in place for this pipeline's GPU, without a copy
    /// (``cuMemHostRegister``): a run from one registered array into
    /// another copies straight between them and the GPU at the link's
    /// speed, with no staging. Registering costs host time (about 55 ms per
    /// GiB, a third of that again to unregister), so it pays for arrays used
    /// in several runs; for one run, pass the plain array.
    ///
    /// Args:
    ///     array: a 1-D C-contiguous aligned writeable float32 NumPy array
    ///         (a CPU tensor's ``.numpy()`` view will do), not empty, sharing
    ///         no page with an array registered already.
    ///
    /// Returns:
    ///     A ``Registered`` (a context manager: ``with p.register(x) as
    ///     xr:``); on the host backend it pins nothing and runs as the
    ///     array.
    ///
    /// Raises:
    ///     TypeError, ValueError: not such an array (empty, read-only,
    ///         misaligned, strided), or one sharing memory pages with an
    ///         array registered already.
    ///     OutOfMemoryError: the pages cannot be locked.
    ///
    /// The array must keep its memory while registered: do not resize it
    /// (or the tensor it is a view of) until ``close()``.
    fn register(&self, py: Python<'_>, array: &Bound<'_, PyAny>) -> PyResult<Registered> {
        Registered::new(py, array, self.gpu.as_ref())
    }

    /// Uploads ``array`` (anything ``run`` takes as input) to the
    /// pipeline's GPU as a ``DeviceArray``.
    ///
    /// Raises:
    ///     UnsupportedError: a host pipeline.
    ///     OutOfMemoryError: no room on the GPU.
    fn to_device(&self, py: Python<'_>, array: &Bound<'_, PyAny>) -> PyResult<DeviceArray> {
        let gpu = self.gpu_for(py, "to_device")?.clone();
        let a = contiguous_f32(py, array, "array")?;
        let ro = a
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("array cannot be read: {e}")))?;
        let src = ro
            .as_slice()
            .map_err(|e| PyValueError::new_err(format!("array: {e}")))?;
        if src.is_empty() {
            return Ok(DeviceArray::new(&gpu, Held::Empty));
        }
        let buf = py
            .detach(|| {
                self.with_lane(&gpu, |lane| {
                    prism_stream::DeviceBuffer::from_slice(lane, src)
                })
            })
            .map_err(|e| {
                let msg = e.to_string();
                errors::stream_error(py, &e, msg)
            })?;
        Ok(DeviceArray::new(&gpu, Held::Buffer(buf)))
    }

    /// Elements a run over ``n`` input elements produces (chunk by chunk:
    /// a ``GroupSum`` never sums across chunks).
    fn output_len(&self, py: Python<'_>, n: usize) -> PyResult<usize> {
        self.with(py, |pm| pm.total_output_len(n))
    }

    /// Streams ``input`` through the stages and returns the output.
    ///
    /// Args:
    ///     input: a 1-D C-contiguous ``numpy.float32`` array, read in place.
    ///         Anything else that ``numpy.ascontiguousarray(x,
    ///         dtype=numpy.float32)`` turns into a 1-D array (a list,
    ///         float64, a strided view) is accepted too, but is copied
    ///         first, as is a float32 array that is not aligned (one over a
    ///         byte buffer at an odd offset).
    ///     out: where to write the output, in place of a new array: a 1-D
    ///         C-contiguous writeable float32 array of exactly
    ///         ``output_len(len(input))`` elements, not overlapping ``input``.
    ///
    /// Returns:
    ///     ``out``, or a new float32 array of ``output_len(len(input))``
    ///     elements. An empty input gives an empty output (a run of no chunk).
    ///
    /// The GIL is released while prism works; ``input`` and ``out`` stay
    /// borrowed (through rust-numpy's borrow checking) for the whole call.
    /// As with NumPy's own GIL-free loops, another Python thread must not
    /// write into ``input`` or touch ``out`` meanwhile.
    ///
    /// Raises:
    ///     LengthError: ``out`` has the wrong length.
    ///     NoStagesError: no stage was added.
    ///     StageError: a stage failed (``.stage``, ``.chunk``).
    ///     TypeError, ValueError: ``input`` or ``out`` of the wrong kind,
    ///         ``out`` read-only or overlapping ``input``.
    ///     BusyError: the pipeline is in use by another thread or a stream.
    #[pyo3(signature = (input, out = None))]
    fn run<'py>(
        &self,
        py: Python<'py>,
        input: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        // Data on the GPU: a device run, no copy across the link.
        if let Ok(d) = input.cast::<DeviceArray>() {
            return self.run_on_device(py, d.get(), out);
        }
        if let Some((t, _)) = dlpack::device_of(input)? {
            if t == DL_CUDA || t == DL_CUDA_MANAGED {
                let gpu = self.gpu_for(py, "a run over a CUDA tensor")?;
                let d = from_cuda_tensor(py, gpu, input)?;
                return self.run_on_device(py, &d, out);
            }
        }
        let reg_in = input.cast::<Registered>().ok();
        let reg_out = out.and_then(|o| o.cast::<Registered>().ok());
        if let (Some(ri), Some(ro)) = (reg_in, reg_out) {
            if ri.is(ro) {
                return Err(PyValueError::new_err(
                    "out cannot be written: it must not overlap input (both are the same registered array)",
                ));
            }
        }
        // Held for the whole call, whichever path runs: no other run uses
        // a registered array meanwhile (BusyError).
        let held_in = reg_in.map(|r| r.get().lock(py)).transpose()?;
        let mut held_out = reg_out.map(|r| r.get().lock(py)).transpose()?;
        if let (Some(Some(i)), Some(Some(o)), Some(ri), Some(ro), Some(out), "gpu") = (
            held_in.as_deref(),
            held_out.as_deref_mut(),
            reg_in,
            reg_out,
            out,
            self.backend,
        ) {
            // NumPy's borrow flags too, for the run: a plain-array call
            // on the same memory (through `.array`) is refused meanwhile.
            let (ia, oa) = (ri.get().array_bound(py), ro.get().array_bound(py));
            let _read = ia
                .try_readonly()
                .map_err(|e| PyValueError::new_err(format!("input cannot be read: {e}")))?;
            let _write = oa.try_readwrite().map_err(|e| {
                PyValueError::new_err(format!("out cannot be written ({e}): it must be writeable"))
            })?;
            self.with(py, |pm| {
                py.detach(|| {
                    let run = pm.run_pinned(i, o);
                    // Both arrays are Python's again when run returns, on
                    // every path.
                    let (wi, wo) = (i.wait_idle(), o.wait_idle());
                    run.and(wi.map_err(Into::into)).and(wo.map_err(Into::into))
                })
            })?
            .map_err(|e| pipeline_error(py, &e))?;
            return Ok(out.clone());
        }
        // Otherwise a registered array runs as the array it holds.
        let input = match reg_in {
            Some(r) => r.get().array_bound(py).into_any(),
            None => input.clone(),
        };
        let out_arr = reg_out.map(|r| r.get().array_bound(py).into_any());
        let out_given = out;
        let out = out_arr.as_ref().or(out_given);
        let input = contiguous_f32(py, &input, "input")?;
        // Held to the end of the call: the slice below stays valid and no
        // other Rust borrow of the same memory can be made meanwhile.
        let ro = input
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("input cannot be read: {e}")))?;
        let src = ro
            .as_slice()
            .map_err(|e| PyValueError::new_err(format!("input: {e}")))?;
        match out {
            Some(out) => {
                let arr = out_f32(out, "out")?;
                let mut rw = arr.try_readwrite().map_err(|e| {
                    PyValueError::new_err(format!(
                        "out cannot be written ({e}): it must be writeable and must not overlap input"
                    ))
                })?;
                let dst = rw
                    .as_slice_mut()
                    .map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
                self.with(py, |pm| py.detach(|| pm.run(src, dst)))?
                    .map_err(|e| pipeline_error(py, &e))?;
                Ok(out_given.unwrap_or(out).clone())
            }
            None => {
                let output = self
                    .with(py, |pm| {
                        py.detach(|| {
                            // Zeroed pages from the allocator: no pass over
                            // them before the run writes them.
                            let mut v = vec![0f32; pm.total_output_len(src.len())];
                            pm.run(src, &mut v).map(|()| v)
                        })
                    })?
                    .map_err(|e| pipeline_error(py, &e))?;
                Ok(PyArray1::from_vec(py, output).into_any())
            }
        }
    }

    /// Elements each output of ``graph`` receives from an input of ``n``
    /// elements (cut into this pipeline's chunks: a ``GroupSum`` never sums
    /// across chunks), in output order: the lengths ``run_graph``'s
    /// ``outs`` must have.
    ///
    /// Raises:
    ///     NoOutputsError: the graph has no output.
    fn graph_output_lens(
        &self,
        py: Python<'_>,
        graph: &Bound<'_, Graph>,
        n: usize,
    ) -> PyResult<Vec<usize>> {
        let g = graph.get().lock(py)?;
        self.with(py, |pm| pm.graph_output_lens(&g, n))?
            .map_err(|e| pipeline_error(py, &e))
    }

    /// Streams ``input`` through a stage graph and returns its outputs.
    ///
    /// Args:
    ///     graph: a ``Graph`` with at least one output.
    ///     input: as for ``run`` (a 1-D float32 array, read in place, or
    ///         anything NumPy turns into one, copied first).
    ///     outs: where to write the outputs, in place of new arrays: a
    ///         list (or any iterable) of one 1-D C-contiguous writeable
    ///         float32 array per output of the graph, in output order,
    ///         each of exactly ``graph_output_lens(graph, len(input))[i]``
    ///         elements, overlapping neither ``input`` nor each other.
    ///
    /// Returns:
    ///     A list of one float32 array per output, in the order of
    ///     ``Graph.output`` (the arrays of ``outs`` when given). An empty
    ///     input gives empty outputs.
    ///
    /// Each chunk runs through every node the outputs depend on; a node
    /// read by several stages is read in place. The GIL is released while
    /// prism works, with the same rules as ``run``.
    ///
    /// Raises:
    ///     NoOutputsError: the graph has no output.
    ///     LengthError: ``outs`` has another number of arrays than the
    ///         graph has outputs (``expected``, ``actual``), or an array of
    ///         the wrong length (``output``, ``expected``, ``actual``).
    ///     GraphError: the graph needs more device buffers per slot than
    ///         a GPU run has (GPU backend).
    ///     StageError: a stage failed (``.stage`` is the node's name).
    ///     TypeError, ValueError: ``input`` or ``outs`` of the wrong kind,
    ///         an array of ``outs`` read-only or overlapping another.
    ///     BusyError: the pipeline or the graph is in use by another
    ///         thread, or the pipeline by a stream.
    #[pyo3(signature = (graph, input, outs = None))]
    fn run_graph<'py>(
        &self,
        py: Python<'py>,
        graph: &Bound<'py, Graph>,
        input: &Bound<'py, PyAny>,
        outs: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let input = contiguous_f32(py, input, "input")?;
        let ro = input
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("input cannot be read: {e}")))?;
        let src = ro
            .as_slice()
            .map_err(|e| PyValueError::new_err(format!("input: {e}")))?;
        match outs {
            Some(outs) => {
                let items = outs
                    .try_iter()
                    .map_err(|_| {
                        PyTypeError::new_err("outs must be a list of 1-D numpy.float32 arrays")
                    })?
                    .collect::<PyResult<Vec<_>>>()?;
                let arrays = items
                    .iter()
                    .enumerate()
                    .map(|(i, o)| out_f32(o, &format!("outs[{i}]")))
                    .collect::<PyResult<Vec<_>>>()?;
                // Each held to the end of the call: no two of them (nor
                // one and the input) share memory.
                let mut rws = Vec::with_capacity(arrays.len());
                for (i, arr) in arrays.iter().enumerate() {
                    rws.push(arr.try_readwrite().map_err(|e| {
                        PyValueError::new_err(format!(
                            "outs[{i}] cannot be written ({e}): it must be writeable and \
                             overlap neither input nor another output"
                        ))
                    })?);
                }
                let mut dsts = rws
                    .iter_mut()
                    .enumerate()
                    .map(|(i, rw)| {
                        rw.as_slice_mut()
                            .map_err(|e| PyValueError::new_err(format!("outs[{i}]: {e}")))
                    })
                    .collect::<PyResult<Vec<&mut [f32]>>>()?;
                let mut guard = graph.get().lock(py)?;
                let g: &mut StageGraph<f32> = &mut guard;
                self.with(py, |pm| py.detach(|| pm.run_graph(g, src, &mut dsts)))?
                    .map_err(|e| pipeline_error(py, &e))?;
                PyList::new(py, &items)
            }
            None => {
                let mut guard = graph.get().lock(py)?;
                let g: &mut StageGraph<f32> = &mut guard;
                let outputs = self
                    .with(py, |pm| {
                        py.detach(|| {
                            let lens = pm.graph_output_lens(g, src.len())?;
                            let mut vs: Vec<Vec<f32>> =
                                lens.iter().map(|&l| vec![0f32; l]).collect();
                            let mut dsts: Vec<&mut [f32]> =
                                vs.iter_mut().map(Vec::as_mut_slice).collect();
                            pm.run_graph(g, src, &mut dsts).map(|()| vs)
                        })
                    })?
                    .map_err(|e| pipeline_error(py, &e))?;
                PyList::new(py, outputs.into_iter().map(|v| PyArray1::from_vec(py, v)))
            }
        }
    }

    /// Streams the arrays of ``items`` (any iterable) through the stages
    /// and returns an iterator over the outputs, one per item, in order.
    ///
    /// Each item is one chunk: a 1-D float32 array (or anything
    /// ``numpy.ascontiguousarray(x, dtype=numpy.float32)`` makes one of,
    /// then copied), non-empty and at most ``chunk_bytes // 4`` elements
    /// (else ``LengthError``). prism runs on a worker thread, several
    /// items in flight at once (``slots``); items are pulled from
    /// ``items`` on that thread, with the GIL, as prism needs them, and
    /// outputs wait (at most ``slots`` of them) until the iterator is read.
    /// Waiting for the next output releases the GIL.
    ///
    /// An exception raised by ``items`` is raised again by the iterator
    /// after the outputs of the items before it. Until the iterator is
    /// exhausted or closed (``close()``, or ``with pipeline.run_stream(x)
    /// as outputs:``), other calls on the pipeline raise ``BusyError``.
    fn run_stream(&self, py: Python<'_>, items: &Bound<'_, PyAny>) -> PyResult<StreamIter> {
        let iter = items.try_iter()?.unbind();
        let pm = self.lock(py)?.take().ok_or_else(|| stream_busy(py))?;
        StreamIter::start(py, Arc::clone(&self.shared), pm, iter, self.config.slots)
    }

    /// Statistics since creation or ``reset_stats()``, as a dict: ``backend``,
    /// ``device``, ``runs``, ``chunks``, ``items``, ``bytes_in``,
    /// ``bytes_out``, ``wall_ms``, ``timed``, ``upload_ms``,
    /// ``download_ms``, ``stages`` (a list of ``{"name", "ms"}``, summed
    /// over chunks), ``compute_busy_ms``, ``host_copy_ms``,
    /// ``host_wait_ms``, ``chunk_bytes``, ``slots``, ``adaptive``,
    /// ``graph_launches``, ``graph_captures``, and derived from them
    /// ``compute_ms``, ``bound_ms``, ``overlap_efficiency``,
    /// ``throughput_gbps`` and ``bottleneck``.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (json, derived) = self.with(py, |pm| {
            let s = pm.get_stats();
            (
                serde_json::to_string(s),
                (
                    s.compute_ms(),
                    s.bound_ms(),
                    s.overlap_efficiency(),
                    s.throughput_gbps(),
                    s.bottleneck(),
                ),
            )
        })?;
        let json = json.map_err(|e| errors::plain(py, "PrismError", format!("stats: {e}")))?;
        let dict = py
            .import("json")?
            .call_method1("loads", (json,))?
            .cast_into::<PyDict>()?;
        dict.set_item("backend", self.backend)?;
        let (compute, bound, overlap, throughput, bottleneck) = derived;
        dict.set_item("compute_ms", compute)?;
        dict.set_item("bound_ms", bound)?;
        dict.set_item("overlap_efficiency", overlap)?;
        dict.set_item("throughput_gbps", throughput)?;
        dict.set_item("bottleneck", bottleneck)?;
        Ok(dict)
    }

    /// Clears the statistics.
    fn reset_stats(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |pm| pm.reset_stats())
    }

    /// The last run's spans as Chrome trace-event JSON (a string; open it
    /// in Perfetto or chrome://tracing). Spans are kept only with
    /// ``trace=True`` and ``timing=True``, on the GPU backend: the host
    /// backend records none (its trace has no events).
    fn trace(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |pm| pm.timeline().to_chrome_trace().to_string())
    }

    fn __repr__(&self) -> String {
        format!(
            "Pipeline(backend={:?}, chunk_bytes={}, slots={}, host_threads={})",
            self.backend, self.config.chunk_bytes, self.config.slots, self.config.host_threads
        )
    }
}
