//! `Pipeline.register(array)`: a NumPy array page-locked in place
//! (`cuMemHostRegister`, through `PinnedBuffer::register_external`), so
//! that runs between two registered arrays copy straight between them and
//! the GPU, with no staging. The `Registered` object holds the array (its
//! memory stays alive while it is registered) and unregisters on `close()`,
//! at the end of a `with` block, or when it is collected.

use std::sync::{Mutex, MutexGuard, TryLockError};

use numpy::{PyArray1, PyArrayMethods, PyUntypedArrayMethods};
use prism_stream::PinnedBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::convert::out_f32;
use crate::errors;

/// A float32 array page-locked in place for a pipeline's GPU (made by
/// ``Pipeline.register``). Pass it as ``run``'s ``input`` and ``out``: two
/// registered arrays run with no staging copy. On the host backend nothing
/// is pinned and it runs as its array would.
///
/// ``array`` is the array itself (not a copy). While a run uses it, other
/// Python threads must not touch the array (as with ``run``'s in-place
/// arguments). ``close()`` unregisters it (after the GPU is done with it);
/// so does leaving a ``with`` block or the object being collected.
#[pyclass(module = "prism._prism", frozen)]
pub(crate) struct Registered {
    array: Py<PyArray1<f32>>,
    /// The page-locked buffer (`None`: the host backend, or closed).
    pinned: Mutex<Option<PinnedBuffer<f32>>>,
    /// Registered on a GPU (as opposed to a host pipeline's plain array).
    on_gpu: bool,
}

impl Registered {
    /// Pins `array` in place on the pipeline's GPU (`gpu`), or wraps it
    /// (`None`: the host backend).
    pub(crate) fn new(
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        gpu: Option<&prism_stream::Gpu>,
    ) -> PyResult<Self> {
        let arr = out_f32(array, "the array to register")?;
        if !arr.is_aligned() {
            return Err(PyValueError::new_err(
                "the array to register must be aligned",
            ));
        }
        // A writeable array: runs write into a registered `out`. The check
        // takes the borrow for an instant; it is not held.
        drop(arr.try_readwrite().map_err(|e| {
            PyValueError::new_err(format!("the array to register must be writeable ({e})"))
        })?);
        let Some(gpu) = gpu else {
            return Ok(Self {
                array: arr.clone().unbind(),
                pinned: Mutex::new(None),
                on_gpu: false,
            });
        };
        let (ptr, len) = (arr.data(), arr.len());
        let owner: Box<dyn std::any::Any + Send + Sync> = Box::new(arr.clone().unbind());
        let gpu = gpu.clone();
        let ptr = ptr as usize;
        #[allow(unsafe_code)] // the package's one unsafe call (Cargo.toml)
        let pinned = py
            .detach(move || {
                // SAFETY: `ptr` is the data of a C-contiguous aligned
                // float32 array of `len` elements, which `owner` (a
                // reference to the array) keeps allocated; NumPy never
                // moves an array's data. prism alone touches the memory
                // while a run uses it, as the class documents for Python
                // code (a NumPy array cannot be borrowed from Python).
                unsafe { PinnedBuffer::register_external(&gpu, ptr as *mut f32, len, owner) }
            })
            .map_err(|e| {
                let msg = e.to_string();
                errors::stream_error(py, &e, msg)
            })?;
        Ok(Self {
            array: arr.clone().unbind(),
            pinned: Mutex::new(Some(pinned)),
            on_gpu: true,
        })
    }

    /// The page-locked buffer for a run: `Ok(None)` on the host backend,
    /// `BusyError` while another thread's run holds it, `ValueError` once
    /// closed.
    pub(crate) fn lock<'a>(
        &'a self,
        py: Python<'_>,
    ) -> PyResult<MutexGuard<'a, Option<PinnedBuffer<f32>>>> {
        let g = match self.pinned.try_lock() {
            Ok(g) => g,
            Err(TryLockError::WouldBlock) => {
                return Err(errors::plain(
                    py,
                    "BusyError",
                    "the registered array is in use by a run in another thread",
                ))
            }
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        if self.on_gpu && g.is_none() {
            return Err(PyValueError::new_err("the registered array was closed"));
        }
        Ok(g)
    }

    /// Pinned on a GPU (even if closed since).
    pub(crate) fn on_gpu(&self) -> bool {
        self.on_gpu
    }

    /// The array, for runs on the host backend.
    pub(crate) fn array_bound<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        self.array.bind(py).clone()
    }
}

#[pymethods]
impl Registered {
    /// The registered array itself (no copy).
    #[getter]
    fn array<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        self.array_bound(py)
    }

    /// True while the array is page-locked on a GPU (False on the host
    /// backend, and after ``close()``).
    #[getter]
    fn pinned(&self) -> bool {
        self.pinned.lock().map(|g| g.is_some()).unwrap_or(false)
    }

    fn __len__(&self, py: Python<'_>) -> usize {
        self.array.bind(py).len()
    }

    /// Unregisters the array, once the GPU is done with it (the array
    /// itself stays usable). Closing twice does nothing.
    ///
    /// Raises:
    ///     BusyError: a run in another thread is using it.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let taken = match self.pinned.try_lock() {
            Ok(mut g) => g.take(),
            Err(TryLockError::Poisoned(p)) => p.into_inner().take(),
            Err(TryLockError::WouldBlock) => {
                return Err(errors::plain(
                    py,
                    "BusyError",
                    "the registered array is in use by a run in another thread",
                ))
            }
        };
        if let Some(buf) = taken {
            // Unregistering waits for the GPU: without the GIL.
            py.detach(move || drop(buf));
        }
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Registered(len={}, pinned={})",
            self.array.bind(py).len(),
            self.pinned()
        )
    }
}
