//! prism for Python: the native module `prism._prism` (PyO3, abi3).
//!
//! The Python package `prism` (in `python/prism`) re-exports its classes
//! and defines the exceptions (`prism._errors`) this module raises.
//! Pipelines and stage graphs run over 1-D float32 NumPy arrays with the GIL released; a
//! stream runs on a worker thread; data on the GPU comes and goes through
//! DLPack (`device.rs`, the FFI in `dlpack.rs`). Nothing here panics across the FFI:
//! prism's errors become typed Python exceptions.

mod convert;
mod device;
mod dlpack;
mod errors;
mod graph;
mod kernel;
mod pipeline;
mod register;
mod stages;
mod stream;

use std::sync::{Arc, Mutex};

use prism_pipeline::PipelineStageManager;
use pyo3::prelude::*;

/// The pipeline on float32 elements.
pub(crate) type Manager = PipelineStageManager<f32>;

/// The manager, shared with a `run_stream` worker: `None` while a stream
/// runs (the worker holds it and puts it back when it ends).
pub(crate) type Shared = Arc<Mutex<Option<Manager>>>;

/// prism's native module; use it through the package `prism`.
#[pymodule]
fn _prism(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<pipeline::Pipeline>()?;
    m.add_class::<stream::StreamIter>()?;
    m.add_class::<register::Registered>()?;
    m.add_class::<device::DeviceArray>()?;
    m.add_function(wrap_pyfunction!(device::from_dlpack, m)?)?;
    m.add_function(wrap_pyfunction!(device::_dlpack_info, m)?)?;
    m.add_class::<graph::Graph>()?;
    m.add_class::<graph::Node>()?;
    m.add_class::<stages::Fma>()?;
    m.add_class::<stages::Clamp>()?;
    m.add_class::<stages::GroupSum>()?;
    m.add_class::<kernel::Kernel>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
