//! DLPack, the C structs through which array libraries hand each other
//! memory (PyTorch, CuPy, JAX, NumPy): a prism device buffer out as a
//! `"dltensor"` capsule, and another library's CUDA tensor in. This module
//! is the FFI: the structs of `dlpack.h` (v0.8 legacy `DLManagedTensor`,
//! which every consumer accepts), the capsule protocol, and nothing about
//! ordering, which `prism_stream::foreign` owns.
//!
//! Capsule protocol (DLPack's Python specification): a producer returns a
//! capsule named `"dltensor"` whose pointer is a `DLManagedTensor`; a
//! consumer that takes it renames the capsule `"used_dltensor"` and calls
//! the tensor's `deleter` when done. A capsule collected without having
//! been taken calls the deleter itself.
#![allow(unsafe_code)] // the DLPack FFI (Cargo.toml's lint note)

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use prism_stream::Exported;
use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// `kDLCPU`, `kDLCUDA`, `kDLCUDAManaged`.
pub(crate) const DL_CPU: i32 = 1;
pub(crate) const DL_CUDA: i32 = 2;
pub(crate) const DL_CUDA_MANAGED: i32 = 13;
/// `kDLFloat`.
const DL_FLOAT: u8 = 2;

const DLTENSOR: &CStr = c"dltensor";
const USED_DLTENSOR: &CStr = c"used_dltensor";

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
#[derive(Debug)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
#[derive(Debug)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// What an exported capsule points to: the tensor (first, so a pointer to
/// it is a pointer to this), its shape, and the export it keeps alive.
#[repr(C)]
struct ExportCtx {
    managed: DLManagedTensor,
    shape: [i64; 1],
    /// `None` for a tensor of no element.
    keep: Option<Arc<Exported<f32>>>,
}

/// The deleter of the tensors `export_capsule` makes.
unsafe extern "C" fn delete_export(t: *mut DLManagedTensor) {
    if t.is_null() {
        return;
    }
    // SAFETY: `t` is the first field of an `ExportCtx` made by
    // `Box::into_raw` in `export_capsule` (`repr(C)`: same address), and
    // DLPack calls the deleter once (its consumer, or the capsule's
    // destructor for a capsule never taken).
    //
    // Dropping the last `Arc` frees the export after its consumers' work
    // (`Exported`'s `Drop` waits on the host). A deleter may be called with
    // the GIL (Python's capsule destructor, PyTorch) or without it (a C++
    // consumer's own thread), and abi3 gives no way to tell which: taking
    // the GIL here could deadlock against that consumer's locks, so the
    // drop happens as called (with the GIL, other Python threads wait
    // meanwhile, until the consumers' GPU work is done; a consumer that
    // queued a Python host callback on the legacy stream would deadlock
    // here, as it would in its own synchronize).
    drop(unsafe { Box::from_raw(t.cast::<ExportCtx>()) });
}

/// The destructor of every capsule `export_capsule` makes: a capsule still
/// named `"dltensor"` was never taken, so its tensor is deleted here; a
/// consumer renamed the ones it took and deletes them itself.
unsafe extern "C" fn capsule_destructor(capsule: *mut ffi::PyObject) {
    // SAFETY: Python calls this with the GIL held on a live capsule.
    // `PyCapsule_IsValid` sets no exception; the pointer of a valid
    // "dltensor" capsule is the `DLManagedTensor` `export_capsule` stored,
    // not yet deleted (only a consumer that renamed the capsule deletes it).
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, DLTENSOR.as_ptr()) == 1 {
            let t = ffi::PyCapsule_GetPointer(capsule, DLTENSOR.as_ptr()).cast::<DLManagedTensor>();
            if let Some(deleter) = t.as_ref().and_then(|t| t.deleter) {
                deleter(t);
            }
        }
    }
}

/// A `"dltensor"` capsule over `keep`'s float32 elements on CUDA device
/// `device` (`None`: a tensor of no element, null data). The capsule (or
/// its consumer) keeps the export alive.
pub(crate) fn export_capsule(
    py: Python<'_>,
    keep: Option<Arc<Exported<f32>>>,
    device: i32,
) -> PyResult<Bound<'_, PyAny>> {
    let (len, data) = match &keep {
        Some(k) => (k.len(), k.device_ptr() as usize as *mut c_void),
        None => (0, std::ptr::null_mut()),
    };
    let len = i64::try_from(len)
        .map_err(|_| PyValueError::new_err("the array is too long for DLPack's int64 shape"))?;
    let ctx = Box::new(ExportCtx {
        managed: DLManagedTensor {
            dl_tensor: DLTensor {
                data,
                device: DLDevice {
                    device_type: DL_CUDA,
                    device_id: device,
                },
                ndim: 1,
                dtype: DLDataType {
                    code: DL_FLOAT,
                    bits: 32,
                    lanes: 1,
                },
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(), // C-contiguous
                byte_offset: 0,
            },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(delete_export),
        },
        shape: [len],
        keep,
    });
    let raw = Box::into_raw(ctx);
    // SAFETY: `raw` is the live box just made; the shape lives inside it,
    // as long as the tensor does.
    unsafe {
        (*raw).managed.dl_tensor.shape = (*raw).shape.as_mut_ptr();
        (*raw).managed.manager_ctx = raw.cast::<c_void>();
    }
    // SAFETY: the pointer is the tensor (first field of the box) and the
    // name a static C string; on failure the box is reclaimed below.
    let capsule = unsafe {
        ffi::PyCapsule_New(
            raw.cast::<c_void>(),
            DLTENSOR.as_ptr(),
            Some(capsule_destructor),
        )
    };
    if capsule.is_null() {
        // SAFETY: no capsule holds `raw`: it is still only ours.
        unsafe { delete_export(raw.cast::<DLManagedTensor>()) };
        return Err(PyErr::fetch(py));
    }
    // SAFETY: a new reference `PyCapsule_New` returned.
    Ok(unsafe { Bound::from_owned_ptr(py, capsule) })
}

/// A tensor taken from another library's capsule: its deleter runs when
/// this drops (with the GIL), after prism's last use (the device buffer
/// over it drops this as its owner only then).
#[derive(Debug)]
pub(crate) struct Taken(*mut DLManagedTensor);

// SAFETY: the pointer is used only to call the tensor's deleter, once, in
// `Drop`, with the GIL held (DLPack producers' deleters may run on any
// thread that holds the GIL).
unsafe impl Send for Taken {}
// SAFETY: `&Taken` gives no access to the pointer.
unsafe impl Sync for Taken {}

impl Drop for Taken {
    /// On Python 3.9 to 3.12, PyO3 cannot tell a finalizing interpreter
    /// from a live one before attaching: a `Taken` dropped on a thread of
    /// another library while the interpreter shuts down may then block
    /// that thread. prism drops them on Python's threads (with its objects).
    fn drop(&mut self) {
        let t = self.0;
        // `None`: the interpreter is finalizing; the producer's memory goes
        // with the process.
        let _ = Python::try_attach(|_py| {
            // SAFETY: a tensor taken from a capsule (renamed, so nothing else
            // deletes it), deleted once, here, with the GIL held.
            unsafe {
                if let Some(deleter) = (*t).deleter {
                    deleter(t);
                }
            }
        });
    }
}

/// Another library's float32 tensor, taken through DLPack.
#[derive(Debug)]
pub(crate) struct Imported {
    /// Device address of the first element (the data pointer plus the
    /// byte offset).
    pub(crate) ptr: u64,
    /// Elements (the product of the shape; the tensor is C-contiguous).
    pub(crate) len: usize,
    /// `kDLCUDA`/`kDLCUDAManaged` (or `kDLCPU`) and the device id.
    pub(crate) device_type: i32,
    pub(crate) device_id: i32,
    /// Calls the tensor's deleter when dropped.
    pub(crate) owner: Taken,
}

/// `obj.__dlpack_device__()`: (device type, id), or `None` for an object
/// without one.
pub(crate) fn device_of(obj: &Bound<'_, PyAny>) -> PyResult<Option<(i32, i32)>> {
    if !obj.hasattr("__dlpack_device__")? {
        return Ok(None);
    }
    let (t, id): (i32, i32) = obj.call_method0("__dlpack_device__")?.extract()?;
    Ok(Some((t, id)))
}

/// Takes `obj`'s tensor through `obj.__dlpack__(stream=stream)` (the
/// producer makes `stream` wait for its pending writes; `None` asks for no
/// stream, as for host memory) and checks it is float32, C-contiguous.
pub(crate) fn import(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    stream: Option<usize>,
) -> PyResult<Imported> {
    let kwargs = PyDict::new(py);
    if let Some(s) = stream {
        kwargs.set_item("stream", s)?;
    }
    let capsule = obj.call_method("__dlpack__", (), Some(&kwargs))?;
    let raw = capsule.as_ptr();
    // SAFETY: `raw` is a live object (held by `capsule`); `PyCapsule_IsValid`
    // accepts any object and sets no exception.
    if unsafe { ffi::PyCapsule_IsValid(raw, DLTENSOR.as_ptr()) } != 1 {
        return Err(PyTypeError::new_err(
            "__dlpack__ did not return an untaken \"dltensor\" capsule",
        ));
    }
    // SAFETY: a valid "dltensor" capsule: its pointer is the producer's
    // DLManagedTensor.
    let t = unsafe { ffi::PyCapsule_GetPointer(raw, DLTENSOR.as_ptr()) }.cast::<DLManagedTensor>();
    if t.is_null() {
        return Err(PyErr::fetch(py));
    }
    // Taken: from here the deleter is ours to call (`Taken`'s `Drop`, on
    // every path below).
    // SAFETY: a live capsule and a static C string.
    if unsafe { ffi::PyCapsule_SetName(raw, USED_DLTENSOR.as_ptr()) } != 0 {
        return Err(PyErr::fetch(py));
    }
    let owner = Taken(t);
    // SAFETY: the producer keeps the tensor and its shape and strides
    // arrays valid until its deleter runs, which `owner` does later.
    let tensor = unsafe { &(*t).dl_tensor };
    let dtype = tensor.dtype;
    if (dtype.code, dtype.bits, dtype.lanes) != (DL_FLOAT, 32, 1) {
        return Err(PyTypeError::new_err(format!(
            "the tensor's elements must be float32 (DLPack dtype code {DL_FLOAT}, 32 bits, 1 lane); it has code {}, {} bits, {} lanes",
            dtype.code, dtype.bits, dtype.lanes
        )));
    }
    let ndim = usize::try_from(tensor.ndim)
        .map_err(|_| PyValueError::new_err("the tensor has a negative ndim"))?;
    let (shape, strides): (&[i64], Option<&[i64]>) = if ndim == 0 {
        (&[], None)
    } else {
        if tensor.shape.is_null() {
            return Err(PyValueError::new_err("the tensor has no shape"));
        }
        // SAFETY: DLPack: `shape` holds `ndim` entries, and `strides` (when
        // not null) too, valid while the tensor is.
        unsafe {
            (
                std::slice::from_raw_parts(tensor.shape, ndim),
                (!tensor.strides.is_null())
                    .then(|| std::slice::from_raw_parts(tensor.strides, ndim)),
            )
        }
    };
    let mut len: usize = 1;
    for &d in shape {
        let d = usize::try_from(d).map_err(|_| {
            PyValueError::new_err(format!("the tensor has a negative dimension {d}"))
        })?;
        len = len
            .checked_mul(d)
            .ok_or_else(|| PyValueError::new_err("the tensor's size overflows"))?;
    }
    if let Some(strides) = strides {
        // C-contiguous: each stride (in elements) is the product of the
        // later dimensions; dimensions of length 1 may have any stride.
        let mut want: i64 = 1;
        for (i, (&d, &s)) in shape.iter().zip(strides).enumerate().rev() {
            if d != 1 && s != want && len > 0 {
                return Err(PyValueError::new_err(format!(
                    "the tensor must be C-contiguous: dimension {i} has stride {s}, not {want} (make it contiguous first, e.g. .contiguous())"
                )));
            }
            want = want.saturating_mul(d);
        }
    }
    let ptr = (tensor.data as u64)
        .checked_add(tensor.byte_offset)
        .ok_or_else(|| PyValueError::new_err("the tensor's address overflows"))?;
    let device = tensor.device;
    if ![DL_CPU, DL_CUDA, DL_CUDA_MANAGED].contains(&device.device_type) {
        return Err(PyBufferError::new_err(format!(
            "DLPack device type {} is neither CUDA nor CPU memory",
            device.device_type
        )));
    }
    Ok(Imported {
        ptr,
        len,
        device_type: device.device_type,
        device_id: device.device_id,
        owner,
    })
}
