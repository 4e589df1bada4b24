/* quant_gemm.h: micro-kernels for inference with float32, bfloat16 and int8 weights.
 *
 * One operation: C[i][j] = sum_k A[i][k] W[j][k] for i < m <= QG_MR rows of A
 * and the j < 16 output rows of one weight *panel*. Weights are packed once
 * (fastrnn/quantize.py) into panels of 16 output rows, with K padded to a
 * multiple of 4 (zero weights):
 *
 *   float32   P[k][j]            (k < Kp)            64 bytes per k
 *   bfloat16  P[k/2][j][k%2]     (uint16)            64 bytes per pair of k
 *   int8      P[k/4][j][k%4]     (int8)              64 bytes per quad of k
 *
 * so one 64-byte line holds a k-slice of all 16 rows, and the AVX-512 paths
 * read it as one register (bf16 pairs widened in a lane, vpdpbusd quads in a lane).
 *
 * A rows are *prepared* first (qg_prepare, once per row and call) into what
 * the kernel reads, zero-padded to Kp:
 *
 *   QG_A_FLOAT  float[Kp]                       float32 and bf16 weights; int8
 *                                               weight-only
 *   QG_A_Q8S    int8[Kp] q = rint(a * 127/max|a|), as = max|a|/127
 *                                               int8 dynamic on AVX2/baseline
 *   QG_A_Q8U    uint8[Kp] q + 128                int8 dynamic with VNNI
 *   QG_A_BF16   uint16[Kp] bf16(a)               bf16 dynamic with AVX512-BF16
 *   QG_A_BF16F  float[Kp] bf16(a) as float       bf16 dynamic elsewhere
 *
 * Results (written, not accumulated, into C[i][0..15]):
 *   float32 / bfloat16: the float32 sum, k in order (FMA where the ISA has it)
 *   int8 weight-only:   ws[j] * sum_k a[k] w8[j][k]   (float32 sum)
 *   int8 dynamic:       (float)(sum_k q[k] w8[j][k]) * (ws[j] * as[i]); the integer
 *                       sum is exact (mod 2^32, for dot products of at most
 *                       INT8_DYNAMIC_MAX_K terms, fastrnn/quantization.py), so every
 *                       ISA gives bitwise the same numbers.
 *                       VNNI computes sum (q+128) w and subtracts wz[j] = 128 sum w.
 *   bf16 dynamic:       sum_k bf16(a[k]) w[j][k] in float32: the activations are
 *                       rounded to bf16 too (nearest even), so each pair of k is one
 *                       vdpbf16ps where the CPU has it (the products are exact in
 *                       float32; the sums round in float32, pairwise in another
 *                       order than the emulation's FMAs).
 *
 * bf16 weight-only (mode "weight_only") keeps float32 activations and widens the
 * weights in registers on every ISA. bf16 dynamic (mode "dynamic") rounds the
 * activations to bf16 as well and runs one vdpbf16ps per pair of k: 32 multiply-adds
 * per instruction against an FMA's 16. Whether that pays depends on the CPU:
 * - Intel Xeon with AVX512-BF16 (session 10): vdpbf16ps issues at half the FMA rate,
 *   so it did no more multiply-adds per cycle than widening and lost from B=2 on
 *   (LSTM I=H=512 T=50: B=8 13.2 ms against 10.5 widened, B=64 106 against 86).
 * - AMD Zen 4: vdpbf16ps issues at the FMA rate (a 12-chain throughput loop on one
 *   core: the same instructions per second), i.e. twice the multiply-adds.
 * mode "auto" follows that (qg_bf16_dot_pays). A hi + lo split of the activations
 * (two vdpbf16ps per pair, ~16 bits kept) was slower than widening everywhere and
 * is gone.
 *
 * ISA: no -march flags. Each kernel exists as plain C (baseline), AVX2+FMA and
 * AVX-512 (F, BW, VL, DQ, VNNI) functions with GCC target attributes; the
 * caller picks a level (qg_cpu_level() is the best this CPU has).
 */
#ifndef FASTRNN_QUANT_GEMM_H
#define FASTRNN_QUANT_GEMM_H

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define QG_X86 1
#else
#define QG_X86 0
#endif
/* The vdpbf16ps kernel needs a compiler that knows AVX512-BF16 (GCC 10, clang 9);
 * built with an older one, the avx512_bf16 level is never offered. */
#if QG_X86 && ((defined(__clang__) && __clang_major__ >= 9) \
               || (!defined(__clang__) && __GNUC__ >= 10))
#define QG_HAVE_BF16 1
#else
#define QG_HAVE_BF16 0
#endif

enum { QG_F32 = 0, QG_BF16 = 1, QG_I8 = 2 };
/* Levels: QG_AVX512_BF16 is QG_AVX512 plus vdpbf16ps (used by bf16 dynamic alone). */
enum { QG_BASELINE = 0, QG_AVX2 = 1, QG_AVX512 = 2, QG_AVX512_BF16 = 3 };
enum { QG_A_FLOAT = 0, QG_A_Q8S = 2, QG_A_Q8U = 3, QG_A_BF16 = 4, QG_A_BF16F = 5 };

#define QG_NR 16
#define QG_MR 8     /* rows of A per kernel call */
#define QG_NP 4     /* consecutive panels per kernel call */
#define QG_INLINE static inline __attribute__((always_inline))

static inline ptrdiff_t qg_round4(ptrdiff_t k) { return (k + 3) & ~(ptrdiff_t)3; }

/* Bytes of one packed panel (16 rows, Kp = qg_round4(K)). */
static inline size_t qg_panel_bytes(int fmt, ptrdiff_t Kp)
{
    return (size_t)Kp * (fmt == QG_F32 ? 64 : fmt == QG_BF16 ? 32 : 16);
}

/* Bytes of one prepared A row (the largest kind). */
static inline size_t qg_row_bytes(ptrdiff_t Kp) { return (size_t)Kp * 4; }

/* What A rows are prepared into for the kernels of (fmt, isa, dynamic int8). */
static inline int qg_a_kind(int fmt, int isa, int dyn)
{
    if (fmt == QG_I8 && dyn) return isa >= QG_AVX512 ? QG_A_Q8U : QG_A_Q8S;
    if (fmt == QG_BF16 && dyn) return isa == QG_AVX512_BF16 ? QG_A_BF16 : QG_A_BF16F;
    return QG_A_FLOAT;
}

/* Best level this CPU runs: 3 needs AVX-512 F/BW/VL/DQ/VNNI and BF16, 2 the same
 * without BF16, 1 AVX2+FMA. */
static int qg_cpu_level(void)
{
#if QG_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
        && __builtin_cpu_supports("avx512vnni")) {
#if QG_HAVE_BF16
        if (__builtin_cpu_supports("avx512bf16")) return QG_AVX512_BF16;
#endif
        return QG_AVX512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return QG_AVX2;
#endif
    return QG_BASELINE;
}

/* Does bf16 "auto" run dynamic (vdpbf16ps)? Where it issues at the FMA rate: AMD
 * (Zen 4 measured, see the top of this file); not Intel's (half rate measured). */
static int qg_bf16_dot_pays(void)
{
#if QG_X86
    return qg_cpu_level() == QG_AVX512_BF16 && __builtin_cpu_is("amd");
#else
    return 0;
#endif
}

/* float -> bf16 bits, round to nearest even; a NaN stays a (quiet) NaN. */
static inline uint32_t qg_bf16_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u >> 16) | 0x40u;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return u >> 16;
}

static inline float qg_bf16_float(uint32_t b)
{
    uint32_t u = b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* A dynamically quantised row's scale (amax / 127; *inv := 127 / amax, what the codes
 * are rint(a * inv) of) from its largest |value| and whether it holds NaN or inf:
 * - such a row gets a NaN scale (codes 0), so every product of it is NaN, as the float
 *   module's are: int8 codes have no NaN, and a NaN state or an overflow in the
 *   recurrence had turned into finite garbage (found by an audit);
 * - a row whose values are all below QG_TINY in magnitude counts as zeros: 127 / amax
 *   would overflow to inf (their products are below 1e-30 * |w| anyway).
 * quant_reference.quantize_rows applies the same rules. */
#define QG_TINY 1e-30f
static inline float qg_row_scale(float amax, int nonfinite, float *inv)
{
    if (nonfinite) {
        *inv = 0.0f;
        return NAN;
    }
    if (!(amax >= QG_TINY)) {
        *inv = 0.0f;
        return 0.0f;
    }
    *inv = 127.0f / amax;
    return amax / 127.0f;
}

/* Prepare one A row of K values into `out` (kind above), padded to Kp: plain C
 * (qg_prepare below picks the vectorised twin where there is one). */
static void qg_prepare_scalar(int kind, const float *a, ptrdiff_t K, ptrdiff_t Kp, void *out,
                       float *ascale)
{
    ptrdiff_t k;
    if (kind == QG_A_FLOAT) {
        float *o = (float *)out;
        if (a) memcpy(o, a, (size_t)K * sizeof(float)); else memset(o, 0, (size_t)K * 4);
        for (k = K; k < Kp; ++k) o[k] = 0.0f;
    } else if (kind == QG_A_BF16) {
        uint16_t *o = (uint16_t *)out;
        for (k = 0; k < Kp; ++k) o[k] = (uint16_t)(a && k < K ? qg_bf16_bits(a[k]) : 0u);
    } else if (kind == QG_A_BF16F) {
        float *o = (float *)out;
        for (k = 0; k < Kp; ++k) o[k] = a && k < K ? qg_bf16_float(qg_bf16_bits(a[k])) : 0.0f;
    } else {
        float amax = 0.0f, inv;
        int nonfinite = 0;
        for (k = 0; a && k < K; ++k) {
            float v = fabsf(a[k]);
            amax = v > amax ? v : amax;
            nonfinite |= !(v <= FLT_MAX);
        }
        *ascale = qg_row_scale(amax, nonfinite, &inv);
        int off = kind == QG_A_Q8U ? 128 : 0;
        unsigned char *o = (unsigned char *)out;
        for (k = 0; k < Kp; ++k) {
            float q = (a && k < K && inv != 0.0f) ? rintf(a[k] * inv) : 0.0f;
            q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
            o[k] = (unsigned char)(int)((int)q + off);
        }
    }
}

/* Kernel signature shared by every (format, ISA) pair: C[i][16q + j] for i < m rows
 * of A and the np (<= QG_NP) consecutive panels q (panel q at panel + q * pstride bytes;
 * ws, wz of panel q at ws + 16q, wz + 16q). Each output is one accumulator summed
 * with k in order, so the tile a kernel chooses never changes a result. */
typedef void (*qg_kernel)(int m, int np, ptrdiff_t Kp, const void *const *A,
                          const void *panel, size_t pstride, float *const *C,
                          const float *ws, const int32_t *wz, const float *as);

/* ------------------------------------------------------------ baseline (plain C) */
static void qg_f32_base(int m, int np, ptrdiff_t Kp, const void *const *A, const void *panel,
                        size_t pstride, float *const *C, const float *ws, const int32_t *wz,
                        const float *as)
{
    (void)ws; (void)wz; (void)as;
    for (int q = 0; q < np; ++q) {
        const float *P = (const float *)((const unsigned char *)panel + q * pstride);
        for (int i = 0; i < m; ++i) {
            const float *a = (const float *)A[i];
            float acc[QG_NR] = {0};
            for (ptrdiff_t k = 0; k < Kp; ++k)
                for (int j = 0; j < QG_NR; ++j) acc[j] += a[k] * P[k * QG_NR + j];
            memcpy(C[i] + q * QG_NR, acc, sizeof acc);
        }
    }
}

static void qg_bf16_base(int m, int np, ptrdiff_t Kp, const void *const *A, const void *panel,
                         size_t pstride, float *const *C, const float *ws, const int32_t *wz,
                         const float *as)
{
    (void)ws; (void)wz; (void)as;
    for (int q = 0; q < np; ++q) {
        const uint16_t *P = (const uint16_t *)((const unsigned char *)panel + q * pstride);
        for (int i = 0; i < m; ++i) {
            const float *a = (const float *)A[i];
            float acc[QG_NR] = {0};
            for (ptrdiff_t k = 0; k < Kp; k += 2)
                for (int j = 0; j < QG_NR; ++j) {
                    acc[j] += a[k] * qg_bf16_float(P[(k / 2) * 32 + 2 * j]);
                    acc[j] += a[k + 1] * qg_bf16_float(P[(k / 2) * 32 + 2 * j + 1]);
                }
            memcpy(C[i] + q * QG_NR, acc, sizeof acc);
        }
    }
}

static void qg_i8w_base(int m, int np, ptrdiff_t Kp, const void *const *A, const void *panel,
                        size_t pstride, float *const *C, const float *ws, const int32_t *wz,
                        const float *as)
{
    (void)wz; (void)as;
    for (int q = 0; q < np; ++q) {
        const int8_t *P = (const int8_t *)((const unsigned char *)panel + q * pstride);
        for (int i = 0; i < m; ++i) {
            const float *a = (const float *)A[i];
            float acc[QG_NR] = {0};
            for (ptrdiff_t k = 0; k < Kp; k += 4)
                for (int r = 0; r < 4; ++r)
                    for (int j = 0; j < QG_NR; ++j)
                        acc[j] += a[k + r] * (float)P[(k / 4) * 64 + 4 * j + r];
            for (int j = 0; j < QG_NR; ++j) C[i][q * QG_NR + j] = acc[j] * ws[q * QG_NR + j];
        }
    }
}

static void qg_i8d_base(int m, int np, ptrdiff_t Kp, const void *const *A, const void *panel,
                        size_t pstride, float *const *C, const float *ws, const int32_t *wz,
                        const float *as)
{
    (void)wz;
    for (int q = 0; q < np; ++q) {
        const int8_t *P = (const int8_t *)((const unsigned char *)panel + q * pstride);
        for (int i = 0; i < m; ++i) {
            const int8_t *a = (const int8_t *)A[i];
            int32_t acc[QG_NR] = {0};
            for (ptrdiff_t k = 0; k < Kp; k += 4)
                for (int j = 0; j < QG_NR; ++j)
                    for (int r = 0; r < 4; ++r)
                        acc[j] += (int32_t)a[k + r] * (int32_t)P[(k / 4) * 64 + 4 * j + r];
            for (int j = 0; j < QG_NR; ++j)
                C[i][q * QG_NR + j] = (float)acc[j] * (ws[q * QG_NR + j] * as[i]);
        }
    }
}

#if QG_X86
/* Register tiles: a tile function is written once for compile-time (M, NP) and
 * instantiated for every M <= QG_MR, NP <= QG_NP by QG_TILE_SWITCH; the entry
 * point cuts (m, np) into tiles that fit the ISA's registers (qg_tiles). */
#define QG_TILE_CASE(MM, NN, FN, ...) case (MM) * 8 + (NN): FN(MM, NN, __VA_ARGS__); break;
#define QG_TILE_ROW(MM, FN, ...) QG_TILE_CASE(MM, 1, FN, __VA_ARGS__) QG_TILE_CASE(MM, 2, FN, __VA_ARGS__) \
                                 QG_TILE_CASE(MM, 3, FN, __VA_ARGS__) QG_TILE_CASE(MM, 4, FN, __VA_ARGS__)
#define QG_TILE_SWITCH(mm, nn, FN, ...)                                                   \
    switch ((mm) * 8 + (nn)) {                                                            \
    QG_TILE_ROW(1, FN, __VA_ARGS__) QG_TILE_ROW(2, FN, __VA_ARGS__)                        \
    QG_TILE_ROW(3, FN, __VA_ARGS__) QG_TILE_ROW(4, FN, __VA_ARGS__)                        \
    QG_TILE_ROW(5, FN, __VA_ARGS__) QG_TILE_ROW(6, FN, __VA_ARGS__)                        \
    QG_TILE_ROW(7, FN, __VA_ARGS__) QG_TILE_ROW(8, FN, __VA_ARGS__)                        \
    default: break;                                                                       \
    }

/* Walk (m rows, np panels) in tiles of at most `cap` panel-rows (accumulator
 * groups), at most QG_MR rows: panels first (more independent chains at small m). */
#define QG_TILES(cap, m, np, FN, A, panel, pstride, C, ws, wz, as, ...)                   \
    do {                                                                                  \
        const int mr_ = (m) < QG_MR ? (m) : QG_MR;                                       \
        const int nc_ = (np) < (cap) / mr_ ? (np) : ((cap) / mr_ > 0 ? (cap) / mr_ : 1);  \
        const int rc_ = (m) < (cap) / nc_ ? (m) : ((cap) / nc_ < QG_MR ? (cap) / nc_ : QG_MR); \
        for (int q0_ = 0; q0_ < (np); q0_ += nc_) {                                      \
            const int nn_ = (np) - q0_ < nc_ ? (np) - q0_ : nc_;                          \
            const unsigned char *P_ = (const unsigned char *)(panel) + q0_ * (pstride);   \
            for (int i0_ = 0; i0_ < (m); i0_ += rc_) {                                   \
                const int mm_ = (m) - i0_ < rc_ ? (m) - i0_ : rc_;                        \
                QG_TILE_SWITCH(mm_, nn_, FN, (A) + i0_, P_, pstride, (C) + i0_, q0_ * QG_NR, \
                               (ws) ? (ws) + q0_ * QG_NR : NULL,                           \
                               (wz) ? (wz) + q0_ * QG_NR : NULL, (as) ? (as) + i0_ : NULL, \
                               __VA_ARGS__)                                                \
            }                                                                             \
        }                                                                                 \
    } while (0)

/* A kernel's entry point `name` (qg_kernel signature): (m, np) cut into tiles of
 * the tile function `tile`, at most `cap` panel-rows each. */
#define QG_ENTRY(name, ATTR, cap, tile)                                                   \
    static ATTR void name(int m, int np, ptrdiff_t Kp, const void *const *A,              \
                          const void *panel, size_t pstride, float *const *C,             \
                          const float *ws, const int32_t *wz, const float *as)            \
    {                                                                                     \
        QG_TILES(cap, m, np, tile, A, panel, pstride, C, ws, wz, as, Kp);                 \
    }

/* ------------------------------------------------------------ AVX2 + FMA */
#define QG_AVX2_T __attribute__((target("avx2,fma")))
#define QG_AVX2_CAP 6     /* panel-rows per tile: 12 of the 16 ymm accumulate */
#define QG_AVX2_CAP_WIDE 4 /* kernels that widen weights need 4 more ymm per panel */

QG_INLINE QG_AVX2_T void qg_f32_avx2_t(const int M, const int NP, const void *const *A,
                                       const unsigned char *P, size_t ps, float *const *C,
                                       int c0, const float *ws, const int32_t *wz,
                                       const float *as, ptrdiff_t Kp)
{
    __m256 acc[QG_MR][QG_NP][2];
    (void)ws; (void)wz; (void)as;
    for (int i = 0; i < M; ++i)
        for (int q = 0; q < NP; ++q) acc[i][q][0] = acc[i][q][1] = _mm256_setzero_ps();
    for (ptrdiff_t k = 0; k < Kp; ++k) {
        __m256 w[QG_NP][2];
        for (int q = 0; q < NP; ++q) {
            const float *Pq = (const float *)(P + q * ps) + k * 16;
            w[q][0] = _mm256_loadu_ps(Pq);
            w[q][1] = _mm256_loadu_ps(Pq + 8);
        }
        for (int i = 0; i < M; ++i) {
            __m256 a = _mm256_broadcast_ss((const float *)A[i] + k);
            for (int q = 0; q < NP; ++q) {
                acc[i][q][0] = _mm256_fmadd_ps(a, w[q][0], acc[i][q][0]);
                acc[i][q][1] = _mm256_fmadd_ps(a, w[q][1], acc[i][q][1]);
            }
        }
    }
    for (int i = 0; i < M; ++i)
        for (int q = 0; q < NP; ++q) {
            _mm256_storeu_ps(C[i] + c0 + q * 16, acc[i][q][0]);
            _mm256_storeu_ps(C[i] + c0 + q * 16 + 8, acc[i][q][1]);
        }
}
QG_ENTRY(qg_f32_avx2, QG_AVX2_T, QG_AVX2_CAP, qg_f32_avx2_t)

QG_INLINE QG_AVX2_T void qg_bf16_avx2_t(const int M, const int NP, const void *const *A,
                                        const unsigned char *P, size_t ps, float *const *C,
                                        int c0, const float *ws, const int32_t *wz,
                                        const float *as, ptrdiff_t Kp)
{
    const __m256i himask = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc[QG_MR][QG_NP][2];
    (void)ws; (void)wz; (void)as;
    for (int i = 0; i < M; ++i)
        for (int q = 0; q < NP; ++q) acc[i][q][0] = acc[i][q][1] = _mm256_setzero_ps();
    for (ptrdiff_t k = 0; k < Kp; k += 2) {
        __m256 e[QG_NP][2], o[QG_NP][2];
        for (int q = 0; q < NP; ++q)
            for (int h = 0; h < 2; ++h) {
                __m256i v = _mm256_loadu_si256((const __m256i *)((const uint32_t *)(P + q * ps) + k * 8 + 8 * h));
                e[q][h] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                o[q][h] = _mm256_castsi256_ps(_mm256_and_si256(v, himask));
            }
        for (int i = 0; i < M; ++i) {
            __m256 ae = _mm256_broadcast_ss((const float *)A[i] + k);
            __m256 ao = _mm256_broadcast_ss((const float *)A[i] + k + 1);
            for (int q = 0; q < NP; ++q)
                for (int h = 0; h < 2; ++h) {
                    acc[i][q][h] = _mm256_fmadd_ps(ae, e[q][h], acc[i][q][h]);
                    acc[i][q][h] = _mm256_fmadd_ps(ao, o[q][h], acc[i][q][h]);
                }
        }
    }
    for (int i = 0; i < M; ++i)
        for (int q = 0; q < NP; ++q) {
            _mm256_storeu_ps(C[i] + c0 + q * 16, acc[i][q][0]);
            _mm256_storeu_ps(C[i] + c0 + q * 16 + 8, acc[i][q][1]);
        }
}
QG_ENTRY(qg_bf16_avx2, QG_AVX2_T, QG_AVX2_CAP_WIDE, qg_bf16_avx2_t)

/* byte r of every 32-bit lane, sign-extended, as float */
#define QG_AVX2_BYTE(v, r) _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * (r)), 24))

QG_INLINE QG_AVX2_T void qg_i8w_avx2_t(const int M, const int NP, const void *const *A,
                                       const unsigned char *P, size_t ps, float *const *C,
                                       int c0, const float *ws, const int32_t *wz,
                                       const float *as, ptrdiff_t Kp)
{
    __m256 acc[QG_MR][QG_NP][2];
    (void)wz; (void)as;
    for (int i = 0; i < M; ++i)
        for (int q = 0; q < NP; ++q) acc[i][q][0] = acc[i][q][1] = _mm256_setzero_ps();
    for (ptrdiff_t k = 0; k < Kp; k += 4)
        for (int q = 0; q < NP; ++q) {
            const int8_t *Pq = (const int8_t *)(P + q * ps) + k * 16;
            __m256i v0 = _mm256_loadu_si256((const __m256i *)Pq);
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(Pq + 32));
            for (int r = 0; r < 4; ++r) {
                __m256 w0 = QG_AVX2_BYTE(v0, r), w1 = QG_AVX2_BYTE(v1, r);
                for (int i = 0; i < M; ++i) {
                    __m256 a = _mm256_broadcast_ss((const float *)A[i] + k + r);
                    acc[i][q][0] = _mm256_fmadd_ps(a, w0, acc[i][q][0]);
                    acc[i][q][1] = _mm256_fmadd_ps(a, w1, acc[i][q][1]);
                }
            }
        }
    for (int q = 0; q < NP; ++q) {
        __m256 s0 = _mm256_loadu_ps(ws + q * 16), s1 = _mm256_loadu_ps(ws + q * 16 + 8);
        for (int i = 0; i < M; ++i) {
            _mm256_storeu_ps(C[i] + c0 + q * 16, _mm256_mul_ps(acc[i][q][0], s0));
            _mm256_storeu_ps(C[i] + c0 + q * 16 + 8, _mm256_mul_ps(acc[i][q][1], s1));
        }
    }
}
QG_ENTRY(qg_i8w_avx2, QG_AVX2_T, QG_AVX2_CAP_WIDE, qg_i8w_avx2_t)

/* int8 x int8 quads on AVX2: even and odd bytes as int16, two vpmaddwd. */
QG_INLINE QG_AVX2_T void qg_i8d_avx2_t(const int M, const int NP, const void *const *A,
                                       const unsigned char *P, size_t ps, float *const *C,
                                       int c0, const float *ws, const int32_t *wz,
                                       const float *as, ptrdiff_t Kp)
{
    __m256i acc[QG_MR][QG_NP][2];
    (void)wz;
    for (int i = 0; i < M; ++i)
        for (int q = 0; q < NP; ++q) acc[i][q][0] = acc[i][q][1] = _mm256_setzero_si256();
    for (ptrdiff_t k = 0; k < Kp; k += 4)
        for (int q = 0; q < NP; ++q) {
            const int8_t *Pq = (const int8_t *)(P + q * ps) + k * 16;
            __m256i v0 = _mm256_loadu_si256((const __m256i *)Pq);
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(Pq + 32));
            __m256i e0 = _mm256_srai_epi16(_mm256_slli_epi16(v0, 8), 8), o0 = _mm256_srai_epi16(v0, 8);
            __m256i e1 = _mm256_srai_epi16(_mm256_slli_epi16(v1, 8), 8), o1 = _mm256_srai_epi16(v1, 8);
            for (int i = 0; i < M; ++i) {   /* the activation quad split again per panel:
                                               cheaper than 2 ymm per row held across panels */
                int32_t quad;
                memcpy(&quad, (const int8_t *)A[i] + k, 4);
                __m256i a = _mm256_set1_epi32(quad);
                __m256i ae = _mm256_srai_epi16(_mm256_slli_epi16(a, 8), 8);
                __m256i ao = _mm256_srai_epi16(a, 8);
                acc[i][q][0] = _mm256_add_epi32(acc[i][q][0], _mm256_add_epi32(
                    _mm256_madd_epi16(ae, e0), _mm256_madd_epi16(ao, o0)));
                acc[i][q][1] = _mm256_add_epi32(acc[i][q][1], _mm256_add_epi32(
                    _mm256_madd_epi16(ae, e1), _mm256_madd_epi16(ao, o1)));
            }
        }
    for (int q = 0; q < NP; ++q) {
        __m256 s0 = _mm256_loadu_ps(ws + q * 16), s1 = _mm256_loadu_ps(ws + q * 16 + 8);
        for (int i = 0; i < M; ++i) {
            __m256 sa = _mm256_set1_ps(as[i]);
            _mm256_storeu_ps(C[i] + c0 + q * 16,
                             _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][q][0]), _mm256_mul_ps(s0, sa)));
            _mm256_storeu_ps(C[i] + c0 + q * 16 + 8,
                             _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][q][1]), _mm256_mul_ps(s1, sa)));
        }
    }
}
QG_ENTRY(qg_i8d_avx2, QG_AVX2_T, QG_AVX2_CAP_WIDE, qg_i8d_avx2_t)

/* ------------------------------------------------------------ AVX-512 (F BW VL BF16 VNNI) */
#define QG_512_T __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))
/* Panel-rows per tile: 16 of the 32 zmm hold accumulators. 24 would fit, but GCC 12
 * then shuffles the 8 x 3 tile's accumulators through a scratch register around
 * every vpdpbusd and spills some (perf annotate). Measured on the Zen 4 EPYC,
 * int8 GRU I=H=512 T=50, ms, 24 -> 16: dynamic (VNNI) B=8 3.43 -> 1.79,
 * B=16 6.87 -> 3.63, B=64 29.0 -> 16.3; weight-only B=8 9.7 -> 7.5; float32
 * and bfloat16 unchanged. */
#define QG_512_CAP 16

QG_INLINE QG_512_T void qg_f32_512_t(const int M, const int NP, const void *const *A,
                                     const unsigned char *P, size_t ps, float *const *C,
                                     int c0, const float *ws, const int32_t *wz,
                                     const float *as, ptrdiff_t Kp)
{
    __m512 acc[QG_MR][QG_NP];
    (void)ws; (void)wz; (void)as;
    for (int i = 0; i < M; ++i)
        for (int q = 0; q < NP; ++q) acc[i][q] = _mm512_setzero_ps();
    for (ptrdiff_t k = 0; k < Kp; ++k) {
        __m512 w[QG_NP];
        for (int q = 0; q < NP; ++q) w[q] = _mm512_loadu_ps((const float *)(P + q * ps) + k * 16);
        for (int i = 0; i < M; ++i) {
            __m512 a = _mm512_set1_ps(((const float *)A[i])[k]);
            for (int q = 0; q < NP; ++q) acc[i][q] = _mm512_fmadd_ps(a, w[q], acc[i][q]);
        }
    }
    for (int i = 0; i < M; ++i)
        for (int q = 0; q < NP; ++q) _mm512_storeu_ps(C[i] + c0 + q * 16, acc[i][q]);
}
QG_ENTRY(qg_f32_512, QG_512_T, QG_512_CAP, qg_f32_512_t)

/* bf16 weights widened to float32 in registers (the low half of a pair is k even). */
QG_INLINE QG_512_T void qg_bf16_512_t(const int M, const int NP, const void *const *A,
                                       const unsigned char *P, size_t ps, float *const *C,
                                       int c0, const float *ws, const int32_t *wz,
                                       const float *as, ptrdiff_t Kp)
{
    const __m512i himask = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 acc[QG_MR][QG_NP];
    (void)ws; (void)wz; (void)as;
    for (int i = 0; i < M; ++i)
        for (int q = 0; q < NP; ++q) acc[i][q] = _mm512_setzero_ps();
    for (ptrdiff_t k = 0; k < Kp; k += 2) {
        __m512 e[QG_NP], o[QG_NP];
        for (int q = 0; q < NP; ++q) {
            __m512i v = _mm512_loadu_si512((const void *)((const uint32_t *)(P + q * ps) + k * 8));
            e[q] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            o[q] = _mm512_castsi512_ps(_mm512_and_si512(v, himask));
        }
        for (int i = 0; i < M; ++i) {
            const float *a = (const float *)A[i] + k;
            __m512 ae = _mm512_set1_ps(a[0]), ao = _mm512_set1_ps(a[1]);
            for (int q = 0; q < NP; ++q) {
                acc[i][q] = _mm512_fmadd_ps(ae, e[q], acc[i][q]);
                acc[i][q] = _mm512_fmadd_ps(ao, o[q], acc[i][q]);
            }
        }
    }
    for (int i = 0; i < M; ++i)
        for (int q = 0; q < NP; ++q) _mm512_storeu_ps(C[i] + c0 + q * 16, acc[i][q]);
}
QG_ENTRY(qg_bf16_512, QG_512_T, QG_512_CAP, qg_bf16_512_t)

#define QG_512_BYTE(v, r) _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * (r)), 24))

QG_INLINE QG_512_T void qg_i8w_512_t(const int M, const int NP, const void *const *A,
                                     const unsigned char *P, size_t ps, float *const *C,
                                     int c0, const float *ws, const int32_t *wz,
                                     const float *as, ptrdiff_t Kp)
{
    __m512 acc[QG_MR][QG_NP];
    (void)wz; (void)as;
    for (int i = 0; i < M; ++i)
        for (int q = 0; q < NP; ++q) acc[i][q] = _mm512_setzero_ps();
    for (ptrdiff_t k = 0; k < Kp; k += 4)
        for (int q = 0; q < NP; ++q) {
            __m512i v = _mm512_loadu_si512((const void *)((const int8_t *)(P + q * ps) + k * 16));
            __m512 w0 = QG_512_BYTE(v, 0), w1 = QG_512_BYTE(v, 1);
            __m512 w2 = QG_512_BYTE(v, 2), w3 = QG_512_BYTE(v, 3);
            for (int i = 0; i < M; ++i) {
                const float *a = (const float *)A[i] + k;
                acc[i][q] = _mm512_fmadd_ps(_mm512_set1_ps(a[0]), w0, acc[i][q]);
                acc[i][q] = _mm512_fmadd_ps(_mm512_set1_ps(a[1]), w1, acc[i][q]);
                acc[i][q] = _mm512_fmadd_ps(_mm512_set1_ps(a[2]), w2, acc[i][q]);
                acc[i][q] = _mm512_fmadd_ps(_mm512_set1_ps(a[3]), w3, acc[i][q]);
            }
        }
    for (int q = 0; q < NP; ++q) {
        __m512 s = _mm512_loadu_ps(ws + q * 16);
        for (int i = 0; i < M; ++i) _mm512_storeu_ps(C[i] + c0 + q * 16, _mm512_mul_ps(acc[i][q], s));
    }
}
QG_ENTRY(qg_i8w_512, QG_512_T, QG_512_CAP, qg_i8w_512_t)

/* vpdpbusd: u8 (q + 128) x s8 quads; wz[j] = 128 sum_k w[j][k] removes the offset. */
QG_INLINE QG_512_T void qg_i8d_512_t(const int M, const int NP, const void *const *A,
                                     const unsigned char *P, size_t ps, float *const *C,
                                     int c0, const float *ws, const int32_t *wz,
                                     const float *as, ptrdiff_t Kp)
{
    __m512i acc[QG_MR][QG_NP];
    for (int i = 0; i < M; ++i)
        for (int q = 0; q < NP; ++q) acc[i][q] = _mm512_setzero_si512();
    for (ptrdiff_t k = 0; k < Kp; k += 4) {
        __m512i w[QG_NP];
        for (int q = 0; q < NP; ++q)
            w[q] = _mm512_loadu_si512((const void *)((const int8_t *)(P + q * ps) + k * 16));
        for (int i = 0; i < M; ++i) {
            int32_t quad;
            memcpy(&quad, (const uint8_t *)A[i] + k, 4);
            __m512i a = _mm512_set1_epi32(quad);
            for (int q = 0; q < NP; ++q) acc[i][q] = _mm512_dpbusd_epi32(acc[i][q], a, w[q]);
        }
    }
    for (int q = 0; q < NP; ++q) {
        __m512 s = _mm512_loadu_ps(ws + q * 16);
        __m512i z = _mm512_loadu_si512((const void *)(wz + q * 16));
        for (int i = 0; i < M; ++i) {
            __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][q], z));
            _mm512_storeu_ps(C[i] + c0 + q * 16, _mm512_mul_ps(f, _mm512_mul_ps(s, _mm512_set1_ps(as[i]))));
        }
    }
}
QG_ENTRY(qg_i8d_512, QG_512_T, QG_512_CAP, qg_i8d_512_t)

#if QG_HAVE_BF16
/* bf16 dynamic: one vdpbf16ps per pair of k, lane j += a[k] w[j][k] + a[k+1] w[j][k+1]
 * (the panel's 64-byte line of a pair is exactly its operand; the activations come
 * prepared as bf16 pairs, QG_A_BF16). */
#define QG_512BF_T __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma")))

QG_INLINE QG_512BF_T void qg_bf16d_512_t(const int M, const int NP, const void *const *A,
                                         const unsigned char *P, size_t ps, float *const *C,
                                         int c0, const float *ws, const int32_t *wz,
                                         const float *as, ptrdiff_t Kp)
{
    __m512 acc[QG_MR][QG_NP];
    (void)ws; (void)wz; (void)as;
    for (int i = 0; i < M; ++i)
        for (int q = 0; q < NP; ++q) acc[i][q] = _mm512_setzero_ps();
    for (ptrdiff_t k = 0; k < Kp; k += 2) {
        __m512bh w[QG_NP];
        for (int q = 0; q < NP; ++q)
            w[q] = (__m512bh)_mm512_loadu_si512((const void *)((const uint32_t *)(P + q * ps) + k * 8));
        for (int i = 0; i < M; ++i) {
            uint32_t pair;
            memcpy(&pair, (const uint16_t *)A[i] + k, 4);
            __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);
            for (int q = 0; q < NP; ++q) acc[i][q] = _mm512_dpbf16_ps(acc[i][q], a, w[q]);
        }
    }
    for (int i = 0; i < M; ++i)
        for (int q = 0; q < NP; ++q) _mm512_storeu_ps(C[i] + c0 + q * 16, acc[i][q]);
}
QG_ENTRY(qg_bf16d_512, QG_512BF_T, QG_512_CAP, qg_bf16d_512_t)
#endif /* QG_HAVE_BF16 */
/* ------------------------------------------------------------ vectorised row preparation
 * Same numbers as qg_prepare_scalar: max is exact, the product and the round to
 * nearest even are the same operations, NaN ordered as there (tested bitwise). */
static QG_512_T void qg_quant_row_512(const float *a, ptrdiff_t K, ptrdiff_t Kp,
                                      unsigned char *o, float *ascale, int off)
{
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512 big = _mm512_set1_ps(FLT_MAX);
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    ptrdiff_t k;
    for (k = 0; a && k < K; k += 16) {
        __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 v = _mm512_and_ps(_mm512_maskz_loadu_ps(mk, a + k), absmask);
        vmax = _mm512_max_ps(v, vmax);            /* NaN lanes keep vmax */
        bad |= _mm512_cmp_ps_mask(v, big, _CMP_NLE_UQ);   /* NaN or inf */
    }
    float inv, amax = _mm512_reduce_max_ps(vmax);
    *ascale = qg_row_scale(amax, bad != 0, &inv);
    const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    const __m512i voff = _mm512_set1_epi32(off);
    for (k = 0; k < Kp; k += 16) {
        ptrdiff_t nk = K - k, np = Kp - k;
        __mmask16 mk = !a || inv == 0.0f || nk <= 0 ? 0   /* (codes 0, as qg_prepare_scalar's) */
                       : nk >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nk) - 1);
        __mmask16 ms = np >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << np) - 1);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, a ? a + k : NULL), vinv);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));   /* NaN passes, as in C */
        _mm512_mask_cvtepi32_storeu_epi8(o + k, ms, _mm512_add_epi32(_mm512_cvttps_epi32(v), voff));
    }
}

/* The bf16 bits of 16 floats (their bits in u), in the low half of each lane:
 * nearest even, NaN kept quiet (the bits of qg_bf16_bits). avx512f alone, so that
 * any AVX-512 function can inline it (bf16_gemm.h's transposing pack too). */
static inline __attribute__((target("avx512f"))) __m512i qg_bf16_round_512(__m512i u)
{
    const __m512i absm = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, absm), inf);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
        _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    return _mm512_mask_or_epi32(_mm512_srli_epi32(r, 16), nan, _mm512_srli_epi32(u, 16),
                                _mm512_set1_epi32(0x40));
}

/* A row rounded to bf16 (qg_bf16_round_512) as uint16 (QG_A_BF16) or as float
 * (QG_A_BF16F), zero-padded to Kp. */
static QG_512_T void qg_bf16_row_512(const float *a, ptrdiff_t K, ptrdiff_t Kp, void *out,
                                     int as_float)
{
    for (ptrdiff_t k = 0; k < Kp; k += 16) {
        ptrdiff_t nk = K - k, np = Kp - k;
        __mmask16 mk = !a || nk <= 0 ? 0 : nk >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nk) - 1);
        __mmask16 ms = np >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << np) - 1);
        __m512i r = qg_bf16_round_512(_mm512_maskz_loadu_epi32(mk, a ? a + k : NULL));
        if (as_float)
            _mm512_mask_storeu_epi32((float *)out + k, ms, _mm512_slli_epi32(r, 16));
        else
            _mm512_mask_cvtepi32_storeu_epi16((uint16_t *)out + k, ms, r);
    }
}

static QG_AVX2_T void qg_quant_row_avx2(const float *a, ptrdiff_t K, ptrdiff_t Kp,
                                        unsigned char *o, float *ascale, int off)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 big = _mm256_set1_ps(FLT_MAX);
    __m256 vmax = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
    ptrdiff_t k = 0, K8 = a ? K & ~(ptrdiff_t)7 : 0;
    for (; k < K8; k += 8) {
        __m256 v = _mm256_and_ps(_mm256_loadu_ps(a + k), absmask);
        vmax = _mm256_max_ps(v, vmax);
        vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(v, big, _CMP_NLE_UQ));   /* NaN or inf */
    }
    float m8[8], amax = 0.0f, inv;
    int nonfinite = _mm256_movemask_ps(vbad) != 0;
    _mm256_storeu_ps(m8, vmax);
    for (int j = 0; j < 8; ++j) amax = m8[j] > amax ? m8[j] : amax;
    for (; a && k < K; ++k) {
        float v = fabsf(a[k]);
        amax = v > amax ? v : amax;
        nonfinite |= !(v <= FLT_MAX);
    }
    *ascale = qg_row_scale(amax, nonfinite, &inv);
    if (inv == 0.0f)
        K8 = 0;            /* codes 0 (the loop below), as qg_prepare_scalar's */
    const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    for (k = 0; k < K8; k += 8) {
        __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(a + k), vinv),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(hi, _mm256_max_ps(lo, v));
        int32_t q[8];
        _mm256_storeu_si256((__m256i *)q, _mm256_cvttps_epi32(v));
        for (int j = 0; j < 8; ++j) o[k + j] = (unsigned char)(q[j] + off);
    }
    for (; k < Kp; ++k) {
        float q = (a && k < K && inv != 0.0f) ? rintf(a[k] * inv) : 0.0f;
        q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
        o[k] = (unsigned char)(int)((int)q + off);
    }
}
#endif /* QG_X86 */

/* Prepare one A row for the kernels of level `isa` (vectorised where it pays). */
static void qg_prepare(int isa, int kind, const float *a, ptrdiff_t K, ptrdiff_t Kp,
                       void *out, float *ascale)
{
#if QG_X86
    if (isa >= QG_AVX512 && (kind == QG_A_BF16 || kind == QG_A_BF16F)) {
        qg_bf16_row_512(a, K, Kp, out, kind == QG_A_BF16F);
        return;
    }
    if (isa >= QG_AVX512 && (kind == QG_A_Q8U || kind == QG_A_Q8S)) {
        qg_quant_row_512(a, K, Kp, (unsigned char *)out, ascale, kind == QG_A_Q8U ? 128 : 0);
        return;
    }
    if (isa == QG_AVX2 && (kind == QG_A_Q8U || kind == QG_A_Q8S)) {
        qg_quant_row_avx2(a, K, Kp, (unsigned char *)out, ascale, kind == QG_A_Q8U ? 128 : 0);
        return;
    }
#endif
    (void)isa;
    qg_prepare_scalar(kind, a, K, Kp, out, ascale);
}

/* The kernel for (isa, fmt, dynamic). bf16 dynamic below QG_AVX512_BF16 runs the
 * widening kernel on activations prepared as bf16-valued floats (QG_A_BF16F). */
static qg_kernel qg_pick(int isa, int fmt, int dyn)
{
    int v = fmt == QG_F32 ? 0 : fmt == QG_BF16 ? 1 : dyn ? 3 : 2;
#if QG_X86
    static const qg_kernel k512[4] = {qg_f32_512, qg_bf16_512, qg_i8w_512, qg_i8d_512};
    static const qg_kernel k2[4] = {qg_f32_avx2, qg_bf16_avx2, qg_i8w_avx2, qg_i8d_avx2};
#if QG_HAVE_BF16
    if (isa == QG_AVX512_BF16 && fmt == QG_BF16 && dyn) return qg_bf16d_512;
#endif
    if (isa >= QG_AVX512) return k512[v];
    if (isa == QG_AVX2) return k2[v];
#endif
    static const qg_kernel k0[4] = {qg_f32_base, qg_bf16_base, qg_i8w_base, qg_i8d_base};
    return k0[v];
}

#endif
