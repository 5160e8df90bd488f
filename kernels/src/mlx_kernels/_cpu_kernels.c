/* CPU kernels of mlx_kernels, compiled at first use by _cpu_native.py (cc -O3 -march=native
 * -fopenmp) and called through ctypes. Plain C with no torch headers, so the build takes well
 * under a second. OpenMP here is the libgomp torch has already loaded (same soname), so these
 * loops share torch's threads instead of starting a second pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

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

/* The address of token `t`'s row (all kv heads) in a paged cache. */
static inline const float *token_row(const float *cache, const int32_t *table, int64_t t,
                                     int64_t block_size, int64_t row_size) {
    return cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * row_size;
}

/* Decode attention: one query token per sequence over its keys/values in paged blocks.
 *
 * query  [batch, heads, head_dim] (contiguous; heads = kv_heads * group, GQA)
 * keys, values [num_blocks, block_size, kv_heads, head_dim] (contiguous)
 * tables [batch, table_width] int32; lens [batch] int32 (>= 1)
 * out    [batch, heads, head_dim]
 *
 * One task per sequence: each cached token's keys (all kv heads: one contiguous row) are read
 * once, in place in their block, for all query heads; scores go to a scratch row per head,
 * softmax in fp32, then one pass over the values. No gathered copy, no padding to the longest
 * sequence. `window` > 0 keeps only the last `window` positions. Returns 0, -1 when out of
 * memory, -2 when a table entry in use is outside [0, num_blocks) (nothing is read there).
 */
int paged_attention_decode_f32(const float *query, const float *keys, const float *values,
                               const int32_t *tables, const int32_t *lens, float *out,
                               int64_t batch, int64_t kv_heads, int64_t group, int64_t head_dim,
                               int64_t block_size, int64_t table_width, int64_t num_blocks,
                               int64_t window, float scale) {
    const int64_t heads = kv_heads * group, row_size = kv_heads * head_dim;
    int64_t longest = 1;
    for (int64_t b = 0; b < batch; ++b) longest = lens[b] > longest ? lens[b] : longest;
    int failed = 0;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (size_t)(heads * longest));
        if (!scores) {
#pragma omp atomic write
            failed = -1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < batch; ++b) {
            if (!scores) continue;
            const int64_t len = lens[b];
            const int64_t start = (window > 0 && len > window) ? len - window : 0;
            const int64_t n = len - start;
            const int32_t *table = tables + b * table_width;
            int bad = 0;
            for (int64_t i = start / block_size; i <= (len - 1) / block_size; ++i)
                bad |= table[i] < 0 || table[i] >= num_blocks;
            if (bad) {
#pragma omp atomic write
                failed = -2;
                continue;
            }
            const float *q = query + b * heads * head_dim;
            float *o = out + b * heads * head_dim;
            int64_t t = start;
            for (; t + 4 <= len; t += 4) {
                const float *k[4];
                for (int j = 0; j < 4; ++j) k[j] = token_row(keys, table, t + j, block_size, row_size);
                for (int64_t hq = 0; hq < heads; ++hq) {
                    const int64_t off = (hq / group) * head_dim;
                    float *s = scores + hq * n + (t - start);
                    dot4(q + hq * head_dim, k[0] + off, k[1] + off, k[2] + off, k[3] + off,
                         head_dim, s);
                    for (int j = 0; j < 4; ++j) s[j] *= scale;
                }
            }
            for (; t < len; ++t) {
                const float *k = token_row(keys, table, t, block_size, row_size);
                for (int64_t hq = 0; hq < heads; ++hq)
                    scores[hq * n + (t - start)] =
                        dot(q + hq * head_dim, k + (hq / group) * head_dim, head_dim) * scale;
            }
            for (int64_t hq = 0; hq < heads; ++hq) {
                float *s = scores + hq * n, best = -INFINITY, sum = 0.0f;
                for (int64_t i = 0; i < n; ++i) best = s[i] > best ? s[i] : best;
                for (int64_t i = 0; i < n; ++i) {
                    s[i] = expf(s[i] - best);
                    sum += s[i];
                }
                const float inv = 1.0f / sum;
                for (int64_t i = 0; i < n; ++i) s[i] *= inv;
                for (int64_t d = 0; d < head_dim; ++d) o[hq * head_dim + d] = 0.0f;
            }
            for (t = start; t + 4 <= len; t += 4) {
                const float *v[4];
                for (int j = 0; j < 4; ++j) v[j] = token_row(values, table, t + j, block_size, row_size);
                for (int64_t hq = 0; hq < heads; ++hq) {
                    const float *p = scores + hq * n + (t - start);
                    const int64_t off = (hq / group) * head_dim;
                    const float *restrict v0 = v[0] + off, *restrict v1 = v[1] + off,
                                          *restrict v2 = v[2] + off, *restrict v3 = v[3] + off;
                    float *restrict oh = o + hq * head_dim;
#pragma omp simd
                    for (int64_t d = 0; d < head_dim; ++d)
                        oh[d] += p[0] * v0[d] + p[1] * v1[d] + p[2] * v2[d] + p[3] * v3[d];
                }
            }
            for (; t < len; ++t) {
                const float *v = token_row(values, table, t, block_size, row_size);
                for (int64_t hq = 0; hq < heads; ++hq) {
                    const float p = scores[hq * n + (t - start)];
                    const float *restrict vh = v + (hq / group) * head_dim;
                    float *restrict oh = o + hq * head_dim;
#pragma omp simd
                    for (int64_t d = 0; d < head_dim; ++d) oh[d] += p * vh[d];
                }
            }
        }
        free(scores);
    }
    return failed;
}
