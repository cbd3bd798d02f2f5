// Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
//
// The CPU kernel of diffusers_starflow2::cached_attention (defined in attention.py): a few queries of one row
// (sample x key head) over the filled slots of its cached keys and values, in one pass over each, accumulated in
// float32 whatever the cache's dtype.  A decode step's attention is bound by reading the cache; the ATen version
// (two batched products and a softmax, called from Python) adds a few dispatches per call, and for bfloat16 caches
// converts them to float32 before reading them again.  Built and loaded by utils/cpu_kernels.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

namespace {

// Masked slots enter as this instead of -inf: the kernel is built with -ffast-math, which assumes finite values,
// and exp of it is 0 all the same.
constexpr float kMasked = -FLT_MAX / 2;

// One row r at a time (parallel over rows): scores of each query over the filled keys, four keys per step (four
// independent dot products keep the vector units busy and amortise the reductions), the keys a few steps ahead
// prefetched; softmax; then each value row read once for all queries.  DC: the head size at compile time (0: any).
template <typename T, int64_t DC>
void attend(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor* mask,
            int64_t filled, at::Tensor& out) {
  const int64_t R = q.size(0), Q = q.size(1), D = DC ? DC : q.size(2);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = keys.const_data_ptr<T>();
  const T* vp = values.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t qr = q.stride(0), qq = q.stride(1);
  const int64_t kr = keys.stride(0), ks = keys.stride(1), vr = values.stride(0), vs = values.stride(1);
  const float* mp = mask ? mask->const_data_ptr<float>() : nullptr;
  const int64_t mr = mask ? mask->stride(0) : 0, mq = mask ? mask->stride(1) : 0, ms = mask ? mask->stride(2) : 0;

  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Q * D), scores(Q * filled), acc(Q * D);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < Q; ++i)
        for (int64_t d = 0; d < D; ++d) qf[i * D + d] = static_cast<float>(qp[r * qr + i * qq + d]);
      const T* key_row = kp + r * kr;
      for (int64_t i = 0; i < Q; ++i) {
        const float* qi = qf.data() + i * D;
        float* sc = scores.data() + i * filled;  // (filled,)
        int64_t s = 0;
        for (; s + 4 <= filled; s += 4) {
          const T* k0 = key_row + s * ks;
          const T *k1 = k0 + ks, *k2 = k1 + ks, *k3 = k2 + ks;
          for (int64_t ahead = 8; ahead < 12; ++ahead) __builtin_prefetch(k0 + ahead * ks);
          float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
          for (int64_t d = 0; d < D; ++d) {
            const float x = qi[d];
            a0 += x * static_cast<float>(k0[d]);
            a1 += x * static_cast<float>(k1[d]);
            a2 += x * static_cast<float>(k2[d]);
            a3 += x * static_cast<float>(k3[d]);
          }
          sc[s] = a0, sc[s + 1] = a1, sc[s + 2] = a2, sc[s + 3] = a3;
        }
        for (; s < filled; ++s) {
          const T* k0 = key_row + s * ks;
          float a0 = 0.f;
          for (int64_t d = 0; d < D; ++d) a0 += qi[d] * static_cast<float>(k0[d]);
          sc[s] = a0;
        }
        if (mp)
          for (s = 0; s < filled; ++s) sc[s] += std::max(mp[r * mr + i * mq + s * ms], kMasked);
        float top = kMasked;  // softmax over the filled slots
        for (s = 0; s < filled; ++s) top = std::max(top, sc[s]);
        float sum = 0.f;
        for (s = 0; s < filled; ++s) {
          sc[s] = std::exp(sc[s] - top);
          sum += sc[s];
        }
        const float inv = 1.f / sum;
        for (s = 0; s < filled; ++s) sc[s] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);  // outputs (Q, D)
      const T* value_row = vp + r * vr;
      for (int64_t s = 0; s < filled; ++s) {
        const T* value = value_row + s * vs;
        __builtin_prefetch(value + 8 * vs);
        for (int64_t i = 0; i < Q; ++i) {
          const float p = scores[i * filled + s];
          float* a = acc.data() + i * D;
          for (int64_t d = 0; d < D; ++d) a[d] += p * static_cast<float>(value[d]);
        }
      }
      for (int64_t i = 0; i < Q; ++i)
        for (int64_t d = 0; d < D; ++d) op[(r * Q + i) * D + d] = static_cast<T>(acc[i * D + d]);
    }
  });
}

template <typename T>
void attend_any_head_size(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                          const at::Tensor* mask, int64_t filled, at::Tensor& out) {
  if (q.size(2) == 64)
    attend<T, 64>(q, keys, values, mask, filled, out);
  else if (q.size(2) == 128)
    attend<T, 128>(q, keys, values, mask, filled, out);
  else
    attend<T, 0>(q, keys, values, mask, filled, out);
}

// q (R, Q, D), keys / values (R, S, D), attn_mask broadcastable to (R, Q, >= filled) or None, filled a 0-dim int64
// tensor: the first `filled` slots are read.  Returns (R, Q, D) in q's dtype, contiguous.
at::Tensor cached_attention_cpu(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                const std::optional<at::Tensor>& attn_mask, const at::Tensor& filled) {
  const int64_t n = filled.item<int64_t>();
  const auto dtype = q.scalar_type();
  const bool lower = dtype == at::kBFloat16 || dtype == at::kHalf;
  // More queries per row (Jacobi windows, many query heads per key head) make the products compute-bound, where
  // the batched GEMMs win: measured on one thread, this loop is ahead up to 2 float32 queries and 4 bfloat16 ones.
  const bool ours = (dtype == at::kFloat || lower) && keys.scalar_type() == dtype &&
                    values.scalar_type() == dtype && q.dim() == 3 && keys.dim() == 3 && values.dim() == 3 &&
                    q.size(1) <= (lower ? 4 : 2) && n > 0 && n <= keys.size(1);
  if (!ours) {  // the Python body's arithmetic: lower-precision caches in float32, two products and a softmax
    auto to = [&](const at::Tensor& t) { return lower ? t.to(at::kFloat) : t; };
    auto k = to(keys.slice(1, 0, n)), v = to(values.slice(1, 0, n));
    auto scores = at::bmm(to(q), k.transpose(1, 2));
    if (attn_mask.has_value()) scores = scores + to(attn_mask->slice(-1, 0, n));
    return at::bmm(at::softmax(scores, -1, at::kFloat).to(v.scalar_type()), v).to(dtype).contiguous();
  }
  // rows of D contiguous elements; any strides between rows and slots
  auto qc = q.stride(2) == 1 ? q : q.contiguous();
  auto kc = keys.stride(2) == 1 ? keys : keys.contiguous();
  auto vc = values.stride(2) == 1 ? values : values.contiguous();
  at::Tensor mask;
  if (attn_mask.has_value()) mask = attn_mask->to(at::kFloat).expand({q.size(0), q.size(1), attn_mask->size(-1)});
  auto out = at::empty(q.sizes(), q.options());
  const at::Tensor* m = attn_mask.has_value() ? &mask : nullptr;
  if (dtype == at::kFloat)
    attend_any_head_size<float>(qc, kc, vc, m, n, out);
  else if (dtype == at::kBFloat16)
    attend_any_head_size<c10::BFloat16>(qc, kc, vc, m, n, out);
  else
    attend_any_head_size<c10::Half>(qc, kc, vc, m, n, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffusers_starflow2, CPU, m) { m.impl("cached_attention", &cached_attention_cpu); }
