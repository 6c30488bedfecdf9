/* The declarations and what the functions do: scratch.h */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

#include "scratch.h"

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif
#define BATCH (IOV_MAX < 1024 ? IOV_MAX : 1024)

/* all of iov[0..n) at offset, resuming after short transfers */
static int64_t transfer(int fd, struct iovec *iov, int n, int64_t offset, int writing)
{
    while (n > 0) {
        ssize_t done = writing ? pwritev(fd, iov, n, (off_t)offset)
                               : preadv(fd, iov, n, (off_t)offset);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (done == 0)
            return -EIO;
        offset += done;
        while (n > 0 && (size_t)done >= iov->iov_len) {
            done -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + done;
            iov->iov_len -= (size_t)done;
        }
    }
    return 0;
}

int64_t streamdet_scratch_read(int64_t fd, void *dest_bytes, int64_t row0, int64_t nrows,
                               int64_t nints, int64_t ngroups, int64_t line_bytes,
                               int64_t s_int, int64_t s_group, int64_t s_row)
{
    char *dest = dest_bytes;
    struct iovec iov[BATCH];
    int n = 0;
    int64_t offset = row0 * nints * ngroups * line_bytes, start = offset;
    for (int64_t k = 0; k < nrows; k++)
        for (int64_t i = 0; i < nints; i++)
            for (int64_t g = 0; g < ngroups; g++) {
                iov[n].iov_base = dest + i * s_int + g * s_group + k * s_row;
                iov[n].iov_len = (size_t)line_bytes;
                offset += line_bytes;
                if (++n == BATCH) {
                    int64_t rc = transfer((int)fd, iov, n, start, 0);
                    if (rc)
                        return rc;
                    n = 0;
                    start = offset;
                }
            }
    return n ? transfer((int)fd, iov, n, start, 0) : 0;
}

/* Integration i, rows row0 .. row0+nrows, between the file and `buf` (line (g, k) at
 * buf + g*s_group + k*s_row): to the file when `to_file`, else from it. One
 * integration's groups of one row are contiguous in the file. */
static int64_t integration_rows(int64_t fd, char *buf, int64_t i, int64_t row0, int64_t nrows,
                                int64_t nints, int64_t ngroups, int64_t line_bytes,
                                int64_t s_group, int64_t s_row, int to_file)
{
    struct iovec iov[BATCH];
    for (int64_t k = 0; k < nrows; k++) {
        int64_t offset = ((row0 + k) * nints + i) * ngroups * line_bytes;
        for (int64_t g0 = 0; g0 < ngroups; g0 += BATCH) {
            int n = 0;
            for (int64_t g = g0; g < ngroups && n < BATCH; g++, n++) {
                iov[n].iov_base = buf + g * s_group + k * s_row;
                iov[n].iov_len = (size_t)line_bytes;
            }
            int64_t rc = transfer((int)fd, iov, n, offset + g0 * line_bytes, to_file);
            if (rc)
                return rc;
        }
    }
    return 0;
}

int64_t streamdet_scratch_write(int64_t fd, const void *src, int64_t i, int64_t row0,
                                int64_t nrows, int64_t nints, int64_t ngroups,
                                int64_t line_bytes, int64_t s_group, int64_t s_row)
{
    return integration_rows(fd, (char *)src, i, row0, nrows, nints, ngroups, line_bytes,
                            s_group, s_row, 1);
}

int64_t streamdet_scratch_read_integration(int64_t fd, void *dest, int64_t i, int64_t row0,
                                           int64_t nrows, int64_t nints, int64_t ngroups,
                                           int64_t line_bytes, int64_t s_group, int64_t s_row)
{
    return integration_rows(fd, dest, i, row0, nrows, nints, ngroups, line_bytes,
                            s_group, s_row, 0);
}

int64_t streamdet_read_spans(int64_t fd, void *dest, int64_t offset, int64_t stride,
                             int64_t nspans, int64_t span_bytes)
{
    char *out = dest;
    for (int64_t k = 0; k < nspans; k++) {
        int64_t done = 0;
        while (done < span_bytes) {
            ssize_t got = pread((int)fd, out + done, (size_t)(span_bytes - done),
                                (off_t)(offset + k * stride + done));
            if (got < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            if (got == 0)
                return k;
            done += got;
        }
        out += span_bytes;
    }
    return nspans;
}

/* one piece into FITS form: byte order reversed per element, top bit flipped */
static void fits_form(char *out, const char *in, int64_t count, int64_t itemsize,
                      int offset_sign)
{
    for (int64_t j = 0; j < count; j++) {
        const char *a = in + j * itemsize;
        char *b = out + j * itemsize;
        for (int64_t k = 0; k < itemsize; k++)
            b[k] = a[itemsize - 1 - k];
        if (offset_sign)
            b[0] = (char)(b[0] ^ 0x80);
    }
}

/* the common 4-byte case in one pass the compiler vectorises */
static void fits_form32(uint32_t *out, const uint32_t *in, int64_t count, uint32_t flip)
{
    for (int64_t j = 0; j < count; j++)
        out[j] = __builtin_bswap32(in[j] ^ flip);
}

int64_t streamdet_write_pieces(int64_t fd, const void *src, int64_t src_stride,
                               int64_t npieces, int64_t count, int64_t itemsize,
                               int64_t offset_sign, int64_t offset, int64_t stride)
{
    size_t bytes = (size_t)(count * itemsize);
    int plain = itemsize == 1 && !offset_sign;
    char *piece = plain ? NULL : malloc(bytes ? bytes : 1);
    if (!plain && piece == NULL)
        return -ENOMEM;
    int64_t status = 0;
    for (int64_t k = 0; k < npieces && status == 0; k++) {
        const char *from = (const char *)src + k * src_stride;
        if (!plain) {
            if (itemsize == 4)
                fits_form32((uint32_t *)piece, (const uint32_t *)from, count,
                            offset_sign ? 0x80000000u : 0u);
            else
                fits_form(piece, from, count, itemsize, (int)offset_sign);
        }
        struct iovec iov = {plain ? (void *)from : piece, bytes};
        status = transfer((int)fd, &iov, 1, offset + k * stride, 1);
    }
    free(piece);
    return status;
}
