/* The engine's scratch files (_Scratch in streamdet/core/engine.py): the ramp after
 * the integration pass, laid out row by row, [ny][nints][ngroups][nx], so that a band of
 * rows spanning every integration is one contiguous stretch of the file.
 *
 * These move rows between that layout and the engine's [nints][ngroups][rows][nx]
 * arrays with vectored positioned I/O: the kernel scatters and gathers the pieces, so
 * no transposed copy is made in memory. The arrays are raw bytes to these functions
 * (any element type: `line_bytes` is nx times its size) and strides are in bytes; each
 * (group, row) line of nx items must be contiguous in memory. Each returns 0, or
 * -errno on failure (-EIO when the file ends early). */
#include <stdint.h>

/* Rows row0 .. row0+nrows of every integration from the file into `dest`, whose line
 * (integration i, group g, row k) starts at dest + i*s_int + g*s_group + k*s_row. */
int64_t streamdet_scratch_read(int64_t fd, void *dest, int64_t row0, int64_t nrows,
                               int64_t nints, int64_t ngroups, int64_t line_bytes,
                               int64_t s_int, int64_t s_group, int64_t s_row);

/* Integration i, rows row0 .. row0+nrows, from `src` (line (g, k) at
 * src + g*s_group + k*s_row) into the file (the integration pass). */
int64_t streamdet_scratch_write(int64_t fd, const void *src, int64_t i, int64_t row0,
                                int64_t nrows, int64_t nints, int64_t ngroups,
                                int64_t line_bytes, int64_t s_group, int64_t s_row);

/* The read that mirrors streamdet_scratch_write, for an integration pass that follows a
 * band pass (a step needing whole integrations after one needing all integrations). */
int64_t streamdet_scratch_read_integration(int64_t fd, void *dest, int64_t i, int64_t row0,
                                           int64_t nrows, int64_t nints, int64_t ngroups,
                                           int64_t line_bytes, int64_t s_group, int64_t s_row);

/* Input files (streamdet/core/exposure.py): `nspans` spans of `span_bytes` bytes, the
 * k-th at file offset `offset + k*stride`, read one after the other into `dest` (the
 * rows of a band in each group plane of one integration), with positioned reads and no
 * Python in between. Returns nspans when all were read whole, the index of the span
 * the file ended in otherwise, or -errno on failure. */
int64_t streamdet_read_spans(int64_t fd, void *dest, int64_t offset, int64_t stride,
                             int64_t nspans, int64_t span_bytes);

/* Product stores (CubeStore, streamdet/core/products.py): `npieces` pieces of `count`
 * elements of `itemsize` bytes (1, 2, 4 or 8), the k-th at src + k*src_stride (bytes),
 * each written in its FITS form at file offset `offset + k*stride`: big-endian, and with
 * `offset_sign` unsigned values as the signed ones FITS stores with BZERO (the top bit
 * flipped), so that the product is written by copying the file's bytes. Returns 0, or
 * -errno on failure (-ENOMEM: no memory for the converted piece). */
int64_t streamdet_write_pieces(int64_t fd, const void *src, int64_t src_stride,
                               int64_t npieces, int64_t count, int64_t itemsize,
                               int64_t offset_sign, int64_t offset, int64_t stride);
