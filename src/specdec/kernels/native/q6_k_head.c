/* A Q6_K output head (Qwen2.5's, tied to its embedding), computed for all verified positions in one pass.
 *
 * Like q8_0_head.c, for the heads that llama.cpp's Q4_K_M files store in Q6_K: llama.cpp
 * multiplies the head once per position that asks for logits, and on Qwen2.5-Coder-1.5B
 * (151936 x 1536, 191 MB) that is most of what each extra verified position costs on two
 * cores. This product unpacks each super-block of weights once and multiplies it by every
 * position while it sits in L1.
 *
 * A Q6_K super-block holds 256 weights in 210 bytes: the low four bits of each (ql, 128 bytes),
 * the high two (qh, 64), sixteen int8 scales (one per 16 weights) and a float16 scale d. A
 * weight is d * scale * (q - 32), q in [0, 64). It computes what llama.cpp's CPU backend does:
 * activations quantized to Q8_K as ggml's quantize_row_q8_K_ref (per 256: iscale = -127 / the
 * value of largest magnitude, round to nearest, at most 127; d = 1 / iscale; sums of 16), each
 * super-block's integer dot product exact (the -32 offset through the activations' sums of 16,
 * as its AVX2 kernel does), scaled by d_w * d_x in float32 and summed in eight lanes. Only the
 * order of those float sums differs from ggml's (tests/test_llama_cpp_head.py compares logits
 * with llama.cpp's own). Built at first use by specdec/kernels/native_matmul.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "simd_common.h"

#define QK_K 256
#define Q6_BYTES 210
#define MAX_POSITIONS 64

typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
} q8_k;

/* ggml's nearest_int: round half to even through the float's mantissa. */
static inline int nearest_int(float f) {
    float v = f + 12582912.f;
    int i;
    memcpy(&i, &v, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

static void quantize_q8_k(const float *x, int64_t K, q8_k *y) {
    for (int64_t b = 0; b < K / QK_K; b++, x += QK_K) {
        float max = 0.0f, amax = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            const float ax = fabsf(x[j]);
            if (ax > amax) amax = ax, max = x[j];
        }
        if (amax == 0.0f) {
            memset(&y[b], 0, sizeof y[b]);
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < QK_K; j++) {
            const int v = nearest_int(iscale * x[j]);
            y[b].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int g = 0; g < QK_K / 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) sum += y[b].qs[g * 16 + j];
            y[b].bsums[g] = (int16_t)sum;
        }
        y[b].d = 1.0f / iscale;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#define Q6_HEAD_VECTORIZED 1

/* The 256 weights of a super-block as unsigned bytes q (0..63), in order, 32 a vector; and
 * each vector's two group scales as 16 int16 (8 of each, matching maddubs' pairs). */
static inline void unpack(const uint8_t *block, __m256i *q, __m256i *scales, __m256i *all_scales) {
    const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03);
    for (int half = 0; half < 2; half++) {
        const uint8_t *ql = block + 64 * half, *qh = block + 128 + 32 * half;
        const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
        const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
        const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
        q[4 * half + 0] = _mm256_or_si256(_mm256_and_si256(l0, low), _mm256_slli_epi16(_mm256_and_si256(h, two), 4));
        q[4 * half + 1] = _mm256_or_si256(_mm256_and_si256(l1, low),
                                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), two), 4));
        q[4 * half + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low),
                                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), two), 4));
        q[4 * half + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low),
                                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), two), 4));
    }
    const int8_t *sc = (const int8_t *)(block + 192);
    for (int v = 0; v < 8; v++)
        scales[v] = _mm256_set_m128i(_mm_set1_epi16(sc[2 * v + 1]), _mm_set1_epi16(sc[2 * v]));
    *all_scales = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
}

static void head_rows(const uint8_t *W, int64_t begin, int64_t end, int64_t K, const q8_k *A, int64_t n,
                      float *Y, int64_t ldy) {
    const int64_t nb = K / QK_K;
    for (int64_t r = begin; r < end; r++) {
        __m256 acc[MAX_POSITIONS];
        for (int64_t c = 0; c < n; c++) acc[c] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *block = W + (r * nb + b) * Q6_BYTES;
            _mm_prefetch((const char *)(block + 4 * Q6_BYTES), _MM_HINT_T0);
            _mm_prefetch((const char *)(block + 4 * Q6_BYTES + 64), _MM_HINT_T0);
            _mm_prefetch((const char *)(block + 4 * Q6_BYTES + 128), _MM_HINT_T0);
            _mm_prefetch((const char *)(block + 4 * Q6_BYTES + 192), _MM_HINT_T0);
            __m256i q[8], scales[8], all_scales;
            unpack(block, q, scales, &all_scales);
            const float dw = f16_to_f32(block + 208);
            for (int64_t c = 0; c < n; c++) {
                const q8_k *a = &A[c * nb + b];
                /* sum over groups of scale * (sum q * a) - 32 * scale * (sum a): exact in int32 */
                __m256i sum = _mm256_slli_epi32(
                    _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)a->bsums), all_scales), 5);
                sum = _mm256_sub_epi32(_mm256_setzero_si256(), sum);
                for (int v = 0; v < 8; v++) {
                    const __m256i x = _mm256_loadu_si256((const __m256i *)(a->qs + 32 * v));
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(q[v], x), scales[v]));
                }
                acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a->d), _mm256_cvtepi32_ps(sum), acc[c]);
            }
        }
        for (int64_t c = 0; c < n; c++) Y[c * ldy + r] = hsum(acc[c]);
    }
}
#else
#define Q6_HEAD_VECTORIZED 0
static void head_rows(const uint8_t *W, int64_t begin, int64_t end, int64_t K, const q8_k *A, int64_t n,
                      float *Y, int64_t ldy) {
    const int64_t nb = K / QK_K;
    for (int64_t r = begin; r < end; r++)
        for (int64_t c = 0; c < n; c++) {
            float total = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *block = W + (r * nb + b) * Q6_BYTES, *ql = block, *qh = block + 128;
                const int8_t *sc = (const int8_t *)(block + 192);
                const q8_k *a = &A[c * nb + b];
                int32_t sum = 0;
                for (int half = 0; half < 2; half++)
                    for (int l = 0; l < 32; l++) {
                        const int base = 128 * half + l, h = qh[32 * half + l];
                        const int q[4] = {(ql[64 * half + l] & 15) | ((h & 3) << 4),
                                          (ql[64 * half + l + 32] & 15) | (((h >> 2) & 3) << 4),
                                          (ql[64 * half + l] >> 4) | (((h >> 4) & 3) << 4),
                                          (ql[64 * half + l + 32] >> 4) | (((h >> 6) & 3) << 4)};
                        for (int j = 0; j < 4; j++)
                            sum += sc[(base + 32 * j) / 16] * (q[j] - 32) * a->qs[base + 32 * j];
                    }
                total += f16_to_f32(block + 208) * a->d * (float)sum;
            }
            Y[c * ldy + r] = total;
        }
}
#endif

/* 1: vectorized (AVX2); 0: scalar, correct but slower than llama.cpp's own head. */
int q6_k_head_vectorized(void) { return Q6_HEAD_VECTORIZED; }

/* Y[c, r] = dot(row r of the Q6_K matrix W, X[c]) for c < n <= 64 and r < rows; K % 256 == 0.
 * Returns 0, -1 for a shape it does not take, -2 when out of memory. */
int q6_k_head(const uint8_t *W, int64_t rows, int64_t K, const float *X, int64_t n, float *Y, int threads) {
    if (n < 1 || n > MAX_POSITIONS || K < QK_K || K % QK_K != 0 || rows < 1) return -1;
    const int64_t nb = K / QK_K;
    q8_k *a = aligned_alloc(64, ((size_t)(n * nb) * sizeof(q8_k) + 63) / 64 * 64);
    if (a == NULL) return -2;
    for (int64_t c = 0; c < n; c++) quantize_q8_k(X + c * K, K, a + c * nb);
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        int64_t begin, end;
        thread_rows(rows, &begin, &end);
        head_rows(W, begin, end, K, a, n, Y, rows);
    }
    free(a);
    return 0;
}
