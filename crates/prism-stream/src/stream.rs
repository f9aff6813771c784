//! Stream pools: non-blocking streams grouped by purpose, with priorities,
//! handed out round-robin (least used first) as [`ManagedStream`]s, each a
//! [`Lane`] of its own on a pooled stream.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::context::Gpu;
use crate::error::DriverResultExt;
use crate::lane::{Lane, StreamCore};
use crate::order::StreamId;
use crate::raw::stream_priority_range;
use crate::{Error, Result};

/// What a stream is for. Copies in each direction get their own streams so
/// that both copy engines and the SMs can work at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamPurpose {
    Upload,
    Compute,
    Download,
    Auxiliary,
}

impl StreamPurpose {
    pub const ALL: [StreamPurpose; 4] =
        [Self::Upload, Self::Compute, Self::Download, Self::Auxiliary];

    /// The priority prism gives streams of this purpose: copies highest
    /// (so they are fed promptly), compute the default, auxiliary the lowest.
    pub(crate) fn priority(self) -> Result<i32> {
        let (least, greatest) = stream_priority_range().call("cuCtxGetStreamPriorityRange")?;
        Ok(match self {
            Self::Upload | Self::Download => greatest,
            Self::Compute => 0,
            Self::Auxiliary => least,
        })
    }

    fn index(self) -> usize {
        match self {
            Self::Upload => 0,
            Self::Compute => 1,
            Self::Download => 2,
            Self::Auxiliary => 3,
        }
    }
}

impl Lane {
    /// A lane on a new stream of `gpu` with compute priority.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        Self::with_purpose(gpu, StreamPurpose::Compute)
    }

    /// A lane on a new stream with the priority prism gives `purpose`
    /// (copies highest, auxiliary lowest).
    pub fn with_purpose(gpu: &Gpu, purpose: StreamPurpose) -> Result<Self> {
        gpu.bind()?;
        let priority = purpose.priority()?;
        Ok(Self::on(StreamCore::new(gpu, priority)?))
    }
}

#[derive(Debug)]
struct PooledStream {
    core: Arc<StreamCore>,
    users: Arc<AtomicUsize>,
}

/// Streams per purpose, created once.
#[derive(Debug)]
pub struct StreamPool {
    gpu: Gpu,
    streams: [Vec<PooledStream>; 4],
    next: [AtomicUsize; 4],
}

impl StreamPool {
    /// `per_purpose` streams (1 to 16) for each purpose. Copy streams get the
    /// highest priority the device offers (so copies are fed promptly), compute
    /// the default, auxiliary the lowest.
    pub fn new(gpu: &Gpu, per_purpose: usize) -> Result<Self> {
        Self::with_counts(gpu, [per_purpose; 4])
    }

    /// `counts[i]` streams (0 to 16 each, at least one in all) for purpose
    /// `StreamPurpose::ALL[i]` (upload, compute, download, auxiliary), with
    /// the priorities of [`new`](Self::new). Acquiring a purpose that has no
    /// stream is an error.
    pub fn with_counts(gpu: &Gpu, counts: [usize; 4]) -> Result<Self> {
        if let Some(&bad) = counts.iter().find(|&&n| n > 16) {
            return Err(Error::LengthMismatch {
                what: "streams per purpose (0..=16)",
                expected: 16,
                actual: bad,
            });
        }
        if counts.iter().all(|&n| n == 0) {
            return Err(Error::ZeroLength {
                what: "stream pool",
            });
        }
        gpu.bind()?;
        let make = |purpose: StreamPurpose| -> Result<Vec<PooledStream>> {
            let priority = purpose.priority()?;
            (0..counts[purpose.index()])
                .map(|_| {
                    Ok(PooledStream {
                        core: StreamCore::new(gpu, priority)?,
                        users: Arc::new(AtomicUsize::new(0)),
                    })
                })
                .collect()
        };
        Ok(Self {
            gpu: gpu.clone(),
            streams: [
                make(StreamPurpose::Upload)?,
                make(StreamPurpose::Compute)?,
                make(StreamPurpose::Download)?,
                make(StreamPurpose::Auxiliary)?,
            ],
            next: Default::default(),
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Streams held for `purpose`.
    pub fn len(&self, purpose: StreamPurpose) -> usize {
        self.streams[purpose.index()].len()
    }

    /// Handles currently out for `purpose`.
    pub fn in_use(&self, purpose: StreamPurpose) -> usize {
        self.streams[purpose.index()]
            .iter()
            .map(|s| s.users.load(Ordering::Relaxed))
            .sum()
    }

    /// A lane on the next stream for `purpose`: round-robin, preferring the
    /// least used. Two handles may share a stream; each is a lane of its own
    /// (see [`Lane`]). `ZeroLength` when the pool has no stream for `purpose`.
    pub fn acquire(&self, purpose: StreamPurpose) -> Result<ManagedStream> {
        let list = &self.streams[purpose.index()];
        if list.is_empty() {
            return Err(Error::ZeroLength {
                what: "stream pool purpose",
            });
        }
        let start = self.next[purpose.index()].fetch_add(1, Ordering::Relaxed);
        let pick = (0..list.len())
            .map(|k| (start + k) % list.len())
            .min_by_key(|&i| list[i].users.load(Ordering::Relaxed))
            .unwrap_or(0);
        let s = &list[pick];
        s.users.fetch_add(1, Ordering::Relaxed);
        Ok(ManagedStream {
            lane: Lane::on(Arc::clone(&s.core)),
            purpose,
            users: Arc::clone(&s.users),
        })
    }
}

/// A lane on a stream handed out by a [`StreamPool`]; gives the stream back
/// on drop. Use it as a [`Lane`] (it dereferences to one).
#[derive(Debug)]
pub struct ManagedStream {
    lane: Lane,
    purpose: StreamPurpose,
    users: Arc<AtomicUsize>,
}

impl ManagedStream {
    pub fn purpose(&self) -> StreamPurpose {
        self.purpose
    }

    /// The id of the pooled stream (equal for handles that share one).
    pub fn stream_id(&self) -> StreamId {
        self.lane.stream_id()
    }
}

impl std::ops::Deref for ManagedStream {
    type Target = Lane;
    fn deref(&self) -> &Lane {
        &self.lane
    }
}

impl std::ops::DerefMut for ManagedStream {
    fn deref_mut(&mut self) -> &mut Lane {
        &mut self.lane
    }
}

impl Drop for ManagedStream {
    fn drop(&mut self) {
        self.users.fetch_sub(1, Ordering::Relaxed);
    }
}
