/* The emulator's matmul for rows of activations against stored weights: out[b] = x[b] @ w[b]^T
   in float64, x float64, w read as stored: float32, bfloat16 (uint16 bit patterns), or
   block mantissas (int8, below).

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

enum { W_F32 = 0, W_BF16 = 1, W_BLOCKS = 2 };  /* how a weight is held (w_kind) */

/* W_BLOCKS: a [n, k] weight whose values are, in every group of 16 rows (n) at one
   column (k), small integers times one power of two (block floats, and the parts of them
   fidelity.py takes): n rows of int8 mantissas, then ceil(n / 16) rows of one byte per
   group and column, the biased exponent: w[j][kk] = mantissa * 2^(byte - BLOCK_BIAS);
   byte 0 only where the group's column is all zeros.
   1 byte a weight plus 1/16 for its exponent, against 2 for bfloat16. */
#define BLOCK_ROWS 16
#define BLOCK_BIAS 133

static inline double pow2(int e) {  /* 2^e, exactly, for -1022 <= e <= 1023 */
    uint64_t bits = (uint64_t)(e + 1023) << 52;
    double d;
    memcpy(&d, &bits, 8);
    return d;
}

static inline double bf16_value(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &wide, 4);
    return (double)f;
}

/* w[j][kk] of an [n, k] weight held as `kind`. */
static inline double w_value(const void *w, int kind, int64_t n, int64_t k, int64_t j, int64_t kk) {
    if (kind == W_BF16) return bf16_value(((const uint16_t *)w)[j * k + kk]);
    if (kind == W_F32) return (double)((const float *)w)[j * k + kk];
    const int8_t *mantissas = (const int8_t *)w;
    const uint8_t *exponents = (const uint8_t *)w + n * k;
    return (double)mantissas[j * k + kk] * pow2((int)exponents[(j / BLOCK_ROWS) * k + kk] - BLOCK_BIAS);
}

/* Plain C: out[i, j] for rows i of x and rows j of w (tails, and CPUs without AVX2). */
static void dot_rows(const double *x, int64_t m0, int64_t m1, const void *w, int kind, int64_t n, int64_t n0,
                     int64_t n1, int64_t k, double *out, int64_t ldo) {
    for (int64_t i = m0; i < m1; i++)
        for (int64_t j = n0; j < n1; j++) {
            double a = 0.0;
            for (int64_t kk = 0; kk < k; kk++) a += x[i * k + kk] * w_value(w, kind, n, k, j, kk);
            out[i * ldo + j] = a;
        }
}

#if defined(__AVX2__) && defined(__FMA__)
#define SIMD 1
static inline double hsum(__m256d v) {
    __m128d lo = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(lo, _mm_unpackhi_pd(lo, lo)));
}

/* 8 weights as two float64 vectors (block mantissas: without their exponent). */
static inline void load8(const void *w, int kind, int64_t i, __m256d *lo, __m256d *hi) {
    if (kind == W_BLOCKS) {
        const int8_t *p = (const int8_t *)w + i;
        int32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, p + 4, 4);
        *lo = _mm256_cvtepi32_pd(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(a)));
        *hi = _mm256_cvtepi32_pd(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(b)));
        return;
    }
    __m256 f;
    if (kind == W_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
        f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
        f = _mm256_loadu_ps((const float *)w + i);
    }
    *lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
    *hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
}

/* One row of x against rows n0..n0+3 of w: the decode shape, bound by reading and widening
   w. Block mantissas take x already scaled by their group's exponents (the four rows lie in
   one group of 16). */
static void row_by_4(const double *x, const void *w, int kind, int64_t k_len, double *out, int64_t n0) {
    __m256d a[4][2];
    for (int j = 0; j < 4; j++) a[j][0] = a[j][1] = _mm256_setzero_pd();
    /* Ask for the rows two calls ahead now: rows are short streams the prefetcher starts late. */
    int64_t item = kind == W_F32 ? 4 : kind == W_BF16 ? 2 : 1;
    const char *next = (const char *)w + (n0 + 8) * k_len * item;
    for (int64_t byte = 0; byte < 4 * k_len * item; byte += 64) _mm_prefetch(next + byte, _MM_HINT_T0);
    int64_t k = 0;
    for (; k + 8 <= k_len; k += 8) {
        __m256d x0 = _mm256_loadu_pd(x + k), x1 = _mm256_loadu_pd(x + k + 4);
        for (int j = 0; j < 4; j++) {
            __m256d lo, hi;
            load8(w, kind, (n0 + j) * k_len + k, &lo, &hi);
            a[j][0] = _mm256_fmadd_pd(x0, lo, a[j][0]);
            a[j][1] = _mm256_fmadd_pd(x1, hi, a[j][1]);
        }
    }
    for (int j = 0; j < 4; j++) {
        double s = hsum(_mm256_add_pd(a[j][0], a[j][1]));
        for (int64_t kk = k; kk < k_len; kk++)
            s += x[kk] * (kind == W_BLOCKS ? (double)((const int8_t *)w)[(n0 + j) * k_len + kk]
                                           : w_value(w, kind, 0, k_len, n0 + j, kk));
        out[n0 + j] = s;
    }
}

#define PANEL 8  /* weight rows widened and interleaved per panel: panel[k * 8 + j] */
#define MR 6     /* activation rows per micro-kernel call: 12 accumulators */

/* Rows of x (MR_ of them, a constant) against one panel: out[i, j] for j < nr. The
   accumulators are named variables so that they stay in registers. */
#define ROW_FMA(i, a0, a1) if ((i) < rows) { __m256d xi = _mm256_broadcast_sd(x + (i) * k_len + k); \
    a0 = _mm256_fmadd_pd(xi, w0, a0); a1 = _mm256_fmadd_pd(xi, w1, a1); }
#define ROW_OUT(i, a0, a1) if ((i) < rows) { double row[PANEL]; _mm256_storeu_pd(row, a0); \
    _mm256_storeu_pd(row + 4, a1); for (int j = 0; j < nr; j++) out[(i) * ldo + j] = row[j]; }
#define ROWS_BY_PANEL(NAME, MR_) \
static void NAME(const double *x, int64_t k_len, const double *panel, double *out, int64_t ldo, int nr) { \
    enum { rows = MR_ }; \
    __m256d c00 = _mm256_setzero_pd(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00; \
    __m256d c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00; \
    for (int64_t k = 0; k < k_len; k++) { \
        __m256d w0 = _mm256_loadu_pd(panel + k * PANEL), w1 = _mm256_loadu_pd(panel + k * PANEL + 4); \
        ROW_FMA(0, c00, c01) ROW_FMA(1, c10, c11) ROW_FMA(2, c20, c21) \
        ROW_FMA(3, c30, c31) ROW_FMA(4, c40, c41) ROW_FMA(5, c50, c51) \
    } \
    ROW_OUT(0, c00, c01) ROW_OUT(1, c10, c11) ROW_OUT(2, c20, c21) \
    ROW_OUT(3, c30, c31) ROW_OUT(4, c40, c41) ROW_OUT(5, c50, c51) \
}
ROWS_BY_PANEL(rows6_by_panel, 6)
ROWS_BY_PANEL(rows5_by_panel, 5)
ROWS_BY_PANEL(rows4_by_panel, 4)
ROWS_BY_PANEL(rows3_by_panel, 3)
ROWS_BY_PANEL(rows2_by_panel, 2)
ROWS_BY_PANEL(rows1_by_panel, 1)
static void (*const rows_by_panel[MR + 1])(const double *, int64_t, const double *, double *, int64_t, int) = {
    NULL, rows1_by_panel, rows2_by_panel, rows3_by_panel, rows4_by_panel, rows5_by_panel, rows6_by_panel};

static void panel_gemm(int64_t m, int64_t n, int64_t k, const double *x, const void *w, int kind,
                       double *out, double *panel, int64_t p) {
    int64_t n0 = p * PANEL;
    int nr = n - n0 < PANEL ? (int)(n - n0) : PANEL;
    if (kind == W_BLOCKS) {  /* the panel's 8 rows lie in one group: one scale per column */
        const int8_t *mantissas = (const int8_t *)w + n0 * k;
        const uint8_t *exponents = (const uint8_t *)w + n * k + (n0 / BLOCK_ROWS) * k;
        for (int64_t kk = 0; kk < k; kk++) {
            double scale = pow2((int)exponents[kk] - BLOCK_BIAS);
            for (int j = 0; j < PANEL; j++)
                panel[kk * PANEL + j] = j < nr ? (double)mantissas[j * k + kk] * scale : 0.0;
        }
    } else {
        for (int64_t kk = 0; kk < k; kk++)
            for (int j = 0; j < PANEL; j++)
                panel[kk * PANEL + j] = j < nr ? w_value(w, kind, n, k, n0 + j, kk) : 0.0;
    }
    for (int64_t m0 = 0; m0 < m; m0 += MR) {
        int mr = m - m0 < MR ? (int)(m - m0) : MR;
        rows_by_panel[mr](x + m0 * k, k, panel, out + m0 * n + n0, n, nr);
    }
}
#else
#define SIMD 0
#endif

#if SIMD
/* One activation row against one group of 16 rows of block mantissas: x scaled by the
   group's exponents once (exact: powers of two), then plain mantissa dot products. */
static void row_by_group(const double *x, const void *w, int64_t n, int64_t k, double *out, int64_t g,
                         double *scaled) {
    const uint8_t *exponents = (const uint8_t *)w + n * k + g * k;
    int64_t n0 = g * BLOCK_ROWS, n1 = n0 + BLOCK_ROWS < n ? n0 + BLOCK_ROWS : n, j = n0;
    unsigned any = 0;
    for (int64_t kk = 0; kk < k; kk++) {
        scaled[kk] = x[kk] * pow2((int)exponents[kk] - BLOCK_BIAS);
        any |= exponents[kk];
    }
    if (!any) {  /* exponent bytes all 0: the group is all zeros (a mesh's padding heads) */
        for (; j < n1; j++) out[j] = 0.0;
        return;
    }
    for (; j + 4 <= n1; j += 4) row_by_4(scaled, w, W_BLOCKS, k, out, j);
    for (; j < n1; j++) {
        double a = 0.0;
        for (int64_t kk = 0; kk < k; kk++) a += scaled[kk] * (double)((const int8_t *)w)[j * k + kk];
        out[j] = a;
    }
}
#endif

/* out[b] = x[b] @ w[i]^T with i = w_index[b] (b itself when w_index is NULL). Batch
   entries are x_stride / w_stride / out_stride elements apart (0: shared). zero (or
   NULL): flags of the weights known to be all zeros (a mesh's padding pieces), whose
   entries are written as +0 without reading them, as the sums would give. threads:
   OpenMP threads to use (the process's torch thread count). */
void exact_gemm(int64_t batch, int64_t m, int64_t n, int64_t k,
                const double *x, int64_t x_stride, const void *w, int64_t w_stride, const int64_t *w_index,
                const uint8_t *zero, int w_kind, double *out, int64_t out_stride, int threads) {
    int64_t w_item = w_kind == W_F32 ? 4 : w_kind == W_BF16 ? 2 : 1;
    int64_t *live = (int64_t *)malloc(sizeof(int64_t) * (batch > 0 ? batch : 1)), count = 0;
    for (int64_t b = 0; b < batch; b++) {
        if (zero && zero[w_index ? w_index[b] : b]) memset(out + b * out_stride, 0, sizeof(double) * m * n);
        else live[count++] = b;
    }
#define W_AT(b) ((const char *)w + (w_index ? w_index[b] : (b)) * w_stride * w_item)
#if SIMD
    if (m == 1 && w_kind == W_BLOCKS) {  /* decode over block mantissas: a group at a time */
        int64_t groups = (n + BLOCK_ROWS - 1) / BLOCK_ROWS;
        #pragma omp parallel num_threads(threads)
        {
            double *scaled = (double *)malloc(sizeof(double) * (k > 0 ? k : 1));
            #pragma omp for collapse(2) schedule(static)
            for (int64_t i = 0; i < count; i++)
                for (int64_t g = 0; g < groups; g++) {
                    int64_t b = live[i];
                    row_by_group(x + b * x_stride, W_AT(b), n, k, out + b * out_stride, g, scaled);
                }
            free(scaled);
        }
    } else if (m == 1) {  /* decode: each weight read once, widened in registers */
        int64_t quads = n / 4;
        #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
        for (int64_t i = 0; i < count; i++)
            for (int64_t q = 0; q < quads; q++) {
                int64_t b = live[i];
                row_by_4(x + b * x_stride, W_AT(b), w_kind, k, out + b * out_stride, q * 4);
            }
        for (int64_t i = 0; i < count; i++) {
            int64_t b = live[i];
            dot_rows(x + b * x_stride, 0, 1, W_AT(b), w_kind, n, quads * 4, n, k, out + b * out_stride, n);
        }
    } else {
        int64_t panels = (n + PANEL - 1) / PANEL;
        #pragma omp parallel num_threads(threads)
        {
            double *panel = (double *)malloc(sizeof(double) * PANEL * (k > 0 ? k : 1));
            #pragma omp for collapse(2) schedule(static)
            for (int64_t i = 0; i < count; i++)
                for (int64_t p = 0; p < panels; p++) {
                    int64_t b = live[i];
                    panel_gemm(m, n, k, x + b * x_stride, W_AT(b), w_kind, out + b * out_stride, panel, p);
                }
            free(panel);
        }
    }
#else
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < count; i++) {
        int64_t b = live[i];
        dot_rows(x + b * x_stride, 0, m, W_AT(b), w_kind, n, 0, n, k, out + b * out_stride, n);
    }
#endif
    free(live);
}

/* ------------------------------------------------------------------ a whole device linear
   What fidelity.py's Python path does around the GEMM, in one call (the same bits):
   the activation as the matrix unit's SrcB holds it, the float64 sums, the bias, the
   float32 Dst and the packer's rounding. */
enum { PARTS_SRC = 1, PARTS_HIGH = 2, PARTS_HIGH_LOW = 3 };         /* parts */
enum { OUT_F32 = 0, OUT_BF16_EVEN = 1, OUT_BF16_AWAY = 2 };         /* out_mode */
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
                  const float *x, int64_t x_stride, int x_batches, uint32_t src_mask, uint32_t high_mask, int parts,
                  const void *w, int64_t w_stride, const int64_t *w_index, const uint8_t *zero, int w_kind,
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
                if (src_mask) {  /* the bits the unpacker keeps in SrcB; denormals -> +0 */
                    uint32_t u = f32_bits(v);
                    v = (u & EXPONENT_F32) ? bits_f32(u & src_mask) : 0.0f;
                }
                if (parts == PARTS_SRC) { dst[j] = v; continue; }
                float high = bits_f32(f32_bits(v) & high_mask);
                dst[j] = high;
                if (parts == PARTS_HIGH_LOW) dst[k + j] = v - high;
            }
        }
    exact_gemm(batch, m, n, width, xd, x_batches > 1 ? m * width : 0, w, w_stride, w_index, zero, w_kind, acc, m * n, threads);
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

/* ------------------------------------------------------------------ block floats
   runtime/blockfloat.py's quantize (bit-equal to ttnn's host conversion) on rows of
   float32, written as the bfloat16 the emulator holds block floats in (exactly): groups of
   16 along a row share the largest exponent, mantissas are aligned by truncation and
   rounded to `mantissa_bits` (nearest, ties to even, saturating). */
void blockfloat_quantize(const float *x, int64_t rows, int64_t cols, int mantissa_bits, int offset,
                         uint16_t *out) {
    int drop = 24 - mantissa_bits;
    uint32_t q_max = (1u << mantissa_bits) - 1;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < cols; g += 16) {
            int n = cols - g < 16 ? (int)(cols - g) : 16;  /* zero padding never raises the exponent */
            const float *src = x + r * cols + g;
            uint32_t bits[16], big = 0;
            for (int i = 0; i < n; i++) {
                bits[i] = f32_bits(src[i]);
                uint32_t e = (bits[i] >> 23) & 0xFF;
                if (e > big) big = e;
            }
            for (int i = 0; i < n; i++) {
                uint32_t e = (bits[i] >> 23) & 0xFF;
                uint32_t m = e ? ((bits[i] & 0x7FFFFFu) | (1u << 23)) : 0;
                uint32_t shift = big - e < 31 ? big - e : 31;
                m >>= shift;
                m += (1u << (drop - 1)) - 1 + ((m >> drop) & 1u);
                uint32_t q = m >> drop;
                if (q > q_max) q = q_max;
                uint16_t result = 0;
                if (q) {
                    uint32_t v = f32_bits((float)q) | (bits[i] & 0x80000000u);
                    v += (big - (uint32_t)offset) << 23;
                    result = bf16_even(bits_f32(v));
                }
                out[r * cols + g + i] = result;
            }
        }
}

/* ------------------------------------------------------------------ packing block mantissas
   `entries` float32 operands [n, k] into W_BLOCKS' layout (out: entries x (n + groups) x k
   bytes). Returns 0, leaving out unspecified, when a value does not fit: it is not a small
   integer times its group's power of two, is inf/NaN, or a group's column holds only
   denormals (its byte would read as "all zeros"). */
int pack_blocks(const float *values, int64_t entries, int64_t n, int64_t k, int8_t *out) {
    int64_t groups = (n + BLOCK_ROWS - 1) / BLOCK_ROWS;
    uint32_t *largest = (uint32_t *)malloc(sizeof(uint32_t) * (k > 0 ? k : 1));
    int ok = 1;
    for (int64_t e = 0; e < entries && ok; e++) {
        const float *w = values + e * n * k;
        int8_t *mantissas = out + e * (n + groups) * k;
        uint8_t *exponents = (uint8_t *)mantissas + n * k;
        for (int64_t g = 0; g < groups && ok; g++) {
            int64_t j0 = g * BLOCK_ROWS, j1 = j0 + BLOCK_ROWS < n ? j0 + BLOCK_ROWS : n;
            memset(largest, 0, sizeof(uint32_t) * k);
            for (int64_t j = j0; j < j1; j++)
                for (int64_t kk = 0; kk < k; kk++) {
                    uint32_t field = (f32_bits(w[j * k + kk]) >> 23) & 0xFF;
                    if (field > largest[kk]) largest[kk] = field;
                }
            for (int64_t kk = 0; kk < k; kk++) {
                if (largest[kk] == 0xFF) ok = 0;
                exponents[g * k + kk] = (uint8_t)largest[kk];
            }
            for (int64_t j = j0; j < j1 && ok; j++)
                for (int64_t kk = 0; kk < k; kk++) {
                    uint32_t bits = f32_bits(w[j * k + kk]), field = (bits >> 23) & 0xFF;
                    uint32_t significand = field ? (bits & 0x7FFFFFu) | 0x800000u : bits & 0x7FFFFFu;
                    uint32_t shift = largest[kk] - (field ? field : 1) + 17;
                    if (largest[kk] == 0) shift = 16;  /* only zeros fit a group of byte 0 */
                    if (shift > 31) shift = 31;
                    uint32_t m = significand >> shift;
                    if ((m << shift) != significand || m > 127 || (largest[kk] == 0 && significand)) {
                        ok = 0;
                        break;
                    }
                    mantissas[j * k + kk] = (int8_t)((bits >> 31) ? -(int32_t)m : (int32_t)m);
                }
        }
    }
    free(largest);
    return ok;
}
