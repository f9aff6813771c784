//! What a run did: counts, times, the bound, and a timeline as a Chrome trace.

use std::fmt;
use std::path::Path;

use serde::Serialize;

/// Which backend ran the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum BackendKind {
    /// A GPU.
    Gpu,
    /// Host threads.
    Host,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Gpu => "GPU",
            Self::Host => "host",
        })
    }
}

/// Time spent in one stage, summed over chunks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageTime {
    /// The stage.
    pub name: String,
    /// Its time, ms (summed over chunks).
    pub ms: f64,
}

/// Statistics accumulated over runs (until `reset_stats`).
///
/// GPU times come from CUDA events around each step (only with timing on);
/// host-backend times from the host clock. `bound_ms` is the largest of
/// total upload, total compute, total download and host staging-copy time:
/// a run can't beat it, and `overlap_efficiency` = bound / wall says how
/// close it came.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PipelineStats {
    /// Which backend ran.
    pub backend: Option<BackendKind>,
    /// The GPU's name (empty on the host).
    pub device: String,
    /// Runs.
    pub runs: u64,
    /// Chunks.
    pub chunks: u64,
    /// Items (items modes).
    pub items: u64,
    /// Bytes in.
    pub bytes_in: u64,
    /// Bytes out.
    pub bytes_out: u64,
    /// Wall time of the runs, ms.
    pub wall_ms: f64,
    /// False when timing was off: the per-step times below are then zero.
    pub timed: bool,
    /// GPU time of the uploads, ms.
    pub upload_ms: f64,
    /// GPU time of the downloads, ms.
    pub download_ms: f64,
    /// Per stage, summed over chunks (on the host, over the threads that
    /// ran them).
    pub stages: Vec<StageTime>,
    /// Time at least one stage was running: on the GPU the union of the
    /// stage spans over the compute streams and a stage graph's branch
    /// streams (kernels of two chunks, or of two branches, may run at once,
    /// so this can be less than the sum of `stages`); on the host
    /// the union over the host threads (chunks run on several threads at
    /// once, so `stages`, summed over threads, can exceed the wall time).
    /// The bound uses this.
    pub compute_busy_ms: f64,
    /// Host time spent copying between pageable memory and pinned staging
    /// (GPU backend, pageable inputs and outputs; measured with timing on or off).
    pub host_copy_ms: f64,
    /// Host time blocked waiting for the GPU to finish a chunk (GPU backend).
    pub host_wait_ms: f64,
    /// Chunk size and ring depth of the last run, and whether the adaptive
    /// configuration chose them.
    pub chunk_bytes: usize,
    /// Ring depth of the last run.
    pub slots: usize,
    /// Whether the last run chose its own chunk size and ring depth.
    pub adaptive: bool,
    /// Chunks whose stages ran as a replayed CUDA graph
    /// ([`PipelineConfig::graphs`](crate::PipelineConfig::graphs)).
    pub graph_launches: u64,
    /// Stage chains captured into a graph (a chain is captured once per
    /// slot and chunk length, then replayed).
    pub graph_captures: u64,
}

impl PipelineStats {
    /// The stages' summed GPU (or host-thread) time, ms.
    pub fn compute_ms(&self) -> f64 {
        self.stages.iter().map(|s| s.ms).sum()
    }

    /// The busiest resource's time: the upload or download stream, the
    /// stages, or (for pageable data) the host threads' staging copies.
    /// 0 when timing was off (no per-step times to compare).
    pub fn bound_ms(&self) -> f64 {
        if !self.timed {
            return 0.0;
        }
        self.upload_ms
            .max(self.download_ms)
            .max(self.compute_busy_ms)
            .max(self.host_copy_ms)
    }

    /// bound / wall (1.0: perfect overlap); 0 when not timed.
    pub fn overlap_efficiency(&self) -> f64 {
        per_wall_ms(self.bound_ms(), self.wall_ms)
    }

    /// Bytes moved both ways per second of wall time, in GB/s.
    pub fn throughput_gbps(&self) -> f64 {
        per_wall_ms((self.bytes_in + self.bytes_out) as f64 / 1e6, self.wall_ms)
    }

    /// What bounds the run: "upload", "compute", "download", "host
    /// staging", or "untimed" when timing was off.
    pub fn bottleneck(&self) -> &'static str {
        let c = self.compute_busy_ms;
        if !self.timed {
            "untimed"
        } else if self.host_copy_ms > self.upload_ms.max(self.download_ms).max(c) {
            "host staging"
        } else if self.upload_ms >= c && self.upload_ms >= self.download_ms {
            "upload"
        } else if self.download_ms >= c {
            "download"
        } else {
            "compute"
        }
    }

    pub(crate) fn add_stage_time(&mut self, name: &str, ms: f64) {
        match self.stages.iter_mut().find(|s| s.name == name) {
            Some(s) => s.ms += ms,
            None => self.stages.push(StageTime {
                name: name.to_owned(),
                ms,
            }),
        }
    }

    /// Adds what a host run measured (its stage times, busy time and
    /// output bytes: `host.rs`'s tally), once the run is known to count.
    pub(crate) fn add_host_run(&mut self, run: &PipelineStats) {
        self.compute_busy_ms += run.compute_busy_ms;
        self.bytes_out += run.bytes_out;
        for st in &run.stages {
            self.add_stage_time(&st.name, st.ms);
        }
    }
}

impl fmt::Display for PipelineStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backend = self.backend.map_or("-".to_owned(), |b| b.to_string());
        writeln!(
            f,
            "prism pipeline stats ({backend} backend{}{})",
            if self.device.is_empty() { "" } else { ", " },
            self.device
        )?;
        writeln!(
            f,
            "  runs {}  chunks {}  items {}  in {:.1} MiB  out {:.1} MiB  wall {:.3} ms  throughput {:.2} GB/s",
            self.runs,
            self.chunks,
            self.items,
            self.bytes_in as f64 / 1048576.0,
            self.bytes_out as f64 / 1048576.0,
            self.wall_ms,
            self.throughput_gbps()
        )?;
        writeln!(
            f,
            "  chunks of {:.2} MiB, {} slots{}",
            self.chunk_bytes as f64 / 1048576.0,
            self.slots,
            if self.adaptive {
                " (chosen by the adaptive configuration)"
            } else {
                ""
            }
        )?;
        if self.graph_launches > 0 || self.graph_captures > 0 {
            writeln!(
                f,
                "  CUDA graphs: {} chunks' stages replayed from {} captures",
                self.graph_launches, self.graph_captures
            )?;
        }
        if !self.timed {
            return writeln!(f, "  (timing off: no per-step times)");
        }
        writeln!(f, "  {:<16} {:>12}", "step", "time ms")?;
        if self.backend == Some(BackendKind::Gpu) {
            writeln!(f, "  {:<16} {:>12.3}", "upload (H2D)", self.upload_ms)?;
        }
        for s in &self.stages {
            writeln!(f, "  {:<16} {:>12.3}", s.name, s.ms)?;
        }
        if self.backend == Some(BackendKind::Gpu) && self.stages.len() > 1 {
            writeln!(
                f,
                "  {:<16} {:>12.3}",
                "(compute busy)", self.compute_busy_ms
            )?;
        }
        if self.backend == Some(BackendKind::Gpu) {
            writeln!(f, "  {:<16} {:>12.3}", "download (D2H)", self.download_ms)?;
            if self.host_copy_ms > 0.0 {
                writeln!(f, "  {:<16} {:>12.3}", "host staging", self.host_copy_ms)?;
            }
            writeln!(f, "  {:<16} {:>12.3}", "host waits", self.host_wait_ms)?;
        }
        writeln!(
            f,
            "  bound {:.3} ms ({}-bound), overlap efficiency (bound / wall) {:.3}",
            self.bound_ms(),
            self.bottleneck(),
            self.overlap_efficiency()
        )
    }
}

/// The stream (or host threads) a span ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SpanKind {
    /// Host-to-device copies.
    Upload,
    /// Kernels.
    Compute,
    /// Device-to-host copies.
    Download,
    /// Host threads copying between pageable memory and pinned staging.
    HostCopy,
    /// The host blocked until the GPU finished a chunk.
    HostWait,
}

/// The [`Span::stream`] of a stage graph's first branch lane.
pub(crate) const FIRST_BRANCH_STREAM: usize = 6;

/// One step of one chunk: what ran, on which lane, when (ms since the run began).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Span {
    /// The chunk (the run's numbering).
    pub chunk: u64,
    /// Which stream (0 upload, 1 and 3 compute, 2 download, 6 and up a
    /// stage graph's branch lanes) or host lane (4 staging copies, 5 waits
    /// for the GPU).
    pub stream: usize,
    /// What kind of step.
    pub lane: SpanKind,
    /// Its name (the stage's, or upload / download).
    pub name: String,
    /// Start, ms.
    pub start_ms: f64,
    /// End, ms.
    pub end_ms: f64,
}

/// The spans of the last timed run with tracing on: the GPU's streams
/// (CUDA event times) and the host's staging copies and waits (host clock,
/// from the same origin, to within microseconds).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timeline {
    /// Every span.
    pub spans: Vec<Span>,
    /// What ran it (the GPU's name), for the trace's process name.
    pub device: String,
    /// The host instant of time 0 (lines up several GPUs' timelines).
    #[serde(skip)]
    pub(crate) origin: Option<std::time::Instant>,
}

impl Timeline {
    /// Chrome trace-event JSON (opens in Perfetto or chrome://tracing): one
    /// process (the device), one thread per stream and per host lane, in a
    /// fixed order, one complete event per step.
    pub fn to_chrome_trace(&self) -> serde_json::Value {
        Self::merged_chrome_trace(&[self])
    }

    /// Several GPUs' timelines as one Chrome trace: one process per GPU
    /// (in the order given), lined up on one host clock.
    pub fn merged_chrome_trace(timelines: &[&Timeline]) -> serde_json::Value {
        let first = timelines.iter().filter_map(|t| t.origin).min();
        let mut events = Vec::new();
        for (i, t) in timelines.iter().enumerate() {
            let shift_ms = match (first, t.origin) {
                (Some(f), Some(o)) => o.saturating_duration_since(f).as_secs_f64() * 1e3,
                _ => 0.0,
            };
            t.chrome_events(i + 1, shift_ms, &mut events);
        }
        serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" })
    }

    fn chrome_events(&self, pid: usize, shift_ms: f64, events: &mut Vec<serde_json::Value>) {
        const THREADS: [(usize, &str); 6] = [
            (1, "upload stream (H2D)"),
            (2, "compute stream 1"),
            (4, "compute stream 2"),
            (3, "download stream (D2H)"),
            (5, "host: staging copies"),
            (6, "host: waits for the GPU"),
        ];
        let process = if self.device.is_empty() {
            "prism".to_owned()
        } else {
            format!("prism on {}", self.device)
        };
        events.push(serde_json::json!(
            {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": process}}
        ));
        events.push(serde_json::json!(
            {"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}}
        ));
        // A stage graph's branch lanes, after the fixed threads.
        let branches = self
            .spans
            .iter()
            .filter_map(|s| s.stream.checked_sub(FIRST_BRANCH_STREAM))
            .max()
            .map_or(0, |b| b + 1);
        let names: Vec<String> = (1..=branches)
            .map(|b| format!("branch stream {b}"))
            .collect();
        let threads = THREADS.iter().map(|&(tid, name)| (tid, name)).chain(
            names
                .iter()
                .enumerate()
                .map(|(b, name)| (FIRST_BRANCH_STREAM + b + 1, name.as_str())),
        );
        for (order, (tid, name)) in threads.enumerate() {
            events.push(serde_json::json!(
                {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}
            ));
            events.push(serde_json::json!(
                {"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": order}}
            ));
        }
        events.extend(self.spans.iter().map(|s| {
            serde_json::json!({
                "name": s.name,
                "cat": "prism",
                "ph": "X",
                "pid": pid,
                "tid": s.stream + 1,
                "ts": (s.start_ms + shift_ms) * 1000.0,
                "dur": (s.end_ms - s.start_ms) * 1000.0,
                "args": {"chunk": s.chunk},
            })
        }));
    }

    /// Writes [`to_chrome_trace`](Self::to_chrome_trace) to `path`.
    pub fn write_chrome_trace(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        let text = serde_json::to_string(&self.to_chrome_trace()).map_err(std::io::Error::other)?;
        std::fs::write(path, text)
    }
}

/// A multi-GPU pipeline's statistics: combined, and each GPU's own
/// (since creation or the last reset).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MultiGpuStats {
    /// Each GPU's statistics, in the pipeline's GPU order (its `device`
    /// names it; `chunks`, `bytes_in`/`bytes_out` say how much it took).
    pub devices: Vec<PipelineStats>,
    /// Runs.
    pub runs: u64,
    /// Chunks over all GPUs.
    pub chunks: u64,
    /// Items (items modes).
    pub items: u64,
    /// Bytes in, over all GPUs.
    pub bytes_in: u64,
    /// Bytes out, over all GPUs.
    pub bytes_out: u64,
    /// Wall time of the runs (all GPUs together).
    pub wall_ms: f64,
    /// Whether the runs were timed.
    pub timed: bool,
}

impl MultiGpuStats {
    /// The joint bound: the busiest GPU's bound (each GPU's steps timed
    /// while all ran, so a host or link they share shows in each). 0 when
    /// timing was off.
    pub fn joint_bound_ms(&self) -> f64 {
        if !self.timed {
            return 0.0;
        }
        self.devices
            .iter()
            .map(PipelineStats::bound_ms)
            .fold(0.0, f64::max)
    }

    /// Joint bound / wall (1.0: every GPU's busiest step ran all the time).
    pub fn overlap_efficiency(&self) -> f64 {
        per_wall_ms(self.joint_bound_ms(), self.wall_ms)
    }

    /// Bytes moved both ways per second of wall time, over all GPUs, GB/s.
    pub fn throughput_gbps(&self) -> f64 {
        per_wall_ms((self.bytes_in + self.bytes_out) as f64 / 1e6, self.wall_ms)
    }

    /// Chunks each GPU took, in GPU order.
    pub fn chunks_per_gpu(&self) -> Vec<u64> {
        self.devices.iter().map(|d| d.chunks).collect()
    }
}

impl fmt::Display for MultiGpuStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} GPU(s): {} run(s), {} chunks, {:.1} MB in, {:.1} MB out, {:.2} ms wall, {:.2} GB/s",
            self.devices.len(),
            self.runs,
            self.chunks,
            self.bytes_in as f64 / 1e6,
            self.bytes_out as f64 / 1e6,
            self.wall_ms,
            self.throughput_gbps()
        )?;
        if self.timed {
            writeln!(
                f,
                "  joint bound {:.2} ms, overlap efficiency {:.2}",
                self.joint_bound_ms(),
                self.overlap_efficiency()
            )?;
        }
        for (i, d) in self.devices.iter().enumerate() {
            writeln!(
                f,
                "  GPU #{i} ({}): {} chunks, {:.1} MB in, bound {:.2} ms ({})",
                d.device,
                d.chunks,
                d.bytes_in as f64 / 1e6,
                d.bound_ms(),
                d.bottleneck()
            )?;
        }
        Ok(())
    }
}

/// A [`ResidentPipeline`](crate::ResidentPipeline)'s statistics (since
/// creation or the last `reset_stats`).
///
/// Host times come from the host clock; GPU times from timed fences
/// (only with `ResidentConfig::timing`), counted once the iteration has
/// completed on the GPU. A graph launch is timed as a whole (timed fences
/// cannot be recorded inside a CUDA graph), so per-stage times exist only
/// for iterations run without a graph.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ResidentStats {
    /// The GPU's name.
    pub device: String,
    /// Iterations queued (failed calls not counted).
    pub iterations: u64,
    /// Iterations launched from a graph captured by an earlier iteration
    /// (with graphs on and nothing changed: all but the first).
    pub replayed: u64,
    /// Graphs captured (the first iteration, and each after a change).
    pub captures: u64,
    /// Captures refused because a stage did something a graph cannot hold
    /// (the iterations then run without a graph).
    pub capture_refusals: u64,
    /// Why the last capture was refused.
    pub refusal: Option<String>,
    /// Host time spent capturing and instantiating graphs, ms.
    pub capture_ms: f64,
    /// Host time spent issuing the iterations (captures excluded), ms.
    pub host_ms: f64,
    /// Whether iterations were timed on the GPU.
    pub timed: bool,
    /// Timed iterations whose GPU time is counted (completed ones).
    pub timed_iterations: u64,
    /// GPU time of those iterations, ms (first op to read-back).
    pub gpu_ms: f64,
    /// GPU time per stage, summed over the timed iterations that ran
    /// without a graph.
    pub stages: Vec<StageTime>,
}

impl ResidentStats {
    /// Mean host time to issue one iteration, µs (captures excluded).
    pub fn host_us_per_iteration(&self) -> f64 {
        if self.iterations == 0 {
            0.0
        } else {
            self.host_ms * 1e3 / self.iterations as f64
        }
    }

    /// Mean GPU time of one iteration, µs; `None` before a timed iteration
    /// completed.
    pub fn gpu_us_per_iteration(&self) -> Option<f64> {
        (self.timed_iterations > 0).then(|| self.gpu_ms * 1e3 / self.timed_iterations as f64)
    }

    pub(crate) fn add_stage_time(&mut self, name: &str, ms: f64) {
        match self.stages.iter_mut().find(|s| s.name == name) {
            Some(s) => s.ms += ms,
            None => self.stages.push(StageTime {
                name: name.to_owned(),
                ms,
            }),
        }
    }
}

impl fmt::Display for ResidentStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "prism resident pipeline stats ({})", self.device)?;
        writeln!(
            f,
            "  iterations {}  replayed from a graph {}  captures {} ({:.3} ms)  refused {}",
            self.iterations, self.replayed, self.captures, self.capture_ms, self.capture_refusals
        )?;
        if let Some(r) = &self.refusal {
            writeln!(f, "  last refusal: {r}")?;
        }
        write!(
            f,
            "  host {:.2} us per iteration",
            self.host_us_per_iteration()
        )?;
        match self.gpu_us_per_iteration() {
            Some(g) => writeln!(
                f,
                "  GPU {g:.2} us per iteration ({} timed)",
                self.timed_iterations
            )?,
            None if self.timed => writeln!(f, "  GPU: no timed iteration completed yet")?,
            None => writeln!(f, "  GPU: untimed")?,
        }
        for s in &self.stages {
            writeln!(f, "  {:<24} {:>10.3} ms", s.name, s.ms)?;
        }
        Ok(())
    }
}

/// `x / wall_ms`, 0 for a run of no wall time.
fn per_wall_ms(x: f64, wall_ms: f64) -> f64 {
    if wall_ms > 0.0 {
        x / wall_ms
    } else {
        0.0
    }
}
