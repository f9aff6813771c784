//! Operation bookkeeping, free of any GPU call: ids, statuses, dependency
//! validation and completion tracking. Generic over the fence type so it is
//! tested on the CPU (proptest in `tests/graph_proptest.rs`) with fake fences.
//!
//! Cycles: an operation may only depend on operations queued before it, so
//! the dependency graph is acyclic by construction. A dependency on itself or
//! on an id not handed out yet is rejected (`DependencyCycle` / `UnknownOp`).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// Lane of ops inserted without an ordering assumption.
const NO_LANE: usize = usize::MAX;

/// Lanes `poll` searches by stream order; ops of further lanes are probed one by one.
const MAX_LANES: usize = 8;

/// How `poll` settles one lane's pending ops.
#[derive(Debug, Clone, Copy)]
enum Scan {
    /// The oldest this many are complete; the rest stay pending (the first
    /// of them was seen not ready).
    Prefix(usize),
    /// Probe each, oldest first; `busy` once one was not ready (the rest wait).
    OneByOne { busy: bool },
}

/// For the pending ops of one lane (`positions` into `pending`, oldest
/// first), how many of the oldest are complete: probes the newest, then
/// bisects. Stream order makes "complete" a prefix. Any failure seen means
/// the lane is probed op by op instead.
fn complete_prefix<F>(
    pending: &[(OpId, usize, F)],
    positions: &[usize],
    probe: &mut impl FnMut(&F) -> Probe,
) -> Scan {
    let Some(&newest) = positions.last() else {
        return Scan::Prefix(0);
    };
    match probe(&pending[newest].2) {
        Probe::Complete => return Scan::Prefix(positions.len()),
        Probe::Failed(_) => return Scan::OneByOne { busy: false },
        Probe::NotReady => {}
    }
    // Invariant: ops before `lo` complete, op `hi` not ready.
    let (mut lo, mut hi) = (0, positions.len() - 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match probe(&pending[positions[mid]].2) {
            Probe::Complete => lo = mid + 1,
            Probe::NotReady => hi = mid,
            Probe::Failed(_) => return Scan::OneByOne { busy: false },
        }
    }
    Scan::Prefix(lo)
}

pub use crate::op_id::OpId;

/// Identities of graphs; never reused.
static NEXT_GRAPH: AtomicU64 = AtomicU64::new(1);

/// Successful completions `poll` keeps for reporting between two polls; past
/// it the oldest are dropped (their status still reads `Complete`), so a
/// caller that polled once and then only waits does not grow the list
/// without bound. Failures are always kept.
const MAX_UNREPORTED: usize = 1 << 16;

/// Pending ops below which the amortised sweep never runs.
const MIN_SWEEP: usize = 256;

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
    /// The name given when it was queued (a `&'static str` name costs no copy).
    pub name: Cow<'static, str>,
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

/// Status of every op that left the table finished without error.
static COMPLETE: OpStatus = OpStatus::Complete;

/// Operation table. Once an op and every op before it finished, its entry
/// leaves the table (ids below `base` are complete unless listed in
/// `failed`); fences are kept for pending ops only. So memory stays bounded
/// on a long run as long as ops keep finishing: one op that stays pending
/// keeps the entries of every op queued after it.
#[derive(Debug)]
pub struct OpGraph<F> {
    /// This graph's identity (part of every id it hands out).
    id: u64,
    /// Index of the first entry of `ops`.
    base: u64,
    /// Name and status of the ops from `base` on.
    ops: VecDeque<(Cow<'static, str>, OpStatus)>,
    /// Failed ops that left `ops` (a failure poisons the context, so few).
    failed: Vec<(OpId, Cow<'static, str>, OpStatus)>,
    /// Pending ops in id order, with their lanes and fences.
    pending: Vec<(OpId, usize, F)>,
    /// Ops observed finished (by `wait`) that `poll` has not reported yet;
    /// kept only once `poll` was called (a caller that never polls would
    /// otherwise grow this without bound).
    unreported: VecDeque<Completion>,
    /// Has `poll` been called?
    polled: bool,
    /// Positions of one lane's ops during `poll` (kept to reuse its allocation).
    scratch: Vec<usize>,
    /// `needs_sweep` is true from this many pending ops on.
    sweep_at: usize,
    /// Distinct lanes ops were inserted on (up to `MAX_LANES`).
    lanes: usize,
    lane_ids: [usize; MAX_LANES],
}

impl<F> Default for OpGraph<F> {
    fn default() -> Self {
        Self {
            id: NEXT_GRAPH.fetch_add(1, Ordering::Relaxed),
            base: 0,
            ops: VecDeque::new(),
            failed: Vec::new(),
            pending: Vec::new(),
            unreported: VecDeque::new(),
            polled: false,
            scratch: Vec::new(),
            sweep_at: MIN_SWEEP,
            lanes: 0,
            lane_ids: [NO_LANE; MAX_LANES],
        }
    }
}

impl<F> OpGraph<F> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The id the next inserted op will get.
    pub fn next_id(&self) -> OpId {
        self.op_id(self.base + self.ops.len() as u64)
    }

    /// The id of this graph's op at `index` (which may not exist yet).
    pub fn op_id(&self, index: u64) -> OpId {
        OpId {
            graph: self.id,
            index,
        }
    }

    /// `ForeignOp` unless `op` was made by this graph.
    fn own(&self, op: OpId) -> Result<u64> {
        if op.graph == self.id {
            Ok(op.index())
        } else {
            Err(Error::ForeignOp(op))
        }
    }

    /// Number of ops queued and not yet observed finished.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Ops whose name and status the table still holds (diagnostics: stays
    /// small while ops keep completing, however many were queued).
    pub fn retained_len(&self) -> usize {
        self.ops.len() + self.failed.len()
    }

    /// Validates every one of `deps` for the next op, then calls `wait` with
    /// the fence of each dep still pending (complete deps need no wait).
    /// Nothing is waited on unless all deps are valid.
    pub fn check_deps(&self, deps: &[OpId], mut wait: impl FnMut(&F) -> Result<()>) -> Result<()> {
        let op = self.next_id();
        for &dep in deps {
            self.own(dep)?;
            if dep >= op {
                return Err(if dep == op {
                    Error::DependencyCycle { op, dep }
                } else {
                    Error::UnknownOp(dep)
                });
            }
            if let OpStatus::Failed(reason) = self.status(dep)? {
                return Err(Error::DependencyFailed {
                    op,
                    dep,
                    dep_name: self.name(dep).unwrap_or_default().to_owned(),
                    reason: reason.clone(),
                });
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

    /// Records a new pending op on `lane`. Contract: the fences of one lane
    /// complete in the order their ops were inserted (ops on one CUDA stream
    /// do), and a failure is sticky (once a fence reports `Failed`, every
    /// fence probed later does too, as CUDA's errors after a fault are).
    /// `poll` relies on both to settle a lane with O(log n) probes. So a
    /// probe reports `Failed` only for a failure of the GPU work: one the
    /// driver refused for a passing reason (a stream capture in progress)
    /// must report `NotReady`, as [`Fence::probe`](crate::Fence::probe)
    /// does, since a `Failed` status is final.
    pub fn insert_on(&mut self, lane: usize, name: impl Into<Cow<'static, str>>, fence: F) -> OpId {
        if lane != NO_LANE && self.lanes < MAX_LANES && !self.lane_ids[..self.lanes].contains(&lane)
        {
            self.lane_ids[self.lanes] = lane;
            self.lanes += 1;
        }
        let id = self.next_id();
        self.ops.push_back((name.into(), OpStatus::Pending));
        self.pending.push((id, lane, fence));
        id
    }

    /// Status of an op.
    pub fn status(&self, op: OpId) -> Result<&OpStatus> {
        let index = self.own(op)?;
        if index < self.base {
            return Ok(self.failed_entry(op).map_or(&COMPLETE, |(_, _, s)| s));
        }
        self.ops
            .get((index - self.base) as usize)
            .map(|(_, s)| s)
            .ok_or(Error::UnknownOp(op))
    }

    /// Name of an op; `None` for an unknown op and for one that completed
    /// without error and left the table (only failures keep their names).
    pub fn name(&self, op: OpId) -> Option<&str> {
        let index = self.own(op).ok()?;
        if index < self.base {
            return self.failed_entry(op).map(|(_, n, _)| &**n);
        }
        self.ops
            .get((index - self.base) as usize)
            .map(|(n, _)| &**n)
    }

    /// `failed` is in id order (`compact` pushes in id order).
    fn failed_entry(&self, op: OpId) -> Option<&(OpId, Cow<'static, str>, OpStatus)> {
        self.failed
            .binary_search_by_key(&op, |(id, _, _)| *id)
            .ok()
            .map(|i| &self.failed[i])
    }

    /// The fence of a pending op (None once it finished).
    pub fn fence(&self, op: OpId) -> Option<&F> {
        self.own(op).ok()?;
        self.pending_index(op).map(|i| &self.pending[i].2)
    }

    /// `pending` is in id order: ids are handed out increasing and removals
    /// keep the order.
    fn pending_index(&self, op: OpId) -> Option<usize> {
        // The newest op is the usual dependency: check the back first.
        match self.pending.last() {
            Some((id, _, _)) if *id == op => Some(self.pending.len() - 1),
            _ => self
                .pending
                .binary_search_by_key(&op, |(id, _, _)| *id)
                .ok(),
        }
    }

    /// Fences of every pending op.
    pub fn pending_fences(&self) -> impl Iterator<Item = (OpId, &F)> {
        self.pending.iter().map(|(id, _, f)| (*id, f))
    }

    /// Finds every pending op that finished; returns them, and the ops
    /// `finish` or `sweep` settled since the last poll, in op order (those
    /// only from the first poll on: before it, nothing is kept for `poll`).
    ///
    /// Ops of one lane (one stream) finish in the order they were queued
    /// (see [`insert_on`](Self::insert_on)), so for each lane `poll` probes
    /// its newest op first (one probe when the whole lane is done) and
    /// otherwise bisects for the first unfinished one: O(log n) probes per
    /// lane, not one per op. A lane where a probe reports a failure is probed
    /// op by op, oldest first; with a sticky failure every pending op of that
    /// lane is then reported failed, including ops that finished before the
    /// fault but had not been seen to. Ops without a lane, and ops of lanes
    /// past the eighth, are probed one by one.
    pub fn poll(&mut self, probe: impl FnMut(&F) -> Probe) -> Vec<Completion> {
        self.poll_with(probe, |_| {})
    }

    /// [`poll`](Self::poll), calling `assume_complete` for each op of a lane
    /// it settles as complete by stream order (a later op of the lane was
    /// seen complete; the probed op itself is included), so fences that were
    /// never probed can remember they are done.
    pub fn poll_with(
        &mut self,
        probe: impl FnMut(&F) -> Probe,
        assume_complete: impl FnMut(&F),
    ) -> Vec<Completion> {
        self.polled = true;
        let mut done: Vec<Completion> = std::mem::take(&mut self.unreported).into();
        done.extend(self.scan(probe, assume_complete, true));
        done.sort_by_key(|c| c.op);
        done
    }

    /// True when enough ops are pending that the owner should [`sweep`](Self::sweep):
    /// from 64 pending ops on, then each time their number doubles since the
    /// last sweep (so sweeping costs O(1) probes per op, amortised).
    pub fn needs_sweep(&self) -> bool {
        self.pending.len() >= self.sweep_at
    }

    /// Settles finished ops as `poll` does, without reporting them to the
    /// caller: `poll` reports them later if it was ever called. Keeps the
    /// table bounded by the ops in flight for callers that never poll.
    /// Returns the failures it saw.
    pub fn sweep(
        &mut self,
        probe: impl FnMut(&F) -> Probe,
        assume_complete: impl FnMut(&F),
    ) -> Vec<Completion> {
        let mut probe = probe;
        if !self.any_head_finished(&mut probe) {
            // The oldest op of every lane is still running: by stream order
            // nothing can be settled (the usual case while the GPU is busy).
            self.sweep_at = (2 * self.pending.len()).max(MIN_SWEEP);
            return Vec::new();
        }
        let polled = self.polled;
        // Never polled: only failures are wanted, so no report is built.
        let done = self.scan(probe, assume_complete, polled);
        self.sweep_at = (2 * self.pending.len()).max(MIN_SWEEP);
        if !polled {
            return done;
        }
        let failures = done.iter().filter(|c| c.result.is_err()).cloned().collect();
        for c in done {
            self.keep_unreported(c);
        }
        failures
    }

    /// Has the oldest pending op of some lane finished? One probe per lane;
    /// `true` also when that cannot be told cheaply (ops without a lane,
    /// more lanes than `poll` tracks).
    fn any_head_finished(&self, probe: &mut impl FnMut(&F) -> Probe) -> bool {
        let mut seen = [NO_LANE; MAX_LANES];
        let mut n = 0;
        for (_, lane, fence) in &self.pending {
            if *lane == NO_LANE || (n == MAX_LANES && !seen.contains(lane)) {
                return true;
            }
            if seen[..n].contains(lane) {
                continue;
            }
            seen[n] = *lane;
            n += 1;
            if probe(fence) != Probe::NotReady {
                return true;
            }
            if n == self.lanes {
                break;
            }
        }
        false
    }

    /// Probes the pending ops (see `poll`) and settles those that finished.
    /// Only failures are returned unless `report`.
    fn scan(
        &mut self,
        mut probe: impl FnMut(&F) -> Probe,
        mut assume_complete: impl FnMut(&F),
        report: bool,
    ) -> Vec<Completion> {
        let mut done = Vec::new();
        let mut pending = std::mem::take(&mut self.pending);
        let mut lanes = [NO_LANE; MAX_LANES];
        let mut n_lanes = 0;
        for (_, lane, _) in &pending {
            if *lane != NO_LANE && n_lanes < MAX_LANES && !lanes[..n_lanes].contains(lane) {
                lanes[n_lanes] = *lane;
                n_lanes += 1;
            }
        }
        let mut scans = [Scan::OneByOne { busy: false }; MAX_LANES];
        let mut positions = std::mem::take(&mut self.scratch);
        for (scan, &lane) in scans.iter_mut().zip(&lanes[..n_lanes]) {
            positions.clear();
            positions.extend(
                pending
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, l, _))| *l == lane)
                    .map(|(i, _)| i),
            );
            *scan = complete_prefix(&pending, &positions, &mut probe);
        }
        self.scratch = positions;
        let mut seen = [0usize; MAX_LANES];
        pending.retain(|(id, lane, fence)| {
            let k = lanes[..n_lanes].iter().position(|l| l == lane);
            let outcome = match k.map(|k| (k, &mut scans[k])) {
                Some((k, Scan::Prefix(complete))) => {
                    seen[k] += 1;
                    if seen[k] > *complete {
                        return true;
                    }
                    assume_complete(fence);
                    Probe::Complete
                }
                Some((_, Scan::OneByOne { busy: true })) => return true,
                Some((_, Scan::OneByOne { busy })) => {
                    let outcome = probe(fence);
                    *busy = outcome == Probe::NotReady;
                    outcome
                }
                None => probe(fence),
            };
            if outcome == Probe::NotReady {
                return true;
            }
            if report || outcome != Probe::Complete {
                done.push(self.settle(*id, outcome));
            } else {
                self.settle_quietly(*id);
            }
            false
        });
        self.pending = pending;
        self.compact();
        done
    }

    /// Keeps `c` for the next `poll`, dropping the oldest success past the cap.
    fn keep_unreported(&mut self, c: Completion) {
        if self.unreported.len() >= MAX_UNREPORTED {
            if let Some(i) = self.unreported.iter().position(|c| c.result.is_ok()) {
                self.unreported.remove(i);
            }
        }
        self.unreported.push_back(c);
    }

    /// Records that `op` finished (seen by a blocking wait); `poll` will
    /// report it if `poll` was called before (see [`poll`](Self::poll)).
    pub fn finish(&mut self, op: OpId, outcome: Probe) -> Result<()> {
        self.finish_with(op, outcome, |_| {})
    }

    /// [`finish`](Self::finish); when `op` completed without error, the
    /// pending ops queued before it on its lane completed too (stream
    /// order): they are settled as well, with `assume_complete` called on
    /// their fences.
    pub fn finish_with(
        &mut self,
        op: OpId,
        outcome: Probe,
        mut assume_complete: impl FnMut(&F),
    ) -> Result<()> {
        let Some(pos) = self.pending_index(op) else {
            return self.status(op).map(|_| ());
        };
        if outcome == Probe::NotReady {
            return Ok(());
        }
        let lane = self.pending[pos].1;
        let mut settled = Vec::new();
        if outcome == Probe::Complete
            && lane != NO_LANE
            && self.pending[..pos].iter().any(|(_, l, _)| *l == lane)
        {
            self.pending.retain(|(id, l, fence)| {
                let earlier = *id < op && *l == lane;
                if earlier {
                    assume_complete(fence);
                    settled.push(*id);
                }
                !earlier
            });
        }
        if let Some(pos) = self.pending_index(op) {
            self.pending.remove(pos);
        }
        settled.push(op);
        for id in settled {
            let outcome = if id == op {
                outcome.clone()
            } else {
                Probe::Complete
            };
            if self.polled || outcome != Probe::Complete {
                let c = self.settle(id, outcome);
                if self.polled {
                    self.keep_unreported(c);
                }
            } else {
                self.settle_quietly(id);
            }
        }
        self.compact();
        Ok(())
    }

    /// Marks `id` complete without making a report.
    fn settle_quietly(&mut self, id: OpId) {
        self.ops[(id.index() - self.base) as usize].1 = OpStatus::Complete;
    }

    fn settle(&mut self, id: OpId, outcome: Probe) -> Completion {
        let entry = &mut self.ops[(id.index() - self.base) as usize];
        let (status, result) = match outcome {
            Probe::Failed(reason) => (OpStatus::Failed(reason.clone()), Err(reason)),
            _ => (OpStatus::Complete, Ok(())),
        };
        entry.1 = status;
        Completion {
            op: id,
            name: entry.0.clone(),
            result,
        }
    }

    /// Drops the finished ops at the front of the table (failures move to `failed`).
    fn compact(&mut self) {
        while let Some((_, status)) = self.ops.front() {
            if *status == OpStatus::Pending {
                break;
            }
            if let Some((name, status)) = self.ops.pop_front() {
                if let OpStatus::Failed(_) = status {
                    let id = self.op_id(self.base);
                    self.failed.push((id, name, status));
                }
            }
            self.base += 1;
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
            g.check_deps(&[g.op_id(1)], |_| Ok(())),
            Err(Error::DependencyCycle { .. })
        ));
        assert!(matches!(
            g.check_deps(&[g.op_id(7)], |_| Ok(())),
            Err(Error::UnknownOp(id)) if id == g.op_id(7)
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
        assert!(g.poll(|_| Probe::NotReady).is_empty());
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
    fn finished_ops_leave_the_table_and_failures_keep_their_names() {
        let mut g: OpGraph<u64> = OpGraph::new();
        for i in 0..10_000u64 {
            g.insert("op", i);
            if i % 100 == 99 {
                let done = g.poll(|f| {
                    if *f == 5_000 {
                        Probe::Failed("boom".into())
                    } else {
                        Probe::Complete
                    }
                });
                assert_eq!(done.len(), 100);
            }
        }
        assert_eq!(g.pending_len(), 0);
        assert_eq!(g.retained_len(), 1, "only the failed op should be kept");
        assert_eq!(g.status(g.op_id(17)).unwrap(), &OpStatus::Complete);
        assert_eq!(
            g.status(g.op_id(5_000)).unwrap(),
            &OpStatus::Failed("boom".into())
        );
        assert_eq!(g.name(g.op_id(5_000)), Some("op"));
        assert_eq!(g.name(g.op_id(17)), None);
        assert!(matches!(
            g.check_deps(&[g.op_id(5_000)], |_| Ok(())),
            Err(Error::DependencyFailed { .. })
        ));
        g.check_deps(&[g.op_id(9_999)], |_| panic!("complete ops need no wait"))
            .unwrap();
        assert!(matches!(
            g.status(g.op_id(10_000)),
            Err(Error::UnknownOp(id)) if id == g.op_id(10_000)
        ));
    }

    #[test]
    fn fence_lookup_finds_old_pending_ops() {
        let mut g: OpGraph<u64> = OpGraph::new();
        for i in 0..50u64 {
            g.insert_on((i % 3) as usize, "op", i);
        }
        g.finish(g.op_id(10), Probe::Complete).unwrap();
        for i in 0..50u64 {
            // Op 10 and, by stream order, the earlier ops of its lane finished.
            let settled = i % 3 == 1 && i <= 10;
            assert_eq!(g.fence(g.op_id(i)).copied(), (!settled).then_some(i));
        }
    }

    #[test]
    fn poll_probes_a_lane_newest_first_then_bisects() {
        let mut g: OpGraph<u32> = OpGraph::new();
        for i in 0..100 {
            g.insert_on(0, "lane op", i);
        }
        g.insert_on(1, "other lane", 1000);
        let mut probes = 0;
        // Lane 0 finished its first 37 ops; lane 1 is done.
        let done = g.poll(|f| {
            probes += 1;
            if *f < 37 || *f == 1000 {
                Probe::Complete
            } else {
                Probe::NotReady
            }
        });
        let ids: Vec<u64> = done.iter().map(|c| c.op.index()).collect();
        let mut want: Vec<u64> = (0..37).collect();
        want.push(100);
        assert_eq!(ids, want);
        assert!(probes <= 1 + 7 + 1, "{probes} probes for two lanes");
        assert_eq!(g.pending_len(), 63);
        let mut probes = 0;
        let done = g.poll(|_| {
            probes += 1;
            Probe::Complete
        });
        assert_eq!(done.len(), 63);
        assert_eq!(probes, 1, "a finished lane costs one probe");
    }

    #[test]
    fn poll_with_names_the_ops_it_settles_by_stream_order() {
        let mut g: OpGraph<u32> = OpGraph::new();
        for i in 0..5 {
            g.insert_on(0, "op", i);
        }
        let mut probed = Vec::new();
        let mut assumed = Vec::new();
        let done = g.poll_with(
            |f| {
                probed.push(*f);
                Probe::Complete
            },
            |f| assumed.push(*f),
        );
        assert_eq!(done.len(), 5);
        assert_eq!(probed, vec![4]);
        assert_eq!(assumed, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn waits_before_any_poll_keep_nothing_for_poll() {
        let mut g: OpGraph<u32> = OpGraph::new();
        for i in 0..1000 {
            let op = g.insert_on(0, "op", i);
            g.finish(op, Probe::Complete).unwrap();
        }
        assert_eq!(g.retained_len(), 0);
        assert!(
            g.unreported.is_empty(),
            "a caller that never polls grew the report list"
        );
        assert!(g.poll(|_| Probe::Complete).is_empty());
        let op = g.insert_on(0, "op", 1000);
        g.finish(op, Probe::Complete).unwrap();
        let done = g.poll(|_| Probe::NotReady);
        assert_eq!(done.iter().map(|c| c.op).collect::<Vec<_>>(), vec![op]);
    }

    #[test]
    fn a_failure_on_a_lane_is_reported_oldest_first() {
        let mut g: OpGraph<u32> = OpGraph::new();
        for i in 0..5 {
            g.insert_on(0, "op", i);
        }
        // A sticky error: every probe fails, as cuEventQuery does after a fault.
        let done = g.poll(|_| Probe::Failed("boom".into()));
        assert_eq!(done.len(), 5);
        assert!(done.iter().all(|c| c.result.is_err()));
        assert_eq!(done[0].op, g.op_id(0));
        // Op by op: the lane's first busy op stops the probing of later ones.
        let mut g: OpGraph<u32> = OpGraph::new();
        for i in 0..5 {
            g.insert_on(0, "op", i);
        }
        let mut probed = Vec::new();
        let done = g.poll(|f| {
            probed.push(*f);
            match *f {
                4 => Probe::Failed("boom".into()),
                0 => Probe::Complete,
                _ => Probe::NotReady,
            }
        });
        assert_eq!(
            done.iter().map(|c| c.op).collect::<Vec<_>>(),
            vec![g.op_id(0)]
        );
        assert_eq!(
            probed,
            vec![4, 0, 1],
            "newest, then op by op to the first busy one"
        );
    }

    #[test]
    fn ids_of_another_graph_are_refused() {
        let mut a: OpGraph<u32> = OpGraph::new();
        let mut b: OpGraph<u32> = OpGraph::new();
        let mine = a.insert("a", 1);
        for _ in 0..5 {
            b.insert("b", 2);
        }
        let theirs = b.insert("b", 3);
        a.poll(|_| Probe::Complete);
        // `theirs` has a higher index than anything in `a`, `mine` a lower one
        // than `b`'s base would be after a poll: neither may pass.
        assert!(
            matches!(a.check_deps(&[theirs], |_| Ok(())), Err(Error::ForeignOp(id)) if id == theirs)
        );
        assert!(matches!(a.status(theirs), Err(Error::ForeignOp(_))));
        b.poll(|_| Probe::Complete);
        assert!(matches!(
            b.check_deps(&[mine], |_| Ok(())),
            Err(Error::ForeignOp(_))
        ));
        assert!(matches!(
            b.finish(mine, Probe::Complete),
            Err(Error::ForeignOp(_))
        ));
        assert_eq!(b.name(mine), None);
        assert!(b.fence(mine).is_none());
    }

    #[test]
    fn a_wait_settles_earlier_ops_of_its_lane_only() {
        let mut g: OpGraph<u32> = OpGraph::new();
        for i in 0..10u32 {
            g.insert_on((i % 2) as usize, "op", i);
        }
        let mut assumed = Vec::new();
        g.finish_with(g.op_id(6), Probe::Complete, |f| assumed.push(*f))
            .unwrap();
        assert_eq!(assumed, vec![0, 2, 4], "lane 0's earlier ops");
        for i in 0..10u64 {
            let want = if i % 2 == 0 && i <= 6 {
                OpStatus::Complete
            } else {
                OpStatus::Pending
            };
            assert_eq!(g.status(g.op_id(i)).unwrap(), &want, "op {i}");
        }
        // A failure settles nothing else.
        g.finish(g.op_id(9), Probe::Failed("boom".into())).unwrap();
        assert_eq!(g.status(g.op_id(7)).unwrap(), &OpStatus::Pending);
    }

    #[test]
    fn ops_only_waited_on_stay_bounded() {
        // upload, compute, download per step; only the download is waited on.
        let mut g: OpGraph<u64> = OpGraph::new();
        let mut peak = 0;
        for step in 0..10_000u64 {
            g.insert_on(0, "upload", 3 * step);
            g.insert_on(1, "compute", 3 * step + 1);
            let down = g.insert_on(2, "download", 3 * step + 2);
            if g.needs_sweep() {
                // Everything queued so far has run.
                assert!(g.sweep(|_| Probe::Complete, |_| {}).is_empty());
            }
            g.finish(down, Probe::Complete).unwrap();
            peak = peak.max(g.pending_len()).max(g.retained_len());
        }
        assert!(peak <= 2 * MIN_SWEEP + 3, "table grew to {peak} entries");
        assert!(g.unreported.is_empty(), "never polled, yet kept reports");
    }

    #[test]
    fn reports_kept_for_poll_are_capped() {
        let mut g: OpGraph<u64> = OpGraph::new();
        assert!(g.poll(|_| Probe::Complete).is_empty());
        for i in 0..(MAX_UNREPORTED as u64 + 10) {
            let op = g.insert_on(0, "op", i);
            g.finish(op, Probe::Complete).unwrap();
        }
        assert_eq!(g.unreported.len(), MAX_UNREPORTED);
        let done = g.poll(|_| Probe::Complete);
        assert_eq!(done.len(), MAX_UNREPORTED);
        assert_eq!(done[0].op, g.op_id(10), "the oldest reports went first");
    }
}
