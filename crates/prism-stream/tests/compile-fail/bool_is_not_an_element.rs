// Device bytes other than 0 and 1 would become `bool`s: `bool` is no Element.
use prism_stream::{Gpu, HostAllocFlags, PinnedBuffer};

fn main() {
    let gpu = Gpu::open(0).unwrap();
    let _flags = PinnedBuffer::<bool>::new(&gpu, 4, HostAllocFlags::DEFAULT);
}
