// The weight clip search (quant.quantizer.search_clip_ratio) as one pass per row.
//
// Why C++: the PyTorch formulation runs ~10 tensor ops per grid point and row chunk; on SmolLM2 that is
// ~70,000 calls and 70 s for the default run's weights, half of it in pow. Here each row stays in L1 across
// the grid and |e|^norm is exp(norm · log|e|) with Cephes' single-precision polynomials (relative error
// ~1e-7; ATen's pow, SLEEF's 1-ulp powf, cost ~120 cycles per 8 values here, 4x the rest together). The
// codes and errors are the PyTorch path's to float rounding, so a ratio can differ from its choice only
// where two grid points' errors tie to ~1e-6 (tests/test_quant.py checks the chosen error, not the ratio).
//
// Per row and grid point i (ratio = 1 - i/grid, as float): the scale and zero of quantizer.compute_qparams,
// then Σ |(clamp(round(w/s) + z, qmin, qmax) - z)·s - w|^norm, with quantize_codes' float operations.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX2__)
// log(x) for normal x > 0 (Cephes logf): x = m·2^e with m in [√½, √2), a degree-8 polynomial in m - 1.
inline __m256 log_ps(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_or_ps(_mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x007FFFFF))),
                          _mm256_set1_ps(0.5f));  // m in [0.5, 1)
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OS);
  e = _mm256_sub_ps(e, _mm256_and_ps(one, small));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(m, small)), one);  // m < √½: 2m - 1, else m - 1
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  for (float c : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f,
                  2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f})
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(c));
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
}

// exp(x) for x in [-87, 88] (Cephes expf): 2^n · a degree-5 polynomial of the remainder.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

// |e|^p for e ≥ 0; values under 1e-30 (their power is far below float resolution of any sum) count 0.
inline __m256 pow_ps(__m256 e, __m256 p) {
  const __m256 tiny = _mm256_cmp_ps(e, _mm256_set1_ps(1e-30f), _CMP_LT_OS);
  const __m256 safe = _mm256_max_ps(e, _mm256_set1_ps(1e-30f));
  return _mm256_andnot_ps(tiny, exp_ps(_mm256_mul_ps(p, log_ps(safe))));
}
#endif

struct Grid {
  float scale, zero;
};

// compute_qparams for one row at one clip ratio (float32 throughout, as the tensor code). `extreme` is the
// row's first value of largest magnitude, which full_range maps to qmin (a scale of its sign).
inline Grid row_qparams(float lo, float hi, float extreme, float ratio, bool symmetric, bool full_range, float qmin,
                        float qmax) {
  Grid g{0.0f, 0.0f};
  if (symmetric && full_range) {
    g.scale = (extreme * ratio) / qmin;
    if (std::fabs(g.scale) < 1e-8f) g.scale = 1e-8f;
    return g;
  }
  if (symmetric) {
    const float amax = std::max(-lo, hi) * ratio;
    g.scale = amax / qmax;
  } else {
    const float xmin = std::min(lo, 0.0f) * ratio, xmax = std::max(hi, 0.0f) * ratio;
    g.scale = (xmax - xmin) / qmax;
    g.zero = std::nearbyint(-xmin / std::max(g.scale, std::numeric_limits<float>::min()));
  }
  g.scale = std::max(g.scale, 1e-8f);
  return g;
}

inline float row_error(const float* w, int64_t K, Grid g, float qmin, float qmax, float norm) {
  int64_t k = 0;
  float total = 0.0f;
#if defined(__AVX2__)
  const __m256 s = _mm256_set1_ps(g.scale), z = _mm256_set1_ps(g.zero), lo = _mm256_set1_ps(qmin),
               hi = _mm256_set1_ps(qmax), p = _mm256_set1_ps(norm), sign = _mm256_set1_ps(-0.0f);
  __m256 acc = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    const __m256 x = _mm256_loadu_ps(w + k);
    __m256 q = _mm256_round_ps(_mm256_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, z), lo), hi);
    const __m256 e = _mm256_andnot_ps(sign, _mm256_sub_ps(_mm256_mul_ps(_mm256_sub_ps(q, z), s), x));
    acc = _mm256_add_ps(acc, pow_ps(e, p));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float v : lanes) total += v;
#endif
  for (; k < K; ++k) {
    float q = std::nearbyint(w[k] / g.scale) + g.zero;
    q = std::min(std::max(q, qmin), qmax);
    total += std::pow(std::fabs((q - g.zero) * g.scale - w[k]), norm);
  }
  return total;
}

}  // namespace

// w [R, K] float32 → ratio [R, 1]: per row the first grid ratio with the least error.
at::Tensor clip_search(at::Tensor w, int64_t bits, bool symmetric, int64_t grid, double max_shrink, double norm,
                       bool full_range) {
  TORCH_CHECK(w.dtype() == at::kFloat && w.dim() == 2 && w.is_contiguous(), "w: contiguous float32 [R, K]");
  TORCH_CHECK(bits >= 1 && bits <= 16 && grid >= 1, "bits must be 1..16 and grid positive");
  const int64_t R = w.size(0), K = w.size(1);
  const float qmin = symmetric ? -float(int64_t(1) << (bits - 1)) : 0.0f;
  const float qmax = symmetric ? float((int64_t(1) << (bits - 1)) - 1) : float((int64_t(1) << bits) - 1);
  const int64_t steps = int64_t(max_shrink * double(grid));  // Python's int(max_shrink * grid)
  auto out = at::ones({R, 1}, w.options());
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = wp + r * K;
      float lo = row[0], hi = row[0], extreme = row[0];
      for (int64_t k = 1; k < K; ++k) {
        lo = std::min(lo, row[k]);
        hi = std::max(hi, row[k]);
        if (std::fabs(row[k]) > std::fabs(extreme)) extreme = row[k];
      }
      float best = std::numeric_limits<float>::infinity(), best_ratio = 1.0f;
      for (int64_t i = 0; i < steps; ++i) {
        const float ratio = float(1.0 - double(i) / double(grid));
        const float err = row_error(row, K, row_qparams(lo, hi, extreme, ratio, symmetric, full_range, qmin, qmax),
                                    qmin, qmax, float(norm));
        if (err < best) {
          best = err;
          best_ratio = ratio;
        }
      }
      op[r] = best_ratio;
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(spinquant, m) {
  m.def("clip_search(Tensor w, int bits, bool symmetric, int grid, float max_shrink, float norm, bool full_range) -> Tensor");
}

TORCH_LIBRARY_IMPL(spinquant, CPU, m) {
  m.impl("clip_search", &clip_search);
}
