/* y[t, o] = sum_j w[o, j] * x[t, j] over 4-bit weights in GGUF Q4_1's layout (kernels.h): the
 * decode-time product of a weight-only 4-bit model.
 *
 * At 0.625 bytes a weight (nibbles plus a float16 scale and min per 32) a decode step reads a
 * quarter of a bf16 model's bytes, so the work per byte decides here, not the memory alone. Each
 * group's 16 possible weights q * scale + min are made once (one multiply-add) as a table, and the
 * nibbles pick from it in registers (AVX512: one permute per 16 weights), so the sums are over the
 * dequantized weights themselves, in float32, as x @ W.T would make them (AVX2 splits a group's
 * sum in two, see below). A token's sums run over j in one order (16 lanes or 8, reduced the same
 * way) whatever the number of tokens or rows a call has, so a row of a batch gets the bits it gets
 * alone.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "helpers.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 32             /* weights per 16 packed bytes */
#define CHUNK 32             /* groups whose scales and mins are widened at once (a multiple of 16) */
#define ROWS 4               /* rows one pass reads together */
#define TOKEN_STEP 4         /* tokens one pass serves: ROWS * TOKEN_STEP sums fill the registers */

#if defined(__AVX512F__)
typedef __m512 vec;
typedef __m512 tab_t; /* the group's 16 weights q * scale + min (q = 0..15), one per lane */
#define vzero _mm512_setzero_ps
#define vsum _mm512_reduce_add_ps

static inline tab_t table(float scale, float min) {
    const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_fmadd_ps(q, _mm512_set1_ps(scale), _mm512_set1_ps(min));
}

/* The 32 weights of one 16-byte block: w[0] = weights 0..15 (low nibbles), w[1] = 16..31. The
 * permute reads only the low 4 bits of each lane, so the low nibble needs no mask. */
typedef struct {
    __m512 w[2];
} block_t;

static inline block_t weights(const uint8_t *block, tab_t tab) {
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)block));
    block_t b = {{_mm512_permutexvar_ps(bytes, tab), _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), tab)}};
    return b;
}

/* acc += the block's weights * x[0..31], lanes of 16 in weight order: the order every path keeps */
static inline vec block_fma(const block_t *b, const float *x, vec acc) {
    acc = _mm512_fmadd_ps(b->w[0], _mm512_loadu_ps(x), acc);
    return _mm512_fmadd_ps(b->w[1], _mm512_loadu_ps(x + 16), acc);
}

#elif defined(__AVX2__)
/* Eight lanes hold no 16-entry table, and widening each nibble and scaling it costs more than the
 * product itself: here a group's sum is split as scale * sum(q x) + min * sum(x), the codes q
 * multiplied as they are and sum(x) a group made once a call (the same value, summed in another
 * order: within float32's rounding of the AVX512 path's). */
#define GROUP_SPLIT 1
typedef __m256 vec;
typedef __m256 tab_t; /* the group's scale in every lane */
#define vzero _mm256_setzero_ps

static inline float vsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline tab_t table(float scale, float min) {
    (void)min;
    return _mm256_set1_ps(scale);
}

typedef struct {
    __m256 w[4];
} block_t;

/* codes 0..7, 8..15 (low nibbles of bytes 0..15), 16..23, 24..31 (high nibbles), as floats */
static inline block_t weights(const uint8_t *block, tab_t tab) {
    (void)tab;
    __m128i bytes = _mm_loadu_si128((const __m128i *)block), nibble = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
    __m128i q[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    block_t b;
    for (int i = 0; i < 4; i++) b.w[i] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q[i]));
    return b;
}

static inline vec block_fma(const block_t *b, const float *x, vec acc) {
    for (int i = 0; i < 4; i++) acc = _mm256_fmadd_ps(b->w[i], _mm256_loadu_ps(x + 8 * i), acc);
    return acc;
}
#endif
#ifndef GROUP_SPLIT
#define GROUP_SPLIT 0
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
#define VECTOR 1

/* scale[k], min[k] of the n (<= CHUNK) groups from index `at` on, as float32: many at a time (a
 * scalar conversion a group would cost as much as the group's own products) */
static inline void widen_groups(const uint16_t *scales, const uint16_t *mins, size_t at, int n, float *scale,
                                float *min) {
    int k = 0;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    for (; k < n; k += 16) { /* CHUNK is a multiple of 16: a masked last sixteen stays inside the arrays */
        __mmask16 take = n - k >= 16 ? 0xFFFF : (__mmask16)((1u << (n - k)) - 1);
        _mm512_storeu_ps(scale + k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(take, scales + at + k)));
        _mm512_storeu_ps(min + k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(take, mins + at + k)));
    }
#elif defined(__F16C__)
    for (; k + 8 <= n; k += 8) {
        _mm256_storeu_ps(scale + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + at + k))));
        _mm256_storeu_ps(min + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mins + at + k))));
    }
    for (; k < n; k++) scale[k] = _cvtsh_ss(scales[at + k]), min[k] = _cvtsh_ss(mins[at + k]);
#endif
    for (; k < n; k++) scale[k] = sg_half_to_float(scales[at + k]), min[k] = sg_half_to_float(mins[at + k]);
}

/* sums[r * tokens + t] = row (o + r) . xt[t] for `rows` rows and `tokens` tokens, each pair's sum
 * in a register of its own: a block's weights are made once for every token, a block of x loaded
 * once for every row. `blocks` = group / BLOCK. The counts are constants where this is inlined (the
 * loops unroll; Q4_1's one block a group loses its inner loop), and every pair is summed in the
 * same order whatever the counts, so a row of a batch gets the bits it gets alone. */
static inline __attribute__((always_inline)) void tile(const uint8_t *packed, const uint16_t *scales,
                                                       const uint16_t *mins, int group, int blocks, int in, int o,
                                                       int rows, const float *const *xt, const float *const *xg,
                                                       int tokens, float *sums) {
    (void)xg; /* read only where GROUP_SPLIT */
    int groups = in / group;
    size_t row_bytes = (size_t)in / 2;
    vec acc[ROWS][TOKEN_STEP], part[ROWS][TOKEN_STEP];
    float scale[ROWS][CHUNK], min[ROWS][CHUNK], by_min[ROWS][TOKEN_STEP] = {{0.0f}};
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int t = 0; t < tokens; t++) acc[r][t] = vzero();
    for (int g0 = 0; g0 < groups; g0 += CHUNK) {
        int n = groups - g0 < CHUNK ? groups - g0 : CHUNK;
        for (int r = 0; r < rows; r++) widen_groups(scales, mins, (size_t)(o + r) * groups + g0, n, scale[r], min[r]);
        for (int k = 0; k < n; k++) {
            tab_t tab[ROWS];
#pragma GCC unroll 4
            for (int r = 0; r < rows; r++) {
                tab[r] = table(scale[r][k], min[r][k]);
#pragma GCC unroll 4
                for (int t = 0; t < tokens; t++) part[r][t] = GROUP_SPLIT ? vzero() : acc[r][t];
            }
            for (int b = 0; b < blocks; b++) {
                size_t j = (size_t)(g0 + k) * group + (size_t)b * BLOCK;
#pragma GCC unroll 4
                for (int r = 0; r < rows; r++) {
                    block_t w = weights(packed + (size_t)(o + r) * row_bytes + j / 2, tab[r]);
#pragma GCC unroll 4
                    for (int t = 0; t < tokens; t++) part[r][t] = block_fma(&w, xt[t] + j, part[r][t]);
                }
            }
#pragma GCC unroll 4
            for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
                for (int t = 0; t < tokens; t++) {
#if GROUP_SPLIT
                    acc[r][t] = _mm256_fmadd_ps(tab[r], part[r][t], acc[r][t]);
                    by_min[r][t] += min[r][k] * xg[t][g0 + k];
#else
                    acc[r][t] = part[r][t];
#endif
                }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int t = 0; t < tokens; t++) sums[r * tokens + t] = vsum(acc[r][t]) + by_min[r][t];
}

/* The tile for these counts, made with them as constants. Four rows share each load of x: with more
 * tokens a pass, x (tokens * in floats) outgrows the L1 cache and its reloads decide the speed. */
static void run_tile(const uint8_t *packed, const uint16_t *scales, const uint16_t *mins, int group, int in, int o,
                     int rows, const float *const *xt, const float *const *xg, int tokens, float *sums) {
#define TILE(B, R, T) tile(packed, scales, mins, group, B, in, o, R, xt, xg, T, sums)
    switch ((group == BLOCK) * 256 + rows * 16 + tokens) {
    case 256 + 4 * 16 + 1: TILE(1, 4, 1); break;
    case 256 + 4 * 16 + 2: TILE(1, 4, 2); break;
    case 256 + 4 * 16 + 4: TILE(1, 4, 4); break;
    case 4 * 16 + 1: TILE(group / BLOCK, 4, 1); break;
    case 4 * 16 + 2: TILE(group / BLOCK, 4, 2); break;
    case 4 * 16 + 4: TILE(group / BLOCK, 4, 4); break;
    case 256 + 1 * 16 + 1: case 1 * 16 + 1: TILE(group / BLOCK, 1, 1); break;
    case 256 + 1 * 16 + 2: case 1 * 16 + 2: TILE(group / BLOCK, 1, 2); break;
    default: TILE(group / BLOCK, 1, 4); break;
    }
#undef TILE
}

/* Rows o .. o + rows - 1 for every token, TOKEN_STEP tokens a pass (the rows' weights stay in the
 * cache between passes); a last pass of fewer takes the next count of 1, 2 or 4, its missing
 * tokens repeating token 0 and dropped. */
static void rows_all_tokens(const uint8_t *packed, const uint16_t *scales, const uint16_t *mins, int group, int in,
                            int o, int rows, const float *x, const float *x_groups, int tokens, float *y,
                            int y_stride) {
    for (int t0 = 0; t0 < tokens; t0 += TOKEN_STEP) {
        int left = tokens - t0, step = left > 2 ? 4 : left;
        const float *xt[TOKEN_STEP], *xg[TOKEN_STEP];
        float sums[ROWS * TOKEN_STEP];
        for (int t = 0; t < step; t++) {
            size_t token = (size_t)(t < left ? t0 + t : 0);
            xt[t] = x + token * in, xg[t] = x_groups + token * (in / group);
        }
        run_tile(packed, scales, mins, group, in, o, rows, xt, xg, step, sums);
        for (int r = 0; r < rows; r++)
            for (int t = 0; t < step && t < left; t++) y[(size_t)(t0 + t) * y_stride + o + r] = sums[r * step + t];
    }
}
#else
/* Without vector units: each weight made as the vector paths make it, summed in order. */
static void row_tokens(const uint8_t *packed, const uint16_t *scales, const uint16_t *mins, int group, int in, int o,
                       const float *x, int tokens, float *y, int y_stride) {
    int groups = in / group;
    const uint8_t *row = packed + (size_t)o * (in / 2);
    for (int t = 0; t < tokens; t++) {
        const float *xt = x + (size_t)t * in;
        float acc = 0.0f;
        for (int g = 0; g < groups; g++) {
            float scale = sg_half_to_float(scales[(size_t)o * groups + g]);
            float min = sg_half_to_float(mins[(size_t)o * groups + g]);
            for (int j = g * group; j < (g + 1) * group; j += BLOCK)
                for (int i = 0; i < BLOCK; i++) {
                    uint8_t byte = row[j / 2 + i % 16];
                    acc += ((float)(i < 16 ? byte & 0x0F : byte >> 4) * scale + min) * xt[j + i];
                }
        }
        y[(size_t)t * y_stride + o] = acc;
    }
}
#endif

void sg_int4_rows(const uint8_t *packed, const uint16_t *scales, const uint16_t *mins, int group, int in, int o_begin,
                  int o_end, const float *x, int tokens, float *y, int y_stride) {
#ifdef VECTOR
    /* each token's sum of x over each group (GROUP_SPLIT's second term), once for all the rows */
    int groups = in / group;
    float x_groups[GROUP_SPLIT ? tokens * groups : 1]; /* 2 bytes an input at 16 tokens: on the stack */
    for (int t = 0; GROUP_SPLIT && t < tokens; t++)
        for (int g = 0; g < groups; g++) {
            const float *xs = x + (size_t)t * in + (size_t)g * group;
            float sum = 0.0f;
            for (int j = 0; j < group; j++) sum += xs[j];
            x_groups[t * groups + g] = sum;
        }
    int o = o_begin;
    for (; o + ROWS <= o_end; o += ROWS)
        rows_all_tokens(packed, scales, mins, group, in, o, ROWS, x, x_groups, tokens, y, y_stride);
    for (; o < o_end; o++) rows_all_tokens(packed, scales, mins, group, in, o, 1, x, x_groups, tokens, y, y_stride);
#else
    for (int o = o_begin; o < o_end; o++) row_tokens(packed, scales, mins, group, in, o, x, tokens, y, y_stride);
#endif
}

/* The product for modules: x (tokens, in) float32 or bf16 in, y (tokens, out) in x's dtype, rows
 * split across OpenMP threads in contiguous ranges. Returns 0, or 1 when the input does not fit
 * the kernel (tokens, group) or memory runs out. */
int sg_int4_linear(const void *x, void *y, int bf16, int tokens, int in, int out, const uint8_t *packed,
                   const uint16_t *scales, const uint16_t *mins, int group) {
    if (tokens < 1 || tokens > SG_MAX_TOKENS || group < BLOCK || group % BLOCK || in % group) return 1;
    static __thread float *xf = NULL, *yf = NULL;
    static __thread size_t x_capacity = 0, y_capacity = 0;
    size_t x_floats = (size_t)tokens * in, y_floats = (size_t)tokens * out;
    const float *xs = (const float *)x;
    if (bf16) {
        if (!sg_scratch(&xf, &x_capacity, x_floats)) return 1;
        sg_widen_row(x, 1, x_floats, xf);
        xs = xf;
    }
    float *ys = (float *)y; /* float32 output is written in place; bf16 goes through a float32 copy */
    if (bf16 && !(ys = sg_scratch(&yf, &y_capacity, y_floats))) return 1;
    size_t weight_bytes = (size_t)out * in / 2 + (size_t)out * (in / group) * 4;
#pragma omp parallel if (weight_bytes >= SG_PARALLEL_BYTES)
    {
        int threads = 1, me = 0, begin, end;
#ifdef _OPENMP
        threads = omp_get_num_threads(), me = omp_get_thread_num();
#endif
        sg_split_rows(out, me, threads, &begin, &end);
        if (begin < end) sg_int4_rows(packed, scales, mins, group, in, begin, end, xs, tokens, ys, out);
        if (bf16)
            for (int t = 0; t < tokens; t++)
                for (int o = begin; o < end; o++)
                    sg_store(y, 1, (size_t)t * out + o, ys[(size_t)t * out + o]);
    }
    return 0;
}
