/* phi2kernels: weight-only quantized linear layers for x86 CPUs, one ISA variant per object file.
 *
 * Two weight formats, both row-major [N rows (outputs), K columns (inputs)]:
 *   q8: int8 weights, one bf16 scale per row (the int8 format's files, unchanged). Activations are
 *       quantized per row to int16 (scale = max|x| / 32767), products summed exactly in int32.
 *   q4: 4-bit weights in units of 64 columns (32 bytes: byte j holds column j in its low nibble and
 *       column 32 + j in its high nibble), one fp16 scale and one fp16 minimum per group of 64 or 128
 *       columns (w = q * scale + min). Activations are quantized to int8 per block of 64 columns.
 * Both compute y = x W^T (+ bias) as the de-quantized weights times the de-quantized activations: the
 * integer dot products are exact, only the fp32 accumulation of their scaled sums rounds.
 *
 * Each variant file (impl.c compiled with its own -m flags) defines the functions below with its suffix;
 * dispatch.c checks the CPU before it calls any of them.
 */
#ifndef PHI2K_H
#define PHI2K_H

#include <stddef.h>
#include <stdint.h>

#define PHI2K_ABI_VERSION 1

enum { PHI2K_AVX2 = 0, PHI2K_AVX512 = 1, PHI2K_AVX512_VNNI = 2, PHI2K_VARIANTS = 3 };

/* Columns of one q4 unit and of one activation block of the q4 path. */
#define PHI2K_Q4_UNIT 64
/* Activation layout of the q4 path for one row of K columns (K a multiple of 64), in one buffer:
 *   int8 q[K] (variant-specific order), float block_scale[K/64], float group_sum[K/group],
 *   float lane_scale[K/8] (AVX-512 only: per 128 columns, 16 lane scales). */

typedef struct {
    /* q8: one activation row -> int16 row and its scale. */
    void (*q8_quantize)(const float *x, long K, int16_t *q, float *scale);
    /* q8: rows [n0, n1) of y for M activation rows; each weight row is prefetched `prefetch` bytes ahead (0: not). */
    void (*q8_rows)(const int16_t *xq, const float *xs, long M, long K, const int8_t *w, const uint16_t *ws,
                    const float *bias, float *y, long ldy, long n0, long n1, long prefetch);
    /* q4: one activation row -> its prepared form (see layout above). */
    void (*q4_quantize)(const float *x, long K, int group, int8_t *q, float *block_scale, float *group_sum,
                        float *lane_scale);
    void (*q4_rows)(const int8_t *xq, const float *block_scale, const float *group_sum, const float *lane_scale,
                    long M, long K, int group, const uint8_t *w, const uint16_t *scales, const uint16_t *mins,
                    const float *bias, float *y, long ldy, long n0, long n1);
    /* q4: rows [n0, n1) de-quantized into out (row-major, K columns), as fp32 or bf16 (round to nearest even). */
    void (*q4_widen)(const uint8_t *w, const uint16_t *scales, const uint16_t *mins, long K, int group, void *out,
                     int bf16, long n0, long n1);
} phi2k_ops;

extern const phi2k_ops phi2k_ops_avx2;
extern const phi2k_ops phi2k_ops_avx512;
extern const phi2k_ops phi2k_ops_avx512_vnni;

#endif
