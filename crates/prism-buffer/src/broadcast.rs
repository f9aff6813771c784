//! A host ring with one writer and several readers (Bifrost-style).
//!
//! A [`Broadcast`] is a ring of a fixed number of host chunk buffers. One
//! [`Writer`] fills a buffer in place ([`Writer::reserve`]) and publishes it
//! as a chunk ([`WriteGuard::commit`]); every [`Reader`] sees the chunks in
//! commit order at its own pace, sharing them without copies.
//!
//! * A [`ReaderKind::Guaranteed`] reader holds chunks back: in
//!   [`Mode::Block`] the writer waits rather than recycle a chunk that a
//!   guaranteed reader has not read yet.
//! * A [`ReaderKind::Lossy`] reader holds nothing back: a chunk recycled
//!   before it got there is skipped and counted as missed.
//! * In [`Mode::RealTime`] the writer never waits: when no buffer is free it
//!   recycles the oldest committed chunk that no read guard holds, and if a
//!   guaranteed reader had not read it yet, counts it (and its bytes) as
//!   dropped.
//!
//! **The invariant this module owns:** a reader only ever sees whole
//! committed chunks (a reserved buffer abandoned before its commit is never
//! delivered), in commit order, each at most once, and never a buffer the
//! writer is refilling (a chunk is recycled only when no read guard holds
//! it); every chunk committed after a reader joined is either delivered to
//! it, counted as missed for it, or still queued for it:
//! `delivered + missed + pending == committed - joined_at`
//! ([`ReaderStats`]); the ring never has more than [`Config::buffers`]
//! buffers of its own. All of this holds whatever the guards, readers and
//! handles become: dropped, forgotten, or left by an early return.
//!
//! Each reader holds at most one chunk at a time: the ring records which
//! chunk each reader holds (set when it reads, cleared when its guard
//! drops), and a reader's next read replaces its hold, so even a
//! [forgotten](std::mem::forget) read guard holds its chunk only until its
//! reader reads again (a live guard borrows or owns its reader: it cannot
//! read meanwhile). A ring takes at most `buffers - 2` readers
//! ([`Error::TooManyReaders`]): one buffer for the writer to fill and one
//! for the newest chunk are always left, so the real-time writer always
//! finds a buffer (it never waits) and a real-time reader always finds the
//! newest chunk.
//!
//! **What forgetting costs.** A forgotten [`WriteGuard`] costs nothing: the
//! buffer it borrowed stays with the writer and goes back at the next
//! reservation. A forgotten read guard keeps its reference to its chunk
//! for ever (a leak, as forgetting any owner of memory is): once its reader
//! has read on (or left) the chunk may be recycled, but its buffer, still
//! shared with the forgotten guard, is never reused (so nothing reachable
//! ever sees it change); the ring lets it go and allocates a replacement
//! within [`Config::buffers`] ([`Stats::buffers_allocated`] counts the
//! ring's own buffers). Each such forget leaks one buffer's memory; the
//! ring's stays bounded. A forgotten [`Reader`] (or [`OwnedReadGuard`]) is
//! a reader that never reads again: it keeps its place, its hold and, if
//! guaranteed, holds the [`Mode::Block`] writer back, as a live reader
//! that stopped reading would.
//!
//! The ring closes when its writer is gone, or when the last [`Broadcast`]
//! handle is dropped before a writer was made (none can come any more):
//! readers then read what is queued and get the end of the stream.
//!
//! Every chunk carries its [`Meta`]: its global number, its sequence
//! ([`Writer::begin_sequence`] starts a new one with a new user header),
//! its index in the sequence and its commit time.
//!
//! A poisoned lock (a thread panicked inside the ring, which its own code
//! does not do) is recovered, not propagated: the state it guards is
//! updated in single steps that a panic cannot leave half done.

use std::borrow::Borrow;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::error::Error;

/// The fewest buffers a ring takes: one being written, one for the newest
/// chunk, one per reader (and a ring without readers is of no use).
pub const MIN_BUFFERS: usize = 3;

/// What the writer does when every buffer holds a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Wait until no guaranteed reader needs the oldest chunk (lossy
    /// readers may still miss it) and no read guard holds it.
    Block,
    /// Never wait: recycle the oldest chunk no read guard holds, counting it
    /// as dropped when a guaranteed reader had not read it.
    RealTime,
}

/// How a reader relates to the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderKind {
    /// Holds chunks back until it has read them ([`Mode::Block`]); in
    /// [`Mode::RealTime`] the chunks it loses count as dropped.
    Guaranteed,
    /// Holds nothing back; skips chunks recycled before it read them.
    Lossy,
}

/// The shape of a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Host buffers of the ring, allocated when first needed and never more
    /// (at least [`MIN_BUFFERS`]).
    pub buffers: usize,
    /// Elements per buffer: the longest chunk (at least 1).
    pub chunk_capacity: usize,
    /// What the writer does when every buffer holds a chunk.
    pub mode: Mode,
}

/// A chunk's metadata, the same for every reader.
#[derive(Debug)]
pub struct Meta<H> {
    /// The chunk's global number: 0, 1, 2, ... in commit order over the
    /// ring's life, across sequences.
    pub number: u64,
    /// The sequence it belongs to: 0 from the ring's creation, then one more
    /// per [`Writer::begin_sequence`].
    pub sequence: u64,
    /// Its index within the sequence (0 for the sequence's first chunk).
    pub index: u64,
    /// When it was committed.
    pub timestamp: Instant,
    /// The sequence's user header, shared by the sequence's chunks.
    pub header: Arc<H>,
}

impl<H> Clone for Meta<H> {
    fn clone(&self) -> Self {
        Self {
            number: self.number,
            sequence: self.sequence,
            index: self.index,
            timestamp: self.timestamp,
            header: Arc::clone(&self.header),
        }
    }
}

impl<H> Meta<H> {
    /// The chunk is the first of its sequence. A lossy reader may miss that
    /// chunk: it sees a new sequence by [`sequence`](Self::sequence)
    /// changing.
    pub fn starts_sequence(&self) -> bool {
        self.index == 0
    }
}

/// One reader's counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderStats {
    /// The reader's id ([`Reader::id`]).
    pub id: u64,
    /// Its kind.
    pub kind: ReaderKind,
    /// Chunks committed before it joined (it sees the later ones only).
    pub joined_at: u64,
    /// Chunks handed to it.
    pub delivered: u64,
    /// Chunks committed after it joined that were recycled before it read
    /// them.
    pub missed: u64,
    /// Bytes of those chunks.
    pub missed_bytes: u64,
    /// Chunks queued that it has not read yet.
    /// `delivered + missed + pending == committed - joined_at`.
    pub pending: u64,
}

/// A snapshot of a ring's counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Chunks committed over the ring's life.
    pub committed_chunks: u64,
    /// Bytes of those chunks.
    pub committed_bytes: u64,
    /// Chunks recycled before every guaranteed reader had read them
    /// ([`Mode::RealTime`] only).
    pub dropped_chunks: u64,
    /// Bytes of those chunks.
    pub dropped_bytes: u64,
    /// The current sequence.
    pub sequence: u64,
    /// Chunks committed in the current sequence.
    pub sequence_committed_chunks: u64,
    /// Bytes of those chunks.
    pub sequence_committed_bytes: u64,
    /// Chunks of the current sequence dropped (as `dropped_chunks`).
    pub sequence_dropped_chunks: u64,
    /// Bytes of those chunks.
    pub sequence_dropped_bytes: u64,
    /// The ring's own buffers allocated now (never more than
    /// [`Config::buffers`]; a buffer kept by a forgotten read guard is no
    /// longer counted, and may be replaced).
    pub buffers_allocated: usize,
    /// Committed chunks still in the ring.
    pub queued: usize,
    /// The writer is gone (or every [`Broadcast`] handle went before one
    /// was made): readers get what is queued, then the end.
    pub closed: bool,
    /// Every current reader, by id.
    pub readers: Vec<ReaderStats>,
}

impl Stats {
    /// The counts of reader `id`, if it is still there.
    pub fn reader(&self, id: u64) -> Option<&ReaderStats> {
        self.readers.iter().find(|r| r.id == id)
    }
}

/// What a non-blocking or timed read found.
#[derive(Debug)]
pub enum TryRead<G> {
    /// The reader's next chunk.
    Ready(G),
    /// Nothing to read now (or the time ran out); the ring is still open.
    Empty,
    /// The ring is closed (its writer is gone, or can no longer be made)
    /// and the reader has read everything it could.
    Closed,
}

impl<G> TryRead<G> {
    /// The chunk, if one was read.
    pub fn ready(self) -> Option<G> {
        match self {
            TryRead::Ready(g) => Some(g),
            TryRead::Empty | TryRead::Closed => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Shared state

struct Chunk<T, H> {
    data: Vec<T>,
    len: usize,
    meta: Meta<H>,
}

struct ReaderState {
    kind: ReaderKind,
    /// The number of the next chunk it wants.
    next: u64,
    /// The chunk its read guard holds: set when it reads, cleared when the
    /// guard drops or, for a guard forgotten, at the reader's next read
    /// (one hold per reader, whatever its guards become).
    held: Option<u64>,
    joined_at: u64,
    delivered: u64,
    missed: u64,
    missed_bytes: u64,
}

struct State<T, H> {
    /// Buffers not in use.
    free: Vec<Vec<T>>,
    /// The ring's own buffers: `free`, the queue's and the one parked in
    /// the writer (a buffer a forgotten read guard kept is no longer
    /// counted: it was replaced).
    allocated: usize,
    /// Committed chunks still in the ring, by number (with holes where
    /// chunks were recycled out of order).
    queue: VecDeque<Arc<Chunk<T, H>>>,
    readers: BTreeMap<u64, ReaderState>,
    next_reader: u64,
    writer_taken: bool,
    /// [`Broadcast`] handles alive: the last one gone before a writer was
    /// made closes the ring (no writer can come any more).
    handles: usize,
    closed: bool,
    committed: u64,
    committed_bytes: u64,
    dropped: u64,
    dropped_bytes: u64,
    sequence: u64,
    header: Arc<H>,
    index: u64,
    seq_committed: u64,
    seq_committed_bytes: u64,
    seq_dropped: u64,
    seq_dropped_bytes: u64,
}

/// What the writer's search for a buffer found.
enum Take<T> {
    Buffer(Vec<T>),
    Allocate,
    Wait,
}

/// What a reader's poll found.
enum Next<T, H> {
    Chunk(Arc<Chunk<T, H>>),
    Empty,
    Closed,
}

/// How long a call may wait.
#[derive(Clone, Copy)]
enum Wait {
    No,
    Until(Option<Instant>),
}

impl Wait {
    fn timeout(d: Duration) -> Self {
        Wait::Until(Instant::now().checked_add(d))
    }
}

fn bytes<T>(len: usize) -> u64 {
    (len as u64).saturating_mul(std::mem::size_of::<T>() as u64)
}

impl<T, H> State<T, H> {
    /// Some reader's read guard holds chunk `n` (or held it and was
    /// forgotten, and that reader has not read since).
    fn held(&self, n: u64) -> bool {
        self.readers.values().any(|r| r.held == Some(n))
    }

    /// The smallest `next` of the readers of `kind` (any kind: `None`):
    /// chunks below it were passed by all of them.
    fn min_next(&self, kind: Option<ReaderKind>) -> u64 {
        self.readers
            .values()
            .filter(|r| kind.is_none_or(|k| r.kind == k))
            .map(|r| r.next)
            .min()
            .unwrap_or(self.committed)
    }

    /// Takes chunk `i` out of the queue and gives its buffer back, counting
    /// it as missed for every reader that had not read it, and as dropped
    /// when one of them was guaranteed. `None` when a forgotten read guard
    /// still shares the chunk: its buffer is left to that guard (never
    /// reused, so nothing reachable sees it change) and no longer counted,
    /// so that a replacement may be allocated.
    fn recycle(&mut self, i: usize) -> Option<Vec<T>> {
        let chunk = self.queue.remove(i)?;
        let n = chunk.meta.number;
        let size = bytes::<T>(chunk.len);
        let mut dropped = false;
        for r in self.readers.values_mut().filter(|r| r.next <= n) {
            r.missed += 1;
            r.missed_bytes += size;
            dropped |= r.kind == ReaderKind::Guaranteed;
        }
        if dropped {
            self.dropped += 1;
            self.dropped_bytes += size;
            if chunk.meta.sequence == self.sequence {
                self.seq_dropped += 1;
                self.seq_dropped_bytes += size;
            }
        }
        match Arc::try_unwrap(chunk) {
            Ok(c) => Some(c.data),
            // A live guard's chunk is `held` and never recycled, and a
            // guard lets go of its reference before clearing its hold: the
            // other reference is a guard that was forgotten (leaked).
            Err(_) => {
                self.allocated -= 1;
                tracing::warn!(
                    chunk = n,
                    "prism.broadcast: a forgotten read guard keeps a buffer; it will be replaced"
                );
                None
            }
        }
    }

    /// Moves every chunk that all readers have passed and no guard holds to
    /// the free list.
    fn sweep(&mut self) {
        let passed = self.min_next(None);
        let mut i = 0;
        while i < self.queue.len() && self.queue[i].meta.number < passed {
            if self.held(self.queue[i].meta.number) {
                i += 1;
            } else if let Some(b) = self.recycle(i) {
                self.free.push(b);
            }
        }
    }

    /// A buffer for the writer, by the ring's policy: a free one; else a
    /// new one while fewer than `buffers` exist; else the oldest chunk no
    /// guard holds, if no guaranteed reader needs it or the mode is
    /// real-time (a new one if a forgotten guard kept its buffer).
    ///
    /// In real time this never answers `Wait`: the writer's own buffer is
    /// back in `free` before the call, so with every buffer allocated and
    /// none free all `buffers` are queued chunks, and at most
    /// `buffers - 2` of them are held (one per reader).
    fn take(&mut self, config: &Config) -> Take<T> {
        self.sweep();
        if let Some(b) = self.free.pop() {
            return Take::Buffer(b);
        }
        if self.allocated < config.buffers {
            self.allocated += 1;
            return Take::Allocate;
        }
        let guaranteed = self.min_next(Some(ReaderKind::Guaranteed));
        let oldest = self.queue.iter().position(|c| !self.held(c.meta.number));
        if let Some(i) = oldest {
            if config.mode == Mode::RealTime || self.queue[i].meta.number < guaranteed {
                return match self.recycle(i) {
                    Some(b) => Take::Buffer(b),
                    None => {
                        self.allocated += 1;
                        Take::Allocate
                    }
                };
            }
        }
        debug_assert!(
            config.mode == Mode::Block,
            "a real-time writer found no buffer"
        );
        Take::Wait
    }

    /// Reader `id`'s next chunk, if queued.
    fn next_chunk(&mut self, id: u64) -> Next<T, H> {
        let Some(r) = self.readers.get_mut(&id) else {
            return Next::Closed;
        };
        let i = self.queue.partition_point(|c| c.meta.number < r.next);
        match self.queue.get(i) {
            Some(c) => {
                r.next = c.meta.number + 1;
                r.delivered += 1;
                // Replaces the hold of a guard that was forgotten (a live
                // one borrows or owns the reader: it cannot read meanwhile).
                r.held = Some(c.meta.number);
                Next::Chunk(Arc::clone(c))
            }
            None if self.closed => Next::Closed,
            None => Next::Empty,
        }
    }

    fn stats(&self) -> Stats {
        let readers = self
            .readers
            .iter()
            .map(|(&id, r)| ReaderStats {
                id,
                kind: r.kind,
                joined_at: r.joined_at,
                delivered: r.delivered,
                missed: r.missed,
                missed_bytes: r.missed_bytes,
                pending: self
                    .queue
                    .iter()
                    .filter(|c| c.meta.number >= r.next)
                    .count() as u64,
            })
            .collect();
        Stats {
            committed_chunks: self.committed,
            committed_bytes: self.committed_bytes,
            dropped_chunks: self.dropped,
            dropped_bytes: self.dropped_bytes,
            sequence: self.sequence,
            sequence_committed_chunks: self.seq_committed,
            sequence_committed_bytes: self.seq_committed_bytes,
            sequence_dropped_chunks: self.seq_dropped,
            sequence_dropped_bytes: self.seq_dropped_bytes,
            buffers_allocated: self.allocated,
            queued: self.queue.len(),
            closed: self.closed,
            readers,
        }
    }
}

struct Shared<T, H> {
    config: Config,
    state: Mutex<State<T, H>>,
    /// The writer waits here for a buffer (Block mode).
    space: Condvar,
    /// Readers wait here for a chunk or the end.
    data: Condvar,
}

impl<T, H> Shared<T, H> {
    fn lock(&self) -> MutexGuard<'_, State<T, H>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits on `cv` until notified or `deadline`; `None` when the deadline
    /// passed.
    fn wait<'a>(
        &self,
        cv: &Condvar,
        st: MutexGuard<'a, State<T, H>>,
        deadline: Option<Instant>,
    ) -> Option<MutexGuard<'a, State<T, H>>> {
        match deadline {
            None => Some(cv.wait(st).unwrap_or_else(PoisonError::into_inner)),
            Some(d) => {
                let left = d.checked_duration_since(Instant::now())?;
                let (st, _) = cv
                    .wait_timeout(st, left)
                    .unwrap_or_else(PoisonError::into_inner);
                Some(st)
            }
        }
    }

    /// Clears reader `id`'s hold on chunk `n` (its guard let go), then
    /// wakes the writer, which may be waiting for that buffer.
    fn release(&self, id: u64, n: u64) {
        let mut st = self.lock();
        if let Some(r) = st.readers.get_mut(&id) {
            if r.held == Some(n) {
                r.held = None;
            }
        }
        drop(st);
        self.space.notify_all();
    }
}

// ---------------------------------------------------------------------------
// The ring

/// A ring of host chunk buffers with one writer and several readers (see
/// the [module docs](self)). Cloning gives another handle to the same ring.
///
/// The handles are what can still make the writer: when the last one is
/// dropped before [`writer`](Self::writer) was called, the ring closes
/// (no writer can come any more), so its readers read to the end of the
/// stream instead of waiting for ever.
pub struct Broadcast<T, H = ()> {
    shared: Arc<Shared<T, H>>,
}

impl<T, H> Clone for Broadcast<T, H> {
    fn clone(&self) -> Self {
        self.shared.lock().handles += 1;
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T, H> Drop for Broadcast<T, H> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.handles -= 1;
        if st.handles > 0 || st.writer_taken {
            return;
        }
        st.closed = true;
        tracing::debug!("prism.broadcast: the last handle went before a writer was made; closed");
        drop(st);
        self.shared.data.notify_all();
    }
}

impl<T, H> fmt::Debug for Broadcast<T, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broadcast")
            .field("config", &self.shared.config)
            .field("stats", &self.shared.lock().stats())
            .finish()
    }
}

impl<T, H: Default> Broadcast<T, H> {
    /// A ring whose sequence 0 has the header `H::default()`.
    pub fn new(config: Config) -> Result<Self, Error> {
        Self::with_header(config, H::default())
    }
}

impl<T, H> Broadcast<T, H> {
    /// A ring whose sequence 0 has the header `header`. Fails on fewer than
    /// [`MIN_BUFFERS`] buffers, zero-length buffers, or buffers too large to
    /// allocate. Nothing is allocated yet.
    pub fn with_header(config: Config, header: H) -> Result<Self, Error> {
        let _span = tracing::debug_span!(
            "prism.broadcast.new",
            buffers = config.buffers,
            chunk_capacity = config.chunk_capacity,
            mode = ?config.mode
        )
        .entered();
        if config.buffers < MIN_BUFFERS {
            return Err(Error::TooFewBuffers {
                buffers: config.buffers,
                min: MIN_BUFFERS,
            });
        }
        if config.chunk_capacity == 0 {
            return Err(Error::ZeroLength {
                what: "a broadcast ring's chunk buffer",
            });
        }
        let fits = config
            .chunk_capacity
            .checked_mul(std::mem::size_of::<T>().max(1))
            .is_some_and(|b| b <= isize::MAX as usize);
        if !fits {
            return Err(Error::Config(
                "a broadcast ring's chunk buffer would exceed isize::MAX bytes",
            ));
        }
        let state = State {
            free: Vec::new(),
            allocated: 0,
            queue: VecDeque::new(),
            readers: BTreeMap::new(),
            next_reader: 0,
            writer_taken: false,
            handles: 1,
            closed: false,
            committed: 0,
            committed_bytes: 0,
            dropped: 0,
            dropped_bytes: 0,
            sequence: 0,
            header: Arc::new(header),
            index: 0,
            seq_committed: 0,
            seq_committed_bytes: 0,
            seq_dropped: 0,
            seq_dropped_bytes: 0,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(state),
                space: Condvar::new(),
                data: Condvar::new(),
            }),
        })
    }

    /// The ring's configuration.
    pub fn config(&self) -> Config {
        self.shared.config
    }

    /// A snapshot of the ring's counts.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats()
    }

    /// The ring's one writer; [`Error::WriterTaken`] if it was made before
    /// (even if it is gone: a ring is written once, then closed).
    pub fn writer(&self) -> Result<Writer<T, H>, Error> {
        let mut st = self.shared.lock();
        if st.writer_taken {
            return Err(Error::WriterTaken);
        }
        st.writer_taken = true;
        tracing::debug!("prism.broadcast: writer opened");
        Ok(Writer {
            shared: Arc::clone(&self.shared),
            buf: None,
        })
    }

    /// A new reader of `kind`; it sees the chunks committed from now on.
    /// [`Error::TooManyReaders`] when the ring has `buffers - 2` readers.
    pub fn reader(&self, kind: ReaderKind) -> Result<Reader<T, H>, Error> {
        let mut st = self.shared.lock();
        let max = self.shared.config.buffers - 2;
        if st.readers.len() >= max {
            return Err(Error::TooManyReaders {
                buffers: self.shared.config.buffers,
                max,
            });
        }
        let id = st.next_reader;
        st.next_reader += 1;
        let at = st.committed;
        st.readers.insert(
            id,
            ReaderState {
                kind,
                next: at,
                held: None,
                joined_at: at,
                delivered: 0,
                missed: 0,
                missed_bytes: 0,
            },
        );
        tracing::debug!(id, ?kind, joined_at = at, "prism.broadcast: reader joined");
        Ok(Reader {
            shared: Arc::clone(&self.shared),
            id,
            kind,
        })
    }
}

// ---------------------------------------------------------------------------
// Writer

/// The ring's one writer. Dropping it closes the ring: readers get what is
/// queued, then the end of the stream.
pub struct Writer<T, H = ()> {
    shared: Arc<Shared<T, H>>,
    /// The buffer reserved (a [`WriteGuard`] borrows it from here), or one
    /// whose guard was dropped or forgotten without a commit: the next
    /// reservation gives it back to the ring first, so nothing is lost.
    buf: Option<Vec<T>>,
}

impl<T, H> fmt::Debug for Writer<T, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<T, H> Drop for Writer<T, H> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        // A buffer reserved and not committed stays the ring's (counted).
        if let Some(b) = self.buf.take() {
            st.free.push(b);
        }
        st.closed = true;
        tracing::debug!(
            committed = st.committed,
            dropped = st.dropped,
            "prism.broadcast: writer closed"
        );
        drop(st);
        self.shared.data.notify_all();
    }
}

impl<T: Clone + Default, H> Writer<T, H> {
    /// A buffer to fill, waiting in [`Mode::Block`] while every buffer holds
    /// a chunk that a guaranteed reader still needs or a read guard holds
    /// (never in [`Mode::RealTime`]). A reader waiting on the same thread
    /// would wait forever.
    pub fn reserve(&mut self) -> WriteGuard<'_, T, H> {
        // Without a deadline `take` only returns with a buffer.
        while !self.take(Wait::Until(None)) {}
        WriteGuard { writer: self }
    }

    /// A buffer to fill if one can be had without waiting (always, in
    /// [`Mode::RealTime`]).
    pub fn try_reserve(&mut self) -> Option<WriteGuard<'_, T, H>> {
        self.take(Wait::No).then_some(WriteGuard { writer: self })
    }

    /// A buffer to fill, waiting at most `timeout`.
    pub fn reserve_timeout(&mut self, timeout: Duration) -> Option<WriteGuard<'_, T, H>> {
        self.take(Wait::timeout(timeout))
            .then_some(WriteGuard { writer: self })
    }

    /// Copies `data` into a buffer and commits it (waiting for a buffer as
    /// [`reserve`](Self::reserve) does). [`Error::CommitTooLong`], before
    /// any wait, when `data` does not fit a buffer.
    pub fn write(&mut self, data: &[T]) -> Result<Meta<H>, Error> {
        let capacity = self.shared.config.chunk_capacity;
        if data.len() > capacity {
            return Err(Error::CommitTooLong {
                len: data.len(),
                capacity,
            });
        }
        let mut g = self.reserve();
        g[..data.len()].clone_from_slice(data);
        g.commit(data.len())
    }

    /// Parks a buffer in `self.buf`; `false` when none came in time.
    fn take(&mut self, wait: Wait) -> bool {
        let shared = &*self.shared;
        let mut st = shared.lock();
        // The buffer of an earlier guard dropped or forgotten uncommitted.
        if let Some(b) = self.buf.take() {
            st.free.push(b);
        }
        loop {
            match st.take(&shared.config) {
                Take::Buffer(b) => {
                    self.buf = Some(b);
                    return true;
                }
                Take::Allocate => {
                    drop(st);
                    self.buf = Some(vec![T::default(); shared.config.chunk_capacity]);
                    return true;
                }
                Take::Wait => match wait {
                    Wait::No => return false,
                    Wait::Until(deadline) => match shared.wait(&shared.space, st, deadline) {
                        Some(s) => st = s,
                        None => return false,
                    },
                },
            }
        }
    }
}

impl<T, H> Writer<T, H> {
    /// Starts sequence `current + 1` with `header`: chunk indices restart at
    /// 0 and the per-sequence counts at zero. Chunks of the old sequence
    /// still queued are delivered (or dropped) as usual. Returns the new
    /// sequence's id.
    pub fn begin_sequence(&mut self, header: H) -> u64 {
        self.begin_sequence_shared(Arc::new(header))
    }

    /// [`begin_sequence`](Self::begin_sequence) with a header already
    /// shared (e.g. the header of the sequence a chunk read from another
    /// ring belongs to: a pipeline between two rings passes sequences on).
    pub fn begin_sequence_shared(&mut self, header: Arc<H>) -> u64 {
        let mut st = self.shared.lock();
        st.sequence += 1;
        st.header = header;
        st.index = 0;
        st.seq_committed = 0;
        st.seq_committed_bytes = 0;
        st.seq_dropped = 0;
        st.seq_dropped_bytes = 0;
        tracing::debug!(
            sequence = st.sequence,
            at_chunk = st.committed,
            "prism.broadcast: sequence begun"
        );
        st.sequence
    }

    /// The current sequence.
    pub fn sequence(&self) -> u64 {
        self.shared.lock().sequence
    }

    /// A snapshot of the ring's counts.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats()
    }

    /// Elements per buffer.
    pub fn chunk_capacity(&self) -> usize {
        self.shared.config.chunk_capacity
    }

    /// Closes the ring (as dropping the writer does).
    pub fn close(self) {}
}

/// A reserved buffer: derefs to all `chunk_capacity` elements (a reused
/// buffer still holds an older chunk's data). [`commit`](Self::commit)
/// publishes its front; dropping it (or forgetting it) publishes nothing
/// and the buffer goes back at the next reservation.
pub struct WriteGuard<'a, T, H = ()> {
    /// The buffer is the writer's parked one: the guard only borrows it.
    writer: &'a mut Writer<T, H>,
}

impl<T, H> fmt::Debug for WriteGuard<'_, T, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteGuard")
            .field("capacity", &self.len())
            .finish()
    }
}

impl<T, H> Deref for WriteGuard<'_, T, H> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.writer.buf.as_deref().unwrap_or_default()
    }
}

impl<T, H> DerefMut for WriteGuard<'_, T, H> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.writer.buf.as_deref_mut().unwrap_or_default()
    }
}

impl<T, H> WriteGuard<'_, T, H> {
    /// Publishes the buffer's first `len` elements as the next chunk of the
    /// current sequence and wakes the readers; returns its metadata.
    /// [`Error::CommitTooLong`] when `len` exceeds the buffer (nothing is
    /// published and the buffer goes back).
    pub fn commit(self, len: usize) -> Result<Meta<H>, Error> {
        let capacity = self.len();
        if len > capacity {
            return Err(Error::CommitTooLong { len, capacity });
        }
        let data = self.writer.buf.take().unwrap_or_default();
        let shared = &*self.writer.shared;
        let mut st = shared.lock();
        let meta = Meta {
            number: st.committed,
            sequence: st.sequence,
            index: st.index,
            timestamp: Instant::now(),
            header: Arc::clone(&st.header),
        };
        let size = bytes::<T>(len);
        st.committed += 1;
        st.committed_bytes += size;
        st.index += 1;
        st.seq_committed += 1;
        st.seq_committed_bytes += size;
        st.queue.push_back(Arc::new(Chunk {
            data,
            len,
            meta: meta.clone(),
        }));
        drop(st);
        shared.data.notify_all();
        Ok(meta)
    }
}

// ---------------------------------------------------------------------------
// Readers

/// A reader: sees the chunks committed after it joined, in commit order,
/// one at a time. Dropping it stops it holding anything back.
pub struct Reader<T, H = ()> {
    shared: Arc<Shared<T, H>>,
    id: u64,
    kind: ReaderKind,
}

impl<T, H> fmt::Debug for Reader<T, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl<T, H> Drop for Reader<T, H> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.readers.remove(&self.id);
        tracing::debug!(id = self.id, "prism.broadcast: reader left");
        drop(st);
        self.shared.space.notify_all();
    }
}

impl<T, H> Reader<T, H> {
    /// The reader's id (its entry in [`Stats::readers`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Its kind.
    pub fn kind(&self) -> ReaderKind {
        self.kind
    }

    /// A snapshot of the ring's counts.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats()
    }

    /// This reader's counts.
    pub fn reader_stats(&self) -> ReaderStats {
        let stats = self.stats();
        stats.reader(self.id).cloned().unwrap_or(ReaderStats {
            id: self.id,
            kind: self.kind,
            joined_at: 0,
            delivered: 0,
            missed: 0,
            missed_bytes: 0,
            pending: 0,
        })
    }

    /// The ring is closed (its writer is gone, or can no longer be made)
    /// and nothing is left for this reader.
    pub fn is_finished(&self) -> bool {
        let st = self.shared.lock();
        let next = st.readers.get(&self.id).map_or(u64::MAX, |r| r.next);
        st.closed && st.queue.back().is_none_or(|c| c.meta.number < next)
    }

    /// The next chunk, waiting for it; `None` once the ring is closed (the
    /// writer is gone, or every [`Broadcast`] handle went before one was
    /// made) and everything this reader could still read was read.
    pub fn read(&mut self) -> Option<ReadGuard<'_, T, H>> {
        match self.poll(Wait::Until(None)) {
            Next::Chunk(c) => Some(ChunkGuard::new(self, c)),
            Next::Empty | Next::Closed => None,
        }
    }

    /// The next chunk if one is queued, without waiting.
    pub fn try_read(&mut self) -> TryRead<ReadGuard<'_, T, H>> {
        self.poll_guard(Wait::No)
    }

    /// The next chunk, waiting at most `timeout`.
    pub fn read_timeout(&mut self, timeout: Duration) -> TryRead<ReadGuard<'_, T, H>> {
        self.poll_guard(Wait::timeout(timeout))
    }

    /// [`try_read`](Self::try_read) with a guard that owns the reader (to
    /// keep or send it elsewhere); the reader back when nothing was read
    /// ([`is_finished`](Self::is_finished) tells whether more may come).
    pub fn try_read_owned(self) -> Result<OwnedReadGuard<T, H>, Self> {
        match self.poll(Wait::No) {
            Next::Chunk(c) => Ok(ChunkGuard::new(self, c)),
            Next::Empty | Next::Closed => Err(self),
        }
    }

    /// [`read`](Self::read) with a guard that owns the reader; the reader
    /// back at the end of the stream.
    pub fn read_owned(self) -> Result<OwnedReadGuard<T, H>, Self> {
        match self.poll(Wait::Until(None)) {
            Next::Chunk(c) => Ok(ChunkGuard::new(self, c)),
            Next::Empty | Next::Closed => Err(self),
        }
    }

    fn poll_guard(&mut self, wait: Wait) -> TryRead<ReadGuard<'_, T, H>> {
        match self.poll(wait) {
            Next::Chunk(c) => TryRead::Ready(ChunkGuard::new(self, c)),
            Next::Empty => TryRead::Empty,
            Next::Closed => TryRead::Closed,
        }
    }

    fn poll(&self, wait: Wait) -> Next<T, H> {
        let shared = &*self.shared;
        let mut st = shared.lock();
        loop {
            match st.next_chunk(self.id) {
                Next::Empty => match wait {
                    Wait::No => return Next::Empty,
                    Wait::Until(deadline) => match shared.wait(&shared.data, st, deadline) {
                        Some(s) => st = s,
                        None => return Next::Empty,
                    },
                },
                other => return other,
            }
        }
    }
}

/// Lets go of a chunk: drops the reader's reference, then clears its hold
/// and wakes the writer (which may be waiting for that buffer).
struct Held<T, H> {
    chunk: Option<Arc<Chunk<T, H>>>,
    shared: Arc<Shared<T, H>>,
    /// The reader holding it.
    id: u64,
}

impl<T, H> Drop for Held<T, H> {
    fn drop(&mut self) {
        // The reference goes before the hold: once the hold is cleared the
        // writer may recycle the chunk, and finds the queue's reference the
        // only one.
        if let Some(c) = self.chunk.take() {
            let n = c.meta.number;
            drop(c);
            self.shared.release(self.id, n);
        }
    }
}

/// A chunk held by a reader: derefs to the chunk's elements, with its
/// [`meta`](Self::meta). While it lives the chunk's buffer is not reused;
/// dropping it lets go. Forgetting it holds the chunk until its reader
/// reads again, then leaks the buffer (see the [module docs](self)). `R`
/// is how it keeps its reader: borrowed ([`ReadGuard`]) or owned
/// ([`OwnedReadGuard`]).
pub struct ChunkGuard<T, H, R> {
    held: Held<T, H>,
    meta: Meta<H>,
    reader: R,
}

/// A chunk held by a reader that it borrows ([`Reader::read`]).
pub type ReadGuard<'a, T, H = ()> = ChunkGuard<T, H, &'a mut Reader<T, H>>;

/// A chunk held by a reader that it owns ([`Reader::read_owned`]);
/// [`release`](ChunkGuard::release) gives the reader back.
pub type OwnedReadGuard<T, H = ()> = ChunkGuard<T, H, Reader<T, H>>;

impl<T, H, R: Borrow<Reader<T, H>>> ChunkGuard<T, H, R> {
    fn new(reader: R, chunk: Arc<Chunk<T, H>>) -> Self {
        let shared = Arc::clone(&reader.borrow().shared);
        let id = reader.borrow().id;
        Self {
            meta: chunk.meta.clone(),
            held: Held {
                chunk: Some(chunk),
                shared,
                id,
            },
            reader,
        }
    }

    /// The reader holding the chunk.
    pub fn reader(&self) -> &Reader<T, H> {
        self.reader.borrow()
    }
}

impl<T, H, R> ChunkGuard<T, H, R> {
    /// The chunk's metadata.
    pub fn meta(&self) -> &Meta<H> {
        &self.meta
    }

    /// Lets go of the chunk and gives the reader back.
    pub fn release(self) -> R {
        let ChunkGuard { held, reader, .. } = self;
        drop(held);
        reader
    }
}

impl<T, H, R> Deref for ChunkGuard<T, H, R> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.held.chunk.as_deref().map_or(&[], |c| &c.data[..c.len])
    }
}

impl<T, H, R> fmt::Debug for ChunkGuard<T, H, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadGuard")
            .field("number", &self.meta.number)
            .field("sequence", &self.meta.sequence)
            .field("index", &self.meta.index)
            .field("len", &self.len())
            .finish()
    }
}
