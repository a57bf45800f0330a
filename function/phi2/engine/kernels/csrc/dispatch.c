/* The library's entry points: which variants this CPU can run, and the threaded linear layers.
 *
 * Compiled for the baseline x86-64 ISA: nothing here executes an instruction the CPU might lack; a variant's
 * code runs only after phi2k_supported() said the CPU (and the OS, for AVX-512 state) has what it needs.
 *
 * Threads: the layers split their output rows across an OpenMP team. The library is linked without an
 * OpenMP runtime of its own: its GOMP_* symbols bind at load to the one torch already loaded (the Python
 * loader makes it global first), so torch's operators and these kernels share one pool of threads instead
 * of two pools spinning against each other on the same cores.
 */
#include <cpuid.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "phi2k.h"

#define EXPORT __attribute__((visibility("default")))

enum { OK = 0, E_VARIANT = -1, E_SHAPE = -2, E_MEMORY = -3 };

/* Below this many weight bytes per thread a layer is not worth splitting (the team's wake-up costs more). */
#define MIN_BYTES_PER_THREAD (128L * 1024)

EXPORT int phi2k_abi_version(void) { return PHI2K_ABI_VERSION; }

/* Bit v set: variant v may run here (the CPU has the instructions, the OS saves their registers). */
EXPORT unsigned phi2k_supported(void) {
    __builtin_cpu_init();
    unsigned mask = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        mask |= 1u << PHI2K_AVX2;
    if ((mask & 1u) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        mask |= 1u << PHI2K_AVX512;
        if (__builtin_cpu_supports("avx512vnni")) mask |= 1u << PHI2K_AVX512_VNNI;
    }
    return mask;
}

EXPORT const char *phi2k_variant_name(int variant) {
    static const char *names[PHI2K_VARIANTS] = {"avx2", "avx512", "avx512_vnni"};
    return variant >= 0 && variant < PHI2K_VARIANTS ? names[variant] : NULL;
}

/* How far ahead each weight row is prefetched: on Intel Xeons a single stream per core reaches the memory's
 * speed only with software prefetch (measured on a Sapphire-Rapids-class Xeon, 1 / 2 / 6 threads: 7.3 -> 9.9,
 * 14.9 -> 19.8, 36.7 -> 54.7 GB/s at 2048 bytes ahead, Phi-2's fc1); on AMD Zen 4 it costs (20.0 -> 14.5 GB/s on
 * one thread, even on two). PHI2K_PREFETCH=<bytes> overrides it. */
static long prefetch_bytes(void) {
    static long bytes = -1;
    if (bytes < 0) {
        const char *set = getenv("PHI2K_PREFETCH");
        unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
        __get_cpuid(0, &eax, &ebx, &ecx, &edx);
        int intel = ebx == 0x756e6547 && edx == 0x49656e69 && ecx == 0x6c65746e; /* "GenuineIntel" */
        bytes = set ? strtol(set, NULL, 10) : intel ? 2048 : 0;
        if (bytes < 0) bytes = 0;
    }
    return bytes;
}

static const phi2k_ops *ops_of(int variant) {
    static const phi2k_ops *table[PHI2K_VARIANTS] = {&phi2k_ops_avx2, &phi2k_ops_avx512, &phi2k_ops_avx512_vnni};
    if (variant < 0 || variant >= PHI2K_VARIANTS || !(phi2k_supported() & (1u << variant))) return NULL;
    return table[variant];
}

/* The calling thread's scratch memory for quantized activations, kept between calls (decode calls the
 * layers ~200 times per token; a fresh allocation of more than 128 kB would be a fresh mapping each time). */
static __thread void *scratch;
static __thread size_t scratch_size;

static void *scratch_of(size_t bytes) {
    if (bytes <= scratch_size) return scratch;
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes)) return NULL;
    free(scratch);
    scratch = p;
    scratch_size = bytes;
    return p;
}

static int team_size(int threads, long weight_bytes) {
    long useful = weight_bytes / MIN_BYTES_PER_THREAD;
    if (threads < 1) threads = 1;
    if (useful < threads) threads = useful < 1 ? 1 : (int)useful;
    return threads;
}

/* Rows [*n0, *n1) of N for member t of a team of T, in whole tiles of 4 rows. */
static void share(long N, int t, int T, long *n0, long *n1) {
    long tiles = (N + 3) / 4;
    *n0 = tiles * t / T * 4;
    *n1 = tiles * (t + 1) / T * 4;
    if (*n1 > N) *n1 = N;
    if (*n0 > N) *n0 = N;
}

static size_t round64(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

EXPORT int phi2k_q8_linear(int variant, int threads, const float *x, long M, long K, const int8_t *w,
                           const uint16_t *scale, const float *bias, float *y, long N) {
    const phi2k_ops *ops = ops_of(variant);
    if (!ops) return E_VARIANT;
    if (M < 1 || N < 1 || K < 32 || K % 32) return E_SHAPE;
    size_t qbytes = round64((size_t)M * K * sizeof(int16_t));
    char *buffer = scratch_of(qbytes + round64((size_t)M * sizeof(float)));
    if (!buffer) return E_MEMORY;
    int16_t *xq = (int16_t *)buffer;
    float *xs = (float *)(buffer + qbytes);
    int T = team_size(threads, N * K);
    const long pf = prefetch_bytes();
    if (T == 1) {
        for (long m = 0; m < M; m++) ops->q8_quantize(x + m * K, K, xq + m * K, xs + m);
        ops->q8_rows(xq, xs, M, K, w, scale, bias, y, N, 0, N, prefetch_bytes());
        return OK;
    }
#pragma omp parallel num_threads(T)
    {
        int t = omp_get_thread_num(), team = omp_get_num_threads();
        for (long m = t; m < M; m += team) ops->q8_quantize(x + m * K, K, xq + m * K, xs + m);
#pragma omp barrier
        long n0, n1;
        share(N, t, team, &n0, &n1);
        if (n0 < n1) ops->q8_rows(xq, xs, M, K, w, scale, bias, y, N, n0, n1, pf);
    }
    return OK;
}

static int q4_shape_ok(long M, long K, long N, int group) {
    return M >= 1 && N >= 1 && (group == 64 || group == 128) && K >= group && K % group == 0 &&
           K / PHI2K_Q4_UNIT <= 1024;
}

EXPORT int phi2k_q4_linear(int variant, int threads, const float *x, long M, long K, int group, const uint8_t *w,
                           const uint16_t *scales, const uint16_t *mins, const float *bias, float *y, long N) {
    const phi2k_ops *ops = ops_of(variant);
    if (!ops) return E_VARIANT;
    if (!q4_shape_ok(M, K, N, group)) return E_SHAPE;
    const long blocks = K / PHI2K_Q4_UNIT, groups = K / group;
    size_t qb = round64((size_t)M * K), bb = round64((size_t)M * blocks * sizeof(float));
    size_t gb = round64((size_t)M * groups * sizeof(float)), lb = round64((size_t)M * (K / 8) * sizeof(float));
    char *buffer = scratch_of(qb + bb + gb + lb);
    if (!buffer) return E_MEMORY;
    int8_t *xq = (int8_t *)buffer;
    float *bs = (float *)(buffer + qb), *gs = (float *)(buffer + qb + bb), *ls = (float *)(buffer + qb + bb + gb);
    int T = team_size(threads, N * K / 2);
#define Q4_QUANTIZE(m) ops->q4_quantize(x + (m) * K, K, group, xq + (m) * K, bs + (m) * blocks, gs + (m) * groups, ls + (m) * (K / 8))
    if (T == 1) {
        for (long m = 0; m < M; m++) Q4_QUANTIZE(m);
        ops->q4_rows(xq, bs, gs, ls, M, K, group, w, scales, mins, bias, y, N, 0, N);
        return OK;
    }
#pragma omp parallel num_threads(T)
    {
        int t = omp_get_thread_num(), team = omp_get_num_threads();
        for (long m = t; m < M; m += team) Q4_QUANTIZE(m);
#pragma omp barrier
        long n0, n1;
        share(N, t, team, &n0, &n1);
        if (n0 < n1) ops->q4_rows(xq, bs, gs, ls, M, K, group, w, scales, mins, bias, y, N, n0, n1);
    }
#undef Q4_QUANTIZE
    return OK;
}

/* Rows [n0, n1) of a 4-bit weight, de-quantized into out ((n1 - n0) x K, fp32 or bf16), by a team. */
EXPORT int phi2k_q4_widen(int variant, int threads, const uint8_t *w, const uint16_t *scales, const uint16_t *mins,
                          long N, long K, int group, void *out, int bf16, long n0, long n1) {
    const phi2k_ops *ops = ops_of(variant);
    if (!ops) return E_VARIANT;
    if (!q4_shape_ok(1, K, N, group) || n0 < 0 || n1 > N || n0 >= n1) return E_SHAPE;
    int T = team_size(threads, (n1 - n0) * K / 2);
    if (T == 1) {
        ops->q4_widen(w, scales, mins, K, group, out, bf16, n0, n1);
        return OK;
    }
#pragma omp parallel num_threads(T)
    {
        int t = omp_get_thread_num(), team = omp_get_num_threads();
        long rows = n1 - n0, a = n0 + rows * t / team, b = n0 + rows * (t + 1) / team;
        size_t element = bf16 ? 2 : 4;
        if (a < b) ops->q4_widen(w, scales, mins, K, group, (char *)out + (size_t)(a - n0) * K * element, bf16, a, b);
    }
    return OK;
}
