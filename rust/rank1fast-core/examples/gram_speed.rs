//! Speed of the second-moment kernel against faer's triangular f32 product (one thread):
//! `cargo run --release --example gram_speed [DIM]`.
use faer::linalg::matmul::triangular::{matmul as tri, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};
use rank1fast_core::gram::{Gram, Kernel};
use std::time::Instant;

/// CPU seconds of this process (user + system), which a busy machine distorts less than wall
/// time (Linux only; falls back to wall time elsewhere).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Seconds per call of `f`, CPU time when available.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    let (t, c) = (Instant::now(), cpu_seconds());
    for _ in 0..reps {
        f();
    }
    match (c, cpu_seconds()) {
        (Some(a), Some(b)) if b > a => (b - a) / reps as f64,
        _ => t.elapsed().as_secs_f64() / reps as f64,
    }
}

fn main() {
    let d: usize = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1536);
    for k in [256usize, 1024, 4096] {
        let x: Vec<f32> = (0..k * d)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let shift = vec![0.25f32; d];
        let reps = (64_000_000_000 / (k * d * d)).max(1);
        // faer: shifted copy, then the lower triangle of the Gram matrix in f32.
        let mut g32 = vec![0f32; d * d];
        let skip_faer = std::env::args().nth(2).as_deref() == Some("gram");
        let tf = time(if skip_faer { 0 } else { reps }, || {
            let shifted: Vec<f32> = x
                .chunks(d)
                .flat_map(|r| r.iter().zip(&shift).map(|(a, c)| a - c))
                .collect();
            let xm = MatRef::from_row_major_slice(&shifted, k, d);
            let gm = MatMut::from_column_major_slice_mut(&mut g32, d, d);
            tri(
                gm,
                BlockStructure::TriangularLower,
                Accum::Replace,
                xm.transpose(),
                BlockStructure::Rectangular,
                xm,
                BlockStructure::Rectangular,
                1.0f32,
                Par::Seq,
            );
        });
        let useful = (k * d * d) as f64; // flops of the upper triangle: k d (d+1) / 2 FMAs
        if !skip_faer {
            println!(
                "d={d} rows={k}: faer triangular {:.1} GFLOP/s (useful flops per CPU second, one thread)",
                useful / tf / 1e9
            );
        }
        // rank1fast: every kernel this CPU has (the bf16 one rounds the rows to bf16 first).
        for kernel in Kernel::available() {
            let xs: Vec<f32> = if kernel.bf16() {
                x.iter()
                    .map(|&v| f32::from_bits((v.to_bits() + 0x8000) & 0xffff_0000))
                    .collect()
            } else {
                x.clone()
            };
            let shift = kernel.shift(&shift);
            let mut gram = Gram::with_kernel(d, kernel);
            let mut g64 = vec![0f64; d * d];
            let tg = time(reps, || gram.add(&xs, &shift, &mut g64));
            println!(
                "d={d} rows={k}: rank1fast gram, {:<12} {:.1} GFLOP/s",
                kernel.name(),
                useful / tg / 1e9
            );
        }
    }
}
