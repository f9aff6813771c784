//! A user who already holds data on the GPU as cudarc objects: their
//! `CudaSlice` and their `CudaStream` (of their own `CudaContext` on the
//! same primary context) go to prism, the user's pipeline stage
//! (`prism_tests::ScaledGroupSum`, its GPU form) runs on a lane on their
//! stream, and the result comes back as a `CudaSlice` their cudarc code
//! reads on that stream. No copy through the host; the output is compared
//! bit for bit with the CPU reference. GPU-gated.

use prism_pipeline::Stage;
use prism_stream::cudarc::driver::CudaContext;
use prism_stream::{DeviceBuffer, Lane};
use prism_testing::{gpu_or_skip, random_f32, scaled};
use prism_tests::{assert_same_bits, ScaledGroupSum};

#[test]
fn gpu_cudarc_slice_through_a_stage_on_the_users_stream_and_back() {
    let Some(ctx) = gpu_or_skip("gpu_cudarc_slice_through_a_stage_on_the_users_stream_and_back")
    else {
        return;
    };
    let gpu = ctx.gpu().clone();
    // The user's cudarc side.
    let cuda = CudaContext::new(0).unwrap();
    let stream = cuda.new_stream().unwrap();
    let n = scaled((1 << 22) + 7, (1 << 14) + 7);
    let input = random_f32(0xC0DA, n);
    let x = stream.clone_htod(&input).unwrap();

    // To prism: the slice (which gives up its handle to the stream), then
    // the stream itself, whose upload runs before the lane's kernels.
    let x = DeviceBuffer::from_cuda_slice(&gpu, x).unwrap();
    let mut lane = Lane::from_cuda_stream(&gpu, stream).unwrap();
    let mut stage = ScaledGroupSum {
        group: 16,
        scale: 0.5,
        offset: 1.0,
    };
    let mut y = DeviceBuffer::<f32>::zeroed(&mut lane, stage.output_len(n)).unwrap();
    stage.gpu(&mut lane.launch(), &x, &mut y, n).unwrap();

    // Back to cudarc: the stream, then the result on it.
    let stream = lane.into_cuda_stream().unwrap();
    let y = y.into_cuda_slice(&stream).unwrap();
    let got = stream.clone_dtoh(&y).unwrap();
    assert_same_bits(
        "ScaledGroupSum over a CudaSlice",
        &got,
        &stage.reference(&input, n),
    );
}
