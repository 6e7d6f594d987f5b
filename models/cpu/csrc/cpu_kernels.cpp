// CPU kernels for the training step on AVX-512.
//
// softmax(logits + bias) over the last dimension in one pass, for the window attention. PyTorch runs this as two
// kernels (the broadcast add, then the softmax), and its softmax pays a fixed cost per row that dominates on
// Swin's 49-wide rows. Here each row is read once, summed with its bias row, reduced (max, then the sum of
// exponentials) in AVX-512 registers and written once. Numerics follow PyTorch's: the sum is
// rounded to the input dtype first (what the separate add writes), the softmax runs in fp32, and the result is
// rounded to nearest even; NaN propagates as in PyTorch.
//
// LayerNorm over the last dimension, forward and backward. PyTorch's backward for bf16 input (fp32 weights) spends
// two thirds of its time on the weight and bias gradients; here one pass over (x, grad) per row gives the input
// gradient and adds the row's share of both parameter gradients to per-thread fp32 sums.
//
// A transpose of 16-bit matrices (16 x 16 tiles through in-register interleaves), for the weight gradients: a
// product whose long reduction dimension is contiguous in both operands runs about twice as fast in oneDNN as the
// same product read through a transposed view, and PyTorch's own transposing copy is slower still.
//
// The exact GELU and its derivative in one pass, for the MLP: y = x Phi(x) and dy/dx = Phi(x) + x phi(x) share one
// exp (erf in the Abramowitz-Stegun 7.1.26 form, within 1.5e-7, as PyTorch's vectorised erf), computed in fp32.
// Keeping dy/dx instead of x lets the backward apply it inside the product that computes the gradient. Only the
// bf16 version is built: in fp32 the product dominates and the fusion measured no gain.
//
// Built by models/cpu_kernels.py with -march=native on the machine that runs it; without AVX-512 (BW) the
// library reports itself unavailable and the standard ops run instead.
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <math.h>
#include <omp.h>

namespace {

constexpr int64_t kMaxRow = 1024;  // the widest row taken (a 32 x 32 window); wider rows use the standard ops

inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

inline __m512 load(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load(const uint16_t *p, __mmask16 m) {  // bf16 -> fp32 is exact: the bits moved up by 16
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// fp32 -> bf16 bits, round to nearest even, NaN kept quiet. With AVX512-BF16 one instruction does it (it also
// flushes results below 1.2e-38 to zero); otherwise the integer rounding PyTorch's own conversion uses.
inline __m256i to_bf16_bits(__m512 f) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(f);
#else
    __m512i u = _mm512_castps_si512(f);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
#endif
}

inline void store(float *p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
inline void store(uint16_t *p, __mmask16 m, __m512 v) { _mm256_mask_storeu_epi16(p, m, to_bf16_bits(v)); }

inline __m512 round_to(const float *, __m512 v) { return v; }
inline __m512 round_to(const uint16_t *, __m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_bits(v)), 16));
}

// exp(x) for x <= 0 (and NaN): Cody-Waite reduction by ln 2, then a degree-6 polynomial (the fp32 softmax is
// within 1e-6 of PyTorch's); below -87.3 the result is 0, NaN stays NaN
inline __m512 exp_nonpositive(__m512 x) {
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    __mmask16 zero = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
    const __m512 given = x;
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.9875691500e-4f), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512 e = _mm512_maskz_mov_ps((__mmask16)~zero, _mm512_scalef_ps(p, k));
    return _mm512_mask_mov_ps(e, nan, given);
}

template <typename T>
void bias_softmax(const T *x, const T *bias, T *out, int64_t rows, int64_t n, int64_t bias_rows, int threads) {
    const int64_t chunks = (n + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        __m512 row[kMaxRow / 16];
        const T *xr = x + r * n, *br = bias + (r % bias_rows) * n;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        __mmask16 nan = 0;
        for (int64_t c = 0; c < chunks; ++c) {
            __mmask16 m = tail_mask(n - c * 16);
            __m512 v = round_to(x, _mm512_add_ps(load(xr + c * 16, m), load(br + c * 16, m)));
            nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
            row[c] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), m, v);
            vmax = _mm512_max_ps(vmax, row[c]);
        }
        // a NaN anywhere in the row makes the whole row NaN, as in PyTorch (max would skip it)
        __m512 shift = _mm512_set1_ps(nan ? NAN : _mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) {
            row[c] = exp_nonpositive(_mm512_sub_ps(row[c], shift));
            vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(tail_mask(n - c * 16), row[c]));
        }
        __m512 scale = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
        T *o = out + r * n;
        for (int64_t c = 0; c < chunks; ++c) store(o + c * 16, tail_mask(n - c * 16), _mm512_mul_ps(row[c], scale));
    }
}

// LayerNorm forward: per row, mean and variance in fp32 (two passes over the row, which stays in L1), then
// y = (x - mean) * rstd * weight + bias; mean and rstd are kept for backward
template <typename T>
void layer_norm_forward(const T *x, const float *weight, const float *bias, T *y, float *mean, float *rstd,
                        int64_t rows, int64_t n, float eps, int threads) {
    const int64_t chunks = (n + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        const T *xr = x + r * n;
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) vsum = _mm512_add_ps(vsum, load(xr + c * 16, tail_mask(n - c * 16)));
        const float mu = _mm512_reduce_add_ps(vsum) / (float)n;
        const __m512 vmu = _mm512_set1_ps(mu);
        __m512 vsq = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) {
            const __mmask16 m = tail_mask(n - c * 16);
            const __m512 d = _mm512_maskz_sub_ps(m, load(xr + c * 16, m), vmu);
            vsq = _mm512_fmadd_ps(d, d, vsq);
        }
        const float rs = 1.0f / sqrtf(_mm512_reduce_add_ps(vsq) / (float)n + eps);
        const __m512 vrs = _mm512_set1_ps(rs);
        T *yr = y + r * n;
        for (int64_t c = 0; c < chunks; ++c) {
            const __mmask16 m = tail_mask(n - c * 16);
            const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(load(xr + c * 16, m), vmu), vrs);
            store(yr + c * 16, m, _mm512_fmadd_ps(xhat, load(weight + c * 16, m), load(bias + c * 16, m)));
        }
        mean[r] = mu;
        rstd[r] = rs;
    }
}

// LayerNorm backward: dx = rstd * (g w - mean(g w) - xhat mean(g w xhat)); the weight and bias gradients
// (sum over rows of g xhat and of g) go to partial[thread][0 | 1][n], which the caller sums over threads
template <typename T>
void layer_norm_backward(const T *grad, const T *x, const float *mean, const float *rstd, const float *weight,
                         T *dx, float *partial, int64_t rows, int64_t n, int threads) {
    const int64_t chunks = (n + 15) / 16;
#pragma omp parallel num_threads(threads)
    {
        float *dweight = partial + (int64_t)omp_get_thread_num() * 2 * n, *dbias = dweight + n;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            const T *gr = grad + r * n, *xr = x + r * n;
            const __m512 vmu = _mm512_set1_ps(mean[r]), vrs = _mm512_set1_ps(rstd[r]);
            __m512 s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; ++c) {
                const __mmask16 m = tail_mask(n - c * 16);
                const __m512 g = load(gr + c * 16, m);
                const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(load(xr + c * 16, m), vmu), vrs);
                const __m512 gw = _mm512_mul_ps(g, load(weight + c * 16, m));
                s1 = _mm512_add_ps(s1, gw);
                s2 = _mm512_fmadd_ps(gw, xhat, s2);
                store(dweight + c * 16, m, _mm512_fmadd_ps(g, xhat, load(dweight + c * 16, m)));
                store(dbias + c * 16, m, _mm512_add_ps(g, load(dbias + c * 16, m)));
            }
            const __m512 a = _mm512_set1_ps(_mm512_reduce_add_ps(s1) / (float)n);
            const __m512 b = _mm512_set1_ps(_mm512_reduce_add_ps(s2) / (float)n);
            T *dr = dx + r * n;
            for (int64_t c = 0; c < chunks; ++c) {
                const __mmask16 m = tail_mask(n - c * 16);
                const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(load(xr + c * 16, m), vmu), vrs);
                const __m512 gw = _mm512_mul_ps(load(gr + c * 16, m), load(weight + c * 16, m));
                store(dr + c * 16, m, _mm512_mul_ps(vrs, _mm512_sub_ps(_mm512_sub_ps(gw, a), _mm512_mul_ps(xhat, b))));
            }
        }
    }
}

// 16 x 16 tile of 16-bit elements: pairs of rows interleaved into 32-bit, then 64-bit groups, then 128-bit halves
inline void transpose_tile16(const uint16_t *in, int64_t ld_in, uint16_t *out, int64_t ld_out) {
    __m256i r[16], t[16], u[16], v[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm256_loadu_si256((const __m256i *)(in + i * ld_in));
    // t[2k], t[2k+1]: (row 2k, row 2k+1) pairs of columns 0-3|8-11 and 4-7|12-15
    for (int k = 0; k < 8; ++k) {
        t[2 * k] = _mm256_unpacklo_epi16(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm256_unpackhi_epi16(r[2 * k], r[2 * k + 1]);
    }
    // u[4j + q]: pair-rows 2j, 2j+1 of column group q (0: c0,c1|c8,c9; 1: c2,c3|c10,c11; 2: c4,c5|..; 3: c6,c7|..)
    for (int j = 0; j < 4; ++j)
        for (int h = 0; h < 2; ++h) {
            u[4 * j + 2 * h] = _mm256_unpacklo_epi32(t[4 * j + h], t[4 * j + 2 + h]);
            u[4 * j + 2 * h + 1] = _mm256_unpackhi_epi32(t[4 * j + h], t[4 * j + 2 + h]);
        }
    // v[8m + c]: rows 8m..8m+7 of column c (low 128 bits) and of column c + 8 (high 128 bits)
    for (int m = 0; m < 2; ++m)
        for (int q = 0; q < 4; ++q) {
            v[8 * m + 2 * q] = _mm256_unpacklo_epi64(u[8 * m + q], u[8 * m + 4 + q]);
            v[8 * m + 2 * q + 1] = _mm256_unpackhi_epi64(u[8 * m + q], u[8 * m + 4 + q]);
        }
    for (int c = 0; c < 8; ++c) {
        _mm256_storeu_si256((__m256i *)(out + c * ld_out), _mm256_permute2x128_si256(v[c], v[8 + c], 0x20));
        _mm256_storeu_si256((__m256i *)(out + (c + 8) * ld_out), _mm256_permute2x128_si256(v[c], v[8 + c], 0x31));
    }
}

// out (cols x rows) = in (rows x cols) transposed; partial tiles at the edges element by element
void transpose16(const uint16_t *in, uint16_t *out, int64_t rows, int64_t cols, int threads) {
    const int64_t row_tiles = (rows + 15) / 16, col_tiles = (cols + 15) / 16;
#pragma omp parallel for schedule(static) collapse(2) num_threads(threads)
    for (int64_t i = 0; i < row_tiles; ++i)
        for (int64_t j = 0; j < col_tiles; ++j) {
            const int64_t nr = rows - i * 16 < 16 ? rows - i * 16 : 16, nc = cols - j * 16 < 16 ? cols - j * 16 : 16;
            const uint16_t *src = in + i * 16 * cols + j * 16;
            uint16_t *dst = out + j * 16 * rows + i * 16;
            if (nr == 16 && nc == 16) {
                transpose_tile16(src, cols, dst, rows);
            } else {
                for (int64_t c = 0; c < nc; ++c)
                    for (int64_t r = 0; r < nr; ++r) dst[c * rows + r] = src[r * cols + c];
            }
        }
}

// Phi(x) (the standard normal CDF) and phi(x) (its density). erfc(|x| / sqrt 2) is t P(t) exp(-x^2 / 2) with
// t = 1 / (1 + p |x| / sqrt 2) (A&S 7.1.26), and that exp is phi's too. NaN propagates through t.
inline void normal_cdf_pdf(__m512 x, __m512 &cdf, __m512 &pdf) {
    const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));
    // the 14-bit reciprocal refined by one Newton step: a division would be the slowest instruction here
    const __m512 d = _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f));
    __m512 t = _mm512_rcp14_ps(d);
    t = _mm512_mul_ps(t, _mm512_fnmadd_ps(d, t, _mm512_set1_ps(2.0f)));
    __m512 poly = _mm512_fmadd_ps(t, _mm512_set1_ps(1.061405429f), _mm512_set1_ps(-1.453152027f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
    poly = _mm512_mul_ps(poly, t);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z)));  // exp(-x^2 / 2)
    const __m512 tail = _mm512_mul_ps(_mm512_mul_ps(poly, e), _mm512_set1_ps(0.5f));          // Phi(-|x|)
    const __mmask16 nonneg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
    cdf = _mm512_mask_sub_ps(tail, nonneg, _mm512_set1_ps(1.0f), tail);
    pdf = _mm512_mul_ps(e, _mm512_set1_ps(0.39894228040143268f));
}

constexpr int64_t kBlock = 1 << 14;  // elements per task: enough to amortise a task, few enough to balance

template <typename T>
void gelu_with_derivative(const T *x, T *y, T *dydx, int64_t n, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < n; b += kBlock) {
        const int64_t end = b + kBlock < n ? b + kBlock : n;
        for (int64_t i = b; i < end; i += 16) {
            const __mmask16 m = tail_mask(end - i);
            const __m512 v = load(x + i, m);
            __m512 cdf, pdf;
            normal_cdf_pdf(v, cdf, pdf);
            store(y + i, m, _mm512_mul_ps(v, cdf));
            store(dydx + i, m, _mm512_fmadd_ps(v, pdf, cdf));
        }
    }
}

}  // namespace

extern "C" {
int kernels_available(void) { return 1; }
int64_t bias_softmax_max_row(void) { return kMaxRow; }
// returns 1, computing nothing, for sizes the kernel cannot take (the caller checks them first)
int bias_softmax_f32(const float *x, const float *bias, float *out, int64_t rows, int64_t n, int64_t bias_rows,
                     int threads) {
    if (rows < 0 || n < 1 || n > kMaxRow || bias_rows < 1) return 1;
    bias_softmax(x, bias, out, rows, n, bias_rows, threads);
    return 0;
}
int bias_softmax_bf16(const uint16_t *x, const uint16_t *bias, uint16_t *out, int64_t rows, int64_t n,
                      int64_t bias_rows, int threads) {
    if (rows < 0 || n < 1 || n > kMaxRow || bias_rows < 1) return 1;
    bias_softmax(x, bias, out, rows, n, bias_rows, threads);
    return 0;
}
void layer_norm_forward_f32(const float *x, const float *w, const float *b, float *y, float *mean, float *rstd,
                            int64_t rows, int64_t n, float eps, int threads) {
    layer_norm_forward(x, w, b, y, mean, rstd, rows, n, eps, threads);
}
void layer_norm_forward_bf16(const uint16_t *x, const float *w, const float *b, uint16_t *y, float *mean, float *rstd,
                             int64_t rows, int64_t n, float eps, int threads) {
    layer_norm_forward(x, w, b, y, mean, rstd, rows, n, eps, threads);
}
void layer_norm_backward_f32(const float *grad, const float *x, const float *mean, const float *rstd, const float *w,
                             float *dx, float *partial, int64_t rows, int64_t n, int threads) {
    layer_norm_backward(grad, x, mean, rstd, w, dx, partial, rows, n, threads);
}
void layer_norm_backward_bf16(const uint16_t *grad, const uint16_t *x, const float *mean, const float *rstd,
                              const float *w, uint16_t *dx, float *partial, int64_t rows, int64_t n, int threads) {
    layer_norm_backward(grad, x, mean, rstd, w, dx, partial, rows, n, threads);
}
void transpose_16bit(const uint16_t *in, uint16_t *out, int64_t rows, int64_t cols, int threads) {
    transpose16(in, out, rows, cols, threads);
}
void gelu_with_derivative_bf16(const uint16_t *x, uint16_t *y, uint16_t *dydx, int64_t n, int threads) {
    gelu_with_derivative(x, y, dydx, n, threads);
}
}

#else  // no AVX-512: nothing to offer, the caller keeps the standard ops

extern "C" int kernels_available(void) { return 0; }

#endif
