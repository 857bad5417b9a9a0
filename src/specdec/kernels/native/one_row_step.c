/* One decoder step for one new token, all layers in one call, over int8 weight-only matrices.
 *
 * A draft step on CPU should cost what its weights cost to read. Run as PyTorch ops, a step of
 * Gemma 3 270M's int8 self-draft spent ~7.7 ms in ~400 small ops (norms alone ~15 us each)
 * around ~7.4 ms of products. Here the per-token work between the products (norms, rotary,
 * attention over the cache, activation) is plain loops over a few hundred floats, and the
 * products are the few-row kernel's one-row path split over the OpenMP threads.
 *
 * The computation is compact_decoder.CompactDecoder._layer for one row: pre-norm decoder
 * layers (Llama, Qwen2, Gemma 3), optional q/k norms and Gemma's post-norms, half-rotation
 * rotary embeddings, grouped-query attention with an optional sliding window, gated MLP.
 * float32 throughout; the KV cache is the caller's [kv_heads, capacity, head_dim] per layer.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void few_rows_i8_parallel(const int8_t *W, const float *scale, const float *X, float *Y, int64_t rows,
                          int64_t cols, int64_t n, int threads);

typedef struct {
    const int8_t *qkv, *o, *gate_up, *down;
    const float *qkv_scale, *o_scale, *gate_up_scale, *down_scale;
    const float *qkv_bias;         /* NULL: none */
    const float *input_norm, *pre_mlp_norm;
    const float *q_norm, *k_norm;  /* [head_dim] or NULL */
    const float *post_attention_norm, *post_mlp_norm;  /* NULL: none (Llama, Qwen2) */
    const float *cos, *sin;        /* [head_dim] at this step's position, this layer's rotary kind */
    float *keys, *values;          /* [kv_heads, capacity, head_dim] */
    int64_t window;                /* 0: full attention */
    float scaling;
} step_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, capacity;
    float eps;
    int activation;  /* 0: SiLU, 1: GELU (tanh approximation) */
    int threads;
} step_shape;

static void rms_norm(const float *x, const float *w, float *out, int64_t n, float eps) {
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(sum / n) + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * w[i];
}

static void rotate(float *x, const float *cos, const float *sin, int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; ++i) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

static float activate(float x, int kind) {
    if (kind == 0) return x / (1.0f + expf(-x));
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

/* hidden [shape.hidden] in/out: the residual stream of the token at `position`.
 * Returns 0, or -1 when its scratch memory cannot be allocated (hidden and the cache untouched). */
int one_row_step(const step_layer *layers, int64_t n_layers, const step_shape *shape, float *hidden,
                 int64_t position) {
    const int64_t H = shape->hidden, d = shape->head_dim, heads = shape->heads, kv = shape->kv_heads;
    const int64_t q_rows = heads * d, qkv_rows = (heads + 2 * kv) * d, I = shape->intermediate;
    const int64_t group = heads / kv;
    float *x = malloc(sizeof(float) * H), *qkv = malloc(sizeof(float) * qkv_rows);
    float *attended = malloc(sizeof(float) * q_rows), *out = malloc(sizeof(float) * H);
    float *gate_up = malloc(sizeof(float) * 2 * I), *scores = malloc(sizeof(float) * heads * (position + 1));
    if (!x || !qkv || !attended || !out || !gate_up || !scores) {
        free(x); free(qkv); free(attended); free(out); free(gate_up); free(scores);
        return -1;
    }
    for (int64_t l = 0; l < n_layers; ++l) {
        const step_layer *L = &layers[l];
        rms_norm(hidden, L->input_norm, x, H, shape->eps);
        few_rows_i8_parallel(L->qkv, L->qkv_scale, x, qkv, qkv_rows, H, 1, shape->threads);
        if (L->qkv_bias)
            for (int64_t i = 0; i < qkv_rows; ++i) qkv[i] += L->qkv_bias[i];
        for (int64_t h = 0; h < heads + kv; ++h) {  /* queries, then keys: norm and rotate */
            float *v = qkv + h * d;
            const float *norm = h < heads ? L->q_norm : L->k_norm;
            if (norm) rms_norm(v, norm, v, d, shape->eps);
            rotate(v, L->cos, L->sin, d);
        }
        for (int64_t h = 0; h < kv; ++h) {
            memcpy(L->keys + (h * shape->capacity + position) * d, qkv + q_rows + h * d, sizeof(float) * d);
            memcpy(L->values + (h * shape->capacity + position) * d, qkv + q_rows + (kv + h) * d, sizeof(float) * d);
        }
        const int64_t first = L->window > 0 && position - L->window + 1 > 0 ? position - L->window + 1 : 0;
        const int64_t span = position + 1 - first;
#pragma omp parallel for num_threads(shape->threads) schedule(static)
        for (int64_t h = 0; h < heads; ++h) {
            const float *q = qkv + h * d;
            const float *keys = L->keys + ((h / group) * shape->capacity + first) * d;
            const float *values = L->values + ((h / group) * shape->capacity + first) * d;
            float *s = scores + h * (position + 1), top = -INFINITY, total = 0;
            for (int64_t j = 0; j < span; ++j) {
                float dot = 0;
                for (int64_t i = 0; i < d; ++i) dot += q[i] * keys[j * d + i];
                s[j] = dot * L->scaling;
                if (s[j] > top) top = s[j];
            }
            for (int64_t j = 0; j < span; ++j) total += (s[j] = expf(s[j] - top));
            float *o = attended + h * d;
            for (int64_t i = 0; i < d; ++i) o[i] = 0;
            for (int64_t j = 0; j < span; ++j) {
                const float p = s[j] / total;
                for (int64_t i = 0; i < d; ++i) o[i] += p * values[j * d + i];
            }
        }
        few_rows_i8_parallel(L->o, L->o_scale, attended, out, H, q_rows, 1, shape->threads);
        if (L->post_attention_norm) rms_norm(out, L->post_attention_norm, out, H, shape->eps);
        for (int64_t i = 0; i < H; ++i) hidden[i] += out[i];
        rms_norm(hidden, L->pre_mlp_norm, x, H, shape->eps);
        few_rows_i8_parallel(L->gate_up, L->gate_up_scale, x, gate_up, 2 * I, H, 1, shape->threads);
        for (int64_t i = 0; i < I; ++i) gate_up[i] = activate(gate_up[i], shape->activation) * gate_up[I + i];
        few_rows_i8_parallel(L->down, L->down_scale, gate_up, out, H, I, 1, shape->threads);
        if (L->post_mlp_norm) rms_norm(out, L->post_mlp_norm, out, H, shape->eps);
        for (int64_t i = 0; i < H; ++i) hidden[i] += out[i];
    }
    free(x); free(qkv); free(attended); free(out); free(gate_up); free(scores);
    return 0;
}
