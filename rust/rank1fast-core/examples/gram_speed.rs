//! Speed of the Gram kernel used for second moments: `cargo run --release --example gram_speed`.
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{matmul as tri, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};
use std::time::Instant;

fn main() {
    let d: usize = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1536);
    for k in [256usize, 1024, 4096] {
        let x: Vec<f32> = (0..k * d)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let mut g = vec![0f32; d * d];
        let xm = MatRef::from_row_major_slice(&x, k, d);
        let reps = (2_000_000_000 / (k * d * d)).max(1);
        let t = Instant::now();
        for _ in 0..reps {
            let gm = MatMut::from_column_major_slice_mut(&mut g, d, d);
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
        }
        let tt = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            let gm = MatMut::from_column_major_slice_mut(&mut g, d, d);
            matmul(gm, Accum::Replace, xm.transpose(), xm, 1.0f32, Par::Seq);
        }
        let tr = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            let mut gm = MatMut::from_column_major_slice_mut(&mut g, d, d);
            let tile = 256;
            for j0 in (0..d).step_by(tile) {
                let j1 = (j0 + tile).min(d);
                // rows 0..j1 of column block j0..j1 (upper part incl. diagonal block)
                let dst = gm.as_mut().submatrix_mut(0, j0, j1, j1 - j0);
                matmul(
                    dst,
                    Accum::Replace,
                    xm.get(.., 0..j1).transpose(),
                    xm.get(.., j0..j1),
                    1.0f32,
                    Par::Seq,
                );
            }
        }
        let tl = t.elapsed().as_secs_f64() / reps as f64;
        let flop = 2.0 * (k * d * d) as f64;
        println!("d={d} k={k}: triangular {:.1} useful GFLOP/s, rectangular {:.1} GFLOP/s, tiled {:.1} useful",
                 flop / 2.0 / tt / 1e9, flop / tr / 1e9, flop / 2.0 / tl / 1e9);
    }
}
