//! Tests of the host triple buffer: a single-threaded proptest against a
//! model, and a two-thread stress test that detects torn or stale reads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use prism_buffer::cpu::TripleBuffer;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Overwrite the write buffer.
    Set(Vec<u32>),
    /// Modify the write buffer in place (so its previous content matters).
    Push(u32),
    Publish,
    Update,
    Read,
    Latest,
    HasUpdate,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => prop::collection::vec(any::<u32>(), 0..4).prop_map(Op::Set),
        2 => any::<u32>().prop_map(Op::Push),
        3 => Just(Op::Publish),
        3 => Just(Op::Update),
        2 => Just(Op::Read),
        1 => Just(Op::Latest),
        1 => Just(Op::HasUpdate),
    ]
}

/// The textbook triple buffer, on values instead of indices.
#[derive(Debug)]
struct Model {
    write: Vec<u32>,
    ready: Vec<u32>,
    read: Vec<u32>,
    fresh: bool,
}

impl Model {
    fn publish(&mut self) {
        std::mem::swap(&mut self.write, &mut self.ready);
        self.fresh = true;
    }

    fn update(&mut self) -> bool {
        let fresh = std::mem::replace(&mut self.fresh, false);
        if fresh {
            std::mem::swap(&mut self.read, &mut self.ready);
        }
        fresh
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// On one thread, the buffer behaves exactly like the model, and in
    /// particular: after an update the reader sees the latest published value;
    /// it only ever sees published values (or the initial one); it never sees
    /// what the writer wrote but did not publish.
    #[test]
    fn matches_model(
        init in prop::collection::vec(any::<u32>(), 0..4),
        ops in prop::collection::vec(op(), 0..100),
    ) {
        let (mut writer, mut reader) = TripleBuffer::new(init.clone());
        let mut model = Model {
            write: init.clone(),
            ready: init.clone(),
            read: init.clone(),
            fresh: false,
        };
        let mut published = vec![init.clone()];
        // The value of the most recent publish.
        let mut last_published = init.clone();

        for op in ops {
            match op {
                Op::Set(value) => {
                    *writer.write() = value.clone();
                    model.write = value;
                }
                Op::Push(x) => {
                    writer.write().push(x);
                    model.write.push(x);
                }
                Op::Publish => {
                    prop_assert_eq!(&*writer.write(), &model.write);
                    last_published = model.write.clone();
                    published.push(last_published.clone());
                    writer.publish();
                    model.publish();
                }
                Op::Update => {
                    let got = reader.update();
                    prop_assert_eq!(got, model.update());
                    if got {
                        prop_assert_eq!(reader.read(), &last_published);
                    }
                }
                Op::Latest => {
                    model.update();
                    prop_assert_eq!(reader.latest(), &last_published);
                }
                Op::Read => prop_assert_eq!(reader.read(), &model.read),
                Op::HasUpdate => prop_assert_eq!(reader.has_update(), model.fresh),
            }
            // After every operation: both sides see what the model says.
            prop_assert_eq!(reader.read(), &model.read);
            prop_assert_eq!(&*writer.write(), &model.write);
            prop_assert_eq!(reader.has_update(), model.fresh);
            // The reader's value was published (or is the initial value).
            prop_assert!(published.contains(&model.read));
        }
        // A final update always lands on the last published value.
        reader.update();
        prop_assert_eq!(reader.read(), &last_published);
    }
}

/// The writer publishes 0..N, each a vector whose every element is the
/// sequence number; the reader reads concurrently. Every observed value must
/// be internally consistent (not torn), sequence numbers never go backwards,
/// and after the writer is done the reader sees N - 1.
#[test]
fn concurrent_reads_are_consistent_and_monotonic() {
    const N: u64 = 200_000;
    const LEN: usize = 64;

    let (mut writer, mut reader) = TripleBuffer::new(vec![u64::MAX; LEN]);
    let done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();

    let writer_done = Arc::clone(&done);
    let writer_thread = thread::spawn(move || {
        for seq in 0..N {
            {
                let buf = writer.write();
                // Element by element, so an unsynchronised reader could see
                // a mix of old and new elements.
                buf.resize(LEN, seq);
                for x in buf.iter_mut() {
                    *x = seq;
                }
            }
            writer.publish();
            if seq % 1024 == 0 {
                thread::yield_now();
            }
        }
        writer_done.store(true, Ordering::Release);
    });

    let reader_thread = thread::spawn(move || {
        let mut last: Option<u64> = None;
        let mut distinct = 0u64;
        let mut check = |reader: &mut prism_buffer::cpu::Reader<Vec<u64>>| {
            let updated = reader.update();
            let value = reader.read();
            assert_eq!(value.len(), LEN);
            let seq = value[0];
            assert!(
                value.iter().all(|&x| x == seq),
                "torn read: {:?}",
                &value[..]
            );
            if seq == u64::MAX {
                // Still the initial value: nothing published yet.
                assert!(last.is_none(), "went back to the initial value");
                assert!(
                    !updated,
                    "update returned true but the initial value is shown"
                );
                return;
            }
            assert!(seq < N);
            if let Some(prev) = last {
                assert!(seq >= prev, "went backwards: {prev} -> {seq}");
                // An update means a newer value than the one held before.
                if updated {
                    assert!(seq > prev, "update returned true but {prev} -> {seq}");
                } else {
                    assert_eq!(seq, prev, "value changed without an update");
                }
            }
            if last != Some(seq) {
                distinct += 1;
            }
            last = Some(seq);
        };
        while !done.load(Ordering::Acquire) {
            check(&mut reader);
        }
        // The writer is finished (and its publishes happen-before the
        // Acquire load above): the next update must land on the last value.
        check(&mut reader);
        (last, distinct)
    });

    writer_thread.join().unwrap();
    let (last, distinct) = reader_thread.join().unwrap();
    assert_eq!(last, Some(N - 1));
    assert!(distinct >= 1);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "stress test too slow"
    );
    eprintln!(
        "stress: reader saw {distinct} distinct values of {N} in {:?}",
        start.elapsed()
    );
}

/// The halves can be moved to other threads and dropped in any order.
#[test]
fn halves_work_across_threads_and_drop_in_any_order() {
    let (mut writer, reader) = TripleBuffer::new(String::new());
    let reader = thread::spawn(move || {
        let mut reader = reader;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !reader.update() {
            assert!(Instant::now() < deadline, "publish never arrived");
            thread::yield_now();
        }
        let value = reader.read().clone();
        value
    });
    writer.publish_value("hello".to_owned());
    drop(writer);
    assert_eq!(reader.join().unwrap(), "hello");
}
