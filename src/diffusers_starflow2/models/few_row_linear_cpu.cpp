// Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
//
// The CPU kernel of diffusers_starflow2::few_row_linear (defined in utils/compile_utils.py): y = x W^T + b for the
// few rows of a decode step (a batch times its guidance branches), float32 or bfloat16 weights read once as stored.
// The product is bound by reading the weight.  In a compiled chain of layers, each fed by the one before, inductor's
// own reductions read bfloat16 at about two thirds of this loop's rate, and the BLAS GEMM float32 a little below it
// (benchmarks/bench_gemm.py --dependent).  Four weight rows per step (four independent sums per row of x; two with
// more than four rows of x, so that the sums stay in registers), accumulated in float32; while one run of weight
// rows is read, the next is prefetched.  Built and loaded by utils/cpu_kernels.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kMaxRows = 8;  // rows of x the loop is compiled for

// `count` (<= kLanes) elements from `p` as float32 lanes (the rest 0).
inline Vec load(const float* p, int64_t count) { return count == kLanes ? Vec::loadu(p) : Vec::loadu(p, count); }

inline Vec load(const c10::BFloat16* p, int64_t count) {
  if (count == kLanes) {  // bfloat16 is the top half of a float32: widen and shift
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
#endif
  }
  float buffer[kLanes] = {0.f};
  for (int64_t i = 0; i < count; ++i) buffer[i] = static_cast<float>(p[i]);
  return Vec::loadu(buffer);
}

inline float sum_of(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#else
  float lanes[kLanes];
  v.store(lanes);
  float sum = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
#endif
}

// acc[m][j] += x[m, k : k + count] * w[j, k : k + count] for the M rows of x and NB weight rows (K elements apart).
template <typename T, int M, int NB>
inline void accumulate(Vec (&acc)[M][NB], const float* x, const T* w, int64_t K, int64_t k, int64_t count) {
  Vec wv[NB];
  for (int j = 0; j < NB; ++j) wv[j] = load(w + j * K + k, count);
  for (int m = 0; m < M; ++m) {
    const Vec xv = load(x + m * K + k, count);
    for (int j = 0; j < NB; ++j) acc[m][j] = at::vec::fmadd(xv, wv[j], acc[m][j]);
  }
}

// Outputs [n0, n1) of the M rows of x ((M, K) float32, contiguous), NB weight rows per step.  The NB rows of a step
// are one contiguous run of the weight; each step of kLanes elements prefetches the next run's share of lines.
template <typename T, int M, int NB>
void rows_of(const float* x, const T* w, const T* bias, T* y, int64_t K, int64_t n0, int64_t n1, int64_t ldy) {
  constexpr int64_t kLine = 64 / sizeof(T);                       // elements per cache line
  constexpr int64_t kAhead = (NB * kLanes + kLine - 1) / kLine;  // lines of the next run per step
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    Vec acc[M][NB];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < NB; ++j) acc[m][j] = Vec(0.f);
    const T* run = w + n * K;
    const T* next = run + NB * K;
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) {
      for (int64_t l = 0; l < kAhead; ++l) __builtin_prefetch(next + (k / kLanes * kAhead + l) * kLine);
      accumulate<T, M, NB>(acc, x, run, K, k, kLanes);
    }
    if (k < K) accumulate<T, M, NB>(acc, x, run, K, k, K - k);
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < NB; ++j) {
        float sum = sum_of(acc[m][j]);
        if (bias) sum += static_cast<float>(bias[n + j]);
        y[m * ldy + n + j] = static_cast<T>(sum);
      }
  }
  if (n < n1) rows_of<T, M, 1>(x, w, bias, y, K, n, n1, ldy);  // the last weight rows one at a time
}

template <typename T, int M>
void linear_rows(const float* x, const T* w, const T* bias, T* y, int64_t K, int64_t N) {
  constexpr int NB = M <= 4 ? 4 : 2;  // M x NB sums and NB weight vectors in registers
  // 64 weight rows per task at least: each thread streams long runs of the weight
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { rows_of<T, M, NB>(x, w, bias, y, K, n0, n1, N); });
}

template <typename T>
void linear_any_rows(const float* x, const T* w, const T* bias, T* y, int64_t M, int64_t K, int64_t N) {
  switch (M) {
    case 1: return linear_rows<T, 1>(x, w, bias, y, K, N);
    case 2: return linear_rows<T, 2>(x, w, bias, y, K, N);
    case 3: return linear_rows<T, 3>(x, w, bias, y, K, N);
    case 4: return linear_rows<T, 4>(x, w, bias, y, K, N);
    case 5: return linear_rows<T, 5>(x, w, bias, y, K, N);
    case 6: return linear_rows<T, 6>(x, w, bias, y, K, N);
    case 7: return linear_rows<T, 7>(x, w, bias, y, K, N);
    default: return linear_rows<T, 8>(x, w, bias, y, K, N);
  }
}

// x (..., K), weight (N, K), bias (N,) or None, all float32 or all bfloat16, at most kMaxRows rows of x: returns
// (..., N) in that dtype.  Anything else goes to ATen's linear, which is what the operator's Python body calls.
at::Tensor few_row_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const auto dtype = weight.scalar_type();
  const int64_t K = weight.dim() == 2 ? weight.size(1) : 0, N = weight.dim() == 2 ? weight.size(0) : 0;
  const int64_t M = K && x.dim() > 0 && x.size(-1) == K ? x.numel() / K : 0;
  const bool ours = (dtype == at::kFloat || dtype == at::kBFloat16) && x.scalar_type() == dtype && M > 0 &&
                    M <= kMaxRows && (!bias.has_value() || (bias->scalar_type() == dtype && bias->numel() == N));
  if (!ours) return at::linear(x, weight, bias);
  auto xf = x.reshape({M, K}).to(at::kFloat).contiguous();
  auto wc = weight.contiguous();
  auto bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto y = at::empty({M, N}, x.options());
  if (dtype == at::kFloat)
    linear_any_rows<float>(xf.const_data_ptr<float>(), wc.const_data_ptr<float>(),
                           bc.defined() ? bc.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(), M, K, N);
  else
    linear_any_rows<c10::BFloat16>(xf.const_data_ptr<float>(), wc.const_data_ptr<c10::BFloat16>(),
                                   bc.defined() ? bc.const_data_ptr<c10::BFloat16>() : nullptr,
                                   y.mutable_data_ptr<c10::BFloat16>(), M, K, N);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(diffusers_starflow2, CPU, m) { m.impl("few_row_linear", &few_row_linear_cpu); }
