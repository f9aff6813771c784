//! The crate's error type.

use std::fmt;

use crate::slot::{SlotId, SlotState, Step};

/// Everything that can go wrong in `prism-buffer`.
///
/// Misuse of the slot ring (issuing a step to the wrong slot, releasing a slot
/// whose output is not ready, ...) is reported through this type instead of a
/// panic. The ring is left unchanged when one of these errors is returned.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// [`SlotRing::new`](crate::SlotRing::new) was asked for an unsupported
    /// number of slots.
    #[error("a slot ring needs between {min} and {max} slots, but {requested} were requested")]
    InvalidSlotCount {
        /// The slot count that was passed in.
        requested: usize,
        /// Smallest supported slot count.
        min: usize,
        /// Largest supported slot count.
        max: usize,
    },

    /// A slot index that does not exist in this ring.
    #[error("slot {slot} does not exist; the ring has {len} slots (0..{len})")]
    SlotOutOfRange {
        /// The slot that was passed in.
        slot: SlotId,
        /// Number of slots of the ring.
        len: usize,
    },

    /// A step was issued to a slot that is not the one the ring expects for
    /// that step (see [`SlotRing::next`](crate::SlotRing::next)).
    #[error("slot {slot} is {state}; {}", ExpectedIssue { step: *.step, expected: *.expected })]
    WrongState {
        /// The slot that was passed in.
        slot: SlotId,
        /// The step that was issued.
        step: Step,
        /// The current (reported) state of `slot`.
        state: SlotState,
        /// The slot the step would have to be issued to, if any is ready.
        expected: Option<SlotId>,
    },

    /// A GPU, stream or buffer error from prism-stream.
    #[error(transparent)]
    Stream(#[from] prism_stream::Error),

    /// A chunk longer than a slot.
    #[error("a chunk of {len} elements does not fit a slot of {capacity} elements")]
    ChunkTooLong {
        /// Elements in the chunk.
        len: usize,
        /// Elements per slot.
        capacity: usize,
    },

    /// A configuration the engine cannot run.
    #[error("invalid configuration: {0}")]
    Config(&'static str),

    /// Zero-length slots or chunks.
    #[error("{what} has zero length")]
    ZeroLength {
        /// What was empty.
        what: &'static str,
    },

    /// No slot is ready for this step now (poll, or wait for a completion).
    #[error("no slot is ready for {step} now: {why}")]
    NoSlotReady {
        /// The step that was asked for.
        step: Step,
        /// Why not.
        why: &'static str,
    },

    /// [`SlotRing::release`](crate::SlotRing::release) was called for a slot
    /// that does not hold the oldest completed chunk.
    #[error("slot {slot} is {state} and holds no completed output to release; {}", ExpectedRelease(*.expected))]
    NotCompleted {
        /// The slot that was passed in.
        slot: SlotId,
        /// The current (reported) state of `slot`.
        state: SlotState,
        /// The slot that could be released now, if any.
        expected: Option<SlotId>,
    },

    /// A [`Broadcast`](crate::broadcast::Broadcast) ring asked for too few
    /// buffers.
    #[error("a broadcast ring needs at least {min} buffers (one being written, one for the newest chunk, one per reader), but {buffers} were requested")]
    TooFewBuffers {
        /// The buffer count that was passed in.
        buffers: usize,
        /// The fewest a ring takes.
        min: usize,
    },

    /// A reader more than a broadcast ring's buffers allow.
    #[error("a broadcast ring of {buffers} buffers takes at most {max} readers (each reader may hold a buffer, and two are kept for the writer and the newest chunk); make it with more buffers or drop a reader first")]
    TooManyReaders {
        /// Buffers of the ring.
        buffers: usize,
        /// Readers it takes (`buffers - 2`).
        max: usize,
    },

    /// A second writer for a broadcast ring.
    #[error("this broadcast ring already had its writer: a ring has one writer over its life (begin a new sequence on that writer instead)")]
    WriterTaken,

    /// A broadcast commit longer than the buffer.
    #[error("cannot commit {len} elements: a broadcast ring's buffers hold {capacity}")]
    CommitTooLong {
        /// Elements to commit.
        len: usize,
        /// Elements per buffer.
        capacity: usize,
    },
}

/// Formats the "where could the step go instead" half of
/// [`Error::WrongState`].
struct ExpectedIssue {
    step: Step,
    expected: Option<SlotId>,
}

impl fmt::Display for ExpectedIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let article = match self.step {
            Step::Upload => "an",
            Step::Process | Step::Download => "a",
        };
        match self.expected {
            Some(slot) => write!(
                f,
                "{article} {} can only be issued to slot {slot}",
                self.step
            ),
            None => write!(
                f,
                "no slot is ready for {article} {} (wait for a slot to be released or issue the earlier step first)",
                self.step
            ),
        }
    }
}

/// Formats the "what could be released instead" half of
/// [`Error::NotCompleted`].
struct ExpectedRelease(Option<SlotId>);

impl fmt::Display for ExpectedRelease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(slot) => write!(f, "only slot {slot} can be released now"),
            None => write!(
                f,
                "no slot can be released now (the oldest chunk's download has not been observed complete)"
            ),
        }
    }
}
