//! Random op graphs against a reference model (CPU only).

use proptest::prelude::*;

use prism_stream::{Error, OpGraph, OpId, OpStatus, Probe};

#[derive(Debug, Clone)]
enum Action {
    /// Queue an op with these dependency picks (index into ids so far, or a bogus id).
    Queue(Vec<u64>),
    /// Complete (or fail) the fence of the k-th op, if it exists.
    Settle(usize, bool),
    Poll,
    /// Blocking wait on the k-th op's fence (simulated: it is observed as it stands).
    Wait(usize),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => prop::collection::vec(0u64..40, 0..4).prop_map(Action::Queue),
        3 => (0usize..40, prop::bool::weighted(0.1)).prop_map(|(k, f)| Action::Settle(k, f)),
        2 => Just(Action::Poll),
        1 => (0usize..40).prop_map(Action::Wait),
    ]
}

/// Fake fence: index into the model's fence table.
type FakeFence = usize;

#[derive(Default)]
struct Model {
    /// Per op: fence outcome as the "GPU" has it now.
    gpu: Vec<Probe>,
    /// Per op: status as the graph should report it.
    status: Vec<OpStatus>,
    reported: Vec<bool>,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    #[test]
    fn op_graph_matches_model(actions in prop::collection::vec(action(), 1..60)) {
        let mut g: OpGraph<FakeFence> = OpGraph::new();
        let mut m = Model::default();
        // Before the first poll, ops seen finished by a wait are not kept for poll.
        let mut polled = false;
        for a in actions {
            match a {
                Action::Queue(deps) => {
                    let next = m.status.len() as u64;
                    let deps: Vec<OpId> = deps.into_iter().map(|d| g.op_id(d)).collect();
                    let expect = deps.iter().find_map(|d| {
                        if d.index() == next { Some("cycle") }
                        else if d.index() > next { Some("unknown") }
                        else if matches!(m.status[d.index() as usize], OpStatus::Failed(_)) { Some("failed") }
                        else { None }
                    });
                    let mut waits = Vec::new();
                    let checked = g.check_deps(&deps, |f| { waits.push(*f); Ok(()) });
                    match (checked, expect) {
                        (Ok(()), None) => {
                            // Exactly the pending deps need a GPU wait.
                            let mut want: Vec<usize> = deps.iter().filter(|d| m.status[d.index() as usize] == OpStatus::Pending).map(|d| d.index() as usize).collect();
                            let mut got: Vec<usize> = waits;
                            want.sort(); want.dedup(); got.sort(); got.dedup();
                            prop_assert_eq!(got, want);
                            let id = g.insert(format!("op{next}"), next as usize);
                            prop_assert_eq!(id, g.op_id(next));
                            m.gpu.push(Probe::NotReady);
                            m.status.push(OpStatus::Pending);
                            m.reported.push(false);
                        }
                        (Err(Error::DependencyCycle { .. }), Some("cycle")) => {}
                        (Err(Error::UnknownOp(_)), Some("unknown")) => {}
                        (Err(Error::DependencyFailed { .. }), Some("failed")) => {}
                        (got, want) => prop_assert!(false, "deps {:?}: got {:?}, model says {:?}", deps, got, want),
                    }
                }
                Action::Settle(k, fail) => {
                    if k < m.gpu.len() && m.gpu[k] == Probe::NotReady {
                        m.gpu[k] = if fail { Probe::Failed("fault".into()) } else { Probe::Complete };
                    }
                }
                Action::Poll => {
                    polled = true;
                    let done = g.poll(|f| m.gpu[*f].clone());
                    let mut want = Vec::new();
                    for i in 0..m.status.len() {
                        if m.status[i] == OpStatus::Pending && m.gpu[i] != Probe::NotReady {
                            m.status[i] = match &m.gpu[i] { Probe::Failed(r) => OpStatus::Failed(r.clone()), _ => OpStatus::Complete };
                        }
                        if m.status[i] != OpStatus::Pending && !m.reported[i] {
                            m.reported[i] = true;
                            want.push(g.op_id(i as u64));
                        }
                    }
                    let got: Vec<OpId> = done.iter().map(|c| c.op).collect();
                    prop_assert_eq!(got, want);
                }
                Action::Wait(k) => {
                    if k < m.status.len() {
                        let outcome = m.gpu[k].clone();
                        g.finish(g.op_id(k as u64), outcome.clone()).unwrap();
                        if m.status[k] == OpStatus::Pending && outcome != Probe::NotReady {
                            m.status[k] = match outcome { Probe::Failed(r) => OpStatus::Failed(r), _ => OpStatus::Complete };
                            if !polled {
                                m.reported[k] = true;
                            }
                        }
                    } else {
                        prop_assert!(matches!(g.finish(g.op_id(k as u64), Probe::Complete), Err(Error::UnknownOp(_))));
                    }
                }
            }
            for (i, s) in m.status.iter().enumerate() {
                prop_assert_eq!(g.status(g.op_id(i as u64)).unwrap(), s);
                if matches!(s, OpStatus::Failed(_) | OpStatus::Pending) {
                    let name = format!("op{i}");
                    prop_assert_eq!(g.name(g.op_id(i as u64)), Some(name.as_str()));
                }
            }
            // Finished ops before the first pending one leave the table; failures stay.
            let first_pending = m.status.iter().position(|s| *s == OpStatus::Pending).unwrap_or(m.status.len());
            let kept_failures = m.status[..first_pending].iter().filter(|s| matches!(s, OpStatus::Failed(_))).count();
            prop_assert_eq!(g.retained_len(), m.status.len() - first_pending + kept_failures);
            prop_assert_eq!(g.pending_len(), m.status.iter().filter(|s| **s == OpStatus::Pending).count());
        }
    }
}

#[derive(Debug, Clone)]
enum LaneAction {
    /// Queue an op on a lane (0..3) or on none.
    Queue(Option<usize>),
    /// The GPU finishes the next `k` ops of a lane (stream order).
    Advance(usize, usize),
    /// The GPU finishes the k-th op queued without a lane.
    CompleteFree(usize),
    /// A sticky fault: from now on every probe fails, as cuEventQuery does.
    Fault,
    Poll,
}

fn lane_action() -> impl Strategy<Value = LaneAction> {
    prop_oneof![
        6 => prop::option::weighted(0.85, 0usize..3).prop_map(LaneAction::Queue),
        3 => (0usize..3, 1usize..12).prop_map(|(l, k)| LaneAction::Advance(l, k)),
        1 => (0usize..20).prop_map(LaneAction::CompleteFree),
        1 => Just(LaneAction::Fault),
        3 => Just(LaneAction::Poll),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    /// Ops on lanes finish in stream order; `poll` finds exactly the finished
    /// ones with O(log n) probes per lane, and after a sticky fault reports
    /// every pending op as failed.
    #[test]
    fn lane_poll_matches_stream_order_model(actions in prop::collection::vec(lane_action(), 1..120)) {
        let mut g: OpGraph<usize> = OpGraph::new();
        // Per op: its lane and its position in that lane (or in the lane-less list).
        let mut ops: Vec<(Option<usize>, usize)> = Vec::new();
        let mut lane_len = [0usize; 3];
        let mut progress = [0usize; 3];
        let mut free_done: Vec<bool> = Vec::new();
        let mut sticky = false;
        let mut status: Vec<OpStatus> = Vec::new();
        for a in actions {
            match a {
                LaneAction::Queue(lane) => {
                    let pos = match lane {
                        Some(l) => { lane_len[l] += 1; lane_len[l] - 1 }
                        None => { free_done.push(false); free_done.len() - 1 }
                    };
                    let id = match lane {
                        Some(l) => g.insert_on(l, "op", ops.len()),
                        None => g.insert("op", ops.len()),
                    };
                    prop_assert_eq!(id, g.op_id(ops.len() as u64));
                    ops.push((lane, pos));
                    status.push(OpStatus::Pending);
                }
                LaneAction::Advance(l, k) => progress[l] = (progress[l] + k).min(lane_len[l]),
                LaneAction::CompleteFree(k) => if k < free_done.len() { free_done[k] = true },
                LaneAction::Fault => sticky = true,
                LaneAction::Poll => {
                    let gpu_done = |op: usize| match ops[op] {
                        (Some(l), pos) => pos < progress[l],
                        (None, pos) => free_done[pos],
                    };
                    let mut probes = 0usize;
                    let done = g.poll(|&op| {
                        probes += 1;
                        if sticky { Probe::Failed("fault".into()) }
                        else if gpu_done(op) { Probe::Complete }
                        else { Probe::NotReady }
                    });
                    let mut want = Vec::new();
                    let mut per_lane = [0usize; 3];
                    let mut free_pending = 0;
                    for (i, s) in status.iter_mut().enumerate() {
                        if *s != OpStatus::Pending { continue; }
                        match ops[i].0 { Some(l) => per_lane[l] += 1, None => free_pending += 1 }
                        if sticky {
                            *s = OpStatus::Failed("fault".into());
                        } else if gpu_done(i) {
                            *s = OpStatus::Complete;
                        } else {
                            continue;
                        }
                        want.push(g.op_id(i as u64));
                    }
                    let got: Vec<OpId> = done.iter().map(|c| c.op).collect();
                    prop_assert_eq!(got, want);
                    if !sticky {
                        let bound: usize = per_lane.iter().filter(|&&n| n > 0)
                            .map(|&n| 1 + (usize::BITS - (n - 1).leading_zeros()) as usize)
                            .sum::<usize>() + free_pending;
                        prop_assert!(probes <= bound, "{} probes, bound {}", probes, bound);
                    }
                }
            }
            for (i, s) in status.iter().enumerate() {
                prop_assert_eq!(g.status(g.op_id(i as u64)).unwrap(), s);
            }
        }
    }
}

#[derive(Debug, Clone)]
enum MidAction {
    /// Queue an op on one of `LANES` lanes.
    Queue(usize),
    /// The GPU finishes the next `k` ops of a lane.
    Advance(usize, usize),
    /// A blocking wait on op k, observing it as the GPU has it.
    Wait(usize),
    /// Poll; with `Some(f)` a sticky fault starts after the poll's f-th probe.
    Poll(Option<usize>),
}

/// More lanes than `poll` bisects (8), so the op-by-op path for the rest runs too.
const LANES: usize = 10;

/// Has the model GPU finished `op` (its lane has progressed past it)?
fn finished(ops: &[(usize, usize)], progress: &[usize; LANES], op: usize) -> bool {
    let (l, p) = ops[op];
    p < progress[l]
}

/// What probing `op`'s fence says on the model GPU: after a sticky fault
/// every probe fails, as cuEventQuery does.
fn model_probe(
    sticky: bool,
    ops: &[(usize, usize)],
    progress: &[usize; LANES],
    op: usize,
) -> Probe {
    if sticky {
        Probe::Failed("fault".into())
    } else if finished(ops, progress, op) {
        Probe::Complete
    } else {
        Probe::NotReady
    }
}

fn mid_action() -> impl Strategy<Value = MidAction> {
    prop_oneof![
        5 => (0usize..LANES).prop_map(MidAction::Queue),
        3 => (0usize..LANES, 1usize..6).prop_map(|(l, k)| MidAction::Advance(l, k)),
        2 => (0usize..60).prop_map(MidAction::Wait),
        3 => prop::option::weighted(0.2, 0usize..6).prop_map(MidAction::Poll),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    /// A fault may start in the middle of a poll (between its probes, as on a
    /// real GPU); waits settle ops in the middle of lanes. Whatever happens,
    /// no op is reported complete that the GPU has not finished, none twice,
    /// and a final drain reports every op still unreported.
    #[test]
    fn poll_never_reports_unfinished_ops(actions in prop::collection::vec(mid_action(), 1..150)) {
        let mut g: OpGraph<usize> = OpGraph::new();
        // Per op: lane and position in it.
        let mut ops: Vec<(usize, usize)> = Vec::new();
        let mut lane_len = [0usize; LANES];
        let mut progress = [0usize; LANES];
        let mut reported: Vec<bool> = Vec::new();
        let mut sticky = false;
        // Ops settled by a wait before the first poll are never reported.
        let mut polled = false;
        for act in actions {
            match act {
                MidAction::Queue(l) => {
                    lane_len[l] += 1;
                    let id = g.insert_on(l, "op", ops.len());
                    prop_assert_eq!(id.index() as usize, ops.len());
                    ops.push((l, lane_len[l] - 1));
                    reported.push(false);
                }
                MidAction::Advance(l, k) => {
                    if !sticky {
                        progress[l] = (progress[l] + k).min(lane_len[l]);
                    }
                }
                MidAction::Wait(k) => {
                    if k < ops.len() {
                        let outcome = model_probe(sticky, &ops, &progress, k);
                        let was_pending: Vec<bool> = (0..ops.len())
                            .map(|i| *g.status(g.op_id(i as u64)).unwrap() == OpStatus::Pending)
                            .collect();
                        g.finish(g.op_id(k as u64), outcome.clone()).unwrap();
                        // A wait settles its op and, when it completed, the
                        // earlier ops of its lane (stream order); before the
                        // first poll none of them is kept for poll.
                        for i in 0..ops.len() {
                            let now = *g.status(g.op_id(i as u64)).unwrap() != OpStatus::Pending;
                            if was_pending[i] && now {
                                prop_assert!(i == k || (ops[i].0 == ops[k].0 && ops[i].1 < ops[k].1 && outcome == Probe::Complete),
                                    "a wait on op {} settled op {}", k, i);
                                if !polled {
                                    reported[i] = true;
                                }
                            }
                        }
                    }
                }
                MidAction::Poll(fault_after) => {
                    polled = true;
                    let mut n = 0usize;
                    let done = g.poll(|&op| {
                        n += 1;
                        if fault_after.is_some_and(|f| n > f) {
                            sticky = true;
                        }
                        model_probe(sticky, &ops, &progress, op)
                    });
                    for c in &done {
                        let i = c.op.index() as usize;
                        prop_assert!(!reported[i], "op {} reported twice", i);
                        reported[i] = true;
                        if c.result.is_ok() {
                            prop_assert!(finished(&ops, &progress, i), "op {} reported complete before it finished", i);
                        }
                    }
                }
            }
            for i in 0..ops.len() {
                if *g.status(g.op_id(i as u64)).unwrap() == OpStatus::Complete {
                    prop_assert!(finished(&ops, &progress, i), "op {} complete before it finished", i);
                }
            }
        }
        if !sticky {
            progress = lane_len;
        }
        let done = g.poll(|&op| model_probe(sticky, &ops, &progress, op));
        for c in &done {
            let i = c.op.index() as usize;
            prop_assert!(!reported[i], "op {} reported twice", i);
            reported[i] = true;
        }
        prop_assert!(reported.iter().all(|r| *r), "some op was never reported");
        prop_assert_eq!(g.pending_len(), 0);
    }
}
