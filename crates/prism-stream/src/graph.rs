//! Operation bookkeeping, free of any GPU call: ids, statuses, dependency
//! validation and completion tracking. Generic over the fence type so it is
//! tested on the CPU (proptest in `tests/graph_proptest.rs`) with fake fences.
//!
//! Cycles: an operation may only depend on operations queued before it, so
//! the dependency graph is acyclic by construction. A dependency on itself or
//! on an id not handed out yet is rejected (`DependencyCycle` / `UnknownOp`).

use std::borrow::Cow;
use std::fmt;

use crate::{Error, Result};

/// Lane of ops inserted without an ordering assumption.
const NO_LANE: usize = usize::MAX;

/// Identifies one queued operation of an [`AsyncCoordinator`](crate::AsyncCoordinator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub u64);

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op#{}", self.0)
    }
}

/// What the coordinator knows of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpStatus {
    /// Queued; its completion event has not been observed yet.
    Pending,
    /// Its completion event was observed complete.
    Complete,
    /// The GPU reported an error for it (the reason is the CUDA error).
    Failed(String),
}

/// An operation observed finished by `poll` or `wait`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub op: OpId,
    pub name: String,
    /// `Err(reason)` when the operation failed on the GPU.
    pub result: std::result::Result<(), String>,
}

/// What probing a fence found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    NotReady,
    Complete,
    Failed(String),
}

/// Operation table: one status per op ever queued, fences of pending ops.
#[derive(Debug)]
pub struct OpGraph<F> {
    names: Vec<Cow<'static, str>>,
    status: Vec<OpStatus>,
    /// Pending ops in queue order, with their fences.
    pending: Vec<(OpId, usize, F)>,
    /// Ops observed finished (by `wait`) that `poll` has not reported yet.
    unreported: Vec<Completion>,
}

impl<F> Default for OpGraph<F> {
    fn default() -> Self {
        Self {
            names: Vec::new(),
            status: Vec::new(),
            pending: Vec::new(),
            unreported: Vec::new(),
        }
    }
}

impl<F> OpGraph<F> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The id the next inserted op will get.
    pub fn next_id(&self) -> OpId {
        OpId(self.status.len() as u64)
    }

    /// Number of ops queued and not yet observed finished.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Validates every one of `deps` for the next op, then calls `wait` with
    /// the fence of each dep still pending (complete deps need no wait).
    /// Nothing is waited on unless all deps are valid.
    pub fn check_deps(&self, deps: &[OpId], mut wait: impl FnMut(&F) -> Result<()>) -> Result<()> {
        let op = self.next_id();
        for &dep in deps {
            if dep >= op {
                return Err(if dep == op {
                    Error::DependencyCycle { op, dep }
                } else {
                    Error::UnknownOp(dep)
                });
            }
            match &self.status[dep.0 as usize] {
                OpStatus::Complete => {}
                OpStatus::Failed(reason) => {
                    return Err(Error::DependencyFailed {
                        op,
                        dep,
                        dep_name: self.names[dep.0 as usize].to_string(),
                        reason: reason.clone(),
                    })
                }
                OpStatus::Pending => {}
            }
        }
        for &dep in deps {
            if let Some(f) = self.fence(dep) {
                wait(f)?;
            }
        }
        Ok(())
    }

    /// Records a new pending op, with no ordering assumed against other ops.
    pub fn insert(&mut self, name: impl Into<Cow<'static, str>>, fence: F) -> OpId {
        self.insert_on(NO_LANE, name, fence)
    }

    /// Records a new pending op on `lane`: ops of one lane (one stream)
    /// complete in the order they were inserted, so `poll` stops probing a
    /// lane at its first op that is not ready.
    pub fn insert_on(&mut self, lane: usize, name: impl Into<Cow<'static, str>>, fence: F) -> OpId {
        let id = self.next_id();
        self.names.push(name.into());
        self.status.push(OpStatus::Pending);
        self.pending.push((id, lane, fence));
        id
    }

    /// Status of an op.
    pub fn status(&self, op: OpId) -> Result<&OpStatus> {
        self.status.get(op.0 as usize).ok_or(Error::UnknownOp(op))
    }

    /// Name of an op.
    pub fn name(&self, op: OpId) -> Result<&str> {
        self.names
            .get(op.0 as usize)
            .map(|n| &**n)
            .ok_or(Error::UnknownOp(op))
    }

    /// The fence of a pending op (None once it finished).
    pub fn fence(&self, op: OpId) -> Option<&F> {
        // Recent ops are at the back; searching from there finds them at once.
        self.pending
            .iter()
            .rev()
            .find(|(id, _, _)| *id == op)
            .map(|(_, _, f)| f)
    }

    /// Fences of every pending op.
    pub fn pending_fences(&self) -> impl Iterator<Item = (OpId, &F)> {
        self.pending.iter().map(|(id, _, f)| (*id, f))
    }

    /// Probes every pending op; returns all ops finished since the last poll
    /// (including ones `finish` recorded), in op order.
    pub fn poll(&mut self, mut probe: impl FnMut(&F) -> Probe) -> Vec<Completion> {
        let mut done = std::mem::take(&mut self.unreported);
        // Lanes found busy in this pass: their later ops cannot be done yet.
        let mut busy = [NO_LANE; 8];
        let mut n_busy = 0;
        let pending = std::mem::take(&mut self.pending);
        self.pending.reserve(pending.len());
        for (id, lane, fence) in pending {
            if lane != NO_LANE && busy[..n_busy].contains(&lane) {
                self.pending.push((id, lane, fence));
                continue;
            }
            match probe(&fence) {
                Probe::NotReady => {
                    if lane != NO_LANE && n_busy < busy.len() {
                        busy[n_busy] = lane;
                        n_busy += 1;
                    }
                    self.pending.push((id, lane, fence));
                }
                outcome => done.push(self.settle(id, outcome)),
            }
        }
        done.sort_by_key(|c| c.op);
        done
    }

    /// Records that `op` finished (seen by a blocking wait); `poll` will report it.
    pub fn finish(&mut self, op: OpId, outcome: Probe) -> Result<()> {
        let Some(pos) = self.pending.iter().position(|(id, _, _)| *id == op) else {
            return self.status(op).map(|_| ());
        };
        if outcome == Probe::NotReady {
            return Ok(());
        }
        self.pending.remove(pos);
        let c = self.settle(op, outcome);
        self.unreported.push(c);
        Ok(())
    }

    fn settle(&mut self, id: OpId, outcome: Probe) -> Completion {
        let name = self.names[id.0 as usize].to_string();
        let (status, result) = match outcome {
            Probe::Failed(reason) => (OpStatus::Failed(reason.clone()), Err(reason)),
            _ => (OpStatus::Complete, Ok(())),
        };
        self.status[id.0 as usize] = status;
        Completion {
            op: id,
            name,
            result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_self_and_failed_deps() {
        let mut g: OpGraph<u32> = OpGraph::new();
        let a = g.insert("a", 1);
        assert!(matches!(
            g.check_deps(&[OpId(1)], |_| Ok(())),
            Err(Error::DependencyCycle { .. })
        ));
        assert!(matches!(
            g.check_deps(&[OpId(7)], |_| Ok(())),
            Err(Error::UnknownOp(OpId(7)))
        ));
        let mut waited = Vec::new();
        g.check_deps(&[a], |f| {
            waited.push(*f);
            Ok(())
        })
        .unwrap();
        assert_eq!(waited, vec![1]);
        let done = g.poll(|_| Probe::Failed("boom".into()));
        assert_eq!(done.len(), 1);
        assert!(matches!(
            g.check_deps(&[a], |_| Ok(())),
            Err(Error::DependencyFailed { .. })
        ));
    }

    #[test]
    fn wait_then_poll_reports_once() {
        let mut g: OpGraph<u32> = OpGraph::new();
        let a = g.insert("a", 1);
        let b = g.insert("b", 2);
        g.finish(b, Probe::Complete).unwrap();
        let done = g.poll(|_| Probe::NotReady);
        assert_eq!(done.iter().map(|c| c.op).collect::<Vec<_>>(), vec![b]);
        assert!(g.poll(|_| Probe::NotReady).is_empty());
        assert_eq!(g.status(a).unwrap(), &OpStatus::Pending);
        let mut waited = Vec::new();
        g.check_deps(&[a, b], |f| {
            waited.push(*f);
            Ok(())
        })
        .unwrap();
        assert_eq!(waited, vec![1]);
    }

    #[test]
    fn poll_stops_probing_a_lane_at_its_first_busy_op() {
        let mut g: OpGraph<u32> = OpGraph::new();
        g.insert_on(0, "a", 1);
        g.insert_on(0, "b", 2);
        g.insert_on(1, "c", 3);
        let mut probed = Vec::new();
        let done = g.poll(|f| {
            probed.push(*f);
            if *f == 3 {
                Probe::Complete
            } else {
                Probe::NotReady
            }
        });
        assert_eq!(
            probed,
            vec![1, 3],
            "op b was probed although op a of its lane was busy"
        );
        assert_eq!(done.iter().map(|c| c.op).collect::<Vec<_>>(), vec![OpId(2)]);
        let done = g.poll(|_| Probe::Complete);
        assert_eq!(
            done.iter().map(|c| c.op).collect::<Vec<_>>(),
            vec![OpId(0), OpId(1)]
        );
    }
}
