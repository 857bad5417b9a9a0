/* Few-row products for CPU decoding: Y[j, r] = dot(W[r, :], X[j, :]) for r in [begin, end).
 *
 * A decode or verify step multiplies 1-16 activation rows by every weight matrix. The weights
 * must stream from memory once per step, whatever the row count; BLAS libraries either run
 * one row at a time (so k rows read the weights k times) or repack the weights first. Here a
 * block of 4 weight rows is loaded once and multiplied by every activation row while it sits
 * in L1, so memory traffic is one pass over W for any n <= 16 and the arithmetic (n FMAs per
 * weight) stays under the memory time on AVX2 cores.
 *
 * W, X and Y are float32; Y has leading dimension ldy (the full output width), so callers can
 * split the rows across threads. Built at first use by specdec/models/native_matmul.py.
 */
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* The body, written once for any weight type: LOAD8 loads 8 weights as floats, SCALAR one. */
#define FEW_ROWS_BODY(WT, LOAD8, SCALAR)                                                       \
    int64_t r = begin;                                                                         \
    for (; r + 4 <= end; r += 4) {                                                             \
        const WT *w0 = W + r * cols, *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;       \
        for (int64_t j = 0; j < n; j += 2) {                                                   \
            const float *x0 = X + j * cols;                                                    \
            const float *x1 = (j + 1 < n) ? x0 + cols : x0;                                    \
            VEC_DECL                                                                            \
            int64_t c = 0;                                                                     \
            VEC_LOOP(LOAD8)                                                                    \
            float s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;      \
            for (; c < cols; ++c) {                                                            \
                float a = x0[c], b = x1[c];                                                    \
                float v0 = SCALAR(w0[c]), v1 = SCALAR(w1[c]), v2 = SCALAR(w2[c]), v3 = SCALAR(w3[c]); \
                s00 += v0 * a; s01 += v1 * a; s02 += v2 * a; s03 += v3 * a;                    \
                s10 += v0 * b; s11 += v1 * b; s12 += v2 * b; s13 += v3 * b;                    \
            }                                                                                  \
            VEC_STORE                                                                          \
            float *y0 = Y + j * ldy + r;                                                       \
            y0[0] = s00; y0[1] = s01; y0[2] = s02; y0[3] = s03;                                \
            if (j + 1 < n) {                                                                   \
                float *y1 = y0 + ldy;                                                          \
                y1[0] = s10; y1[1] = s11; y1[2] = s12; y1[3] = s13;                            \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    for (; r < end; ++r) { /* the last rows, one at a time */                                  \
        const WT *w = W + r * cols;                                                            \
        for (int64_t j = 0; j < n; ++j) {                                                      \
            const float *x = X + j * cols;                                                     \
            float s = 0;                                                                       \
            for (int64_t c = 0; c < cols; ++c) s += SCALAR(w[c]) * x[c];                       \
            Y[j * ldy + r] = s;                                                                \
        }                                                                                      \
    }

#if defined(__AVX2__) && defined(__FMA__)
#define VEC_DECL                                                                               \
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;                         \
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
#define VEC_LOOP(LOAD8)                                                                        \
    for (; c + 8 <= cols; c += 8) {                                                            \
        __m256 xa = _mm256_loadu_ps(x0 + c), xb = _mm256_loadu_ps(x1 + c);                    \
        __m256 v = LOAD8(w0 + c);                                                              \
        a00 = _mm256_fmadd_ps(v, xa, a00); a10 = _mm256_fmadd_ps(v, xb, a10);                  \
        v = LOAD8(w1 + c);                                                                     \
        a01 = _mm256_fmadd_ps(v, xa, a01); a11 = _mm256_fmadd_ps(v, xb, a11);                  \
        v = LOAD8(w2 + c);                                                                     \
        a02 = _mm256_fmadd_ps(v, xa, a02); a12 = _mm256_fmadd_ps(v, xb, a12);                  \
        v = LOAD8(w3 + c);                                                                     \
        a03 = _mm256_fmadd_ps(v, xa, a03); a13 = _mm256_fmadd_ps(v, xb, a13);                  \
    }
#define VEC_STORE                                                                              \
    s00 += hsum(a00); s01 += hsum(a01); s02 += hsum(a02); s03 += hsum(a03);                    \
    s10 += hsum(a10); s11 += hsum(a11); s12 += hsum(a12); s13 += hsum(a13);
#else
#define VEC_DECL
#define VEC_LOOP(LOAD8)
#define VEC_STORE
#define load_f32(p) 0
#endif

#define IDENTITY(v) (v)

void few_rows_f32(const float *W, const float *X, float *Y, int64_t begin, int64_t end, int64_t cols,
                  int64_t n, int64_t ldy) {
    FEW_ROWS_BODY(float, load_f32, IDENTITY)
}

int few_rows_vectorized(void) {
#if defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}
