//! `Pipeline.register(array)`: a NumPy array page-locked in place
//! (`cuMemHostRegister`, through `PinnedBuffer::register_external`), so
//! that runs between two registered arrays copy straight between them and
//! the GPU, with no staging. The `Registered` object holds the array (its
//! memory stays alive while it is registered) and unregisters on `close()`,
//! at the end of a `with` block, or when it is collected.

use std::sync::{Mutex, MutexGuard, TryLockError};

use numpy::{PyArray1, PyArrayMethods, PyUntypedArrayMethods};
use prism_stream::cudarc::driver::sys::CUresult;
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
/// prism calls on the array are refused (``BusyError``, or ``ValueError``
/// from NumPy's borrow flags) and other Python threads must not touch it
/// (as with ``run``'s in-place arguments). The array must keep its memory
/// while registered: do not ``resize`` it (or the tensor it views).
/// ``close()`` unregisters it (after the GPU is done with it); so does
/// leaving a ``with`` block or the object being collected. A closed
/// ``Registered`` runs as its array (staged).
#[pyclass(module = "prism._prism", frozen)]
pub(crate) struct Registered {
    array: Py<PyArray1<f32>>,
    /// The page-locked buffer (`None`: the host backend, or closed).
    pinned: Mutex<Option<PinnedBuffer<f32>>>,
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
            });
        };
        if arr.len() == 0 {
            return Err(PyValueError::new_err("the array to register is empty"));
        }
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
            .map_err(|e| match e {
                prism_stream::Error::Driver { source, .. }
                    if source.0 == CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED =>
                {
                    PyValueError::new_err(
                        "the array shares memory pages with an array registered already (the driver locks whole pages): register one array over both, or copy one",
                    )
                }
                e => {
                    let msg = e.to_string();
                    errors::stream_error(py, &e, msg)
                }
            })?;
        Ok(Self {
            array: arr.clone().unbind(),
            pinned: Mutex::new(Some(pinned)),
        })
    }

    /// The page-locked buffer for a run (`None`: the host backend, or
    /// closed), or `BusyError` while another thread's run holds it.
    pub(crate) fn lock<'a>(
        &'a self,
        py: Python<'_>,
    ) -> PyResult<MutexGuard<'a, Option<PinnedBuffer<f32>>>> {
        match self.pinned.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::WouldBlock) => Err(errors::plain(
                py,
                "BusyError",
                "the registered array is in use by a run in another thread",
            )),
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        }
    }

    /// The array, for runs on the host backend.
    pub(crate) fn array_bound<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        self.array.bind(py).clone()
    }
}

impl Drop for Registered {
    /// Collected while still registered: unregistering waits for the GPU,
    /// so without the GIL (as `close()`).
    fn drop(&mut self) {
        let buf = match self.pinned.get_mut() {
            Ok(g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(buf) = buf {
            Python::attach(|py| py.detach(move || drop(buf)));
        }
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
        // Never blocks (a run holds the lock without the GIL, and takes the
        // GIL back before it lets go): held by a run means pinned.
        match self.pinned.try_lock() {
            Ok(g) => g.is_some(),
            Err(TryLockError::WouldBlock) => true,
            Err(TryLockError::Poisoned(p)) => p.into_inner().is_some(),
        }
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
        // The lock is let go at the end of this statement.
        let taken = self.lock(py)?.take();
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
