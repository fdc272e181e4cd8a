// The multi-tensor SGDP / AdamP step on the CPU: every parameter of a group in one call.
//
// Built on first use by projbench/optim/cpu_kernel.py (plain C++ and OpenMP: no torch headers,
// so it compiles in seconds) and called through ctypes with raw pointers. Each parameter arrives
// as `rows x cols` elements in memory order (its row view, projection.row_view: contiguous and
// channels_last weights alike), its gradient and state buffers in the same order.
//
// Per multi-dimensional weight the step makes two passes:
//   1. update the moments and accumulate, per row, g.w, ||g||^2, ||w||^2 and w.u (u: the update);
//   2. decide as projection.Projector.decide does (channel view, else layer view, else none) and
//      write the projected, decayed step `w <- w * (d + s * c) - s * u` (or, for the official SGDP
//      without Nesterov, project the momentum buffer in place first).
// Both passes of a weight run back to back on one thread, so the second reads from cache what the
// first brought in; weights are shared out largest first. A weight larger than a thread's fair
// share of the group is instead split by rows over all threads (each keeps its rows for pass 2).
// 1-D parameters (never projected) take one pass: moments, decay, step.
//
// Arithmetic is in the compute type (float for float / bfloat16 / float16 weights, double for
// double); the decision in double. Half-precision weights are read and rounded once per pass
// (round to nearest even, as torch does).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

enum DType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

struct BF16 { uint16_t bits; };

inline float to_compute(float x) { return x; }
inline double to_compute(double x) { return x; }
inline float to_compute(BF16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_compute(_Float16 x) { return static_cast<float>(x); }

inline void store(float* p, float x) { *p = x; }
inline void store(double* p, double x) { *p = x; }
inline void store(BF16* p, float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if (std::isnan(x)) {
    p->bits = 0x7fc0;
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    p->bits = static_cast<uint16_t>(u >> 16);
  }
}
inline void store(_Float16* p, float x) { *p = static_cast<_Float16>(x); }

template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

}  // namespace

extern "C" {

// Hyperparameters of one group (mirrored by cpu_kernel.Hyper). `project_buffer`: the update is
// SGD's momentum buffer and the projection is written into it (the official SGDP without Nesterov).
struct Hyper {
  double lr, momentum, dampening, weight_decay, wd_ratio, decay_divisor, delta, eps, beta1, beta2;
  int32_t adam, nesterov, project_buffer, threads;
};

// One parameter (mirrored by cpu_kernel.Param). `s0`: SGDP's momentum buffer or Adam's first
// moment; `s1`: Adam's second moment. `step_size`: SGDP's lr, Adam's lr / (1 - beta1^t);
// `k`: Adam's 1 / sqrt(1 - beta2^t).
struct Param {
  void* w;
  const void* g;
  void* s0;
  void* s1;
  int64_t rows, cols;
  double step_size, k;
  int32_t dtype, project;
};

}  // extern "C"

namespace {

// Per-row statistics of one weight, in double: g.w, ||g||^2, ||w||^2 (pass 1), w.u (pass 2).
struct RowStats { double gw, gg, ww, wu; };

// The projection decision of one weight (projection.Projector.decide): the view, the decay factor
// and, once pass 2 has summed w.u, the layer view's coefficient.
struct Decision {
  bool channel, layer;
  double decay, coef_layer;
};

double decay_factor(const Hyper& h, bool projected) {
  if (h.weight_decay <= 0) return 1.0;
  return 1 - h.lr * h.weight_decay * (projected ? h.wd_ratio : 1.0) / h.decay_divisor;
}

Decision decide(const Hyper& h, const Param& p, const RowStats* st) {
  const double eps = h.eps;
  if (p.rows * p.cols == 0) return {false, false, decay_factor(h, false), 0.0};
  double cos_channel = -INFINITY, gw = 0, gg = 0, ww = 0;
  bool nan = false;  // a NaN cosine makes the maximum NaN (as torch's amax): no channel view
  for (int64_t r = 0; r < p.rows; ++r) {
    const RowStats& s = st[r];
    const double cos = std::fabs(s.gw) / (std::max(std::sqrt(s.gg), eps) * std::max(std::sqrt(s.ww), eps));
    nan |= std::isnan(cos);
    cos_channel = std::max(cos_channel, cos);
    gw += s.gw;
    gg += s.gg;
    ww += s.ww;
  }
  const double numel = static_cast<double>(p.rows) * static_cast<double>(p.cols);
  const bool channel = !nan && cos_channel < h.delta / std::sqrt(static_cast<double>(p.cols));
  const double cos_layer = std::fabs(gw) / (std::max(std::sqrt(gg), eps) * std::max(std::sqrt(ww), eps));
  const bool layer = !channel && cos_layer < h.delta / std::sqrt(numel);
  return {channel, layer, decay_factor(h, channel || layer), 0.0};
}

// The coefficient c of the projection u - c * w, from w.u and ||w||^2 (of a row or of the weight).
double coefficient(double wu, double ww, double eps) {
  const double norm = std::sqrt(ww) + eps;
  return wu / (norm * norm);
}

template <typename T, bool Adam, bool Nesterov, bool ProjectBuffer>
struct Kernel {
  using C = typename Compute<T>::type;
  const Hyper& h;
  const Param& p;
  T* w;
  const T* g;
  C* s0;
  C* s1;
  C momentum, keep, beta1, beta2, one_b1, one_b2, k, eps, s;

  Kernel(const Hyper& h_, const Param& p_)
      : h(h_), p(p_), w(static_cast<T*>(p_.w)), g(static_cast<const T*>(p_.g)), s0(static_cast<C*>(p_.s0)),
        s1(static_cast<C*>(p_.s1)), momentum(h_.momentum), keep(1 - h_.dampening), beta1(h_.beta1),
        beta2(h_.beta2), one_b1(1 - h_.beta1), one_b2(1 - h_.beta2), k(p_.k), eps(h_.eps), s(p_.step_size) {}

  // Update the moments of element j and return its update u.
  C moments(int64_t j, C gj) const {
    if constexpr (Adam) {
      const C m = beta1 * s0[j] + one_b1 * gj;
      const C v = beta2 * s1[j] + one_b2 * gj * gj;
      s0[j] = m;
      s1[j] = v;
      return (Nesterov ? beta1 * m + one_b1 * gj : m) / (std::sqrt(v) * k + eps);
    } else {
      const C b = momentum * s0[j] + keep * gj;
      s0[j] = b;
      return Nesterov ? gj + momentum * b : b;
    }
  }

  // The update u of element j from moments already updated.
  C update(int64_t j) const {
    if constexpr (Adam) {
      const C m = s0[j];
      return (Nesterov ? beta1 * m + one_b1 * to_compute(g[j]) : m) / (std::sqrt(s1[j]) * k + eps);
    } else {
      return Nesterov ? to_compute(g[j]) + momentum * s0[j] : s0[j];
    }
  }

  // The projected, decayed step of element j with update u: w <- w * d - s * (u - c * w); the
  // official SGDP without Nesterov writes the projected update into its momentum buffer.
  void apply(int64_t j, C u, C c, C decay) const {
    const C wj = to_compute(w[j]);
    if constexpr (ProjectBuffer) {
      const C b = u - c * wj;
      s0[j] = b;
      store(&w[j], wj * decay - s * b);
    } else {
      store(&w[j], wj * (decay + s * c) - s * u);
    }
  }

  // Pass 1 over rows [r0, r1): g.w, ||g||^2 and ||w||^2 per row (reads only).
  void norms(int64_t r0, int64_t r1, RowStats* st) const {
    const int64_t n = p.cols;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * n;
      const T* gr = g + o;
      const T* wr = w + o;
      C gw = 0, gg = 0, ww = 0;
#pragma omp simd reduction(+ : gw, gg, ww)
      for (int64_t j = 0; j < n; ++j) {
        const C gj = to_compute(gr[j]), wj = to_compute(wr[j]);
        gw += gj * wj;
        gg += gj * gj;
        ww += wj * wj;
      }
      st[r].gw = gw;
      st[r].gg = gg;
      st[r].ww = ww;
    }
  }

  // Elements [i0, i1) of an unprojected parameter: moments, decay and step in one pass.
  void plain(int64_t i0, int64_t i1, C decay) const {
    const int64_t n = i1 - i0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) apply(i0 + j, moments(i0 + j, to_compute(g[i0 + j])), 0, decay);
  }

  // Pass 2 over rows [r0, r1) of a projected weight: the moments and each row's w.u. In the
  // channel view the row's coefficient is then known and the row steps at once, its update
  // kept in `scratch` (cols elements: in cache); the layer view steps in pass 3.
  void moments_rows(int64_t r0, int64_t r1, const Decision& d, RowStats* st, C* scratch) const {
    constexpr bool kUpdateIsBuffer = !Adam && !Nesterov;  // u is SGD's buffer: no copy needed
    const int64_t n = p.cols;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * n;
      C wu = 0;
#pragma omp simd reduction(+ : wu)
      for (int64_t j = 0; j < n; ++j) {
        const C u = moments(o + j, to_compute(g[o + j]));
        if constexpr (!kUpdateIsBuffer) scratch[j] = u;
        wu += to_compute(w[o + j]) * u;
      }
      st[r].wu = wu;
      if (d.channel) {
        const C c = static_cast<C>(coefficient(st[r].wu, st[r].ww, h.eps)), decay = d.decay;
        const C* u = kUpdateIsBuffer ? s0 + o : scratch;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) apply(o + j, u[j], c, decay);
      }
    }
  }

  // Pass 3 over rows [r0, r1) of a weight projected in the layer view.
  void layer_step(int64_t r0, int64_t r1, const Decision& d) const {
    const C c = static_cast<C>(d.coef_layer), decay = d.decay;
    const int64_t i0 = r0 * p.cols, n = (r1 - r0) * p.cols;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) apply(i0 + j, update(i0 + j), c, decay);
  }
};

// The layer view's coefficient from the rows' w.u and ||w||^2 (after pass 2).
void finish_layer(const Hyper& h, const Param& p, const RowStats* st, Decision& d) {
  double wu = 0, ww = 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    wu += st[r].wu;
    ww += st[r].ww;
  }
  d.coef_layer = coefficient(wu, ww, h.eps);
}

template <bool Adam, bool Nesterov, bool ProjectBuffer, typename F>
void by_dtype(const Hyper& h, const Param& p, F&& f) {
  switch (p.dtype) {
    case kFloat32: f(Kernel<float, Adam, Nesterov, ProjectBuffer>(h, p)); break;
    case kFloat64: f(Kernel<double, Adam, Nesterov, ProjectBuffer>(h, p)); break;
    case kBFloat16: f(Kernel<BF16, Adam, Nesterov, ProjectBuffer>(h, p)); break;
    case kFloat16: f(Kernel<_Float16, Adam, Nesterov, ProjectBuffer>(h, p)); break;
  }
}

constexpr int64_t kChunk = 1 << 14;  // elements per work item of a split unprojected parameter

template <bool Adam, bool Nesterov, bool ProjectBuffer>
void run(const Hyper& h, Param* params, int64_t n, uint8_t* projected) {
  std::vector<int64_t> offset(n + 1, 0);  // each weight's rows in the statistics workspace
  int64_t total = 0, max_cols = 1;
  for (int64_t i = 0; i < n; ++i) {
    offset[i + 1] = offset[i] + (params[i].project ? params[i].rows : 0);
    total += params[i].rows * params[i].cols;
    if (params[i].project) max_cols = std::max(max_cols, params[i].cols);
  }
  std::vector<RowStats> stats(offset[n]);
  std::vector<Decision> decisions(n);
  // Largest first (dynamic scheduling then balances the threads); a parameter larger than a
  // thread's fair share of the work (an embedding, a huge Linear) is split over all threads
  // instead. Splitting costs a barrier per pass, which a loaded machine makes expensive (a thread
  // that is not running holds up the others), so it is kept for weights that need it.
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return params[a].rows * params[a].cols > params[b].rows * params[b].cols;
  });
  const int threads = std::max<int32_t>(h.threads, 1);
  const int64_t share = threads > 1 ? std::max<int64_t>(total / threads, int64_t(1) << 16) : INT64_MAX;
  int64_t n_split = 0;
  while (n_split < n && params[order[n_split]].rows * params[order[n_split]].cols > share) ++n_split;

#pragma omp parallel num_threads(threads)
  {
    std::vector<double> scratch_space(max_cols);  // one row's updates (float or double)
    void* scratch = scratch_space.data();
    for (int64_t s = 0; s < n_split; ++s) {  // every thread takes part in each of these
      const int64_t i = order[s];
      by_dtype<Adam, Nesterov, ProjectBuffer>(h, params[i], [&](const auto& kernel) {
        using C = typename std::decay_t<decltype(kernel)>::C;
        const Param& p = params[i];
        const int64_t numel = p.rows * p.cols;
        RowStats* st = stats.data() + offset[i];
        Decision& d = decisions[i];
        if (p.project) {
#pragma omp for schedule(static)
          for (int64_t r = 0; r < p.rows; ++r) kernel.norms(r, r + 1, st);
#pragma omp single
          d = decide(h, p, st);
        } else {
#pragma omp single
          d = {false, false, decay_factor(h, false), 0.0};
        }
        if (d.channel || d.layer) {
#pragma omp for schedule(static)
          for (int64_t r = 0; r < p.rows; ++r) kernel.moments_rows(r, r + 1, d, st, static_cast<C*>(scratch));
        } else {
#pragma omp for schedule(static)
          for (int64_t c = 0; c < numel; c += kChunk) kernel.plain(c, std::min(numel, c + kChunk), d.decay);
        }
        if (d.layer) {
#pragma omp single
          finish_layer(h, p, st, d);
#pragma omp for schedule(static)
          for (int64_t r = 0; r < p.rows; ++r) kernel.layer_step(r, r + 1, d);
        }
      });
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = n_split; s < n; ++s) {  // each of these on one thread, all passes back to back
      const int64_t i = order[s];
      by_dtype<Adam, Nesterov, ProjectBuffer>(h, params[i], [&](const auto& kernel) {
        using C = typename std::decay_t<decltype(kernel)>::C;
        const Param& p = params[i];
        RowStats* st = stats.data() + offset[i];
        Decision& d = decisions[i];
        if (p.project) {
          kernel.norms(0, p.rows, st);
          d = decide(h, p, st);
        } else {
          d = {false, false, decay_factor(h, false), 0.0};
        }
        if (!d.channel && !d.layer) {
          kernel.plain(0, p.rows * p.cols, d.decay);
          return;
        }
        kernel.moments_rows(0, p.rows, d, st, static_cast<C*>(scratch));
        if (d.layer) {
          finish_layer(h, p, st, d);
          kernel.layer_step(0, p.rows, d);
        }
      });
    }
  }
  for (int64_t i = 0; i < n; ++i) projected[i] = decisions[i].channel || decisions[i].layer;
}

}  // namespace

extern "C" {

// Steps every parameter in `params` (n of them); writes 1 into projected[i] where parameter i
// was projected, else 0. Returns 0, or -1 for an unknown dtype.
int projected_step(const Hyper* h, Param* params, int64_t n, uint8_t* projected) {
  for (int64_t i = 0; i < n; ++i)
    if (params[i].dtype < kFloat32 || params[i].dtype > kFloat16) return -1;
  const bool adam = h->adam, nesterov = h->nesterov, in_place = !h->adam && !h->nesterov && h->project_buffer;
  if (adam) {
    nesterov ? run<true, true, false>(*h, params, n, projected) : run<true, false, false>(*h, params, n, projected);
  } else if (nesterov) {
    run<false, true, false>(*h, params, n, projected);
  } else {
    in_place ? run<false, false, true>(*h, params, n, projected) : run<false, false, false>(*h, params, n, projected);
  }
  return 0;
}

}  // extern "C"
