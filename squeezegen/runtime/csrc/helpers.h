/* The helpers every kernel file shares (all are built into one library, runtime/native.py), so
 * that a conversion, a sum or a split means the same in every path: number
 * conversions (bf16 rounding that keeps NaN and infinities, bf16 and fp16 widening), rows moved
 * between float32 and the activations' dtype, vector loads and horizontal sums, per-thread scratch
 * memory and the split of rows among threads. */
#ifndef SG_HELPERS_H
#define SG_HELPERS_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define SG_PARALLEL_BYTES 32768 /* below this much weight memory one thread is faster than waking others */

/* ---- numbers ---------------------------------------------------------------------------------- */

/* v as bfloat16 bits, rounded to nearest even as torch rounds; NaN stays NaN (torch's 0x7FC0) and
 * an infinity stays infinite, where adding the rounding bias to a NaN's bits could carry it into
 * another number. */
static inline uint16_t sg_bf16_bits(float v) {
    uint32_t bits;
    memcpy(&bits, &v, 4);
    if ((bits & 0x7FFFFFFF) > 0x7F800000) return 0x7FC0;
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static inline float sg_bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* v rounded to the nearest bfloat16, kept as a float32 */
static inline float sg_round_bf16(float v) { return sg_bf16_to_float(sg_bf16_bits(v)); }

static inline float sg_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
    if (exponent == 0x1F) {
        bits = sign | 0x7F800000 | (mantissa << 13);
    } else if (exponent) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else {
        float f = (float)mantissa * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* element i of a float32 (kind 0), bfloat16 (1) or float16 (2) array */
static inline float sg_load(const void *p, int kind, size_t i) {
    if (kind == 0) return ((const float *)p)[i];
    if (kind == 1) return sg_bf16_to_float(((const uint16_t *)p)[i]);
    return sg_half_to_float(((const uint16_t *)p)[i]);
}

/* element i of a float32 (bf16 = 0) or bfloat16 (1) array set to v (rounded) */
static inline void sg_store(void *p, int bf16, size_t i, float v) {
    if (bf16)
        ((uint16_t *)p)[i] = sg_bf16_bits(v);
    else
        ((float *)p)[i] = v;
}

/* n activations from x (float32, or bfloat16 with `bf16`) into float32 `out` */
static inline void sg_widen_row(const void *x, int bf16, size_t n, float *out) {
    if (!bf16) {
        memcpy(out, x, sizeof(float) * n);
        return;
    }
    for (size_t i = 0; i < n; i++) out[i] = sg_bf16_to_float(((const uint16_t *)x)[i]);
}

/* n float32 values into y (float32, or bfloat16 with `bf16`: rounded) */
static inline void sg_store_row(void *y, int bf16, size_t n, const float *values) {
    if (!bf16) {
        memcpy(y, values, sizeof(float) * n);
        return;
    }
    for (size_t i = 0; i < n; i++) ((uint16_t *)y)[i] = sg_bf16_bits(values[i]);
}

/* ---- vectors ---------------------------------------------------------------------------------- */

#if defined(__AVX2__)
/* the sum of v's eight lanes, in one fixed order (every kernel's sums agree on it) */
static inline float sg_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* elements i..i+7 of a float32 (kind 0), bfloat16 (1) or float16 (2; F16C) array as float32 */
static inline __m256 sg_load8(const void *p, int kind, size_t i) {
    if (kind == 0) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (kind == 1) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}
#endif

#if defined(__AVX512F__)
/* elements i..i+15 as float32, as sg_load8 */
static inline __m512 sg_load16(const void *p, int kind, size_t i) {
    if (kind == 0) return _mm512_loadu_ps((const float *)p + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    if (kind == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}
#endif

/* ---- memory and threads ----------------------------------------------------------------------- */

/* At least `floats` floats in *buffer, 64-byte aligned, grown by half again when too small and
 * kept between calls (the caller keeps buffer and capacity per thread: a decode makes hundreds of
 * calls a token, and fresh buffers each time cost more than a small layer's arithmetic). NULL
 * when memory runs out. */
static inline float *sg_scratch(float **buffer, size_t *capacity, size_t floats) {
    if (floats > *capacity) {
        free(*buffer);
        *capacity = floats + floats / 2;
        *buffer = aligned_alloc(64, sizeof(float) * ((*capacity + 15) / 16 * 16));
        if (!*buffer) *capacity = 0;
    }
    return *buffer;
}

/* Thread `part` of `parts`'s rows [*begin, *end) of `rows`: contiguous ranges of whole fours of
 * rows (the four-row paths serve them), as even as fours allow. */
static inline void sg_split_rows(int rows, int part, int parts, int *begin, int *end) {
    int fours = (rows + 3) / 4;
    *begin = 4 * (int)((long)fours * part / parts);
    *end = 4 * (int)((long)fours * (part + 1) / parts);
    if (*end > rows) *end = rows;
}

#endif
