//! Whole runs of a stage graph on a manager (pageable, pinned, tagged
//! stream): the checks and clock of `dag.rs` and `dag_stream.rs`, then
//! the ring (`ring::run_graph_slices`, `run_graph_pinned`, `TaggedRun`)
//! on the GPU or the host backend's graph runs. Above the ring and the
//! graph modules, so neither imports the other's callers.

use prism_stream::nvtx::Range;
use prism_stream::{Element, PinnedBuffer};

use crate::dag::StageGraph;
use crate::dag_stream::{TaggedSink, TaggedSource};
use crate::error::{Error, Result};
use crate::ring::TaggedRun;
use crate::source::StreamCounts;

impl<T: Element> crate::PipelineStageManager<T> {
    /// Streams `input` through `graph`: output `i` of the graph (in the
    /// order of [`StageGraph::output`]) goes to `outputs[i]`, which must
    /// hold exactly [`graph_output_lens`](Self::graph_output_lens)`(..)[i]`
    /// elements. On the GPU, chunks are staged through pinned memory by
    /// the host threads; on the host backend, chunks run on the host
    /// threads, several at once.
    pub fn run_graph(
        &mut self,
        graph: &mut StageGraph<T>,
        input: &[T],
        outputs: &mut [&mut [T]],
    ) -> Result<()> {
        let _span = tracing::debug_span!("prism.pipeline.run_graph", n = input.len()).entered();
        let _nvtx = Range::new("run_graph");
        let lens: Vec<usize> = outputs.iter().map(|o| o.len()).collect();
        let run = self.begin_graph(graph, input.len(), &lens)?;
        let started = std::time::Instant::now();
        if input.is_empty() {
            self.finish_run(started, 0, 0, 0, 0);
            return Ok(());
        }
        match self.backend {
            crate::BackendKind::Gpu => {
                let plan = run.chunks.clone();
                let counts = crate::ring::run_graph_slices(
                    crate::ring::Devices::one(self),
                    std::slice::from_mut(graph),
                    std::slice::from_ref(&run),
                    plan,
                    input,
                    outputs,
                );
                let c = counts.map_err(crate::ring::Failure::into_error)?[0];
                self.finish_run(started, c.chunks, 0, c.elems_in, c.elems_out);
            }
            crate::BackendKind::Host => {
                let chunks = self.run_graph_host(graph, &run, input, outputs)?;
                self.finish_run(started, chunks, 0, input.len() as u64, 0);
            }
        }
        Ok(())
    }

    /// Streams a pinned input through `graph` into pinned outputs (one per
    /// graph output, as [`run_graph`](Self::run_graph)), with no staging
    /// copies (GPU backend only). Host reads of an output wait for its
    /// last download.
    pub fn run_graph_pinned(
        &mut self,
        graph: &mut StageGraph<T>,
        input: &PinnedBuffer<T>,
        outputs: &mut [&mut PinnedBuffer<T>],
    ) -> Result<()> {
        let _span =
            tracing::debug_span!("prism.pipeline.run_graph_pinned", n = input.len()).entered();
        let _nvtx = Range::new("run_graph_pinned");
        if self.backend != crate::BackendKind::Gpu {
            return Err(Error::Unsupported {
                stage: "run_graph_pinned".into(),
                backend: "host",
            });
        }
        let lens: Vec<usize> = outputs.iter().map(|o| o.len()).collect();
        let run = self.begin_graph(graph, input.len(), &lens)?;
        let started = std::time::Instant::now();
        if input.is_empty() {
            self.finish_run(started, 0, 0, 0, 0);
            return Ok(());
        }
        let plan = run.chunks.clone();
        let graphs = std::slice::from_mut(graph);
        let counts = crate::ring::run_graph_pinned(
            crate::ring::Devices::one(self),
            graphs,
            std::slice::from_ref(&run),
            plan,
            input,
            outputs,
        );
        let c = counts.map_err(crate::ring::Failure::into_error)?[0];
        self.finish_run(started, c.chunks, 0, c.elems_in, c.elems_out);
        Ok(())
    }

    /// Streams a tagged source through `graph`: each chunk (at most one
    /// chunk of this manager's size, as the source cuts it) runs through
    /// every node, and output `i`'s part of it goes to `sinks[i]` with the
    /// chunk's metadata, in input order (one sink per output of the
    /// graph). A source failure ends the input: the chunks before it still
    /// reach the sinks, then the run returns the error. Returns what moved
    /// (`elements_out` over every output).
    pub fn run_graph_stream<M, S, K>(
        &mut self,
        graph: &mut StageGraph<T>,
        source: S,
        sinks: &mut [K],
    ) -> Result<StreamCounts>
    where
        S: TaggedSource<T, M>,
        K: TaggedSink<T, M>,
    {
        let _span = tracing::debug_span!("prism.pipeline.run_graph_stream").entered();
        let _nvtx = Range::new("run_graph_stream");
        let run = self.begin_graph_stream(graph, sinks.len())?;
        let started = std::time::Instant::now();
        match self.backend {
            crate::BackendKind::Gpu => {
                // One device on this thread: the source, sinks and
                // metadata need not be `Send` (the same per-device run as
                // several GPUs').
                let tagged = TaggedRun::new(source, sinks, run.chunk, self.slots());
                let graph = std::sync::Mutex::new(graph);
                let counts = crate::ring::drive_one(self, &|_, d, global| {
                    tagged.device(d, global, &graph, &run)
                });
                let counts = counts.map_err(crate::ring::Failure::into_error);
                let (_, failed) = tagged.finish();
                let counts = counts?;
                self.finish_run(started, counts.chunks, 0, counts.elems_in, counts.elems_out);
                if let Some(e) = failed {
                    return Err(e);
                }
                Ok(StreamCounts::from(counts))
            }
            crate::BackendKind::Host => {
                let (counts, failed) = self.run_graph_stream_host(graph, &run, source, sinks)?;
                self.finish_run(started, counts.chunks, 0, counts.elements_in, 0);
                match failed {
                    Some(e) => Err(e),
                    None => Ok(counts),
                }
            }
        }
    }
}
