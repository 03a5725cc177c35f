/* The decode step in C: every decoder layer of a Llama / Mistral / Qwen2 / Qwen3 / Gemma-3 model
 * for one new token a row, the final norm and the LM head, without a Python operation between
 * them (runtime/native_step.py builds the structs below from the model and the engine's cache).
 *
 * A 135M-parameter model's step reads ~270 MB of bf16 weights; the same step as ~40 torch
 * operations a layer spends about as long in dispatch as in reading them. Here a layer is a few
 * loops over fp32 activations: RMSNorm, the q/k/v product, q/k norms, RoPE from the table, the
 * cache write into the first empty slot, attention over the slots that hold a position (split
 * across threads by slot ranges, then merged), the output product, the MLP. Values are rounded
 * to bf16 wherever the HF layers of a bf16 model round (after each product, norm, RoPE term and
 * residual add), so both paths stay within bf16's rounding of each other; in float32 nothing is
 * rounded. Each row is computed on its own, in the same order whatever the batch: a row of a
 * batch gets the bits it gets alone.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "kernels.h"
#include "helpers.h"

enum { PROJ_DENSE = 0, PROJ_INT4 = 1, PROJ_BINARY = 2 };
enum { ACT_SILU = 0, ACT_GELU_TANH = 1 };
#define SLOTS_PER_TASK 256 /* attention: slots one thread scores before the partial results merge */
#define MAX_QUERIES_PER_KV 16 /* query heads per KV head */
#define MAX_HEAD_DIM 512

typedef struct {
    int kind, weight_kind; /* PROJ_*; dense weights: 0 float32, 1 bfloat16, 2 float16 */
    int in, out;           /* out: the rows of every layer of the group together */
    const void *weight;    /* dense (out, in), or the 4-bit packed bytes */
    const uint16_t *scales, *mins;
    int group;
    const void *bias; /* (out) in bias_kind, or NULL */
    int bias_kind;
    /* PROJ_BINARY: the group's arguments to sg_binary_linears (kernels.h) */
    int count, experts, layernorm;
    const int *sizes;
    const uint8_t *const *packed;
    const float *const *in_scales, *const *out_scales, *const *routers, *const *biases;
} Proj;

typedef struct {
    int heads, kv_heads, head_dim, window; /* window 0: full attention */
    float scaling;
    const void *input_norm, *q_norm, *k_norm, *post_attention_norm, *mlp_norm, *post_mlp_norm; /* or NULL */
    Proj qkv, o, gate_up, down;
    int act;
    const void *cos, *sin; /* RoPE table (positions, head_dim) in the model's dtype */
    int rope_positions;
    void *keys, *values; /* decode buffers (B, kv_heads, capacity, head_dim) in the model's dtype */
    int64_t *pos;        /* (B, kv_heads, capacity), -1 = empty */
    int capacity;
} Layer;

typedef struct {
    int width, bf16, gemma_norm, threads;
    float eps;
    int layers;
    Layer *layer;
    const void *final_norm;
    Proj head;
    float *scratch; /* sg_decode_scratch(...) floats, owned by the caller */
    size_t widest;  /* the most floats a row's activation takes (set by sg_decode_scratch) */
} Model;

/* ---- numbers ---------------------------------------------------------------------------------- */

static inline float rnd(const Model *m, float v) { return m->bf16 ? sg_round_bf16(v) : v; }

#ifdef __AVX2__
/* exp(x) for x <= 0 (softmax after subtracting the max): 2^n * p(r), Cephes' polynomial, ~1 ulp */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#endif

/* the largest of p[0..n) (-inf for none), sixteen lanes at a time: a scalar max is a chain of
 * dependent instructions as long as the slots */
static float max_of(const float *p, int n) {
    float max = -INFINITY;
    int i = 0;
#ifdef __AVX512F__
    __m512 v = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= n; i += 16) v = _mm512_max_ps(v, _mm512_loadu_ps(p + i));
    max = _mm512_reduce_max_ps(v);
#elif defined(__AVX2__)
    __m256 v = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= n; i += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(p + i));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    max = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
#endif
    for (; i < n; i++) max = p[i] > max ? p[i] : max;
    return max;
}

/* p[i] = exp(p[i] - max) for i < n, returning their sum (in a fixed order) */
static float exp_shifted(float *p, int n, float max) {
    int i = 0;
    float sum = 0.0f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps(), mv = _mm256_set1_ps(max);
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + i), mv));
        _mm256_storeu_ps(p + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = sg_hsum8(acc);
#endif
    for (; i < n; i++) {
        p[i] = expf(p[i] - max);
        sum += p[i];
    }
    return sum;
}

/* ---- the pieces of a layer -------------------------------------------------------------------- */

/* RMSNorm of x (n) into y, as HF computes it: Llama's w * round(x_normed), Gemma's round(x_normed * (1 + w)) */
static void rms_norm(const Model *m, const void *weight, const float *x, float *y, int n) {
    float squares = 0.0f;
    for (int i = 0; i < n; i++) squares += x[i] * x[i];
    float scale = 1.0f / sqrtf(squares / (float)n + m->eps);
    int kind = m->bf16 ? 1 : 0;
    for (int i = 0; i < n; i++) {
        float w = sg_load(weight, kind, i), h = x[i] * scale;
        y[i] = m->gemma_norm ? rnd(m, h * (1.0f + w)) : rnd(m, w * rnd(m, h));
    }
}

/* y[t * p->out + o] = x[t] . row o (+ bias), rounded to the model's dtype, over the model's threads */
static int project(const Model *m, const Proj *p, const float *x, int tokens, float *y) {
    if (p->kind == PROJ_BINARY) {
        void *outs[SG_MAX_LAYERS];
        size_t at = 0;
        for (int i = 0; i < p->count; i++) outs[i] = y + at * tokens, at += (size_t)p->sizes[i];
        if (sg_binary_linears(p->count, x, outs, 0, tokens, p->in, p->sizes, p->packed, p->in_scales, p->out_scales,
                              p->experts, p->routers, p->biases, p->layernorm))
            return 1;
        if (p->count > 1) { /* the kernel wrote layer by layer (tokens, size_i): interleave into (tokens, out) */
            float *tmp = y + (size_t)tokens * p->out;
            memcpy(tmp, y, sizeof(float) * tokens * p->out);
            at = 0;
            for (int i = 0; i < p->count; i++) {
                for (int t = 0; t < tokens; t++)
                    memcpy(y + (size_t)t * p->out + at, tmp + at * tokens + (size_t)t * p->sizes[i],
                           sizeof(float) * p->sizes[i]);
                at += (size_t)p->sizes[i];
            }
        }
    } else {
        const uint16_t *x_bf16 = NULL; /* a bf16 model's activations are bf16 values */
        if (p->kind == PROJ_DENSE && m->bf16 && p->weight_kind == 1 &&
            !(x_bf16 = sg_bf16_copy(x, (size_t)tokens * p->in)))
            return 1;
#pragma omp parallel num_threads(m->threads)
        {
            int begin, end;
            sg_split_rows(p->out, omp_get_thread_num(), omp_get_num_threads(), &begin, &end);
            if (begin < end) {
                if (p->kind == PROJ_DENSE)
                    sg_dense_rows(p->weight, p->weight_kind, p->in, begin, end, x, x_bf16, tokens, y, p->out);
                else
                    sg_int4_rows(p->weight, p->scales, p->mins, p->group, p->in, begin, end, x, tokens, y, p->out);
            }
        }
        if (p->bias)
            for (int t = 0; t < tokens; t++)
                for (int o = 0; o < p->out; o++) y[(size_t)t * p->out + o] += sg_load(p->bias, p->bias_kind, o);
    }
    if (m->bf16)
        for (size_t i = 0; i < (size_t)tokens * p->out; i++) y[i] = sg_round_bf16(y[i]);
    return 0;
}

/* q' = q * cos + rotate_half(q) * sin for one head (d values) at table row `at` */
static void rope(const Model *m, const Layer *l, float *q, int64_t at) {
    int d = l->head_dim, half = d / 2, kind = m->bf16 ? 1 : 0;
    float rotated[MAX_HEAD_DIM];
    for (int i = 0; i < half; i++) rotated[i] = -q[i + half], rotated[i + half] = q[i];
    for (int i = 0; i < d; i++) {
        float c = sg_load(l->cos, kind, (size_t)at * d + i), s = sg_load(l->sin, kind, (size_t)at * d + i);
        q[i] = rnd(m, rnd(m, q[i] * c) + rnd(m, rotated[i] * s));
    }
}

/* The token's key/value into the first empty slot of its row and KV head (after a sliding
 * window's eviction), as LayerCache.write does. */
static void cache_write(const Model *m, Layer *l, int b, int g, const float *k, const float *v, int64_t position) {
    size_t row = ((size_t)b * l->kv_heads + g) * l->capacity;
    int64_t *pos = l->pos + row;
    if (l->window)
        for (int s = 0; s < l->capacity; s++)
            if (pos[s] <= position - l->window) pos[s] = -1;
    int slot = 0;
    while (slot < l->capacity && pos[slot] >= 0) slot++;
    if (slot == l->capacity) slot = 0; /* full (the engine grows buffers first): as argmax does */
    size_t at = (row + slot) * l->head_dim;
    for (int i = 0; i < l->head_dim; i++) sg_store(l->keys, m->bf16, at + i, k[i]), sg_store(l->values, m->bf16, at + i, v[i]);
    pos[slot] = position;
}

#ifdef __AVX512F__

/* the four sums of a0..a3, as [sum a0, sum a1, sum a2, sum a3] */
static inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
#define FOLD(v) _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(FOLD(a0), FOLD(a1)), _mm256_hadd_ps(FOLD(a2), FOLD(a3)));
#undef FOLD
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif

/* The vector width scores() sums keys in: 16 lanes with AVX512, 8 with AVX2, and how four slots'
 * lanes are reduced to their four sums. */
#if defined(__AVX512F__)
#define LANES 16
typedef __m512 lanes_t;
#define lanes_zero _mm512_setzero_ps
#define lanes_fma _mm512_fmadd_ps
#define lanes_q _mm512_loadu_ps
#define lanes_kv sg_load16
#define store_sums4(sc, a0, a1, a2, a3) _mm_storeu_ps(sc, sum4(a0, a1, a2, a3))
#elif defined(__AVX2__)
#define LANES 8
typedef __m256 lanes_t;
#define lanes_zero _mm256_setzero_ps
#define lanes_fma _mm256_fmadd_ps
#define lanes_q _mm256_loadu_ps
#define lanes_kv sg_load8
/* each slot's lanes reduced as hsum8 reduces a lone slot's, so every slot gets the same order */
#define store_sums4(sc, a0, a1, a2, a3) ((sc)[0] = sg_hsum8(a0), (sc)[1] = sg_hsum8(a1), (sc)[2] = sg_hsum8(a2), (sc)[3] = sg_hsum8(a3))
#endif

#ifdef __AVX2__
/* Ask for the keys (into L1) and values (into L2) of n slots, a cache line at a time: the first
 * head's pass over a range reads them from memory, the group's other heads find them cached. */
static inline void prefetch_slots(const Model *m, const Layer *l, size_t row, const int *slots, int n) {
    int d = l->head_dim, size = m->bf16 ? 2 : 4;
    for (int r = 0; r < n; r++)
        for (int j = 0; j < d; j += 64 / size) {
            size_t at = ((row + slots[r]) * d + j) * size;
            _mm_prefetch((const char *)l->keys + at, _MM_HINT_T0);
            _mm_prefetch((const char *)l->values + at, _MM_HINT_T1);
        }
}
#endif

/* sc[i] = q . key(slot[i]) * scaling for n slots of one head (the product rounded to the model's
 * dtype first, as a bf16 matmul rounds it): four slots at a time, so that four
 * independent chains of multiply-adds are in flight (one chain of head_dim / 16 is latency-bound) */
static void scores(const Model *m, const Layer *l, size_t row, const int *slots, int n, const float *q, float *sc,
                   int prefetch) {
    int d = l->head_dim, i = 0;
#ifdef __AVX512BF16__
    if (m->bf16 && d % 32 == 0 && d <= MAX_HEAD_DIM) {
        /* bf16 keys and a bf16-exact query: 32 products a instruction, exact, summed in float32 */
        __m512bh qb[MAX_HEAD_DIM / 32];
        for (int j = 0; j < d; j += 32)
            qb[j / 32] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + j + 16), _mm512_loadu_ps(q + j));
        const uint16_t *keys = l->keys;
        for (; i + 4 <= n; i += 4) {
            const uint16_t *k0 = keys + (row + slots[i]) * d, *k1 = keys + (row + slots[i + 1]) * d,
                           *k2 = keys + (row + slots[i + 2]) * d, *k3 = keys + (row + slots[i + 3]) * d;
            if (prefetch && i + 12 <= n) prefetch_slots(m, l, row, slots + i + 8, 4);
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int j = 0; j < d; j += 32) {
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(k0 + j), qb[j / 32]);
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(k1 + j), qb[j / 32]);
                a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(k2 + j), qb[j / 32]);
                a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(k3 + j), qb[j / 32]);
            }
            _mm_storeu_ps(sc + i, sum4(a0, a1, a2, a3));
        }
    }
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
    if (d % LANES == 0) {
        for (; i + 4 <= n; i += 4) {
            size_t k0 = (row + slots[i]) * d, k1 = (row + slots[i + 1]) * d, k2 = (row + slots[i + 2]) * d,
                   k3 = (row + slots[i + 3]) * d;
            if (prefetch && i + 12 <= n) prefetch_slots(m, l, row, slots + i + 8, 4);
            lanes_t a0 = lanes_zero(), a1 = a0, a2 = a0, a3 = a0;
            for (int j = 0; j < d; j += LANES) {
                lanes_t qv = lanes_q(q + j);
                a0 = lanes_fma(lanes_kv(l->keys, m->bf16, k0 + j), qv, a0);
                a1 = lanes_fma(lanes_kv(l->keys, m->bf16, k1 + j), qv, a1);
                a2 = lanes_fma(lanes_kv(l->keys, m->bf16, k2 + j), qv, a2);
                a3 = lanes_fma(lanes_kv(l->keys, m->bf16, k3 + j), qv, a3);
            }
            store_sums4(sc + i, a0, a1, a2, a3);
        }
    }
#endif
    for (; i < n; i++) {
        size_t at = (row + slots[i]) * d;
        float dot = 0.0f;
        int j = 0;
#ifdef __AVX2__
        __m256 acc = _mm256_setzero_ps();
        for (; j + 8 <= d; j += 8) acc = _mm256_fmadd_ps(sg_load8(l->keys, m->bf16, at + j), _mm256_loadu_ps(q + j), acc);
        dot = sg_hsum8(acc);
#endif
        for (; j < d; j++) dot += sg_load(l->keys, m->bf16, at + j) * q[j];
        sc[i] = dot;
    }
    for (i = 0; i < n; i++) sc[i] = rnd(m, sc[i]) * l->scaling; /* a bf16 model's q.k is a bf16 product */
}

#ifdef __AVX512F__
/* out[j] = sum_i p[i] * value(slot[i])[j] for one head with d a constant multiple of 16 (inlined
 * per head size, so the sums stay in registers): two slots at a time into two sets of sums */
static inline __attribute__((always_inline)) void head_values(const Model *m, const Layer *l, size_t row,
                                                              const int *slots, int n, const float *p, float *out,
                                                              int prefetch, const int d) {
    __m512 a[16], b[16];
    for (int c = 0; c < d / 16; c++) a[c] = b[c] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 2 <= n; i += 2) {
        size_t v0 = (row + slots[i]) * d, v1 = (row + slots[i + 1]) * d;
        if (prefetch && i + 10 <= n) /* the values eight slots ahead (64 bytes at a time) */
            for (int r = 8; r < 10; r++)
                for (int c = 0; c < d; c += m->bf16 ? 32 : 16)
                    _mm_prefetch((const char *)l->values + ((row + slots[i + r]) * d + c) * (m->bf16 ? 2 : 4),
                                 _MM_HINT_T0);
        __m512 p0 = _mm512_set1_ps(p[i]), p1 = _mm512_set1_ps(p[i + 1]);
        for (int c = 0; c < d / 16; c++) {
            a[c] = _mm512_fmadd_ps(p0, sg_load16(l->values, m->bf16, v0 + 16 * c), a[c]);
            b[c] = _mm512_fmadd_ps(p1, sg_load16(l->values, m->bf16, v1 + 16 * c), b[c]);
        }
    }
    if (i < n) {
        size_t v0 = (row + slots[i]) * d;
        __m512 p0 = _mm512_set1_ps(p[i]);
        for (int c = 0; c < d / 16; c++) a[c] = _mm512_fmadd_ps(p0, sg_load16(l->values, m->bf16, v0 + 16 * c), a[c]);
    }
    for (int c = 0; c < d / 16; c++) _mm512_storeu_ps(out + 16 * c, _mm512_add_ps(a[c], b[c]));
}
#elif defined(__AVX2__)
/* The same for eight lanes: sixteen registers hold 64 sums, so a head wider than 64 takes its
 * columns 64 at a time, each pass over all the slots (every sum still adds the slots in order). */
static inline __attribute__((always_inline)) void head_values(const Model *m, const Layer *l, size_t row,
                                                              const int *slots, int n, const float *p, float *out,
                                                              int prefetch, const int d) {
    for (int c0 = 0; c0 < d; c0 += 64) {
        __m256 a[8];
        for (int c = 0; c < 8; c++) a[c] = _mm256_setzero_ps();
        for (int i = 0; i < n; i++) {
            size_t v0 = (row + slots[i]) * d + c0;
            if (prefetch && c0 == 0 && i + 8 < n)
                for (int c = 0; c < d; c += m->bf16 ? 32 : 16)
                    _mm_prefetch((const char *)l->values + ((row + slots[i + 8]) * d + c) * (m->bf16 ? 2 : 4),
                                 _MM_HINT_T0);
            __m256 p0 = _mm256_set1_ps(p[i]);
            for (int c = 0; c < 8; c++) a[c] = _mm256_fmadd_ps(p0, sg_load8(l->values, m->bf16, v0 + 8 * c), a[c]);
        }
        for (int c = 0; c < 8; c++) _mm256_storeu_ps(out + c0 + 8 * c, a[c]);
    }
}
#endif

/* out[j] = sum_i p[i] * value(slot[i])[j] for one head */
static void values(const Model *m, const Layer *l, size_t row, const int *slots, int n, const float *p, float *out,
                   int prefetch) {
    int d = l->head_dim;
#if defined(__AVX512F__) || defined(__AVX2__)
    if (d == 64) return head_values(m, l, row, slots, n, p, out, prefetch, 64);
    if (d == 128) return head_values(m, l, row, slots, n, p, out, prefetch, 128);
    if (d == 256) return head_values(m, l, row, slots, n, p, out, prefetch, 256);
#endif
    for (int j = 0; j < d; j++) out[j] = 0.0f;
    for (int i = 0; i < n; i++) {
        size_t at = (row + slots[i]) * d;
        for (int j = 0; j < d; j++) out[j] += p[i] * sg_load(l->values, m->bf16, at + j);
    }
}

/* One task of attention: the query heads of KV head g of row b over slots [s0, s1). Writes, per
 * query head, the max score, the sum of exp(score - max) and the unnormalised output (head_dim). */
static void attend_slots(const Model *m, const Layer *l, int b, int g, const float *q, int s0, int s1, float *part,
                         float *work) {
    int d = l->head_dim, group = l->heads / l->kv_heads;
    size_t row = ((size_t)b * l->kv_heads + g) * l->capacity;
    const int64_t *pos = l->pos + row;
    int slots[SLOTS_PER_TASK], n = 0;
    for (int s = s0; s < s1; s++)
        if (pos[s] >= 0) slots[n++] = s;
    for (int h = 0; h < group; h++) {
        float *out = part + (size_t)h * (d + 2);
        scores(m, l, row, slots, n, q + (size_t)(g * group + h) * d, work, h == 0);
        float max = max_of(work, n);
        out[0] = max, out[1] = n ? exp_shifted(work, n, max) : 0.0f;
        values(m, l, row, slots, n, work, out + 2, h == 0);
    }
}

/* out (B, heads * head_dim) = softmax(q k^T * scaling) v over the slots holding a position */
static void attention(const Model *m, const Layer *l, const float *q, int tokens, float *out, float *scratch) {
    int d = l->head_dim, group = l->heads / l->kv_heads;
    int chunks = (l->capacity + SLOTS_PER_TASK - 1) / SLOTS_PER_TASK, tasks = tokens * l->kv_heads * chunks;
    size_t part_floats = (size_t)group * (d + 2);
    float *parts = scratch, *work = parts + (size_t)tasks * part_floats;
    /* dynamic: the last range of a buffer is mostly empty, so equal shares of tasks are not equal work
     * (which thread takes a task does not change its result) */
#pragma omp parallel for schedule(dynamic, 1) num_threads(m->threads)
    for (int task = 0; task < tasks; task++) {
        int c = task % chunks, g = (task / chunks) % l->kv_heads, b = task / chunks / l->kv_heads;
        int s0 = c * SLOTS_PER_TASK, s1 = s0 + SLOTS_PER_TASK < l->capacity ? s0 + SLOTS_PER_TASK : l->capacity;
        float *mine = work + (size_t)omp_get_thread_num() * SLOTS_PER_TASK;
        attend_slots(m, l, b, g, q + (size_t)b * l->heads * d, s0, s1, parts + (size_t)task * part_floats, mine);
    }
    for (int b = 0; b < tokens; b++)
        for (int g = 0; g < l->kv_heads; g++)
            for (int h = 0; h < group; h++) {
                const float *first = parts + ((size_t)(b * l->kv_heads + g) * chunks) * part_floats + h * (d + 2);
                float max = -INFINITY, sum = 0.0f, acc[MAX_HEAD_DIM];
                for (int c = 0; c < chunks; c++)
                    if (first[c * part_floats + 1] > 0.0f && first[c * part_floats] > max) max = first[c * part_floats];
                for (int j = 0; j < d; j++) acc[j] = 0.0f;
                for (int c = 0; c < chunks; c++) {
                    const float *p = first + c * part_floats;
                    if (p[1] <= 0.0f) continue;
                    float w = expf(p[0] - max);
                    sum += w * p[1];
                    for (int j = 0; j < d; j++) acc[j] += w * p[2 + j];
                }
                float *o = out + ((size_t)b * l->heads + g * group + h) * d;
                for (int j = 0; j < d; j++) o[j] = rnd(m, sum > 0.0f ? acc[j] / sum : 0.0f);
            }
}

static float activation(int act, float x) {
    if (act == ACT_SILU) return x / (1.0f + expf(-x));
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

/* ---- the step --------------------------------------------------------------------------------- */

static int attention_tasks(const Layer *l, int tokens) {
    return tokens * l->kv_heads * ((l->capacity + SLOTS_PER_TASK - 1) / SLOTS_PER_TASK);
}

/* What native_step.py's ctypes mirrors must agree with: the structs' sizes and the constants both
 * sides name (it checks them when it loads the library, so a mismatch is an error, not memory
 * written out of place). */
void sg_decode_layout(int64_t *out) {
    const int64_t layout[] = {sizeof(Proj), sizeof(Layer), sizeof(Model), SG_MAX_TOKENS, SG_MAX_LAYERS,
                              SG_MAX_EXPERTS, PROJ_DENSE, PROJ_INT4, PROJ_BINARY};
    memcpy(out, layout, sizeof(layout));
}

/* Floats of scratch a step of `tokens` rows needs now (the widest activation, attention's tasks
 * over the buffers' capacities); call it before a step whenever the rows or the buffers changed. */
size_t sg_decode_scratch(Model *m, int tokens) {
    size_t widest = (size_t)m->width, attn = 0;
    for (int i = 0; i < m->layers; i++) {
        const Layer *l = m->layer + i;
        size_t outs[] = {(size_t)l->qkv.out, (size_t)l->gate_up.out, (size_t)l->o.out, (size_t)l->down.out,
                         (size_t)l->heads * l->head_dim};
        for (int j = 0; j < 5; j++) widest = outs[j] > widest ? outs[j] : widest;
        size_t group = (size_t)(l->heads / l->kv_heads), need = (size_t)attention_tasks(l, tokens) * group * (l->head_dim + 2);
        need += (size_t)m->threads * SLOTS_PER_TASK;
        attn = need > attn ? need : attn;
    }
    if ((size_t)m->head.out > widest) widest = (size_t)m->head.out;
    m->widest = widest;
    /* normed, projected (twice: a binary group's interleave), attention out, attention scratch */
    return (size_t)tokens * 4 * widest + attn;
}

/* Layers [first, last) over hidden (tokens, width) float32 in place, row t at position positions[t].
 * When `query` is given, the last layer's post-RoPE queries (tokens, heads, head_dim) are stored
 * there in the model's dtype (for the methods' after_decode_attention hook). Returns 0, or 1 when a
 * shape does not fit or a packed kernel failed. */
int sg_decode_layers(Model *m, int first, int last, float *hidden, int tokens, const int64_t *positions, void *query) {
    if (tokens < 1 || tokens > SG_MAX_TOKENS) return 1;
    int width = m->width;
    for (int li = first; li < last; li++) {
        Layer *l = m->layer + li;
        int d = l->head_dim, group = l->heads / l->kv_heads;
        if (group > MAX_QUERIES_PER_KV || d > MAX_HEAD_DIM || l->qkv.out != (l->heads + 2 * l->kv_heads) * d) return 1;
        size_t rows = (size_t)tokens * m->widest; /* the layout of sg_decode_scratch */
        float *normed = m->scratch, *proj = normed + rows, *attn = proj + 2 * rows, *work = attn + rows;
        for (int t = 0; t < tokens; t++) rms_norm(m, l->input_norm, hidden + (size_t)t * width, normed + (size_t)t * width, width);
        if (project(m, &l->qkv, normed, tokens, proj)) return 1;
        for (int t = 0; t < tokens; t++) {
            float *q = proj + (size_t)t * l->qkv.out, *k = q + (size_t)l->heads * d, *v = k + (size_t)l->kv_heads * d;
            int64_t at = positions[t] < 0 ? 0 : positions[t];
            if (at >= l->rope_positions) return 1;
            for (int h = 0; h < l->heads; h++) {
                if (l->q_norm) rms_norm(m, l->q_norm, q + h * d, q + h * d, d);
                rope(m, l, q + h * d, at);
            }
            for (int g = 0; g < l->kv_heads; g++) {
                if (l->k_norm) rms_norm(m, l->k_norm, k + g * d, k + g * d, d);
                rope(m, l, k + g * d, at);
                cache_write(m, l, t, g, k + g * d, v + g * d, positions[t]);
            }
            /* queries side by side (tokens, heads * d) for attention */
            memmove(normed + (size_t)t * l->heads * d, q, sizeof(float) * l->heads * d);
        }
        if (query && li == last - 1)
            for (size_t i = 0; i < (size_t)tokens * l->heads * d; i++) sg_store(query, m->bf16, i, normed[i]);
        attention(m, l, normed, tokens, attn, work);
        if (project(m, &l->o, attn, tokens, proj)) return 1;
        for (int t = 0; t < tokens; t++) {
            float *h = hidden + (size_t)t * width, *o = proj + (size_t)t * width;
            if (l->post_attention_norm) rms_norm(m, l->post_attention_norm, o, o, width);
            for (int i = 0; i < width; i++) h[i] = rnd(m, h[i] + o[i]);
            rms_norm(m, l->mlp_norm, h, normed + (size_t)t * width, width);
        }
        if (project(m, &l->gate_up, normed, tokens, proj)) return 1;
        int inner = l->gate_up.out / 2;
        for (int t = 0; t < tokens; t++) {
            float *gate = proj + (size_t)t * l->gate_up.out, *up = gate + inner, *mixed = attn + (size_t)t * inner;
            for (int i = 0; i < inner; i++) mixed[i] = rnd(m, rnd(m, activation(l->act, gate[i])) * up[i]);
        }
        if (project(m, &l->down, attn, tokens, proj)) return 1;
        for (int t = 0; t < tokens; t++) {
            float *h = hidden + (size_t)t * width, *o = proj + (size_t)t * width;
            if (l->post_mlp_norm) rms_norm(m, l->post_mlp_norm, o, o, width);
            for (int i = 0; i < width; i++) h[i] = rnd(m, h[i] + o[i]);
        }
    }
    return 0;
}

/* logits (tokens, vocab) float32 = head(norm(hidden)), rounded to the model's dtype */
int sg_decode_head(Model *m, const float *hidden, int tokens, float *logits) {
    if (tokens < 1 || tokens > SG_MAX_TOKENS) return 1;
    float *normed = m->scratch;
    for (int t = 0; t < tokens; t++)
        rms_norm(m, m->final_norm, hidden + (size_t)t * m->width, normed + (size_t)t * m->width, m->width);
    return project(m, &m->head, normed, tokens, logits);
}
