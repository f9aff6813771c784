//! `prism.DeviceArray`: float32 data on a GPU, in and out of prism without
//! a copy through DLPack. A pipeline's device run returns one
//! (`Pipeline.run` over a `DeviceArray` or a CUDA tensor); `to_device`
//! uploads a NumPy array; `prism.from_dlpack` wraps a PyTorch or CuPy
//! tensor's memory. `torch.from_dlpack(arr)` / `cupy.from_dlpack(arr)` take
//! it without a copy: the consumer's stream waits for prism's work on an
//! event (never a device-wide sync), and prism queues nothing more on it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use numpy::PyArray1;
use prism_stream::{
    DeviceBuffer, Exported, ForeignStream, Gpu, HostAllocFlags, Lane, PinnedBuffer,
};
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;

use crate::dlpack::{self, DL_CUDA, DL_CUDA_MANAGED};
use crate::errors;

/// What a `DeviceArray` holds.
#[derive(Debug)]
pub(crate) enum Held {
    /// No element (a device buffer holds at least one).
    Empty,
    /// prism's to use: runs read it, `numpy()` downloads it.
    Buffer(DeviceBuffer<f32>),
    /// Lent through `__dlpack__`: prism queues nothing more on it.
    Exported(Arc<Exported<f32>>),
}

/// float32 data on a GPU (1-D).
///
/// Made by a pipeline's device run (``Pipeline.run`` over a ``DeviceArray``
/// or a CUDA tensor), by ``Pipeline.to_device(array)``, or by
/// ``prism.from_dlpack(tensor)`` (a PyTorch or CuPy CUDA tensor's memory,
/// not copied). ``torch.from_dlpack(a)`` and ``cupy.from_dlpack(a)`` take
/// it without a copy: their stream waits on the GPU for prism's pending
/// work (a CUDA event, not a device-wide sync). Once exported that way it
/// belongs to its consumers: prism runs and ``numpy()`` refuse it
/// (``BusyError``), and its memory is freed when it and every tensor made
/// from it are gone. The free waits for their work queued on the legacy
/// default stream (the one PyTorch and CuPy use unless told otherwise);
/// shared with another stream, it waits for the whole GPU. Work they queue
/// later on streams of their own is theirs to finish before letting go.
///
/// A ``from_dlpack`` array is the other library's memory: each run over it
/// (and ``numpy()``) first waits for the owner's work on the legacy default
/// stream, and afterwards that stream waits for prism's reads, so the
/// owner's next write there comes after them; work on other streams is the
/// owner's to order (``torch.cuda.synchronize()``).
#[pyclass(module = "prism._prism", frozen)]
#[derive(Debug)]
pub(crate) struct DeviceArray {
    /// Locked only with `try_lock` while the GIL is held (a thread that
    /// holds it while detached would otherwise deadlock with one waiting
    /// for it with the GIL).
    held: Mutex<Held>,
    len: usize,
    /// The device address (0 when empty); never changes.
    ptr: u64,
    /// Set once handed out through `__dlpack__`.
    exported: AtomicBool,
    /// Another library's memory (`from_dlpack`): after each prism run over
    /// it, the legacy default stream waits for prism's reads, so that its
    /// owner's next write there comes after them.
    foreign: bool,
    gpu: Gpu,
}

impl DeviceArray {
    pub(crate) fn new(gpu: &Gpu, held: Held) -> Self {
        Self::with_origin(gpu, held, false)
    }

    fn with_origin(gpu: &Gpu, held: Held, foreign: bool) -> Self {
        let (len, ptr) = match &held {
            Held::Empty => (0, 0),
            #[allow(unsafe_code)] // the address as a number (Cargo.toml's lint note)
            Held::Buffer(b) => (b.len(), {
                // SAFETY: the address is kept only as a number, for
                // `ptr`; nothing reads or writes memory through it.
                unsafe { b.device_ptr() }
            }),
            Held::Exported(e) => (e.len(), e.device_ptr()),
        };
        Self {
            exported: AtomicBool::new(matches!(held, Held::Exported(_))),
            held: Mutex::new(held),
            len,
            ptr,
            foreign,
            gpu: gpu.clone(),
        }
    }

    /// True for another library's memory (`from_dlpack`).
    pub(crate) fn is_foreign(&self) -> bool {
        self.foreign
    }

    pub(crate) fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The contents, or `BusyError` while another thread uses them. Never
    /// waits: the holder may be a thread without the GIL, waiting for it.
    fn try_held(&self, py: Python<'_>) -> PyResult<MutexGuard<'_, Held>> {
        match self.held.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::WouldBlock) => Err(errors::plain(
                py,
                "BusyError",
                "the device array is in use by a call in another thread",
            )),
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        }
    }

    /// The contents for a prism call, or `BusyError` while another thread
    /// uses them or once they were exported.
    pub(crate) fn lock(&self, py: Python<'_>) -> PyResult<MutexGuard<'_, Held>> {
        let g = self.try_held(py)?;
        if matches!(*g, Held::Exported(_)) {
            return Err(errors::plain(
                py,
                "BusyError",
                "the device array was handed to another library through DLPack: it is theirs now; use the tensor they made from it",
            ));
        }
        Ok(g)
    }
}

/// Another library's CUDA tensor as a device buffer of `gpu`, without a
/// copy: taken through `__dlpack__(stream=1)`, so its producer makes the
/// legacy default stream wait for its pending writes; prism's first use
/// waits on a fence recorded there.
pub(crate) fn from_cuda_tensor(
    py: Python<'_>,
    gpu: &Gpu,
    obj: &Bound<'_, PyAny>,
) -> PyResult<DeviceArray> {
    let t = dlpack::import(py, obj, Some(ForeignStream::LEGACY.raw()))?;
    if t.device_type != DL_CUDA && t.device_type != DL_CUDA_MANAGED {
        return Err(PyBufferError::new_err(
            "the tensor is not in CUDA memory: pass host arrays to run() as they are",
        ));
    }
    let ordinal = gpu.info().ordinal;
    if usize::try_from(t.device_id).ok() != Some(ordinal) {
        return Err(PyValueError::new_err(format!(
            "the tensor is on CUDA device {}, the pipeline on device {ordinal}",
            t.device_id
        )));
    }
    if t.len == 0 {
        return Ok(DeviceArray::new(gpu, Held::Empty)); // `t.owner` deletes it
    }
    let (ptr, len) = (t.ptr, t.len);
    let owner: Box<dyn std::any::Any + Send + Sync> = Box::new(t.owner);
    #[allow(unsafe_code)] // the DLPack hand-over (Cargo.toml's lint note)
    let buf = {
        // SAFETY: DLPack's contract: `ptr` is `len` C-contiguous float32
        // elements of device memory (checked again by prism against the
        // driver's tables), ready once the legacy default stream's work is
        // done (the producer ordered its writes before it, as asked with
        // stream=1), and kept allocated until the tensor's deleter runs, which
        // `owner` does when prism's buffer drops, after its last use. Python
        // code must not write the tensor while prism uses it, as with any
        // two aliases of one tensor.
        unsafe { DeviceBuffer::from_foreign(gpu, ptr, len, Some(ForeignStream::LEGACY), owner) }
    }
    .map_err(|e| {
        let msg = e.to_string();
        errors::stream_error(py, &e, msg)
    })?;
    Ok(DeviceArray::with_origin(gpu, Held::Buffer(buf), true))
}

#[pymethods]
impl DeviceArray {
    /// ``(len,)``.
    #[getter]
    fn shape(&self) -> (usize,) {
        (self.len,)
    }

    /// ``numpy.float32``'s dtype.
    #[getter]
    fn dtype<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py.import("numpy")?.getattr("dtype")?.call1(("float32",))
    }

    /// The CUDA device ordinal.
    #[getter]
    fn device(&self) -> usize {
        self.gpu.info().ordinal
    }

    /// The device address of the first element (0 when empty), for
    /// checks that a hand-over copied nothing (``tensor.data_ptr()``).
    #[getter]
    fn ptr(&self) -> u64 {
        self.ptr
    }

    /// True once handed to another library through ``__dlpack__``.
    #[getter]
    fn exported(&self) -> bool {
        self.exported.load(Ordering::Acquire)
    }

    fn __len__(&self) -> usize {
        self.len
    }

    /// A NumPy copy of the contents (waits for prism's work on them).
    ///
    /// Raises:
    ///     BusyError: exported through DLPack, or in use by another thread.
    fn numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let g = self.lock(py)?;
        let Held::Buffer(buf) = &*g else {
            return Ok(PyArray1::from_vec(py, Vec::new()));
        };
        let (gpu, foreign) = (self.gpu.clone(), self.foreign);
        let v = py
            .detach(|| -> prism_stream::Result<Vec<f32>> {
                if foreign {
                    // After the owner's writes on the legacy stream so far.
                    buf.order_after_stream(ForeignStream::LEGACY)?;
                }
                let mut lane = Lane::new(&gpu)?;
                let mut host = PinnedBuffer::<f32>::new(&gpu, buf.len(), HostAllocFlags::DEFAULT)?;
                lane.copy_dtoh(buf, 0, &mut host, 0, buf.len())?;
                Ok(host.wait_slice()?.to_vec())
            })
            .map_err(|e| {
                let msg = e.to_string();
                errors::stream_error(py, &e, msg)
            })?;
        Ok(PyArray1::from_vec(py, v))
    }

    /// ``(2, device)``: CUDA memory (DLPack's ``kDLCUDA``).
    fn __dlpack_device__(&self) -> (i32, i32) {
        (DL_CUDA, self.gpu.info().ordinal as i32)
    }

    /// A DLPack capsule over the array, for ``torch.from_dlpack`` /
    /// ``cupy.from_dlpack`` (no copy). ``stream`` is the consumer's CUDA
    /// stream (``None`` or 1: the legacy default stream; 2: the
    /// per-thread default stream; -1: none, the consumer orders itself and
    /// prism waits for its own work on the host first; 0 is refused, as
    /// DLPack says). The stream waits for prism's pending work on the
    /// GPU. From the first call on, the array is the consumers' (see the
    /// class docs); a call that fails leaves it prism's. A stream handle
    /// above 2 must be a live CUDA stream of this device's context (DLPack's
    /// contract; a stale handle is undefined behaviour in the driver, as
    /// with PyTorch and CuPy). An empty array exports a tensor of no
    /// element (null data).
    ///
    /// Raises:
    ///     BufferError: ``copy=True``, another ``dl_device``, stream 0, a
    ///         stream of another context, or a hand-over the GPU refused.
    ///     BusyError: in use by a call in another thread.
    #[pyo3(signature = (*, stream = None, max_version = None, dl_device = None, copy = None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<i64>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = max_version; // the legacy capsule, which every consumer takes
        let ordinal = self.gpu.info().ordinal as i32;
        if let Some(d) = dl_device {
            if d != (DL_CUDA, ordinal) {
                return Err(PyBufferError::new_err(format!(
                    "prism exports to its own device only ({DL_CUDA}, {ordinal}), not {d:?}"
                )));
            }
        }
        if copy == Some(true) {
            return Err(PyBufferError::new_err(
                "prism exports without a copy (copy=True asked for one)",
            ));
        }
        let foreign = match stream {
            None | Some(1) => Some(ForeignStream::LEGACY),
            Some(2) => Some(ForeignStream::PER_THREAD),
            Some(-1) => None,
            Some(0) => {
                return Err(PyBufferError::new_err(
                    "stream 0 is ambiguous for CUDA (DLPack disallows it): pass 1 for the legacy default stream or 2 for the per-thread one",
                ))
            }
            Some(s) if s > 2 => {
                #[allow(unsafe_code)] // the DLPack hand-over (Cargo.toml's lint note)
                let f = {
                    // SAFETY: DLPack's contract for `stream`: the consumer's
                    // live stream, used by prism only within this call.
                    unsafe { ForeignStream::from_raw(s as usize) }
                };
                Some(f.map_err(|e| PyBufferError::new_err(e.to_string()))?)
            }
            Some(s) => {
                return Err(PyBufferError::new_err(format!(
                    "stream {s} is no CUDA stream handle"
                )))
            }
        };
        let mut g = self.try_held(py)?;
        let buffer_error = |e: prism_stream::Error| PyBufferError::new_err(e.to_string());
        let export = match std::mem::replace(&mut *g, Held::Empty) {
            // Zero elements: no memory to share, nothing to order.
            Held::Empty => return dlpack::export_capsule(py, None, ordinal),
            Held::Exported(e) => {
                *g = Held::Exported(Arc::clone(&e));
                drop(g);
                // May wait on the host (stream -1, fallbacks): without the GIL.
                py.detach(|| e.share_with(foreign)).map_err(buffer_error)?;
                return dlpack::export_capsule(py, Some(e), ordinal);
            }
            Held::Buffer(b) => match b.export() {
                Ok(e) => e,
                Err(refused) => {
                    let msg = refused.error.to_string();
                    *g = Held::Buffer(refused.value);
                    return Err(PyBufferError::new_err(msg));
                }
            },
        };
        // The first consumer: the array stays prism's unless it is ordered.
        // Without the GIL (it may wait on the host); the lock stays held,
        // and every other taker of it only tries it.
        if let Err(e) = py.detach(|| export.share_with(foreign)) {
            *g = match export.reclaim() {
                Ok(b) => Held::Buffer(b),
                Err(still) => Held::Exported(Arc::new(still)),
            };
            return Err(buffer_error(e));
        }
        let export = Arc::new(export);
        *g = Held::Exported(Arc::clone(&export));
        self.exported.store(true, Ordering::Release);
        drop(g);
        dlpack::export_capsule(py, Some(export), ordinal)
    }

    fn __repr__(&self) -> String {
        format!(
            "DeviceArray(len={}, dtype=float32, device=cuda:{}{}{})",
            self.len,
            self.gpu.info().ordinal,
            if self.foreign { ", from_dlpack" } else { "" },
            if self.exported() { ", exported" } else { "" }
        )
    }
}

impl Drop for DeviceArray {
    /// Freeing waits for the GPU's uses: without the GIL where one is held.
    fn drop(&mut self) {
        let held = std::mem::replace(
            self.held.get_mut().unwrap_or_else(|p| p.into_inner()),
            Held::Empty,
        );
        if matches!(held, Held::Empty) {
            return;
        }
        let mut held = Some(held);
        let _ = Python::try_attach(|py| {
            let h = held.take();
            py.detach(move || drop(h));
        });
        drop(held);
    }
}

/// ``prism.from_dlpack(tensor)``: a CUDA tensor (PyTorch, CuPy, anything
/// with ``__dlpack__``) as a ``DeviceArray`` over the same memory, no
/// copy. The tensor must be float32 and C-contiguous; prism's first use
/// waits on the GPU for the producer's pending writes.
///
/// Raises:
///     TypeError: no ``__dlpack__``, or not float32.
///     ValueError: not C-contiguous.
///     BufferError: not in CUDA memory.
///     ForeignMemoryError: memory the driver does not know as this device's.
#[pyfunction]
pub(crate) fn from_dlpack(py: Python<'_>, tensor: &Bound<'_, PyAny>) -> PyResult<DeviceArray> {
    let Some((t, id)) = dlpack::device_of(tensor)? else {
        return Err(pyo3::exceptions::PyTypeError::new_err(
            "from_dlpack needs an object with __dlpack__ and __dlpack_device__ (a PyTorch or CuPy tensor)",
        ));
    };
    if t != DL_CUDA && t != DL_CUDA_MANAGED {
        return Err(PyBufferError::new_err(format!(
            "the tensor is on DLPack device type {t}, not CUDA memory: pass host arrays to run() as they are"
        )));
    }
    let ordinal = usize::try_from(id)
        .map_err(|_| PyValueError::new_err(format!("CUDA device {id} does not exist")))?;
    let gpu = py.detach(move || Gpu::open(ordinal)).map_err(|e| {
        let msg = e.to_string();
        errors::stream_error(py, &e, msg)
    })?;
    from_cuda_tensor(py, &gpu, tensor)
}

/// Internal, for tests: what the DLPack import reads from any object's
/// capsule (host arrays included): ``(address, elements, device type,
/// device id)``. The capsule is taken and its tensor deleted at once.
#[pyfunction]
pub(crate) fn _dlpack_info(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
) -> PyResult<(u64, usize, i32, i32)> {
    let t = dlpack::import(py, obj, None)?;
    Ok((t.ptr, t.len, t.device_type, t.device_id))
}
