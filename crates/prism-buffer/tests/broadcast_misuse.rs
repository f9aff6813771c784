//! The broadcast ring under misuse that safe code allows: guards forgotten
//! ([`std::mem::forget`]) rather than dropped, and rings whose writer is
//! never made. The ring's promises hold whatever is dropped, forgotten or
//! returns early: a reader holds at most one chunk, the real-time writer
//! never waits, the ring's own buffers stay within `buffers`, and a reader
//! never waits for a writer that can no longer come.

// A write guard has no `Drop` (its buffer stays with the writer), so
// clippy sees forgetting or dropping one as a no-op; the tests forget and
// drop them anyway, to go on testing that should it get one.
#![allow(clippy::forget_non_drop, clippy::drop_non_drop)]

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use prism_buffer::broadcast::{Broadcast, Config, Mode, ReaderKind, TryRead};

fn config(buffers: usize, mode: Mode) -> Config {
    Config {
        buffers,
        chunk_capacity: 4,
        mode,
    }
}

/// Runs `f` on a thread; fails (instead of hanging) if it takes longer
/// than a few seconds.
fn within_seconds<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what}: still waiting after 10 s"))
}

/// Real-time mode "never waits"; a ring of 3 buffers and one reader. A
/// reader that forgets its read guards (safe code) used to pin one buffer
/// per forget and hold more than one chunk; then the real-time writer found
/// no buffer: try_reserve was None and reserve() blocked for ever.
#[test]
fn real_time_writer_waits_after_forgotten_guards() {
    let ring = Broadcast::<u32>::new(config(3, Mode::RealTime)).unwrap();
    let mut w = ring.writer().unwrap();
    let mut r = ring.reader(ReaderKind::Lossy).unwrap();
    for i in 0..3 {
        w.write(&[i]).unwrap();
        let g = r.try_read().ready().unwrap();
        std::mem::forget(g);
    }
    assert!(
        w.try_reserve().is_some(),
        "a real-time writer found no buffer: {:?}",
        ring.stats()
    );
}

/// Forgotten write guards used to lose their buffers for good while
/// `allocated` still counted them, so the writer eventually waited for ever
/// even with no reader.
#[test]
fn forgotten_write_guards_starve_the_writer() {
    let ring = Broadcast::<u32>::new(config(3, Mode::RealTime)).unwrap();
    let mut w = ring.writer().unwrap();
    for _ in 0..3 {
        let g = w.try_reserve().unwrap();
        std::mem::forget(g);
    }
    assert!(w.try_reserve().is_some(), "{:?}", ring.stats());
}

/// A forgotten write guard costs nothing: its buffer is the next one
/// reserved, and no buffer is allocated for it.
#[test]
fn a_forgotten_write_guard_loses_no_buffer() {
    let ring = Broadcast::<u32>::new(config(3, Mode::Block)).unwrap();
    let mut w = ring.writer().unwrap();
    for _ in 0..100 {
        let mut g = w.reserve();
        g[0] = 7;
        std::mem::forget(g);
    }
    assert_eq!(ring.stats().buffers_allocated, 1);
    assert_eq!(ring.stats().committed_chunks, 0);
    let mut r = ring.reader(ReaderKind::Guaranteed).unwrap();
    w.write(&[1, 2]).unwrap();
    assert_eq!(&*r.try_read().ready().unwrap(), &[1, 2]);
}

/// A reader forgetting every guard, in both modes, sees every chunk
/// bit-exact; the blocking calls return; the ring's own buffers stay within
/// the configured count (the forgotten guards' buffers are replaced).
#[test]
fn forgetful_readers_see_exact_chunks_and_the_ring_stays_bounded() {
    for mode in [Mode::Block, Mode::RealTime] {
        within_seconds("a forgetful reader", move || {
            let ring = Broadcast::<u32>::new(config(4, mode)).unwrap();
            let mut w = ring.writer().unwrap();
            let mut forgetful = ring.reader(ReaderKind::Guaranteed).unwrap();
            let mut lossy = ring.reader(ReaderKind::Lossy).unwrap();
            for i in 0..200u32 {
                // Blocking: in Block mode the forgetful guaranteed reader
                // read everything, and its one hold leaves buffers.
                w.write(&[i, i + 1, i + 2]).unwrap();
                let g = forgetful.read().unwrap();
                assert_eq!(&*g, &[i, i + 1, i + 2], "{mode:?} chunk {i}");
                std::mem::forget(g);
                if i % 3 == 0 {
                    if let TryRead::Ready(g) = lossy.try_read() {
                        let n = g.meta().number as u32;
                        assert_eq!(&*g, &[n, n + 1, n + 2]);
                        std::mem::forget(g);
                    }
                }
                let s = ring.stats();
                assert!(s.buffers_allocated <= 4, "{s:?}");
                assert_eq!(
                    s.dropped_chunks, 0,
                    "{mode:?}: the guaranteed reader kept up"
                );
            }
            drop(w);
            assert!(forgetful.read().is_none());
        });
    }
}

/// A guard forgotten with its reader (an owned guard) is a reader that
/// never reads again: it keeps its place and its one chunk; the real-time
/// writer still never waits, even with every reader gone that way.
#[test]
fn forgotten_owned_guards_hold_one_chunk_each() {
    let ring = Broadcast::<u32>::new(config(4, Mode::RealTime)).unwrap();
    let mut w = ring.writer().unwrap();
    for i in 0..2u32 {
        let r = ring.reader(ReaderKind::Guaranteed).unwrap();
        w.write(&[i]).unwrap();
        let g = r.try_read_owned().unwrap();
        assert_eq!(&*g, &[i]);
        std::mem::forget(g);
    }
    assert!(ring.reader(ReaderKind::Lossy).is_err(), "both places kept");
    let ring2 = ring.clone();
    within_seconds("the real-time writer", move || {
        for i in 0..50 {
            drop(w.reserve());
            w.write(&[i]).unwrap();
            assert!(ring2.stats().buffers_allocated <= 4);
        }
    });
}

/// A reader on a ring whose writer is never made: the ring closes when the
/// last handle that could make it goes (clones included), and a reader
/// waiting then wakes up to the end of the stream.
#[test]
fn a_ring_whose_writer_can_no_longer_come_is_closed() {
    let ring = Broadcast::<u32>::new(config(3, Mode::Block)).unwrap();
    let mut r = ring.reader(ReaderKind::Guaranteed).unwrap();
    let clone = ring.clone();
    drop(ring);
    assert!(
        matches!(r.try_read(), TryRead::Empty),
        "a clone can still make it"
    );
    assert!(!r.is_finished());
    let waiting = thread::spawn(move || {
        let end = r.read().is_none();
        (end, r)
    });
    thread::sleep(Duration::from_millis(50));
    drop(clone);
    let (end, r) = within_seconds("the waiting reader", move || waiting.join().unwrap());
    assert!(end, "the reader saw the end");
    assert!(r.is_finished());
    assert!(r.stats().closed);
}

/// Once the writer is made the handles no longer matter: the ring stays
/// open until the writer goes.
#[test]
fn handles_dropped_after_the_writer_was_made_do_not_close() {
    let ring = Broadcast::<u32>::new(config(3, Mode::Block)).unwrap();
    let mut r = ring.reader(ReaderKind::Guaranteed).unwrap();
    let mut w = ring.writer().unwrap();
    drop(ring);
    assert!(!w.stats().closed);
    w.write(&[5]).unwrap();
    assert_eq!(&*r.read().unwrap(), &[5]);
    assert!(matches!(r.try_read(), TryRead::Empty));
    drop(w);
    assert!(r.read().is_none());
}
