/* Few-row products for CPU decoding: Y[j, r] = scale[r] * dot(W[r, :], X[j, :]) for r in [begin, end).
 *
 * A decode or verify step multiplies 1-16 activation rows by every weight matrix. The weights
 * must stream from memory once per step, whatever the row count; BLAS libraries either run
 * one row at a time (so k rows read the weights k times) or repack the weights first. Here a
 * block of 4 weight rows is loaded once and multiplied by every activation row while it sits
 * in L1, so memory traffic is one pass over W for any n <= 16. The arithmetic (n FMAs per
 * weight) stays under the memory time for a few rows on AVX2 cores; from ~6 rows on this
 * project's 2-core EPYC it is what sets the time (see below).
 *
 * X and Y are float32; W is float32 (scale 1) or int8 with one float32 scale per row (weight-only
 * quantization: the int8 values are widened to float in registers, so activations are never
 * rounded). Y has leading dimension ldy (the full output width), so the rows can be split
 * across threads: few_rows_i8_parallel splits them over OpenMP threads. Linked against the
 * libgomp that PyTorch has already loaded (same soname), they share its thread pool instead of
 * starting a second one that would spin against it. Built at first use by
 * specdec/kernels/native_matmul.py.
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "simd_common.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }

static inline __m256 load_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#endif

/* The body, written once for any weight type: LOAD8 loads 8 weights as floats, SCALAR one,
 * SCALE(r) is row r's scale.
 *
 * Per block of 4 weight rows, activation rows go in threes (12 vector accumulators: 7 loads
 * per 12 FMAs; pairs spent 6 per 8). Columns go in tiles of COL_TILE so that the block's tile
 * and every activation row's tile stay in L1 together (4 x 256 weights + 16 x 256 floats =
 * 20 KB for float32): untiled, each pass over 1536 columns evicted the block, and the FMAs
 * waited on L2. Qwen2.5 1.5B's 151936 x 1536 head, float32, 8 rows: 83 ms untiled in pairs,
 * 57 tiled in pairs, 46 tiled in threes (one row: 32). The threes' accumulators live in `acc`
 * between tiles. */

#define COL_TILE 256
#define GROUP_ROWS 16 /* activation rows whose accumulators `acc` holds at once */
#define FEW_ROWS_BODY(WT, LOAD8, SCALAR, SCALE)                                                \
    const int64_t vec_cols = VEC_COLS(cols);                                                   \
    int64_t r = begin;                                                                         \
    for (; r + 4 <= end; r += 4) {                                                             \
        const WT *w0 = W + r * cols, *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;       \
        for (int64_t g = 0; g < n; g += GROUP_ROWS) {                                          \
            const int64_t m = n - g < GROUP_ROWS ? n - g : GROUP_ROWS;                         \
            ACC_DECL                                                                           \
            for (int64_t t = 0; t < vec_cols; t += COL_TILE) {                                 \
                const int64_t t_end = t + COL_TILE < vec_cols ? t + COL_TILE : vec_cols;       \
                for (int64_t j = 0; j < m; j += 3) {                                           \
                    const float *x0 = X + (g + j) * cols;                                      \
                    const float *x1 = (j + 1 < m) ? x0 + cols : x0;                            \
                    const float *x2 = (j + 2 < m) ? x0 + 2 * cols : x0;                        \
                    VEC_LOAD_ACC                                                               \
                    VEC_LOOP(LOAD8, t, t_end)                                                  \
                    VEC_SAVE_ACC                                                               \
                }                                                                              \
            }                                                                                  \
            const float c0 = SCALE(r), c1 = SCALE(r + 1), c2 = SCALE(r + 2), c3 = SCALE(r + 3); \
            for (int64_t j = 0; j < m; ++j) {                                                  \
                const float *x = X + (g + j) * cols;                                           \
                float s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                          \
                ACC_SUM(j)                                                                     \
                for (int64_t c = vec_cols; c < cols; ++c) {                                    \
                    s0 += SCALAR(w0[c]) * x[c]; s1 += SCALAR(w1[c]) * x[c];                    \
                    s2 += SCALAR(w2[c]) * x[c]; s3 += SCALAR(w3[c]) * x[c];                    \
                }                                                                              \
                float *y = Y + (g + j) * ldy + r;                                              \
                y[0] = c0 * s0; y[1] = c1 * s1; y[2] = c2 * s2; y[3] = c3 * s3;                \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    for (; r < end; ++r) { /* the last rows, one at a time */                                  \
        const WT *w = W + r * cols;                                                            \
        for (int64_t j = 0; j < n; ++j) {                                                      \
            const float *x = X + j * cols;                                                     \
            float s = 0;                                                                       \
            for (int64_t c = 0; c < cols; ++c) s += SCALAR(w[c]) * x[c];                       \
            Y[j * ldy + r] = SCALE(r) * s;                                                     \
        }                                                                                      \
    }

#if defined(__AVX2__) && defined(__FMA__)
#define VEC_COLS(cols) ((cols) / 8 * 8)
/* acc[j][i]: activation row j of the group times weight row i of the block, 8 lanes. */
#define ACC_DECL                                                                               \
    __m256 acc[GROUP_ROWS + 2][4];                                                             \
    for (int64_t j = 0; j <= m + 1; ++j)                                                       \
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = _mm256_setzero_ps();
/* A last group of one or two rows repeats its first; the repeats' sums land in spares. */
#define VEC_LOAD_ACC                                                                           \
    __m256 *p0 = acc[j], *p1 = acc[j + 1 < m ? j + 1 : m], *p2 = acc[j + 2 < m ? j + 2 : m + 1]; \
    __m256 a00 = p0[0], a01 = p0[1], a02 = p0[2], a03 = p0[3];                                 \
    __m256 a10 = p1[0], a11 = p1[1], a12 = p1[2], a13 = p1[3];                                 \
    __m256 a20 = p2[0], a21 = p2[1], a22 = p2[2], a23 = p2[3];
#define VEC_LOOP(LOAD8, from, to)                                                              \
    for (int64_t c = from; c < to; c += 8) {                                                   \
        __m256 xa = _mm256_loadu_ps(x0 + c), xb = _mm256_loadu_ps(x1 + c), xc = _mm256_loadu_ps(x2 + c); \
        if (j == 0) PREFETCH_NEXT_BLOCK(w0, w1, w2, w3, 4 * cols + c)                          \
        __m256 v = LOAD8(w0 + c);                                                              \
        a00 = _mm256_fmadd_ps(v, xa, a00); a10 = _mm256_fmadd_ps(v, xb, a10); a20 = _mm256_fmadd_ps(v, xc, a20); \
        v = LOAD8(w1 + c);                                                                     \
        a01 = _mm256_fmadd_ps(v, xa, a01); a11 = _mm256_fmadd_ps(v, xb, a11); a21 = _mm256_fmadd_ps(v, xc, a21); \
        v = LOAD8(w2 + c);                                                                     \
        a02 = _mm256_fmadd_ps(v, xa, a02); a12 = _mm256_fmadd_ps(v, xb, a12); a22 = _mm256_fmadd_ps(v, xc, a22); \
        v = LOAD8(w3 + c);                                                                     \
        a03 = _mm256_fmadd_ps(v, xa, a03); a13 = _mm256_fmadd_ps(v, xb, a13); a23 = _mm256_fmadd_ps(v, xc, a23); \
    }
#define VEC_SAVE_ACC                                                                           \
    p0[0] = a00; p0[1] = a01; p0[2] = a02; p0[3] = a03;                                        \
    p1[0] = a10; p1[1] = a11; p1[2] = a12; p1[3] = a13;                                        \
    p2[0] = a20; p2[1] = a21; p2[2] = a22; p2[3] = a23;
#define ACC_SUM(j)                                                                             \
    s0 = hsum(acc[j][0]); s1 = hsum(acc[j][1]); s2 = hsum(acc[j][2]); s3 = hsum(acc[j][3]);
/* The hardware prefetcher alone left these loops at about half the memory bandwidth: fetch
 * the next block of rows (the same columns, one block ahead) while this one is multiplied. */
#define PREFETCH_NEXT_BLOCK(w0, w1, w2, w3, ahead)                                             \
    {                                                                                          \
        _mm_prefetch((const char *)(w0 + (ahead)), _MM_HINT_T0);                               \
        _mm_prefetch((const char *)(w1 + (ahead)), _MM_HINT_T0);                               \
        _mm_prefetch((const char *)(w2 + (ahead)), _MM_HINT_T0);                               \
        _mm_prefetch((const char *)(w3 + (ahead)), _MM_HINT_T0);                               \
    }
#else
#define VEC_COLS(cols) 0
#define ACC_DECL
#define VEC_LOAD_ACC
#define VEC_LOOP(LOAD8, from, to)
#define VEC_SAVE_ACC
#define ACC_SUM(j)
#define load_f32(p) 0
#define load_i8(p) 0
#define PREFETCH_NEXT_BLOCK(w0, w1, w2, w3, ahead)
#endif

#define IDENTITY(v) (v)
#define WIDEN(v) ((float)(v))
#define UNIT(r) 1.0f
#define ROW_SCALE(r) scale[r]

void few_rows_f32(const float *W, const float *X, float *Y, int64_t begin, int64_t end, int64_t cols,
                  int64_t n, int64_t ldy) {
    FEW_ROWS_BODY(float, load_f32, IDENTITY, UNIT)
}

void few_rows_i8(const int8_t *W, const float *scale, const float *X, float *Y, int64_t begin, int64_t end,
                 int64_t cols, int64_t n, int64_t ldy) {
    FEW_ROWS_BODY(int8_t, load_i8, WIDEN, ROW_SCALE)
}

/* One activation row (a decode step): 16 int8 weights per row per iteration, two accumulators. */
static void one_row_i8(const int8_t *W, const float *scale, const float *x, float *y, int64_t begin, int64_t end,
                       int64_t cols) {
    int64_t r = begin;
#if defined(__AVX2__) && defined(__FMA__)
    for (; r + 4 <= end; r += 4) {
        const int8_t *w0 = W + r * cols, *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        int64_t c = 0;
        for (; c + 16 <= cols; c += 16) {
            __m256 xa = _mm256_loadu_ps(x + c), xb = _mm256_loadu_ps(x + c + 8);
            PREFETCH_NEXT_BLOCK(w0, w1, w2, w3, 4 * cols + c)
#define ROW16(w, a, b)                                                                         \
    {                                                                                          \
        __m128i v = _mm_loadu_si128((const __m128i *)(w + c));                                 \
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), xa, a);               \
        b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), xb, b); \
    }
            ROW16(w0, a0, b0) ROW16(w1, a1, b1) ROW16(w2, a2, b2) ROW16(w3, a3, b3)
#undef ROW16
        }
        float s0 = hsum(_mm256_add_ps(a0, b0)), s1 = hsum(_mm256_add_ps(a1, b1));
        float s2 = hsum(_mm256_add_ps(a2, b2)), s3 = hsum(_mm256_add_ps(a3, b3));
        for (; c < cols; ++c) {
            s0 += w0[c] * x[c]; s1 += w1[c] * x[c]; s2 += w2[c] * x[c]; s3 += w3[c] * x[c];
        }
        y[r] = s0 * scale[r]; y[r + 1] = s1 * scale[r + 1]; y[r + 2] = s2 * scale[r + 2]; y[r + 3] = s3 * scale[r + 3];
    }
#endif
    for (; r < end; ++r) {
        const int8_t *w = W + r * cols;
        float s = 0;
        for (int64_t c = 0; c < cols; ++c) s += w[c] * x[c];
        y[r] = s * scale[r];
    }
}

/* Each of `threads` threads takes a block of rows (a multiple of 4, so no block splits a group). */
#define SPLIT_ROWS(CALL)                                                                       \
    int64_t parts = threads < 1 ? 1 : threads;                                                 \
    int64_t step = ((rows + parts - 1) / parts + 3) / 4 * 4;                                   \
    _Pragma("omp parallel for num_threads(threads) schedule(static, 1)")                       \
    for (int64_t part = 0; part < parts; ++part) {                                             \
        int64_t begin = part * step, end = begin + step < rows ? begin + step : rows;          \
        if (begin < end) CALL;                                                                 \
    }

void few_rows_i8_parallel(const int8_t *W, const float *scale, const float *X, float *Y, int64_t rows,
                          int64_t cols, int64_t n, int threads) {
    if (n == 1) {
        SPLIT_ROWS(one_row_i8(W, scale, X, Y, begin, end, cols))
    } else {
        SPLIT_ROWS(few_rows_i8(W, scale, X, Y, begin, end, cols, n, rows))
    }
}

int few_rows_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int few_rows_vectorized(void) {
#if defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}
