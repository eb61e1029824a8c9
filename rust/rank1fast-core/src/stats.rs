//! Sufficient statistics of one site, accumulated chunk by chunk and merged exactly.
//!
//! Everything here is a sum over tokens (means and centred second moments are merged with
//! Chan's formula), so parts computed on different threads, files or machines merge into the
//! same numbers in any order, up to float rounding.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gram::{Gram, Kernel, Value};
use crate::rowstats::RunStats;
use std::sync::{Mutex, TryLockError};

/// Fold matrices shared by the threads of one analysis: fold k's shifted `Σ (x − c)(x − c)ᵀ`
/// (`dim × dim`, upper triangle, row-major) behind its own lock, so memory is one set of
/// `folds × dim²` float64 values whatever the number of threads.
pub type SharedMoments<'a> = [Mutex<&'a mut [f64]>];

/// Per-site sufficient statistics. Arrays are `[dim]`, `[folds]`, `[folds * dim]` or
/// `[folds * dim * dim]` (each fold's `Σ x xᵀ`, symmetric, row-major) as named.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteStats {
    pub dim: usize,
    pub folds: usize,
    /// Finite rows that passed the position filter.
    pub count: u64,
    /// Rows dropped because they hold a NaN or an infinity.
    pub nonfinite: u64,
    /// Finite rows dropped by the position filter.
    pub skipped: u64,
    /// Σ x over those rows (their mean is the sink input that adapters pin), per dimension.
    pub skipped_sum: Vec<f64>,
    pub mean: Vec<f64>,
    /// Σ (x - mean)², per dimension.
    pub m2: Vec<f64>,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
    pub fold_count: Vec<u64>,
    pub fold_sum: Vec<f64>,
    pub fold_sumsq: Vec<f64>,
    pub fold_moment: Option<Vec<f64>>,
}

impl SiteStats {
    pub fn new(dim: usize, folds: usize, second_moments: bool) -> Self {
        SiteStats {
            dim,
            folds,
            count: 0,
            nonfinite: 0,
            skipped: 0,
            skipped_sum: vec![0.0; dim],
            mean: vec![0.0; dim],
            m2: vec![0.0; dim],
            min: vec![f64::INFINITY; dim],
            max: vec![f64::NEG_INFINITY; dim],
            fold_count: vec![0; folds],
            fold_sum: vec![0.0; folds * dim],
            fold_sumsq: vec![0.0; folds * dim],
            fold_moment: second_moments.then(|| zeroed_large(folds * dim * dim)),
        }
    }

    /// Check that the arrays have the sizes `dim` and `folds` imply (for data from outside).
    pub fn validate(&self) -> Result<()> {
        let (d, k) = (self.dim, self.folds);
        let checks = [
            ("mean", self.mean.len(), d),
            ("m2", self.m2.len(), d),
            ("skipped_sum", self.skipped_sum.len(), d),
            ("min", self.min.len(), d),
            ("max", self.max.len(), d),
            ("fold_count", self.fold_count.len(), k),
            ("fold_sum", self.fold_sum.len(), k * d),
            ("fold_sumsq", self.fold_sumsq.len(), k * d),
        ];
        for (name, got, want) in checks {
            if got != want {
                return Err(Error::Invalid(format!(
                    "{name} has {got} values, expected {want} (dim {d}, folds {k})"
                )));
            }
        }
        if let Some(m) = &self.fold_moment {
            if m.len() != k * d * d {
                return Err(Error::Invalid(format!(
                    "fold_moment has {} values, expected {} (folds x dim x dim)",
                    m.len(),
                    k * d * d
                )));
            }
        }
        if self.fold_total() > self.count {
            return Err(Error::Invalid(
                "fold counts add up to more than count".into(),
            ));
        }
        Ok(())
    }

    /// Rows in the folds: those of the second moments and the direction's fit. Equal to
    /// `count` unless the analysis capped the rows of the second moments
    /// ([`crate::AnalyzeOptions::moment_rows`]), which leaves the other rows to `mean`, `m2`,
    /// `min`, `max` only.
    pub fn fold_total(&self) -> u64 {
        self.fold_count.iter().sum()
    }

    pub fn var(&self) -> Vec<f64> {
        let n = self.count as f64;
        self.m2
            .iter()
            .map(|m| if n > 0.0 { m / n } else { f64::NAN })
            .collect()
    }

    /// Merge `other` into `self` (Chan et al. for mean and m2; sums elsewhere).
    pub fn merge(&mut self, other: &SiteStats) -> Result<()> {
        if self.dim != other.dim || self.folds != other.folds {
            return Err(Error::Invalid(format!(
                "cannot merge statistics of dim {} / {} folds with dim {} / {} folds",
                self.dim, self.folds, other.dim, other.folds
            )));
        }
        if self.fold_moment.is_some() != other.fold_moment.is_some() {
            return Err(Error::Invalid(
                "cannot merge statistics with and without second moments".into(),
            ));
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        if nb > 0.0 {
            for j in 0..self.dim {
                let delta = other.mean[j] - self.mean[j];
                self.mean[j] += delta * nb / n;
                self.m2[j] += other.m2[j] + delta * delta * na * nb / n;
                self.min[j] = self.min[j].min(other.min[j]);
                self.max[j] = self.max[j].max(other.max[j]);
            }
        }
        self.count += other.count;
        self.nonfinite += other.nonfinite;
        self.skipped += other.skipped;
        add(&mut self.skipped_sum, &other.skipped_sum);
        add(&mut self.fold_count, &other.fold_count);
        add(&mut self.fold_sum, &other.fold_sum);
        add(&mut self.fold_sumsq, &other.fold_sumsq);
        if let (Some(a), Some(b)) = (&mut self.fold_moment, &other.fold_moment) {
            add(a, b);
        }
        Ok(())
    }

    /// The sum of every fold's `Σ x xᵀ` (row-major `[dim, dim]`), if second moments were kept.
    pub fn total_moment(&self) -> Option<Vec<f64>> {
        let m = self.fold_moment.as_ref()?;
        let dd = self.dim * self.dim;
        let mut total = vec![0.0; dd];
        for k in 0..self.folds {
            add(&mut total, &m[k * dd..(k + 1) * dd]);
        }
        Some(total)
    }
}

/// Copy the upper triangle of the row-major `d × d` matrix `g` onto its lower triangle, in
/// 32 × 32 blocks (a block's rows and columns stay in L1; the writes run along rows).
fn mirror_upper(g: &mut [f64], d: usize) {
    const B: usize = 32;
    assert!(g.len() >= d * d);
    for i0 in (0..d).step_by(B) {
        for j0 in (i0..d).step_by(B) {
            for j in j0..(j0 + B).min(d) {
                let (upper, lower) = g.split_at_mut(j * d);
                let dst = &mut lower[i0..(i0 + B).min(j)];
                for (i, v) in (i0..).zip(dst.iter_mut()) {
                    *v = upper[i * d + j];
                }
            }
        }
    }
}

/// A zeroed vector for the fold matrices (up to gigabytes), with its pages mapped up front:
/// huge pages where the kernel offers them (Linux, `madvise`), and every page written once, so
/// the kernel does not first map the shared zero page on a read and then copy it on the
/// first write, with a TLB shootdown across threads each time (a third of the time of a
/// d = 1536 analysis before this).
pub(crate) fn zeroed_large(n: usize) -> Vec<f64> {
    zeroed_large_on(n, 1)
}

/// [`zeroed_large`], the pages written by `threads` threads at once: mapping fresh memory is
/// the kernel zeroing it (and, in a virtual machine, the host backing it), 0.5-1 GB/s per
/// thread on the machines of BENCHMARKS.md, so 94 MB of fold matrices (d = 1536, 5 folds)
/// took 0.1-0.2 s of one thread before the workers started.
pub(crate) fn zeroed_large_on(n: usize, threads: usize) -> Vec<f64> {
    let mut v = vec![0f64; n];
    let bytes = n * std::mem::size_of::<f64>();
    #[cfg(target_os = "linux")]
    if bytes >= 4 << 20 {
        const HUGE: usize = 2 << 20;
        let start = (v.as_ptr() as usize).div_ceil(HUGE) * HUGE;
        let end = (v.as_ptr() as usize + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside `v`'s allocation; the advice only changes how the
            // kernel backs those pages, not their contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    let touch = |part: &mut [f64]| {
        let per_page = 4096 / std::mem::size_of::<f64>();
        for i in (0..part.len()).step_by(per_page) {
            // SAFETY: i < part.len(). A volatile write, so it is not elided as a store of zero
            // to memory the allocator returned zeroed.
            unsafe { std::ptr::write_volatile(part.as_mut_ptr().add(i), 0.0) };
        }
    };
    // Parts of whole 2 MiB multiples (about whole huge pages), at least 16 MiB each.
    let per = n
        .div_ceil(threads.max(1))
        .next_multiple_of(1 << 18)
        .max(1 << 21);
    if threads <= 1 || n <= per {
        touch(&mut v);
    } else {
        std::thread::scope(|s| {
            for part in v.chunks_mut(per) {
                s.spawn(move || touch(part));
            }
        });
    }
    v
}

/// Where each group starts when groups of `counts[k]` items are laid out one after another.
pub(crate) fn starts(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0, |acc, &c| {
            let start = *acc;
            *acc += c;
            Some(start)
        })
        .collect()
}

fn add<T: Copy + std::ops::AddAssign>(a: &mut [T], b: &[T]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += *y;
    }
}

/// A thread's accumulator: statistics plus the scratch buffers of the chunk kernels.
///
/// Per-dimension statistics are sums about a fixed `shift` (one per site, shared by every
/// accumulator of the site: near the mean where the mean is large, else zero), kept per fold
/// plus one slot for rows outside the folds: `Σ (x − c)` and `Σ (x − c)²` in f64, reduced one
/// run of rows at a time by [`RunStats`] (straight from the dump's bytes when no second moments
/// are needed). Sums about one shift add up in any order; `finish` turns them into means and
/// centred sums of squares.
///
/// Second moments are accumulated about the same shift: activations reach 1e4 while the
/// variation that matters is 1e-2, and f32 products of uncentred rows would lose it. The kernel
/// ([`Gram`]) sums products in f32 over at most a few hundred rows and accumulates in f64;
/// `finish` turns the shifted moments back into raw `Σ x xᵀ`.
pub struct Accumulator {
    pub stats: SiteStats,
    shift: Vec<f32>,
    shift64: Vec<f64>,
    /// `[folds + 1][dim]`: per fold, then the rows outside the folds.
    slot_s1: Vec<f64>,
    slot_s2: Vec<f64>,
    slot_n: Vec<u64>,
    run: RunStats,
    sorted: Vec<f32>,
    min32: Vec<f32>,
    max32: Vec<f32>,
    gram: Option<Gram>,
}

impl Accumulator {
    /// An accumulator that owns its fold matrices (when `second_moments`).
    pub fn new(dim: usize, folds: usize, second_moments: bool, shift: Vec<f32>) -> Self {
        Self::build(dim, folds, second_moments, second_moments, shift)
    }

    /// An accumulator whose second moments go to fold matrices shared with other threads
    /// ([`Accumulator::add_fold_runs_shared`]); its own statistics hold no fold matrices until
    /// [`Accumulator::finish_with`] hands them over.
    pub fn new_shared(dim: usize, folds: usize, shift: Vec<f32>) -> Self {
        Self::build(dim, folds, true, false, shift)
    }

    fn build(dim: usize, folds: usize, gram: bool, own: bool, shift: Vec<f32>) -> Self {
        assert_eq!(shift.len(), dim, "shift must have one value per dimension");
        let gram = gram.then(|| Gram::new(dim));
        let shift = match &gram {
            Some(g) => g.kernel().shift(&shift),
            None => shift,
        };
        Accumulator {
            stats: SiteStats::new(dim, folds, own),
            shift64: shift.iter().map(|&c| c as f64).collect(),
            shift,
            slot_s1: vec![0.0; (folds + 1) * dim],
            slot_s2: vec![0.0; (folds + 1) * dim],
            slot_n: vec![0; folds + 1],
            run: RunStats::new(dim),
            sorted: Vec::new(),
            min32: vec![f32::INFINITY; dim],
            max32: vec![f32::NEG_INFINITY; dim],
            gram,
        }
    }

    /// Declare that every row will hold bfloat16 numbers (a decoded bf16 dump), which lets
    /// the second moments use the CPU's bf16 dot products when it has them: the shift is then
    /// rounded to bf16 (see [`Kernel::shift`]). Call before adding rows.
    pub fn bf16_rows(mut self, yes: bool) -> Self {
        assert_eq!(self.stats.count, 0, "bf16_rows before any row");
        if let Some(g) = &mut self.gram {
            let kernel = Kernel::detect(yes);
            if kernel != g.kernel() {
                *g = Gram::with_kernel(self.stats.dim, kernel);
                self.shift = kernel.shift(&self.shift);
                self.shift64 = self.shift.iter().map(|&c| c as f64).collect();
            }
        }
        self
    }

    /// Add `m` finite rows (`rows.len() == m * dim`, row-major) whose folds are `fold[i]`.
    pub fn add_rows(&mut self, rows: &[f32], fold: &[u32]) {
        let d = self.stats.dim;
        debug_assert_eq!(rows.len(), fold.len() * d);
        let mut counts = vec![0usize; self.stats.folds];
        for &f in fold {
            counts[f as usize] += 1;
        }
        if fold.windows(2).all(|w| w[0] <= w[1]) {
            return self.add_sorted_rows(rows, &counts);
        }
        // Group rows by fold.
        let mut sorted = std::mem::take(&mut self.sorted);
        sorted.resize(rows.len(), 0.0);
        let mut next = starts(&counts);
        for (row, &f) in rows.chunks_exact(d).zip(fold) {
            let dst = next[f as usize];
            next[f as usize] += 1;
            sorted[dst * d..(dst + 1) * d].copy_from_slice(row);
        }
        self.add_sorted_rows(&sorted, &counts);
        self.sorted = sorted;
    }

    /// Add finite rows grouped by fold: `counts[k]` rows of fold `k`, fold after fold.
    pub fn add_sorted_rows(&mut self, rows: &[f32], counts: &[usize]) {
        let d = self.stats.dim;
        debug_assert_eq!(rows.len(), counts.iter().sum::<usize>() * d);
        let mut row0 = 0;
        for (k, &c) in counts.iter().enumerate() {
            if c > 0 {
                self.add_fold_runs(k, &[&rows[row0 * d..(row0 + c) * d]]);
                row0 += c;
            }
        }
    }

    /// Add finite rows of fold `k` given as runs (each a slice of whole rows, back to back
    /// in memory: rows of a dump's memory map, say), to the statistics and second moments.
    pub fn add_fold_runs(&mut self, k: usize, runs: &[&[f32]]) {
        let d = self.stats.dim.max(1);
        for run in runs {
            self.reduce_rows(Some(k), run, run.len() / d);
        }
        if let (Some(acc), Some(gram)) = (&mut self.stats.fold_moment, &mut self.gram) {
            // Upper triangle (row-major) of the shifted rows' Gram matrix; `finish` mirrors it.
            let rows: Vec<&[f32]> = runs.iter().flat_map(|r| r.chunks_exact(d)).collect();
            let dd = self.stats.dim * self.stats.dim;
            gram.add_rows(&rows, &self.shift, &mut acc[k * dd..(k + 1) * dd]);
        }
    }

    /// [`Accumulator::add_sorted_rows`] with the second moments added to shared fold matrices;
    /// rows holding a NaN or an infinity are dropped (see [`Accumulator::add_fold_runs_shared`]).
    pub fn add_sorted_rows_shared(&mut self, rows: &[f32], counts: &[usize], sink: &SharedMoments) {
        let d = self.stats.dim;
        debug_assert_eq!(rows.len(), counts.iter().sum::<usize>() * d);
        let mut runs: Vec<Vec<&[f32]>> = vec![Vec::new(); counts.len()];
        let mut row0 = 0;
        for (k, &c) in counts.iter().enumerate() {
            if c > 0 {
                runs[k].push(&rows[row0 * d..(row0 + c) * d]);
                row0 += c;
            }
        }
        self.add_fold_runs_shared(&runs, sink);
    }

    /// Add rows given as runs per fold (`runs[k]`: whole rows of fold `k`, f32 or bf16, maybe
    /// straight from a dump) to the statistics, and their second moments to the shared fold
    /// matrices `sink` (one per fold). The statistics pass over a run also says whether all of
    /// it was finite, so no separate check reads the rows; a run that was not is taken row by
    /// row, and its rows holding a NaN or an infinity are dropped from the statistics and the
    /// second moments alike (counted in `nonfinite`).
    pub fn add_fold_runs_shared<R: Value>(&mut self, runs: &[Vec<&[R]>], sink: &SharedMoments) {
        let d = self.stats.dim.max(1);
        let mut kept: Vec<Vec<&[R]>> = vec![Vec::new(); runs.len()];
        for (k, fold_runs) in runs.iter().enumerate() {
            for &run in fold_runs {
                if self.reduce_rows(Some(k), run, run.len() / d) {
                    kept[k].push(run);
                    continue;
                }
                for row in run.chunks_exact(d) {
                    if self.reduce_rows(Some(k), row, 1) {
                        kept[k].push(row);
                    } else {
                        self.stats.nonfinite += 1;
                    }
                }
            }
        }
        self.add_fold_moments_shared(&kept, sink);
    }

    /// The second moments of finite rows given as runs per fold, into the shared fold
    /// matrices `sink` (one per fold). A fold whose matrix another thread holds is done
    /// later, so threads rarely wait.
    fn add_fold_moments_shared<R: Value>(&mut self, runs: &[Vec<&[R]>], sink: &SharedMoments) {
        let d = self.stats.dim.max(1);
        let Some(gram) = &mut self.gram else {
            return;
        };
        let mut pending: Vec<usize> = (0..runs.len()).filter(|&k| !runs[k].is_empty()).collect();
        let mut add = |k: usize, g: &mut [f64]| {
            let rows: Vec<&[R]> = runs[k].iter().flat_map(|r| r.chunks_exact(d)).collect();
            gram.add_rows(&rows, &self.shift, g);
        };
        while !pending.is_empty() {
            let mut busy = Vec::new();
            for &k in &pending {
                match sink[k].try_lock() {
                    Ok(mut g) => add(k, &mut g),
                    Err(TryLockError::Poisoned(p)) => add(k, &mut p.into_inner()),
                    Err(TryLockError::WouldBlock) => busy.push(k),
                }
            }
            if busy.len() == pending.len() {
                // Every fold left is held by another thread: wait for the first.
                let k = busy.remove(0);
                add(k, &mut sink[k].lock().unwrap_or_else(|p| p.into_inner()));
            }
            pending = busy;
        }
    }

    /// The per-dimension statistics of `c` rows (`seg`), into a slot when all of them are
    /// finite (returned; else nothing is added).
    fn reduce_rows<R: Value>(&mut self, fold: Option<usize>, seg: &[R], c: usize) -> bool {
        #[cfg(target_endian = "little")]
        // SAFETY: f32 and Bf16 are plain bytes without padding; on a little-endian machine
        // they are the encoding of their dtype that the kernel reads.
        let (dtype, bytes) = (R::DTYPE, unsafe {
            std::slice::from_raw_parts(seg.as_ptr().cast::<u8>(), std::mem::size_of_val(seg))
        });
        #[cfg(not(target_endian = "little"))]
        let owned: Vec<u8> = seg.iter().flat_map(|x| x.value().to_le_bytes()).collect();
        #[cfg(not(target_endian = "little"))]
        let (dtype, bytes) = (DType::F32, &owned[..]);
        let finite = self.run.reduce(dtype, bytes, c, &self.shift64);
        if finite {
            self.take_run(fold, c);
        }
        finite
    }

    /// Add `rows` rows of `dtype` values straight from a dump's bytes (`rows × dim` values) to
    /// the per-dimension statistics of fold `fold` (or of no fold), dropping rows that hold a
    /// NaN or an infinity (counted in `nonfinite`). No second moments: for those, decode the
    /// rows and use [`Accumulator::add_rows`].
    pub fn add_run(&mut self, fold: Option<usize>, dtype: DType, bytes: &[u8], rows: usize) {
        if rows == 0 {
            return;
        }
        if self.run.reduce(dtype, bytes, rows, &self.shift64) {
            self.take_run(fold, rows);
            return;
        }
        // Some row is not finite: row by row.
        let rb = bytes.len() / rows;
        for row in bytes.chunks_exact(rb) {
            if self.run.reduce(dtype, row, 1, &self.shift64) {
                self.take_run(fold, 1);
            } else {
                self.stats.nonfinite += 1;
            }
        }
    }

    /// Add the sums of the last [`RunStats::reduce`] (`c` rows) to a slot.
    fn take_run(&mut self, fold: Option<usize>, c: usize) {
        let d = self.stats.dim;
        let slot = fold.unwrap_or(self.stats.folds);
        add(&mut self.slot_s1[slot * d..(slot + 1) * d], &self.run.s1);
        add(&mut self.slot_s2[slot * d..(slot + 1) * d], &self.run.s2);
        for j in 0..d {
            self.min32[j] = self.min32[j].min(self.run.min[j]);
            self.max32[j] = self.max32[j].max(self.run.max[j]);
        }
        self.slot_n[slot] += c as u64;
        self.stats.count += c as u64;
        if let Some(k) = fold {
            self.stats.fold_count[k] += c as u64;
        }
    }

    /// Merge another accumulator of the same site (same shift and kernel) into this one,
    /// before either is finished: the shifted moments add up, so [`Accumulator::finish`]'s
    /// O(folds × dim²) pass then runs once instead of once per thread.
    pub fn absorb(&mut self, other: Accumulator) -> Result<()> {
        if self.shift != other.shift {
            return Err(Error::Invalid(
                "internal error: accumulators with different shifts".into(),
            ));
        }
        self.stats.merge(&other.stats)?;
        add(&mut self.slot_s1, &other.slot_s1);
        add(&mut self.slot_s2, &other.slot_s2);
        add(&mut self.slot_n, &other.slot_n);
        for j in 0..self.stats.dim {
            self.min32[j] = self.min32[j].min(other.min32[j]);
            self.max32[j] = self.max32[j].max(other.max32[j]);
        }
        Ok(())
    }

    /// Finish an accumulator made by [`Accumulator::new_shared`] (and merged with the others of
    /// its site): `moments` are the shared fold matrices (`folds × dim²`, shifted, upper
    /// triangle) that every thread added to.
    pub fn finish_with(mut self, moments: Vec<f64>) -> SiteStats {
        assert!(
            self.stats.fold_moment.is_none(),
            "finish_with on an owning accumulator"
        );
        self.stats.fold_moment = Some(moments);
        self.finish()
    }

    /// Finish accumulation: copy min/max out and turn the shifted moments into raw `Σ x xᵀ`.
    pub fn finish(mut self) -> SiteStats {
        let d = self.stats.dim;
        let st = &mut self.stats;
        // Means and centred sums of squares from the sums about the shift c:
        // mean = c + S1 / n, m2 = S2 − S1² / n; per fold, Σ x and Σ x².
        let n: u64 = self.slot_n.iter().sum();
        let (mut s1, mut s2) = (vec![0f64; d], vec![0f64; d]);
        for slot in 0..=st.folds {
            add(&mut s1, &self.slot_s1[slot * d..(slot + 1) * d]);
            add(&mut s2, &self.slot_s2[slot * d..(slot + 1) * d]);
        }
        if n > 0 {
            let nf = n as f64;
            for j in 0..d {
                st.mean[j] = self.shift64[j] + s1[j] / nf;
                st.m2[j] = (s2[j] - s1[j] * s1[j] / nf).max(0.0);
            }
        }
        for k in 0..st.folds {
            let nk = self.slot_n[k] as f64;
            for j in 0..d {
                let (c, a, b) = (
                    self.shift64[j],
                    self.slot_s1[k * d + j],
                    self.slot_s2[k * d + j],
                );
                st.fold_sum[k * d + j] = nk * c + a;
                st.fold_sumsq[k * d + j] = b + 2.0 * c * a + nk * c * c;
            }
        }
        for j in 0..d {
            if self.min32[j] <= self.max32[j] {
                self.stats.min[j] = self.min32[j] as f64;
                self.stats.max[j] = self.max32[j] as f64;
            }
        }
        let st = &mut self.stats;
        if let Some(acc) = &mut st.fold_moment {
            // Σ x xᵀ = Σ (x−c)(x−c)ᵀ + c sᵀ + s cᵀ − n c cᵀ, with s = Σ x (nothing to undo
            // when c = 0); then mirror.
            let c = &self.shift64;
            let shifted = c.iter().any(|&v| v != 0.0);
            let (counts, sums) = (&st.fold_count, &st.fold_sum);
            let one = |k: usize, g: &mut [f64]| {
                if shifted {
                    let n = counts[k] as f64;
                    let s = &sums[k * d..(k + 1) * d];
                    for i in 0..d {
                        let (ci, si) = (c[i], s[i]);
                        let row = &mut g[i * d + i..(i + 1) * d];
                        for ((v, &cj), &sj) in row.iter_mut().zip(&c[i..]).zip(&s[i..]) {
                            *v += ci * sj + si * cj - n * ci * cj;
                        }
                    }
                }
                mirror_upper(g, d);
            };
            // Folds on every core when they are large (a pass over folds × d² × 8 bytes).
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let workers = if d >= 512 { cores.min(st.folds) } else { 1 };
            let mut folds: Vec<(usize, &mut [f64])> = acc
                .chunks_mut((d * d).max(1))
                .enumerate()
                .take(st.folds)
                .collect();
            if workers <= 1 {
                folds.into_iter().for_each(|(k, g)| one(k, g));
            } else {
                std::thread::scope(|sc| {
                    let per = folds.len().div_ceil(workers);
                    while !folds.is_empty() {
                        let part: Vec<_> = folds.drain(..per.min(folds.len())).collect();
                        let one = &one;
                        sc.spawn(move || part.into_iter().for_each(|(k, g)| one(k, g)));
                    }
                });
            }
        }
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(rows: &[f32], d: usize) -> (Vec<f64>, Vec<f64>) {
        let n = rows.len() / d;
        let mut mean = vec![0.0; d];
        for r in rows.chunks(d) {
            for j in 0..d {
                mean[j] += r[j] as f64 / n as f64;
            }
        }
        let mut var = vec![0.0; d];
        for r in rows.chunks(d) {
            for j in 0..d {
                var[j] += (r[j] as f64 - mean[j]).powi(2) / n as f64;
            }
        }
        (mean, var)
    }

    fn rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n * d)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                if i % d == 0 {
                    1e4 + 1e-2 * u
                } else {
                    u - 0.5 + (i % d) as f32
                }
            })
            .collect()
    }

    #[test]
    fn chunks_and_merge_match_naive() {
        let d = 7;
        let data = rows(1000, d, 1);
        let folds: Vec<u32> = (0..1000).map(|i| ((i / 13) % 3) as u32).collect();
        let rough: Vec<f32> = (0..d)
            .map(|j| if j == 0 { 1e4 } else { j as f32 })
            .collect();
        let mut whole = Accumulator::new(d, 3, true, rough.clone());
        whole.add_rows(&data, &folds);
        let whole = whole.finish();

        let mut a = Accumulator::new(d, 3, true, rough.clone());
        a.add_rows(&data[..300 * d], &folds[..300]);
        a.add_rows(&data[300 * d..611 * d], &folds[300..611]);
        let mut a = a.finish();
        let mut b = Accumulator::new(d, 3, true, data[611 * d..612 * d].to_vec());
        b.add_rows(&data[611 * d..], &folds[611..]);
        a.merge(&b.finish()).unwrap();

        let (mean, var) = naive(&data, d);
        for s in [&whole, &a] {
            assert_eq!(s.count, 1000);
            s.validate().unwrap();
            for j in 0..d {
                assert!((s.mean[j] - mean[j]).abs() <= 1e-12 * mean[j].abs().max(1.0));
                let v = s.var()[j];
                assert!(
                    (v - var[j]).abs() <= 1e-9 * var[j],
                    "{j}: {v} vs {}",
                    var[j]
                );
            }
            // Moments are symmetric and sum to Σ x xᵀ.
            let g = s.total_moment().unwrap();
            for i in 0..d {
                for j in 0..d {
                    let want: f64 = data.chunks(d).map(|r| r[i] as f64 * r[j] as f64).sum();
                    let rel = (g[i * d + j] - want).abs() / want.abs().max(1.0);
                    assert!(rel <= 1e-6, "moment ({i},{j}) off by {rel:e}");
                }
            }
        }
        assert_eq!(whole.fold_count, a.fold_count);
    }

    #[test]
    fn merge_refuses_mismatched_shapes() {
        let mut a = SiteStats::new(3, 2, true);
        assert!(a.merge(&SiteStats::new(4, 2, true)).is_err());
        assert!(a.merge(&SiteStats::new(3, 2, false)).is_err());
    }
}
