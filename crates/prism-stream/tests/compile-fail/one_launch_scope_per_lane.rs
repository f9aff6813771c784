// A lane queues through one scope at a time (its wait clock is its own).
use prism_stream::{Gpu, Lane};

fn main() {
    let gpu = Gpu::open(0).unwrap();
    let mut lane = Lane::new(&gpu).unwrap();
    let mut a = lane.launch();
    let mut b = lane.launch();
    a.spin(1).unwrap();
    b.spin(1).unwrap();
}
