// The runtime's native CPU kernels: 4-bit weights read directly from two codes per byte (int4_linear,
// int4_linear_float), int8 weights (int8_linear), the dynamic activation / KV quantizer (quantize_rows), and
// one query token's attention over the quantized KV cache (decode_attention).
//
// Why C++: PyTorch ships no CPU kernel that multiplies int8 activations by packed int4 weights on AVX2
// machines. torch._int_mm needs int8 weights (2x the bytes) and is ~5x slower than float at one row;
// _weight_int4pack_mm_for_cpu runs activations in bf16 at ~3 GB/s; _dyn_quant_matmul_4bit is ARM-only
// (KleidiAI). Measured in benchmarks/RESULTS.md ("W4 kernels"). This file is the one piece we write by hand.
//
// Layout (see runtime/packing.py: to_block32 / from_block32): w is [N, K/2] uint8; in each block of 32
// codes along K, byte b holds code b in its low nibble and code b + 16 in its high nibble (llama.cpp's
// Q4_0 order), so one 16-byte load unpacks to 32 codes in their natural order. Codes are unsigned
// (u = code - qmin, 0..15).
//
// Exactness: for every group the kernel forms the exact integer Σ (xu - xo)(u - wz) in int32, then applies
// the float scales in the same order as the int8 path it replaces (IntLinear), so results are identical
// to the last bit. Built with -ffp-contract=off so no multiply-add is fused.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;

// Σ_b xu[b] * u[b] over one block of 32 (xu: 32 bytes, w: 16 packed bytes).
inline int32_t block_dot_scalar(const uint8_t* x, const uint8_t* w) {
  int32_t s = 0;
  for (int b = 0; b < 16; ++b) {
    s += int32_t(x[b]) * int32_t(w[b] & 0x0F);
    s += int32_t(x[b + 16]) * int32_t(w[b] >> 4);
  }
  return s;
}

#if defined(__AVX2__)
inline __m256i unpack_block(const uint8_t* w) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(packed, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
  return _mm256_set_m128i(hi, lo);
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}
#endif

// raw[mi][ni] = Σ over blocks [b0, b1) of xu[m0+mi] · u[n0+ni], for a tile of MT x NT rows, weights packed
// (two codes per byte, row stride ldw = K/2): the decode path, which reads each weight once.
template <int MT, int NT>
inline void tile_dot(const uint8_t* x, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t b0, int64_t b1,
                     int32_t raw[MT][NT]) {
#if defined(__AVX2__)
  __m256i acc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = b0; b < b1; ++b) {
    __m256i wv[NT];
    for (int j = 0; j < NT; ++j) wv[j] = unpack_block(w + j * ldw + b * (kBlock / 2));
    // The next tile's rows: a decode GEMV streams the weights once, so fetch ahead of the prefetcher.
    if (MT == 1 && (b & 3) == 0)
      for (int j = 0; j < NT; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + (NT + j) * ldw + b * (kBlock / 2)), _MM_HINT_T0);
    for (int i = 0; i < MT; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * ldx + b * kBlock));
      for (int j = 0; j < NT; ++j) {
        // u8 activations × u4 weights: pairs sum to at most 2·255·15 < 2^15, so no saturation.
        const __m256i p16 = _mm256_maddubs_epi16(xv, wv[j]);
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(p16, ones));
      }
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) raw[i][j] = hsum(acc[i][j]);
#else
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) {
      int32_t s = 0;
      for (int64_t b = b0; b < b1; ++b) s += block_dot_scalar(x + i * ldx + b * kBlock, w + j * ldw + b * (kBlock / 2));
      raw[i][j] = s;
    }
#endif
}

#if defined(__AVX2__)
// tile_dot's accumulators over weights already unpacked to one code per byte (row stride K): the prefill path,
// where every row of the prompt passes over the same weights. Up to four blocks' products add up in 16 bits
// before one widening multiply-add (a maddubs pair is at most 2·255·15 = 7650, four of them 30600 < 2^15).
template <int MT, int NT>
inline void unpacked_acc(const uint8_t* x, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t b0, int64_t b1,
                         __m256i acc[MT][NT]) {
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = b0; b < b1; b += 4) {
    const int64_t e = std::min(b + 4, b1);
    __m256i s16[MT][NT];
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NT; ++j) s16[i][j] = _mm256_setzero_si256();
    for (int64_t bb = b; bb < e; ++bb) {
      __m256i wv[NT];
      for (int j = 0; j < NT; ++j) wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * ldw + bb * kBlock));
      for (int i = 0; i < MT; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * ldx + bb * kBlock));
        for (int j = 0; j < NT; ++j) s16[i][j] = _mm256_add_epi16(s16[i][j], _mm256_maddubs_epi16(xv, wv[j]));
      }
    }
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(s16[i][j], ones));
  }
}

template <int MT, int NT>
inline void tile_dot_unpacked(const uint8_t* x, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t b0,
                              int64_t b1, int32_t raw[MT][NT]) {
  __m256i acc[MT][NT];
  unpacked_acc<MT, NT>(x, ldx, w, ldw, b0, b1, acc);
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) raw[i][j] = hsum(acc[i][j]);
}

// The sums of a 4 x 2 tile's accumulators as one vector, row-major (three rounds of hadd instead of eight
// separate reductions: at K = 576 those cost about as much as the tile's products).
inline __m256i hsum8(const __m256i a[4][2]) {
  const __m256i lo = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0][0], a[0][1]), _mm256_hadd_epi32(a[1][0], a[1][1]));
  const __m256i hi = _mm256_hadd_epi32(_mm256_hadd_epi32(a[2][0], a[2][1]), _mm256_hadd_epi32(a[3][0], a[3][1]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
}

// Stores the row-major sums of a 4 x 2 tile into a strip of raw sums (row stride `width`) at column `col`.
inline void store_sums_4x2(__m256i sums, int32_t* raw, int64_t width, int64_t col) {
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), sums);
  for (int i = 0; i < 4; ++i) {
    raw[i * width + col] = t[2 * i];
    raw[i * width + col + 1] = t[2 * i + 1];
  }
}

// A 4-row x 2-column tile over all K of unpacked weights (one group): its sums row-major in one vector.
inline __m256i tile_sums_4x2(const uint8_t* x, int64_t K, const uint8_t* w) {
  __m256i acc[4][2];
  unpacked_acc<4, 2>(x, K, w, K, 0, K / kBlock, acc);
  return hsum8(acc);
}

// Rows [n, n + count) of packed weights → one code per byte, in their natural order (Q4_0 order: a block's
// 16 low nibbles are codes 0-15, its high nibbles codes 16-31).
inline void unpack_rows(const uint8_t* w, int64_t K, int64_t count, uint8_t* out) {
  for (int64_t b = 0; b < count * (K / kBlock); ++b)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + b * kBlock), unpack_block(w + b * (kBlock / 2)));
}
#endif

// The optional bias of a linear: float32 [N] or none (nullptr).
inline const float* bias_data(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->dtype() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "bias: float [N]");
  return bias->data_ptr<float>();
}

struct Problem {
  int64_t M, N, K, group, G, GA, GW;
  const uint8_t* xu;   // [M, K]
  const int32_t* xo;   // [M, GA]
  const float* sx;     // [M, GA]
  const int32_t* sumx; // [M, G]   Σ xu per group
  const uint8_t* w;    // [N, K/2]
  const int32_t* wz;   // [N, GW]
  const int32_t* sumu; // [N, G]   Σ u per group
  const float* sw;     // [N, GW]
  const float* bias;   // [N] or null
  float* y;            // [M, N]
};

// One MT x NT tile of y: the integer sums group by group, then the scales. `wu` (prefill) holds the tile's
// weight rows unpacked (row stride K); without it the packed rows are read (decode).
template <int MT, int NT>
void run_tile(const Problem& p, int64_t m0, int64_t n0, const uint8_t* wu = nullptr) {
  const int64_t blocks_per_group = p.group / kBlock;
  float yv[MT][NT];
  int32_t raw[MT][NT];
  for (int64_t j = 0; j < p.G; ++j) {
    const int64_t b0 = j * blocks_per_group, b1 = (j + 1) * blocks_per_group;
#if defined(__AVX2__)
    if (wu != nullptr)
      tile_dot_unpacked<MT, NT>(p.xu + m0 * p.K, p.K, wu, p.K, b0, b1, raw);
    else
#endif
      tile_dot<MT, NT>(p.xu + m0 * p.K, p.K, p.w + n0 * (p.K / 2), p.K / 2, b0, b1, raw);
    const int64_t ja = p.GA > 1 ? j : 0, jw = p.GW > 1 ? j : 0;
    for (int i = 0; i < MT; ++i) {
      const int64_t m = m0 + i;
      const int32_t xo = p.xo[m * p.GA + ja];
      const int32_t sx_sum = p.sumx[m * p.G + j];
      const float sx = p.sx[m * p.GA + ja];
      for (int c = 0; c < NT; ++c) {
        const int64_t n = n0 + c;
        const int32_t wz = p.wz[n * p.GW + jw];
        // Σ (xu - xo)(u - wz) = Σ xu·u - wz·Σxu - xo·Σu + g·xo·wz, exact in int32.
        const int32_t acc = raw[i][c] - wz * sx_sum - xo * p.sumu[n * p.G + j] + int32_t(p.group) * xo * wz;
        // The scales in IntLinear's order: (acc · s_x) · s_w per group, summed group by group.
        float part = float(acc) * sx;
        if (p.GW > 1) part = part * p.sw[n * p.GW + j];
        yv[i][c] = (j == 0) ? part : yv[i][c] + part;
      }
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int c = 0; c < NT; ++c) {
      const int64_t n = n0 + c;
      float v = yv[i][c];
      if (p.GW == 1) v = v * p.sw[n];
      if (p.bias) v = v + p.bias[n];
      p.y[(m0 + i) * p.N + n] = v;
    }
}

// One row (decode, and a prompt's last rows): 4 columns share each activation load, weights read packed.
void run_row(const Problem& p, int64_t m0, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) run_tile<1, 4>(p, m0, n);
  for (; n < n_end; ++n) run_tile<1, 1>(p, m0, n);
}

// Four rows over columns [n_begin, n_end) whose weights are unpacked in wu (row stride K).
constexpr int kPrefillRows = 4;
void run_rows_unpacked(const Problem& p, int64_t m0, int64_t n_begin, int64_t n_end, const uint8_t* wu,
                       int32_t* raw) {
#if defined(__AVX2__)
  if (p.G == 1) {
    // One group (per channel): the integer sums of the whole strip first, then the scales eight columns at a
    // time, with the scalar epilogue's operations in its order (run_tile), so the same bits.
    const int64_t width = n_end - n_begin;
    int64_t n = n_begin;
    for (; n + 2 <= n_end; n += 2)
      store_sums_4x2(tile_sums_4x2(p.xu + m0 * p.K, p.K, wu + (n - n_begin) * p.K), raw, width, n - n_begin);
    if (n < n_end) {
      int32_t t[4][1];
      tile_dot_unpacked<4, 1>(p.xu + m0 * p.K, p.K, wu + (n - n_begin) * p.K, p.K, 0, p.K / kBlock, t);
      for (int i = 0; i < 4; ++i) raw[i * width + n - n_begin] = t[i][0];
    }
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + i;
      const int32_t xo = p.xo[m], sxs = p.sumx[m];
      const float sx = p.sx[m];
      const int32_t* r = raw + i * width;
      float* y = p.y + m * p.N;
      int64_t c = n_begin;
      for (; c + 8 <= n_end; c += 8) {
        const __m256i wz = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.wz + c));
        __m256i acc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + c - n_begin));
        acc = _mm256_sub_epi32(acc, _mm256_mullo_epi32(wz, _mm256_set1_epi32(sxs)));
        acc = _mm256_sub_epi32(acc, _mm256_mullo_epi32(_mm256_set1_epi32(xo),
                                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.sumu + c))));
        acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(_mm256_set1_epi32(int32_t(p.group) * xo), wz));
        __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(sx)), _mm256_loadu_ps(p.sw + c));
        if (p.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(p.bias + c));
        _mm256_storeu_ps(y + c, v);
      }
      for (; c < n_end; ++c) {
        const int32_t wz = p.wz[c];
        const int32_t acc = r[c - n_begin] - wz * sxs - xo * p.sumu[c] + int32_t(p.group) * xo * wz;
        float v = float(acc) * sx;
        v = v * p.sw[c];
        if (p.bias) v = v + p.bias[c];
        y[c] = v;
      }
    }
    return;
  }
#endif
  (void)raw;
  int64_t n = n_begin;
  for (; n + 2 <= n_end; n += 2) run_tile<kPrefillRows, 2>(p, m0, n, wu + (n - n_begin) * p.K);
  for (; n < n_end; ++n) run_tile<kPrefillRows, 1>(p, m0, n, wu + (n - n_begin) * p.K);
}

}  // namespace

// y [M, N] float32 = Σ_groups ((xu - xo)·(u - wz)) · s_x · s_w (+ bias); see the file comment.
at::Tensor int4_linear(at::Tensor xu, at::Tensor xo, at::Tensor sx, at::Tensor w,
                          at::Tensor wz, at::Tensor sumu, at::Tensor sw, c10::optional<at::Tensor> bias,
                          int64_t group) {
  TORCH_CHECK(xu.dtype() == at::kByte && xu.dim() == 2 && xu.is_contiguous(), "xu: contiguous uint8 [M, K]");
  TORCH_CHECK(w.dtype() == at::kByte && w.dim() == 2 && w.is_contiguous(), "w: contiguous uint8 [N, K/2]");
  const int64_t M = xu.size(0), K = xu.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) * 2 == K, "w must hold K/2 bytes per row");
  TORCH_CHECK(group > 0 && group % kBlock == 0 && K % group == 0, "group must be a multiple of 32 dividing K");
  const int64_t G = K / group;
  TORCH_CHECK(xo.dtype() == at::kInt && xo.is_contiguous() && xo.size(0) == M, "xo: int32 [M, GA]");
  TORCH_CHECK(sx.dtype() == at::kFloat && sx.is_contiguous() && sx.sizes() == xo.sizes(), "sx: float [M, GA]");
  TORCH_CHECK(wz.dtype() == at::kInt && wz.is_contiguous() && wz.size(0) == N, "wz: int32 [N, GW]");
  TORCH_CHECK(sw.dtype() == at::kFloat && sw.is_contiguous() && sw.sizes() == wz.sizes(), "sw: float [N, GW]");
  TORCH_CHECK(sumu.dtype() == at::kInt && sumu.is_contiguous() && sumu.size(0) == N && sumu.size(1) == G,
              "sumu: int32 [N, G]");
  const int64_t GA = xo.size(1), GW = wz.size(1);
  TORCH_CHECK(GA == 1 || GA == G, "activation groups must be 1 or K/group");
  TORCH_CHECK(GW == 1 || GW == G, "weight groups must be 1 or K/group");
  const float* b = bias_data(bias, N);
  // Σ xu per row and group: a plain loop (an ATen reduction costs more than the decode GEMV it feeds).
  auto sumx = at::empty({M, G}, xu.options().dtype(at::kInt));
  {
    const uint8_t* xp = xu.data_ptr<uint8_t>();
    int32_t* sp = sumx.data_ptr<int32_t>();
    for (int64_t r = 0; r < M * G; ++r) {
#if defined(__AVX2__)
      __m256i acc = _mm256_setzero_si256();  // sums of 8 bytes in four 64-bit lanes
      for (int64_t k = 0; k < group; k += kBlock)
        acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + r * group + k)),
                                                    _mm256_setzero_si256()));
      __m128i t = _mm_add_epi64(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
      sp[r] = int32_t(_mm_cvtsi128_si64(t) + _mm_extract_epi64(t, 1));
#else
      int32_t acc = 0;
      for (int64_t k = 0; k < group; ++k) acc += xp[r * group + k];
      sp[r] = acc;
#endif
    }
  }
  auto y = at::empty({M, N}, xu.options().dtype(at::kFloat));
  Problem p{M, N, K, group, G, GA, GW, xu.data_ptr<uint8_t>(), xo.data_ptr<int32_t>(), sx.data_ptr<float>(),
            sumx.data_ptr<int32_t>(), w.data_ptr<uint8_t>(), wz.data_ptr<int32_t>(), sumu.data_ptr<int32_t>(),
            sw.data_ptr<float>(), b, y.data_ptr<float>()};
  // Threads split the output columns (each reads its own weight rows once); rows of 4 tokens share loads.
  at::parallel_for(0, (N + 3) / 4, 4, [&](int64_t q0, int64_t q1) {
#if defined(__AVX2__)
    // Prefill: columns in chunks small enough to stay in L1 unpacked (one byte per code, 16 KiB), each
    // unpacked once and passed over by every row, so no row tile unpacks weights again.
    const int64_t chunk = M >= kPrefillRows ? std::max<int64_t>(4, (16384 / K) & ~int64_t(3)) : N;
    std::vector<uint8_t> unpacked(M >= kPrefillRows ? chunk * K : 0);
    std::vector<int32_t> raw(M >= kPrefillRows ? kPrefillRows * chunk : 0);
#else
    const int64_t chunk = N;
#endif
    for (int64_t c0 = q0 * 4; c0 < std::min(N, q1 * 4); c0 += chunk) {
      const int64_t c1 = std::min({N, q1 * 4, c0 + chunk});
      int64_t m = 0;
#if defined(__AVX2__)
      if (M >= kPrefillRows) {
        unpack_rows(p.w + c0 * (K / 2), K, c1 - c0, unpacked.data());
        for (; m + kPrefillRows <= M; m += kPrefillRows) run_rows_unpacked(p, m, c0, c1, unpacked.data(), raw.data());
      }
#endif
      for (; m < M; ++m) run_row(p, m, c0, c1);
    }
  });
  return y;
}

namespace {

// Float activations (W4A16): y = Σ_groups (Σ x·u - wz·Σx) · s_w (+ bias), float32 accumulation.
template <int MT, int NT>
void float_tile(const float* x, int64_t K, const uint8_t* w, int64_t group, int64_t G, int64_t GW,
                const float* sumx, const int32_t* wz, const float* sw, const float* bias, float* y, int64_t N,
                int64_t m0, int64_t n0) {
  float out[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int c = 0; c < NT; ++c) out[i][c] = 0.0f;
  const int64_t ldw = K / 2, bpg = group / kBlock;
  for (int64_t j = 0; j < G; ++j) {
    float dot[MT][NT];
#if defined(__AVX2__)
    __m256 acc[MT][NT];
    for (int i = 0; i < MT; ++i)
      for (int c = 0; c < NT; ++c) acc[i][c] = _mm256_setzero_ps();
    const __m256i mask = _mm256_set1_epi32(0x0F);
    for (int64_t b = j * bpg; b < (j + 1) * bpg; ++b) {
      if (MT == 1 && (b & 3) == 0)
        for (int c = 0; c < NT; ++c) _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + NT + c) * ldw + b * (kBlock / 2)), _MM_HINT_T0);
      // One column at a time, eight codes at a time, so the converted weights never outnumber the registers
      // (holding a tile's 32 codes per column as floats spilled and ran 2x slower). Bytes 0-7 and 8-15 widen
      // straight from memory; low nibbles are codes 0-15, high nibbles codes 16-31 (Q4_0 order).
      for (int c = 0; c < NT; ++c) {
        const uint8_t* wb = w + (n0 + c) * ldw + b * (kBlock / 2);
        const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb)));
        const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + 8)));
        const __m256 wf[4] = {_mm256_cvtepi32_ps(_mm256_and_si256(b0, mask)),
                              _mm256_cvtepi32_ps(_mm256_and_si256(b1, mask)),
                              _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)),
                              _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4))};
        for (int i = 0; i < MT; ++i) {
          const float* xp = x + (m0 + i) * K + b * kBlock;
          for (int q = 0; q < 4; ++q) acc[i][c] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + 8 * q), wf[q], acc[i][c]);
        }
      }
    }
    for (int i = 0; i < MT; ++i)
      for (int c = 0; c < NT; ++c) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[i][c]), _mm256_extractf128_ps(acc[i][c], 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        dot[i][c] = _mm_cvtss_f32(s);
      }
#else
    for (int i = 0; i < MT; ++i)
      for (int c = 0; c < NT; ++c) {
        float s = 0.0f;
        for (int64_t b = j * bpg; b < (j + 1) * bpg; ++b) {
          const uint8_t* wb = w + (n0 + c) * ldw + b * (kBlock / 2);
          const float* xb = x + (m0 + i) * K + b * kBlock;
          for (int t = 0; t < 16; ++t) s += xb[t] * float(wb[t] & 0x0F) + xb[t + 16] * float(wb[t] >> 4);
        }
        dot[i][c] = s;
      }
#endif
    const int64_t jw = GW > 1 ? j : 0;
    for (int i = 0; i < MT; ++i)
      for (int c = 0; c < NT; ++c) {
        const int64_t n = n0 + c;
        const float centred = dot[i][c] - float(wz[n * GW + jw]) * sumx[(m0 + i) * G + j];
        out[i][c] += GW > 1 ? centred * sw[n * GW + j] : centred;
      }
  }
  for (int i = 0; i < MT; ++i)
    for (int c = 0; c < NT; ++c) {
      const int64_t n = n0 + c;
      float v = GW > 1 ? out[i][c] : out[i][c] * sw[n];
      if (bias) v += bias[n];
      y[(m0 + i) * N + n] = v;
    }
}

}  // namespace

// y [M, N] = x · ((u - wz) · s_w)ᵀ (+ bias) for float32 x: the weight-only (W4A16) product.
at::Tensor int4_linear_float(at::Tensor x, at::Tensor w, at::Tensor wz, at::Tensor sw,
                                c10::optional<at::Tensor> bias, int64_t group) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(w.dtype() == at::kByte && w.dim() == 2 && w.is_contiguous(), "w: contiguous uint8 [N, K/2]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) * 2 == K, "w must hold K/2 bytes per row");
  TORCH_CHECK(group > 0 && group % kBlock == 0 && K % group == 0, "group must be a multiple of 32 dividing K");
  const int64_t G = K / group;
  TORCH_CHECK(wz.dtype() == at::kInt && wz.is_contiguous() && wz.size(0) == N, "wz: int32 [N, GW]");
  TORCH_CHECK(sw.dtype() == at::kFloat && sw.is_contiguous() && sw.sizes() == wz.sizes(), "sw: float [N, GW]");
  const int64_t GW = wz.size(1);
  TORCH_CHECK(GW == 1 || GW == G, "weight groups must be 1 or K/group");
  const float* b = bias_data(bias, N);
  auto sumx = at::empty({M, G}, x.options());
  {
    const float* xp = x.data_ptr<float>();
    float* sp = sumx.data_ptr<float>();
    for (int64_t r = 0; r < M * G; ++r) {
      float acc = 0.0f;
      for (int64_t k = 0; k < group; ++k) acc += xp[r * group + k];
      sp[r] = acc;
    }
  }
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sxp = sumx.data_ptr<float>();
  const int32_t* zp = wz.data_ptr<int32_t>();
  const float* swp = sw.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, 4, [&](int64_t q0, int64_t q1) {
    const int64_t n0 = q0 * 4, n1 = std::min(N, q1 * 4);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      int64_t n = n0;
      // 4 rows x 2 columns: eight accumulators, each converted code reused by four rows.
      for (; n + 2 <= n1; n += 2) float_tile<4, 2>(xp, K, wp, group, G, GW, sxp, zp, swp, b, yp, N, m, n);
      for (; n < n1; ++n) float_tile<4, 1>(xp, K, wp, group, G, GW, sxp, zp, swp, b, yp, N, m, n);
    }
    for (; m < M; ++m) {
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) float_tile<1, 4>(xp, K, wp, group, G, GW, sxp, zp, swp, b, yp, N, m, n);
      for (; n < n1; ++n) float_tile<1, 1>(xp, K, wp, group, G, GW, sxp, zp, swp, b, yp, N, m, n);
    }
  });
  return y;
}

namespace {

// Accumulators of Σ_k (xu[i][k] - 128) · w[c][k] for int8 weights, 32 at a time with the sign trick (|x|
// unsigned × w signed by x), exact while no code is -128: |x| ≤ 128 and |w| ≤ 127 keep each pair below 2^15.
#if defined(__AVX2__)
template <int MT, int NT>
inline void int8_acc(const uint8_t* xu, const int8_t* w, int64_t K, __m256i acc[MT][NT]) {
  for (int i = 0; i < MT; ++i)
    for (int c = 0; c < NT; ++c) acc[i][c] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
  for (int64_t k = 0; k < K; k += kBlock) {
    __m256i wv[NT];
    for (int c = 0; c < NT; ++c) wv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * K + k));
    if (MT == 1 && (k & 63) == 0)  // as in tile_dot: fetch the next tile's rows ahead
      for (int c = 0; c < NT; ++c) _mm_prefetch(reinterpret_cast<const char*>(w + (NT + c) * K + k), _MM_HINT_T0);
    for (int i = 0; i < MT; ++i) {
      const __m256i xs = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xu + i * K + k)), flip);
      const __m256i ax = _mm256_sign_epi8(xs, xs);
      for (int c = 0; c < NT; ++c) {
        const __m256i p16 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[c], xs));
        acc[i][c] = _mm256_add_epi32(acc[i][c], _mm256_madd_epi16(p16, ones));
      }
    }
  }
}
#endif

// out[i][c] = the sums int8_acc accumulates.
template <int MT, int NT>
inline void int8_tile(const uint8_t* xu, const int8_t* w, int64_t K, int32_t out[MT][NT]) {
#if defined(__AVX2__)
  __m256i acc[MT][NT];
  int8_acc<MT, NT>(xu, w, K, acc);
  for (int i = 0; i < MT; ++i)
    for (int c = 0; c < NT; ++c) out[i][c] = hsum(acc[i][c]);
#else
  for (int i = 0; i < MT; ++i)
    for (int c = 0; c < NT; ++c) {
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += (int32_t(xu[i * K + k]) - 128) * int32_t(w[c * K + k]);
      out[i][c] = s;
    }
#endif
}

template <int MT, int NT>
inline void int8_block(const uint8_t* xp, const int32_t* xop, const int8_t* wp, const int32_t* wsp,
                       const float* sxp, const float* swp, const float* b, float* yp, int64_t K, int64_t N,
                       int64_t m, int64_t n) {
  int32_t acc[MT][NT];
  int8_tile<MT, NT>(xp + m * K, wp + n * K, K, acc);
  for (int i = 0; i < MT; ++i)
    for (int c = 0; c < NT; ++c) {
      // Σ (xu - xo)·w = Σ (xu - 128)·w + (128 - xo)·Σw, exact in int32.
      const int32_t exact = acc[i][c] + (128 - xop[m + i]) * wsp[n + c];
      float v = float(exact) * sxp[m + i];
      v = v * swp[n + c];
      if (b) v = v + b[n + c];
      yp[(m + i) * N + n + c] = v;
    }
}

#if defined(__AVX2__)
// Prefill: a 4-row x 2-column tile of Σ (xu - 128)·w (int8_tile's sign trick), row-major in one vector.
inline __m256i int8_sums_4x2(const uint8_t* xu, int64_t K, const int8_t* w) {
  __m256i acc[4][2];
  int8_acc<4, 2>(xu, w, K, acc);
  return hsum8(acc);
}

// Rows [m0, m0 + 4) x columns [n0, n1): the sums tile by tile, then int8_block's epilogue eight columns at a
// time in its order (same bits).
void int8_rows4(const uint8_t* xp, const int32_t* xop, const int8_t* wp, const int32_t* wsp, const float* sxp,
                const float* swp, const float* b, float* yp, int64_t K, int64_t N, int64_t m0, int64_t n0,
                int64_t n1, int32_t* raw) {
  const int64_t width = n1 - n0;
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) store_sums_4x2(int8_sums_4x2(xp + m0 * K, K, wp + n * K), raw, width, n - n0);
  if (n < n1) {
    int32_t t[4][1];
    int8_tile<4, 1>(xp + m0 * K, wp + n * K, K, t);
    for (int i = 0; i < 4; ++i) raw[i * width + n - n0] = t[i][0];
  }
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + i;
    const int32_t off = 128 - xop[m];
    const float sx = sxp[m];
    const int32_t* r = raw + i * width;
    float* y = yp + m * N;
    int64_t c = n0;
    for (; c + 8 <= n1; c += 8) {
      const __m256i ws = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wsp + c));
      const __m256i exact = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + c - n0)),
                                             _mm256_mullo_epi32(_mm256_set1_epi32(off), ws));
      __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(exact), _mm256_set1_ps(sx)), _mm256_loadu_ps(swp + c));
      if (b) v = _mm256_add_ps(v, _mm256_loadu_ps(b + c));
      _mm256_storeu_ps(y + c, v);
    }
    for (; c < n1; ++c) {
      float v = float(r[c - n0] + off * wsp[c]) * sx;
      v = v * swp[c];
      if (b) v = v + b[c];
      y[c] = v;
    }
  }
}
#endif

}  // namespace

// y [M, N] = (Σ (xu - xo)·w) · s_x · s_w (+ bias): activation codes of ≤ 8 bits × int8 weights per channel
// (W8A8 layers, the lm_head over the embedding table), in IntLinear's float order.
at::Tensor int8_linear(at::Tensor xu, at::Tensor xo, at::Tensor sx, at::Tensor w,
                          at::Tensor wsum, at::Tensor sw, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(xu.dtype() == at::kByte && xu.dim() == 2 && xu.is_contiguous(), "xu: contiguous uint8 [M, K]");
  TORCH_CHECK(w.dtype() == at::kChar && w.dim() == 2 && w.is_contiguous(), "w: contiguous int8 [N, K]");
  const int64_t M = xu.size(0), K = xu.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && K % kBlock == 0, "w must be [N, K] with K a multiple of 32");
  TORCH_CHECK(sx.dtype() == at::kFloat && sx.numel() == M && sx.is_contiguous(), "sx: float [M]");
  TORCH_CHECK(xo.dtype() == at::kInt && xo.numel() == M && xo.is_contiguous(), "xo: int32 [M]");
  TORCH_CHECK(wsum.dtype() == at::kInt && wsum.numel() == N && wsum.is_contiguous(), "wsum: int32 [N]");
  TORCH_CHECK(sw.dtype() == at::kFloat && sw.numel() == N && sw.is_contiguous(), "sw: float [N]");
  const float* b = bias_data(bias, N);
  auto y = at::empty({M, N}, sx.options());
  const uint8_t* xp = xu.data_ptr<uint8_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const int32_t* xop = xo.data_ptr<int32_t>();
  const int32_t* wsp = wsum.data_ptr<int32_t>();
  const float* sxp = sx.data_ptr<float>();
  const float* swp = sw.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t q0, int64_t q1) {
    const int64_t n0 = q0 * 4, n1 = std::min(N, q1 * 4);
    int64_t m = 0;
#if defined(__AVX2__)
    if (M >= 4) {
      // Prefill (e.g. the lm_head over a 2048-token window): blocks of 256 rows (L2) pass over strips of
      // columns small enough to stay in L1 (16 KiB of weights).
      const int64_t strip = std::max<int64_t>(2, 16384 / K), rows = 256, full = M / 4 * 4;
      std::vector<int32_t> raw(4 * strip);
      for (int64_t r0 = 0; r0 < full; r0 += rows)
        for (int64_t c0 = n0; c0 < n1; c0 += strip)
          for (int64_t mm = r0; mm < std::min(full, r0 + rows); mm += 4)
            int8_rows4(xp, xop, wp, wsp, sxp, swp, b, yp, K, N, mm, c0, std::min(n1, c0 + strip), raw.data());
      m = full;
    }
#endif
    for (; m + 4 <= M; m += 4) {
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) int8_block<4, 4>(xp, xop, wp, wsp, sxp, swp, b, yp, K, N, m, n);
      for (; n < n1; ++n) int8_block<4, 1>(xp, xop, wp, wsp, sxp, swp, b, yp, K, N, m, n);
    }
    for (; m < M; ++m) {
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) int8_block<1, 4>(xp, xop, wp, wsp, sxp, swp, b, yp, K, N, m, n);
      for (; n < n1; ++n) int8_block<1, 1>(xp, xop, wp, wsp, sxp, swp, b, yp, K, N, m, n);
    }
  });
  return y;
}

// Per-row (or per-group) dynamic quantization with the float operations of quant.quantizer.quantize_activation,
// so the codes are the ones the fake-quant model computes. Returns (xu uint8 = code - qmin, xo int32 = the
// zero point in the same units, scale float32), offsets and scales shaped [M, G].
std::vector<at::Tensor> quantize_rows(at::Tensor x, int64_t bits, bool symmetric, double clip, int64_t group) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be 2..8");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(group > 0 && K % group == 0, "group must divide K");
  const int64_t G = K / group;
  const int32_t qmin = symmetric ? -(1 << (bits - 1)) : 0;
  const int32_t qmax = symmetric ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
  const float clipf = float(clip);
  const bool clipped = clip != 1.0;
  const float floor = 1e-8f;  // _scale_floor for float32
  const float tiny = std::numeric_limits<float>::min();
  auto xu = at::empty({M, K}, x.options().dtype(at::kByte));
  auto xo = at::empty({M, G}, x.options().dtype(at::kInt));
  auto sx = at::empty({M, G}, x.options());
  const float* xp = x.data_ptr<float>();
  uint8_t* up = xu.data_ptr<uint8_t>();
  int32_t* op = xo.data_ptr<int32_t>();
  float* sp = sx.data_ptr<float>();
  at::parallel_for(0, M * G, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* v = xp + r * group;
      uint8_t* u = up + r * group;
      float lo = v[0], hi = v[0];
      int64_t k0 = 1;
#if defined(__AVX2__)
      if (group >= 8) {
        __m256 vlo = _mm256_loadu_ps(v), vhi = vlo;
        for (k0 = 8; k0 + 8 <= group; k0 += 8) {
          const __m256 t = _mm256_loadu_ps(v + k0);
          vlo = _mm256_min_ps(t, vlo);  // a NaN in t is skipped, as std::min(lo, v) skips it
          vhi = _mm256_max_ps(t, vhi);
        }
        alignas(32) float l[8], h[8];
        _mm256_store_ps(l, vlo);
        _mm256_store_ps(h, vhi);
        for (int t = 0; t < 8; ++t) {
          lo = std::min(lo, l[t]);
          hi = std::max(hi, h[t]);
        }
      }
#endif
      for (int64_t k = k0; k < group; ++k) {
        lo = std::min(lo, v[k]);
        hi = std::max(hi, v[k]);
      }
      float scale, zero = 0.0f;
      if (symmetric) {
        float amax = std::max(-lo, hi);
        if (clipped) amax = amax * clipf;
        scale = amax / float(qmax);
        scale = std::max(scale, floor);
      } else {
        lo = std::min(lo, 0.0f);
        hi = std::max(hi, 0.0f);
        if (clipped) {
          lo = lo * clipf;
          hi = hi * clipf;
        }
        scale = (hi - lo) / float(qmax);
        zero = std::nearbyint(-lo / std::max(scale, tiny));
        scale = std::max(scale, floor);
      }
      int64_t k = 0;
#if defined(__AVX2__)
      // The same IEEE operations eight at a time: exact division, round-half-even (nearbyint), clamp.
      const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zero), vmin = _mm256_set1_ps(float(qmin)),
                   vmax = _mm256_set1_ps(float(qmax));
      for (; k + 8 <= group; k += 8) {
        __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(v + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm256_sub_ps(_mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, vz), vmin), vmax), vmin);  // 0..255, exact
        const __m256i c = _mm256_cvtps_epi32(q);
        const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(u + k), _mm_packus_epi16(w16, w16));
      }
#endif
      for (; k < group; ++k) {
        float q = std::nearbyint(v[k] / scale) + zero;
        q = std::min(std::max(q, float(qmin)), float(qmax));
        u[k] = uint8_t(int32_t(q) - qmin);
      }
      op[r] = int32_t(zero) - qmin;
      sp[r] = scale;
    }
  });
  return {xu, xo, sx};
}

namespace {

// One cached vector (head_dim values) as floats: codes (packed two per byte at ≤ 4 bits, pairs in order)
// → (u + qmin - zero) · scale, the formula of CodeStore.read; or a float row as it is.
inline void cached_row(const at::Tensor& codes, const float* scale, const float* zero, int64_t row, int64_t D,
                       int64_t bits, int32_t qmin, float* out) {
  if (codes.scalar_type() == at::kFloat) {
    const float* src = codes.data_ptr<float>() + row * D;
    for (int64_t d = 0; d < D; ++d) out[d] = src[d];
    return;
  }
  const float s = scale[row], z = zero ? zero[row] : 0.0f;
  if (bits <= 4) {
    const uint8_t* src = codes.data_ptr<uint8_t>() + row * (D / 2);
    for (int64_t d = 0; d < D / 2; ++d) {
      out[2 * d] = (float(src[d] & 0x0F) + float(qmin) - z) * s;
      out[2 * d + 1] = (float(src[d] >> 4) + float(qmin) - z) * s;
    }
  } else {
    const uint8_t* src = codes.data_ptr<uint8_t>() + row * D;
    for (int64_t d = 0; d < D; ++d) out[d] = (float(src[d]) + float(qmin) - z) * s;
  }
}

#if defined(__AVX2__)
inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// Σ a[d]·b[d]; eight lanes at a time where D allows (a plain loop stays scalar without -ffast-math).
inline float dot_product(const float* a, const float* b, int64_t D) {
#if defined(__AVX2__)
  if (D % 8 == 0) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    return hsum_ps(acc);
  }
#endif
  float s = 0.0f;
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

}  // namespace

// Attention of one query token over cached positions 0 .. position: q [H, D] float32; K/V caches
// [Hkv, T, D or D/2] (uint8 codes, or float32 when not quantized) with scale / zero [Hkv, T, 1] (zero may be
// empty: symmetric). Grouped-query heads share their KV head. Reads only what is cached: cost ∝ length.
at::Tensor decode_attention(at::Tensor q, at::Tensor k, at::Tensor k_scale, at::Tensor k_zero, int64_t k_bits,
                            bool k_sym, at::Tensor v, at::Tensor v_scale, at::Tensor v_zero, int64_t v_bits,
                            bool v_sym, at::Tensor position, double scaling) {
  const int64_t length = position.item<int64_t>() + 1;  // a tensor, so a compiled caller is not specialised on it
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 2 && q.is_contiguous(), "q: contiguous float [H, D]");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.dim() == 3 && v.dim() == 3, "caches: [Hkv, T, *]");
  const int64_t H = q.size(0), D = q.size(1), Hkv = k.size(0), T = k.size(1);
  TORCH_CHECK(H % Hkv == 0 && length > 0 && length <= T, "bad head counts or length");
  auto check = [&](const at::Tensor& t) {
    TORCH_CHECK(!t.defined() || t.numel() == 0 || (t.scalar_type() == at::kFloat && t.is_contiguous() &&
                t.numel() == Hkv * T), "scales / zeros: contiguous float [Hkv, T, 1]");
  };
  check(k_scale); check(k_zero); check(v_scale); check(v_zero);
  auto ptr = [](const at::Tensor& t) -> const float* {
    return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr;
  };
  const float *ks = ptr(k_scale), *kz = ptr(k_zero), *vs = ptr(v_scale), *vz = ptr(v_zero);
  const int32_t kq = k_sym ? -(1 << (k_bits - 1)) : 0, vq = v_sym ? -(1 << (v_bits - 1)) : 0;
  auto out = at::zeros({H, D}, q.options());
  const int64_t group = H / Hkv;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, Hkv, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> row(D), scores(group * length);
    for (int64_t kv = h0; kv < h1; ++kv) {
      for (int64_t t = 0; t < length; ++t) {
        cached_row(k, ks, kz, kv * T + t, D, k_bits, kq, row.data());
        for (int64_t g = 0; g < group; ++g) {
          scores[g * length + t] = dot_product(qp + (kv * group + g) * D, row.data(), D) * float(scaling);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sc = scores.data() + g * length;
        float mx = sc[0];
        for (int64_t t = 1; t < length; ++t) mx = std::max(mx, sc[t]);
        float sum = 0.0f;
        for (int64_t t = 0; t < length; ++t) {
          sc[t] = std::exp(sc[t] - mx);
          sum += sc[t];
        }
        for (int64_t t = 0; t < length; ++t) sc[t] /= sum;
      }
      for (int64_t t = 0; t < length; ++t) {
        cached_row(v, vs, vz, kv * T + t, D, v_bits, vq, row.data());
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * length + t];
          float* oh = op + (kv * group + g) * D;
          for (int64_t d = 0; d < D; ++d) oh[d] += p * row[d];
        }
      }
    }
  });
  return out;
}

// Quantize one token's K or V rows x [Hkv, D] as quantize_rows does (per row) and write them at `position`
// of the static cache: codes [Hkv, T, D/2 or D] (two per byte, pairs in order, as packing.pack_unsigned),
// scale [Hkv, T, 1], zero [Hkv, T, 1] (asymmetric only). A float32 cache (no KV quantization) takes x as is.
void kv_append(at::Tensor x, at::Tensor codes, at::Tensor scale, at::Tensor zero, at::Tensor position, int64_t bits,
               bool symmetric, double clip) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [Hkv, D]");
  TORCH_CHECK(codes.dim() == 3 && codes.is_contiguous() && codes.size(0) == x.size(0), "codes: [Hkv, T, *]");
  const int64_t H = x.size(0), D = x.size(1), T = codes.size(1), pos = position.item<int64_t>();
  TORCH_CHECK(pos >= 0 && pos < T, "position outside the cache");
  if (codes.scalar_type() == at::kFloat) {
    TORCH_CHECK(codes.size(2) == D, "float cache: [Hkv, T, D]");
    const float* src = x.data_ptr<float>();
    float* dst = codes.data_ptr<float>();
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) dst[(h * T + pos) * D + d] = src[h * D + d];
    return;
  }
  const bool two = bits <= 4;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.size(2) == (two ? D / 2 : D), "codes: uint8 [Hkv, T, D/2 or D]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == H * T, "scale: [Hkv, T, 1]");
  TORCH_CHECK(symmetric || (zero.scalar_type() == at::kFloat && zero.is_contiguous() && zero.numel() == H * T),
              "zero: [Hkv, T, 1]");
  auto q = quantize_rows(x, bits, symmetric, clip, D);
  const uint8_t* u = q[0].data_ptr<uint8_t>();
  const int32_t* xo = q[1].data_ptr<int32_t>();
  const float* sx = q[2].data_ptr<float>();
  uint8_t* dst = codes.data_ptr<uint8_t>();
  float* sp = scale.data_ptr<float>();
  for (int64_t h = 0; h < H; ++h) {
    const uint8_t* row = u + h * D;
    if (two) {
      uint8_t* out = dst + (h * T + pos) * (D / 2);
      for (int64_t d = 0; d < D / 2; ++d) out[d] = uint8_t(row[2 * d] | (row[2 * d + 1] << 4));
    } else {
      uint8_t* out = dst + (h * T + pos) * D;
      for (int64_t d = 0; d < D; ++d) out[d] = row[d];
    }
    sp[h * T + pos] = sx[h];
    if (!symmetric) zero.data_ptr<float>()[h * T + pos] = float(xo[h]);
  }
}

// quantize_rows then int4_linear: the activation-quantized linear as one call (the decode step makes ~120 a
// token; each dispatch from Python costs microseconds).
at::Tensor int4_linear_dynamic(at::Tensor x, int64_t bits, bool symmetric, double clip, int64_t act_group, at::Tensor w,
                               at::Tensor wz, at::Tensor sumu, at::Tensor sw, c10::optional<at::Tensor> bias,
                               int64_t group) {
  auto q = quantize_rows(x, bits, symmetric, clip, act_group);
  return int4_linear(q[0], q[1], q[2], w, wz, sumu, sw, bias, group);
}

// The small float steps of a decode layer, each one pass instead of 3-6 ATen calls of ~5 µs on a CPU.
// rms_norm: weight · (x · 1/√(mean(x²) + eps)) per row, as transformers' RMSNorm (float32).
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(weight.dtype() == at::kFloat && weight.numel() == K && weight.is_contiguous(), "weight: float [K]");
  auto y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* r = xp + m * K;
    const float ms = dot_product(r, r, K) / float(K);
    const float inv = 1.0f / std::sqrt(ms + float(eps));
    for (int64_t k = 0; k < K; ++k) yp[m * K + k] = wp[k] * (r[k] * inv);
  }
  return y;
}

// Rotary embedding of rows x [R, D] at one position: x·cos + rotate_half(x)·sin (transformers' formula,
// the same float operations).
at::Tensor rope(at::Tensor x, at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [R, D]");
  const int64_t R = x.size(0), D = x.size(1), half = D / 2;
  TORCH_CHECK(cos.numel() == D && sin.numel() == D && cos.is_contiguous() && sin.is_contiguous() &&
              cos.dtype() == at::kFloat && sin.dtype() == at::kFloat, "cos / sin: float [D]");
  auto y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const float* a = xp + r * D;
    float* o = yp + r * D;
    for (int64_t d = 0; d < half; ++d) o[d] = a[d] * c[d] + (-a[d + half]) * s[d];
    for (int64_t d = half; d < D; ++d) o[d] = a[d] * c[d] + a[d - half] * s[d];
  }
  return y;
}

// silu(g) · u for gu = [g | u] of shape [M, 2F] → [M, F].
at::Tensor silu_mul(at::Tensor gu) {
  TORCH_CHECK(gu.dtype() == at::kFloat && gu.dim() == 2 && gu.is_contiguous() && gu.size(1) % 2 == 0,
              "gu: contiguous float32 [M, 2F]");
  const int64_t M = gu.size(0), F = gu.size(1) / 2;
  auto y = at::empty({M, F}, gu.options());
  const float* p = gu.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t f = 0; f < F; ++f) {
      const float g = p[m * 2 * F + f];
      yp[m * F + f] = (g / (1.0f + std::exp(-g))) * p[m * 2 * F + F + f];
    }
  return y;
}

// x [R, n] → x · H_n / √n for n = k·p, p a power of two, H_n = H_k ⊗ S_p (hadamard.hadamard_matrix): each
// length-p piece by in-place butterflies (Sylvester order), then the k pieces mixed by base [k, k] = H_kᵀ
// (empty for k = 1). One pass instead of BLAS's two or three small matmuls (~35 µs each at one row).
at::Tensor hadamard_rows(at::Tensor x, at::Tensor base) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [R, n]");
  const int64_t R = x.size(0), n = x.size(1), k = base.numel() ? base.size(0) : 1, p = n / k;
  TORCH_CHECK(p * k == n && p > 0 && (p & (p - 1)) == 0, "n must be k times a power of two");
  TORCH_CHECK(k == 1 || (base.dtype() == at::kFloat && base.is_contiguous() && base.numel() == k * k), "base: float [k, k]");
  auto y = x.clone();
  float* yp = y.data_ptr<float>();
  const float* bp = k > 1 ? base.data_ptr<float>() : nullptr;
  const float norm = 1.0f / std::sqrt(float(n));
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / n), [&](int64_t r0, int64_t r1) {
    std::vector<float> mixed(k > 1 ? n : 0);
    for (int64_t r = r0; r < r1; ++r) {
      float* row = yp + r * n;
      for (int64_t j = 0; j < k; ++j) {
        float* v = row + j * p;
        int64_t h = 1;
#if defined(__AVX2__)
        if (p >= 8) {
          // Strides 1, 2, 4 inside each vector of 8: the partner by a permute, then a + b in the lower and
          // a - b in the upper lanes of each pair (the scalar butterfly's operations, so the same bits).
          for (int64_t t = 0; t < p; t += 8) {
            __m256 a = _mm256_loadu_ps(v + t), s;
            s = _mm256_permute_ps(a, 0xB1);
            a = _mm256_blend_ps(_mm256_add_ps(a, s), _mm256_sub_ps(s, a), 0xAA);
            s = _mm256_permute_ps(a, 0x4E);
            a = _mm256_blend_ps(_mm256_add_ps(a, s), _mm256_sub_ps(s, a), 0xCC);
            s = _mm256_permute2f128_ps(a, a, 1);
            a = _mm256_blend_ps(_mm256_add_ps(a, s), _mm256_sub_ps(s, a), 0xF0);
            _mm256_storeu_ps(v + t, a);
          }
          for (h = 8; h < p; h *= 2)
            for (int64_t i = 0; i < p; i += 2 * h)
              for (int64_t t = i; t < i + h; t += 8) {
                const __m256 a = _mm256_loadu_ps(v + t), b = _mm256_loadu_ps(v + t + h);
                _mm256_storeu_ps(v + t, _mm256_add_ps(a, b));
                _mm256_storeu_ps(v + t + h, _mm256_sub_ps(a, b));
              }
        }
#endif
        for (; h < p; h *= 2)
          for (int64_t i = 0; i < p; i += 2 * h)
            for (int64_t t = i; t < i + h; ++t) {
              const float a = v[t], b = v[t + h];
              v[t] = a + b;
              v[t + h] = a - b;
            }
      }
      if (k > 1) {
        for (int64_t i = 0; i < k; ++i) {
          float* out = mixed.data() + i * p;
          for (int64_t d = 0; d < p; ++d) out[d] = 0.0f;
          for (int64_t j = 0; j < k; ++j) {
            const float c = bp[i * k + j];
            const float* in = row + j * p;
            for (int64_t d = 0; d < p; ++d) out[d] += c * in[d];
          }
        }
        for (int64_t d = 0; d < n; ++d) row[d] = mixed[d] * norm;
      } else {
        for (int64_t d = 0; d < n; ++d) row[d] *= norm;
      }
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows_op(at::Tensor x, int64_t bits, bool symmetric,
                                                                       double clip, int64_t group) {
  auto out = quantize_rows(x, bits, symmetric, clip, group);
  return {out[0], out[1], out[2]};
}

// Registered with the dispatcher (torch.ops.spinquant.*) so that calls from eager code and from
// torch.compile'd graphs go straight to C++; shape functions for tracing are in native/__init__.py.
TORCH_LIBRARY(spinquant, m) {
  m.def("quantize_rows(Tensor x, int bits, bool symmetric, float clip, int group) -> (Tensor, Tensor, Tensor)");
  m.def("int4_linear(Tensor xu, Tensor xo, Tensor sx, Tensor w, Tensor wz, Tensor sumu, Tensor sw, Tensor? bias, "
        "int group) -> Tensor");
  m.def("int4_linear_float(Tensor x, Tensor w, Tensor wz, Tensor sw, Tensor? bias, int group) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor k_scale, Tensor k_zero, int k_bits, bool k_sym, Tensor v, "
        "Tensor v_scale, Tensor v_zero, int v_bits, bool v_sym, Tensor position, float scaling) -> Tensor");
  m.def("kv_append(Tensor x, Tensor(a!) codes, Tensor(b!) scale, Tensor(c!) zero, Tensor position, int bits, "
        "bool symmetric, float clip) -> ()");
  m.def("int4_linear_dynamic(Tensor x, int bits, bool symmetric, float clip, int act_group, Tensor w, Tensor wz, "
        "Tensor sumu, Tensor sw, Tensor? bias, int group) -> Tensor");
  m.def("hadamard_rows(Tensor x, Tensor base) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("int8_linear(Tensor xu, Tensor xo, Tensor sx, Tensor w, Tensor wsum, Tensor sw, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(spinquant, CPU, m) {
  m.impl("quantize_rows", &quantize_rows_op);
  m.impl("int4_linear", &int4_linear);
  m.impl("kv_append", &kv_append);
  m.impl("int4_linear_dynamic", &int4_linear_dynamic);
  m.impl("rms_norm", &rms_norm);
  m.impl("hadamard_rows", &hadamard_rows);
  m.impl("rope", &rope);
  m.impl("silu_mul", &silu_mul);
  m.impl("int4_linear_float", &int4_linear_float);
  m.impl("int8_linear", &int8_linear);
  m.impl("decode_attention", &decode_attention);
}
