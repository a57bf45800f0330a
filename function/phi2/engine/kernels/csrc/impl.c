/* The kernels of one ISA variant: compiled once per variant with its own -m flags and PHI2K_VARIANT
 * (0 = AVX2 + FMA + F16C, 1 = AVX-512 F/BW/VL/DQ, 2 = the same with VNNI). See phi2k.h for the formats.
 *
 * Decode reads every weight once per token, so these loops are built to stream weights at memory speed
 * with few instructions per byte: four weight rows at a time share each activation load, and integer
 * products are accumulated exactly before any float work.
 * - q8 (int8 weights x int16 activations): the weight bytes are sign-extended to int16 and multiplied in
 *   pairs into int32 lanes (vpmaddwd, or VNNI's vpdpwssd), converted to fp32 every Q8_FLUSH columns, long
 *   before an int32 lane could overflow (2 x 32767 x 127 per pair).
 * - q4 (4-bit weights x int8 activations): one load holds 64 (AVX2) or 128 (AVX-512) columns; an AND and a
 *   shift give the low and high nibbles, which are unsigned, so they are the unsigned operand of vpmaddubsw
 *   (15 x 127 x 2 cannot saturate int16) or of VNNI's vpdpbusd, with the signed activations as the other.
 *   Each 64-column block's int32 sums are scaled by the activation block's scale and the weight group's
 *   scale in fp32; the groups' minimums are applied once per row (sum over groups of min x the sum of the
 *   group's de-quantized activations).
 */
#include <immintrin.h>
#include <string.h>

#include "phi2k.h"

#if PHI2K_VARIANT == 0
#define SUFFIX(name) name##_avx2
#define OPS phi2k_ops_avx2
#define WIDE 0
#define VNNI 0
#elif PHI2K_VARIANT == 1
#define SUFFIX(name) name##_avx512
#define OPS phi2k_ops_avx512
#define WIDE 1
#define VNNI 0
#elif PHI2K_VARIANT == 2
#define SUFFIX(name) name##_avx512_vnni
#define OPS phi2k_ops_avx512_vnni
#define WIDE 1
#define VNNI 1
#else
#error "PHI2K_VARIANT must be 0, 1 or 2"
#endif

/* Columns between two conversions of the int32 lanes to fp32: each lane then holds at most 256 products
 * of |32767 x 127|, 1.07e9 < 2^31. */
#define Q8_FLUSH 2048
/* The most groups one row may have (K <= 65536 with groups of 64): dispatch.c checks it. */
#define MAX_GROUPS 1024

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax256(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int hsum256_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

static inline __m256 abs256(__m256 v) { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }

/* ------------------------------------------------------------------------------------------------------
 * q8: int8 weights, int16 activations */

/* One activation row to int16: q = round-to-nearest-even(x * (32767 / max|x|)), scale = max|x| / 32767.
 * K is a multiple of 32. */
static void SUFFIX(q8_quantize)(const float *x, long K, int16_t *q, float *scale) {
    __m256 mx = _mm256_setzero_ps();
    for (long k = 0; k < K; k += 8) mx = _mm256_max_ps(mx, abs256(_mm256_loadu_ps(x + k)));
    float amax = hmax256(mx);
    if (!(amax > 0.0f)) {
        memset(q, 0, (size_t)K * sizeof *q);
        *scale = 0.0f;
        return;
    }
    const __m256 inv = _mm256_set1_ps(32767.0f / amax);
    *scale = amax / 32767.0f;
    for (long k = 0; k < K; k += 16) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), inv));
        __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), inv));
        /* packs interleaves 128-bit lanes: [a0-3 b0-3 a4-7 b4-7] -> qwords 0, 2, 1, 3 */
        __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
        _mm256_storeu_si256((__m256i *)(q + k), p);
    }
}

/* One weight row (n) against up to 4 activation rows: the weight is loaded and widened once per step and used
 * by every activation row, and read from memory as one sequential stream per thread (four rows' streams at
 * once measured half the bandwidth: 12 vs 23 GB/s on one Zen 4 core). */
#if WIDE
static inline __m512i mac16(__m512i acc, __m512i a, __m512i w) {
#if VNNI
    return _mm512_dpwssd_epi32(acc, a, w);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, w));
#endif
}
#define W16(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p)))
#define A16(p) _mm512_loadu_si512(p)

static inline void q8_row4(const int16_t *a, long K, const int8_t *w, float out[4]) {
    const int16_t *a0 = a, *a1 = a + K, *a2 = a + 2 * K, *a3 = a + 3 * K;
    __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    for (long k0 = 0; k0 < K; k0 += Q8_FLUSH) {
        long k1 = k0 + Q8_FLUSH < K ? k0 + Q8_FLUSH : K;
        __m512i i0 = _mm512_setzero_si512(), i1 = i0, i2 = i0, i3 = i0;
        for (long k = k0; k < k1; k += 32) {
            __m512i wv = W16(w + k);
            i0 = mac16(i0, A16(a0 + k), wv);
            i1 = mac16(i1, A16(a1 + k), wv);
            i2 = mac16(i2, A16(a2 + k), wv);
            i3 = mac16(i3, A16(a3 + k), wv);
        }
        f0 = _mm512_add_ps(f0, _mm512_cvtepi32_ps(i0));
        f1 = _mm512_add_ps(f1, _mm512_cvtepi32_ps(i1));
        f2 = _mm512_add_ps(f2, _mm512_cvtepi32_ps(i2));
        f3 = _mm512_add_ps(f3, _mm512_cvtepi32_ps(i3));
    }
    out[0] = _mm512_reduce_add_ps(f0);
    out[1] = _mm512_reduce_add_ps(f1);
    out[2] = _mm512_reduce_add_ps(f2);
    out[3] = _mm512_reduce_add_ps(f3);
}

static inline float q8_row1(const int16_t *a, long K, const int8_t *w, long prefetch) {
    __m512 f = _mm512_setzero_ps();
    for (long k0 = 0; k0 < K; k0 += Q8_FLUSH) {
        long k1 = k0 + Q8_FLUSH < K ? k0 + Q8_FLUSH : K, k = k0;
        __m512i i0 = _mm512_setzero_si512(), i1 = i0; /* two chains: the multiply-add's latency overlaps */
        for (; k + 64 <= k1; k += 64) {
            if (prefetch) _mm_prefetch((const char *)(w + k + prefetch), _MM_HINT_T0);
            i0 = mac16(i0, A16(a + k), W16(w + k));
            i1 = mac16(i1, A16(a + k + 32), W16(w + k + 32));
        }
        if (k < k1) i0 = mac16(i0, A16(a + k), W16(w + k));
        f = _mm512_add_ps(f, _mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1)));
    }
    return _mm512_reduce_add_ps(f);
}
#else
#define MAC16(acc, a, wv) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(a)), wv))
#define W16(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)))

static inline void q8_row4(const int16_t *a, long K, const int8_t *w, float out[4]) {
    const int16_t *a0 = a, *a1 = a + K, *a2 = a + 2 * K, *a3 = a + 3 * K;
    __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    for (long k0 = 0; k0 < K; k0 += Q8_FLUSH) {
        long k1 = k0 + Q8_FLUSH < K ? k0 + Q8_FLUSH : K;
        __m256i i0 = _mm256_setzero_si256(), i1 = i0, i2 = i0, i3 = i0;
        for (long k = k0; k < k1; k += 16) {
            __m256i wv = W16(w + k);
            i0 = MAC16(i0, a0 + k, wv);
            i1 = MAC16(i1, a1 + k, wv);
            i2 = MAC16(i2, a2 + k, wv);
            i3 = MAC16(i3, a3 + k, wv);
        }
        f0 = _mm256_add_ps(f0, _mm256_cvtepi32_ps(i0));
        f1 = _mm256_add_ps(f1, _mm256_cvtepi32_ps(i1));
        f2 = _mm256_add_ps(f2, _mm256_cvtepi32_ps(i2));
        f3 = _mm256_add_ps(f3, _mm256_cvtepi32_ps(i3));
    }
    out[0] = hsum256(f0);
    out[1] = hsum256(f1);
    out[2] = hsum256(f2);
    out[3] = hsum256(f3);
}

static inline float q8_row1(const int16_t *a, long K, const int8_t *w, long prefetch) {
    __m256 f = _mm256_setzero_ps();
    for (long k0 = 0; k0 < K; k0 += Q8_FLUSH) {
        long k1 = k0 + Q8_FLUSH < K ? k0 + Q8_FLUSH : K;
        __m256i i0 = _mm256_setzero_si256(), i1 = i0; /* K is a multiple of 32 */
        for (long k = k0; k < k1; k += 32) {
            if (prefetch && (k & 63) == 0) _mm_prefetch((const char *)(w + k + prefetch), _MM_HINT_T0);
            i0 = MAC16(i0, a + k, W16(w + k));
            i1 = MAC16(i1, a + k + 16, W16(w + k + 16));
        }
        f = _mm256_add_ps(f, _mm256_cvtepi32_ps(_mm256_add_epi32(i0, i1)));
    }
    return hsum256(f);
}

#endif

static void SUFFIX(q8_rows)(const int16_t *xq, const float *xs, long M, long K, const int8_t *w, const uint16_t *ws,
                            const float *bias, float *y, long ldy, long n0, long n1, long prefetch) {
    for (long n = n0; n < n1; n++) {
        const int8_t *row = w + n * K;
        const float scale = bf16_to_f32(ws[n]), b = bias ? bias[n] : 0.0f;
        long m = 0;
        for (; m + 4 <= M; m += 4) {
            float d[4];
            q8_row4(xq + m * K, K, row, d);
            for (int j = 0; j < 4; j++) y[(m + j) * ldy + n] = d[j] * (xs[m + j] * scale) + b;
        }
        for (; m < M; m++) y[m * ldy + n] = q8_row1(xq + m * K, K, row, prefetch) * (xs[m] * scale) + b;
    }
}

/* ------------------------------------------------------------------------------------------------------
 * q4: 4-bit weights, int8 activations in blocks of 64 */

/* 64 floats -> 64 int8 in natural order (values within +-127, so packing never saturates); returns their sum. */
static inline int quantize64(const float *x, __m256 inv, int8_t *q0, int8_t *q1) {
    __m256i i[8];
    for (int j = 0; j < 8; j++) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * j), inv));
    __m256i sum = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3])),
                                   _mm256_add_epi32(_mm256_add_epi32(i[4], i[5]), _mm256_add_epi32(i[6], i[7])));
    /* packs works within 128-bit lanes: dwords come out as [i0 i1 i2 i3 | i0 i1 i2 i3] halves (low, then high
     * 4 values of each), put back in order by one dword permutation. */
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i a = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i[4], i[5]), _mm256_packs_epi32(i[6], i[7]));
    _mm256_storeu_si256((__m256i *)q0, _mm256_permutevar8x32_epi32(a, order));
    _mm256_storeu_si256((__m256i *)q1, _mm256_permutevar8x32_epi32(b, order));
    return hsum256_epi32(sum);
}

/* One activation row, K a multiple of 64: int8 per block of 64 columns (scale = max|x| / 127), the sum of
 * each group's de-quantized activations, and (AVX-512) the order and lane scales its kernel reads: per full
 * 128 columns, columns 0-31, 64-95, 32-63, 96-127, and 8 lanes of each block's scale. */
static void SUFFIX(q4_quantize)(const float *x, long K, int group, int8_t *q, float *block_scale, float *group_sum,
                                float *lane_scale) {
    long blocks = K / PHI2K_Q4_UNIT, full_chunks = WIDE ? K / 128 : 0;
    for (long g = 0; g < K / group; g++) group_sum[g] = 0.0f;
    for (long b = 0; b < blocks; b++) {
        const float *xb = x + b * PHI2K_Q4_UNIT;
        __m256 mx = _mm256_setzero_ps();
        for (int j = 0; j < 8; j++) mx = _mm256_max_ps(mx, abs256(_mm256_loadu_ps(xb + 8 * j)));
        float amax = hmax256(mx), scale = 0.0f;
        int8_t *first = q + b * PHI2K_Q4_UNIT, *second = first + 32;
        if (b / 2 < full_chunks) { /* AVX-512 order within the 128-column chunk */
            first = q + (b / 2) * 128 + (b % 2) * 32;
            second = first + 64;
        }
        int sum = 0;
        if (amax > 0.0f) {
            scale = amax / 127.0f;
            sum = quantize64(xb, _mm256_set1_ps(127.0f / amax), first, second);
        } else {
            memset(first, 0, 32);
            memset(second, 0, 32);
        }
        block_scale[b] = scale;
        group_sum[b * PHI2K_Q4_UNIT / group] += scale * (float)sum;
        if (b / 2 < full_chunks)
            for (int l = 0; l < 8; l++) lane_scale[(b / 2) * 16 + (b % 2) * 8 + l] = scale;
    }
}

/* Row n's group scales and minimums as fp32. */
static inline void row_scales(const uint16_t *scales, const uint16_t *mins, long n, long groups, float *s, float *m) {
    for (long g = 0; g < groups; g++) {
        s[g] = f16_to_f32(scales[n * groups + g]);
        m[g] = f16_to_f32(mins[n * groups + g]);
    }
}

static inline float min_term(const float *m, const float *group_sum, long groups) {
    float t = 0.0f;
    for (long g = 0; g < groups; g++) t += m[g] * group_sum[g];
    return t;
}

#if WIDE
/* The weight scale of each lane of a 128-column chunk: one group, or two groups of 64. */
static inline __m512 chunk_scale(const float *s, long c, int group) {
    if (group == 128) return _mm512_set1_ps(s[c]);
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(s[2 * c])), _mm256_set1_ps(s[2 * c + 1]), 1);
}
#endif

/* One 4-bit weight row (n) against up to `count` <= 4 activation rows (m .. m + count): each load of the
 * weight is unpacked once and used by every activation row; returns the rows' dot products without the
 * minimum term. */
static inline void q4_row(const int8_t *xq, const float *block_scale, const float *lane_scale, long m, int count, long K,
                          int group, const uint8_t *wr, const float *s, float out[4]) {
    const long blocks = K / PHI2K_Q4_UNIT;
    long first_unit = 0;
    for (int j = 0; j < 4; j++) out[j] = 0.0f;
#if WIDE
    const long chunks = K / 128;
    const int8_t *a[4];
    const float *ls[4];
    __m512 f[4];
    for (int j = 0; j < count; j++) {
        a[j] = xq + (m + j) * K;
        ls[j] = lane_scale + (m + j) * (K / 8);
        f[j] = _mm512_setzero_ps();
    }
    for (long c = 0; c < chunks; c++) {
        const __m512i low = _mm512_set1_epi8(0x0F);
        __m512i v = _mm512_loadu_si512(wr + c * 64);
        __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        __m512 wscale = chunk_scale(s, c, group);
        for (int j = 0; j < count; j++) {
            __m512i a0 = _mm512_loadu_si512(a[j] + c * 128), a1 = _mm512_loadu_si512(a[j] + c * 128 + 64);
#if VNNI
            __m512i i = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, a0), hi, a1);
#else
            __m512i i = _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo, a0), _mm512_maddubs_epi16(hi, a1)),
                                          _mm512_set1_epi16(1));
#endif
            f[j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(i), _mm512_loadu_ps(ls[j] + c * 16)), wscale, f[j]);
        }
    }
    for (int j = 0; j < count; j++) out[j] = _mm512_reduce_add_ps(f[j]);
    first_unit = chunks * 2;
#else
    (void)lane_scale;
#endif
    /* AVX2: every unit; AVX-512: the last unit when K is an odd number of units. */
    if (first_unit < blocks) {
        __m256 g[4];
        for (int j = 0; j < count; j++) g[j] = _mm256_setzero_ps();
        for (long u = first_unit; u < blocks; u++) {
            const __m256i low = _mm256_set1_epi8(0x0F);
            __m256i v = _mm256_loadu_si256((const __m256i *)(wr + u * 32));
            __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            const float su = s[u * PHI2K_Q4_UNIT / group];
            for (int j = 0; j < count; j++) {
                const int8_t *a = xq + (m + j) * K + u * PHI2K_Q4_UNIT;
                __m256i a0 = _mm256_loadu_si256((const __m256i *)a), a1 = _mm256_loadu_si256((const __m256i *)(a + 32));
#if VNNI
                __m256i i = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, a0), hi, a1);
#else
                __m256i i = _mm256_madd_epi16(
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, a0), _mm256_maddubs_epi16(hi, a1)), _mm256_set1_epi16(1));
#endif
                float k = block_scale[(m + j) * blocks + u] * su;
                g[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(k), g[j]);
            }
        }
        for (int j = 0; j < count; j++) out[j] += hsum256(g[j]);
    }
}

static void SUFFIX(q4_rows)(const int8_t *xq, const float *block_scale, const float *group_sum, const float *lane_scale,
                            long M, long K, int group, const uint8_t *w, const uint16_t *scales, const uint16_t *mins,
                            const float *bias, float *y, long ldy, long n0, long n1) {
    const long groups = K / group, row_bytes = K / 2;
    float s[MAX_GROUPS], mn[MAX_GROUPS];
    for (long n = n0; n < n1; n++) {
        row_scales(scales, mins, n, groups, s, mn);
        const float b = bias ? bias[n] : 0.0f;
        for (long m = 0; m < M; m += 4) {
            int count = M - m >= 4 ? 4 : (int)(M - m);
            float d[4];
            q4_row(xq, block_scale, lane_scale, m, count, K, group, w + n * row_bytes, s, d);
            for (int j = 0; j < count; j++)
                y[(m + j) * ldy + n] = d[j] + min_term(mn, group_sum + (m + j) * groups, groups) + b;
        }
    }
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7FFF + ((bits >> 16) & 1); /* round to nearest even (no NaN can arise here) */
    return (uint16_t)(bits >> 16);
}

static void SUFFIX(q4_widen)(const uint8_t *w, const uint16_t *scales, const uint16_t *mins, long K, int group,
                             void *out, int bf16, long n0, long n1) {
    const long groups = K / group, row_bytes = K / 2;
    float row[PHI2K_Q4_UNIT];
    for (long n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * row_bytes;
        for (long u = 0; u < K / PHI2K_Q4_UNIT; u++) {
            long g = u * PHI2K_Q4_UNIT / group;
            float s = f16_to_f32(scales[n * groups + g]), m = f16_to_f32(mins[n * groups + g]);
            const uint8_t *p = wr + u * 32;
            for (int j = 0; j < 32; j++) {
                row[j] = (float)(p[j] & 0x0F) * s + m;
                row[j + 32] = (float)(p[j] >> 4) * s + m;
            }
            long at = (n - n0) * K + u * PHI2K_Q4_UNIT;
            if (bf16) {
                uint16_t *o = (uint16_t *)out + at;
                for (int j = 0; j < PHI2K_Q4_UNIT; j++) o[j] = f32_to_bf16(row[j]);
            } else {
                memcpy((float *)out + at, row, sizeof row);
            }
        }
    }
}

const phi2k_ops OPS = {
    .q8_quantize = SUFFIX(q8_quantize),
    .q8_rows = SUFFIX(q8_rows),
    .q4_quantize = SUFFIX(q4_quantize),
    .q4_rows = SUFFIX(q4_rows),
    .q4_widen = SUFFIX(q4_widen),
};
