/* y[t, o] = sum_j w[o, j] * x[t, j] for a few tokens t: the decode-time matrix-vector product.
 *
 * A decode step reads every weight once for one token a row, so it is bound by memory, and the
 * BLAS kernels torch calls for 16-bit weights reach about half of what the memory gives on small
 * CPUs. Here each thread streams its share of rows, widens 16-bit weights to float32 in registers
 * (bf16: a shift; fp16: F16C) and keeps four rows' multiply-adds in flight; the sums are float32.
 * AVX512 loads 16 weights an instruction, twice AVX2's 8, which is what 16-bit weights need to be
 * read at the memory's speed (AVX2: ~15 GB/s, here ~28, measured).
 *
 * x and y are float32 or bfloat16 (bf16 = the upper half of a float32, rounded to nearest even);
 * w is float32 (kind 0), bfloat16 (1) or float16 (2), row-major (out_features, in_features).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "kernels.h"
#include "helpers.h"

#define MAX_TOKENS SG_MAX_TOKENS

/* out[r] = row (o + r) . x for four consecutive rows and one token: the common decode case, its
 * four sums kept in registers. Summed in the very order of rows_dot, so that a row of a batch gets
 * the bits it gets alone. */
static void four_rows_dot(const void *w, int kind, int o, int n, const float *x, float *out) {
    int j = 0;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    size_t r0 = (size_t)o * n, r1 = r0 + n, r2 = r1 + n, r3 = r2 + n;
    const char *next = (const char *)w + (r0 + 8 * (size_t)n) * (kind == 0 ? 4 : 2);
    size_t esz = kind == 0 ? 4 : 2;
    for (; j + 16 <= n; j += 16) {
        __m512 xv = _mm512_loadu_ps(x + j);
        _mm_prefetch(next + j * esz, _MM_HINT_T1);
        _mm_prefetch(next + (n + j) * esz, _MM_HINT_T1);
        _mm_prefetch(next + (2 * n + j) * esz, _MM_HINT_T1);
        _mm_prefetch(next + (3 * n + j) * esz, _MM_HINT_T1);
        a0 = _mm512_fmadd_ps(sg_load16(w, kind, r0 + j), xv, a0);
        a1 = _mm512_fmadd_ps(sg_load16(w, kind, r1 + j), xv, a1);
        a2 = _mm512_fmadd_ps(sg_load16(w, kind, r2 + j), xv, a2);
        a3 = _mm512_fmadd_ps(sg_load16(w, kind, r3 + j), xv, a3);
    }
    out[0] = _mm512_reduce_add_ps(a0), out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2), out[3] = _mm512_reduce_add_ps(a3);
#elif defined(__AVX2__)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    size_t r0 = (size_t)o * n, r1 = r0 + n, r2 = r1 + n, r3 = r2 + n;
    for (; j + 8 <= n; j += 8) {
        __m256 xv = _mm256_loadu_ps(x + j);
        a0 = _mm256_fmadd_ps(sg_load8(w, kind, r0 + j), xv, a0);
        a1 = _mm256_fmadd_ps(sg_load8(w, kind, r1 + j), xv, a1);
        a2 = _mm256_fmadd_ps(sg_load8(w, kind, r2 + j), xv, a2);
        a3 = _mm256_fmadd_ps(sg_load8(w, kind, r3 + j), xv, a3);
    }
    out[0] = sg_hsum8(a0), out[1] = sg_hsum8(a1), out[2] = sg_hsum8(a2), out[3] = sg_hsum8(a3);
#else
    out[0] = out[1] = out[2] = out[3] = 0.0f;
#endif
    for (; j < n; j++)
        for (int r = 0; r < 4; r++) out[r] += sg_load(w, kind, (size_t)(o + r) * n + j) * x[j];
}

#if defined(__AVX512F__)
/* out[r] = row (o + r) . x for eight consecutive rows and one token: twice four_rows_dot's loads in
 * flight (one core's loads, not the memory, bound a decode product), each row summed exactly as
 * there, so a row's bits do not depend on the block it falls in. */
static void eight_rows_dot(const void *w, int kind, int o, int n, const float *x, float *out) {
    size_t esz = kind == 0 ? 4 : 2, r0 = (size_t)o * n;
    const char *next = (const char *)w + (r0 + 16 * (size_t)n) * esz; /* two blocks ahead */
    __m512 a[8];
    for (int r = 0; r < 8; r++) a[r] = _mm512_setzero_ps();
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 xv = _mm512_loadu_ps(x + j);
        for (int r = 0; r < 8; r++) {
            _mm_prefetch(next + (r * (size_t)n + j) * esz, _MM_HINT_T1);
            a[r] = _mm512_fmadd_ps(sg_load16(w, kind, r0 + r * (size_t)n + j), xv, a[r]);
        }
    }
    for (int r = 0; r < 8; r++) out[r] = _mm512_reduce_add_ps(a[r]);
    for (; j < n; j++)
        for (int r = 0; r < 8; r++) out[r] += sg_load(w, kind, r0 + r * (size_t)n + j) * x[j];
}
#endif

/* sums[r * TOKENS + t] = row (o + r) . x[t] for ROWS consecutive rows and TOKENS tokens, each
 * pair's sum in a register of its own (ROWS * TOKENS <= 16 of them), so that a weight vector,
 * widened once, serves every token and a vector of x every row: a batch's rows cost arithmetic,
 * not another read of the weights. Each pair is summed in the very order of four_rows_dot, so a
 * row of a batch gets the bits it gets alone. Inlined with the counts as constants (the loops
 * unroll and the sums stay in registers). */
static inline __attribute__((always_inline)) void tile_dot(const void *w, int kind, int o, int n,
                                                           const float *const *x, float *sums, const int ROWS,
                                                           const int TOKENS) {
    int j = 0;
#if defined(__AVX512F__)
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TOKENS; t++) acc[r][t] = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        __m512 xv[4];
#pragma GCC unroll 4
        for (int t = 0; t < TOKENS; t++) xv[t] = _mm512_loadu_ps(x[t] + j);
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) {
            __m512 wv = sg_load16(w, kind, (size_t)(o + r) * n + j);
#pragma GCC unroll 4
            for (int t = 0; t < TOKENS; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TOKENS; t++) sums[r * TOKENS + t] = _mm512_reduce_add_ps(acc[r][t]);
#elif defined(__AVX2__)
    __m256 acc[4][3];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TOKENS; t++) acc[r][t] = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) {
            __m256 wv = sg_load8(w, kind, (size_t)(o + r) * n + j);
#pragma GCC unroll 4
            for (int t = 0; t < TOKENS; t++) acc[r][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[t] + j), acc[r][t]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TOKENS; t++) sums[r * TOKENS + t] = sg_hsum8(acc[r][t]);
#else
    for (int r = 0; r < ROWS; r++)
        for (int t = 0; t < TOKENS; t++) sums[r * TOKENS + t] = 0.0f;
#endif
    for (; j < n; j++)
        for (int r = 0; r < ROWS; r++) {
            float wv = sg_load(w, kind, (size_t)(o + r) * n + j);
            for (int t = 0; t < TOKENS; t++) sums[r * TOKENS + t] += wv * x[t][j];
        }
}

#ifdef __AVX512BF16__
/* tile_dot for bfloat16 weights and bfloat16 x (a bf16 model's activations are bf16 values): one
 * instruction multiplies 32 pairs, each product exact in float32, and adds them into 16 lanes in
 * a fixed order (odd then even element), twice the multiply-adds an instruction of the float32
 * path and no widening. Every count of rows and tokens sums a pair in the same order, so a row of
 * a batch gets the bits it gets alone. The weights 2 * ROWS rows ahead are prefetched. */
static inline __attribute__((always_inline)) void bf16_tile_dot(const uint16_t *w, int o, int n,
                                                                const uint16_t *const *x, float *sums,
                                                                const int ROWS, const int TOKENS) {
    __m512 acc[8][4];
    const uint16_t *row = w + (size_t)o * n;
    const char *next = (const char *)(row + 2 * (size_t)ROWS * n);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TOKENS; t++) acc[r][t] = _mm512_setzero_ps();
    int j = 0;
    for (; j + 32 <= n; j += 32) {
        __m512bh xv[4];
#pragma GCC unroll 4
        for (int t = 0; t < TOKENS; t++) xv[t] = (__m512bh)_mm512_loadu_si512(x[t] + j);
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; r++) {
            _mm_prefetch(next + ((size_t)r * n + j) * 2, _MM_HINT_T1);
            __m512bh wv = (__m512bh)_mm512_loadu_si512(row + (size_t)r * n + j);
#pragma GCC unroll 4
            for (int t = 0; t < TOKENS; t++) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TOKENS; t++) sums[r * TOKENS + t] = _mm512_reduce_add_ps(acc[r][t]);
    for (; j < n; j++)
        for (int r = 0; r < ROWS; r++) {
            float wv = sg_load(w, 1, (size_t)(o + r) * n + j);
            for (int t = 0; t < TOKENS; t++) sums[r * TOKENS + t] += wv * sg_load(x[t], 1, j);
        }
}

/* Rows [o_begin, o_end) of bf16 weights for every token of bf16 x: eight rows a pass for one
 * token (its loads in flight), four rows by four tokens otherwise. */
static void bf16_rows(const uint16_t *w, int in, int o_begin, int o_end, const uint16_t *x, int tokens, float *y,
                      int y_stride) {
    int o = o_begin;
    float sums[32];
    const uint16_t *xt[4];
    if (tokens == 1) {
        xt[0] = x;
        for (; o + 8 <= o_end; o += 8) {
            bf16_tile_dot(w, o, in, xt, sums, 8, 1);
            for (int r = 0; r < 8; r++) y[o + r] = sums[r];
        }
    }
    for (; o < o_end; o += 4) {
        int rows = o_end - o < 4 ? o_end - o : 4;
        for (int t0 = 0; t0 < tokens; t0 += 4) {
            int step = tokens - t0 < 4 ? tokens - t0 : 4;
            for (int t = 0; t < step; t++) xt[t] = x + (size_t)(t0 + t) * in;
            if (rows == 4 && step == 4) bf16_tile_dot(w, o, in, xt, sums, 4, 4);
            else if (rows == 4 && step == 3) bf16_tile_dot(w, o, in, xt, sums, 4, 3);
            else if (rows == 4 && step == 2) bf16_tile_dot(w, o, in, xt, sums, 4, 2);
            else if (rows == 4) bf16_tile_dot(w, o, in, xt, sums, 4, 1);
            else
                for (int r = 0; r < rows; r++)
                    for (int t = 0; t < step; t++) bf16_tile_dot(w, o + r, in, xt + t, sums + r * step + t, 1, 1);
            for (int r = 0; r < rows; r++)
                for (int t = 0; t < step; t++) y[(size_t)(t0 + t) * y_stride + o + r] = sums[r * step + t];
        }
    }
}
#endif

/* Tokens a tile serves at once: the registers hold ROWS * TILE_TOKENS sums (AVX2 has half the
 * registers of AVX512) */
#if defined(__AVX512F__)
#define TILE_TOKENS 4
#else
#define TILE_TOKENS 3
#endif

/* Rows o .. o + rows - 1 (rows <= 4) for every token, TILE_TOKENS tokens a pass (the rows'
 * weights stay in the L1 cache between passes) */
static void rows_dot(const void *w, int kind, int o, int rows, int n, const float *x, int tokens, float *y,
                     int y_stride) {
    for (int t0 = 0; t0 < tokens; t0 += TILE_TOKENS) {
        int step = tokens - t0 < TILE_TOKENS ? tokens - t0 : TILE_TOKENS;
        const float *xt[4];
        float sums[16];
        for (int t = 0; t < step; t++) xt[t] = x + (size_t)(t0 + t) * n;
#define TILE(R, T) tile_dot(w, kind, o, n, xt, sums, R, T)
        switch (rows * 8 + step) {
#if TILE_TOKENS > 3 /* AVX2's tiles hold three tokens' sums */
        case 4 * 8 + 4: TILE(4, 4); break;
#endif
        case 4 * 8 + 3: TILE(4, 3); break;
        case 4 * 8 + 2: TILE(4, 2); break;
        case 4 * 8 + 1: TILE(4, 1); break;
        default:
            for (int r = 0; r < rows; r++)
                for (int t = 0; t < step; t++) tile_dot(w, kind, o + r, n, xt + t, sums + r * step + t, 1, 1);
        }
#undef TILE
        for (int r = 0; r < rows; r++)
            for (int t = 0; t < step; t++) y[(size_t)(t0 + t) * y_stride + o + r] = sums[r * step + t];
    }
}



void sg_dense_rows(const void *w, int kind, int in, int o_begin, int o_end, const float *x, const uint16_t *x_bf16,
                   int tokens, float *y, int y_stride) {
#ifdef __AVX512BF16__
    if (x_bf16 && kind == 1) return bf16_rows(w, in, o_begin, o_end, x_bf16, tokens, y, y_stride);
#else
    (void)x_bf16;
#endif
    for (int o = o_begin; o < o_end; o += 4) {
        int rows = o_end - o < 4 ? o_end - o : 4;
        float sums[8];
#if defined(__AVX512F__)
        if (tokens == 1 && o_end - o >= 8) {
            eight_rows_dot(w, kind, o, in, x, sums);
            for (int r = 0; r < 8; r++) y[o + r] = sums[r];
            o += 4;
            continue;
        }
#endif
        if (tokens == 1 && rows == 4) {
            four_rows_dot(w, kind, o, in, x, sums);
            for (int r = 0; r < 4; r++) y[o + r] = sums[r];
        } else {
            rows_dot(w, kind, o, rows, in, x, tokens, y, y_stride);
        }
    }
}

const uint16_t *sg_bf16_copy(const float *x, size_t n) {
    static __thread float *buffer = NULL;
    static __thread size_t capacity = 0;
    if (!sg_scratch(&buffer, &capacity, n / 2 + 1)) return NULL;
    uint16_t *out = (uint16_t *)buffer;
    for (size_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, x + i, 4);
        out[i] = (uint16_t)(bits >> 16);
    }
    return out;
}

/* Returns 0, or 1 when the input does not fit the kernel (too many tokens) or memory runs out. */
int sg_dense_linear(const void *x, void *y, int bf16, int tokens, int in_features, int out_features, const void *w,
                    int kind) {
    if (tokens < 1 || tokens > MAX_TOKENS) return 1;
    static __thread float *xf = NULL, *yf = NULL;
    static __thread size_t x_capacity = 0, y_capacity = 0;
    size_t floats = (size_t)tokens * in_features, outs = (size_t)tokens * out_features;
    if (!sg_scratch(&xf, &x_capacity, floats) || !sg_scratch(&yf, &y_capacity, outs)) return 1;
    /* float32 x for every path (bf16 x also goes as it is: bf16 weights multiply it directly) */
    sg_widen_row(x, bf16, floats, xf);
    const float *xs = xf; /* the calling thread's buffers, shared by every thread below */
    float *ys = yf;
    size_t weight_bytes = (size_t)out_features * in_features * (kind == 0 ? 4 : 2);
#pragma omp parallel if (weight_bytes >= SG_PARALLEL_BYTES)
    {
        int begin, end;
        sg_split_rows(out_features, omp_get_thread_num(), omp_get_num_threads(), &begin, &end);
        if (begin < end)
            sg_dense_rows(w, kind, in_features, begin, end, xs, bf16 ? x : NULL, tokens, ys, out_features);
    }
    sg_store_row(y, bf16, outs, ys);
    return 0;
}
