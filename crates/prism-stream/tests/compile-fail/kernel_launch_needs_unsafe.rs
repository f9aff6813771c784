// The kernel's parameters must match its arguments: only that is unsafe.
use prism_stream::cudarc::driver::LaunchConfig;
use prism_stream::cudarc::nvrtc::Ptx;
use prism_stream::{DeviceBuffer, Gpu, Lane};

fn main() {
    let gpu = Gpu::open(0).unwrap();
    let kernel = gpu.load_module(Ptx::from_src("")).unwrap().kernel("k").unwrap();
    let mut lane = Lane::new(&gpu).unwrap();
    let mut buf = DeviceBuffer::<f32>::zeroed(&mut lane, 16).unwrap();
    let mut scope = lane.launch();
    let call = scope.kernel(&kernel).arg_mut(&mut buf);
    call.launch(LaunchConfig::for_num_elems(16)).unwrap();
}
