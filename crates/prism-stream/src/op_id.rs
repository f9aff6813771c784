//! [`OpId`]: the identity of one queued operation, shared by the op
//! bookkeeping (`graph`) and the errors that name an op (`error`), below
//! both.

use std::fmt;

/// Identifies one queued operation of one [`AsyncCoordinator`](crate::AsyncCoordinator)
/// (or [`OpGraph`](crate::OpGraph)): ids carry their graph's identity, so an id of another
/// coordinator is refused (`ForeignOp`) instead of read as complete. Ids of
/// one graph order as they were handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId {
    /// The identity of the graph that made it.
    pub(crate) graph: u64,
    /// Position of the op in its graph.
    pub(crate) index: u64,
}

impl OpId {
    /// Position of the op in its graph (0 for the first op queued).
    pub fn index(self) -> u64 {
        self.index
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op#{}", self.index)
    }
}
