//! Rule 7 (see the module above): an op's buffers are claimed from its
//! ordering to the note of its fence, so that ops of two threads on one
//! buffer cannot both order before either noted.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::ThreadId;

use super::{lock, Access, Extent, Fence, UseCell, Used, Uses};
use crate::{Error, Result};

/// One op's use of part of a buffer, from its ordering to its note.
#[derive(Debug, Clone, Copy)]
pub(super) struct Claim {
    /// The op's claim set (all its uses share one).
    set: u64,
    thread: ThreadId,
    access: Access,
    extent: Extent,
}

impl Claim {
    fn conflicts(&self, set: u64, access: Access, extent: &Extent) -> bool {
        self.set != set
            && self.extent.overlaps(extent)
            && (access == Access::Write || self.access == Access::Write)
    }
}

static NEXT_CLAIM_SET: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Claim sets this thread holds (more than zero only inside an op:
    /// outside work's closure, a C launcher).
    static HELD: Cell<usize> = const { Cell::new(0) };
}

/// What one op claims: a buffer, how it uses it and which bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Want<'a> {
    pub(crate) cell: &'a UseCell,
    pub(crate) access: Access,
    pub(crate) extent: Extent,
    pub(crate) what: &'static str,
}

impl<'a> From<&Used<'a>> for Want<'a> {
    fn from(u: &Used<'a>) -> Self {
        Self {
            cell: u.cell,
            access: u.access,
            extent: u.extent,
            what: u.what,
        }
    }
}

/// Rule 7, held: the op's uses stay claimed until this is dropped (after
/// its fence is noted). Not `Send`: released on the thread that claimed.
#[derive(Debug)]
pub(crate) struct Claims<'a> {
    wants: Vec<Want<'a>>,
    set: u64,
    _here: PhantomData<*const ()>,
}

/// Rule 7 for one op's `uses`: claims those of buffers a CUDA graph was
/// captured over (none to claim, nothing is locked or allocated: without
/// graphs, borrows already keep conflicting ops of two threads apart).
pub(crate) fn claim_uses<'a>(uses: &[Used<'a>]) -> Result<Claims<'a>> {
    if !uses.iter().any(|u| u.cell.in_graph()) {
        return Ok(Claims::none());
    }
    claim(
        uses.iter()
            .filter(|u| u.cell.in_graph())
            .map(Want::from)
            .collect(),
    )
}

/// Rule 7: claims `wants` for one op, so that no conflicting op (one of the
/// two writes, the bytes overlap) of another thread is ordered, queued or
/// noted between this op's ordering and its note. Without it, two threads
/// could each order before the other noted (a `CapturedGraph` writes its
/// buffers through `&mut` of the graph while other threads read them
/// through `&`): neither would wait for the other.
///
/// A thread holding no claim waits for conflicting claims to be released,
/// holding none of its own while it waits, so such waits form no cycle. A
/// thread already inside an op (outside work's closure, a launcher) never
/// waits: a conflict is refused with `BufferBusy` rather than risking a
/// deadlock with a thread that waits for it.
pub(crate) fn claim<'a>(mut wants: Vec<Want<'a>>) -> Result<Claims<'a>> {
    wants.sort_by_key(|w| std::ptr::from_ref(w.cell) as usize);
    let set = NEXT_CLAIM_SET.fetch_add(1, Ordering::Relaxed);
    let me = std::thread::current().id();
    let nested = HELD.with(|h| h.get() > 0);
    'retry: loop {
        let mut taken = 0;
        while taken < wants.len() {
            let cell = wants[taken].cell;
            let same = wants[taken..]
                .iter()
                .take_while(|w| std::ptr::eq(w.cell, cell))
                .count();
            let group = &wants[taken..taken + same];
            let busy = |list: &Uses<Fence>| {
                list.claims.iter().find_map(|c| {
                    group
                        .iter()
                        .find(|w| c.conflicts(set, w.access, &w.extent))
                        .map(|w| (c.thread, w.what))
                })
            };
            let mut list = lock(cell);
            if let Some((thread, what)) = busy(&list) {
                drop(list);
                release(&wants[..taken], set);
                if nested || thread == me {
                    return Err(Error::BufferBusy {
                        what,
                        here: thread == me,
                    });
                }
                let mut list = lock(cell);
                list.waiters += 1;
                while busy(&list).is_some() {
                    list = cell.released.wait(list).unwrap_or_else(|p| p.into_inner());
                }
                list.waiters -= 1;
                continue 'retry;
            }
            list.claims.extend(group.iter().map(|w| Claim {
                set,
                thread: me,
                access: w.access,
                extent: w.extent,
            }));
            taken += same;
        }
        HELD.with(|h| h.set(h.get() + 1));
        return Ok(Claims {
            wants,
            set,
            _here: PhantomData,
        });
    }
}

/// Drops claim set `set` from the buffers of `wants` (sorted by buffer).
fn release(wants: &[Want<'_>], set: u64) {
    let mut last: Option<&UseCell> = None;
    for w in wants {
        if last.is_some_and(|l| std::ptr::eq(l, w.cell)) {
            continue;
        }
        last = Some(w.cell);
        let mut list = lock(w.cell);
        list.claims.retain(|c| c.set != set);
        if list.waiters > 0 {
            w.cell.released.notify_all();
        }
    }
}

impl Claims<'_> {
    /// Nothing claimed (and the thread not counted as inside an op).
    fn none() -> Self {
        Self {
            wants: Vec::new(),
            set: 0,
            _here: PhantomData,
        }
    }
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        if self.wants.is_empty() {
            return;
        }
        release(&self.wants, self.set);
        HELD.with(|h| h.set(h.get().saturating_sub(1)));
    }
}

#[cfg(test)]
mod tests {
    //! Claims against a shadow of who uses which byte: threads claim random
    //! sets of buffer ranges and check, while they hold them, that no other
    //! thread holds a conflicting one; nested claims are refused, never
    //! waited for.

    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicI32;
    use std::sync::{mpsc, Arc, Barrier};
    use std::time::Duration;

    const CELLS: usize = 3;
    const BYTES: usize = 16;

    fn want(cell: &UseCell, access: Access, start: usize, len: usize) -> Want<'_> {
        Want {
            cell,
            access,
            extent: Extent::range(start, start + len),
            what: "test buffer",
        }
    }

    /// Per cell and byte: -1 a writer holds it, n > 0 readers do.
    struct Shadow([[AtomicI32; BYTES]; CELLS]);

    impl Shadow {
        fn enter(&self, cell: usize, access: Access, bytes: std::ops::Range<usize>) -> bool {
            let mut ok = true;
            for b in bytes {
                let slot = &self.0[cell][b];
                ok &= match access {
                    Access::Write => slot
                        .compare_exchange(0, -1, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok(),
                    Access::Read => slot
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                            (v >= 0).then_some(v + 1)
                        })
                        .is_ok(),
                };
            }
            ok
        }

        fn leave(&self, cell: usize, access: Access, bytes: std::ops::Range<usize>) {
            for b in bytes {
                let slot = &self.0[cell][b];
                match access {
                    Access::Write => {
                        let _ = slot.compare_exchange(-1, 0, Ordering::SeqCst, Ordering::SeqCst);
                    }
                    Access::Read => {
                        let _ = slot.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                            (v > 0).then_some(v - 1)
                        });
                    }
                }
            }
        }
    }

    /// One op: per buffer it uses, (write?, start, len).
    type Op = Vec<(usize, bool, usize, usize)>;

    fn op() -> impl Strategy<Value = Op> {
        proptest::collection::btree_map(
            0..CELLS,
            (any::<bool>(), 0..BYTES - 1, 1..6usize),
            1..=CELLS,
        )
        .prop_map(|m| {
            m.into_iter()
                .map(|(c, (w, s, l))| (c, w, s, l.min(BYTES - s)))
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn claims_keep_conflicting_ops_of_threads_apart(
            ops in proptest::collection::vec(proptest::collection::vec(op(), 1..40), 4)
        ) {
            let cells: Arc<Vec<UseCell>> = Arc::new((0..CELLS).map(|_| UseCell::default()).collect());
            let shadow = Arc::new(Shadow(Default::default()));
            let (done, finished) = mpsc::channel();
            let start = Arc::new(Barrier::new(ops.len()));
            for thread_ops in ops.clone() {
                let (cells, shadow, done, start) = (cells.clone(), shadow.clone(), done.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let mut clean = true;
                    for op in thread_ops {
                        let access = |w: bool| if w { Access::Write } else { Access::Read };
                        let wants = op.iter().map(|&(c, w, s, l)| want(&cells[c], access(w), s, l)).collect();
                        let held = claim(wants).expect("a thread outside any op waits, it is never refused");
                        let mut entered = Vec::new();
                        for &(c, w, s, l) in &op {
                            if shadow.enter(c, access(w), s..s + l) {
                                entered.push((c, w, s, l));
                            } else {
                                clean = false;
                            }
                        }
                        std::thread::yield_now();
                        for (c, w, s, l) in entered {
                            shadow.leave(c, access(w), s..s + l);
                        }
                        drop(held);
                    }
                    let _ = done.send(clean);
                });
            }
            drop(done);
            for _ in 0..ops.len() {
                let clean = finished
                    .recv_timeout(Duration::from_secs(30))
                    .expect("a thread did not finish within 30 s: claims deadlocked");
                prop_assert!(clean, "two threads held conflicting claims at once");
            }
            for c in cells.iter() {
                prop_assert!(lock(c).claims.is_empty() && lock(c).waiters == 0);
            }
        }
    }

    #[test]
    fn one_op_may_read_and_write_one_buffer() {
        let cell = UseCell::default();
        let held = claim(vec![
            want(&cell, Access::Read, 0, 8),
            want(&cell, Access::Write, 4, 8),
        ])
        .unwrap();
        assert_eq!(lock(&cell).claims.len(), 2);
        drop(held);
        assert!(lock(&cell).claims.is_empty());
    }

    #[test]
    fn a_thread_inside_an_op_is_refused_a_conflict_not_deadlocked() {
        let (a, b, c) = (UseCell::default(), UseCell::default(), UseCell::default());
        let outer = claim(vec![want(&a, Access::Read, 0, 8)]).unwrap();
        // Reads share; disjoint bytes do not conflict.
        drop(
            claim(vec![
                want(&a, Access::Read, 0, 8),
                want(&b, Access::Write, 0, 8),
            ])
            .unwrap(),
        );
        drop(claim(vec![want(&a, Access::Write, 8, 8)]).unwrap());
        match claim(vec![
            want(&b, Access::Read, 0, 1),
            want(&a, Access::Write, 7, 2),
        ]) {
            Err(Error::BufferBusy { here: true, .. }) => {}
            other => panic!("a write over this thread's open read: {other:?}"),
        }
        // The refused claim took nothing back with it.
        assert!(lock(&b).claims.is_empty());
        // Another thread's claim, met from inside an op: refused too.
        let (hold, held) = (Barrier::new(2), Barrier::new(2));
        std::thread::scope(|s| {
            s.spawn(|| {
                let g = claim(vec![want(&c, Access::Write, 0, 4)]).unwrap();
                hold.wait();
                held.wait();
                drop(g);
            });
            hold.wait();
            match claim(vec![want(&c, Access::Read, 2, 1)]) {
                Err(Error::BufferBusy { here: false, .. }) => {}
                other => panic!("a read inside an op over another thread's write: {other:?}"),
            }
            held.wait();
        });
        drop(outer);
        assert!([&a, &b, &c].iter().all(|x| lock(x).claims.is_empty()));
    }

    #[test]
    fn a_thread_outside_any_op_waits_for_the_release() {
        let cell = UseCell::default();
        let released = std::sync::atomic::AtomicBool::new(false);
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let g = claim(vec![want(&cell, Access::Write, 0, 4)]).unwrap();
                tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                released.store(true, Ordering::SeqCst);
                drop(g);
            });
            rx.recv().unwrap();
            let g = claim(vec![want(&cell, Access::Read, 3, 4)]).unwrap();
            assert!(
                released.load(Ordering::SeqCst),
                "the read was claimed while the write still held its bytes"
            );
            drop(g);
        });
    }
}
