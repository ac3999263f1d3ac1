/* What the two 4-bit products share (int4_kernel.c: bf16 inputs; int4_q8_kernel.c: inputs
 * rounded to 8 bits): the size of a weight group and tile, and the order in which rows and tiles
 * are taken. */
#ifndef CHATFLEET_INT4_BLOCKS_H
#define CHATFLEET_INT4_BLOCKS_H
#include <stdint.h>
#include <string.h>
#include "bf16.h"
#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 load_bf16x16(const void *p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#endif

#define GROUP 32
#define TILE 16
#define CODE_BYTES (GROUP * TILE / 2)              /* 256 */
#define GROUP_BYTES (CODE_BYTES + 2 * TILE * 2)    /* codes, scales, zeros: 320 */
#define MAX_ROWS 8
#define MAX_TILES 8

/* A block's float32 totals (R rows by C tiles) to its bf16 outputs. */
static inline void store_block(const float total[MAX_ROWS][MAX_TILES][TILE], int R, int C,
                               uint16_t *out, int64_t out_stride) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            for (int l = 0; l < TILE; l++)
                out[r * out_stride + c * TILE + l] = float_to_bf16(total[r][c][l]);
}

/* Output `col`'s scale and zero in a laid-out group (the plain C builds). */
static inline void group_params(const uint8_t *group, int col, float *scale, float *zero) {
    uint16_t scale_bits, zero_bits;
    memcpy(&scale_bits, group + CODE_BYTES + 2 * col, 2);
    memcpy(&zero_bits, group + CODE_BYTES + 2 * TILE + 2 * col, 2);
    *scale = bf16_to_float(scale_bits);
    *zero = bf16_to_float(zero_bits);
}

/* Rows [0, m) in blocks of 8 (then 4, then the rest), each block over tiles [t0, t1) a few at a
 * time: as many independent sums as the registers hold. BLOCK(R, C) computes rows [r0, r0 + R)
 * times tiles [t, t + C). */
#define INT4_BLOCKS(BLOCK)                                                                     \
    do {                                                                                       \
        int64_t r0 = 0, t;                                                                     \
        for (; r0 + 8 <= m; r0 += 8) {                                                         \
            for (t = t0; t + 2 <= t1; t += 2) BLOCK(8, 2);                                     \
            for (; t < t1; t++) BLOCK(8, 1);                                                   \
        }                                                                                      \
        for (; r0 + 4 <= m; r0 += 4) {                                                         \
            for (t = t0; t + 4 <= t1; t += 4) BLOCK(4, 4);                                     \
            for (; t < t1; t++) BLOCK(4, 1);                                                   \
        }                                                                                      \
        t = t0;                                                                                \
        if (m - r0 == 3) {                                                                     \
            for (; t + 4 <= t1; t += 4) BLOCK(3, 4);                                           \
            for (; t < t1; t++) BLOCK(3, 1);                                                   \
        } else if (m - r0 == 2) {                                                              \
            for (; t + 4 <= t1; t += 4) BLOCK(2, 4);                                           \
            for (; t < t1; t++) BLOCK(2, 1);                                                   \
        } else if (m - r0 == 1) {                                                              \
            for (; t + 8 <= t1; t += 8) BLOCK(1, 8);                                           \
            for (; t + 4 <= t1; t += 4) BLOCK(1, 4);                                           \
            for (; t < t1; t++) BLOCK(1, 1);                                                   \
        }                                                                                      \
    } while (0)
#endif
