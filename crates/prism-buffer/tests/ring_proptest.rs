//! State-machine tests of `SlotRing` against a plain reference model.
//!
//! The test owns fake fences that it completes (or makes fail) at random; the
//! model tracks the same fences and derives everything (which slot each step
//! may go to, reported states, completed outputs, errors) in the most direct
//! way it can, independently of the ring's counters.

use std::cell::Cell;
use std::collections::{BTreeSet, VecDeque};
use std::rc::Rc;

use prism_buffer::{
    ChunkId, Error, RingFence, SlotId, SlotRing, SlotSnapshot, SlotState, Step, MAX_SLOTS,
    MIN_SLOTS,
};
use proptest::prelude::*;
use proptest::sample::Index;

// ---------------------------------------------------------------------------
// Fake fence

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pending,
    Complete,
    Failing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FenceError {
    chunk: u64,
    step: Step,
}

#[derive(Debug)]
struct FenceCell {
    chunk: u64,
    step: Step,
    status: Cell<Status>,
    queries: Cell<u32>,
}

/// Completed (or broken) by the test; counts how often the ring queried it.
#[derive(Debug, Clone)]
struct FakeFence(Rc<FenceCell>);

impl FakeFence {
    fn new(chunk: u64, step: Step) -> Self {
        Self(Rc::new(FenceCell {
            chunk,
            step,
            status: Cell::new(Status::Pending),
            queries: Cell::new(0),
        }))
    }

    fn status(&self) -> Status {
        self.0.status.get()
    }

    fn set(&self, status: Status) {
        self.0.status.set(status);
    }

    fn queries(&self) -> u32 {
        self.0.queries.get()
    }
}

impl RingFence for FakeFence {
    type Error = FenceError;

    fn is_complete(&self) -> Result<bool, FenceError> {
        self.0.queries.set(self.0.queries.get() + 1);
        match self.status() {
            Status::Pending => Ok(false),
            Status::Complete => Ok(true),
            Status::Failing => Err(FenceError {
                chunk: self.0.chunk,
                step: self.0.step,
            }),
        }
    }
}

// ---------------------------------------------------------------------------
// Reference model

#[derive(Debug)]
struct ModelChunk {
    id: u64,
    slot: usize,
    /// Fences of the issued steps, in step order.
    fences: Vec<FakeFence>,
    /// Number of fences (a prefix) observed complete by a poll.
    observed: usize,
}

#[derive(Debug)]
struct Model {
    slots: usize,
    /// Chunks issued and not released, oldest first.
    in_flight: VecDeque<ModelChunk>,
    next_id: u64,
}

impl Model {
    fn new(slots: usize) -> Self {
        Self {
            slots,
            in_flight: VecDeque::new(),
            next_id: 0,
        }
    }

    fn chunk_in(&self, slot: usize) -> Option<&ModelChunk> {
        self.in_flight.iter().find(|c| c.slot == slot)
    }

    fn next(&self, step: Step) -> Option<(usize, u64)> {
        match step {
            Step::Upload => {
                let slot = (self.next_id % self.slots as u64) as usize;
                self.chunk_in(slot)
                    .is_none()
                    .then_some((slot, self.next_id))
            }
            // The oldest chunk that has exactly the previous steps issued.
            Step::Process | Step::Download => self
                .in_flight
                .iter()
                .find(|c| c.fences.len() == step.index())
                .map(|c| (c.slot, c.id)),
        }
    }

    fn state_of(&self, slot: usize) -> SlotState {
        match self.chunk_in(slot) {
            None => SlotState::Free,
            Some(c) => {
                // First issued step not observed complete, else the last issued.
                let step = if c.observed < c.fences.len() {
                    c.observed
                } else {
                    c.fences.len() - 1
                };
                [
                    SlotState::Uploading,
                    SlotState::Processing,
                    SlotState::Downloading,
                ][step]
            }
        }
    }

    fn states(&self) -> Vec<SlotSnapshot> {
        (0..self.slots)
            .map(|slot| {
                let chunk = self.chunk_in(slot);
                SlotSnapshot {
                    slot: SlotId(slot),
                    state: self.state_of(slot),
                    chunk: chunk.map(|c| ChunkId(c.id)),
                    next_step: chunk.and_then(|c| match c.fences.len() {
                        1 => Some(Step::Process),
                        2 => Some(Step::Download),
                        _ => None,
                    }),
                    output_ready: chunk.is_some_and(|c| c.observed == 3),
                }
            })
            .collect()
    }

    fn issue(&mut self, step: Step, fence: FakeFence) -> u64 {
        match step {
            Step::Upload => {
                let (slot, id) = self.next(step).unwrap();
                self.in_flight.push_back(ModelChunk {
                    id,
                    slot,
                    fences: vec![fence],
                    observed: 0,
                });
                self.next_id += 1;
                id
            }
            Step::Process | Step::Download => {
                let chunk = self
                    .in_flight
                    .iter_mut()
                    .find(|c| c.fences.len() == step.index())
                    .unwrap();
                chunk.fences.push(fence);
                chunk.id
            }
        }
    }

    /// Oldest chunk first; per chunk, fences in step order up to the first one
    /// that is not complete. The first failing fence aborts the poll.
    fn poll(&mut self) -> Result<usize, FenceError> {
        let mut newly = 0;
        for chunk in &mut self.in_flight {
            while chunk.observed < chunk.fences.len() {
                let fence = &chunk.fences[chunk.observed];
                match fence.status() {
                    Status::Pending => break,
                    Status::Complete => {
                        chunk.observed += 1;
                        newly += 1;
                    }
                    Status::Failing => {
                        return Err(FenceError {
                            chunk: chunk.id,
                            step: Step::ALL[chunk.observed],
                        })
                    }
                }
            }
        }
        Ok(newly)
    }

    fn completed(&self) -> Option<(usize, u64)> {
        let oldest = self.in_flight.front()?;
        (oldest.observed == 3).then_some((oldest.slot, oldest.id))
    }

    fn release(&mut self) -> u64 {
        self.in_flight.pop_front().unwrap().id
    }

    /// Fences the model has observed complete.
    fn observed_fences(&self) -> Vec<FakeFence> {
        self.in_flight
            .iter()
            .flat_map(|c| c.fences[..c.observed].iter().cloned())
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Operations

#[derive(Debug, Clone)]
enum SlotChoice {
    /// The slot the model says is the right one (slot 0 if there is none).
    Right,
    /// Any slot, possibly out of range.
    Any(usize),
}

#[derive(Debug, Clone)]
enum Op {
    Issue {
        step: Step,
        slot: SlotChoice,
    },
    /// Complete one of the pending fences.
    Complete(Index),
    /// Complete the oldest pending fence (keeps the pipeline moving).
    CompleteOldest,
    /// Make one of the pending fences fail when queried.
    Fail(Index),
    /// Let one of the failing fences complete after all.
    Recover(Index),
    Poll,
    Release(SlotChoice),
    /// `completed()`, then release that slot.
    TakeCompleted,
}

fn slot_choice() -> impl Strategy<Value = SlotChoice> {
    prop_oneof![
        3 => Just(SlotChoice::Right),
        1 => (0..MAX_SLOTS + 2).prop_map(SlotChoice::Any),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    proptest::sample::select(Step::ALL.to_vec())
}

fn op(with_failures: bool) -> BoxedStrategy<Op> {
    let common = prop_oneof![
        8 => (step(), slot_choice()).prop_map(|(step, slot)| Op::Issue { step, slot }),
        4 => any::<Index>().prop_map(Op::Complete),
        2 => Just(Op::CompleteOldest),
        4 => Just(Op::Poll),
        1 => slot_choice().prop_map(Op::Release),
        3 => Just(Op::TakeCompleted),
    ];
    if with_failures {
        prop_oneof![
            10 => common,
            1 => any::<Index>().prop_map(Op::Fail),
            1 => any::<Index>().prop_map(Op::Recover),
        ]
        .boxed()
    } else {
        common.boxed()
    }
}

// ---------------------------------------------------------------------------
// Harness

struct Harness {
    ring: SlotRing<FakeFence>,
    model: Model,
    /// Every fence handed to the ring, in issue order.
    fences: Vec<FakeFence>,
    /// Chunks in the order `release` returned them.
    released: Vec<u64>,
    /// Per slot: the last chunk uploaded into it and that chunk's Download
    /// fence (once issued).
    last_in_slot: Vec<Option<(u64, Option<FakeFence>)>>,
}

impl Harness {
    fn new(slots: usize) -> Self {
        Self {
            ring: SlotRing::new(slots).unwrap(),
            model: Model::new(slots),
            fences: Vec::new(),
            released: Vec::new(),
            last_in_slot: vec![None; slots],
        }
    }

    fn slots(&self) -> usize {
        self.model.slots
    }

    fn pick(&self, choice: &SlotChoice, right: Option<usize>) -> usize {
        match choice {
            SlotChoice::Right => right.unwrap_or(0),
            SlotChoice::Any(slot) => *slot,
        }
    }

    fn with_status(&self, status: Status) -> Vec<FakeFence> {
        self.fences
            .iter()
            .filter(|f| f.status() == status)
            .cloned()
            .collect()
    }

    fn issue(&mut self, step: Step, slot: usize) -> Result<(), TestCaseError> {
        let expected = self.model.next(step);
        // The chunk id the fence would belong to (for fence error reports).
        let chunk = expected.map_or(u64::MAX, |(_, id)| id);
        let fence = FakeFence::new(chunk, step);
        let result = self.ring.issue(step, SlotId(slot), fence.clone());
        match expected {
            Some((right, id)) if right == slot => {
                let got = result.map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(got, ChunkId(id));
                if step == Step::Upload {
                    // A slot is only reused after its previous chunk's
                    // download fence completed and it was released.
                    if let Some((previous, download)) = &self.last_in_slot[slot] {
                        prop_assert!(self.released.contains(previous));
                        let download = download.as_ref().expect("download was issued");
                        prop_assert_eq!(download.status(), Status::Complete);
                    }
                    prop_assert_eq!(id % self.slots() as u64, slot as u64);
                    self.last_in_slot[slot] = Some((id, None));
                } else if step == Step::Download {
                    let entry = self.last_in_slot[slot].as_mut().unwrap();
                    prop_assert_eq!(entry.0, id);
                    entry.1 = Some(fence.clone());
                }
                prop_assert_eq!(self.model.issue(step, fence.clone()), id);
                self.fences.push(fence);
            }
            _ => {
                let err = match result {
                    Ok(c) => {
                        return Err(TestCaseError::fail(format!(
                            "{step:?} to slot {slot} accepted (chunk {c:?}); model expected {expected:?}"
                        )))
                    }
                    Err(e) => e,
                };
                if slot >= self.slots() {
                    prop_assert!(
                        matches!(err, Error::SlotOutOfRange { slot: SlotId(s), len } if s == slot && len == self.slots()),
                        "{:?}",
                        err
                    );
                } else {
                    let want_state = self.model.state_of(slot);
                    let want_expected = expected.map(|(s, _)| SlotId(s));
                    prop_assert!(
                        matches!(
                            err,
                            Error::WrongState { slot: SlotId(s), step: st, state, expected: ex }
                                if s == slot && st == step && state == want_state && ex == want_expected
                        ),
                        "{:?}",
                        err
                    );
                }
                // The rejected fence is never queried.
                prop_assert_eq!(fence.queries(), 0);
            }
        }
        Ok(())
    }

    fn release(&mut self, slot: usize) -> Result<(), TestCaseError> {
        let expected = self.model.completed();
        let result = self.ring.release(SlotId(slot));
        match expected {
            Some((right, id)) if right == slot => {
                let got = result.map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(got, ChunkId(id));
                prop_assert_eq!(self.model.release(), id);
                self.released.push(id);
            }
            _ => {
                let err = match result {
                    Ok(c) => {
                        return Err(TestCaseError::fail(format!(
                            "release of slot {slot} accepted (chunk {c:?}); model expected {expected:?}"
                        )))
                    }
                    Err(e) => e,
                };
                if slot >= self.slots() {
                    prop_assert!(
                        matches!(err, Error::SlotOutOfRange { slot: SlotId(s), len } if s == slot && len == self.slots()),
                        "{:?}",
                        err
                    );
                } else {
                    let want_state = self.model.state_of(slot);
                    let want_expected = expected.map(|(s, _)| SlotId(s));
                    prop_assert!(
                        matches!(
                            err,
                            Error::NotCompleted { slot: SlotId(s), state, expected: ex }
                                if s == slot && state == want_state && ex == want_expected
                        ),
                        "{:?}",
                        err
                    );
                }
            }
        }
        Ok(())
    }

    fn poll(&mut self) -> Result<(), TestCaseError> {
        let observed_before: Vec<(FakeFence, u32)> = self
            .model
            .observed_fences()
            .into_iter()
            .map(|f| {
                let q = f.queries();
                (f, q)
            })
            .collect();
        let got = self.ring.poll();
        let want = self.model.poll();
        prop_assert_eq!(got, want);
        // Fences already observed complete are never queried again.
        for (fence, queries) in observed_before {
            prop_assert_eq!(fence.queries(), queries);
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Issue { step, slot } => {
                let slot = self.pick(slot, self.model.next(*step).map(|(s, _)| s));
                self.issue(*step, slot)?;
            }
            Op::Complete(index) => {
                let pending = self.with_status(Status::Pending);
                if !pending.is_empty() {
                    index.get(&pending).set(Status::Complete);
                }
            }
            Op::CompleteOldest => {
                if let Some(f) = self.with_status(Status::Pending).first() {
                    f.set(Status::Complete);
                }
            }
            Op::Fail(index) => {
                let pending = self.with_status(Status::Pending);
                if !pending.is_empty() {
                    index.get(&pending).set(Status::Failing);
                }
            }
            Op::Recover(index) => {
                let failing = self.with_status(Status::Failing);
                if !failing.is_empty() {
                    index.get(&failing).set(Status::Complete);
                }
            }
            Op::Poll => self.poll()?,
            Op::Release(slot) => {
                let slot = self.pick(slot, self.model.completed().map(|(s, _)| s));
                self.release(slot)?;
            }
            Op::TakeCompleted => {
                let got = self.ring.completed();
                prop_assert_eq!(
                    got,
                    self.model
                        .completed()
                        .map(|(s, id)| (SlotId(s), ChunkId(id)))
                );
                if let Some((slot, _)) = got {
                    self.release(slot.0)?;
                }
            }
        }
        self.check()
    }

    /// Invariants that must hold between any two operations.
    fn check(&self) -> Result<(), TestCaseError> {
        let n = self.slots();
        let ring = &self.ring;
        prop_assert_eq!(ring.len(), n);
        prop_assert_eq!(ring.in_flight(), self.model.in_flight.len());
        prop_assert_eq!(ring.is_idle(), self.model.in_flight.is_empty());

        // Reported states match the model (derived from observed fences).
        let states = ring.states();
        prop_assert_eq!(&states, &self.model.states());
        for snapshot in &states {
            prop_assert_eq!(ring.state(snapshot.slot), Some(*snapshot));
        }
        prop_assert_eq!(ring.state(SlotId(n)), None);

        // No slot holds two chunks; chunk k lives in slot k % n; the chunks
        // in flight are exactly the ones issued and not yet released.
        let mut chunks = BTreeSet::new();
        for s in &states {
            prop_assert_eq!(s.chunk.is_none(), s.state == SlotState::Free);
            if let Some(ChunkId(c)) = s.chunk {
                prop_assert_eq!((c % n as u64) as usize, s.slot.0);
                prop_assert!(chunks.insert(c), "chunk {} in two slots", c);
            }
        }
        let expected: BTreeSet<u64> = (self.released.len() as u64..self.model.next_id).collect();
        prop_assert_eq!(chunks, expected);

        // Which slot each step goes to next.
        let mut roles = BTreeSet::new();
        for step in Step::ALL {
            let next = ring.next(step);
            prop_assert_eq!(
                next,
                self.model
                    .next(step)
                    .map(|(s, id)| (SlotId(s), ChunkId(id)))
            );
            if let Some((slot, chunk)) = next {
                // No slot is ready for two roles at once.
                prop_assert!(roles.insert(slot), "slot {:?} ready for two steps", slot);
                let snapshot = states[slot.0];
                if step == Step::Upload {
                    prop_assert_eq!(snapshot.state, SlotState::Free);
                } else {
                    prop_assert_eq!(snapshot.chunk, Some(chunk));
                    prop_assert_eq!(snapshot.next_step, Some(step));
                }
            }
        }

        let completed = ring.completed();
        prop_assert_eq!(
            completed,
            self.model
                .completed()
                .map(|(s, id)| (SlotId(s), ChunkId(id)))
        );
        if let Some((slot, _)) = completed {
            prop_assert!(states[slot.0].output_ready);
        }

        // Outputs come out in issue order, each exactly once.
        prop_assert!(self
            .released
            .iter()
            .copied()
            .eq(0..self.released.len() as u64));

        // The fences the ring hands back are the ones that were issued.
        for c in &self.model.in_flight {
            for (i, fence) in c.fences.iter().enumerate() {
                let stored = ring.fence(SlotId(c.slot), Step::ALL[i]);
                prop_assert!(stored.is_some_and(|f| Rc::ptr_eq(&f.0, &fence.0)));
            }
            if c.fences.len() < 3 {
                prop_assert!(ring
                    .fence(SlotId(c.slot), Step::ALL[c.fences.len()])
                    .is_none());
            }
        }
        Ok(())
    }

    /// Completes everything and drives the ring until every issued chunk has
    /// been released.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        let issued = self.model.next_id;
        let mut rounds = 0;
        while !self.ring.is_idle() {
            rounds += 1;
            prop_assert!(rounds <= 4 * MAX_SLOTS, "ring does not drain");
            for step in [Step::Process, Step::Download] {
                while let Some((slot, _)) = self.ring.next(step) {
                    self.issue(step, slot.0)?;
                    self.check()?;
                }
            }
            for f in &self.fences {
                f.set(Status::Complete);
            }
            self.poll()?;
            while let Some((slot, _)) = self.ring.completed() {
                self.release(slot.0)?;
            }
            self.check()?;
        }
        prop_assert!(self.released.iter().copied().eq(0..issued));
        prop_assert_eq!(
            self.ring.next(Step::Upload),
            Some((
                SlotId((issued % self.slots() as u64) as usize),
                ChunkId(issued)
            ))
        );
        Ok(())
    }
}

fn slots() -> impl Strategy<Value = usize> {
    MIN_SLOTS..=MAX_SLOTS
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Random well- and ill-formed operations; fences only ever complete.
    #[test]
    fn ring_matches_model(
        slots in slots(),
        ops in prop::collection::vec(op(false), 1..120),
    ) {
        let mut h = Harness::new(slots);
        h.check()?;
        for op in &ops {
            h.apply(op)?;
        }
    }

    /// As above, but fences may also fail when queried (and recover later).
    #[test]
    fn ring_matches_model_with_fence_errors(
        slots in slots(),
        ops in prop::collection::vec(op(true), 1..120),
    ) {
        let mut h = Harness::new(slots);
        for op in &ops {
            h.apply(op)?;
        }
    }

    /// After any sequence of operations, completing all work lets every chunk
    /// out exactly once, in issue order, and leaves the ring idle.
    #[test]
    fn ring_drains_in_issue_order(
        slots in slots(),
        ops in prop::collection::vec(op(false), 0..80),
    ) {
        let mut h = Harness::new(slots);
        for op in &ops {
            h.apply(op)?;
        }
        h.drain()?;
    }
}

// ---------------------------------------------------------------------------
// A deterministic pipeline run, as the GPU layer will drive it.

#[test]
fn steady_state_pipeline_keeps_three_chunks_in_flight() {
    let mut ring = SlotRing::<FakeFence>::new(3).unwrap();
    let mut fences = Vec::new();
    let mut out = Vec::new();
    for round in 0..10u64 {
        for step in [Step::Download, Step::Process, Step::Upload] {
            if let Some((slot, chunk)) = ring.next(step) {
                let f = FakeFence::new(chunk.0, step);
                ring.issue(step, slot, f.clone()).unwrap();
                fences.push(f);
            }
        }
        if round >= 2 {
            assert_eq!(ring.in_flight(), 3, "round {round}");
            let busy: Vec<SlotState> = ring.states().iter().map(|s| s.state).collect();
            assert!(!busy.contains(&SlotState::Free), "round {round}: {busy:?}");
        }
        // The GPU finishes everything issued so far.
        for f in &fences {
            f.set(Status::Complete);
        }
        ring.poll().unwrap();
        while let Some((slot, _)) = ring.completed() {
            out.push(ring.release(slot).unwrap().0);
        }
    }
    assert_eq!(out, (0..out.len() as u64).collect::<Vec<_>>());
    assert_eq!(out.len(), 8);
}
