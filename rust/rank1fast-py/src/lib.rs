//! `rank1fast._core`: thin PyO3 bindings over rank1fast-core. Converts types and errors,
//! releases the GIL for long work and turns Ctrl-C into KeyboardInterrupt. The public API and
//! its documentation live in the Python package.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use rank1fast_core as core;
use rank1fast_core::{AnalyzeOptions, Progress, SiteStats};

/// Map a core error to the exception classes of `rank1fast.errors`.
fn to_py(e: core::Error) -> PyErr {
    let class = match &e {
        core::Error::NotFound { .. } => "PathNotFoundError",
        core::Error::Io { .. } => "Rank1IOError",
        core::Error::Dump { .. } => "DumpError",
        core::Error::Invalid(_) => "InvalidArgumentError",
        core::Error::Memory(_) => "InsufficientMemoryError",
        core::Error::Cancelled => return pyo3::exceptions::PyKeyboardInterrupt::new_err(()),
    };
    let msg = e.to_string();
    Python::attach(|py| -> PyResult<PyErr> {
        let cls = py.import("rank1fast.errors")?.getattr(class)?;
        Ok(PyErr::from_value(cls.call1((msg.clone(),))?))
    })
    .unwrap_or_else(|_| PyRuntimeError::new_err(msg))
}

/// Run `work` on a worker thread with the GIL released. Every 100 ms the calling thread takes
/// the GIL back to report progress and check for Ctrl-C, which cancels the work.
fn run_long<T: Send>(
    py: Python<'_>,
    progress: &Progress,
    callback: Option<&Bound<'_, PyAny>>,
    work: impl FnOnce() -> core::Result<T> + Send,
) -> PyResult<T> {
    std::thread::scope(|scope| {
        let handle = scope.spawn(work);
        let report = || -> PyResult<()> {
            if let Some(cb) = callback {
                cb.call1((
                    progress.done.load(Ordering::Relaxed),
                    progress.total.load(Ordering::Relaxed),
                ))?;
            }
            Ok(())
        };
        while !handle.is_finished() {
            py.detach(|| {
                for _ in 0..20 {
                    if handle.is_finished() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            if let Err(e) = py.check_signals().and_then(|_| report()) {
                progress.cancel.store(true, Ordering::Relaxed);
                let _ = py.detach(|| handle.join());
                return Err(e);
            }
        }
        let result = handle
            .join()
            .map_err(|_| PyRuntimeError::new_err("internal error: rank1fast worker panicked"))?;
        let value = result.map_err(to_py)?;
        report()?;
        Ok(value)
    })
}

/// Sufficient statistics of one site (see rank1fast-core's `SiteStats`).
#[pyclass(module = "rank1fast._core", name = "SiteStats", frozen)]
struct PySiteStats {
    name: String,
    dtype: String,
    inner: SiteStats,
}

fn vec1<'py, T: numpy::Element>(py: Python<'py>, v: &[T]) -> Bound<'py, PyArray1<T>> {
    PyArray1::from_slice(py, v)
}

fn to_vec(a: Option<PyReadonlyArrayDyn<'_, f64>>, what: &str) -> PyResult<Option<Vec<f64>>> {
    a.map(|a| {
        a.as_array()
            .as_standard_layout()
            .as_slice()
            .map(<[f64]>::to_vec)
            .ok_or_else(|| PyRuntimeError::new_err(format!("{what}: not contiguous")))
    })
    .transpose()
}

#[pymethods]
impl PySiteStats {
    /// Rebuild statistics from their arrays (as `Report.load` does).
    #[new]
    #[pyo3(signature = (name, dtype, dim, folds, count, nonfinite, skipped, mean, m2, min, max,
                        fold_count, fold_sum, fold_sumsq, fold_moment=None, skipped_sum=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: String,
        dtype: String,
        dim: usize,
        folds: usize,
        count: u64,
        nonfinite: u64,
        skipped: u64,
        mean: PyReadonlyArray1<'_, f64>,
        m2: PyReadonlyArray1<'_, f64>,
        min: PyReadonlyArray1<'_, f64>,
        max: PyReadonlyArray1<'_, f64>,
        fold_count: PyReadonlyArray1<'_, u64>,
        fold_sum: PyReadonlyArrayDyn<'_, f64>,
        fold_sumsq: PyReadonlyArrayDyn<'_, f64>,
        fold_moment: Option<PyReadonlyArrayDyn<'_, f64>>,
        skipped_sum: Option<PyReadonlyArray1<'_, f64>>,
    ) -> PyResult<Self> {
        let v = |a: PyReadonlyArray1<'_, f64>| a.as_array().to_vec();
        let inner = SiteStats {
            dim,
            folds,
            count,
            nonfinite,
            skipped,
            skipped_sum: skipped_sum.map_or_else(|| vec![0.0; dim], |a| a.as_array().to_vec()),
            mean: v(mean),
            m2: v(m2),
            min: v(min),
            max: v(max),
            fold_count: fold_count.as_array().to_vec(),
            fold_sum: to_vec(Some(fold_sum), "fold_sum")?.unwrap_or_default(),
            fold_sumsq: to_vec(Some(fold_sumsq), "fold_sumsq")?.unwrap_or_default(),
            fold_moment: to_vec(fold_moment, "fold_moment")?,
        };
        inner
            .validate()
            .map_err(|e| to_py(core::Error::Invalid(format!("site {name}: {e}"))))?;
        Ok(PySiteStats { name, dtype, inner })
    }

    #[getter]
    fn name(&self) -> &str {
        &self.name
    }
    #[getter]
    fn dtype(&self) -> &str {
        &self.dtype
    }
    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim
    }
    #[getter]
    fn folds(&self) -> usize {
        self.inner.folds
    }
    #[getter]
    fn count(&self) -> u64 {
        self.inner.count
    }
    #[getter]
    fn nonfinite(&self) -> u64 {
        self.inner.nonfinite
    }
    #[getter]
    fn skipped(&self) -> u64 {
        self.inner.skipped
    }
    #[getter]
    fn has_moments(&self) -> bool {
        self.inner.fold_moment.is_some()
    }
    fn mean<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        vec1(py, &self.inner.mean)
    }
    fn skipped_sum<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        vec1(py, &self.inner.skipped_sum)
    }
    fn m2<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        vec1(py, &self.inner.m2)
    }
    fn min<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        vec1(py, &self.inner.min)
    }
    fn max<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        vec1(py, &self.inner.max)
    }
    fn fold_count<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        vec1(py, &self.inner.fold_count)
    }
    fn fold_sum<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (k, d) = (self.inner.folds, self.inner.dim);
        Ok(vec1(py, &self.inner.fold_sum).reshape([k, d])?.into_any())
    }
    fn fold_sumsq<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (k, d) = (self.inner.folds, self.inner.dim);
        Ok(vec1(py, &self.inner.fold_sumsq).reshape([k, d])?.into_any())
    }
    fn fold_moment<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let (k, d) = (self.inner.folds, self.inner.dim);
        self.inner
            .fold_moment
            .as_ref()
            .map(|m| Ok(vec1(py, m).reshape([k, d, d])?.into_any()))
            .transpose()
    }

    /// `Σ_k` of the fold matrices, `[dim, dim]` (one copy, not `folds` of them), or None.
    fn total_moment<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let d = self.inner.dim;
        let st = &self.inner;
        match py.detach(|| st.total_moment()) {
            Some(t) => Ok(Some(PyArray1::from_vec(py, t).reshape([d, d])?.into_any())),
            None => Ok(None),
        }
    }

    /// Merge with statistics of the same site from other data.
    fn merge(&self, py: Python<'_>, other: PyRef<'_, PySiteStats>) -> PyResult<Self> {
        let mut inner = self.inner.clone();
        let o = &other.inner;
        py.detach(|| inner.merge(o))
            .map_err(|e| to_py(core::Error::Invalid(format!("site {}: {e}", self.name))))?;
        Ok(PySiteStats {
            name: self.name.clone(),
            dtype: self.dtype.clone(),
            inner,
        })
    }

    /// Least-squares constant direction with a cross-validated ridge, as a dict. `solver`:
    /// "auto", "exact" or "krylov"; `block`, `max_dim`, `tol` and `seed` tune the Krylov solve.
    #[pyo3(signature = (ridges=None, solver="auto", block=None, max_dim=None, tol=None, seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn constant_direction<'py>(
        &self,
        py: Python<'py>,
        ridges: Option<Vec<f64>>,
        solver: &str,
        block: Option<usize>,
        max_dim: Option<usize>,
        tol: Option<f64>,
        seed: Option<u64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let ridges = ridges.unwrap_or_else(core::default_ridges);
        let mut solver = core::Solver::from_name(solver).ok_or_else(|| {
            to_py(core::Error::Invalid(format!(
                "solver must be auto, exact or krylov, got {solver:?}"
            )))
        })?;
        let tuned = block.is_some() || max_dim.is_some() || tol.is_some() || seed.is_some();
        if tuned {
            let mut o = core::krylov::KrylovOptions::default();
            o.block = block.unwrap_or(o.block);
            o.max_dim = max_dim.unwrap_or(o.max_dim);
            o.tol = tol.unwrap_or(o.tol);
            o.seed = seed.unwrap_or(o.seed);
            solver = match solver {
                core::Solver::Exact => core::Solver::Exact,
                _ if matches!(solver, core::Solver::Auto)
                    && self.inner.dim <= core::solve::EXACT_MAX_DIM =>
                {
                    core::Solver::Exact
                }
                _ => core::Solver::Krylov(o),
            };
        }
        let st = &self.inner;
        let fit = py
            .detach(|| core::constant_direction_with(st, &ridges, &solver))
            .map_err(|e| self.site_error(e))?;
        let out = PyDict::new(py);
        out.set_item("vector", vec1(py, &fit.vector))?;
        out.set_item("ridge", fit.ridge)?;
        out.set_item("error", fit.error)?;
        out.set_item("ridges", vec1(py, &fit.ridges))?;
        out.set_item("cv_errors", vec1(py, &fit.cv_errors))?;
        out.set_item("cross_validated", fit.cross_validated)?;
        out.set_item("method", fit.method)?;
        out.set_item("subspace", fit.subspace)?;
        out.set_item("steps", fit.steps)?;
        Ok(out)
    }

    /// Duplicated (perfectly correlated) dimension pairs: `(count, first `keep` pairs)`.
    #[pyo3(signature = (tol=1e-6, keep=3))]
    fn duplicated_dims(
        &self,
        py: Python<'_>,
        tol: f64,
        keep: usize,
    ) -> (usize, Vec<(usize, usize)>) {
        let st = &self.inner;
        py.detach(|| core::solve::duplicated_dims(st, tol, keep))
    }

    /// The best single dimension (the naive construction), as a dict.
    fn onehot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let fit = core::best_onehot(&self.inner).map_err(|e| self.site_error(e))?;
        let out = PyDict::new(py);
        out.set_item("vector", vec1(py, &fit.vector))?;
        out.set_item("dim", fit.dim)?;
        out.set_item("error", fit.error)?;
        out.set_item("cross_validated", fit.cross_validated)?;
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!(
            "SiteStats(name={:?}, dim={}, count={}, folds={}, moments={})",
            self.name,
            self.inner.dim,
            self.inner.count,
            self.inner.folds,
            self.inner.fold_moment.is_some()
        )
    }
}

impl PySiteStats {
    fn site_error(&self, e: core::Error) -> PyErr {
        match e {
            core::Error::Invalid(m) => {
                to_py(core::Error::Invalid(format!("site {}: {m}", self.name)))
            }
            e => to_py(e),
        }
    }
}

/// Stream every (or the selected) site under `path`; returns one SiteStats per site.
#[pyfunction]
#[pyo3(signature = (path, sites=None, skip_positions=1, folds=5, second_moments=true, threads=0,
                    progress=None, shifts=None, moment_rows=None, memory_limit=None))]
#[allow(clippy::too_many_arguments)]
fn analyze(
    py: Python<'_>,
    path: PathBuf,
    sites: Option<Vec<String>>,
    skip_positions: i64,
    folds: usize,
    second_moments: bool,
    threads: usize,
    progress: Option<Bound<'_, PyAny>>,
    shifts: Option<HashMap<String, PyReadonlyArray1<'_, f32>>>,
    moment_rows: Option<usize>,
    memory_limit: Option<u64>,
) -> PyResult<Vec<PySiteStats>> {
    let opts = AnalyzeOptions {
        moment_rows,
        memory_limit,
        sites,
        skip_positions,
        folds,
        second_moments,
        threads,
        shifts: shifts
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.as_array().to_vec()))
            .collect(),
    };
    let state = Progress::default();
    let results = run_long(py, &state, progress.as_ref(), || {
        core::analyze(&path, &opts, &state)
    })?;
    Ok(results
        .into_iter()
        .map(|r| PySiteStats {
            name: r.name,
            dtype: r.dtype.name().to_owned(),
            inner: r.stats,
        })
        .collect())
}

/// Per site, the point `analyze` accumulates second moments about (pass back as `shifts=` when
/// analysing parts of the same data in separate calls, so that their merge is exact).
#[pyfunction]
#[pyo3(signature = (path, sites=None, skip_positions=1, second_moments=true))]
fn second_moment_shifts<'py>(
    py: Python<'py>,
    path: PathBuf,
    sites: Option<Vec<String>>,
    skip_positions: i64,
    second_moments: bool,
) -> PyResult<Vec<(String, Bound<'py, PyArray1<f32>>)>> {
    let opts = AnalyzeOptions {
        sites,
        skip_positions,
        second_moments,
        ..AnalyzeOptions::default()
    };
    let shifts = py
        .detach(|| core::analyze::second_moment_shifts(&path, &opts))
        .map_err(to_py)?;
    Ok(shifts
        .into_iter()
        .map(|(k, v)| (k, PyArray1::from_vec(py, v)))
        .collect())
}

/// The second-moment kernels this CPU can run (slowest first), and the one `analyze` uses for
/// bf16 dumps and for f16/f32 dumps (after `RANK1FAST_GRAM`, if set).
#[pyfunction]
fn gram_kernels() -> (Vec<&'static str>, &'static str, &'static str) {
    use core::gram::Kernel;
    (
        Kernel::available().into_iter().map(Kernel::name).collect(),
        Kernel::detect(true).name(),
        Kernel::detect(false).name(),
    )
}

/// The tensors of a safetensors file, validated as the reference reader validates them:
/// `(name, dtype, shape, byte offset in the file, byte length)` in file order, and the
/// `__metadata__` strings. With `head` (the file's first bytes, up to the end of its header) and
/// `file_len`, `path` only names the file in errors (a file read from an archive).
#[pyfunction]
#[pyo3(signature = (path, head=None, file_len=None))]
#[allow(clippy::type_complexity)]
fn safetensors_header(
    py: Python<'_>,
    path: PathBuf,
    head: Option<Vec<u8>>,
    file_len: Option<u64>,
) -> PyResult<(
    Vec<(String, &'static str, Vec<usize>, usize, usize)>,
    HashMap<String, String>,
)> {
    py.detach(|| -> core::Result<_> {
        let (tensors, meta) = match (head, file_len) {
            (Some(head), Some(len)) => (
                core::source::parse_safetensors_head(&head, len, &path)?,
                core::source::safetensors_metadata(&head),
            ),
            _ => {
                let file = core::source::MappedFile::open(&path)?;
                (
                    core::source::parse_safetensors(&file.map, &path)?,
                    core::source::safetensors_metadata(&file.map),
                )
            }
        };
        Ok((
            tensors
                .into_iter()
                .map(|t| (t.name, t.stored.name(), t.shape, t.offset, t.nbytes))
                .collect(),
            meta.into_iter().collect(),
        ))
    })
    .map_err(to_py)
}

/// What a file is from its first bytes ("a safetensors file", "a .npy file", "a GGUF file",
/// "a zip archive (torch.save writes these)", "a pickle (torch.save's legacy format)"), or
/// None.
#[pyfunction]
fn file_kind(path: PathBuf) -> PyResult<Option<&'static str>> {
    use std::io::Read;
    let io = |e| to_py(core::Error::io(&path, e));
    let mut f = std::fs::File::open(&path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut head = Vec::with_capacity(4096);
    f.by_ref().take(4096).read_to_end(&mut head).map_err(io)?;
    Ok(core::source::sniff(&head, len))
}

/// The Krylov solve's defaults and its Gaussian starting columns (`[block, dim]`, row j the
/// j-th column), for the torch solve to start from the same subspace.
#[pyfunction]
#[pyo3(signature = (dim, block=None, seed=None))]
fn krylov_sketch<'py>(
    py: Python<'py>,
    dim: usize,
    block: Option<usize>,
    seed: Option<u64>,
) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyAny>)> {
    let o = core::krylov::KrylovOptions::default();
    let (block, seed) = (block.unwrap_or(o.block), seed.unwrap_or(o.seed));
    let defaults = PyDict::new(py);
    defaults.set_item("block", o.block)?;
    defaults.set_item("max_dim", o.max_dim)?;
    defaults.set_item("min_steps", o.min_steps)?;
    defaults.set_item("tol", o.tol)?;
    defaults.set_item("seed", o.seed)?;
    defaults.set_item("outlier_ratio", core::krylov::OUTLIER_RATIO)?;
    defaults.set_item("precond_floor", core::krylov::PRECOND_FLOOR)?;
    defaults.set_item("max_outliers", core::krylov::MAX_OUTLIERS)?;
    defaults.set_item("exact_max_dim", core::solve::EXACT_MAX_DIM)?;
    let omega = PyArray1::from_vec(py, core::krylov::starting_sketch(dim, block, seed));
    Ok((defaults, omega.reshape([block, dim])?.into_any()))
}

/// The default ridge grid (λ relative to tr(G)/d).
#[pyfunction]
fn default_ridges() -> Vec<f64> {
    core::default_ridges()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySiteStats>()?;
    m.add_function(wrap_pyfunction!(analyze, m)?)?;
    m.add_function(wrap_pyfunction!(default_ridges, m)?)?;
    m.add_function(wrap_pyfunction!(krylov_sketch, m)?)?;
    m.add_function(wrap_pyfunction!(gram_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(second_moment_shifts, m)?)?;
    m.add_function(wrap_pyfunction!(safetensors_header, m)?)?;
    m.add_function(wrap_pyfunction!(file_kind, m)?)?;
    m.add_function(wrap_pyfunction!(write_lora, m)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add("FOLD_BLOCK_ROWS", core::analyze::FOLD_BLOCK_ROWS)?;
    Ok(())
}

// --- adapter writer ---

/// Write the `adapter_model.safetensors` of a PEFT LoRA adapter: one rank-`rank` LoRA per
/// module, `lora_A` row 0 = bᵀ and `lora_B` column 0 = scale·v (norms balanced), atomically.
/// `extra`, one list per module, holds further rank-1 terms `(a_k, u_k)` written unscaled at
/// ranks 1, 2, ... Returns the number of bytes written.
#[pyfunction]
#[pyo3(signature = (path, modules, directions, vectors, scale=1.0, rank=1, dtype="float32",
                    metadata=None, extra=None))]
#[allow(clippy::too_many_arguments)]
fn write_lora(
    py: Python<'_>,
    path: PathBuf,
    modules: Vec<String>,
    directions: Vec<PyReadonlyArray1<'_, f64>>,
    vectors: Vec<PyReadonlyArray1<'_, f64>>,
    scale: f64,
    rank: usize,
    dtype: &str,
    metadata: Option<std::collections::BTreeMap<String, String>>,
    extra: Option<Vec<Vec<(PyReadonlyArray1<'_, f64>, PyReadonlyArray1<'_, f64>)>>>,
) -> PyResult<u64> {
    let extra = extra.unwrap_or_default();
    if !extra.is_empty() && extra.len() != modules.len() {
        return Err(to_py(core::Error::Invalid(format!(
            "write_lora: {} modules but {} lists of extra terms",
            modules.len(),
            extra.len()
        ))));
    }
    if modules.len() != directions.len() || modules.len() != vectors.len() {
        return Err(to_py(core::Error::Invalid(format!(
            "write_lora: {} modules, {} directions and {} vectors; they must pair up",
            modules.len(),
            directions.len(),
            vectors.len()
        ))));
    }
    let dtype = core::DType::from_name(dtype).ok_or_else(|| {
        to_py(core::Error::Invalid(format!(
            "dtype must be float32, float16 or bfloat16, got {dtype:?}"
        )))
    })?;
    let sites: Vec<core::adapter::LoraSite> = modules
        .into_iter()
        .zip(directions.iter().zip(&vectors))
        .enumerate()
        .map(|(i, (module, (d, v)))| core::adapter::LoraSite {
            module,
            direction: d.as_array().to_vec(),
            vector: v.as_array().to_vec(),
            extra: extra.get(i).map_or_else(Vec::new, |terms| {
                terms
                    .iter()
                    .map(|(a, u)| (a.as_array().to_vec(), u.as_array().to_vec()))
                    .collect()
            }),
        })
        .collect();
    let metadata = metadata.unwrap_or_default();
    py.detach(|| core::adapter::write_lora(&path, &sites, scale, rank, dtype, &metadata))
        .map(|s| s.bytes)
        .map_err(to_py)
}

// --- merge ---

/// Write a copy of the safetensors checkpoint in `model_dir` to `out_dir` with the PEFT LoRA
/// adapter in `adapter` merged into its weights (rank1fast-core's `merge`), streaming, with
/// the GIL released. Returns a summary dict.
#[pyfunction]
#[pyo3(signature = (model_dir, adapter, out_dir, overwrite=false, progress=None))]
fn merge<'py>(
    py: Python<'py>,
    model_dir: PathBuf,
    adapter: PathBuf,
    out_dir: PathBuf,
    overwrite: bool,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = core::merge::MergeOptions { overwrite };
    let state = Progress::default();
    let summary = run_long(py, &state, progress.as_ref(), || {
        core::merge::merge(&model_dir, &adapter, &out_dir, &opts, &state)
    })?;
    let out = PyDict::new(py);
    out.set_item("out_dir", &summary.out_dir)?;
    out.set_item("shards", &summary.shards)?;
    let merged = summary
        .merged
        .iter()
        .map(|t| {
            let d = PyDict::new(py);
            d.set_item("tensor", &t.tensor)?;
            d.set_item("shard", &t.shard)?;
            d.set_item("module", &t.module)?;
            d.set_item("rank", t.rank)?;
            d.set_item("scaling", t.scaling)?;
            d.set_item("dtype", t.dtype.name())?;
            d.set_item("from_adapter", t.from_adapter)?;
            Ok(d)
        })
        .collect::<PyResult<Vec<_>>>()?;
    out.set_item("merged", merged)?;
    out.set_item("copied", &summary.copied)?;
    out.set_item("bytes", summary.bytes)?;
    Ok(out)
}
