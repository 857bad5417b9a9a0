/* What the native kernels share: reading GGUF's float16 scales, a horizontal sum, and each
 * thread's run of rows. */
#ifndef SPECDEC_SIMD_COMMON_H
#define SPECDEC_SIMD_COMMON_H

#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

static inline float f16_to_f32(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
#endif
}

#if defined(__AVX2__)
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* Inside a parallel region: this thread's contiguous run of `rows` [begin, end), so each
 * streams its part of a matrix in order. */
static inline void thread_rows(int64_t rows, int64_t *begin, int64_t *end) {
    *begin = 0, *end = rows;
#ifdef _OPENMP
    const int64_t parts = omp_get_num_threads(), part = omp_get_thread_num();
    *begin = rows * part / parts;
    *end = rows * (part + 1) / parts;
#endif
}

#endif
