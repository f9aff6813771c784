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
//! The ready index and the fresh flag live together in one [`AtomicU8`]; the
//! write and read indices are private to their half. The three indices are
//! always a permutation of `{0, 1, 2}`: each side only ever exchanges *its own*
//! index for the ready one with a single atomic `swap`, so no buffer ever has
//! two owners. The buffers themselves sit in [`Mutex`]es so that no `unsafe`
//! is needed; a mutex is only locked by the half that currently owns its
//! index, so the locks are uncontended (the only exception: several threads
//! sharing one `&Reader` may briefly contend on the read buffer).
//!
//! Memory ordering (all buffer accesses happen while the owner holds the
//! buffer's lock, before it gives the index away or after it received it):
//!
//! * `publish` swaps with **`AcqRel`**. *Release*: everything the writer wrote
//!   into the buffer happens-before any reader that acquires that index (the
//!   reader's later swaps are read-modify-writes, so they extend the release
//!   sequence and a value published earlier stays visible even after several
//!   hand-overs). *Acquire*: the buffer the writer gets back may have been the
//!   reader's; the reader's release swap makes all of its reads (and its
//!   unlock) happen-before the writer's next writes (and its lock).
//! * `update` first checks the fresh flag with a `Relaxed` load. That load is
//!   only a hint: if it reads "not fresh" nothing is touched (a stale answer
//!   just means the new value is picked up by the next `update`; after e.g. a
//!   thread join the load is ordered after the publish and cannot be stale).
//!   If it reads "fresh", the flag is still set at the swap because only the
//!   reader clears it. The swap itself is **`AcqRel`** for the mirror-image
//!   reasons of `publish`: *Acquire* to see the writer's data, *Release* so
//!   the reader's use of its old buffer happens-before the writer reuses it.
//! * `Reader::has_update` is a `Relaxed` peek that hands out no buffer.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Bits of the state word that hold the ready index.
const INDEX_MASK: u8 = 0b011;
/// Set when the ready buffer holds a value the reader has not taken yet.
const FRESH: u8 = 0b100;

/// The buffers shared by a [`Writer`] and a [`Reader`]; create both with
/// [`TripleBuffer::new`].
pub struct TripleBuffer<T> {
    buffers: [Mutex<T>; 3],
    /// Ready index (`INDEX_MASK`) and fresh flag (`FRESH`).
    state: AtomicU8,
}

impl<T> TripleBuffer<T> {
    /// Creates the three buffers, each holding a clone of `init`, and returns
    /// the two halves. The reader sees `init` until the first publish.
    #[allow(clippy::new_ret_no_self)] // the halves are the useful handles
    pub fn new(init: T) -> (Writer<T>, Reader<T>)
    where
        T: Clone,
    {
        // write = 0, ready = 1 (not fresh), read = 2.
        let shared = Arc::new(TripleBuffer {
            buffers: [
                Mutex::new(init.clone()),
                Mutex::new(init.clone()),
                Mutex::new(init),
            ],
            state: AtomicU8::new(1),
        });
        (
            Writer {
                shared: Arc::clone(&shared),
                index: 0,
            },
            Reader { shared, index: 2 },
        )
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, T> {
        // A poisoned lock means user code panicked while holding a guard; the
        // buffer is still a valid `T`, so keep going like `RefCell` would.
        self.buffers[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T> fmt::Debug for TripleBuffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.load(Ordering::Relaxed);
        f.debug_struct("TripleBuffer")
            .field("ready", &(state & INDEX_MASK))
            .field("fresh", &(state & FRESH != 0))
            .finish_non_exhaustive()
    }
}

/// The producer half of a [`TripleBuffer`].
pub struct Writer<T> {
    shared: Arc<TripleBuffer<T>>,
    /// Index of the write buffer; owned by this half.
    index: usize,
}

impl<T> Writer<T> {
    /// Access to the write buffer, to fill in the next value.
    ///
    /// Right after a [`publish`](Self::publish) the write buffer holds an
    /// *older* value (whichever buffer came back from the ready role), not
    /// the one just published: overwrite it completely, or keep your own copy
    /// of what you need.
    pub fn write(&mut self) -> WriteGuard<'_, T> {
        WriteGuard(self.shared.lock(self.index))
    }

    /// Makes the write buffer the new ready value and takes the old ready
    /// buffer as the next write buffer. Never waits for the reader.
    pub fn publish(&mut self) {
        let index = u8::try_from(self.index).expect("buffer indices are 0..3");
        // AcqRel: see the module docs.
        let previous = self.shared.state.swap(index | FRESH, Ordering::AcqRel);
        self.index = usize::from(previous & INDEX_MASK);
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
            .field("write", &self.index)
            .field("shared", &self.shared)
            .finish()
    }
}

/// The consumer half of a [`TripleBuffer`].
pub struct Reader<T> {
    shared: Arc<TripleBuffer<T>>,
    /// Index of the read buffer; owned by this half.
    index: usize,
}

impl<T> Reader<T> {
    /// Whether a value was published that [`update`](Self::update) would pick
    /// up. A hint only: the writer may publish right after this returns.
    pub fn has_update(&self) -> bool {
        self.shared.state.load(Ordering::Relaxed) & FRESH != 0
    }

    /// Picks up the newest published value if there is one the reader has not
    /// seen yet; returns whether it did. Never waits for the writer.
    pub fn update(&mut self) -> bool {
        if !self.has_update() {
            return false;
        }
        let index = u8::try_from(self.index).expect("buffer indices are 0..3");
        // Only the reader clears FRESH, so the flag is still set here.
        // AcqRel: see the module docs.
        let previous = self.shared.state.swap(index, Ordering::AcqRel);
        debug_assert!(previous & FRESH != 0);
        self.index = usize::from(previous & INDEX_MASK);
        true
    }

    /// The value the reader currently holds: the one picked up by the last
    /// [`update`](Self::update) (or the initial value).
    pub fn read(&self) -> ReadGuard<'_, T> {
        ReadGuard(self.shared.lock(self.index))
    }

    /// [`update`](Self::update), then [`read`](Self::read): the newest
    /// complete value.
    pub fn latest(&mut self) -> ReadGuard<'_, T> {
        self.update();
        self.read()
    }
}

impl<T> fmt::Debug for Reader<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("read", &self.index)
            .field("shared", &self.shared)
            .finish()
    }
}

/// Mutable access to the [`Writer`]'s buffer; see [`Writer::write`].
pub struct WriteGuard<'a, T>(MutexGuard<'a, T>);

impl<T> Deref for WriteGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for WriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: fmt::Debug> fmt::Debug for WriteGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// Shared access to the [`Reader`]'s buffer; see [`Reader::read`].
pub struct ReadGuard<'a, T>(MutexGuard<'a, T>);

impl<T> Deref for ReadGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: fmt::Debug> fmt::Debug for ReadGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
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
