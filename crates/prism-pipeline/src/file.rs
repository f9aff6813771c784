//! Files in and out of a stream: a [`FileSource`] reads a file of raw
//! elements (native byte order) chunk by chunk into the upload slot, a
//! [`FileSink`] writes the outputs to a file in order, and [`read_bound`]
//! measures what the disk gives the same reads with no processing, so a
//! run's throughput can be held against it in the same process.
//!
//! # Direct I/O
//!
//! On Linux both open the file a second time with `O_DIRECT` (the page
//! cache bypassed: the drive's speed, no cache filled with data read once)
//! and use it for every read or write that meets the alignment the file
//! system asks for, found with `statx(STATX_DIOALIGN)` (`stx_dio_mem_align`
//! for the memory address, `stx_dio_offset_align` for the file offset and
//! the length; 4096 for both where the kernel does not say). The rest goes
//! through the ordinary (buffered) handle:
//!
//! | case | path | host copy |
//! | --- | --- | --- |
//! | aligned slot, aligned offset, at least one block left | direct, into the slot | none |
//! | unaligned slot (the host backend's `Vec`s), or less than a block of slot left | direct, into a bounce buffer owned by the source or sink, then copied | one, counted in [`FileStats::bounce_bytes`] |
//! | the file's last partial block (a length not a multiple of the alignment) | buffered | the kernel's page-cache copy |
//! | a file system that refuses `O_DIRECT` (`EINVAL` at open or at the first direct read or write; `stx_dio_offset_align` = 0) | buffered, for everything | the kernel's page-cache copy |
//!
//! The GPU backend's pinned slots are page-aligned, so with a chunk that is a
//! multiple of the alignment (the default 16 MiB is) a file streams
//! straight into the slot; the host backend's slots are `Vec`s and go
//! through the bounce buffer. [`FileSource::mode`] and [`FileSink::mode`]
//! say which mode a file got, [`FileSource::fallback`] why it is buffered,
//! and [`FileStats`] how many bytes took each path. Off Linux everything is
//! buffered.
//!
//! # Disk time
//!
//! [`FileStats::io_ms`] is the time spent in the read (or write) calls: the
//! disk time of the run (with direct I/O; buffered reads of a cached file
//! measure the cache). It is kept by the source and sink rather than in
//! [`PipelineStats`](crate::PipelineStats), since a [`Source`] has no way to
//! report to the run: pass `&mut source` to
//! [`run_stream`](crate::PipelineStageManager::run_stream) and read
//! [`FileSource::stats`] after it. Without read-ahead `fill` reads on the
//! run's driving thread, so the disk time of a chunk is not overlapped with
//! the ring's hand-over of that chunk (other chunks' stages do run
//! meanwhile).
//!
//! # Read-ahead
//!
//! With [`FileOptions::read_ahead`] = `n` > 0 a [`FileSource`] starts a
//! thread (`prism-readahead`) at its first `fill`. It owns the reading
//! state and `n` buffers of the first slot's length, rounded up to the
//! direct block and aligned for direct I/O, and reads the file into them in
//! order, ahead of the stream: the same direct, buffered and fallback paths
//! as above (the buffers are aligned, so nothing goes through the bounce
//! buffer; only the tail is buffered). `fill` copies from the oldest ready
//! buffer into the slot (one copy of every byte, counted in
//! [`FileStats::copy_bytes`]; a slot of another length than the first is
//! served from the same byte stream, a copy spanning two buffers where it
//! must, so lengths may change between calls) and hands the drained
//! buffer back. Memory is bounded: `n` buffers, whatever the file's size.
//!
//! | | without | with read-ahead |
//! | --- | --- | --- |
//! | where the reads happen | in `fill` | on the thread, up to `n` buffers ahead |
//! | host copies | the bounce buffer's, for an unaligned slot | one per byte, buffer → slot |
//! | [`FileStats::io_ms`] | time in the read calls, inside `fill` | the thread's time in the read calls |
//! | [`FileStats::wait_ms`] | 0 | time `fill` waited for the thread: the disk time not hidden |
//! | a read error | returned by that `fill` | returned by the `fill` that reaches that chunk, after every earlier byte; later calls fail too |
//! | drop | closes the files | stops the thread (at its next hand-over, after the read under way) and joins it |
//!
//! With read-ahead, [`FileSource::stats`] has `bytes` as delivered by
//! `fill` and the thread's I/O counts as of the last buffer `fill` took (a
//! buffer ahead of `bytes` until the end, where they agree); `mode` and
//! `fallback` too are as of that buffer. Sinks ignore the option (writes
//! are not delayed). Off by default: it is one more copy, which a
//! page-aligned slot (the GPU's) reading straight from the disk avoids,
//! bought back only where the disk time would otherwise add to the run's.
//!
//! [`read_bound`] reads a whole file with the same settings into one
//! aligned buffer and nothing else: the rate a file-to-anything run can't
//! beat on this machine, measured in the same process.

use std::fs::{File, OpenOptions};
use std::io;
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use prism_stream::{as_bytes, as_bytes_mut, Element};
use serde::Serialize;

use crate::source::{BoxError, Sink, Source};

/// How a file is read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum IoMode {
    /// `O_DIRECT` for the aligned part, buffered for the unaligned tail.
    Direct,
    /// Through the page cache only.
    Buffered,
}

impl std::fmt::Display for IoMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Buffered => "buffered",
        })
    }
}

/// The alignment direct I/O needs on a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Alignment {
    /// Of the memory address, bytes.
    pub memory: usize,
    /// Of the file offset and the length, bytes.
    pub offset: usize,
    /// True when `statx` reported it; false for the 4096 default.
    pub reported: bool,
}

impl Default for Alignment {
    fn default() -> Self {
        Self {
            memory: 4096,
            offset: 4096,
            reported: false,
        }
    }
}

/// How a [`FileSource`] or [`FileSink`] works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOptions {
    /// Try `O_DIRECT` (Linux; default on).
    pub direct: bool,
    /// Bytes of the aligned bounce buffer used when the slot is not aligned
    /// (default 4 MiB; rounded up to the alignment).
    pub bounce_bytes: usize,
    /// Sinks: `fsync` the file when finished or dropped (default on).
    pub sync: bool,
    /// Sources: buffers of read-ahead (default 0: none, the reads happen
    /// in `fill`). With `n` > 0 a thread reads the next chunks into `n`
    /// aligned buffers of the first slot's length (rounded up to the
    /// direct block) while the stream processes the current one, and
    /// `fill` copies from them (see the [module docs](self)). Sinks
    /// ignore it.
    pub read_ahead: usize,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self {
            direct: true,
            bounce_bytes: 4 << 20,
            sync: true,
            read_ahead: 0,
        }
    }
}

/// A file source's or sink's error: every one names the file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be opened or created.
    #[error("{}: cannot open: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A read failed (or the file ended early: it shrank while read).
    #[error("{}: read failed at byte {offset}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A write failed.
    #[error("{}: write failed at byte {offset}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `fsync` failed.
    #[error("{}: sync failed: {source}", path.display())]
    Sync {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file's length is not a whole number of elements.
    #[error(
        "{}: {len} bytes is not a whole number of {element}-byte elements ({stray} stray bytes at the end)",
        path.display()
    )]
    TornElement {
        /// The file.
        path: PathBuf,
        /// Its length, bytes.
        len: u64,
        /// The element's size, bytes.
        element: usize,
        /// Bytes past the last whole element.
        stray: u64,
    },
}

impl FileError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Open { path, .. }
            | Self::Read { path, .. }
            | Self::Write { path, .. }
            | Self::Sync { path, .. }
            | Self::TornElement { path, .. } => path,
        }
    }
}

/// What a [`FileSource`] read or a [`FileSink`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct FileStats {
    /// Bytes delivered to the stream (source) or written (sink).
    pub bytes: u64,
    /// Of them, bytes moved with `O_DIRECT`.
    pub direct_bytes: u64,
    /// Of them, bytes moved through the page cache.
    pub buffered_bytes: u64,
    /// Bytes copied through the bounce buffer (the slot was not aligned).
    pub bounce_bytes: u64,
    /// Time in the read or write calls, ms: the disk time.
    pub io_ms: f64,
    /// Time in `fill` or `accept` in all (I/O and bounce copies), ms.
    pub total_ms: f64,
    /// Read or write calls made.
    pub calls: u64,
    /// Read-ahead: bytes `fill` copied from the thread's buffers into the
    /// slots (all of them; 0 without read-ahead).
    pub copy_bytes: u64,
    /// Read-ahead: time `fill` waited for the thread's reads, ms (the disk
    /// time not hidden under the run; 0 without read-ahead).
    pub wait_ms: f64,
}

impl FileStats {
    /// Bytes ÷ disk time, GB/s (0 when nothing was timed).
    pub fn io_gb_per_s(&self) -> f64 {
        if self.io_ms > 0.0 {
            self.bytes as f64 / (self.io_ms * 1e6)
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for FileStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes ({} direct, {} buffered, {} through the bounce buffer) in {:.3} ms of I/O ({:.2} GB/s), {:.3} ms in all, {} calls",
            self.bytes,
            self.direct_bytes,
            self.buffered_bytes,
            self.bounce_bytes,
            self.io_ms,
            self.io_gb_per_s(),
            self.total_ms,
            self.calls
        )?;
        if self.copy_bytes > 0 || self.wait_ms > 0.0 {
            write!(
                f,
                "; read-ahead: {} bytes copied, {:.3} ms waited",
                self.copy_bytes, self.wait_ms
            )?;
        }
        Ok(())
    }
}

/// A buffer whose usable part starts at an aligned address (safe code: a
/// `Vec` one alignment longer, used from its first aligned byte).
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> Self {
        let align = align.max(1);
        let raw = vec![0u8; len + align];
        let start = raw.as_ptr().align_offset(align);
        assert!(start < align, "no aligned address in the buffer");
        Self { raw, start, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }

    fn as_ref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

fn round_down(n: usize, to: usize) -> usize {
    n / to * to
}

fn is_einval(e: &io::Error) -> bool {
    #[cfg(target_os = "linux")]
    {
        e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = e;
        false
    }
}

/// The file opened a second time with `O_DIRECT`, and the alignment it
/// needs; `Err(reason)` when direct I/O is not to be had.
fn open_direct(path: &Path, plain: &File, write: bool) -> Result<(File, Alignment), String> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let align = dio_alignment(plain);
        if align.reported && align.offset == 0 {
            return Err(
                "the file system reports no direct I/O (statx: dio_offset_align = 0)".into(),
            );
        }
        let mut o = OpenOptions::new();
        if write {
            o.write(true);
        } else {
            o.read(true);
        }
        o.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
        match o.open(path) {
            Ok(f) => Ok((f, align)),
            Err(e) if is_einval(&e) => Err(format!("O_DIRECT refused at open: {e}")),
            Err(e) => Err(format!("O_DIRECT open failed: {e}")),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (path, plain, write);
        Err("direct I/O is only used on Linux".into())
    }
}

/// `statx(STATX_DIOALIGN)` of an open file; 4096 for both where not reported.
#[cfg(target_os = "linux")]
fn dio_alignment(file: &File) -> Alignment {
    use rustix::fs::{statx, AtFlags, StatxFlags};
    match statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        Ok(s) if s.stx_mask & StatxFlags::DIOALIGN.bits() != 0 => Alignment {
            memory: (s.stx_dio_mem_align as usize).max(1),
            offset: s.stx_dio_offset_align as usize,
            reported: true,
        },
        _ => Alignment::default(),
    }
}

/// The alignment direct I/O on the file at `path` needs, as `statx`
/// reports it (4096 for both where it does not; `offset` 0 where the file
/// system does no direct I/O on this file).
pub fn alignment(path: impl AsRef<Path>) -> Result<Alignment, FileError> {
    let path = path.as_ref();
    let f = File::open(path).map_err(|source| FileError::Open {
        path: path.to_owned(),
        source,
    })?;
    #[cfg(target_os = "linux")]
    {
        Ok(dio_alignment(&f))
    }
    #[cfg(not(target_os = "linux"))]
    {
        drop(f);
        Ok(Alignment::default())
    }
}

/// The direct handle and its buffer, while direct I/O is in use.
struct Direct {
    file: File,
    align: Alignment,
    bounce: AlignedBuf,
}

impl Direct {
    /// The block: offsets and lengths of direct I/O are multiples of it.
    fn block(&self) -> usize {
        self.align.offset.max(1)
    }

    fn aligned(&self, p: &[u8]) -> bool {
        p.as_ptr().align_offset(self.align.memory.max(1)) == 0
    }
}

fn make_direct(
    path: &Path,
    plain: &File,
    write: bool,
    opts: &FileOptions,
) -> (Option<Direct>, Option<String>) {
    if !opts.direct {
        return (None, Some("direct I/O off in the options".into()));
    }
    match open_direct(path, plain, write) {
        Ok((file, align)) => {
            let block = align.offset.max(1);
            let len = round_up(opts.bounce_bytes.max(block), block);
            let bounce = AlignedBuf::new(len, align.memory.max(block).max(4096));
            (
                Some(Direct {
                    file,
                    align,
                    bounce,
                }),
                None,
            )
        }
        Err(reason) => (None, Some(reason)),
    }
}

/// The reading state of a [`FileSource`]: the handles, the position and the
/// counts. It moves to the read-ahead thread when there is one.
struct Reader {
    path: PathBuf,
    plain: File,
    direct: Option<Direct>,
    fallback: Option<String>,
    len: u64,
    /// Next byte to read from the file.
    file_pos: u64,
    /// Unread bytes of the bounce buffer: `bounce[b_pos..b_end]`.
    b_pos: usize,
    b_end: usize,
    stats: FileStats,
}

impl Reader {
    fn mode(&self) -> IoMode {
        if self.direct.is_some() {
            IoMode::Direct
        } else {
            IoMode::Buffered
        }
    }

    fn read_err(&self, offset: u64, source: io::Error) -> FileError {
        FileError::Read {
            path: self.path.clone(),
            offset,
            source,
        }
    }

    /// Reads into `dst` as many bytes as it holds or the file has left:
    /// returns how many.
    fn fill_bytes(&mut self, dst: &mut [u8]) -> Result<usize, FileError> {
        let started = Instant::now();
        let mut n = 0;
        while n < dst.len() {
            // What the bounce buffer still holds.
            if self.b_pos < self.b_end {
                let d = self
                    .direct
                    .as_ref()
                    .expect("bounce data without a direct handle");
                let k = (self.b_end - self.b_pos).min(dst.len() - n);
                dst[n..n + k].copy_from_slice(&d.bounce.as_ref()[self.b_pos..self.b_pos + k]);
                self.b_pos += k;
                n += k;
                self.stats.bounce_bytes += k as u64;
                continue;
            }
            let left = self.len - self.file_pos;
            if left == 0 {
                break;
            }
            let want = dst.len() - n;
            if let Some(d) = &mut self.direct {
                let block = d.block();
                if self.file_pos.is_multiple_of(block as u64) && left >= block as u64 {
                    let left = usize::try_from(left).unwrap_or(usize::MAX);
                    let in_place = d.aligned(&dst[n..]) && want >= block;
                    let k = if in_place {
                        round_down(want.min(left), block)
                    } else {
                        round_down(d.bounce.len.min(left), block)
                    };
                    let t = Instant::now();
                    let r = if in_place {
                        d.file.read_exact_at(&mut dst[n..n + k], self.file_pos)
                    } else {
                        d.file
                            .read_exact_at(&mut d.bounce.as_mut()[..k], self.file_pos)
                    };
                    self.stats.io_ms += t.elapsed().as_secs_f64() * 1e3;
                    self.stats.calls += 1;
                    match r {
                        Ok(()) => {
                            self.file_pos += k as u64;
                            self.stats.direct_bytes += k as u64;
                            if in_place {
                                n += k;
                            } else {
                                self.b_pos = 0;
                                self.b_end = k;
                            }
                        }
                        Err(e) if is_einval(&e) => {
                            self.fallback = Some(format!(
                                "a direct read was refused at byte {}: {e}",
                                self.file_pos
                            ));
                            self.direct = None;
                        }
                        Err(e) => return Err(self.read_err(self.file_pos, e)),
                    }
                    continue;
                }
            }
            // Buffered: the tail, or everything in buffered mode.
            let k = usize::try_from(left).unwrap_or(usize::MAX).min(want);
            let t = Instant::now();
            let r = self.plain.read_exact_at(&mut dst[n..n + k], self.file_pos);
            self.stats.io_ms += t.elapsed().as_secs_f64() * 1e3;
            self.stats.calls += 1;
            r.map_err(|e| self.read_err(self.file_pos, e))?;
            self.file_pos += k as u64;
            self.stats.buffered_bytes += k as u64;
            n += k;
        }
        self.stats.bytes += n as u64;
        self.stats.total_ms += started.elapsed().as_secs_f64() * 1e3;
        Ok(n)
    }
}

/// One buffer the read-ahead thread filled, in file order.
struct Ready {
    buf: AlignedBuf,
    /// Bytes of `buf` read: the buffer's length except at the file's end
    /// (0 there, or after an error).
    n: usize,
    /// The read's error, if it failed (then the thread has stopped).
    error: Option<FileError>,
    /// The thread's counts after this buffer.
    stats: FileStats,
    mode: IoMode,
    fallback: Option<String>,
}

/// The read-ahead thread and the buffers it hands over.
struct ReadAhead {
    /// Filled buffers, in file order. `None` once dropped (to stop the thread).
    ready: Option<mpsc::Receiver<Ready>>,
    /// Drained buffers back to the thread. `None` once dropped.
    free: Option<mpsc::Sender<AlignedBuf>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The buffer being copied out: `buf[pos..end]` not yet delivered.
    current: Option<(AlignedBuf, usize, usize)>,
    /// The thread read the file's last bytes (or stopped on an error).
    done: bool,
    /// The error delivered, for later calls (the thread has stopped).
    failed: Option<(u64, String)>,
    /// The thread's counts up to the last buffer received.
    thread_stats: FileStats,
    mode: IoMode,
    fallback: Option<String>,
}

impl ReadAhead {
    /// Starts the thread over `reader` with `buffers` buffers of
    /// `buf_bytes` (a multiple of the direct block, aligned for it).
    fn start(mut reader: Reader, buffers: usize, buf_bytes: usize) -> Result<Self, FileError> {
        let align = reader
            .direct
            .as_ref()
            .map_or(4096, |d| d.align.memory.max(d.block()).max(4096));
        let (ready_tx, ready_rx) = mpsc::channel::<Ready>();
        let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
        for _ in 0..buffers {
            free_tx
                .send(AlignedBuf::new(buf_bytes, align))
                .expect("the receiver is here");
        }
        let (mode, fallback) = (reader.mode(), reader.fallback.clone());
        let path = reader.path.clone();
        let thread = std::thread::Builder::new()
            // 15 characters: what Linux keeps of a thread's name.
            .name("prism-readahead".into())
            .spawn(move || {
                // Stops when the source drops either channel, at the file's
                // end, or after an error.
                while let Ok(mut buf) = free_rx.recv() {
                    let (n, error) = match reader.fill_bytes(buf.as_mut()) {
                        Ok(n) => (n, None),
                        Err(e) => (0, Some(e)),
                    };
                    let last = error.is_some() || n < buf.len;
                    let ready = Ready {
                        buf,
                        n,
                        error,
                        stats: reader.stats,
                        mode: reader.mode(),
                        fallback: reader.fallback.clone(),
                    };
                    if ready_tx.send(ready).is_err() || last {
                        return;
                    }
                }
            })
            .map_err(|source| FileError::Read {
                path,
                offset: 0,
                source,
            })?;
        Ok(Self {
            ready: Some(ready_rx),
            free: Some(free_tx),
            thread: Some(thread),
            current: None,
            done: false,
            failed: None,
            thread_stats: FileStats::default(),
            mode,
            fallback,
        })
    }

    /// Copies the next bytes of the file into `dst` (as many as it holds or
    /// the file has left), waiting for the thread where its buffers are not
    /// read yet; `wait_ms` gets the time waited.
    fn fill_bytes(
        &mut self,
        path: &Path,
        dst: &mut [u8],
        wait_ms: &mut f64,
    ) -> Result<usize, FileError> {
        if let Some((offset, msg)) = &self.failed {
            return Err(FileError::Read {
                path: path.to_owned(),
                offset: *offset,
                source: io::Error::other(format!("an earlier read failed: {msg}")),
            });
        }
        let mut n = 0;
        while n < dst.len() {
            if let Some((buf, pos, end)) = &mut self.current {
                let k = (*end - *pos).min(dst.len() - n);
                dst[n..n + k].copy_from_slice(&buf.as_ref()[*pos..*pos + k]);
                *pos += k;
                n += k;
                if *pos == *end {
                    let (buf, _, _) = self.current.take().expect("just matched");
                    if let Some(free) = &self.free {
                        // The thread may have stopped (file end): then the
                        // buffer just goes.
                        let _ = free.send(buf);
                    }
                }
                continue;
            }
            if self.done {
                break;
            }
            let t = Instant::now();
            let got = self.ready.as_ref().expect("ready until dropped").recv();
            *wait_ms += t.elapsed().as_secs_f64() * 1e3;
            let Ok(ready) = got else {
                // The thread ended without saying why: it panicked.
                self.done = true;
                let e = io::Error::other("the read-ahead thread ended unexpectedly");
                self.failed = Some((0, e.to_string()));
                return Err(FileError::Read {
                    path: path.to_owned(),
                    offset: 0,
                    source: e,
                });
            };
            self.thread_stats = ready.stats;
            self.mode = ready.mode;
            self.fallback = ready.fallback;
            if let Some(e) = ready.error {
                self.done = true;
                if let FileError::Read { offset, source, .. } = &e {
                    self.failed = Some((*offset, source.to_string()));
                } else {
                    self.failed = Some((0, e.to_string()));
                }
                return Err(e);
            }
            if ready.n < ready.buf.len {
                self.done = true;
            }
            if ready.n > 0 {
                self.current = Some((ready.buf, 0, ready.n));
            }
        }
        Ok(n)
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Closing both channels stops the thread at its next hand-over
        // (after the read under way, if any); then it is joined.
        self.ready = None;
        self.free = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("prism read-ahead thread panicked");
            }
        }
    }
}

/// Where a [`FileSource`]'s reads happen.
enum Reading {
    /// In `fill`, into the slot.
    Sync(Box<Reader>),
    /// Read-ahead asked for (this many buffers); the thread starts at the
    /// first `fill`, with buffers of that slot's length.
    Pending(Box<Reader>, usize),
    /// On the read-ahead thread.
    Ahead(Box<ReadAhead>),
    /// Between states (only while switching; a failed thread start leaves it).
    Gone,
}

/// A [`Source`] reading a file of raw `T`s (native byte order), with direct
/// I/O where it can (see the [module docs](self)), and with
/// [`FileOptions::read_ahead`] on a background thread that reads the next
/// chunks while the stream processes this one. Made by [`from_file`] or
/// [`FileSource::open`]; a length that is not a whole number of elements
/// is refused at open.
pub struct FileSource<T> {
    path: PathBuf,
    len: u64,
    align: Option<Alignment>,
    reading: Reading,
    /// [`FileOptions::read_ahead`].
    read_ahead: usize,
    /// With read-ahead: what `fill` did (the thread's counts are merged in
    /// by [`stats`](Self::stats)).
    stats: FileStats,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for FileSource<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("path", &self.path)
            .field("mode", &self.mode())
            .field("len", &self.len)
            .field("read_ahead", &self.read_ahead())
            .field("delivered", &self.stats().bytes)
            .finish()
    }
}

/// A [`FileSource`] over `path` with the default [`FileOptions`].
pub fn from_file<T: Element>(path: impl AsRef<Path>) -> Result<FileSource<T>, FileError> {
    FileSource::open(path, FileOptions::default())
}

/// The [`Reader`] over `path`, checked for whole `element`-byte elements.
fn open_reader(path: &Path, opts: &FileOptions, element: usize) -> Result<Reader, FileError> {
    let path = path.to_owned();
    let open_err = |source| FileError::Open {
        path: path.clone(),
        source,
    };
    let plain = File::open(&path).map_err(open_err)?;
    let len = plain.metadata().map_err(open_err)?.len();
    let element = element.max(1);
    let stray = len % element as u64;
    if stray != 0 {
        return Err(FileError::TornElement {
            path,
            len,
            element,
            stray,
        });
    }
    let (direct, fallback) = make_direct(&path, &plain, false, opts);
    Ok(Reader {
        path,
        plain,
        direct,
        fallback,
        len,
        file_pos: 0,
        b_pos: 0,
        b_end: 0,
        stats: FileStats::default(),
    })
}

impl<T: Element> FileSource<T> {
    /// Opens `path` for reading: buffered always, and with `O_DIRECT` too
    /// where `opts` asks and the file system allows. With
    /// [`FileOptions::read_ahead`] > 0 the read-ahead thread starts at the
    /// first [`fill`](Source::fill).
    pub fn open(path: impl AsRef<Path>, opts: FileOptions) -> Result<Self, FileError> {
        let reader = open_reader(path.as_ref(), &opts, std::mem::size_of::<T>())?;
        let align = reader.direct.as_ref().map(|d| d.align);
        Ok(Self {
            path: reader.path.clone(),
            len: reader.len,
            align,
            reading: if opts.read_ahead > 0 {
                Reading::Pending(Box::new(reader), opts.read_ahead)
            } else {
                Reading::Sync(Box::new(reader))
            },
            read_ahead: opts.read_ahead,
            stats: FileStats::default(),
            _t: PhantomData,
        })
    }
}

impl<T> FileSource<T> {
    /// [`IoMode::Direct`] while the `O_DIRECT` handle is in use (it goes
    /// when a direct read is refused; with read-ahead, as of the last
    /// buffer `fill` took from the thread).
    pub fn mode(&self) -> IoMode {
        match &self.reading {
            Reading::Sync(r) | Reading::Pending(r, _) => r.mode(),
            Reading::Ahead(a) => a.mode,
            Reading::Gone => IoMode::Buffered,
        }
    }

    /// Why the file is read buffered (`None` in direct mode).
    pub fn fallback(&self) -> Option<&str> {
        match &self.reading {
            Reading::Sync(r) | Reading::Pending(r, _) => r.fallback.as_deref(),
            Reading::Ahead(a) => a.fallback.as_deref(),
            Reading::Gone => Some("the read-ahead thread could not start"),
        }
    }

    /// The alignment direct reads use (`None` in buffered mode).
    pub fn alignment(&self) -> Option<Alignment> {
        match self.mode() {
            IoMode::Direct => self.align,
            IoMode::Buffered => None,
        }
    }

    /// The read-ahead buffers asked for ([`FileOptions::read_ahead`]; 0
    /// for none).
    pub fn read_ahead(&self) -> usize {
        match &self.reading {
            Reading::Sync(_) => 0,
            Reading::Pending(_, n) => *n,
            Reading::Ahead(_) | Reading::Gone => self.read_ahead,
        }
    }

    /// What was read so far. With read-ahead, `bytes` is what `fill`
    /// delivered; the I/O counts (`direct_bytes`, `buffered_bytes`,
    /// `bounce_bytes`, `io_ms`, `calls`) are the thread's up to the last
    /// buffer `fill` took (so they may run one buffer ahead of `bytes`
    /// until the end), `copy_bytes` and `wait_ms` are `fill`'s.
    pub fn stats(&self) -> FileStats {
        match &self.reading {
            Reading::Sync(r) | Reading::Pending(r, _) => r.stats,
            Reading::Ahead(a) => FileStats {
                direct_bytes: a.thread_stats.direct_bytes,
                buffered_bytes: a.thread_stats.buffered_bytes,
                bounce_bytes: a.thread_stats.bounce_bytes,
                io_ms: a.thread_stats.io_ms,
                calls: a.thread_stats.calls,
                ..self.stats
            },
            Reading::Gone => self.stats,
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length at open, bytes.
    pub fn len_bytes(&self) -> u64 {
        self.len
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) -> Result<usize, FileError> {
        if let Reading::Pending(_, buffers) = &self.reading {
            if dst.is_empty() {
                return Ok(0);
            }
            let buffers = *buffers;
            let Reading::Pending(reader, _) = std::mem::replace(&mut self.reading, Reading::Gone)
            else {
                unreachable!("matched above")
            };
            // Buffers of this slot's length, rounded up to the direct block
            // so every read but the tail's stays aligned.
            let block = reader.direct.as_ref().map_or(1, Direct::block);
            let buf_bytes = round_up(dst.len(), block);
            self.reading = Reading::Ahead(Box::new(ReadAhead::start(*reader, buffers, buf_bytes)?));
        }
        match &mut self.reading {
            Reading::Sync(r) => r.fill_bytes(dst),
            Reading::Ahead(a) => {
                let started = Instant::now();
                let r = a.fill_bytes(&self.path, dst, &mut self.stats.wait_ms);
                if let Ok(n) = r {
                    self.stats.bytes += n as u64;
                    self.stats.copy_bytes += n as u64;
                }
                self.stats.total_ms += started.elapsed().as_secs_f64() * 1e3;
                r
            }
            Reading::Pending(..) => unreachable!("started above"),
            Reading::Gone => Err(FileError::Read {
                path: self.path.clone(),
                offset: 0,
                source: io::Error::other("the read-ahead thread could not start"),
            }),
        }
    }
}

impl<T: Element> Source<T> for FileSource<T> {
    fn fill(&mut self, dst: &mut [T]) -> Result<usize, BoxError> {
        let n = self.fill_bytes(as_bytes_mut(dst))?;
        // Whole elements always: the length was checked at open and every
        // read ends at the slot's end or the file's.
        Ok(n / std::mem::size_of::<T>().max(1))
    }
}

/// A [`Sink`] writing raw `T`s (native byte order) to a file, in order,
/// with direct I/O where it can (see the [module docs](self)). Made by
/// [`to_file`] or [`FileSink::create`] (the file is created or truncated).
///
/// Every `accept` leaves the whole output so far in the file (the unaligned
/// end of a chunk is written buffered at once), so nothing is lost when the
/// sink is dropped; [`finish`](Self::finish) syncs (with
/// [`FileOptions::sync`]) and reports a failed sync, which a drop can only
/// log. To read the stats after a run, pass `&mut sink` to `run_stream`.
pub struct FileSink<T> {
    path: PathBuf,
    plain: File,
    direct: Option<Direct>,
    fallback: Option<String>,
    sync: bool,
    /// Bytes written so far (the next offset).
    pos: u64,
    finished: bool,
    stats: FileStats,
    _t: PhantomData<fn(T)>,
}

impl<T> std::fmt::Debug for FileSink<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSink")
            .field("path", &self.path)
            .field("mode", &self.mode())
            .field("pos", &self.pos)
            .finish()
    }
}

/// A [`FileSink`] to `path` with the default [`FileOptions`].
pub fn to_file<T: Element>(path: impl AsRef<Path>) -> Result<FileSink<T>, FileError> {
    FileSink::create(path, FileOptions::default())
}

impl<T: Element> FileSink<T> {
    /// Creates (or truncates) `path` for writing: buffered always, and with
    /// `O_DIRECT` too where `opts` asks and the file system allows.
    pub fn create(path: impl AsRef<Path>, opts: FileOptions) -> Result<Self, FileError> {
        let path = path.as_ref().to_owned();
        let plain = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|source| FileError::Open {
                path: path.clone(),
                source,
            })?;
        let (direct, fallback) = make_direct(&path, &plain, true, &opts);
        Ok(Self {
            path,
            plain,
            direct,
            fallback,
            sync: opts.sync,
            pos: 0,
            finished: false,
            stats: FileStats::default(),
            _t: PhantomData,
        })
    }
}

impl<T> FileSink<T> {
    /// [`IoMode::Direct`] while the `O_DIRECT` handle is in use.
    pub fn mode(&self) -> IoMode {
        if self.direct.is_some() {
            IoMode::Direct
        } else {
            IoMode::Buffered
        }
    }

    /// Why the file is written buffered (`None` in direct mode).
    pub fn fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// What was written so far.
    pub fn stats(&self) -> FileStats {
        self.stats
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs the file (with [`FileOptions::sync`]; the time counts as I/O)
    /// and returns the stats. Later calls do nothing more.
    pub fn finish(&mut self) -> Result<FileStats, FileError> {
        if !self.finished {
            self.finished = true;
            if self.sync {
                let t = Instant::now();
                self.plain.sync_all().map_err(|source| FileError::Sync {
                    path: self.path.clone(),
                    source,
                })?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                self.stats.io_ms += ms;
                self.stats.total_ms += ms;
            }
        }
        Ok(self.stats)
    }

    fn write_err(&self, offset: u64, source: io::Error) -> FileError {
        FileError::Write {
            path: self.path.clone(),
            offset,
            source,
        }
    }

    fn buffered(&mut self, data: &[u8]) -> Result<(), FileError> {
        let t = Instant::now();
        let r = self.plain.write_all_at(data, self.pos);
        self.stats.io_ms += t.elapsed().as_secs_f64() * 1e3;
        self.stats.calls += 1;
        r.map_err(|e| self.write_err(self.pos, e))?;
        self.pos += data.len() as u64;
        self.stats.buffered_bytes += data.len() as u64;
        Ok(())
    }

    fn write_bytes(&mut self, data: &[u8]) -> Result<(), FileError> {
        let started = Instant::now();
        let mut i = 0;
        while i < data.len() {
            let rest = data.len() - i;
            if let Some(d) = &mut self.direct {
                let block = d.block();
                let misaligned = (self.pos % block as u64) as usize;
                if misaligned != 0 {
                    // Back to an aligned offset, buffered.
                    let k = (block - misaligned).min(rest);
                    self.buffered(&data[i..i + k])?;
                    i += k;
                    continue;
                }
                if rest >= block {
                    let in_place = d.aligned(&data[i..]);
                    let k = if in_place {
                        round_down(rest, block)
                    } else {
                        round_down(rest.min(d.bounce.len), block)
                    };
                    if !in_place {
                        d.bounce.as_mut()[..k].copy_from_slice(&data[i..i + k]);
                        self.stats.bounce_bytes += k as u64;
                    }
                    let t = Instant::now();
                    let r = if in_place {
                        d.file.write_all_at(&data[i..i + k], self.pos)
                    } else {
                        d.file.write_all_at(&d.bounce.as_ref()[..k], self.pos)
                    };
                    self.stats.io_ms += t.elapsed().as_secs_f64() * 1e3;
                    self.stats.calls += 1;
                    match r {
                        Ok(()) => {
                            self.pos += k as u64;
                            self.stats.direct_bytes += k as u64;
                            i += k;
                        }
                        Err(e) if is_einval(&e) => {
                            self.fallback = Some(format!(
                                "a direct write was refused at byte {}: {e}",
                                self.pos
                            ));
                            self.direct = None;
                        }
                        Err(e) => return Err(self.write_err(self.pos, e)),
                    }
                    continue;
                }
            }
            // The unaligned end of this output (or everything, buffered).
            self.buffered(&data[i..])?;
            i = data.len();
        }
        self.stats.bytes += data.len() as u64;
        self.stats.total_ms += started.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }
}

impl<T: Element> Sink<T> for FileSink<T> {
    fn accept(&mut self, _chunk: u64, data: &[T]) -> Result<(), BoxError> {
        Ok(self.write_bytes(as_bytes(data))?)
    }
}

impl<T> Drop for FileSink<T> {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!("prism file sink dropped unfinished: {e}");
        }
    }
}

/// What the disk gave a plain read of a whole file ([`read_bound`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiskBound {
    /// Bytes read (the whole file).
    pub bytes: u64,
    /// Seconds the reads took.
    pub seconds: f64,
    /// How the file was read.
    pub mode: IoMode,
    /// Why buffered, if it was.
    pub fallback: Option<String>,
    /// The I/O counts of the read.
    pub stats: FileStats,
}

impl DiskBound {
    /// Bytes ÷ seconds, GB/s (0 for an empty file).
    pub fn gb_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }

    /// A run's rate over `bytes` in `seconds` as a fraction of this bound.
    pub fn fraction(&self, bytes: u64, seconds: f64) -> f64 {
        let bound = self.gb_per_s();
        if bound > 0.0 && seconds > 0.0 {
            bytes as f64 / seconds / 1e9 / bound
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for DiskBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes in {:.3} s ({:.2} GB/s, {})",
            self.bytes,
            self.seconds,
            self.gb_per_s(),
            self.mode
        )?;
        if let Some(r) = &self.fallback {
            write!(f, " [{r}]")?;
        }
        Ok(())
    }
}

/// Reads the whole file at `path` with the default [`FileOptions`] into one
/// aligned 16 MiB buffer, with no processing: the disk bound of a run over
/// that file, measured in this process ([`read_bound_with`] for other
/// options or buffer sizes). A buffered read (the fallback) of a recently
/// written file measures the page cache, not the disk.
pub fn read_bound(path: impl AsRef<Path>) -> Result<DiskBound, FileError> {
    read_bound_with(path, &FileOptions::default(), 16 << 20)
}

/// [`read_bound`] with `opts` and a page-aligned buffer of `buf_bytes`
/// (make it the run's chunk size to read the file as the run does). The
/// reads are plain, in this thread: [`FileOptions::read_ahead`] is ignored.
pub fn read_bound_with(
    path: impl AsRef<Path>,
    opts: &FileOptions,
    buf_bytes: usize,
) -> Result<DiskBound, FileError> {
    let mut src = open_reader(path.as_ref(), opts, 1)?;
    let align = src
        .direct
        .as_ref()
        .map_or(4096, |d| d.align.memory.max(d.align.offset).max(4096));
    let mut buf = AlignedBuf::new(buf_bytes.max(1), align);
    let started = Instant::now();
    let mut bytes = 0u64;
    loop {
        let n = src.fill_bytes(buf.as_mut())?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(DiskBound {
        bytes,
        seconds,
        mode: src.mode(),
        fallback: src.fallback,
        stats: src.stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned() {
        for align in [1, 512, 4096, 65536] {
            let mut b = AlignedBuf::new(100, align);
            assert_eq!(b.as_mut().as_ptr().align_offset(align), 0);
            assert_eq!(b.as_ref().len(), 100);
        }
    }

    /// Threads of this process named `prism-readahead` (the lib's unit
    /// tests: no other test here starts one).
    #[cfg(target_os = "linux")]
    fn read_ahead_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|c| c.trim() == "prism-readahead")
            .count()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_read_ahead_thread_is_gone_after_the_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.bin");
        std::fs::write(&path, vec![3u8; 8 << 20]).unwrap();
        let opts = FileOptions {
            read_ahead: 3,
            ..FileOptions::default()
        };
        let mut src = FileSource::<u8>::open(&path, opts).unwrap();
        assert_eq!(read_ahead_threads(), 0, "started before the first fill");
        let mut slot = vec![0u8; 1 << 20];
        assert_eq!(src.fill(&mut slot).unwrap(), 1 << 20);
        assert_eq!(read_ahead_threads(), 1);
        drop(src);
        assert_eq!(read_ahead_threads(), 0, "the thread outlived its source");
        // Read to the end: the thread has ended by itself, the drop joins.
        let opts = FileOptions {
            read_ahead: 1,
            ..FileOptions::default()
        };
        let mut src = FileSource::<u8>::open(&path, opts).unwrap();
        while src.fill(&mut slot).unwrap() > 0 {}
        drop(src);
        assert_eq!(read_ahead_threads(), 0);
    }

    #[test]
    fn rounding() {
        assert_eq!(round_up(1, 4096), 4096);
        assert_eq!(round_up(4096, 4096), 4096);
        assert_eq!(round_down(8191, 4096), 4096);
    }
}
