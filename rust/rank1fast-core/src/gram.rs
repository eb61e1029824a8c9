//! The second-moment kernel: `G += (X − c)ᵀ (X − c)` for a block of rows, upper triangle,
//! accumulated in f64.
//!
//! `X` is row-major (a row per token). Up to [`Gram::super_rows`] rows at a time are shifted by
//! `c` and packed into panels of `NR` columns, stored row after row; panels of `MR` columns
//! are gathered from those (no second pass over `X`), so the kernel reads both operands
//! contiguously whatever the width (no cache-set aliasing at power-of-two widths). For each
//! `MR × NR` tile of `G` on or above the diagonal, the products of all packed rows are summed
//! in vector registers, `KC` rows at a time in f32 (256 for the AVX-512 BF16 kernel), and
//! each such sum is added to the f64 matrix, so f32 sums never run over more than `KC`
//! products and each tile of `G` is read and written once per [`Gram::super_rows`] rows, not
//! once per `KC`. The FMA kernels run their
//! tiles as BLIS does (Goto & van de Geijn 2008): a group of B panels (the vector operand,
//! about 512 KiB) stays in L2 while each A panel (the broadcast operand, in L1) passes it, and
//! the next tile's rows of `G` are prefetched while one multiplies.
//!
//! Kernels, picked at run time from what the CPU has ([`Kernel::detect`]):
//! - [`Kernel::Avx512Bf16`] (AVX-512 BF16, for rows that are bfloat16 values): the shifted
//!   values are rounded to bfloat16 (exact whenever `x` lies between `c / 2` and `16 c`, or
//!   `c = 0`: see [`Kernel::shift`]) and pairs of rows are
//!   multiplied with `vdpbf16ps`: bf16 × bf16 products are exact in f32; a 12 × 32 tile in
//!   24 registers. The default for bf16 rows only where `vdpbf16ps` runs at twice the f32
//!   multiply-add rate (AMD Zen 4: [`bf16_dot_at_full_rate`]); Intel's runs at half that, so
//!   there bf16 rows without AMX go to the f32 FMA kernel.
//! - [`Kernel::Amx`] (AMX-BF16 tiles, for bfloat16 rows; Linux, Intel Sapphire Rapids and
//!   later): the same shifted bf16 pairs, multiplied with `tdpbf16ps`, which adds a 16 × 32
//!   bf16 tile times a 32 × 16 one into a 16 × 16 f32 tile (bf16 products exact, sums in f32
//!   as above); a 32 × 32 block of `G` in four accumulator tiles. Used only where the CPU
//!   reports AMX-TILE and AMX-BF16, the OS enables tile state (XCR0) and grants this process
//!   tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), else the AVX-512 f32 kernel runs.
//! - [`Kernel::Avx512`] (AVX-512F): f32 FMA, 12 × 32 tile in 24 registers (2 loads and 12
//!   broadcasts per 24 FMAs).
//! - [`Kernel::Avx2`] (AVX2 + FMA): f32 FMA, 6 × 16 tile in 12 registers.
//! - [`Kernel::Portable`]: the same loops in portable Rust.
//!
//! `RANK1FAST_GRAM=portable|avx2|avx512|avx512-bf16|amx` forces a kernel (one the CPU lacks is
//! refused with a message on stderr and the best available one is used; the bf16 kernels only
//! for rows of bf16 numbers, others keep the best f32 kernel);
//! `RANK1FAST_NO_AVX512=1` hides AVX-512 from these kernels and the statistics pass.
//!
//! Tiles wholly below the diagonal are skipped; tiles that cross it also write a few entries
//! below it, which are not part of the result (only `i ≤ j` is; callers mirror it).

/// Rows of `X` per f32 partial sum (most kernels: [`Kernel::partial_rows`]). 512 rather than
/// 256: fewer f64 updates of `G` (2% at d = 1536, f32), for f32 sums of 512 products.
const KC: usize = 512;
/// Bytes of packed operands per super-block (both panel sets): bounds [`Gram::super_rows`].
const PACK_BYTES: usize = 8 << 20;
/// Bytes of B panels the FMA kernels keep in L2 while A panels pass them.
const B_GROUP_BYTES: usize = 512 << 10;

/// A second-moment kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    Avx2,
    Avx512,
    /// For rows whose values are bfloat16 numbers (decoded bf16 dumps).
    Avx512Bf16,
    /// AMX tiles, for rows whose values are bfloat16 numbers.
    Amx,
}

impl Kernel {
    /// Every kernel this CPU can run, slowest first.
    pub fn available() -> Vec<Kernel> {
        let mut k = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                k.push(Kernel::Avx2);
            }
            if has!("avx512f") && !avx512_disabled() {
                k.push(Kernel::Avx512);
                if has!("avx512bf16") {
                    k.push(Kernel::Avx512Bf16);
                    #[cfg(target_os = "linux")]
                    if amx::usable() {
                        k.push(Kernel::Amx);
                    }
                }
            }
        }
        k
    }

    /// The fastest kernel for rows of this kind (`bf16_rows`: every value is a bfloat16
    /// number), or the one `RANK1FAST_GRAM` names when the CPU has it (a bf16 kernel only
    /// for bf16 rows).
    pub fn detect(bf16_rows: bool) -> Kernel {
        let avail = Kernel::available();
        if let Ok(name) = std::env::var("RANK1FAST_GRAM") {
            match Kernel::from_name(&name) {
                // A bf16 kernel would round other rows to bf16: those keep the default.
                Some(k) if avail.contains(&k) && (bf16_rows || !k.bf16()) => return k,
                Some(k) if avail.contains(&k) => {}
                Some(k) => eprintln!(
                    "rank1fast: RANK1FAST_GRAM={name}: this CPU cannot run {k:?}; using the best kernel it has"
                ),
                None => eprintln!(
                    "rank1fast: RANK1FAST_GRAM={name} is not one of portable, avx2, avx512, avx512-bf16, amx; ignored"
                ),
            }
        }
        Kernel::pick(&avail, bf16_rows, bf16_dot_at_full_rate())
    }

    /// The default among `avail` (slowest first, as [`Kernel::available`] lists them): the
    /// last one that suits the rows, passing over the AVX-512 BF16 kernel where `vdpbf16ps`
    /// runs at half the f32 FMA rate (`full_rate_dot` false: see [`bf16_dot_at_full_rate`]),
    /// since the f32 FMA kernel is then the faster for bf16 rows too.
    fn pick(avail: &[Kernel], bf16_rows: bool, full_rate_dot: bool) -> Kernel {
        avail
            .iter()
            .rev()
            .copied()
            .filter(|&k| k != Kernel::Avx512Bf16 || full_rate_dot)
            .find(|&k| bf16_rows || !k.bf16())
            .unwrap_or(Kernel::Portable)
    }

    pub fn from_name(name: &str) -> Option<Kernel> {
        match name.trim().to_ascii_lowercase().as_str() {
            "portable" => Some(Kernel::Portable),
            "avx2" => Some(Kernel::Avx2),
            "avx512" => Some(Kernel::Avx512),
            "avx512-bf16" | "avx512bf16" | "bf16" => Some(Kernel::Avx512Bf16),
            "amx" => Some(Kernel::Amx),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
            Kernel::Avx512Bf16 => "avx512-bf16",
            Kernel::Amx => "amx",
        }
    }

    /// Whether this kernel rounds the shifted values to bfloat16 (it is meant for rows of
    /// bfloat16 numbers, and its shift is rounded: see [`Kernel::shift`]).
    pub fn bf16(self) -> bool {
        matches!(self, Kernel::Avx512Bf16 | Kernel::Amx)
    }

    /// Rows of `X` per f32 partial sum ([`KC`], a multiple of this). The AVX-512 BF16 kernel
    /// sums over 256 rows (128 `vdpbf16ps` steps): dimensions whose mean lies between 1 and
    /// 8 standard deviations enter it unshifted (see [`Kernel::shift`]), and over 512 rows
    /// their f32 sums cost the covariance up to 4.8e-5 of sd_i·sd_j on the default model's
    /// activations against 3.9e-6 over 256 (`benches/bench_kernel_accuracy.py`: as accurate
    /// as the f32 kernels), at no measured cost in speed on Sapphire Rapids (kernel alone
    /// 76-82 GFLOP/s either way); AMX's tiles sum 32 products per instruction and stay
    /// within 6.4e-7 over 512.
    fn partial_rows(self) -> usize {
        match self {
            Kernel::Avx512Bf16 => KC / 2,
            _ => KC,
        }
    }

    /// (rows of a tile, columns of a tile, rows of `X` per packed step).
    fn geometry(self) -> (usize, usize, usize) {
        match self {
            Kernel::Portable | Kernel::Avx2 => (6, 16, 1),
            Kernel::Avx512 => (12, 32, 1),
            Kernel::Avx512Bf16 => (12, 32, 2),
            Kernel::Amx => (32, 32, 2),
        }
    }

    /// The shift this kernel accumulates about, given the requested one. The bf16 kernel
    /// rounds it to bfloat16, so that for bfloat16 numbers `x`, `x − c` is exact in bfloat16
    /// whenever `x` lies between `c / 2` and `2 c` (a multiple of the smaller last place of
    /// the two, below 256 of them), and always when `c = 0`. With the analysis's shifts (a
    /// mean more than 8 standard deviations from zero, else zero) that leaves only values
    /// more than 4 standard deviations from a large mean to be rounded.
    pub fn shift(self, shift: &[f32]) -> Vec<f32> {
        if self.bf16() {
            shift
                .iter()
                .map(|&c| f32::from_bits(bf16_bits(c) << 16))
                .collect()
        } else {
            shift.to_vec()
        }
    }
}

/// Whether `vdpbf16ps` (a 16-lane dot product of bf16 pairs into f32) multiplies-and-adds
/// twice as fast as `vfmadd` on f32, as on AMD Zen 4 (session 4: the AVX-512 BF16 kernel
/// 1.43-1.80x numpy's f32 BLAS loop on bf16 dumps, the f32 kernel 0.89-0.95x on f32 dumps).
/// Not on Intel: on Sapphire Rapids one `vdpbf16ps` zmm issues every other cycle, 107
/// GFLOP/s against `vfmadd`'s 215 per core (`benches/prototypes/fma_peak.c`), and the f32
/// kernel adds bf16 rows at 131 GFLOP/s against the BF16 kernel's 88 (`gram_calls`, one
/// thread); there the BF16 kernel runs only when forced (AMX comes first where usable).
pub fn bf16_dot_at_full_rate() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU (a safe function in newer Rust).
        #[allow(unused_unsafe)]
        let v = unsafe { std::arch::x86_64::__cpuid(0) };
        // "GenuineIntel", as EBX, EDX, ECX.
        !(v.ebx == u32::from_le_bytes(*b"Genu")
            && v.edx == u32::from_le_bytes(*b"ineI")
            && v.ecx == u32::from_le_bytes(*b"ntel"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

/// `RANK1FAST_NO_AVX512=1` (read once): run the AVX2 / portable code on an AVX-512 machine, as
/// a CPU without AVX-512 would (for tests and comparisons).
pub fn avx512_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| {
        std::env::var("RANK1FAST_NO_AVX512").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// The bfloat16 nearest to a finite `x` (ties to even), as its 16 bits.
#[inline(always)]
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16
}

/// A value the kernels read rows of: f32, or a bfloat16 number as its bits ([`Bf16`]), so
/// bf16 dumps are packed straight from the map, with no f32 copy of their rows.
pub trait Value: Copy + Send + Sync + 'static {
    /// The dump dtype whose little-endian encoding these values are.
    const DTYPE: crate::dtype::DType;
    fn value(self) -> f32;
}

impl Value for f32 {
    const DTYPE: crate::dtype::DType = crate::dtype::DType::F32;
    #[inline(always)]
    fn value(self) -> f32 {
        self
    }
}

/// A bfloat16 number: the top 16 bits of the f32 it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Value for Bf16 {
    const DTYPE: crate::dtype::DType = crate::dtype::DType::BF16;
    #[inline(always)]
    fn value(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
}

/// Packing buffers of the kernel for one dimension; one per thread.
pub struct Gram {
    dim: usize,
    kernel: Kernel,
    /// Packed operands: f32 bits, or two bf16 (rows k, k + 1) per word for the bf16 kernels,
    /// from offsets `a0` / `b0` (64-byte boundaries: AMX tile rows are cache lines).
    a: Vec<u32>,
    b: Vec<u32>,
    a0: usize,
    b0: usize,
}

impl Gram {
    /// The fastest kernel for f32 rows.
    pub fn new(dim: usize) -> Self {
        Gram::with_kernel(dim, Kernel::detect(false))
    }

    /// A given kernel (it must be in [`Kernel::available`]).
    pub fn with_kernel(dim: usize, kernel: Kernel) -> Self {
        assert!(
            Kernel::available().contains(&kernel),
            "this CPU cannot run the {kernel:?} kernel"
        );
        Gram {
            dim,
            kernel,
            a: Vec::new(),
            b: Vec::new(),
            a0: 0,
            b0: 0,
        }
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Rows packed at a time: each tile of `G` is updated once per this many rows.
    pub fn super_rows(&self) -> usize {
        let (_, _, step) = self.kernel.geometry();
        // Both panel sets hold about rows / step × dim words of 4 bytes each.
        let rows = PACK_BYTES * step / (8 * self.dim.max(1));
        (rows / KC * KC).clamp(KC, 8 * KC)
    }

    /// Add the upper triangle (`i ≤ j`) of `Σ_rows (x − shift)(x − shift)ᵀ` to `g`
    /// (`dim × dim`, row-major). `rows.len()` must be a multiple of `dim`. With the bf16
    /// kernel, `shift` should come from [`Kernel::shift`] and the rows should be bf16 numbers
    /// (other values are rounded to bf16 after the shift).
    pub fn add(&mut self, rows: &[f32], shift: &[f32], g: &mut [f64]) {
        assert_eq!(rows.len() % self.dim.max(1), 0, "whole rows");
        let rows: Vec<&[f32]> = rows.chunks_exact(self.dim.max(1)).collect();
        self.add_rows(&rows, shift, g)
    }

    /// [`Gram::add`] for rows wherever they lie (each `dim` values, f32 or [`Bf16`]).
    pub fn add_rows<R: Value>(&mut self, rows: &[&[R]], shift: &[f32], g: &mut [f64]) {
        let d = self.dim;
        assert_eq!(shift.len(), d, "one shift per dimension");
        assert_eq!(g.len(), d * d, "g must be dim × dim");
        assert!(rows.iter().all(|r| r.len() == d), "rows of dim values");
        if d == 0 {
            return;
        }
        let (mr, nr, step) = self.kernel.geometry();
        let sr = self.super_rows();
        let amx = self.kernel == Kernel::Amx;
        for block in rows.chunks(sr) {
            let mut nk = block.len().div_ceil(step);
            if amx {
                nk = nk.next_multiple_of(AMX_K); // whole tiles: zero pairs past the rows
            }
            let (na, nb) = (d.div_ceil(mr), d.div_ceil(nr));
            // Grown, never shrunk: every word used is written by the packing below.
            self.b0 = aligned(&mut self.b, nb * nk * nr);
            self.a0 = aligned(&mut self.a, na * nk * mr);
            let b = &mut self.b[self.b0..][..nb * nk * nr];
            let a = &mut self.a[self.a0..][..na * nk * mr];
            if step == 2 {
                pack_bf16_pairs(block, shift, d, nr, nk, b);
            } else {
                pack_f32(block, shift, d, nr, nk, b);
            }
            if amx {
                #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
                // SAFETY: the Amx kernel is only built where AVX-512F is present (`available`).
                unsafe {
                    amx::transpose_panels(b, nb, nk, a)
                };
            } else {
                gather_panels(b, d, nr, mr, nk, a);
            }
            self.multiply(nk, g);
        }
    }

    fn multiply(&self, nk: usize, g: &mut [f64]) {
        let d = self.dim;
        let (mr, nr, step) = self.kernel.geometry();
        let kc = self.kernel.partial_rows() / step;
        if self.kernel == Kernel::Amx {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            {
                let (a, b) = (&self.a[self.a0..], &self.b[self.b0..]);
                // SAFETY: the CPU has AMX-BF16 and this process may use tile data (checked
                // in `with_kernel` through `available`); `a` / `b` hold the packed panels of
                // `nk` steps (a multiple of AMX_K) for `d` columns.
                return unsafe { amx::multiply(nk, kc, a, b, g, d) };
            }
            #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
            unreachable!("AMX is never available here");
        }
        let (na, nb) = (d.div_ceil(mr), d.div_ceil(nr));
        let mut tiles = Vec::with_capacity(na * nb / 2 + na + nb);
        let tile = |q: usize, p: usize| Tile {
            i0: q * mr,
            j0: p * nr,
            rows: (d - q * mr).min(mr),
            cols: (d - p * nr).min(nr),
        };
        // Tiles in the order they run: groups of B panels (about B_GROUP_BYTES) stay in L2
        // while each A panel, in L1, passes every panel of the group at or right of it (the
        // order of BLIS's loops around the micro-kernel: Goto & van de Geijn 2008).
        let group = (B_GROUP_BYTES / (nr * 4 * nk)).max(1);
        for p0 in (0..nb).step_by(group) {
            let p1 = (p0 + group).min(nb);
            for q in 0..na.min((p1 * nr).div_ceil(mr)) {
                // Tiles wholly below the diagonal (i0 >= j0 + nr) are skipped.
                let first = (q * mr + 1).saturating_sub(nr).div_ceil(nr).max(p0);
                tiles.extend((first..p1).map(|p| tile(q, p)));
            }
        }
        if let Some(&t) = tiles.first() {
            prefetch_g(g, d, t);
        }
        for (n, &t) in tiles.iter().enumerate() {
            // The next tile's rows of G come in while this one multiplies.
            if let Some(&next) = tiles.get(n + 1) {
                prefetch_g(g, d, next);
            }
            let b = &self.b[self.b0 + (t.j0 / nr) * nk * nr..][..nk * nr];
            let a = &self.a[self.a0 + (t.i0 / mr) * nk * mr..][..nk * mr];
            match self.kernel {
                // SAFETY (all three): the CPU has the features (checked in `with_kernel`),
                // `a` / `b` hold `nk` packed steps of `mr` / `nr` words, and the tile lies
                // inside `g` (`rows`, `cols` clip it).
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => unsafe { x86::tile_avx2(nk, kc, a, b, g, d, t) },
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => unsafe { x86::tile_f32(nk, kc, a, b, g, d, t) },
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512Bf16 => unsafe { x86::tile_bf16(nk, kc, a, b, g, d, t) },
                _ => tile_portable(mr, nr, step, nk, kc, a, b, g, d, t),
            }
        }
    }
}

/// Fetch the f64 rows of a tile of `G` (far apart in memory: `d` × 8 bytes) ahead of its
/// update (a hint; nothing on other architectures).
#[inline(always)]
fn prefetch_g(g: &[f64], d: usize, t: Tile) {
    #[cfg(target_arch = "x86_64")]
    x86::prefetch_rows(g, d, t);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (g, d, t);
}

/// Grow `buf` to hold `n` words from a 64-byte boundary; the offset of that boundary.
fn aligned(buf: &mut Vec<u32>, n: usize) -> usize {
    if buf.len() < n + 15 {
        buf.resize(n + 15, 0);
    }
    buf.as_ptr().align_offset(64)
}

/// Where a tile sits in `G` and how much of it is inside (`rows × cols`).
#[derive(Clone, Copy)]
struct Tile {
    i0: usize,
    j0: usize,
    rows: usize,
    cols: usize,
}

/// Pack `block` (rows of width `d`, minus `shift`) into panels of `w` columns, each panel
/// `nk` rows of `w` f32 words; columns past `d` are zero.
fn pack_f32<R: Value>(
    rows: &[&[R]],
    shift: &[f32],
    d: usize,
    w: usize,
    nk: usize,
    out: &mut [u32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && !avx512_disabled() {
        // SAFETY: AVX-512F is present; the body is safe code compiled for it.
        return unsafe { x86::pack_f32_avx512(rows, shift, d, w, nk, out) };
    }
    pack_f32_body(rows, shift, d, w, nk, out)
}

#[inline(always)]
fn pack_f32_body<R: Value>(
    rows: &[&[R]],
    shift: &[f32],
    d: usize,
    w: usize,
    nk: usize,
    out: &mut [u32],
) {
    for (k, row) in rows.iter().enumerate() {
        for p in 0..d.div_ceil(w) {
            let c0 = p * w;
            let n = (d - c0).min(w);
            let dst = &mut out[(p * nk + k) * w..][..w];
            lanes(
                &mut dst[..n],
                &row[c0..c0 + n],
                &row[c0..c0 + n],
                &shift[c0..c0 + n],
                |x, _, c| (x.value() - c).to_bits(),
            );
            if n < w {
                dst[n..].fill(0);
            }
        }
    }
}

/// `out[i] = f(a[i], b[i], c[i])`, 16 lanes at a time (one AVX-512 vector: a fixed-size body
/// the compiler vectorizes whole, where a loop over the 32 columns of a panel would stay
/// below its unrolled vector loop's width), the rest one by one.
#[inline(always)]
fn lanes<R: Value>(out: &mut [u32], a: &[R], b: &[R], c: &[f32], f: impl Fn(R, R, f32) -> u32) {
    const L: usize = 16;
    let n = out.len();
    assert!(a.len() == n && b.len() == n && c.len() == n);
    let whole = n / L * L;
    for (((o, a), b), c) in out[..whole]
        .chunks_exact_mut(L)
        .zip(a.chunks_exact(L))
        .zip(b.chunks_exact(L))
        .zip(c.chunks_exact(L))
    {
        let (o, a, b, c): (&mut [u32; L], &[R; L], &[R; L], &[f32; L]) = (
            o.try_into().expect("L"),
            a.try_into().expect("L"),
            b.try_into().expect("L"),
            c.try_into().expect("L"),
        );
        for i in 0..L {
            o[i] = f(a[i], b[i], c[i]);
        }
    }
    for i in whole..n {
        out[i] = f(a[i], b[i], c[i]);
    }
}

/// Pack pairs of rows of `block` (minus `shift`, rounded to bf16) into panels of `w` columns,
/// each panel `nk` steps of `w` words holding (row 2k, row 2k + 1) of a column in their low and
/// high halves (the operand layout of `vdpbf16ps`, and of the B operand of `tdpbf16ps`: a
/// tile row is a step, pairs along K); missing rows (past the block's, up to `2 nk`) and
/// columns past `d` are zero.
fn pack_bf16_pairs<R: Value>(
    rows: &[&[R]],
    shift: &[f32],
    d: usize,
    w: usize,
    nk: usize,
    out: &mut [u32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && !avx512_disabled() {
        // SAFETY: AVX-512F is present; the body is safe code compiled for it.
        return unsafe { x86::pack_bf16_pairs_avx512(rows, shift, d, w, nk, out) };
    }
    pack_bf16_pairs_body(rows, shift, d, w, nk, out)
}

#[inline(always)]
fn pack_bf16_pairs_body<R: Value>(
    rows: &[&[R]],
    shift: &[f32],
    d: usize,
    w: usize,
    nk: usize,
    out: &mut [u32],
) {
    for k in 0..nk {
        let (lo, hi) = (rows.get(2 * k), rows.get(2 * k + 1));
        for p in 0..d.div_ceil(w) {
            let c0 = p * w;
            let n = (d - c0).min(w);
            let dst = &mut out[(p * nk + k) * w..][..w];
            let sh = &shift[c0..c0 + n];
            match (lo, hi) {
                (Some(lo), Some(hi)) => {
                    lanes(
                        &mut dst[..n],
                        &lo[c0..c0 + n],
                        &hi[c0..c0 + n],
                        sh,
                        |l, h, c| bf16_bits(l.value() - c) | (bf16_bits(h.value() - c) << 16),
                    );
                }
                // The last row of an odd block: its pair is zero.
                (Some(lo), None) => {
                    lanes(
                        &mut dst[..n],
                        &lo[c0..c0 + n],
                        &lo[c0..c0 + n],
                        sh,
                        |l, _, c| bf16_bits(l.value() - c),
                    );
                }
                _ => dst[..n].fill(0),
            }
            if n < w {
                dst[n..].fill(0);
            }
        }
    }
}

/// Gather panels of `mr` columns (`nk` steps each) from the `nr`-column panels `b`.
fn gather_panels(b: &[u32], d: usize, nr: usize, mr: usize, nk: usize, a: &mut [u32]) {
    for q in 0..d.div_ceil(mr) {
        let dst = &mut a[q * nk * mr..][..nk * mr];
        // The panel's columns are one run in a `nr`-panel, or two in neighbouring ones (the
        // second maybe cut short by `d`; `b` is zero past `d` within its last panel).
        let c0 = q * mr;
        let split = (nr - c0 % nr).min(mr);
        let first = &b[(c0 / nr) * nk * nr + c0 % nr..];
        let rest = (split < mr && c0 + split < d).then(|| &b[((c0 + split) / nr) * nk * nr..]);
        for (k, dk) in dst.chunks_exact_mut(mr).enumerate() {
            dk[..split].copy_from_slice(&first[k * nr..][..split]);
            match rest {
                Some(r) => dk[split..].copy_from_slice(&r[k * nr..][..mr - split]),
                None if split < mr => dk[split..].fill(0),
                None => {}
            }
        }
    }
}

/// Add the `rows × cols` top-left part of `t` (rows of `nr` floats) to `g` at the tile.
#[inline(always)]
fn add_tile(t: &[f32], nr: usize, g: &mut [f64], d: usize, tile: Tile) {
    for (r, tr) in t.chunks_exact(nr).enumerate().take(tile.rows) {
        let dst = &mut g[(tile.i0 + r) * d + tile.j0..][..tile.cols];
        for (o, &v) in dst.iter_mut().zip(tr) {
            *o += v as f64;
        }
    }
}

/// Value of the `h`-th bf16 half of a packed word, as f32.
#[inline(always)]
fn half(w: u32, h: usize) -> f32 {
    f32::from_bits(((w >> (16 * h)) & 0xffff) << 16)
}

#[allow(clippy::too_many_arguments)]
fn tile_portable(
    mr: usize,
    nr: usize,
    step: usize,
    nk: usize,
    kc: usize,
    a: &[u32],
    b: &[u32],
    g: &mut [f64],
    d: usize,
    tile: Tile,
) {
    let mut t = vec![0f32; mr * nr];
    for k0 in (0..nk).step_by(kc) {
        t.fill(0.0);
        let k1 = (k0 + kc).min(nk);
        for (ak, bk) in a[k0 * mr..k1 * mr]
            .chunks_exact(mr)
            .zip(b[k0 * nr..k1 * nr].chunks_exact(nr))
        {
            for (tr, &x) in t.chunks_exact_mut(nr).zip(ak) {
                for (o, &y) in tr.iter_mut().zip(bk) {
                    if step == 1 {
                        *o += f32::from_bits(x) * f32::from_bits(y);
                    } else {
                        *o += half(x, 0) * half(y, 0);
                        *o += half(x, 1) * half(y, 1);
                    }
                }
            }
        }
        add_tile(&t, nr, g, d, tile);
    }
}

/// Steps (pairs of bf16 rows) per AMX tile: the K of `tdpbf16ps` (a tile row holds 64 bytes,
/// 16 pairs of bf16).
const AMX_K: usize = 16;
/// Bytes of A panels the AMX kernel keeps in L2 while B panels stream past.
const AMX_A_GROUP_BYTES: usize = 512 << 10;

/// The AMX kernel (Intel SDM vol. 1 ch. 18, "Intel AMX"; vol. 2 for `ldtilecfg`, `tileloadd`,
/// `tdpbf16ps`, `tilestored`, `tilerelease`). Stable Rust has no AMX intrinsics: the tile
/// instructions are written as inline assembly.
///
/// Operands, per 32-column panel `p` of `d` and 16 steps `k` (pairs of rows 2k, 2k + 1):
/// - B (`pack_bf16_pairs` with `w = 32`): step after step, 32 words each; a word holds
///   (row 2k, row 2k + 1) of one column, which is `tdpbf16ps`'s B layout (a tile row is a step
///   K, 16 columns N of bf16 pairs): tile `h` of the panel is 16 steps from word `16 h`, rows
///   128 bytes apart.
/// - A: the same words transposed in blocks of 16 steps (`transpose_panels`): 32 columns of 16
///   words each, so a tile row (an M) is one column's 16 pairs along K: tile `h` is the 1 KiB
///   from word `256 h` of the block.
///
/// A 32 × 32 block of `G` lives in tiles 0-3 (f32, 16 × 16 each) for `kc` steps, is stored,
/// added to `G` in f64 and zeroed; A and B take tiles 4-5 and 6-7.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use super::x86::prefetch_rows;
    use super::{add_tile, Tile, AMX_A_GROUP_BYTES, AMX_K};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// Whether this CPU and OS let this process run AMX-BF16 (checked once per process):
    /// CPUID leaf 7 EDX bits 22 (AMX-BF16) and 24 (AMX-TILE), XCR0 bits 17-18 (the OS saves
    /// tile state), and Linux's per-process permission for tile data, requested here
    /// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, Linux 5.16+; it covers every
    /// thread of the process). Any step failing means no AMX, silently.
    pub(super) fn usable() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            #[allow(unused_unsafe)]
            // SAFETY: CPUID exists on every x86_64 CPU; leaf 7 is read only when the maximum
            // leaf reaches it, XGETBV only when CPUID says the OS enabled it (OSXSAVE).
            unsafe {
                if __cpuid(0).eax < 7 {
                    return false;
                }
                let edx = __cpuid_count(7, 0).edx;
                if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
                    return false;
                }
                if __cpuid(1).ecx & (1 << 27) == 0 || xcr0() & (3 << 17) != 3 << 17 {
                    return false;
                }
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments; it fails (returns -1) on
            // kernels without it.
            unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                ) == 0
            }
        })
    }

    #[target_feature(enable = "xsave")]
    fn xcr0() -> u64 {
        // SAFETY: only called after CPUID reported OSXSAVE.
        unsafe { _xgetbv(0) }
    }

    /// The 64-byte operand of `ldtilecfg`: palette 1, tiles 0-7 of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// A 32 × 32 f32 block (rows of 128 bytes), cache-line aligned.
    #[repr(C, align(64))]
    struct Block([f32; 32 * 32]);

    /// Transpose 16 × 16 32-bit words held as 16 rows (`r[i]` lane `j` becomes `r[j]` lane `i`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: &mut [__m512i; 16]) {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // u[4i + j], 128-bit lane L: rows 4i..4i+4 at column 4L + j.
        let mut u = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        for j in 0..4 {
            let v = _mm512_shuffle_i32x4::<0x88>(u[j], u[4 + j]);
            let w = _mm512_shuffle_i32x4::<0xdd>(u[j], u[4 + j]);
            let v2 = _mm512_shuffle_i32x4::<0x88>(u[8 + j], u[12 + j]);
            let w2 = _mm512_shuffle_i32x4::<0xdd>(u[8 + j], u[12 + j]);
            r[j] = _mm512_shuffle_i32x4::<0x88>(v, v2);
            r[8 + j] = _mm512_shuffle_i32x4::<0xdd>(v, v2);
            r[4 + j] = _mm512_shuffle_i32x4::<0x88>(w, w2);
            r[12 + j] = _mm512_shuffle_i32x4::<0xdd>(w, w2);
        }
    }

    /// The A operand from the B panels (see the module): `np` panels of `nk` steps × 32 words.
    #[target_feature(enable = "avx512f")]
    pub(super) fn transpose_panels(b: &[u32], np: usize, nk: usize, a: &mut [u32]) {
        assert!(nk.is_multiple_of(AMX_K) && b.len() >= np * nk * 32 && a.len() >= np * nk * 32);
        for blk in 0..np * nk / AMX_K {
            let (src, dst) = (&b[blk * 512..][..512], &mut a[blk * 512..][..512]);
            for h in 0..2 {
                let mut r = [_mm512_setzero_si512(); 16];
                for (i, v) in r.iter_mut().enumerate() {
                    // SAFETY: 16 words from i * 32 + h * 16 lie inside `src` (512 words).
                    *v = unsafe { _mm512_loadu_si512(src.as_ptr().add(i * 32 + h * 16).cast()) };
                }
                transpose16(&mut r);
                for (c, v) in r.iter().enumerate() {
                    // SAFETY: 16 words from h * 256 + c * 16 lie inside `dst` (512 words).
                    unsafe {
                        _mm512_storeu_si512(dst.as_mut_ptr().add(h * 256 + c * 16).cast(), *v)
                    };
                }
            }
        }
    }

    /// Add the block to `g` at `t` (clipped to `t.rows × t.cols`), in f64.
    #[target_feature(enable = "avx512f")]
    fn flush(c: &Block, g: &mut [f64], d: usize, t: Tile) {
        if t.rows == 32 && t.cols == 32 {
            for (r, cr) in c.0.chunks_exact(32).enumerate() {
                let row = &mut g[(t.i0 + r) * d + t.j0..][..32];
                for h in 0..4 {
                    // SAFETY: `cr` holds 32 floats and `row` 32 doubles; h * 8 + 8 <= 32.
                    unsafe {
                        let v = _mm512_cvtps_pd(_mm256_loadu_ps(cr.as_ptr().add(8 * h)));
                        let q = row.as_mut_ptr().add(8 * h);
                        _mm512_storeu_pd(q, _mm512_add_pd(_mm512_loadu_pd(q), v));
                    }
                }
            }
        } else {
            add_tile(&c.0, 32, g, d, t);
        }
    }

    /// `G += AᵀB` for every 32 × 32 block on or above the diagonal (see the module for the
    /// operands), an f32 partial sum per `kc` steps.
    ///
    /// # Safety
    /// The CPU must have AMX-BF16 and AVX-512F, and the process permission for tile data
    /// ([`usable`]).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn multiply(
        nk: usize,
        kc: usize,
        a: &[u32],
        b: &[u32],
        g: &mut [f64],
        d: usize,
    ) {
        const W: usize = 32;
        let np = d.div_ceil(W);
        assert!(nk.is_multiple_of(AMX_K) && kc.is_multiple_of(AMX_K) && kc > 0);
        assert!(a.len() >= np * nk * W && b.len() >= np * nk * W && g.len() >= d * d);
        let cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
            rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        // SAFETY (every asm block): the tile configuration is valid (palette 1, 8 tiles of
        // 16 × 64 bytes); each tile load reads 16 rows of 64 bytes inside `a` / `b` (offsets
        // below, bounds asserted above); stores write inside `c`. Tile state is this thread's:
        // configured here, released at the end.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly)) };
        let mut c = Block([0.0; 32 * 32]);
        // A panels in groups of about 512 KiB, which stay in L2 while every B panel on or
        // right of the group streams past them (rather than all of A streaming past each B).
        let group = (AMX_A_GROUP_BYTES / (W * 4 * nk)).max(1);
        for q0 in (0..np).step_by(group) {
            for p in q0..np {
                let j0 = p * W;
                let bp = b[p * nk * W..].as_ptr();
                for q in q0..(q0 + group).min(p + 1) {
                    let i0 = q * W;
                    let t = Tile {
                        i0,
                        j0,
                        rows: (d - i0).min(W),
                        cols: (d - j0).min(W),
                    };
                    prefetch_rows(g, d, t);
                    let ap = a[q * nk * W..].as_ptr();
                    for k0 in (0..nk).step_by(kc) {
                        unsafe {
                            asm!(
                                "tilezero tmm0",
                                "tilezero tmm1",
                                "tilezero tmm2",
                                "tilezero tmm3",
                                options(nostack, nomem)
                            )
                        };
                        for k in (k0..(k0 + kc).min(nk)).step_by(AMX_K) {
                            // A block at word k * 32 (16 steps × 32 words), tiles 1 KiB apart;
                            // B rows of 32 words from step k, tiles 64 bytes apart.
                            unsafe {
                                asm!(
                                    "tileloadd tmm4, [{a} + {sa}*1]",
                                    "tileloadd tmm6, [{b} + {sb}*1]",
                                    "tdpbf16ps tmm0, tmm4, tmm6",
                                    "tileloadd tmm7, [{b} + {sb}*1 + 64]",
                                    "tdpbf16ps tmm1, tmm4, tmm7",
                                    "tileloadd tmm5, [{a} + {sa}*1 + 1024]",
                                    "tdpbf16ps tmm2, tmm5, tmm6",
                                    "tdpbf16ps tmm3, tmm5, tmm7",
                                    a = in(reg) ap.add(k * W),
                                    b = in(reg) bp.add(k * W),
                                    sa = in(reg) 64usize,
                                    sb = in(reg) 128usize,
                                    options(nostack, readonly)
                                )
                            };
                        }
                        unsafe {
                            asm!(
                                "tilestored [{c} + {s}*1], tmm0",
                                "tilestored [{c} + {s}*1 + 64], tmm1",
                                "tilestored [{c} + {s}*1 + 2048], tmm2",
                                "tilestored [{c} + {s}*1 + 2112], tmm3",
                                c = in(reg) c.0.as_mut_ptr(),
                                s = in(reg) 128usize,
                                options(nostack)
                            )
                        };
                        flush(&c, g, d, t);
                    }
                }
            }
        }
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{add_tile, pack_bf16_pairs_body, pack_f32_body, Tile, Value};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) fn pack_f32_avx512<R: Value>(
        rows: &[&[R]],
        shift: &[f32],
        d: usize,
        w: usize,
        nk: usize,
        out: &mut [u32],
    ) {
        pack_f32_body(rows, shift, d, w, nk, out)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn pack_bf16_pairs_avx512<R: Value>(
        rows: &[&[R]],
        shift: &[f32],
        d: usize,
        w: usize,
        nk: usize,
        out: &mut [u32],
    ) {
        pack_bf16_pairs_body(rows, shift, d, w, nk, out)
    }

    /// Fetch the f64 rows of a tile (far apart in memory: `d` × 8 bytes) while the products
    /// run, so the update does not wait on memory.
    #[inline(always)]
    pub(super) fn prefetch_rows(g: &[f64], d: usize, t: Tile) {
        for r in 0..t.rows {
            let row = &g[(t.i0 + r) * d + t.j0..][..t.cols];
            for c in (0..t.cols).step_by(8) {
                // SAFETY: prefetching is a hint; the address lies inside `g`.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().add(c).cast()) };
            }
        }
    }

    /// Add a full tile of `MR` rows of `V` 16-float vectors to `g`.
    #[inline(never)]
    #[target_feature(enable = "avx512f")]
    fn flush512<const MR: usize, const V: usize>(
        c: &[[__m512; V]; MR],
        g: &mut [f64],
        d: usize,
        t: Tile,
    ) {
        if t.rows == MR && t.cols == 16 * V {
            for (r, cr) in c.iter().enumerate() {
                let row = &mut g[(t.i0 + r) * d + t.j0..][..16 * V];
                let p = row.as_mut_ptr();
                for (h, &v) in cr.iter().enumerate() {
                    let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
                    let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                        _mm512_castps_pd(v),
                    )));
                    // SAFETY: `row` holds 16 V doubles; h * 16 + 16 <= 16 V.
                    unsafe {
                        let q = p.add(h * 16);
                        _mm512_storeu_pd(q, _mm512_add_pd(_mm512_loadu_pd(q), lo));
                        _mm512_storeu_pd(q.add(8), _mm512_add_pd(_mm512_loadu_pd(q.add(8)), hi));
                    }
                }
            }
        } else {
            let mut tmp = [[0f32; 64]; MR];
            for (tr, cr) in tmp.iter_mut().zip(c) {
                for (h, &v) in cr.iter().enumerate() {
                    // SAFETY: tr holds 64 >= 16 V floats.
                    unsafe { _mm512_storeu_ps(tr.as_mut_ptr().add(16 * h), v) };
                }
            }
            let flat: Vec<f32> = tmp
                .iter()
                .flat_map(|r| r[..16 * V].iter().copied())
                .collect();
            add_tile(&flat, 16 * V, g, d, t);
        }
    }

    /// `c + x.lo·b.lo + x.hi·b.hi` per lane, for lanes holding two bf16 (`vdpbf16ps`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn madd_bf16(c: __m512, x: __m512i, b: __m512i) -> __m512 {
        // SAFETY: __m512i and __m512bh are both 64-byte vectors of plain bits.
        unsafe {
            _mm512_dpbf16_ps(
                c,
                std::mem::transmute::<__m512i, __m512bh>(x),
                std::mem::transmute::<__m512i, __m512bh>(b),
            )
        }
    }

    /// A 12 × 32 tile over `nk` packed steps (pairs of bf16 rows), an f32 partial sum per
    /// `kc` steps; `$madd` multiplies and adds one step.
    macro_rules! tile512 {
        ($(#[$doc:meta])* $name:ident, $features:literal, $madd:ident) => {
            $(#[$doc])*
            #[target_feature(enable = $features)]
            pub(super) fn $name(
                nk: usize,
                kc: usize,
                a: &[u32],
                b: &[u32],
                g: &mut [f64],
                d: usize,
                t: Tile,
            ) {
                const MR: usize = 12;
                assert!(a.len() >= nk * MR && b.len() >= nk * 32);
                let (pa, pb) = (a.as_ptr(), b.as_ptr());
                for k0 in (0..nk).step_by(kc) {
                    let mut c = [[_mm512_setzero_ps(); 2]; MR];
                    for k in k0..(k0 + kc).min(nk) {
                        // SAFETY: k < nk, and `a` / `b` hold nk steps of MR / 32 words
                        // (asserted).
                        unsafe {
                            let b0 = _mm512_loadu_si512(pb.add(k * 32).cast());
                            let b1 = _mm512_loadu_si512(pb.add(k * 32 + 16).cast());
                            let ak = pa.add(k * MR);
                            for (r, cr) in c.iter_mut().enumerate() {
                                let x = _mm512_set1_epi32(*ak.add(r) as i32);
                                cr[0] = $madd(cr[0], x, b0);
                                cr[1] = $madd(cr[1], x, b1);
                            }
                        }
                    }
                    flush512(&c, g, d, t);
                }
            }
        };
    }

    /// `c + x·b` per lane (f32 FMA; `x` and `b` hold f32 bits).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn madd_f32(c: __m512, x: __m512i, b: __m512i) -> __m512 {
        _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(b), c)
    }
    tile512!(
        /// 12 × 32 tile, f32 FMA.
        tile_f32,
        "avx512f",
        madd_f32
    );
    tile512!(
        /// 12 × 32 tile, pairs of bf16 rows with `vdpbf16ps`.
        tile_bf16,
        "avx512f,avx512bf16",
        madd_bf16
    );

    /// 6 × 16 tile, f32 FMA (AVX2).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn tile_avx2(
        nk: usize,
        kc: usize,
        a: &[u32],
        b: &[u32],
        g: &mut [f64],
        d: usize,
        t: Tile,
    ) {
        const MR: usize = 6;
        assert!(a.len() >= nk * MR && b.len() >= nk * 16);
        let (pa, pb) = (a.as_ptr().cast::<f32>(), b.as_ptr().cast::<f32>());
        for k0 in (0..nk).step_by(kc) {
            let mut c = [[_mm256_setzero_ps(); 2]; MR];
            for k in k0..(k0 + kc).min(nk) {
                // SAFETY: k < nk, and `a` / `b` hold nk steps of MR / 16 words (asserted).
                unsafe {
                    let b0 = _mm256_loadu_ps(pb.add(k * 16));
                    let b1 = _mm256_loadu_ps(pb.add(k * 16 + 8));
                    let ak = pa.add(k * MR);
                    for (r, cr) in c.iter_mut().enumerate() {
                        let x = _mm256_broadcast_ss(&*ak.add(r));
                        cr[0] = _mm256_fmadd_ps(x, b0, cr[0]);
                        cr[1] = _mm256_fmadd_ps(x, b1, cr[1]);
                    }
                }
            }
            if t.rows == MR && t.cols == 16 {
                for (r, cr) in c.iter().enumerate() {
                    let row = &mut g[(t.i0 + r) * d + t.j0..][..16];
                    let p = row.as_mut_ptr();
                    for (h, &v) in cr.iter().enumerate() {
                        let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
                        let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
                        // SAFETY: `row` holds 16 doubles; h * 8 + 8 <= 16.
                        unsafe {
                            let q = p.add(h * 8);
                            _mm256_storeu_pd(q, _mm256_add_pd(_mm256_loadu_pd(q), lo));
                            _mm256_storeu_pd(
                                q.add(4),
                                _mm256_add_pd(_mm256_loadu_pd(q.add(4)), hi),
                            );
                        }
                    }
                }
            } else {
                let mut tmp = [0f32; MR * 16];
                for (tr, cr) in tmp.chunks_exact_mut(16).zip(&c) {
                    // SAFETY: tr holds 16 floats.
                    unsafe {
                        _mm256_storeu_ps(tr.as_mut_ptr(), cr[0]);
                        _mm256_storeu_ps(tr.as_mut_ptr().add(8), cr[1]);
                    }
                }
                add_tile(&tmp, 16, g, d, t);
            }
        }
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

    fn bf16(x: f32) -> f32 {
        f32::from_bits(bf16_bits(x) << 16)
    }

    #[test]
    fn default_kernel_passes_over_a_half_rate_bf16_dot() {
        use Kernel::*;
        let all = [Portable, Avx2, Avx512, Avx512Bf16, Amx];
        let no_amx = [Portable, Avx2, Avx512, Avx512Bf16];
        assert_eq!(Kernel::pick(&all, true, false), Amx);
        assert_eq!(Kernel::pick(&all, false, true), Avx512);
        assert_eq!(Kernel::pick(&no_amx, true, true), Avx512Bf16);
        assert_eq!(Kernel::pick(&no_amx, true, false), Avx512);
        assert_eq!(Kernel::pick(&no_amx, false, true), Avx512);
        assert_eq!(Kernel::pick(&[Portable, Avx2], true, true), Avx2);
        assert_eq!(Kernel::pick(&[Portable], true, false), Portable);
    }

    /// Every kernel this CPU has, against a float64 reference, at widths around the tile
    /// sizes and row counts around the block sizes, in two calls (accumulation across calls).
    #[test]
    fn every_kernel_matches_float64_reference_at_awkward_sizes() {
        for kernel in Kernel::available() {
            for &(d, n) in &[
                (1, 3),
                (5, 7),
                (6, 16),
                (13, 33),
                (17, 255),
                (23, 257),
                (33, 600),
                (40, 1025),
                (97, 513),
            ] {
                // bf16 numbers, and a shift of bf16 numbers within a factor of two of most of
                // them, so the bf16 kernel's shifted values are exact too.
                let rows: Vec<f32> = (0..n * d)
                    .map(|i| {
                        let j = i % d;
                        bf16(((i * 7919 % 1009) as f32 / 1009.0 + 0.5) * (1 + j) as f32)
                    })
                    .collect();
                let shift: Vec<f32> = (0..d).map(|j| bf16(0.75 * (1 + j) as f32)).collect();
                let shift = kernel.shift(&shift);
                let want = reference(&rows, &shift, d);
                let mut gram = Gram::with_kernel(d, kernel);
                let mut got = vec![0.0; d * d];
                let half = n / 2 * d;
                gram.add(&rows[..half], &shift, &mut got);
                gram.add(&rows[half..], &shift, &mut got);
                let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
                for i in 0..d {
                    for j in i..d {
                        let err = (got[i * d + j] - want[i * d + j]).abs();
                        assert!(
                            err <= 1e-5 * scale,
                            "{kernel:?} d {d} n {n} ({i},{j}): {err:e}"
                        );
                    }
                }
            }
        }
    }

    /// Widths around the 48-column panels the AVX-512 f32 kernel reads its A operand from
    /// (columns 40..48 of a panel, a last panel cut short by `d`), and one wide enough for
    /// several groups of A panels (over 528 columns at 512 rows), against float64, with
    /// partial sums over 512 rows flushed twice per tile; every kernel this CPU has.
    #[test]
    fn panel_edges_and_b_groups_match_float64_reference() {
        for kernel in Kernel::available() {
            for &(d, n) in &[(47, 300), (48, 97), (49, 513), (95, 40), (700, 1100)] {
                let rows = adversarial_rows(n, d, (d + n) as u64);
                let shift = kernel.shift(&vec![0f32; d]);
                let mut got = vec![0.0; d * d];
                Gram::with_kernel(d, kernel).add(&rows, &shift, &mut got);
                let want = reference(&rows, &shift, d);
                for i in 0..d {
                    for j in i..d {
                        let (g, w) = (got[i * d + j], want[i * d + j]);
                        // f32 sums of at most KC exact products: |error| <= KC u Σ|x_i x_j|,
                        // and Σ|x_i x_j| <= sqrt(G_ii G_jj) (Cauchy-Schwarz; shift 0). A
                        // missed or doubled row is off by about sqrt(G_ii G_jj) / n.
                        let tol =
                            KC as f64 * 2f64.powi(-24) * (want[i * d + i] * want[j * d + j]).sqrt();
                        assert!(
                            (g - w).abs() <= tol,
                            "{kernel:?} d {d} n {n} ({i},{j}): {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// A dimension whose mean is 6 standard deviations from zero enters the bf16 kernels
    /// unshifted (`moment_shift` in analyze.rs shifts only past 8; the f32 kernels are shifted
    /// by the mean), so its variance comes from sums of x² about 37 times larger: the f32
    /// partial sums must stay short enough for the variance to keep 1e-5 of itself (the
    /// AVX-512 BF16 kernel over 512 rows lost 2-5e-5 on real activations; over 256, 4e-6).
    #[test]
    fn unshifted_large_means_keep_their_variance() {
        let (d, n) = (64, 8192);
        let mut state = 7u64;
        let mut normal = || {
            // Sum of 12 uniforms minus 6: mean 0, variance 1.
            (0..12)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 40) as f64 / (1u64 << 24) as f64
                })
                .sum::<f64>()
                - 6.0
        };
        let rows: Vec<f32> = (0..n * d).map(|_| bf16((6.0 + normal()) as f32)).collect();
        let column = |i: usize| rows.iter().skip(i).step_by(d).map(|&x| x as f64);
        let mean: Vec<f64> = (0..d).map(|i| column(i).sum::<f64>() / n as f64).collect();
        let var: Vec<f64> = (0..d)
            .map(|i| column(i).map(|x| (x - mean[i]).powi(2)).sum::<f64>() / n as f64)
            .collect();
        for kernel in Kernel::available() {
            let asked: Vec<f32> = if kernel.bf16() {
                vec![0.0; d]
            } else {
                mean.iter().map(|&m| m as f32).collect()
            };
            let c = kernel.shift(&asked);
            let mut got = vec![0.0; d * d];
            Gram::with_kernel(d, kernel).add(&rows, &c, &mut got);
            let worst = (0..d)
                .map(|i| {
                    let m = mean[i] - c[i] as f64;
                    (got[i * d + i] / n as f64 - m * m - var[i]).abs() / var[i]
                })
                .fold(0.0, f64::max);
            assert!(
                worst < 1e-5,
                "{kernel:?}: variance off by {worst:.2e} of itself"
            );
        }
    }

    /// Small integers: every product and sum is exact in f32 (and bf16), so all kernels agree
    /// bit for bit, across several super-blocks.
    #[test]
    fn kernels_agree_exactly_on_small_integers() {
        let (d, n) = (37, 2 * 8 * KC + 77);
        let rows: Vec<f32> = (0..n * d).map(|i| (i % 13) as f32 - 6.0).collect();
        let shift = vec![0.5f32; d];
        let mut results = Vec::new();
        for kernel in Kernel::available() {
            let mut g = Gram::with_kernel(d, kernel);
            let mut out = vec![0.0; d * d];
            g.add(&rows, &shift, &mut out);
            let upper: Vec<f64> = (0..d)
                .flat_map(|i| out[i * d + i..(i + 1) * d].to_vec())
                .collect();
            results.push((kernel, upper));
        }
        for (k, r) in &results[1..] {
            assert_eq!(r, &results[0].1, "{k:?} differs from the portable kernel");
        }
    }

    /// `n` rows of width `d` of bf16 numbers, from a seeded generator: columns of very
    /// different scales and signs, a column of zeros, a constant column, rare large values.
    fn adversarial_rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        (0..n * d)
            .map(|i| {
                let j = i % d;
                let u = next();
                let x = match j % 5 {
                    0 => 1000.0 * u,
                    1 => 1e-3 * u,
                    2 if j == 2 => 0.0,
                    3 => 7.25,
                    _ if u > 0.49 => -3e4 * u,
                    _ => u - 0.1 * j as f32,
                };
                bf16(x)
            })
            .collect()
    }

    /// The AMX kernel against the portable one (same shifted bf16 pairs) and float64, at
    /// widths that are not multiples of the 16 / 32 tile sizes, few rows (one pair, an odd
    /// row), row counts that are not whole tiles, and across super-blocks. Differences must be
    /// f32 rounding: within the bound of f32 sums of `KC` products, `KC 2^-24 Σ|products|`
    /// (3e-5 of it; a wrong operand layout or a missed pair is off by whole products, each
    /// about 1 / n of the sum).
    #[test]
    fn amx_matches_portable_within_f32_rounding() {
        if !Kernel::available().contains(&Kernel::Amx) {
            eprintln!("skipped: this CPU or OS gives this process no AMX-BF16 tiles");
            return;
        }
        for &(d, n) in &[
            (1, 1),
            (3, 2),
            (15, 31),
            (16, 32),
            (17, 33),
            (31, 17),
            (33, 65),
            (47, 1),
            (63, 513),
            (65, 1100),
            (100, 2049),
            (129, 9001),
        ] {
            let rows = adversarial_rows(n, d, (d * 1000 + n) as u64);
            let shift: Vec<f32> = (0..d).map(|j| if j % 5 == 3 { 7.0 } else { 0.0 }).collect();
            let shift = Kernel::Amx.shift(&shift);
            let run = |kernel| {
                let mut g = vec![0.0; d * d];
                let mut gram = Gram::with_kernel(d, kernel);
                let half = n / 3 * d;
                gram.add(&rows[..half], &shift, &mut g);
                gram.add(&rows[half..], &shift, &mut g);
                g
            };
            let (amx, portable) = (run(Kernel::Amx), run(Kernel::Portable));
            let want = reference(&rows, &shift, d);
            let mut abs = vec![0f64; d * d];
            for r in rows.chunks_exact(d) {
                for i in 0..d {
                    for j in i..d {
                        abs[i * d + j] +=
                            ((r[i] - shift[i]) as f64 * (r[j] - shift[j]) as f64).abs();
                    }
                }
            }
            for i in 0..d {
                for j in i..d {
                    let k = i * d + j;
                    // f32 sums of at most KC products: |error| <= KC u sum |products|, u = 2^-24.
                    let tol = KC as f64 * 2f64.powi(-24) * abs[k];
                    let (e1, e2) = ((amx[k] - portable[k]).abs(), (amx[k] - want[k]).abs());
                    assert!(
                        e1 <= tol && e2 <= tol,
                        "d {d} n {n} ({i},{j}): amx {} portable {} f64 {}",
                        amx[k],
                        portable[k],
                        want[k]
                    );
                }
            }
        }
    }

    /// Tile state is per thread: threads running the AMX kernel at once (each configuring its
    /// own tiles) get the one thread's result bit for bit.
    #[test]
    fn amx_runs_on_several_threads_at_once() {
        if !Kernel::available().contains(&Kernel::Amx) {
            eprintln!("skipped: this CPU or OS gives this process no AMX-BF16 tiles");
            return;
        }
        let (d, n) = (70, 3000);
        let shift = vec![0f32; d];
        let one = |seed: u64| {
            let rows = adversarial_rows(n, d, seed);
            let mut g = vec![0.0; d * d];
            Gram::with_kernel(d, Kernel::Amx).add(&rows, &shift, &mut g);
            g
        };
        let alone: Vec<Vec<f64>> = (0..4).map(one).collect();
        let together: Vec<Vec<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4).map(|seed| s.spawn(move || one(seed))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(alone, together);
    }

    #[test]
    fn bf16_rows_from_the_map_match_their_f32_decode() {
        // Every kernel, bf16 rows read in place (`Bf16`) and decoded to f32 first: the same
        // sums bit for bit (odd row counts, a shift, widths off the panel grid).
        for (d, n) in [(77, 301), (130, 1025)] {
            let rows: Vec<f32> = adversarial_rows(n, d, 9).into_iter().map(bf16).collect();
            let bits: Vec<Bf16> = rows
                .iter()
                .map(|x| Bf16((x.to_bits() >> 16) as u16))
                .collect();
            let shift: Vec<f32> = (0..d)
                .map(|j| if j % 3 == 0 { 0.25 } else { 0.0 })
                .collect();
            for kernel in Kernel::available() {
                let shift = kernel.shift(&shift);
                let mut from_f32 = vec![0f64; d * d];
                let mut from_bits = vec![0f64; d * d];
                let f: Vec<&[f32]> = rows.chunks_exact(d).collect();
                let b: Vec<&[Bf16]> = bits.chunks_exact(d).collect();
                Gram::with_kernel(d, kernel).add_rows(&f, &shift, &mut from_f32);
                Gram::with_kernel(d, kernel).add_rows(&b, &shift, &mut from_bits);
                assert_eq!(from_f32, from_bits, "{kernel:?} d {d} n {n}");
            }
        }
    }

    #[test]
    fn bf16_shift_rounds_and_others_keep_it() {
        let s = [1.0f32 + 1.0 / 512.0, 3.3, -1e4, 0.0];
        assert_eq!(Kernel::Avx512.shift(&s), s.to_vec());
        let r = Kernel::Avx512Bf16.shift(&s);
        assert_eq!(r, vec![1.0, bf16(3.3), -9984.0, 0.0]);
        assert_eq!(
            Kernel::Amx.shift(&s),
            r,
            "both bf16 kernels round the shift"
        );
        assert_eq!(bf16(1.0 + 3.0 / 512.0), 1.0 + 4.0 / 512.0, "ties to even");
        // x − c is exact in bf16 for bf16 x from c / 2 to 2 c, for shifts just above and just
        // below a power of two.
        for c in [3.3f32, 1.0, 1.99, 2.01, -7.7] {
            let c = Kernel::Avx512Bf16.shift(&[c])[0];
            let (lo, hi) = if c > 0.0 {
                (c / 2.0, 2.0 * c)
            } else {
                (2.0 * c, c / 2.0)
            };
            let mut x = bf16(lo);
            let mut n = 0;
            while x <= hi {
                assert_eq!(bf16(x - c), x - c, "x {x} c {c}");
                x = f32::from_bits(x.to_bits() + if x > 0.0 { 1 << 16 } else { u32::MAX - 0xffff });
                n += 1;
            }
            assert!(n >= 256, "{n} values checked");
        }
    }

    #[test]
    fn portable_bf16_path_matches_reference() {
        // The portable tile reads bf16 pairs too (the kernels share the packing code).
        let (d, n) = (19, 301);
        let rows: Vec<f32> = (0..n * d)
            .map(|i| bf16((i % 29) as f32 * 0.37 - 3.0))
            .collect();
        let shift = vec![0f32; d];
        let (mr, nr, step) = Kernel::Avx512Bf16.geometry();
        let nk = n.div_ceil(step);
        let mut b = vec![0u32; d.div_ceil(nr) * nk * nr];
        let mut a = vec![0u32; d.div_ceil(mr) * nk * mr];
        let slices: Vec<&[f32]> = rows.chunks_exact(d).collect();
        pack_bf16_pairs_body(&slices, &shift, d, nr, nk, &mut b);
        gather_panels(&b, d, nr, mr, nk, &mut a);
        let mut got = vec![0.0; d * d];
        for p in 0..d.div_ceil(nr) {
            for q in 0..d.div_ceil(mr) {
                let (i0, j0) = (q * mr, p * nr);
                if i0 >= j0 + nr {
                    continue;
                }
                let t = Tile {
                    i0,
                    j0,
                    rows: (d - i0).min(mr),
                    cols: (d - j0).min(nr),
                };
                tile_portable(
                    mr,
                    nr,
                    step,
                    nk,
                    KC / step,
                    &a[q * nk * mr..],
                    &b[p * nk * nr..],
                    &mut got,
                    d,
                    t,
                );
            }
        }
        let want = reference(&rows, &shift, d);
        for i in 0..d {
            for j in i..d {
                let err = (got[i * d + j] - want[i * d + j]).abs();
                assert!(err <= 1e-5 * want[i * d + i].max(1.0), "({i},{j}) {err:e}");
            }
        }
    }
}
