//! The built-in stages as Python values (`prism.Fma`, `prism.Clamp`,
//! `prism.GroupSum`, and a user's `prism.Kernel`): plain parameters, turned
//! into prism's stages by `Pipeline.add_stage` and `Graph.stage`.

use prism_pipeline::{NodeId, StageGraph};
use pyo3::prelude::*;

use crate::errors;
use crate::kernel::Kernel;

/// `y = x` after `iters` steps of `y = fma(y, a, b)` (a fused multiply-add
/// in float32, one rounding per step): prism's FMA chain, elementwise.
///
/// `a` and `b` are rounded to float32.
#[pyclass(module = "prism._prism", frozen, eq)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Fma {
    /// The multiplier (float32).
    #[pyo3(get)]
    pub(crate) a: f32,
    /// The addend (float32).
    #[pyo3(get)]
    pub(crate) b: f32,
    /// Steps of `y = fma(y, a, b)`.
    #[pyo3(get)]
    pub(crate) iters: u32,
}

#[pymethods]
impl Fma {
    #[new]
    #[pyo3(signature = (a, b, iters = 1))]
    fn new(a: f32, b: f32, iters: u32) -> Self {
        Self { a, b, iters }
    }

    /// The stage's name in stats and errors: `"fma"`.
    #[getter]
    fn name(&self) -> &'static str {
        "fma"
    }

    fn __repr__(&self) -> String {
        format!("Fma(a={:?}, b={:?}, iters={})", self.a, self.b, self.iters)
    }
}

impl Fma {
    fn stage(self) -> prism_pipeline::Fma {
        prism_pipeline::Fma {
            a: self.a,
            b: self.b,
            iters: self.iters,
        }
    }
}

/// `y = min(max(x, lo), hi)`, elementwise (as `fminf(fmaxf(x, lo), hi)`:
/// a NaN input gives `lo`, or `hi` when `lo > hi`; as `numpy.clip` for
/// ordinary values).
///
/// `lo` and `hi` are rounded to float32.
#[pyclass(module = "prism._prism", frozen, eq)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Clamp {
    /// Lower bound (float32).
    #[pyo3(get)]
    pub(crate) lo: f32,
    /// Upper bound (float32).
    #[pyo3(get)]
    pub(crate) hi: f32,
}

#[pymethods]
impl Clamp {
    #[new]
    fn new(lo: f32, hi: f32) -> Self {
        Self { lo, hi }
    }

    /// The stage's name in stats and errors: `"clamp"`.
    #[getter]
    fn name(&self) -> &'static str {
        "clamp"
    }

    fn __repr__(&self) -> String {
        format!("Clamp(lo={:?}, hi={:?})", self.lo, self.hi)
    }
}

impl Clamp {
    fn stage(self) -> prism_pipeline::Clamp {
        prism_pipeline::Clamp {
            lo: self.lo,
            hi: self.hi,
        }
    }
}

/// Sums of consecutive groups of `group` elements, each summed in float32
/// from 0.0 one element after another: shrinks the data. Groups never
/// span chunks: a chunk of `n` elements gives `ceil(n / group)` sums (the
/// last group of a chunk may be shorter). `group` must be at least 1
/// (`ConfigError`).
#[pyclass(module = "prism._prism", frozen, eq)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupSum {
    /// Elements per group.
    #[pyo3(get)]
    pub(crate) group: u32,
}

#[pymethods]
impl GroupSum {
    #[new]
    fn new(py: Python<'_>, group: u32) -> PyResult<Self> {
        if group == 0 {
            return Err(errors::plain(
                py,
                "ConfigError",
                "GroupSum: group must be at least 1",
            ));
        }
        Ok(Self { group })
    }

    /// The stage's name in stats and errors: `"group_sum"`.
    #[getter]
    fn name(&self) -> &'static str {
        "group_sum"
    }

    fn __repr__(&self) -> String {
        format!("GroupSum(group={})", self.group)
    }
}

impl GroupSum {
    fn stage(self) -> prism_pipeline::GroupSum {
        prism_pipeline::GroupSum { group: self.group }
    }
}

/// One of the built-in stages, or a user's kernel, taken from a Python value.
#[derive(Debug, Clone)]
pub(crate) enum Builtin {
    Fma(Fma),
    Clamp(Clamp),
    GroupSum(GroupSum),
    Kernel(Kernel),
}

impl Builtin {
    /// The stage `obj` is, or a `TypeError` naming `caller`.
    pub(crate) fn extract(obj: &Bound<'_, PyAny>, caller: &str) -> PyResult<Self> {
        if let Ok(s) = obj.cast::<Fma>() {
            return Ok(Self::Fma(*s.get()));
        }
        if let Ok(s) = obj.cast::<Clamp>() {
            return Ok(Self::Clamp(*s.get()));
        }
        if let Ok(s) = obj.cast::<GroupSum>() {
            return Ok(Self::GroupSum(*s.get()));
        }
        if let Ok(s) = obj.cast::<Kernel>() {
            return Ok(Self::Kernel(s.get().clone()));
        }
        let name = obj
            .get_type()
            .name()
            .map_or_else(|_| "?".to_owned(), |n| n.to_string());
        Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "{caller} takes prism.Fma, prism.Clamp, prism.GroupSum or prism.Kernel, not {name}"
        )))
    }

    /// Adds the stage to `pm`; returns its index.
    pub(crate) fn add_to(self, pm: &mut crate::Manager) -> usize {
        match self {
            Self::Fma(s) => pm.add_stage(s.stage()),
            Self::Clamp(s) => pm.add_stage(s.stage()),
            Self::GroupSum(s) => pm.add_stage(s.stage()),
            Self::Kernel(s) => pm.add_stage(s.stage()),
        }
    }

    /// Adds the stage to `graph`, reading `from`; returns its node.
    pub(crate) fn add_to_graph(
        self,
        graph: &mut StageGraph<f32>,
        from: NodeId,
    ) -> prism_pipeline::Result<NodeId> {
        match self {
            Self::Fma(s) => graph.stage(from, s.stage()),
            Self::Clamp(s) => graph.stage(from, s.stage()),
            Self::GroupSum(s) => graph.stage(from, s.stage()),
            Self::Kernel(s) => graph.stage(from, s.stage()),
        }
    }
}
