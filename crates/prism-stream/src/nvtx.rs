//! NVTX ranges: what prism's host threads are doing, on the timeline of
//! Nsight Systems (or any tool that loads through NVTX).
//!
//! prism marks every run (`run`, `run_pinned`, ..., `multi.run`, ...), every
//! step of every chunk (`upload`, each stage by its name, `download`, the
//! staging copies, the waits for the GPU) and every coordinator op
//! (`queue_upload`, `queue_compute: <op name>`, `queue_download`, `wait`,
//! ...) with a [`Range`] in the NVTX domain `prism`. The names are the
//! stats' and the Chrome trace's. A range spans the host's *issue* of the
//! work; Nsight shows the CUDA calls made inside it and, through them, the
//! GPU work they queued.
//!
//! **Free when no tool listens.** NVTX3 (NVIDIA's header-only NVTX, vendored
//! in `third_party/nvtx` and wrapped by the C shim `nvtx/prism_nvtx.c`) loads a
//! tool at its first call: the library named by `NVTX_INJECTION64_PATH`
//! (set by `nsys profile`), or nothing. prism asks once, on its first range;
//! without a tool every later [`Range::new`] is one load and one branch (no
//! name is built, no C function called), and its drop another. So the
//! ranges are always compiled in; there is no cargo feature.
//!
//! **Balanced by construction.** A [`Range`] pushes on creation and pops
//! when dropped, so early returns, `?` and panics (unwinding) keep pushes
//! and pops paired. NVTX ranges belong to the thread that pushed them:
//! `Range` is neither `Send` nor `Sync`, so it is popped where it was
//! pushed. Nesting is right when ranges are scoped, as prism's are; a
//! caller that drops its own ranges out of order, or forgets one, gets
//! mislabelled or unclosed ranges in the profile, nothing worse.
//!
//! ```
//! let _run = prism_stream::nvtx::Range::new("my phase");
//! for k in 0..3 {
//!     // Formatted only when a tool listens.
//!     let _step = prism_stream::nvtx::Range::fmt(format_args!("my step {k}"));
//! }
//! ```

use std::ffi::c_char;
use std::fmt::{self, Write as _};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

mod ffi {
    use std::ffi::{c_char, c_int};

    extern "C" {
        /// Loads the NVTX tool, if any; 1 when one listens to ranges.
        pub(super) fn prism_nvtx_init() -> c_int;
        /// Pushes a range named by a NUL-terminated string (the tool copies it).
        pub(super) fn prism_nvtx_push(name: *const c_char);
        /// Pops the calling thread's innermost prism range.
        pub(super) fn prism_nvtx_pop();
    }
}

/// Whether a tool listens to NVTX ranges in this process (decided at the
/// first call, when NVTX looks for the tool; it never changes afterwards).
#[inline]
pub fn listening() -> bool {
    // Acquire: a thread that sees ON also sees what the shim's
    // initialisation wrote (its domain handle). A plain load on x86_64.
    match STATE.load(Ordering::Acquire) {
        OFF => false,
        ON => true,
        _ => init(),
    }
}

/// [`listening`]'s answer once known: the fast path is one load.
static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
const UNKNOWN: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

#[cold]
fn init() -> bool {
    static ONCE: OnceLock<bool> = OnceLock::new();
    let on = *ONCE.get_or_init(|| {
        // SAFETY: `prism_nvtx_init` takes no arguments; NVTX's
        // initialisation is thread-safe, and the OnceLock calls it once.
        unsafe { ffi::prism_nvtx_init() != 0 }
    });
    STATE.store(if on { ON } else { OFF }, Ordering::Release);
    on
}

/// Longest name passed to the tool, in bytes (longer ones are cut at a
/// character boundary).
pub const MAX_NAME: usize = 127;

/// An NVTX range in the `prism` domain on the calling thread: pushed when
/// made, popped when dropped (see the [module docs](self)). Without a tool
/// it does nothing.
#[derive(Debug)]
#[must_use = "a range ends when it is dropped: bind it (`let _r = ...`)"]
pub struct Range {
    pushed: bool,
    /// Ranges are per thread: not `Send`, not `Sync`.
    _thread: PhantomData<*const ()>,
}

impl Range {
    /// Pushes a range named `name` (cut to [`MAX_NAME`] bytes; a NUL ends it).
    #[inline]
    pub fn new(name: &str) -> Self {
        if !listening() {
            return Self::idle();
        }
        Self::push(format_args!("{name}"))
    }

    /// Pushes a range whose name is formatted from `args`, only when a tool
    /// listens: `Range::fmt(format_args!("queue_compute: {name}"))`.
    #[inline]
    pub fn fmt(args: fmt::Arguments<'_>) -> Self {
        if !listening() {
            return Self::idle();
        }
        Self::push(args)
    }

    /// A range that was not pushed (no tool).
    #[inline]
    fn idle() -> Self {
        Self {
            pushed: false,
            _thread: PhantomData,
        }
    }

    #[cold]
    fn push(args: fmt::Arguments<'_>) -> Self {
        let mut name = Name::default();
        // `Name` never fails: it cuts instead.
        let _ = name.write_fmt(args);
        name.buf[name.len] = 0;
        // SAFETY: `buf` is NUL-terminated (`len <= MAX_NAME < buf.len()`)
        // and outlives the call; the tool copies the name. A tool listens
        // (`listening()` returned true, so the shim was initialised).
        unsafe { ffi::prism_nvtx_push(name.buf.as_ptr().cast::<c_char>()) };
        Self {
            pushed: true,
            _thread: PhantomData,
        }
    }

    /// Whether this range was pushed (a tool listens).
    pub fn is_pushed(&self) -> bool {
        self.pushed
    }
}

impl Drop for Range {
    #[inline]
    fn drop(&mut self) {
        if self.pushed {
            // SAFETY: the shim's pop has no precondition: NVTX and its tools
            // accept a pop with nothing pushed. This thread pushed a range
            // (`Range` cannot change threads); in scoped use, as prism's
            // own, the innermost range is this one. Safe code can still
            // drop ranges out of order or `mem::forget` one: that only
            // mislabels or leaves open a range in the profile.
            unsafe { ffi::prism_nvtx_pop() };
        }
    }
}

/// A range's name, built on the stack: at most [`MAX_NAME`] bytes, cut at
/// a character boundary, ending at the first NUL.
struct Name {
    buf: [u8; MAX_NAME + 1],
    len: usize,
    /// A NUL or the length limit was reached: the rest is dropped.
    full: bool,
}

impl Default for Name {
    fn default() -> Self {
        Self {
            buf: [0; MAX_NAME + 1],
            len: 0,
            full: false,
        }
    }
}

impl fmt::Write for Name {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if self.full {
                break;
            }
            let n = c.len_utf8();
            if c == '\0' || self.len + n > MAX_NAME {
                self.full = true;
                break;
            }
            c.encode_utf8(&mut self.buf[self.len..self.len + n]);
            self.len += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(args: fmt::Arguments<'_>) -> String {
        let mut n = Name::default();
        let _ = n.write_fmt(args);
        String::from_utf8(n.buf[..n.len].to_vec()).expect("valid UTF-8")
    }

    #[test]
    fn names_are_cut_at_a_character_boundary_and_at_nul() {
        assert_eq!(name(format_args!("upload")), "upload");
        assert_eq!(
            name(format_args!("queue_compute: {}", "a b")),
            "queue_compute: a b"
        );
        assert_eq!(name(format_args!("ab\0cd")), "ab");
        let long = "x".repeat(500);
        assert_eq!(name(format_args!("{long}")).len(), MAX_NAME);
        // 126 ASCII bytes and then a 2-byte character: it does not fit.
        let edge = format!("{}é", "y".repeat(MAX_NAME - 1));
        assert_eq!(name(format_args!("{edge}")), "y".repeat(MAX_NAME - 1));
        let wide = "é".repeat(100);
        let cut = name(format_args!("{wide}"));
        assert_eq!(cut.len(), MAX_NAME - 1);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    /// Without a tool (the usual case in tests and CI) ranges are harmless:
    /// nested, formatted, odd names, dropped in any way, on several threads.
    #[test]
    fn ranges_without_a_tool_do_nothing() {
        if std::env::var_os("NVTX_INJECTION64_PATH").is_some() {
            eprintln!("SKIPPED ranges_without_a_tool_do_nothing: an NVTX tool is attached");
            return;
        }
        assert!(!listening());
        let outer = Range::new("run");
        assert!(!outer.is_pushed());
        for k in 0..1000 {
            let _step = Range::fmt(format_args!("step {k}"));
            let _odd = Range::new("a\0b");
            let _long = Range::new(&"z".repeat(10_000));
        }
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let _r = Range::fmt(format_args!("thread {t}"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let caught = std::panic::catch_unwind(|| {
            let _r = Range::new("panics");
            panic!("on purpose");
        });
        assert!(caught.is_err());
        drop(outer);
        assert!(!listening());
    }

    /// What a range costs without a tool (prints ns per push/pop pair; no
    /// assertion, not run by default):
    /// `cargo test --release -p prism-stream --lib nvtx::tests::cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn cost_without_a_tool() {
        const N: u32 = 10_000_000;
        let _warm = Range::new("warm-up");
        let t = std::time::Instant::now();
        for _ in 0..N {
            let r = std::hint::black_box("upload");
            std::hint::black_box(&r);
        }
        let empty = t.elapsed().as_secs_f64() * 1e9 / f64::from(N);
        let t = std::time::Instant::now();
        for _ in 0..N {
            let r = Range::new(std::hint::black_box("upload"));
            std::hint::black_box(&r);
        }
        let plain = t.elapsed().as_secs_f64() * 1e9 / f64::from(N);
        let t = std::time::Instant::now();
        for k in 0..N {
            let r = Range::fmt(format_args!("queue_compute: {}", std::hint::black_box(k)));
            std::hint::black_box(&r);
        }
        let formatted = t.elapsed().as_secs_f64() * 1e9 / f64::from(N);
        println!(
            "NVTX ranges, tool listening: {}; {plain:.2} ns per Range::new + drop, \
             {formatted:.2} ns per Range::fmt + drop ({empty:.2} ns per iteration of the \
             same loop without a range)",
            listening()
        );
    }
}
