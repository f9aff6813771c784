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
    /// [`output_len`](Self::output_len)`(input.len())` elements of `output`
    /// (GPU backend only), and returns that count. Nothing crosses the
    /// link: the whole input is one chunk, copied into a scratch buffer,
    /// run through the stages there and copied into `output`, all queued
    /// on the manager's own lane. Returns once queued: like every prism op,
    /// later uses of `output` on any lane (and `DeviceBuffer::export`'s
    /// consumers) wait for it on the GPU; nothing waits on the host. Two
    /// scratch buffers of the largest length the chain meets are kept for
    /// the next call.
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
        let order = self.order();
        self.check_stages(&order)?;
        self.close_idle_session()?;
        let n = input.len();
        let (out_len, largest) = self.walk_lengths(&order, n, 0)?;
        if output.len() < out_len {
            return Err(Error::OutputLength {
                expected: out_len,
                actual: output.len(),
            });
        }
        if out_len == 0 {
            return Ok(0);
        }
        let gpu = self
            .gpu
            .clone()
            .ok_or(Error::Config("no GPU on this manager"))?;
        let runs = &mut self.device;
        if runs.lane.is_none() {
            runs.lane = Some(Lane::new(&gpu)?);
        }
        if runs.scratch.len() < 2 || runs.scratch[0].len() < largest {
            runs.scratch.clear(); // freed once their last uses are done
            let lane = runs.lane.as_mut().ok_or(Error::Config("no lane"))?;
            for _ in 0..2 {
                runs.scratch.push(DeviceBuffer::zeroed(lane, largest)?);
            }
        }
        let lane = runs.lane.as_mut().ok_or(Error::Config("no lane"))?;
        let mut launch = lane.launch();
        launch.copy_dtod(input, 0, &mut runs.scratch[0], 0, n)?;
        let mut chain = StageChain {
            stages: &mut self.stages,
            order: &order,
            capacity: largest,
            base: 0,
            global: None,
            graphs: None,
        };
        let (len, cur) = chain.process_direct(
            &mut launch,
            &mut runs.scratch,
            n,
            ChunkId(0),
            &mut ComputeSpans::untimed(),
        )?;
        if len > 0 {
            launch.copy_dtod(&runs.scratch[cur], 0, output, 0, len)?;
        }
        Ok(len)
    }
}
