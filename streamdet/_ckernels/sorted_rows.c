/* The declarations and what the functions do: sorted_rows.h */
#include <math.h>

#include "sorted_rows.h"

#define MEDIANS(NAME, T)                                                                \
    void NAME(const T *ordered, int64_t row_stride, int64_t width,                      \
              const int64_t *counts, int64_t count_stride, int64_t nrows, double *out)   \
    {                                                                                   \
        for (int64_t p = 0; p < nrows; p++) {                                           \
            const int64_t n = counts[p * count_stride];                                 \
            if (n <= 0) {                                                               \
                out[p] = NAN;                                                           \
                continue;                                                               \
            }                                                                           \
            const T *row = ordered + p * row_stride;                                    \
            const int64_t high = n / 2 < width - 1 ? n / 2 : width - 1;                 \
            out[p] = ((double)row[(n - 1) / 2] + (double)row[high]) * 0.5;              \
        }                                                                               \
    }
MEDIANS(streamdet_sorted_row_medians_f32, float)
MEDIANS(streamdet_sorted_row_medians_f64, double)
