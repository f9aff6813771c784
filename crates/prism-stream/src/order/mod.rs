//! Ordering, the tracking layer: the one module that decides which GPU-side
//! waits an operation needs and when the host may touch or free memory.
//! Here: the rules, each buffer's use list ([`Uses`]), the wait clocks, the
//! [`Fence`] (`fence.rs`) and the device allocation freed only after its
//! last use (`alloc.rs`). The lane (`lane.rs`) applies them: every copy,
//! kernel, memset and fence of prism goes through a
//! [`Lane`](crate::Lane); no other code records an event or issues a
//! stream wait, and no public function takes a bare stream or a wait clock.
//!
//! The rules (1, 2, 6 and 7 enforced in this module; 3, 4 and 5 by the lane,
//! `lane.rs`, which calls it):
//!
//! 1. **Hazards.** An op that reads a buffer first waits (on the GPU) for the
//!    buffer's last writer; an op that writes it waits for every earlier use.
//! 2. **Skipped waits.** A wait is skipped only when it is implied: the fence
//!    is on the op's own stream (stream order), it was already observed
//!    complete, or the lane's [`WaitClock`] shows an earlier wait that covers
//!    it. Skipping never depends on anything a caller passes in.
//! 3. **Every use is fenced before the call returns.** `Lane::enqueue`
//!    orders, enqueues, records the end fence and notes it on each buffer in
//!    one call, on every path: an enqueue that fails part-way still records
//!    its fence, and if no fence can be recorded the call blocks until the
//!    stream is idle before it returns. Nothing is left for a later `finish`,
//!    so dropping, forgetting or leaving a scope early cannot lose a use.
//! 4. **Stream order of fences.** Fences of one stream get increasing
//!    sequence numbers in the order they are recorded (recording is
//!    serialised per stream, so lanes sharing a pooled stream on several
//!    threads keep it): a wait on a fence implies every earlier fence of its
//!    stream.
//! 5. **One context.** The lane's stream and every buffer of an op belong to
//!    one CUDA context, checked before anything is enqueued; the one
//!    exception is a portable pinned buffer in a copy, which lanes of every
//!    context may use (their fences are waited for across contexts with
//!    `cuStreamWaitEvent`, which accepts another context's event).
//!
//! 6. **Streams prism does not own.** Memory and streams that change hands
//!    with cudarc (`interop.rs`) are ordered here too: an adopted
//!    allocation's first fence is recorded on its cudarc stream
//!    ([`fence_foreign`]) and noted as the write that made it
//!    ([`note_made_by`]); a buffer handed to cudarc makes the receiving
//!    stream wait for every use ([`order_foreign_after_all`]). A fence is
//!    never taken from a record that a CUDA graph capture swallowed, so no
//!    stream of prism's ever waits on a captured event (which would pull it
//!    into the capture).
//! 7. **One op at a time per conflict.** From its ordering to the note of
//!    its fence, an op holds a claim on the bytes it uses of every buffer
//!    a CUDA graph was captured over (`claim.rs`): a conflicting op of
//!    another thread (one of the two writes, the bytes overlap) waits for
//!    the claim's release, so it sees the first op's fence. Borrows give
//!    this for every other buffer (a write needs `&mut`), but a
//!    `CapturedGraph` writes its buffers through `&mut` of the graph while
//!    other threads read them through `&`. The mark is set at capture,
//!    while the capture borrows the buffer, so every later op of another
//!    thread sees it. A thread inside an op (an outside-work closure)
//!    never waits for a claim: a conflict is refused with `BufferBusy`.
//!
//! Hazards are tracked per byte range ([`Extent`]): copies of disjoint
//! parts of one buffer (chunks of a run, on several streams or GPUs) do not
//! wait for each other.
//!
//! The rule functions ([`order_after`], [`Uses`], [`WaitClock`]) are generic
//! over the fence ([`Mark`]), so the unit tests below check them against a
//! model of stream order with fake fences.

use std::fmt;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use cudarc::driver::{sys, CudaStream};

use crate::context::Gpu;
use crate::error::DriverResultExt;
use crate::{Error, Result};

mod alloc;
mod claim;
mod fence;

pub(crate) use alloc::{DeviceAlloc, Owner};
pub(crate) use claim::claim_uses;
pub use fence::Fence;

/// Identifies one CUDA stream prism queues on (made by prism, or taken over
/// from cudarc by [`Lane::from_cuda_stream`](crate::Lane::from_cuda_stream)), unique for the life of the
/// process (never reused, unlike the driver's stream handles). An id never
/// names two streams; one stream may get two ids (taken over twice), which
/// costs at most a redundant wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(NonZeroU64);

static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

impl StreamId {
    pub(crate) fn fresh() -> Self {
        let n = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
        Self(NonZeroU64::new(n).unwrap_or(NonZeroU64::MIN))
    }

    /// The number behind the id.
    pub fn get(self) -> u64 {
        self.0.get()
    }

    #[cfg(test)]
    pub(crate) fn for_test(n: u64) -> Self {
        Self(NonZeroU64::new(n).unwrap_or(NonZeroU64::MIN))
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stream#{}", self.0)
    }
}

/// Entries a [`WaitClock`] keeps; the oldest is forgotten when full
/// (forgetting costs a redundant wait, never a missing one).
const CLOCK_ENTRIES: usize = 8;

/// A vector clock: what one lane's stream is already ordered after. Per
/// source stream, the largest fence sequence number the lane waited on,
/// directly or through the fences it waited on (each fence carries the clock
/// its lane had when it was recorded). Lives inside a [`Lane`](crate::Lane) and is never
/// handed out, so it always describes waits this lane really issued.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WaitClock {
    entries: [(u64, u64); CLOCK_ENTRIES],
    len: usize,
}

impl WaitClock {
    pub(crate) fn covers(&self, stream: StreamId, seq: u64) -> bool {
        self.entries[..self.len]
            .iter()
            .any(|&(s, q)| s == stream.get() && q >= seq)
    }

    fn note(&mut self, stream: u64, seq: u64) {
        if let Some(e) = self.entries[..self.len]
            .iter_mut()
            .find(|(s, _)| *s == stream)
        {
            e.1 = e.1.max(seq);
        } else if self.len < CLOCK_ENTRIES {
            self.entries[self.len] = (stream, seq);
            self.len += 1;
        } else if let Some(oldest) = self.entries.iter_mut().min_by_key(|(_, q)| *q) {
            *oldest = (stream, seq);
        }
    }

    fn merge(&mut self, other: &WaitClock) {
        for &(s, q) in &other.entries[..other.len] {
            self.note(s, q);
        }
    }
}

/// What the ordering rules need to know of a fence.
pub(crate) trait Mark {
    /// The stream it was recorded on.
    fn stream(&self) -> StreamId;
    /// Its position among the fences of that stream.
    fn seq(&self) -> u64;
    /// What its lane was ordered after when it was recorded.
    fn implied(&self) -> &WaitClock;
    /// Already observed complete (no query made).
    fn known_done(&self) -> bool;
    /// Asks whether it completed (one query; marks it known when it has).
    fn query_done(&self) -> bool;
}

/// Entries a buffer's read or write list holds before it drops those that
/// completed (so uses from ever new streams, or of ever new parts of the
/// buffer, do not grow the list without bound).
const USES_BEFORE_PRUNE: usize = 8;

/// How an op uses a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
}

/// The bytes of a buffer an op uses: `start..end`, never empty. Ops that
/// use a whole buffer (kernels) use `0..len`; copies use the range they copy,
/// so copies into disjoint parts of one buffer (chunks of a run, on several
/// streams or GPUs) do not wait for each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) start: usize,
    pub(crate) end: usize,
}

impl Extent {
    /// Every byte of a buffer of `bytes` bytes (an empty buffer has one
    /// byte of extent, so that its uses still conflict).
    pub(crate) fn whole(bytes: usize) -> Self {
        Self {
            start: 0,
            end: bytes.max(1),
        }
    }

    /// `start..end`, widened to one byte when empty.
    pub(crate) fn range(start: usize, end: usize) -> Self {
        Self {
            start,
            end: end.max(start.saturating_add(1)),
        }
    }

    fn overlaps(&self, o: &Extent) -> bool {
        self.start < o.end && o.start < self.end
    }

    fn within(&self, o: &Extent) -> bool {
        o.start <= self.start && self.end <= o.end
    }

    /// Overlapping or adjacent: the union is one extent.
    fn touches(&self, o: &Extent) -> bool {
        self.start <= o.end && o.start <= self.end
    }

    pub(crate) fn hull(&self, o: &Extent) -> Extent {
        Extent {
            start: self.start.min(o.start),
            end: self.end.max(o.end),
        }
    }
}

/// The GPU operations that use one buffer: the writes whose bytes no later
/// write covered, and the reads since, each with the extent it used.
/// Entries of one stream whose extents touch are merged (the later fence
/// implies the earlier by stream order), and entries already observed
/// complete are dropped once a list grows, so the lists stay as long as
/// the work really in flight on distinct parts of the buffer.
#[derive(Debug)]
pub(crate) struct Uses<M> {
    pub(crate) writes: Vec<(Extent, M)>,
    pub(crate) reads: Vec<(Extent, M)>,
    /// An op was queued on the buffer whose end could not be fenced nor
    /// waited for (the driver refused both): the GPU may use the buffer at
    /// any time, so it is never used, read or freed again.
    pub(crate) stuck: bool,
    /// The ops between their ordering and their note right now (rule 7).
    claims: Vec<claim::Claim>,
    /// Threads waiting for one of those to be released.
    waiters: usize,
}

impl<M> Default for Uses<M> {
    fn default() -> Self {
        Self {
            writes: Vec::new(),
            reads: Vec::new(),
            stuck: false,
            claims: Vec::new(),
            waiters: 0,
        }
    }
}

impl<M: Mark + Clone> Uses<M> {
    /// The fences an op with `access` over `extent` must be ordered after
    /// (rule 1): the writes it overlaps and, for a write, the reads too.
    pub(crate) fn deps(&self, access: Access, extent: Extent) -> impl Iterator<Item = &M> {
        let reads: &[(Extent, M)] = match access {
            Access::Read => &[],
            Access::Write => &self.reads,
        };
        self.writes
            .iter()
            .chain(reads)
            .filter(move |(x, _)| x.overlaps(&extent))
            .map(|(_, m)| m)
    }

    /// Every fence on the list (what the host waits for before it touches
    /// or frees the buffer).
    pub(crate) fn all(&self) -> impl Iterator<Item = &M> {
        self.writes.iter().chain(&self.reads).map(|(_, m)| m)
    }

    /// Records that an op with `access` over `extent` ended at `fence`.
    /// The op was ordered after [`deps`](Self::deps), so a write replaces
    /// every entry inside its extent.
    pub(crate) fn note(&mut self, access: Access, extent: Extent, fence: &M) {
        if access == Access::Write {
            self.writes.retain(|(x, _)| !x.within(&extent));
            self.reads.retain(|(x, _)| !x.within(&extent));
        }
        let list = match access {
            Access::Write => &mut self.writes,
            Access::Read => &mut self.reads,
        };
        // Merge with this stream's entries that touch it, keeping the later
        // fence (lanes sharing a stream may note out of order, as a read
        // recorded on one thread and noted after another's).
        let (mut merged, mut latest) = (extent, fence.clone());
        let key = fence.stream();
        list.retain(|(x, m)| {
            if m.stream() == key && x.touches(&merged) {
                merged = merged.hull(x);
                if m.seq() > latest.seq() {
                    latest = m.clone();
                }
                false
            } else {
                true
            }
        });
        if list.len() >= USES_BEFORE_PRUNE {
            list.retain(|(_, m)| !m.query_done());
        }
        list.push((merged, latest));
    }
}

/// Rule 2: makes the lane on stream `own`, whose clock is `clock`, wait for
/// `dep` unless that is implied; `wait` issues the GPU-side wait.
pub(crate) fn order_after<M: Mark>(
    clock: &mut WaitClock,
    own: StreamId,
    dep: &M,
    wait: impl FnOnce(&M) -> Result<()>,
) -> Result<()> {
    if dep.stream() == own || dep.known_done() || clock.covers(dep.stream(), dep.seq()) {
        return Ok(());
    }
    wait(dep)?;
    clock.note(dep.stream().get(), dep.seq());
    clock.merge(dep.implied());
    Ok(())
}

/// A buffer's use list (interior mutability: queueing takes `&` for reads)
/// and the signal that a claim on it was released ([`claim`]).
#[derive(Debug, Default)]
pub(crate) struct UseCell {
    list: Mutex<Uses<Fence>>,
    released: Condvar,
    /// Captured into a CUDA graph once (never cleared): from then on its
    /// ops take claims (rule 7).
    in_graph: AtomicBool,
}

impl UseCell {
    /// Marks the buffer as one a CUDA graph uses: a graph writes it
    /// without `&mut` of the buffer, so its ops must claim it (rule 7).
    pub(crate) fn mark_in_graph(&self) {
        self.in_graph.store(true, Ordering::Relaxed);
    }

    /// Whether a CUDA graph was ever captured over the buffer.
    pub(crate) fn in_graph(&self) -> bool {
        self.in_graph.load(Ordering::Relaxed)
    }
}

pub(crate) fn lock(cell: &UseCell) -> MutexGuard<'_, Uses<Fence>> {
    cell.list.lock().unwrap_or_else(|p| p.into_inner())
}

/// One buffer an op uses, and how.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Used<'a> {
    pub(crate) cell: &'a UseCell,
    pub(crate) gpu: &'a Gpu,
    pub(crate) access: Access,
    /// The bytes it uses.
    pub(crate) extent: Extent,
    /// A portable pinned buffer, usable by a lane of any context (copies
    /// only; every other buffer belongs to its own context).
    pub(crate) portable: bool,
    /// Names the buffer in a `WrongContext` error.
    pub(crate) what: &'static str,
    /// A device buffer's shared allocation, which a CUDA graph captured
    /// over the op keeps alive (`None`: host memory, refused in a capture).
    pub(crate) keep: Option<&'a Arc<DeviceAlloc>>,
}

/// Records a fence on `stream`, a stream of `gpu`'s context that prism does
/// not own (a cudarc user's, another library's), after everything queued there so far (rule 6).
/// Its stream id is fresh and it is the only fence of that id, so no wait
/// is ever skipped on its account (rules 2 and 4). A record that a graph
/// capture of the stream swallowed (`CUDA_ERROR_CAPTURED_EVENT` on query)
/// marks no work that runs now: it is refused with `StreamCapturing`.
pub(crate) fn fence_foreign(gpu: &Gpu, stream: &CudaStream, what: &'static str) -> Result<Fence> {
    gpu.bind()?;
    let event = gpu.0.events.take(false)?;
    event.record(stream).call("cuEventRecord")?;
    if let Err(e) = event.query() {
        // A captured record may still be referenced by the capture: the
        // event is destroyed rather than pooled (cuEventDestroy defers the
        // release until nothing uses it).
        event.discard();
        return Err(if e.0 == sys::CUresult::CUDA_ERROR_CAPTURED_EVENT {
            Error::StreamCapturing { what }
        } else {
            Error::Driver {
                call: "cuEventQuery",
                source: e,
            }
        });
    }
    Ok(Fence::new(
        event,
        1,
        StreamId::fresh(),
        WaitClock::default(),
    ))
}

/// Notes `fence` as the write that made all `bytes` of a buffer (an
/// allocation adopted from cudarc): every later use waits for it, and
/// `Drop` waits for it (or for a later write ordered after it) before freeing.
pub(crate) fn note_made_by(cell: &UseCell, bytes: usize, fence: &Fence) {
    lock(cell).note(Access::Write, Extent::whole(bytes), fence);
}

/// Makes `stream` (a stream prism does not own) wait on the GPU for every
/// recorded use of the buffer, then records a fence there and notes it as
/// a write of all `bytes`: prism's later uses wait for the stream's work so
/// far. All under the use list's lock, so the fence follows every use it
/// replaces in the list (a write's note drops the entries it covers; an
/// op noted meanwhile by another thread would otherwise lose its entry).
pub(crate) fn fence_foreign_after_all(
    cell: &UseCell,
    gpu: &Gpu,
    stream: &CudaStream,
    bytes: usize,
    what: &'static str,
) -> Result<()> {
    let mut uses = lock(cell);
    wait_all_on(&uses, stream)?;
    let fence = fence_foreign(gpu, stream, what)?;
    uses.note(Access::Write, Extent::whole(bytes), &fence);
    Ok(())
}

/// Makes `stream`, a stream of the buffer's context that prism does not
/// own, wait on the GPU for every recorded use of the buffer, reads and
/// writes (rule 6): whatever its new owner queues there next (a write, a
/// free) comes after them. Fences already seen complete need no wait.
pub(crate) fn order_foreign_after_all(cell: &UseCell, stream: &CudaStream) -> Result<()> {
    wait_all_on(&lock(cell), stream)
}

/// Makes `stream` wait on the GPU for every use in `uses` not yet seen
/// complete (the caller holds the use list's lock); a list that lost track
/// of an op is `ContextPoisoned`.
fn wait_all_on(uses: &Uses<Fence>, stream: &CudaStream) -> Result<()> {
    if uses.stuck {
        return Err(Error::ContextPoisoned {
            reason: "a GPU operation on this buffer could not be tracked; it stays locked".into(),
        });
    }
    for f in uses.all() {
        if !f.known_done() {
            f.gpu_wait(stream)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The ordering rules against a model of stream order: random ops on
    //! random lanes (some sharing a stream) reading and writing random
    //! buffers, with random GPU progress and host observations, and reads
    //! whose fences are noted late and out of order (as lanes sharing a
    //! stream on two threads may). Every pair of conflicting uses of a
    //! buffer must end up ordered: the later op reaches the earlier one
    //! through stream order and the waits issued, or the earlier one was
    //! known complete (observed, or implied by an observed op) when the
    //! later one was queued.

    use super::*;
    use proptest::prelude::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[derive(Debug, Clone)]
    struct FakeFence(Rc<FakeInner>);

    #[derive(Debug)]
    struct FakeInner {
        /// The op (node) it marks the end of.
        node: usize,
        stream: StreamId,
        seq: u64,
        implied: WaitClock,
        /// The model GPU ran the op.
        ran: Cell<bool>,
        /// The host saw it complete.
        observed: Cell<bool>,
    }

    impl Mark for FakeFence {
        fn stream(&self) -> StreamId {
            self.0.stream
        }
        fn seq(&self) -> u64 {
            self.0.seq
        }
        fn implied(&self) -> &WaitClock {
            &self.0.implied
        }
        fn known_done(&self) -> bool {
            self.0.observed.get()
        }
        fn query_done(&self) -> bool {
            if self.0.ran.get() {
                self.0.observed.set(true);
            }
            self.0.observed.get()
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Lane, (buffer, is write, first unit, units) uses, and for
        /// read-only ops whether the fence is noted late.
        Op(usize, Vec<(usize, bool, usize, usize)>, bool),
        /// The GPU runs the oldest op of a stream, if all it waits for ran.
        Run(usize),
        /// The host observes an op's fence (marks it done if it ran).
        Observe(usize),
        /// Late notes are made, newest first.
        Flush,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            5 => (0usize..LANE_STREAM.len(), prop::collection::vec((0usize..4, prop::bool::weighted(0.4), 0usize..UNITS, 1usize..=UNITS), 1..4), any::<bool>())
                .prop_map(|(l, u, late)| Step::Op(l, u, late)),
            3 => (0usize..STREAMS).prop_map(Step::Run),
            2 => (0usize..64).prop_map(Step::Observe),
            1 => Just(Step::Flush),
        ]
    }

    /// Lanes run on these streams: lanes 2 and 3 share one, and there are
    /// more streams than a wait clock has entries (its eviction path runs).
    const LANE_STREAM: [u64; 13] = [1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
    const STREAMS: usize = 12;
    /// A use in the history: (node, is write, extent, fences observed when queued).
    type Use = (usize, bool, Extent, Vec<bool>);
    /// Bytes of a buffer: ops use random byte ranges of it (one in six
    /// covers it whole), so overlaps of a single byte occur.
    const UNITS: usize = 6;

    fn extent(first: usize, units: usize) -> Extent {
        if units == UNITS {
            Extent::whole(UNITS)
        } else {
            Extent::range(first, (first + units).min(UNITS))
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn ordering_rules_order_every_hazard(steps in prop::collection::vec(step(), 1..100)) {
            let mut clocks = [WaitClock::default(); LANE_STREAM.len()];
            let mut seqs = [0u64; STREAMS + 1];
            let mut bufs: Vec<Uses<FakeFence>> = (0..4).map(|_| Uses::default()).collect();
            // Per node: predecessors (stream order and waits), stream.
            let mut preds: Vec<Vec<usize>> = Vec::new();
            let mut stream_of: Vec<u64> = Vec::new();
            let mut fences: Vec<FakeFence> = Vec::new();
            let mut last_on_stream: [Option<usize>; STREAMS + 1] = [None; STREAMS + 1];
            // Per buffer: (node, is write, extent, observed flags when it was queued).
            let mut history: Vec<Vec<Use>> = vec![Vec::new(); 4];
            // Reads recorded but not noted yet: (buffer, extent, fence).
            let mut late: Vec<(usize, Extent, FakeFence)> = Vec::new();
            for s in steps {
                match s {
                    Step::Op(lane, uses, delay) => {
                        // A write needs the buffer exclusively: every late
                        // note on it lands first (in the worst order).
                        for &(b, write, _, _) in &uses {
                            if write {
                                let (now, keep): (Vec<_>, Vec<_>) = late.drain(..).partition(|(lb, _, _)| *lb == b);
                                late = keep;
                                for (lb, e, f) in now.into_iter().rev() {
                                    bufs[lb].note(Access::Read, e, &f);
                                }
                            }
                        }
                        let seen: Vec<bool> = fences.iter().map(|f| f.0.observed.get()).collect();
                        let s_id = LANE_STREAM[lane];
                        let stream = StreamId::for_test(s_id);
                        let node = preds.len();
                        let mut p = Vec::new();
                        if let Some(prev) = last_on_stream[s_id as usize] {
                            p.push(prev);
                        }
                        for &(b, write, first, units) in &uses {
                            let access = if write { Access::Write } else { Access::Read };
                            let deps: Vec<FakeFence> = bufs[b].deps(access, extent(first, units)).cloned().collect();
                            for d in &deps {
                                order_after(&mut clocks[lane], stream, d, |f| {
                                    p.push(f.0.node);
                                    Ok(())
                                }).unwrap();
                            }
                        }
                        seqs[s_id as usize] += 1;
                        let fence = FakeFence(Rc::new(FakeInner {
                            node,
                            stream,
                            seq: seqs[s_id as usize],
                            implied: clocks[lane],
                            ran: Cell::new(false),
                            observed: Cell::new(false),
                        }));
                        let read_only = uses.iter().all(|(_, w, _, _)| !*w);
                        for &(b, write, first, units) in &uses {
                            let access = if write { Access::Write } else { Access::Read };
                            let e = extent(first, units);
                            if delay && read_only {
                                late.push((b, e, fence.clone()));
                            } else {
                                bufs[b].note(access, e, &fence);
                            }
                            history[b].push((node, write, e, seen.clone()));
                        }
                        preds.push(p);
                        stream_of.push(s_id);
                        fences.push(fence);
                        last_on_stream[s_id as usize] = Some(node);
                    }
                    Step::Run(k) => {
                        let stream = k as u64 + 1;
                        if let Some(n) = (0..fences.len()).find(|&n| stream_of[n] == stream && !fences[n].0.ran.get()) {
                            if preds[n].iter().all(|&q| fences[q].0.ran.get()) {
                                fences[n].0.ran.set(true);
                            }
                        }
                    }
                    Step::Observe(k) => {
                        if k < fences.len() {
                            fences[k].query_done();
                        }
                    }
                    Step::Flush => {
                        for (b, e, f) in late.drain(..).rev() {
                            bufs[b].note(Access::Read, e, &f);
                        }
                    }
                }
            }
            // Transitive predecessors of every node.
            let n = preds.len();
            let mut before = vec![vec![false; n]; n];
            for v in 0..n {
                let mut stack = preds[v].clone();
                while let Some(q) = stack.pop() {
                    if !before[v][q] {
                        before[v][q] = true;
                        stack.extend(preds[q].iter().copied());
                    }
                }
            }
            // Known complete when `later` was queued: observed, or ordered
            // before something observed.
            let known = |seen: &[bool], e: usize| {
                (0..seen.len()).any(|o| seen[o] && (o == e || before[o][e]))
            };
            for uses in &history {
                for (j, (later, w2, e2, seen)) in uses.iter().enumerate() {
                    for (earlier, w1, e1, _) in &uses[..j] {
                        if earlier == later || !(*w1 || *w2) || !e1.overlaps(e2) {
                            continue;
                        }
                        prop_assert!(
                            before[*later][*earlier] || known(seen, *earlier),
                            "op {} ({}) is not ordered after op {} ({})",
                            later, if *w2 { "write" } else { "read" },
                            earlier, if *w1 { "write" } else { "read" },
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn reads_from_ever_new_streams_stay_bounded() {
        let mut u: Uses<FakeFence> = Uses::default();
        for k in 1..10_000u64 {
            let f = FakeFence(Rc::new(FakeInner {
                node: k as usize,
                stream: StreamId::for_test(k),
                seq: 1,
                implied: WaitClock::default(),
                ran: Cell::new(true),
                observed: Cell::new(false),
            }));
            u.note(Access::Read, Extent::whole(8), &f);
            assert!(u.reads.len() <= USES_BEFORE_PRUNE + 1);
        }
    }

    fn fence(node: usize, stream: u64, seq: u64) -> FakeFence {
        FakeFence(Rc::new(FakeInner {
            node,
            stream: StreamId::for_test(stream),
            seq,
            implied: WaitClock::default(),
            ran: Cell::new(false),
            observed: Cell::new(false),
        }))
    }

    #[test]
    fn disjoint_copies_into_one_buffer_do_not_wait_for_each_other() {
        let mut u: Uses<FakeFence> = Uses::default();
        // Two streams (two GPUs) write alternate chunks of one output.
        for k in 0..6usize {
            let f = fence(k, 1 + (k % 2) as u64, 1 + k as u64 / 2);
            let e = Extent::range(k * 100, (k + 1) * 100);
            assert_eq!(u.deps(Access::Write, e).count(), 0, "chunk {k} waits");
            u.note(Access::Write, e, &f);
        }
        // A read of the whole buffer waits for every stream's writes.
        let streams: Vec<u64> = u
            .deps(Access::Read, Extent::whole(600))
            .map(|f| f.stream().get())
            .collect();
        assert!(streams.contains(&1) && streams.contains(&2));
        // Chunks of one stream merged where they touch: chunks 0 and 2 do
        // not touch (1 lies between), so stream 1 keeps them apart.
        assert!(u.writes.len() <= 6);
    }

    #[test]
    fn touching_writes_of_one_stream_merge_into_one_entry() {
        let mut u: Uses<FakeFence> = Uses::default();
        for k in 0..100usize {
            u.note(
                Access::Write,
                Extent::range(k * 10, (k + 1) * 10),
                &fence(k, 1, 1 + k as u64),
            );
        }
        assert_eq!(u.writes.len(), 1);
        assert_eq!(u.writes[0].0, Extent::range(0, 1000));
        assert_eq!(u.writes[0].1.seq(), 100, "the latest fence is kept");
    }

    #[test]
    fn clock_covers_older_fences_of_a_stream_only() {
        let (s1, s2) = (StreamId::for_test(1), StreamId::for_test(2));
        let mut c = WaitClock::default();
        c.note(1, 10);
        assert!(c.covers(s1, 10) && c.covers(s1, 3));
        assert!(!c.covers(s1, 11) && !c.covers(s2, 1));
        let mut implied = WaitClock::default();
        implied.note(2, 7);
        c.merge(&implied);
        assert!(c.covers(s2, 7) && !c.covers(s2, 8));
    }

    #[test]
    fn full_clock_forgets_the_oldest_entry_only() {
        let mut c = WaitClock::default();
        for s in 1..9 {
            c.note(s, 100 + s);
        }
        c.note(99, 5);
        assert!(
            !c.covers(StreamId::for_test(1), 101),
            "the oldest entry should have been forgotten"
        );
        assert!(c.covers(StreamId::for_test(99), 5));
        assert!((2..9).all(|s| c.covers(StreamId::for_test(s), 100 + s)));
    }

    #[test]
    fn stream_ids_are_never_reused() {
        let ids: Vec<StreamId> = (0..1000).map(|_| StreamId::fresh()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
    }
}
