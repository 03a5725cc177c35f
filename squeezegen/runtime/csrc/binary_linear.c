/* Decoding kernels for packed models, a few tokens per call, computing in float32.
 *
 * sg_binary_linears: binary linear layers from their packed signs (several reading one input: one call),
 *   y[t, o] = out_scale(t)[o] * sum_j sign[o, j] * in_scale(t)[j] * x[t, j]   (+ bias[o])
 * signs: 8 per byte along each row, bit j of byte b = column 8b + j, a set bit = +1 (packing.py).
 * Scales: none, static (OneBit), or a per-token mixture of E experts chosen by a softmax router
 * (BinaryMoS); OneBit's LayerNorm without affine parameters may follow. Each byte of signs selects
 * one row of a 256 x 8 table of +-1, multiplied into 8 inputs at once (FMA on AVX2), so a weight
 * costs one bit of memory traffic and an eighth of a multiply-add; four output rows go side by
 * side so that the multiply-adds do not wait on each other.
 *
 * x and y are float32 or bfloat16 (bf16 = the upper half of a float32); scales, router and bias
 * are float32. Rows are shared among OpenMP threads when the layer is big enough to pay for them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"
#include "kernels.h"

#define AHEAD 8 /* blocks of four rows prefetched ahead */

/* The calling thread's scratch (helpers.h), kept between calls. */
static float *scratch(size_t floats) {
    static __thread float *buffer = NULL;
    static __thread size_t capacity = 0;
    return sg_scratch(&buffer, &capacity, floats);
}

static size_t round8(size_t n) { return (n + 7) / 8 * 8; }

static float SIGNS[256][8] __attribute__((aligned(32)));
static int signs_ready = 0;

static void init_signs(void) {
    for (int b = 0; b < 256; b++)
        for (int j = 0; j < 8; j++) SIGNS[b][j] = (b >> j) & 1 ? 1.0f : -1.0f;
    signs_ready = 1;
}

static float dot(const float *a, const float *b, int n) {
    int i = 0;
    float total = 0.0f;
#ifdef __AVX2__
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; i + 32 <= n; i += 32)
        for (int k = 0; k < 4; k++)
            acc[k] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * k), _mm256_loadu_ps(b + i + 8 * k), acc[k]);
    for (; i + 8 <= n; i += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc[0]);
    __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    total = _mm_cvtss_f32(s);
#endif
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* sums[r] = sum_j sign[r, j] * xs[j] for `count` (<= 4) consecutive rows of nbytes bytes each */
static void signed_sums(const uint8_t *rows, int count, const float *xs, int nbytes, float *sums) {
#ifdef __AVX2__
    if (count == 4) {
        const uint8_t *r0 = rows, *r1 = rows + nbytes, *r2 = rows + 2 * nbytes, *r3 = rows + 3 * nbytes;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
        int g = 0;
        for (; g + 2 <= nbytes; g += 2) { /* two bytes a row at a time: eight independent sums */
            __m256 v = _mm256_load_ps(xs + 8 * g), w = _mm256_load_ps(xs + 8 * g + 8);
            a0 = _mm256_fmadd_ps(_mm256_load_ps(SIGNS[r0[g]]), v, a0);
            a1 = _mm256_fmadd_ps(_mm256_load_ps(SIGNS[r1[g]]), v, a1);
            a2 = _mm256_fmadd_ps(_mm256_load_ps(SIGNS[r2[g]]), v, a2);
            a3 = _mm256_fmadd_ps(_mm256_load_ps(SIGNS[r3[g]]), v, a3);
            b0 = _mm256_fmadd_ps(_mm256_load_ps(SIGNS[r0[g + 1]]), w, b0);
            b1 = _mm256_fmadd_ps(_mm256_load_ps(SIGNS[r1[g + 1]]), w, b1);
            b2 = _mm256_fmadd_ps(_mm256_load_ps(SIGNS[r2[g + 1]]), w, b2);
            b3 = _mm256_fmadd_ps(_mm256_load_ps(SIGNS[r3[g + 1]]), w, b3);
        }
        if (g < nbytes) {
            __m256 v = _mm256_load_ps(xs + 8 * g);
            a0 = _mm256_fmadd_ps(_mm256_load_ps(SIGNS[r0[g]]), v, a0);
            a1 = _mm256_fmadd_ps(_mm256_load_ps(SIGNS[r1[g]]), v, a1);
            a2 = _mm256_fmadd_ps(_mm256_load_ps(SIGNS[r2[g]]), v, a2);
            a3 = _mm256_fmadd_ps(_mm256_load_ps(SIGNS[r3[g]]), v, a3);
        }
        a0 = _mm256_add_ps(a0, b0), a1 = _mm256_add_ps(a1, b1), a2 = _mm256_add_ps(a2, b2), a3 = _mm256_add_ps(a3, b3);
        /* horizontal sums of the four accumulators at once */
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        return;
    }
#endif
    for (int r = 0; r < count; r++) {
        const uint8_t *row = rows + (size_t)r * nbytes;
        float total = 0.0f;
        for (int g = 0; g < nbytes; g++) {
            const float *sign = SIGNS[row[g]];
            for (int j = 0; j < 8; j++) total += sign[j] * xs[8 * g + j];
        }
        sums[r] = total;
    }
}


/* `count` binary layers that read the same input x (q/k/v, gate/up), in one parallel pass.
 * experts: 0 = no input scale and a single out_scale row (sign); otherwise in_scales / out_scales
 * hold `experts` rows (at most SG_MAX_EXPERTS), mixed by softmax(router . x) when a router is given
 * (one row: static). Per layer i: out_features[i], packed[i], in_scales[i], out_scales[i], routers[i] and
 * biases[i] (either may be NULL), ys[i]. Returns 0, or 1 when scratch memory ran out, 2 for
 * arguments out of range. */
int sg_binary_linears(int count, const void *x, void *const *ys, int bf16, int tokens, int in_features,
                      const int *out_features, const uint8_t *const *packed, const float *const *in_scales,
                      const float *const *out_scales, int experts, const float *const *routers,
                      const float *const *biases, int layernorm) {
    if (!signs_ready) init_signs();
    if (experts > SG_MAX_EXPERTS || count < 1 || count > SG_MAX_LAYERS) return 2;
    int nbytes = (in_features + 7) / 8, width = nbytes * 8, rows = experts > 0 ? experts : 1;
    /* per layer and token: the scaled input (padded to whole bytes), the output scales, the outputs */
    float *xs[SG_MAX_LAYERS] = {0}, *s_out[SG_MAX_LAYERS] = {0}, *yt[SG_MAX_LAYERS] = {0};
    int first[SG_MAX_LAYERS + 1] = {0}; /* the first block of four rows of each layer */
    size_t work = 0, floats = round8((size_t)tokens * in_features);
    for (int i = 0; i < count; i++) floats += (size_t)tokens * width + 2 * round8((size_t)tokens * out_features[i]);
    float *xf = scratch(floats); /* carved into 32-byte aligned pieces */
    int failed = !xf;
    float *next = failed ? NULL : xf + round8((size_t)tokens * in_features);
    for (int i = 0; i < count && !failed; i++) {
        xs[i] = next, next += (size_t)tokens * width;
        s_out[i] = next, next += round8((size_t)tokens * out_features[i]);
        yt[i] = next, next += round8((size_t)tokens * out_features[i]);
        first[i + 1] = first[i] + (out_features[i] + 3) / 4;
        work += (size_t)out_features[i] * nbytes;
    }
    if (!failed) sg_widen_row(x, bf16, (size_t)tokens * in_features, xf);
    for (int i = 0; i < count && !failed; i++) {
        int out = out_features[i], mixed = routers[i] && rows > 1 ? rows : 1;
        for (int t = 0; t < tokens; t++) {
            float gate[SG_MAX_EXPERTS];
            const float *xt_in = xf + (size_t)t * in_features;
            float *xt = xs[i] + (size_t)t * width, *st = s_out[i] + (size_t)t * out;
            if (mixed > 1) { /* the token's mixture of scales: softmax(router . x) */
                float top = -INFINITY, norm = 0.0f;
                for (int e = 0; e < mixed; e++) {
                    gate[e] = dot(routers[i] + (size_t)e * in_features, xt_in, in_features);
                    top = gate[e] > top ? gate[e] : top;
                }
                for (int e = 0; e < mixed; e++) norm += gate[e] = expf(gate[e] - top);
                for (int e = 0; e < mixed; e++) gate[e] /= norm;
            } else {
                gate[0] = 1.0f;
            }
            memset(xt, 0, sizeof(float) * width);
            memset(st, 0, sizeof(float) * out);
            for (int e = 0; e < mixed; e++) {
                const float *so = out_scales[i] + (size_t)e * out;
                for (int o = 0; o < out; o++) st[o] += gate[e] * so[o];
                if (experts > 0) {
                    const float *si = in_scales[i] + (size_t)e * in_features;
                    for (int j = 0; j < in_features; j++) xt[j] += gate[e] * si[j];
                }
            }
            for (int j = 0; j < in_features; j++) xt[j] = experts > 0 ? xt[j] * xt_in[j] : xt_in[j];
        }
    }
    int blocks = failed ? 0 : first[count];
#pragma omp parallel for schedule(static) if (work >= SG_PARALLEL_BYTES)
    for (int b = 0; b < blocks; b++) {
        int i = 0;
        while (b >= first[i + 1]) i++;
        int out = out_features[i], o = 4 * (b - first[i]), n = out - o < 4 ? out - o : 4;
        float sums[4];
#ifdef __AVX2__
        if (b + AHEAD < first[i + 1]) /* the signs of a later block, so that memory works while we add */
            for (int k = 0; k < 4 * nbytes; k += 64) _mm_prefetch((const char *)packed[i] + (size_t)(o + 4 * AHEAD) * nbytes + k, _MM_HINT_T0);
#endif
        for (int t = 0; t < tokens; t++) {
            signed_sums(packed[i] + (size_t)o * nbytes, n, xs[i] + (size_t)t * width, nbytes, sums);
            for (int r = 0; r < n; r++) yt[i][(size_t)t * out + o + r] = sums[r] * s_out[i][(size_t)t * out + o + r];
        }
    }
    for (int i = 0; i < count && !failed; i++) {
        int out = out_features[i];
        for (int t = 0; t < tokens; t++) {
            float *row = yt[i] + (size_t)t * out;
            if (layernorm) {
                double mean = 0.0, var = 0.0;
                for (int o = 0; o < out; o++) mean += row[o];
                mean /= out;
                for (int o = 0; o < out; o++) var += (row[o] - mean) * (row[o] - mean);
                float inv = 1.0f / sqrtf((float)(var / out) + 1e-5f);
                for (int o = 0; o < out; o++) row[o] = (float)((row[o] - mean) * inv);
            }
            if (biases[i])
                for (int o = 0; o < out; o++) row[o] += biases[i][o];
            sg_store_row((char *)ys[i] + (size_t)t * out * (bf16 ? 2 : 4), bf16, out, row);
        }
    }
    return failed;
}
