//! NumPy arrays in: 1-D C-contiguous aligned float32 as they are, anything
//! else through `numpy.ascontiguousarray(x, dtype=numpy.float32)` (a copy),
//! then copied once more if that left it misaligned (an array NumPy made over
//! a byte buffer at an odd offset, as Dask's deserialized arrays can be:
//! `ascontiguousarray` returns such an array as it is).

use numpy::{PyArray1, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// `obj` as an output array: a 1-D C-contiguous float32 NumPy array, used
/// as it is (never copied: prism writes into it). `what` names it in errors.
pub(crate) fn out_f32<'a, 'py>(
    obj: &'a Bound<'py, PyAny>,
    what: &str,
) -> PyResult<&'a Bound<'py, PyArray1<f32>>> {
    let arr = obj
        .cast::<PyArray1<f32>>()
        .map_err(|_| PyTypeError::new_err(format!("{what} must be a 1-D numpy.float32 array")))?;
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what} must be C-contiguous"
        )));
    }
    Ok(arr)
}

/// `obj` as a 1-D C-contiguous aligned float32 array: itself when it is
/// one, else a copy made by NumPy. `what` names it in errors.
pub(crate) fn contiguous_f32<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    if let Ok(a) = obj.cast::<PyArray1<f32>>() {
        if a.is_c_contiguous() && a.is_aligned() {
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
    let converted = if untyped.is_aligned() {
        converted
    } else {
        // A new array: NumPy allocates it aligned.
        converted.call_method0("copy")?
    };
    Ok(converted.cast_into::<PyArray1<f32>>()?)
}
