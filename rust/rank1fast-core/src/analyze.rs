//! One streaming pass per site over every file that holds it, on all cores.
//!
//! Rows are read from the memory map in chunks of 16 MiB, filtered (position < skip,
//! non-finite) and handed to a per-thread [`Accumulator`]: straight from the map for the
//! per-dimension statistics (runs of one fold's rows), and for the second moments of f32
//! dumps; bf16/f16 rows are decoded to f32 in fold order for the second moments. The threads'
//! accumulators are merged at the end. Memory is `threads × (chunk + folds × dim²)`, whatever
//! the number of tokens.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::dtype::{any_nonfinite, decode_f32, DType};
use crate::error::{Error, Result};
use crate::gram::Kernel;
use crate::source::{self, SiteSource};
use crate::stats::{starts, Accumulator, SiteStats};

/// Rows of a bare 2-D tensor without document ids form folds in blocks of this many rows.
pub const FOLD_BLOCK_ROWS: usize = 256;
/// Target size of one decoded chunk.
const CHUNK_FLOATS: usize = 1 << 22;
/// Target size of one decoded chunk when second moments are computed: more rows per fold
/// segment keep the Gram kernel on long blocks (see `gram`), at 16 MiB per thread.
const CHUNK_FLOATS_MOMENTS: usize = 1 << 22;

#[derive(Clone, Debug)]
pub struct AnalyzeOptions {
    /// Analyse only these sites (all when `None`).
    pub sites: Option<Vec<String>>,
    /// Drop tokens at position < this, wherever positions are known.
    pub skip_positions: i64,
    pub folds: usize,
    pub second_moments: bool,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Per site, the point second moments are accumulated about (see [`second_moment_shifts`]);
    /// sites not listed use the mean of their first rows. Analyses of parts of a dump given
    /// the whole dump's shifts sum to the whole analysis up to float64 rounding.
    pub shifts: Vec<(String, Vec<f32>)>,
    /// Cap on the rows per site that enter the second moments and the direction's fit (their
    /// folds): whole chunks spread evenly over the site, at least one. Every row still counts
    /// in the per-dimension statistics. `None`: all rows.
    pub moment_rows: Option<usize>,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        AnalyzeOptions {
            sites: None,
            skip_positions: 1,
            folds: 5,
            second_moments: true,
            threads: 0,
            shifts: Vec::new(),
            moment_rows: None,
        }
    }
}

/// Shared between the analysis and whoever watches it: bytes done / total, and a cancel flag.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
    pub cancel: AtomicBool,
}

/// The result for one site.
#[derive(Clone, Debug)]
pub struct SiteResult {
    pub name: String,
    pub dtype: DType,
    pub stats: SiteStats,
}

/// Analyse every (or the selected) site under `path`.
pub fn analyze(path: &Path, opts: &AnalyzeOptions, progress: &Progress) -> Result<Vec<SiteResult>> {
    if opts.moment_rows == Some(0) {
        return Err(Error::Invalid("moment_rows must be at least 1".into()));
    }
    if opts.folds == 0 {
        return Err(Error::Invalid("folds must be at least 1".into()));
    }
    let sources = source::open(path)?;
    let selected = select(&sources, path, opts)?;
    let total: u64 = selected
        .iter()
        .flat_map(|(_, srcs)| srcs.iter())
        .map(|s| s.tensor.nbytes as u64)
        .sum();
    progress.total.store(total, Ordering::Relaxed);
    let threads = if opts.threads > 0 {
        opts.threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    selected
        .into_iter()
        .map(|(name, srcs)| {
            let shift = match opts.shifts.iter().find(|(n, _)| n == name) {
                Some((_, s)) if s.len() == srcs[0].dim => s.clone(),
                Some((_, s)) => {
                    return Err(Error::Invalid(format!(
                        "shift for site {name} has {} values, the site has dim {}",
                        s.len(),
                        srcs[0].dim
                    )))
                }
                None => moment_shift(srcs, chunk_rows(srcs[0].dim, opts), opts.skip_positions),
            };
            let stats = analyze_site(srcs, opts, threads, shift, progress)?;
            if stats.count == 0 && stats.nonfinite > 0 {
                return Err(Error::dump(
                    srcs[0].path(),
                    Some(name),
                    format!(
                        "all {} rows of the site hold NaN or infinity",
                        stats.nonfinite
                    ),
                ));
            }
            Ok(SiteResult {
                name: name.clone(),
                dtype: srcs[0].dtype,
                stats,
            })
        })
        .collect()
}

/// The shift each selected site's second moments are accumulated about in [`analyze`]: pass
/// them back in [`AnalyzeOptions::shifts`] when analysing parts of the same data separately.
pub fn second_moment_shifts(path: &Path, opts: &AnalyzeOptions) -> Result<Vec<(String, Vec<f32>)>> {
    let sources = source::open(path)?;
    Ok(select(&sources, path, opts)?
        .into_iter()
        .map(|(name, srcs)| {
            let rows = chunk_rows(srcs[0].dim, opts);
            (name.clone(), moment_shift(srcs, rows, opts.skip_positions))
        })
        .collect())
}

fn select<'a>(
    sources: &'a source::Sources,
    path: &Path,
    opts: &AnalyzeOptions,
) -> Result<Vec<&'a (String, Vec<SiteSource>)>> {
    match &opts.sites {
        None => Ok(sources.sites.iter().collect()),
        Some(want) => want
            .iter()
            .map(|w| {
                sources.sites.iter().find(|(n, _)| n == w).ok_or_else(|| {
                    let have: Vec<&str> = sources.sites.iter().map(|(n, _)| n.as_str()).collect();
                    Error::Invalid(format!(
                        "site {w:?} is not in {}; it has: {}",
                        path.display(),
                        have.join(", ")
                    ))
                })
            })
            .collect(),
    }
}

fn chunk_rows(dim: usize, opts: &AnalyzeOptions) -> usize {
    if opts.second_moments {
        (CHUNK_FLOATS_MOMENTS / dim).clamp(256, 8192)
    } else {
        (CHUNK_FLOATS / dim).clamp(64, 8192)
    }
}

fn analyze_site(
    srcs: &[SiteSource],
    opts: &AnalyzeOptions,
    threads: usize,
    shift: Vec<f32>,
    progress: &Progress,
) -> Result<SiteStats> {
    let dim = srcs[0].dim;
    let chunk_rows = chunk_rows(dim, opts);
    let chunks: Vec<(usize, usize, usize)> = srcs
        .iter()
        .enumerate()
        .flat_map(|(s, src)| {
            (0..src.rows)
                .step_by(chunk_rows)
                .map(move |r0| (s, r0, (r0 + chunk_rows).min(src.rows)))
        })
        .collect();
    let folded = folded_chunks(&chunks, chunk_rows, opts);
    let bf16_rows = srcs.iter().all(|s| s.dtype == DType::BF16);
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let workers = threads.min(chunks.len()).max(1);
    let parts: Vec<Accumulator> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut acc =
                        Accumulator::new(dim, opts.folds, opts.second_moments, shift.clone())
                            .bf16_rows(bf16_rows);
                    // Decoded rows: a chunk's for the second moments, else one row at a time.
                    let buf_rows = if opts.second_moments { chunk_rows } else { 1 };
                    let mut buf = vec![0f32; buf_rows * dim];
                    let mut folds = Vec::with_capacity(chunk_rows);
                    loop {
                        if progress.cancel.load(Ordering::Relaxed) {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(s, r0, r1)) = chunks.get(i) else {
                            break;
                        };
                        let src = &srcs[s];
                        let full = folded.as_ref().is_none_or(|f| f[i]);
                        process_chunk(src, r0, r1, opts, full, &mut buf, &mut folds, &mut acc);
                        progress
                            .done
                            .fetch_add(((r1 - r0) * src.row_bytes()) as u64, Ordering::Relaxed);
                    }
                    acc
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(part) => part,
                Err(_) => {
                    *failure.lock().expect("lock") = Some(Error::Invalid(
                        "internal error: a worker thread panicked".into(),
                    ));
                    Accumulator::new(dim, opts.folds, opts.second_moments, shift.clone())
                        .bf16_rows(bf16_rows)
                }
            })
            .collect()
    });
    if let Some(e) = failure.into_inner().expect("lock") {
        return Err(e);
    }
    if progress.cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    let mut parts = parts.into_iter();
    let mut total = parts.next().expect("at least one worker");
    for p in parts {
        total.absorb(p)?;
    }
    Ok(total.finish())
}

/// Which chunks enter the folds and second moments under `opts.moment_rows` (`None`: all):
/// `cap / chunk_rows` of them (at least one), evenly spread over the site.
fn folded_chunks(
    chunks: &[(usize, usize, usize)],
    chunk_rows: usize,
    opts: &AnalyzeOptions,
) -> Option<Vec<bool>> {
    let cap = opts.moment_rows?;
    let rows: usize = chunks.iter().map(|&(_, r0, r1)| r1 - r0).sum();
    if !opts.second_moments || rows <= cap {
        return None;
    }
    let n = chunks.len();
    let m = (cap / chunk_rows).clamp(1, n);
    let mut take = vec![false; n];
    for j in 0..m {
        take[j * n / m] = true;
    }
    Some(take)
}

/// The shift of a site's statistics and second moments, from the first rows that pass the
/// filters: their mean in the dimensions whose mean exceeds one standard deviation (whose
/// variation f32 products of uncentred values would lose), zero elsewhere. For the bf16
/// kernel, only where the mean exceeds 8 standard deviations: zero keeps its shifted values
/// exact (see [`crate::gram::Kernel::shift`]), at the price of f32 sums that lose up to a
/// factor 65 to cancellation in the dimensions between.
fn moment_shift(srcs: &[SiteSource], rows: usize, skip_positions: i64) -> Vec<f32> {
    let d = srcs[0].dim;
    let bf16 = srcs.iter().all(|s| s.dtype == DType::BF16);
    let sigmas: f64 = if Kernel::detect(bf16).bf16() {
        8.0
    } else {
        1.0
    };
    let mut sum = vec![0f64; d];
    let mut sumsq = vec![0f64; d];
    let mut n = 0usize;
    let mut buf = vec![0f32; d];
    'outer: for src in srcs {
        let rb = src.row_bytes();
        for r in 0..src.rows {
            if src.position(r).is_some_and(|p| p < skip_positions) {
                continue;
            }
            decode_f32(
                src.dtype,
                &src.tensor.bytes()[r * rb..(r + 1) * rb],
                &mut buf,
            );
            if buf.iter().all(|v| v.is_finite()) {
                for ((s, q), &x) in sum.iter_mut().zip(&mut sumsq).zip(&buf) {
                    *s += x as f64;
                    *q += x as f64 * x as f64;
                }
                n += 1;
                if n == rows {
                    break 'outer;
                }
            }
        }
    }
    if n == 0 {
        return vec![0.0; d];
    }
    let n = n as f64;
    sum.iter()
        .zip(&sumsq)
        .map(|(s, q)| {
            let mean = s / n;
            let var = (q / n - mean * mean).max(0.0);
            if mean * mean > sigmas * sigmas * var {
                mean as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// Decode rows `r0..r1` of `src`, drop skipped and non-finite rows, accumulate the rest.
#[allow(clippy::too_many_arguments)]
fn process_chunk(
    src: &SiteSource,
    r0: usize,
    r1: usize,
    opts: &AnalyzeOptions,
    full: bool,
    buf: &mut [f32],
    folds: &mut Vec<u32>,
    acc: &mut Accumulator,
) {
    let d = src.dim;
    let rb = src.row_bytes();
    populate_pages(src, r0 * rb, r1 * rb);
    let bytes = &src.tensor.bytes()[r0 * rb..r1 * rb];
    let m = r1 - r0;
    let fold_of = |row: usize| {
        let k = opts.folds as i64;
        let f = match src.document(row) {
            Some(doc) => doc.rem_euclid(k),
            None => ((row / FOLD_BLOCK_ROWS) as i64).rem_euclid(k),
        };
        f as usize
    };
    if !(opts.second_moments && full) {
        // Statistics only: runs of rows of one fold, straight from the map (no decode buffer).
        let skip = |row: usize| src.position(row).is_some_and(|p| p < opts.skip_positions);
        let mut i = r0;
        while i < r1 {
            if skip(i) {
                set_aside(src.dtype, &bytes[(i - r0) * rb..][..rb], &mut buf[..d], acc);
                i += 1;
                continue;
            }
            let k = fold_of(i);
            let mut j = i + 1;
            while j < r1 && !skip(j) && fold_of(j) == k {
                j += 1;
            }
            let run = &bytes[(i - r0) * rb..(j - r0) * rb];
            acc.add_run(full.then_some(k), src.dtype, run, j - i);
            i = j;
        }
        release_pages(src, r0 * rb, r1 * rb);
        return;
    }
    // Second moments: the kept rows decoded to f32 straight into fold order (the Gram kernel
    // takes a fold's rows together); `folds` holds each row's fold, or DROP.
    const DROP: u32 = u32::MAX;
    folds.clear();
    let mut counts = vec![0usize; opts.folds];
    for i in 0..m {
        let row = r0 + i;
        let raw = &bytes[i * rb..(i + 1) * rb];
        if any_nonfinite(src.dtype, raw) {
            acc.stats.nonfinite += 1;
            folds.push(DROP);
        } else if src.position(row).is_some_and(|p| p < opts.skip_positions) {
            set_aside(src.dtype, raw, &mut buf[..d], acc);
            folds.push(DROP);
        } else {
            let k = fold_of(row);
            counts[k] += 1;
            folds.push(k as u32);
        }
    }
    // f32 dumps: the rows straight from the map, as runs of consecutive rows of one fold.
    #[cfg(target_endian = "little")]
    if src.dtype == DType::F32 {
        // SAFETY: any 4 bytes are an f32; `align_to` only yields aligned items.
        let (pre, rows, post) = unsafe { bytes.align_to::<f32>() };
        if pre.is_empty() && post.is_empty() {
            let mut runs: Vec<Vec<&[f32]>> = vec![Vec::new(); opts.folds];
            let mut i = 0;
            while i < m {
                let k = folds[i];
                let mut j = i + 1;
                while j < m && folds[j] == k {
                    j += 1;
                }
                if k != DROP {
                    runs[k as usize].push(&rows[i * d..j * d]);
                }
                i = j;
            }
            for (k, r) in runs.iter().enumerate() {
                if !r.is_empty() {
                    acc.add_fold_runs(k, r);
                }
            }
            release_pages(src, r0 * rb, r1 * rb);
            return;
        }
    }
    let mut next = starts(&counts);
    for (i, &k) in folds.iter().enumerate() {
        if k != DROP {
            let slot = next[k as usize];
            next[k as usize] += 1;
            decode_f32(
                src.dtype,
                &bytes[i * rb..(i + 1) * rb],
                &mut buf[slot * d..(slot + 1) * d],
            );
        }
    }
    let kept: usize = counts.iter().sum();
    acc.add_sorted_rows(&buf[..kept * d], &counts);
    release_pages(src, r0 * rb, r1 * rb);
}

/// A row the position filter skips: kept aside, not dropped (adapters pin b·x = 1 at the sink
/// from the mean of these rows), unless it holds a NaN or an infinity.
fn set_aside(dtype: DType, raw: &[u8], x: &mut [f32], acc: &mut Accumulator) {
    decode_f32(dtype, raw, x);
    if x.iter().all(|v| v.is_finite()) {
        acc.stats.skipped += 1;
        for (s, &v) in acc.stats.skipped_sum.iter_mut().zip(x.iter()) {
            *s += v as f64;
        }
    } else {
        acc.stats.nonfinite += 1;
    }
}

/// Map this chunk's pages in one call (Linux 5.14+; a no-op elsewhere) instead of a page
/// fault every few pages as the kernels walk it.
fn populate_pages(src: &SiteSource, begin: usize, end: usize) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let base = src.tensor.offset;
        let start = (base + begin) / PAGE * PAGE;
        let stop = (base + end).min(src.tensor.file.map.len());
        if stop > start {
            let _ = src.tensor.file.map.advise_range(
                memmap2::Advice::PopulateRead,
                start,
                stop - start,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (src, begin, end);
}

/// Tell the kernel we are done with the whole pages of this chunk, so the resident set stays
/// flat however large the dump (the pages stay in the page cache).
fn release_pages(src: &SiteSource, begin: usize, end: usize) {
    const PAGE: usize = 4096;
    let base = src.tensor.offset;
    let start = (base + begin).div_ceil(PAGE) * PAGE;
    let stop = (base + end) / PAGE * PAGE;
    if stop > start {
        // SAFETY: the map is private and read-only; dropping clean file-backed pages only
        // means they are read again (from the page cache) if touched later.
        let _ = unsafe {
            src.tensor.file.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start,
                stop - start,
            )
        };
    }
}
