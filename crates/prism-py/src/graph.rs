//! `prism.Graph` and `prism.Node`: prism-pipeline's `StageGraph<f32>`
//! behind a mutex, its nodes as Python values. `Pipeline.run_graph` (in
//! `pipeline.rs`) runs one.

use std::sync::{Mutex, MutexGuard, TryLockError};

use prism_pipeline::{NodeId, StageGraph};
use pyo3::prelude::*;

use crate::errors::{self, pipeline_error};
use crate::stages::Builtin;

/// A node of a :class:`Graph`: its input, or a stage added by
/// ``Graph.stage``. Valid only on the graph that made it: another graph
/// raises ``GraphError``.
#[pyclass(module = "prism._prism", frozen, eq, hash)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Node {
    pub(crate) id: NodeId,
}

#[pymethods]
impl Node {
    /// The node's position in its graph (0 is the input; node order is the
    /// order the nodes were made in).
    #[getter]
    fn index(&self) -> usize {
        self.id.index()
    }

    fn __repr__(&self) -> String {
        format!("Node(index={})", self.id.index())
    }
}

/// A directed acyclic graph of stages over one input: several stages may
/// read one node (fan-out, read in place with no copy), and any node may
/// be an output (an inner node is then a tap). Built front to back, so it
/// is acyclic by construction; run it with ``Pipeline.run_graph``.
///
/// Args:
///     concurrent_branches: on the GPU, run independent branches of a
///         chunk on lanes of their own (default); ``False`` runs every
///         node of a chunk in node order on one lane, with the fewest
///         device buffers. The host backend runs nodes in node order
///         either way.
///
/// Example::
///
///     g = prism.Graph()
///     x = g.input()
///     a = g.stage(x, prism.Fma(2.0, 1.0))
///     b = g.stage(x, prism.Clamp(0.0, 0.5))
///     g.output(a)
///     g.output(b)
///     ya, yb = pipeline.run_graph(g, data)
///
/// A graph is used by one call at a time: a call made while a run on
/// another thread uses it raises ``BusyError``.
#[pyclass(module = "prism._prism", frozen)]
#[derive(Debug)]
pub(crate) struct Graph {
    inner: Mutex<StageGraph<f32>>,
    concurrent_branches: bool,
}

impl Graph {
    /// The graph, or `BusyError` while a run on another thread uses it.
    pub(crate) fn lock(&self, py: Python<'_>) -> PyResult<MutexGuard<'_, StageGraph<f32>>> {
        match self.inner.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::WouldBlock) => Err(errors::plain(
                py,
                "BusyError",
                "the graph is being run by another thread",
            )),
            // A panic inside prism while it held the graph: its nodes are
            // still whole (every change is a push after the checks).
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        }
    }
}

/// The node `obj` is, or a `TypeError`.
fn node_of(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<NodeId> {
    match obj.cast::<Node>() {
        Ok(n) => Ok(n.get().id),
        Err(_) => {
            let name = obj
                .get_type()
                .name()
                .map_or_else(|_| "?".to_owned(), |n| n.to_string());
            Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "{what} must be a prism.Node (from Graph.input() or Graph.stage()), not {name}"
            )))
        }
    }
}

#[pymethods]
impl Graph {
    #[new]
    #[pyo3(signature = (*, concurrent_branches = true))]
    fn new(concurrent_branches: bool) -> Self {
        let mut g = StageGraph::new();
        g.concurrent_branches(concurrent_branches);
        Self {
            inner: Mutex::new(g),
            concurrent_branches,
        }
    }

    /// Whether independent branches run concurrently on the GPU.
    #[getter]
    fn concurrent_branches(&self) -> bool {
        self.concurrent_branches
    }

    /// The graph's input: each chunk as it was read.
    fn input(&self, py: Python<'_>) -> PyResult<Node> {
        Ok(Node {
            id: self.lock(py)?.input(),
        })
    }

    /// Adds a stage (``Fma``, ``Clamp`` or ``GroupSum``) reading ``node``;
    /// returns the new node. Several stages may read one node.
    ///
    /// Raises:
    ///     GraphError: ``node`` belongs to another graph.
    ///     TypeError: ``node`` is not a ``Node`` or ``stage`` not a stage.
    fn stage(
        &self,
        py: Python<'_>,
        node: &Bound<'_, PyAny>,
        stage: &Bound<'_, PyAny>,
    ) -> PyResult<Node> {
        let from = node_of(node, "node")?;
        let stage = Builtin::extract(stage, "Graph.stage")?;
        let mut g = self.lock(py)?;
        let id = stage
            .add_to_graph(&mut g, from)
            .map_err(|e| pipeline_error(py, &e))?;
        Ok(Node { id })
    }

    /// Makes ``node`` an output (the input itself and inner nodes too); a
    /// node may be an output more than once. Returns the output's index:
    /// its position in the list ``Pipeline.run_graph`` returns (or fills).
    ///
    /// Raises:
    ///     GraphError: ``node`` belongs to another graph.
    fn output(&self, py: Python<'_>, node: &Bound<'_, PyAny>) -> PyResult<usize> {
        let node = node_of(node, "node")?;
        self.lock(py)?
            .output(node)
            .map_err(|e| pipeline_error(py, &e))
    }

    /// A node's name as ``stats()["stages"]`` and errors show it (unique in
    /// the graph: a repeated stage name gets its node index added).
    fn name(&self, py: Python<'_>, node: &Bound<'_, PyAny>) -> PyResult<String> {
        let node = node_of(node, "node")?;
        self.lock(py)?
            .name(node)
            .map(str::to_owned)
            .map_err(|e| pipeline_error(py, &e))
    }

    /// Nodes, the input included.
    #[getter]
    fn node_count(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.lock(py)?.node_count())
    }

    /// Outputs declared.
    #[getter]
    fn output_count(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.lock(py)?.output_count())
    }

    /// Device buffers a ring slot of a GPU run holds for this graph (at
    /// least one per value alive at once). More than a slot holds (16)
    /// raises ``GraphError``: a GPU run refuses such a graph, the host
    /// backend runs it. ``NoOutputsError`` without an output.
    fn buffers_per_slot(&self, py: Python<'_>) -> PyResult<usize> {
        self.lock(py)?
            .buffers_per_slot()
            .map_err(|e| pipeline_error(py, &e))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let g = self.lock(py)?;
        Ok(format!(
            "Graph(nodes={}, outputs={})",
            g.node_count(),
            g.output_count()
        ))
    }
}
