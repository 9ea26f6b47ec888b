// The elementwise passes of the dense JumpReLU and gated SAE steps, each fused into one pass over [M, B, d_sae].
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
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = (m * B + b) * F;
        for (int64_t j = j0; j < j1; ++j) {
          const bool on = p[row + j] > th[m * F + j];
          c[row + j] = on ? p[row + j] : scalar_t(0);
          n[m * F + j] += on;
        }
      }
    });
  });
  return fires;
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
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = (m * B + b) * F;
        for (int64_t j = j0; j < j1; ++j) {
          const scalar_t x = p[row + j], t = th[m * F + j], gv = gp[row + j];
          const scalar_t in_window = std::abs(x - t) < hw ? scalar_t(1) : scalar_t(0);
          wg[m * F + j] += gv * in_window;
          wn[m * F + j] += in_window;
          const scalar_t out = x > t ? gv : scalar_t(0);
          gp[row + j] = out;
          gs[m * F + j] += out;
        }
      }
    });
  });
  return {window_g, window_n, g_sum};
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
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = (m * B + b) * F;
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t l = m * F + j;
          const scalar_t pg = s[row + j] + bg[l], pm = s[row + j] * er[l] + bm[l];
          const scalar_t gv = pg > 0 ? pg : scalar_t(0), cv = (pg > 0 && pm > 0) ? pm : scalar_t(0);
          gt[row + j] = gv;
          c[row + j] = cv;
          gs[l] += gv;
          n[l] += cv > 0;
        }
      }
    });
  });
  return {gate_sum, fires};
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
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = (m * B + b) * F;
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t l = m * F + j;
          const scalar_t sv = s[row + j];
          const bool open = sv + bg[l] > 0;
          const scalar_t d_mag = (open && sv * er[l] + bm[l] > 0) ? gc[row + j] : scalar_t(0);
          const scalar_t d_gate = open ? gg[row + j] + w[l] : scalar_t(0);
          gg[row + j] = d_gate + er[l] * d_mag;
          rs[l] += d_mag * sv;
          ms[l] += d_mag;
          gs[l] += d_gate;
        }
      }
    });
  });
  return {r_sum, mag_sum, gate_sum};
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
}

TORCH_LIBRARY_IMPL(sparse_coding, CPU, m) {
  m.impl("jumprelu_forward", &jumprelu_forward);
  m.impl("jumprelu_backward", &jumprelu_backward);
  m.impl("gated_forward", &gated_forward);
  m.impl("gated_backward", &gated_backward);
}
