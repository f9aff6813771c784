//! The one error type of prism-pipeline.

/// Errors a stage returns: anything that converts into a boxed error.
pub type StageError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in prism-pipeline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// From the GPU layer (no driver, out of memory, a kernel fault, ...).
    #[error(transparent)]
    Stream(#[from] prism_stream::Error),
    /// From the slot ring.
    #[error(transparent)]
    Buffer(#[from] prism_buffer::Error),
    /// A stage failed; the run stopped after in-flight chunks drained.
    #[error("stage {stage:?} failed on chunk {chunk}: {source}")]
    Stage {
        /// The failing stage.
        stage: String,
        /// The chunk it failed on.
        chunk: u64,
        #[source]
        /// The stage's error.
        source: StageError,
    },
    /// A stage has no implementation for the backend in use.
    #[error("stage {stage:?} has no {backend} implementation")]
    Unsupported {
        /// The stage.
        stage: String,
        /// The backend it lacks.
        backend: &'static str,
    },
    /// `set_order` with an index past the stages.
    #[error("stage order names stage {index}, but only {count} stage(s) were added")]
    UnknownStage {
        /// The index given.
        index: usize,
        /// Stages added.
        count: usize,
    },
    /// `set_order` naming one stage twice.
    #[error("stage order names stage {index} twice")]
    RepeatedStage {
        /// The index given twice.
        index: usize,
    },
    /// `set_order` with no stage, or a run with no stage.
    #[error("the pipeline has no stage to run")]
    NoStages,
    /// The output sink does not match the output the stages produce.
    #[error("output holds {actual} elements, but the stages produce {expected}")]
    OutputLength {
        /// Elements the stages produce.
        expected: usize,
        /// Elements the output holds.
        actual: usize,
    },
    /// Items of the streaming run must fit one chunk each.
    #[error("item {item} has {len} elements, more than a chunk ({chunk})")]
    ItemTooLong {
        /// Its index among the items.
        item: usize,
        /// Its length.
        len: usize,
        /// Elements per chunk.
        chunk: usize,
    },
    /// A configuration value out of range.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// A host-backend thread panicked outside a stage.
    #[error("a host backend thread panicked")]
    WorkerPanicked,
    /// A stage panicked; the run stopped after in-flight chunks drained.
    #[error("stage {stage:?} panicked on chunk {chunk}: {message}")]
    StagePanicked {
        /// The stage.
        stage: String,
        /// The chunk.
        chunk: u64,
        /// The panic's message.
        message: String,
    },
    /// A stream's source failed; the chunks before it were delivered,
    /// nothing after it was.
    #[error("the source failed at chunk {chunk}: {source}")]
    Source {
        /// The chunk the source was filling.
        chunk: u64,
        #[source]
        /// The source's error.
        source: crate::source::BoxError,
    },
    /// A stream's source panicked (as [`Error::Source`]).
    #[error("the source panicked at chunk {chunk}: {message}")]
    SourcePanicked {
        /// The chunk.
        chunk: u64,
        /// The panic's message.
        message: String,
    },
    /// A stream's sink failed on a chunk; the run stopped, in-flight chunks
    /// drained without being delivered.
    #[error("the sink failed on chunk {chunk}: {source}")]
    Sink {
        /// The chunk.
        chunk: u64,
        #[source]
        /// The sink's error.
        source: crate::source::BoxError,
    },
    /// A stream's sink panicked (as [`Error::Sink`]).
    #[error("the sink panicked on chunk {chunk}: {message}")]
    SinkPanicked {
        /// The chunk.
        chunk: u64,
        /// The panic's message.
        message: String,
    },
    /// A multi-GPU run failed on one GPU (the others drained what they had
    /// in flight and stopped).
    #[error("GPU {ordinal}{}: {source}", chunk.map(|c| format!(", chunk {c}")).unwrap_or_default())]
    Device {
        /// The failing GPU's ordinal.
        ordinal: usize,
        /// The chunk it failed on (the run's numbering), when known: the
        /// one named by the error, else the oldest the GPU had in flight.
        chunk: Option<u64>,
        #[source]
        /// The GPU's error.
        source: Box<Error>,
    },
    /// The same GPU was given twice to a multi-GPU pipeline.
    #[error("GPU {ordinal} is listed twice")]
    DuplicateGpu {
        /// The ordinal listed twice.
        ordinal: usize,
    },
    /// A pinned buffer that other GPUs must copy from or to was not
    /// allocated portable (`HostAllocFlags { portable: true, .. }`).
    #[error("the pinned {what} belongs to GPU {owner} and is not portable: allocate it with HostAllocFlags::PORTABLE for a multi-GPU run")]
    NotPortable {
        /// "input" or "output".
        what: &'static str,
        /// The GPU whose context allocated it.
        owner: usize,
    },
    /// `execute_iteration` chunks are still in flight: `flush` them before
    /// a whole run or a configuration change.
    #[error("{pending} execute_iteration chunk(s) are still in flight: call flush() first")]
    IterationPending {
        /// Chunks in flight.
        pending: usize,
    },
    /// A stage of a [`ResidentPipeline`](crate::ResidentPipeline) failed or
    /// panicked (a panic's message is the source). Without a graph the
    /// stages before it were queued and run; while capturing a graph,
    /// nothing ran.
    #[error("resident stage {stage:?} failed in iteration {iteration}: {source}")]
    ResidentStage {
        /// The failing stage.
        stage: String,
        /// The iteration it failed in (counted from 0, failed ones included).
        iteration: u64,
        #[source]
        /// The stage's error.
        source: StageError,
    },
    /// The closure that builds a [`ResidentPipeline`](crate::ResidentPipeline)'s
    /// state failed (its error is the source).
    #[error("the resident pipeline's state could not be built: {source}")]
    ResidentInit {
        #[source]
        /// The closure's error.
        source: StageError,
    },
    /// A value was asked of an iteration that reads nothing back.
    #[error("the iteration reads nothing back: call ResidentPipeline::set_readback before execute_iteration")]
    NoReadback,
    /// A stage graph with no output (`StageGraph::output` never called).
    #[error("the stage graph has no output: mark at least one node with StageGraph::output")]
    NoOutputs,
    /// A node id of another graph, or past this one's nodes.
    #[error("node {index} is not a node of this graph ({nodes} nodes)")]
    UnknownNode {
        /// The node's index in its own graph.
        index: usize,
        /// Nodes of this graph.
        nodes: usize,
    },
    /// A graph run given a different number of destinations than the
    /// graph has outputs.
    #[error("the graph has {expected} output(s), but the run was given {actual}")]
    OutputCount {
        /// Outputs of the graph.
        expected: usize,
        /// Destinations given.
        actual: usize,
    },
    /// A graph run's destination whose length is not its output's.
    #[error("output {output} holds {actual} elements, but the graph produces {expected}")]
    GraphOutputLength {
        /// The output's index.
        output: usize,
        /// Elements the graph produces for it.
        expected: usize,
        /// Elements the destination holds.
        actual: usize,
    },
    /// A multi-GPU graph run given another number of graphs than GPUs.
    #[error(
        "the pipeline has {expected} GPU(s), but the run was given {actual} graph(s): one per GPU"
    )]
    GraphsPerGpu {
        /// GPUs of the pipeline.
        expected: usize,
        /// Graphs given.
        actual: usize,
    },
    /// A graph needing more device buffers per slot (values alive at once)
    /// than a ring slot may hold.
    #[error(
        "the graph needs {buffers} device buffers per slot at once; a slot holds at most {max}"
    )]
    GraphTooWide {
        /// Buffers the graph needs.
        buffers: usize,
        /// The most a slot holds.
        max: usize,
    },
}

impl Error {
    /// The chunk this error names, if any.
    pub fn chunk(&self) -> Option<u64> {
        match self {
            Error::Stage { chunk, .. }
            | Error::StagePanicked { chunk, .. }
            | Error::Source { chunk, .. }
            | Error::SourcePanicked { chunk, .. }
            | Error::Sink { chunk, .. }
            | Error::SinkPanicked { chunk, .. } => Some(*chunk),
            Error::Device { chunk, .. } => *chunk,
            _ => None,
        }
    }
}

/// Result alias of prism-pipeline.
pub type Result<T, E = Error> = std::result::Result<T, E>;
