/* Row-wise float32 ops of the emulator in one call each (runtime/emulator/row_kernels.py).
   Built by native.py. */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float value_at(const void *x, int is_bf16, int64_t i) {
    if (!is_bf16) return ((const float *)x)[i];
    uint32_t wide = (uint32_t)((const uint16_t *)x)[i] << 16;
    float f;
    memcpy(&f, &wide, 4);
    return f;
}

/* out = x * rsqrt(mean(x^2) + eps) * weight per row of n, in float32 as torch's
   rms_norm computes it, except that the sum of squares is exact (float64) and rounded
   once; weight NULL: no scale. x bfloat16 (bit patterns) or float32. */
void rms_norm_rows(int64_t rows, int64_t n, const void *x, int is_bf16, const float *weight, float eps,
                   float *out, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++) {
        double squares = 0.0;
        for (int64_t i = 0; i < n; i++) {
            double v = value_at(x, is_bf16, r * n + i);
            squares += v * v;
        }
        float scale = 1.0f / sqrtf((float)(squares / (double)n) + eps);
        float *o = out + r * n;
        for (int64_t i = 0; i < n; i++) {
            float v = value_at(x, is_bf16, r * n + i) * scale;
            o[i] = weight ? v * weight[i] : v;
        }
    }
}

/* Llama's rotary embedding as ttnn.experimental.rotary_embedding_llama computes it, with
   its 32 x 32 rotation matrix given as a signed permutation (rotated[j] = sign[j] *
   x[tile + source[j]] within each tile of 32): out = x * cos + rotated * sin with x * cos
   rounded to float32 and the rest fused (one rounding), as torch's addcmul computes it. x [d0, d1, d2, n] contiguous (bfloat16 or
   float32); cos and sin float32 or bfloat16, row (i, j, k) at i * s0 + j * s1 + k * s2. */
void rotary_rows(int64_t d0, int64_t d1, int64_t d2, int64_t n, const void *x, int x_bf16,
                 const void *cos, const void *sin, int cs_bf16, int64_t s0, int64_t s1, int64_t s2,
                 const int64_t *source, const float *sign, float *out) {
    for (int64_t i = 0; i < d0; i++)
        for (int64_t j = 0; j < d1; j++)
            for (int64_t k = 0; k < d2; k++) {
                int64_t row = ((i * d1 + j) * d2 + k) * n, cs = i * s0 + j * s1 + k * s2;
                for (int64_t e = 0; e < n; e++) {
                    int64_t tile = e - e % 32;
                    float a = value_at(x, x_bf16, row + e) * value_at(cos, cs_bf16, cs + e);
                    float rotated = sign[e % 32] * value_at(x, x_bf16, row + tile + source[e % 32]);
                    out[row + e] = fmaf(rotated, value_at(sin, cs_bf16, cs + e), a);  /* as torch's addcmul */
                }
            }
}
