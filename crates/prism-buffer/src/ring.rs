//! The slot state machine of the GPU triple buffer.
//!
//! [`SlotRing`] tracks which chunk lives in which slot and how far each chunk
//! has progressed through its three GPU steps (Upload → Process → Download).
//! It knows nothing about devices or streams: progress is reported through a
//! [`RingFence`] per issued step, which in production is a CUDA event and in tests
//! a flag the test sets.
//!
//! # Rules
//!
//! * Chunks get consecutive ids `0, 1, 2, ...` in the order their upload is
//!   issued; chunk `k` always uses slot `k % len`.
//! * Each chunk's steps are issued in the order Upload, Process, Download, and
//!   each step is issued for chunks in chunk order (all Process calls go out in
//!   chunk order, and so do all Download calls).
//! * A step may be issued before the previous step's fence has completed (the
//!   GPU orders the steps with stream waits), so a slot holds up to 3 fences.
//! * A slot's reported state is derived from **observed** fence completions
//!   only (see [`SlotRing::poll`]): it is the state of the first issued step
//!   whose fence has not been observed complete, or, when all issued steps are
//!   observed complete, the state of the last issued step. Issuing a step never
//!   changes the reported state by itself.
//! * When the Download fence has been observed complete the chunk's output is
//!   ready, but the slot stays occupied until the host calls
//!   [`SlotRing::release`]. Outputs are released in chunk order.
//! * A slot is only reused for a new upload once its previous chunk's Download
//!   fence was observed complete and the slot was released.

use std::convert::Infallible;
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::Error;

/// Smallest number of slots a [`SlotRing`] may have.
pub const MIN_SLOTS: usize = 2;
/// Largest number of slots a [`SlotRing`] may have.
pub const MAX_SLOTS: usize = 8;
/// Number of slots of [`SlotRing::default`]: triple buffering.
pub const DEFAULT_SLOTS: usize = 3;

/// Something the GPU (or a test) completes later. In production: a CUDA event.
pub trait RingFence {
    /// Error returned when the completion status cannot be queried.
    type Error;

    /// Non-blocking: has the work this fence marks completed?
    ///
    /// Once this has returned `Ok(true)` the ring never queries the fence
    /// again.
    fn is_complete(&self) -> Result<bool, Self::Error>;
}

/// A test fence: complete once the flag is set.
impl RingFence for Arc<AtomicBool> {
    type Error = Infallible;

    fn is_complete(&self) -> Result<bool, Infallible> {
        // Acquire: whoever set the flag published the work it marks.
        Ok(self.load(Ordering::Acquire))
    }
}

/// A single-threaded test fence: complete once the flag is set.
impl RingFence for Rc<std::cell::Cell<bool>> {
    type Error = Infallible;

    fn is_complete(&self) -> Result<bool, Infallible> {
        Ok(self.get())
    }
}

pub use crate::slot::{ChunkId, SlotId, SlotState, Step};

/// A point-in-time view of one slot, as returned by [`SlotRing::states`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotSnapshot {
    /// The slot described.
    pub slot: SlotId,
    /// Its reported state (derived from observed fence completions).
    pub state: SlotState,
    /// The chunk it holds; `None` exactly when `state` is `Free`.
    pub chunk: Option<ChunkId>,
    /// The next step of this slot's chunk that has not been issued yet, or
    /// `None` for a free slot and for a chunk whose Download was issued.
    ///
    /// Whether that step can be issued *right now* also depends on the chunk
    /// order ([`SlotRing::next`] is authoritative): an older chunk's step of
    /// the same kind goes first.
    pub next_step: Option<Step>,
    /// The chunk's download was observed complete; the output can be consumed
    /// and the slot released (once all older chunks were released).
    pub output_ready: bool,
}

/// The fences of the chunk in one occupied slot.
struct Occupant<F> {
    chunk: ChunkId,
    /// Fences of the issued steps, in step order (`len` is the number of
    /// issued steps, 1..=3).
    fences: Vec<F>,
    /// How many of `fences` (a prefix) have been observed complete.
    observed: usize,
}

impl<F> Occupant<F> {
    fn issued(&self) -> usize {
        self.fences.len()
    }

    fn state(&self) -> SlotState {
        // First issued step not observed complete; if all issued steps are
        // observed complete, the last issued one.
        let step = self.observed.min(self.issued() - 1);
        Step::ALL[step].state()
    }

    fn next_step(&self) -> Option<Step> {
        Step::ALL.get(self.issued()).copied()
    }

    fn output_ready(&self) -> bool {
        self.observed == Step::ALL.len()
    }
}

/// The slot state machine of the GPU triple buffer; see the
/// [module docs](self) for the rules it enforces.
pub struct SlotRing<F: RingFence> {
    slots: Vec<Option<Occupant<F>>>,
    /// Id the next upload gets.
    next_upload: u64,
    /// Oldest chunk whose Process has not been issued (== `next_upload` when
    /// none is waiting).
    next_process: u64,
    /// Oldest chunk whose Download has not been issued.
    next_download: u64,
    /// Oldest chunk not released yet.
    next_release: u64,
}

impl<F: RingFence> SlotRing<F> {
    /// A ring of `slots` empty slots, `2..=8` (3 for triple buffering).
    pub fn new(slots: usize) -> Result<Self, Error> {
        if !(MIN_SLOTS..=MAX_SLOTS).contains(&slots) {
            return Err(Error::InvalidSlotCount {
                requested: slots,
                min: MIN_SLOTS,
                max: MAX_SLOTS,
            });
        }
        Ok(Self {
            slots: (0..slots).map(|_| None).collect(),
            next_upload: 0,
            next_process: 0,
            next_download: 0,
            next_release: 0,
        })
    }

    /// Number of slots (never 0; "no chunk in flight" is [`is_idle`](Self::is_idle)).
    #[allow(clippy::len_without_is_empty)] // a ring always has 2..=8 slots
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Number of chunks whose upload was issued and that were not released.
    pub fn in_flight(&self) -> usize {
        // At most `len()`, so the cast cannot truncate.
        (self.next_upload - self.next_release) as usize
    }

    /// No chunk is in flight: every slot is free.
    pub fn is_idle(&self) -> bool {
        self.in_flight() == 0
    }

    /// Which slot and chunk the next issue of `step` would use, or `None`
    /// when no slot is ready for that step.
    ///
    /// * Upload: the slot of the next chunk id, if it is free.
    /// * Process: the oldest chunk whose Upload was issued and Process not.
    /// * Download: the oldest chunk whose Process was issued and Download not.
    ///
    /// Process and Download may be ready although the previous step's fence
    /// has not completed yet.
    pub fn next(&self, step: Step) -> Option<(SlotId, ChunkId)> {
        let chunk = match step {
            Step::Upload => {
                if self.in_flight() >= self.len() {
                    return None;
                }
                self.next_upload
            }
            Step::Process => {
                if self.next_process == self.next_upload {
                    return None;
                }
                self.next_process
            }
            Step::Download => {
                if self.next_download == self.next_process {
                    return None;
                }
                self.next_download
            }
        };
        Some((self.slot_of(chunk), ChunkId(chunk)))
    }

    /// Records that `step` was issued to `slot`, with `fence` marking its
    /// completion. Returns the chunk the step belongs to.
    ///
    /// `slot` must be the one [`next(step)`](Self::next) returns; otherwise
    /// the ring is left unchanged and [`Error::SlotOutOfRange`] or
    /// [`Error::WrongState`] is returned (the fence is dropped).
    pub fn issue(&mut self, step: Step, slot: SlotId, fence: F) -> Result<ChunkId, Error> {
        let state = self.state_of(slot)?;
        let expected = self.next(step);
        let chunk = match expected {
            Some((expected_slot, chunk)) if expected_slot == slot => chunk,
            _ => {
                return Err(Error::WrongState {
                    slot,
                    step,
                    state,
                    expected: expected.map(|(s, _)| s),
                })
            }
        };
        let entry = &mut self.slots[slot.0];
        match step {
            Step::Upload => {
                debug_assert!(entry.is_none());
                *entry = Some(Occupant {
                    chunk,
                    fences: vec![fence],
                    observed: 0,
                });
                self.next_upload += 1;
            }
            Step::Process | Step::Download => {
                let occupant = entry
                    .as_mut()
                    .expect("the slot of an uploaded, unreleased chunk is occupied");
                debug_assert_eq!(occupant.chunk, chunk);
                debug_assert_eq!(occupant.issued(), step.index());
                occupant.fences.push(fence);
                if step == Step::Process {
                    self.next_process += 1;
                } else {
                    self.next_download += 1;
                }
            }
        }
        tracing::trace!(%step, slot = slot.0, chunk = chunk.0, "issued");
        Ok(chunk)
    }

    /// Queries the fences of issued steps that have not been observed
    /// complete yet and records the completions. Returns how many steps were
    /// newly observed complete.
    ///
    /// Chunks are visited oldest first; within a chunk the fences are queried
    /// in step order and querying stops at the first one that is not complete
    /// (a later step cannot finish before an earlier one on the GPU), so the
    /// observed completions of a chunk always form a prefix of its steps.
    ///
    /// A fence error is returned at once; completions observed before it stay
    /// recorded and the failing fence is queried again by the next `poll`.
    pub fn poll(&mut self) -> Result<usize, F::Error> {
        let mut newly = 0;
        for chunk in self.next_release..self.next_upload {
            let index = self.slot_of(chunk).0;
            let Some(occupant) = self.slots[index].as_mut() else {
                continue;
            };
            while occupant.observed < occupant.issued() {
                if !occupant.fences[occupant.observed].is_complete()? {
                    break;
                }
                tracing::trace!(
                    step = %Step::ALL[occupant.observed],
                    slot = index,
                    chunk,
                    "observed complete"
                );
                occupant.observed += 1;
                newly += 1;
            }
        }
        Ok(newly)
    }

    /// The oldest chunk not released yet, if its download was observed
    /// complete. Outputs come out in strict chunk order: while the oldest
    /// chunk is not done this is `None`, even if a younger one is.
    pub fn completed(&self) -> Option<(SlotId, ChunkId)> {
        if self.is_idle() {
            return None;
        }
        let slot = self.slot_of(self.next_release);
        let occupant = self.slots[slot.0].as_ref()?;
        occupant.output_ready().then_some((slot, occupant.chunk))
    }

    /// Frees `slot` after its output has been consumed. `slot` must be the one
    /// [`completed`](Self::completed) returns; otherwise the ring is left
    /// unchanged and an error is returned. Returns the released chunk.
    pub fn release(&mut self, slot: SlotId) -> Result<ChunkId, Error> {
        let state = self.state_of(slot)?;
        match self.completed() {
            Some((ready, chunk)) if ready == slot => {
                self.slots[slot.0] = None;
                self.next_release += 1;
                tracing::trace!(slot = slot.0, chunk = chunk.0, "released");
                Ok(chunk)
            }
            other => Err(Error::NotCompleted {
                slot,
                state,
                expected: other.map(|(s, _)| s),
            }),
        }
    }

    /// A snapshot of every slot, in slot order.
    pub fn states(&self) -> Vec<SlotSnapshot> {
        (0..self.len())
            .map(|i| self.snapshot_of(SlotId(i)))
            .collect()
    }

    /// A snapshot of one slot, or `None` if `slot` is out of range.
    pub fn state(&self, slot: SlotId) -> Option<SlotSnapshot> {
        (slot.0 < self.len()).then(|| self.snapshot_of(slot))
    }

    /// The fence recorded for `step` of the chunk in `slot`, if that step was
    /// issued and the slot was not released since.
    ///
    /// The GPU layer uses this to make the stream of a step wait for the
    /// previous step's event.
    pub fn fence(&self, slot: SlotId, step: Step) -> Option<&F> {
        self.slots.get(slot.0)?.as_ref()?.fences.get(step.index())
    }

    fn slot_of(&self, chunk: u64) -> SlotId {
        // `len()` is at most 8, so both casts are lossless.
        SlotId((chunk % self.len() as u64) as usize)
    }

    fn state_of(&self, slot: SlotId) -> Result<SlotState, Error> {
        match self.slots.get(slot.0) {
            None => Err(Error::SlotOutOfRange {
                slot,
                len: self.len(),
            }),
            Some(None) => Ok(SlotState::Free),
            Some(Some(occupant)) => Ok(occupant.state()),
        }
    }

    fn snapshot_of(&self, slot: SlotId) -> SlotSnapshot {
        match &self.slots[slot.0] {
            None => SlotSnapshot {
                slot,
                state: SlotState::Free,
                chunk: None,
                next_step: None,
                output_ready: false,
            },
            Some(occupant) => SlotSnapshot {
                slot,
                state: occupant.state(),
                chunk: Some(occupant.chunk),
                next_step: occupant.next_step(),
                output_ready: occupant.output_ready(),
            },
        }
    }
}

impl<F: RingFence> Default for SlotRing<F> {
    /// A ring of [`DEFAULT_SLOTS`] (3) slots.
    fn default() -> Self {
        Self::new(DEFAULT_SLOTS).expect("DEFAULT_SLOTS is within MIN_SLOTS..=MAX_SLOTS")
    }
}

impl<F: RingFence> fmt::Debug for SlotRing<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotRing")
            .field("next_upload", &self.next_upload)
            .field("next_process", &self.next_process)
            .field("next_download", &self.next_download)
            .field("next_release", &self.next_release)
            .field("slots", &self.states())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    type Flag = Rc<Cell<bool>>;

    fn flag() -> Flag {
        Rc::new(Cell::new(false))
    }

    #[test]
    fn rejects_bad_slot_counts() {
        for requested in [0, 1, 9, 100] {
            match SlotRing::<Flag>::new(requested) {
                Err(Error::InvalidSlotCount {
                    requested: r,
                    min: 2,
                    max: 8,
                }) => assert_eq!(r, requested),
                other => panic!("{requested} slots: unexpected {other:?}"),
            }
        }
        for ok in 2..=8 {
            let ring = SlotRing::<Flag>::new(ok).unwrap();
            assert_eq!(ring.len(), ok);
            assert!(ring.is_idle());
        }
        assert_eq!(SlotRing::<Flag>::default().len(), 3);
    }

    #[test]
    fn error_messages_say_what_was_wrong() {
        let err = SlotRing::<Flag>::new(1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "a slot ring needs between 2 and 8 slots, but 1 were requested"
        );

        let mut ring = SlotRing::<Flag>::new(3).unwrap();
        let err = ring.issue(Step::Download, SlotId(0), flag()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "slot 0 is Free; no slot is ready for a Download (wait for a slot to be released or issue the earlier step first)"
        );
        let err = ring.issue(Step::Upload, SlotId(3), flag()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "slot 3 does not exist; the ring has 3 slots (0..3)"
        );
        let err = ring.issue(Step::Upload, SlotId(1), flag()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "slot 1 is Free; an Upload can only be issued to slot 0"
        );

        // chunk 0 → slot 0 processing, chunk 1 → slot 1 uploaded.
        ring.issue(Step::Upload, SlotId(0), flag()).unwrap();
        ring.issue(Step::Process, SlotId(0), flag()).unwrap();
        let upload1 = flag();
        ring.issue(Step::Upload, SlotId(1), upload1.clone())
            .unwrap();
        ring.issue(Step::Process, SlotId(1), flag()).unwrap();
        // Complete chunk 1's upload only: slot 1 reports Processing.
        upload1.set(true);
        ring.poll().unwrap();
        assert_eq!(ring.state(SlotId(1)).unwrap().state, SlotState::Processing);
        let err = ring.issue(Step::Download, SlotId(1), flag()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "slot 1 is Processing; a Download can only be issued to slot 0"
        );
        let err = ring.release(SlotId(0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "slot 0 is Uploading and holds no completed output to release; no slot can be released now (the oldest chunk's download has not been observed complete)"
        );
    }

    #[test]
    fn wrong_slot_and_role_are_rejected_without_change() {
        let mut ring = SlotRing::<Flag>::new(2).unwrap();
        let before = ring.states();
        assert!(matches!(
            ring.issue(Step::Process, SlotId(0), flag()),
            Err(Error::WrongState {
                step: Step::Process,
                state: SlotState::Free,
                expected: None,
                ..
            })
        ));
        assert!(matches!(
            ring.issue(Step::Upload, SlotId(7), flag()),
            Err(Error::SlotOutOfRange { len: 2, .. })
        ));
        assert_eq!(ring.states(), before);
        assert_eq!(ring.in_flight(), 0);

        let up = flag();
        assert_eq!(
            ring.issue(Step::Upload, SlotId(0), up.clone()).ok(),
            Some(ChunkId(0))
        );
        // A second Process/Download role for slot 0 before its turn:
        assert!(matches!(
            ring.issue(Step::Download, SlotId(0), flag()),
            Err(Error::WrongState {
                state: SlotState::Uploading,
                expected: None,
                ..
            })
        ));
        // Upload goes to slot 1 now, not slot 0 again.
        assert!(matches!(
            ring.issue(Step::Upload, SlotId(0), flag()),
            Err(Error::WrongState {
                expected: Some(SlotId(1)),
                ..
            })
        ));
        assert_eq!(
            ring.issue(Step::Upload, SlotId(1), flag()).ok(),
            Some(ChunkId(1))
        );
        // Ring of 2 is full: no upload even though slot 0's upload is done.
        up.set(true);
        ring.poll().unwrap();
        assert_eq!(ring.next(Step::Upload), None);
        assert!(matches!(
            ring.issue(Step::Upload, SlotId(0), flag()),
            Err(Error::WrongState {
                state: SlotState::Uploading,
                expected: None,
                ..
            })
        ));
    }

    #[test]
    fn release_requires_observed_download_in_order() {
        let mut ring = SlotRing::<Flag>::new(3).unwrap();
        let fences: Vec<[Flag; 3]> = (0..2).map(|_| [flag(), flag(), flag()]).collect();
        for f in &fences {
            let (slot, _) = ring.next(Step::Upload).unwrap();
            ring.issue(Step::Upload, slot, f[0].clone()).unwrap();
        }
        for step in [Step::Process, Step::Download] {
            for f in &fences {
                let (slot, _) = ring.next(step).unwrap();
                ring.issue(step, slot, f[step.index()].clone()).unwrap();
            }
        }
        // Out of range, free and not-yet-complete slots can't be released.
        assert!(matches!(
            ring.release(SlotId(3)),
            Err(Error::SlotOutOfRange { .. })
        ));
        assert!(matches!(
            ring.release(SlotId(2)),
            Err(Error::NotCompleted {
                state: SlotState::Free,
                ..
            })
        ));
        assert!(matches!(
            ring.release(SlotId(0)),
            Err(Error::NotCompleted {
                state: SlotState::Uploading,
                expected: None,
                ..
            })
        ));
        // The younger chunk finishes first: still nothing to release.
        for f in &fences[1] {
            f.set(true);
        }
        assert_eq!(ring.poll(), Ok(3));
        assert!(ring.state(SlotId(1)).unwrap().output_ready);
        assert_eq!(ring.completed(), None);
        assert!(matches!(
            ring.release(SlotId(1)),
            Err(Error::NotCompleted {
                state: SlotState::Downloading,
                expected: None,
                ..
            })
        ));
        // Completed fence not yet observed: still not releasable.
        for f in &fences[0] {
            f.set(true);
        }
        assert!(ring.release(SlotId(0)).is_err());
        assert_eq!(ring.poll(), Ok(3));
        assert_eq!(ring.completed(), Some((SlotId(0), ChunkId(0))));
        assert!(matches!(
            ring.release(SlotId(1)),
            Err(Error::NotCompleted {
                expected: Some(SlotId(0)),
                ..
            })
        ));
        assert_eq!(ring.release(SlotId(0)).ok(), Some(ChunkId(0)));
        assert!(ring.release(SlotId(0)).is_err());
        assert_eq!(ring.release(SlotId(1)).ok(), Some(ChunkId(1)));
        assert!(ring.is_idle());
        assert_eq!(ring.completed(), None);
    }

    #[test]
    fn state_follows_observed_fences_not_issues() {
        let mut ring = SlotRing::<Flag>::new(3).unwrap();
        let [up, pr, dl] = [flag(), flag(), flag()];
        ring.issue(Step::Upload, SlotId(0), up.clone()).unwrap();
        let snap = |r: &SlotRing<Flag>| r.state(SlotId(0)).unwrap();
        assert_eq!(
            snap(&ring),
            SlotSnapshot {
                slot: SlotId(0),
                state: SlotState::Uploading,
                chunk: Some(ChunkId(0)),
                next_step: Some(Step::Process),
                output_ready: false,
            }
        );
        ring.issue(Step::Process, SlotId(0), pr.clone()).unwrap();
        ring.issue(Step::Download, SlotId(0), dl.clone()).unwrap();
        assert_eq!(snap(&ring).state, SlotState::Uploading);
        assert_eq!(snap(&ring).next_step, None);
        // A later fence completing first is not observed past an earlier one.
        dl.set(true);
        assert_eq!(ring.poll(), Ok(0));
        assert_eq!(snap(&ring).state, SlotState::Uploading);
        up.set(true);
        assert_eq!(snap(&ring).state, SlotState::Uploading);
        assert_eq!(ring.poll(), Ok(1));
        assert_eq!(snap(&ring).state, SlotState::Processing);
        pr.set(true);
        assert_eq!(ring.poll(), Ok(2));
        assert_eq!(snap(&ring).state, SlotState::Downloading);
        assert!(snap(&ring).output_ready);
        assert_eq!(ring.poll(), Ok(0));
        for (step, f) in [
            (Step::Upload, &up),
            (Step::Process, &pr),
            (Step::Download, &dl),
        ] {
            assert!(Rc::ptr_eq(ring.fence(SlotId(0), step).unwrap(), f));
        }
        assert!(ring.fence(SlotId(1), Step::Upload).is_none());
        assert!(ring.fence(SlotId(9), Step::Upload).is_none());
        ring.release(SlotId(0)).unwrap();
        assert!(ring.fence(SlotId(0), Step::Upload).is_none());
    }

    #[test]
    fn poll_error_is_returned_and_retried() {
        struct Failing(Rc<Cell<u32>>);
        impl RingFence for Failing {
            type Error = &'static str;
            fn is_complete(&self) -> Result<bool, &'static str> {
                self.0.set(self.0.get() + 1);
                Err("device lost")
            }
        }
        let queries = Rc::new(Cell::new(0));
        let mut ring = SlotRing::<Failing>::new(2).unwrap();
        ring.issue(Step::Upload, SlotId(0), Failing(queries.clone()))
            .unwrap();
        assert_eq!(ring.poll(), Err("device lost"));
        assert_eq!(ring.poll(), Err("device lost"));
        assert_eq!(queries.get(), 2);
        assert_eq!(ring.state(SlotId(0)).unwrap().state, SlotState::Uploading);
    }
}
