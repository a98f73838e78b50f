/* The emulator's matmul for rows of activations against stored weights: out[b] = x[b] @ w[b]^T
   in float64, x float64, w bfloat16 (uint16 bit patterns) or float32, read as stored.

   Every operand value the emulator multiplies has at most 11 significant bits, so each
   product is exact in float64 and so is a dot product's sum (runtime/emulator/fidelity.py):
   any summation order gives the same bits, which is what lets this kernel read weights at
   2 or 4 bytes each instead of torch's float64 GEMM reading 8, and still agree with it bit
   for bit. Built by runtime/emulator/exact_gemm.py at first use; AVX2+FMA where the CPU has
   them, plain C otherwise. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

static inline double bf16_value(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &wide, 4);
    return (double)f;
}

#if defined(__AVX2__) && defined(__FMA__)
static inline __m256d load4_bf16(const uint16_t *p) {
    __m128i h = _mm_loadl_epi64((const __m128i *)p);
    __m128i wide = _mm_slli_epi32(_mm_cvtepu16_epi32(h), 16);
    return _mm256_cvtps_pd(_mm_castsi128_ps(wide));
}
static inline __m256d load4_f32(const float *p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
static inline double hsum(__m256d v) {
    __m128d lo = _mm256_castpd256_pd128(v), hi = _mm256_extractf128_pd(v, 1);
    lo = _mm_add_pd(lo, hi);
    return _mm_cvtsd_f64(_mm_add_sd(lo, _mm_unpackhi_pd(lo, lo)));
}
#endif

#define W_VALUE(w, is_bf16, i) ((is_bf16) ? bf16_value(((const uint16_t *)(w))[i]) : (double)((const float *)(w))[i])


#if defined(__AVX2__) && defined(__FMA__)
/* 8 weights as two float64 vectors. */
static inline void load8(const void *w, int is_bf16, int64_t i, __m256d *lo, __m256d *hi) {
    __m256 f;
    if (is_bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
        f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
        f = _mm256_loadu_ps((const float *)w + i);
    }
    *lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
    *hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
}

/* One row of x against rows n0..n0+3 of w: the decode shape, bound by reading w. */
static void row_by_4(const double *x, const void *w, int is_bf16, int64_t k_len, double *out, int64_t n0) {
    __m256d a[4][2];
    for (int j = 0; j < 4; j++) a[j][0] = a[j][1] = _mm256_setzero_pd();
    int64_t k = 0;
    for (; k + 8 <= k_len; k += 8) {
        __m256d x0 = _mm256_loadu_pd(x + k), x1 = _mm256_loadu_pd(x + k + 4);
        for (int j = 0; j < 4; j++) {
            __m256d lo, hi;
            load8(w, is_bf16, (n0 + j) * k_len + k, &lo, &hi);
            a[j][0] = _mm256_fmadd_pd(x0, lo, a[j][0]);
            a[j][1] = _mm256_fmadd_pd(x1, hi, a[j][1]);
        }
    }
    for (int j = 0; j < 4; j++) {
        double s = hsum(_mm256_add_pd(a[j][0], a[j][1]));
        for (int64_t kk = k; kk < k_len; kk++) s += x[kk] * W_VALUE(w, is_bf16, (n0 + j) * k_len + kk);
        out[n0 + j] = s;
    }
}
#endif

/* Rows m0..m0+mr of x against rows n0..n0+nr of w (mr <= 4, nr <= 2). */
static void block(const double *x, int64_t ldx, const void *w, int is_bf16, int64_t k_len,
                  double *out, int64_t ldo, int64_t m0, int mr, int64_t n0, int nr) {
    double acc[4][2] = {{0}};
    int64_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (mr == 4 && nr == 2) {
        __m256d a00 = _mm256_setzero_pd(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
        const double *x0 = x + m0 * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
        for (; k + 4 <= k_len; k += 4) {
            __m256d w0, w1;
            if (is_bf16) {
                w0 = load4_bf16((const uint16_t *)w + n0 * k_len + k);
                w1 = load4_bf16((const uint16_t *)w + (n0 + 1) * k_len + k);
            } else {
                w0 = load4_f32((const float *)w + n0 * k_len + k);
                w1 = load4_f32((const float *)w + (n0 + 1) * k_len + k);
            }
            __m256d v = _mm256_loadu_pd(x0 + k);
            a00 = _mm256_fmadd_pd(v, w0, a00); a01 = _mm256_fmadd_pd(v, w1, a01);
            v = _mm256_loadu_pd(x1 + k);
            a10 = _mm256_fmadd_pd(v, w0, a10); a11 = _mm256_fmadd_pd(v, w1, a11);
            v = _mm256_loadu_pd(x2 + k);
            a20 = _mm256_fmadd_pd(v, w0, a20); a21 = _mm256_fmadd_pd(v, w1, a21);
            v = _mm256_loadu_pd(x3 + k);
            a30 = _mm256_fmadd_pd(v, w0, a30); a31 = _mm256_fmadd_pd(v, w1, a31);
        }
        acc[0][0] = hsum(a00); acc[0][1] = hsum(a01); acc[1][0] = hsum(a10); acc[1][1] = hsum(a11);
        acc[2][0] = hsum(a20); acc[2][1] = hsum(a21); acc[3][0] = hsum(a30); acc[3][1] = hsum(a31);
    } else {
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++) {
                const double *xr = x + (m0 + i) * ldx;
                int64_t row = (n0 + j) * k_len;
                __m256d a = _mm256_setzero_pd();
                int64_t kk = 0;
                for (; kk + 4 <= k_len; kk += 4) {
                    __m256d wv = is_bf16 ? load4_bf16((const uint16_t *)w + row + kk) : load4_f32((const float *)w + row + kk);
                    a = _mm256_fmadd_pd(_mm256_loadu_pd(xr + kk), wv, a);
                }
                acc[i][j] = hsum(a);
            }
        k = k_len & ~(int64_t)3;
    }
#endif
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            const double *xr = x + (m0 + i) * ldx;
            int64_t row = (n0 + j) * k_len;
            double a = acc[i][j];
            for (int64_t kk = k; kk < k_len; kk++) a += xr[kk] * W_VALUE(w, is_bf16, row + kk);
            out[(m0 + i) * ldo + n0 + j] = a;
        }
}

/* Rows m0..m0+3 of x against two float64 rows w0, w1 (already converted). */
static void four_by_two(const double *x, int64_t ldx, const double *w0, const double *w1, int64_t k_len,
                        double *out, int64_t ldo) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256d a00 = _mm256_setzero_pd(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
    const double *x0 = x, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
    int64_t k = 0;
    for (; k + 4 <= k_len; k += 4) {
        __m256d v0 = _mm256_loadu_pd(w0 + k), v1 = _mm256_loadu_pd(w1 + k);
        __m256d v = _mm256_loadu_pd(x0 + k);
        a00 = _mm256_fmadd_pd(v, v0, a00); a01 = _mm256_fmadd_pd(v, v1, a01);
        v = _mm256_loadu_pd(x1 + k);
        a10 = _mm256_fmadd_pd(v, v0, a10); a11 = _mm256_fmadd_pd(v, v1, a11);
        v = _mm256_loadu_pd(x2 + k);
        a20 = _mm256_fmadd_pd(v, v0, a20); a21 = _mm256_fmadd_pd(v, v1, a21);
        v = _mm256_loadu_pd(x3 + k);
        a30 = _mm256_fmadd_pd(v, v0, a30); a31 = _mm256_fmadd_pd(v, v1, a31);
    }
    double s[4][2] = {{hsum(a00), hsum(a01)}, {hsum(a10), hsum(a11)}, {hsum(a20), hsum(a21)}, {hsum(a30), hsum(a31)}};
#else
    double s[4][2] = {{0}};
    int64_t k = 0;
#endif
    for (int i = 0; i < 4; i++)
        for (int64_t kk = k; kk < k_len; kk++) { s[i][0] += x[i * ldx + kk] * w0[kk]; s[i][1] += x[i * ldx + kk] * w1[kk]; }
    for (int i = 0; i < 4; i++) { out[i * ldo] = s[i][0]; out[i * ldo + 1] = s[i][1]; }
}

/* out[b] = x[b] @ w[i]^T with i = w_index[b] (b itself when w_index is NULL). Batch
   entries are x_stride / w_stride / out_stride elements apart (0: shared). threads:
   OpenMP threads to use (the process's torch thread count). */
void exact_gemm(int64_t batch, int64_t m, int64_t n, int64_t k,
                const double *x, int64_t x_stride, const void *w, int64_t w_stride, const int64_t *w_index,
                int is_bf16, double *out, int64_t out_stride, int threads) {
    int64_t w_item = is_bf16 ? 2 : 4;
#define W_AT(b) ((const char *)w + (w_index ? w_index[b] : (b)) * w_stride * w_item)
#if defined(__AVX2__) && defined(__FMA__)
    if (m == 1) {
        int64_t quads = n / 4;
        #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t q = 0; q < quads; q++)
                row_by_4(x + b * x_stride, W_AT(b), is_bf16, k, out + b * out_stride, q * 4);
        for (int64_t b = 0; b < batch; b++)
            for (int64_t n0 = quads * 4; n0 < n; n0++)
                block(x + b * x_stride, k, W_AT(b), is_bf16, k, out + b * out_stride, n, 0, 1, n0, 1);
        return;
    }
#endif
    int64_t pairs = n / 2, m_full = m / 4 * 4;
    #pragma omp parallel num_threads(threads)
    {
        double *buf = (double *)malloc(sizeof(double) * 2 * k);
        #pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t p = 0; p < pairs; p++) {
                const void *wb = W_AT(b);
                for (int64_t kk = 0; kk < 2 * k; kk++) buf[kk] = W_VALUE(wb, is_bf16, 2 * p * k + kk);
                const double *xb = x + b * x_stride;
                double *ob = out + b * out_stride;
                for (int64_t m0 = 0; m0 < m_full; m0 += 4)
                    four_by_two(xb + m0 * k, k, buf, buf + k, k, ob + m0 * n + 2 * p, n);
                if (m_full < m)
                    block(xb, k, wb, is_bf16, k, ob, n, m_full, (int)(m - m_full), 2 * p, 2);
            }
        free(buf);
    }
    if (n % 2)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t m0 = 0; m0 < m; m0 += 4)
                block(x + b * x_stride, k, W_AT(b), is_bf16, k,
                      out + b * out_stride, n, m0, m - m0 < 4 ? (int)(m - m0) : 4, n - 1, 1);
}

/* ------------------------------------------------------------------ a whole device linear
   What fidelity.py's Python path does around the GEMM, in one call (the same bits):
   the activation as the matrix unit's SrcB holds it, the float64 sums, the bias, the
   float32 Dst and the packer's rounding. */
enum { SRC_RAW = 0, SRC_TF32 = 1 };                                 /* src_mode */
enum { PARTS_SRC = 1, PARTS_HIGH = 2, PARTS_HIGH_LOW = 3 };         /* parts */
enum { OUT_F32 = 0, OUT_BF16_EVEN = 1, OUT_BF16_AWAY = 2 };         /* out_mode */
#define TF32_B 0xFFFFE000u  /* fidelity.TF32_BITS["B"] */
#define HIGH_B 0xFFFE0000u  /* fidelity.HIGH_BITS["B"] */
#define EXPONENT_F32 0x7F800000u

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static uint16_t bf16_even(float f) {  /* torch's float32 -> bfloat16: nearest, ties to even */
    uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  /* NaN: c10::BFloat16's quiet NaN */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static uint16_t bf16_away(float f) {  /* fidelity.to_bfloat16: ties away, denormals -> +0 */
    uint32_t u = f32_bits(f);
    if (!(u & EXPONENT_F32)) return 0;
    return (uint16_t)((u + 0x8000u) >> 16);
}

void exact_linear(int64_t batch, int64_t m, int64_t n, int64_t k,
                  const float *x, int64_t x_stride, int x_batches, int src_mode, int parts,
                  const void *w, int64_t w_stride, const int64_t *w_index, int is_bf16,
                  const double *bias, int out_mode, void *out, int threads) {
    int64_t width = parts == PARTS_HIGH_LOW ? 2 * k : k, rows = (int64_t)x_batches * m;
    double *xd = (double *)malloc(sizeof(double) * (rows * width > 0 ? rows * width : 1));
    double *acc = (double *)malloc(sizeof(double) * (batch * m * n > 0 ? batch * m * n : 1));
    for (int64_t b = 0; b < x_batches; b++)
        for (int64_t i = 0; i < m; i++) {
            const float *src = x + b * x_stride + i * k;
            double *dst = xd + (b * m + i) * width;
            for (int64_t j = 0; j < k; j++) {
                float v = src[j];
                if (src_mode == SRC_TF32) {
                    uint32_t u = f32_bits(v);
                    v = (u & EXPONENT_F32) ? bits_f32(u & TF32_B) : 0.0f;
                }
                if (parts == PARTS_SRC) { dst[j] = v; continue; }
                float high = bits_f32(f32_bits(v) & HIGH_B);
                dst[j] = high;
                if (parts == PARTS_HIGH_LOW) dst[k + j] = v - high;
            }
        }
    exact_gemm(batch, m, n, width, xd, x_batches > 1 ? m * width : 0, w, w_stride, w_index, is_bf16, acc, m * n, threads);
    int64_t total = batch * m * n;
    for (int64_t e = 0; e < total; e++) {
        double a = acc[e];
        if (bias) a += bias[e % n];
        float f = (float)a;
        if (out_mode == OUT_F32) ((float *)out)[e] = f;
        else ((uint16_t *)out)[e] = out_mode == OUT_BF16_EVEN ? bf16_even(f) : bf16_away(f);
    }
    free(xd);
    free(acc);
}
