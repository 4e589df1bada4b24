/* bf16_gemm.h: the recurrence driver's GEMMs with bf16 operands and float32 sums.
 *
 * Under fastrnn.set_float32_matmul_precision("medium") (PyTorch's name for "a
 * float32 product may round its inputs to bf16"), float32 layers run every GEMM
 * of the driver as
 *
 *     C := beta*C + bf16(A) . bf16(W)^T        products exact, sums in float32
 *
 * On a CPU with AVX512-BF16 each pair of k is one vdpbf16ps: 32 multiply-adds
 * per instruction against an FMA's 16. On AMD Zen 4 it issues at the FMA rate,
 * so the products run at twice the float32 rate (a 12-chain throughput loop on
 * one core of the Zen 4 EPYC: 117 GFLOP/s FMA, 235 GFLOP/s vdpbf16ps). Elsewhere
 * the same numbers (up to the order of the float32 sums) come from widening the
 * bf16 values in registers: correct, but no faster than float32.
 *
 * The layout and the micro-kernels are the quantised inference path's
 * (quant_gemm.h): W packed in panels of 16 output rows with each pair of k
 * adjacent, P[k/2][j][k%2], K padded to a multiple of 4; A rows rounded once per
 * call into `work` (bf16 pairs for vdpbf16ps, bf16-valued floats for widening).
 * With Intel AMX tiles (amx_bf16.h) the same layout is the tiles' operand, K
 * padded to a multiple of 32 and the rounded rows to a multiple of 16
 * (fastrnn_bf16_kp, fastrnn_bf16_rows_kept): every size here goes through them.
 */
#ifndef FASTRNN_BF16_GEMM_H
#define FASTRNN_BF16_GEMM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "isa.h"
#include "quant_gemm.h"
#include "amx_bf16.h"

#define FASTRNN_BF16_NR QG_NR   /* output rows per packed panel */

/* The quant_gemm.h level the bf16 GEMMs run at: vdpbf16ps when the float
 * kernels run at AVX-512 and the CPU has AVX512-BF16; else the widening kernel
 * at the float kernels' level (never above what the CPU runs: the quantised
 * AVX-512 kernels also need VNNI). */
static inline int fastrnn_bf16_level(void)
{
    int f = fastrnn_isa_level(), c = qg_cpu_level();
    if (f == FASTRNN_ISA_AVX512 && c == QG_AVX512_BF16) return QG_AVX512_BF16;
    if (c == QG_AVX512_BF16) c = QG_AVX512;
    return f < c ? f : c;
}

/* Do the GEMMs run on AMX tiles (amx_bf16.h)? Where the float kernels run at
 * AVX-512 on a CPU with AVX512-BF16 and AMX-BF16 that this process may use. */
static inline int fastrnn_bf16_amx(void)
{
    return fastrnn_bf16_level() == QG_AVX512_BF16 && fastrnn_amx_usable();
}

/* K as packed and prepared: a multiple of 4, or of 32 for whole AMX tiles. */
static inline ptrdiff_t fastrnn_bf16_kp(ptrdiff_t K)
{
    return fastrnn_bf16_amx() ? (K + FASTRNN_AMX_K - 1) & ~(ptrdiff_t)(FASTRNN_AMX_K - 1)
                              : qg_round4(K);
}

/* Rows `work` holds for M rows of A: AMX reads whole 16-row tiles (zeros past M). */
static inline ptrdiff_t fastrnn_bf16_rows_kept(ptrdiff_t M)
{
    return fastrnn_bf16_amx() ? (M + FASTRNN_AMX_ROWS - 1) & ~(ptrdiff_t)(FASTRNN_AMX_ROWS - 1)
                              : M;
}

/* Bytes of the packed copy of an N x K matrix. */
static inline size_t fastrnn_bf16_packed_bytes(ptrdiff_t N, ptrdiff_t K)
{
    const size_t panels = (size_t)((N + FASTRNN_BF16_NR - 1) / FASTRNN_BF16_NR);
    return panels * qg_panel_bytes(QG_BF16, fastrnn_bf16_kp(K));
}

/* uint16 values from one panel to the next. */
static inline ptrdiff_t fastrnn_bf16_panel_values(ptrdiff_t K)
{
    return (ptrdiff_t)(qg_panel_bytes(QG_BF16, fastrnn_bf16_kp(K)) / sizeof(uint16_t));
}

/* float32 bits -> bf16 bits, nearest even, NaN kept quiet: qg_bf16_bits without
 * the branch, so that the packing loops vectorise. */
static inline uint32_t fastrnn_bf16_round(uint32_t u)
{
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (u >> 16) | 0x40u : r;
}

static inline uint32_t fastrnn_bf16_bits_of(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    return fastrnn_bf16_round(u);
}

/* packed := panels [p0, p1) of the N x K matrix whose element (n, k) is rows[n][k],
 * or rows[k][n] when `transposed` (W^T for backward's dh = da W; x^T, h^T for dW).
 * Each 32-bit word of a panel is the pair (k even low, k odd high) of one row. */
FASTRNN_MULTIVERSION(fastrnn_bf16_pack_kp,
    (uint16_t *packed, const float *const *rows, ptrdiff_t N, ptrdiff_t K, ptrdiff_t Kp,
     int transposed, ptrdiff_t p0, ptrdiff_t p1),
    (packed, rows, N, K, Kp, transposed, p0, p1),
{
    const ptrdiff_t NR = FASTRNN_BF16_NR;
    for (ptrdiff_t p = p0; p < p1; ++p) {
        uint32_t *P = (uint32_t *)(packed + p * NR * Kp);
        const ptrdiff_t n0 = p * NR, nj = N - n0 < NR ? N - n0 : NR;
        if (transposed) {
            for (ptrdiff_t k = 0; k < Kp; k += 2) {
                uint32_t *dst = P + (k / 2) * NR;
                const float *lo = k < K ? rows[k] + n0 : NULL;
                const float *hi = k + 1 < K ? rows[k + 1] + n0 : NULL;
                if (lo && hi && nj == NR) {
                    _Pragma("omp simd")
                    for (ptrdiff_t j = 0; j < NR; ++j)
                        dst[j] = fastrnn_bf16_bits_of(lo[j]) | fastrnn_bf16_bits_of(hi[j]) << 16;
                } else {
                    for (ptrdiff_t j = 0; j < NR; ++j)
                        dst[j] = (lo && j < nj ? fastrnn_bf16_bits_of(lo[j]) : 0u)
                               | (hi && j < nj ? fastrnn_bf16_bits_of(hi[j]) : 0u) << 16;
                }
            }
        } else {
            for (ptrdiff_t j = 0; j < NR; ++j) {
                const float *row = j < nj ? rows[n0 + j] : NULL;
                ptrdiff_t k = 0;
                if (row) {
                    for (; k + 1 < K; k += 2)
                        P[(k / 2) * NR + j] = fastrnn_bf16_bits_of(row[k])
                                            | fastrnn_bf16_bits_of(row[k + 1]) << 16;
                    if (k < K) {
                        P[(k / 2) * NR + j] = fastrnn_bf16_bits_of(row[k]);
                        k += 2;
                    }
                }
                for (; k < Kp; k += 2) P[(k / 2) * NR + j] = 0u;
            }
        }
    }
})

static inline void fastrnn_bf16_pack(uint16_t *packed, const float *const *rows, ptrdiff_t N,
                                     ptrdiff_t K, int transposed, ptrdiff_t p0, ptrdiff_t p1)
{
    fastrnn_bf16_pack_kp(packed, rows, N, K, fastrnn_bf16_kp(K), transposed, p0, p1);
}

/* Bytes of `work` that the prepare functions need for M rows of K values. */
static inline size_t fastrnn_bf16_work_bytes(ptrdiff_t M, ptrdiff_t K)
{
    return (size_t)fastrnn_bf16_rows_kept(M) * (sizeof(void *) + qg_row_bytes(fastrnn_bf16_kp(K)))
        + 64;
}

/* Where `work` keeps the M row pointers and the rows they point to. */
static inline const void **fastrnn_bf16_rows_in(void *work, ptrdiff_t M, ptrdiff_t K,
                                                 unsigned char **prep, size_t *rb)
{
    *rb = qg_row_bytes(fastrnn_bf16_kp(K));
    *prep = (unsigned char *)work + (((size_t)M * sizeof(void *) + 63) & ~(size_t)63);
    return (const void **)work;
}

/* A[i] (K values) rounded for the kernels of this level, for i < M: returns the
 * M prepared rows, kept in `work` (fastrnn_bf16_work_bytes(M, K)). */
static const void *const *fastrnn_bf16_prepare_rows(ptrdiff_t M, ptrdiff_t K, const float *const *A,
                                                    void *work)
{
    const int level = fastrnn_bf16_level(), kind = qg_a_kind(QG_BF16, level, 1);
    const ptrdiff_t Kp = fastrnn_bf16_kp(K);
    unsigned char *prep;
    size_t rb;
    const void **arow = fastrnn_bf16_rows_in(work, M, K, &prep, &rb);
    float ascale;
    for (ptrdiff_t i = 0; i < M; ++i) {
        qg_prepare(level, kind, A[i], K, Kp, prep + (size_t)i * rb, &ascale);
        arow[i] = prep + (size_t)i * rb;
    }
    memset(prep + (size_t)M * rb, 0, (size_t)(fastrnn_bf16_rows_kept(M) - M) * rb);
    return arow;
}

/* The same for the columns col0 .. col0+M-1 of the K x (col0+M) matrix with rows
 * cols[k]: row i of A is cols[k][col0 + i] over k (backward's dW = da^T x reads
 * da by columns). Pairs of k are rounded 16 columns at a time, then scattered. */
FASTRNN_MULTIVERSION(fastrnn_bf16_cols_pairs,
    (ptrdiff_t M, ptrdiff_t K, ptrdiff_t Kp, ptrdiff_t k0, const float *const *cols,
     ptrdiff_t col0, unsigned char *prep, size_t rb, int as_float),
    (M, K, Kp, k0, cols, col0, prep, rb, as_float),
{
    for (ptrdiff_t k = k0; k < Kp; k += 2) {
        const float *lo = k < K ? cols[k] + col0 : NULL;
        const float *hi = k + 1 < K ? cols[k + 1] + col0 : NULL;
        for (ptrdiff_t i0 = 0; i0 < M; i0 += 16) {
            const ptrdiff_t n = M - i0 < 16 ? M - i0 : 16;
            uint32_t a[16], b[16];
            if (lo && hi && n == 16) {
                _Pragma("omp simd")
                for (int i = 0; i < 16; ++i) {
                    a[i] = fastrnn_bf16_bits_of(lo[i0 + i]);
                    b[i] = fastrnn_bf16_bits_of(hi[i0 + i]);
                }
            } else {
                for (int i = 0; i < 16; ++i) {
                    a[i] = lo && i < n ? fastrnn_bf16_bits_of(lo[i0 + i]) : 0u;
                    b[i] = hi && i < n ? fastrnn_bf16_bits_of(hi[i0 + i]) : 0u;
                }
            }
            for (ptrdiff_t i = 0; i < n; ++i) {
                unsigned char *row = prep + (size_t)(i0 + i) * rb;
                if (as_float) {
                    uint32_t w[2] = {a[i] << 16, b[i] << 16};
                    memcpy(row + (size_t)k * 4, w, 8);
                } else {
                    uint32_t w = a[i] | b[i] << 16;
                    memcpy(row + (size_t)k * 2, &w, 4);
                }
            }
        }
    }
})

#if FASTRNN_HAVE_DISPATCH
/* fastrnn_bf16_cols_pairs for bf16 pairs (not as floats) at AVX-512, whole blocks of
 * 16 columns x 32 k: the 16 pair vectors (lane = column) are transposed in
 * registers into 16 rows of 16 pairs and stored 64 bytes at a time. The scalar
 * loop scattered one 4-byte pair per column and k: 11 % of an LSTM "medium"
 * training step on AMX (perf). Returns the first k it left (a multiple of 32);
 * the caller does the rest of k, and the columns past whole blocks, as before. */
FASTRNN_TARGET_AVX512 static ptrdiff_t fastrnn_bf16_cols_pairs_512(
    ptrdiff_t M, ptrdiff_t K, const float *const *cols, ptrdiff_t col0, unsigned char *prep,
    size_t rb)
{
    const ptrdiff_t K32 = K & ~(ptrdiff_t)31, M16 = M & ~(ptrdiff_t)15;
    for (ptrdiff_t k = 0; k < K32; k += 32)
        for (ptrdiff_t i0 = 0; i0 < M16; i0 += 16) {
            __m512i r[16], t[16];
            for (int p = 0; p < 16; ++p) {
                __m512i lo = qg_bf16_round_512(_mm512_loadu_si512(cols[k + 2 * p] + col0 + i0));
                __m512i hi = qg_bf16_round_512(_mm512_loadu_si512(cols[k + 2 * p + 1] + col0 + i0));
                r[p] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));   /* lane i: pair p of column i */
            }
            /* 16 x 16 transpose of 32-bit lanes: r[p][i] -> r[i][p] */
            for (int p = 0; p < 16; p += 2) {
                t[p] = _mm512_unpacklo_epi32(r[p], r[p + 1]);
                t[p + 1] = _mm512_unpackhi_epi32(r[p], r[p + 1]);
            }
            for (int p = 0; p < 16; p += 4) {
                r[p] = _mm512_unpacklo_epi64(t[p], t[p + 2]);
                r[p + 1] = _mm512_unpackhi_epi64(t[p], t[p + 2]);
                r[p + 2] = _mm512_unpacklo_epi64(t[p + 1], t[p + 3]);
                r[p + 3] = _mm512_unpackhi_epi64(t[p + 1], t[p + 3]);
            }
            for (int p = 0; p < 4; ++p) {
                t[p] = _mm512_shuffle_i32x4(r[p], r[p + 4], 0x88);
                t[p + 4] = _mm512_shuffle_i32x4(r[p], r[p + 4], 0xDD);
                t[p + 8] = _mm512_shuffle_i32x4(r[p + 8], r[p + 12], 0x88);
                t[p + 12] = _mm512_shuffle_i32x4(r[p + 8], r[p + 12], 0xDD);
            }
            for (int p = 0; p < 8; ++p) {
                r[p] = _mm512_shuffle_i32x4(t[p], t[p + 8], 0x88);
                r[p + 8] = _mm512_shuffle_i32x4(t[p], t[p + 8], 0xDD);
            }
            for (int q = 0; q < 16; ++q)   /* r[q]: column i0 + q, pairs k/2 .. k/2 + 15 */
                _mm512_storeu_si512(prep + (size_t)(i0 + q) * rb + (size_t)k * 2, r[q]);
        }
    return K32;
}
#endif

static const void *const *fastrnn_bf16_prepare_cols(ptrdiff_t M, ptrdiff_t K,
                                                    const float *const *cols, ptrdiff_t col0,
                                                    void *work)
{
    const int level = fastrnn_bf16_level(), kind = qg_a_kind(QG_BF16, level, 1);
    unsigned char *prep;
    size_t rb;
    const void **arow = fastrnn_bf16_rows_in(work, M, K, &prep, &rb);
    const ptrdiff_t Kp = fastrnn_bf16_kp(K);
    ptrdiff_t k0 = 0, m16 = 0;   /* k and columns done by the transposing kernel */
#if FASTRNN_HAVE_DISPATCH
    if (kind == QG_A_BF16 && fastrnn_isa_level() == FASTRNN_ISA_AVX512) {
        k0 = fastrnn_bf16_cols_pairs_512(M, K, cols, col0, prep, rb);
        m16 = k0 > 0 ? M & ~(ptrdiff_t)15 : 0;
    }
#endif
    /* the rest, as pairs one at a time: columns past whole blocks for every k, and
     * the whole blocks' k past k0 */
    fastrnn_bf16_cols_pairs(M - m16, K, Kp, 0, cols, col0 + m16, prep + (size_t)m16 * rb, rb,
                            kind == QG_A_BF16F);
    if (m16 > 0)
        fastrnn_bf16_cols_pairs(m16, K, Kp, k0, cols, col0, prep, rb, kind == QG_A_BF16F);
    for (ptrdiff_t i = 0; i < M; ++i) arow[i] = prep + (size_t)i * rb;
    memset(prep + (size_t)M * rb, 0, (size_t)(fastrnn_bf16_rows_kept(M) - M) * rb);
    return arow;
}

/* C[i] := beta*C[i] + A[i] . bf16(W)^T for i < M, A's rows prepared above (K
 * values), W (N x K) packed by fastrnn_bf16_pack. Panels outermost, in groups
 * of QG_NP: a group stays in cache while every row tile reads it. The kernel
 * writes a register tile into `tile`; adding it into C here keeps quant_gemm.h's
 * kernels as they are (the copy is ~1/K of the tile's work). Every element is
 * summed by the same instructions whatever M is, so splitting rows over threads
 * does not change a bit. */
static void fastrnn_bf16_gemm_prepared(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,
                                       const void *const *arow, const uint16_t *packed,
                                       float *const *C, float beta)
{
    const ptrdiff_t Kp = fastrnn_bf16_kp(K), NR = FASTRNN_BF16_NR;
    const size_t pb = qg_panel_bytes(QG_BF16, Kp);
#if FASTRNN_HAVE_AMX
    if (fastrnn_bf16_amx()) {   /* the rows are prepare_rows / prepare_cols': rb apart */
        if (M > 0)
            fastrnn_amx_bf16_gemm(M, N, Kp, (const unsigned char *)arow[0],
                                  qg_row_bytes(Kp), packed, pb, C, beta);
        return;
    }
#endif
    const qg_kernel kern = qg_pick(fastrnn_bf16_level(), QG_BF16, 1);
    const ptrdiff_t npan = (N + NR - 1) / NR;
    float tile[QG_MR][QG_NP * QG_NR] __attribute__((aligned(64)));
    float *trow[QG_MR];
    for (int i = 0; i < QG_MR; ++i) trow[i] = tile[i];
    for (ptrdiff_t q0 = 0; q0 < npan; q0 += QG_NP) {
        const int np = (int)(npan - q0 < QG_NP ? npan - q0 : QG_NP);
        const ptrdiff_t j0 = q0 * NR, n = N - j0 < np * NR ? N - j0 : np * NR;
        const unsigned char *panel = (const unsigned char *)packed + (size_t)q0 * pb;
        for (ptrdiff_t i0 = 0; i0 < M; i0 += QG_MR) {
            const int m = (int)(M - i0 < QG_MR ? M - i0 : QG_MR);
            kern(m, np, Kp, arow + i0, panel, pb, trow, NULL, NULL, NULL);
            for (int i = 0; i < m; ++i) {
                float *c = C[i0 + i] + j0;
                const float *t = tile[i];
                if (beta == 0.0f)
                    memcpy(c, t, (size_t)n * sizeof(float));
                else
                    for (ptrdiff_t j = 0; j < n; ++j) c[j] = beta * c[j] + t[j];
            }
        }
    }
}

/* C[i] := beta*C[i] + bf16(A[i]) . bf16(W)^T for i < M (row pointers); `work`:
 * fastrnn_bf16_work_bytes(M, K). */
static void fastrnn_bf16_gemm(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const float *const *A,
                              const uint16_t *packed, float *const *C, float beta, void *work)
{
    if (M <= 0 || N <= 0) return;
    fastrnn_bf16_gemm_prepared(M, N, K, fastrnn_bf16_prepare_rows(M, K, A, work), packed, C, beta);
}

#endif
