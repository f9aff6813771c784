//! Stage graphs over streams whose chunks carry metadata
//! ([`PipelineStageManager::run_graph_stream`](crate::PipelineStageManager::run_graph_stream)): a [`TaggedSource`] gives
//! each chunk with its metadata `M` (a sequence number, a timestamp, an
//! observation's header: any type), the chunk goes through every node of
//! the graph, and every output's [`TaggedSink`] receives the chunk's part
//! with the same metadata, in input order. Host memory stays bounded by
//! the ring, whatever the stream's length.

use prism_stream::Element;

use crate::dag::StageGraph;
use crate::error::{Error, Result};
use crate::guard;
use crate::source::BoxError;
use crate::source::StreamCounts;

/// Where a tagged stream's input comes from: chunks, each with its
/// metadata.
pub trait TaggedSource<T, M> {
    /// Writes the next chunk into the front of `dst` (one chunk long) and
    /// returns its length and metadata; `None` (or a length of 0) ends the
    /// stream.
    fn fill(&mut self, dst: &mut [T]) -> std::result::Result<Option<(usize, M)>, BoxError>;
}

/// Where one output of a tagged stream goes: each chunk's part, with the
/// chunk's metadata, in input order.
pub trait TaggedSink<T, M> {
    /// Takes the output part of the chunk tagged `meta` (valid for the call).
    fn accept(&mut self, meta: &M, data: &[T]) -> std::result::Result<(), BoxError>;
}

impl<T, M, S: TaggedSource<T, M> + ?Sized> TaggedSource<T, M> for &mut S {
    fn fill(&mut self, dst: &mut [T]) -> std::result::Result<Option<(usize, M)>, BoxError> {
        (**self).fill(dst)
    }
}

impl<T, M, K: TaggedSink<T, M> + ?Sized> TaggedSink<T, M> for &mut K {
    fn accept(&mut self, meta: &M, data: &[T]) -> std::result::Result<(), BoxError> {
        (**self).accept(meta, data)
    }
}

/// A tagged source from a closure `f(slot) -> Ok(Some((len, meta)))`;
/// `Ok(None)` ends the stream.
pub fn tagged_source<T, M, F>(f: F) -> TaggedFn<F>
where
    F: FnMut(&mut [T]) -> std::result::Result<Option<(usize, M)>, BoxError>,
{
    TaggedFn(f)
}

/// A tagged sink from a closure `f(meta, data)`.
pub fn tagged_sink<T, M, F>(f: F) -> TaggedFn<F>
where
    F: FnMut(&M, &[T]) -> std::result::Result<(), BoxError>,
{
    TaggedFn(f)
}

/// A tagged source or sink made from a closure ([`tagged_source`], [`tagged_sink`]).
pub struct TaggedFn<F>(F);

impl<F> std::fmt::Debug for TaggedFn<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TaggedFn")
    }
}

impl<T, M, F> TaggedSource<T, M> for TaggedFn<F>
where
    F: FnMut(&mut [T]) -> std::result::Result<Option<(usize, M)>, BoxError>,
{
    fn fill(&mut self, dst: &mut [T]) -> std::result::Result<Option<(usize, M)>, BoxError> {
        (self.0)(dst)
    }
}

impl<T, M, F> TaggedSink<T, M> for TaggedFn<F>
where
    F: FnMut(&M, &[T]) -> std::result::Result<(), BoxError>,
{
    fn accept(&mut self, meta: &M, data: &[T]) -> std::result::Result<(), BoxError> {
        (self.0)(meta, data)
    }
}

/// `source.fill(dst)` for chunk `chunk`, caught: an error is
/// `Error::Source`, a panic `SourcePanicked`, a length past `dst` a
/// source error. `None`: the stream ended.
pub(crate) fn fill<T, M, S: TaggedSource<T, M>>(
    source: &mut S,
    dst: &mut [T],
    chunk: u64,
) -> Result<Option<(usize, M)>> {
    let room = dst.len();
    match guard::catch_source(chunk, || source.fill(dst))? {
        Some((0, _)) | None => Ok(None),
        Some((n, m)) => Ok(Some((guard::check_filled(chunk, n, room)?, m))),
    }
}

/// Hands output `k`'s part of chunk `chunk` to its sink, caught: an error
/// is `Error::Sink`, a panic `SinkPanicked`.
pub(crate) fn accept<T, M, K: TaggedSink<T, M>>(
    sink: &mut K,
    chunk: u64,
    meta: &M,
    data: &[T],
) -> Result<()> {
    guard::catch_sink(chunk, || {
        sink.accept(meta, data)
            .map_err(|source| Error::Sink { chunk, source })
    })
}

impl<T: Element> crate::PipelineStageManager<T> {
    /// The host backend of a tagged stream: up to `slots` chunks filled on
    /// the calling thread, run at once on the manager's threads, delivered
    /// in order; then the next batch. Returns the counts and a source
    /// failure that ended the input, if any.
    pub(crate) fn run_graph_stream_host<M, S, K>(
        &mut self,
        graph: &StageGraph<T>,
        run: &crate::dag::GraphRun,
        mut source: S,
        sinks: &mut [K],
    ) -> Result<(StreamCounts, Option<Error>)>
    where
        S: TaggedSource<T, M>,
        K: TaggedSink<T, M>,
    {
        use rayon::prelude::*;
        let zero = prism_stream::zeroed_vec::<T>(1)[0];
        let batch = self.config.slots.max(1);
        let mut counts = StreamCounts::default();
        let mut failed = None;
        let times = crate::dag::NodeTimes::new(graph);
        let mut bufs: Vec<Vec<T>> = Vec::new();
        let mut next = 0u64;
        while failed.is_none() {
            // Fill a batch.
            let mut filled: Vec<(u64, Vec<T>)> = Vec::with_capacity(batch);
            let mut metas: Vec<M> = Vec::with_capacity(batch);
            while filled.len() < batch {
                let mut buf = bufs.pop().unwrap_or_default();
                crate::host::size_slot(&mut buf, run.chunk, zero)?;
                match fill(&mut source, &mut buf, next) {
                    Ok(Some((n, m))) => {
                        buf.truncate(n);
                        counts.elements_in += n as u64;
                        filled.push((next, buf));
                        metas.push(m);
                        next += 1;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if filled.is_empty() {
                break;
            }
            let last = filled.len() < batch;
            let plan = &run.plan;
            let times = &times;
            let work = |(c, input): &(u64, Vec<T>)| -> Result<Vec<Vec<T>>> {
                let lens = graph.output_lens(&graph.lengths(plan, input.len(), *c)?);
                let mut outs: Vec<Vec<T>> = lens.iter().map(|&l| vec![zero; l]).collect();
                let mut dsts: Vec<&mut [T]> = outs.iter_mut().map(|o| &mut o[..]).collect();
                graph.run_host_chunk(plan, input, &mut dsts, *c, times)?;
                Ok(outs)
            };
            let results: Vec<Result<Vec<Vec<T>>>> = match self.copy_pool.pool() {
                Some(pool) => pool.install(|| filled.par_iter().map(work).collect()),
                None => filled.iter().map(work).collect(),
            };
            for (((c, input), meta), outs) in filled.into_iter().zip(metas).zip(results) {
                let outs = outs?;
                for (sink, out) in sinks.iter_mut().zip(&outs) {
                    counts.elements_out += out.len() as u64;
                    accept(sink, c, &meta, out)?;
                }
                counts.chunks += 1;
                bufs.push(input);
            }
            if last {
                break;
            }
        }
        times.into_stats(graph, &mut self.stats);
        Ok((counts, failed))
    }
}
