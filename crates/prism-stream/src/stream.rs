//! Stream pools: non-blocking streams grouped by purpose, with priorities,
//! handed out round-robin (least used first) and returned on drop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::driver::{result, CudaStream};

use crate::context::Gpu;
use crate::error::DriverResultExt;
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

    fn index(self) -> usize {
        match self {
            Self::Upload => 0,
            Self::Compute => 1,
            Self::Download => 2,
            Self::Auxiliary => 3,
        }
    }
}

#[derive(Debug)]
struct PooledStream {
    stream: Arc<CudaStream>,
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

    /// `counts[i]` streams (1 to 16 each) for purpose `StreamPurpose::ALL[i]`
    /// (upload, compute, download, auxiliary), with the priorities of [`new`](Self::new).
    pub fn with_counts(gpu: &Gpu, counts: [usize; 4]) -> Result<Self> {
        if let Some(&bad) = counts.iter().find(|&&n| n == 0 || n > 16) {
            return Err(Error::LengthMismatch {
                what: "streams per purpose (1..=16)",
                expected: bad.clamp(1, 16),
                actual: bad,
            });
        }
        gpu.bind()?;
        let (least, greatest) =
            result::stream::get_priority_range().call("cuCtxGetStreamPriorityRange")?;
        let make = |purpose: StreamPurpose, priority: i32| -> Result<Vec<PooledStream>> {
            (0..counts[purpose.index()])
                .map(|_| {
                    Ok(PooledStream {
                        stream: gpu.new_stream(priority)?,
                        users: Arc::new(AtomicUsize::new(0)),
                    })
                })
                .collect()
        };
        Ok(Self {
            gpu: gpu.clone(),
            streams: [
                make(StreamPurpose::Upload, greatest)?,
                make(StreamPurpose::Compute, 0)?,
                make(StreamPurpose::Download, greatest)?,
                make(StreamPurpose::Auxiliary, least)?,
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

    /// The next stream for `purpose`: round-robin, preferring the least used.
    pub fn acquire(&self, purpose: StreamPurpose) -> ManagedStream {
        let list = &self.streams[purpose.index()];
        let start = self.next[purpose.index()].fetch_add(1, Ordering::Relaxed);
        let pick = (0..list.len())
            .map(|k| (start + k) % list.len())
            .min_by_key(|&i| list[i].users.load(Ordering::Relaxed))
            .unwrap_or(0);
        let s = &list[pick];
        s.users.fetch_add(1, Ordering::Relaxed);
        ManagedStream {
            stream: Arc::clone(&s.stream),
            purpose,
            users: Arc::clone(&s.users),
        }
    }
}

/// A stream handed out by a [`StreamPool`]; gives itself back on drop.
#[derive(Debug)]
pub struct ManagedStream {
    stream: Arc<CudaStream>,
    purpose: StreamPurpose,
    users: Arc<AtomicUsize>,
}

impl ManagedStream {
    pub fn purpose(&self) -> StreamPurpose {
        self.purpose
    }

    /// The cudarc stream, for launching one's own kernels.
    pub fn cuda_stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl std::ops::Deref for ManagedStream {
    type Target = Arc<CudaStream>;
    fn deref(&self) -> &Self::Target {
        &self.stream
    }
}

impl Drop for ManagedStream {
    fn drop(&mut self) {
        self.users.fetch_sub(1, Ordering::Relaxed);
    }
}
