// Exact top-k along the last dimension of a CPU tensor, rows in parallel.
//
// torch.topk copies every row into a (value, index) buffer and selects from that; for k much smaller than
// the row (TopK SAEs: 32 of 8192) nearly every element can be ruled out by a bound, in vectorised passes
// (block_candidates below: rows read as float, float32 or bfloat16 with a float32 bias, the training path); such rows
// too short for the bound (a toy's dictionaries) rank every element as a packed key (all_candidates). Other dtypes
// and rows with NaN take a heap (heap_topk).
//
// Output is sorted by value, descending; equal values by index, ascending (the earliest index wins a tie at
// the boundary too), so the result is deterministic. NaN counts as larger than any number, as in torch.topk.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// a ranks above b: larger value (NaN largest), then smaller index.
template <typename acc_t>
inline bool ranks_above(acc_t av, int64_t ai, acc_t bv, int64_t bi) {
  const bool an = std::isnan(av), bn = std::isnan(bv);
  if (an != bn) return an;
  if (!an && av != bv) return av > bv;
  return ai < bi;
}

// Min-heap on rank: heap[0] is the entry ranked lowest among those kept.
template <typename acc_t>
inline void sift_down(acc_t* v, int64_t* i, int64_t k, int64_t pos) {
  while (true) {
    int64_t low = pos;
    const int64_t l = 2 * pos + 1, r = l + 1;
    if (l < k && ranks_above(v[low], i[low], v[l], i[l])) low = l;
    if (r < k && ranks_above(v[low], i[low], v[r], i[r])) low = r;
    if (low == pos) return;
    std::swap(v[pos], v[low]);
    std::swap(i[pos], i[low]);
    pos = low;
  }
}

// Element j of row + bias as torch's x + bias would hold it, widened: rounded to scalar_t where the bias has the
// row's dtype (ranks and ties are those of the rounded sums, so half and bfloat16 tie-break like torch.topk(x +
// bias)); the float sum where the bias is float and the row narrower (bf16 pre-activations of a native bf16 matmul
// with a float32 bias: torch promotes that sum to float32, and so does this).
template <typename scalar_t, typename bias_t, typename acc_t>
inline acc_t at_j(const scalar_t* row, const bias_t* bias, int64_t j) {
  const acc_t sum = static_cast<acc_t>(row[j]) + static_cast<acc_t>(bias[j]);
  if constexpr (std::is_same_v<scalar_t, bias_t>) {
    return static_cast<acc_t>(static_cast<scalar_t>(sum));
  } else {
    return sum;
  }
}

// Order-preserving map of a (non-NaN) float or double to an unsigned integer of the same width.
inline uint32_t order_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline uint64_t order_key(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

#if defined(__GNUC__)
// 16-lane GCC/Clang vector types for the hot loops below (block_topk's rescan, collect_at_least), which compile to
// whatever SIMD the target has; on x86-64 GCC also builds AVX2 and AVX-512 versions of the functions marked
// SC_SIMD_CLONES and picks one at load time.
#if defined(__x86_64__) && !defined(__clang__)
#define SC_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SC_SIMD_CLONES
#endif
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef int32_t i32x4 __attribute__((vector_size(16)));


// Elements j..j+15 of a row, as float (a bfloat16 is the top half of a float32).
inline f32x16 load16(const float* row, int64_t j) {
  f32x16 v;
  std::memcpy(&v, row + j, sizeof v);
  return v;
}
inline f32x16 load16(const at::BFloat16* row, int64_t j) {
  u16x16 h;
  std::memcpy(&h, row + j, sizeof h);
  const u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

// Elements j..j+15 of row + bias, as float.
template <typename row_t>
inline f32x16 load16(const row_t* row, const float* bias, int64_t j) {
  return load16(row, j) + load16(bias, j);
}

// The sum of the lanes, by halving adds (a fixed order: the result is deterministic).
inline float sum_lanes(f32x16 v) {
  typedef float f32x8 __attribute__((vector_size(32)));
  typedef float f32x4 __attribute__((vector_size(16)));
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// Whether any lane is set, by halving ORs (a lane-by-lane loop extracted every lane: 3x slower).
inline bool any_lane(i32x16 h) {
  const i32x8 a = __builtin_shufflevector(h, h, 0, 1, 2, 3, 4, 5, 6, 7) |
                  __builtin_shufflevector(h, h, 8, 9, 10, 11, 12, 13, 14, 15);
  const i32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) | __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] | b[1] | b[2] | b[3]) != 0;
}
#else
#define SC_SIMD_CLONES
#endif

// The k-th largest of v[0..n) (no NaN, n ≤ 1024: a row's block maxima), found bit by bit on the order keys: each
// step is one vectorisable count, where nth_element's data-dependent branches mispredict about every other
// comparison. (kth_key, below, serves the batch top-k's hundreds of thousands of keys: 32 passes would not.)
template <typename acc_t>
[[gnu::always_inline]] inline acc_t kth_largest(const acc_t* v, int64_t n, int64_t k) {
  using key_t = decltype(order_key(acc_t{}));
  constexpr int bits = 8 * sizeof(key_t);
  key_t keys[1024];
  acc_t best = v[0];
  for (int64_t i = 0; i < n; ++i) keys[i] = order_key(v[i]);
  key_t t = 0;
  for (int bit = bits - 1; bit >= 0; --bit) {
    const key_t cand = t | (key_t{1} << bit);
    int32_t count = 0;  // (32-bit, as the keys: the loop vectorises without widening)
    for (int64_t i = 0; i < n; ++i) count += keys[i] >= cand;
    if (count >= k) t = cand;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (keys[i] == t) best = v[i];
  }
  return best;
}

template <typename acc_t>
struct Scratch {
  std::vector<acc_t> heap_v;
  std::vector<int64_t> heap_i;
  std::vector<std::pair<acc_t, int64_t>> kept;
  std::vector<float> block_max;
  std::vector<uint64_t> cand;
};

// The general path (any k, any dtype, NaN-aware): a min-heap of the k best so far, touched only when an element
// beats its smallest; the k kept are then written in rank order.
template <typename scalar_t, typename bias_t, typename out_t, typename acc_t>
void heap_topk(const scalar_t* row, const bias_t* bias, int64_t n, int64_t k, Scratch<acc_t>& s, out_t* out_v,
               int64_t* out_i) {
  acc_t* hv = s.heap_v.data();
  int64_t* hi = s.heap_i.data();
  for (int64_t j = 0; j < k; ++j) {
    hv[j] = at_j<scalar_t, bias_t, acc_t>(row, bias, j);
    hi[j] = j;
  }
  for (int64_t p = k / 2 - 1; p >= 0; --p) sift_down(hv, hi, k, p);
  acc_t floor_v = hv[0];
  for (int64_t j = k; j < n; ++j) {
    const acc_t v = at_j<scalar_t, bias_t, acc_t>(row, bias, j);
    // Later indices lose ties, so only a strictly larger value (or a NaN over a number) gets in.
    if (v > floor_v || (std::isnan(v) && !std::isnan(floor_v))) {
      hv[0] = v;
      hi[0] = j;
      sift_down(hv, hi, k, 0);
      floor_v = hv[0];
    }
  }
  s.kept.clear();
  for (int64_t j = 0; j < k; ++j) s.kept.emplace_back(hv[j], hi[j]);
  std::sort(s.kept.begin(), s.kept.end(), [](const auto& a, const auto& b) {
    return ranks_above(a.first, a.second, b.first, b.second);
  });
  for (int64_t j = 0; j < k; ++j) {
    out_v[j] = static_cast<out_t>(s.kept[j].first);
    out_i[j] = s.kept[j].second;
  }
}

// A candidate of block_topk as one integer whose order is the rank: the value's order key, then the index
// reversed, so a descending sort ranks larger values first and equal values by ascending index. (+ 0.0f: -0
// becomes +0, which it equals, as ranks_above has it.)
inline uint64_t pack(float v, int64_t j) {
  return (static_cast<uint64_t>(order_key(v + 0.0f)) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(j));
}
inline float unpack_value(uint64_t p) {
  const uint32_t key = static_cast<uint32_t>(p >> 32);
  const uint32_t u = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;  // order_key undone
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline int64_t unpack_index(uint64_t p) { return 0xFFFFFFFFu - static_cast<uint32_t>(p); }

// Pass 1 of block_topk. Block g holds the elements j with j % G == g: the row read as rows of G and block g its
// column g. Any partition serves the bound; columns make pass 1 a running maximum over contiguous G-wide slices,
// plain SIMD with no reduction across lanes (blocks of consecutive elements spent most of pass 1 reducing lanes,
// ~40 µs a row of 8192 on AVX2). Gives false if the row holds a NaN.
template <typename row_t>
[[gnu::always_inline]] inline bool block_maxima(const row_t* __restrict row, const float* __restrict bias, int64_t n,
                                                int64_t G, float* __restrict out) {
  int nan = 0;
  for (int64_t g = 0; g < G; ++g) out[g] = -std::numeric_limits<float>::infinity();
  for (int64_t lo = 0; lo < n; lo += G) {
    const int64_t len = std::min(G, n - lo);
    for (int64_t g = 0; g < len; ++g) {
      const float v = at_j<row_t, float, float>(row + lo, bias + lo, g);
      out[g] = v > out[g] ? v : out[g];  // NaN keeps out[g]; the flag below catches it
      nan |= v != v;
    }
  }
  return nan == 0;
}

// The fast path, for rows read as float (float32, or bfloat16 with a float32 bias) of at least 2k blocks: the
// k-th largest block maximum t is a lower bound on the k-th largest element (those k blocks' maxima are k
// elements ≥ t), so only elements ≥ t can be in the top k. Pass 1 reads the row once (from memory); pass 2 reads
// it again (from cache) 16 elements at a time and keeps the few ≥ t (~k + a few on SAE pre-activations) as packed
// keys, which the caller sorts. Gives their count, or -1 (the row left to heap_topk) for a row with NaN or a t of
// -inf (an AuxK row masked to its few dead latents). Pass 2 once read only the ~k blocks at or above t, an
// element at a time: on 2 AVX-512 cores at d_sae 8192, k 32 it and the sort of (value, index) pairs took ~9 of
// the top-k's ~16 ms per 4096 rows; the vector rescan and the packed sort take ~5.
template <typename row_t>
[[gnu::always_inline]] inline int64_t block_candidates(const row_t* row, const float* bias, int64_t n, int64_t k,
                                                       int64_t G, float* bmax, uint64_t* cand) {
  if (!block_maxima(row, bias, n, G, bmax)) return -1;
  const float t = kth_largest(bmax, G, k);
  if (t == -std::numeric_limits<float>::infinity()) return -1;
  int64_t c = 0, j = 0;
#if defined(__GNUC__)
  f32x16 tv;
  for (int l = 0; l < 16; ++l) tv[l] = t;
  for (; j + 16 <= n; j += 16) {
    const f32x16 v = load16(row, bias, j);
    const i32x16 hit = v >= tv;
    if (!any_lane(hit)) continue;
    for (int l = 0; l < 16; ++l) {
      if (hit[l]) cand[c++] = pack(v[l], j + l);
    }
  }
#endif
  for (; j < n; ++j) {
    const float v = at_j<row_t, float, float>(row, bias, j);
    if (v >= t) cand[c++] = pack(v, j);
  }
  return c;
}
SC_SIMD_CLONES int64_t block_candidates_f32(const float* row, const float* bias, int64_t n, int64_t k, int64_t G,
                                            float* bmax, uint64_t* cand) {
  return block_candidates(row, bias, n, k, G, bmax, cand);
}
SC_SIMD_CLONES int64_t block_candidates_bf16(const at::BFloat16* row, const float* bias, int64_t n, int64_t k,
                                             int64_t G, float* bmax, uint64_t* cand) {
  return block_candidates(row, bias, n, k, G, bmax, cand);
}

// Rows too short for the bound (a few hundred elements, or k near the row's length: the toy's dictionaries): every
// element as a packed key, for the caller's partial selection. -1 for a row with NaN (heap_topk's). The heap was
// ~2x slower on such rows: a data-dependent branch per element and a NaN-aware comparison per sift.
template <typename row_t>
[[gnu::always_inline]] inline int64_t all_candidates(const row_t* row, const float* bias, int64_t n, uint64_t* cand) {
  int nan = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float v = at_j<row_t, float, float>(row, bias, j);
    nan |= v != v;
    cand[j] = pack(v, j);
  }
  return nan ? -1 : n;
}
SC_SIMD_CLONES int64_t all_candidates_f32(const float* row, const float* bias, int64_t n, uint64_t* cand) {
  return all_candidates(row, bias, n, cand);
}
SC_SIMD_CLONES int64_t all_candidates_bf16(const at::BFloat16* row, const float* bias, int64_t n, uint64_t* cand) {
  return all_candidates(row, bias, n, cand);
}

// The top-k of every row of src (+ its slice's row of bias), written to val/idx [rows, k].
template <typename scalar_t, typename bias_t, typename out_t>
void topk_rows(const scalar_t* src, const bias_t* bias_p, int64_t rows, int64_t rows_per_bias, int64_t n, int64_t k,
               out_t* val, int64_t* idx) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr bool reads_float = std::is_same_v<bias_t, float> && std::is_same_v<out_t, float> &&
                               (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>);
  // Blocks of 8..64 elements, at least 4k of them where the row allows; too few blocks: heap only.
  int64_t b = 64;
  while (b > 8 && n / b < 4 * k) b /= 2;
  const int64_t G = (n + b - 1) / b;  // blocks
  const bool blocks = reads_float && n / b >= 2 * k && G <= 1024;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s;
    s.heap_v.resize(k);
    s.heap_i.resize(k);
    if (blocks) s.block_max.resize(G);
    if (reads_float) s.cand.resize(n);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = src + r * n;
      const bias_t* br = bias_p + (r / rows_per_bias) * n;
      int64_t c = -1;
      if constexpr (reads_float) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          c = blocks ? block_candidates_f32(row, br, n, k, G, s.block_max.data(), s.cand.data())
                     : all_candidates_f32(row, br, n, s.cand.data());
        } else {
          c = blocks ? block_candidates_bf16(row, br, n, k, G, s.block_max.data(), s.cand.data())
                     : all_candidates_bf16(row, br, n, s.cand.data());
        }
      }
      if (c < 0) {
        heap_topk<scalar_t, bias_t, out_t, acc_t>(row, br, n, k, s, val + r * k, idx + r * k);
        continue;
      }
      // c ≥ k candidates: the k ranked first, in rank order
      std::nth_element(s.cand.begin(), s.cand.begin() + (k - 1), s.cand.begin() + c, std::greater<uint64_t>());
      std::sort(s.cand.begin(), s.cand.begin() + k, std::greater<uint64_t>());
      for (int64_t j = 0; j < k; ++j) {
        val[r * k + j] = static_cast<out_t>(unpack_value(s.cand[j]));
        idx[r * k + j] = unpack_index(s.cand[j]);
      }
    }
  });
}

// Top-k of input + bias, where bias (optional) is [n] for every row or [input.size(0), n], one row of bias per
// slice of the first dimension (a stack of SAEs' encoder biases). Adding it here, as each element is read,
// saves the caller a pass over the whole input. The bias has the input's dtype, or is float32 on a bfloat16 input
// (the product of a native bf16 matmul and an fp32 encoder bias): the values then come out in float32, exactly
// the elements of input.float() + bias, and the input is read at half the width of a widened copy.
std::tuple<at::Tensor, at::Tensor> topk_last_dim(const at::Tensor& input, int64_t k,
                                                 const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(input.device().is_cpu(), "topk_last_dim: CPU tensors only");
  TORCH_CHECK(input.dim() >= 1, "topk_last_dim: input needs a last dimension");
  const int64_t n = input.size(-1);
  TORCH_CHECK(k >= 1 && k <= n, "topk_last_dim: k must be in 1..", n, ", got ", k);
  const at::Tensor x = input.contiguous();
  const int64_t rows = x.numel() / n;
  at::Tensor bias;
  int64_t rows_per_bias = rows;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    const bool widening = x.scalar_type() == at::kBFloat16 && bias.scalar_type() == at::kFloat;
    TORCH_CHECK(bias.scalar_type() == x.scalar_type() || widening,
                "topk_last_dim: bias must have the input's dtype (or be float32 on a bfloat16 input)");
    const bool per_slice =
        bias.dim() == 2 && input.dim() >= 2 && bias.size(0) == input.size(0) && bias.size(1) == n;
    TORCH_CHECK(per_slice || (bias.dim() == 1 && bias.size(0) == n), "topk_last_dim: bias must be [", n,
                "] or [input.size(0), ", n, "]");
    if (per_slice && rows > 0) rows_per_bias = rows / input.size(0);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = k;
  const auto out_dtype = bias.defined() ? bias.scalar_type() : x.scalar_type();
  at::Tensor values = at::empty(shape, x.options().dtype(out_dtype));
  at::Tensor indices = at::empty(shape, x.options().dtype(at::kLong));
  if (rows == 0) return {values, indices};
  int64_t* idx = indices.data_ptr<int64_t>();
  if (bias.defined() && bias.scalar_type() != x.scalar_type()) {  // bf16 rows, float32 bias and values
    topk_rows<at::BFloat16, float, float>(x.const_data_ptr<at::BFloat16>(), bias.const_data_ptr<float>(), rows,
                                          rows_per_bias, n, k, values.data_ptr<float>(), idx);
    return {values, indices};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_last_dim", [&] {
    // No bias: a row of zeros, so one code path serves both (adding 0 changes no value's rank).
    const at::Tensor zeros = bias.defined() ? at::Tensor() : at::zeros({n}, x.options());
    const scalar_t* bias_p = (bias.defined() ? bias : zeros).const_data_ptr<scalar_t>();
    topk_rows<scalar_t, scalar_t, scalar_t>(x.const_data_ptr<scalar_t>(), bias_p, rows, rows_per_bias, n, k,
                                            values.data_ptr<scalar_t>(), idx);
  });
  return {values, indices};
}

// ---- batch top-k: the n largest entries of a whole [R, F] slab at once (BatchTopK SAEs) ----
//
// torch.topk over the flattened slab (131 072 of 33.5 M entries at batch 4096, d_sae 8192, k 32) took ~1 s here.
// Instead: a strided sample gives a key t that about 1.15·n entries reach (more for a small sample); one parallel
// pass keeps every entry whose key is ≥ t, per chunk of rows and so in index order; the exact n-th largest is then
// chosen among those few. Should fewer than n reach t (a misleading sample), the pass is redone keeping everything.
// Ranks go by order key: larger value first, a (positive) NaN above +inf as in torch.topk; ties at the boundary go
// to the lower index, so the result is deterministic.

template <typename val_t>
struct Entry {
  decltype(order_key(val_t{})) key;
  int64_t index;
  val_t value;
};

// Element j of a slab row + its column's bias, as the selection ranks it: in the row's dtype, or in float32 for a
// bfloat16 row with a float32 bias (a native bf16 product, as topk_last_dim reads it).
template <typename row_t, typename val_t>
inline val_t slab_value(const row_t* row, const val_t* bias, int64_t j) {
  return static_cast<val_t>(static_cast<val_t>(row[j]) + bias[j]);
}

// Every entry of rows [r0, r1) of the slab (+ bias per column) whose key is ≥ t, in index order. Float32 rows
// (and bfloat16 ones with a float32 bias), the training hot path, are read 16 order keys at a time (the bit trick
// of order_key, lane-wise); the rare vector with a key ≥ t is then read again one element at a time.
template <typename row_t, typename val_t>
[[gnu::always_inline]] inline void collect_at_least(const row_t* slab, const val_t* bias, int64_t r0, int64_t r1,
                                                    int64_t F, decltype(order_key(val_t{})) t,
                                                    std::vector<Entry<val_t>>& out) {
  for (int64_t r = r0; r < r1; ++r) {
    const row_t* row = slab + r * F;
    int64_t j = 0;
#if defined(__GNUC__)
    if constexpr (std::is_same_v<val_t, float>) {
      u32x16 tv;
      for (int l = 0; l < 16; ++l) tv[l] = t;
      for (; j + 16 <= F; j += 16) {
        const f32x16 v = load16(row, bias, j);
        u32x16 bits;
        std::memcpy(&bits, &v, sizeof bits);
        const u32x16 flip = (u32x16)((i32x16)bits >> 31) | 0x80000000u;
        if (!any_lane((bits ^ flip) >= tv)) continue;
        for (int l = 0; l < 16; ++l) {
          if (order_key(v[l]) >= t) out.push_back({order_key(v[l]), r * F + j + l, v[l]});
        }
      }
    }
#endif
    for (; j < F; ++j) {
      const val_t v = slab_value(row, bias, j);
      const auto key = order_key(v);
      if (key >= t) out.push_back({key, r * F + j, v});
    }
  }
}
SC_SIMD_CLONES void collect_at_least_f32(const float* slab, const float* bias, int64_t r0, int64_t r1, int64_t F,
                                         uint32_t t, std::vector<Entry<float>>& out) {
  collect_at_least(slab, bias, r0, r1, F, t, out);
}
SC_SIMD_CLONES void collect_at_least_bf16(const at::BFloat16* slab, const float* bias, int64_t r0, int64_t r1,
                                          int64_t F, uint32_t t, std::vector<Entry<float>>& out) {
  collect_at_least(slab, bias, r0, r1, F, t, out);
}
template <typename row_t, typename val_t>
void collect(const row_t* slab, const val_t* bias, int64_t r0, int64_t r1, int64_t F,
             decltype(order_key(val_t{})) t, std::vector<Entry<val_t>>& out) {
  if constexpr (std::is_same_v<row_t, float>) {
    collect_at_least_f32(slab, bias, r0, r1, F, t, out);
  } else if constexpr (std::is_same_v<row_t, at::BFloat16>) {
    collect_at_least_bf16(slab, bias, r0, r1, F, t, out);
  } else {
    collect_at_least(slab, bias, r0, r1, F, t, out);
  }
}

// The q-th largest of keys[0..size) (q in 1..size), digit by digit from the top, 16 bits at a time: a histogram
// of the keys that share the digits found so far places the q-th in one bin. Two streaming passes for float
// keys; std::nth_element took ~4 ms on one thread for a slab's sample of 2^19 keys here, the other thread idle.
template <typename key_t>
key_t kth_key(const key_t* keys, int64_t size, int64_t q) {
  constexpr int bits = 8 * sizeof(key_t);
  std::vector<int64_t> hist(1 << 16);
  key_t prefix = 0;
  for (int shift = bits - 16; shift >= 0; shift -= 16) {
    std::fill(hist.begin(), hist.end(), 0);
    const key_t high = shift + 16 >= bits ? key_t{0} : static_cast<key_t>(~key_t{0} << (shift + 16));
    for (int64_t i = 0; i < size; ++i) {
      if ((keys[i] & high) == prefix) ++hist[(keys[i] >> shift) & 0xFFFF];
    }
    int64_t digit = 0xFFFF;
    for (; digit > 0 && hist[digit] < q; --digit) q -= hist[digit];
    prefix |= static_cast<key_t>(digit) << shift;
  }
  return prefix;
}

// Writes the n best of one model's slab to out_v/out_i (index order).
template <typename row_t, typename val_t>
void slab_topk(const row_t* slab, const val_t* bias, int64_t R, int64_t F, int64_t n, val_t* out_v,
               int64_t* out_i) {
  using key_t = decltype(order_key(val_t{}));
  // The sample: whole rows (tokens are exchangeable, and whole rows read memory in order), a sixteenth of the
  // slab within 2^15..2^19 entries (a whole small slab made its selection cost ~5 ms of a toy step).
  const int64_t target = std::clamp<int64_t>(R * F / 16, 1 << 15, 1 << 19);
  const int64_t row_step = std::max<int64_t>(1, R * F / target);
  std::vector<key_t> sample;
  for (int64_t r = 0; r < R; r += row_step)
    for (int64_t j = 0; j < F; ++j) sample.push_back(order_key(slab_value(slab + r * F, bias, j)));
  const double expected = static_cast<double>(n) * sample.size() / (R * F);  // entries of the top n in the sample
  const auto q = static_cast<int64_t>(1.15 * expected + 6.0 * std::sqrt(expected) + 8.0);
  // 0: keep every entry
  const key_t t = q < static_cast<int64_t>(sample.size()) ? kth_key(sample.data(), sample.size(), q + 1) : 0;
  const int64_t n_chunks = std::min<int64_t>(R, 8 * at::get_num_threads());
  std::vector<std::vector<Entry<val_t>>> parts(n_chunks);
  auto collect_all = [&](key_t bound) {
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        parts[c].clear();
        collect(slab, bias, R * c / n_chunks, R * (c + 1) / n_chunks, F, bound, parts[c]);
      }
    });
    int64_t total = 0;
    for (const auto& p : parts) total += p.size();
    return total;
  };
  if (collect_all(t) < n) collect_all(0);
  std::vector<key_t> keys;
  for (const auto& p : parts)
    for (const auto& e : p) keys.push_back(e.key);
  const key_t kth = kth_key(keys.data(), keys.size(), n);
  int64_t ties = n;  // how many entries with the key kth are kept: n less those strictly above it
  for (const auto k : keys) ties -= k > kth;
  int64_t o = 0;
  for (const auto& p : parts) {
    for (const auto& e : p) {
      if (e.key > kth || (e.key == kth && ties-- > 0)) {
        out_v[o] = e.value;
        out_i[o++] = e.index;
      }
    }
  }
}

// input [M, R, F] (+ bias [M, F]); counts[m] ≥ 1 entries of model m's slab, the width K = max(counts); models
// that keep fewer are padded with value 0 at the last index R·F − 1, which keeps every row in index order. The
// bias has the input's dtype, or is float32 on a bfloat16 input (values then float32, as in topk_last_dim).
std::tuple<at::Tensor, at::Tensor> batch_topk(const at::Tensor& input, at::IntArrayRef counts,
                                              const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(input.device().is_cpu() && input.dim() == 3, "batch_topk: a CPU tensor [M, R, F]");
  const int64_t M = input.size(0), R = input.size(1), F = input.size(2);
  TORCH_CHECK(static_cast<int64_t>(counts.size()) == M, "batch_topk: one count per model");
  int64_t K = 0;
  for (const auto c : counts) {
    TORCH_CHECK(c >= 1 && c <= R * F, "batch_topk: counts must be in 1..", R * F, ", got ", c);
    K = std::max(K, c);
  }
  const at::Tensor x = input.contiguous();
  const bool widening = x.scalar_type() == at::kBFloat16 && bias_in.has_value() &&
                        bias_in->scalar_type() == at::kFloat;
  const auto val_dtype = widening ? at::kFloat : x.scalar_type();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::zeros({M, F}, x.options());
  TORCH_CHECK((bias.scalar_type() == x.scalar_type() || widening) && bias.dim() == 2 && bias.size(0) == M &&
                  bias.size(1) == F,
              "batch_topk: bias must be [M, F] of the input's dtype (or float32 on a bfloat16 input)");
  at::Tensor values = at::zeros({M, K}, x.options().dtype(val_dtype));
  at::Tensor indices = at::full({M, K}, R * F - 1, x.options().dtype(at::kLong));
  auto run = [&](const auto* slab, const auto* bias_p, auto* out_v) {
    auto one = [&](int64_t m) {
      slab_topk(slab + m * R * F, bias_p + m * F, R, F, counts[m], out_v + m * K, indices.data_ptr<int64_t>() + m * K);
    };
    if (M >= at::get_num_threads()) {  // a model per thread (each slab's own pass then runs serially)
      at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m) one(m);
      });
    } else {
      for (int64_t m = 0; m < M; ++m) one(m);  // the threads share each slab's pass
    }
  };
  if (widening) {
    run(x.const_data_ptr<at::BFloat16>(), bias.const_data_ptr<float>(), values.data_ptr<float>());
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_topk", [&] {
      run(x.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), values.data_ptr<scalar_t>());
    });
  }
  return {values, indices};
}


// ---- the sparse decoder: per token, the sum of a few weighted decoder rows, and its backward ----
//
// A token's entries (latent e of bag b: offsets[b] ≤ e < offsets[b + 1], or E for the last bag) choose rows idx[e]
// of the table, a decoder [T, d] in float32 or bfloat16 (a bf16 step's rounded copy, read at half the bytes);
// sums and results are float32. gather_sum is embedding_bag's forward with per-sample weights; gather_dot is the
// gradient of those weights, a dot product of the bag's output gradient with each chosen row, which torch's
// embedding_bag computed one BLAS call per entry on one thread (~11 ms for 131 072 entries of 512 here).

template <typename row_t>
[[gnu::always_inline]] inline float dot_row(const float* a, const row_t* b, int64_t d) {
  int64_t j = 0;
  float sum = 0.0f;
#if defined(__GNUC__)
  f32x16 acc0 = {}, acc1 = {};  // two chains: an FMA's latency would otherwise bound the loop
  for (; j + 32 <= d; j += 32) {
    acc0 += load16(a, j) * load16(b, j);
    acc1 += load16(a, j + 16) * load16(b, j + 16);
  }
  for (; j + 16 <= d; j += 16) acc0 += load16(a, j) * load16(b, j);
  sum = sum_lanes(acc0 + acc1);
#endif
  for (; j < d; ++j) sum += a[j] * static_cast<float>(b[j]);
  return sum;
}

template <typename row_t>
[[gnu::always_inline]] inline void gather_dot_bags(const float* g, const row_t* table, const int64_t* idx,
                                                   const int64_t* offsets, int64_t n_bags, int64_t E, int64_t d,
                                                   float* out, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t end = b + 1 < n_bags ? offsets[b + 1] : E;
    for (int64_t e = offsets[b]; e < end; ++e) out[e] = dot_row(g + b * d, table + idx[e] * d, d);
  }
}

template <typename row_t>
[[gnu::always_inline]] inline void gather_sum_bags(const float* w, const row_t* table, const int64_t* idx,
                                                   const int64_t* offsets, int64_t n_bags, int64_t E, int64_t d,
                                                   float* out, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    float* o = out + b * d;
    const int64_t start = offsets[b], end = b + 1 < n_bags ? offsets[b + 1] : E;
    int64_t j = 0;
#if defined(__GNUC__)
    constexpr int T = 4;  // a tile of 64 outputs summed in registers over the bag's entries, then stored once
    for (; j + 16 * T <= d; j += 16 * T) {
      f32x16 acc[T] = {};
      for (int64_t e = start; e < end; ++e) {
        const row_t* row = table + idx[e] * d + j;
        for (int q = 0; q < T; ++q) acc[q] += w[e] * load16(row, 16 * q);
      }
      std::memcpy(o + j, acc, sizeof acc);
    }
#endif
    for (; j < d; ++j) {
      float sum = 0.0f;
      for (int64_t e = start; e < end; ++e) sum += w[e] * static_cast<float>(table[idx[e] * d + j]);
      o[j] = sum;
    }
  }
}
// NAME_f32 and NAME_bf16, a bag kernel (IMPL) for a float32 and a bf16 table, each compiled for every SIMD level
// (target_clones takes no templates).
#define SC_BAG_KERNELS(NAME, IMPL)                                                                                  \
  SC_SIMD_CLONES void NAME##_f32(const float* src, const float* table, const int64_t* idx, const int64_t* offsets, \
                                 int64_t n_bags, int64_t E, int64_t d, float* out, int64_t b0, int64_t b1) {      \
    IMPL(src, table, idx, offsets, n_bags, E, d, out, b0, b1);                                                     \
  }                                                                                                                \
  SC_SIMD_CLONES void NAME##_bf16(const float* src, const at::BFloat16* table, const int64_t* idx,                 \
                                  const int64_t* offsets, int64_t n_bags, int64_t E, int64_t d, float* out,        \
                                  int64_t b0, int64_t b1) {                                                        \
    IMPL(src, table, idx, offsets, n_bags, E, d, out, b0, b1);                                                     \
  }
SC_BAG_KERNELS(gather_dot, gather_dot_bags)
SC_BAG_KERNELS(gather_sum, gather_sum_bags)

void check_bags(const at::Tensor& table, const at::Tensor& idx, const at::Tensor& offsets, const char* name) {
  TORCH_CHECK(table.device().is_cpu() && table.dim() == 2, name, ": table must be a CPU tensor [T, d]");
  TORCH_CHECK(table.scalar_type() == at::kFloat || table.scalar_type() == at::kBFloat16, name,
              ": table must be float32 or bfloat16");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && offsets.dim() == 1 &&
                  offsets.scalar_type() == at::kLong,
              name, ": idx and offsets must be int64 vectors");
}

// Runs one of the kernel pairs above (for a float32 table, for a bf16 one) over all bags, in parallel.
template <typename F32, typename BF16>
void over_bags(const at::Tensor& table, const float* src, const at::Tensor& idx, const at::Tensor& offsets, float* out,
               F32 f32, BF16 bf16) {
  const int64_t n_bags = offsets.numel(), E = idx.numel(), d = table.size(1);
  const int64_t *ip = idx.const_data_ptr<int64_t>(), *op = offsets.const_data_ptr<int64_t>();
  at::parallel_for(0, n_bags, 64, [&](int64_t b0, int64_t b1) {
    if (table.scalar_type() == at::kFloat) {
      f32(src, table.const_data_ptr<float>(), ip, op, n_bags, E, d, out, b0, b1);
    } else {
      bf16(src, table.const_data_ptr<at::BFloat16>(), ip, op, n_bags, E, d, out, b0, b1);
    }
  });
}

// weights, idx [E], offsets [n_bags] → [n_bags, d]: out[b] = Σ over bag b's entries of weights[e] · table[idx[e]].
at::Tensor gather_sum(const at::Tensor& table_in, const at::Tensor& idx_in, const at::Tensor& offsets_in,
                      const at::Tensor& weights_in) {
  check_bags(table_in, idx_in, offsets_in, "gather_sum");
  TORCH_CHECK(weights_in.scalar_type() == at::kFloat && weights_in.numel() == idx_in.numel(),
              "gather_sum: one float32 weight per entry");
  const at::Tensor table = table_in.contiguous(), idx = idx_in.contiguous(), offsets = offsets_in.contiguous(),
                   w = weights_in.contiguous();
  at::Tensor out = at::empty({offsets.numel(), table.size(1)}, table.options().dtype(at::kFloat));
  over_bags(table, w.const_data_ptr<float>(), idx, offsets, out.data_ptr<float>(), gather_sum_f32, gather_sum_bf16);
  return out;
}

// grad [n_bags, d], idx [E], offsets [n_bags] → [E]: out[e] = grad[bag of e] · table[idx[e]].
at::Tensor gather_dot(const at::Tensor& grad_in, const at::Tensor& table_in, const at::Tensor& idx_in,
                      const at::Tensor& offsets_in) {
  check_bags(table_in, idx_in, offsets_in, "gather_dot");
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat && grad_in.dim() == 2 && grad_in.size(0) == offsets_in.numel() &&
                  grad_in.size(1) == table_in.size(1),
              "gather_dot: grad must be float32 [n_bags, d]");
  const at::Tensor table = table_in.contiguous(), idx = idx_in.contiguous(), offsets = offsets_in.contiguous(),
                   g = grad_in.contiguous();
  at::Tensor out = at::empty({idx.numel()}, g.options());
  over_bags(table, g.const_data_ptr<float>(), idx, offsets, out.data_ptr<float>(), gather_dot_f32, gather_dot_bf16);
  return out;
}

// latents, cols, weights [E], latents in 0..n → (crow [n + 1]: where each latent's entries start; cols and weights
// grouped by latent, each latent's in entry order): a CSR matrix by latent, by a counting sort, O(E + n) on one
// thread. torch's stable argsort of 131 072 entries took ~2 ms here and the two gathers by its order ~0.5 ms each.
std::tuple<at::Tensor, at::Tensor, at::Tensor> by_latent(const at::Tensor& latents_in, int64_t n,
                                                         const at::Tensor& cols_in, const at::Tensor& weights_in) {
  TORCH_CHECK(latents_in.device().is_cpu() && latents_in.dim() == 1 && latents_in.scalar_type() == at::kLong &&
                  cols_in.scalar_type() == at::kLong && cols_in.numel() == latents_in.numel() &&
                  weights_in.numel() == latents_in.numel(),
              "by_latent: latents and cols must be CPU int64 vectors, weights one per entry");
  const at::Tensor latents = latents_in.contiguous(), cols = cols_in.contiguous(), weights = weights_in.contiguous();
  const int64_t E = latents.numel();
  const int64_t *lat = latents.const_data_ptr<int64_t>(), *col = cols.const_data_ptr<int64_t>();
  at::Tensor crow = at::zeros({n + 1}, latents.options());
  at::Tensor cols_out = at::empty({E}, cols.options()), weights_out = at::empty({E}, weights.options());
  int64_t* c = crow.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(lat[e] >= 0 && lat[e] < n, "by_latent: a latent out of 0..", n - 1);
    ++c[lat[e] + 1];
  }
  for (int64_t j = 0; j < n; ++j) c[j + 1] += c[j];
  std::vector<int64_t> next(c, c + n);
  int64_t* co = cols_out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "by_latent", [&] {
    const scalar_t* w = weights.const_data_ptr<scalar_t>();
    scalar_t* wo = weights_out.data_ptr<scalar_t>();
    for (int64_t e = 0; e < E; ++e) {
      const int64_t at = next[lat[e]]++;
      co[at] = col[e];
      wo[at] = w[e];
    }
  });
  return {crow, cols_out, weights_out};
}

}  // namespace

TORCH_LIBRARY(sparse_coding, m) {
  m.def("topk_last_dim(Tensor input, int k, Tensor? bias=None) -> (Tensor, Tensor)");
  m.def("batch_topk(Tensor input, int[] counts, Tensor? bias=None) -> (Tensor, Tensor)");
  m.def("gather_sum(Tensor table, Tensor idx, Tensor offsets, Tensor weights) -> Tensor");
  m.def("gather_dot(Tensor grad, Tensor table, Tensor idx, Tensor offsets) -> Tensor");
  m.def("by_latent(Tensor latents, int n, Tensor cols, Tensor weights) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparse_coding, CPU, m) {
  m.impl("topk_last_dim", &topk_last_dim);
  m.impl("batch_topk", &batch_topk);
  m.impl("gather_sum", &gather_sum);
  m.impl("gather_dot", &gather_dot);
  m.impl("by_latent", &by_latent);
}
