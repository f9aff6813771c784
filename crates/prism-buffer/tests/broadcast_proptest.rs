//! The broadcast ring against a plain reference model, single-threaded with
//! the non-blocking forms.
//!
//! Random sequences of operations (reserve + fill + commit, reserve +
//! abandon or forget, commits too long for the buffer, try_read and release
//! for each reader, reads whose guard is forgotten, owned guards forgotten
//! with their reader, readers of both kinds joining and leaving, new
//! sequences, the writer closing) run on a ring in both modes. The model
//! keeps the allocated buffers as a list of slots (free, or holding chunk
//! `n`; a chunk a forgotten guard still shares leaves its slot when
//! recycled, as the ring lets that buffer go and may allocate another) and
//! the readers as (next chunk wanted, chunk held); after every operation
//! everything the ring shows is compared with it: whether a buffer could be
//! reserved, each delivered chunk's contents and metadata, every count of
//! the stats (committed, dropped, per sequence, buffers allocated, queued,
//! per reader delivered / missed / pending), and the properties the modes
//! promise (block mode drops nothing and a guaranteed reader misses
//! nothing; the real-time writer always finds a buffer).

use std::collections::BTreeSet;
use std::mem::ManuallyDrop;

use prism_buffer::broadcast::{
    Broadcast, ChunkGuard, Config, Mode, OwnedReadGuard, Reader, ReaderKind, Stats, TryRead, Writer,
};
use prism_buffer::Error;
use proptest::prelude::*;

/// Element `k` of chunk `n`.
fn value(n: u64, k: usize) -> u64 {
    (n << 20) | k as u64
}

const ELEM: u64 = std::mem::size_of::<u64>() as u64;

// ---------------------------------------------------------------------------
// Model

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Free,
    Chunk(u64),
    /// Recycled while a forgotten guard shares it: no longer the ring's.
    Gone,
}

#[derive(Debug, Clone)]
struct MChunk {
    sequence: u64,
    index: u64,
    len: usize,
    header: u32,
}

#[derive(Debug, Clone)]
struct MReader {
    id: u64,
    kind: ReaderKind,
    next: u64,
    joined_at: u64,
    held: Option<u64>,
    /// Its owned guard was forgotten: it never reads again.
    lost: bool,
    delivered: u64,
    missed: u64,
    missed_bytes: u64,
}

#[derive(Debug)]
struct Model {
    mode: Mode,
    buffers: usize,
    slots: Vec<Slot>,
    /// Every committed chunk's metadata, by number.
    chunks: Vec<MChunk>,
    readers: Vec<MReader>,
    /// Chunks a forgotten guard shares (for ever).
    forgotten: BTreeSet<u64>,
    closed: bool,
    committed_bytes: u64,
    dropped: u64,
    dropped_bytes: u64,
    sequence: u64,
    header: u32,
    index: u64,
    seq_committed: u64,
    seq_committed_bytes: u64,
    seq_dropped: u64,
    seq_dropped_bytes: u64,
}

impl Model {
    fn committed(&self) -> u64 {
        self.chunks.len() as u64
    }

    fn queued(&self) -> Vec<u64> {
        let mut q: Vec<u64> = self
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Chunk(n) => Some(*n),
                Slot::Free | Slot::Gone => None,
            })
            .collect();
        q.sort_unstable();
        q
    }

    fn is_held(&self, n: u64) -> bool {
        self.readers.iter().any(|r| r.held == Some(n))
    }

    fn bytes(&self, n: u64) -> u64 {
        self.chunks[n as usize].len as u64 * ELEM
    }

    /// Frees slot `i` (holding chunk `n`): every reader that had not got
    /// to `n` misses it; a guaranteed one among them makes it a drop.
    fn recycle(&mut self, i: usize) {
        let Slot::Chunk(n) = self.slots[i] else {
            unreachable!()
        };
        let b = self.bytes(n);
        let mut dropped = false;
        for r in self.readers.iter_mut().filter(|r| r.next <= n) {
            r.missed += 1;
            r.missed_bytes += b;
            dropped |= r.kind == ReaderKind::Guaranteed;
        }
        if dropped {
            self.dropped += 1;
            self.dropped_bytes += b;
            if self.chunks[n as usize].sequence == self.sequence {
                self.seq_dropped += 1;
                self.seq_dropped_bytes += b;
            }
        }
        self.slots[i] = if self.forgotten.contains(&n) {
            Slot::Gone
        } else {
            Slot::Free
        };
    }

    /// Which slot the writer gets now, if any (the slot is left free; the
    /// caller marks what happens to it).
    fn reserve(&mut self) -> Option<usize> {
        let min_all = self
            .readers
            .iter()
            .map(|r| r.next)
            .min()
            .unwrap_or(self.committed());
        let min_g = self
            .readers
            .iter()
            .filter(|r| r.kind == ReaderKind::Guaranteed)
            .map(|r| r.next)
            .min()
            .unwrap_or(self.committed());
        // Chunks every reader passed that nobody holds are free.
        for i in 0..self.slots.len() {
            if let Slot::Chunk(n) = self.slots[i] {
                if n < min_all && !self.is_held(n) {
                    self.recycle(i);
                }
            }
        }
        self.slots.retain(|s| *s != Slot::Gone);
        if let Some(i) = self.slots.iter().position(|s| *s == Slot::Free) {
            return Some(i);
        }
        if self.slots.len() < self.buffers {
            self.slots.push(Slot::Free);
            return Some(self.slots.len() - 1);
        }
        // The oldest chunk nobody holds.
        let oldest = self.queued().into_iter().find(|&n| !self.is_held(n))?;
        if self.mode == Mode::Block && oldest >= min_g {
            return None;
        }
        let i = self
            .slots
            .iter()
            .position(|s| *s == Slot::Chunk(oldest))
            .unwrap();
        self.recycle(i);
        // A buffer a forgotten guard kept is replaced by a new one.
        self.slots[i] = Slot::Free;
        Some(i)
    }

    fn commit(&mut self, slot: usize, len: usize) -> u64 {
        let n = self.committed();
        self.chunks.push(MChunk {
            sequence: self.sequence,
            index: self.index,
            len,
            header: self.header,
        });
        self.index += 1;
        let b = len as u64 * ELEM;
        self.committed_bytes += b;
        self.seq_committed += 1;
        self.seq_committed_bytes += b;
        self.slots[slot] = Slot::Chunk(n);
        n
    }

    /// Reader `r`'s next chunk: `Some(Some(n))` delivered, `Some(None)`
    /// nothing now, `None` closed.
    fn read(&mut self, r: usize) -> Option<Option<u64>> {
        let next = self.readers[r].next;
        match self.queued().into_iter().find(|&n| n >= next) {
            Some(n) => {
                let rd = &mut self.readers[r];
                rd.next = n + 1;
                rd.delivered += 1;
                rd.held = Some(n);
                Some(Some(n))
            }
            None if self.closed => None,
            None => Some(None),
        }
    }

    fn pending(&self, r: &MReader) -> u64 {
        self.queued().into_iter().filter(|&n| n >= r.next).count() as u64
    }
}

// ---------------------------------------------------------------------------
// Operations

#[derive(Debug, Clone)]
enum Op {
    /// try_reserve, write `len` elements, then commit (or drop the guard,
    /// or forget it).
    Write {
        len: usize,
        abandon: bool,
        forget: bool,
    },
    /// try_read on reader `pick` (if it holds nothing).
    Read(usize),
    /// try_read on reader `pick` (if it holds nothing), and forget the
    /// guard.
    ReadForget(usize),
    /// Forget reader `pick`'s guard (if it holds one) with its reader.
    ForgetHeld(usize),
    /// Drop reader `pick`'s guard.
    Release(usize),
    AddReader(ReaderKind),
    DropReader(usize),
    BeginSequence(u32),
    Close,
}

fn kind() -> impl Strategy<Value = ReaderKind> {
    prop_oneof![Just(ReaderKind::Guaranteed), Just(ReaderKind::Lossy)]
}

fn op(cap: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..=cap + 1, prop::bool::weighted(0.15), any::<bool>())
            .prop_map(|(len, abandon, forget)| Op::Write { len, abandon, forget }),
        6 => any::<usize>().prop_map(Op::Read),
        1 => any::<usize>().prop_map(Op::ReadForget),
        1 => (any::<usize>(), prop::bool::weighted(0.2))
            .prop_map(|(pick, forget)| if forget { Op::ForgetHeld(pick) } else { Op::Read(pick) }),
        4 => any::<usize>().prop_map(Op::Release),
        1 => kind().prop_map(Op::AddReader),
        1 => any::<usize>().prop_map(Op::DropReader),
        1 => any::<u32>().prop_map(Op::BeginSequence),
        1 => (0..8u8).prop_map(|k| if k == 0 { Op::Close } else { Op::Read(k as usize) }),
    ]
}

fn case() -> impl Strategy<Value = (Config, Vec<ReaderKind>, Vec<Op>)> {
    (
        3usize..=7,
        1usize..=6,
        prop_oneof![Just(Mode::Block), Just(Mode::RealTime)],
    )
        .prop_flat_map(|(buffers, cap, mode)| {
            (
                Just(Config {
                    buffers,
                    chunk_capacity: cap,
                    mode,
                }),
                prop::collection::vec(kind(), 1..=4),
                prop::collection::vec(op(cap), 1..150),
            )
        })
}

// ---------------------------------------------------------------------------
// The ring under test

enum RSlot {
    Idle(Reader<u64, u32>),
    Holding(OwnedReadGuard<u64, u32>),
    /// A guard never dropped (as if forgotten; kept to check at the end
    /// that its chunk never changed), with its reader.
    Lost(ManuallyDrop<OwnedReadGuard<u64, u32>>),
    Moving,
}

impl RSlot {
    fn reader(&self) -> &Reader<u64, u32> {
        match self {
            RSlot::Idle(r) => r,
            RSlot::Holding(g) => g.reader(),
            RSlot::Lost(g) => g.reader(),
            RSlot::Moving => unreachable!(),
        }
    }
}

fn check_stats(m: &Model, s: &Stats) -> Result<(), TestCaseError> {
    prop_assert_eq!(s.committed_chunks, m.committed());
    prop_assert_eq!(s.committed_bytes, m.committed_bytes);
    prop_assert_eq!(s.dropped_chunks, m.dropped);
    prop_assert_eq!(s.dropped_bytes, m.dropped_bytes);
    prop_assert_eq!(s.sequence, m.sequence);
    prop_assert_eq!(s.sequence_committed_chunks, m.seq_committed);
    prop_assert_eq!(s.sequence_committed_bytes, m.seq_committed_bytes);
    prop_assert_eq!(s.sequence_dropped_chunks, m.seq_dropped);
    prop_assert_eq!(s.sequence_dropped_bytes, m.seq_dropped_bytes);
    prop_assert_eq!(s.buffers_allocated, m.slots.len());
    prop_assert!(s.buffers_allocated <= m.buffers);
    prop_assert_eq!(s.queued, m.queued().len());
    prop_assert_eq!(s.closed, m.closed);
    prop_assert_eq!(s.readers.len(), m.readers.len());
    for r in &m.readers {
        let got = s.reader(r.id).expect("reader in the stats");
        prop_assert_eq!(got.kind, r.kind);
        prop_assert_eq!(got.joined_at, r.joined_at);
        prop_assert_eq!(got.delivered, r.delivered);
        prop_assert_eq!(got.missed, r.missed, "reader {}", r.id);
        prop_assert_eq!(got.missed_bytes, r.missed_bytes);
        let pending = m.pending(r);
        prop_assert_eq!(got.pending, pending);
        prop_assert_eq!(
            got.delivered + got.missed + got.pending,
            m.committed() - got.joined_at
        );
        if m.mode == Mode::Block && r.kind == ReaderKind::Guaranteed {
            prop_assert_eq!(got.missed, 0);
        }
    }
    if m.mode == Mode::Block {
        prop_assert_eq!(s.dropped_chunks, 0);
    }
    Ok(())
}

fn check_chunk<R>(m: &Model, n: u64, g: &ChunkGuard<u64, u32, R>) -> Result<(), TestCaseError> {
    let c = &m.chunks[n as usize];
    let meta = g.meta();
    prop_assert_eq!(meta.number, n);
    prop_assert_eq!(meta.sequence, c.sequence);
    prop_assert_eq!(meta.index, c.index);
    prop_assert_eq!(*meta.header, c.header);
    prop_assert_eq!(meta.starts_sequence(), c.index == 0);
    prop_assert_eq!(g.len(), c.len);
    for (k, &v) in g.iter().enumerate() {
        prop_assert_eq!(v, value(n, k), "chunk {} element {}", n, k);
    }
    Ok(())
}

fn run_case(config: Config, initial: Vec<ReaderKind>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let ring: Broadcast<u64, u32> = Broadcast::new(config).unwrap();
    let mut writer: Option<Writer<u64, u32>> = Some(ring.writer().unwrap());
    prop_assert!(matches!(ring.writer(), Err(Error::WriterTaken)));
    let mut m = Model {
        mode: config.mode,
        buffers: config.buffers,
        slots: Vec::new(),
        chunks: Vec::new(),
        readers: Vec::new(),
        forgotten: BTreeSet::new(),
        closed: false,
        committed_bytes: 0,
        dropped: 0,
        dropped_bytes: 0,
        sequence: 0,
        header: 0,
        index: 0,
        seq_committed: 0,
        seq_committed_bytes: 0,
        seq_dropped: 0,
        seq_dropped_bytes: 0,
    };
    let mut readers: Vec<RSlot> = Vec::new();
    let add = |kind: ReaderKind, m: &mut Model, readers: &mut Vec<RSlot>| {
        let res = ring.reader(kind);
        if m.readers.len() >= config.buffers - 2 {
            assert!(matches!(res, Err(Error::TooManyReaders { .. })));
            return;
        }
        let r = res.unwrap();
        m.readers.push(MReader {
            id: r.id(),
            kind,
            next: m.committed(),
            joined_at: m.committed(),
            held: None,
            lost: false,
            delivered: 0,
            missed: 0,
            missed_bytes: 0,
        });
        readers.push(RSlot::Idle(r));
    };
    for k in initial {
        add(k, &mut m, &mut readers);
    }
    for op in ops {
        match op {
            Op::Write {
                len,
                abandon,
                forget,
            } => {
                let Some(w) = writer.as_mut() else { continue };
                let got = w.try_reserve();
                let want = m.reserve();
                prop_assert_eq!(got.is_some(), want.is_some(), "try_reserve");
                if config.mode == Mode::RealTime {
                    prop_assert!(got.is_some(), "the real-time writer always finds a buffer");
                }
                let (Some(mut g), Some(slot)) = (got, want) else {
                    continue;
                };
                prop_assert_eq!(g.len(), config.chunk_capacity);
                let n = m.committed();
                for (k, v) in g.iter_mut().take(len).enumerate() {
                    *v = value(n, k);
                }
                // A write guard has no `Drop` (its buffer stays with the
                // writer): forgetting and dropping it are kept apart anyway,
                // to go on testing both should it get one.
                if abandon && forget {
                    #[allow(clippy::forget_non_drop)]
                    std::mem::forget(g);
                } else if abandon {
                    #[allow(clippy::drop_non_drop)]
                    drop(g);
                } else if len > config.chunk_capacity {
                    let r = g.commit(len);
                    let too_long = matches!(r, Err(Error::CommitTooLong { .. }));
                    prop_assert!(too_long, "a commit past the buffer: {:?}", r.err());
                } else {
                    let meta = g.commit(len).unwrap();
                    let n2 = m.commit(slot, len);
                    prop_assert_eq!(meta.number, n2);
                    prop_assert_eq!(meta.index, m.chunks[n2 as usize].index);
                }
            }
            Op::Read(pick) | Op::Release(pick) | Op::ReadForget(pick) | Op::ForgetHeld(pick)
                if readers.is_empty() =>
            {
                let _ = pick;
            }
            Op::ReadForget(pick) => {
                let i = pick % readers.len();
                let RSlot::Idle(r) = &mut readers[i] else {
                    continue;
                };
                let want = m.read(i);
                match r.try_read() {
                    TryRead::Ready(g) => {
                        let Some(Some(n)) = want else {
                            return Err(TestCaseError::fail(format!(
                                "reader {i} got chunk {} where the model has {want:?}",
                                g.meta().number
                            )));
                        };
                        check_chunk(&m, n, &g)?;
                        std::mem::forget(g);
                        m.forgotten.insert(n);
                    }
                    got => {
                        prop_assert!(
                            matches!(
                                (&got, want),
                                (TryRead::Empty, Some(None)) | (TryRead::Closed, None)
                            ),
                            "reader {} got {:?} where the model has {:?}",
                            i,
                            got,
                            want
                        );
                    }
                }
            }
            Op::ForgetHeld(pick) => {
                let i = pick % readers.len();
                if matches!(readers[i], RSlot::Holding(_)) {
                    let RSlot::Holding(g) = std::mem::replace(&mut readers[i], RSlot::Moving)
                    else {
                        unreachable!()
                    };
                    let n = g.meta().number;
                    readers[i] = RSlot::Lost(ManuallyDrop::new(g));
                    m.readers[i].lost = true;
                    m.forgotten.insert(n);
                }
            }
            Op::Read(pick) => {
                let i = pick % readers.len();
                if !matches!(readers[i], RSlot::Idle(_)) {
                    continue;
                }
                let RSlot::Idle(r) = std::mem::replace(&mut readers[i], RSlot::Moving) else {
                    unreachable!()
                };
                let want = m.read(i);
                match r.try_read_owned() {
                    Ok(g) => {
                        let Some(Some(n)) = want else {
                            return Err(TestCaseError::fail(format!(
                                "reader {i} got chunk {} where the model has {want:?}",
                                g.meta().number
                            )));
                        };
                        check_chunk(&m, n, &g)?;
                        readers[i] = RSlot::Holding(g);
                    }
                    Err(r) => {
                        prop_assert!(
                            matches!(want, None | Some(None)),
                            "reader {} got nothing where the model has {:?}",
                            i,
                            want
                        );
                        prop_assert_eq!(r.is_finished(), want.is_none());
                        readers[i] = RSlot::Idle(r);
                    }
                }
            }
            Op::Release(pick) => {
                let i = pick % readers.len();
                if matches!(readers[i], RSlot::Holding(_)) {
                    let RSlot::Holding(g) = std::mem::replace(&mut readers[i], RSlot::Moving)
                    else {
                        unreachable!()
                    };
                    readers[i] = RSlot::Idle(g.release());
                    m.readers[i].held = None;
                }
            }
            Op::AddReader(kind) => add(kind, &mut m, &mut readers),
            Op::DropReader(pick) => {
                if readers.is_empty() {
                    continue;
                }
                let i = pick % readers.len();
                if m.readers[i].lost {
                    continue;
                }
                drop(readers.remove(i));
                m.readers.remove(i);
            }
            Op::BeginSequence(h) => {
                let Some(w) = writer.as_mut() else { continue };
                let id = w.begin_sequence(h);
                m.sequence += 1;
                m.header = h;
                m.index = 0;
                m.seq_committed = 0;
                m.seq_committed_bytes = 0;
                m.seq_dropped = 0;
                m.seq_dropped_bytes = 0;
                prop_assert_eq!(id, m.sequence);
            }
            Op::Close => {
                if let Some(w) = writer.take() {
                    w.close();
                    m.closed = true;
                    prop_assert!(matches!(ring.writer(), Err(Error::WriterTaken)));
                }
            }
        }
        check_stats(&m, &ring.stats())?;
        for r in &readers {
            prop_assert_eq!(r.reader().stats(), ring.stats());
        }
    }
    // Drain: every reader reads to the end of what is still queued.
    drop(writer);
    m.closed = true;
    for (i, slot) in readers.iter_mut().enumerate() {
        let mut r = match std::mem::replace(slot, RSlot::Moving) {
            RSlot::Idle(r) => r,
            RSlot::Holding(g) => {
                m.readers[i].held = None;
                g.release()
            }
            RSlot::Lost(g) => {
                // Its chunk is still what was committed.
                check_chunk(&m, g.meta().number, &g)?;
                *slot = RSlot::Lost(g);
                continue;
            }
            RSlot::Moving => unreachable!(),
        };
        loop {
            let want = m.read(i);
            match r.try_read_owned() {
                Ok(g) => {
                    let Some(Some(n)) = want else {
                        return Err(TestCaseError::fail("drain: extra chunk"));
                    };
                    check_chunk(&m, n, &g)?;
                    r = g.release();
                    m.readers[i].held = None;
                }
                Err(back) => {
                    prop_assert!(want.is_none(), "drain: the ring ended early");
                    prop_assert!(back.is_finished());
                    r = back;
                    break;
                }
            }
        }
        *slot = RSlot::Idle(r);
    }
    check_stats(&m, &ring.stats())?;
    for r in m.readers.iter().filter(|r| !r.lost) {
        let s = ring.stats();
        let got = s.reader(r.id).unwrap();
        prop_assert_eq!(got.delivered + got.missed, m.committed() - got.joined_at);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn the_ring_matches_the_model((config, initial, ops) in case()) {
        run_case(config, initial, ops)?;
    }
}

#[test]
fn bad_configurations_and_commits_are_errors_not_panics() {
    let config = |buffers, chunk_capacity| Config {
        buffers,
        chunk_capacity,
        mode: Mode::Block,
    };
    assert!(matches!(
        Broadcast::<u8>::new(config(2, 4)),
        Err(Error::TooFewBuffers { buffers: 2, .. })
    ));
    assert!(matches!(
        Broadcast::<u8>::new(config(0, 4)),
        Err(Error::TooFewBuffers { .. })
    ));
    assert!(matches!(
        Broadcast::<u8>::new(config(3, 0)),
        Err(Error::ZeroLength { .. })
    ));
    assert!(matches!(
        Broadcast::<u64>::new(config(3, usize::MAX / 4)),
        Err(Error::Config(_))
    ));
    let ring = Broadcast::<u8>::new(config(3, 4)).unwrap();
    let _r = ring.reader(ReaderKind::Lossy).unwrap();
    let e = ring.reader(ReaderKind::Guaranteed).unwrap_err();
    assert!(matches!(e, Error::TooManyReaders { buffers: 3, max: 1 }));
    assert!(e.to_string().contains("at most 1 readers"), "{e}");
    let mut w = ring.writer().unwrap();
    assert!(matches!(ring.writer(), Err(Error::WriterTaken)));
    let e = w.write(&[1, 2, 3, 4, 5]).unwrap_err();
    assert!(matches!(
        e,
        Error::CommitTooLong {
            len: 5,
            capacity: 4
        }
    ));
    let g = w.try_reserve().unwrap();
    assert!(matches!(g.commit(9), Err(Error::CommitTooLong { .. })));
    assert_eq!(ring.stats().committed_chunks, 0);
}

#[test]
fn sequences_reset_their_counts_and_carry_their_header() {
    let ring: Broadcast<u8, String> = Broadcast::with_header(
        Config {
            buffers: 4,
            chunk_capacity: 2,
            mode: Mode::Block,
        },
        "first".to_owned(),
    )
    .unwrap();
    let mut r = ring.reader(ReaderKind::Guaranteed).unwrap();
    let mut w = ring.writer().unwrap();
    w.write(&[1]).unwrap();
    w.write(&[2, 3]).unwrap();
    assert_eq!(w.begin_sequence("second".to_owned()), 1);
    let s = w.stats();
    assert_eq!((s.sequence, s.sequence_committed_chunks), (1, 0));
    assert_eq!((s.committed_chunks, s.committed_bytes), (2, 3));
    w.write(&[4]).unwrap();
    w.close();
    let mut seen = Vec::new();
    while let Some(g) = r.read() {
        let m = g.meta();
        seen.push((
            m.number,
            m.sequence,
            m.index,
            (*m.header).clone(),
            g.to_vec(),
        ));
    }
    assert_eq!(
        seen,
        vec![
            (0, 0, 0, "first".to_owned(), vec![1]),
            (1, 0, 1, "first".to_owned(), vec![2, 3]),
            (2, 1, 0, "second".to_owned(), vec![4]),
        ]
    );
    assert!(r.is_finished());
}
