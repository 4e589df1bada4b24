/* recurrent_gemm.h: the GEMM inside the time loop, C := A . W^T with W packed once.
 *
 * Why not BLAS: OpenBLAS re-packs its B operand on every call, and inside the
 * time loop that operand (W_hh) never changes. Packing it once per sequence
 * and running a register-blocked micro-kernel over the packed layout is what
 * makes the per-step product fast. Each thread calls this on its own batch
 * rows, single-threaded, inside the caller's OpenMP region.
 *
 * Packed layout of W (N x K, given as row pointers): panels of NR output columns,
 *   packed[p][k][j] = W[p*NR + j][k]   (zero for p*NR + j >= N)
 * so a panel is K contiguous rows of NR values, read once per row tile.
 *
 * Every element of C is sum_k A[i][k] * W[j][k], accumulated in blocks of KC
 * values of k (each from zero, in order, then added to C) by the same
 * instruction sequence whatever tile or row count computed it, so results do
 * not depend on how rows are split across threads (bitwise identical for 1
 * and N threads).
 *
 * Run-time dispatch: target_clones builds an x86-64-v3 (AVX2+FMA) and a
 * baseline version of every kernel; the loader picks one per machine, so a
 * wheel built here runs anywhere. Vectors are 32 bytes (8 floats, 4 doubles).
 */
#ifndef FASTRNN_RECURRENT_GEMM_H
#define FASTRNN_RECURRENT_GEMM_H

#include <stddef.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FASTRNN_NO_DISPATCH)
#define FASTRNN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTRNN_CLONES
#endif

#define FASTRNN_MR 6  /* rows of C per micro-tile */
#ifndef FASTRNN_KC
#define FASTRNN_KC 512  /* K block: a 512 x 16 float panel block is 32 KB, one L1 */
#endif
#ifndef FASTRNN_PREFETCH
#define FASTRNN_PREFETCH 64  /* panel rows (k steps) to prefetch ahead: helps when W_hh streams from L3 */
#endif

typedef float fr_f8 __attribute__((vector_size(32)));
typedef double fr_d4 __attribute__((vector_size(32)));

/* TILE(i0, m, ...) for every MR-row tile of M rows, with m a constant in each
 * call, so the always-inlined tile unrolls its row loops and drops dead rows. */
#define FASTRNN_ROW_TILES(M, TILE, ...)                                            \
    do {                                                                           \
        ptrdiff_t i0_ = 0;                                                         \
        for (; i0_ + FASTRNN_MR <= (M); i0_ += FASTRNN_MR)                         \
            TILE(i0_, FASTRNN_MR, __VA_ARGS__);                                    \
        switch ((int)((M) - i0_)) {                                                \
        case 5: TILE(i0_, 5, __VA_ARGS__); break;                                  \
        case 4: TILE(i0_, 4, __VA_ARGS__); break;                                  \
        case 3: TILE(i0_, 3, __VA_ARGS__); break;                                  \
        case 2: TILE(i0_, 2, __VA_ARGS__); break;                                  \
        case 1: TILE(i0_, 1, __VA_ARGS__); break;                                  \
        default: break;                                                            \
        }                                                                          \
    } while (0)

/* ---- one template, instantiated for float (NR=16) and double (NR=8) ---- */
#define FASTRNN_DEFINE_GEMM(REAL, VEC, LANES, SUFFIX)                              \
                                                                                   \
/* Number of REAL values the packed copy of an N x K matrix needs. */             \
static inline size_t fastrnn_packed_size_##SUFFIX(ptrdiff_t N, ptrdiff_t K)        \
{                                                                                  \
    const ptrdiff_t NR = 2 * LANES;                                                \
    return (size_t)((N + NR - 1) / NR) * (size_t)NR * (size_t)K;                   \
}                                                                                  \
                                                                                   \
/* packed := panels [p0, p1) of the N x K matrix whose row n is rows[n]        \
 * (K contiguous values). Row pointers let callers pack any selection or      \
 * permutation of rows (one thread's gate slices) without a copy. */           \
static void fastrnn_pack_##SUFFIX(REAL *packed, const REAL *const *rows,           \
                                  ptrdiff_t N, ptrdiff_t K,                        \
                                  ptrdiff_t p0, ptrdiff_t p1)                      \
{                                                                                  \
    const ptrdiff_t NR = 2 * LANES;                                                \
    for (ptrdiff_t p = p0; p < p1; ++p) {                                          \
        REAL *dst = packed + p * NR * K;                                           \
        ptrdiff_t nj = N - p * NR < NR ? N - p * NR : NR;                          \
        for (ptrdiff_t j = 0; j < nj; ++j) {                                       \
            const REAL *src = rows[p * NR + j];                                    \
            for (ptrdiff_t k = 0; k < K; ++k) dst[k * NR + j] = src[k];            \
        }                                                                          \
        for (ptrdiff_t j = nj; j < NR; ++j)                                        \
            for (ptrdiff_t k = 0; k < K; ++k) dst[k * NR + j] = (REAL)0;           \
    }                                                                              \
}                                                                                  \
                                                                                   \
/* packed := panels [p0, p1) of the N x K matrix whose element (n, k) is        \
 * cols[k][n]: the transpose of a K x N matrix given by its rows (W^T for      \
 * backward's dh = da W, or x^T over any subset of time steps for dW). The     \
 * NR values of one k are adjacent in memory, so k is walked outermost. */      \
static void fastrnn_pack_t_##SUFFIX(REAL *packed, const REAL *const *cols,         \
                                    ptrdiff_t N, ptrdiff_t K,                      \
                                    ptrdiff_t p0, ptrdiff_t p1)                    \
{                                                                                  \
    const ptrdiff_t NR = 2 * LANES;                                                \
    for (ptrdiff_t p = p0; p < p1; ++p) {                                          \
        REAL *dst = packed + p * NR * K;                                           \
        ptrdiff_t nj = N - p * NR < NR ? N - p * NR : NR;                          \
        for (ptrdiff_t k = 0; k < K; ++k) {                                        \
            const REAL *src = cols[k] + p * NR;                                    \
            for (ptrdiff_t j = 0; j < nj; ++j) dst[k * NR + j] = src[j];           \
            for (ptrdiff_t j = nj; j < NR; ++j) dst[k * NR + j] = (REAL)0;         \
        }                                                                          \
    }                                                                              \
}                                                                                  \
                                                                                   \
/* One m x NR tile (m <= MR): acc := A[0:m] . panel, with A's element (i, k) at \
 * a[i][k * ks], then C := beta*C + acc on the m x n corner that exists. Always \
 * inlined with constant m and ks, so the row loops unroll and the             \
 * accumulators live in registers. */                                           \
static inline __attribute__((always_inline)) void                                  \
fastrnn_tile_##SUFFIX(ptrdiff_t K, const REAL *const *a, ptrdiff_t ks,            \
                      const REAL *panel, REAL *const *C,                           \
                      ptrdiff_t j0, int m, int n, REAL beta)                       \
{                                                                                  \
    VEC acc0[FASTRNN_MR], acc1[FASTRNN_MR];                                        \
    for (int i = 0; i < FASTRNN_MR; ++i) {                                         \
        acc0[i] = (VEC){0};                                                        \
        acc1[i] = (VEC){0};                                                        \
    }                                                                              \
    for (ptrdiff_t k = 0; k < K; ++k) {                                            \
        VEC b0, b1;                                                                \
        /* the panel streams from L2/L3 when W_hh is large: fetch ahead */         \
        __builtin_prefetch(panel + (k + FASTRNN_PREFETCH) * 2 * LANES);            \
        memcpy(&b0, panel + k * 2 * LANES, sizeof(VEC));                          \
        memcpy(&b1, panel + k * 2 * LANES + LANES, sizeof(VEC));                   \
        for (int i = 0; i < m; ++i) {                                              \
            REAL ai = a[i][k * ks];  /* scalar op vector: broadcast from memory */ \
            acc0[i] += ai * b0;                                                    \
            acc1[i] += ai * b1;                                                    \
        }                                                                          \
    }                                                                              \
    for (int i = 0; i < m; ++i) {                                                  \
        REAL out[2 * LANES];                                                       \
        memcpy(out, &acc0[i], sizeof(VEC));                                        \
        memcpy(out + LANES, &acc1[i], sizeof(VEC));                                \
        REAL *c = C[i] + j0;                                                       \
        if (beta == (REAL)0) {                                                     \
            for (int j = 0; j < n; ++j) c[j] = out[j];                             \
        } else {                                                                   \
            for (int j = 0; j < n; ++j) c[j] = beta * c[j] + out[j];               \
        }                                                                          \
    }                                                                              \
}                                                                                  \
                                                                                   \
/* Tile of rows i0.. of A given by row pointers, K block from k0. */              \
static inline __attribute__((always_inline)) void                                  \
fastrnn_rows_tile_##SUFFIX(ptrdiff_t i0, int m, ptrdiff_t kc,                      \
                           const REAL *const *A, ptrdiff_t k0, const REAL *panel,  \
                           REAL *const *C, ptrdiff_t j0, int n, REAL beta)         \
{                                                                                  \
    const REAL *a[FASTRNN_MR];                                                     \
    for (int i = 0; i < FASTRNN_MR; ++i) a[i] = A[i0 + (i < m ? i : 0)] + k0;      \
    fastrnn_tile_##SUFFIX(kc, a, 1, panel, C + i0, j0, m, n, beta);                \
}                                                                                  \
                                                                                   \
/* Tile of rows i0.. of A copied into micro-panels (pa[i0*kc + k*MR + i]). */     \
static inline __attribute__((always_inline)) void                                  \
fastrnn_panel_tile_##SUFFIX(ptrdiff_t i0, int m, ptrdiff_t kc, const REAL *pa,     \
                            const REAL *panel, REAL *const *C, ptrdiff_t j0,       \
                            int n, REAL beta)                                      \
{                                                                                  \
    const REAL *a[FASTRNN_MR];                                                     \
    for (int i = 0; i < FASTRNN_MR; ++i) a[i] = pa + i0 * kc + i;                  \
    fastrnn_tile_##SUFFIX(kc, a, FASTRNN_MR, panel, C + i0, j0, m, n, beta);       \
}                                                                                  \
                                                                                   \
/* C[M x N] := beta*C + A[M x K] . W^T, W given packed (see top of file).          \
 * A and C are given as row pointers (A[i] -> K values, C[i] -> N values), so    \
 * rows gathered from anywhere (other time steps, other batch rows) cost no copy.\
 */                                                                                \
FASTRNN_CLONES static void                                                         \
fastrnn_gemm_packed_##SUFFIX(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,                \
                             const REAL *const *A, const REAL *packed,             \
                             REAL *const *C, REAL beta)                            \
{                                                                                  \
    const ptrdiff_t NR = 2 * LANES;                                                \
    /* K in blocks of KC: a block of a panel (KC x NR) stays in L1 while every    \
     * row tile uses it; blocks after the first accumulate into C. */             \
    for (ptrdiff_t k0 = 0; k0 < K; k0 += FASTRNN_KC) {                             \
        ptrdiff_t kc = K - k0 < FASTRNN_KC ? K - k0 : FASTRNN_KC;                  \
        REAL b = k0 == 0 ? beta : (REAL)1;                                         \
        for (ptrdiff_t j0 = 0; j0 < N; j0 += NR) {                                 \
            const REAL *panel = packed + (j0 / NR) * NR * K + k0 * NR;             \
            int n = (int)(N - j0 < NR ? N - j0 : NR);                              \
            FASTRNN_ROW_TILES(M, fastrnn_rows_tile_##SUFFIX, kc, A, k0, panel, C, j0, n, b); \
        }                                                                          \
    }                                                                              \
}                                                                                  \
                                                                                   \
/* Workspace (in REAL values) that fastrnn_gemm_packed_tn needs for M rows. */    \
static inline size_t fastrnn_tn_work_size_##SUFFIX(ptrdiff_t M)                    \
{                                                                                  \
    return (size_t)((M + FASTRNN_MR - 1) / FASTRNN_MR) * FASTRNN_MR * FASTRNN_KC;  \
}                                                                                  \
                                                                                   \
/* For q < nout: C_q[M x N_q] := beta*C_q + A^T . W_q^T, where A is the K x M   \
 * matrix whose row k is A[k] + col0 and row i of every C_q is column i of A    \
 * (backward's dW = da^T x and da^T h: columns of da, read in place, once for    \
 * all outputs; the row pointers select the time steps that exist).             \
 * Each KC block of those columns is first copied into MR-row micro-panels in    \
 * `work` (fastrnn_tn_work_size values): read straight from A, every k would     \
 * touch a new cache line a row apart, and with rows a multiple of 1024 bytes    \
 * apart all of them fall in the same L1 sets (measured 49 against 85-90         \
 * GFLOP/s). */                                                                  \
FASTRNN_CLONES static void                                                         \
fastrnn_gemm_packed_tn_##SUFFIX(ptrdiff_t M, ptrdiff_t K, const REAL *const *A,    \
                                ptrdiff_t col0, int nout, const ptrdiff_t *Ns,     \
                                const REAL *const *packs, REAL *const *const *Cs,  \
                                REAL beta, REAL *work)                             \
{                                                                                  \
    const ptrdiff_t NR = 2 * LANES;                                                \
    for (ptrdiff_t k0 = 0; k0 < K; k0 += FASTRNN_KC) {                             \
        ptrdiff_t kc = K - k0 < FASTRNN_KC ? K - k0 : FASTRNN_KC;                  \
        REAL b = k0 == 0 ? beta : (REAL)1;                                         \
        for (ptrdiff_t i0 = 0; i0 < M; i0 += FASTRNN_MR) {                         \
            REAL *pa = work + i0 * kc;                                             \
            ptrdiff_t m = M - i0 < FASTRNN_MR ? M - i0 : FASTRNN_MR;               \
            for (ptrdiff_t k = 0; k < kc; ++k) {                                   \
                const REAL *src = A[k0 + k] + col0 + i0;                           \
                for (ptrdiff_t i = 0; i < m; ++i) pa[k * FASTRNN_MR + i] = src[i]; \
                for (ptrdiff_t i = m; i < FASTRNN_MR; ++i) pa[k * FASTRNN_MR + i] = 0; \
            }                                                                      \
        }                                                                          \
        for (int q = 0; q < nout; ++q) {                                           \
            const ptrdiff_t N = Ns[q];                                             \
            REAL *const *C = Cs[q];                                                \
            for (ptrdiff_t j0 = 0; j0 < N; j0 += NR) {                             \
                const REAL *panel = packs[q] + (j0 / NR) * NR * K + k0 * NR;       \
                int n = (int)(N - j0 < NR ? N - j0 : NR);                          \
                FASTRNN_ROW_TILES(M, fastrnn_panel_tile_##SUFFIX, kc, work, panel, C, j0, n, b); \
            }                                                                      \
        }                                                                          \
    }                                                                              \
}                                                                                  \
                                                                                   \
/* C[i][j] := beta*C[i][j] + sum_k A[i][k] * W[j][k] with W row-major (N x K,    \
 * row stride ldw), unpacked: the dot-product form used for batches too small    \
 * to repay packing (batch-1 streaming). Each element is LANES partial sums      \
 * over k = l, l+LANES, ... reduced in a fixed order, then the scalar tail. */    \
FASTRNN_CLONES static void                                                         \
fastrnn_gemm_dot_##SUFFIX(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,                   \
                          const REAL *const *A, const REAL *W, ptrdiff_t ldw,      \
                          REAL *const *C, REAL beta)                               \
{                                                                                  \
    const ptrdiff_t Kv = K - K % LANES;                                            \
    for (ptrdiff_t i = 0; i < M; ++i) {                                            \
        const REAL *a = A[i];                                                      \
        REAL *c = C[i];                                                            \
        ptrdiff_t j = 0;                                                           \
        /* 8 output columns at a time: 8 independent FMA chains keep both FMA \
         * pipes busy (4 chains left half of them idle at batch 1). */        \
        for (; j + 8 <= N; j += 8) {                                               \
            const REAL *w = W + j * ldw;                                           \
            VEC s[8], av, wv;                                                      \
            for (int q = 0; q < 8; ++q) s[q] = (VEC){0};                           \
            for (ptrdiff_t k = 0; k < Kv; k += LANES) {                            \
                memcpy(&av, a + k, sizeof av);                                     \
                for (int q = 0; q < 8; ++q) {                                      \
                    memcpy(&wv, w + q * ldw + k, sizeof wv);                       \
                    s[q] += av * wv;                                               \
                }                                                                  \
            }                                                                      \
            for (int q = 0; q < 8; ++q) {                                          \
                REAL r = 0;                                                        \
                for (int l = 0; l < LANES; ++l) r += s[q][l];                      \
                for (ptrdiff_t k = Kv; k < K; ++k) r += a[k] * w[q * ldw + k];     \
                c[j + q] = beta == (REAL)0 ? r : beta * c[j + q] + r;              \
            }                                                                      \
        }                                                                          \
        for (; j < N; ++j) {                                                       \
            const REAL *w0 = W + j * ldw;                                          \
            VEC s0 = (VEC){0}, av, wv;                                             \
            for (ptrdiff_t k = 0; k < Kv; k += LANES) {                            \
                memcpy(&av, a + k, sizeof av);                                     \
                memcpy(&wv, w0 + k, sizeof wv); s0 += av * wv;                     \
            }                                                                      \
            REAL r0 = 0;                                                           \
            for (int l = 0; l < LANES; ++l) r0 += s0[l];                           \
            for (ptrdiff_t k = Kv; k < K; ++k) r0 += a[k] * w0[k];                 \
            c[j] = beta == (REAL)0 ? r0 : beta * c[j] + r0;                        \
        }                                                                          \
    }                                                                              \
}

FASTRNN_DEFINE_GEMM(float, fr_f8, 8, s)
FASTRNN_DEFINE_GEMM(double, fr_d4, 4, d)

#endif
