/* The declarations and what the functions do: convert.h */
#include <string.h>

#include "convert.h"

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
