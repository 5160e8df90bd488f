/* CPU kernels of mlx_kernels, compiled at first use by _cpu_native.py (cc -O3 -march=native
 * -fopenmp -ffp-contract=fast -fno-trapping-math: its FLAGS) and called through ctypes. Plain C
 * with no torch headers, so the build takes well under a second. OpenMP here is the libgomp torch
 * has already loaded (same soname), so these loops share torch's threads instead of starting a
 * second pool.
 */
#include <math.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t d = 0; d < n; ++d) total += a[d] * b[d];
    return total;
}

/* Four dot products with one vector: four independent chains keep the FMA units busy where a
 * single 64-long dot product would wait on its own additions. */
static inline void dot4(const float *restrict a, const float *restrict b0, const float *restrict b1,
                        const float *restrict b2, const float *restrict b3, int64_t n,
                        float *restrict result) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t d = 0; d < n; ++d) {
        s0 += a[d] * b0[d];
        s1 += a[d] * b1[d];
        s2 += a[d] * b2[d];
        s3 += a[d] * b3[d];
    }
    result[0] = s0, result[1] = s1, result[2] = s2, result[3] = s3;
}

/* exp(x) for finite x <= 0 (a softmax's shifted scores), within 1.2e-7 relative to expf, and 0
 * below -87 (where expf leaves the normal floats). expf is a library call, which keeps a loop
 * scalar (glibc's vector one needs -ffast-math); this is branch-free arithmetic that `omp simd`
 * loops run on vectors (the comparison too, under -fno-trapping-math): Cephes' reduction to
 * 2^k exp(r), |r| <= ln2/2, and its degree-6 polynomial. */
static inline float exp_nonpositive(float x) {
    const float keep = (float)(x >= -87.0f);
    x *= keep;                                                      /* into [-87, 0] */
    const int32_t k = (int32_t)(x * 1.44269504088896341f - 0.5f); /* round(x / ln2) */
    const float n = (float)k, r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_k = {.i = (k + 127) << 23};
    return p * two_k.f * keep;
}

/* Gemma 2's soft-cap, s = cap * tanh(s / cap), in place on s[0, n). tanh from e = exp(-2|x|) in
 * (0, 1], which never overflows: sign(x) (1 - e) / (1 + e), on vectors like exp_nonpositive
 * (tanhf is a library call that keeps the loop scalar: 12.6 ns a score against 0.7 here, one
 * thread). Within 2e-7 * cap of the exact capped score, about fp32's own rounding of it. */
static void softcap_scores(float *restrict s, int64_t n, float cap) {
    const float inv = 1.0f / cap;
#pragma omp simd
    for (int64_t x = 0; x < n; ++x) {
        const float t = s[x] * inv, e = exp_nonpositive(-2.0f * fabsf(t));
        const float sign = (float)(t >= 0.0f) * 2.0f - 1.0f;
        s[x] = sign * cap * (1.0f - e) / (1.0f + e);
    }
}

/* Softmax of s[0, n) in place, in fp32 with the maximum subtracted. */
static void softmax(float *restrict s, int64_t n) {
    float best = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : best)
    for (int64_t x = 0; x < n; ++x) best = s[x] > best ? s[x] : best;
#pragma omp simd
    for (int64_t x = 0; x < n; ++x) s[x] = exp_nonpositive(s[x] - best);
#pragma omp simd reduction(+ : sum)
    for (int64_t x = 0; x < n; ++x) sum += s[x];
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t x = 0; x < n; ++x) s[x] *= inv;
}

/* min(a, 87) as a bit select, which gcc vectorises (fminf and ?: keep the loop scalar); a nan
 * gives 87. */
static inline float min87(float a) {
    union { float f; int32_t i; } value = {.f = a}, cap = {.f = 87.0f};
    const int32_t take = -(int32_t)(a < 87.0f); /* all ones where a < 87 */
    union { int32_t i; float f; } result = {.i = (value.i & take) | (cap.i & ~take)};
    return result.f;
}

/* SwiGLU's inference forward, out = silu(gate) * up, in one pass over the three arrays (torch
 * makes two: silu into a fresh tensor, then the product) and on vectors: the sigmoid from
 * e = exp(-|g|) in (0, 1], which never overflows: 1 / (1 + e) for g >= 0, e / (1 + e) below.
 * Within 5e-7 relative of silu * up; 0 where g < -87 (where |silu(g)| < 1.5e-36).
 * `rows` rows of `cols` values: gate's and up's rows `ld` values apart (the two halves of a fused
 * gate/up projection's output: ld = 2 * cols; one flat array: rows = 1), out's packed. Threads
 * split the work where it is long enough to repay waking them. */
void swiglu_f32(const float *restrict gate, const float *restrict up, float *restrict out,
                int64_t rows, int64_t cols, int64_t ld) {
    const int64_t chunk = 8192; /* per task: a vector loop each (gcc vectorises that form) */
    const int64_t per_row = (cols + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) if (rows * cols >= 4 * chunk)
    for (int64_t task = 0; task < rows * per_row; ++task) {
        const int64_t r = task / per_row, c = (task % per_row) * chunk;
        const int64_t end = c + chunk < cols ? c + chunk : cols;
        const float *restrict g_row = gate + r * ld, *restrict u_row = up + r * ld;
        float *restrict o_row = out + r * cols;
#pragma omp simd
        for (int64_t i = c; i < end; ++i) {
            /* |g| capped at 87: exp stays a normal float, and an infinite g gives inf, not nan */
            const float g = g_row[i], e = exp_nonpositive(-min87(fabsf(g)));
            /* selects as arithmetic on 0/1 floats, which gcc vectorises */
            const float positive = (float)(g >= 0.0f), kept = (float)(g >= -87.0f);
            const float sigmoid = kept * (positive + (1.0f - positive) * e) / (1.0f + e);
            o_row[i] = g * sigmoid * u_row[i];
        }
    }
}

/* The element types a paged cache may hold (paged_attention_f32's kv_type). */
enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2 };

static inline int64_t kv_item_bytes(int kv_type) { return kv_type == KV_F32 ? 4 : 2; }

/* tokens whose value rows one pass of decode_task's value tiles reads: at most this many rows
 * of a half-precision cache are converted at once (the general loop takes 8) */
enum { DECODE_RUN = 32 };

/* The address of token `t`'s row (all kv heads: row_size numbers) in a paged cache. */
static inline const char *token_bytes(const void *cache, int kv_type, const int32_t *table,
                                      int64_t t, int64_t block_size, int64_t row_size) {
    return (const char *)cache + ((int64_t)table[t / block_size] * block_size + t % block_size) *
                                     row_size * kv_item_bytes(kv_type);
}

/* IEEE half to float, exactly (subnormals, infinities and nans too): for machines without F16C */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f,
                   mantissa = h & 0x3ff;
    union { uint32_t i; float f; } out;
    if (exponent == 0x1f) {
        out.i = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent) {
        out.i = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else { /* zero or subnormal: mantissa * 2^-24 */
        out.f = (float)mantissa * 5.9604644775390625e-8f;
        out.i |= sign;
    }
    return out.f;
}

/* Token `t`'s row as fp32: in place in an fp32 cache; converted into `buf` (row_size floats)
 * from an fp16 or bf16 one (both convert exactly, so the kernels compute as on an fp32 cache
 * that holds the same numbers, and read half the bytes). */
static inline const float *token_row(const void *cache, int kv_type, const int32_t *table,
                                     int64_t t, int64_t block_size, int64_t row_size,
                                     float *restrict buf) {
    const char *row = token_bytes(cache, kv_type, table, t, block_size, row_size);
    if (kv_type == KV_F32) return (const float *)row;
    const uint16_t *half = (const uint16_t *)row;
    int64_t d = 0;
#if defined(__AVX2__) && defined(__F16C__)
    if (kv_type == KV_F16)
        for (; d + 8 <= row_size; d += 8)
            _mm256_storeu_ps(buf + d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(half + d))));
    else
        for (; d + 8 <= row_size; d += 8) {
            const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(half + d)));
            _mm256_storeu_ps(buf + d, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
        }
#endif
    for (; d < row_size; ++d) {
        if (kv_type == KV_F16) {
            buf[d] = half_to_float(half[d]);
        } else {
            union { uint32_t i; float f; } value = {.i = (uint32_t)half[d] << 16};
            buf[d] = value.f;
        }
    }
    return buf;
}

#if defined(__AVX2__) && defined(__FMA__)
/* Decode (one query per sequence) in register tiles, the common case of paged_attention_f32 on
 * AVX2. The general loop above spends most of its time in horizontal sums and in loads of its
 * accumulators: in decode it ran at ~2 multiply-adds a cycle with its data in L2. Here each
 * score tile holds up to three query heads of one kv head against four keys in twelve
 * accumulators (seven loads a twelve multiply-adds), summed across lanes four at a time; each
 * value tile holds up to three heads' outputs, 32 dimensions, in registers over a run of tokens.
 * 1.5-1.65x the general loop with the cache in L2 (64 sequences, GQA 9/3, head_dim 64, 216-512
 * tokens, 2 threads); 7-12% from DRAM, where reading the cache bounds both. */

/* the four sums of a0..a3's lanes, in order */
static inline __m128 sum4_ps(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* s[h * s_stride + j] = scale * (q_h . k[j]) for nh (1-3) query heads, rows q_stride apart, and
 * four keys of `dim` (a multiple of 8) values. Called with constant nh, so the tile unrolls. */
static inline __attribute__((always_inline)) void decode_score_tile(
    const int nh, const float *restrict q, int64_t q_stride, const float *const *k, int64_t dim,
    __m128 scale, float *restrict s, int64_t s_stride) {
    __m256 acc[3][4];
    for (int h = 0; h < nh; ++h)
        for (int j = 0; j < 4; ++j) acc[h][j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < dim; d += 8) {
        const __m256 k0 = _mm256_loadu_ps(k[0] + d), k1 = _mm256_loadu_ps(k[1] + d),
                     k2 = _mm256_loadu_ps(k[2] + d), k3 = _mm256_loadu_ps(k[3] + d);
        for (int h = 0; h < nh; ++h) {
            const __m256 qh = _mm256_loadu_ps(q + h * q_stride + d);
            acc[h][0] = _mm256_fmadd_ps(qh, k0, acc[h][0]);
            acc[h][1] = _mm256_fmadd_ps(qh, k1, acc[h][1]);
            acc[h][2] = _mm256_fmadd_ps(qh, k2, acc[h][2]);
            acc[h][3] = _mm256_fmadd_ps(qh, k3, acc[h][3]);
        }
    }
    for (int h = 0; h < nh; ++h)
        _mm_storeu_ps(s + h * s_stride,
                      _mm_mul_ps(scale, sum4_ps(acc[h][0], acc[h][1], acc[h][2], acc[h][3])));
}

/* o[h * o_stride + (0, 8 nv)] += sum over t < n of p[h * p_stride + t] * v[t][(0, 8 nv)], for nh
 * (1-3) heads and nv (1-4) vectors; constant nh and nv at each call. */
static inline __attribute__((always_inline)) void decode_value_tile(
    const int nh, const int nv, const float *const *v, int64_t n, const float *restrict p,
    int64_t p_stride, float *restrict o, int64_t o_stride) {
    __m256 acc[3][4];
    for (int h = 0; h < nh; ++h)
        for (int j = 0; j < nv; ++j) acc[h][j] = _mm256_loadu_ps(o + h * o_stride + 8 * j);
    for (int64_t t = 0; t < n; ++t) {
        __m256 vt[4];
        for (int j = 0; j < nv; ++j) vt[j] = _mm256_loadu_ps(v[t] + 8 * j);
        for (int h = 0; h < nh; ++h) {
            const __m256 w = _mm256_broadcast_ss(p + h * p_stride + t);
            for (int j = 0; j < nv; ++j) acc[h][j] = _mm256_fmadd_ps(w, vt[j], acc[h][j]);
        }
    }
    for (int h = 0; h < nh; ++h)
        for (int j = 0; j < nv; ++j) _mm256_storeu_ps(o + h * o_stride + 8 * j, acc[h][j]);
}

static void decode_value_tiles(int nh, int nv, const float *const *v, int64_t n,
                               const float *p, int64_t p_stride, float *o, int64_t o_stride) {
#define DECODE_VALUE_TILE(NH)                                                                    \
    switch (nv) {                                                                                \
    case 4: decode_value_tile(NH, 4, v, n, p, p_stride, o, o_stride); break;                     \
    case 3: decode_value_tile(NH, 3, v, n, p, p_stride, o, o_stride); break;                     \
    case 2: decode_value_tile(NH, 2, v, n, p, p_stride, o, o_stride); break;                     \
    default: decode_value_tile(NH, 1, v, n, p, p_stride, o, o_stride);                           \
    }
    if (nh == 3) {
        DECODE_VALUE_TILE(3)
    } else if (nh == 2) {
        DECODE_VALUE_TILE(2)
    } else {
        DECODE_VALUE_TILE(1)
    }
#undef DECODE_VALUE_TILE
}

/* Ask for the rows of tokens [t, t + n) (up to len) ahead of their use: the blocks are scattered,
 * so the hardware's prefetchers lose the stream at each block. */
static inline void prefetch_rows(const void *cache, int kv_type, const int32_t *table, int64_t t,
                                 int64_t n, int64_t len, int64_t block_size, int64_t row_size) {
    for (int64_t j = 0; j < n && t + j < len; ++j) {
        const char *row = token_bytes(cache, kv_type, table, t + j, block_size, row_size);
        for (int64_t c = 0; c < row_size * kv_item_bytes(kv_type); c += 64)
            __builtin_prefetch(row + c, 0, 3);
    }
}

/* One decode task: sequence b's query heads of kv heads [kv0, kv0 + nkv), keys [start, len);
 * scores: nkv * group rows of ld >= len - start + 3 floats (the four-key tiles overrun); rows:
 * DECODE_RUN * row_size floats for the rows of a half-precision cache (token_row). */
static void decode_task(const float *q, const void *keys, const void *values, int kv_type,
                        const int32_t *table, float *o, float *scores, float *rows, int64_t ld,
                        int64_t start, int64_t len, int64_t kv0, int64_t nkv, int64_t group,
                        int64_t head_dim, int64_t block_size, int64_t row_size, float scale,
                        float softcap) {
    const int64_t n = len - start;
    const __m128 scale4 = _mm_set1_ps(scale);
    for (int64_t t = start; t < len; t += 4) {
        prefetch_rows(keys, kv_type, table, t + 8, 4, len, block_size, row_size);
        const float *k[4];
        for (int j = 0; j < 4; ++j) /* past the end: the last row again, its scores unused */
            k[j] = token_row(keys, kv_type, table, t + j < len ? t + j : len - 1, block_size,
                             row_size, rows + j * row_size);
        for (int64_t kv = kv0; kv < kv0 + nkv; ++kv) {
            const float *kh[4] = {k[0] + kv * head_dim, k[1] + kv * head_dim,
                                  k[2] + kv * head_dim, k[3] + kv * head_dim};
            for (int64_t g = 0; g < group; g += 3) {
                const int64_t h = (kv - kv0) * group + g; /* the task's head, a score row */
                const float *qh = q + h * head_dim;
                float *s = scores + h * ld + (t - start);
                switch (group - g < 3 ? group - g : 3) {
                case 1: decode_score_tile(1, qh, head_dim, kh, head_dim, scale4, s, ld); break;
                case 2: decode_score_tile(2, qh, head_dim, kh, head_dim, scale4, s, ld); break;
                default: decode_score_tile(3, qh, head_dim, kh, head_dim, scale4, s, ld);
                }
            }
        }
    }
    for (int64_t h = 0; h < nkv * group; ++h) {
        if (softcap > 0.0f) softcap_scores(scores + h * ld, n, softcap);
        softmax(scores + h * ld, n);
    }
    for (int64_t x = 0; x < nkv * group * head_dim; ++x) o[x] = 0.0f;
    for (int64_t t = start; t < len; t += DECODE_RUN) {
        const int64_t m = len - t < DECODE_RUN ? len - t : DECODE_RUN;
        prefetch_rows(values, kv_type, table, t + DECODE_RUN, DECODE_RUN, len, block_size,
                      row_size);
        const float *v[DECODE_RUN], *vd[DECODE_RUN];
        for (int64_t j = 0; j < m; ++j)
            v[j] = token_row(values, kv_type, table, t + j, block_size, row_size,
                             rows + j * row_size);
        for (int64_t kv = kv0; kv < kv0 + nkv; ++kv)
            for (int64_t g = 0; g < group; g += 3) {
                const int64_t h = (kv - kv0) * group + g;
                const int nh = group - g < 3 ? (int)(group - g) : 3;
                for (int64_t d = 0; d < head_dim; d += 32) {
                    for (int64_t j = 0; j < m; ++j) vd[j] = v[j] + kv * head_dim + d;
                    const int nv = head_dim - d < 32 ? (int)(head_dim - d) / 8 : 4;
                    decode_value_tiles(nh, nv, vd, m, scores + h * ld + (t - start), ld,
                                       o + h * head_dim + d, head_dim);
                }
            }
    }
}
#define DECODE_TILES 1
#else
#define DECODE_TILES 0
#endif

/* A thread's score rows (`scratch` floats) and, for a half-precision cache, the rows token_row
 * converts into (DECODE_RUN rows); both freed by the caller. Whether both were allocated. */
static int thread_rows(int64_t scratch, int64_t kv_type, int64_t row_size, float **scores,
                       float **rows) {
    *scores = malloc(sizeof(float) * (size_t)scratch);
    *rows = kv_type == KV_F32 ? NULL : malloc(sizeof(float) * DECODE_RUN * row_size);
    return *scores && (kv_type == KV_F32 || *rows);
}

/* Whether a table's blocks for tokens [start, len) are all inside the cache. */
static inline int table_in_cache(const int32_t *table, int64_t start, int64_t len,
                                 int64_t block_size, int64_t num_blocks) {
    int bad = 0;
    for (int64_t i = start / block_size; i <= (len - 1) / block_size; ++i)
        bad |= table[i] < 0 || table[i] >= num_blocks;
    return !bad;
}

#if DECODE_TILES
/* Several queries per sequence (prefill, chunked prefill, speculative verification) in decode
 * tiles: each query is decode_task's problem over the keys it sees, [its window's start, its
 * own position], so nothing outside its causal window is scored. Tasks are runs of
 * QUERY_CHUNK queries of one sequence, all heads, handed out dynamically: a lone long prompt
 * keeps every thread busy. A sequence's keys and values are re-read for each query, from L2
 * while they fit (a 256-token sequence of 3 kv heads, head_dim 64: 384 KiB); the general loop
 * reads them once but runs its multiply-adds at a fraction of the tiles' rate. Arguments as
 * paged_attention_f32's (cu_q not NULL, head_dim a multiple of 8). */
enum { QUERY_CHUNK = 8 };

static int query_tiles(const float *query, const void *keys, const void *values,
                       const int32_t *tables, const int32_t *lens, const int32_t *cu_q, float *out,
                       int64_t batch, int64_t kv_heads, int64_t group, int64_t head_dim,
                       int64_t block_size, int64_t table_width, int64_t num_blocks,
                       int64_t window, float scale, float softcap, int64_t kv_type) {
    const int64_t heads = kv_heads * group, row_size = kv_heads * head_dim;
    const int64_t stride = heads * head_dim;
    /* first_task[b]: sequence b's first task; its scores need heads * (keys seen + 3) floats */
    int64_t *first_task = malloc(sizeof(int64_t) * (size_t)(batch + 1));
    if (!first_task) return -1;
    int64_t scratch = 1;
    first_task[0] = 0;
    for (int64_t b = 0; b < batch; ++b) {
        const int64_t lq = cu_q[b + 1] - cu_q[b];
        first_task[b + 1] = first_task[b] + (lq > 0 ? (lq + QUERY_CHUNK - 1) / QUERY_CHUNK : 0);
        const int64_t seen = window > 0 && lens[b] > window ? window : lens[b];
        scratch = heads * (seen + 3) > scratch ? heads * (seen + 3) : scratch;
    }
    int failed = 0;
#pragma omp parallel
    {
        float *scores, *rows;
        const int ready = thread_rows(scratch, kv_type, row_size, &scores, &rows);
        if (!ready) {
#pragma omp atomic write
            failed = -1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < first_task[batch]; ++task) {
            if (!ready) continue;
            int64_t lo = 0, hi = batch; /* b: the last sequence whose first task <= task */
            while (hi - lo > 1) {
                const int64_t mid = (lo + hi) / 2;
                if (first_task[mid] <= task) lo = mid; else hi = mid;
            }
            const int64_t b = lo, lq = cu_q[b + 1] - cu_q[b], first = lens[b] - lq;
            const int64_t i0 = (task - first_task[b]) * QUERY_CHUNK;
            const int64_t i1 = i0 + QUERY_CHUNK < lq ? i0 + QUERY_CHUNK : lq;
            const int32_t *table = tables + b * table_width;
            const int64_t seen0 = first + i0 + 1; /* the chunk's first query sees the least */
            if (!table_in_cache(table, window > 0 && seen0 > window ? seen0 - window : 0,
                                first + i1, block_size, num_blocks)) {
#pragma omp atomic write
                failed = -2;
                continue;
            }
            for (int64_t i = i0; i < i1; ++i) {
                const int64_t len = first + i + 1; /* query i sees keys [start, len) */
                const int64_t start = window > 0 && len > window ? len - window : 0;
                const int64_t row = cu_q[b] + i;
                decode_task(query + row * stride, keys, values, (int)kv_type, table,
                            out + row * stride, scores, rows, len - start + 3, start, len, 0,
                            kv_heads, group, head_dim, block_size, row_size, scale, softcap);
            }
        }
        free(scores);
        free(rows);
    }
    free(first_task);
    return failed;
}
#endif

/* Whether paged_attention_f32 runs register tiles (AVX2 + FMA) for head_dim multiples of 8. */
int paged_attention_tiles(void) { return DECODE_TILES; }

/* Paged attention of query tokens per sequence over its keys/values in paged blocks: decode (one
 * query each), prefill and prefill chunks after a cached prefix (chunked prefill, prefix-cache
 * continuation, speculative verification).
 *
 * query  [total_q, heads, head_dim] (contiguous; heads = kv_heads * group, GQA)
 * keys, values [num_blocks, block_size, kv_heads, head_dim] (contiguous), fp32, fp16 or bf16
 *        as kv_type says (KV_F32, KV_F16, KV_BF16; a half-precision row is converted as read)
 * tables [batch, table_width] int32; lens [batch] int32: each sequence's total key length
 *        (cached prefix + its new tokens, all already in the cache)
 * cu_q   [batch + 1] int32: sequence b's queries are rows [cu_q[b], cu_q[b + 1]) of query and
 *        out; NULL: one query per sequence (decode, row b)
 * out    [total_q, heads, head_dim]
 *
 * Bottom-right causal: query i of a sequence's Lq sits at key position p = len - Lq + i and sees
 * keys k <= p, and with `window` > 0 only p - k < window (the last `window` positions up to its
 * own). A sequence with Lq = 0 is skipped; 1 <= len and Lq <= len are the caller's to check.
 * `softcap` > 0: each scaled score becomes softcap * tanh(score / softcap) before the mask and the
 * softmax (Gemma 2); 0: no cap.
 *
 * One task per sequence. Each cached token's key row (all kv heads: one contiguous row) is read
 * once, in place in its block, four tokens at a time, for all heads and all queries of the
 * sequence (decode waits on those loads; each further query adds arithmetic, not loads). With
 * fewer sequences than threads, one task per (sequence, kv head) instead, so no thread idles: a
 * lone sequence's decode at 2000 cached tokens 0.50 -> 0.40 ms, at 300 0.057 -> 0.048 ms (2
 * threads; batches of 24-64 unchanged). Scores go to a scratch row per (head, query) over the
 * keys any query sees, [start, len): heads * Lq * (len - start + 3) floats per thread at most.
 * The keys one query may not see are scored with the rest but
 * left out of its softmax (fp32, max subtracted) and given probability 0, so they contribute
 * nothing. Then one pass over the values, eight tokens at a time, each row read once for all
 * heads and queries. No gathered copy, no padding to the longest sequence. Returns 0, -1 when
 * out of memory, -2 when a table entry in use is outside [0, num_blocks) (nothing is read there).
 * On AVX2 with head_dim a multiple of 8, decode (cu_q NULL) runs decode_task's register tiles
 * and calls with cu_q run query_tiles; the general loop described here runs the rest.
 */
int paged_attention_f32(const float *query, const void *keys, const void *values,
                        const int32_t *tables, const int32_t *lens, const int32_t *cu_q, float *out,
                        int64_t batch, int64_t kv_heads, int64_t group, int64_t head_dim,
                        int64_t block_size, int64_t table_width, int64_t num_blocks, int64_t window,
                        float scale, float softcap, int64_t kv_type) {
    const int64_t heads = kv_heads * group, row_size = kv_heads * head_dim;
    const int64_t stride = heads * head_dim; /* between query (and out) rows */
#if DECODE_TILES
    if (cu_q && head_dim % 8 == 0)
        return query_tiles(query, keys, values, tables, lens, cu_q, out, batch, kv_heads, group,
                           head_dim, block_size, table_width, num_blocks, window, scale, softcap,
                           kv_type);
#endif
    /* fewer sequences than threads: one task per (sequence, kv head) keeps every thread busy (a
     * lone sequence: a chat's next turn after its cached history); otherwise one per sequence,
     * which reads each key/value row once for all heads (more loads in flight: faster there) */
    const int64_t splits = batch < omp_get_max_threads() ? kv_heads : 1;
    const int64_t task_heads = heads / splits;
#if DECODE_TILES
    const int tiles = !cu_q && head_dim % 8 == 0; /* decode_task's case */
#endif
    int64_t scratch = 1;
    for (int64_t b = 0; b < batch; ++b) {
        const int64_t lq = cu_q ? cu_q[b + 1] - cu_q[b] : 1, first = lens[b] - lq;
        const int64_t start = (window > 0 && first + 1 > window) ? first + 1 - window : 0;
        const int64_t need = task_heads * lq * (lens[b] - start + 3); /* + 3: decode_task's */
        scratch = need > scratch ? need : scratch;
    }
    int failed = 0;
#pragma omp parallel
    {
        float *scores, *rows;
        const int ready = thread_rows(scratch, kv_type, row_size, &scores, &rows);
        if (!ready) {
#pragma omp atomic write
            failed = -1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < batch * splits; ++task) {
            /* sequence b's queries, heads [h0, h0 + task_heads) */
            const int64_t b = task / splits, h0 = (task % splits) * task_heads;
            const int64_t q0 = cu_q ? cu_q[b] : b, lq = cu_q ? cu_q[b + 1] - q0 : 1;
            if (!ready || lq <= 0) continue;
            /* `first`: the first query's position; its window starts the earliest */
            const int64_t len = lens[b], first = len - lq;
            const int64_t start = (window > 0 && first + 1 > window) ? first + 1 - window : 0;
            const int64_t n = len - start;
            const int32_t *table = tables + b * table_width;
            if (!table_in_cache(table, start, len, block_size, num_blocks)) {
#pragma omp atomic write
                failed = -2;
                continue;
            }
            const float *q = query + q0 * stride;
            float *o = out + q0 * stride;
#if DECODE_TILES
            if (tiles) {
                decode_task(q + h0 * head_dim, keys, values, (int)kv_type, table,
                            o + h0 * head_dim, scores, rows, n + 3, start, len, h0 / group,
                            task_heads / group, group, head_dim, block_size, row_size, scale,
                            softcap);
                continue;
            }
#endif
            /* row (hq - h0) * lq + i of scores: head hq of query i, over keys [start, len) */
            int64_t t = start;
            for (; t + 4 <= len; t += 4) {
                const float *k[4];
                for (int j = 0; j < 4; ++j)
                    k[j] = token_row(keys, kv_type, table, t + j, block_size, row_size,
                                     rows + j * row_size);
                for (int64_t hq = h0; hq < h0 + task_heads; ++hq) {
                    const int64_t off = (hq / group) * head_dim;
                    for (int64_t i = 0; i < lq; ++i) {
                        float *s = scores + ((hq - h0) * lq + i) * n + (t - start);
                        dot4(q + i * stride + hq * head_dim, k[0] + off, k[1] + off, k[2] + off,
                             k[3] + off, head_dim, s);
                        for (int j = 0; j < 4; ++j) s[j] *= scale;
                    }
                }
            }
            for (; t < len; ++t) {
                const float *k = token_row(keys, kv_type, table, t, block_size, row_size, rows);
                for (int64_t hq = h0; hq < h0 + task_heads; ++hq)
                    for (int64_t i = 0; i < lq; ++i)
                        scores[((hq - h0) * lq + i) * n + (t - start)] =
                            dot(q + i * stride + hq * head_dim, k + (hq / group) * head_dim,
                                head_dim) * scale;
            }
            for (int64_t i = 0; i < lq; ++i) {
                /* query i (at first + i) sees row positions [lo, hi) */
                const int64_t pos = first + i, hi = pos + 1 - start;
                const int64_t lo = (window > 0 && pos + 1 > window ? pos + 1 - window : 0) - start;
                for (int64_t hq = h0; hq < h0 + task_heads; ++hq) {
                    float *s = scores + ((hq - h0) * lq + i) * n;
                    /* capping only the keys this query sees is the same as capping all, then
                     * masking: the others get probability 0 either way */
                    if (softcap > 0.0f) softcap_scores(s + lo, hi - lo, softcap);
                    softmax(s + lo, hi - lo);
                    for (int64_t x = 0; x < lo; ++x) s[x] = 0.0f;
                    for (int64_t x = hi; x < n; ++x) s[x] = 0.0f;
                    for (int64_t d = 0; d < head_dim; ++d) o[i * stride + hq * head_dim + d] = 0.0f;
                }
            }
            for (t = start; t + 8 <= len; t += 8) {
                const float *v[8];
                for (int j = 0; j < 8; ++j)
                    v[j] = token_row(values, kv_type, table, t + j, block_size, row_size,
                                     rows + j * row_size);
                for (int64_t hq = h0; hq < h0 + task_heads; ++hq) {
                    const int64_t off = (hq / group) * head_dim;
                    const float *restrict v0 = v[0] + off, *restrict v1 = v[1] + off,
                                          *restrict v2 = v[2] + off, *restrict v3 = v[3] + off,
                                          *restrict v4 = v[4] + off, *restrict v5 = v[5] + off,
                                          *restrict v6 = v[6] + off, *restrict v7 = v[7] + off;
                    for (int64_t i = 0; i < lq; ++i) {
                        const float *p = scores + ((hq - h0) * lq + i) * n + (t - start);
                        float *restrict oh = o + i * stride + hq * head_dim;
#pragma omp simd
                        for (int64_t d = 0; d < head_dim; ++d)
                            oh[d] += p[0] * v0[d] + p[1] * v1[d] + p[2] * v2[d] + p[3] * v3[d] +
                                     p[4] * v4[d] + p[5] * v5[d] + p[6] * v6[d] + p[7] * v7[d];
                    }
                }
            }
            for (; t < len; ++t) {
                const float *v = token_row(values, kv_type, table, t, block_size, row_size, rows);
                for (int64_t hq = h0; hq < h0 + task_heads; ++hq) {
                    const float *restrict vh = v + (hq / group) * head_dim;
                    for (int64_t i = 0; i < lq; ++i) {
                        const float p = scores[((hq - h0) * lq + i) * n + (t - start)];
                        float *restrict oh = o + i * stride + hq * head_dim;
#pragma omp simd
                        for (int64_t d = 0; d < head_dim; ++d) oh[d] += p * vh[d];
                    }
                }
            }
        }
        free(scores);
        free(rows);
    }
    return failed;
}

/* W8A8's dynamic activation quantization: each row of x [rows, k] to int8 with its own scale,
 * q = rint(x * (127 / max|x|)), scale = max|x| / 127 (a zero row: q = 0, scale = 0). The same
 * float operations as the torch reference, so the two agree bit for bit (finite rows). Stored
 * as q + offset: 0 (int8, quantize_rows_s8) or 128 (uint8, quantize_rows_u8, the narrow GEMM's
 * inputs). */
static void quantize_rows_offset(const float *restrict x, uint8_t *restrict q,
                                 float *restrict scale, int64_t rows, int64_t k, int offset) {
#pragma omp parallel for schedule(static) if (rows * k >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * k;
        /* max|x| as the largest sign-cleared bit pattern: for non-negative floats the integer
         * order is the float order, and the loop runs on vectors (fmaxf stays a libm call per
         * element); a nan (above inf in that order) comes out as a nan, as torch's amax */
        const int32_t *bits = (const int32_t *)xr;
        int32_t amax_bits = 0;
#pragma omp simd reduction(max : amax_bits)
        for (int64_t i = 0; i < k; ++i) {
            const int32_t b = bits[i] & 0x7fffffff;
            amax_bits = b > amax_bits ? b : amax_bits;
        }
        union { int32_t i; float f; } amax_value = {.i = amax_bits};
        const float amax = amax_value.f;
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        uint8_t *qr = q + r * k;
#pragma omp simd
        for (int64_t i = 0; i < k; ++i) qr[i] = (uint8_t)((int32_t)rintf(xr[i] * inv) + offset);
        scale[r] = amax / 127.0f;
    }
}

void quantize_rows_s8(const float *restrict x, int8_t *restrict q, float *restrict scale,
                      int64_t rows, int64_t k) {
    quantize_rows_offset(x, (uint8_t *)q, scale, rows, k, 0);
}

void quantize_rows_u8(const float *restrict x, uint8_t *restrict q, float *restrict scale,
                      int64_t rows, int64_t k) {
    quantize_rows_offset(x, q, scale, rows, k, 128);
}

/* W8A8's epilogue: out[r, n] = acc[r, n] * (row_scale[r] * col_scale[n]) (+ bias[n]), from the
 * int32 product of the quantized activations and weights. */
void dequantize_s32_f32(const int32_t *restrict acc, const float *restrict row_scale,
                        const float *restrict col_scale, const float *restrict bias,
                        float *restrict out, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows * n >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const int32_t *ar = acc + r * n;
        float *o = out + r * n;
        const float rs = row_scale[r];
        if (bias) {
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) o[i] = (float)ar[i] * (rs * col_scale[i]) + bias[i];
        } else {
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) o[i] = (float)ar[i] * (rs * col_scale[i]);
        }
    }
}

/* How far ahead of its reads the int8 loop asks for weight bytes. Each thread reads one
 * contiguous stretch of the weight, a few rows at a time; the rows are short (576 bytes in the
 * built-in model), too short for the hardware prefetcher to run ahead of them. */
#if defined(__AVX2__) || defined(__AVX512F__)
/* A thread's scratch buffer of at least ``bytes`` (64-byte aligned), kept for its next call:
 * a decode step makes ~120 calls of some 10 us each, where malloc and free would show. NULL
 * where no memory is left. Slots: 0 the int4 loops' packed inputs, 1 their fp32 scales and
 * mins, 2 the AVX-512 int4 loop's expanded words, 3 the AVX2 loops' fp32 weight panels. */
static __attribute__((unused)) void *thread_scratch(int slot, size_t bytes) {
    static _Thread_local void *buffer[4];
    static _Thread_local size_t capacity[4];
    if (capacity[slot] < bytes) {
        free(buffer[slot]);
        bytes = (bytes + 4095) & ~(size_t)4095;
        buffer[slot] = aligned_alloc(64, bytes);
        capacity[slot] = buffer[slot] ? bytes : 0;
    }
    return buffer[slot];
}
#endif

#ifndef INT8_PREFETCH_BYTES
#define INT8_PREFETCH_BYTES 8192
#endif

#if defined(__AVX2__)
/* Four AVX2 int32 sums reduced at once: lane j of the result is acc[j]'s total. */
static inline __m128i sum4_epi32(const __m256i *acc) {
    const __m256i t = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]),
                                        _mm256_hadd_epi32(acc[2], acc[3]));
    return _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}
#endif

/* The W8A8 GEMM takes its input rows in blocks of about this many bytes, which stay in L2 while
 * every weight row passes over them: at 2048 rows (a prefill chunk) the rows otherwise came from
 * L3 for each block of four weight rows (2 threads, AMD EPYC, fastest of 40 calls, two runs:
 * 26-35 -> 33-39 multiply-adds a cycle; 128 KiB blocks were slower). */
#ifndef W8A8_BLOCK_BYTES
#define W8A8_BLOCK_BYTES (256 * 1024)
#endif

#if defined(__AVX2__)
/* 16 int8 values sign-extended to int16 */
static inline __m256i w8a8_load16(const int8_t *p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}
/* 16 weights of a row times the two input rows' 16, pairs summed in int32, into their sums */
#define W8A8_STEP(row, sum0, sum1)                                                      \
    {                                                                                   \
        const __m256i b = w8a8_load16((row) + i);                                       \
        sum0 = _mm256_add_epi32(sum0, _mm256_madd_epi16(x0, b));                         \
        sum1 = _mm256_add_epi32(sum1, _mm256_madd_epi16(x1, b));                         \
    }
/* 32 weights of a row (within +-64) times the two offset input rows' 32 (0..255): vpmaddubsw
 * sums each pair in int16, exactly (|pair| <= 2 * 255 * 64 < 2^15), vpmaddwd by ones widens */
#define W8A8_NARROW_STEP(row, sum0, sum1)                                               \
    {                                                                                   \
        const __m256i b = _mm256_loadu_si256((const __m256i *)((row) + i));             \
        sum0 = _mm256_add_epi32(sum0, _mm256_madd_epi16(_mm256_maddubs_epi16(x0, b), ones)); \
        sum1 = _mm256_add_epi32(sum1, _mm256_madd_epi16(_mm256_maddubs_epi16(x1, b), ones)); \
    }
#endif

#if defined(__AVX2__)
/* The W8A8 GEMM's output rows m0..m1 for weight rows n0..n0+3 (those below n), see below.
 * With offsets (w8a8_gemm_narrow_f32) the input rows hold x + 128 and the weights lie within
 * +-64; offsets[j] = 128 * sum(q[j]) takes the offset back out of each sum. */
static inline void w8a8_block(const int8_t *restrict xq, const float *restrict xscale,
                              const int8_t *restrict q, const int32_t *restrict offsets,
                              const float *restrict scale, const float *restrict bias,
                              float *restrict y, int64_t m0, int64_t m1, int64_t n0, int64_t n,
                              int64_t k) {
    const int64_t width = n - n0 < 4 ? n - n0 : 4;
    const int8_t *w[4];
    for (int j = 0; j < 4; ++j) /* rows past the end repeat the last one (not stored) */
        w[j] = q + (n0 + (j < width ? j : width - 1)) * k;
    for (int64_t m = m0; m < m1; m += 2) {
        const int pair = m + 1 < m1; /* an odd last row computed twice, stored once */
        const int8_t *a0 = xq + m * k, *a1 = xq + (m + pair) * k;
        /* eight named sums, not an array: gcc then keeps them in registers (with an array it
         * copied them between registers each step and spilled one: 1.4-1.6x slower) */
        __m256i c00 = _mm256_setzero_si256(), c01 = c00, c02 = c00, c03 = c00, c10 = c00,
                c11 = c00, c12 = c00, c13 = c00;
        if (offsets) {
            const __m256i ones = _mm256_set1_epi16(1);
            for (int64_t i = 0; i < k; i += 32) {
                if (m == m0 && (i & 63) == 0)
                    for (int j = 0; j < 4; ++j)
                        _mm_prefetch((const char *)(w[j] + i + INT8_PREFETCH_BYTES), _MM_HINT_T0);
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(a0 + i)),
                              x1 = _mm256_loadu_si256((const __m256i *)(a1 + i));
                W8A8_NARROW_STEP(w[0], c00, c10)
                W8A8_NARROW_STEP(w[1], c01, c11)
                W8A8_NARROW_STEP(w[2], c02, c12)
                W8A8_NARROW_STEP(w[3], c03, c13)
            }
        } else {
            for (int64_t i = 0; i < k; i += 16) {
                if (m == m0 && (i & 63) == 0)
                    for (int j = 0; j < 4; ++j)
                        _mm_prefetch((const char *)(w[j] + i + INT8_PREFETCH_BYTES), _MM_HINT_T0);
                const __m256i x0 = w8a8_load16(a0 + i), x1 = w8a8_load16(a1 + i);
                W8A8_STEP(w[0], c00, c10)
                W8A8_STEP(w[1], c01, c11)
                W8A8_STEP(w[2], c02, c12)
                W8A8_STEP(w[3], c03, c13)
            }
        }
        const __m256i acc[2][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}};
        for (int r = 0; r <= pair; ++r) {
            int32_t total[4];
            _mm_storeu_si128((__m128i *)total, sum4_epi32(acc[r]));
            const float rs = xscale[m + r];
            float *ym = y + (m + r) * n + n0;
            for (int64_t j = 0; j < width; ++j) {
                const int32_t dot = offsets ? total[j] - offsets[n0 + j] : total[j];
                const float cs = rs * scale[n0 + j];
                ym[j] = bias ? (float)dot * cs + bias[n0 + j] : (float)dot * cs;
            }
        }
    }
}
#endif

#if defined(__AVX2__)
/* Both W8A8 GEMMs below: input rows in blocks of W8A8_BLOCK_BYTES, weight rows four at a time
 * split over the threads (offsets: NULL, or the narrow form's, see w8a8_block) */
static void w8a8_gemm_run(const int8_t *restrict xq, const float *restrict xscale,
                          const int8_t *restrict q, const int32_t *restrict offsets,
                          const float *restrict scale, const float *restrict bias,
                          float *restrict y, int64_t rows, int64_t n, int64_t k) {
    int64_t block = (W8A8_BLOCK_BYTES / k) & ~(int64_t)1; /* input rows a block, even */
    if (block < 2) block = 2;
#pragma omp parallel
    for (int64_t m0 = 0; m0 < rows; m0 += block) {
        const int64_t m1 = m0 + block < rows ? m0 + block : rows;
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < n; n0 += 4)
            w8a8_block(xq, xscale, q, offsets, scale, bias, y, m0, m1, n0, n, k);
    }
}
#endif

/* W8A8's GEMM where the CPU has no int8 dot-product instructions (no VNNI: torch._int_mm runs a
 * reference loop there, ~2 GOPS): y[m, n] = (xq[m] . q[n]) * (xscale[m] * scale[n]) (+ bias[n]),
 * the dot products exact in int32 (as torch._int_mm's), the scaling as dequantize_s32_f32's.
 * On AVX2 both operands are sign-extended to int16 and multiplied in vpmaddwd (16 products an
 * instruction, pairs summed exactly in int32, two issued a cycle on Zen 3), two input rows
 * against four weight rows at a time, k in steps of 16, the weight in its own [n, k] layout.
 * Each vpmaddwd needs a vpaddd (no VNNI), so the loop is bound by instruction issue, not the
 * multiplier; docs/quantization.md has the variants measured (int16 operands widened once per
 * call, a BLIS-style loop, vpmaddubsw with vpsignb) and why they were not taken. Returns 0, or
 * -1 where it cannot run (no AVX2, or k not a multiple of 16). */
int w8a8_gemm_f32(const int8_t *restrict xq, const float *restrict xscale,
                  const int8_t *restrict q, const float *restrict scale,
                  const float *restrict bias, float *restrict y, int64_t rows, int64_t n,
                  int64_t k) {
#if defined(__AVX2__)
    if (k % 16 != 0) return -1;
    w8a8_gemm_run(xq, xscale, q, NULL, scale, bias, y, rows, n, k);
    return 0;
#else
    (void)xq, (void)xscale, (void)q, (void)scale, (void)bias, (void)y, (void)rows, (void)n,
        (void)k;
    return -1;
#endif
}

/* w8a8_gemm_f32's numbers for weights within +-64 (W8A8 quantized with a narrow weight range),
 * from input rows quantized with an offset: xu[m] = xq[m] + 128 (quantize_rows_u8). Unsigned
 * inputs times signed weights are vpmaddubsw's form: 32 products an instruction, each pair
 * summed in int16, exactly while |w| <= 64 (2 * 255 * 64 < 2^15); a vpmaddwd by ones widens the
 * pairs, so 32 multiply-adds take three instructions against four on the int16 path, and no
 * sign extension. offsets[j] = 128 * sum(q[j]) takes the offset back out: the same int32 sums,
 * the same scaling. Returns 0, or -1 where it cannot run (no AVX2, or k not a multiple of 32);
 * weights outside +-64 give wrong sums: the caller checks them once per weight. */
int w8a8_gemm_narrow_f32(const uint8_t *restrict xu, const float *restrict xscale,
                         const int8_t *restrict q, const int32_t *restrict offsets,
                         const float *restrict scale, const float *restrict bias,
                         float *restrict y, int64_t rows, int64_t n, int64_t k) {
#if defined(__AVX2__)
    if (k % 32 != 0) return -1;
    w8a8_gemm_run((const int8_t *)xu, xscale, q, offsets, scale, bias, y, rows, n, k);
    return 0;
#else
    (void)xu, (void)xscale, (void)q, (void)offsets, (void)scale, (void)bias, (void)y,
        (void)rows, (void)n, (void)k;
    return -1;
#endif
}

#ifdef __AVX512F__

/* int8_group_linear_f32 on AVX-512, for groups of a multiple of 16 inputs: four weight rows at a
 * time, each 16 int8 weights sign-extended and converted to fp32 in registers and multiplied
 * with 16 inputs; a group's products are scaled into the row's accumulator (one scale per row:
 * scaled once at the end). The four weight rows (4 x k bytes) stay in L1 across the input rows.
 * With the prefetch, ~22 GB/s of weights at one row here (2 threads; fp32 GEMV reads 28 GB/s, a
 * plain read 33): 1.9x torch's _weight_int8pack_mm (which also rounds the input to bf16); 1.25x
 * without the prefetch. */
static void int8_group_linear_avx512(const float *restrict x, const int8_t *restrict q,
                                     const float *restrict scale, const float *restrict bias,
                                     float *restrict y, int64_t rows, int64_t n, int64_t k,
                                     int64_t group) {
    const int64_t groups = k / group;
#pragma omp parallel for schedule(static)
    for (int64_t n0 = 0; n0 < n; n0 += 4) {
        const int64_t width = n - n0 < 4 ? n - n0 : 4;
        const int8_t *w[4];
        const float *s[4];
        for (int j = 0; j < 4; ++j) { /* rows past the end repeat the last one (not stored) */
            const int64_t row = n0 + (j < width ? j : width - 1);
            w[j] = q + row * k;
            s[j] = scale + row * groups;
        }
        for (int64_t m = 0; m < rows; ++m) {
            const float *xm = x + m * k;
            __m512 acc[4];
            for (int j = 0; j < 4; ++j) acc[j] = _mm512_setzero_ps();
            for (int64_t g = 0; g < groups; ++g) {
                /* two chains per weight row (32 inputs a step): eight FMAs in flight */
                __m512 part[4], odd[4];
                for (int j = 0; j < 4; ++j) part[j] = odd[j] = _mm512_setzero_ps();
                const int64_t end = (g + 1) * group;
                int64_t i = g * group;
                for (; i + 32 <= end; i += 32) {
                    if (m == 0 && (i & 63) == 0)
                        for (int j = 0; j < 4; ++j)
                            _mm_prefetch((const char *)(w[j] + i + INT8_PREFETCH_BYTES), _MM_HINT_T0);
                    const __m512 x0 = _mm512_loadu_ps(xm + i), x1 = _mm512_loadu_ps(xm + i + 16);
                    for (int j = 0; j < 4; ++j) {
                        const __m128i b0 = _mm_loadu_si128((const __m128i *)(w[j] + i));
                        const __m128i b1 = _mm_loadu_si128((const __m128i *)(w[j] + i + 16));
                        part[j] = _mm512_fmadd_ps(x0, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b0)),
                                                  part[j]);
                        odd[j] = _mm512_fmadd_ps(x1, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b1)),
                                                 odd[j]);
                    }
                }
                if (i < end) { /* the group's last 16 */
                    const __m512 xv = _mm512_loadu_ps(xm + i);
                    for (int j = 0; j < 4; ++j) {
                        const __m128i b = _mm_loadu_si128((const __m128i *)(w[j] + i));
                        part[j] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)),
                                                  part[j]);
                    }
                }
                for (int j = 0; j < 4; ++j) part[j] = _mm512_add_ps(part[j], odd[j]);
                if (groups == 1) {
                    for (int j = 0; j < 4; ++j) acc[j] = part[j];
                } else {
                    for (int j = 0; j < 4; ++j)
                        acc[j] = _mm512_fmadd_ps(part[j], _mm512_set1_ps(s[j][g]), acc[j]);
                }
            }
            float *ym = y + m * n + n0;
            for (int64_t j = 0; j < width; ++j) {
                const float t = _mm512_reduce_add_ps(acc[j]) * (groups == 1 ? s[j][0] : 1.0f);
                ym[j] = t + (bias ? bias[n0 + j] : 0.0f);
            }
        }
    }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* Four AVX2 sums (8 lanes each) reduced at once: lane j of the result is acc[j]'s total. */
static inline __m128 sum4_avx2(const __m256 *acc) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* One input row against four int8 weight rows: each 8 weights sign-extended and converted to
 * fp32 in registers, or, with a ``panel``, read as fp32 from the four rows the caller converted
 * once (4 x k floats). Conversion is exact, so both give the same products and sums. */
static inline __attribute__((always_inline)) __m128 int8_row_avx2(
    const float *restrict xm, const int8_t *const *w, const float *restrict panel,
    const float *const *s, int64_t k, int64_t group, int prefetch) {
    const int64_t groups = k / group;
    __m256 acc[4];
    for (int j = 0; j < 4; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        /* two chains per weight row (16 inputs a step): eight FMAs in flight */
        __m256 part[4], odd[4];
        for (int j = 0; j < 4; ++j) part[j] = odd[j] = _mm256_setzero_ps();
        for (int64_t i = g * group; i < (g + 1) * group; i += 16) {
            if (prefetch && (i & 63) == 0)
                for (int j = 0; j < 4; ++j)
                    _mm_prefetch((const char *)(w[j] + i + INT8_PREFETCH_BYTES), _MM_HINT_T0);
            const __m256 x0 = _mm256_loadu_ps(xm + i), x1 = _mm256_loadu_ps(xm + i + 8);
            for (int j = 0; j < 4; ++j) {
                __m256 f0, f1;
                if (panel) {
                    f0 = _mm256_load_ps(panel + j * k + i);
                    f1 = _mm256_load_ps(panel + j * k + i + 8);
                } else {
                    f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w[j] + i))));
                    f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w[j] + i + 8))));
                }
                part[j] = _mm256_fmadd_ps(x0, f0, part[j]);
                odd[j] = _mm256_fmadd_ps(x1, f1, odd[j]);
            }
        }
        for (int j = 0; j < 4; ++j) part[j] = _mm256_add_ps(part[j], odd[j]);
        if (groups == 1) {
            for (int j = 0; j < 4; ++j) acc[j] = part[j];
        } else {
            for (int j = 0; j < 4; ++j)
                acc[j] = _mm256_fmadd_ps(part[j], _mm256_broadcast_ss(s[j] + g), acc[j]);
        }
    }
    return sum4_avx2(acc);
}

/* int8_group_linear_f32 on AVX2 + FMA (x86-64-v3: AMD Zen, Intel Haswell on), for groups of a
 * multiple of 16 inputs: the AVX-512 loop above on 8-lane vectors, with the same 8 KiB prefetch.
 * On an AMD EPYC (Zen 3, 2 threads) 9-11 ms over the built-in model's fused weights at one row,
 * against 17.8 for the generic loop below (docs/quantization.md). From INT8_PANEL_ROWS input
 * rows on, the four weight rows are converted to fp32 once (a panel in the thread's scratch) and
 * each input row reads them from L1/L2 instead of converting them again: over those weights at
 * 16 / 64 / 128 rows 57 / 184 / 320 ms against 66 / 256 / 481 (fp32 GEMM 92 / 187 / 321); below
 * ~12 rows writing the panel costs more than it saves. Every row computes the same sums. */
#ifndef INT8_PANEL_ROWS
#define INT8_PANEL_ROWS 12
#endif
static void int8_group_linear_avx2(const float *restrict x, const int8_t *restrict q,
                                   const float *restrict scale, const float *restrict bias,
                                   float *restrict y, int64_t rows, int64_t n, int64_t k,
                                   int64_t group) {
    const int64_t groups = k / group;
#pragma omp parallel
    {
        float *panel = rows >= INT8_PANEL_ROWS ? thread_scratch(3, sizeof(float) * 4 * k) : NULL;
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < n; n0 += 4) {
            const int64_t width = n - n0 < 4 ? n - n0 : 4;
            const int8_t *w[4];
            const float *s[4];
            for (int j = 0; j < 4; ++j) { /* rows past the end repeat the last one (not stored) */
                const int64_t row = n0 + (j < width ? j : width - 1);
                w[j] = q + row * k;
                s[j] = scale + row * groups;
            }
            if (panel) /* (NULL where no memory was left: the rows convert in registers) */
                for (int j = 0; j < 4; ++j)
                    for (int64_t i = 0; i < k; i += 8) {
                        if ((i & 63) == 0)
                            _mm_prefetch((const char *)(w[j] + i + INT8_PREFETCH_BYTES), _MM_HINT_T0);
                        _mm256_store_ps(panel + j * k + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                              _mm_loadl_epi64((const __m128i *)(w[j] + i)))));
                    }
            for (int64_t m = 0; m < rows; ++m) {
                const __m128 total = panel ? int8_row_avx2(x + m * k, w, panel, s, k, group, 0)
                                           : int8_row_avx2(x + m * k, w, NULL, s, k, group, m == 0);
                float t[4];
                _mm_storeu_ps(t, total);
                float *ym = y + m * n + n0;
                for (int64_t j = 0; j < width; ++j)
                    ym[j] = t[j] * (groups == 1 ? s[j][0] : 1.0f) + (bias ? bias[n0 + j] : 0.0f);
            }
        }
    }
}
#endif

/* y[m, n] = sum over groups g of scale[n, g] * (x[m, g*G:(g+1)*G] . q[n, g*G:(g+1)*G]) (+ bias[n]):
 * int8 weights with a scale per group of G inputs (GGUF's Q8_0: G = 32; G = k: one scale per
 * output channel). Four weight rows at a time: four independent FMA chains over each input row,
 * converted int8 -> fp32 in registers; on AVX-512 (G a multiple of 16) the loop above. For few
 * input rows (decode); the weight is read once per input row. */
void int8_group_linear_f32(const float *restrict x, const int8_t *restrict q,
                           const float *restrict scale, const float *restrict bias,
                           float *restrict y, int64_t rows, int64_t n, int64_t k, int64_t group) {
#ifdef __AVX512F__
    if (group % 16 == 0) {
        int8_group_linear_avx512(x, q, scale, bias, y, rows, n, k, group);
        return;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if (group % 16 == 0) {
        int8_group_linear_avx2(x, q, scale, bias, y, rows, n, k, group);
        return;
    }
#endif
    const int64_t groups = k / group;
#pragma omp parallel for schedule(static)
    for (int64_t n0 = 0; n0 < n; n0 += 4) {
        const int64_t width = n - n0 < 4 ? n - n0 : 4;
        /* rows past the end repeat the last one (computed, not stored) */
        const int8_t *q0 = q + n0 * k, *q1 = q0 + (width > 1) * k, *q2 = q0 + (width > 2) * 2 * k,
                     *q3 = q0 + (width > 3) * 3 * k;
        const float *s0 = scale + n0 * groups, *s1 = s0 + (width > 1) * groups,
                    *s2 = s0 + (width > 2) * 2 * groups, *s3 = s0 + (width > 3) * 3 * groups;
        for (int64_t m = 0; m < rows; ++m) {
            const float *xm = x + m * k;
            float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
            for (int64_t g = 0; g < groups; ++g) {
                const int64_t o = g * group;
                float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
                for (int64_t i = 0; i < group; ++i) {
                    const float xv = xm[o + i];
                    a0 += xv * (float)q0[o + i];
                    a1 += xv * (float)q1[o + i];
                    a2 += xv * (float)q2[o + i];
                    a3 += xv * (float)q3[o + i];
                }
                t0 += a0 * s0[g];
                t1 += a1 * s1[g];
                t2 += a2 * s2[g];
                t3 += a3 * s3[g];
            }
            float *ym = y + m * n + n0;
            const float t[4] = {t0, t1, t2, t3};
            for (int64_t j = 0; j < width; ++j) ym[j] = t[j] + (bias ? bias[n0 + j] : 0.0f);
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__) && defined(__AVX512DQ__)
#define INT4_NATIVE 1
#else
#define INT4_NATIVE 0
#endif
/* Without AVX-512 BF16: the same product on AVX2 + FMA + F16C (x86-64-v3), in fp32 FMAs */
#if !INT4_NATIVE && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define INT4_AVX2 1
#else
#define INT4_AVX2 0
#endif

/* Which loop int4_group_linear_f32 runs here: 2 the AVX-512 BF16 one, 1 the AVX2 one, 0 none
 * (callers then use torch's). */
int int4_native_available(void) { return INT4_NATIVE ? 2 : INT4_AVX2; }

#define INT4_PREFETCH_BYTES 8192

#if INT4_NATIVE
/* x's 16 values rounded to bf16 (to nearest even, as torch's .to(bfloat16)), and back in fp32 */
static inline __m256i bf16_round(__m512 x, __m512 *back) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(x);
    *back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return h;
}

/* The inputs rounded to bf16, in the order the int4 loop multiplies them: per block of 128
 * inputs (the last may be 64), four vectors; vector v holds the pairs (x[8p + v], x[8p + 4 + v])
 * for p = 0.. (the nibbles of the weight's 16-bit words, below, meet them in that order).
 * ``sums``: each group's sum of its rounded inputs. (Multiplying x as bf16 hi + lo, ~16 of its
 * 24 bits, doubles the dot-products: 11 instead of 24 GB/s here.) */
static void int4_pack_inputs(const float *restrict x, uint16_t *restrict packed,
                             float *restrict sums, int64_t rows, int64_t k, int64_t group) {
    /* word j of vector v is input 8 (j / 2) + 4 (j % 2) + v: of the 32 words a block's inputs
     * 32 i..32 i + 31 round to, words 0-7 come from i = 0 (and 2), 8-15 from i = 1 (and 3) */
    __m512i index[4];
    for (int v = 0; v < 4; ++v) {
        uint16_t at[32];
        for (int j = 0; j < 32; ++j) at[j] = (uint16_t)((8 * (j / 2) + 4 * (j % 2) + v) % 32 + 32 * ((j / 8) % 2));
        index[v] = _mm512_loadu_si512(at);
    }
    const int64_t chunks_per_group = group / 16;
    for (int64_t m = 0; m < rows; ++m) {
        const float *xm = x + m * k;
        float *sm = sums + m * (k / group);
        __m512 group_sum = _mm512_setzero_ps();
        for (int64_t base = 0; base < k; base += 128) {
            const int64_t width = k - base < 128 ? k - base : 128, chunks = width / 16;
            __m512i h[4];
            for (int64_t c = 0; c < chunks; c += 2) { /* 32 inputs: one 32-word vector each */
                __m512 back[2];
                const __m256i h0 = bf16_round(_mm512_loadu_ps(xm + base + 16 * c), &back[0]);
                const __m256i h1 = bf16_round(_mm512_loadu_ps(xm + base + 16 * c + 16), &back[1]);
                h[c / 2] = _mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1);
                for (int64_t t = 0; t < 2; ++t) { /* the chunks' values into their group sums */
                    group_sum = _mm512_add_ps(group_sum, back[t]);
                    const int64_t chunk = (base / 16) + c + t;
                    if ((chunk + 1) % chunks_per_group == 0) {
                        sm[chunk / chunks_per_group] = _mm512_reduce_add_ps(group_sum);
                        group_sum = _mm512_setzero_ps();
                    }
                }
            }
            const int64_t quarter = width / 4;
            for (int v = 0; v < 4; ++v) {
                uint16_t *out = packed + m * k + base + v * quarter;
                if (width == 128)
                    _mm512_storeu_si512(out, _mm512_mask_blend_epi16(
                        0xffff0000u, _mm512_permutex2var_epi16(h[0], index[v], h[1]),
                        _mm512_permutex2var_epi16(h[2], index[v], h[3])));
                else
                    _mm256_storeu_si256((__m256i *)out, _mm512_castsi512_si256(
                        _mm512_permutex2var_epi16(h[0], index[v], h[1])));
            }
        }
    }
}

/* A row of four outputs from their accumulators: the offsets times the input's group sums added
 * in, the four sums reduced at once (pairs of lanes added across the accumulators), + bias. */
static inline void int4_finish(__m512 *acc, const float *const *offset, const float *sm,
                               int64_t groups, const float *bias, float *ym, int64_t width) {
    for (int j = 0; j < 4; ++j)
        for (int64_t g = 0; g < groups; g += 16) {
            const __mmask16 live = groups - g >= 16 ? 0xffff : (1u << (groups - g)) - 1;
            acc[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, offset[j] + g),
                                     _mm512_maskz_loadu_ps(live, sm + g), acc[j]);
        }
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(acc[0], acc[1]),
                                    _mm512_unpackhi_ps(acc[0], acc[1]));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(acc[2], acc[3]),
                                    _mm512_unpackhi_ps(acc[2], acc[3]));
    const __m512 abcd = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
    const __m256 halves = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    /* lanes a, b, c, d: each 128-bit lane held a0+a2, b0+b2, a1+a3, .. before the last unpacks */
    __m128 total = _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps(halves, 1));
    const __mmask8 live = (__mmask8)((1u << width) - 1);
    if (bias) total = _mm_add_ps(total, _mm_maskz_loadu_ps(live, bias));
    _mm_mask_storeu_ps(ym, live, total);
}

/* Four bf16 vectors from 64 bytes of int4 weights: word w (bytes 2w, 2w+1 = weights 4w..4w+3)
 * gives its four nibbles as 128 + q (bf16 0x4300 | q, exact), one vector each. */
static inline void int4_nibbles(__m512i w, __m512i *v) {
    const __m512i low = _mm512_set1_epi16(0x000f), exponent = _mm512_set1_epi16(0x4300);
    v[0] = _mm512_ternarylogic_epi32(w, low, exponent, 0xea); /* (a & b) | c */
    v[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), low, exponent, 0xea);
    v[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), low, exponent, 0xea);
    v[3] = _mm512_or_si512(_mm512_srli_epi16(w, 12), exponent);
}

static inline void int4_nibbles_256(__m256i w, __m256i *v) { /* the same on 32 bytes */
    const __m256i low = _mm256_set1_epi16(0x000f), exponent = _mm256_set1_epi16(0x4300);
    v[0] = _mm256_ternarylogic_epi32(w, low, exponent, 0xea);
    v[1] = _mm256_ternarylogic_epi32(_mm256_srli_epi16(w, 4), low, exponent, 0xea);
    v[2] = _mm256_ternarylogic_epi32(_mm256_srli_epi16(w, 8), low, exponent, 0xea);
    v[3] = _mm256_or_si256(_mm256_srli_epi16(w, 12), exponent);
}

static inline __m512 int4_dot(const __m512i *v, const uint16_t *x) {
    /* two chains of dependent dot-products, not one of four */
    __m512 part[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int i = 0; i < 4; ++i)
        part[i & 1] = _mm512_dpbf16_ps(part[i & 1], (__m512bh)v[i],
                                       (__m512bh)_mm512_loadu_si512(x + 32 * i));
    return _mm512_add_ps(part[0], part[1]);
}

/* y[m, n] = sum over groups g of (scale[n, g] * q + min[n, g]) . x[m, group g] (+ bias[n]):
 * int4 codes (two per byte, as ``quantized_linear`` lays them out), fp16 scales and mins per
 * group. Each word's nibbles become bf16 128 + q and meet the inputs in AVX-512 BF16's
 * dot-product (32 products an instruction, fp32 sums); a group's sum is scaled once, and the
 * 128 offset and the mins come back per group from the inputs' group sums. Four weight rows at a
 * time, as the int8 loop, asking for weight bytes 8 KiB ahead. At one row over the built-in
 * model's fused weights (2 threads) 19-22 GB/s of weights against 14-17 for torch's
 * _weight_int4pack_mm_for_cpu. With several input rows the four weight rows are unpacked once,
 * and two input rows at a time read them, each in the one-row loop's order of operations; there
 * torch's kernel is 15-25% faster, but each row's sums here are those of the row alone,
 * whatever the batch. */
static int int4_rows(const uint16_t *restrict x, const float *restrict sums,
                      const uint8_t *restrict q, const void *restrict scales,
                      const void *restrict mins, int wide, const float *restrict bias,
                      float *restrict y, int64_t rows, int64_t n, int64_t k, int64_t group) {
    const int64_t groups = k / group, shift = group == 32 ? 2 : group == 64 ? 3 : 4;
    /* lane p of a 128-input block sums inputs 8p..8p+7: group 8p / G of the block's first */
    const __m512i lane_group = _mm512_srli_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), shift);
    int failed = 0;
#pragma omp parallel
    {
        /* the four rows' scales and offsets in fp32 (+16: the block loop reads 16 at a time), in
         * each thread's scratch slot 1 (slot 0 holds the calling thread's inputs) */
        float *scale32 = thread_scratch(1, sizeof(float) * 2 * (4 * groups + 16));
        float *offset32 = scale32 + 4 * groups + 16;
        /* with several input rows, the four weight rows' bf16 words and lane scales, made once
         * and read per input row (slot 2): at one row the unpacking is half the loop's work */
        const int64_t blocks = (k + 127) / 128;
        const int expanded = rows > 1;
        uint16_t *words = expanded ? thread_scratch(2, (size_t)4 * blocks * 5 * 64) : NULL;
        float *lane_scales = expanded ? (float *)(words + (size_t)4 * blocks * 4 * 32) : NULL;
        const int ready = scale32 != NULL && (words != NULL || !expanded);
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < n; n0 += 4) {
            if (!ready) continue;
            const int64_t width = n - n0 < 4 ? n - n0 : 4;
            /* the rows' scales lie one after another: converted in one sweep */
            for (int64_t i = 0; i < width * groups; i += 16) {
                const __mmask16 live = width * groups - i >= 16 ? 0xffff
                                                                : (1u << (width * groups - i)) - 1;
                const int64_t at = n0 * groups + i;
                const __m512 sv = wide ? _mm512_maskz_loadu_ps(live, (const float *)scales + at)
                                       : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                                             live, (const uint16_t *)scales + at));
                const __m512 mv = wide ? _mm512_maskz_loadu_ps(live, (const float *)mins + at)
                                       : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                                             live, (const uint16_t *)mins + at));
                _mm512_storeu_ps(scale32 + i, sv);
                /* min - 128 * scale: the weight is scale * (128 + q) + that */
                _mm512_storeu_ps(offset32 + i, _mm512_fnmadd_ps(sv, _mm512_set1_ps(128.0f), mv));
            }
            const uint8_t *w[4];
            const float *s[4], *offset[4];
            for (int j = 0; j < 4; ++j) { /* rows past the end repeat the last one (not stored) */
                const int64_t local = j < width ? j : width - 1;
                w[j] = q + (n0 + local) * (k / 2);
                s[j] = scale32 + local * groups;
                offset[j] = offset32 + local * groups;
            }
            for (int j = 0; expanded && j < 4; ++j)
                for (int64_t b = 0; b < blocks; ++b) {
                    uint16_t *out = words + ((j * blocks + b) * 4) * 32;
                    const int64_t base = 128 * b;
                    if (base + 128 <= k) {
                        __m512i v[4];
                        int4_nibbles(_mm512_loadu_si512(w[j] + base / 2), v);
                        for (int i = 0; i < 4; ++i) _mm512_store_si512(out + 32 * i, v[i]);
                    } else {
                        __m256i v[4];
                        int4_nibbles_256(_mm256_loadu_si256((const __m256i *)(w[j] + base / 2)), v);
                        for (int i = 0; i < 4; ++i) _mm256_store_si256((__m256i *)(out + 32 * i), v[i]);
                    }
                    _mm512_store_ps(lane_scales + (j * blocks + b) * 16, _mm512_permutexvar_ps(
                        lane_group, _mm512_loadu_ps(s[j] + (base >> (shift + 3)))));
                }
            /* several rows: two input rows per read of the words (an odd last one computed
             * twice, stored once) */
            for (int64_t m = 0; expanded && m < rows; m += 2) {
                const int pair = m + 1 < rows;
                const uint16_t *xm[2] = {x + m * k, x + (m + pair) * k};
                __m512 acc[2][4];
                for (int j = 0; j < 4; ++j) acc[0][j] = acc[1][j] = _mm512_setzero_ps();
                int64_t base = 0;
                /* each row's arithmetic in the order of the one-row loop below: bit for bit its
                 * result, whatever the batch */
                for (int64_t b = 0; base + 128 <= k; base += 128, ++b) {
                    __m512i xv[2][4];
                    for (int r = 0; r < 2; ++r)
                        for (int i = 0; i < 4; ++i) xv[r][i] = _mm512_loadu_si512(xm[r] + base + 32 * i);
                    for (int j = 0; j < 4; ++j) {
                        const uint16_t *from = words + ((j * blocks + b) * 4) * 32;
                        __m512 part[2][2];
                        for (int r = 0; r < 2; ++r) part[r][0] = part[r][1] = _mm512_setzero_ps();
                        for (int i = 0; i < 4; ++i) {
                            const __m512bh v = (__m512bh)_mm512_load_si512(from + 32 * i);
                            for (int r = 0; r < 2; ++r)
                                part[r][i & 1] = _mm512_dpbf16_ps(part[r][i & 1], v, (__m512bh)xv[r][i]);
                        }
                        const __m512 sv = _mm512_load_ps(lane_scales + (j * blocks + b) * 16);
                        for (int r = 0; r < 2; ++r)
                            acc[r][j] = _mm512_fmadd_ps(_mm512_add_ps(part[r][0], part[r][1]), sv, acc[r][j]);
                    }
                }
                if (base < k) {
                    const int64_t b = blocks - 1;
                    for (int j = 0; j < 4; ++j) {
                        const uint16_t *from = words + ((j * blocks + b) * 4) * 32;
                        const __m256 sv = _mm256_load_ps(lane_scales + (j * blocks + b) * 16);
                        for (int r = 0; r < 2; ++r) {
                            __m256 part = _mm256_setzero_ps();
                            for (int i = 0; i < 4; ++i)
                                part = _mm256_dpbf16_ps(
                                    part, (__m256bh)_mm256_load_si256((const __m256i *)(from + 32 * i)),
                                    (__m256bh)_mm256_loadu_si256((const __m256i *)(xm[r] + base + 16 * i)));
                            acc[r][j] = _mm512_add_ps(acc[r][j], _mm512_zextps256_ps512(_mm256_mul_ps(part, sv)));
                        }
                    }
                }
                for (int r = 0; r <= pair; ++r)
                    int4_finish(acc[r], offset, sums + (m + r) * groups, groups,
                                bias ? bias + n0 : NULL, y + (m + r) * n + n0, width);
            }
            if (!expanded) { /* one input row: the words unpacked as they are read */
                const uint16_t *xm = x;
                __m512 acc[4];
                for (int j = 0; j < 4; ++j) acc[j] = _mm512_setzero_ps();
                int64_t base = 0;
                for (; base + 128 <= k; base += 128) {
                    for (int j = 0; j < 4; ++j)
                        _mm_prefetch((const char *)(w[j] + base / 2 + INT4_PREFETCH_BYTES),
                                     _MM_HINT_T0);
                    for (int j = 0; j < 4; ++j) {
                        __m512i v[4];
                        int4_nibbles(_mm512_loadu_si512(w[j] + base / 2), v);
                        const __m512 sv = _mm512_permutexvar_ps(
                            lane_group, _mm512_loadu_ps(s[j] + (base >> (shift + 3))));
                        acc[j] = _mm512_fmadd_ps(int4_dot(v, xm + base), sv, acc[j]);
                    }
                }
                if (base < k) { /* a last block of 64 inputs: the same on 256-bit vectors */
                    for (int j = 0; j < 4; ++j) {
                        __m256i v[4];
                        int4_nibbles_256(_mm256_loadu_si256((const __m256i *)(w[j] + base / 2)), v);
                        const __m256 sv = _mm256_permutexvar_ps(
                            _mm512_castsi512_si256(lane_group),
                            _mm256_loadu_ps(s[j] + (base >> (shift + 3))));
                        __m256 part = _mm256_setzero_ps();
                        for (int i = 0; i < 4; ++i)
                            part = _mm256_dpbf16_ps(part, (__m256bh)v[i], (__m256bh)_mm256_loadu_si256(
                                (const __m256i *)(xm + base + 16 * i)));
                        acc[j] = _mm512_add_ps(acc[j], _mm512_zextps256_ps512(_mm256_mul_ps(part, sv)));
                    }
                }
                int4_finish(acc, offset, sums, groups, bias ? bias + n0 : NULL, y + n0, width);
            }
        }
    }
    return failed ? -1 : 0;
}
#endif

#if INT4_AVX2
#ifndef INT4_PANEL_ROWS
#define INT4_PANEL_ROWS 6 /* fewer rows: as fast converting in registers (AMD EPYC, Zen 3) */
#endif

/* x rounded to bf16 (to nearest even, as torch's .to(bfloat16); NaN kept) and back in fp32: the
 * AVX-512 loop's inputs, so both loops compute the same product */
static inline float bf16_rounded(float x) {
    union { float f; uint32_t u; } v = {x};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return x;
    v.u = (v.u + 0x7fffu + ((v.u >> 16) & 1u)) & 0xffff0000u;
    return v.f;
}

/* The inputs rounded to bf16 (kept in fp32), each 16 in the order the AVX2 loop meets the
 * weight nibbles (8 bytes: the low nibbles are inputs 0, 2, .., 14, the high ones 1, 3, .., 15),
 * and each group's sum of its rounded inputs in ``sums``. */
static void int4_pack_inputs_avx2(const float *restrict x, float *restrict packed,
                                  float *restrict sums, int64_t rows, int64_t k, int64_t group) {
    for (int64_t m = 0; m < rows; ++m) {
        const float *xm = x + m * k;
        float *pm = packed + m * k;
        for (int64_t g = 0; g < k / group; ++g) {
            float total = 0.0f;
            for (int64_t i = g * group; i < (g + 1) * group; i += 16)
                for (int t = 0; t < 16; ++t) {
                    const float r = bf16_rounded(xm[i + t]);
                    pm[i + (t & 1) * 8 + t / 2] = r;
                    total += r;
                }
            sums[m * (k / group) + g] = total;
        }
    }
}

/* One input row against four weight rows (int4_rows_avx2), the group size a constant where
 * it is inlined: each group's 16-input steps unrolled, no loop to leave per group. The nibbles
 * are converted in registers or, with a ``panel``, read as fp32 from the four rows the caller
 * converted once (each 16 inputs: the 8 low nibbles, then the 8 high): the same products. */
static inline __attribute__((always_inline)) __m128 int4_row_avx2(
    const float *restrict xm, const float *restrict sm, const uint8_t *const *w,
    const float *restrict panel, const float *const *s, const float *const *mn, int64_t k,
    const int64_t group, int prefetch) {
    const __m256i low = _mm256_set1_epi32(15);
    const int64_t groups = k / group;
    __m256 acc[4];
    for (int j = 0; j < 4; ++j) acc[j] = _mm256_setzero_ps();
    /* the mins times the inputs' group sums, 8 groups a step */
    for (int64_t g = 0; g < groups; g += 8) {
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(groups - g)),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 sv = _mm256_maskload_ps(sm + g, live);
        for (int j = 0; j < 4; ++j)
            acc[j] = _mm256_fmadd_ps(_mm256_maskload_ps(mn[j] + g, live), sv, acc[j]);
    }
    for (int64_t base = 0, g = 0; base < k; base += group, ++g) {
        __m256 even[4], odd[4]; /* two chains per weight row: eight FMAs in flight */
        for (int64_t i = base; i < base + group; i += 16) {
            if (prefetch && (i & 127) == 0)
                for (int j = 0; j < 4; ++j)
                    _mm_prefetch((const char *)(w[j] + i / 2 + INT4_PREFETCH_BYTES), _MM_HINT_T0);
            const __m256 x0 = _mm256_load_ps(xm + i), x1 = _mm256_load_ps(xm + i + 8);
            for (int j = 0; j < 4; ++j) {
                __m256 lo, hi;
                if (panel) {
                    lo = _mm256_load_ps(panel + j * k + i);
                    hi = _mm256_load_ps(panel + j * k + i + 8);
                } else {
                    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w[j] + i / 2)));
                    lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, low));
                    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
                }
                even[j] = i == base ? _mm256_mul_ps(x0, lo) : _mm256_fmadd_ps(x0, lo, even[j]);
                odd[j] = i == base ? _mm256_mul_ps(x1, hi) : _mm256_fmadd_ps(x1, hi, odd[j]);
            }
        }
        for (int j = 0; j < 4; ++j)
            acc[j] = _mm256_fmadd_ps(_mm256_add_ps(even[j], odd[j]), _mm256_broadcast_ss(s[j] + g),
                                     acc[j]);
    }
    return sum4_avx2(acc);
}

/* int4_rows on AVX2 + FMA + F16C (x86-64-v3, where there is no AVX-512 BF16): each 8 bytes of
 * weights widened to 8 lanes, their low and high nibbles converted to fp32 in registers and
 * multiplied with the packed inputs; a group's sum is scaled once, and the mins come back from
 * the inputs' group sums. Four weight rows at a time with the int8 loop's prefetch. Every input
 * row runs the same instructions, so its result does not depend on its batch. */
static int int4_rows_avx2(const float *restrict x, const float *restrict sums,
                          const uint8_t *restrict q, const void *restrict scales,
                          const void *restrict mins, int wide, const float *restrict bias,
                          float *restrict y, int64_t rows, int64_t n, int64_t k, int64_t group) {
    const int64_t groups = k / group;
    int failed = 0;
#pragma omp parallel
    {
        /* fp16 scales and mins of the four rows in fp32, in each thread's scratch slot 1 (slot
         * 0 holds the calling thread's inputs); fp32 ones are read where they lie */
        float *scale32 = wide ? NULL : thread_scratch(1, sizeof(float) * 8 * groups + 64);
        float *min32 = wide ? NULL : scale32 + 4 * groups;
        const int ready = wide || scale32 != NULL;
        /* the four weight rows' nibbles in fp32 (slot 3), from INT4_PANEL_ROWS input rows on,
         * read by each input row instead of converting them again (the built-in model's fused
         * weights at 8 / 64 / 128 rows: 36 / 215 / 353 ms against 48 / 367 / 540; fp32 GEMM 90 /
         * 187 / 321); where no memory is left they convert in registers, the same sums */
        float *panel = rows >= INT4_PANEL_ROWS ? thread_scratch(3, sizeof(float) * 4 * k) : NULL;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < n; n0 += 4) {
            if (!ready) continue;
            const int64_t width = n - n0 < 4 ? n - n0 : 4, count = width * groups;
            const float *block_scales = scale32, *block_mins = min32;
            if (wide) {
                block_scales = (const float *)scales + n0 * groups;
                block_mins = (const float *)mins + n0 * groups;
            } else { /* the rows' scales and mins lie one after another: one sweep */
                const uint16_t *from_s = (const uint16_t *)scales + n0 * groups;
                const uint16_t *from_m = (const uint16_t *)mins + n0 * groups;
                int64_t i = 0;
                for (; i + 8 <= count; i += 8) {
                    _mm256_storeu_ps(scale32 + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(from_s + i))));
                    _mm256_storeu_ps(min32 + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(from_m + i))));
                }
                for (; i < count; ++i) scale32[i] = _cvtsh_ss(from_s[i]), min32[i] = _cvtsh_ss(from_m[i]);
            }
            const uint8_t *w[4];
            const float *s[4], *mn[4];
            for (int j = 0; j < 4; ++j) { /* rows past the end repeat the last one (not stored) */
                const int64_t local = j < width ? j : width - 1;
                w[j] = q + (n0 + local) * (k / 2);
                s[j] = block_scales + local * groups;
                mn[j] = block_mins + local * groups;
            }
            if (panel) {
                const __m256i low = _mm256_set1_epi32(15);
                for (int j = 0; j < 4; ++j)
                    for (int64_t i = 0; i < k; i += 16) {
                        if ((i & 127) == 0)
                            _mm_prefetch((const char *)(w[j] + i / 2 + INT4_PREFETCH_BYTES), _MM_HINT_T0);
                        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w[j] + i / 2)));
                        _mm256_store_ps(panel + j * k + i, _mm256_cvtepi32_ps(_mm256_and_si256(b, low)));
                        _mm256_store_ps(panel + j * k + i + 8, _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)));
                    }
            }
            for (int64_t m = 0; m < rows; ++m) {
                const float *xm = x + m * k, *sm = sums + m * groups;
                const __m128 total =
                    panel ? (group == 32 ? int4_row_avx2(xm, sm, w, panel, s, mn, k, 32, 0)
                             : group == 64 ? int4_row_avx2(xm, sm, w, panel, s, mn, k, 64, 0)
                                           : int4_row_avx2(xm, sm, w, panel, s, mn, k, 128, 0))
                          : (group == 32 ? int4_row_avx2(xm, sm, w, NULL, s, mn, k, 32, m == 0)
                             : group == 64 ? int4_row_avx2(xm, sm, w, NULL, s, mn, k, 64, m == 0)
                                           : int4_row_avx2(xm, sm, w, NULL, s, mn, k, 128, m == 0));
                float t[4];
                _mm_storeu_ps(t, total);
                float *ym = y + m * n + n0;
                for (int64_t j = 0; j < width; ++j) ym[j] = t[j] + (bias ? bias[n0 + j] : 0.0f);
            }
        }
    }
    return failed ? -1 : 0;
}
#endif

/* y = x @ dequantize_int4(q, scales, mins)^T (+ bias) for fp32 x [rows, k], x rounded to bf16
 * (as torch's int4 kernel takes it) and the sums in fp32: see int4_rows. k a multiple of 64,
 * group 32, 64 or 128 dividing k; scales and mins fp16, or fp32 with ``wide`` (GGUF's Q4_K).
 * Returns 0, or -1 where it cannot run: neither AVX-512 BF16 nor AVX2 here, or a shape it does not take (y
 * then untouched), or no memory for its scratch (y then incomplete). */
int int4_group_linear_f32(const float *restrict x, const uint8_t *restrict q,
                          const void *restrict scales, const void *restrict mins, int64_t wide,
                          const float *restrict bias, float *restrict y, int64_t rows, int64_t n,
                          int64_t k, int64_t group) {
#if INT4_NATIVE
    if (k % 64 != 0 || (group != 32 && group != 64 && group != 128) || k % group != 0)
        return -1;
    const size_t packed_bytes = ((sizeof(uint16_t) * rows * k + 63) & ~(size_t)63);
    uint16_t *packed = thread_scratch(0, packed_bytes + sizeof(float) * rows * (k / group));
    if (!packed) return -1;
    float *sums = (float *)((char *)packed + packed_bytes);
    int4_pack_inputs(x, packed, sums, rows, k, group);
    return int4_rows(packed, sums, q, scales, mins, wide != 0, bias, y, rows, n, k, group);
#elif INT4_AVX2
    if (k % 64 != 0 || (group != 32 && group != 64 && group != 128) || k % group != 0)
        return -1;
    float *packed = thread_scratch(0, sizeof(float) * rows * (k + k / group));
    if (!packed) return -1;
    float *sums = packed + rows * k;
    int4_pack_inputs_avx2(x, packed, sums, rows, k, group);
    return int4_rows_avx2(packed, sums, q, scales, mins, wide != 0, bias, y, rows, n, k, group);
#else
    (void)x, (void)q, (void)scales, (void)mins, (void)wide, (void)bias, (void)y, (void)rows,
        (void)n, (void)k, (void)group;
    return -1;
#endif
}

/* W8A8's epilogue after oneDNN's int8 GEMM (which applies the weight scales): y[r, n] *=
 * row_scale[r] (the activation row's scale), then + bias[n], in place. */
void scale_rows_f32(float *restrict y, const float *restrict row_scale,
                    const float *restrict bias, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows * n >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        float *yr = y + r * n;
        const float rs = row_scale[r];
        if (bias) {
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) yr[i] = yr[i] * rs + bias[i];
        } else {
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) yr[i] *= rs;
        }
    }
}

/* RMSNorm of each row of x [rows, h]: out = (x * rsqrt(mean(x^2) + eps)) * w, HF's order of
 * operations in fp32 (the sum of squares in another order than torch's: within ~1e-7). torch's
 * CPU rms_norm runs pow, mean, add, rsqrt, mul and mul as separate passes; this is one. */
void rms_norm_f32(const float *restrict x, const float *restrict w, float *restrict out,
                  int64_t rows, int64_t h, float eps) {
#pragma omp parallel for schedule(static) if (rows * h >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * h;
        float *o = out + r * h;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < h; ++i) ss += xr[i] * xr[i];
        const float rstd = 1.0f / sqrtf(ss / (float)h + eps);
#pragma omp simd
        for (int64_t i = 0; i < h; ++i) o[i] = (xr[i] * rstd) * w[i];
    }
}

/* RoPE in HF's convention, out = x * cos + rotate_half(x) * sin, for x and out [B, H, T, D]
 * with any strides (unit stride along D; strides in floats: x's xb, xh, xt, out's ob, oh, ot)
 * and cos, sin [B, T, D] contiguous, D even. Each product is rounded, then one subtract (first
 * half) or add (second half), as mlx_kernels.rope's torch path computes it: no FMA contraction
 * here, so the two give the same bits. One call replaces that path's five small ops, whose
 * dispatch cost more than their arithmetic in a decode step. */
__attribute__((optimize("fp-contract=off")))
void rope_f32(const float *x, const float *cos, const float *sin, float *out, int64_t batch,
              int64_t heads, int64_t tokens, int64_t dim, int64_t xb, int64_t xh, int64_t xt,
              int64_t ob, int64_t oh, int64_t ot) {
    const int64_t half = dim / 2;
#pragma omp parallel for collapse(2) schedule(static) if (batch * heads * tokens * dim >= 65536)
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t t = 0; t < tokens; ++t) {
            const float *c = cos + (b * tokens + t) * dim, *s = sin + (b * tokens + t) * dim;
            for (int64_t h = 0; h < heads; ++h) {
                const float *xr = x + b * xb + h * xh + t * xt;
                float *o = out + b * ob + h * oh + t * ot;
#pragma omp simd
                for (int64_t i = 0; i < half; ++i) {
                    const float lo = xr[i] * c[i], rot = xr[i + half] * s[i];
                    o[i] = lo - rot;
                }
#pragma omp simd
                for (int64_t i = 0; i < half; ++i) {
                    const float hi = xr[i + half] * c[i + half], rot = xr[i] * s[i + half];
                    o[i + half] = hi + rot;
                }
            }
        }
}

/* New keys and values into an fp32 paged cache: row n of key and value [N, kv_heads, head_dim]
 * (strides in floats: key's kn, kh, value's vn, vh; unit stride along head_dim) into slot
 * slots[n] (block * block_size + offset) of key_cache and value_cache [slots_total, kv_heads,
 * head_dim] (contiguous); slot -1 is skipped. Every slot is checked before anything is written:
 * returns 0, or -1 (nothing written) when one is outside [-1, slots_total). One call replaces
 * two index_copy_ (and their index conversion) per layer. */
int write_kv_cache_f32(const float *key, const float *value, float *key_cache,
                       float *value_cache, const int64_t *slots, int64_t n, int64_t kv_heads,
                       int64_t head_dim, int64_t slots_total, int64_t kn, int64_t kh,
                       int64_t vn, int64_t vh) {
    for (int64_t i = 0; i < n; ++i)
        if (slots[i] < -1 || slots[i] >= slots_total) return -1;
    const int64_t row = kv_heads * head_dim;
#pragma omp parallel for schedule(static) if (n * row >= 65536)
    for (int64_t i = 0; i < n; ++i) {
        if (slots[i] < 0) continue;
        for (int64_t h = 0; h < kv_heads; ++h) {
            memcpy(key_cache + slots[i] * row + h * head_dim, key + i * kn + h * kh,
                   sizeof(float) * (size_t)head_dim);
            memcpy(value_cache + slots[i] * row + h * head_dim, value + i * vn + h * vh,
                   sizeof(float) * (size_t)head_dim);
        }
    }
    return 0;
}
