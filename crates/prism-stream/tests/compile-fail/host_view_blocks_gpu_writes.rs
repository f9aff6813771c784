// A host view of a pinned buffer keeps GPU writes into it from being queued.
use prism_stream::{DeviceBuffer, Gpu, HostAllocFlags, Lane, PinnedBuffer};

fn main() {
    let gpu = Gpu::open(0).unwrap();
    let mut lane = Lane::new(&gpu).unwrap();
    let dev = DeviceBuffer::<f32>::zeroed(&mut lane, 4).unwrap();
    let mut out = PinnedBuffer::<f32>::new(&gpu, 4, HostAllocFlags::DEFAULT).unwrap();
    let view = out.as_slice().unwrap();
    lane.copy_dtoh(&dev, 0, &mut out, 0, 4).unwrap();
    println!("{}", view[0]);
}
