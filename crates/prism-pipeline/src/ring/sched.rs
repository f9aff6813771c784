//! Spreading one run's chunks over several devices: generic over the
//! device and the work, so it is tested on CPU threads.
//!
//! - [`Feed`]: the shared input. A device *pulls* the next chunk when it
//!   has room for one (a ring slot freed), so each device takes chunks at
//!   the rate it finishes them: a slower or busier device takes fewer, and
//!   none waits for another's share. Indices are handed out in input order.
//! - [`InOrder`]: delivery in input order for outputs that must reach one
//!   consumer in sequence (a stream's sink). A device whose chunk `k` is
//!   not next parks a copy of it (at most `window` across devices) and
//!   goes on; whoever delivers the next chunk also delivers the parked ones
//!   that follow. With the window full a device waits; this cannot
//!   deadlock: each device pulls increasing indices and delivers its own in
//!   that order, so the device holding the oldest undelivered chunk is
//!   never waiting for another.
//! - [`on_devices`]: one thread per device; the first failure stops the
//!   feed and wakes every waiter, the other devices drain what they have in
//!   flight, and that failure (with its device) is what the run reports.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Locks `m`, through a poisoned lock too (the state is valid either way).
pub(crate) fn lock<S>(m: &Mutex<S>) -> MutexGuard<'_, S> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The shared input of a multi-device run (see the module docs).
#[derive(Debug)]
pub(crate) struct Feed<S> {
    state: Mutex<(S, u64, bool)>,
    stopped: AtomicBool,
}

impl<S> Feed<S> {
    pub(crate) fn new(source: S) -> Self {
        Self {
            state: Mutex::new((source, 0, false)),
            stopped: AtomicBool::new(false),
        }
    }

    /// The next chunk and its index: `take` makes it from the source under
    /// the feed's lock (one caller at a time, in index order). `Ok(None)`
    /// once `take` said the input ended, or the run stopped. An error from
    /// `take` ends the input for every device.
    pub(crate) fn pull<W, E>(
        &self,
        take: impl FnOnce(&mut S, u64) -> Result<Option<W>, E>,
    ) -> Result<Option<(u64, W)>, E> {
        if self.stopped() {
            return Ok(None);
        }
        let mut st = lock(&self.state);
        let (source, next, ended) = &mut *st;
        if *ended || self.stopped() {
            return Ok(None);
        }
        match take(source, *next) {
            Ok(Some(w)) => {
                let k = *next;
                *next += 1;
                Ok(Some((k, w)))
            }
            Ok(None) => {
                *ended = true;
                Ok(None)
            }
            Err(e) => {
                *ended = true;
                Err(e)
            }
        }
    }

    /// No device gets another chunk.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Chunks handed out so far.
    #[cfg(test)]
    pub(crate) fn pulled(&self) -> u64 {
        lock(&self.state).1
    }
}

/// In-order delivery to one consumer `K` (see the module docs). A device
/// whose chunk is not next *parks* it (an owned copy `P`, at most `window`
/// of them across devices) and goes on, so a slow device holding the next
/// chunk does not stall the others until the window is full; whoever
/// delivers the next chunk also delivers the parked ones that follow it.
#[derive(Debug)]
pub(crate) struct InOrder<K, P> {
    state: Mutex<Order<K, P>>,
    turn: Condvar,
    stopped: AtomicBool,
    window: usize,
}

#[derive(Debug)]
struct Order<K, P> {
    next: u64,
    sink: K,
    parked: BTreeMap<u64, P>,
    /// Places taken by devices making their parked copy (outside the lock).
    reserved: usize,
}

impl<K, P> InOrder<K, P> {
    /// `window`: how many chunks may wait parked (at least 1).
    pub(crate) fn new(sink: K, window: usize) -> Self {
        Self {
            state: Mutex::new(Order {
                next: 0,
                sink,
                parked: BTreeMap::new(),
                reserved: 0,
            }),
            turn: Condvar::new(),
            stopped: AtomicBool::new(false),
            window: window.max(1),
        }
    }

    /// Delivers chunk `index`: with `now` when every chunk before it was
    /// delivered, else parks `park()`'s copy, to be delivered with `later`
    /// when its turn comes (waiting for room while `window` copies are
    /// parked). The consumer is called under a lock, one chunk at a time,
    /// in index order. `None` when the run stopped first; an error from
    /// `now`, `park` or `later` (for whichever chunk) comes back here.
    pub(crate) fn deliver<E>(
        &self,
        index: u64,
        now: impl FnOnce(&mut K) -> Result<(), E>,
        park: impl FnOnce() -> Result<P, E>,
        later: &dyn Fn(&mut K, u64, P) -> Result<(), E>,
    ) -> Option<Result<(), E>> {
        let mut st = lock(&self.state);
        loop {
            if self.stopped.load(Ordering::Acquire) {
                return None;
            }
            if st.next == index {
                let r = now(&mut st.sink).and_then(|()| {
                    st.next += 1;
                    Self::drain(&mut st, later)
                });
                drop(st);
                self.turn.notify_all();
                return Some(r);
            }
            if st.parked.len() + st.reserved < self.window {
                st.reserved += 1;
                drop(st);
                let copy = park();
                st = lock(&self.state);
                st.reserved -= 1;
                let r = copy.and_then(|p| {
                    st.parked.insert(index, p);
                    // Its turn may have come while it was copied.
                    Self::drain(&mut st, later)
                });
                drop(st);
                self.turn.notify_all();
                return Some(r);
            }
            st = self.turn.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn drain<E>(
        st: &mut Order<K, P>,
        later: &dyn Fn(&mut K, u64, P) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Some(p) = st.parked.remove(&st.next) {
            later(&mut st.sink, st.next, p)?;
            st.next += 1;
        }
        Ok(())
    }

    /// Wakes every waiter; nothing more is delivered.
    pub(crate) fn stop(&self) {
        // Under the lock, so a waiter between its check and its wait still
        // sees the flag.
        let st = lock(&self.state);
        self.stopped.store(true, Ordering::Release);
        drop(st);
        self.turn.notify_all();
    }

    /// Chunks delivered so far.
    pub(crate) fn delivered(&self) -> u64 {
        lock(&self.state).next
    }

    #[cfg(test)]
    pub(crate) fn into_inner(self) -> K {
        self.state
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .sink
    }
}

/// Runs `work` once per device, each on its own thread (the first on the
/// caller's). When one returns an error, `stop` runs at once (so the others
/// stop pulling and stop waiting to deliver) and they finish what they have
/// in flight. Returns every device's result, in device order.
pub(crate) fn on_devices<D: Send, R: Send, E: Send>(
    devices: &mut [D],
    stop: &(dyn Fn() + Sync),
    work: &(dyn Fn(usize, &mut D) -> Result<R, E> + Sync),
) -> Vec<Result<R, E>> {
    let run = |i: usize, d: &mut D| {
        // A panic (a bug: user code is caught inside `work`) stops the
        // others too, so none waits for this device for ever.
        let guard = StopOnUnwind(stop);
        let r = work(i, d);
        std::mem::forget(guard);
        if r.is_err() {
            stop();
        }
        r
    };
    std::thread::scope(|s| {
        let mut iter = devices.iter_mut().enumerate();
        let first = iter.next();
        let handles: Vec<_> = iter.map(|(i, d)| s.spawn(move || run(i, d))).collect();
        let mut out = Vec::with_capacity(handles.len() + 1);
        if let Some((i, d)) = first {
            out.push(run(i, d));
        }
        for h in handles {
            match h.join() {
                Ok(r) => out.push(r),
                // A device thread's work catches user panics itself; any
                // other panic is a bug in prism, passed on as it is.
                Err(payload) => std::panic::resume_unwind(payload),
            }
        }
        out
    })
}

/// Calls `stop` when dropped during a panic.
struct StopOnUnwind<'a>(&'a (dyn Fn() + Sync));

impl Drop for StopOnUnwind<'_> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// The failure a run reports: the first device (in time) that failed with
/// something other than being stopped by another's failure.
pub(crate) fn first_failure<R, E>(
    results: Vec<Result<R, E>>,
    order: &[usize],
) -> Result<Vec<R>, (usize, E)> {
    let mut oks = Vec::with_capacity(results.len());
    let mut errs: Vec<Option<E>> = Vec::new();
    for r in results {
        match r {
            Ok(v) => {
                oks.push(v);
                errs.push(None);
            }
            Err(e) => errs.push(Some(e)),
        }
    }
    for &d in order {
        if let Some(e) = errs.get_mut(d).and_then(Option::take) {
            return Err((d, e));
        }
    }
    if let Some((d, e)) = errs
        .into_iter()
        .enumerate()
        .find_map(|(d, e)| e.map(|e| (d, e)))
    {
        return Err((d, e));
    }
    Ok(oks)
}

/// Devices in the order their failures came back (each device appends
/// itself once).
#[derive(Debug, Default)]
pub(crate) struct FailOrder(Mutex<Vec<usize>>);

impl FailOrder {
    pub(crate) fn push(&self, device: usize) {
        lock(&self.0).push(device);
    }

    pub(crate) fn take(&self) -> Vec<usize> {
        std::mem::take(&mut *lock(&self.0))
    }
}

#[cfg(test)]
mod tests {
    //! N simulated devices with random speeds and failures pull chunks from
    //! a [`Feed`] and deliver through [`InOrder`], against a sequential
    //! reference: without failures the consumer receives exactly the
    //! reference; with one, a prefix of it that ends before the failed
    //! chunk, the run reports that device and chunk, and nothing hangs.

    use super::*;
    use proptest::prelude::*;
    use std::time::{Duration, Instant};

    fn reference(k: u64) -> u64 {
        k.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xABCD
    }

    #[derive(Debug, Clone)]
    struct Device {
        /// Busy time per chunk.
        micros: u64,
        /// Fails on its n-th chunk.
        fail_at: Option<usize>,
        /// Chunks it may hold before delivering (its ring).
        slots: usize,
    }

    #[derive(Debug, PartialEq)]
    struct Failed {
        device: usize,
        chunk: u64,
    }

    /// Runs the simulation: returns (consumer's list, per-device chunk
    /// counts, the reported failure).
    fn simulate(devices: &[Device], chunks: u64) -> (Vec<u64>, Vec<usize>, Option<Failed>) {
        let feed = Feed::new(chunks);
        let out = InOrder::new(Vec::new(), 16);
        let order = FailOrder::default();
        let mut state: Vec<(Device, usize)> = devices.iter().map(|d| (d.clone(), 0)).collect();
        let stop = || {
            feed.stop();
            out.stop();
        };
        let work = |i: usize, (d, taken): &mut (Device, usize)| -> Result<(), Failed> {
            // A ring: pull while a slot is free, deliver the oldest.
            let mut ring: std::collections::VecDeque<(u64, u64)> = Default::default();
            loop {
                while ring.len() < d.slots {
                    let pulled = feed
                        .pull(|total: &mut u64, k| Ok::<_, ()>((k < *total).then_some(k)))
                        .unwrap_or(None);
                    let Some((k, _)) = pulled else { break };
                    *taken += 1;
                    if d.fail_at == Some(*taken) {
                        order.push(i);
                        return Err(Failed {
                            device: i,
                            chunk: k,
                        });
                    }
                    let end = Instant::now() + Duration::from_micros(d.micros);
                    while Instant::now() < end {
                        std::hint::spin_loop();
                    }
                    ring.push_back((k, reference(k)));
                }
                let Some((k, v)) = ring.pop_front() else {
                    return Ok(());
                };
                let delivered = out.deliver(
                    k,
                    |sink: &mut Vec<u64>| {
                        sink.push(v);
                        Ok(())
                    },
                    || Ok(v),
                    &|sink, _, v| {
                        sink.push(v);
                        Ok(())
                    },
                );
                match delivered {
                    None => return Ok(()), // stopped by another device
                    Some(r) => r?,
                }
            }
        };
        let results = on_devices(&mut state, &stop, &work);
        let failure = first_failure(results, &order.take()).err().map(|(_, e)| e);
        let counts = state.iter().map(|(_, n)| *n).collect();
        (out.into_inner(), counts, failure)
    }

    fn device() -> impl Strategy<Value = Device> {
        (
            0u64..200,
            prop::option::weighted(0.2, 1usize..20),
            1usize..5,
        )
            .prop_map(|(micros, fail_at, slots)| Device {
                micros,
                fail_at,
                slots,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn devices_deliver_the_reference_in_order(
            devices in prop::collection::vec(device(), 1..5),
            chunks in 0u64..80,
        ) {
            let (got, counts, failure) = simulate(&devices, chunks);
            let want: Vec<u64> = (0..chunks).map(reference).collect();
            prop_assert!(got.len() <= want.len());
            prop_assert_eq!(&got[..], &want[..got.len()], "a delivery out of order");
            match failure {
                None => {
                    prop_assert_eq!(got.len() as u64, chunks, "chunks lost");
                    prop_assert_eq!(counts.iter().sum::<usize>() as u64, chunks);
                }
                Some(f) => {
                    let d = &devices[f.device];
                    prop_assert_eq!(Some(counts[f.device]), d.fail_at);
                    prop_assert!(f.chunk < chunks);
                    prop_assert!((got.len() as u64) <= f.chunk, "delivered past the failed chunk");
                }
            }
        }
    }

    #[test]
    fn a_slow_device_takes_fewer_chunks() {
        let fast = Device {
            micros: 50,
            fail_at: None,
            slots: 2,
        };
        let slow = Device {
            micros: 5_000,
            ..fast.clone()
        };
        let (got, counts, failure) = simulate(&[slow, fast.clone(), fast], 200);
        assert!(failure.is_none());
        assert_eq!(got.len(), 200);
        assert!(
            counts[0] * 4 < counts[1] + counts[2],
            "the slow device took {} of 200 chunks ({counts:?})",
            counts[0]
        );
    }

    #[test]
    fn stop_wakes_a_waiting_delivery() {
        let out: InOrder<(), ()> = InOrder::new((), 1);
        // Fill the window, so chunk 6 must wait.
        let parked = out.deliver(5, |_| Ok::<_, ()>(()), || Ok(()), &|_, _, _| Ok(()));
        assert_eq!(parked, Some(Ok(())));
        std::thread::scope(|s| {
            let h = s.spawn(|| out.deliver(6, |_| Ok::<_, ()>(()), || Ok(()), &|_, _, _| Ok(())));
            std::thread::sleep(Duration::from_millis(20));
            out.stop();
            assert_eq!(h.join().ok().flatten(), None);
        });
        assert_eq!(out.delivered(), 0);
    }

    #[test]
    fn a_failing_source_ends_the_input_for_every_device() {
        let feed = Feed::new(());
        assert_eq!(feed.pull(|_, k| Ok::<_, u64>(Some(k))), Ok(Some((0, 0))));
        assert_eq!(feed.pull(|_, k| Err::<Option<u64>, _>(k)), Err(1));
        assert_eq!(feed.pull(|_, k| Ok::<_, u64>(Some(k))), Ok(None));
        assert_eq!(feed.pulled(), 1);
    }
}
