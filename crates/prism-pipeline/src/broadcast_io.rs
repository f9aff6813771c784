//! A [`Sink`] into a prism-buffer [`Broadcast`](prism_buffer::broadcast::Broadcast)
//! ring and a [`Source`] out of one: a stream's output goes to several
//! readers at their own pace ([`to_broadcast`]), and a pipeline can read one
//! ring's chunks ([`from_broadcast`]).
//!
//! Each output chunk of [`run_stream`](crate::PipelineStageManager::run_stream)
//! becomes one chunk of the ring (one copy, from the download slot into
//! the ring's buffer), numbered and stamped by the ring; the ring's mode
//! decides whether the run waits for slow guaranteed readers
//! ([`Mode::Block`](prism_buffer::broadcast::Mode::Block)) or never does
//! ([`Mode::RealTime`](prism_buffer::broadcast::Mode::RealTime)).

use std::sync::Arc;

use prism_buffer::broadcast::{Meta, Reader, Writer};
use prism_stream::Element;

use crate::dag_stream::{TaggedSink, TaggedSource};
use crate::source::{BoxError, Sink, Source};

/// A sink that commits each output chunk into a broadcast ring (see
/// [`to_broadcast`]).
#[derive(Debug)]
pub struct BroadcastSink<T, H = ()> {
    writer: Writer<T, H>,
    /// The incoming sequence (its number and header) the ring's current
    /// sequence stands for, in a tagged run.
    passing: Option<(u64, Arc<H>)>,
}

/// A sink committing each output chunk, whole, as one chunk of the ring
/// `writer` writes (a copy into the ring's buffer). An output chunk longer
/// than the ring's buffers fails the run
/// ([`prism_buffer::Error::CommitTooLong`]). The ring stays open after the
/// run: drop the sink (or [`into_writer`](BroadcastSink::into_writer) and
/// close) to end its readers' streams; pass `&mut sink` to keep it over
/// several runs.
pub fn to_broadcast<T, H>(writer: Writer<T, H>) -> BroadcastSink<T, H> {
    BroadcastSink {
        writer,
        passing: None,
    }
}

impl<T, H> BroadcastSink<T, H> {
    /// The ring's writer (to begin a new sequence between runs).
    pub fn writer(&mut self) -> &mut Writer<T, H> {
        &mut self.writer
    }

    /// The writer back.
    pub fn into_writer(self) -> Writer<T, H> {
        self.writer
    }
}

impl<T: Element + Default, H> Sink<T> for BroadcastSink<T, H> {
    fn accept(&mut self, _chunk: u64, data: &[T]) -> Result<(), BoxError> {
        self.writer.write(data)?;
        Ok(())
    }
}

/// In a tagged run ([`run_graph_stream`](crate::PipelineStageManager::run_graph_stream)),
/// the chunks' ring metadata passes sequences on: the first chunk of each
/// incoming sequence begins a sequence of this ring with the same header
/// (its chunks are numbered and stamped by this ring).
impl<T: Element + Default, H> TaggedSink<T, Meta<H>> for BroadcastSink<T, H> {
    fn accept(&mut self, meta: &Meta<H>, data: &[T]) -> Result<(), BoxError> {
        // A new incoming sequence: its first chunk, or another number or
        // header than the one passing (a sink kept over runs from several
        // rings sees each ring's sequence 0).
        let same = self.passing.as_ref().is_some_and(|(seq, header)| {
            *seq == meta.sequence && Arc::ptr_eq(header, &meta.header)
        });
        if meta.index == 0 || !same {
            self.writer.begin_sequence_shared(meta.header.clone());
            self.passing = Some((meta.sequence, Arc::clone(&meta.header)));
        }
        self.writer.write(data)?;
        Ok(())
    }
}

/// A source reading a broadcast ring's chunks (see [`from_broadcast`]).
#[derive(Debug)]
pub struct BroadcastSource<T, H = ()> {
    reader: Reader<T, H>,
    /// The rest of a ring chunk longer than the pipeline's chunk.
    rest: Vec<T>,
    offset: usize,
}

/// A source whose chunks are `reader`'s chunks: each ring chunk becomes one
/// pipeline chunk (one copy into the upload slot), a ring chunk longer
/// than the pipeline's chunk is cut into several, empty ones are skipped.
/// It waits for chunks as [`Reader::read`] does and ends the stream when
/// the ring is closed (its writer is gone, or every handle that could make
/// it went first) and the reader has read everything. The
/// chunks' metadata does not travel through the pipeline.
pub fn from_broadcast<T, H>(reader: Reader<T, H>) -> BroadcastSource<T, H> {
    BroadcastSource {
        reader,
        rest: Vec::new(),
        offset: 0,
    }
}

impl<T, H> BroadcastSource<T, H> {
    /// The reader (its stats).
    pub fn reader(&self) -> &Reader<T, H> {
        &self.reader
    }

    /// The reader back (the rest of a chunk cut in several is lost).
    pub fn into_reader(self) -> Reader<T, H> {
        self.reader
    }
}

/// In a tagged run each ring chunk is one chunk with its metadata (a ring
/// chunk longer than the pipeline's chunk fails the run: it cannot be cut
/// without repeating its metadata).
impl<T: Element, H> TaggedSource<T, Meta<H>> for BroadcastSource<T, H> {
    fn fill(&mut self, dst: &mut [T]) -> Result<Option<(usize, Meta<H>)>, BoxError> {
        loop {
            let Some(chunk) = self.reader.read() else {
                return Ok(None);
            };
            if chunk.is_empty() {
                continue;
            }
            if chunk.len() > dst.len() {
                return Err(format!(
                    "a ring chunk of {} elements is longer than the pipeline's chunk ({})",
                    chunk.len(),
                    dst.len()
                )
                .into());
            }
            dst[..chunk.len()].copy_from_slice(&chunk);
            return Ok(Some((chunk.len(), chunk.meta().clone())));
        }
    }
}

impl<T: Element, H> Source<T> for BroadcastSource<T, H> {
    fn fill(&mut self, dst: &mut [T]) -> Result<usize, BoxError> {
        if self.offset < self.rest.len() {
            let n = (self.rest.len() - self.offset).min(dst.len());
            dst[..n].copy_from_slice(&self.rest[self.offset..self.offset + n]);
            self.offset += n;
            return Ok(n);
        }
        loop {
            let Some(chunk) = self.reader.read() else {
                return Ok(0);
            };
            if chunk.is_empty() {
                continue;
            }
            let n = chunk.len().min(dst.len());
            dst[..n].copy_from_slice(&chunk[..n]);
            if n < chunk.len() {
                self.rest.clear();
                self.rest.extend_from_slice(&chunk[n..]);
                self.offset = 0;
            }
            return Ok(n);
        }
    }
}
