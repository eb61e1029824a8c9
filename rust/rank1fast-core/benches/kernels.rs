//! Criterion benches of the core kernels, on one thread (except `solve`, where faer may use
//! every core): `cargo bench -p rank1fast-core --bench kernels` (or `make bench-rust`); add a
//! filter such as `-- gram` to run some of them.
//!
//! Kept short (10 samples, ~2 s each) so the whole run takes a couple of minutes: the numbers
//! are for spotting regressions, not for publishing.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use rank1fast_core::adapter::{write_safetensors, TensorSpec};
use rank1fast_core::dtype::{decode_f32, encode_f32};
use rank1fast_core::gram::{Gram, Kernel};
use rank1fast_core::rowstats::RunStats;
use rank1fast_core::stats::{Accumulator, SiteStats};
use rank1fast_core::{
    analyze, best_onehot, constant_direction, default_ridges, AnalyzeOptions, DType, Progress,
};

/// Deterministic pseudo-random values in [-0.5, 0.5) (the LCG the unit tests use).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// `n` rows of width `d` that look like activations: a large, nearly constant first coordinate
/// (what the constant direction finds), the rest noise around per-dimension offsets.
fn activations(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rows = noise(n * d, seed);
    for (i, x) in rows.iter_mut().enumerate() {
        let j = i % d;
        *x = if j == 0 {
            50.0 + 0.1 * *x
        } else {
            *x + (j % 7) as f32 - 3.0
        };
    }
    rows
}

/// Fold ids in runs of `run` rows, cycling over `folds`.
fn fold_runs(n: usize, run: usize, folds: usize) -> Vec<u32> {
    (0..n).map(|i| ((i / run) % folds) as u32).collect()
}

fn decode(c: &mut Criterion) {
    const BYTES: usize = 1 << 20;
    let mut g = c.benchmark_group("decode_f32");
    g.throughput(Throughput::Bytes(BYTES as u64)); // input bytes
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let n = BYTES / dtype.size();
        let mut bytes = Vec::new();
        encode_f32(dtype, &noise(n, 1), &mut bytes);
        let mut dst = vec![0f32; n];
        g.bench_function(dtype.name(), |b| {
            b.iter(|| decode_f32(dtype, black_box(&bytes), black_box(&mut dst)))
        });
    }
    g.finish();
}

fn add_rows(c: &mut Criterion) {
    let (d, n, folds) = (2048, 512, 5);
    let rows = activations(n, d, 2);
    let fold = fold_runs(n, 64, folds);
    let mut acc = Accumulator::new(d, folds, false, vec![0.0; d]);
    let mut g = c.benchmark_group("stats_add_rows");
    g.throughput(Throughput::Bytes((n * d * 4) as u64)); // f32 input bytes
    g.bench_function(
        BenchmarkId::new("no_moments", format!("d{d}_rows{n}")),
        |b| b.iter(|| acc.add_rows(black_box(&rows), black_box(&fold))),
    );
    g.finish();
    black_box(acc.finish());
}

fn run_stats(c: &mut Criterion) {
    // The statistics pass straight from a dump's bytes (rowstats), 256 rows of d = 2048.
    let (d, n) = (2048, 256);
    let mut g = c.benchmark_group("run_stats");
    let shift = vec![0f64; d];
    let mut out = RunStats::new(d);
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let mut bytes = Vec::new();
        encode_f32(dtype, &activations(n, d, 5), &mut bytes);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(dtype.name(), |b| {
            b.iter(|| out.reduce(dtype, black_box(&bytes), n, &shift))
        });
    }
    g.finish();
}

fn gram(c: &mut Criterion) {
    let mut g = c.benchmark_group("gram_add");
    g.sampling_mode(SamplingMode::Flat);
    for kernel in Kernel::available() {
        for d in [576, 1536] {
            let shift = kernel.shift(&vec![0.25f32; d]);
            let mut gram = Gram::with_kernel(d, kernel);
            let mut out = vec![0f64; d * d];
            let n = 1024;
            let mut rows = activations(n, d, 3);
            if kernel.bf16() {
                // The bf16 kernel is for rows of bf16 numbers.
                for v in &mut rows {
                    *v = f32::from_bits((v.to_bits() + 0x8000) & 0xffff_0000);
                }
            }
            // Multiply-adds of the upper triangle including the diagonal: n · d(d+1)/2.
            // (Tiles crossing the diagonal do a little more work than this counts.)
            g.throughput(Throughput::Elements((n * d * (d + 1) / 2) as u64));
            g.bench_function(
                BenchmarkId::new(kernel.name(), format!("d{d}_rows{n}")),
                |b| b.iter(|| gram.add(black_box(&rows), &shift, black_box(&mut out))),
            );
        }
    }
    g.finish();
}

fn solve(c: &mut Criterion) {
    let (d, n, folds) = (576, 4096, 5);
    let rows = activations(n, d, 4);
    let mut acc = Accumulator::new(d, folds, true, rows[..d].to_vec());
    acc.add_rows(&rows, &fold_runs(n, 64, folds));
    let st: SiteStats = acc.finish();
    let ridges = default_ridges();
    // No throughput: the figure that matters is the time per site. One solve takes a good
    // fraction of a second (eigendecompositions; faer may use every core), hence the longer
    // measurement.
    let mut g = c.benchmark_group("solve");
    g.sampling_mode(SamplingMode::Flat);
    g.measurement_time(Duration::from_secs(8));
    g.bench_function(
        BenchmarkId::new("constant_direction", format!("d{d}")),
        |b| b.iter(|| constant_direction(black_box(&st), &ridges).unwrap()),
    );
    g.bench_function(BenchmarkId::new("best_onehot", format!("d{d}")), |b| {
        b.iter(|| best_onehot(black_box(&st)).unwrap())
    });
    g.finish();
}

fn analyze_file(c: &mut Criterion) {
    // One bf16 site of shape [batch, seq, dim]: positions and documents (folds) come from the
    // shape, and position 0 is skipped as in a real dump.
    let (batch, seq, d) = (16, 512, 576);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acts.safetensors");
    let values = activations(batch * seq, d, 5);
    let spec = TensorSpec {
        name: "resid_post.3".into(),
        shape: vec![batch, seq, d],
        values: &values,
    };
    write_safetensors(&path, &[spec], DType::BF16, &BTreeMap::new()).unwrap();
    let mut g = c.benchmark_group("analyze_bf16");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Bytes((batch * seq * d * 2) as u64)); // tensor bytes
    for moments in [false, true] {
        let opts = AnalyzeOptions {
            second_moments: moments,
            threads: 1,
            ..AnalyzeOptions::default()
        };
        let name = if moments { "moments" } else { "no_moments" };
        let id = BenchmarkId::new(name, format!("d{d}_rows{}", batch * seq));
        g.bench_function(id, |b| {
            b.iter(|| analyze(&path, &opts, &Progress::default()).unwrap())
        });
    }
    g.finish();
}

criterion_group! {
    name = kernels;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .without_plots();
    targets = decode, run_stats, add_rows, gram, solve, analyze_file
}
criterion_main!(kernels);
