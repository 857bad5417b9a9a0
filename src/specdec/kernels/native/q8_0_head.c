/* The output head of a llama.cpp model, computed here for all verified positions in one pass.
 *
 * llama.cpp multiplies a Q8_0 head once per position that asks for logits: on this project's
 * 2-core EPYC, Gemma 3 270M's 262144 x 640 head (178 MB) costs 7.2 ms for one position and
 * 31.5 ms for five, against 4 ms for the rest of the model's step. A verify needs logits at
 * every drafted position, so the head alone made speculation a loss there. This product reads
 * each block of weights once and multiplies it by every position while it sits in registers:
 * 6.4 ms for one position, 10.5 for five (2 threads).
 *
 * It reads the GGUF's own Q8_0 blocks (a float16 scale, then 32 int8 weights: 34 bytes), mapped
 * from the file, and computes what llama.cpp's CPU backend computes: activations are quantized
 * to Q8_0 as its x86 quantize_row_q8_0 does (scale max|x|/127 stored as float16, values rounded
 * half to even), each block's integer dot product is exact, in lanes of four products as in
 * ggml's AVX2 kernel, and scaled by the two scales' product in float32. Only the order of the
 * float32 sums differs, by a few units in the last place (tests/test_llama_cpp_head.py compares
 * the logits with llama.cpp's own). Built at first use by specdec/kernels/native_matmul.py.
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

#define QK 32
#define BLOCK_BYTES 34
#define MAX_POSITIONS 64
#define GROUP 4        /* positions per pass over a pair of rows: 2 x 4 accumulators, no spills */
#define PREFETCH 1024  /* bytes ahead; 512 and 2048 were 40 % slower for one position */

static inline float round_to_f16(float x) {
#if defined(__F16C__)
    return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    return (float)(_Float16)x;
#endif
}

/* One position's activations to Q8_0, as ggml's x86 quantize_row_q8_0. */
static void quantize_q8_0(const float *x, int64_t K, int8_t *q, float *d) {
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        d[b] = round_to_f16(amax / 127.f);
        const float id = amax != 0.0f ? 127.f / amax : 0.0f;
        for (int j = 0; j < QK; j++) q[b * QK + j] = (int8_t)nearbyintf(xb[j] * id);
    }
}

/* The positions' activations as both products read them: Q8_0 values, their scales (rows of
 * `stride` floats, zero past the K/32 blocks) and each four-value lane's vpdpbusd start value,
 * -128 x its values' sum (the weights go in as w + 128). */
typedef struct {
    int8_t *values;
    float *scales;
    int32_t *start;
} Activations;

static void free_activations(Activations *a) {
    free(a->values), free(a->scales), free(a->start);
}

static size_t aligned_size(size_t bytes) { return (bytes + 63) / 64 * 64; }

/* Returns 0, or -2 when out of memory. */
static int quantize_activations(const float *X, int64_t n, int64_t K, int64_t stride, Activations *a) {
    const int64_t nb = K / QK;
    a->values = aligned_alloc(64, aligned_size((size_t)(n * K)));
    a->scales = calloc((size_t)(n * stride), sizeof(float));
    a->start = aligned_alloc(64, aligned_size((size_t)(n * nb * 8) * sizeof(int32_t)));
    if (a->values == NULL || a->scales == NULL || a->start == NULL) {
        free_activations(a);
        return -2;
    }
    for (int64_t c = 0; c < n; c++) quantize_q8_0(X + c * K, K, a->values + c * K, a->scales + c * stride);
    for (int64_t lane = 0; lane < n * nb * 8; lane++) {
        const int8_t *v = a->values + lane * 4;
        a->start[lane] = -128 * (v[0] + v[1] + v[2] + v[3]);
    }
    return 0;
}

#if defined(__AVX2__) && defined(__FMA__)
static inline __m256i lanes_of_four(__m256i w, __m256i a, __m256i start) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    /* vpdpbusd multiplies unsigned by signed bytes: the weights go in as w + 128, and `start`
     * holds -128 x (each lane's four activations), so the lane ends with sum(w * a). */
    return _mm256_dpbusd_epi32(start, _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80)), a);
#else
    (void)start; /* ggml's AVX2 product: |w| times a with w's sign, pairs to int16, fours to int32 */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w)),
                             _mm256_set1_epi16(1));
#endif
}

#define Q8_HEAD_VECTORIZED 1
/* Rows go in pairs and positions in fours: eight independent accumulator chains, which hide
 * the latency a single row's chain of 20 blocks exposed. */
static void head_rows(const uint8_t *W, int64_t begin, int64_t end, int64_t K, const int8_t *Aq, const float *Ad,
                      const int32_t *start, int64_t n, float *Y, int64_t ldy) {
    const int64_t nb = K / QK, row_bytes = nb * BLOCK_BYTES;
    for (int64_t r = begin; r < end; r += 2) {
        const int64_t r1 = r + 1 < end ? r + 1 : r; /* an odd last row is computed twice */
        const uint8_t *w0 = W + r * row_bytes, *w1 = W + r1 * row_bytes;
        for (int64_t g = 0; g < n; g += GROUP) {
            const int64_t m = n - g < GROUP ? n - g : GROUP;
            __m256 acc0[GROUP], acc1[GROUP];
            for (int c = 0; c < GROUP; c++) acc0[c] = acc1[c] = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *b0 = w0 + b * BLOCK_BYTES, *b1 = w1 + b * BLOCK_BYTES;
                _mm_prefetch((const char *)(b0 + PREFETCH), _MM_HINT_T0);
                _mm_prefetch((const char *)(b1 + PREFETCH), _MM_HINT_T0);
                const __m256i q0 = _mm256_loadu_si256((const __m256i *)(b0 + 2));
                const __m256i q1 = _mm256_loadu_si256((const __m256i *)(b1 + 2));
                const float d0 = f16_to_f32(b0), d1 = f16_to_f32(b1);
                for (int c = 0; c < m; c++) {
                    const int64_t at = (g + c) * nb + b;
                    const __m256i a = _mm256_loadu_si256((const __m256i *)(Aq + at * QK));
                    const __m256i s = _mm256_load_si256((const __m256i *)(start + at * 8));
                    acc0[c] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * Ad[at]), _mm256_cvtepi32_ps(lanes_of_four(q0, a, s)),
                                              acc0[c]);
                    acc1[c] = _mm256_fmadd_ps(_mm256_set1_ps(d1 * Ad[at]), _mm256_cvtepi32_ps(lanes_of_four(q1, a, s)),
                                              acc1[c]);
                }
            }
            for (int c = 0; c < m; c++) {
                Y[(g + c) * ldy + r] = hsum(acc0[c]);
                Y[(g + c) * ldy + r1] = hsum(acc1[c]);
            }
        }
    }
}
#else
#define Q8_HEAD_VECTORIZED 0
static void head_rows(const uint8_t *W, int64_t begin, int64_t end, int64_t K, const int8_t *Aq, const float *Ad,
                      const int32_t *start, int64_t n, float *Y, int64_t ldy) {
    (void)start;
    const int64_t nb = K / QK;
    for (int64_t r = begin; r < end; r++)
        for (int64_t c = 0; c < n; c++) {
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *block = W + (r * nb + b) * BLOCK_BYTES;
                int32_t dot = 0;
                for (int j = 0; j < QK; j++) dot += (int8_t)block[2 + j] * Aq[(c * nb + b) * QK + j];
                sum += f16_to_f32(block) * Ad[c * nb + b] * (float)dot;
            }
            Y[c * ldy + r] = sum;
        }
}
#endif

/* 1: vectorized (AVX2, with AVX-512 VNNI where the CPU has it); 0: scalar, correct but slower
 * than llama.cpp's own head, so the caller does not use it. */
int q8_0_head_vectorized(void) { return Q8_HEAD_VECTORIZED; }

/* Y[c, r] = dot(row r of the Q8_0 matrix W, X[c]) for c < n <= 64 and r < rows; K % 32 == 0.
 * Returns 0, -1 for a shape it does not take, -2 when out of memory. */
int q8_0_head(const uint8_t *W, int64_t rows, int64_t K, const float *X, int64_t n, float *Y, int threads) {
    if (n < 1 || n > MAX_POSITIONS || K < QK || K % QK != 0 || rows < 1) return -1;
    Activations a;
    if (quantize_activations(X, n, K, K / QK, &a) != 0) return -2;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        int64_t begin, end;
        thread_rows(rows, &begin, &end);
        head_rows(W, begin, end, K, a.values, a.scales, a.start, n, Y, rows);
    }
    free_activations(&a);
    return 0;
}

/* ---- The repacked head: the same product, at about memory speed (AVX-512 VNNI). ------------
 *
 * The GGUF layout above costs ~12 instructions per 32-weight block and position (a float16
 * scale read and converted, a misaligned load, a broadcast of the scale product), which kept
 * the one-position product compute-bound at ~35 GB/s where this machine streams 55-80 GB/s.
 * Repacked once at load, the weights sit as unsigned bytes (w + 128: vpdpbusd's unsigned
 * operand) in rows of K, their float16 scales in rows of K/32 beside them, both in anonymous
 * memory (huge pages: the file mapping's 4 kB pages cost ~20 % more on their own). A 512-bit
 * vpdpbusd then takes two blocks at once, each lane starting from -128 x (its four activations)
 * so it ends with the exact signed dot; the sixteen lanes are scaled by their block's scale
 * product (one permute from the sixteen products of the row) and summed.
 *
 * Each block's integer dot is exact, as in llama.cpp; the float32 sums run in sixteen lanes
 * (even and odd blocks) instead of ggml's eight, so logits differ from llama.cpp's own in the
 * last bits (the split check's tolerance). Each (row, position) is computed by the same
 * instructions whatever the number of positions: verify rows equal a one-position step's.
 * Gemma 3 270M's head, 2 threads: 4.4 ms for one position, 5.3 for four, 6.8 for seven, 11.9 for
 * thirteen (the layout above: 6.1, 6.7, 9.6 and ~19). Past one position it is bound by the
 * vector unit (four 512-bit operations per pair of blocks and position), not by memory. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define Q8_REPACKED 1
#define REPACKED_PREFETCH 2048
/* Positions per pass over a row: 7 accumulators and 7 scale products beside the 8 permute
 * indices; at 8 the registers spilled (8 positions cost 11.4 ms against 6.8 for 7). */
#define REPACKED_GROUP 7

/* One row's logits at m positions; inlined per m, so the m accumulators stay in registers. */
static inline __attribute__((always_inline)) void repacked_row(const uint8_t *q, const uint16_t *scales, int64_t nb,
                                                               int64_t K, const int8_t *Aq, const float *Ad16,
                                                               const int32_t *start, const __m512i *pick, const int m,
                                                               float *Y, int64_t ldy) {
    const int64_t nb16 = (nb + 15) / 16 * 16;
    __m512 acc[REPACKED_GROUP];
    for (int c = 0; c < m; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t G = 0; G < nb; G += 16) {
        const int64_t count = nb - G < 16 ? nb - G : 16;
        const __m512 weight_scales =
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << count) - 1), scales + G));
        __m512 products[REPACKED_GROUP];
        for (int c = 0; c < m; c++) products[c] = _mm512_mul_ps(weight_scales, _mm512_loadu_ps(Ad16 + c * nb16 + G));
        for (int64_t j = 0; j < count / 2; j++) {
            const int64_t at = (G + 2 * j) * QK;
            _mm_prefetch((const char *)(q + at + REPACKED_PREFETCH), _MM_HINT_T0);
            const __m512i w = _mm512_loadu_si512((const void *)(q + at));
            for (int c = 0; c < m; c++) {
                const int64_t a = c * K + at;
                const __m512i dots = _mm512_dpbusd_epi32(_mm512_loadu_si512((const void *)(start + a / 4)), w,
                                                         _mm512_loadu_si512((const void *)(Aq + a)));
                acc[c] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pick[j], products[c]), _mm512_cvtepi32_ps(dots), acc[c]);
            }
        }
    }
    for (int c = 0; c < m; c++) Y[c * ldy] = _mm512_reduce_add_ps(acc[c]);
}

static void repacked_rows(const uint8_t *Qu, const uint16_t *S16, int64_t begin, int64_t end, int64_t K,
                          const int8_t *Aq, const float *Ad16, const int32_t *start, int64_t n, float *Y,
                          int64_t ldy) {
    const int64_t nb = K / QK, nb16 = (nb + 15) / 16 * 16;
    __m512i pick[8]; /* lanes 0-7 take product 2j, lanes 8-15 product 2j + 1 */
    for (int j = 0; j < 8; j++)
        pick[j] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(2 * j)), _mm256_set1_epi32(2 * j + 1), 1);
    for (int64_t r = begin; r < end; r++) {
        const uint8_t *q = Qu + r * K;
        const uint16_t *scales = S16 + r * nb;
        for (int64_t g = 0; g < n; g += REPACKED_GROUP) {
            const int64_t m = n - g < REPACKED_GROUP ? n - g : REPACKED_GROUP;
            const int8_t *aq = Aq + g * K;
            const float *ad = Ad16 + g * nb16;
            const int32_t *st = start + g * K / 4;
            float *y = Y + g * ldy + r;
            switch (m) { /* a constant m per call: the loops over positions unroll */
                case 1: repacked_row(q, scales, nb, K, aq, ad, st, pick, 1, y, ldy); break;
                case 2: repacked_row(q, scales, nb, K, aq, ad, st, pick, 2, y, ldy); break;
                case 3: repacked_row(q, scales, nb, K, aq, ad, st, pick, 3, y, ldy); break;
                case 4: repacked_row(q, scales, nb, K, aq, ad, st, pick, 4, y, ldy); break;
                case 5: repacked_row(q, scales, nb, K, aq, ad, st, pick, 5, y, ldy); break;
                case 6: repacked_row(q, scales, nb, K, aq, ad, st, pick, 6, y, ldy); break;
                default: repacked_row(q, scales, nb, K, aq, ad, st, pick, REPACKED_GROUP, y, ldy); break;
            }
        }
    }
}
#else
#define Q8_REPACKED 0
#endif

/* 1 where the repacked product is built (AVX-512 VNNI); the caller then repacks the head. */
int q8_0_head_repacked_available(void) { return Q8_REPACKED; }

/* GGUF Q8_0 rows [rows, K/32 blocks of 34 bytes] -> Qu [rows, K] (w + 128) and S16 [rows, K/32]
 * (the float16 scales' bits). Returns 0, or -1 for K not a multiple of 64 (blocks go in pairs). */
int q8_0_repack(const uint8_t *W, int64_t rows, int64_t K, uint8_t *Qu, uint16_t *S16, int threads) {
    if (K < 2 * QK || K % (2 * QK) != 0 || rows < 1) return -1;
    const int64_t nb = K / QK;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *block = W + (r * nb + b) * BLOCK_BYTES;
            memcpy(S16 + r * nb + b, block, 2);
            for (int j = 0; j < QK; j++) Qu[r * K + b * QK + j] = block[2 + j] ^ 0x80;
        }
    return 0;
}

/* q8_0_head on the repacked head. Returns 0, -1 for a shape it does not take (or where it is
 * not built), -2 when out of memory. */
int q8_0_head_repacked(const uint8_t *Qu, const uint16_t *S16, int64_t rows, int64_t K, const float *X, int64_t n,
                       float *Y, int threads) {
#if Q8_REPACKED
    if (n < 1 || n > MAX_POSITIONS || K < 2 * QK || K % (2 * QK) != 0 || rows < 1) return -1;
    Activations a; /* scales in rows of whole groups of 16 blocks, as repacked_row loads them */
    if (quantize_activations(X, n, K, (K / QK + 15) / 16 * 16, &a) != 0) return -2;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        int64_t begin, end;
        thread_rows(rows, &begin, &end);
        repacked_rows(Qu, S16, begin, end, K, a.values, a.scales, a.start, n, Y, rows);
    }
    free_activations(&a);
    return 0;
#else
    (void)Qu, (void)S16, (void)rows, (void)K, (void)X, (void)n, (void)Y, (void)threads;
    return -1;
#endif
}
