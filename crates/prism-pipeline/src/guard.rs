//! User code (stages, sources, sinks) called under `catch_unwind`: its
//! error or panic becomes a typed error that names the chunk, on both
//! backends, so one bad callback never unwinds through a ring with chunks
//! in flight.

use std::panic::{catch_unwind, AssertUnwindSafe};

use prism_stream::Element;

use crate::error::{Error, Result, StageError};
use crate::source::{BoxError, Sink, Source};
use crate::stage::Stage;

/// The message of a caught panic.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic with a non-string payload)".to_owned()
    }
}

/// `stage.output_len(len)`; a panic is `StagePanicked`.
pub(crate) fn output_len<T: Element>(
    stage: &dyn Stage<T>,
    len: usize,
    chunk: u64,
) -> Result<usize> {
    catch_unwind(AssertUnwindSafe(|| stage.output_len(len))).map_err(|payload| {
        Error::StagePanicked {
            stage: stage.name().to_owned(),
            chunk,
            message: panic_message(&*payload),
        }
    })
}

/// True when `stage` makes as many elements as it gets, at `chunk` and at
/// 1 (so chunk boundaries may move freely); a panic in its `output_len`
/// answers false (the run asks again, caught, and reports it).
pub(crate) fn keeps_length<T: Element>(stage: &dyn Stage<T>, chunk: usize) -> bool {
    catch_unwind(AssertUnwindSafe(|| {
        stage.output_len(chunk) == chunk && stage.output_len(1) == 1
    }))
    .unwrap_or(false)
}

/// Runs `work` on `stage` (its `gpu` form): an error is `Error::Stage`, a
/// panic `StagePanicked`, both naming the stage and chunk.
pub(crate) fn run_stage<T: Element>(
    stage: &mut dyn Stage<T>,
    chunk: u64,
    work: impl FnOnce(&mut dyn Stage<T>) -> std::result::Result<(), StageError>,
) -> Result<()> {
    let outcome = catch_unwind(AssertUnwindSafe(|| work(&mut *stage)));
    stage_outcome(stage.name(), chunk, outcome)
}

/// Runs `work` on a shared `stage` (its `host` form), as [`run_stage`].
pub(crate) fn run_host_stage<T: Element>(
    stage: &dyn Stage<T>,
    chunk: u64,
    work: impl FnOnce(&dyn Stage<T>) -> std::result::Result<(), StageError>,
) -> Result<()> {
    let outcome = catch_unwind(AssertUnwindSafe(|| work(stage)));
    stage_outcome(stage.name(), chunk, outcome)
}

/// Runs user code of the node or stage named `name` (a join's, say): an
/// error is `Error::Stage`, a panic `StagePanicked`, both naming it and
/// the chunk.
pub(crate) fn run_named(
    name: &str,
    chunk: u64,
    work: impl FnOnce() -> std::result::Result<(), StageError>,
) -> Result<()> {
    stage_outcome(name, chunk, catch_unwind(AssertUnwindSafe(work)))
}

/// A stage call's outcome as the pipeline reports it.
fn stage_outcome(
    stage: &str,
    chunk: u64,
    outcome: std::thread::Result<std::result::Result<(), StageError>>,
) -> Result<()> {
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(Error::Stage {
            stage: stage.to_owned(),
            chunk,
            source,
        }),
        Err(payload) => Err(Error::StagePanicked {
            stage: stage.to_owned(),
            chunk,
            message: panic_message(&*payload),
        }),
    }
}

/// A source's code for chunk `chunk`, caught: an error is `Error::Source`,
/// a panic `SourcePanicked`.
pub(crate) fn catch_source<R>(
    chunk: u64,
    call: impl FnOnce() -> std::result::Result<R, BoxError>,
) -> Result<R> {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(source)) => Err(Error::Source { chunk, source }),
        Err(payload) => Err(Error::SourcePanicked {
            chunk,
            message: panic_message(&*payload),
        }),
    }
}

/// A source that reported `n` elements written into `room`: past it is a
/// source error.
pub(crate) fn check_filled(chunk: u64, n: usize, room: usize) -> Result<usize> {
    if n <= room {
        return Ok(n);
    }
    Err(Error::Source {
        chunk,
        source: format!("fill reported {n} elements written into a chunk of {room}").into(),
    })
}

/// `source.fill(dst)` for chunk `chunk`: a failure is `Error::Source`, a
/// panic `SourcePanicked`, and a count past `dst` a source error too.
pub(crate) fn fill<T, S: Source<T>>(source: &mut S, dst: &mut [T], chunk: u64) -> Result<usize> {
    let room = dst.len();
    let n = catch_source(chunk, || source.fill(dst))?;
    check_filled(chunk, n, room)
}

/// Calls a sink for `chunk`; a panic is `SinkPanicked`.
pub(crate) fn catch_sink(chunk: u64, deliver: impl FnOnce() -> Result<()>) -> Result<()> {
    catch_unwind(AssertUnwindSafe(deliver)).unwrap_or_else(|payload| {
        Err(Error::SinkPanicked {
            chunk,
            message: panic_message(&*payload),
        })
    })
}

/// `sink.accept(chunk, data)`: a failure is `Error::Sink`, a panic
/// `SinkPanicked`.
pub(crate) fn accept<T, K: Sink<T>>(sink: &mut K, chunk: u64, data: &[T]) -> Result<()> {
    catch_sink(chunk, || {
        sink.accept(chunk, data)
            .map_err(|source| Error::Sink { chunk, source })
    })
}
