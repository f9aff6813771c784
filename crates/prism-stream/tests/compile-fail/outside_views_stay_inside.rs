// A view of a prism buffer made for outside work (a cudarc `DevicePtr`)
// cannot leave the closure: used later, on any stream, it would escape
// prism's ordering.
use prism_stream::{DeviceBuffer, Gpu, Lane};

fn main() {
    let gpu = Gpu::open(0).unwrap();
    let mut lane = Lane::new(&gpu).unwrap();
    let buf = DeviceBuffer::<f32>::zeroed(&mut lane, 16).unwrap();
    let mut outside = lane.outside();
    let x = outside.read(&buf);
    // SAFETY: the closure enqueues nothing.
    let escaped = unsafe { outside.run(|w| w.view(x)) }.unwrap();
    drop(escaped);
}
