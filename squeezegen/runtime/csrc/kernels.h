/* What the runtime's C files share: they are compiled together into one library per machine
 * (runtime/native.py), and the decode step (decode_step.c) calls the products below: the dense and
 * 4-bit ones on the rows each of its threads owns, the 1-bit one on a whole group of layers.
 *
 * Every product takes float32 activations x (tokens, in) and writes float32 y[t * y_stride + o] for
 * the rows o in [o_begin, o_end) on the calling thread alone (no OpenMP inside); a token's sums
 * are made in one fixed order whatever `tokens` is, so a row of a batch gets the bits it gets alone.
 */
#ifndef SG_KERNELS_H
#define SG_KERNELS_H
#include <stdint.h>

#define SG_MAX_TOKENS 64 /* at most this many tokens (a decode step's rows) per call */
#define SG_MAX_LAYERS 8   /* 1-bit layers reading one input, per call */
#define SG_MAX_EXPERTS 64 /* 1-bit scale rows mixed per token */

/* w (out, in) row-major: float32 (kind 0), bfloat16 (1) or float16 (2). x_bf16, where given, is x
 * as bfloat16 (x's values must be bf16 values, as a bf16 model's are): bf16 weights then take the
 * CPU's bf16 dot-product instruction where it has one (its own fixed order of sums, the same
 * whatever the rows and tokens). */
void sg_dense_rows(const void *w, int kind, int in, int o_begin, int o_end, const float *x, const uint16_t *x_bf16,
                   int tokens, float *y, int y_stride);

/* x (n floats holding bf16 values) as bfloat16, in the calling thread's buffer (valid until its
 * next call); NULL when memory runs out */
const uint16_t *sg_bf16_copy(const float *x, size_t n);

/* 4-bit weights in groups of `group` (a multiple of 32) along `in`, w[o, j] = q * scale + min with
 * q in 0..15, as GGUF's Q4_1 stores them: packed (out, in / 2) bytes, each group of 32 weights in
 * 16 bytes, byte i holding weight i in its low nibble and weight i + 16 in its high one; scales
 * and mins (out, in / group) float16. */
void sg_int4_rows(const uint8_t *packed, const uint16_t *scales, const uint16_t *mins, int group, int in, int o_begin,
                  int o_end, const float *x, int tokens, float *y, int y_stride);

/* `count` (<= SG_MAX_LAYERS) packed 1-bit layers that read one input x (tokens, in) float32 or
 * bf16, each into its own ys[i] (tokens, out_features[i]) in x's dtype, with OpenMP threads of its
 * own (binary_linear.c says how the scales, router, bias and LayerNorm apply). Returns 0, 1 when
 * scratch memory ran out, 2 for arguments out of range. */
int sg_binary_linears(int count, const void *x, void *const *ys, int bf16, int tokens, int in_features,
                      const int *out_features, const uint8_t *const *packed, const float *const *in_scales,
                      const float *const *out_scales, int experts, const float *const *routers,
                      const float *const *biases, int layernorm);

#endif
