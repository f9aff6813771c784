//! prism-pipeline: stage composition and the streaming run (issue 5).
//!
//! Not built yet: this crate is an empty placeholder in the workspace. The
//! layers it will compose exist: `prism_stream` (context, streams, events,
//! tracked buffers, coordinator) and `prism_buffer` (the GPU triple buffer).

#![forbid(unsafe_code)]
