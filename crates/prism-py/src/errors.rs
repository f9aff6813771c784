//! prism's errors as the typed Python exceptions of `prism._errors`.
//!
//! The exception classes are defined in Python (`python/prism/_errors.py`)
//! so that they can derive from both `PrismError` and a built-in
//! (`ValueError`, `MemoryError`) and carry attributes (`stage`, `chunk`,
//! `expected`, ...); this module builds them from Rust.

use prism_pipeline::Error as PipelineError;
use prism_stream::Error as StreamError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Fields of an exception (keyword arguments of its constructor).
type Fields<'a, 'py> = &'a Bound<'py, PyDict>;

/// An instance of `prism._errors.<class>(message, **fields)` as a `PyErr`
/// (or the error that building it raised).
pub(crate) fn raise(
    py: Python<'_>,
    class: &str,
    message: impl Into<String>,
    fields: impl FnOnce(Fields<'_, '_>) -> PyResult<()>,
) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let cls = py.import("prism._errors")?.getattr(class)?;
        let kwargs = PyDict::new(py);
        fields(&kwargs)?;
        let value = cls.call((message.into(),), Some(&kwargs))?;
        Ok(PyErr::from_value(value))
    };
    build().unwrap_or_else(|e| e)
}

/// `raise` without fields.
pub(crate) fn plain(py: Python<'_>, class: &str, message: impl Into<String>) -> PyErr {
    raise(py, class, message, |_| Ok(()))
}

/// The exception for a pipeline error.
pub(crate) fn pipeline_error(py: Python<'_>, e: &PipelineError) -> PyErr {
    let msg = e.to_string();
    match e {
        PipelineError::Stream(s) => stream_error(py, s, msg),
        PipelineError::Buffer(b) => buffer_error(py, b, msg),
        PipelineError::Stage { stage, chunk, .. } => raise(py, "StageError", msg, |k| {
            k.set_item("stage", stage)?;
            k.set_item("chunk", chunk)?;
            k.set_item("panicked", false)
        }),
        PipelineError::StagePanicked { stage, chunk, .. } => raise(py, "StageError", msg, |k| {
            k.set_item("stage", stage)?;
            k.set_item("chunk", chunk)?;
            k.set_item("panicked", true)
        }),
        PipelineError::Unsupported { stage, backend } => raise(py, "UnsupportedError", msg, |k| {
            k.set_item("stage", stage)?;
            k.set_item("backend", backend)
        }),
        PipelineError::UnknownStage { index, .. } | PipelineError::RepeatedStage { index } => {
            raise(py, "ConfigError", msg, |k| k.set_item("index", index))
        }
        PipelineError::NoStages => plain(
            py,
            "NoStagesError",
            format!("{msg}: add one with add_stage() first"),
        ),
        PipelineError::Config(_) => plain(py, "ConfigError", msg),
        PipelineError::OutputLength { expected, actual } => raise(py, "LengthError", msg, |k| {
            k.set_item("expected", expected)?;
            k.set_item("actual", actual)
        }),
        PipelineError::ItemTooLong { item, len, chunk } => raise(py, "LengthError", msg, |k| {
            k.set_item("expected", chunk)?;
            k.set_item("actual", len)?;
            k.set_item("item", item)
        }),
        PipelineError::Source { chunk, .. } | PipelineError::SourcePanicked { chunk, .. } => {
            raise(py, "SourceError", msg, |k| k.set_item("chunk", chunk))
        }
        PipelineError::Sink { chunk, .. } | PipelineError::SinkPanicked { chunk, .. } => {
            raise(py, "SinkError", msg, |k| k.set_item("chunk", chunk))
        }
        PipelineError::NoOutputs => plain(
            py,
            "NoOutputsError",
            "the graph has no output: mark at least one node with Graph.output(node)",
        ),
        PipelineError::UnknownNode { index, nodes } => raise(py, "GraphError", msg, |k| {
            k.set_item("node", index)?;
            k.set_item("nodes", nodes)
        }),
        PipelineError::GraphTooWide { buffers, max } => raise(py, "GraphError", msg, |k| {
            k.set_item("buffers", buffers)?;
            k.set_item("max_buffers", max)
        }),
        PipelineError::OutputCount { expected, actual } => raise(
            py,
            "LengthError",
            format!("{msg}: outs must hold one array per output"),
            |k| {
                k.set_item("expected", expected)?;
                k.set_item("actual", actual)
            },
        ),
        PipelineError::GraphOutputLength {
            output,
            expected,
            actual,
        } => raise(py, "LengthError", msg, |k| {
            k.set_item("expected", expected)?;
            k.set_item("actual", actual)?;
            k.set_item("output", output)
        }),
        PipelineError::GraphsPerGpu { .. } => plain(py, "ConfigError", msg),
        PipelineError::Device { source, .. } => pipeline_error(py, source),
        PipelineError::IterationPending { .. } => plain(py, "BusyError", msg),
        _ => plain(py, "PrismError", msg),
    }
}

/// The exception for a slot-ring error.
fn buffer_error(py: Python<'_>, e: &prism_buffer::Error, msg: String) -> PyErr {
    match e {
        prism_buffer::Error::Stream(s) => stream_error(py, s, msg),
        prism_buffer::Error::ChunkTooLong { .. } | prism_buffer::Error::ZeroLength { .. } => {
            plain(py, "LengthError", msg)
        }
        prism_buffer::Error::InvalidSlotCount { .. } | prism_buffer::Error::Config(_) => {
            plain(py, "ConfigError", msg)
        }
        _ => plain(py, "PrismError", msg),
    }
}

/// The exception for a GPU-layer error.
pub(crate) fn stream_error(py: Python<'_>, e: &StreamError, msg: String) -> PyErr {
    const HOST_HINT: &str =
        "; use backend=\"host\" (or \"auto\", which falls back to the host) to run on CPU threads";
    match e {
        StreamError::DriverNotFound => {
            plain(py, "DriverNotFoundError", format!("{msg}{HOST_HINT}"))
        }
        StreamError::NoDevice | StreamError::InvalidDevice { .. } => {
            plain(py, "NoDeviceError", format!("{msg}{HOST_HINT}"))
        }
        StreamError::OutOfMemory { .. } => plain(py, "OutOfMemoryError", msg),
        StreamError::ForeignMemory { .. } | StreamError::ForeignContext { .. } => {
            plain(py, "ForeignMemoryError", msg)
        }
        StreamError::ContextPoisoned { .. } => plain(py, "ContextPoisonedError", msg),
        StreamError::LengthMismatch { .. }
        | StreamError::LengthOverflow { .. }
        | StreamError::ZeroLength { .. } => plain(py, "LengthError", msg),
        StreamError::Unsupported { .. }
        | StreamError::DriverUnsupported { .. }
        | StreamError::KernelsNotBuilt { .. }
        | StreamError::StreamsDisabled { .. } => plain(py, "UnsupportedError", msg),
        StreamError::Driver { .. }
        | StreamError::Kernel { .. }
        | StreamError::OpFailed { .. }
        | StreamError::PtxLoad { .. }
        | StreamError::Library { .. }
        | StreamError::Timeout { .. } => plain(py, "GpuError", msg),
        _ => plain(py, "PrismError", msg),
    }
}
