//! The ring's vocabulary, below the ring and its errors: a chunk's
//! [`Step`]s, a slot's [`SlotState`], [`SlotId`] and [`ChunkId`]
//! (re-exported by [`ring`](crate::ring)).

use std::fmt;

/// One of the three GPU steps every chunk goes through, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// Host → device copy of the chunk's input.
    Upload,
    /// The kernel(s) working on the uploaded chunk.
    Process,
    /// Device → host copy of the chunk's output.
    Download,
}

impl Step {
    /// All steps, in the order they are issued for a chunk.
    pub const ALL: [Step; 3] = [Step::Upload, Step::Process, Step::Download];

    /// Position of the step in [`Step::ALL`].
    pub const fn index(self) -> usize {
        match self {
            Step::Upload => 0,
            Step::Process => 1,
            Step::Download => 2,
        }
    }

    /// The step issued after this one, if any.
    pub const fn next(self) -> Option<Step> {
        match self {
            Step::Upload => Some(Step::Process),
            Step::Process => Some(Step::Download),
            Step::Download => None,
        }
    }

    /// The slot state a chunk is in while this step is outstanding.
    pub const fn state(self) -> SlotState {
        match self {
            Step::Upload => SlotState::Uploading,
            Step::Process => SlotState::Processing,
            Step::Download => SlotState::Downloading,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Upload => "Upload",
            Step::Process => "Process",
            Step::Download => "Download",
        })
    }
}

/// The reported state of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SlotState {
    /// Holds no chunk; the next upload may use it.
    Free,
    /// The chunk's upload has not been observed complete (or it has, and the
    /// Process step has not been issued yet).
    Uploading,
    /// The chunk's processing has not been observed complete (or it has, and
    /// the Download step has not been issued yet).
    Processing,
    /// The chunk's download has not been observed complete, or it has and the
    /// output waits to be released (`output_ready`).
    Downloading,
}

impl fmt::Display for SlotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SlotState::Free => "Free",
            SlotState::Uploading => "Uploading",
            SlotState::Processing => "Processing",
            SlotState::Downloading => "Downloading",
        })
    }
}

/// Index of a slot in a [`SlotRing`](crate::SlotRing) (`0..len`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotId(pub usize);

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Sequence number of a chunk: `0, 1, 2, ...` in upload order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub u64);

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}
