/* Peak multiply-add rate of one core, from registers only (no memory operands): the ceiling the
 * second-moment kernels (rust/rank1fast-core/src/gram.rs) are measured against.
 *
 *   cc -O2 -o /tmp/fma_peak benches/prototypes/fma_peak.c && /tmp/fma_peak
 *
 * Each loop runs N independent accumulator chains (enough to cover the instruction's latency
 * on every CPU seen so far: 4-cycle FMA x 2 ports needs 8; 24 leaves room), so the figure is
 * the instruction's throughput. GFLOP/s count a multiply-add as two flops; for vdpbf16ps one
 * instruction is 16 lanes x 2 bf16 products added to f32 (64 flops). Instructions the CPU lacks
 * are skipped (checked at run time). Wall time of one thread; run on an idle core.
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define ITERS 20000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define CHAINS12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

__attribute__((target("avx2,fma"))) static double fma256(void) {
    __m256 m = _mm256_set1_ps(1.0000001f), a = _mm256_set1_ps(1e-7f);
#define DECL(i) __m256 c##i = _mm256_set1_ps((float)i);
    CHAINS12(DECL)
#undef DECL
    double t0 = now();
    for (long n = 0; n < ITERS; n++) {
#define STEP(i) c##i = _mm256_fmadd_ps(c##i, m, a);
        CHAINS12(STEP)
#undef STEP
    }
    double t = now() - t0;
    __m256 s = c0;
#define SUM(i) s = _mm256_add_ps(s, c##i);
    CHAINS12(SUM)
#undef SUM
    float out[8];
    _mm256_storeu_ps(out, s);
    if (out[0] == 12345.f) puts("");
    return ITERS * 12.0 * 8 * 2 / t / 1e9;
}

__attribute__((target("avx512f"))) static double fma512(void) {
    __m512 m = _mm512_set1_ps(1.0000001f), a = _mm512_set1_ps(1e-7f);
#define DECL(i) __m512 c##i = _mm512_set1_ps((float)i), d##i = _mm512_set1_ps((float)i + 0.5f);
    CHAINS12(DECL)
#undef DECL
    double t0 = now();
    for (long n = 0; n < ITERS; n++) {
#define STEP(i) c##i = _mm512_fmadd_ps(c##i, m, a); d##i = _mm512_fmadd_ps(d##i, m, a);
        CHAINS12(STEP)
#undef STEP
    }
    double t = now() - t0;
    __m512 s = c0;
#define SUM(i) s = _mm512_add_ps(s, _mm512_add_ps(c##i, d##i));
    CHAINS12(SUM)
#undef SUM
    if (_mm512_reduce_add_ps(s) == 12345.f) puts("");
    return ITERS * 24.0 * 16 * 2 / t / 1e9;
}

__attribute__((target("avx512f,avx512bf16"))) static double dpbf16(void) {
    __m512bh m = (__m512bh)_mm512_set1_epi16(0x3f80), a = (__m512bh)_mm512_set1_epi16(0x3400);
#define DECL(i) __m512 c##i = _mm512_set1_ps((float)i), d##i = _mm512_set1_ps((float)i + 0.5f);
    CHAINS12(DECL)
#undef DECL
    double t0 = now();
    for (long n = 0; n < ITERS; n++) {
#define STEP(i) c##i = _mm512_dpbf16_ps(c##i, m, a); d##i = _mm512_dpbf16_ps(d##i, m, a);
        CHAINS12(STEP)
#undef STEP
    }
    double t = now() - t0;
    __m512 s = c0;
#define SUM(i) s = _mm512_add_ps(s, _mm512_add_ps(c##i, d##i));
    CHAINS12(SUM)
#undef SUM
    if (_mm512_reduce_add_ps(s) == 12345.f) puts("");
    return ITERS * 24.0 * 16 * 2 * 2 / t / 1e9;
}

int main(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        printf("ymm vfmadd (f32, AVX2):       %6.1f GFLOP/s\n", fma256());
    if (__builtin_cpu_supports("avx512f"))
        printf("zmm vfmadd (f32, AVX-512):    %6.1f GFLOP/s\n", fma512());
    if (__builtin_cpu_supports("avx512bf16"))
        printf("zmm vdpbf16ps (bf16 -> f32):  %6.1f GFLOP/s\n", dpbf16());
    return 0;
}
