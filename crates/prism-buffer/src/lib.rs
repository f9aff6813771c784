//! Triple buffering for prism.
//!
//! This crate holds two independent triple buffers:
//!
//! * **The GPU triple buffer** streams chunks through the device: while chunk
//!   `k` is being downloaded, chunk `k + 1` is processed and chunk `k + 2` is
//!   uploaded, each slot having its own device buffers. Its bookkeeping is
//!   [`SlotRing`] (in [`ring`]): a CPU-only state machine that decides which
//!   slot the next Upload / Process / Download goes to, tracks each issued
//!   step through a [`Fence`] (a CUDA event in production), reports slot
//!   states from *observed* fence completions, and hands outputs back in
//!   chunk order. Being generic over the fence, it is tested entirely on the
//!   CPU. The layer that owns the per-slot device buffers, the streams and
//!   the CUDA events, and drives a `SlotRing`, is the `gpu` module (built on
//!   `prism-stream`).
//!
//! * **The host triple buffer** ([`cpu::TripleBuffer`]) hands values from one
//!   producer thread to one consumer thread with latest-value semantics:
//!   neither side ever blocks the other and the consumer always sees the
//!   newest completely written value.
//!
//! The crate contains no `unsafe` code.

#![forbid(unsafe_code)]

pub mod cpu;
pub mod engine;
mod error;
mod gpu;
pub mod ring;

pub use engine::{ChunkIo, ChunkProcessor, Engine, EngineConfig};
pub use gpu::{GpuTripleBufferExt, StepSpan, TripleBuffer};

pub use error::Error;
pub use ring::{
    ChunkId, Fence, SlotId, SlotRing, SlotSnapshot, SlotState, Step, DEFAULT_SLOTS, MAX_SLOTS,
    MIN_SLOTS,
};
