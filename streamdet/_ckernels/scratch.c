/* The engine's scratch files (see _Scratch in streamdet/core/engine.py): the ramp after
 * the integration pass, laid out row by row, [ny][nints][ngroups][nx], so that a band of
 * rows spanning every integration is one contiguous stretch of the file.
 *
 * These move rows between that layout and the engine's [nints][ngroups][rows][nx]
 * arrays with vectored positioned I/O: the kernel scatters and gathers the pieces, so
 * no transposed copy is made in memory. Strides are in bytes; each (group, row) line of
 * nx items must be contiguous in memory. Return 0, or -errno on failure (or -EIO when
 * the file ends early).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <sys/uio.h>
#include <limits.h>

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

/* Rows row0 .. row0+nrows of every integration from the file into `dest`, whose line
 * (integration i, group g, row k) starts at dest + i*s_int + g*s_group + k*s_row. */
int64_t streamdet_scratch_read(int64_t fd, char *dest, int64_t row0, int64_t nrows,
                               int64_t nints, int64_t ngroups, int64_t line_bytes,
                               int64_t s_int, int64_t s_group, int64_t s_row)
{
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

/* Integration i, rows row0 .. row0+nrows, from `src` into the file (pass 1). */
int64_t streamdet_scratch_write(int64_t fd, const char *src, int64_t i, int64_t row0,
                                int64_t nrows, int64_t nints, int64_t ngroups,
                                int64_t line_bytes, int64_t s_group, int64_t s_row)
{
    return integration_rows(fd, (char *)src, i, row0, nrows, nints, ngroups, line_bytes,
                            s_group, s_row, 1);
}

/* The read that mirrors streamdet_scratch_write, for an integration pass that follows a
 * band pass (a step needing whole integrations after one needing all integrations). */
int64_t streamdet_scratch_read_integration(int64_t fd, char *dest, int64_t i, int64_t row0,
                                           int64_t nrows, int64_t nints, int64_t ngroups,
                                           int64_t line_bytes, int64_t s_group, int64_t s_row)
{
    return integration_rows(fd, dest, i, row0, nrows, nints, ngroups, line_bytes,
                            s_group, s_row, 0);
}
