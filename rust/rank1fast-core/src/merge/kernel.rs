//! The arithmetic: `W + scaling · B A` row chunk by row chunk, in f32 with one rounding to
//! the weight's dtype; AVX2 loops where the CPU has them, portable ones elsewhere.

use super::*;

/// Smallest magnitude that rounds to infinity in `dtype`.
pub(super) fn overflow_limit(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => f32::INFINITY,
        // 65504 is the largest float16; halfway to the next power of two rounds up.
        DType::F16 => 65520.0,
        // The largest bfloat16 is 0x7f7f; f32 values from halfway above it round up.
        DType::BF16 => f32::from_bits(0x7f7f_8000),
    }
}

/// Rows merged together: each block of `right` is read once for all of them.
pub(super) const GROUP: usize = 4;
/// Columns whose partial sums stay in registers across the rank (`GROUP × BLOCK` floats).
pub(super) const BLOCK: usize = 16;

/// A group of up to [`GROUP`] rows of a target: dtypes, their rows of `left`, `right` and the
/// scaling.
pub(super) struct Rows<'a> {
    pub(super) src: DType,
    pub(super) dst: DType,
    pub(super) cols: usize,
    pub(super) rank: usize,
    /// `[rows, rank]`.
    pub(super) left: &'a [f32],
    /// `[rank, cols]`, as [`pack_blocks`] lays it out.
    pub(super) right: &'a [f32],
    pub(super) scaling: f32,
}

/// `right` (`[rank, cols]`) laid out in the order the kernel reads it: for each block of
/// [`BLOCK`] columns its `rank × BLOCK` values together (so block `c0 / BLOCK` starts at
/// `c0 · rank`), then the last `cols % BLOCK` columns as `[rank, cols % BLOCK]`.
pub(super) fn pack_blocks(right: &[f32], rank: usize, cols: usize) -> Vec<f32> {
    let blocks = cols / BLOCK * BLOCK;
    let mut packed = Vec::with_capacity(right.len());
    for c0 in (0..blocks).step_by(BLOCK) {
        for k in 0..rank {
            packed.extend_from_slice(&right[k * cols + c0..k * cols + c0 + BLOCK]);
        }
    }
    for k in 0..rank {
        packed.extend_from_slice(&right[k * cols + blocks..(k + 1) * cols]);
    }
    packed
}

/// How one weight dtype is read and written (little-endian bytes), compiled into the loops
/// for each pair of dtypes.
pub(super) trait Elem {
    const SIZE: usize;
    fn decode(b: &[u8]) -> f32;
    fn encode(v: f32, out: &mut [u8]);
    /// Eight weights to f32 lanes.
    ///
    /// # Safety
    /// `8 * SIZE` bytes readable at `p`; the CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const u8) -> __m256;
    /// Eight f32 lanes to weights, rounded as [`Elem::encode`] rounds.
    ///
    /// # Safety
    /// `8 * SIZE` bytes writable at `p`; the CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn store8(v: __m256, p: *mut u8);
    #[inline(always)]
    fn decode_block(w: &[u8]) -> [f32; BLOCK] {
        let mut x = [0f32; BLOCK];
        for (x, b) in x
            .iter_mut()
            .zip(w[..BLOCK * Self::SIZE].chunks_exact(Self::SIZE))
        {
            *x = Self::decode(b);
        }
        x
    }
    #[inline(always)]
    fn encode_block(v: &[f32; BLOCK], out: &mut [u8]) {
        for (&v, o) in v
            .iter()
            .zip(out[..BLOCK * Self::SIZE].chunks_exact_mut(Self::SIZE))
        {
            Self::encode(v, o);
        }
    }
}

pub(super) struct F32;
pub(super) struct Bf16;
pub(super) struct F16;

impl Elem for F32 {
    const SIZE: usize = 4;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_loadu_ps(p.cast())
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store8(v: __m256, p: *mut u8) {
        _mm256_storeu_ps(p.cast(), v)
    }
    #[inline(always)]
    fn decode(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    #[inline(always)]
    fn encode(v: f32, out: &mut [u8]) {
        out.copy_from_slice(&v.to_le_bytes());
    }
}

impl Elem for Bf16 {
    const SIZE: usize = 2;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
    }
    /// [`bf16_bits`] on eight lanes.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store8(v: __m256, p: *mut u8) {
        let b = _mm256_castps_si256(v);
        let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff));
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, bias));
        let magnitude = _mm256_and_si256(b, _mm256_set1_epi32(0x7fff_ffff));
        let nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f80_0000));
        let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(0x0040));
        let h = _mm256_blendv_epi8(rounded, quiet, nan);
        let lo = _mm256_castsi256_si128(h);
        let hi = _mm256_extracti128_si256::<1>(h);
        _mm_storeu_si128(p.cast(), _mm_packus_epi32(lo, hi));
    }
    #[inline(always)]
    fn decode(b: &[u8]) -> f32 {
        f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
    }
    #[inline(always)]
    fn encode(v: f32, out: &mut [u8]) {
        out.copy_from_slice(&bf16_bits(v).to_le_bytes());
    }
}

impl Elem for F16 {
    const SIZE: usize = 2;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store8(v: __m256, p: *mut u8) {
        _mm_storeu_si128(p.cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
    }
    #[inline(always)]
    fn decode(b: &[u8]) -> f32 {
        half::f16::from_le_bytes([b[0], b[1]]).to_f32()
    }
    #[inline(always)]
    fn encode(v: f32, out: &mut [u8]) {
        out.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
    }
    // `half`'s slice conversions use F16C where the CPU has it (runtime detection).
    #[inline(always)]
    fn decode_block(w: &[u8]) -> [f32; BLOCK] {
        let mut x = [0f32; BLOCK];
        decode_f32(DType::F16, &w[..BLOCK * 2], &mut x);
        x
    }
    #[inline(always)]
    fn encode_block(v: &[f32; BLOCK], out: &mut [u8]) {
        use half::slice::HalfFloatSliceExt;
        let mut h = [half::f16::ZERO; BLOCK];
        h.convert_from_f32_slice(v);
        for (o, h) in out[..BLOCK * 2].chunks_exact_mut(2).zip(h) {
            o.copy_from_slice(&h.to_le_bytes());
        }
    }
}

/// Merge a group of rows: `out = encode(w + scaling · left_rows · right)`, as PEFT does it
/// (`(B @ A) * scaling`, then `W += delta`): each product accumulated over the rank in order
/// with fused multiply-adds (as the BLAS behind torch's matmul does; the order may differ from
/// torch's, so the product may differ by float32 rounding), then scaled, then added; rank 0
/// re-encodes `w`. Returns the first row (within the group) where a finite weight became
/// non-finite in the output dtype.
pub(super) fn merge_rows(spec: &Rows<'_>, w: &[u8], out: &mut [u8]) -> Option<usize> {
    use DType::{BF16 as B, F16 as H, F32 as S};
    match (spec.src, spec.dst) {
        (S, S) => merge_rows_as::<F32, F32>(spec, w, out),
        (S, B) => merge_rows_as::<F32, Bf16>(spec, w, out),
        (S, H) => merge_rows_as::<F32, F16>(spec, w, out),
        (B, S) => merge_rows_as::<Bf16, F32>(spec, w, out),
        (B, B) => merge_rows_as::<Bf16, Bf16>(spec, w, out),
        (B, H) => merge_rows_as::<Bf16, F16>(spec, w, out),
        (H, S) => merge_rows_as::<F16, F32>(spec, w, out),
        (H, B) => merge_rows_as::<F16, Bf16>(spec, w, out),
        (H, H) => merge_rows_as::<F16, F16>(spec, w, out),
    }
}

pub(super) fn merge_rows_as<I: Elem, O: Elem>(
    spec: &Rows<'_>,
    w: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    let n = w.len() / (spec.cols * I::SIZE);
    if n == GROUP {
        return merge_group::<I, O>(spec, w, out);
    }
    // A short group (a tensor's last): padded with zero rows, whose results are dropped.
    let left = [spec.left, &vec![0.0; (GROUP - n) * spec.rank]].concat();
    let mut w_padded = vec![0u8; GROUP * spec.cols * I::SIZE];
    w_padded[..w.len()].copy_from_slice(w);
    let mut out_padded = vec![0u8; GROUP * spec.cols * O::SIZE];
    let padded = Rows {
        left: &left,
        ..*spec
    };
    let bad = merge_group::<I, O>(&padded, &w_padded, &mut out_padded);
    out.copy_from_slice(&out_padded[..out.len()]);
    bad
}

/// A full group of rows, in one pass: by blocks of [`BLOCK`] columns, the product of all its
/// rows stays in registers across the rank, then each row's weights are decoded, added to,
/// checked and encoded straight from the input to the output bytes (with AVX2 where the CPU
/// has it); the last columns go one weight at a time, in the same order.
pub(super) fn merge_group<I: Elem, O: Elem>(
    spec: &Rows<'_>,
    w: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    let (cols, rank) = (spec.cols, spec.rank);
    let (row_in, row_out) = (cols * I::SIZE, cols * O::SIZE);
    assert!(w.len() == GROUP * row_in && out.len() == GROUP * row_out);
    assert!(spec.left.len() == GROUP * rank && spec.right.len() == rank * cols);
    let limit = overflow_limit(spec.dst);
    #[cfg(target_arch = "x86_64")]
    let (done, bad) = if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU has AVX2, FMA and F16C, checked just above; the sizes are checked
        // above.
        unsafe { blocks_avx2::<I, O>(spec, w, out, limit) }
    } else {
        (0, false)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (done, bad) = (0, false);
    if !(merge_columns::<I, O>(spec, w, out, done, limit) | bad) {
        return None;
    }
    // Rare: the row is found again from the output, where a bad weight is not finite.
    let row = (0..GROUP).find(|&g| {
        (0..cols).any(|c| {
            let x = I::decode(&w[g * row_in + c * I::SIZE..]);
            let v = O::decode(&out[g * row_out + c * O::SIZE..]);
            x.is_finite() && !v.is_finite()
        })
    });
    debug_assert!(row.is_some());
    row
}

/// The portable loops of [`merge_group`], from column `from` (a multiple of [`BLOCK`]) on;
/// returns whether a finite weight became non-finite.
pub(super) fn merge_columns<I: Elem, O: Elem>(
    spec: &Rows<'_>,
    w: &[u8],
    out: &mut [u8],
    from: usize,
    limit: f32,
) -> bool {
    let (cols, rank) = (spec.cols, spec.rank);
    let (row_in, row_out) = (cols * I::SIZE, cols * O::SIZE);
    let mut bad = false;
    let blocks = cols / BLOCK * BLOCK;
    for c0 in (from..blocks).step_by(BLOCK) {
        let t = if rank == 0 {
            [[0.0; BLOCK]; GROUP]
        } else {
            product_tile(spec.left, &spec.right[c0 * rank..(c0 + BLOCK) * rank], rank)
        };
        for (g, tg) in t.iter().enumerate() {
            let x = I::decode_block(&w[g * row_in + c0 * I::SIZE..]);
            let mut v = x;
            if rank > 0 {
                for ((v, &x), &p) in v.iter_mut().zip(&x).zip(tg) {
                    *v = x + p * spec.scaling;
                }
            }
            let mut lanes = 0u32;
            for (&x, &v) in x.iter().zip(&v) {
                lanes |= overflows(x, v, limit) as u32;
            }
            bad |= lanes != 0;
            O::encode_block(&v, &mut out[g * row_out + c0 * O::SIZE..]);
        }
    }
    let tail = &spec.right[blocks * rank..];
    for g in 0..GROUP {
        let l = &spec.left[g * rank..(g + 1) * rank];
        for c in blocks.max(from)..cols {
            let x = I::decode(&w[g * row_in + c * I::SIZE..]);
            let v = if rank == 0 {
                x
            } else {
                x + dot_column(l, tail, cols - blocks, c - blocks) * spec.scaling
            };
            bad |= overflows(x, v, limit);
            let at = g * row_out + c * O::SIZE;
            O::encode(v, &mut out[at..at + O::SIZE]);
        }
    }
    bad
}

/// Whether a finite weight `x` became `v`, which does not fit below `limit` (NaN compares
/// false, so it counts too).
#[inline(always)]
pub(super) fn overflows(x: f32, v: f32, limit: f32) -> bool {
    let finite = x.to_bits() & 0x7f80_0000 != 0x7f80_0000;
    let fits = v.abs() < limit;
    finite & !fits
}

/// `Σ_k left[k] · right[k, c]`, accumulated over k in order with fused multiply-adds.
#[inline(always)]
pub(super) fn dot_column(left: &[f32], right: &[f32], cols: usize, c: usize) -> f32 {
    let mut sum = left[0] * right[c];
    for (k, &l) in left.iter().enumerate().skip(1) {
        sum = l.mul_add(right[k * cols + c], sum);
    }
    sum
}

/// `left · block` for a group of rows (`left` is `[GROUP, rank]`, rank ≥ 1, `block` is
/// `[rank, BLOCK]`); within a column the sum runs over k in order, exactly as [`dot_column`]
/// computes it (without FMA in the CPU, `mul_add` is a library call: slow, but exact).
#[inline(always)]
pub(super) fn product_tile(left: &[f32], block: &[f32], rank: usize) -> [[f32; BLOCK]; GROUP] {
    let mut t = [[0f32; BLOCK]; GROUP];
    let r0: &[f32; BLOCK] = block[..BLOCK].try_into().expect("block");
    for (g, tg) in t.iter_mut().enumerate() {
        let l = left[g * rank];
        for (tj, &r) in tg.iter_mut().zip(r0) {
            *tj = l * r;
        }
    }
    for k in 1..rank {
        let rk: &[f32; BLOCK] = block[k * BLOCK..(k + 1) * BLOCK].try_into().expect("block");
        for (g, tg) in t.iter_mut().enumerate() {
            let l = left[g * rank + k];
            for (tj, &r) in tg.iter_mut().zip(rk) {
                *tj = l.mul_add(r, *tj);
            }
        }
    }
    t
}

/// The column blocks of [`merge_group`] with AVX2 and FMA intrinsics (8 floats a step; the
/// compiler does not find the conversions by itself): the same operations in the same order,
/// so the results are bit for bit those of the portable loops. Returns the columns done and
/// whether a finite weight became non-finite.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; the sizes are those [`merge_group`] checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn blocks_avx2<I: Elem, O: Elem>(
    spec: &Rows<'_>,
    w: &[u8],
    out: &mut [u8],
    limit: f32,
) -> (usize, bool) {
    let (cols, rank) = (spec.cols, spec.rank);
    let (row_in, row_out) = (cols * I::SIZE, cols * O::SIZE);
    let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
    let (lp, rp) = (spec.left.as_ptr(), spec.right.as_ptr());
    let scaling = _mm256_set1_ps(spec.scaling);
    let limit = _mm256_set1_ps(limit);
    let inf = _mm256_set1_ps(f32::INFINITY);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    let blocks = cols / BLOCK * BLOCK;
    for c0 in (0..blocks).step_by(BLOCK) {
        let mut t = [[_mm256_setzero_ps(); 2]; GROUP];
        if rank > 0 {
            let r = rp.add(c0 * rank);
            let (r0, r1) = (_mm256_loadu_ps(r), _mm256_loadu_ps(r.add(8)));
            for (g, tg) in t.iter_mut().enumerate() {
                let l = _mm256_broadcast_ss(&*lp.add(g * rank));
                *tg = [_mm256_mul_ps(l, r0), _mm256_mul_ps(l, r1)];
            }
            for k in 1..rank {
                let r = rp.add(c0 * rank + k * BLOCK);
                let (r0, r1) = (_mm256_loadu_ps(r), _mm256_loadu_ps(r.add(8)));
                for (g, tg) in t.iter_mut().enumerate() {
                    let l = _mm256_broadcast_ss(&*lp.add(g * rank + k));
                    tg[0] = _mm256_fmadd_ps(l, r0, tg[0]);
                    tg[1] = _mm256_fmadd_ps(l, r1, tg[1]);
                }
            }
        }
        for (g, tg) in t.iter().enumerate() {
            for (h, &p) in tg.iter().enumerate() {
                let c = c0 + 8 * h;
                let x = I::load8(wp.add(g * row_in + c * I::SIZE));
                let v = if rank > 0 {
                    _mm256_add_ps(x, _mm256_mul_ps(p, scaling))
                } else {
                    x
                };
                // Fine where the weight is not finite or the result fits (NaN does not).
                let x_inf = _mm256_cmp_ps::<_CMP_NLT_UQ>(_mm256_and_ps(x, abs), inf);
                let fits = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_and_ps(v, abs), limit);
                ok = _mm256_and_ps(ok, _mm256_or_ps(x_inf, fits));
                O::store8(v, op.add(g * row_out + c * O::SIZE));
            }
        }
    }
    (blocks, _mm256_movemask_ps(ok) != 0xff)
}

/// bfloat16 bits of `v`, rounded to nearest even as torch does (NaN stays a quiet NaN);
/// branch-free so that the loop vectorizes.
#[inline(always)]
pub(super) fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = b & 0x7fff_ffff > 0x7f80_0000;
    if nan {
        (b >> 16) as u16 | 0x0040
    } else {
        rounded
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::testutil::*;

    /// The AVX2 loops (where the CPU has them) and the portable ones give the same bytes, for
    /// every pair of dtypes, with and without a product, with and without overflow.
    #[test]
    fn kernel_paths_agree() {
        fn check<I: Elem, O: Elem>(src: DType, dst: DType) {
            let (cols, rank) = (3 * BLOCK + 5, 3);
            let mut wf = values(GROUP * cols, 11);
            wf[2 * cols + 7] = f32::INFINITY;
            wf[cols + 1] = f32::NAN;
            let w = enc(src, &wf);
            let left = values(GROUP * rank, 12);
            let right = pack_blocks(&values(rank * cols, 13), rank, cols);
            for (rank, scaling, big) in [(rank, 0.5f32, false), (0, 0.0, false), (rank, 1e38, true)]
            {
                let spec = Rows {
                    src,
                    dst,
                    cols,
                    rank,
                    left: &left[..GROUP * rank],
                    right: &right[..rank * cols],
                    scaling,
                };
                let mut fast = vec![0u8; GROUP * cols * O::SIZE];
                let mut portable = fast.clone();
                let bad = merge_rows(&spec, &w, &mut fast);
                let limit = overflow_limit(dst);
                let portable_bad = merge_columns::<I, O>(&spec, &w, &mut portable, 0, limit);
                assert_eq!(fast, portable, "{src:?} -> {dst:?}, rank {rank}");
                assert_eq!(
                    bad.is_some(),
                    portable_bad,
                    "{src:?} -> {dst:?}, rank {rank}"
                );
                if !big || dst == DType::F16 {
                    assert_eq!(bad.is_some(), big, "{src:?} -> {dst:?}, rank {rank}");
                }
            }
        }
        check::<F32, F32>(DType::F32, DType::F32);
        check::<F32, Bf16>(DType::F32, DType::BF16);
        check::<F32, F16>(DType::F32, DType::F16);
        check::<Bf16, F32>(DType::BF16, DType::F32);
        check::<Bf16, Bf16>(DType::BF16, DType::BF16);
        check::<Bf16, F16>(DType::BF16, DType::F16);
        check::<F16, F32>(DType::F16, DType::F32);
        check::<F16, Bf16>(DType::F16, DType::BF16);
        check::<F16, F16>(DType::F16, DType::F16);
    }

    #[test]
    fn bf16_bits_round_like_torch() {
        let mut specials = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            1e-40,
            f32::from_bits(0x7f7f_8000),
            f32::from_bits(0x7f7f_7fff),
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
        ];
        specials.extend(values(100_000, 3).iter().map(|v| v * 1e3));
        specials.extend((0..100_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))));
        for v in specials {
            if v.is_nan() {
                assert!(half::bf16::from_bits(bf16_bits(v)).is_nan());
            } else {
                assert_eq!(bf16_bits(v), half::bf16::from_f32(v).to_bits(), "{v:e}");
            }
        }
        assert_eq!(bf16_bits(f32::NAN) & 0x7fc0, 0x7fc0);
    }

    #[test]
    fn bf16_rounds_once_to_nearest_even() {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("m");
        fs::create_dir_all(&model).unwrap();
        write_st(
            &model.join("model.safetensors"),
            &[(
                "p.weight",
                "BF16",
                vec![1, 5],
                enc(DType::BF16, &[1.0, 1.0, 1.0, 256.0, -1.0]),
            )],
        );
        let adapter = root.path().join("a");
        fs::create_dir_all(&adapter).unwrap();
        fs::write(
            adapter.join(ADAPTER_CONFIG),
            serde_json::to_vec(&lora_config(1, 1.0)).unwrap(),
        )
        .unwrap();
        let a = [
            2f32.powi(-8),
            3.0 * 2f32.powi(-9),
            2f32.powi(-7),
            1.0,
            -3.0 * 2f32.powi(-9),
        ];
        write_st(
            &adapter.join(ADAPTER_WEIGHTS),
            &[
                (
                    "base_model.model.p.lora_A.weight",
                    "F32",
                    vec![1, 5],
                    enc(DType::F32, &a),
                ),
                (
                    "base_model.model.p.lora_B.weight",
                    "F32",
                    vec![1, 1],
                    enc(DType::F32, &[1.0]),
                ),
            ],
        );
        let out = root.path().join("o");
        merge(
            &model,
            &adapter,
            &out,
            &MergeOptions::default(),
            &Progress::default(),
        )
        .unwrap();
        let (_, _, got) = read_tensor(&out.join("model.safetensors"), "p.weight");
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1). 257 ties to 256.
        assert_eq!(
            dec(DType::BF16, &got),
            [1.0, 1.0078125, 1.0078125, 256.0, -1.0078125]
        );
    }

    #[test]
    fn float32_overflow_names_the_row() {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("m");
        fs::create_dir_all(&model).unwrap();
        let mut w = values(4 * 16, 5);
        w[2 * 16 + 5] = 3e38;
        write_st(
            &model.join("model.safetensors"),
            &[("p.weight", "F32", vec![4, 16], enc(DType::F32, &w))],
        );
        let adapter = root.path().join("a");
        fs::create_dir_all(&adapter).unwrap();
        let config = serde_json::to_vec(&lora_config(1, 1.0)).unwrap();
        fs::write(adapter.join(ADAPTER_CONFIG), config).unwrap();
        write_st(
            &adapter.join(ADAPTER_WEIGHTS),
            &[
                (
                    "base_model.model.p.lora_A.weight",
                    "F32",
                    vec![1, 16],
                    enc(DType::F32, &[1e19; 16]),
                ),
                (
                    "base_model.model.p.lora_B.weight",
                    "F32",
                    vec![4, 1],
                    enc(DType::F32, &[3e19; 4]),
                ),
            ],
        );
        let out = root.path().join("out").join("o");
        let e = merge(
            &model,
            &adapter,
            &out,
            &MergeOptions::default(),
            &Progress::default(),
        );
        match e {
            Err(Error::Invalid(m)) => assert!(m.contains("overflows float32 in row 2"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_clean(&out);
    }
}
