/* The int4 mode's 4-bit product: bf16 rows times 4-bit weights (quantization.py's
 * Int4Linear, w = (code - 8) * scale + zero in groups of 32 inputs), bf16 results.
 *
 * Every output is computed by the same arithmetic in the same order whatever the number of rows:
 * for each group in order, the group's 32 products summed by dot-product instructions in a fixed
 * order, then scaled and added to the running total. Blocks of rows and columns only decide
 * which outputs are computed together, never how one is summed: a row's results are the same
 * alone or in any batch (tested).
 *
 * The weights are laid out for the kernel (`chatfleet_int4_layout` says how): tiles of 16
 * outputs, and within a tile, group after group, 256 bytes of codes followed by the group's 16
 * scales and 16 zeros (bf16). A code q becomes the bf16 number 128 + q by putting it under
 * 128's exponent (bits 0x4300 | q): no conversion instruction. Then for a group
 *   sum x * w = scale * sum x * (128 + q) + (zero - 136 * scale) * sum x,
 * with the inputs' group sums taken once a call.
 *
 * Where the CPU has no AVX512-BF16 a plain C loop computes the same formula (in float32, its own
 * order: results differ from the vector build's in the last bits, but again not with the batch).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "bf16.h"
#include "int4_blocks.h"
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define INT4_BF16_DOT 1
#endif

#define CHUNKS (CODE_BYTES / 32) /* 32-byte loads a group: 4 inputs x 16 */

/* Where code j of chunk c of a group's 256 bytes lands: byte 2 * column + (input & 1) of the
 * chunk input / 4, in its low nibble for inputs 4c + 0, 1 and its high nibble for 4c + 2, 3. So
 * a chunk's bytes widened to 16-bit lanes hold inputs (4c, 4c+1) of the 16 columns in their low
 * nibbles and (4c+2, 4c+3) in their high ones: the pairs a bf16 dot-product instruction takes. */
int64_t chatfleet_int4_layout_bytes(int64_t n, int64_t k) {
    if (n % TILE || k % GROUP) return -1;
    return (n / TILE) * (k / GROUP) * GROUP_BYTES;
}

/* codes [n, k] (one code 0..15 a byte), scales and zeros [n, k / 32] bf16 -> the kernel's
 * layout (chatfleet_int4_layout_bytes bytes). */
int chatfleet_int4_layout(const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros,
                          int64_t n, int64_t k, uint8_t *out) {
    if (n % TILE || k % GROUP) return -1;
    const int64_t groups = k / GROUP;
    for (int64_t t = 0; t < n / TILE; t++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *dst = out + (t * groups + g) * GROUP_BYTES;
            for (int c = 0; c < CHUNKS; c++)
                for (int col = 0; col < TILE; col++)
                    for (int odd = 0; odd < 2; odd++) {
                        const uint8_t *row = codes + (t * TILE + col) * k + g * GROUP + 4 * c;
                        dst[c * 32 + 2 * col + odd] =
                            (uint8_t)((row[odd] & 15) | ((row[2 + odd] & 15) << 4));
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

#ifdef INT4_BF16_DOT
/* Rows [0, R) times tiles [0, C) of 16 outputs. x pairs: row r's inputs (2i, 2i+1) at
 * pairs[r * pair_stride + i]. */
static inline __attribute__((always_inline)) void block(
    const uint32_t *pairs, int64_t pair_stride, const int R, const uint8_t *w, int64_t tile_bytes,
    const int C, const float *sums, int64_t groups, uint16_t *out, int64_t out_stride) {
    float total[MAX_ROWS][MAX_TILES][TILE] __attribute__((aligned(64)));
    const __m512i low = _mm512_set1_epi16(0x000f), exponent = _mm512_set1_epi16(0x4300);
    const __m512 offset_factor = _mm512_set1_ps(136.0f);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) _mm512_store_ps(total[r][c], _mm512_setzero_ps());
    for (int64_t g = 0; g < groups; g++) {
        __m512 part[MAX_ROWS][MAX_TILES];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) part[r][c] = _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int chunk = 0; chunk < CHUNKS; chunk++) {
            __m512i first[MAX_TILES], second[MAX_TILES];
            for (int c = 0; c < C; c++) {
                const uint8_t *codes = w + c * tile_bytes + g * GROUP_BYTES + chunk * 32;
                const __m512i raw = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)codes));
                first[c] = _mm512_ternarylogic_epi32(raw, low, exponent, 0xEA); /* (a&b)|c */
                second[c] = _mm512_or_si512(_mm512_srli_epi16(raw, 4), exponent);
            }
            for (int r = 0; r < R; r++) {
                const uint32_t *p = pairs + r * pair_stride + g * (GROUP / 2) + chunk * 2;
                const __m512i xa = _mm512_set1_epi32((int)p[0]), xb = _mm512_set1_epi32((int)p[1]);
                for (int c = 0; c < C; c++) {
                    part[r][c] = _mm512_dpbf16_ps(part[r][c], (__m512bh)first[c], (__m512bh)xa);
                    part[r][c] = _mm512_dpbf16_ps(part[r][c], (__m512bh)second[c], (__m512bh)xb);
                }
            }
        }
        for (int c = 0; c < C; c++) {
            const uint8_t *params = w + c * tile_bytes + g * GROUP_BYTES + CODE_BYTES;
            const __m512 scale = load_bf16x16(params), zero = load_bf16x16(params + 2 * TILE);
            const __m512 offset = _mm512_fnmadd_ps(offset_factor, scale, zero);
            for (int r = 0; r < R; r++) {
                __m512 t = _mm512_fmadd_ps(part[r][c], scale, _mm512_load_ps(total[r][c]));
                t = _mm512_fmadd_ps(offset, _mm512_set1_ps(sums[r * groups + g]), t);
                _mm512_store_ps(total[r][c], t);
            }
        }
    }
    store_block(total, R, C, out, out_stride);
}

#define BLOCK(R, C)                                                                            \
    block((const uint32_t *)x + r0 * (k / 2), k / 2, R, w + t * tile_bytes, tile_bytes, C,   \
          sums + r0 * groups, groups, out + r0 * n + t * TILE, n)

static void product(const uint16_t *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                    int64_t t0, int64_t t1, const float *sums, uint16_t *out) {
    const int64_t groups = k / GROUP, tile_bytes = groups * GROUP_BYTES;
    INT4_BLOCKS(BLOCK);
}
#else
static void product(const uint16_t *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                    int64_t t0, int64_t t1, const float *sums, uint16_t *out) {
    const int64_t groups = k / GROUP, tile_bytes = groups * GROUP_BYTES;
    for (int64_t r = 0; r < m; r++)
        for (int64_t t = t0; t < t1; t++)
            for (int col = 0; col < TILE; col++) {
                float total = 0;
                for (int64_t g = 0; g < groups; g++) {
                    const uint8_t *group = w + t * tile_bytes + g * GROUP_BYTES;
                    float scale, zero;
                    group_params(group, col, &scale, &zero);
                    float part = 0;
                    for (int chunk = 0; chunk < CHUNKS; chunk++)
                        for (int i = 0; i < 4; i++) {
                            const uint8_t byte = group[chunk * 32 + 2 * col + (i & 1)];
                            const int code = i < 2 ? byte & 15 : byte >> 4;
                            part += bf16_to_float(x[r * k + g * GROUP + 4 * chunk + i]) *
                                    (float)(128 + code);
                        }
                    total += part * scale + (zero - 136.0f * scale) * sums[r * groups + g];
                }
                out[r * n + t * TILE + col] = float_to_bf16(total);
            }
}
#endif

/* 1 where the product runs on AVX512-BF16 dot products, 0 where it is the plain C loop. */
int chatfleet_int4_vectorized(void) {
#ifdef INT4_BF16_DOT
    return 1;
#else
    return 0;
#endif
}

/* out [m, n] bf16 = x [m, k] bf16 times the laid-out weights, output tiles [t0, t1) of 16
 * (callers split the tiles between threads). 0, or -1 for shapes the layout cannot hold. */
int chatfleet_int4_product(const uint16_t *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                           int64_t t0, int64_t t1, uint16_t *out) {
    if (n % TILE || k % GROUP || t0 < 0 || t1 > n / TILE || t0 > t1) return -1;
    const int64_t groups = k / GROUP;
    float *sums = malloc(sizeof(float) * (size_t)(m * groups + 1));
    if (sums == NULL) return -1;
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < groups; g++) {
            float sum = 0;
            for (int i = 0; i < GROUP; i++) sum += bf16_to_float(x[r * k + g * GROUP + i]);
            sums[r * groups + g] = sum;
        }
    product(x, m, k, w, n, t0, t1, sums, out);
    free(sums);
    return 0;
}
