//! A compressed chunk file streamed through prism's ring: each *frame*
//! (`chunks_per_frame` consecutive chunks of the file) crosses the link
//! compressed, is decompressed on the GPU by nvCOMP and goes through one
//! prism-pipeline [`Stage`]; the stage's output comes back to a sink in
//! frame order.
//!
//! It is built on prism-buffer's public [`Engine`] (the ring every prism
//! run uses): a [`ChunkIo`] reads frames from the file into pinned
//! staging and uploads them, a [`ChunkProcessor`] queues the decompression
//! and the stage on the chunk's compute lane. Each slot has three device
//! buffers: the compressed frame, the decompressed data, the stage's output.
//!
//! Why not a `Stage` in a `PipelineStageManager`: a stage's output length is
//! a function of its input length alone (`Stage::output_len`), but a
//! compressed frame's uncompressed length depends on its contents (the
//! file's table), and a `Source` fills a slot with elements of the chain's
//! one type with no side channel for the frame's table. The engine's
//! processor returns each chunk's output length, so it expresses this
//! directly. What prism-pipeline would need to host it: a per-chunk output
//! length (`Stage::output_len_of(chunk)` or a `Source` that hands a
//! per-chunk tag to the stages, as `run_graph_stream`'s tags do for sinks).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Seek};
use std::rc::Rc;
use std::time::{Duration, Instant};

use prism_buffer::engine::{ChunkOutputs, ComputeSpans, IoSlots, Recorded};
use prism_buffer::{ChunkId, ChunkIo, ChunkProcessor, Engine, EngineConfig};
use prism_pipeline::Stage;
use prism_stream::{
    as_bytes_mut, DeviceBuffer, Element, Gpu, HostAllocFlags, Lane, Launch, PinnedBuffer,
};

use crate::batch::{ChunkLoc, Decompressor, Pending};
use crate::format::ChunkFileReader;
use crate::{BoxError, Error, Nvcomp, Result};

/// How a compressed stream runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamConfig {
    /// File chunks per frame (one ring slot; one nvCOMP batch).
    pub chunks_per_frame: usize,
    /// Ring slots (frames in flight), 2..=8.
    pub slots: usize,
}

impl Default for StreamConfig {
    /// 256 chunks per frame (16 MiB of 64 KiB chunks), 3 slots.
    fn default() -> Self {
        Self {
            chunks_per_frame: 256,
            slots: 3,
        }
    }
}

/// What a compressed stream did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamReport {
    /// Frames streamed.
    pub frames: u64,
    /// Bytes that crossed the link to the GPU (compressed frames, padding included).
    pub uploaded_bytes: u64,
    /// Uncompressed bytes the frames expanded to.
    pub uncompressed_bytes: u64,
    /// Output elements delivered to the sink.
    pub output_elements: u64,
    /// Wall time of the run (engine start to last delivery).
    pub wall: Duration,
}

impl StreamReport {
    /// Uncompressed bytes per second of wall time.
    pub fn effective_rate(&self) -> f64 {
        self.uncompressed_bytes as f64 / self.wall.as_secs_f64().max(1e-12)
    }
}

/// One frame between its upload and its retirement.
#[derive(Debug)]
struct Frame {
    index: u64,
    locs: Vec<ChunkLoc>,
    pending: Option<Pending>,
}

type Frames = Rc<RefCell<HashMap<u64, Frame>>>;

/// Streams the chunks of `file` to the GPU compressed, decompresses each
/// frame with nvCOMP, runs `stage` over it and hands the stage's output
/// of each frame to `sink(frame, data)` in order. `T` must have the file's
/// element size. Every frame's decompression is checked (statuses, sizes)
/// before its output reaches the sink; a failure stops the run with a
/// typed error after draining the ring.
///
/// # Safety
///
/// Every chunk of `file` must be whole output of nvCOMP's compressor for
/// the file's codec (as [`Compressor`](crate::Compressor) pushed to a
/// [`ChunkFileWriter`](crate::format::ChunkFileWriter)), and the file not
/// altered since by anyone able to craft its checksums: its chunks are
/// decompressed on the GPU, which for some codecs is not safe on corrupt
/// input (see [`Decompressor::decompress`](crate::Decompressor::decompress)).
pub unsafe fn run_compressed<T, R, S, K>(
    gpu: &Gpu,
    nv: &Nvcomp,
    file: &mut ChunkFileReader<R>,
    stage: &mut S,
    config: StreamConfig,
    sink: K,
) -> Result<StreamReport>
where
    T: Element,
    R: Read + Seek,
    S: Stage<T>,
    K: FnMut(u64, &[T]) -> std::result::Result<(), BoxError>,
{
    let _span = tracing::debug_span!(
        "prism.nvcomp.run_compressed",
        frames = config.chunks_per_frame
    )
    .entered();
    let info = file.info();
    let size = std::mem::size_of::<T>();
    if info.element_size as usize != size {
        return Err(Error::InvalidBatch {
            codec: info.codec,
            detail: format!(
                "the file holds elements of {} bytes, the stream's type has {size}",
                info.element_size
            ),
        });
    }
    if config.chunks_per_frame == 0 {
        return Err(Error::ZeroLength {
            what: "chunks per frame",
        });
    }
    let frame_raw = usize::try_from(info.chunk_bytes)
        .ok()
        .and_then(|c| config.chunks_per_frame.checked_mul(c))
        .ok_or_else(|| Error::InvalidBatch {
            codec: info.codec,
            detail: format!(
                "{} chunks of {} bytes per frame overflow the address space",
                config.chunks_per_frame, info.chunk_bytes
            ),
        })?;
    let raw_elems = frame_raw / size;
    let capacity = file
        .max_frame_bytes(config.chunks_per_frame)
        .div_ceil(size)
        .max(raw_elems)
        .max(stage.output_len(raw_elems));
    let mut engine = Engine::<T>::new(
        gpu,
        EngineConfig {
            slots: config.slots,
            capacity,
            buffers_per_slot: 3,
            compute_lanes: 1,
        },
    )?;
    let mut setup = Lane::new(gpu)?;
    let dec = Decompressor::new(
        nv,
        &mut setup,
        info.codec,
        info.chunk_bytes as usize,
        config.chunks_per_frame,
    )?;
    let frames: Frames = Rc::default();
    let mut io = FrameIo {
        file,
        next: 0,
        frame: 0,
        per_frame: config.chunks_per_frame,
        capacity,
        frames: Rc::clone(&frames),
        sink,
        uploaded: 0,
        uncompressed: 0,
    };
    let mut p = Decompress { dec, stage, frames };
    let started = Instant::now();
    let counts = engine.run(
        &mut io,
        &mut IoSlots::new(config.slots),
        &mut p,
        &mut |_| {},
    )?;
    Ok(StreamReport {
        frames: counts.chunks,
        uploaded_bytes: io.uploaded,
        uncompressed_bytes: io.uncompressed,
        output_elements: counts.elems_out,
        wall: started.elapsed(),
    })
}

/// A slot's pinned staging: the compressed frame going up, the output coming down.
#[derive(Debug)]
struct Staging<T: Element> {
    up: PinnedBuffer<T>,
    down: PinnedBuffer<T>,
}

struct FrameIo<'f, R: Read + Seek, K> {
    file: &'f mut ChunkFileReader<R>,
    next: usize,
    frame: u64,
    per_frame: usize,
    capacity: usize,
    frames: Frames,
    sink: K,
    uploaded: u64,
    uncompressed: u64,
}

impl<T, R, K> ChunkIo<T> for FrameIo<'_, R, K>
where
    T: Element,
    R: Read + Seek,
    K: FnMut(u64, &[T]) -> std::result::Result<(), BoxError>,
{
    type Slot = Staging<T>;
    type Error = Error;

    fn make_slot(&mut self, gpu: &Gpu) -> Result<Staging<T>> {
        Ok(Staging {
            up: PinnedBuffer::new(gpu, self.capacity, HostAllocFlags::UPLOAD_ONLY)?,
            down: PinnedBuffer::new(gpu, self.capacity, HostAllocFlags::DEFAULT)?,
        })
    }

    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Staging<T>,
        dev: &mut DeviceBuffer<T>,
        chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        let n = self.file.info().chunks as usize;
        if self.next >= n {
            return Ok(None);
        }
        let count = self.per_frame.min(n - self.next);
        let _span = tracing::trace_span!("prism.nvcomp.read_frame", frame = self.frame).entered();
        let bytes = self.file.frame_bytes(self.next, count)?;
        let words = bytes.div_ceil(std::mem::size_of::<T>());
        // The staging's last use (the previous frame's upload) is waited
        // for, not raced: host writes to pinned memory in flight are refused.
        let dst = as_bytes_mut(slot.up.wait_mut_slice()?);
        let locs = self.file.read_frame(self.next, count, dst)?;
        // The padding of the last word is whatever the slot held: zero it so
        // that the upload reads only initialised bytes.
        dst[bytes..words * std::mem::size_of::<T>()].fill(0);
        let rec = lane.copy_htod_timed(&slot.up, 0, dev, 0, words, timed)?;
        self.uploaded += (words * std::mem::size_of::<T>()) as u64;
        self.uncompressed += locs.iter().map(|l| l.uncompressed as u64).sum::<u64>();
        self.frames.borrow_mut().insert(
            chunk.0,
            Frame {
                index: self.frame,
                locs,
                pending: None,
            },
        );
        self.next += count;
        self.frame += 1;
        Ok(Some((words, rec.into())))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Staging<T>,
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        Ok(lane
            .copy_dtoh_timed(dev, 0, &mut slot.down, 0, len, timed)?
            .into())
    }

    fn retire(&mut self, slot: &mut Staging<T>, chunk: ChunkId, len: usize) -> Result<()> {
        let frame = self
            .frames
            .borrow_mut()
            .remove(&chunk.0)
            .ok_or(Error::ZeroLength {
                what: "frame record (lost)",
            })?;
        // The read-backs were queued before the download, which completed.
        match frame.pending {
            Some(p) => {
                p.wait()?;
            }
            None => {
                return Err(Error::ZeroLength {
                    what: "frame's decompression (never queued)",
                })
            }
        }
        let data = &slot.down.as_slice()?[..len];
        (self.sink)(frame.index, data).map_err(|source| Error::Sink {
            frame: frame.index,
            source,
        })
    }
}

struct Decompress<'s, S> {
    dec: Decompressor,
    stage: &'s mut S,
    frames: Frames,
}

impl<T: Element, S: Stage<T>> ChunkProcessor<T> for Decompress<'_, S> {
    type Error = Error;

    fn process(
        &mut self,
        launch: &mut Launch<'_>,
        bufs: &mut [DeviceBuffer<T>],
        _len: usize,
        chunk: ChunkId,
        _spans: &mut ComputeSpans,
    ) -> Result<ChunkOutputs> {
        let mut frames = self.frames.borrow_mut();
        let frame = frames.get_mut(&chunk.0).ok_or(Error::ZeroLength {
            what: "frame record (lost)",
        })?;
        let raw: usize = frame.locs.iter().map(|l| l.uncompressed).sum();
        let size = std::mem::size_of::<T>();
        if !raw.is_multiple_of(size) {
            return Err(Error::InvalidBatch {
                codec: self.dec.codec(),
                detail: format!(
                    "frame {} expands to {raw} bytes, not whole elements of {size}",
                    frame.index
                ),
            });
        }
        let n = raw / size;
        let (compressed, rest) = bufs.split_at_mut(1);
        let (data, out) = rest.split_at_mut(1);
        // SAFETY: this processor is made only by `run_compressed`, whose
        // caller guarantees the file was written by ChunkFileWriter and not
        // altered; the frame's bytes were read from it and matched its
        // checksums on the way.
        let pending = unsafe {
            self.dec
                .decompress(launch, &compressed[0], &frame.locs, &mut data[0])
        }?;
        frame.pending = Some(pending);
        self.stage
            .gpu(launch, &data[0], &mut out[0], n)
            .map_err(|source| Error::Stage {
                stage: self.stage.name().to_string(),
                frame: frame.index,
                source,
            })?;
        Ok(ChunkOutputs::one(2, self.stage.output_len(n)))
    }
}
