// Safe code never gets device memory nobody wrote.
use prism_stream::{DeviceBuffer, Gpu};

fn main() {
    let gpu = Gpu::open(0).unwrap();
    let _stale = DeviceBuffer::<f32>::uninit(&gpu, 1024);
}
