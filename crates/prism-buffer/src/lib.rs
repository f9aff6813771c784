//! Triple buffering for prism.
//!
//! This crate holds independent rings and triple buffers:
//!
//! * **The ring engine** ([`Engine`], in [`engine`]) is the one GPU
//!   implementation of the slot ring: while chunk `k` is being downloaded,
//!   chunk `k + 1` is processed and chunk `k + 2` is uploaded, each slot
//!   having its own device buffers. Its bookkeeping is [`SlotRing`] (in
//!   [`ring`]): a CPU-only state machine that decides which slot the next
//!   Upload / Process / Download goes to, tracks each issued step through a
//!   [`RingFence`] (a CUDA event in production), reports slot states from
//!   *observed* fence completions, and hands outputs back in chunk order.
//!   Being generic over the fence, it is tested entirely on the CPU. How
//!   chunks get in and out is a [`ChunkIo`], what runs on them a
//!   [`ChunkProcessor`]; prism-pipeline's streaming modes are built on it.
//!
//! * **The GPU triple buffer** ([`TripleBuffer`]) is the engine driven by
//!   hand, one step at a time.
//!
//! * **The host triple buffer** ([`cpu::TripleBuffer`]) hands values from one
//!   producer thread to one consumer thread with latest-value semantics:
//!   neither side waits for the other beyond a pointer swap, and the
//!   consumer always sees the newest completely written value.
//!
//! * **The broadcast ring** ([`broadcast::Broadcast`]) hands chunks from one
//!   host writer to several readers at their own pace: guaranteed readers
//!   hold chunks back, lossy ones skip what they missed, and in real-time
//!   mode the writer never waits (the oldest unread chunk is dropped and
//!   counted). Every chunk carries its sequence metadata.
//!
//! The crate contains no `unsafe` code.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod broadcast;
pub mod cpu;
pub mod engine;
mod error;
mod gpu;
pub mod ring;
mod slot;

pub use engine::ChunkSpan;
pub use engine::{ChunkIo, ChunkOutputs, ChunkProcessor, Engine, EngineConfig};
pub use gpu::{GpuTripleBufferExt, TripleBuffer};

pub use error::Error;
pub use ring::{
    ChunkId, RingFence, SlotId, SlotRing, SlotSnapshot, SlotState, Step, DEFAULT_SLOTS, MAX_SLOTS,
    MIN_SLOTS,
};
