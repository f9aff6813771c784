//! A host-only triple buffer for one producer thread and one consumer thread,
//! with latest-value semantics.
//!
//! Three buffers rotate between three roles:
//!
//! * **write**: owned by the [`Writer`], which fills it;
//! * **ready**: the last published value, owned by nobody;
//! * **read**: owned by the [`Reader`], which looks at it.
//!
//! [`Writer::publish`] swaps write ↔ ready and marks ready *fresh*;
//! [`Reader::update`] swaps read ↔ ready if ready is fresh. Neither side ever
//! waits for the other: a publish that the reader has not picked up yet is
//! simply replaced by the next one (the reader only ever sees the newest
//! complete value, never a partly written one).
//!
//! ```
//! use prism_buffer::cpu::TripleBuffer;
//!
//! let (mut writer, mut reader) = TripleBuffer::new(0u32);
//! *writer.write() = 1;
//! writer.publish();
//! *writer.write() = 2;
//! writer.publish();
//! assert!(reader.update());
//! assert_eq!(*reader.read(), 2); // 1 was overwritten before it was read
//! assert!(!reader.update());
//! ```
//!
//! # Synchronisation
//!
//! Each half *owns* its buffer (a `Box<T>`): [`Writer::write`] and
//! [`Reader::read`] hand out plain references, so there is no guard to hold,
//! leak or forget. The ready buffer and its fresh flag sit behind one
//! [`Mutex`] that only [`publish`](Writer::publish) and
//! [`update`](Reader::update) lock, for the time of a pointer swap (no user
//! code ever runs under it): neither side waits for the other beyond that
//! swap, and nothing a caller does (a forgotten or leaked reference, a
//! panic) can keep it locked. The mutex's acquire/release orders the
//! writer's writes before the reader's reads of the same buffer, and the
//! reader's reads before the writer reuses it. `has_update` peeks at an
//! atomic copy of the fresh flag (a hint) without locking.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The ready buffer a [`Writer`] and a [`Reader`] exchange theirs with;
/// create both with [`TripleBuffer::new`].
pub struct TripleBuffer<T> {
    /// The ready buffer and whether the reader has not taken it yet.
    ready: Mutex<(Box<T>, bool)>,
    /// A copy of the fresh flag, for [`Reader::has_update`].
    fresh: AtomicBool,
}

impl<T> TripleBuffer<T> {
    /// Creates the three buffers, each holding a clone of `init`, and returns
    /// the two halves. The reader sees `init` until the first publish.
    #[allow(clippy::new_ret_no_self)] // the halves are the useful handles
    pub fn new(init: T) -> (Writer<T>, Reader<T>)
    where
        T: Clone,
    {
        let shared = Arc::new(TripleBuffer {
            ready: Mutex::new((Box::new(init.clone()), false)),
            fresh: AtomicBool::new(false),
        });
        (
            Writer {
                shared: Arc::clone(&shared),
                buffer: Box::new(init.clone()),
            },
            Reader {
                shared,
                buffer: Box::new(init),
            },
        )
    }

    fn lock(&self) -> MutexGuard<'_, (Box<T>, bool)> {
        // Nothing panics while the lock is held (two swaps), but stay safe.
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T> fmt::Debug for TripleBuffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TripleBuffer")
            .field("fresh", &self.fresh.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The producer half of a [`TripleBuffer`].
pub struct Writer<T> {
    shared: Arc<TripleBuffer<T>>,
    /// The write buffer, owned by this half.
    buffer: Box<T>,
}

impl<T> Writer<T> {
    /// The write buffer, to fill in the next value.
    ///
    /// Right after a [`publish`](Self::publish) the write buffer holds an
    /// *older* value (whichever buffer came back from the ready role), not
    /// the one just published: overwrite it completely, or keep your own copy
    /// of what you need.
    pub fn write(&mut self) -> &mut T {
        &mut self.buffer
    }

    /// Makes the write buffer the new ready value and takes the old ready
    /// buffer as the next write buffer. Never waits for the reader (beyond
    /// the swap itself).
    pub fn publish(&mut self) {
        let mut ready = self.shared.lock();
        std::mem::swap(&mut self.buffer, &mut ready.0);
        ready.1 = true;
        self.shared.fresh.store(true, Ordering::Relaxed);
    }

    /// Overwrites the write buffer with `value` and publishes it.
    pub fn publish_value(&mut self, value: T) {
        *self.write() = value;
        self.publish();
    }
}

impl<T> fmt::Debug for Writer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

/// The consumer half of a [`TripleBuffer`].
pub struct Reader<T> {
    shared: Arc<TripleBuffer<T>>,
    /// The read buffer, owned by this half.
    buffer: Box<T>,
}

impl<T> Reader<T> {
    /// Whether a value was published that [`update`](Self::update) would pick
    /// up. A hint only: the writer may publish right after this returns.
    pub fn has_update(&self) -> bool {
        self.shared.fresh.load(Ordering::Relaxed)
    }

    /// Picks up the newest published value if there is one the reader has not
    /// seen yet; returns whether it did. Never waits for the writer (beyond
    /// the swap itself).
    pub fn update(&mut self) -> bool {
        let mut ready = self.shared.lock();
        if !ready.1 {
            return false;
        }
        std::mem::swap(&mut self.buffer, &mut ready.0);
        ready.1 = false;
        self.shared.fresh.store(false, Ordering::Relaxed);
        true
    }

    /// The value the reader currently holds: the one picked up by the last
    /// [`update`](Self::update) (or the initial value).
    pub fn read(&self) -> &T {
        &self.buffer
    }

    /// [`update`](Self::update), then [`read`](Self::read): the newest
    /// complete value.
    pub fn latest(&mut self) -> &T {
        self.update();
        self.read()
    }
}

impl<T> fmt::Debug for Reader<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn halves_are_send() {
        assert_send::<Writer<Vec<u8>>>();
        assert_send::<Reader<Vec<u8>>>();
    }

    /// Issue #15: a read guard that was forgotten (`mem::forget`) kept a
    /// buffer's mutex locked, and the writer hung on its next `write`
    /// once that buffer came round. The halves now own their buffers and
    /// hand out plain references, which hold no lock (this fails to
    /// compile if a guard type comes back).
    #[test]
    fn read_and_write_hand_out_plain_references() {
        let (mut w, mut r) = TripleBuffer::new(0u64);
        for k in 1..=10u64 {
            let write: &mut u64 = w.write();
            *write = k;
            w.publish();
            assert!(r.update());
            let read: &u64 = r.read();
            assert_eq!(*read, k);
        }
    }

    #[test]
    fn initial_value_then_latest_publish() {
        let (mut w, mut r) = TripleBuffer::new(String::from("init"));
        assert!(!r.has_update());
        assert!(!r.update());
        assert_eq!(*r.read(), "init");
        w.write().push_str("-ignored until published");
        assert_eq!(*r.latest(), "init");
        w.publish();
        assert!(r.has_update());
        assert_eq!(*r.read(), "init");
        assert!(r.update());
        assert_eq!(*r.read(), "init-ignored until published");
        w.publish_value("a".into());
        w.publish_value("b".into());
        assert_eq!(*r.latest(), "b");
        assert!(!r.update());
        assert_eq!(*r.read(), "b");
    }
}
