//! NumPy arrays in: 1-D C-contiguous float32 as they are, anything else
//! through `numpy.ascontiguousarray(x, dtype=numpy.float32)` (a copy).

use numpy::{PyArray1, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// `obj` as a 1-D C-contiguous float32 array: itself when it is one, else
/// a contiguous float32 copy made by NumPy. `what` names it in errors.
pub(crate) fn contiguous_f32<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    if let Ok(a) = obj.cast::<PyArray1<f32>>() {
        if a.is_c_contiguous() {
            return Ok(a.clone());
        }
    }
    let np = py.import("numpy")?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("dtype", np.getattr("float32")?)?;
    let converted = np
        .call_method("ascontiguousarray", (obj,), Some(&kwargs))
        .map_err(|e| {
            let err = PyTypeError::new_err(format!(
                "{what} must be a 1-D float32 array or convertible to one by numpy.asarray"
            ));
            err.set_cause(py, Some(e));
            err
        })?;
    let untyped = converted.cast::<PyUntypedArray>()?;
    if untyped.ndim() != 1 {
        return Err(PyValueError::new_err(format!(
            "{what} must be 1-D, but it has shape {:?}",
            untyped.shape()
        )));
    }
    Ok(converted.cast_into::<PyArray1<f32>>()?)
}
