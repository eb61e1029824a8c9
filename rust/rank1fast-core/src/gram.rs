//! The second-moment kernel: `G += (X − c)ᵀ (X − c)` for a block of rows, upper triangle,
//! accumulated in f64.
//!
//! `X` is row-major (a row per token). Rows are taken [`KC`] at a time, shifted by `c` and
//! packed twice, into panels of [`NR`] = 16 columns and panels of [`MR`] = 6 columns, each
//! stored row after row, so the kernel reads both operands contiguously whatever the width
//! (no cache-set aliasing at power-of-two widths). A 6 × 16 tile of `G` is accumulated over
//! the block's rows in twelve AVX2 registers with FMA, then added to the f64 matrix: f32 sums
//! never run over more than `KC` products, and no f32 copy of `G` is kept or flushed.
//!
//! Tiles wholly below the diagonal are skipped; tiles that cross it also write a few entries
//! below it, which are not part of the result (only `i ≤ j` is; callers mirror it).
//! CPUs without AVX2 + FMA (detected at run time) use the same loops in portable Rust.

/// Rows of a register tile of `G` (broadcast operand).
pub const MR: usize = 6;
/// Columns of a register tile of `G` (two 8-float vectors).
pub const NR: usize = 16;
/// Rows of `X` per packed block: a 16-column panel (16 KiB) stays in L1.
const KC: usize = 256;
/// `MR`-panels multiplied against one `NR`-panel in turn (96 KiB of packed rows: stays in L2).
const MC_PANELS: usize = 16;

/// Packing buffers of the kernel for one dimension; one per thread.
pub struct Gram {
    dim: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Gram {
    pub fn new(dim: usize) -> Self {
        Gram {
            dim,
            a: vec![0.0; dim.div_ceil(MR) * KC * MR],
            b: vec![0.0; dim.div_ceil(NR) * KC * NR],
        }
    }

    /// Add the upper triangle (`i ≤ j`) of `Σ_rows (x − shift)(x − shift)ᵀ` to `g`
    /// (`dim × dim`, row-major). `rows.len()` must be a multiple of `dim`.
    pub fn add(&mut self, rows: &[f32], shift: &[f32], g: &mut [f64]) {
        let d = self.dim;
        assert_eq!(shift.len(), d, "one shift per dimension");
        assert_eq!(g.len(), d * d, "g must be dim × dim");
        assert_eq!(rows.len() % d.max(1), 0, "whole rows");
        if d == 0 {
            return;
        }
        for block in rows.chunks(KC * d) {
            let kb = block.len() / d;
            pack(block, shift, d, MR, &mut self.a);
            pack(block, shift, d, NR, &mut self.b);
            self.multiply(kb, g);
        }
    }

    fn multiply(&self, kb: usize, g: &mut [f64]) {
        let d = self.dim;
        let (na, nb) = (d.div_ceil(MR), d.div_ceil(NR));
        #[cfg(target_arch = "x86_64")]
        let fast = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        for q0 in (0..na).step_by(MC_PANELS) {
            let q1 = (q0 + MC_PANELS).min(na);
            for p in 0..nb {
                let j0 = p * NR;
                let b = &self.b[p * KC * NR..][..kb * NR];
                for q in q0..q1 {
                    let i0 = q * MR;
                    if i0 >= j0 + NR {
                        break; // this tile and the rest of the block lie below the diagonal
                    }
                    let a = &self.a[q * KC * MR..][..kb * MR];
                    let (rows, cols) = ((d - i0).min(MR), (d - j0).min(NR));
                    #[cfg(target_arch = "x86_64")]
                    if fast {
                        // SAFETY: AVX2 and FMA are present (checked above); `a`, `b` hold `kb`
                        // packed rows and the tile lies inside `g` (`rows`, `cols` clip it).
                        unsafe { tile_avx2(kb, a, b, g, d, i0, j0, rows, cols) };
                        continue;
                    }
                    tile_portable(kb, a, b, g, d, i0, j0, rows, cols);
                }
            }
        }
    }
}

/// Pack `block` (rows of width `d`, minus `shift`) into panels of `w` columns, each panel
/// `KC` rows of `w` floats; columns past `d` are zero.
fn pack(block: &[f32], shift: &[f32], d: usize, w: usize, out: &mut [f32]) {
    let panels = d.div_ceil(w);
    for (k, row) in block.chunks_exact(d).enumerate() {
        for p in 0..panels {
            let c0 = p * w;
            let n = (d - c0).min(w);
            let dst = &mut out[p * KC * w + k * w..][..w];
            for ((o, &x), &c) in dst[..n].iter_mut().zip(&row[c0..c0 + n]).zip(&shift[c0..]) {
                *o = x - c;
            }
            dst[n..].fill(0.0);
        }
    }
}

/// Add the `rows × cols` top-left part of `t` to `g` at `(i0, j0)`.
#[inline(always)]
fn add_tile(
    t: &[[f32; NR]; MR],
    g: &mut [f64],
    d: usize,
    i0: usize,
    j0: usize,
    rows: usize,
    cols: usize,
) {
    for (r, tr) in t.iter().enumerate().take(rows) {
        let dst = &mut g[(i0 + r) * d + j0..][..cols];
        for (o, &v) in dst.iter_mut().zip(tr) {
            *o += v as f64;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn tile_portable(
    kb: usize,
    a: &[f32],
    b: &[f32],
    g: &mut [f64],
    d: usize,
    i0: usize,
    j0: usize,
    rows: usize,
    cols: usize,
) {
    let mut t = [[0f32; NR]; MR];
    for (ak, bk) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kb) {
        for (tr, &x) in t.iter_mut().zip(ak) {
            for (o, &y) in tr.iter_mut().zip(bk) {
                *o += x * y;
            }
        }
    }
    add_tile(&t, g, d, i0, j0, rows, cols);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx2(
    kb: usize,
    a: &[f32],
    b: &[f32],
    g: &mut [f64],
    d: usize,
    i0: usize,
    j0: usize,
    rows: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= kb * MR && b.len() >= kb * NR);
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // The f64 rows of the tile are far apart in memory (d × 8 bytes): fetch them while the
    // products run, so the final update does not wait on memory.
    for r in 0..rows {
        let p = g[(i0 + r) * d + j0..].as_ptr();
        // SAFETY: prefetching is a hint; the addresses lie inside `g` (cols >= 1).
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p.cast());
            _mm_prefetch::<_MM_HINT_T0>(p.add((cols - 1).min(8)).cast());
            _mm_prefetch::<_MM_HINT_T0>(p.add(cols - 1).cast());
        }
    }
    let mut c = [[_mm256_setzero_ps(); 2]; MR];
    for k in 0..kb {
        // SAFETY: k < kb, and `a` / `b` hold kb rows of MR / NR floats.
        let (b0, b1, ak) = unsafe {
            (
                _mm256_loadu_ps(pb.add(k * NR)),
                _mm256_loadu_ps(pb.add(k * NR + 8)),
                pa.add(k * MR),
            )
        };
        for (r, cr) in c.iter_mut().enumerate() {
            // SAFETY: r < MR floats of row k of the MR-panel.
            let x = unsafe { _mm256_broadcast_ss(&*ak.add(r)) };
            cr[0] = _mm256_fmadd_ps(x, b0, cr[0]);
            cr[1] = _mm256_fmadd_ps(x, b1, cr[1]);
        }
    }
    if rows == MR && cols == NR {
        for (r, cr) in c.iter().enumerate() {
            let row = &mut g[(i0 + r) * d + j0..][..NR];
            let p = row.as_mut_ptr();
            for (h, &v) in cr.iter().enumerate() {
                let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
                let hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
                // SAFETY: `row` holds NR = 16 doubles; h * 8 + 8 <= 16.
                unsafe {
                    let q = p.add(h * 8);
                    _mm256_storeu_pd(q, _mm256_add_pd(_mm256_loadu_pd(q), lo));
                    _mm256_storeu_pd(q.add(4), _mm256_add_pd(_mm256_loadu_pd(q.add(4)), hi));
                }
            }
        }
    } else {
        let mut t = [[0f32; NR]; MR];
        for (tr, cr) in t.iter_mut().zip(&c) {
            // SAFETY: tr holds 16 floats.
            unsafe {
                _mm256_storeu_ps(tr.as_mut_ptr(), cr[0]);
                _mm256_storeu_ps(tr.as_mut_ptr().add(8), cr[1]);
            }
        }
        add_tile(&t, g, d, i0, j0, rows, cols);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(rows: &[f32], shift: &[f32], d: usize) -> Vec<f64> {
        let mut g = vec![0.0; d * d];
        for r in rows.chunks_exact(d) {
            for i in 0..d {
                for j in i..d {
                    g[i * d + j] += (r[i] - shift[i]) as f64 * (r[j] - shift[j]) as f64;
                }
            }
        }
        g
    }

    #[test]
    fn matches_float64_reference_at_awkward_sizes() {
        // Widths around the tile sizes, row counts around the block size.
        for &(d, n) in &[
            (1, 3),
            (5, 7),
            (6, 16),
            (17, 255),
            (23, 257),
            (40, 600),
            (97, 513),
        ] {
            let rows: Vec<f32> = (0..n * d)
                .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.3) * (1 + i % d) as f32)
                .collect();
            let shift: Vec<f32> = (0..d).map(|j| 0.1 * j as f32).collect();
            let want = reference(&rows, &shift, d);
            let mut gram = Gram::new(d);
            let mut got = vec![0.0; d * d];
            // In two calls, so accumulation across calls is covered too.
            let half = n / 2 * d;
            gram.add(&rows[..half], &shift, &mut got);
            gram.add(&rows[half..], &shift, &mut got);
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            for i in 0..d {
                for j in i..d {
                    let err = (got[i * d + j] - want[i * d + j]).abs();
                    assert!(err <= 1e-5 * scale, "d {d} n {n} ({i},{j}): {err:e}");
                }
            }
        }
    }

    #[test]
    fn portable_and_simd_tiles_agree() {
        let (d, n) = (37, 300);
        let rows: Vec<f32> = (0..n * d).map(|i| (i % 13) as f32 - 6.0).collect();
        let shift = vec![0.5f32; d];
        let mut g = Gram::new(d);
        pack(&rows[..KC * d], &shift, d, MR, &mut g.a);
        pack(&rows[..KC * d], &shift, d, NR, &mut g.b);
        let mut simd = vec![0.0; d * d];
        g.multiply(KC, &mut simd);
        let mut portable = vec![0.0; d * d];
        for p in 0..d.div_ceil(NR) {
            for q in 0..d.div_ceil(MR) {
                let (i0, j0) = (q * MR, p * NR);
                if i0 >= j0 + NR {
                    continue;
                }
                tile_portable(
                    KC,
                    &g.a[q * KC * MR..],
                    &g.b[p * KC * NR..],
                    &mut portable,
                    d,
                    i0,
                    j0,
                    (d - i0).min(MR),
                    (d - j0).min(NR),
                );
            }
        }
        // Small integers: every product and sum is exact in f32, so both paths agree exactly.
        for i in 0..d {
            assert_eq!(
                simd[i * d + i..(i + 1) * d],
                portable[i * d + i..(i + 1) * d]
            );
        }
    }
}
