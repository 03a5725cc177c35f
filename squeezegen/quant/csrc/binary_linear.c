/* A binary linear layer for a few tokens at a time (decoding), straight from packed signs.
 *
 *   y[t, o] = out_scale(t)[o] * sum_j sign[o, j] * in_scale(t)[j] * x[t, j]   (+ bias[o])
 *
 * signs: 8 per byte along each row, bit j of byte b = column 8b + j, a set bit = +1 (packing.py).
 * Scales: none, static (OneBit), or a per-token mixture of E experts chosen by a softmax router
 * (BinaryMoS); OneBit's LayerNorm without affine parameters may follow. x and y are float32 or
 * bfloat16 (bf16 = the upper half of a float32); the scales, router and bias are float32.
 * Each byte of signs selects one row of a 256 x 8 table of +-1, multiplied into 8 inputs at once
 * (FMA on AVX2), so a weight costs one bit of memory traffic and an eighth of a multiply-add.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static float SIGNS[256][8] __attribute__((aligned(32)));
static int signs_ready = 0;

static void init_signs(void) {
    for (int b = 0; b < 256; b++)
        for (int j = 0; j < 8; j++) SIGNS[b][j] = (b >> j) & 1 ? 1.0f : -1.0f;
    signs_ready = 1;
}

static inline float load_value(const void *x, int bf16, size_t i) {
    if (!bf16) return ((const float *)x)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)x)[i] << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline void store_value(void *y, int bf16, size_t i, float v) {
    if (!bf16) {
        ((float *)y)[i] = v;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &v, 4);
    bits += 0x7FFF + ((bits >> 16) & 1); /* round to nearest even, as torch does */
    ((uint16_t *)y)[i] = (uint16_t)(bits >> 16);
}

static inline float signed_sum(const uint8_t *row, const float *xs, int nbytes) {
#ifdef __AVX2__
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int g = 0;
    for (; g + 1 < nbytes; g += 2) {
        acc0 = _mm256_fmadd_ps(_mm256_load_ps(SIGNS[row[g]]), _mm256_loadu_ps(xs + 8 * g), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_load_ps(SIGNS[row[g + 1]]), _mm256_loadu_ps(xs + 8 * g + 8), acc1);
    }
    if (g < nbytes) acc0 = _mm256_fmadd_ps(_mm256_load_ps(SIGNS[row[g]]), _mm256_loadu_ps(xs + 8 * g), acc0);
    __m256 acc = _mm256_add_ps(acc0, acc1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
#else
    float total = 0.0f;
    for (int g = 0; g < nbytes; g++) {
        const float *sign = SIGNS[row[g]];
        for (int j = 0; j < 8; j++) total += sign[j] * xs[8 * g + j];
    }
    return total;
#endif
}

/* experts: 0 = no input scale and a single out_scale row (sign); otherwise in_scales / out_scales
 * hold `experts` rows, mixed by softmax(router . x) when router is given (one row: static). */
int sg_binary_linear(const void *x, void *y, int bf16, int tokens, int in_features, int out_features,
                     const uint8_t *packed, const float *in_scales, const float *out_scales, int experts,
                     const float *router, const float *bias, int layernorm) {
    if (!signs_ready) init_signs();
    int nbytes = (in_features + 7) / 8;
    int rows = experts > 0 ? experts : 1;
    float *xs = aligned_alloc(32, sizeof(float) * ((size_t)nbytes * 8 + 8));
    float *s_out = malloc(sizeof(float) * out_features);
    float *gate = malloc(sizeof(float) * rows);
    float *yt = malloc(sizeof(float) * out_features);
    if (!xs || !s_out || !gate || !yt) {
        free(xs), free(s_out), free(gate), free(yt);
        return 1;
    }
    for (int t = 0; t < tokens; t++) {
        size_t base = (size_t)t * in_features;
        /* the token's mixture of scales */
        if (router && rows > 1) {
            float top = -INFINITY;
            for (int e = 0; e < rows; e++) {
                float z = 0.0f;
                for (int j = 0; j < in_features; j++) z += router[(size_t)e * in_features + j] * load_value(x, bf16, base + j);
                gate[e] = z;
                top = z > top ? z : top;
            }
            float norm = 0.0f;
            for (int e = 0; e < rows; e++) norm += gate[e] = expf(gate[e] - top);
            for (int e = 0; e < rows; e++) gate[e] /= norm;
        } else {
            gate[0] = 1.0f;
        }
        int mixed = router && rows > 1 ? rows : 1;
        for (int j = 0; j < nbytes * 8; j++) {
            float value = j < in_features ? load_value(x, bf16, base + j) : 0.0f;
            if (experts > 0 && j < in_features) {
                float s = 0.0f;
                for (int e = 0; e < mixed; e++) s += gate[e] * in_scales[(size_t)e * in_features + j];
                value *= s;
            }
            xs[j] = value;
        }
        for (int o = 0; o < out_features; o++) {
            float s = 0.0f;
            for (int e = 0; e < mixed; e++) s += gate[e] * out_scales[(size_t)e * out_features + o];
            s_out[o] = s;
        }
#pragma omp parallel for schedule(static)
        for (int o = 0; o < out_features; o++)
            yt[o] = signed_sum(packed + (size_t)o * nbytes, xs, nbytes) * s_out[o];
        if (layernorm) {
            double mean = 0.0, var = 0.0;
            for (int o = 0; o < out_features; o++) mean += yt[o];
            mean /= out_features;
            for (int o = 0; o < out_features; o++) var += (yt[o] - mean) * (yt[o] - mean);
            float inv = 1.0f / sqrtf((float)(var / out_features) + 1e-5f);
            for (int o = 0; o < out_features; o++) yt[o] = (float)((yt[o] - mean) * inv);
        }
        for (int o = 0; o < out_features; o++)
            store_value(y, bf16, (size_t)t * out_features + o, yt[o] + (bias ? bias[o] : 0.0f));
    }
    free(xs), free(s_out), free(gate), free(yt);
    return 0;
}
