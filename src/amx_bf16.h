/* amx_bf16.h: the driver's bf16 GEMMs on Intel AMX tiles (Sapphire Rapids and later).
 *
 * Under set_float32_matmul_precision("medium") every GEMM of the recurrence
 * driver multiplies bf16 operands and sums in float32 (bf16_gemm.h). On a CPU
 * with AMX-BF16 one TDPBF16PS multiplies a 16 x 32 bf16 tile of A by a 32 x 16
 * tile of W^T into a 16 x 16 float32 tile: 16,384 FLOP an instruction, against
 * an AVX-512 FMA's 32. That is what PyTorch's bf16 autocast runs on such CPUs
 * (oneDNN); without it fastrnn's "medium" there ran float32 products and was 3x
 * slower than autocast (bench/precision.py, 2-core Xeon KVM guest).
 *
 * The operands are the ones bf16_gemm.h already makes: W in panels of 16 output
 * rows with each pair of k adjacent, which is exactly AMX's layout for the
 * second operand (a panel's k-pairs 32 at a time are one B tile, rows 64 bytes
 * apart), and A rows rounded to bf16 at a fixed stride (one A tile: 16 rows, 32
 * k). K is padded to a multiple of 32 (fastrnn_bf16_kp) and the prepared rows to
 * a multiple of 16 (zeros), so every tile is whole.
 *
 * Linux lends a process the tile registers only on request (arch_prctl
 * ARCH_REQ_XCOMP_PERM, kernel 5.16 and later); fastrnn_amx_usable() asks once and
 * says no if the CPU, the OS or FASTRNN_AMX=0 in the environment says no.
 * Numerics: TDPBF16PS treats bf16 denormal inputs as zero and flushes denormal
 * results, as vdpbf16ps does; each element's sum runs over k in the same order
 * whatever the row tile, so thread counts do not change a bit.
 */
#ifndef FASTRNN_AMX_BF16_H
#define FASTRNN_AMX_BF16_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "isa.h"

#if FASTRNN_HAVE_DISPATCH && defined(__linux__) && __GNUC__ >= 11
#define FASTRNN_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define FASTRNN_HAVE_AMX 0
#endif

#define FASTRNN_AMX_K 32      /* k per tile step (one A tile's 64 bytes of bf16) */
#define FASTRNN_AMX_ROWS 16   /* rows of an A or C tile */

static int fastrnn_amx_state = -1;   /* -1: not asked yet; 0: no; 1: tiles granted */

/* Can this process run AMX-BF16 tiles? Asked once (per extension module). */
static inline int fastrnn_amx_usable(void)
{
    int state = fastrnn_amx_state;
    if (state >= 0)
        return state;
    state = 0;
#if FASTRNN_HAVE_AMX
    /* fastrnn._cpu_cache checked FASTRNN_AMX at import: "0" or "1" if set */
    const char *env = getenv("FASTRNN_AMX");
    unsigned a, b, c, d, c1 = 0;
    if (__get_cpuid(1, &a, &b, &c1, &d) == 0) c1 = 0;
    if (!(env && env[0] == '0')
        && (c1 & (1u << 27))                              /* OSXSAVE: xgetbv is allowed */
        && __get_cpuid_count(7, 0, &a, &b, &c, &d)
        && (d & (1u << 22)) && (d & (1u << 24))) {        /* AMX-BF16, AMX-TILE */
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        /* XTILECFG and XTILEDATA enabled by the OS, then the permission to use them */
        if ((lo & (3u << 17)) == (3u << 17)
            && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                       18 /* XFEATURE_XTILEDATA */) == 0)
            state = 1;
    }
#endif
    fastrnn_amx_state = state;
    return state;
}

#if FASTRNN_HAVE_AMX
/* The tile configuration every call loads: palette 1, eight 16-row tiles of 64
 * bytes a row. tmm0-3: C (2 row tiles x 2 panels), tmm4-5: A, tmm6-7: W. */
struct fastrnn_amx_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64)));

#define FASTRNN_TARGET_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")))

/* C[i][j0 + j] := beta*C + out[i][j] for i < m, j < n (out: 32 x 32). */
FASTRNN_TARGET_AMX static inline void fastrnn_amx_store(float (*out)[32], int m, int n,
                                                        float *const *C, ptrdiff_t i0,
                                                        ptrdiff_t j0, float beta)
{
    const __mmask16 m0 = (__mmask16)(n >= 16 ? 0xFFFF : (1u << n) - 1);
    const __mmask16 m1 = (__mmask16)(n >= 32 ? 0xFFFF : n <= 16 ? 0 : (1u << (n - 16)) - 1);
    const __m512 vb = _mm512_set1_ps(beta);
    for (int i = 0; i < m; ++i) {
        float *c = C[i0 + i] + j0;
        __m512 t0 = _mm512_load_ps(out[i]), t1 = _mm512_load_ps(out[i] + 16);
        if (beta != 0.0f) {
            t0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, c), t0);
            t1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, c + 16), t1);
        }
        _mm512_mask_storeu_ps(c, m0, t0);
        _mm512_mask_storeu_ps(c + 16, m1, t1);
    }
}

/* C[i] := beta*C[i] + A[i] . W^T for i < M, j < N. A: rows of Kp bf16 values at
 * a + i*rb, readable (zeros) up to the next multiple of 16 rows; W: bf16 panels
 * of 16 output rows, pb bytes apart, Kp a multiple of FASTRNN_AMX_K. Two panels
 * at a time; per pair, row blocks of 32 (two A tiles) share the W tiles. */
FASTRNN_TARGET_AMX static void fastrnn_amx_bf16_gemm(ptrdiff_t M, ptrdiff_t N, ptrdiff_t Kp,
                                                     const unsigned char *a, size_t rb,
                                                     const uint16_t *packed, size_t pb,
                                                     float *const *C, float beta)
{
    struct fastrnn_amx_config cfg;
    float out[32][32] __attribute__((aligned(64)));
    const ptrdiff_t npan = (N + 15) / 16;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = FASTRNN_AMX_ROWS;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    for (ptrdiff_t q = 0; q < npan; q += 2) {
        const unsigned char *w0 = (const unsigned char *)packed + (size_t)q * pb;
        const unsigned char *w1 = q + 1 < npan ? w0 + pb : w0;   /* an odd last panel: twice */
        const ptrdiff_t j0 = q * 16;
        const int n = (int)(N - j0 < 32 ? N - j0 : 32);
        for (ptrdiff_t i0 = 0; i0 < M; i0 += 32) {
            const unsigned char *a0 = a + (size_t)i0 * rb, *a1 = a0 + 16 * rb;
            const int m = (int)(M - i0 < 32 ? M - i0 : 32);
            _tile_zero(0);
            _tile_zero(1);
            if (m > 16) {
                _tile_zero(2);
                _tile_zero(3);
                for (ptrdiff_t k = 0; k < Kp; k += FASTRNN_AMX_K) {
                    _tile_loadd(4, a0 + 2 * k, rb);
                    _tile_loadd(5, a1 + 2 * k, rb);
                    _tile_loadd(6, w0 + 32 * k, 64);    /* k-pairs k/2 .. k/2+15, 64 bytes each */
                    _tile_loadd(7, w1 + 32 * k, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
                _tile_stored(2, &out[16][0], 128);
                _tile_stored(3, &out[16][16], 128);
            } else {
                for (ptrdiff_t k = 0; k < Kp; k += FASTRNN_AMX_K) {
                    _tile_loadd(4, a0 + 2 * k, rb);
                    _tile_loadd(6, w0 + 32 * k, 64);
                    _tile_loadd(7, w1 + 32 * k, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                }
            }
            _tile_stored(0, &out[0][0], 128);
            _tile_stored(1, &out[0][16], 128);
            fastrnn_amx_store(out, m, n, C, i0, j0, beta);
        }
    }
    _tile_release();
}
#endif

#endif
