//! The driver layer: driver calls that need no ordering decision, each with
//! its `unsafe` block and its error mapping, and nothing else. It decides
//! nothing about who waits for whom (that is [`order`](crate::order) and
//! [`lane`](crate::lane)); it only makes calls whose preconditions its own
//! types uphold.
//!
//! - `ctx`: which context is current on the calling thread
//!   (`make_current`, `current_for_now`), waits a stream capture
//!   elsewhere would refuse (`relaxed_on_capture`), and the blocking
//!   context and stream waits built on it.
//! - `event`: CUDA events. An `Event` is alive for as long as the value
//!   exists (its pool destroys only idle events, and outlives every taken
//!   one), so recording, querying, waiting and timing through it are safe
//!   calls.
//! - `memory`: device and page-locked host memory: allocation, freeing,
//!   registration in place, mapped addresses, what the driver knows of an
//!   address another library handed over, and out-of-memory errors naming
//!   what was being allocated.
//! - `module`: prism's own kernels in a context: where they come from
//!   (launchers or PTX), the PTX module once loaded, and unloading a module
//!   only once its context has finished its work.
//!
//! The calls queued on a stream (copies, memsets, kernel launches, graph
//! launches) are still made in their own modules (`copy`, `ops`,
//! `kernels`, `capture`), inside `Lane::enqueue`'s closure: moving them
//! here is the next step of this layer.

mod ctx;
mod event;
mod memory;
mod module;

pub(crate) use ctx::{ctx_synchronize, stream_context, stream_priority_range, stream_synchronize};
pub(crate) use event::{Event, EventPool};
pub(crate) use memory::{
    access_flags, device_alloc, device_free, host_alloc, host_free, host_known_to_driver,
    host_register, host_unregister, mapped_address, pointer_facts, AllocFor,
};
pub(crate) use module::{code_message, KernelState, ModuleHold, PtxKernels};
