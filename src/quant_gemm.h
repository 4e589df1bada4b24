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
 * read it as one register (vdpbf16ps takes pairs, vpdpbusd quads in a lane).
 *
 * A rows are *prepared* first (qg_prepare, once per row and call) into what
 * the kernel reads, zero-padded to Kp:
 *
 *   QG_A_FLOAT  float[Kp]                       float32 weights; bf16 weights on
 *                                               AVX2/baseline; int8 weight-only
 *   QG_A_BF16X2 uint32[Kp/2] hi, then uint32[Kp/2] lo: a = hi + lo, both bf16
 *               pairs (k even in the low half)   bf16 weights on AVX-512 (vdpbf16ps
 *                                               on hi and on lo: ~16 bits of a)
 *   QG_A_Q8S    int8[Kp] q = rint(a * 127/max|a|), as = max|a|/127
 *                                               int8 dynamic on AVX2/baseline
 *   QG_A_Q8U    uint8[Kp] q + 128                int8 dynamic with VNNI
 *
 * Results (written, not accumulated, into C[i][0..15]):
 *   float32 / bfloat16: the float32 sum, k in order (FMA where the ISA has it)
 *   int8 weight-only:   ws[j] * sum_k a[k] w8[j][k]   (float32 sum)
 *   int8 dynamic:       (float)(sum_k q[k] w8[j][k]) * (ws[j] * as[i]); the integer
 *                       sum is exact, so every ISA gives bitwise the same numbers.
 *                       VNNI computes sum (q+128) w and subtracts wz[j] = 128 sum w.
 *
 * ISA: no -march flags. Each kernel exists as plain C (baseline), AVX2+FMA and
 * AVX-512 (F, BW, VL, BF16, VNNI) functions with GCC target attributes; the
 * caller picks a level (qg_cpu_level() is the best this CPU has).
 */
#ifndef FASTRNN_QUANT_GEMM_H
#define FASTRNN_QUANT_GEMM_H

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

enum { QG_F32 = 0, QG_BF16 = 1, QG_I8 = 2 };
enum { QG_BASELINE = 0, QG_AVX2 = 1, QG_AVX512 = 2 };
enum { QG_A_FLOAT = 0, QG_A_BF16X2 = 1, QG_A_Q8S = 2, QG_A_Q8U = 3 };

#define QG_NR 16
#define QG_MR 4
#define QG_INLINE static inline __attribute__((always_inline))

static inline ptrdiff_t qg_round4(ptrdiff_t k) { return (k + 3) & ~(ptrdiff_t)3; }

/* Bytes of one packed panel (16 rows, Kp = qg_round4(K)). */
static inline size_t qg_panel_bytes(int fmt, ptrdiff_t Kp)
{
    return (size_t)Kp * (fmt == QG_F32 ? 64 : fmt == QG_BF16 ? 32 : 16);
}

/* Bytes of one prepared A row (the largest kind). */
static inline size_t qg_row_bytes(ptrdiff_t Kp) { return (size_t)Kp * 4; }

static inline int qg_a_kind(int fmt, int isa, int dyn)
{
    if (fmt == QG_BF16 && isa == QG_AVX512) return QG_A_BF16X2;
    if (fmt == QG_I8 && dyn) return isa == QG_AVX512 ? QG_A_Q8U : QG_A_Q8S;
    return QG_A_FLOAT;
}

/* Best level this CPU runs: 2 needs AVX-512 F/BW/VL/BF16/VNNI, 1 AVX2+FMA. */
static int qg_cpu_level(void)
{
#if QG_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16")
        && __builtin_cpu_supports("avx512vnni"))
        return QG_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return QG_AVX2;
#endif
    return QG_BASELINE;
}

/* float -> bf16 bits, round to nearest even (finite inputs). */
static inline uint32_t qg_bf16_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
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

/* Prepare one A row of K values into `out` (kind above), padded to Kp. */
static void qg_prepare(int kind, const float *a, ptrdiff_t K, ptrdiff_t Kp, void *out,
                       float *ascale)
{
    ptrdiff_t k;
    if (kind == QG_A_FLOAT) {
        float *o = (float *)out;
        if (a) memcpy(o, a, (size_t)K * sizeof(float)); else memset(o, 0, (size_t)K * 4);
        for (k = K; k < Kp; ++k) o[k] = 0.0f;
    } else if (kind == QG_A_BF16X2) {
        uint32_t *hi = (uint32_t *)out, *lo = hi + Kp / 2;
        for (k = 0; k < Kp; k += 2) {
            float a0 = (a && k < K) ? a[k] : 0.0f, a1 = (a && k + 1 < K) ? a[k + 1] : 0.0f;
            uint32_t h0 = qg_bf16_bits(a0), h1 = qg_bf16_bits(a1);
            uint32_t l0 = qg_bf16_bits(a0 - qg_bf16_float(h0));
            uint32_t l1 = qg_bf16_bits(a1 - qg_bf16_float(h1));
            hi[k / 2] = h0 | (h1 << 16);
            lo[k / 2] = l0 | (l1 << 16);
        }
    } else {
        float amax = 0.0f;
        for (k = 0; a && k < K; ++k) {
            float v = fabsf(a[k]);
            amax = v > amax ? v : amax;
        }
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        *ascale = amax > 0.0f ? amax / 127.0f : 0.0f;
        int off = kind == QG_A_Q8U ? 128 : 0;
        unsigned char *o = (unsigned char *)out;
        for (k = 0; k < Kp; ++k) {
            float q = (a && k < K) ? rintf(a[k] * inv) : 0.0f;
            q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
            o[k] = (unsigned char)(int)((int)q + off);
        }
    }
}

/* Kernel signature shared by every (format, ISA) pair. */
typedef void (*qg_kernel)(int m, ptrdiff_t Kp, const void *const *A, const void *panel,
                          float *const *C, const float *ws, const int32_t *wz,
                          const float *as);

/* ------------------------------------------------------------ baseline (plain C) */
static void qg_f32_base(int m, ptrdiff_t Kp, const void *const *A, const void *panel,
                        float *const *C, const float *ws, const int32_t *wz, const float *as)
{
    const float *P = (const float *)panel;
    (void)ws; (void)wz; (void)as;
    for (int i = 0; i < m; ++i) {
        const float *a = (const float *)A[i];
        float acc[QG_NR] = {0};
        for (ptrdiff_t k = 0; k < Kp; ++k)
            for (int j = 0; j < QG_NR; ++j) acc[j] += a[k] * P[k * QG_NR + j];
        memcpy(C[i], acc, sizeof acc);
    }
}

static void qg_bf16_base(int m, ptrdiff_t Kp, const void *const *A, const void *panel,
                         float *const *C, const float *ws, const int32_t *wz, const float *as)
{
    const uint16_t *P = (const uint16_t *)panel;
    (void)ws; (void)wz; (void)as;
    for (int i = 0; i < m; ++i) {
        const float *a = (const float *)A[i];
        float acc[QG_NR] = {0};
        for (ptrdiff_t k = 0; k < Kp; k += 2)
            for (int j = 0; j < QG_NR; ++j) {
                acc[j] += a[k] * qg_bf16_float(P[(k / 2) * 32 + 2 * j]);
                acc[j] += a[k + 1] * qg_bf16_float(P[(k / 2) * 32 + 2 * j + 1]);
            }
        memcpy(C[i], acc, sizeof acc);
    }
}

static void qg_i8w_base(int m, ptrdiff_t Kp, const void *const *A, const void *panel,
                        float *const *C, const float *ws, const int32_t *wz, const float *as)
{
    const int8_t *P = (const int8_t *)panel;
    (void)wz; (void)as;
    for (int i = 0; i < m; ++i) {
        const float *a = (const float *)A[i];
        float acc[QG_NR] = {0};
        for (ptrdiff_t k = 0; k < Kp; k += 4)
            for (int q = 0; q < 4; ++q)
                for (int j = 0; j < QG_NR; ++j)
                    acc[j] += a[k + q] * (float)P[(k / 4) * 64 + 4 * j + q];
        for (int j = 0; j < QG_NR; ++j) C[i][j] = acc[j] * ws[j];
    }
}

static void qg_i8d_base(int m, ptrdiff_t Kp, const void *const *A, const void *panel,
                        float *const *C, const float *ws, const int32_t *wz, const float *as)
{
    const int8_t *P = (const int8_t *)panel;
    (void)wz;
    for (int i = 0; i < m; ++i) {
        const int8_t *a = (const int8_t *)A[i];
        int32_t acc[QG_NR] = {0};
        for (ptrdiff_t k = 0; k < Kp; k += 4)
            for (int j = 0; j < QG_NR; ++j)
                for (int q = 0; q < 4; ++q)
                    acc[j] += (int32_t)a[k + q] * (int32_t)P[(k / 4) * 64 + 4 * j + q];
        for (int j = 0; j < QG_NR; ++j) C[i][j] = (float)acc[j] * (ws[j] * as[i]);
    }
}

#if QG_X86
/* ------------------------------------------------------------ AVX2 + FMA */
#define QG_AVX2_T __attribute__((target("avx2,fma")))
#define QG_M_SWITCH(BODY, ...)                                                   \
    switch (m) {                                                                 \
    case 1: BODY(1, __VA_ARGS__); break;                                         \
    case 2: BODY(2, __VA_ARGS__); break;                                         \
    case 3: BODY(3, __VA_ARGS__); break;                                         \
    default: BODY(4, __VA_ARGS__); break;                                        \
    }

QG_INLINE QG_AVX2_T void qg_f32_avx2_m(const int M, ptrdiff_t Kp, const void *const *A,
                                       const float *P, float *const *C)
{
    __m256 acc[QG_MR][2];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (ptrdiff_t k = 0; k < Kp; ++k) {
        __m256 w0 = _mm256_loadu_ps(P + k * 16), w1 = _mm256_loadu_ps(P + k * 16 + 8);
        for (int i = 0; i < M; ++i) {
            __m256 a = _mm256_broadcast_ss((const float *)A[i] + k);
            acc[i][0] = _mm256_fmadd_ps(a, w0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(a, w1, acc[i][1]);
        }
    }
    for (int i = 0; i < M; ++i) {
        _mm256_storeu_ps(C[i], acc[i][0]);
        _mm256_storeu_ps(C[i] + 8, acc[i][1]);
    }
}
#define QG_F32_AVX2(MM, ...) qg_f32_avx2_m(MM, __VA_ARGS__)
static QG_AVX2_T void qg_f32_avx2(int m, ptrdiff_t Kp, const void *const *A, const void *panel,
                                  float *const *C, const float *ws, const int32_t *wz,
                                  const float *as)
{
    (void)ws; (void)wz; (void)as;
    QG_M_SWITCH(QG_F32_AVX2, Kp, A, (const float *)panel, C)
}

QG_INLINE QG_AVX2_T void qg_bf16_avx2_m(const int M, ptrdiff_t Kp, const void *const *A,
                                        const uint32_t *P, float *const *C)
{
    const __m256i himask = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc[QG_MR][2];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (ptrdiff_t k = 0; k < Kp; k += 2) {
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(P + k * 8));
        __m256i v1 = _mm256_loadu_si256((const __m256i *)(P + k * 8 + 8));
        __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
        __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, himask));
        __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
        __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, himask));
        for (int i = 0; i < M; ++i) {
            __m256 ae = _mm256_broadcast_ss((const float *)A[i] + k);
            __m256 ao = _mm256_broadcast_ss((const float *)A[i] + k + 1);
            acc[i][0] = _mm256_fmadd_ps(ae, e0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(ae, e1, acc[i][1]);
            acc[i][0] = _mm256_fmadd_ps(ao, o0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(ao, o1, acc[i][1]);
        }
    }
    for (int i = 0; i < M; ++i) {
        _mm256_storeu_ps(C[i], acc[i][0]);
        _mm256_storeu_ps(C[i] + 8, acc[i][1]);
    }
}
#define QG_BF16_AVX2(MM, ...) qg_bf16_avx2_m(MM, __VA_ARGS__)
static QG_AVX2_T void qg_bf16_avx2(int m, ptrdiff_t Kp, const void *const *A, const void *panel,
                                   float *const *C, const float *ws, const int32_t *wz,
                                   const float *as)
{
    (void)ws; (void)wz; (void)as;
    QG_M_SWITCH(QG_BF16_AVX2, Kp, A, (const uint32_t *)panel, C)
}

/* byte q of every 32-bit lane, sign-extended, as float */
#define QG_AVX2_BYTE(v, q) _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * (q)), 24))

QG_INLINE QG_AVX2_T void qg_i8w_avx2_m(const int M, ptrdiff_t Kp, const void *const *A,
                                       const int8_t *P, float *const *C, const float *ws)
{
    __m256 acc[QG_MR][2];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (ptrdiff_t k = 0; k < Kp; k += 4) {
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(P + k * 16));
        __m256i v1 = _mm256_loadu_si256((const __m256i *)(P + k * 16 + 32));
#define QG_I8W_Q(q)                                                                  \
        {                                                                            \
            __m256 w0 = QG_AVX2_BYTE(v0, q), w1 = QG_AVX2_BYTE(v1, q);               \
            for (int i = 0; i < M; ++i) {                                            \
                __m256 a = _mm256_broadcast_ss((const float *)A[i] + k + (q));       \
                acc[i][0] = _mm256_fmadd_ps(a, w0, acc[i][0]);                       \
                acc[i][1] = _mm256_fmadd_ps(a, w1, acc[i][1]);                       \
            }                                                                        \
        }
        QG_I8W_Q(0) QG_I8W_Q(1) QG_I8W_Q(2) QG_I8W_Q(3)
#undef QG_I8W_Q
    }
    __m256 s0 = _mm256_loadu_ps(ws), s1 = _mm256_loadu_ps(ws + 8);
    for (int i = 0; i < M; ++i) {
        _mm256_storeu_ps(C[i], _mm256_mul_ps(acc[i][0], s0));
        _mm256_storeu_ps(C[i] + 8, _mm256_mul_ps(acc[i][1], s1));
    }
}
#define QG_I8W_AVX2(MM, ...) qg_i8w_avx2_m(MM, __VA_ARGS__)
static QG_AVX2_T void qg_i8w_avx2(int m, ptrdiff_t Kp, const void *const *A, const void *panel,
                                  float *const *C, const float *ws, const int32_t *wz,
                                  const float *as)
{
    (void)wz; (void)as;
    QG_M_SWITCH(QG_I8W_AVX2, Kp, A, (const int8_t *)panel, C, ws)
}

/* int8 x int8 quads on AVX2: even and odd bytes as int16, two vpmaddwd. */
QG_INLINE QG_AVX2_T void qg_i8d_avx2_m(const int M, ptrdiff_t Kp, const void *const *A,
                                       const int8_t *P, float *const *C, const float *ws,
                                       const float *as)
{
    __m256i acc[QG_MR][2];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    for (ptrdiff_t k = 0; k < Kp; k += 4) {
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(P + k * 16));
        __m256i v1 = _mm256_loadu_si256((const __m256i *)(P + k * 16 + 32));
        __m256i e0 = _mm256_srai_epi16(_mm256_slli_epi16(v0, 8), 8), o0 = _mm256_srai_epi16(v0, 8);
        __m256i e1 = _mm256_srai_epi16(_mm256_slli_epi16(v1, 8), 8), o1 = _mm256_srai_epi16(v1, 8);
        for (int i = 0; i < M; ++i) {
            int32_t quad;
            memcpy(&quad, (const int8_t *)A[i] + k, 4);
            __m256i a = _mm256_set1_epi32(quad);
            __m256i ae = _mm256_srai_epi16(_mm256_slli_epi16(a, 8), 8);
            __m256i ao = _mm256_srai_epi16(a, 8);
            acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_add_epi32(
                _mm256_madd_epi16(ae, e0), _mm256_madd_epi16(ao, o0)));
            acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_add_epi32(
                _mm256_madd_epi16(ae, e1), _mm256_madd_epi16(ao, o1)));
        }
    }
    __m256 s0 = _mm256_loadu_ps(ws), s1 = _mm256_loadu_ps(ws + 8);
    for (int i = 0; i < M; ++i) {
        __m256 sa = _mm256_set1_ps(as[i]);
        _mm256_storeu_ps(C[i], _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][0]), _mm256_mul_ps(s0, sa)));
        _mm256_storeu_ps(C[i] + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][1]), _mm256_mul_ps(s1, sa)));
    }
}
#define QG_I8D_AVX2(MM, ...) qg_i8d_avx2_m(MM, __VA_ARGS__)
static QG_AVX2_T void qg_i8d_avx2(int m, ptrdiff_t Kp, const void *const *A, const void *panel,
                                  float *const *C, const float *ws, const int32_t *wz,
                                  const float *as)
{
    (void)wz;
    QG_M_SWITCH(QG_I8D_AVX2, Kp, A, (const int8_t *)panel, C, ws, as)
}

/* ------------------------------------------------------------ AVX-512 (F BW VL BF16 VNNI) */
#define QG_512_T __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx2,fma")))

QG_INLINE QG_512_T void qg_f32_512_m(const int M, ptrdiff_t Kp, const void *const *A,
                                     const float *P, float *const *C)
{
    __m512 acc[QG_MR];
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    for (ptrdiff_t k = 0; k < Kp; ++k) {
        __m512 w = _mm512_loadu_ps(P + k * 16);
        for (int i = 0; i < M; ++i)
            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(((const float *)A[i])[k]), w, acc[i]);
    }
    for (int i = 0; i < M; ++i) _mm512_storeu_ps(C[i], acc[i]);
}
#define QG_F32_512(MM, ...) qg_f32_512_m(MM, __VA_ARGS__)
static QG_512_T void qg_f32_512(int m, ptrdiff_t Kp, const void *const *A, const void *panel,
                                float *const *C, const float *ws, const int32_t *wz,
                                const float *as)
{
    (void)ws; (void)wz; (void)as;
    QG_M_SWITCH(QG_F32_512, Kp, A, (const float *)panel, C)
}

/* a = hi + lo (both bf16): two vdpbf16ps per pair of k keep ~16 bits of a. */
QG_INLINE QG_512_T void qg_bf16_512_m(const int M, ptrdiff_t Kp, const void *const *A,
                                      const uint32_t *P, float *const *C)
{
    __m512 acc[QG_MR];
    const ptrdiff_t K2 = Kp / 2;
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    for (ptrdiff_t k2 = 0; k2 < K2; ++k2) {
        __m512i w = _mm512_loadu_si512((const void *)(P + k2 * 16));
        for (int i = 0; i < M; ++i) {
            const uint32_t *a = (const uint32_t *)A[i];
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32((int)a[k2]), (__m512bh)w);
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32((int)a[K2 + k2]), (__m512bh)w);
        }
    }
    for (int i = 0; i < M; ++i) _mm512_storeu_ps(C[i], acc[i]);
}
#define QG_BF16_512(MM, ...) qg_bf16_512_m(MM, __VA_ARGS__)
static QG_512_T void qg_bf16_512(int m, ptrdiff_t Kp, const void *const *A, const void *panel,
                                 float *const *C, const float *ws, const int32_t *wz,
                                 const float *as)
{
    (void)ws; (void)wz; (void)as;
    QG_M_SWITCH(QG_BF16_512, Kp, A, (const uint32_t *)panel, C)
}

#define QG_512_BYTE(v, q) _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * (q)), 24))

QG_INLINE QG_512_T void qg_i8w_512_m(const int M, ptrdiff_t Kp, const void *const *A,
                                     const int8_t *P, float *const *C, const float *ws)
{
    __m512 acc[QG_MR];
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    for (ptrdiff_t k = 0; k < Kp; k += 4) {
        __m512i v = _mm512_loadu_si512((const void *)(P + k * 16));
        __m512 w0 = QG_512_BYTE(v, 0), w1 = QG_512_BYTE(v, 1);
        __m512 w2 = QG_512_BYTE(v, 2), w3 = QG_512_BYTE(v, 3);
        for (int i = 0; i < M; ++i) {
            const float *a = (const float *)A[i] + k;
            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[0]), w0, acc[i]);
            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[1]), w1, acc[i]);
            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[2]), w2, acc[i]);
            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[3]), w3, acc[i]);
        }
    }
    __m512 s = _mm512_loadu_ps(ws);
    for (int i = 0; i < M; ++i) _mm512_storeu_ps(C[i], _mm512_mul_ps(acc[i], s));
}
#define QG_I8W_512(MM, ...) qg_i8w_512_m(MM, __VA_ARGS__)
static QG_512_T void qg_i8w_512(int m, ptrdiff_t Kp, const void *const *A, const void *panel,
                                float *const *C, const float *ws, const int32_t *wz,
                                const float *as)
{
    (void)wz; (void)as;
    QG_M_SWITCH(QG_I8W_512, Kp, A, (const int8_t *)panel, C, ws)
}

/* vpdpbusd: u8 (q + 128) x s8 quads; wz[j] = 128 sum_k w[j][k] removes the offset. */
QG_INLINE QG_512_T void qg_i8d_512_m(const int M, ptrdiff_t Kp, const void *const *A,
                                     const int8_t *P, float *const *C, const float *ws,
                                     const int32_t *wz, const float *as)
{
    __m512i acc[QG_MR];
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_si512();
    for (ptrdiff_t k = 0; k < Kp; k += 4) {
        __m512i v = _mm512_loadu_si512((const void *)(P + k * 16));
        for (int i = 0; i < M; ++i) {
            int32_t quad;
            memcpy(&quad, (const uint8_t *)A[i] + k, 4);
            acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_set1_epi32(quad), v);
        }
    }
    __m512 s = _mm512_loadu_ps(ws);
    __m512i z = _mm512_loadu_si512((const void *)wz);
    for (int i = 0; i < M; ++i) {
        __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i], z));
        _mm512_storeu_ps(C[i], _mm512_mul_ps(f, _mm512_mul_ps(s, _mm512_set1_ps(as[i]))));
    }
}
#define QG_I8D_512(MM, ...) qg_i8d_512_m(MM, __VA_ARGS__)
static QG_512_T void qg_i8d_512(int m, ptrdiff_t Kp, const void *const *A, const void *panel,
                                float *const *C, const float *ws, const int32_t *wz,
                                const float *as)
{
    QG_M_SWITCH(QG_I8D_512, Kp, A, (const int8_t *)panel, C, ws, wz, as)
}
#endif /* QG_X86 */

/* The kernel for (isa, fmt, dynamic int8). */
static qg_kernel qg_pick(int isa, int fmt, int dyn)
{
    int v = fmt == QG_F32 ? 0 : fmt == QG_BF16 ? 1 : dyn ? 3 : 2;
#if QG_X86
    static const qg_kernel k512[4] = {qg_f32_512, qg_bf16_512, qg_i8w_512, qg_i8d_512};
    static const qg_kernel k2[4] = {qg_f32_avx2, qg_bf16_avx2, qg_i8w_avx2, qg_i8d_avx2};
    if (isa == QG_AVX512) return k512[v];
    if (isa == QG_AVX2) return k2[v];
#endif
    static const qg_kernel k0[4] = {qg_f32_base, qg_bf16_base, qg_i8w_base, qg_i8d_base};
    return k0[v];
}

#endif
