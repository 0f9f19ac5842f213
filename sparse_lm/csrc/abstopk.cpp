// Exact row-wise AbsTopK on CPU: keep the k entries of largest |x| in every row.
//
// Built on first use by sparse_lm/topk.py through torch.utils.cpp_extension.load
// (no pybind: the ops are registered with the dispatcher and called as
// torch.ops.sparse_lm_abstopk.*). With the sign bit cleared, the bits of an IEEE
// float read as an unsigned integer order like its magnitude (NaN above inf, as
// torch.topk orders them), so the selection works on integer keys:
//
// 1. the k-th largest key T is found bit by bit from the top (T | bit is kept when
//    at least k keys are >= it): one vectorized compare-and-count pass per bit over
//    a row that sits in L1 (15 passes for 16-bit floats; for float32 the top 16 bits
//    so, then an exact nth_element among the few keys sharing them);
// 2. every key > T is kept (a vectorized pass writing mask and output), then keys
//    == T from the lowest column on until the row holds exactly k.
//
// Tie rule: of the entries whose |x| equals the k-th largest, the lowest columns are
// kept (-0.0 and +0.0 tie). Rows run in parallel on torch's intra-op thread pool.
// The hot loops are compiled for AVX-512BW, AVX2 and baseline x86-64 (GCC
// target_clones picks one at load time), so the cached build runs on any x86-64.
//
// The same library carries the backward of a per-channel gate, y = x * m + c (m, c: one value per
// channel), which the pruner's mean ablation runs at every node site on every mask step: the
// gradients of x (g * m) and of m (the sum over rows of g * (x - mean)) in one pass over g and x,
// where torch needs four (two products, two reductions).
//
// It also carries the weight projection in one call per matrix (`project_topk_`): the top min_fan of every
// fan slice (row or column) forced in (block maxima bound each slice's min_fan-th |w| from below, and only
// the few entries above the bound are ranked, instead of a selection per slice); the k largest |w| of the
// rest as above; and the matrix zeroed in place outside them, without the float score copy, the bool masks
// and the masked fills the torch-level path makes.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SLM_CLONES __attribute__((target_clones("arch=skylake-avx512", "avx2", "default")))
#else
#define SLM_CLONES
#endif

namespace {

// Number of entries whose key (bits & msk) is >= t.
// Counters as wide as the keys keep the loop in one lane width (2x faster than widening);
// chunks of 2^15 cannot overflow them.
SLM_CLONES int64_t count_ge16(const uint16_t* x, int64_t n, uint16_t t) {
  int64_t total = 0;
  for (int64_t s = 0; s < n; s += 32768) {
    const int64_t e = std::min<int64_t>(n, s + 32768);
    uint16_t c = 0;
    for (int64_t i = s; i < e; ++i) c += (uint16_t)(x[i] & 0x7fffu) >= t;
    total += c;
  }
  return total;
}
SLM_CLONES int64_t count_ge32(const uint32_t* x, int64_t n, uint32_t t) {
  uint32_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += (x[i] & 0x7fffffffu) >= t;
  return c;
}

// keep[i] = key > t; y[i] = keep ? x[i] : +0 (bits), y may be null.
SLM_CLONES void write_gt16(const uint16_t* x, int64_t n, uint16_t t, uint8_t* keep, uint16_t* y) {
  for (int64_t i = 0; i < n; ++i) keep[i] = (uint16_t)(x[i] & 0x7fffu) > t;
  if (y)
    for (int64_t i = 0; i < n; ++i) y[i] = (uint16_t)(x[i] & (uint16_t)(-(uint16_t)keep[i]));
}
SLM_CLONES void write_gt32(const uint32_t* x, int64_t n, uint32_t t, uint8_t* keep, uint32_t* y) {
  for (int64_t i = 0; i < n; ++i) keep[i] = (x[i] & 0x7fffffffu) > t;
  if (y)
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] & (0u - (uint32_t)keep[i]);
}

// Keys == t from the lowest column on, until `take` more are kept.
template <typename U>
inline void take_ties(const U* x, int64_t n, uint32_t msk, uint32_t t, int64_t take, uint8_t* keep, U* y) {
  for (int64_t i = 0; i < n && take > 0; ++i) {
    if (((uint32_t)x[i] & msk) == t) {
      keep[i] = 1;
      if (y) y[i] = x[i];
      --take;
    }
  }
}

// One row of 16-bit floats (bf16, fp16).
inline void select_row16(const uint16_t* x, int64_t n, int64_t k, uint8_t* keep, uint16_t* y) {
  uint32_t t = 0;  // the largest key with at least k keys >= it: the k-th largest key
  for (int b = 14; b >= 0; --b) {
    const uint32_t c = t | (1u << b);
    if (count_ge16(x, n, (uint16_t)c) >= k) t = c;
  }
  const int64_t above = t == 0x7fffu ? 0 : count_ge16(x, n, (uint16_t)(t + 1));
  if (count_ge16(x, n, (uint16_t)t) == k) {  // every key == t is kept: no tie to break
    write_gt16(x, n, (uint16_t)(t - 1), keep, y);  // t >= 1 here: k < n keys are >= t
    return;
  }
  write_gt16(x, n, (uint16_t)t, keep, y);
  take_ties<uint16_t>(x, n, 0x7fffu, t, k - above, keep, y);
}

// One row of float32: the top 16 key bits by counting, the rest exactly among the keys sharing them.
inline void select_row32(const uint32_t* x, int64_t n, int64_t k, uint8_t* keep, uint32_t* y, uint32_t* cand) {
  uint32_t hi = 0;
  for (int b = 30; b >= 16; --b) {
    const uint32_t c = hi | (1u << b);
    if (count_ge32(x, n, c) >= k) hi = c;
  }
  // keys in [hi, hi + 2^16) hold the k-th largest; `above` keys lie beyond them
  const int64_t above = hi == 0x7fff0000u ? 0 : count_ge32(x, n, hi + 0x10000u);
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = x[i] & 0x7fffffffu;
    cand[m] = key;
    m += (key >> 16) == (hi >> 16);
  }
  const int64_t need = k - above;  // 1 <= need <= m
  std::nth_element(cand, cand + (need - 1), cand + m, std::greater<uint32_t>());
  const uint32_t t = cand[need - 1];
  const int64_t gt = t == 0x7fffffffu ? 0 : count_ge32(x, n, t + 1);
  if (count_ge32(x, n, t) == k) {  // every key == t is kept: no tie to break
    write_gt32(x, n, t - 1, keep, y);  // t >= 1 here: k < n keys are >= t
    return;
  }
  write_gt32(x, n, t, keep, y);
  take_ties<uint32_t>(x, n, 0x7fffffffu, t, k - gt, keep, y);
}

template <typename U>
void select_rows(const at::Tensor& x, int64_t k, at::Tensor& keep, at::Tensor* y) {
  const int64_t n = x.size(-1);
  const int64_t rows = n ? x.numel() / n : 0;
  const U* xp = reinterpret_cast<const U*>(x.data_ptr());
  uint8_t* kp = keep.data_ptr<uint8_t>();
  U* yp = y ? reinterpret_cast<U*>(y->data_ptr()) : nullptr;
  // ~16k entries per task: enough work to pay for a thread hand-off
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> cand(sizeof(U) == 4 ? n : 0);
    for (int64_t r = begin; r < end; ++r) {
      if constexpr (sizeof(U) == 4) {
        select_row32(xp + r * n, n, k, kp + r * n, yp ? yp + r * n : nullptr, cand.data());
      } else {
        select_row16(xp + r * n, n, k, kp + r * n, yp ? yp + r * n : nullptr);
      }
    }
  });
}

void check_input(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu(), "sparse_lm_abstopk: CPU tensors only, got ", x.device());
  TORCH_CHECK(x.is_contiguous(), "sparse_lm_abstopk: x must be contiguous");
  TORCH_CHECK(x.dim() >= 1, "sparse_lm_abstopk: x needs at least one dimension");
  TORCH_CHECK(0 < k && k < x.size(-1), "sparse_lm_abstopk: need 0 < k < width, got k=", k,
              " width=", x.size(-1));
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "sparse_lm_abstopk: float32, bfloat16 or float16 only, got ", t);
}

void dispatch(const at::Tensor& x, int64_t k, at::Tensor& keep, at::Tensor* y) {
  if (x.scalar_type() == at::kFloat) {
    select_rows<uint32_t>(x, k, keep, y);
  } else {
    select_rows<uint16_t>(x, k, keep, y);
  }
}

// (y, keep): y = x on the k largest |x| of every row (last dim), 0 elsewhere; keep the uint8 0/1 mask.
std::tuple<at::Tensor, at::Tensor> abstopk(const at::Tensor& x, int64_t k) {
  check_input(x, k);
  at::Tensor keep = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor y = at::empty_like(x);
  dispatch(x, k, keep, &y);
  return {y, keep};
}

// keep only: the uint8 0/1 mask of the k largest |x| of every row.
at::Tensor abstopk_mask(const at::Tensor& x, int64_t k) {
  check_input(x, k);
  at::Tensor keep = at::empty(x.sizes(), x.options().dtype(at::kByte));
  dispatch(x, k, keep, nullptr);
  return keep;
}

template <typename U>
void mask_rows(const at::Tensor& g, const at::Tensor& keep, at::Tensor& out) {
  const U* gp = reinterpret_cast<const U*>(g.data_ptr());
  const uint8_t* kp = keep.data_ptr<uint8_t>();
  U* op = reinterpret_cast<U*>(out.data_ptr());
  at::parallel_for(0, g.numel(), 32768, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) op[i] = gp[i] & (U)(-(U)kp[i]);  // all ones or all zeros
  });
}

// g where keep is 1, exactly +0 elsewhere (also where g is inf or nan): the backward of AbsTopK.
at::Tensor mask_apply(const at::Tensor& g, const at::Tensor& keep) {
  TORCH_CHECK(g.device().is_cpu() && keep.device().is_cpu(), "sparse_lm_abstopk: CPU tensors only");
  TORCH_CHECK(g.sizes() == keep.sizes(), "sparse_lm_abstopk: grad ", g.sizes(), " and mask ", keep.sizes(),
              " differ in shape");
  TORCH_CHECK(keep.scalar_type() == at::kByte, "sparse_lm_abstopk: mask must be uint8");
  at::Tensor gc = g.contiguous();
  at::Tensor kc = keep.contiguous();
  at::Tensor out = at::empty_like(gc);
  const auto t = gc.scalar_type();
  if (t == at::kFloat) {
    mask_rows<uint32_t>(gc, kc, out);
  } else if (t == at::kBFloat16 || t == at::kHalf) {
    mask_rows<uint16_t>(gc, kc, out);
  } else {
    TORCH_CHECK(false, "sparse_lm_abstopk: float32, bfloat16 or float16 only, got ", t);
  }
  return out;
}

// Rows [r0, r1) of the gate backward: gx = g * m (when gx is not null), acc += g * (x - mean).
SLM_CLONES void gate_rows(const float* g, const float* x, const float* m, const float* mean, float* gx,
                          float* acc, int64_t r0, int64_t r1, int64_t n) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* gr = g + r * n;
    const float* xr = x + r * n;
    if (gx) {
      float* o = gx + r * n;
      for (int64_t c = 0; c < n; ++c) o[c] = gr[c] * m[c];
    }
    for (int64_t c = 0; c < n; ++c) acc[c] += gr[c] * (xr[c] - mean[c]);
  }
}

// (grad_x, grad_m) of y = x * m + c per channel (last dim): grad_x = g * m (empty unless need_grad_x),
// grad_m = sum over rows of g * (x - mean), float32. Sums run in float over blocks of 64 rows, then in
// double per thread and over threads in a fixed order, so a given thread count gives the same bits.
std::tuple<at::Tensor, at::Tensor> gate_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& m,
                                                 const at::Tensor& mean, bool need_grad_x) {
  TORCH_CHECK(grad.device().is_cpu() && x.device().is_cpu() && m.device().is_cpu() && mean.device().is_cpu(),
              "sparse_lm_abstopk: CPU tensors only");
  TORCH_CHECK(grad.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && m.scalar_type() == at::kFloat &&
                  mean.scalar_type() == at::kFloat,
              "sparse_lm_abstopk: gate_backward takes float32 tensors");
  TORCH_CHECK(grad.sizes() == x.sizes(), "sparse_lm_abstopk: grad ", grad.sizes(), " and x ", x.sizes(),
              " differ in shape");
  TORCH_CHECK(x.dim() >= 1 && m.dim() == 1 && mean.dim() == 1 && m.size(0) == x.size(-1) &&
                  mean.size(0) == x.size(-1),
              "sparse_lm_abstopk: m and mean must be (width,) for x of width ", x.size(-1));
  const at::Tensor g = grad.contiguous(), xc = x.contiguous(), mc = m.contiguous(), meanc = mean.contiguous();
  const int64_t n = xc.size(-1);
  const int64_t rows = n ? xc.numel() / n : 0;
  at::Tensor gx = need_grad_x ? at::empty_like(g) : at::empty({0}, g.options());
  const int threads = std::max(1, at::get_num_threads());
  std::vector<double> part((size_t)threads * n, 0.0);
  const float *gp = g.data_ptr<float>(), *xp = xc.data_ptr<float>(), *mp = mc.data_ptr<float>(),
              *meanp = meanc.data_ptr<float>();
  float* gxp = need_grad_x ? gx.data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(64, 32768 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    double* acc = part.data() + (size_t)std::min(at::get_thread_num(), threads - 1) * n;
    std::vector<float> block(n);
    for (int64_t s = begin; s < end; s += 64) {
      std::fill(block.begin(), block.end(), 0.f);
      gate_rows(gp, xp, mp, meanp, gxp, block.data(), s, std::min(end, s + 64), n);
      for (int64_t c = 0; c < n; ++c) acc[c] += block[c];
    }
  });
  at::Tensor gm = at::empty({n}, mc.options());
  float* out = gm.data_ptr<float>();
  for (int64_t c = 0; c < n; ++c) {
    double total = 0.0;
    for (int t = 0; t < threads; ++t) total += part[(size_t)t * n + c];
    out[c] = (float)total;
  }
  return {gx, gm};
}


// The element-wise passes of the projection, compiled like the counting loops above.
SLM_CLONES bool any_nonfinite(const uint32_t* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= (uint32_t)((x[i] & 0x7fffffffu) >= 0x7f800000u);
  return bad != 0;
}
SLM_CLONES void forced_keys(const uint32_t* x, const uint8_t* forced, int64_t n, uint32_t* keys) {
  for (int64_t i = 0; i < n; ++i) keys[i] = forced[i] ? 0x7f800000u : (x[i] & 0x7fffffffu);
}
SLM_CLONES void zero_unkept(uint32_t* x, const uint8_t* keep, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] &= 0u - (uint32_t)keep[i];
}

// The largest key (|x| bits) of n <= 16 entries, and whether any key beats its column's bound: the
// vectorizable tests that give the fan pass its bounds and let it skip most chunks.
SLM_CLONES uint32_t chunk_max(const uint32_t* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i] & 0x7fffffffu);
  return m;
}
SLM_CLONES bool any_ge(const uint32_t* x, const uint32_t* bound, int64_t n) {
  uint32_t any = 0;
  for (int64_t i = 0; i < n; ++i) any |= (uint32_t)((x[i] & 0x7fffffffu) >= bound[i]);
  return any != 0;
}
SLM_CLONES void rows_max(const uint32_t* x, int64_t n, uint32_t* m) {
  for (int64_t i = 0; i < n; ++i) m[i] = std::max(m[i], x[i] & 0x7fffffffu);
}

// A running top m of one slice, fed in index order: strict > keeps, of equal keys, the one seen first (the
// lowest index in the slice), as the selection's tie rule.
struct TopM {
  uint32_t* key;
  int64_t* idx;
  int64_t m, filled = 0;
  void offer(uint32_t k, int64_t i) {
    if (filled == m && !(k > key[m - 1])) return;
    int64_t j = filled < m ? filled++ : m - 1;
    while (j > 0 && k > key[j - 1]) {
      key[j] = key[j - 1];
      idx[j] = idx[j - 1];
      --j;
    }
    key[j] = k;
    idx[j] = i;
  }
};

// The m-th largest of n values (0 when n < m): a lower bound for the m-th largest key of a slice when the
// values are the maxima of n disjoint blocks of it (m blocks hold a key at least this large).
uint32_t mth_largest(const uint32_t* v, int64_t n, int64_t m, uint32_t* best) {
  if (n < m) return 0;
  int64_t filled = 0;  // best[0..filled): the largest so far, descending
  for (int64_t i = 0; i < n; ++i) {
    if (filled == m && v[i] <= best[m - 1]) continue;
    int64_t j = filled < m ? filled++ : m - 1;
    while (j > 0 && v[i] > best[j - 1]) {
      best[j] = best[j - 1];
      --j;
    }
    best[j] = v[i];
  }
  return best[m - 1];
}

// forced[i] = 1 for the top m |w| (ties: lowest index) of every row (fan_dim 1) or column (fan_dim 0) of
// a (R, C) float32 matrix given as key bits. Blocks of 16 along the slice first give each slice a lower
// bound on its m-th key (vectorized maxima), so only the few keys at or above it are ranked.
// Returns the count of forced entries (the slices' top sets are disjoint: one fan dim).
int64_t force_fan(const uint32_t* x, int64_t R, int64_t C, int fan_dim, int64_t m, uint8_t* forced) {
  std::memset(forced, 0, (size_t)(R * C));
  const int64_t slices = fan_dim == 1 ? R : C, len = fan_dim == 1 ? C : R, nb = (len + 15) / 16;
  std::vector<uint32_t> bk((size_t)(slices * m));
  std::vector<int64_t> bi((size_t)(slices * m));
  std::vector<uint32_t> bmax((size_t)(nb * (fan_dim == 1 ? 1 : C))), best((size_t)m);
  if (fan_dim == 1) {
    for (int64_t r = 0; r < R; ++r) {
      const uint32_t* row = x + r * C;
      for (int64_t b = 0; b < nb; ++b) bmax[b] = chunk_max(row + 16 * b, std::min<int64_t>(16, C - 16 * b));
      const uint32_t lo = mth_largest(bmax.data(), nb, m, best.data());
      TopM top{bk.data() + r * m, bi.data() + r * m, m};
      for (int64_t b = 0; b < nb; ++b) {
        if (bmax[b] < lo) continue;
        for (int64_t c = 16 * b; c < std::min<int64_t>(C, 16 * b + 16); ++c) {
          const uint32_t key = row[c] & 0x7fffffffu;
          if (key >= lo) top.offer(key, c);
        }
      }
      for (int64_t j = 0; j < m; ++j) forced[r * C + top.idx[j]] = 1;
    }
  } else {
    // Columns, read row by row (the matrix stays in memory order): block maxima per column, then each
    // column's bound, then one pass offering the keys at or above their column's bound.
    for (int64_t b = 0; b < nb; ++b) {
      uint32_t* mb = bmax.data() + b * C;
      std::memset(mb, 0, (size_t)C * sizeof(uint32_t));
      for (int64_t r = 16 * b; r < std::min<int64_t>(R, 16 * b + 16); ++r) rows_max(x + r * C, C, mb);
    }
    std::vector<uint32_t> lo((size_t)C), tmp((size_t)nb);
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t b = 0; b < nb; ++b) tmp[b] = bmax[b * C + c];
      lo[c] = mth_largest(tmp.data(), nb, m, best.data());
    }
    std::vector<TopM> tops;
    tops.reserve((size_t)C);
    for (int64_t c = 0; c < C; ++c) tops.push_back(TopM{bk.data() + c * m, bi.data() + c * m, m});
    for (int64_t r = 0; r < R; ++r) {
      const uint32_t* row = x + r * C;
      for (int64_t c0 = 0; c0 < C; c0 += 16) {
        const int64_t e = std::min<int64_t>(C, c0 + 16);
        if (!any_ge(row + c0, lo.data() + c0, e - c0)) continue;
        for (int64_t c = c0; c < e; ++c) {
          const uint32_t key = row[c] & 0x7fffffffu;
          if (key >= lo[c]) tops[c].offer(key, r);
        }
      }
    }
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < m; ++j) forced[tops[c].idx[j] * C + c] = 1;
  }
  return slices * m;
}

// The L0 projection of one float32 matrix (R, C), in place: w keeps the top min_fan |w| of every fan slice
// (fan_dim 1: rows, 0: columns, -1: none) and, of the rest, the k - forced largest |w| (ties at the k-th:
// lowest flat index, as topk_mask's selection with the forced entries ranked first); w = +0 elsewhere.
// Returns the kept count, or -1 without touching w when the case is not handled here (a non-finite weight,
// forced entries over k, min_fan >= the slice length): the caller then uses torch.
int64_t project_topk_(at::Tensor w, int64_t k, int64_t fan_dim, int64_t min_fan) {
  TORCH_CHECK(w.device().is_cpu(), "sparse_lm_abstopk: CPU tensors only");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(),
              "sparse_lm_abstopk: project_topk_ takes a contiguous 2-D float32 matrix");
  const int64_t R = w.size(0), C = w.size(1), n = R * C;
  uint32_t* x = reinterpret_cast<uint32_t*>(w.data_ptr<float>());
  if (n == 0 || k <= 0) return -1;
  std::unique_ptr<uint8_t[]> keep(new uint8_t[(size_t)n]);  // the forced entries, then the kept set
  uint8_t* kp = keep.get();
  if (any_nonfinite(x, n)) return -1;  // inf or nan: torch's ranking of them
  const bool fan = fan_dim >= 0 && min_fan > 0;
  int64_t forced = 0;
  std::unique_ptr<uint32_t[]> keys;
  if (fan) {
    const int64_t len = fan_dim == 1 ? C : R;
    if ((fan_dim != 0 && fan_dim != 1) || min_fan >= len) return -1;
    forced = force_fan(x, R, C, (int)fan_dim, min_fan, kp);
    if (forced > k) return -1;
    keys.reset(new uint32_t[(size_t)n]);
    forced_keys(x, kp, n, keys.get());  // forced entries rank first
  }
  if (k >= n) {
    std::memset(kp, 1, (size_t)n);
    return n;
  }
  std::unique_ptr<uint32_t[]> cand(new uint32_t[(size_t)n]);
  select_row32(fan ? keys.get() : x, n, k, kp, nullptr, cand.get());  // the selection reads |w|'s bits itself
  zero_unkept(x, kp, n);
  return k;
}

}  // namespace

TORCH_LIBRARY(sparse_lm_abstopk, m) {
  m.def("abstopk(Tensor x, int k) -> (Tensor, Tensor)", &abstopk);
  m.def("abstopk_mask(Tensor x, int k) -> Tensor", &abstopk_mask);
  m.def("mask_apply(Tensor g, Tensor keep) -> Tensor", &mask_apply);
  m.def("gate_backward(Tensor grad, Tensor x, Tensor m, Tensor mean, bool need_grad_x) -> (Tensor, Tensor)",
        &gate_backward);
  m.def("project_topk_(Tensor(a!) w, int k, int fan_dim, int min_fan) -> int", &project_topk_);
}
