//! The per-dimension statistics kernel: for a run of rows, straight from the dump's bytes,
//! `Σ (x − c)`, `Σ (x − c)²` (f64), min and max (f32) per dimension, in one pass, and whether
//! every value was finite.
//!
//! Sums about a fixed shift `c` (near the mean in the dimensions where the mean is large, else
//! zero: see `analyze`) add up across runs, threads and chunks without any merging formula,
//! and `Σ (x − c)² − (Σ (x − c))² / n` loses nothing that matters in f64 when `c` is that
//! close. With AVX-512 (detected at run time) the run is read in strips of 32 dimensions down
//! the rows, decoded in registers (bf16 by a shift, f16 by `vcvtph2ps`) and accumulated in
//! registers; without it, rows are decoded to f32 and accumulated one by one.

use crate::dtype::{decode_f32, DType};

/// Per-dimension sums of one run (`dim` values each), written, not accumulated.
pub struct RunStats {
    pub s1: Vec<f64>,
    pub s2: Vec<f64>,
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    row: Vec<f32>,
}

impl RunStats {
    pub fn new(dim: usize) -> Self {
        RunStats {
            s1: vec![0.0; dim],
            s2: vec![0.0; dim],
            min: vec![0.0; dim],
            max: vec![0.0; dim],
            row: vec![0.0; dim],
        }
    }

    /// Reduce `rows` rows of `dtype` values (`dim` each, row after row in `bytes`) about
    /// `shift`. Returns false when a value is NaN or infinite (the sums are then meaningless).
    pub fn reduce(&mut self, dtype: DType, bytes: &[u8], rows: usize, shift: &[f64]) -> bool {
        let d = self.s1.len();
        assert_eq!(shift.len(), d, "one shift per dimension");
        assert_eq!(bytes.len(), rows * d * dtype.size(), "whole rows");
        #[cfg(target_arch = "x86_64")]
        if avx512() {
            // SAFETY: the CPU has AVX-512F/BW/VL (checked); `bytes` holds `rows` rows of `d`
            // values (asserted), and the outputs hold `d` values each.
            return unsafe { x86::reduce(self, dtype, bytes, rows, shift) };
        }
        self.reduce_portable(dtype, bytes, rows, shift)
    }

    fn reduce_portable(&mut self, dtype: DType, bytes: &[u8], rows: usize, shift: &[f64]) -> bool {
        let d = self.s1.len();
        self.s1.fill(0.0);
        self.s2.fill(0.0);
        self.min.fill(f32::INFINITY);
        self.max.fill(f32::NEG_INFINITY);
        let rb = d * dtype.size();
        let mut bad = false;
        for r in 0..rows {
            decode_f32(dtype, &bytes[r * rb..(r + 1) * rb], &mut self.row);
            for (((((s1, s2), mn), mx), &x), &c) in self
                .s1
                .iter_mut()
                .zip(self.s2.iter_mut())
                .zip(self.min.iter_mut())
                .zip(self.max.iter_mut())
                .zip(&self.row)
                .zip(shift)
            {
                bad |= x.to_bits() & 0x7f80_0000 == 0x7f80_0000;
                let e = x as f64 - c;
                *s1 += e;
                *s2 += e * e;
                *mn = if x < *mn { x } else { *mn };
                *mx = if x > *mx { x } else { *mx };
            }
        }
        !bad
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f") && has!("avx512bw") && has!("avx512vl") && !crate::gram::avx512_disabled()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::RunStats;
    use crate::dtype::DType;
    use std::arch::x86_64::*;

    /// Load 16 values (`n` ≤ 16 of them; the rest read as zero) as f32.
    #[inline(always)]
    unsafe fn load16<const K: u8>(p: *const u8, n: usize) -> __m512 {
        let m = ((1u32 << n) - 1) as u16;
        // SAFETY (all arms): the caller guarantees `n` readable values at `p`; masked-off
        // lanes are not read.
        unsafe {
            match K {
                0 => _mm512_maskz_loadu_ps(m, p.cast()),
                1 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm256_maskz_loadu_epi16(m, p.cast()),
                ))),
                _ => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.cast())),
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub(super) unsafe fn reduce(
        out: &mut RunStats,
        dtype: DType,
        bytes: &[u8],
        rows: usize,
        shift: &[f64],
    ) -> bool {
        // SAFETY: forwarded from the caller.
        unsafe {
            match dtype {
                DType::F32 => strips::<0>(out, bytes, rows, shift),
                DType::BF16 => strips::<1>(out, bytes, rows, shift),
                DType::F16 => strips::<2>(out, bytes, rows, shift),
            }
        }
    }

    /// Masks of the `n` (≤ 16) valid lanes: of 16 f32, and of the two halves of 8 f64.
    #[inline(always)]
    fn masks(n: usize) -> (__mmask16, __mmask8, __mmask8) {
        let m16 = ((1u32 << n) - 1) as u16;
        (m16, m16 as u8, (m16 >> 8) as u8)
    }

    /// Strips of 32 dimensions (two vectors of 16: a cache line of bf16, two of f32) down all
    /// rows, sums in registers, the rows `PF` ahead prefetched (a strided walk the hardware
    /// prefetchers miss once the stride crosses pages).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn strips<const K: u8>(
        out: &mut RunStats,
        bytes: &[u8],
        rows: usize,
        shift: &[f64],
    ) -> bool {
        const PF: usize = 12;
        const BR: usize = 16;
        let d = out.s1.len();
        let es = if K == 0 { 4 } else { 2 };
        let rb = d * es;
        let base = bytes.as_ptr();
        let exp = _mm512_set1_epi32(0x7f80_0000);
        let mut bad: __mmask16 = 0;
        let z = _mm512_setzero_pd();
        out.s1.fill(0.0);
        out.s2.fill(0.0);
        out.min.fill(f32::INFINITY);
        out.max.fill(f32::NEG_INFINITY);
        for b0 in (0..rows).step_by(BR) {
            let rows = (rows - b0).min(BR);
            let base = base.wrapping_add(b0 * rb);
            for j0 in (0..d).step_by(32) {
                let na = (d - j0).min(16);
                let nb = (d - j0).saturating_sub(16).min(16);
                let (ma, ma_lo, ma_hi) = masks(na);
                let (mb, mb_lo, mb_hi) = masks(nb);
                let sp = shift.as_ptr();
                // SAFETY: the masks cover exactly the shifts j0..j0 + na + nb (< d); masked-off
                // lanes are not read (wrapping_add: the address may lie past the end then).
                let c = unsafe {
                    [
                        _mm512_maskz_loadu_pd(ma_lo, sp.add(j0)),
                        _mm512_maskz_loadu_pd(ma_hi, sp.wrapping_add(j0 + 8)),
                        _mm512_maskz_loadu_pd(mb_lo, sp.wrapping_add(j0 + 16)),
                        _mm512_maskz_loadu_pd(mb_hi, sp.wrapping_add(j0 + 24)),
                    ]
                };
                // Two rows at a time, each with its own sums (more loads in flight, shorter chains).
                let (mut s1, mut s2) = ([[z; 4]; 2], [[z; 4]; 2]);
                let mut mn = [_mm512_set1_ps(f32::INFINITY); 2];
                let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); 2];
                let p0 = base.wrapping_add(j0 * es);
                macro_rules! row {
                    ($r:expr, $t:expr) => {{
                        let p = p0.wrapping_add($r * rb);
                        let ahead = p.wrapping_add(PF * rb);
                        // SAFETY: prefetches are hints and never fault; row r holds na + nb
                        // values from column j0.
                        let x = unsafe {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                            if K == 0 {
                                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64).cast());
                            }
                            [load16::<K>(p, na), load16::<K>(p.wrapping_add(16 * es), nb)]
                        };
                        for h in 0..2 {
                            let v = x[h];
                            bad |= _mm512_cmpeq_epi32_mask(
                                _mm512_and_si512(_mm512_castps_si512(v), exp),
                                exp,
                            );
                            mn[h] = _mm512_min_ps(mn[h], v);
                            mx[h] = _mm512_max_ps(mx[h], v);
                            let lo =
                                _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), c[2 * h]);
                            let hi = _mm512_sub_pd(
                                _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                                    _mm512_castps_pd(v),
                                ))),
                                c[2 * h + 1],
                            );
                            let (a1, a2) = (&mut s1[$t], &mut s2[$t]);
                            a1[2 * h] = _mm512_add_pd(a1[2 * h], lo);
                            a1[2 * h + 1] = _mm512_add_pd(a1[2 * h + 1], hi);
                            a2[2 * h] = _mm512_fmadd_pd(lo, lo, a2[2 * h]);
                            a2[2 * h + 1] = _mm512_fmadd_pd(hi, hi, a2[2 * h + 1]);
                        }
                    }};
                }
                let mut r = 0;
                while r + 2 <= rows {
                    row!(r, 0);
                    row!(r + 1, 1);
                    r += 2;
                }
                if r < rows {
                    row!(r, 0);
                }
                for q in 0..4 {
                    s1[0][q] = _mm512_add_pd(s1[0][q], s1[1][q]);
                    s2[0][q] = _mm512_add_pd(s2[0][q], s2[1][q]);
                }
                let (s1, s2) = (s1[0], s2[0]);
                // SAFETY: the outputs hold d values; the masks cover j0..j0 + na + nb.
                unsafe {
                    let (o1, o2) = (out.s1.as_mut_ptr(), out.s2.as_mut_ptr());
                    for (q, m) in [ma_lo, ma_hi, mb_lo, mb_hi].into_iter().enumerate() {
                        if m != 0 {
                            let (p1, p2) = (o1.add(j0 + 8 * q), o2.add(j0 + 8 * q));
                            let t1 = _mm512_add_pd(_mm512_maskz_loadu_pd(m, p1), s1[q]);
                            let t2 = _mm512_add_pd(_mm512_maskz_loadu_pd(m, p2), s2[q]);
                            _mm512_mask_storeu_pd(p1, m, t1);
                            _mm512_mask_storeu_pd(p2, m, t2);
                        }
                    }
                    for (h, m) in [ma, mb].into_iter().enumerate() {
                        if m != 0 {
                            let (pn, px) = (
                                out.min.as_mut_ptr().add(j0 + 16 * h),
                                out.max.as_mut_ptr().add(j0 + 16 * h),
                            );
                            let tn = _mm512_min_ps(_mm512_maskz_loadu_ps(m, pn), mn[h]);
                            let tx = _mm512_max_ps(_mm512_maskz_loadu_ps(m, px), mx[h]);
                            _mm512_mask_storeu_ps(pn, m, tn);
                            _mm512_mask_storeu_ps(px, m, tx);
                        }
                    }
                }
            }
        }
        bad == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::encode_f32;

    /// The AVX-512 path (when present) and the portable one against float64, every dtype, at
    /// widths around the strip size, odd and even row counts, and a NaN.
    #[test]
    fn reduce_matches_float64() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &(d, rows) in &[(1, 1), (7, 3), (16, 2), (17, 5), (33, 64), (100, 9)] {
                let x: Vec<f32> = (0..rows * d)
                    .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.4) * (1 + i % d) as f32)
                    .collect();
                let mut bytes = Vec::new();
                encode_f32(dtype, &x, &mut bytes);
                let mut dec = vec![0f32; x.len()];
                decode_f32(dtype, &bytes, &mut dec);
                let shift: Vec<f64> = (0..d).map(|j| 0.1 * j as f64).collect();
                let mut fast = RunStats::new(d);
                assert!(fast.reduce(dtype, &bytes, rows, &shift));
                let mut slow = RunStats::new(d);
                assert!(slow.reduce_portable(dtype, &bytes, rows, &shift));
                for j in 0..d {
                    let col: Vec<f64> = (0..rows)
                        .map(|r| dec[r * d + j] as f64 - shift[j])
                        .collect();
                    let s1: f64 = col.iter().sum();
                    let s2: f64 = col.iter().map(|e| e * e).sum();
                    let mn = (0..rows)
                        .map(|r| dec[r * d + j])
                        .fold(f32::INFINITY, f32::min);
                    let mx = (0..rows)
                        .map(|r| dec[r * d + j])
                        .fold(f32::NEG_INFINITY, f32::max);
                    for o in [&fast, &slow] {
                        assert!(
                            (o.s1[j] - s1).abs() <= 1e-12 * s2.max(1.0),
                            "{dtype:?} {d} {rows} {j}"
                        );
                        assert!(
                            (o.s2[j] - s2).abs() <= 1e-12 * s2.max(1.0),
                            "{dtype:?} {d} {rows} {j}"
                        );
                        assert_eq!((o.min[j], o.max[j]), (mn, mx), "{dtype:?} {d} {rows} {j}");
                    }
                }
                // A NaN or an infinity anywhere is reported.
                for bad in [f32::NAN, f32::INFINITY] {
                    let mut y = x.clone();
                    y[(rows * d) / 2] = bad;
                    let mut b = Vec::new();
                    encode_f32(dtype, &y, &mut b);
                    assert!(
                        !fast.reduce(dtype, &b, rows, &shift),
                        "{dtype:?} {d} {rows}"
                    );
                    assert!(!slow.reduce_portable(dtype, &b, rows, &shift));
                }
            }
        }
    }
}
