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
 * NR is two vector registers: 32 floats / 16 doubles on AVX-512, 16 / 8 on
 * AVX2 and baseline. A packed copy is therefore only valid for the ISA it was
 * made under (fastrnn_panel_width_*() tells the current one).
 *
 * The micro-kernels themselves are written once, in gemm_kernels.inc, and
 * compiled here for each ISA (isa.h); the functions below pick one per call.
 */
#ifndef FASTRNN_RECURRENT_GEMM_H
#define FASTRNN_RECURRENT_GEMM_H

#include <stddef.h>
#include <string.h>
#include "isa.h"

#ifndef FASTRNN_KC
/* K block. A KC x NR panel block is re-read from L2 by every row tile (at NR = 32
 * floats a 512 block was 64 KB, over the 32 KB L1 already), and each block after
 * the first reads C back to add to it. 1024 against 512, session 16 (Zen 4,
 * interleaved process pairs, medians, ms): LSTM eval I=128 H=1024 T=30 B=20
 * 28.5-28.8 -> 27.6-28.0, I=H=1024 T=25 B=16 35.4-35.6 -> 33.9-34.3; LSTM
 * training I=H=256 T=100 B=64 110.8-114.2 -> 108.4-109.1 (the dW GEMMs run over
 * K = T*B); under FASTRNN_ISA=avx2 33.7-33.9 -> 30.8-33.1 and 114.7-115.1 ->
 * 111.4-112.2. 256 was no better than 512. Not measured on Zen 3 (512 KB L2). */
#define FASTRNN_KC 1024
#endif
#ifndef FASTRNN_PREFETCH
#define FASTRNN_PREFETCH 64  /* panel rows (k steps) to prefetch ahead: helps when W_hh streams from L3 */
#endif
#define FASTRNN_MR_MAX 12   /* the largest register tile's rows (AVX-512) */
#ifndef FASTRNN_NN_MAX_ROWS
#define FASTRNN_NN_MAX_ROWS 64   /* rows gemm_nn takes at a time (its C row pointers) */
#endif
#ifndef FASTRNN_NN_PREFETCH
#define FASTRNN_NN_PREFETCH 8    /* rows ahead gemm_nn fetches its W from */
#endif

/* TILE(i0, m, ...) over M rows in tiles of at most MR rows, with m a constant
 * in each call, so the always-inlined tile unrolls its row loops and drops dead
 * rows. Whole MR-row tiles, except that MR < M < 2 MR rows take two even tiles
 * (16 rows: 8 + 8, not 12 + 4; 20: 10 + 10). Eval, medians of interleaved
 * process pairs, ms: LSTM I=128 H=1024 T=30 B=20 (20 rows a thread) 30.1-31.0 ->
 * 28.0-29.6, LSTM I=H=1024 T=25 B=16 36.3-37.0 -> 35.2-35.4, GRU the same
 * 26.7 -> 25.5; 32 and 64 rows unchanged. Spreading every M evenly (32 rows:
 * 11 + 11 + 10), halving the last MR + r rows of any M (32 rows: 12 + 10 + 10),
 * or a switch on the tile size inside the tile loop, each cost 2-4 % at 32 rows
 * (Zen 4, AVX-512). But a last tile of r <= MR / 4 rows (2-6 accumulators at
 * MR = 12) ran the FMA ports half idle: the last MR + r rows take two even
 * tiles (49 rows: 12 + 12 + 12 + 7 + 6). 2-core Xeon, AVX-512, C harness, 2
 * threads each on its own operands, N = 2048, K = 512, GFLOP/s a thread, median
 * of 9 timings, two runs: 49 rows 189-197 -> 204, 51 rows 196-198 -> 205, 27
 * rows 182-183 -> 195, 25 rows 180 -> 193; r = 4 (40, 64, 100 rows) and r = 7
 * even. The same harness under the AVX2 kernel (MR = 6, r = 1) on the Xeon:
 * 43 rows 110 -> 113, 49 rows 111 -> 114-115; not run on Zen 3. A row's sums do
 * not depend on its tile.
 * Keep the M < 2 MR case its own branch (first tile at row 0). Folding it into the
 * small-remainder branch gives the same tiles for every M, but GCC 12 then built a
 * smaller gemm_packed (AVX-512 float: 40 KB of code against 50 KB) that ran slower
 * on Zen 4: eval calls, 2-core AMD EPYC Zen 4, 2 threads, three alternating process
 * pairs, p10 of 2 s of calls, ms, folded -> apart (session 42): LSTM I=128 H=1024
 * T=30 B=20 32.0-35.3 -> 27.4-32.3 (five pairs), GRU the same 23.6-26.4 -> 20.4-20.7,
 * GRU I=H=1024 T=25 B=16 28.7-33.0 -> 25.9-29.8, LSTM I=H=512 T=50 B=8 8.5-9.0 ->
 * 8.0-8.4, LSTM I=H=256 T=100 B=64 34.9-36.0 -> 34.8-35.5. */
#define FASTRNN_TILE_CASE(R, MR, TILE, ...) \
    case R: if (R <= MR) TILE(i0_, R, __VA_ARGS__); break;
/* TILE(i0_, m, ...) with m (1..MR, at most 12) made a constant. */
#define FASTRNN_TILE_SWITCH(m, MR, TILE, ...)                                      \
    switch ((int)(m)) {                                                            \
    FASTRNN_TILE_CASE(12, MR, TILE, __VA_ARGS__)                                   \
    FASTRNN_TILE_CASE(11, MR, TILE, __VA_ARGS__)                                   \
    FASTRNN_TILE_CASE(10, MR, TILE, __VA_ARGS__)                                   \
    FASTRNN_TILE_CASE(9, MR, TILE, __VA_ARGS__)                                    \
    FASTRNN_TILE_CASE(8, MR, TILE, __VA_ARGS__)                                    \
    FASTRNN_TILE_CASE(7, MR, TILE, __VA_ARGS__)                                    \
    FASTRNN_TILE_CASE(6, MR, TILE, __VA_ARGS__)                                    \
    FASTRNN_TILE_CASE(5, MR, TILE, __VA_ARGS__)                                    \
    FASTRNN_TILE_CASE(4, MR, TILE, __VA_ARGS__)                                    \
    FASTRNN_TILE_CASE(3, MR, TILE, __VA_ARGS__)                                    \
    FASTRNN_TILE_CASE(2, MR, TILE, __VA_ARGS__)                                    \
    FASTRNN_TILE_CASE(1, MR, TILE, __VA_ARGS__)                                    \
    default: break;                                                                \
    }
#define FASTRNN_ROW_TILES(M, MR, TILE, ...)                                        \
    do {                                                                           \
        ptrdiff_t i0_ = 0;                                                         \
        if ((M) > (MR) && (M) < 2 * (MR)) {   /* two even tiles */                 \
            const int m_ = (int)((M) + 1) / 2;                                     \
            FASTRNN_TILE_SWITCH(m_, MR, TILE, __VA_ARGS__);                         \
            i0_ = m_;                                                              \
        } else {                                                                   \
            const ptrdiff_t r_ = (M) % (MR);                                       \
            const ptrdiff_t whole_ = (M) > (MR) && r_ > 0 && 4 * r_ <= (MR)         \
                                     ? (M) - (MR) - r_ : (M);                  \
            for (; i0_ + (MR) <= whole_; i0_ += (MR))                              \
                TILE(i0_, MR, __VA_ARGS__);                                        \
            if (whole_ < (M)) {   /* the last MR + r rows, r small: two even tiles */ \
                const int m_ = (int)((M) - i0_ + 1) / 2;                           \
                FASTRNN_TILE_SWITCH(m_, MR, TILE, __VA_ARGS__);                     \
                i0_ += m_;                                                         \
            }                                                                      \
        }                                                                          \
        FASTRNN_TILE_SWITCH((M) - i0_, MR, TILE, __VA_ARGS__);   /* the rest */       \
    } while (0)

/* TILE(i0, m, ...) for whole MR-row tiles from row 0, then the rest: for
 * operands copied into MR-row micro-panels (tiles must start at multiples of MR). */
#define FASTRNN_ROW_TILES_FIXED(M, MR, TILE, ...)                                  \
    do {                                                                           \
        ptrdiff_t i0_ = 0;                                                         \
        for (; i0_ + (MR) <= (M); i0_ += (MR))                                     \
            TILE(i0_, MR, __VA_ARGS__);                                            \
        FASTRNN_TILE_SWITCH((M) - i0_, MR, TILE, __VA_ARGS__);   /* the rest */       \
    } while (0)

/* ---- the instantiations: (ISA, type) -> tile size ---- */
#define FR_CAT_(a, b, c, d) a##_##b##_##c##_##d
#define FR_CAT(a, b, c, d) FR_CAT_(a, b, c, d)

#define FR_REAL float
#define FR_T s
#define FR_DOUBLE 0
#if FASTRNN_HAVE_DISPATCH
#define FR_ISA avx512
#define FR_TARGET FASTRNN_TARGET_AVX512
#define FR_LANES 16
#define FR_MR 12
#define FR_NAME(x) FR_CAT(fastrnn, x, FR_T, FR_ISA)
#include "gemm_kernels.inc"
#undef FR_ISA
#undef FR_TARGET
#undef FR_LANES
#undef FR_MR
#define FR_ISA avx2
#define FR_TARGET FASTRNN_TARGET_AVX2
#define FR_LANES 8
#define FR_MR 6
#include "gemm_kernels.inc"
#undef FR_ISA
#undef FR_TARGET
#undef FR_LANES
#undef FR_MR
#endif
#define FR_ISA baseline
#define FR_BASELINE 1   /* its vectors span two registers */
#define FR_TARGET
#define FR_LANES 8
#define FR_MR 6
#define FR_NAME(x) FR_CAT(fastrnn, x, FR_T, FR_ISA)
#include "gemm_kernels.inc"
#undef FR_BASELINE
#undef FR_ISA
#undef FR_TARGET
#undef FR_LANES
#undef FR_MR
#undef FR_REAL
#undef FR_T
#undef FR_DOUBLE

#define FR_REAL double
#define FR_T d
#define FR_DOUBLE 1
#if FASTRNN_HAVE_DISPATCH
#define FR_ISA avx512
#define FR_TARGET FASTRNN_TARGET_AVX512
#define FR_LANES 8
#define FR_MR 12
#include "gemm_kernels.inc"
#undef FR_ISA
#undef FR_TARGET
#undef FR_LANES
#undef FR_MR
#define FR_ISA avx2
#define FR_TARGET FASTRNN_TARGET_AVX2
#define FR_LANES 4
#define FR_MR 6
#include "gemm_kernels.inc"
#undef FR_ISA
#undef FR_TARGET
#undef FR_LANES
#undef FR_MR
#endif
#define FR_ISA baseline
#define FR_BASELINE 1
#define FR_TARGET
#define FR_LANES 4
#define FR_MR 6
#include "gemm_kernels.inc"
#undef FR_BASELINE
#undef FR_ISA
#undef FR_TARGET
#undef FR_LANES
#undef FR_MR
#undef FR_REAL
#undef FR_T
#undef FR_DOUBLE
#undef FR_NAME

/* ---- what the kernels call: sizes of the current ISA, and dispatch ---- */

/* Output columns per packed panel (NR). */
static inline ptrdiff_t fastrnn_panel_width_s(void) { return fastrnn_isa_level() == FASTRNN_ISA_AVX512 ? 32 : 16; }
static inline ptrdiff_t fastrnn_panel_width_d(void) { return fastrnn_isa_level() == FASTRNN_ISA_AVX512 ? 16 : 8; }

#define FASTRNN_DEFINE_FRONT(REAL, T)                                              \
                                                                                   \
/* packed := rows [k0, k1) of every panel of the N x K matrix whose element    \
 * (n, k) is cols[k][n]: the transpose of a K x N matrix given by its rows     \
 * (W^T for backward's dh = da W, or x^T over any subset of time steps for     \
 * dW). Each source row is read once, start to end, its NR-value pieces going  \
 * to every panel. Panel by panel, every pass read NR values of each row (Zen  \
 * 4, 2 threads, C harness, x^T of 6400 rows from DRAM: I=256 0.47-0.49 ->    \
 * 0.40-0.42 ms, I=512 1.11-1.13 -> 0.86-0.89 ms; RNN I=H=512 T=50 B=128      \
 * training step 103.0-103.7 -> 102.2-102.7 ms, (256, 256, 100, 64) even). */ \
static void fastrnn_pack_t_##T(REAL *packed, const REAL *const *cols, ptrdiff_t N, \
                               ptrdiff_t K, ptrdiff_t k0, ptrdiff_t k1)            \
{                                                                                  \
    const ptrdiff_t NR = fastrnn_panel_width_##T();                                \
    const ptrdiff_t np = (N + NR - 1) / NR;                                        \
    for (ptrdiff_t k = k0; k < k1; ++k) {                                          \
        const REAL *src = cols[k];                                                 \
        for (ptrdiff_t p = 0; p < np; ++p) {                                       \
            REAL *dst = packed + p * NR * K + k * NR;                              \
            ptrdiff_t nj = N - p * NR < NR ? N - p * NR : NR;                      \
            for (ptrdiff_t j = 0; j < nj; ++j) dst[j] = src[p * NR + j];           \
            for (ptrdiff_t j = nj; j < NR; ++j) dst[j] = (REAL)0;                  \
        }                                                                          \
    }                                                                              \
}                                                                                  \
                                                                                   \
/* Workspace (in REAL values) that fastrnn_gemm_packed_tn needs for M rows:     \
 * the micro-panels of a KC block, then M partial column sums. */               \
static inline size_t fastrnn_tn_work_size_##T(ptrdiff_t M)                         \
{                                                                                  \
    return (size_t)((M + FASTRNN_MR_MAX - 1) / FASTRNN_MR_MAX) * FASTRNN_MR_MAX    \
        * (FASTRNN_KC + 1);                                                        \
}

FASTRNN_DEFINE_FRONT(float, s)
FASTRNN_DEFINE_FRONT(double, d)

/* NAME(args) of the current ISA's instantiation. */
#if FASTRNN_HAVE_DISPATCH
#define FASTRNN_DISPATCH(NAME, T, ARGS)                                            \
    switch (fastrnn_isa_level()) {                                                 \
    case FASTRNN_ISA_AVX512: fastrnn_##NAME##_##T##_avx512 ARGS; break;            \
    case FASTRNN_ISA_AVX2: fastrnn_##NAME##_##T##_avx2 ARGS; break;                \
    default: fastrnn_##NAME##_##T##_baseline ARGS; break;                          \
    }
#else
#define FASTRNN_DISPATCH(NAME, T, ARGS) fastrnn_##NAME##_##T##_baseline ARGS;
#endif

#define FASTRNN_DEFINE_DISPATCH(REAL, T)                                           \
/* packed := panels [p0, p1) of the N x K matrix whose row n is rows[n]        \
 * (K contiguous values). Row pointers let callers pack any selection or      \
 * permutation of rows (one thread's gate slices) without a copy. */           \
static inline void fastrnn_pack_##T(REAL *packed, const REAL *const *rows,         \
        ptrdiff_t N, ptrdiff_t K, ptrdiff_t p0, ptrdiff_t p1)                      \
{ FASTRNN_DISPATCH(pack, T, (packed, rows, N, K, p0, p1)) }                        \
                                                                                   \
/* C[M x N] := beta*C + A[M x K] . W^T, W packed (see top of file); A and C     \
 * by row pointers. */                                                           \
static inline void fastrnn_gemm_packed_##T(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,  \
        const REAL *const *A, const REAL *packed, REAL *const *C, REAL beta)       \
{ FASTRNN_DISPATCH(gemm_packed, T, (M, N, K, A, packed, C, beta)) }                \
                                                                                   \
/* Cs[q] := beta*Cs[q] + A^T . W_q^T for q < nout, and A's column sums into     \
 * colsum unless NULL (gemm_kernels.inc). */                                     \
static inline void fastrnn_gemm_packed_tn_##T(ptrdiff_t M, ptrdiff_t K,            \
        const REAL *const *A, ptrdiff_t col0, int nout, const ptrdiff_t *Ns,       \
        const REAL *const *packs, REAL **const *Cs, REAL beta, REAL *work,         \
        REAL *colsum)                                                              \
{ FASTRNN_DISPATCH(gemm_packed_tn, T, (M, K, A, col0, nout, Ns, packs, Cs, beta, work, colsum)) } \
                                                                                   \
/* C[i] + c0 := beta*(C[i] + c0) + A[i] . W with W row-major (K x N, row     \
 * stride ldw), read in place: bitwise gemm_packed of W^T (single steps). */   \
static inline void fastrnn_gemm_nn_##T(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,      \
        const REAL *const *A, const REAL *W, ptrdiff_t ldw, REAL *const *C,        \
        ptrdiff_t c0, REAL beta)                                                   \
{ FASTRNN_DISPATCH(gemm_nn, T, (M, N, K, A, W, ldw, C, c0, beta)) }                \
                                                                                   \
/* C := beta*C + A . W^T with W row-major, unpacked (small batches). */          \
static inline void fastrnn_gemm_dot_##T(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,     \
        const REAL *const *A, const REAL *W, ptrdiff_t ldw, REAL *const *C,        \
        REAL beta)                                                                 \
{ FASTRNN_DISPATCH(gemm_dot, T, (M, N, K, A, W, ldw, C, beta)) }

FASTRNN_DEFINE_DISPATCH(float, s)
FASTRNN_DEFINE_DISPATCH(double, d)

#endif
