/* FITS stores big-endian values; these turn a block read from a file into native floats
 * in one pass (see streamdet/core/references.py). */
#include <stdint.h>
#include <string.h>

/* float32: dst[i] = the big-endian src[i]; with nan_to_zero, NaN becomes +0 */
__attribute__((target_clones("avx2", "default")))
void streamdet_float32_from_big_endian(const uint32_t *src, float *dst, int64_t n,
                                       int64_t nan_to_zero)
{
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits = __builtin_bswap32(src[i]);
        float v;
        memcpy(&v, &bits, sizeof v);
        if (nan_to_zero && v != v)
            v = 0.0f;
        dst[i] = v;
    }
}

/* 16-bit SCI (big-endian int16, BSCALE/BZERO) to float32 DN: the integer converted
 * exactly, then scaled and offset in float32, each rounded on its own as numpy does. */
__attribute__((target_clones("avx2", "default")))
void streamdet_float32_from_big_endian_int16(const uint16_t *src, float *dst, int64_t n,
                                             float bscale, float bzero, int64_t scaled,
                                             int64_t offset)
{
    for (int64_t i = 0; i < n; i++) {
        float v = (float)(int16_t)__builtin_bswap16(src[i]);
        if (scaled)
            v = v * bscale;
        if (offset)
            v = v + bzero;
        dst[i] = v;
    }
}
