/* Decode attention over a KV cache held in blocks (paged, or one block per user), in the
   float32 maths of runtime/emulator/decode_attention.py's torch path: for each user,
   KV head and query head of its group, scores q.k in float32 times the scale over the
   positions the user sees, a float32 softmax, and the probabilities' sum of V rows.
   Dot products and the V sum are accumulated in float64 and rounded once to float32,
   so the result is independent of thread count and vector width. Built by native.py. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* A cache row as float32 (bfloat16 widens exactly). */
static inline void load_row(const void *base, int is_bf16, int64_t index, float *dst, int64_t n) {
    if (!is_bf16) {
        memcpy(dst, (const float *)base + index, sizeof(float) * n);
        return;
    }
    const uint16_t *src = (const uint16_t *)base + index;
    uint32_t *bits = (uint32_t *)dst;
    for (int64_t d = 0; d < n; d++) bits[d] = (uint32_t)src[d] << 16;
}

/* sum a[d] * b[d] in float64 (each product exact), in a fixed order whatever the ISA:
   eight running sums (lane d % 8), folded as (s0+s4 + s2+s6) + (s1+s5 + s3+s7), then the
   tail in turn. */
static inline double dot(const float *a, const float *b, int64_t n) {
    int64_t d = 0;
    double total;
#if defined(__AVX2__) && defined(__FMA__)
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    for (; d + 8 <= n; d += 8) {
        __m256 av = _mm256_loadu_ps(a + d), bv = _mm256_loadu_ps(b + d);
        s0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(av)),
                             _mm256_cvtps_pd(_mm256_castps256_ps128(bv)), s0);
        s1 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(av, 1)),
                             _mm256_cvtps_pd(_mm256_extractf128_ps(bv, 1)), s1);
    }
    __m256d s = _mm256_add_pd(s0, s1);
    __m128d half = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    total = _mm_cvtsd_f64(_mm_add_sd(half, _mm_unpackhi_pd(half, half)));
#else
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (; d + 8 <= n; d += 8)
        for (int j = 0; j < 8; j++) lane[j] += (double)a[d + j] * (double)b[d + j];
    total = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
#endif
    for (; d < n; d++) total += (double)a[d] * (double)b[d];
    return total;
}

/* out[d] = sum over i of w[i] * rows[i][d] in float64, i in order, rounded to float32. */
static void weighted_rows(const float *w, const float *rows, int64_t count, int64_t n, float *out) {
    int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; d + 16 <= n; d += 16) {
        __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < count; i++) {
            __m256d wi = _mm256_set1_pd((double)w[i]);
            const float *r = rows + i * n + d;
            a0 = _mm256_fmadd_pd(wi, _mm256_cvtps_pd(_mm_loadu_ps(r)), a0);
            a1 = _mm256_fmadd_pd(wi, _mm256_cvtps_pd(_mm_loadu_ps(r + 4)), a1);
            a2 = _mm256_fmadd_pd(wi, _mm256_cvtps_pd(_mm_loadu_ps(r + 8)), a2);
            a3 = _mm256_fmadd_pd(wi, _mm256_cvtps_pd(_mm_loadu_ps(r + 12)), a3);
        }
        _mm_storeu_ps(out + d, _mm256_cvtpd_ps(a0));
        _mm_storeu_ps(out + d + 4, _mm256_cvtpd_ps(a1));
        _mm_storeu_ps(out + d + 8, _mm256_cvtpd_ps(a2));
        _mm_storeu_ps(out + d + 12, _mm256_cvtpd_ps(a3));
    }
#endif
    for (; d < n; d++) {
        double a = 0.0;
        for (int64_t i = 0; i < count; i++) a += (double)w[i] * (double)rows[i * n + d];
        out[d] = (float)a;
    }
}

/* q [users, kv_heads * group, head_dim] float32; k, v storage [blocks, kv_heads,
   block_size, head_dim] (bfloat16 bit patterns or float32); slots [users, n_blocks]: the
   storage block of each user's logical block; positions [users]: the last position each
   user sees (negative: an inactive user, which sees position 0); window > 0: only the
   `window` latest positions. out [users, kv_heads * group, head_dim] float32. */
void decode_attention(int64_t users, int64_t kv_heads, int64_t group, int64_t head_dim, const float *q,
                      const void *k, const void *v, int is_bf16, const int64_t *slots, int64_t n_blocks,
                      int64_t block_size, const int64_t *positions, int64_t window, float scale, float *out,
                      int threads) {
    int64_t heads = kv_heads * group;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (users * kv_heads >= 16)
    for (int64_t b = 0; b < users; b++)
        for (int64_t h = 0; h < kv_heads; h++) {
            int64_t pos = positions[b] < 0 ? 0 : positions[b];
            int64_t first = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
            int64_t count = pos - first + 1;
            float *p = (float *)malloc(sizeof(float) * count * group);  /* [group, count] */
            float *rows = (float *)malloc(sizeof(float) * count * head_dim * 2);  /* K rows, V rows */
            float *k_rows = rows, *v_rows = rows + count * head_dim;
            for (int64_t i = 0; i < count; i++) {
                int64_t l = first + i;
                int64_t at = ((slots[b * n_blocks + l / block_size] * kv_heads + h) * block_size
                              + l % block_size) * head_dim;
                load_row(k, is_bf16, at, k_rows + i * head_dim, head_dim);
                load_row(v, is_bf16, at, v_rows + i * head_dim, head_dim);
            }
            const float *qh = q + (b * heads + h * group) * head_dim;  /* the group's queries */
            for (int64_t g = 0; g < group; g++) {
                float *pg = p + g * count, best = -INFINITY;
                for (int64_t i = 0; i < count; i++) {  /* scores */
                    pg[i] = (float)dot(qh + g * head_dim, k_rows + i * head_dim, head_dim) * scale;
                    best = pg[i] > best ? pg[i] : best;
                }
                double total = 0.0;  /* softmax */
                for (int64_t i = 0; i < count; i++) {
                    pg[i] = expf(pg[i] - best);
                    total += pg[i];
                }
                float sum = (float)total;
                for (int64_t i = 0; i < count; i++) pg[i] = pg[i] / sum;
                weighted_rows(pg, v_rows, count, head_dim, out + (b * heads + h * group + g) * head_dim);
            }
            free(p);
            free(rows);
        }
}
