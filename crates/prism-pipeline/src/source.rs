//! Sources and sinks of [`PipelineStageManager::run_stream`](crate::PipelineStageManager::run_stream):
//! input that arrives chunk by chunk and output delivered chunk by chunk, in
//! input order, with host memory bounded by the ring whatever the stream's
//! length.
//!
//! A [`Source`] fills the pinned upload slot in place (`fill` gets the slot
//! itself), a [`Sink`] reads the pinned download slot in place: the
//! closure forms ([`fill_with`], [`sink_fn`]) cost no host copy; the
//! adapters ([`from_iter`] for iterators and channels of slices or `Vec`s,
//! [`from_read`] for a `std::io::Read` of raw elements, [`to_write`] for a
//! `std::io::Write`) copy once.

use std::io::{Read, Write};

use prism_stream::{as_bytes, as_bytes_mut, Element};

/// The error a source or sink reports (any error type).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Where a stream's input comes from.
pub trait Source<T> {
    /// Writes the next input into the front of `dst` (the pinned upload
    /// slot, one chunk long) and returns how many elements it wrote; `0`
    /// ends the stream. A chunk is whatever one call returns.
    fn fill(&mut self, dst: &mut [T]) -> Result<usize, BoxError>;
}

/// Where a stream's output goes, chunk by chunk in input order.
pub trait Sink<T> {
    /// Takes output chunk `chunk` (the pinned download slot; valid for the call).
    fn accept(&mut self, chunk: u64, data: &[T]) -> Result<(), BoxError>;
}

impl<T, S: Source<T> + ?Sized> Source<T> for &mut S {
    fn fill(&mut self, dst: &mut [T]) -> Result<usize, BoxError> {
        (**self).fill(dst)
    }
}

impl<T, K: Sink<T> + ?Sized> Sink<T> for &mut K {
    fn accept(&mut self, chunk: u64, data: &[T]) -> Result<(), BoxError> {
        (**self).accept(chunk, data)
    }
}

/// A source from a closure that fills the slot in place (no copy).
pub struct FillWith<F>(F);

impl<F> std::fmt::Debug for FillWith<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FillWith")
    }
}

/// A source from `f(slot) -> Ok(elements written)`; `Ok(0)` ends the stream.
pub fn fill_with<T, E, F>(f: F) -> FillWith<F>
where
    F: FnMut(&mut [T]) -> Result<usize, E>,
    E: Into<BoxError>,
{
    FillWith(f)
}

impl<T, E: Into<BoxError>, F: FnMut(&mut [T]) -> Result<usize, E>> Source<T> for FillWith<F> {
    fn fill(&mut self, dst: &mut [T]) -> Result<usize, BoxError> {
        let n = (self.0)(dst).map_err(Into::into)?;
        if n > dst.len() {
            return Err(format!(
                "a fill_with source reported {n} elements written into a slot of {}",
                dst.len()
            )
            .into());
        }
        Ok(n)
    }
}

/// A source from an iterator (or a channel's receiver) of slices or `Vec`s.
/// Consecutive items are packed into full chunks; an item longer than a
/// chunk is split; empty items are skipped. A chunk is sent when it is
/// full or the iterator ends: from a channel, items wait until a chunk's
/// worth has arrived (send chunk-sized items for low latency).
pub struct IterSource<I, C> {
    iter: I,
    current: Option<C>,
    offset: usize,
}

impl<I, C> std::fmt::Debug for IterSource<I, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IterSource")
            .field("offset", &self.offset)
            .finish()
    }
}

/// See [`IterSource`]. `from_iter(receiver)` reads a `std::sync::mpsc` channel.
pub fn from_iter<I: IntoIterator>(iter: I) -> IterSource<I::IntoIter, I::Item> {
    IterSource {
        iter: iter.into_iter(),
        current: None,
        offset: 0,
    }
}

impl<T: Copy, C: AsRef<[T]>, I: Iterator<Item = C>> Source<T> for IterSource<I, C> {
    fn fill(&mut self, dst: &mut [T]) -> Result<usize, BoxError> {
        let mut n = 0;
        while n < dst.len() {
            let item = match &self.current {
                Some(c) if self.offset < c.as_ref().len() => c,
                _ => match self.iter.next() {
                    Some(c) => {
                        self.current = Some(c);
                        self.offset = 0;
                        continue;
                    }
                    None => break,
                },
            };
            let rest = &item.as_ref()[self.offset..];
            let take = rest.len().min(dst.len() - n);
            dst[n..n + take].copy_from_slice(&rest[..take]);
            n += take;
            self.offset += take;
        }
        Ok(n)
    }
}

/// A source reading raw elements (native byte order) from a `std::io::Read`.
#[derive(Debug)]
pub struct ReadSource<R>(R);

/// See [`ReadSource`]. Input whose length is not a whole number of
/// elements is an error.
pub fn from_read<R: Read>(r: R) -> ReadSource<R> {
    ReadSource(r)
}

impl<T: Element, R: Read> Source<T> for ReadSource<R> {
    fn fill(&mut self, dst: &mut [T]) -> Result<usize, BoxError> {
        let bytes = as_bytes_mut(dst);
        let mut n = 0;
        while n < bytes.len() {
            match self.0.read(&mut bytes[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let size = std::mem::size_of::<T>();
        if n % size != 0 {
            return Err(format!(
                "the input ended inside an element: {n} bytes read, elements are {size} bytes"
            )
            .into());
        }
        Ok(n / size)
    }
}

/// A sink from a closure handed each output chunk in place (no copy).
pub struct SinkFn<F>(F);

impl<F> std::fmt::Debug for SinkFn<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SinkFn")
    }
}

/// A sink from `f(chunk index, output)`.
pub fn sink_fn<T, E, F>(f: F) -> SinkFn<F>
where
    F: FnMut(u64, &[T]) -> Result<(), E>,
    E: Into<BoxError>,
{
    SinkFn(f)
}

impl<T, E: Into<BoxError>, F: FnMut(u64, &[T]) -> Result<(), E>> Sink<T> for SinkFn<F> {
    fn accept(&mut self, chunk: u64, data: &[T]) -> Result<(), BoxError> {
        (self.0)(chunk, data).map_err(Into::into)
    }
}

/// A sink writing raw elements (native byte order) to a `std::io::Write`.
#[derive(Debug)]
pub struct WriteSink<W>(W);

/// See [`WriteSink`].
pub fn to_write<W: Write>(w: W) -> WriteSink<W> {
    WriteSink(w)
}

impl<W> WriteSink<W> {
    /// The writer back.
    pub fn into_inner(self) -> W {
        self.0
    }
}

impl<T: Element, W: Write> Sink<T> for WriteSink<W> {
    fn accept(&mut self, _chunk: u64, data: &[T]) -> Result<(), BoxError> {
        self.0.write_all(as_bytes(data))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iter_source_packs_splits_and_skips_empty_items() {
        let items: Vec<Vec<u32>> =
            vec![vec![], vec![1, 2, 3], vec![], vec![4], vec![5, 6, 7, 8, 9]];
        let mut s = from_iter(items);
        let mut out = Vec::new();
        let mut buf = [0u32; 4];
        loop {
            let n = s.fill(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.push(buf[..n].to_vec());
        }
        assert_eq!(out, vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9]]);
    }

    #[test]
    fn read_source_rejects_a_torn_element() {
        let bytes: Vec<u8> = vec![0, 0, 128, 63, 1];
        let mut s = from_read(&bytes[..]);
        let mut buf = [0f32; 4];
        assert!(Source::<f32>::fill(&mut s, &mut buf).is_err());
        let mut s = from_read(&bytes[..4]);
        assert_eq!(Source::<f32>::fill(&mut s, &mut buf).unwrap(), 1);
        assert_eq!(buf[0], 1.0);
    }

    #[test]
    fn write_sink_writes_native_bytes() {
        let mut w = to_write(Vec::new());
        Sink::<u16>::accept(&mut w, 0, &[1, 2]).unwrap();
        assert_eq!(
            w.into_inner(),
            [1u16.to_ne_bytes(), 2u16.to_ne_bytes()].concat()
        );
    }

    #[test]
    fn a_fill_closure_cannot_claim_more_than_the_slot() {
        let mut s = fill_with(|d: &mut [u8]| Ok::<_, BoxError>(d.len() + 1));
        assert!(s.fill(&mut [0u8; 4]).is_err());
    }
}

/// What a stream run moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamCounts {
    /// Chunks delivered to the sink.
    pub chunks: u64,
    /// Input elements the source gave.
    pub elements_in: u64,
    /// Output elements the sink received.
    pub elements_out: u64,
}

impl From<prism_buffer::engine::RunCounts> for StreamCounts {
    /// One device's counts of a streamed run.
    fn from(c: prism_buffer::engine::RunCounts) -> Self {
        Self {
            chunks: c.chunks,
            elements_in: c.elems_in,
            elements_out: c.elems_out,
        }
    }
}

/// The output of one chunk of `execute_iteration`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkOutput<T> {
    /// The chunk's position among the submissions (0 for the first since
    /// the last `flush`).
    pub index: u64,
    /// Its output, or `None` for a chunk submitted with
    /// [`execute_iteration_pinned`](crate::PipelineStageManager::execute_iteration_pinned)
    /// (its output is in the buffer passed then, readable now).
    pub data: Option<Vec<T>>,
}
