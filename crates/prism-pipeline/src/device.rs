//! Runs over data already on the GPU: the stage chain from one device
//! buffer into another, with nothing crossing the link (a tensor another
//! library handed over through DLPack, a buffer an earlier run left on the
//! device).

use prism_buffer::engine::ComputeSpans;
use prism_buffer::ring::ChunkId;
use prism_stream::{DeviceBuffer, Element, Lane};

use crate::error::{Error, Result};
use crate::gpu::StageChain;
use crate::stats::BackendKind;
use crate::PipelineStageManager;

/// What device runs keep between calls: their lane and two scratch
/// buffers the stages read and write in turn.
#[derive(Debug)]
pub(crate) struct DeviceRuns<T: Element> {
    lane: Option<Lane>,
    scratch: Vec<DeviceBuffer<T>>,
}

impl<T: Element> Default for DeviceRuns<T> {
    fn default() -> Self {
        Self {
            lane: None,
            scratch: Vec::new(),
        }
    }
}

impl<T: Element> PipelineStageManager<T> {
    /// Runs the stages over all of `input`, device memory of this
    /// manager's GPU, into the first
    /// [`total_output_len`](Self::total_output_len)`(input.len())` elements
    /// of `output` (GPU backend only), and returns that count: the same
    /// chunks and the same output as [`run`](Self::run) over the same
    /// data, with nothing crossing the link. Each chunk is copied into a
    /// scratch buffer, run through the stages there and copied into its
    /// place in `output`, all queued on the manager's own lane. Returns
    /// once queued: like every prism op, later uses of `output` on any lane
    /// (and `DeviceBuffer::export`'s consumers) wait for it on the GPU;
    /// nothing waits on the host. The two scratch buffers are kept for the
    /// next call.
    ///
    /// Device runs are not in [`get_stats`](Self::get_stats) (they cross
    /// no link, and their GPU time would need a host wait) and do not
    /// replay CUDA graphs.
    ///
    /// Errors: `output` shorter than the stages produce (`OutputLength`);
    /// a stage without a GPU form (`Unsupported`); buffers of another GPU
    /// context, out of memory, a stage's own error (as from `run`).
    pub fn run_device(
        &mut self,
        input: &DeviceBuffer<T>,
        output: &mut DeviceBuffer<T>,
    ) -> Result<usize> {
        let _span = tracing::debug_span!("prism.pipeline.run_device", n = input.len()).entered();
        let _nvtx = prism_stream::nvtx::Range::new("run_device");
        if self.backend != BackendKind::Gpu {
            return Err(Error::Unsupported {
                stage: "run_device".into(),
                backend: "host",
            });
        }
        self.effective = None;
        let order = self.order();
        self.check_stages(&order)?;
        self.close_idle_session()?;
        let n = input.len();
        let total = self.checked_total_output_len(&order, n)?;
        if output.len() < total {
            return Err(Error::OutputLength {
                expected: total,
                actual: output.len(),
            });
        }
        if total == 0 {
            return Ok(0);
        }
        let chunk = self.chunk_elems();
        let capacity = self.capacity(&order)?;
        let gpu = self
            .gpu
            .clone()
            .ok_or(Error::Config("no GPU on this manager"))?;
        let runs = &mut self.device;
        if runs.lane.is_none() {
            runs.lane = Some(Lane::new(&gpu)?);
        }
        let lane = runs.lane.as_mut().ok_or(Error::Config("no lane"))?;
        if runs.scratch.len() < 2 || runs.scratch[0].len() < capacity {
            runs.scratch.clear(); // freed once their last uses are done
            for _ in 0..2 {
                runs.scratch.push(DeviceBuffer::zeroed(lane, capacity)?);
            }
        }
        let mut launch = lane.launch();
        let mut chain = StageChain {
            stages: &mut self.stages,
            order: &order,
            capacity,
            base: 0,
            global: None,
            graphs: None,
        };
        let (mut at, mut written) = (0usize, 0usize);
        let mut index = 0u64;
        while at < n {
            let len = chunk.min(n - at);
            launch.copy_dtod(input, at, &mut runs.scratch[0], 0, len)?;
            let (out, cur) = chain.process_direct(
                &mut launch,
                &mut runs.scratch,
                len,
                ChunkId(index),
                &mut ComputeSpans::untimed(),
            )?;
            if out > 0 {
                launch.copy_dtod(&runs.scratch[cur], 0, output, written, out)?;
            }
            at += len;
            written += out;
            index += 1;
        }
        Ok(written)
    }
}
