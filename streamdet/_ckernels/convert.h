/* FITS stores big-endian values; these turn a block read from a file into native floats
 * in one pass (streamdet/core/references.py, streamdet/core/exposure.py). The source is
 * passed as unsigned integers of the value's width: its bytes, not yet a number. */
#include <stdint.h>

/* float32: dst[i] = the big-endian src[i]; with nan_to_zero, NaN becomes +0. src and dst
 * may be the same buffer (a block converted where it was read). */
void streamdet_float32_from_big_endian(const uint32_t *src, float *dst, int64_t n,
                                       int64_t nan_to_zero);

/* 16-bit SCI (big-endian int16, BSCALE/BZERO) to float32 DN: the integer converted
 * exactly, then (when `scaled`) multiplied by bscale and (when `offset`) bzero added,
 * in float32, each rounded on its own as numpy does. */
void streamdet_float32_from_big_endian_int16(const uint16_t *src, float *dst, int64_t n,
                                             float bscale, float bzero, int64_t scaled,
                                             int64_t offset);
