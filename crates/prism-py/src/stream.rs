//! `Pipeline.run_stream`: prism's `run_stream` on a worker thread, its
//! source pulling items from a Python iterator (with the GIL, on the
//! worker), its sink handing outputs to the Python iterator through a
//! bounded channel.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::JoinHandle;

use numpy::{PyArray1, PyArrayMethods};
use prism_pipeline::{BoxError, Error as PipelineError, Source, StreamCounts};
use pyo3::prelude::*;
use pyo3::types::PyIterator;

use crate::convert::contiguous_f32;
use crate::errors::{self, pipeline_error};
use crate::{Manager, Shared};

/// What the worker sends: outputs in order, then the run's result.
enum Msg {
    Out(Vec<f32>),
    End(Result<StreamCounts, PipelineError>),
}

/// A Python exception raised while pulling an item, kept for the iterator.
type Raised = Arc<Mutex<Option<PyErr>>>;

/// The source: one item of the Python iterator per chunk.
struct PySource {
    iter: Py<PyIterator>,
    item: u64,
    raised: Raised,
    closed: Arc<AtomicBool>,
}

impl PySource {
    fn pull(&mut self, py: Python<'_>, dst: &mut [f32]) -> PyResult<usize> {
        let mut iter = self.iter.bind(py).clone();
        let Some(item) = iter.next() else {
            return Ok(0);
        };
        let item = item?;
        let what = format!("run_stream item {}", self.item);
        let arr = contiguous_f32(py, &item, &what)?;
        let ro = arr.try_readonly().map_err(|e| {
            pyo3::exceptions::PyValueError::new_err(format!("{what} cannot be read: {e}"))
        })?;
        let src = ro
            .as_slice()
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("{what}: {e}")))?;
        let n = src.len();
        let fields = |k: &Bound<'_, pyo3::types::PyDict>| {
            k.set_item("item", self.item)?;
            k.set_item("expected", dst.len())?;
            k.set_item("actual", n)
        };
        if n == 0 {
            return Err(errors::raise(
                py,
                "LengthError",
                format!("{what} is empty: every item must hold at least one element"),
                fields,
            ));
        }
        if n > dst.len() {
            return Err(errors::raise(
                py,
                "LengthError",
                format!(
                    "{what} has {n} elements, more than a chunk ({} elements): raise chunk_bytes",
                    dst.len()
                ),
                fields,
            ));
        }
        dst[..n].copy_from_slice(src);
        self.item += 1;
        Ok(n)
    }
}

impl Source<f32> for PySource {
    fn fill(&mut self, dst: &mut [f32]) -> Result<usize, BoxError> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(0);
        }
        Python::attach(|py| match self.pull(py, dst) {
            Ok(n) => Ok(n),
            Err(e) => {
                let msg = e.to_string();
                if let Ok(mut slot) = self.raised.lock() {
                    *slot = Some(e);
                }
                Err(msg.into())
            }
        })
    }
}

/// A stream in progress.
struct Running {
    rx: Receiver<Msg>,
    worker: Option<JoinHandle<()>>,
    raised: Raised,
    closed: Arc<AtomicBool>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // The worker's source stops pulling; its sink fails once the
        // receiver is gone (dropped with `self`).
        self.closed.store(true, Ordering::Release);
    }
}

/// Iterator over the outputs of ``Pipeline.run_stream``, one float32
/// array per input item, in order. Also a context manager that closes it.
#[pyclass(module = "prism._prism", frozen)]
pub(crate) struct StreamIter {
    state: Mutex<Option<Running>>,
}

impl std::fmt::Debug for StreamIter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamIter")
    }
}

impl StreamIter {
    /// Starts the worker on `pm` (taken out of `shared`; the worker puts it
    /// back when the run ends).
    pub(crate) fn start(
        py: Python<'_>,
        shared: Shared,
        pm: Manager,
        iter: Py<PyIterator>,
        slots: usize,
    ) -> PyResult<Self> {
        let (tx, rx) = sync_channel::<Msg>(slots.max(1));
        let raised: Raised = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let source = PySource {
            iter,
            item: 0,
            raised: Arc::clone(&raised),
            closed: Arc::clone(&closed),
        };
        let slot = Arc::clone(&shared);
        // The manager travels through a mutex so that it can come back
        // when the thread cannot start.
        let handoff = Arc::new(Mutex::new(Some(pm)));
        let theirs = Arc::clone(&handoff);
        let spawned = std::thread::Builder::new()
            .name("prism-py-stream".into())
            .spawn(move || worker(theirs, slot, source, tx));
        match spawned {
            Ok(handle) => Ok(Self {
                state: Mutex::new(Some(Running {
                    rx,
                    worker: Some(handle),
                    raised,
                    closed,
                })),
            }),
            Err(e) => {
                let pm = handoff.lock().ok().and_then(|mut g| g.take());
                if let Ok(mut g) = shared.lock() {
                    *g = pm;
                }
                Err(errors::plain(
                    py,
                    "PrismError",
                    format!("run_stream could not start its worker thread: {e}"),
                ))
            }
        }
    }

    /// The end of a run: the worker joined, the result as Python sees it.
    fn finish(
        py: Python<'_>,
        mut run: Running,
        result: Option<Result<StreamCounts, PipelineError>>,
    ) -> PyResult<()> {
        if let Some(handle) = run.worker.take() {
            // It has sent its last message (or is about to stop); its
            // source may want the GIL until then.
            let _ = py.detach(move || handle.join());
        }
        let raised = run.raised.lock().ok().and_then(|mut g| g.take());
        match result {
            Some(Ok(_)) => Ok(()),
            Some(Err(e @ PipelineError::Source { .. })) => {
                Err(raised.unwrap_or_else(|| pipeline_error(py, &e)))
            }
            Some(Err(e)) => Err(pipeline_error(py, &e)),
            None => Err(errors::plain(
                py,
                "PrismError",
                "the run_stream worker stopped without a result",
            )),
        }
    }
}

/// The worker thread: runs the stream, puts the manager back, sends the
/// result last.
fn worker(
    handoff: Arc<Mutex<Option<Manager>>>,
    shared: Shared,
    source: PySource,
    tx: SyncSender<Msg>,
) {
    let Some(mut pm) = handoff.lock().ok().and_then(|mut g| g.take()) else {
        return;
    };
    let out = tx.clone();
    let sink = prism_pipeline::sink_fn(move |_, data: &[f32]| {
        out.send(Msg::Out(data.to_vec()))
            .map_err(|_| "the run_stream iterator was closed")
    });
    let result = catch_unwind(AssertUnwindSafe(|| pm.run_stream(source, sink)))
        .unwrap_or(Err(PipelineError::WorkerPanicked));
    match shared.lock() {
        Ok(mut g) => *g = Some(pm),
        Err(poisoned) => *poisoned.into_inner() = Some(pm),
    }
    let _ = tx.send(Msg::End(result));
}

#[pymethods]
impl StreamIter {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArray1<f32>>>> {
        let mut guard = match self.state.try_lock() {
            Ok(g) => g,
            Err(TryLockError::WouldBlock) => {
                return Err(errors::plain(
                    py,
                    "BusyError",
                    "another thread is reading this run_stream iterator",
                ))
            }
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        let Some(run) = guard.as_mut() else {
            return Ok(None);
        };
        let rx = &mut run.rx;
        let msg = py.detach(move || rx.recv());
        let result = match msg {
            Ok(Msg::Out(v)) => return Ok(Some(PyArray1::from_vec(py, v))),
            Ok(Msg::End(result)) => Some(result),
            Err(_) => None,
        };
        match guard.take() {
            Some(run) => Self::finish(py, run, result).map(|()| None),
            None => Ok(None),
        }
    }

    /// Stops the stream: no more items are pulled, outputs not yet read
    /// are dropped, and the pipeline is free again when this returns.
    /// Closing an exhausted or closed iterator does nothing.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let run = match self.state.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(mut run) = run {
            run.closed.store(true, Ordering::Release);
            let handle = run.worker.take();
            drop(run); // the receiver: a blocked sink fails
            if let Some(handle) = handle {
                let _ = py.detach(move || handle.join());
            }
        }
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }
}
