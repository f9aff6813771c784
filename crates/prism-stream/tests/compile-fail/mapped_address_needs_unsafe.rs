// Issue #21, hole 1: a pinned buffer's mapped device address lets GPU work
// write host memory that safe code reads through `as_slice`; it is
// reachable only through `unsafe`.
use prism_stream::{Gpu, HostAllocFlags, PinnedBuffer};

fn main() {
    let gpu = Gpu::open(0).unwrap();
    let buf = PinnedBuffer::<f32>::new(&gpu, 16, HostAllocFlags::DEFAULT).unwrap();
    let _address = buf.mapped_ptr();
}
