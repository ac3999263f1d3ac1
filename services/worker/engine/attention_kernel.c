/* Causal attention of packed query rows over a dense per-sequence KV cache, on the CPU.
 *
 * Each query row (a token at `position` of cache row `row`) attends over keys [0, position] of
 * its row, with the query heads of a group sharing one key/value head (GQA). Every row is
 * computed by the same arithmetic in the same order, whatever the other rows of the call: a
 * position's attention is the same bit for bit decoded alone, in a batch, in a prefill chunk of
 * any size or after a cached prefix. torch's SDPA picks kernels and blockings by shape, which is
 * why the runner otherwise calls it per block (runner.py).
 *
 * Built with -ffp-contract=off and without fast-math, every add and multiply is rounded on its
 * own, so vector and scalar code give the same result; sums run over LANES fixed accumulators
 * combined in a fixed tree, and exp is a fixed polynomial. float32 rows are bit-exact across
 * machines too.
 *
 * Queries (and the output) and the caches each float32 or bfloat16 (q_bf16, kv_bf16): float32
 * arithmetic, bf16 output rounded to nearest even. On CPUs with AVX512-BF16 its dot-product
 * instruction scores bf16 queries over bf16 keys (score_bf16_dot) and weighs bf16 values
 * (weigh_bf16_dot): several times fewer instructions, still one fixed order per row, but their
 * last bits differ from other CPUs'. (The served bf16 modes keep float32 queries over a bf16
 * cache: bf16 queries changed the default model's answers.)
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "bf16.h"
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define BF16_DOT 1 /* score_bf16_dot */
#endif

/* GCC/Clang vector extensions: explicit 16-lane arithmetic, lowered to whatever width the CPU
 * has. Lane l of a sum always holds the same terms, so no result depends on the vector width. */
#define LANES 16
typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef uint16_t vhalf __attribute__((vector_size(LANES * sizeof(uint16_t))));
#define MAX_HEAD_DIM 256
#define MAX_GROUP 16
#define MAX_CHUNKS (MAX_HEAD_DIM / LANES)

static inline vfloat splat(float x) { return (vfloat){0} + x; }

static inline vfloat load_vector(const void *base, int64_t offset, int bf16) {
    vfloat v;
    if (bf16) {
        vhalf raw;
        memcpy(&raw, (const uint16_t *)base + offset, sizeof raw);
        const vint bits = __builtin_convertvector(raw, vint) << 16;
        memcpy(&v, &bits, sizeof v);
    } else {
        memcpy(&v, (const float *)base + offset, sizeof v);
    }
    return v;
}

/* The LANES floats of v rounded to bf16 at dst. */
static inline void store_bf16(uint16_t *dst, vfloat v) {
    float values[LANES];
    memcpy(values, &v, sizeof values);
    for (int l = 0; l < LANES; l++) dst[l] = float_to_bf16(values[l]);
}

/* The lanes' sum, in a fixed tree. */
static inline float lane_sum(vfloat v) {
    float a[LANES];
    memcpy(a, &v, sizeof a);
    for (int width = LANES / 2; width >= 1; width /= 2)
        for (int l = 0; l < width; l++) a[l] = a[l] + a[l + width];
    return a[0];
}

/* Lane k of the result: the sum of p[k]'s lanes, in the same fixed tree for every k (halves
 * added first: lane l + lane l + 8, then + 4, + 2, + 1). Shuffles move lanes, adds only ever
 * combine lanes of one input, so the sums of LANES keys take 30 shuffles and 15 adds. */
static inline vfloat reduce_lanes(const vfloat p[LANES]) {
    vfloat a[8], b[4], c[2];
    for (int m = 0; m < 8; m++)
        a[m] = __builtin_shufflevector(p[2 * m], p[2 * m + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + __builtin_shufflevector(p[2 * m], p[2 * m + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int m = 0; m < 4; m++)
        b[m] = __builtin_shufflevector(a[2 * m], a[2 * m + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + __builtin_shufflevector(a[2 * m], a[2 * m + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int m = 0; m < 2; m++)
        c[m] = __builtin_shufflevector(b[2 * m], b[2 * m + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + __builtin_shufflevector(b[2 * m], b[2 * m + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

static inline vfloat select_lanes(vint mask, vfloat yes, vfloat no) {
    vint y, n;
    memcpy(&y, &yes, sizeof y);
    memcpy(&n, &no, sizeof n);
    vint r = (mask & y) | (~mask & n);
    vfloat out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* exp(x) for x <= 0 (Cephes' expf polynomial, relative error ~2e-7); 0 below -87. */
static inline vfloat exp_nonpositive(vfloat x) {
    const vint tiny = x < splat(-87.0f);
    x = select_lanes(tiny, splat(-87.0f), x);
    /* Round to nearest by the 1.5 * 2^23 trick (|x * log2 e| < 2^22). */
    vfloat n = (x * splat(1.44269504088896341f) + splat(12582912.0f)) - splat(12582912.0f);
    vfloat r = x - n * splat(0.693359375f);
    r = r - n * splat(-2.12194440e-4f);
    vfloat y = splat(1.9875691500e-4f);
    y = y * r + splat(1.3981999507e-3f);
    y = y * r + splat(8.3334519073e-3f);
    y = y * r + splat(4.1665795894e-2f);
    y = y * r + splat(1.6666665459e-1f);
    y = y * r + splat(5.0000001201e-1f);
    y = y * (r * r) + r + splat(1.0f);
    vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
    vfloat scale;
    memcpy(&scale, &bits, sizeof scale);
    return select_lanes(tiny, splat(0.0f), y * scale);
}

/* The scores of one row's `group` heads over keys [0, length) into scores[h * padded + j], times
 * `scale`. A block of LANES keys at a time: the keys in float once, then for each head the keys'
 * lane partial sums, reduced together (reduce_lanes). Keys past the row's last are zeros: no
 * lane of one key ever mixes with another's. */
static void score_float(const vfloat qv[MAX_GROUP][MAX_CHUNKS], const void *k_cache,
                        int64_t cache_offset, int64_t group, int64_t chunks, int64_t head_dim,
                        int64_t length, int64_t padded, float scale, int bf16, float *scores) {
    vfloat keys[LANES][MAX_CHUNKS];
    for (int64_t j0 = 0; j0 < length; j0 += LANES) {
        const int64_t count = length - j0 < LANES ? length - j0 : LANES;
        for (int64_t k = 0; k < LANES; k++)
            for (int64_t c = 0; c < chunks; c++)
                keys[k][c] = k < count ? load_vector(k_cache, cache_offset + (j0 + k) * head_dim + c * LANES, bf16)
                                       : splat(0.0f);
        for (int64_t h = 0; h < group; h++) {
            vfloat partial[LANES];
            for (int64_t k = 0; k < LANES; k++) {
                vfloat sum = qv[h][0] * keys[k][0];
                for (int64_t c = 1; c < chunks; c++) sum = sum + qv[h][c] * keys[k][c];
                partial[k] = sum;
            }
            const vfloat block = reduce_lanes(partial) * splat(scale);
            memcpy(scores + h * padded + j0, &block, sizeof block);
        }
    }
}

#ifdef BF16_DOT
/* score_float for bf16 queries and keys with AVX512-BF16's vdpbf16ps: 32 products an
 * instruction (each exact in float; a lane adds its pair to its sum, denormals flushed), no
 * conversions. The sums' order differs from score_float's, so scores differ in the last bits
 * from CPUs without the instruction; on one CPU a row's scores are still the same in any call. */
static void score_bf16_dot(const uint16_t *q, const uint16_t *k_cache, int64_t group,
                           int64_t head_dim, int64_t length, int64_t padded, float scale,
                           float *scores) {
    const int64_t pairs = head_dim / 32;
    __m512bh qh[MAX_GROUP][MAX_HEAD_DIM / 32], keys[LANES][MAX_HEAD_DIM / 32];
    for (int64_t h = 0; h < group; h++)
        for (int64_t c = 0; c < pairs; c++)
            qh[h][c] = (__m512bh)_mm512_loadu_si512(q + h * head_dim + c * 32);
    for (int64_t j0 = 0; j0 < length; j0 += LANES) {
        const int64_t count = length - j0 < LANES ? length - j0 : LANES;
        for (int64_t k = 0; k < LANES; k++)
            for (int64_t c = 0; c < pairs; c++)
                keys[k][c] = k < count ? (__m512bh)_mm512_loadu_si512(k_cache + (j0 + k) * head_dim + c * 32)
                                       : (__m512bh)_mm512_setzero_si512();
        for (int64_t h = 0; h < group; h++) {
            vfloat partial[LANES];
            for (int64_t k = 0; k < LANES; k++) {
                __m512 sum = _mm512_dpbf16_ps(_mm512_setzero_ps(), qh[h][0], keys[k][0]);
                for (int64_t c = 1; c < pairs; c++) sum = _mm512_dpbf16_ps(sum, qh[h][c], keys[k][c]);
                partial[k] = (vfloat)sum;
            }
            const vfloat block = reduce_lanes(partial) * splat(scale);
            memcpy(scores + h * padded + j0, &block, sizeof block);
        }
    }
}

/* The weights s[0, padded) rounded to bf16 in place (into the first half of the floats) for
 * weigh_bf16_dot; returns the sum of the rounded weights, so they still sum to one after
 * dividing by it. */
static float round_weights(float *s, int64_t padded) {
    uint16_t *rounded = (uint16_t *)s;
    vfloat sums = splat(0.0f);
    for (int64_t j = 0; j < padded; j += LANES) {
        /* Writes stay behind reads: bf16 j lands at byte 2j, float j is read from byte 4j. */
        const __m256bh half = _mm512_cvtneps_pbh(_mm512_loadu_ps(s + j));
        _mm256_storeu_si256((__m256i *)(rounded + j), (__m256i)half);
        sums = sums + load_vector(rounded, j, 1);
    }
    return lane_sum(sums);
}

/* acc[h] = sum over keys j < length of weight[h][j] * v[j], for bf16 weights (round_weights) and
 * values: keys in pairs, the two value rows interleaved (vpermt2w) so that one vdpbf16ps adds a
 * pair's products for 16 dimensions. The pair past an odd length is a zero row of weight 0. */
static void weigh_bf16_dot(const uint16_t *v_cache, const float *scores, int64_t group,
                           int64_t head_dim, int64_t length, int64_t padded,
                           vfloat acc[MAX_GROUP][MAX_CHUNKS]) {
    const int64_t chunks = head_dim / LANES;
    __m512i pick[2];
    for (int half = 0; half < 2; half++) {
        uint16_t index[32];
        for (int l = 0; l < 16; l++) {
            index[2 * l] = (uint16_t)(16 * half + l);
            index[2 * l + 1] = (uint16_t)(32 + 16 * half + l);
        }
        pick[half] = _mm512_loadu_si512(index);
    }
    __m512 sums[MAX_GROUP][MAX_CHUNKS];
    for (int64_t h = 0; h < group; h++)
        for (int64_t c = 0; c < chunks; c++) sums[h][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < length; j += 2) {
        __m512bh pairs[MAX_CHUNKS];
        for (int64_t c = 0; c < chunks; c++) {
            const __m512i first = _mm512_loadu_si512(v_cache + j * head_dim + (c / 2) * 32);
            const __m512i second = j + 1 < length
                ? _mm512_loadu_si512(v_cache + (j + 1) * head_dim + (c / 2) * 32)
                : _mm512_setzero_si512();
            pairs[c] = (__m512bh)_mm512_permutex2var_epi16(first, pick[c % 2], second);
        }
        for (int64_t h = 0; h < group; h++) {
            uint32_t word;
            memcpy(&word, (const uint16_t *)(scores + h * padded) + j, sizeof word);
            const __m512bh weights = (__m512bh)_mm512_set1_epi32((int)word);
            for (int64_t c = 0; c < chunks; c++)
                sums[h][c] = _mm512_dpbf16_ps(sums[h][c], weights, pairs[c]);
        }
    }
    for (int64_t h = 0; h < group; h++)
        for (int64_t c = 0; c < chunks; c++) acc[h][c] = (vfloat)sums[h][c];
}
#endif

/* Returns 0, or -1 for shapes the kernel does not take (the caller checks first). `scores`
 * holds group * (max position + 1 rounded up to LANES) floats. Query and output rows are
 * [heads, head_dim], the caches [rows, kv_heads, capacity, head_dim]; strides in elements. */
static int attend(const void *q, int64_t q_row_stride, const void *k_cache, const void *v_cache,
                  void *out, int64_t out_row_stride, const int64_t *cache_rows,
                  const int64_t *positions, int64_t n, int64_t heads, int64_t kv_heads,
                  int64_t head_dim, int64_t capacity, float scale, int q_bf16, int kv_bf16,
                  int out_bf16, float *scores) {
    if (kv_heads < 1 || heads % kv_heads != 0) return -1;
    const int64_t group = heads / kv_heads, chunks = head_dim / LANES;
    if (head_dim % LANES != 0 || head_dim > MAX_HEAD_DIM || group > MAX_GROUP) return -1;
    vfloat qv[MAX_GROUP][MAX_CHUNKS], acc[MAX_GROUP][MAX_CHUNKS], kv[MAX_CHUNKS];
    /* vdpbf16ps takes bf16 on both sides: scores so only for bf16 queries; weights (rounded to
     * bf16) whenever the values are bf16. */
    int dot_scores = 0, dot_weights = 0;
#ifdef BF16_DOT
    dot_scores = q_bf16 && kv_bf16 && head_dim % 32 == 0;
    dot_weights = kv_bf16 && head_dim % 32 == 0;
#endif
    for (int64_t i = 0; i < n; i++) {
        const int64_t length = positions[i] + 1;
        const int64_t padded = (length + LANES - 1) / LANES * LANES;
        for (int64_t g = 0; g < kv_heads; g++) {
            const int64_t cache_offset = ((cache_rows[i] * kv_heads + g) * capacity) * head_dim;
            if (!dot_scores) {
                for (int64_t h = 0; h < group; h++)
                    for (int64_t c = 0; c < chunks; c++)
                        qv[h][c] = load_vector(q, i * q_row_stride + (g * group + h) * head_dim + c * LANES, q_bf16);
                score_float(qv, k_cache, cache_offset, group, chunks, head_dim, length, padded,
                            scale, kv_bf16, scores);
            }
#ifdef BF16_DOT
            else
                score_bf16_dot((const uint16_t *)q + i * q_row_stride + g * group * head_dim,
                               (const uint16_t *)k_cache + cache_offset, group, head_dim, length,
                               padded, scale, scores);
#endif
            float total[MAX_GROUP];
            for (int64_t h = 0; h < group; h++) {
                float *s = scores + h * padded;
                for (int64_t j = length; j < padded; j++) s[j] = -1e30f; /* exp gives 0 */
                vfloat tops;
                memcpy(&tops, s, sizeof tops);
                for (int64_t j = LANES; j < padded; j += LANES) {
                    vfloat e;
                    memcpy(&e, s + j, sizeof e);
                    tops = select_lanes(e > tops, e, tops);
                }
                float top = tops[0];
                for (int l = 1; l < LANES; l++) top = tops[l] > top ? tops[l] : top;
                vfloat sums = splat(0.0f);
                for (int64_t j = 0; j < padded; j += LANES) {
                    vfloat e;
                    memcpy(&e, s + j, sizeof e);
                    e = exp_nonpositive(e - splat(top));
                    memcpy(s + j, &e, sizeof e);
                    sums = sums + e;
                }
                total[h] = lane_sum(sums);
                for (int64_t c = 0; c < chunks; c++) acc[h][c] = splat(0.0f);
            }
#ifdef BF16_DOT
            if (dot_weights) {
                for (int64_t h = 0; h < group; h++)
                    total[h] = round_weights(scores + h * padded, padded);
                weigh_bf16_dot((const uint16_t *)v_cache + cache_offset, scores, group, head_dim,
                               length, padded, acc);
            } else
#endif
            for (int64_t j = 0; j < length; j++) {
                for (int64_t c = 0; c < chunks; c++)
                    kv[c] = load_vector(v_cache, cache_offset + j * head_dim + c * LANES, kv_bf16);
                for (int64_t h = 0; h < group; h++) {
                    const vfloat p = splat(scores[h * padded + j]);
                    for (int64_t c = 0; c < chunks; c++) acc[h][c] = acc[h][c] + p * kv[c];
                }
            }
            for (int64_t h = 0; h < group; h++) {
                const int64_t offset = i * out_row_stride + (g * group + h) * head_dim;
                const vfloat inverse = splat(1.0f / total[h]);
                for (int64_t c = 0; c < chunks; c++) {
                    const vfloat o = acc[h][c] * inverse;
                    if (out_bf16)
                        store_bf16((uint16_t *)out + offset + c * LANES, o);
                    else
                        memcpy((float *)out + offset + c * LANES, &o, sizeof o);
                }
            }
        }
    }
    return 0;
}

/* The output in the queries' dtype. */
int chatfleet_attention(const void *q, int64_t q_row_stride, const void *k_cache,
                        const void *v_cache, void *out, int64_t out_row_stride,
                        const int64_t *cache_rows, const int64_t *positions, int64_t n,
                        int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t capacity,
                        float scale, int q_bf16, int kv_bf16, float *scores) {
    return attend(q, q_row_stride, k_cache, v_cache, out, out_row_stride, cache_rows, positions,
                  n, heads, kv_heads, head_dim, capacity, scale, q_bf16, kv_bf16, q_bf16, scores);
}

/* ---- The glue between bf16 linear layers (runner.py's fused path) -----------------------------
 *
 * With bf16 products, a decoder layer is four oneDNN calls and, between them, some thirty small
 * torch operations on a few rows (norms, rotary positions, cache writes, dtype conversions, the
 * activation): on a CPU decoding a few sequences, as long as the products themselves. These
 * functions do that glue in three calls a layer, each row on its own in a fixed order (so still
 * batch-invariant). Activations between layers stay float32; products take and give bf16. */

/* For each of n rows of width d (a multiple of LANES): hidden += delta (bf16; NULL: nothing),
 * then out = bf16(weight * (hidden * 1 / sqrt(mean(hidden^2) + eps))), as transformers' Llama
 * RMSNorm orders it (its mean's sum in another order: last bits differ from torch's). */
void chatfleet_add_rms_norm(float *hidden, const uint16_t *delta, int64_t n, int64_t d,
                            const float *weight, float eps, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) {
        float *x = hidden + i * d;
        if (delta)
            for (int64_t j = 0; j < d; j++) x[j] = x[j] + bf16_to_float(delta[i * d + j]);
        vfloat squares = splat(0.0f);
        for (int64_t j = 0; j < d; j += LANES) {
            vfloat v;
            memcpy(&v, x + j, sizeof v);
            squares = squares + v * v;
        }
        const float inverse = 1.0f / __builtin_sqrtf(lane_sum(squares) / (float)d + eps);
        for (int64_t j = 0; j < d; j++) out[i * d + j] = float_to_bf16(weight[j] * (x[j] * inverse));
    }
}

/* out = bf16(silu(gate) * up) for n rows of gate_up = [gate | up], each `width` wide (a multiple
 * of LANES); silu(g) = g * sigmoid(g), sigmoid from exp(-|g|). */
void chatfleet_silu_mul(const uint16_t *gate_up, int64_t n, int64_t width, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *gate = gate_up + i * 2 * width, *up = gate + width;
        for (int64_t j = 0; j < width; j += LANES) {
            const vfloat g = load_vector(gate, j, 1), u = load_vector(up, j, 1);
            const vint negative = g < splat(0.0f);
            const vfloat e = exp_nonpositive(select_lanes(negative, g, -g));
            const vfloat sigmoid = select_lanes(negative, e, splat(1.0f)) / (splat(1.0f) + e);
            store_bf16(out + i * width + j, g * sigmoid * u);
        }
    }
}

/* One layer's attention from its fused q/k/v product: qkv rows [q heads | k heads | v heads] in
 * bf16; cos and sin [n, head_dim] of each row's position. Queries and keys are rotated in
 * float32 exactly as the runner's torch path does (x * cos + flip_halves(x) * signed_sin, each
 * operation rounded), keys rounded to bf16 into the cache, values copied; then every row attends
 * (float32 queries from `q_scratch`, [n, heads * head_dim]) and `out` gets bf16 rows ready for
 * the output projection. Returns attend()'s status. */
int chatfleet_rope_attention(const uint16_t *qkv, int64_t n, const float *cos, const float *sin,
                             uint16_t *k_cache, uint16_t *v_cache, const int64_t *cache_rows,
                             const int64_t *positions, int64_t heads, int64_t kv_heads,
                             int64_t head_dim, int64_t capacity, float scale, float *q_scratch,
                             float *scores, uint16_t *out) {
    if (kv_heads < 1 || head_dim % 2 != 0 || head_dim > MAX_HEAD_DIM) return -1;
    const int64_t half = head_dim / 2, width = (heads + 2 * kv_heads) * head_dim;
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *row = qkv + i * width;
        const float *c = cos + i * head_dim, *s = sin + i * head_dim;
        for (int64_t h = 0; h < heads + kv_heads; h++) {
            const uint16_t *x = row + h * head_dim;
            float rotated[MAX_HEAD_DIM];
            for (int64_t j = 0; j < half; j++)
                rotated[j] = bf16_to_float(x[j]) * c[j] - bf16_to_float(x[j + half]) * s[j];
            for (int64_t j = half; j < head_dim; j++)
                rotated[j] = bf16_to_float(x[j]) * c[j] + bf16_to_float(x[j - half]) * s[j];
            if (h < heads) {
                memcpy(q_scratch + (i * heads + h) * head_dim, rotated, head_dim * sizeof(float));
            } else {
                const int64_t g = h - heads;
                const int64_t at = ((cache_rows[i] * kv_heads + g) * capacity + positions[i]) * head_dim;
                for (int64_t j = 0; j < head_dim; j++) k_cache[at + j] = float_to_bf16(rotated[j]);
                memcpy(v_cache + at, row + (heads + kv_heads + g) * head_dim, head_dim * sizeof(uint16_t));
            }
        }
    }
    return attend(q_scratch, heads * head_dim, k_cache, v_cache, out, heads * head_dim, cache_rows,
                  positions, n, heads, kv_heads, head_dim, capacity, scale, 0, 1, 1, scores);
}

/* x . w in float32 for bf16 rows of d (a multiple of 32) elements, in one fixed order. */
static float dot_bf16(const uint16_t *a, const uint16_t *b, int64_t d) {
#ifdef BF16_DOT
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 32)
        sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(a + c),
                               (__m512bh)_mm512_loadu_si512(b + c));
    return lane_sum((vfloat)sum);
#else
    vfloat sum = splat(0.0f);
    for (int64_t c = 0; c < d; c += LANES) sum = sum + load_vector(a, c, 1) * load_vector(b, c, 1);
    return lane_sum(sum);
#endif
}

/* logits [n, vocab] (x [n, d] bf16 times w [vocab, d] bf16, rounded to bf16 by oneDNN): in
 * place, each logit within two bf16 steps of its row's largest recomputed as the float32 dot
 * product (runner.py's refine_near_ties). A step is 2^(e - 8) for the largest |logit| in
 * [2^(e-1), 2^e); which logits are recomputed depends on the row alone. */
void chatfleet_refine_near_ties(float *logits, int64_t n, int64_t vocab, const uint16_t *x,
                                const uint16_t *w, int64_t d) {
    enum { SPAN = 64 };
    for (int64_t r = 0; r < n; r++) {
        float *row = logits + r * vocab;
        float top = row[0];
        for (int64_t j = 1; j < vocab; j++) top = row[j] > top ? row[j] : top;
        int exponent;
        frexpf(fmaxf(fabsf(top), 1e-30f), &exponent);
        const float bar = top - 2.0f * ldexpf(1.0f, exponent - 8);
        for (int64_t j0 = 0; j0 < vocab; j0 += SPAN) {
            const int64_t end = j0 + SPAN < vocab ? j0 + SPAN : vocab;
            int hit = 0;
            for (int64_t j = j0; j < end; j++) hit |= row[j] >= bar;
            if (!hit) continue;
            for (int64_t j = j0; j < end; j++)
                if (row[j] >= bar) row[j] = dot_bf16(x + r * d, w + j * d, d);
        }
    }
}
