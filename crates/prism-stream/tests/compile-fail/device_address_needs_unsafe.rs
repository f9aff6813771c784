// Issue #21, hole 1: a buffer's raw device address, in safe code, can be
// handed to cudarc's safe copies (any type can implement cudarc's safe
// `DevicePtrMut`), which neither wait for prism's queued work nor tell
// prism about theirs. The address is reachable only through `unsafe`.
use prism_stream::{DeviceBuffer, Gpu, Lane};

fn main() {
    let gpu = Gpu::open(0).unwrap();
    let mut lane = Lane::new(&gpu).unwrap();
    let buf = DeviceBuffer::<f32>::zeroed(&mut lane, 16).unwrap();
    let _address: u64 = buf.device_ptr();
}
