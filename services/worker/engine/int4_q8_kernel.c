/* The w4a8 mode's product: bf16 rows times 4-bit weights (quantization.py's Int4Linear,
 * w = (code - 8) * scale + zero in groups of 32 inputs), bf16 results, with the inputs rounded
 * to 8 bits first, as llama.cpp multiplies its Q4 blocks.
 *
 * Each row's inputs are rounded per group of 32 (x ~ d * x8, d = the group's largest |x| / 127),
 * so a group's 32 products are integer products summed exactly by the int8 dot-product
 * instruction (AVX512-VNNI vpdpbusd: 64 multiply-adds an instruction, twice what int4_kernel.c's
 * bf16 dot products do). Then per group
 *   sum x * w ~ d * scale * sum x8 * code + (zero - 8 * scale) * d * sum x8,
 * added to the output's running float32 total, group after group. Every output is computed by
 * the same arithmetic in the same order whatever the number of rows, so a row's results are the
 * same alone or in any batch (tested).
 *
 * The weights' layout (`chatfleet_int4_q8_layout`): tiles of 16 outputs, and within a tile,
 * group after group, 256 bytes of codes followed by the group's 16 scales and 16 zeros (bf16),
 * as int4_kernel.c's, but the codes are 4 vectors of 64 bytes, one 32-bit lane an output: byte j
 * of lane `column` of vector v holds the code of input 8v + j in its low nibble and of input
 * 8v + 4 + j in its high one. A mask (and a shift) gives 4 consecutive inputs' codes a lane,
 * against 4 consecutive 8-bit inputs broadcast as one 32-bit number.
 *
 * Where the CPU has no AVX512-VNNI a plain C loop computes the same integer sums and the same
 * float32 formula: the same results, bit for bit (tested).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "bf16.h"
#include "int4_blocks.h"
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define INT4_VNNI 1
#endif

#define VECTORS (CODE_BYTES / 64) /* 64-byte code vectors a group: 4 */

/* codes [n, k] (one code 0..15 a byte), scales and zeros [n, k / 32] bf16 -> the kernel's
 * layout (chatfleet_int4_layout_bytes bytes). */
int chatfleet_int4_q8_layout(const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros,
                             int64_t n, int64_t k, uint8_t *out) {
    if (n % TILE || k % GROUP) return -1;
    const int64_t groups = k / GROUP;
    for (int64_t t = 0; t < n / TILE; t++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *dst = out + (t * groups + g) * GROUP_BYTES;
            for (int col = 0; col < TILE; col++) {
                const uint8_t *row = codes + (t * TILE + col) * k + g * GROUP;
                for (int v = 0; v < VECTORS; v++)
                    for (int j = 0; j < 4; j++)
                        dst[v * 64 + col * 4 + j] =
                            (uint8_t)((row[8 * v + j] & 15) | ((row[8 * v + 4 + j] & 15) << 4));
            }
            uint16_t params[2 * TILE];
            for (int col = 0; col < TILE; col++) {
                params[col] = scales[(t * TILE + col) * groups + g];
                params[TILE + col] = zeros[(t * TILE + col) * groups + g];
            }
            memcpy(dst + CODE_BYTES, params, sizeof params);
        }
    return 0;
}

/* One group of 32 inputs to 8 bits (to nearest, ties to even): x8, and returns the scale
 * d = largest |x| / 127; *sum gets sum x8. Both builds compute the same. */
static inline float quantize_group(const uint16_t *in, int8_t *q, int *sum) {
#ifdef INT4_VNNI
    const __m512 a = load_bf16x16(in), b = load_bf16x16(in + 16);
    const float largest = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float scale = largest / 127.0f;
    const __m512 inverse = _mm512_set1_ps(scale > 0 ? 1.0f / scale : 0.0f);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inverse));
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inverse));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(qb));
    *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    return scale;
#else
    float values[GROUP], largest = 0;
    for (int i = 0; i < GROUP; i++) {
        values[i] = bf16_to_float(in[i]);
        largest = fmaxf(largest, fabsf(values[i]));
    }
    const float scale = largest / 127.0f;
    const float inverse = scale > 0 ? 1.0f / scale : 0.0f;
    *sum = 0;
    for (int i = 0; i < GROUP; i++) {
        q[i] = (int8_t)lrintf(values[i] * inverse); /* within +-127: |x| <= largest */
        *sum += q[i];
    }
    return scale;
#endif
}

/* Row-wise 8-bit inputs: x8 [m, k], and per (row, group) the scale d and d * sum x8. */
static void quantize_rows(const uint16_t *x, int64_t m, int64_t k, int8_t *x8, float *d,
                          float *dsum) {
    const int64_t groups = k / GROUP;
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < groups; g++) {
            int sum;
            const float scale = quantize_group(x + r * k + g * GROUP, x8 + r * k + g * GROUP, &sum);
            d[r * groups + g] = scale;
            dsum[r * groups + g] = scale * (float)sum;
        }
}

/* An output's total after group g, in both builds:
 *   fma(offset, dsum, fma(dot, scale * d, total)), offset = fma(-8, scale, zero). */
#ifdef INT4_VNNI
/* Rows [0, R) times tiles [0, C) of 16 outputs. */
static inline __attribute__((always_inline)) void block(
    const int8_t *x8, int64_t k, const int R, const uint8_t *w, int64_t tile_bytes, const int C,
    const float *d, const float *dsum, int64_t groups, uint16_t *out, int64_t out_stride) {
    float total[MAX_ROWS][MAX_TILES][TILE] __attribute__((aligned(64)));
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    const __m512 eight = _mm512_set1_ps(8.0f);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) _mm512_store_ps(total[r][c], _mm512_setzero_ps());
    for (int64_t g = 0; g < groups; g++) {
        __m512i dot[MAX_ROWS][MAX_TILES];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) dot[r][c] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int v = 0; v < VECTORS; v++) {
            __m512i low[MAX_TILES], high[MAX_TILES];
            for (int c = 0; c < C; c++) {
                const __m512i raw =
                    _mm512_loadu_si512(w + c * tile_bytes + g * GROUP_BYTES + v * 64);
                low[c] = _mm512_and_si512(raw, nibble);
                high[c] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
            }
            for (int r = 0; r < R; r++) {
                int32_t a, b;
                memcpy(&a, x8 + r * k + g * GROUP + 8 * v, 4);
                memcpy(&b, x8 + r * k + g * GROUP + 8 * v + 4, 4);
                const __m512i xa = _mm512_set1_epi32(a), xb = _mm512_set1_epi32(b);
                for (int c = 0; c < C; c++) {
                    dot[r][c] = _mm512_dpbusd_epi32(dot[r][c], low[c], xa);
                    dot[r][c] = _mm512_dpbusd_epi32(dot[r][c], high[c], xb);
                }
            }
        }
        for (int c = 0; c < C; c++) {
            const uint8_t *params = w + c * tile_bytes + g * GROUP_BYTES + CODE_BYTES;
            const __m512 scale = load_bf16x16(params), zero = load_bf16x16(params + 2 * TILE);
            const __m512 offset = _mm512_fnmadd_ps(eight, scale, zero);
            for (int r = 0; r < R; r++) {
                const __m512 row_scale = _mm512_mul_ps(scale, _mm512_set1_ps(d[r * groups + g]));
                __m512 t = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(dot[r][c]), row_scale, _mm512_load_ps(total[r][c]));
                t = _mm512_fmadd_ps(offset, _mm512_set1_ps(dsum[r * groups + g]), t);
                _mm512_store_ps(total[r][c], t);
            }
        }
    }
    store_block(total, R, C, out, out_stride);
}

#define BLOCK(R, C)                                                                            \
    block(x8 + r0 * k, k, R, w + t * tile_bytes, tile_bytes, C, d + r0 * groups,              \
          dsum + r0 * groups, groups, out + r0 * n + t * TILE, n)

static void product(const int8_t *x8, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                    int64_t t0, int64_t t1, const float *d, const float *dsum, uint16_t *out) {
    const int64_t groups = k / GROUP, tile_bytes = groups * GROUP_BYTES;
    INT4_BLOCKS(BLOCK);
}
#else
static void product(const int8_t *x8, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                    int64_t t0, int64_t t1, const float *d, const float *dsum, uint16_t *out) {
    const int64_t groups = k / GROUP, tile_bytes = groups * GROUP_BYTES;
    for (int64_t r = 0; r < m; r++)
        for (int64_t t = t0; t < t1; t++)
            for (int col = 0; col < TILE; col++) {
                float total = 0;
                for (int64_t g = 0; g < groups; g++) {
                    const uint8_t *group = w + t * tile_bytes + g * GROUP_BYTES;
                    const int8_t *in = x8 + r * k + g * GROUP;
                    float scale, zero;
                    group_params(group, col, &scale, &zero);
                    int32_t dot = 0;
                    for (int v = 0; v < VECTORS; v++)
                        for (int j = 0; j < 4; j++) {
                            const uint8_t byte = group[v * 64 + col * 4 + j];
                            dot += (byte & 15) * in[8 * v + j] + (byte >> 4) * in[8 * v + 4 + j];
                        }
                    const float offset = fmaf(-8.0f, scale, zero);
                    total = fmaf((float)dot, scale * d[r * groups + g], total);
                    total = fmaf(offset, dsum[r * groups + g], total);
                }
                out[r * n + t * TILE + col] = float_to_bf16(total);
            }
}
#endif

/* 1 where the product runs on AVX512-VNNI dot products, 0 where it is the plain C loop. */
int chatfleet_int4_q8_vectorized(void) {
#ifdef INT4_VNNI
    return 1;
#else
    return 0;
#endif
}

/* out [m, n] bf16 = x [m, k] bf16 (rounded to 8 bits) times the laid-out weights, output tiles
 * [t0, t1) of 16. 0, or -1 for shapes the layout cannot hold (or no memory). */
int chatfleet_int4_q8_product(const uint16_t *x, int64_t m, int64_t k, const uint8_t *w,
                              int64_t n, int64_t t0, int64_t t1, uint16_t *out) {
    if (n % TILE || k % GROUP || t0 < 0 || t1 > n / TILE || t0 > t1) return -1;
    const int64_t groups = k / GROUP;
    int8_t *x8 = malloc((size_t)(m * k + 1));
    float *scales = malloc(sizeof(float) * (size_t)(2 * m * groups + 1));
    if (x8 == NULL || scales == NULL) {
        free(x8);
        free(scales);
        return -1;
    }
    quantize_rows(x, m, k, x8, scales, scales + m * groups);
    product(x8, m, k, w, n, t0, t1, scales, scales + m * groups, out);
    free(x8);
    free(scales);
    return 0;
}
