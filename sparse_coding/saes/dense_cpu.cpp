// The elementwise passes of the dense JumpReLU and gated SAE steps, each fused into one pass over [M, B, d_sae],
// and the nested reconstruction errors of the Matryoshka loss.
//
// Between their matmuls these steps read and write the [M, B, d_sae] tensors many times in torch (JumpReLU's
// threshold estimators ~70 bytes an entry, gated's two paths ~120; relu's whole step ~36), which cost them
// 10-25 % of a step on 2 cores. Here each pass reads its inputs once and writes once, and folds in the sums over
// the batch (per-latent gradients of θ, b_mag, r_mag, b_gate). Work is split by blocks of latents, each summing
// its tokens in order: the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

constexpr int64_t kBlock = 256;  // latents per work item: 1 KiB of floats per row, contiguous

// Calls f(m, j0, j1) for every model m and block [j0, j1) of its F latents, blocks in parallel.
template <typename Fn>
void for_latent_blocks(int64_t M, int64_t F, Fn f) {
  const int64_t blocks = (F + kBlock - 1) / kBlock;
  at::parallel_for(0, M * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t m = w / blocks, j0 = (w % blocks) * kBlock;
      f(m, j0, std::min(F, j0 + kBlock));
    }
  });
}

void check_stack(const at::Tensor& t, const at::Tensor& per_latent, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 3 && t.is_contiguous(), what, ": a contiguous CPU tensor [M, B, F]");
  TORCH_CHECK(per_latent.dim() == 2 && per_latent.size(0) == t.size(0) && per_latent.size(1) == t.size(2) &&
                  per_latent.is_contiguous() && per_latent.scalar_type() == t.scalar_type(),
              what, ": per-latent tensors must be [M, F], contiguous, of the same dtype");
}

// The per-row bodies below take restrict pointers to one row's block of latents and to the block's per-latent
// accumulators (kept in a small local array, not in the output tensors, so the compiler may keep them in
// registers across rows): that is what lets each loop vectorise. As loops over the output tensors, with int64
// counters beside float sums, the compiler could not, and each pass took ~10× a plain copy of [B, d_sae].

template <typename T>
inline void jumprelu_forward_row(const T* __restrict p, const T* __restrict th, T* __restrict c,
                                 int32_t* __restrict n, int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    const bool on = p[j] > th[j];
    c[j] = on ? p[j] : T(0);
    n[j] += on;
  }
}

// codes = pre · [pre > θ] (written to codes); gives how many tokens each latent fired on, [M, F].
at::Tensor jumprelu_forward(const at::Tensor& pre, const at::Tensor& theta, at::Tensor codes) {
  check_stack(pre, theta, "jumprelu_forward");
  const int64_t M = pre.size(0), B = pre.size(1), F = pre.size(2);
  at::Tensor fires = at::zeros({M, F}, pre.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "jumprelu_forward", [&] {
    const scalar_t* p = pre.const_data_ptr<scalar_t>();
    const scalar_t* th = theta.const_data_ptr<scalar_t>();
    scalar_t* c = codes.data_ptr<scalar_t>();
    int64_t* n = fires.data_ptr<int64_t>();
    for_latent_blocks(M, F, [&](int64_t m, int64_t j0, int64_t j1) {
      const int64_t l = m * F + j0;
      int32_t count[kBlock] = {};
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = (m * B + b) * F + j0;
        jumprelu_forward_row(p + row, th + l, c + row, count, j1 - j0);
      }
      for (int64_t j = 0; j < j1 - j0; ++j) n[l + j] = count[j];
    });
  });
  return fires;
}

// (The window count is an integer: with two float sums under the same condition GCC 12 no longer vectorises.)
template <typename T>
inline void jumprelu_backward_row(const T* __restrict p, const T* __restrict th, T* __restrict g, T* __restrict wg,
                                  int32_t* __restrict wn, T* __restrict gs, T hw, int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    const T x = p[j], t = th[j], gv = g[j];
    const bool in_window = std::abs(x - t) < hw;
    wg[j] += in_window ? gv : T(0);
    wn[j] += in_window;
    const T out = x > t ? gv : T(0);
    g[j] = out;
    gs[j] += out;
  }
}

// g holds ∂loss/∂codes. Gives, per latent, Σ_b g·K and Σ_b K over the window K = [|pre − θ| < half_width] (the
// estimators' sums, with g before masking), then turns g into ∂loss/∂pre = g·[pre > θ] in place and gives its
// sum over the batch (b_enc's gradient).
std::tuple<at::Tensor, at::Tensor, at::Tensor> jumprelu_backward(const at::Tensor& pre, const at::Tensor& theta,
                                                                 at::Tensor g, double half_width) {
  check_stack(pre, theta, "jumprelu_backward");
  check_stack(g, theta, "jumprelu_backward");
  const int64_t M = pre.size(0), B = pre.size(1), F = pre.size(2);
  at::Tensor window_g = at::zeros({M, F}, pre.options()), window_n = at::zeros({M, F}, pre.options());
  at::Tensor g_sum = at::zeros({M, F}, pre.options());
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "jumprelu_backward", [&] {
    const scalar_t* p = pre.const_data_ptr<scalar_t>();
    const scalar_t* th = theta.const_data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t *wg = window_g.data_ptr<scalar_t>(), *wn = window_n.data_ptr<scalar_t>(), *gs = g_sum.data_ptr<scalar_t>();
    const scalar_t hw = static_cast<scalar_t>(half_width);
    for_latent_blocks(M, F, [&](int64_t m, int64_t j0, int64_t j1) {
      const int64_t l = m * F + j0;
      scalar_t acc_wg[kBlock] = {}, acc_gs[kBlock] = {};
      int32_t acc_wn[kBlock] = {};
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = (m * B + b) * F + j0;
        jumprelu_backward_row(p + row, th + l, gp + row, acc_wg, acc_wn, acc_gs, hw, j1 - j0);
      }
      for (int64_t j = 0; j < j1 - j0; ++j) wg[l + j] = acc_wg[j], wn[l + j] = acc_wn[j], gs[l + j] = acc_gs[j];
    });
  });
  return {window_g, window_n, g_sum};
}

template <typename T>
inline void gated_forward_row(const T* __restrict s, const T* __restrict bg, const T* __restrict er,
                              const T* __restrict bm, T* __restrict gt, T* __restrict c, T* __restrict gs,
                              int32_t* __restrict n, int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    const T pg = s[j] + bg[j], pm = s[j] * er[j] + bm[j];
    const T gv = pg > 0 ? pg : T(0), cv = ((pg > 0) & (pm > 0)) ? pm : T(0);  // & not &&: no branch
    gt[j] = gv;
    c[j] = cv;
    gs[j] += gv;
    n[j] += cv > 0;
  }
}

// From shared = W(x − b_dec): gate = ReLU(shared + b_gate) and codes = [shared + b_gate > 0]·ReLU(shared·e^r + b_mag)
// (written to gate and codes); gives Σ_b gate (the L1 term's sums) and the tokens each latent fired on.
std::tuple<at::Tensor, at::Tensor> gated_forward(const at::Tensor& shared, const at::Tensor& b_gate,
                                                 const at::Tensor& exp_r, const at::Tensor& b_mag, at::Tensor gate,
                                                 at::Tensor codes) {
  for (const auto* t : {&b_gate, &exp_r, &b_mag}) check_stack(shared, *t, "gated_forward");
  const int64_t M = shared.size(0), B = shared.size(1), F = shared.size(2);
  at::Tensor gate_sum = at::zeros({M, F}, shared.options());
  at::Tensor fires = at::zeros({M, F}, shared.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(shared.scalar_type(), "gated_forward", [&] {
    const scalar_t* s = shared.const_data_ptr<scalar_t>();
    const scalar_t *bg = b_gate.const_data_ptr<scalar_t>(), *er = exp_r.const_data_ptr<scalar_t>(),
                   *bm = b_mag.const_data_ptr<scalar_t>();
    scalar_t *gt = gate.data_ptr<scalar_t>(), *c = codes.data_ptr<scalar_t>(), *gs = gate_sum.data_ptr<scalar_t>();
    int64_t* n = fires.data_ptr<int64_t>();
    for_latent_blocks(M, F, [&](int64_t m, int64_t j0, int64_t j1) {
      const int64_t l = m * F + j0;
      scalar_t acc_gs[kBlock] = {};
      int32_t count[kBlock] = {};
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = (m * B + b) * F + j0;
        gated_forward_row(s + row, bg + l, er + l, bm + l, gt + row, c + row, acc_gs, count, j1 - j0);
      }
      for (int64_t j = 0; j < j1 - j0; ++j) gs[l + j] = acc_gs[j], n[l + j] = count[j];
    });
  });
  return {gate_sum, fires};
}

template <typename T>
inline void gated_backward_row(const T* __restrict s, const T* __restrict gc, const T* __restrict bg,
                               const T* __restrict er, const T* __restrict bm, const T* __restrict w,
                               T* __restrict gg, T* __restrict rs, T* __restrict ms, T* __restrict gs, int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    const T sv = s[j], e = er[j], gate_in = gg[j] + w[j], gcv = gc[j];  // loads outside the selects: no branches
    const bool open = sv + bg[j] > 0;
    const T d_mag = (open & (sv * e + bm[j] > 0)) ? gcv : T(0);
    const T d_gate = open ? gate_in : T(0);
    gg[j] = d_gate + e * d_mag;
    rs[j] += d_mag * sv;
    ms[j] += d_mag;
    gs[j] += d_gate;
  }
}

// g_codes = ∂loss/∂codes, g_gate = ∂loss/∂ReLU(π_gate) from the auxiliary path (overwritten). With the gate open
// (π_gate > 0): ∂/∂π_mag = g_codes·[π_mag > 0], ∂/∂π_gate = g_gate + l1_weight; g_gate becomes ∂loss/∂shared =
// ∂/∂π_gate + e^r·∂/∂π_mag. Gives Σ_b ∂/∂π_mag·shared (r_mag's gradient over e^r), Σ_b ∂/∂π_mag (b_mag's) and
// Σ_b ∂/∂π_gate (b_gate's).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_backward(const at::Tensor& shared, const at::Tensor& b_gate,
                                                              const at::Tensor& exp_r, const at::Tensor& b_mag,
                                                              const at::Tensor& g_codes, at::Tensor g_gate,
                                                              const at::Tensor& l1_weight) {
  for (const auto* t : {&b_gate, &exp_r, &b_mag, &l1_weight}) check_stack(shared, *t, "gated_backward");
  check_stack(g_codes, b_gate, "gated_backward");
  check_stack(g_gate, b_gate, "gated_backward");
  const int64_t M = shared.size(0), B = shared.size(1), F = shared.size(2);
  at::Tensor r_sum = at::zeros({M, F}, shared.options()), mag_sum = at::zeros({M, F}, shared.options());
  at::Tensor gate_sum = at::zeros({M, F}, shared.options());
  AT_DISPATCH_FLOATING_TYPES(shared.scalar_type(), "gated_backward", [&] {
    const scalar_t *s = shared.const_data_ptr<scalar_t>(), *gc = g_codes.const_data_ptr<scalar_t>();
    const scalar_t *bg = b_gate.const_data_ptr<scalar_t>(), *er = exp_r.const_data_ptr<scalar_t>(),
                   *bm = b_mag.const_data_ptr<scalar_t>(), *w = l1_weight.const_data_ptr<scalar_t>();
    scalar_t* gg = g_gate.data_ptr<scalar_t>();
    scalar_t *rs = r_sum.data_ptr<scalar_t>(), *ms = mag_sum.data_ptr<scalar_t>(), *gs = gate_sum.data_ptr<scalar_t>();
    for_latent_blocks(M, F, [&](int64_t m, int64_t j0, int64_t j1) {
      const int64_t l = m * F + j0;
      scalar_t acc_rs[kBlock] = {}, acc_ms[kBlock] = {}, acc_gs[kBlock] = {};
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = (m * B + b) * F + j0;
        gated_backward_row(s + row, gc + row, bg + l, er + l, bm + l, w + l, gg + row, acc_rs, acc_ms, acc_gs,
                           j1 - j0);
      }
      for (int64_t j = 0; j < j1 - j0; ++j) rs[l + j] = acc_rs[j], ms[l + j] = acc_ms[j], gs[l + j] = acc_gs[j];
    });
  });
  return {r_sum, mag_sum, gate_sum};
}

// ---- Matryoshka: each prefix of the dictionary's reconstruction error, per token ----
//
// P [M, B, G, d] holds each level's part of the reconstruction and r [M, B, d] the bias minus the target, so
// prefix g's error is E_g = r + Σ_{h≤g} P_h. In torch that is a cumsum, an add, a square and a sum over
// [M, B, G, d] forwards and a flipped cumsum backwards (~130 ms of a ~580 ms step at batch 4096, d 512, 5 levels);
// here each token's [G, d] slab is read once and written once, in cache.

template <typename T>
inline void add_rows(const T* __restrict a, const T* __restrict b, T* __restrict out, int64_t d) {
  for (int64_t i = 0; i < d; ++i) out[i] = a[i] + b[i];
}

// Eight running sums, so the loop vectorises without reordering any one sum (the result is deterministic).
template <typename T>
inline T squared_norm(const T* __restrict a, int64_t d) {
  T acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * a[i + l];
  }
  T s = 0;
  for (int l = 0; l < 8; ++l) s += acc[l];
  for (; i < d; ++i) s += a[i] * a[i];
  return s;
}

// Writes E (the errors, [M, B, G, d]) and gives sq [M, B, G] = |E_g|² per token.
at::Tensor nested_sq_err_forward(const at::Tensor& P, const at::Tensor& r, at::Tensor E) {
  TORCH_CHECK(P.device().is_cpu() && P.dim() == 4 && P.is_contiguous(), "nested_sq_err: P must be [M, B, G, d]");
  TORCH_CHECK(E.sizes() == P.sizes() && E.is_contiguous() && E.scalar_type() == P.scalar_type(),
              "nested_sq_err: E must be like P");
  TORCH_CHECK(r.dim() == 3 && r.size(0) == P.size(0) && r.size(1) == P.size(1) && r.size(2) == P.size(3) &&
                  r.is_contiguous() && r.scalar_type() == P.scalar_type(),
              "nested_sq_err: r must be [M, B, d], contiguous, of P's dtype");
  const int64_t tokens = P.size(0) * P.size(1), G = P.size(2), d = P.size(3);
  at::Tensor sq = at::empty({P.size(0), P.size(1), G}, P.options());
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "nested_sq_err_forward", [&] {
    const scalar_t *p = P.const_data_ptr<scalar_t>(), *rp = r.const_data_ptr<scalar_t>();
    scalar_t *e = E.data_ptr<scalar_t>(), *out = sq.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* prev = rp + t * d;
        for (int64_t g = 0; g < G; ++g) {
          scalar_t* eg = e + (t * G + g) * d;
          add_rows(prev, p + (t * G + g) * d, eg, d);
          out[t * G + g] = squared_norm(eg, d);
          prev = eg;
        }
      }
    });
  });
  return sq;
}

// g_sq [M, B, G] = ∂loss/∂sq. Turns E into ∂loss/∂P in place: ∂P_h = Σ_{g≥h} 2·g_sq_g·E_g (and ∂r = ∂P_0).
void nested_sq_err_backward(at::Tensor E, const at::Tensor& g_sq) {
  TORCH_CHECK(E.device().is_cpu() && E.dim() == 4 && E.is_contiguous(), "nested_sq_err: E must be [M, B, G, d]");
  TORCH_CHECK(g_sq.sizes() == E.sizes().slice(0, 3) && g_sq.is_contiguous() && g_sq.scalar_type() == E.scalar_type(),
              "nested_sq_err: g_sq must be [M, B, G], contiguous, of E's dtype");
  const int64_t tokens = E.size(0) * E.size(1), G = E.size(2), d = E.size(3);
  AT_DISPATCH_FLOATING_TYPES(E.scalar_type(), "nested_sq_err_backward", [&] {
    scalar_t* e = E.data_ptr<scalar_t>();
    const scalar_t* w = g_sq.const_data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* next = nullptr;  // ∂P_{h+1}, already written
        for (int64_t h = G - 1; h >= 0; --h) {
          scalar_t* __restrict eh = e + (t * G + h) * d;
          const scalar_t c = 2 * w[t * G + h];
          if (next == nullptr) {
            for (int64_t i = 0; i < d; ++i) eh[i] = c * eh[i];
          } else {
            const scalar_t* __restrict nx = next;
            for (int64_t i = 0; i < d; ++i) eh[i] = c * eh[i] + nx[i];
          }
          next = eh;
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_coding, m) {
  m.def("jumprelu_forward(Tensor pre, Tensor theta, Tensor(a!) codes) -> Tensor");
  m.def("jumprelu_backward(Tensor pre, Tensor theta, Tensor(a!) g, float half_width) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gated_forward(Tensor shared, Tensor b_gate, Tensor exp_r, Tensor b_mag, Tensor(a!) gate, Tensor(b!) codes) "
      "-> (Tensor, Tensor)");
  m.def(
      "gated_backward(Tensor shared, Tensor b_gate, Tensor exp_r, Tensor b_mag, Tensor g_codes, Tensor(a!) g_gate, "
      "Tensor l1_weight) -> (Tensor, Tensor, Tensor)");
  m.def("nested_sq_err_forward(Tensor P, Tensor r, Tensor(a!) E) -> Tensor");
  m.def("nested_sq_err_backward(Tensor(a!) E, Tensor g_sq) -> ()");
}

TORCH_LIBRARY_IMPL(sparse_coding, CPU, m) {
  m.impl("jumprelu_forward", &jumprelu_forward);
  m.impl("jumprelu_backward", &jumprelu_backward);
  m.impl("gated_forward", &gated_forward);
  m.impl("gated_backward", &gated_backward);
  m.impl("nested_sq_err_forward", &nested_sq_err_forward);
  m.impl("nested_sq_err_backward", &nested_sq_err_backward);
}
