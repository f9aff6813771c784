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
        for a in actions {
            match a {
                Action::Queue(deps) => {
                    let next = m.status.len() as u64;
                    let deps: Vec<OpId> = deps.into_iter().map(OpId).collect();
                    let expect = deps.iter().find_map(|d| {
                        if d.0 == next { Some("cycle") }
                        else if d.0 > next { Some("unknown") }
                        else if matches!(m.status[d.0 as usize], OpStatus::Failed(_)) { Some("failed") }
                        else { None }
                    });
                    let mut waits = Vec::new();
                    let checked = g.check_deps(&deps, |f| { waits.push(*f); Ok(()) });
                    match (checked, expect) {
                        (Ok(()), None) => {
                            // Exactly the pending deps need a GPU wait.
                            let mut want: Vec<usize> = deps.iter().filter(|d| m.status[d.0 as usize] == OpStatus::Pending).map(|d| d.0 as usize).collect();
                            let mut got: Vec<usize> = waits;
                            want.sort(); want.dedup(); got.sort(); got.dedup();
                            prop_assert_eq!(got, want);
                            let id = g.insert(format!("op{next}"), next as usize);
                            prop_assert_eq!(id, OpId(next));
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
                    let done = g.poll(|f| m.gpu[*f].clone());
                    let mut want = Vec::new();
                    for i in 0..m.status.len() {
                        if m.status[i] == OpStatus::Pending && m.gpu[i] != Probe::NotReady {
                            m.status[i] = match &m.gpu[i] { Probe::Failed(r) => OpStatus::Failed(r.clone()), _ => OpStatus::Complete };
                        }
                        if m.status[i] != OpStatus::Pending && !m.reported[i] {
                            m.reported[i] = true;
                            want.push(OpId(i as u64));
                        }
                    }
                    let got: Vec<OpId> = done.iter().map(|c| c.op).collect();
                    prop_assert_eq!(got, want);
                }
                Action::Wait(k) => {
                    if k < m.status.len() {
                        let outcome = m.gpu[k].clone();
                        g.finish(OpId(k as u64), outcome.clone()).unwrap();
                        if m.status[k] == OpStatus::Pending && outcome != Probe::NotReady {
                            m.status[k] = match outcome { Probe::Failed(r) => OpStatus::Failed(r), _ => OpStatus::Complete };
                        }
                    } else {
                        prop_assert!(matches!(g.finish(OpId(k as u64), Probe::Complete), Err(Error::UnknownOp(_))));
                    }
                }
            }
            for (i, s) in m.status.iter().enumerate() {
                prop_assert_eq!(g.status(OpId(i as u64)).unwrap(), s);
            }
            prop_assert_eq!(g.pending_len(), m.status.iter().filter(|s| **s == OpStatus::Pending).count());
        }
    }
}
