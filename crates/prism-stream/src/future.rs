//! Completion as futures: await a [`Fence`] ([`Fence::completion`], or
//! `fence.await` through [`IntoFuture`]) or a coordinator op
//! ([`AsyncCoordinator::op_future`](crate::AsyncCoordinator::op_future))
//! from async Rust, on any executor (tokio, async-std, smol, a hand-written
//! one), without a thread blocked per wait.
//!
//! # How it works
//!
//! A future first probes its fence itself (one non-blocking
//! `cuEventQuery`; none once the fence was seen complete): work that already
//! finished resolves on the first poll and costs nothing more. Otherwise it
//! hands a registration (the fence and the task's [`Waker`]) to the
//! *completion thread*, `prism-complete`: one thread for the whole
//! process, started at the first registration, however many futures wait.
//! Registering is a short mutex hold and a push; a re-poll with another
//! waker replaces the stored one (unless [`Waker::will_wake`] says it is the
//! same task), and dropping the future withdraws it (the thread holds only a
//! weak reference and forgets registrations whose future is gone at its next
//! pass).
//!
//! The thread probes its registrations with `cuEventQuery`, wakes the tasks
//! whose fence completed or failed, and sleeps between passes. Fences of one
//! stream complete in the order they were recorded, so a pass probes each
//! stream's waiting fences oldest first and stops at the first one not
//! ready: a pass costs one query per stream with waiters plus one per fence
//! that finished, not one per waiting future. The sleep starts at 10 µs and
//! doubles, up to 1 ms, while nothing finishes; a completion or a new
//! registration sets it back to 10 µs (a registration wakes a sleeping
//! thread at once, through a [`Condvar`]). With nothing to watch the thread
//! sleeps on the condvar without polling, and exits after one idle second; the
//! next registration starts it again.
//!
//! # Cost
//!
//! One OS thread while anything is awaited (none otherwise), and latency:
//! a completion is seen 10 µs to 1 ms after it happens (plus the OS's timer
//! slack, about 50 µs on Linux), depending on how long the waits have
//! lasted; work that waits long is checked about a thousand times a second.
//! The wake itself is the executor's. For the lowest latency at the cost of
//! a thread, block in [`Fence::synchronize`] (on a blocking pool, such as
//! tokio's `spawn_blocking`) instead.
//!
//! # Why not `cuLaunchHostFunc`
//!
//! A host function queued on the stream would run on a driver thread when
//! the GPU reaches it, so it could wake the task with no polling at all. But
//! it is queued work in the stream: it would have to be queued when the
//! fence is recorded, for every fence, awaited or not (a fence is only known
//! to be awaited long after, when the stream has moved on), or it would
//! order after work queued later than the fence. Callbacks also run
//! serialised on a driver thread, may make no CUDA call, and are not
//! promised to run once the context faulted, so a failure would still need
//! polling. Pooled
//! events and one polling thread keep a wait free until it is awaited.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::context::Gpu;
use crate::graph::{OpId, Probe};
use crate::order::Fence;
use crate::order::{Mark, StreamId};
use crate::{Error, Result};

/// The completion thread's name (as `/proc/self/task/*/comm` shows it:
/// Linux keeps 15 bytes of a thread name, so it stays shorter).
pub(crate) const THREAD_NAME: &str = "prism-complete";

/// The completion thread's first sleep after a change.
const FIRST_NAP: Duration = Duration::from_micros(10);
/// Its longest sleep while something is watched.
const LONGEST_NAP: Duration = Duration::from_millis(1);
/// How long the process-wide thread waits with nothing to watch before it exits.
const IDLE_EXIT: Duration = Duration::from_secs(1);

/// Something the completion thread can watch: a [`Fence`], or a fake in the
/// unit tests.
pub(crate) trait Pollable: Send + Sync + Unpin + 'static {
    /// Non-blocking: has it completed (or failed)?
    fn probe(&self) -> Probe;

    /// Its stream and position there, when it completes in stream order
    /// (the later of two of a stream never completes first); `None` when
    /// nothing is known, so it is probed on its own.
    fn order(&self) -> Option<(StreamId, u64)> {
        None
    }
}

impl Pollable for Fence {
    fn probe(&self) -> Probe {
        Fence::probe(self)
    }

    fn order(&self) -> Option<(StreamId, u64)> {
        Some((Mark::stream(self), Mark::seq(self)))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a wait ended without success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The GPU reported an error (the reason is the CUDA error).
    Gpu(String),
    /// The completion thread could not be started.
    NoThread(String),
}

type Outcome = std::result::Result<(), Failure>;

fn outcome_of(probe: Probe) -> Option<Outcome> {
    match probe {
        Probe::NotReady => None,
        Probe::Complete => Some(Ok(())),
        Probe::Failed(reason) => Some(Err(Failure::Gpu(reason))),
    }
}

/// One registration, shared by its future (strongly) and the completion
/// thread (weakly).
#[derive(Debug)]
struct Slot<P> {
    pollable: P,
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    /// The task to wake.
    waker: Option<Waker>,
    /// Set by the completion thread when it saw the fence finish.
    outcome: Option<Outcome>,
}

impl<P> Slot<P> {
    /// Stores the thread's verdict and wakes the task (outside the lock).
    fn finish(&self, outcome: Outcome) {
        let waker = {
            let mut state = lock(&self.state);
            state.outcome = Some(outcome);
            state.waker.take()
        };
        if let Some(w) = waker {
            // A waker that panics must not take the thread (and every other
            // registration) down with it.
            let _ = catch_unwind(AssertUnwindSafe(|| w.wake()));
        }
    }
}

/// A registration as the thread keeps it.
#[derive(Debug)]
struct Entry<P> {
    order: Option<(StreamId, u64)>,
    slot: Weak<Slot<P>>,
}

/// Registrations not yet taken by the thread, and the thread's state.
#[derive(Debug)]
struct Inbox<P> {
    new: Vec<Entry<P>>,
    /// A thread is running (it clears this, under the lock, as it exits).
    running: bool,
    /// The thread sleeps on the condvar (so a registration wakes it).
    napping: bool,
}

#[derive(Debug)]
struct Shared<P> {
    inbox: Mutex<Inbox<P>>,
    wake: Condvar,
    /// Registrations the registry holds (in the inbox or the thread's list).
    watched: AtomicUsize,
    /// Threads started so far.
    threads_started: AtomicUsize,
    idle_exit: Duration,
}

/// The registrations of one kind of [`Pollable`] and the thread that
/// watches them. The process has one for [`Fence`]s
/// ([`fence_registry`]); tests make their own.
#[derive(Debug)]
pub(crate) struct Registry<P> {
    shared: Arc<Shared<P>>,
}

/// The process-wide registry of fence waits.
fn fence_registry() -> &'static Registry<Fence> {
    static REGISTRY: OnceLock<Registry<Fence>> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry::new(IDLE_EXIT))
}

impl<P: Pollable> Registry<P> {
    /// A registry whose thread exits after `idle_exit` with nothing to watch.
    pub(crate) fn new(idle_exit: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                inbox: Mutex::new(Inbox {
                    new: Vec::new(),
                    running: false,
                    napping: false,
                }),
                wake: Condvar::new(),
                watched: AtomicUsize::new(0),
                threads_started: AtomicUsize::new(0),
                idle_exit,
            }),
        }
    }

    /// Registrations held (those whose future is gone included, until the
    /// thread's next pass drops them).
    #[cfg(test)]
    pub(crate) fn watched(&self) -> usize {
        self.shared.watched.load(Ordering::Acquire)
    }

    /// Completion threads this registry started so far.
    #[cfg(test)]
    pub(crate) fn threads_started(&self) -> usize {
        self.shared.threads_started.load(Ordering::Acquire)
    }

    /// Hands `slot` to the thread, starting it if none runs.
    fn register(&self, slot: &Arc<Slot<P>>) -> std::result::Result<(), Failure> {
        let entry = Entry {
            order: slot.pollable.order(),
            slot: Arc::downgrade(slot),
        };
        let mut inbox = lock(&self.shared.inbox);
        if !inbox.running {
            let shared = Arc::clone(&self.shared);
            std::thread::Builder::new()
                .name(THREAD_NAME.to_owned())
                .spawn(move || watch(&shared))
                .map_err(|e| Failure::NoThread(e.to_string()))?;
            inbox.running = true;
            self.shared.threads_started.fetch_add(1, Ordering::AcqRel);
        } else if inbox.napping {
            inbox.napping = false;
            self.shared.wake.notify_one();
        }
        inbox.new.push(entry);
        self.shared.watched.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

/// The completion thread's loop (see the module docs).
fn watch<P: Pollable>(shared: &Shared<P>) {
    let _span = tracing::debug_span!("prism.completion_thread").entered();
    tracing::debug!("completion thread started");
    let mut list: Vec<Entry<P>> = Vec::new();
    let mut nap = FIRST_NAP;
    loop {
        let fresh = {
            let mut inbox = lock(&shared.inbox);
            if inbox.new.is_empty() {
                let timeout = if list.is_empty() {
                    shared.idle_exit
                } else {
                    nap
                };
                inbox.napping = true;
                inbox = shared
                    .wake
                    .wait_timeout_while(inbox, timeout, |i| i.new.is_empty())
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
                inbox.napping = false;
                if inbox.new.is_empty() && list.is_empty() {
                    inbox.running = false;
                    tracing::debug!("completion thread idle: exiting");
                    return;
                }
            }
            let fresh = inbox.new.len();
            list.append(&mut inbox.new);
            fresh
        };
        if fresh > 0 {
            // Stable: a stream's fences stay together, oldest first.
            list.sort_by_key(|e| e.order);
            nap = FIRST_NAP;
        }
        let (finished, gone) = pass(&mut list);
        shared.watched.fetch_sub(finished + gone, Ordering::AcqRel);
        if finished > 0 {
            nap = FIRST_NAP;
        } else if fresh == 0 {
            nap = (nap * 2).min(LONGEST_NAP);
        }
    }
}

/// One pass over `list` (sorted by order): probes each stream's fences
/// oldest first up to the first not ready, finishes those that completed or
/// failed, drops those whose future is gone. Returns (finished, gone).
fn pass<P: Pollable>(list: &mut Vec<Entry<P>>) -> (usize, usize) {
    let (mut finished, mut gone) = (0, 0);
    // The stream whose oldest waiting fence is not ready (its later ones
    // cannot be either).
    let mut busy: Option<StreamId> = None;
    list.retain(|e| {
        let Some(slot) = e.slot.upgrade() else {
            gone += 1;
            return false;
        };
        if let (Some((stream, _)), Some(b)) = (e.order, busy) {
            if stream == b {
                return true;
            }
        }
        match outcome_of(slot.pollable.probe()) {
            None => {
                busy = e.order.map(|(s, _)| s);
                true
            }
            Some(outcome) => {
                slot.finish(outcome);
                finished += 1;
                false
            }
        }
    });
    (finished, gone)
}

/// Where a wait stands.
#[derive(Debug)]
enum Stage<P> {
    /// Not registered (nothing seen not ready yet).
    Fresh(P),
    /// Registered with the completion thread.
    Registered(Arc<Slot<P>>),
    /// Finished; polled again, it answers the same.
    Done(Outcome),
}

/// The executor-agnostic wait behind [`FenceFuture`] and [`OpFuture`].
struct Wait<P: 'static> {
    stage: Stage<P>,
    registry: &'static Registry<P>,
}

impl<P> fmt::Debug for Wait<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stage = match &self.stage {
            Stage::Fresh(_) => "fresh",
            Stage::Registered(_) => "registered",
            Stage::Done(Ok(())) => "complete",
            Stage::Done(Err(_)) => "failed",
        };
        f.debug_struct("Wait").field("stage", &stage).finish()
    }
}

impl<P: Pollable> Wait<P> {
    fn new(pollable: P, registry: &'static Registry<P>) -> Self {
        Self {
            stage: Stage::Fresh(pollable),
            registry,
        }
    }

    fn done(outcome: Outcome, registry: &'static Registry<P>) -> Self {
        Self {
            stage: Stage::Done(outcome),
            registry,
        }
    }

    fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        let stage = std::mem::replace(&mut self.stage, Stage::Done(Ok(())));
        let (stage, poll) = match stage {
            Stage::Fresh(pollable) => match outcome_of(pollable.probe()) {
                Some(outcome) => (Stage::Done(outcome.clone()), Poll::Ready(outcome)),
                None => {
                    let slot = Arc::new(Slot {
                        pollable,
                        state: Mutex::new(SlotState {
                            waker: Some(cx.waker().clone()),
                            outcome: None,
                        }),
                    });
                    match self.registry.register(&slot) {
                        Ok(()) => (Stage::Registered(slot), Poll::Pending),
                        Err(failure) => {
                            (Stage::Done(Err(failure.clone())), Poll::Ready(Err(failure)))
                        }
                    }
                }
            },
            Stage::Registered(slot) => match Self::check(&slot, cx.waker()) {
                Some(outcome) => (Stage::Done(outcome.clone()), Poll::Ready(outcome)),
                None => (Stage::Registered(slot), Poll::Pending),
            },
            Stage::Done(outcome) => (Stage::Done(outcome.clone()), Poll::Ready(outcome)),
        };
        self.stage = stage;
        poll
    }

    /// A registered wait polled again: its own probe, else the thread's
    /// verdict, else it keeps (or updates) the waker.
    fn check(slot: &Slot<P>, waker: &Waker) -> Option<Outcome> {
        if let Some(outcome) = outcome_of(slot.pollable.probe()) {
            return Some(outcome);
        }
        let mut state = lock(&slot.state);
        if let Some(outcome) = state.outcome.clone() {
            return Some(outcome);
        }
        match &mut state.waker {
            Some(w) if w.will_wake(waker) => {}
            w => *w = Some(waker.clone()),
        }
        None
    }
}

/// A [`Fence`]'s completion as a [`Future`]: resolves to `Ok(())` once the
/// GPU passed the fence, or to [`Error::ContextPoisoned`] when the driver
/// reports an error for it (CUDA errors are sticky: the context is
/// unusable). Made by [`Fence::completion`] or by awaiting a fence
/// (`fence.await`, `(&fence).await`).
///
/// Executor-agnostic and `Send + 'static`: it holds a handle on the fence,
/// no borrow. No thread blocks for it: see the [module docs](crate::future) for the
/// shared completion thread, its cost and latency. Dropping it withdraws the
/// wait.
///
/// ```no_run
/// # async fn demo(lane: &mut prism_stream::Lane) -> prism_stream::Result<()> {
/// let fence = lane.fence()?;
/// fence.completion().await?; // or `fence.await?`
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
#[must_use = "futures do nothing unless awaited or polled"]
pub struct FenceFuture {
    wait: Wait<Fence>,
}

impl Future for FenceFuture {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.wait.poll_wait(cx).map(|outcome| {
            outcome.map_err(|failure| match failure {
                Failure::Gpu(reason) => Error::ContextPoisoned { reason },
                Failure::NoThread(reason) => Error::CompletionThread { reason },
            })
        })
    }
}

impl Fence {
    /// A future that resolves when the GPU passes this fence (`Ok`), or
    /// with [`Error::ContextPoisoned`] when the driver reports an error for
    /// it. Blocks no thread: see [`FenceFuture`].
    pub fn completion(&self) -> FenceFuture {
        FenceFuture {
            wait: Wait::new(self.clone(), fence_registry()),
        }
    }
}

impl IntoFuture for Fence {
    type Output = Result<()>;
    type IntoFuture = FenceFuture;

    /// [`Fence::completion`], so `fence.await` waits for the GPU.
    fn into_future(self) -> FenceFuture {
        FenceFuture {
            wait: Wait::new(self, fence_registry()),
        }
    }
}

impl IntoFuture for &Fence {
    type Output = Result<()>;
    type IntoFuture = FenceFuture;

    /// [`Fence::completion`], so `(&fence).await` waits for the GPU.
    fn into_future(self) -> FenceFuture {
        self.completion()
    }
}

/// An [`AsyncCoordinator`](crate::AsyncCoordinator) op's completion as a
/// [`Future`]: made by
/// [`AsyncCoordinator::op_future`](crate::AsyncCoordinator::op_future),
/// resolves to `Ok(())` once the op completed, or to [`Error::OpFailed`]
/// when it failed on the GPU (the context is then marked unusable, as
/// [`AsyncCoordinator::wait`](crate::AsyncCoordinator::wait) does).
///
/// `Send + 'static`: it holds the op's fence and a GPU handle, not the
/// coordinator, so it can be spawned while the coordinator queues more work.
/// It does not update the coordinator's op table; the coordinator's next
/// `poll` (or sweep) settles the op, with no further driver query, since the
/// fence remembers that it completed. Waits as [`FenceFuture`] does.
#[derive(Debug)]
#[must_use = "futures do nothing unless awaited or polled"]
pub struct OpFuture {
    op: OpId,
    /// The op's name, for the error of a failure.
    name: String,
    gpu: Gpu,
    wait: Wait<Fence>,
}

impl OpFuture {
    /// Waits for `fence`, the fence of pending op `op`.
    pub(crate) fn pending(op: OpId, name: String, gpu: Gpu, fence: Fence) -> Self {
        Self {
            op,
            name,
            gpu,
            wait: Wait::new(fence, fence_registry()),
        }
    }

    /// An op that already finished, with its recorded outcome
    /// (`Err(reason)` for a failure).
    pub(crate) fn finished(
        op: OpId,
        name: String,
        gpu: Gpu,
        outcome: std::result::Result<(), String>,
    ) -> Self {
        Self {
            op,
            name,
            gpu,
            wait: Wait::done(outcome.map_err(Failure::Gpu), fence_registry()),
        }
    }

    /// The op it waits for.
    pub fn op(&self) -> OpId {
        self.op
    }
}

impl Future for OpFuture {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = &mut *self;
        this.wait.poll_wait(cx).map(|outcome| match outcome {
            Ok(()) => Ok(()),
            Err(Failure::Gpu(reason)) => {
                this.gpu.poison(&reason);
                Err(Error::OpFailed {
                    op: this.op,
                    name: this.name.clone(),
                    reason,
                })
            }
            Err(Failure::NoThread(reason)) => Err(Error::CompletionThread { reason }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::AtomicU8;
    use std::task::Wake;
    use std::time::Instant;

    use rand::seq::SliceRandom;
    use rand::{RngExt, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    const PENDING: u8 = 0;
    const COMPLETE: u8 = 1;
    const FAILED: u8 = 2;

    /// A fence whose state a test flips; counts its probes.
    #[derive(Debug, Clone)]
    struct Fake {
        state: Arc<AtomicU8>,
        probes: Arc<AtomicUsize>,
        order: Option<(StreamId, u64)>,
    }

    impl Fake {
        fn new(order: Option<(u64, u64)>) -> Self {
            Self {
                state: Arc::new(AtomicU8::new(PENDING)),
                probes: Arc::new(AtomicUsize::new(0)),
                order: order.map(|(s, seq)| (StreamId::for_test(s), seq)),
            }
        }

        fn set(&self, state: u8) {
            self.state.store(state, Ordering::Release);
        }
    }

    impl Pollable for Fake {
        fn probe(&self) -> Probe {
            self.probes.fetch_add(1, Ordering::Relaxed);
            match self.state.load(Ordering::Acquire) {
                PENDING => Probe::NotReady,
                COMPLETE => Probe::Complete,
                _ => Probe::Failed("fake fault".into()),
            }
        }

        fn order(&self) -> Option<(StreamId, u64)> {
            self.order
        }
    }

    impl Future for Wait<Fake> {
        type Output = Outcome;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
            self.poll_wait(cx)
        }
    }

    fn registry(idle_exit: Duration) -> &'static Registry<Fake> {
        Box::leak(Box::new(Registry::new(idle_exit)))
    }

    /// Polls `cond` until it holds, for up to 5 s.
    fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "timed out waiting until {what}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[derive(Debug, Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn a_thousand_waits_resolve_in_any_order_on_one_thread() {
        let reg = registry(Duration::from_secs(60));
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(21);
        // Half on 8 "streams" (completed in stream order), half unordered.
        let mut per_stream = [0u64; 8];
        let fakes: Vec<Fake> = (0..1000)
            .map(|i| {
                if i % 2 == 0 {
                    let s = rng.random_range(0..8usize);
                    per_stream[s] += 1;
                    Fake::new(Some((s as u64 + 1, per_stream[s])))
                } else {
                    Fake::new(None)
                }
            })
            .collect();
        let failed = 777;
        let rt = runtime();
        let results = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (i, f) in fakes.iter().enumerate() {
                let wait = Wait::new(f.clone(), reg);
                set.spawn(async move { (i, wait.await) });
            }
            // The GPU: completes them in random order (a stream's in its
            // order), with pauses so that the thread's sleep grows.
            let flipper = {
                let fakes = fakes.clone();
                std::thread::spawn(move || {
                    let mut order: Vec<usize> = (0..fakes.len()).collect();
                    order.shuffle(&mut rng);
                    // Stream order: within a stream, hand out its fences
                    // oldest first at the positions the shuffle gave the stream.
                    let mut by_stream: std::collections::HashMap<StreamId, Vec<usize>> =
                        Default::default();
                    for &i in &order {
                        if let Some((s, _)) = fakes[i].order {
                            by_stream.entry(s).or_default().push(i);
                        }
                    }
                    for list in by_stream.values_mut() {
                        list.sort_by_key(|&i| fakes[i].order);
                        list.reverse();
                    }
                    for k in 0..order.len() {
                        let i = match fakes[order[k]].order {
                            Some((s, _)) => by_stream.get_mut(&s).and_then(Vec::pop).unwrap(),
                            None => order[k],
                        };
                        fakes[i].set(if i == failed { FAILED } else { COMPLETE });
                        if k % 100 == 0 {
                            std::thread::sleep(Duration::from_millis(3));
                        }
                    }
                })
            };
            let mut results = vec![None; fakes.len()];
            while let Some(joined) = set.join_next().await {
                let (i, outcome) = joined.unwrap();
                results[i] = Some(outcome);
            }
            flipper.join().unwrap();
            results
        });
        for (i, r) in results.into_iter().enumerate() {
            let want = if i == failed {
                Err(Failure::Gpu("fake fault".into()))
            } else {
                Ok(())
            };
            assert_eq!(r, Some(want), "wait {i}");
        }
        assert_eq!(reg.threads_started(), 1, "one thread for all the waits");
        eventually("the registry is empty", || reg.watched() == 0);
    }

    #[test]
    fn a_pass_probes_one_waiting_fence_per_stream() {
        let fakes: Vec<Fake> = (0..300)
            .map(|i| Fake::new(Some((i % 3 + 1, i / 3))))
            .collect();
        let slots: Vec<Arc<Slot<Fake>>> = fakes
            .iter()
            .map(|f| {
                Arc::new(Slot {
                    pollable: f.clone(),
                    state: Mutex::default(),
                })
            })
            .collect();
        let mut list: Vec<Entry<Fake>> = slots
            .iter()
            .map(|s| Entry {
                order: s.pollable.order,
                slot: Arc::downgrade(s),
            })
            .collect();
        list.sort_by_key(|e| e.order);
        let probes = |fakes: &[Fake]| -> usize {
            fakes
                .iter()
                .map(|f| f.probes.swap(0, Ordering::Relaxed))
                .sum()
        };
        assert_eq!(pass(&mut list), (0, 0));
        assert_eq!(probes(&fakes), 3, "one probe per busy stream");
        // Stream 1 finished its first 10 fences: 10 finish, 11 probes there.
        for f in fakes
            .iter()
            .filter(|f| f.order.unwrap().0 == StreamId::for_test(1))
        {
            if f.order.unwrap().1 < 10 {
                f.set(COMPLETE);
            }
        }
        assert_eq!(pass(&mut list), (10, 0));
        assert_eq!(probes(&fakes), 11 + 2);
        assert_eq!(list.len(), 290);
        assert!(slots[0].state.lock().unwrap().outcome == Some(Ok(())));
        // Futures gone: their entries leave without a probe.
        drop(slots);
        assert_eq!(pass(&mut list), (0, 290));
        assert_eq!(probes(&fakes), 0);
        assert!(list.is_empty());
    }

    #[test]
    fn a_complete_fence_resolves_without_registering() {
        let reg = registry(Duration::from_secs(60));
        let f = Fake::new(None);
        f.set(COMPLETE);
        let mut wait = Wait::new(f.clone(), reg);
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(wait.poll_wait(&mut cx), Poll::Ready(Ok(())));
        // Polled again, it answers the same.
        assert_eq!(wait.poll_wait(&mut cx), Poll::Ready(Ok(())));
        let failed = Fake::new(None);
        failed.set(FAILED);
        let mut wait = Wait::new(failed, reg);
        assert_eq!(
            wait.poll_wait(&mut cx),
            Poll::Ready(Err(Failure::Gpu("fake fault".into())))
        );
        assert_eq!(reg.threads_started(), 0);
        assert_eq!(reg.watched(), 0);
    }

    #[test]
    fn a_new_waker_replaces_the_registered_one() {
        let reg = registry(Duration::from_secs(60));
        let f = Fake::new(None);
        let (a, b) = (
            Arc::new(CountingWaker::default()),
            Arc::new(CountingWaker::default()),
        );
        let (wa, wb) = (Waker::from(Arc::clone(&a)), Waker::from(Arc::clone(&b)));
        let mut wait = Wait::new(f.clone(), reg);
        assert!(wait.poll_wait(&mut Context::from_waker(&wa)).is_pending());
        assert!(wait.poll_wait(&mut Context::from_waker(&wa)).is_pending());
        assert!(wait.poll_wait(&mut Context::from_waker(&wb)).is_pending());
        assert_eq!(reg.watched(), 1, "re-polls do not register again");
        f.set(COMPLETE);
        eventually("the new waker is woken", || {
            b.0.load(Ordering::Acquire) == 1
        });
        assert_eq!(a.0.load(Ordering::Acquire), 0, "the old waker was woken");
        assert_eq!(
            wait.poll_wait(&mut Context::from_waker(&wb)),
            Poll::Ready(Ok(()))
        );
        eventually("the registry is empty", || reg.watched() == 0);
    }

    #[test]
    fn dropped_waits_leave_the_registry_and_an_idle_thread_exits() {
        let reg = registry(Duration::from_millis(50));
        let mut cx = Context::from_waker(Waker::noop());
        let fakes: Vec<Fake> = (0..100).map(|i| Fake::new(Some((1, i)))).collect();
        let mut waits: Vec<Wait<Fake>> = fakes.iter().map(|f| Wait::new(f.clone(), reg)).collect();
        for w in &mut waits {
            assert!(w.poll_wait(&mut cx).is_pending());
        }
        assert_eq!(reg.threads_started(), 1);
        assert_eq!(reg.watched(), 100);
        drop(waits);
        // Never completed, yet forgotten once their futures are gone.
        eventually("the registry is empty", || reg.watched() == 0);
        // The idle thread exits; the next registration starts another.
        eventually("the thread exits", || !lock(&reg.shared.inbox).running);
        let mut wait = Wait::new(fakes[0].clone(), reg);
        assert!(wait.poll_wait(&mut cx).is_pending());
        assert_eq!(reg.threads_started(), 2);
        fakes[0].set(COMPLETE);
        eventually("the registry is empty", || reg.watched() == 0);
        assert_eq!(wait.poll_wait(&mut cx), Poll::Ready(Ok(())));
    }

    #[test]
    fn futures_are_send_and_static() {
        fn check<F: Future<Output = Result<()>> + Send + 'static>() {}
        check::<FenceFuture>();
        check::<OpFuture>();
    }
}
