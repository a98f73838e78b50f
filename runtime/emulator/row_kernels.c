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
   rounded to float32 and the rest fused (one rounding), as torch's addcmul computes it.
   x [rows, n] contiguous (bfloat16 or float32), its rows indexed by `dims` leading
   dimensions of sizes `shape`; cos and sin (float32 or bfloat16) broadcast to x: the row
   of index (i0, i1, ...) starts at sum of i_d * strides[d]. */
void rotary_rows(int dims, const int64_t *shape, const int64_t *strides, int64_t n, const void *x, int x_bf16,
                 const void *cos, const void *sin, int cs_bf16, const int64_t *source, const float *sign,
                 float *out) {
    int64_t rows = 1;
    for (int d = 0; d < dims; d++) rows *= shape[d];
    for (int64_t r = 0; r < rows; r++) {
        int64_t cs = 0, rest = r;
        for (int d = dims - 1; d >= 0; d--) {
            cs += (rest % shape[d]) * strides[d];
            rest /= shape[d];
        }
        for (int64_t e = 0; e < n; e++) {
            int64_t tile = e - e % 32;
            float a = value_at(x, x_bf16, r * n + e) * value_at(cos, cs_bf16, cs + e);
            float rotated = sign[e % 32] * value_at(x, x_bf16, r * n + tile + source[e % 32]);
            out[r * n + e] = fmaf(rotated, value_at(sin, cs_bf16, cs + e), a);  /* as torch's addcmul */
        }
    }
}
