/* The number conversions every kernel file shares (runtime/csrc and quant/csrc: each build passes
 * -I runtime/csrc), so a bf16 store means the same in every path. */
#ifndef SG_NUMBERS_H
#define SG_NUMBERS_H
#include <stdint.h>
#include <string.h>

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

#endif
