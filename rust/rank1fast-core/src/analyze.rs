//! One streaming pass per site over every file that holds it, on all cores.
//!
//! Rows are read from the memory map in chunks of 16 MiB, filtered (position < skip,
//! non-finite) and handed to a per-thread [`Accumulator`]: straight from the map for the
//! per-dimension statistics (runs of one fold's rows), and for the second moments of f32 and
//! bf16 dumps; f16 rows are decoded to f32 in fold order for them. The statistics pass over a
//! run also finds the rows holding a NaN or an infinity, which are then dropped. The threads
//! add second moments to one set of fold matrices, fold k behind its own lock, and merge their
//! per-dimension statistics at the end. Memory is `folds × dim² × 8 + threads × chunk` bytes,
//! whatever the number of tokens; an analysis that cannot fit is refused before it allocates
//! ([`Error::Memory`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::dtype::{decode_f32, DType};
use crate::error::{Error, Result};
use crate::gram::{Bf16, Kernel};
use crate::source::{self, SiteSource};
use crate::stats::{starts, zeroed_large_on, Accumulator, SharedMoments, SiteStats};

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
    /// Bytes the analysis may hold (`None`: the memory available now, see
    /// [`available_memory`]); a site whose fold matrices and buffers need more is refused
    /// before anything is allocated.
    pub memory_limit: Option<u64>,
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
            memory_limit: None,
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
    if let Some((name, srcs)) = selected.iter().max_by_key(|(_, srcs)| srcs[0].dim) {
        check_memory(name, srcs[0].dim, opts, threads)?;
    }
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
            // A site no row reached (all NaN, or all before skip_positions) is refused by
            // the caller, on whole-dump statistics: a part of a dump may hold no such row.
            let stats = analyze_site(srcs, opts, threads, shift, progress)?;
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

/// Bytes [`analyze`] holds at its peak for one site of width `dim`: the fold matrices
/// (`folds × dim²` float64, with second moments) and each thread's decoded chunk and packing
/// buffers.
pub fn analysis_bytes(dim: usize, opts: &AnalyzeOptions, threads: usize) -> u64 {
    let (d, f) = (dim as u64, opts.folds as u64);
    let moments = if opts.second_moments {
        f * d * d * 8
    } else {
        0
    };
    // Per thread: the decoded chunk (f32) and the Gram kernel's packed panels (~16 MiB).
    let per_thread = (chunk_rows(dim, opts) as u64) * d * 4 + (16 << 20);
    moments + threads as u64 * per_thread
}

/// Bytes this process can still allocate without swapping or being killed: the kernel's
/// `MemAvailable`, capped by the cgroup's limit less its usage (containers). `None` where
/// neither is known (not Linux).
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let read = |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let cgroup = match (
        read("/sys/fs/cgroup/memory.max"),
        read("/sys/fs/cgroup/memory.current"),
    ) {
        (Some(max), Some(cur)) => Some(max.saturating_sub(cur)),
        _ => None,
    };
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Refuse an analysis whose peak memory ([`analysis_bytes`]) exceeds `opts.memory_limit` or
/// the memory available, naming the options that make it fit.
fn check_memory(site: &str, dim: usize, opts: &AnalyzeOptions, threads: usize) -> Result<()> {
    let Some(available) = opts.memory_limit.or_else(available_memory) else {
        return Ok(());
    };
    let need = analysis_bytes(dim, opts, threads);
    if need <= available {
        return Ok(());
    }
    let fold_bytes = (dim as u64).pow(2) * 8;
    let mut fixes = Vec::new();
    if opts.second_moments {
        let base = analysis_bytes(
            dim,
            &AnalyzeOptions {
                folds: 0,
                ..opts.clone()
            },
            threads,
        );
        let folds = available.saturating_sub(base) / fold_bytes.max(1);
        if folds >= 2 && (folds as usize) < opts.folds {
            let o = AnalyzeOptions {
                folds: folds as usize,
                ..opts.clone()
            };
            fixes.push(format!(
                "folds={folds} / --folds {folds} ({})",
                gib(analysis_bytes(dim, &o, threads))
            ));
        }
        fixes.push(
            "second_moments=False / --no-second-moments (statistics and the one-hot direction \
             only)"
                .into(),
        );
    }
    // Fewer threads only where their buffers are what does not fit.
    if threads > 1 && analysis_bytes(dim, opts, 1) <= available {
        fixes.push("fewer threads (threads= / --threads)".into());
    }
    Err(Error::Memory(format!(
        "site {site}: the analysis needs {} ({} fold matrices of {dim} x {dim} float64, {} each, \
         and {threads} thread buffers) but {} {}; pass {}",
        gib(need),
        if opts.second_moments { opts.folds } else { 0 },
        gib(fold_bytes),
        gib(available),
        if opts.memory_limit.is_some() {
            "is the memory_limit"
        } else {
            "are available"
        },
        fixes.join(", or ")
    )))
}

fn chunk_rows(dim: usize, opts: &AnalyzeOptions) -> usize {
    if opts.second_moments {
        let rows = (CHUNK_FLOATS_MOMENTS / dim).clamp(256, 8192);
        // Below the cap, whole cycles of fold blocks where they fit: rows without documents
        // then reach each fold's second moments in whole blocks (2 x 256 rows of every fold
        // at d = 1536, 2,560-row chunks), not blocks and a few rows, which cost the Gram kernel
        // a pass over G for little work.
        let cycle = FOLD_BLOCK_ROWS * opts.folds.max(1);
        if rows < 8192 && rows >= cycle {
            rows / cycle * cycle
        } else {
            rows
        }
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
    // One set of fold matrices for all threads (fold k behind its own lock).
    let dd = dim * dim;
    let mut moments = if opts.second_moments {
        zeroed_large_on(opts.folds * dd, workers)
    } else {
        Vec::new()
    };
    let locks: Vec<Mutex<&mut [f64]>> = moments.chunks_mut(dd.max(1)).map(Mutex::new).collect();
    let sink: &SharedMoments = &locks;
    let new_acc = || {
        if opts.second_moments {
            Accumulator::new_shared(dim, opts.folds, shift.clone()).bf16_rows(bf16_rows)
        } else {
            Accumulator::new(dim, opts.folds, false, shift.clone())
        }
    };
    let parts: Vec<Accumulator> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut acc = new_acc();
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
                        let chunk = Chunk { src, r0, r1, full };
                        process_chunk(&chunk, opts, &mut buf, &mut folds, &mut acc, sink);
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
                    new_acc()
                }
            })
            .collect()
    });
    drop(locks);
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
    Ok(if opts.second_moments {
        total.finish_with(moments)
    } else {
        total.finish()
    })
}

/// Rows `r0..r1` of one file of a site; `full`: they enter the folds and second moments.
struct Chunk<'a> {
    src: &'a SiteSource,
    r0: usize,
    r1: usize,
    full: bool,
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

/// Decode a chunk's rows, drop skipped and non-finite rows, accumulate the rest (second
/// moments into the shared fold matrices `sink`).
fn process_chunk(
    chunk: &Chunk,
    opts: &AnalyzeOptions,
    buf: &mut [f32],
    folds: &mut Vec<u32>,
    acc: &mut Accumulator,
    sink: &SharedMoments,
) {
    let &Chunk { src, r0, r1, full } = chunk;
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
    // Second moments: the kept rows go to the Gram kernel a fold at a time (it takes a fold's
    // rows together), in place or decoded to f32 in fold order; `folds` holds each row's fold,
    // or DROP. Rows holding a NaN or an infinity are found (and dropped) by the statistics
    // pass over them: no pass of its own.
    const DROP: u32 = u32::MAX;
    folds.clear();
    let mut counts = vec![0usize; opts.folds];
    for i in 0..m {
        let row = r0 + i;
        let raw = &bytes[i * rb..(i + 1) * rb];
        if src.position(row).is_some_and(|p| p < opts.skip_positions) {
            set_aside(src.dtype, raw, &mut buf[..d], acc);
            folds.push(DROP);
        } else {
            let k = fold_of(row);
            counts[k] += 1;
            folds.push(k as u32);
        }
    }
    // f32 and bf16 dumps: the rows straight from the map, as runs of consecutive rows of one
    // fold.
    fn runs<'r, R>(rows: &'r [R], folds: &[u32], n: usize, d: usize) -> Vec<Vec<&'r [R]>> {
        let mut runs: Vec<Vec<&[R]>> = vec![Vec::new(); n];
        let mut i = 0;
        while i < folds.len() {
            let k = folds[i];
            let mut j = i + 1;
            while j < folds.len() && folds[j] == k {
                j += 1;
            }
            if k != DROP {
                runs[k as usize].push(&rows[i * d..j * d]);
            }
            i = j;
        }
        runs
    }
    let in_place = match direct_rows(src.dtype, bytes) {
        Direct::F32(rows) => {
            acc.add_fold_runs_shared(&runs(rows, folds, opts.folds, d), sink);
            true
        }
        Direct::Bf16(rows) => {
            acc.add_fold_runs_shared(&runs(rows, folds, opts.folds, d), sink);
            true
        }
        Direct::No => false,
    };
    if in_place {
        release_pages(src, r0 * rb, r1 * rb);
        return;
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
    acc.add_sorted_rows_shared(&buf[..kept * d], &counts, sink);
    release_pages(src, r0 * rb, r1 * rb);
}

/// A chunk's rows as the kernels can read them in place, when they can.
enum Direct<'a> {
    F32(&'a [f32]),
    Bf16(&'a [Bf16]),
    No,
}

fn direct_rows(dtype: DType, bytes: &[u8]) -> Direct<'_> {
    #[cfg(target_endian = "little")]
    match dtype {
        DType::F32 => {
            // SAFETY: any 4 bytes are an f32; `align_to` only yields aligned items.
            let (pre, rows, post) = unsafe { bytes.align_to::<f32>() };
            if pre.is_empty() && post.is_empty() {
                return Direct::F32(rows);
            }
        }
        DType::BF16 => {
            // SAFETY: any 2 bytes are a Bf16 (the bits of a bfloat16 number); `align_to` only
            // yields aligned items.
            let (pre, rows, post) = unsafe { bytes.align_to::<Bf16>() };
            if pre.is_empty() && post.is_empty() {
                return Direct::Bf16(rows);
            }
        }
        DType::F16 => {}
    }
    let _ = (dtype, bytes);
    Direct::No
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{write_safetensors, TensorSpec};
    use std::collections::BTreeMap;

    fn dump(dir: &Path, rows: usize, d: usize) -> std::path::PathBuf {
        let mut s = 3u64;
        let values: Vec<f32> = (0..rows * d)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 24) as f32 + if i % d == 0 { 30.0 } else { 0.0 }
            })
            .collect();
        let path = dir.join("x.safetensors");
        let spec = TensorSpec {
            name: "x".into(),
            shape: vec![rows, d],
            values: &values,
        };
        write_safetensors(&path, &[spec], DType::F32, &BTreeMap::new()).unwrap();
        path
    }

    /// Threads sharing one set of fold matrices give the single-threaded result.
    #[test]
    fn shared_fold_matrices_match_one_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dump(dir.path(), 3000, 24);
        let run = |threads| {
            let opts = AnalyzeOptions {
                threads,
                ..AnalyzeOptions::default()
            };
            analyze(&path, &opts, &Progress::default())
                .unwrap()
                .remove(0)
                .stats
        };
        let (one, four) = (run(1), run(4));
        let (a, b) = (one.fold_moment.unwrap(), four.fold_moment.unwrap());
        assert_eq!(one.fold_count, four.fold_count);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "{x} vs {y}");
        }
    }

    #[test]
    fn refuses_what_cannot_fit_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dump(dir.path(), 300, 64);
        let opts = AnalyzeOptions {
            threads: 1,
            memory_limit: Some(8192 * 64 * 4 + (16 << 20) + 64 * 64 * 8 * 3 + 100),
            ..AnalyzeOptions::default()
        };
        let e = analyze(&path, &opts, &Progress::default()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Memory(_)), "{msg}");
        assert!(
            msg.contains("folds=3") && msg.contains("second_moments=False"),
            "{msg}"
        );
        let fits = AnalyzeOptions { folds: 3, ..opts };
        assert!(analyze(&path, &fits, &Progress::default()).is_ok());
    }
}
