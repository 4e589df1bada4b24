/* quant_rnn.h: inference forward of a whole RNN/LSTM/GRU stack (and a Linear)
 * on packed float32 / bfloat16 / int8 weights (quant_gemm.h), in one call.
 *
 * Layout ("blocked gate order"): hidden units are cut into blocks of 16; block u
 * owns panels u*G + g (g = gate, torch order), i.e. the 16 rows g*H + 16u + j of
 * W_ih and W_hh. Biases are stored in the same order. Threads split the work
 * one of two ways for a whole call:
 *
 * By hidden units (small batch): a thread owns a range of blocks, all rows.
 *   1. the rows of the run's input are prepared (split by rows), barrier;
 *   2. input projection xproj[t, b, blocks] = x W_ih^T + b for its own blocks
 *      (no barrier: the thread later reads only its own columns);
 *   3. for each step: prepare h_{t-1} (every thread, redundantly: B*H values),
 *      h_{t-1} W_hh^T for its blocks into a small local buffer, then the gate
 *      pass for its 16-unit blocks straight away, writing h_t into y; barrier.
 *   Each thread streams only its own slice of W_hh, with one barrier per step.
 *
 * By batch rows (from row_split_min rows per thread): a thread owns a range of
 * rows, all blocks, and the same three parts touch only its rows, so no step
 * (and no layer) waits for another thread; each streams all of W_hh, which pays
 * once a step has enough rows to reuse every weight it loads.
 *
 * Either way the result of every element is computed by the same code whatever
 * the thread count and split (bitwise the same for any team size).
 *
 * States: h0/c0 are read from tables through row indices (rows_in[b]) and
 * h_n/c_n written through rows_out[b]: a stream pool passes its state tables
 * and the stream ids here, and no state is copied in Python.
 */
#ifndef FASTRNN_QUANT_RNN_H
#define FASTRNN_QUANT_RNN_H

#include <stdlib.h>
#include "quant_gemm.h"
#include "activations.h"
#include "omp_helpers.h"
#include "scratch.h"   /* work buffers kept between calls: no page faults per call */

enum { QG_RNN_TANH = 0, QG_RNN_RELU = 1, QG_RNN_IDENTITY = 2, QG_LSTM = 3, QG_GRU = 4 };

typedef struct {
    int cell, G;
    ptrdiff_t Kin, H;  /* input size (Kin: 'I' is complex.h's macro) and hidden size */
    const void *w_ih, *w_hh;      /* packed panels, block order */
    const float *s_ih, *s_hh;     /* int8 row scales (block order) or NULL */
    const int32_t *z_ih, *z_hh;   /* int8: 128 * row sums (block order) or NULL */
    const float *b_x;             /* (nblk*G*16) bias of the projection or NULL */
    const float *b_hn;            /* GRU (nblk*16) b_hn or NULL */
    int reverse;
    int in_layer;                 /* layer whose y is the input; -1: the stack's x */
    int layer;                    /* layer whose y this run writes */
    ptrdiff_t out_col, out_stride;/* columns [out_col, out_col + H) of rows of out_stride */
    const float *h0, *c0;         /* state tables (rows via rows_in) or NULL (zeros) */
    float *hn, *cn;               /* state tables (rows via rows_out) or NULL */
} qg_run;

typedef struct {
    int isa, fmt, dyn_ih, dyn_hh, n_runs, n_threads;
    int row_split_min;            /* threads split batch rows from this many rows per
                                     thread (0: always hidden units) */
    ptrdiff_t T, B;
    const qg_run *runs;
    const float *x;               /* (T, B, I of run 0) */
    float *const *ys;             /* per layer: (T, B, out_stride) */
    const ptrdiff_t *rows_in, *rows_out;
} qg_stack;

/* ---- gate passes (16-unit blocks), one copy per ISA level ---- */
#define QG_POINTWISE(SFX, ATTR)                                                          \
ATTR static void qg_lstm_point_##SFX(const float *xp, const float *rc, float *c,         \
                                     float *h, int nj)                                   \
{   /* all 16 lanes in one vector pass; a ragged last block goes through copies */       \
    float cl[QG_NR], hl[QG_NR];                                                          \
    for (int j = 0; j < QG_NR; ++j) cl[j] = j < nj ? c[j] : 0.0f;                        \
    _Pragma("omp simd")                                                                  \
    for (int j = 0; j < QG_NR; ++j) {                                                    \
        float ig = fastrnn_sigmoidf(xp[j] + rc[j]);                                      \
        float fg = fastrnn_sigmoidf(xp[QG_NR + j] + rc[QG_NR + j]);                      \
        float gg = fastrnn_tanhf(xp[2 * QG_NR + j] + rc[2 * QG_NR + j]);                 \
        float og = fastrnn_sigmoidf(xp[3 * QG_NR + j] + rc[3 * QG_NR + j]);              \
        float cn = fg * cl[j] + ig * gg;                                                 \
        cl[j] = cn;                                                                      \
        hl[j] = og * fastrnn_tanhf(cn);                                                  \
    }                                                                                    \
    for (int j = 0; j < nj; ++j) {                                                       \
        c[j] = cl[j];                                                                    \
        h[j] = hl[j];                                                                    \
    }                                                                                    \
}                                                                                        \
ATTR static void qg_gru_point_##SFX(const float *xp, const float *rc, const float *bhn,  \
                                    const float *hp, float *h, int nj)                   \
{                                                                                        \
    float r[QG_NR], z[QG_NR], n[QG_NR];                                                  \
    _Pragma("omp simd")                                                                  \
    for (int j = 0; j < QG_NR; ++j) {                                                    \
        r[j] = fastrnn_sigmoidf(xp[j] + rc[j]);                                          \
        z[j] = fastrnn_sigmoidf(xp[QG_NR + j] + rc[QG_NR + j]);                          \
        float hn = rc[2 * QG_NR + j] + (bhn ? bhn[j] : 0.0f);                            \
        n[j] = fastrnn_tanhf(xp[2 * QG_NR + j] + r[j] * hn);                             \
    }                                                                                    \
    for (int j = 0; j < nj; ++j) {                                                       \
        float prev = hp ? hp[j] : 0.0f;                                                  \
        h[j] = (1.0f - z[j]) * n[j] + z[j] * prev;                                       \
    }                                                                                    \
}                                                                                        \
ATTR static void qg_rnn_point_##SFX(const float *xp, const float *rc, int act, float *h, \
                                    int nj)                                              \
{                                                                                        \
    float a[QG_NR];                                                                      \
    for (int j = 0; j < QG_NR; ++j) a[j] = xp[j] + rc[j];                                \
    if (act == QG_RNN_TANH) {                                                            \
        _Pragma("omp simd")                                                              \
        for (int j = 0; j < QG_NR; ++j) a[j] = fastrnn_tanhf(a[j]);                      \
    } else if (act == QG_RNN_RELU) {                                                     \
        for (int j = 0; j < QG_NR; ++j) a[j] = a[j] > 0.0f ? a[j] : (a[j] == a[j] ? 0.0f : a[j]); \
    }                                                                                    \
    for (int j = 0; j < nj; ++j) h[j] = a[j];                                            \
}

QG_POINTWISE(base, )
#if QG_X86
QG_POINTWISE(avx2, __attribute__((target("avx2,fma"))))
QG_POINTWISE(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))))
#endif

static void qg_point(int isa, int cell, const float *xp, const float *rc, float *c,
                     const float *bhn, const float *hp, float *h, int nj)
{
#if QG_X86
    if (isa >= QG_AVX512) {
        if (cell == QG_LSTM) qg_lstm_point_avx512(xp, rc, c, h, nj);
        else if (cell == QG_GRU) qg_gru_point_avx512(xp, rc, bhn, hp, h, nj);
        else qg_rnn_point_avx512(xp, rc, cell, h, nj);
        return;
    }
    if (isa == QG_AVX2) {
        if (cell == QG_LSTM) qg_lstm_point_avx2(xp, rc, c, h, nj);
        else if (cell == QG_GRU) qg_gru_point_avx2(xp, rc, bhn, hp, h, nj);
        else qg_rnn_point_avx2(xp, rc, cell, h, nj);
        return;
    }
#endif
    if (cell == QG_LSTM) qg_lstm_point_base(xp, rc, c, h, nj);
    else if (cell == QG_GRU) qg_gru_point_base(xp, rc, bhn, hp, h, nj);
    else qg_rnn_point_base(xp, rc, cell, h, nj);
}

/* Shared and per-thread workspace of one stack call. */
typedef struct {
    unsigned char *xprep;   /* (T*B) prepared input rows, rbx_max bytes apart */
    float *ascx;            /* (T*B) */
    float *xproj;           /* (T*B, ghp_max): row r's projections at r * ghp_max */
    float *cwork;           /* (B, H) */
    unsigned char *thread;  /* n_threads * per_thread */
    size_t per_thread, rbx_max, rbh_max;
    ptrdiff_t ghp_max;
    int split_rows;         /* threads own batch rows (1) or hidden units (0) */
} qg_work;

static size_t qg_align(size_t n) { return (n + 63) & ~(size_t)63; }

static void qg_stack_body(const qg_stack *S, const qg_work *W, int tid, int nt)
{
    const ptrdiff_t T = S->T, B = S->B, TB = T * B;
    const int by_rows = W->split_rows;
    unsigned char *mine = W->thread + (size_t)tid * W->per_thread;
    unsigned char *hprep = mine;
    float *asch = (float *)(mine + qg_align((size_t)B * W->rbh_max));
    float *rec = asch + qg_align((size_t)B * 4) / 4;
    const float **hprev = (const float **)(rec + (size_t)B * QG_NP * QG_NR);
    const void *Ap[QG_MR];
    float *Cp[QG_MR];
    float asl[QG_MR];
    /* my batch rows [r0, r1): all of them when splitting hidden units */
    const ptrdiff_t r0 = by_rows ? tid * B / nt : 0, r1 = by_rows ? (tid + 1) * B / nt : B;
    const ptrdiff_t nr = r1 - r0, NQ = T * nr;   /* my projection rows: (t, b), b in [r0, r1) */
    /* Row strides of the shared xprep / xproj, the same for every run: split by rows, a
     * thread may already be in the next layer while another is still in this one, and
     * each must stay within its own rows. */
    const size_t xs = W->rbx_max;
    const ptrdiff_t ps = W->ghp_max;
    for (int r = 0; r < S->n_runs; ++r) {
        const qg_run *R = &S->runs[r];
        const int G = R->G;
        const ptrdiff_t KI = R->Kin, H = R->H, nblk = (H + QG_NR - 1) / QG_NR;
        const ptrdiff_t Kpi = qg_round4(KI), Kph = qg_round4(H);
        const size_t rbh = qg_row_bytes(Kph);
        const size_t pbx = qg_panel_bytes(S->fmt, Kpi), pbh = qg_panel_bytes(S->fmt, Kph);
        const int kind_x = qg_a_kind(S->fmt, S->isa, S->dyn_ih);
        const int kind_h = qg_a_kind(S->fmt, S->isa, S->dyn_hh);
        const qg_kernel kx = qg_pick(S->isa, S->fmt, S->dyn_ih);
        const qg_kernel kh = qg_pick(S->isa, S->fmt, S->dyn_hh);
        const float *X = R->in_layer < 0 ? S->x : S->ys[R->in_layer];
        float *Y = S->ys[R->layer];
        const ptrdiff_t os = R->out_stride, oc = R->out_col;
        /* my unit blocks [u0, u1): all of them when splitting batch rows */
        const ptrdiff_t u0 = by_rows ? 0 : tid * nblk / nt;
        const ptrdiff_t u1 = by_rows ? nblk : (tid + 1) * nblk / nt;
        const ptrdiff_t unit0 = u0 * QG_NR, unit1 = u1 * QG_NR < H ? u1 * QG_NR : H;
        const ptrdiff_t ug = G >= QG_NP ? 1 : QG_NP / G;   /* unit blocks per kernel call */
#define QG_MY_ROW(q) (((q) / nr) * B + r0 + (q) % nr)

        /* 1. prepare the input rows: by units, every row, split between the threads
         * (then a barrier); by rows, my own rows, which only I read */
        if (by_rows) {
            for (ptrdiff_t q = 0; q < NQ; ++q) {
                const ptrdiff_t row = QG_MY_ROW(q);
                qg_prepare(S->isa, kind_x, X + row * KI, KI, Kpi, W->xprep + row * xs, &W->ascx[row]);
            }
        } else {
            for (ptrdiff_t row = tid * TB / nt; row < (tid + 1) * TB / nt; ++row)
                qg_prepare(S->isa, kind_x, X + row * KI, KI, Kpi, W->xprep + row * xs, &W->ascx[row]);
            fastrnn_barrier();
        }
        if (R->cell == QG_LSTM)   /* my part of c from c0 (by units after the barrier, by rows
                                     my own rows: no other thread reads them) */
            for (ptrdiff_t b = r0; b < r1; ++b)
                for (ptrdiff_t k = unit0; k < unit1; ++k)
                    W->cwork[b * H + k] = R->c0 ? R->c0[S->rows_in[b] * H + k] : 0.0f;

        /* 2. input projection of my rows for my blocks: runs of up to QG_NP consecutive panels */
        for (ptrdiff_t p = u0 * G; p < u1 * G; p += QG_NP) {
            const int np = u1 * G - p < QG_NP ? (int)(u1 * G - p) : QG_NP;
            const unsigned char *panel = (const unsigned char *)R->w_ih + p * pbx;
            for (ptrdiff_t q0 = 0; q0 < NQ; q0 += QG_MR) {
                int m = NQ - q0 < QG_MR ? (int)(NQ - q0) : QG_MR;
                for (int i = 0; i < m; ++i) {
                    const ptrdiff_t row = QG_MY_ROW(q0 + i);
                    Ap[i] = W->xprep + row * xs;
                    Cp[i] = W->xproj + row * ps + p * QG_NR;
                    asl[i] = W->ascx[row];
                }
                kx(m, np, Kpi, Ap, panel, pbx, Cp, R->s_ih ? R->s_ih + p * QG_NR : NULL,
                   R->z_ih ? R->z_ih + p * QG_NR : NULL, asl);
                if (R->b_x)
                    for (int i = 0; i < m; ++i)
                        for (int j = 0; j < np * QG_NR; ++j) Cp[i][j] += R->b_x[p * QG_NR + j];
            }
        }
#undef QG_MY_ROW

        /* 3. the recurrence */
        for (ptrdiff_t s = 0; s < T; ++s) {
            const ptrdiff_t t = R->reverse ? T - 1 - s : s;
            const ptrdiff_t tp = R->reverse ? t + 1 : t - 1;
            for (ptrdiff_t b = r0; b < r1; ++b) {
                hprev[b] = s == 0 ? (R->h0 ? R->h0 + S->rows_in[b] * H : NULL)
                                  : Y + (tp * B + b) * os + oc;
                if (u0 < u1)
                    qg_prepare(S->isa, kind_h, hprev[b], H, Kph, hprep + b * rbh, &asch[b]);
            }
            /* unit blocks in groups whose panels (u*G + g, consecutive) fill QG_NP:
             * one kernel call per group and batch tile, then each block's gate pass */
            for (ptrdiff_t u = u0; u < u1; u += ug) {
                const ptrdiff_t nu = u1 - u < ug ? u1 - u : ug;
                const unsigned char *panel = (const unsigned char *)R->w_hh + u * G * pbh;
                for (ptrdiff_t b0 = r0; b0 < r1; b0 += QG_MR) {
                    int m = r1 - b0 < QG_MR ? (int)(r1 - b0) : QG_MR;
                    for (int i = 0; i < m; ++i) {
                        Ap[i] = hprep + (b0 + i) * rbh;
                        Cp[i] = rec + (b0 + i) * QG_NP * QG_NR;
                    }
                    kh(m, (int)(nu * G), Kph, Ap, panel, pbh, Cp,
                       R->s_hh ? R->s_hh + u * G * QG_NR : NULL,
                       R->z_hh ? R->z_hh + u * G * QG_NR : NULL, asch + b0);
                }
                for (ptrdiff_t v = u; v < u + nu; ++v) {
                    const ptrdiff_t ucol = v * QG_NR;
                    const int nj = H - ucol < QG_NR ? (int)(H - ucol) : QG_NR;
                    for (ptrdiff_t b = r0; b < r1; ++b) {
                        const float *xp = W->xproj + (t * B + b) * ps + v * G * QG_NR;
                        qg_point(S->isa, R->cell, xp, rec + b * QG_NP * QG_NR + (v - u) * G * QG_NR,
                                 R->cell == QG_LSTM ? W->cwork + b * H + ucol : NULL,
                                 R->b_hn ? R->b_hn + ucol : NULL,
                                 hprev[b] ? hprev[b] + ucol : NULL,
                                 Y + (t * B + b) * os + oc + ucol, nj);
                    }
                }
            }
            if (!by_rows)   /* the next step reads every unit of h_t */
                fastrnn_barrier();
        }
        /* final states of my rows and units */
        const ptrdiff_t tl = R->reverse ? 0 : T - 1;
        for (ptrdiff_t b = r0; b < r1 && unit1 > unit0; ++b) {
            if (R->hn)
                memcpy(R->hn + S->rows_out[b] * H + unit0, Y + (tl * B + b) * os + oc + unit0,
                       (size_t)(unit1 - unit0) * sizeof(float));
            if (R->cn)
                memcpy(R->cn + S->rows_out[b] * H + unit0, W->cwork + b * H + unit0,
                       (size_t)(unit1 - unit0) * sizeof(float));
        }
    }
}

/* Do nt threads split B batch rows (1) or hidden units (0)? */
static int qg_split_by_rows(ptrdiff_t B, int nt, int row_split_min)
{
    return nt > 1 && row_split_min > 0 && B >= (ptrdiff_t)nt * row_split_min;
}

/* Run the stack. Returns 0, or -1 when out of memory. */
static int qg_stack_forward(const qg_stack *S)
{
    const ptrdiff_t TB = S->T * S->B;
    qg_work W;
    ptrdiff_t hmax = 1;
    W.rbx_max = W.rbh_max = 64;
    W.ghp_max = 16;
    for (int r = 0; r < S->n_runs; ++r) {
        const qg_run *R = &S->runs[r];
        ptrdiff_t nblk = (R->H + QG_NR - 1) / QG_NR;
        size_t rx = qg_row_bytes(qg_round4(R->Kin)), rh = qg_row_bytes(qg_round4(R->H));
        if (rx > W.rbx_max) W.rbx_max = rx;
        if (rh > W.rbh_max) W.rbh_max = rh;
        if (nblk * R->G * QG_NR > W.ghp_max) W.ghp_max = nblk * R->G * QG_NR;
        if (R->H > hmax) hmax = R->H;
    }
    int nt = S->n_threads < 1 ? 1 : S->n_threads;
    W.split_rows = qg_split_by_rows(S->B, nt, S->row_split_min);
    W.per_thread = qg_align((size_t)S->B * W.rbh_max) + qg_align((size_t)S->B * 4)
                   + qg_align((size_t)S->B * QG_NP * QG_NR * sizeof(float))
                   + qg_align((size_t)S->B * sizeof(void *));
    size_t sx = qg_align((size_t)TB * W.rbx_max), sa = qg_align((size_t)TB * 4);
    size_t sp = qg_align((size_t)TB * W.ghp_max * 4), sc = qg_align((size_t)S->B * hmax * 4);
    unsigned char *mem = (unsigned char *)fastrnn_scratch_alloc(sx + sa + sp + sc + nt * W.per_thread);
    if (!mem) return -1;
    W.xprep = mem;
    W.ascx = (float *)(mem + sx);
    W.xproj = (float *)(mem + sx + sa);
    W.cwork = (float *)(mem + sx + sa + sp);
    W.thread = mem + sx + sa + sp + sc;
    if (nt == 1) {
        qg_stack_body(S, &W, 0, 1);
    } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
        qg_stack_body(S, &W, omp_get_thread_num(), omp_get_num_threads());
#else
        qg_stack_body(S, &W, 0, 1);
#endif
    }
    fastrnn_scratch_free(mem);
    return 0;
}

/* y (M, N) = x (M, K) W^T + bias, W packed in natural row order (panel p: rows 16p..). */
static int qg_linear_forward(int isa, int fmt, int dyn, ptrdiff_t M, ptrdiff_t K, ptrdiff_t N,
                             const float *x, float *y, const void *w, const float *ws,
                             const int32_t *wz, const float *bias, int n_threads)
{
    const ptrdiff_t Kp = qg_round4(K), np_ = (N + QG_NR - 1) / QG_NR;
    const size_t rb = qg_row_bytes(Kp), pb = qg_panel_bytes(fmt, Kp);
    const int kind = qg_a_kind(fmt, isa, dyn);
    const qg_kernel kern = qg_pick(isa, fmt, dyn);
    size_t sx = qg_align((size_t)M * rb);
    unsigned char *mem = (unsigned char *)fastrnn_scratch_alloc(sx + qg_align((size_t)M * 4));
    if (!mem) return -1;
    float *asc = (float *)(mem + sx);
    int nt = n_threads < 1 ? 1 : n_threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        int tid = fastrnn_thread_num(), team = fastrnn_team_size();
        float tmp[QG_MR][QG_NP * QG_NR];
        const void *Ap[QG_MR];
        float *Cp[QG_MR];
        for (int i = 0; i < QG_MR; ++i) Cp[i] = tmp[i];
        for (ptrdiff_t r = tid * M / team; r < (tid + 1) * M / team; ++r)
            qg_prepare(isa, kind, x + r * K, K, Kp, mem + r * rb, &asc[r]);
        fastrnn_barrier();
        /* split panels when there are enough, else rows */
        int by_panels = np_ >= team;
        ptrdiff_t p0 = by_panels ? tid * np_ / team : 0, p1 = by_panels ? (tid + 1) * np_ / team : np_;
        ptrdiff_t r0 = by_panels ? 0 : tid * M / team, r1 = by_panels ? M : (tid + 1) * M / team;
        for (ptrdiff_t p = p0; p < p1; p += QG_NP) {
            const int npg = p1 - p < QG_NP ? (int)(p1 - p) : QG_NP;
            const ptrdiff_t c0 = p * QG_NR;
            const int nc = N - c0 < npg * QG_NR ? (int)(N - c0) : npg * QG_NR;
            for (ptrdiff_t i0 = r0; i0 < r1; i0 += QG_MR) {
                int m = r1 - i0 < QG_MR ? (int)(r1 - i0) : QG_MR;
                for (int i = 0; i < m; ++i) Ap[i] = mem + (i0 + i) * rb;
                kern(m, npg, Kp, Ap, (const unsigned char *)w + p * pb, pb, Cp,
                     ws ? ws + c0 : NULL, wz ? wz + c0 : NULL, asc + i0);
                for (int i = 0; i < m; ++i)
                    for (int j = 0; j < nc; ++j)
                        y[(i0 + i) * N + c0 + j] = tmp[i][j] + (bias ? bias[c0 + j] : 0.0f);
            }
        }
    }
    fastrnn_scratch_free(mem);
    return 0;
}

#endif
