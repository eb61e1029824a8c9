//! The constant direction: `b = (G + λ·tr(G)/d·I)⁻¹ μ` with `G = E[x xᵀ]`, `μ = E[x]`, the ridge
//! λ chosen by K-fold cross-validation in closed form from the per-fold sums, and the one-hot
//! baseline `b = e_j / mean(x_j)`.
//!
//! The held-out mean squared error of any `b` on fold k is `bᵀ G_k b − 2 bᵀ μ_k + 1`, so no
//! second pass over the data is needed.

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, Par, Side};

use crate::error::{Error, Result};
use crate::krylov::{krylov_solve, KrylovOptions};
use crate::stats::SiteStats;

/// Ridge used when there are not two non-empty folds to cross-validate with.
pub const FALLBACK_RIDGE: f64 = 1e-6;

/// Widths up to which [`Solver::Auto`] solves exactly: there the `folds + 1` tridiagonalisations
/// take seconds (about 11 s at 2048 on two cores, growing as d³ to 700 s at 8192).
pub const EXACT_MAX_DIM: usize = 2048;

/// How [`constant_direction_with`] solves the ridge problems.
#[derive(Clone, Debug, Default)]
pub enum Solver {
    /// [`Solver::Exact`] up to [`EXACT_MAX_DIM`], [`Solver::Krylov`] (default options) above.
    #[default]
    Auto,
    /// A tridiagonalisation (or eigendecomposition) of each fold's training matrix: every
    /// ridge solved exactly, `O(folds × d³)`.
    Exact,
    /// Each fold's problem solved exactly in a randomized block Krylov subspace of its training
    /// matrix ([`crate::krylov`]): `O(folds × d² × k)` for a subspace of k dimensions.
    Krylov(KrylovOptions),
}

impl Solver {
    pub fn from_name(name: &str) -> Option<Solver> {
        match name.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(Solver::Auto),
            "exact" => Some(Solver::Exact),
            "krylov" | "sketch" => Some(Solver::Krylov(KrylovOptions::default())),
            _ => None,
        }
    }
}

/// The least-squares constant direction of one site.
#[derive(Clone, Debug)]
pub struct DirectionFit {
    pub vector: Vec<f64>,
    /// The chosen λ (relative to tr(G)/d).
    pub ridge: f64,
    /// Held-out rms(b·x − 1) at the chosen ridge (in-sample when `cross_validated` is false).
    pub error: f64,
    /// The ridge grid and the held-out rms error at each ridge.
    pub ridges: Vec<f64>,
    pub cv_errors: Vec<f64>,
    pub cross_validated: bool,
    /// `"exact"` or `"krylov"`.
    pub method: &'static str,
    /// Dimensions of the subspace the final fit was solved in (`dim` when exact).
    pub subspace: usize,
    /// Krylov steps of the final fit (0 when exact).
    pub steps: usize,
}

/// The best single dimension, `b = e_j / mean(x_j)`.
#[derive(Clone, Debug)]
pub struct OneHotFit {
    pub vector: Vec<f64>,
    pub dim: usize,
    /// Held-out rms(b·x − 1) (in-sample when `cross_validated` is false).
    pub error: f64,
    pub cross_validated: bool,
}

/// 10^-10 .. 10^0 in quarter decades (41 values).
pub fn default_ridges() -> Vec<f64> {
    (0..=40)
        .map(|i| 10f64.powf(-10.0 + i as f64 * 0.25))
        .collect()
}

fn nonempty(st: &SiteStats) -> Result<()> {
    if st.count == 0 {
        return Err(Error::Invalid(
            "the site has no finite rows left after the position filter".into(),
        ));
    }
    Ok(())
}

/// Folds usable for cross-validation: both the fold and its complement hold tokens.
fn cv_folds(st: &SiteStats) -> Vec<usize> {
    let valid: Vec<usize> = (0..st.folds)
        .filter(|&k| st.fold_count[k] > 0 && st.fold_count[k] < st.fold_total())
        .collect();
    if valid.len() >= 2 {
        valid
    } else {
        Vec::new()
    }
}

struct Eigen {
    vectors: Mat<f64>,
    values: Vec<f64>,
}

fn eigen(g: &[f64], d: usize, scale: f64) -> Result<Eigen> {
    let m = Mat::from_fn(d, d, |i, j| g[i * d + j] * scale);
    let evd = m
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::Invalid(format!("eigendecomposition failed: {e:?}")))?;
    let values = (0..d)
        .map(|i| evd.S().column_vector()[i].max(0.0))
        .collect();
    Ok(Eigen {
        vectors: evd.U().to_owned(),
        values,
    })
}

/// `G = Q T Qᵀ` (Householder tridiagonalisation, about a quarter of an eigendecomposition's
/// work): enough to solve `(G + r I) b = m` for many ridges `r`, each in O(d) plus two
/// applications of `Q` shared by all of them.
struct Tridiag {
    /// The Householder vectors below the subdiagonal (faer's layout).
    a: Mat<f64>,
    /// The block Householder factors.
    h: Mat<f64>,
    diag: Vec<f64>,
    off: Vec<f64>,
}

fn tridiag(g: &[f64], d: usize, scale: f64) -> Tridiag {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::evd::tridiag::{tridiag_in_place, tridiag_in_place_scratch};
    let mut a = Mat::from_fn(d, d, |i, j| g[i * d + j] * scale);
    let bs = faer::linalg::qr::no_pivoting::factor::recommended_block_size::<f64>(d, d);
    let mut h = Mat::<f64>::zeros(bs, d.saturating_sub(1));
    let par = Par::rayon(0);
    let mut mem = MemBuffer::new(tridiag_in_place_scratch::<f64>(d, par, Default::default()));
    tridiag_in_place(
        a.as_mut(),
        h.as_mut(),
        par,
        MemStack::new(&mut mem),
        Default::default(),
    );
    let diag = (0..d).map(|i| a[(i, i)]).collect();
    let off = (0..d.saturating_sub(1)).map(|i| a[(i + 1, i)]).collect();
    Tridiag { a, h, diag, off }
}

/// Column l of the result is `(G + λ_l t I)⁻¹ m`, with `G` given by its tridiagonalisation;
/// a column whose system is not positive definite (a ridge too small for `G`'s rank) is NaN.
fn ridge_solutions_tridiag(tr: &Tridiag, m: &[f64], ridges: &[f64], t: f64) -> Mat<f64> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::householder as hh;
    use faer::Conj;
    let d = m.len();
    let par = Par::rayon(0);
    let cols = ridges.len().max(1);
    let mut mem = MemBuffer::new(
        hh::apply_block_householder_sequence_on_the_left_in_place_scratch::<f64>(
            d.saturating_sub(1),
            tr.h.nrows(),
            cols,
        ),
    );
    let mut c = Mat::from_fn(d, 1, |i, _| m[i]);
    if d > 1 {
        hh::apply_block_householder_sequence_transpose_on_the_left_in_place_with_conj(
            tr.a.as_ref().submatrix(1, 0, d - 1, d - 1),
            tr.h.as_ref(),
            Conj::No,
            c.as_mut().subrows_mut(1, d - 1),
            par,
            MemStack::new(&mut mem),
        );
    }
    // (T + r I) y = c by LDLᵀ without pivoting (stable for positive definite T + r I).
    let mut y = Mat::<f64>::zeros(d, ridges.len());
    let mut piv = vec![0f64; d];
    for (l, &lam) in ridges.iter().enumerate() {
        let r = lam * t;
        let mut ok = true;
        for i in 0..d {
            let (p, z) = if i == 0 {
                (tr.diag[0] + r, c[(0, 0)])
            } else {
                let e = tr.off[i - 1];
                let p = tr.diag[i] + r - e * e / piv[i - 1];
                (p, c[(i, 0)] - e / piv[i - 1] * y[(i - 1, l)])
            };
            ok &= p > 0.0;
            piv[i] = p;
            y[(i, l)] = z;
        }
        if !ok {
            for i in 0..d {
                y[(i, l)] = f64::NAN;
            }
            continue;
        }
        y[(d - 1, l)] /= piv[d - 1];
        for i in (0..d - 1).rev() {
            y[(i, l)] = (y[(i, l)] - tr.off[i] * y[(i + 1, l)]) / piv[i];
        }
    }
    if d > 1 {
        hh::apply_block_householder_sequence_on_the_left_in_place_with_conj(
            tr.a.as_ref().submatrix(1, 0, d - 1, d - 1),
            tr.h.as_ref(),
            Conj::No,
            y.as_mut().subrows_mut(1, d - 1),
            par,
            MemStack::new(&mut mem),
        );
    }
    y
}

/// Ridge solutions for every λ at once: column l of the result is `(A + λ_l t I)⁻¹ m`.
fn ridge_solutions(e: &Eigen, m: &[f64], ridges: &[f64], t: f64) -> Mat<f64> {
    let d = m.len();
    let mcol = Mat::from_fn(d, 1, |i, _| m[i]);
    let mut c = Mat::<f64>::zeros(d, 1);
    matmul(
        c.as_mut(),
        Accum::Replace,
        e.vectors.transpose(),
        mcol.as_ref(),
        1.0,
        Par::rayon(0),
    );
    let y = Mat::from_fn(d, ridges.len(), |i, l| {
        let den = e.values[i] + ridges[l] * t;
        if den > 0.0 {
            c[(i, 0)] / den
        } else {
            0.0
        }
    });
    let mut b = Mat::<f64>::zeros(d, ridges.len());
    matmul(
        b.as_mut(),
        Accum::Replace,
        e.vectors.as_ref(),
        y.as_ref(),
        1.0,
        Par::rayon(0),
    );
    b
}

/// `(g·scale + r I)⁻¹ m` for one ridge `r`: a Cholesky solve (a sixth of an
/// eigendecomposition's work), or the eigendecomposition when `g·scale + r I` is not
/// numerically positive definite (a ridge too small for the rank of `g`).
fn ridge_solution(g: &[f64], scale: f64, m: &[f64], r: f64) -> Result<Mat<f64>> {
    let d = m.len();
    let a = Mat::from_fn(d, d, |i, j| {
        g[i * d + j] * scale + if i == j { r } else { 0.0 }
    });
    if let Ok(llt) = a.llt(Side::Lower) {
        let mut b = Mat::from_fn(d, 1, |i, _| m[i]);
        llt.solve_in_place(b.as_mut());
        if (0..d).all(|i| b[(i, 0)].is_finite()) {
            return Ok(b);
        }
    }
    let e = eigen(g, d, scale)?;
    Ok(ridge_solutions(&e, m, &[1.0], r))
}

/// `bᵀ G b − 2 bᵀ μ + 1` for every column b of `b`, with `G = g·scale`.
fn mse(g: &[f64], scale: f64, mu: &[f64], b: &Mat<f64>) -> Vec<f64> {
    let d = mu.len();
    let gm = faer::MatRef::from_row_major_slice(g, d, d);
    let mut gb = Mat::<f64>::zeros(d, b.ncols());
    matmul(
        gb.as_mut(),
        Accum::Replace,
        gm,
        b.as_ref(),
        scale,
        Par::rayon(0),
    );
    (0..b.ncols())
        .map(|l| {
            let (mut quad, mut lin) = (0.0, 0.0);
            for i in 0..d {
                quad += b[(i, l)] * gb[(i, l)];
                lin += b[(i, l)] * mu[i];
            }
            (quad - 2.0 * lin + 1.0).max(0.0)
        })
        .collect()
}

/// Trace of a row-major d×d matrix.
fn trace(g: &[f64], d: usize) -> f64 {
    (0..d).map(|i| g[i * d + i]).sum()
}

/// Least-squares constant direction with a cross-validated ridge ([`Solver::Auto`]).
pub fn constant_direction(st: &SiteStats, ridges: &[f64]) -> Result<DirectionFit> {
    constant_direction_with(st, ridges, &Solver::Auto)
}

/// Least-squares constant direction with a cross-validated ridge, solved as `solver` says.
pub fn constant_direction_with(
    st: &SiteStats,
    ridges: &[f64],
    solver: &Solver,
) -> Result<DirectionFit> {
    let krylov = match solver {
        Solver::Exact => None,
        Solver::Krylov(o) => Some(o.clone()),
        Solver::Auto if st.dim > EXACT_MAX_DIM => Some(KrylovOptions::default()),
        Solver::Auto => None,
    };
    match krylov {
        Some(o) => krylov_direction(st, ridges, &o),
        None => exact_direction(st, ridges),
    }
}

fn check_inputs(st: &SiteStats, ridges: &[f64]) -> Result<()> {
    nonempty(st)?;
    st.fold_moment.as_ref().ok_or_else(|| {
        Error::Invalid("the report has no second moments (analyze with second_moments=True)".into())
    })?;
    if ridges.is_empty() || ridges.iter().any(|r| !(r.is_finite() && *r >= 0.0)) {
        return Err(Error::Invalid(
            "ridges must be finite and non-negative".into(),
        ));
    }
    if st.fold_total() == 0 {
        return Err(Error::Invalid("no rows in the second moments".into()));
    }
    Ok(())
}

/// The Krylov path: cross-validated in each fold's own subspace, then the final fit.
fn krylov_direction(st: &SiteStats, ridges: &[f64], o: &KrylovOptions) -> Result<DirectionFit> {
    check_inputs(st, ridges)?;
    let folds = cv_folds(st);
    // One more d × d matrix (the total) halves the products; keep it only when it fits with
    // room to spare.
    let total_bytes = (st.dim as u64).pow(2) * 8;
    let with_total = crate::analyze::available_memory().is_none_or(|a| a > 2 * total_bytes);
    let fit = krylov_solve(st, &folds, ridges, o, with_total)?;
    let cross_validated = fit.cv_mse.is_some();
    let (ridge, cv_errors, cv_best) = match &fit.cv_mse {
        Some(mse) => {
            let rms: Vec<f64> = mse.iter().map(|m| (m / fit.held_out).sqrt()).collect();
            let best = (0..rms.len())
                .min_by(|&a, &b| rms[a].total_cmp(&rms[b]))
                .expect("non-empty grid");
            (ridges[best], rms.clone(), rms[best])
        }
        None => (FALLBACK_RIDGE, vec![f64::NAN; ridges.len()], f64::NAN),
    };
    let (vector, in_sample) = fit.direction(ridge)?;
    Ok(DirectionFit {
        vector,
        ridge,
        error: if cross_validated {
            cv_best
        } else {
            in_sample.sqrt()
        },
        ridges: ridges.to_vec(),
        cv_errors,
        cross_validated,
        method: "krylov",
        subspace: fit.subspace,
        steps: fit.steps,
    })
}

/// The exact path: every fold's training matrix tridiagonalised.
fn exact_direction(st: &SiteStats, ridges: &[f64]) -> Result<DirectionFit> {
    nonempty(st)?;
    let moments = st.fold_moment.as_ref().ok_or_else(|| {
        Error::Invalid("the report has no second moments (analyze with second_moments=True)".into())
    })?;
    if ridges.is_empty() || ridges.iter().any(|r| !(r.is_finite() && *r >= 0.0)) {
        return Err(Error::Invalid(
            "ridges must be finite and non-negative".into(),
        ));
    }
    let d = st.dim;
    let dd = d * d;
    // The rows of the moments (all of them unless the analysis capped them).
    let n = st.fold_total() as f64;
    if n == 0.0 {
        return Err(Error::Invalid("no rows in the second moments".into()));
    }
    let total = st.total_moment().expect("moments present");
    let sum: Vec<f64> = (0..d)
        .map(|j| (0..st.folds).map(|k| st.fold_sum[k * d + j]).sum())
        .collect();

    let folds = cv_folds(st);
    let cross_validated = !folds.is_empty();
    let mut cv_mse = vec![0.0; ridges.len()];
    for &k in &folds {
        let nk = st.fold_count[k] as f64;
        let ntrain = n - nk;
        let gk = &moments[k * dd..(k + 1) * dd];
        let train: Vec<f64> = total.iter().zip(gk).map(|(a, b)| a - b).collect();
        let mtrain: Vec<f64> = (0..d)
            .map(|j| (sum[j] - st.fold_sum[k * d + j]) / ntrain)
            .collect();
        let t = trace(&train, d) / ntrain / d as f64;
        let mut b = ridge_solutions_tridiag(&tridiag(&train, d, 1.0 / ntrain), &mtrain, ridges, t);
        if b.col_iter().any(|col| col.iter().any(|v| !v.is_finite())) {
            // Some ridge leaves the system indefinite (G rank-deficient): the eigendecomposition
            // clamps G's eigenvalues at zero.
            b = ridge_solutions(&eigen(&train, d, 1.0 / ntrain)?, &mtrain, ridges, t);
        }
        let mu_k: Vec<f64> = (0..d).map(|j| st.fold_sum[k * d + j] / nk).collect();
        for (acc, err) in cv_mse.iter_mut().zip(mse(gk, 1.0 / nk, &mu_k, &b)) {
            *acc += err * nk;
        }
    }
    let held_out: f64 = folds.iter().map(|&k| st.fold_count[k] as f64).sum();

    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let t = trace(&total, d) / n / d as f64;
    let (best, cv_errors) = if cross_validated {
        let rms: Vec<f64> = cv_mse.iter().map(|m| (m / held_out).sqrt()).collect();
        let best = (0..rms.len())
            .min_by(|&a, &b| rms[a].total_cmp(&rms[b]))
            .expect("non-empty grid");
        (best, rms)
    } else {
        (0, vec![f64::NAN; ridges.len()])
    };
    let ridge = if cross_validated {
        ridges[best]
    } else {
        FALLBACK_RIDGE
    };
    let b = ridge_solution(&total, 1.0 / n, &mean, ridge * t)?;
    let vector: Vec<f64> = (0..d).map(|i| b[(i, 0)]).collect();
    let error = if cross_validated {
        cv_errors[best]
    } else {
        mse(&total, 1.0 / n, &mean, &b)[0].sqrt()
    };
    Ok(DirectionFit {
        vector,
        ridge,
        error,
        ridges: ridges.to_vec(),
        cv_errors,
        cross_validated,
        method: "exact",
        subspace: d,
        steps: 0,
    })
}

/// Pairs of dimensions whose correlation over the second moments' rows is at least
/// `1 − tol` in absolute value (duplicated dimensions make `G` singular): their number and the
/// first `keep` pairs `(i, j)`, `i < j`, in row-major order. Reads the fold matrices in place
/// (no `d × d` copy), so it runs at any width.
pub fn duplicated_dims(st: &SiteStats, tol: f64, keep: usize) -> (usize, Vec<(usize, usize)>) {
    let Some(m) = st.fold_moment.as_ref() else {
        return (0, Vec::new());
    };
    let (d, n) = (st.dim, st.fold_total() as f64);
    if n < 2.0 {
        return (0, Vec::new());
    }
    let dd = d * d;
    let g = |i: usize, j: usize| -> f64 { (0..st.folds).map(|k| m[k * dd + i * d + j]).sum() };
    let mean: Vec<f64> = (0..d)
        .map(|j| (0..st.folds).map(|k| st.fold_sum[k * d + j]).sum::<f64>() / n)
        .collect();
    let sd: Vec<f64> = (0..d)
        .map(|i| (g(i, i) / n - mean[i] * mean[i]).max(0.0).sqrt())
        .collect();
    let (mut count, mut pairs) = (0, Vec::new());
    for i in 0..d {
        if sd[i] <= 0.0 {
            continue;
        }
        for j in i + 1..d {
            if sd[j] <= 0.0 {
                continue;
            }
            let corr = (g(i, j) / n - mean[i] * mean[j]) / (sd[i] * sd[j]);
            if corr.abs() > 1.0 - tol {
                count += 1;
                if pairs.len() < keep {
                    pairs.push((i, j));
                }
            }
        }
    }
    (count, pairs)
}

/// The single dimension whose scaled value is closest to constant, by held-out error.
pub fn best_onehot(st: &SiteStats) -> Result<OneHotFit> {
    nonempty(st)?;
    let d = st.dim;
    let n = st.count as f64;
    let folds = cv_folds(st);
    let cross_validated = !folds.is_empty();
    let sum = |j: usize| -> f64 { (0..st.folds).map(|k| st.fold_sum[k * d + j]).sum() };
    let err_of = |j: usize| -> f64 {
        let s = sum(j);
        if !cross_validated {
            let mean = st.mean[j];
            return if mean != 0.0 {
                (st.m2[j] / n).sqrt() / mean.abs()
            } else {
                f64::INFINITY
            };
        }
        let (mut acc, mut held) = (0.0, 0.0);
        let n = st.fold_total() as f64;
        for &k in &folds {
            let nk = st.fold_count[k] as f64;
            let m = (s - st.fold_sum[k * d + j]) / (n - nk);
            if m == 0.0 {
                return f64::INFINITY;
            }
            let q = st.fold_sumsq[k * d + j] / nk;
            let mu = st.fold_sum[k * d + j] / nk;
            acc += nk * ((q - 2.0 * m * mu + m * m) / (m * m)).max(0.0);
            held += nk;
        }
        (acc / held).sqrt()
    };
    let errors: Vec<f64> = (0..d).map(err_of).collect();
    let dim = (0..d)
        .min_by(|&a, &b| errors[a].total_cmp(&errors[b]))
        .expect("dim > 0");
    if !errors[dim].is_finite() || st.mean[dim] == 0.0 {
        return Err(Error::Invalid(
            "no dimension has a non-zero mean: there is no one-hot direction".into(),
        ));
    }
    let mut vector = vec![0.0; d];
    vector[dim] = 1.0 / st.mean[dim];
    Ok(OneHotFit {
        vector,
        dim,
        error: errors[dim],
        cross_validated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Accumulator;

    /// Rows whose first coordinate is nearly constant: b ≈ e_0 / 5.
    fn planted(n: usize, d: usize) -> SiteStats {
        let mut s = 7u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut rows = Vec::new();
        let mut folds = Vec::new();
        for i in 0..n {
            let z = rnd();
            for j in 0..d {
                let noise = rnd();
                rows.push(match j {
                    0 => 5.0 + 0.05 * noise + 0.5 * z,
                    1 => z,
                    _ => noise,
                });
            }
            folds.push((i % 5) as u32);
        }
        let mut acc = Accumulator::new(d, 5, true, vec![0.0; d]);
        acc.add_rows(&rows, &folds);
        acc.finish()
    }

    #[test]
    fn least_squares_beats_onehot_on_planted_data() {
        let st = planted(4000, 6);
        let dir = constant_direction(&st, &default_ridges()).unwrap();
        let one = best_onehot(&st).unwrap();
        assert!(dir.cross_validated && one.cross_validated);
        assert_eq!(one.dim, 0);
        // x0 - 0.5*x1 is constant up to the 0.05 noise: least squares removes the z term.
        assert!(dir.error < 0.01, "{}", dir.error);
        assert!(one.error > 0.025, "{}", one.error);
        assert!((dir.vector[0] - 0.2).abs() < 0.01);
        assert!((dir.vector[1] + 0.1).abs() < 0.01);
    }

    #[test]
    fn needs_rows_and_moments() {
        let st = SiteStats::new(3, 5, true);
        assert!(constant_direction(&st, &default_ridges()).is_err());
        let mut st = planted(100, 3);
        st.fold_moment = None;
        assert!(constant_direction(&st, &default_ridges()).is_err());
        assert!(best_onehot(&st).is_ok());
    }
}
