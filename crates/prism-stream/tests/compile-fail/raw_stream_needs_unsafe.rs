// Work queued on the raw stream is invisible to prism's ordering.
use prism_stream::{Gpu, Lane};

fn main() {
    let gpu = Gpu::open(0).unwrap();
    let lane = Lane::new(&gpu).unwrap();
    let _raw = lane.cuda_stream();
}
