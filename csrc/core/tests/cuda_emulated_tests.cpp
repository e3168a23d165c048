// The CUDA kernels of the core, compiled as C++ and run on the SIMT emulation (simt_emulation.h),
// against the CPU kernels and float64 sums: every launcher of cuda_kernels.h and fl_cuda_kernels.h,
// for K = 1..64, widths 1..4099 (and one of 100003), one block, many tiny blocks, offset views of
// a flat buffer with empty blocks, in fp16, bf16, fp32 and fp64. Outputs, workspaces and the
// padding around every block are filled with NaN bytes (0xFF) first, so an element a kernel forgot
// to write, or one it wrote out of bounds, shows.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "check.h"
#include "convert.h"
#include "cpu_kernels.h"
#include "cuda_kernels.h"
#include "fl_cuda_kernels.h"
#include "min_norm.h"
#include "mol_kernels.h"

namespace {

using mk::accum_t;

std::mt19937_64 rng(20261201);
cudaStream_t const stream = nullptr;

template <class T>
std::vector<T> poisoned(size_t n) {
  std::vector<T> v(n);
  std::memset(static_cast<void*>(v.data()), 0xFF, n * sizeof(T));
  return v;
}

template <class T>
bool is_poison(const T& x) {
  unsigned char bytes[sizeof(T)];
  std::memcpy(bytes, &x, sizeof(T));
  return std::all_of(bytes, bytes + sizeof(T), [](unsigned char b) { return b == 0xFF; });
}

// memcmp of n bytes; also for n = 0, where the pointers of empty vectors may be null.
bool same_bytes(const void* a, const void* b, size_t n) { return n == 0 || std::memcmp(a, b, n) == 0; }

template <class T>
double as_double(T x) {
  return double(mk::to_float(x));
}

template <class T>
T random_value(double scale = 1.0) {
  std::normal_distribution<double> normal;
  return mk::from_float<T>(accum_t<T>(scale * normal(rng)));
}

// Relative precision of a value stored in T.
template <class T>
double storage_eps() {
  if (std::is_same_v<T, double>) return 0x1p-53;
  if (std::is_same_v<T, float>) return 0x1p-24;
  if (std::is_same_v<T, mk::half_t>) return 0x1p-11;
  return 0x1p-8;
}
template <class T>
const char* type_name() {
  if (std::is_same_v<T, double>) return "fp64";
  if (std::is_same_v<T, float>) return "fp32";
  if (std::is_same_v<T, mk::half_t>) return "fp16";
  return "bf16";
}

// A stack of K rows per block in one poisoned buffer: block j starts at offset[j], its rows
// row_stride[j] apart, and the elements between and after the rows stay poisoned. A copy owns a
// copy of the storage and points into it.
template <class T>
struct Stack {
  int64_t K = 0;
  std::vector<int64_t> cols, row_stride, offset;
  std::vector<T> storage;
  std::vector<T*> data;

  Stack() = default;
  Stack(const Stack& other)
      : K(other.K), cols(other.cols), row_stride(other.row_stride), offset(other.offset), storage(other.storage) {
    point_into_storage();
  }
  Stack& operator=(const Stack&) = delete;
  void point_into_storage() {
    data.clear();
    for (int64_t o : offset) data.push_back(storage.data() + o);
  }

  T& at(size_t j, int64_t row, int64_t col) { return data[j][row * row_stride[j] + col]; }
  const T& at(size_t j, int64_t row, int64_t col) const { return data[j][row * row_stride[j] + col]; }
  mk::StackView<T> view() const {
    return {const_cast<const T* const*>(data.data()), cols.data(), row_stride.data(), int64_t(cols.size()), K};
  }
  mk::MutableStackView<T> mutable_view() const {
    return {data.data(), cols.data(), row_stride.data(), int64_t(cols.size()), K};
  }
  int64_t total_cols() const {
    int64_t n = 0;
    for (int64_t c : cols) n += c;
    return n;
  }
};

// one_block and tiny_blocks: rows 2 elements apart beyond their width; flat_views: column views of
// one [K, total + 3] matrix (odd strides: scalar loads only); vector_heads: rows 16-element aligned
// strides at element offsets 1, 4, 7, 2, ... past a 16-element boundary, so the Gram's vector path
// runs with a scalar head and tail; many_blocks: 1100 blocks of 0-3 columns (more than one table).
enum class Layout { one_block, flat_views, tiny_blocks, vector_heads, many_blocks };
const char* layout_name(Layout layout) {
  switch (layout) {
    case Layout::one_block: return "one block";
    case Layout::flat_views: return "flat views";
    case Layout::tiny_blocks: return "tiny blocks";
    case Layout::vector_heads: return "vector heads";
    default: return "many blocks";
  }
}

std::vector<int64_t> widths_for(Layout layout, int64_t d) {
  if (layout == Layout::one_block) return {d};
  if (layout == Layout::flat_views) return {0, d / 3, 0, d - d / 3, 1, 0};
  if (layout == Layout::vector_heads) return {d, d / 2 + 5, 0, 7, 33, d / 3 + 16};
  if (layout == Layout::many_blocks) {
    std::vector<int64_t> widths;
    for (int j = 0; j < 1100; ++j) widths.push_back(j % 4);
    return widths;
  }
  std::vector<int64_t> widths;
  for (int j = 0; j < 60; ++j) widths.push_back(1 + j % 3);
  return widths;
}

// Blocks with these widths: separate padded blocks, or (flat) column views of one [K, total] matrix.
template <class T>
Stack<T> make_stack(int64_t K, const std::vector<int64_t>& widths, bool flat, bool fill, bool aligned = false) {
  Stack<T> s;
  s.K = K;
  s.cols = widths;
  int64_t total = 0;
  for (int64_t w : widths) total += w;
  int64_t size = 0;
  for (int64_t w : widths) {
    if (flat) {
      s.offset.push_back(size);
      s.row_stride.push_back(total + 3);
      size += w;
    } else if (aligned) {
      const int64_t j = int64_t(s.offset.size()), stride = (w + 1 + 15) / 16 * 16;
      const int64_t start = (size + 15) / 16 * 16 + (1 + 3 * j) % 16;
      s.offset.push_back(start);
      s.row_stride.push_back(stride);
      size = start + K * stride + 5;
    } else {
      s.offset.push_back(size);
      s.row_stride.push_back(w + 2);
      size += K * (w + 2) + 5;
    }
  }
  if (flat) size = K * (total + 3);
  s.storage = poisoned<T>(size_t(size) + 1);
  s.point_into_storage();
  if (fill)
    for (size_t j = 0; j < widths.size(); ++j)
      for (int64_t r = 0; r < K; ++r)
        for (int64_t c = 0; c < widths[j]; ++c) s.at(j, r, c) = random_value<T>();
  return s;
}

// Every element outside the stack's blocks is still poison.
template <class T>
bool padding_intact(const Stack<T>& s) {
  std::vector<char> inside(s.storage.size(), 0);
  for (size_t j = 0; j < s.cols.size(); ++j)
    for (int64_t r = 0; r < s.K; ++r)
      for (int64_t c = 0; c < s.cols[j]; ++c) inside[size_t(&s.at(j, r, c) - s.storage.data())] = 1;
  for (size_t i = 0; i < s.storage.size(); ++i)
    if (!inside[i] && !is_poison(s.storage[i])) return false;
  return true;
}

// sum over blocks and columns of a[r] b[s] (and of |a[r] b[s]|, the scale of the rounding error).
template <class T, class U>
void oracle_products(const Stack<T>& a, const Stack<U>& b, std::vector<double>& dot, std::vector<double>& scale) {
  const int64_t Ka = a.K, Kb = b.K;
  dot.assign(size_t(Ka * Kb), 0.0);
  scale.assign(size_t(Ka * Kb), 0.0);
  for (size_t j = 0; j < a.cols.size(); ++j)
    for (int64_t r = 0; r < Ka; ++r)
      for (int64_t s = 0; s < Kb; ++s)
        for (int64_t c = 0; c < a.cols[j]; ++c) {
          const double p = as_double(a.at(j, r, c)) * as_double(b.at(j, s, c));
          dot[r * Kb + s] += p;
          scale[r * Kb + s] += std::fabs(p);
        }
}

template <class A>
void check_products(const std::vector<A>& got, const std::vector<double>& dot, const std::vector<double>& scale,
                    const std::string& what) {
  const double eps = std::is_same_v<A, double> ? 1e-14 : 2e-6;
  for (size_t e = 0; e < dot.size(); ++e) {
    const double tol = eps * scale[e] + 1e-300;
    CHECK(std::fabs(double(got[e]) - dot[e]) <= tol, "%s: element %zu = %.17g, float64 sum %.17g", what.c_str(), e,
          double(got[e]), dot[e]);
  }
}

template <class A>
bool exactly_symmetric(const std::vector<A>& G, int64_t K) {
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < i; ++j)
      if (std::memcmp(&G[i * K + j], &G[j * K + i], sizeof(A)) != 0) return false;
  return true;
}

std::string label(const char* op, const char* type, Layout layout, int64_t K, int64_t d) {
  char text[160];
  std::snprintf(text, sizeof text, "%s %s %s K=%lld d=%lld", op, type, layout_name(layout), (long long)K,
                (long long)d);
  return text;
}

// A Gram-family workspace: the ticket zeroed (once), everything else poisoned.
std::vector<double> gram_workspace(int64_t n) {
  const size_t bytes = mk::gram_cuda_workspace_bytes(n);
  std::vector<double> ws = poisoned<double>((bytes + 7) / 8);
  std::memset(ws.data(), 0, mk::kGramCudaTicketBytes);
  return ws;
}
bool ticket_zero(const std::vector<double>& ws) {
  unsigned ticket;
  std::memcpy(&ticket, ws.data(), sizeof ticket);
  return ticket == 0;
}

bool flat_layout(Layout layout) { return layout == Layout::flat_views; }
bool aligned_layout(Layout layout) { return layout == Layout::vector_heads; }

template <class T>
void test_gram(Layout layout, int64_t K, int64_t d) {
  using A = accum_t<T>;
  const std::vector<int64_t> widths = widths_for(layout, d);
  const bool flat = flat_layout(layout), aligned = aligned_layout(layout);
  const Stack<T> a = make_stack<T>(K, widths, flat, true, aligned), b = make_stack<T>(K, widths, flat, true, aligned);
  const std::string what = label("gram", type_name<T>(), layout, K, d);
  std::vector<double> dot, scale;

  std::vector<double> ws = gram_workspace(K);
  std::vector<A> G = poisoned<A>(size_t(K * K)), cpu(size_t(K * K));
  mk::gram_cuda<T>(a.view(), nullptr, ws.data(), G.data(), stream);
  mk::gram_cpu<T>(a.view(), cpu.data());
  oracle_products(a, a, dot, scale);
  check_products(G, dot, scale, what);
  check_products(cpu, dot, scale, label("gram (CPU kernel)", type_name<T>(), layout, K, d));
  CHECK(exactly_symmetric(G, K), "%s: not exactly symmetric", what.c_str());
  CHECK(ticket_zero(ws), "%s: the last CTA did not reset the ticket", what.c_str());
  // The same workspace again, as a graph replay would: bitwise the same result.
  std::vector<A> again = poisoned<A>(size_t(K * K));
  mk::gram_cuda<T>(a.view(), nullptr, ws.data(), again.data(), stream);
  CHECK(same_bytes(G.data(), again.data(), G.size() * sizeof(A)) && ticket_zero(ws),
        "%s: a second call with the same workspace differs", what.c_str());

  std::vector<A> C = poisoned<A>(size_t(K * K));
  const mk::StackView<T> bv = b.view();
  mk::gram_cuda<T>(a.view(), &bv, ws.data(), C.data(), stream);
  oracle_products(a, b, dot, scale);
  check_products(C, dot, scale, label("cross_gram", type_name<T>(), layout, K, d));
  again = poisoned<A>(size_t(K * K));
  mk::gram_cuda<T>(a.view(), &bv, ws.data(), again.data(), stream);
  CHECK(same_bytes(C.data(), again.data(), C.size() * sizeof(A)) && ticket_zero(ws),
        "cross_gram %s: a second call with the same workspace differs", what.c_str());
  CHECK(padding_intact(a) && padding_intact(b), "gram: padding written");
}

// Different grid sizes (SM counts): each correct; the same count twice is bitwise the same.
template <class T>
void test_gram_grids(Layout layout, int64_t K, int64_t d) {
  using A = accum_t<T>;
  const std::vector<int64_t> widths = widths_for(layout, d);
  const Stack<T> a = make_stack<T>(K, widths, flat_layout(layout), true, aligned_layout(layout));
  std::vector<double> dot, scale;
  oracle_products(a, a, dot, scale);
  for (const int sms : {1, 3, 7, 2}) {
    mk::simt::set_multiprocessor_count(sms);
    std::vector<double> ws = gram_workspace(K);
    std::vector<A> G = poisoned<A>(size_t(K * K)), H = poisoned<A>(size_t(K * K));
    mk::gram_cuda<T>(a.view(), nullptr, ws.data(), G.data(), stream);
    mk::gram_cuda<T>(a.view(), nullptr, ws.data(), H.data(), stream);
    const std::string what = label("gram", type_name<T>(), layout, K, d) + " SMs=" + std::to_string(sms);
    check_products(G, dot, scale, what);
    CHECK(same_bytes(G.data(), H.data(), G.size() * sizeof(A)) && exactly_symmetric(G, K),
          "%s: not deterministic or not symmetric", what.c_str());
  }
  mk::simt::set_multiprocessor_count(2);
}

// out_j (+)= alpha sum_k w_k g_k into U, and combine (U = T, alpha = 1, no accumulation).
template <class T, class U>
void test_combine_into(Layout layout, int64_t K, int64_t d, bool accumulate) {
  using A = accum_t<T>;
  const std::vector<int64_t> widths = widths_for(layout, d);
  const bool flat = flat_layout(layout), aligned = aligned_layout(layout);
  const Stack<T> g = make_stack<T>(K, widths, flat, true, aligned);
  Stack<U> out = make_stack<U>(1, widths, flat, accumulate, aligned), cpu = out;
  std::vector<A> weights(K);
  for (auto& w : weights) w = A(std::uniform_real_distribution<double>(-1.0, 1.0)(rng));
  const A alpha = accumulate ? A(-0.375) : A(1);
  const Stack<U> before = out;
  if (accumulate || !std::is_same_v<T, U>) {
    mk::combine_into_cuda<T, U>(g.view(), weights.data(), out.data.data(), alpha, accumulate, stream);
    mk::combine_into_cpu<T, U>(g.view(), weights.data(), cpu.data.data(), alpha, accumulate);
  } else {
    mk::combine_cuda<T>(g.view(), weights.data(), reinterpret_cast<T* const*>(out.data.data()), stream);
    mk::combine_cpu<T>(g.view(), weights.data(), reinterpret_cast<T* const*>(cpu.data.data()));
  }
  const std::string what = label(accumulate ? "combine_into (accumulate)" : "combine", type_name<T>(), layout, K, d) +
                           " into " + type_name<U>();
  const double eps_a = std::is_same_v<A, double> ? 0x1p-53 : 0x1p-24;
  for (size_t j = 0; j < widths.size(); ++j)
    for (int64_t c = 0; c < widths[j]; ++c) {
      double ref = 0.0, scale = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        ref += double(weights[k]) * as_double(g.at(j, k, c));
        scale += std::fabs(double(weights[k]) * as_double(g.at(j, k, c)));
      }
      ref *= double(alpha);
      scale *= std::fabs(double(alpha));
      if (accumulate) {
        ref += as_double(before.at(j, 0, c));
        scale += std::fabs(as_double(before.at(j, 0, c)));
      }
      const double tol = storage_eps<U>() * std::fabs(ref) + 4.0 * (K + 2) * eps_a * scale + 0x1p-24;
      CHECK(std::fabs(as_double(out.at(j, 0, c)) - ref) <= tol, "%s: block %zu column %lld = %.9g, float64 %.9g",
            what.c_str(), j, (long long)c, as_double(out.at(j, 0, c)), ref);
      CHECK(std::fabs(as_double(cpu.at(j, 0, c)) - ref) <= tol, "%s (CPU kernel): block %zu column %lld",
            what.c_str(), j, (long long)c);
    }
  CHECK(padding_intact(out), "%s: padding written", what.c_str());
}

template <class T>
void test_project_simplex(int64_t rows, int64_t K) {
  std::vector<T> v(size_t(rows * K)), out = poisoned<T>(size_t(rows * K)), cpu(size_t(rows * K));
  for (auto& x : v) x = random_value<T>(2.0);
  mk::project_simplex_cuda<T>(v.data(), rows, K, out.data(), stream);
  mk::project_simplex_cpu<T>(v.data(), rows, K, cpu.data());
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const double x = as_double(out[r * K + k]), y = as_double(cpu[r * K + k]);
      CHECK(x >= 0.0 && std::fabs(x - y) <= storage_eps<T>() * 2.0 + 1e-14, "project_simplex %s rows=%lld K=%lld: "
            "row %lld entry %lld = %.17g, CPU kernel %.17g", type_name<T>(), (long long)rows, (long long)K,
            (long long)r, (long long)k, x, y);
      sum += x;
    }
    CHECK(std::fabs(sum - 1.0) <= K * storage_eps<T>() + 1e-12, "project_simplex %s K=%lld: row %lld sums to %.17g",
          type_name<T>(), (long long)K, (long long)r, sum);
  }
}

// min_norm on Grams of random vectors (rank-deficient for K > 4): the CUDA weights reach the CPU
// kernel's objective and lie on the simplex.
template <class T>
void test_min_norm(int64_t batch, int64_t K) {
  const int64_t dim = 4;
  std::vector<T> G(size_t(batch * K * K)), out = poisoned<T>(size_t(batch * K)), cpu(size_t(batch * K));
  std::vector<double> Gd(G.size());
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<double> x(size_t(K * dim));
    for (auto& e : x) e = as_double(random_value<T>());
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j <= i; ++j) {
        double s = 0.0;
        for (int64_t c = 0; c < dim; ++c) s += x[i * dim + c] * x[j * dim + c];
        G[b * K * K + i * K + j] = G[b * K * K + j * K + i] = mk::from_float<T>(accum_t<T>(s));
      }
  }
  for (size_t e = 0; e < G.size(); ++e) Gd[e] = as_double(G[e]);
  std::vector<double> work = poisoned<double>(size_t(mk::min_norm_cuda_workspace(batch, K)));
  mk::min_norm_cuda<T>(G.data(), batch, K, out.data(), work.empty() ? nullptr : work.data(), stream);
  mk::min_norm_cpu<T>(G.data(), batch, K, cpu.data());
  for (int64_t b = 0; b < batch; ++b) {
    const double* Gb = Gd.data() + b * K * K;
    auto objective = [&](const std::vector<T>& l) {
      double f = 0.0, scale = 0.0;
      for (int64_t i = 0; i < K; ++i)
        for (int64_t j = 0; j < K; ++j) {
          f += as_double(l[b * K + i]) * Gb[i * K + j] * as_double(l[b * K + j]);
          scale = std::max(scale, std::fabs(Gb[i * K + j]));
        }
      return std::make_pair(f, scale);
    };
    double sum = 0.0;
    for (int64_t i = 0; i < K; ++i) {
      CHECK(as_double(out[b * K + i]) >= 0.0, "min_norm %s K=%lld: lambda %lld < 0", type_name<T>(), (long long)K,
            (long long)i);
      sum += as_double(out[b * K + i]);
    }
    const auto [f, scale] = objective(out);
    const double f_cpu = objective(cpu).first;
    CHECK(std::fabs(sum - 1.0) <= 2.0 * K * storage_eps<T>() + 1e-12, "min_norm %s K=%lld batch %lld: sum %.17g",
          type_name<T>(), (long long)K, (long long)b, sum);
    CHECK(std::fabs(f - f_cpu) <= 8.0 * K * storage_eps<T>() * scale + 1e-12 * scale,
          "min_norm %s K=%lld batch %lld: objective %.17g, CPU kernel %.17g", type_name<T>(), (long long)K,
          (long long)b, f, f_cpu);
  }
}

template <class A>
double tracking_tol(double y, double g) {
  const double eps = std::is_same_v<A, double> ? 0x1p-53 : 0x1p-24;
  return 8.0 * eps * (std::fabs(y) + std::fabs(g)) + 1e-300;
}

// MoCo's pass 1 (track_gram), the normalised tracking's joint Gram and pass 2 (track_combine).
template <class T>
void test_moco_passes(Layout layout, int64_t K, int64_t d) {
  using A = accum_t<T>;
  const std::vector<int64_t> widths = widths_for(layout, d);
  const bool flat = flat_layout(layout), aligned = aligned_layout(layout);
  const Stack<T> g = make_stack<T>(K, widths, flat, true, aligned);
  const Stack<A> y0 = make_stack<A>(K, widths, flat, true, aligned);
  const A beta = A(0.3);
  const std::vector<A> beta_on_device{beta};  // the kernels read beta from device memory
  const std::string type = type_name<T>();

  // Pass 1: y <- y - beta (y - g), then the Gram of the new y.
  Stack<A> y = y0;
  std::vector<double> ws = gram_workspace(K);
  std::vector<A> G = poisoned<A>(size_t(K * K));
  mk::track_gram_cuda<T>(g.view(), y.mutable_view(), beta_on_device.data(), ws.data(), G.data(), stream);
  {  // the same workspace again, from the same y: bitwise the same y and Gram
    Stack<A> y2 = y0;
    std::vector<A> G2 = poisoned<A>(size_t(K * K));
    mk::track_gram_cuda<T>(g.view(), y2.mutable_view(), beta_on_device.data(), ws.data(), G2.data(), stream);
    CHECK(same_bytes(G.data(), G2.data(), G.size() * sizeof(A)) &&
              same_bytes(y.storage.data(), y2.storage.data(), y.storage.size() * sizeof(A)) && ticket_zero(ws),
          "%s: a second call with the same workspace differs", label("track_gram", type.c_str(), layout, K, d).c_str());
  }
  for (size_t j = 0; j < widths.size(); ++j)
    for (int64_t r = 0; r < K; ++r)
      for (int64_t c = 0; c < widths[j]; ++c) {
        const double yo = double(y0.at(j, r, c)), gv = as_double(g.at(j, r, c));
        const double ref = yo - double(beta) * (yo - gv);
        CHECK(std::fabs(double(y.at(j, r, c)) - ref) <= tracking_tol<A>(yo, gv), "%s: y[%zu][%lld][%lld] = %.9g, "
              "float64 %.9g", label("track_gram", type.c_str(), layout, K, d).c_str(), j, (long long)r, (long long)c,
              double(y.at(j, r, c)), ref);
      }
  std::vector<double> dot, scale;
  oracle_products(y, y, dot, scale);
  check_products(G, dot, scale, label("track_gram", type.c_str(), layout, K, d));
  CHECK(exactly_symmetric(G, K) && padding_intact(y), "track_gram: asymmetric or padding written");

  // The 2K x 2K Gram of [y; g].
  Stack<double> joint;
  joint.K = 2 * K;
  joint.cols = widths;
  for (size_t j = 0; j < widths.size(); ++j) {
    joint.offset.push_back(int64_t(joint.storage.size()));
    joint.row_stride.push_back(widths[j]);
    for (int64_t r = 0; r < 2 * K; ++r)
      for (int64_t c = 0; c < widths[j]; ++c)
        joint.storage.push_back(r < K ? double(y.at(j, r, c)) : as_double(g.at(j, r - K, c)));
  }
  joint.point_into_storage();
  std::vector<double> ws2 = gram_workspace(2 * K);
  std::vector<A> J = poisoned<A>(size_t(4 * K * K)), J2 = poisoned<A>(size_t(4 * K * K));
  mk::joint_gram_cuda<T>(g.view(), y.view(), ws2.data(), J.data(), stream);
  mk::joint_gram_cuda<T>(g.view(), y.view(), ws2.data(), J2.data(), stream);
  oracle_products(joint, joint, dot, scale);
  check_products(J, dot, scale, label("joint_gram", type.c_str(), layout, K, d));
  CHECK(exactly_symmetric(J, 2 * K) && same_bytes(J.data(), J2.data(), J.size() * sizeof(A)) && ticket_zero(ws2),
        "%s: asymmetric, or a second call differs", label("joint_gram", type.c_str(), layout, K, d).c_str());

  // Pass 2: y <- y + beta (scale_k g_k - y), out (+)= alpha sum_k w_k y_k.
  const Stack<A> y1 = y;
  std::vector<A> row_scale(K), weights(K);
  for (auto& s : row_scale) s = A(std::uniform_real_distribution<double>(0.5, 2.0)(rng));
  for (auto& w : weights) w = A(std::uniform_real_distribution<double>(0.0, 1.0)(rng));
  Stack<T> out = make_stack<T>(1, widths, flat, true, aligned);
  const Stack<T> out0 = out;
  const A alpha = A(-0.25);
  mk::track_combine_cuda<T, T>(g.view(), y.mutable_view(), row_scale.data(), beta_on_device.data(), weights.data(),
                               out.data.data(), alpha, true, stream);
  const double eps_a = std::is_same_v<A, double> ? 0x1p-53 : 0x1p-24;
  for (size_t j = 0; j < widths.size(); ++j)
    for (int64_t c = 0; c < widths[j]; ++c) {
      double ref = 0.0, sc = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double yo = double(y1.at(j, k, c)), gv = double(row_scale[k]) * as_double(g.at(j, k, c));
        const double yn = yo + double(beta) * (gv - yo);
        CHECK(std::fabs(double(y.at(j, k, c)) - yn) <= tracking_tol<A>(yo, gv), "%s: y[%zu][%lld][%lld]",
              label("track_combine", type.c_str(), layout, K, d).c_str(), j, (long long)k, (long long)c);
        ref += double(weights[k]) * yn;
        sc += std::fabs(double(weights[k]) * yn) + tracking_tol<A>(yo, gv);
      }
      ref = as_double(out0.at(j, 0, c)) + double(alpha) * ref;
      const double tol = storage_eps<T>() * std::fabs(ref) + 8.0 * (K + 2) * eps_a * sc + 0x1p-24;
      CHECK(std::fabs(as_double(out.at(j, 0, c)) - ref) <= tol, "%s: out[%zu][%lld] = %.9g, float64 %.9g",
            label("track_combine", type.c_str(), layout, K, d).c_str(), j, (long long)c,
            as_double(out.at(j, 0, c)), ref);
    }
  CHECK(padding_intact(out) && padding_intact(y), "track_combine: padding written");
}

// The one-launch combinations (combine, combine_into, track_combine) across their paths: every
// (T, U) pair, K from 1 to 64 (each batch shape: 8 column positions x 1 row, 4 x 2, 2 x 4, 1 x 8,
// with partial last batches) and above the 1024 weights staged at a time, scalar heads and tails
// around the vectors, blocks split between CTAs, more blocks than one table holds. NaN planted in
// g must come out exactly at its columns (and in y at its elements); a second call, and calls on
// other SM counts, must give the same bits.
template <class T>
std::vector<std::pair<size_t, int64_t>> plant_nans(Stack<T>& g) {
  std::vector<size_t> blocks;
  for (size_t j = 0; j < g.cols.size(); ++j)
    if (g.cols[j] > 0) blocks.push_back(j);
  std::vector<std::pair<size_t, int64_t>> planted;
  if (blocks.empty()) return planted;
  for (const size_t j : {blocks.front(), blocks.back()})
    for (const int64_t c : {int64_t(0), g.cols[j] / 2, g.cols[j] - 1}) {
      g.at(j, g.K - 1, c) = mk::from_float<T>(accum_t<T>(NAN));
      planted.emplace_back(j, c);
    }
  return planted;
}

template <class T, class U>
void test_combine_launch(Layout layout, int64_t K, int64_t d, bool accumulate, bool track, bool nans, bool grids) {
  using A = accum_t<T>;
  const std::vector<int64_t> widths = widths_for(layout, d);
  const bool flat = flat_layout(layout), aligned = aligned_layout(layout);
  Stack<T> g = make_stack<T>(K, widths, flat, true, aligned);
  if (nans) plant_nans(g);
  const Stack<A> y0 = track ? make_stack<A>(K, widths, flat, true, aligned) : Stack<A>();
  const Stack<U> out0 = make_stack<U>(1, widths, flat, accumulate, aligned);
  std::vector<A> weights(K), row_scale(K);
  for (auto& w : weights) w = A(std::uniform_real_distribution<double>(-1.0, 1.0)(rng));
  for (auto& s : row_scale) s = A(std::uniform_real_distribution<double>(0.5, 2.0)(rng));
  const std::vector<A> beta_on_device{A(0.3)};
  // combine itself (alpha = 1, no accumulation, U = T) on odd K; combine_into with alpha != 1 otherwise.
  const bool plain_combine = !track && !accumulate && std::is_same_v<T, U> && K % 2 == 1;
  const A alpha = plain_combine ? A(1) : accumulate ? A(-0.375) : A(1.625);
  auto run = [&](Stack<U>& out, Stack<A>& y) {
    if (track)
      mk::track_combine_cuda<T, U>(g.view(), y.mutable_view(), row_scale.data(), beta_on_device.data(),
                                   weights.data(), out.data.data(), alpha, accumulate, stream);
    else if (plain_combine)
      mk::combine_cuda<T>(g.view(), weights.data(), reinterpret_cast<T* const*>(out.data.data()), stream);
    else
      mk::combine_into_cuda<T, U>(g.view(), weights.data(), out.data.data(), alpha, accumulate, stream);
  };
  Stack<U> out = out0;
  Stack<A> y = y0;
  run(out, y);
  const std::string what =
      label(track ? "track_combine" : plain_combine ? "combine" : "combine_into", type_name<T>(), layout, K, d) +
      " into " + type_name<U>() + (accumulate ? " accumulate" : "") + (nans ? " with NaN" : "");
  const double eps_a = std::is_same_v<A, double> ? 0x1p-53 : 0x1p-24;
  const double beta = double(beta_on_device[0]);
  int bad = 0;  // reported per call, not per element
  for (size_t j = 0; j < widths.size(); ++j)
    for (int64_t c = 0; c < widths[j]; ++c) {
      double ref = 0.0, scale = 0.0, y_error = 0.0;  // y_error: what y's rounding moves the sum by
      for (int64_t k = 0; k < K; ++k) {
        double x = as_double(g.at(j, k, c));
        if (track) {
          const double yo = double(y0.at(j, k, c)), gv = double(row_scale[k]) * x;
          x = yo + beta * (gv - yo);
          const double got = double(y.at(j, k, c));
          if (std::isnan(x) ? !std::isnan(got) : !(std::fabs(got - x) <= tracking_tol<A>(yo, gv)))
            if (bad++ < 5) CHECK(false, "%s: y[%zu][%lld][%lld] = %.9g, float64 %.9g", what.c_str(), j, (long long)k,
                                 (long long)c, got, x);
          y_error += std::fabs(double(weights[k])) * tracking_tol<A>(yo, gv);
        }
        ref += double(weights[k]) * x;
        scale += std::fabs(double(weights[k]) * x);
      }
      ref *= double(alpha);
      scale *= std::fabs(double(alpha));
      if (accumulate) {
        ref += as_double(out0.at(j, 0, c));
        scale += std::fabs(as_double(out0.at(j, 0, c)));
      }
      const double got = as_double(out.at(j, 0, c));
      const double tol = storage_eps<U>() * std::fabs(ref) + 8.0 * (K + 2) * eps_a * scale +
                         std::fabs(double(alpha)) * y_error + 0x1p-24;
      if (std::isnan(ref) ? !std::isnan(got) : !(std::fabs(got - ref) <= tol))
        if (bad++ < 5) CHECK(false, "%s: block %zu column %lld = %.9g, float64 %.9g", what.c_str(), j, (long long)c,
                             got, ref);
    }
  CHECK(padding_intact(out) && (!track || padding_intact(y)), "%s: padding written", what.c_str());
  // Again, on the same and on other SM counts (other grids and CTA boundaries): the same bits.
  std::vector<int> sm_counts{2};
  if (grids) sm_counts.insert(sm_counts.end(), {1, 3, 7});
  for (const int sms : sm_counts) {
    mk::simt::set_multiprocessor_count(sms);
    Stack<U> out2 = out0;
    Stack<A> y2 = y0;
    run(out2, y2);
    CHECK(same_bytes(out.storage.data(), out2.storage.data(), out.storage.size() * sizeof(U)) &&
              same_bytes(y.storage.data(), y2.storage.data(), y.storage.size() * sizeof(A)),
          "%s: a second call on %d SMs differs", what.c_str(), sms);
  }
  mk::simt::set_multiprocessor_count(2);
}

template <class T, class U>
void test_combine_outputs(Layout layout, int64_t K, int64_t d, bool grids) {
  const bool nans = K % 3 == 0;
  test_combine_launch<T, U>(layout, K, d, K % 2 == 0, false, nans, grids);
  test_combine_launch<T, U>(layout, K, d, K % 2 == 1, false, !nans, false);
  test_combine_launch<T, U>(layout, K, d, K % 2 == 1, true, nans, grids);
  test_combine_launch<T, U>(layout, K, d, K % 2 == 0, true, !nans, false);
}

const int64_t kCombineKs[] = {1, 2, 3, 7, 8, 9, 16, 33, 64};

template <class T>
void test_combine_family() {
  for (const int64_t K : kCombineKs) {
    test_combine_outputs<T, float>(Layout::vector_heads, K, 1000, K == 9);
    test_combine_outputs<T, double>(Layout::vector_heads, K, 1000, false);
    test_combine_outputs<T, mk::half_t>(Layout::vector_heads, K, 1000, false);
    test_combine_outputs<T, mk::bf16_t>(Layout::vector_heads, K, 1000, K == 2);
    test_combine_outputs<T, T>(Layout::flat_views, K, 1000, K == 3);
    test_combine_outputs<T, T>(Layout::one_block, K, 4099, false);
    test_combine_outputs<T, T>(Layout::tiny_blocks, K, 1, false);
    test_combine_outputs<T, T>(Layout::many_blocks, K, 1, K == 1);
  }
  // Above the weights staged at once (1024): the chunks are restaged inside every step.
  test_combine_outputs<T, T>(Layout::vector_heads, 1100, 37, false);
  test_combine_outputs<T, float>(Layout::flat_views, 1030, 5, false);
  // Only empty blocks: nothing launched, nothing written.
  const Stack<T> empty = make_stack<T>(3, {0, 0, 0}, false, false);
  Stack<T> out = make_stack<T>(1, {0, 0, 0}, false, false);
  const std::vector<accum_t<T>> weights(3, accum_t<T>(1));
  mk::combine_into_cuda<T, T>(empty.view(), weights.data(), out.data.data(), accum_t<T>(2), true, stream);
  CHECK(padding_intact(out), "combine_into %s of empty blocks wrote", type_name<T>());
}

// Adam and SGD on C clients, every third one inactive: bit for bit the CPU kernel's result (the
// element math is shared and neither build contracts), inactive rows and steps untouched.
template <class T>
void test_fl_steps(int64_t C, int64_t D) {
  using A = accum_t<T>;
  std::vector<T> params(size_t(C * D)), grads(size_t(C * D));
  std::vector<A> m(size_t(C * D)), v(size_t(C * D)), buffer(size_t(C * D));
  std::vector<int64_t> step(static_cast<size_t>(C));
  std::unique_ptr<bool[]> active(new bool[size_t(C)]);
  for (auto& x : params) x = random_value<T>();
  for (auto& x : grads) x = random_value<T>();
  for (auto& x : m) x = A(0.1 * as_double(random_value<T>()));
  for (auto& x : v) x = A(std::fabs(0.1 * as_double(random_value<T>())));
  for (auto& x : buffer) x = A(as_double(random_value<T>()));
  for (int64_t c = 0; c < C; ++c) {
    step[c] = c % 4;
    active[c] = c % 3 != 1;
  }
  const mk::fl::AdamHyper adam{1e-3, 0.9, 0.999, 1e-8, 0.01};
  auto params_gpu = params, params_cpu = params;
  auto m_gpu = m, m_cpu = m, v_gpu = v, v_cpu = v;
  auto step_gpu = step, step_cpu = step;
  mk::fl::adam_step_cuda<T>(params_gpu.data(), grads.data(), m_gpu.data(), v_gpu.data(), step_gpu.data(),
                            active.get(), C, D, adam, stream);
  mk::fl::adam_step_cpu<T>(params_cpu.data(), grads.data(), m_cpu.data(), v_cpu.data(), step_cpu.data(), active.get(),
                           C, D, adam);
  const size_t n = size_t(C * D);
  CHECK(same_bytes(params_gpu.data(), params_cpu.data(), n * sizeof(T)) &&
            same_bytes(m_gpu.data(), m_cpu.data(), n * sizeof(A)) &&
            same_bytes(v_gpu.data(), v_cpu.data(), n * sizeof(A)) && step_gpu == step_cpu,
        "adam %s C=%lld D=%lld: differs from the CPU kernel", type_name<T>(), (long long)C, (long long)D);
  for (int64_t c = 0; c < C; ++c) {
    CHECK(step_gpu[c] == step[c] + (active[c] ? 1 : 0), "adam: step of client %lld", (long long)c);
    if (!active[c])
      CHECK(same_bytes(params_gpu.data() + c * D, params.data() + c * D, size_t(D) * sizeof(T)),
            "adam %s: inactive client %lld written", type_name<T>(), (long long)c);
  }

  for (const double momentum : {0.0, 0.9}) {
    const mk::fl::SgdHyper sgd{0.01, momentum, 0.001};
    auto p_gpu = params, p_cpu = params;
    auto b_gpu = buffer, b_cpu = buffer;
    A* const gb = momentum != 0.0 ? b_gpu.data() : nullptr;
    A* const cb = momentum != 0.0 ? b_cpu.data() : nullptr;
    mk::fl::sgd_step_cuda<T>(p_gpu.data(), grads.data(), gb, active.get(), C, D, sgd, stream);
    mk::fl::sgd_step_cpu<T>(p_cpu.data(), grads.data(), cb, active.get(), C, D, sgd);
    CHECK(same_bytes(p_gpu.data(), p_cpu.data(), n * sizeof(T)) &&
              same_bytes(b_gpu.data(), b_cpu.data(), n * sizeof(A)),
          "sgd %s momentum=%g C=%lld D=%lld: differs from the CPU kernel", type_name<T>(), momentum, (long long)C,
          (long long)D);
  }
}

// The masked weighted mean, bit for bit the CPU kernel's (same group order and fma), and float64
// within rounding; all clients inactive gives NaN.
template <class T>
void test_weighted_mean(int64_t C, int64_t D, bool none_active) {
  using A = accum_t<T>;
  std::vector<T> x(size_t(C * D));
  for (auto& e : x) e = random_value<T>();
  std::vector<A> weights(static_cast<size_t>(C));
  for (auto& w : weights) w = A(std::uniform_real_distribution<double>(0.1, 1.0)(rng));
  std::unique_ptr<bool[]> active(new bool[size_t(C)]);
  for (int64_t c = 0; c < C; ++c) active[c] = !none_active && c % 5 != 2;
  // The workspace poisoned but for its tickets, which every call must leave zero again.
  std::vector<unsigned char> workspace = poisoned<unsigned char>(mk::fl::weighted_mean_cuda_workspace_bytes<T>(C, D));
  std::memset(workspace.data(), 0, mk::fl::weighted_mean_cuda_ticket_bytes(D));
  const std::vector<unsigned char> zero_tickets(mk::fl::weighted_mean_cuda_ticket_bytes(D), 0);
  std::vector<T> out = poisoned<T>(size_t(D)), cpu = poisoned<T>(size_t(D));
  mk::fl::weighted_mean_cuda<T>(x.data(), weights.data(), active.get(), C, D, workspace.data(), out.data(), stream);
  mk::fl::weighted_mean_cpu<T>(x.data(), weights.data(), active.get(), C, D, cpu.data());
  CHECK(std::memcmp(out.data(), cpu.data(), size_t(D) * sizeof(T)) == 0,
        "weighted_mean %s C=%lld D=%lld: differs from the CPU kernel", type_name<T>(), (long long)C, (long long)D);
  // Again with the same workspace (as a graph replay would) and on other grids (SM counts): the
  // same bits, and the tickets zero after each call.
  for (const int sms : {2, 1, 3}) {
    mk::simt::set_multiprocessor_count(sms);
    std::vector<T> again = poisoned<T>(size_t(D));
    mk::fl::weighted_mean_cuda<T>(x.data(), weights.data(), active.get(), C, D, workspace.data(), again.data(), stream);
    CHECK(same_bytes(again.data(), out.data(), size_t(D) * sizeof(T)) &&
              same_bytes(workspace.data(), zero_tickets.data(), zero_tickets.size()),
          "weighted_mean %s C=%lld D=%lld SMs=%d: a second call differs or leaves a ticket set", type_name<T>(),
          (long long)C, (long long)D, sms);
  }
  mk::simt::set_multiprocessor_count(2);
  for (int64_t j = 0; j < D; ++j) {
    double sum = 0.0, total = 0.0, scale = 0.0;
    for (int64_t c = 0; c < C; ++c)
      if (active[c]) {
        sum += double(weights[c]) * as_double(x[c * D + j]);
        scale += std::fabs(double(weights[c]) * as_double(x[c * D + j]));
        total += double(weights[c]);
      }
    if (none_active) {
      CHECK(std::isnan(as_double(out[j])), "weighted_mean: no active client gives NaN");
      continue;
    }
    const double ref = sum / total;
    const double tol = storage_eps<T>() * std::fabs(ref) + 4.0 * C * 0x1p-24 * scale / total;
    CHECK(std::fabs(as_double(out[j]) - ref) <= tol, "weighted_mean %s C=%lld: column %lld = %.9g, float64 %.9g",
          type_name<T>(), (long long)C, (long long)j, as_double(out[j]), ref);
  }
}

// The degenerate min_norm problems of the CPU tests, one Gram per case, solved by the CUDA
// launcher (the warp solver up to K = 32, the per-thread one above) and the CPU kernel: lambda is
// written everywhere, on the simplex, satisfies the KKT conditions in float64 and reaches the CPU
// objective; where the minimiser is unique (full rank) it is the CPU's lambda; a non-finite entry
// gives all NaN. Batched, so that problems share CTAs and warps.
enum class MinNormCase { full_rank, low_rank, duplicated, one_zero, all_zero, collinear, orthonormal, equal, huge,
                         nan_entry, inf_entry };
const char* min_norm_case_name(MinNormCase c) {
  const char* names[] = {"full rank", "rank 2",  "duplicated", "one zero", "all zero", "collinear",
                         "orthonormal", "equal", "huge",      "NaN",      "Inf"};
  return names[int(c)];
}

std::vector<double> min_norm_case_gram(MinNormCase c, int64_t K) {
  const int64_t dim = c == MinNormCase::low_rank ? 2 : K + 3;
  std::normal_distribution<double> normal;
  std::vector<double> x(size_t(K * dim));
  for (auto& e : x) e = normal(rng);
  if (c == MinNormCase::duplicated && K > 1)
    for (int64_t j = 0; j < dim; ++j) x[(K - 1) * dim + j] = x[(K / 2) * dim + j] = x[j];
  if (c == MinNormCase::one_zero)
    for (int64_t j = 0; j < dim; ++j) x[(K / 2) * dim + j] = 0.0;
  if (c == MinNormCase::all_zero) std::fill(x.begin(), x.end(), 0.0);
  if (c == MinNormCase::collinear)  // multiples of one direction, both signs: 0 is in the hull for K > 1
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < dim; ++j) x[i * dim + j] = x[j] * (i % 2 ? -0.5 - 0.25 * double(i) : 1.0 + double(i));
  if (c == MinNormCase::orthonormal || c == MinNormCase::equal)  // ties everywhere
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < dim; ++j) x[i * dim + j] = c == MinNormCase::equal ? (j == 0) : (i == j);
  std::vector<double> G(size_t(K * K), 0.0);
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < K; ++j)
      for (int64_t d = 0; d < dim; ++d) G[i * K + j] += x[i * dim + d] * x[j * dim + d];
  if (c == MinNormCase::huge)
    for (auto& e : G) e *= 1e300 / (1.0 + std::fabs(G[0]));
  if (c == MinNormCase::nan_entry) G[K - 1] = std::nan("");
  if (c == MinNormCase::inf_entry) G[(K - 1) * K] = -INFINITY;
  return G;
}

template <class T>
void test_min_norm_cases(int64_t K) {
  const MinNormCase cases[] = {MinNormCase::full_rank, MinNormCase::low_rank,   MinNormCase::duplicated,
                               MinNormCase::one_zero,  MinNormCase::all_zero,   MinNormCase::collinear,
                               MinNormCase::orthonormal, MinNormCase::equal,    MinNormCase::huge,
                               MinNormCase::nan_entry, MinNormCase::inf_entry};
  const int64_t batch = int64_t(std::size(cases));
  std::vector<T> G(size_t(batch * K * K));
  for (int64_t b = 0; b < batch; ++b) {
    if (cases[b] == MinNormCase::huge && !std::is_same_v<T, double>) {  // 1e300 is beyond their ranges
      const double large = std::is_same_v<T, mk::half_t> ? 1e3 / double(K + 3) : 1e30;  // fp16 ends at 65504
      const std::vector<double> g = min_norm_case_gram(MinNormCase::full_rank, K);
      for (int64_t e = 0; e < K * K; ++e) G[b * K * K + e] = mk::from_float<T>(accum_t<T>(g[e] * large));
      continue;
    }
    const std::vector<double> g = min_norm_case_gram(cases[b], K);
    for (int64_t e = 0; e < K * K; ++e) G[b * K * K + e] = mk::from_float<T>(accum_t<T>(g[e]));
  }
  std::vector<T> out = poisoned<T>(size_t(batch * K)), cpu(size_t(batch * K));
  std::vector<double> work = poisoned<double>(size_t(mk::min_norm_cuda_workspace(batch, K)));
  mk::min_norm_cuda<T>(G.data(), batch, K, out.data(), work.empty() ? nullptr : work.data(), stream);
  mk::min_norm_cpu<T>(G.data(), batch, K, cpu.data());
  for (int64_t b = 0; b < batch; ++b) {
    char what[96];
    std::snprintf(what, sizeof what, "min_norm %s K=%lld %s", type_name<T>(), (long long)K,
                  min_norm_case_name(cases[b]));
    const MinNormCase c = cases[b];
    bool written = true, nan = true;
    for (int64_t i = 0; i < K; ++i) {
      written = written && !is_poison(out[b * K + i]);
      nan = nan && std::isnan(as_double(out[b * K + i]));
    }
    CHECK(written, "%s: an element of lambda was not written", what);
    if (c == MinNormCase::nan_entry || c == MinNormCase::inf_entry) {
      CHECK(nan, "%s: a non-finite Gram gives lambda = NaN everywhere", what);
      continue;
    }
    // Up to 8 K roundings of the normalisation and of lambda's storage.
    const double eps = storage_eps<T>(), tol = 8.0 * double(K) * eps + 1e-9;
    std::vector<double> lambda(static_cast<size_t>(K)), Gl(static_cast<size_t>(K), 0.0);
    double sum = 0.0, f = 0.0, f_cpu = 0.0, scale = 0.0;
    for (int64_t i = 0; i < K; ++i) {
      lambda[i] = as_double(out[b * K + i]);
      sum += lambda[i];
      scale = std::max(scale, as_double(G[b * K * K + i * K + i]));
    }
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) {
        const double g = as_double(G[b * K * K + i * K + j]) / (scale > 0.0 ? scale : 1.0);
        Gl[i] += g * lambda[j];
        f_cpu += as_double(cpu[b * K + i]) * g * as_double(cpu[b * K + j]);
      }
    for (int64_t i = 0; i < K; ++i) f += lambda[i] * Gl[i];
    CHECK(std::fabs(sum - 1.0) <= 2.0 * K * eps + 1e-12, "%s: lambda sums to %.17g", what, sum);
    for (int64_t i = 0; i < K; ++i) {
      CHECK(lambda[i] >= 0.0, "%s: lambda[%lld] = %g < 0", what, (long long)i, lambda[i]);
      CHECK(Gl[i] >= f - tol, "%s: KKT: (G lambda)_%lld = %.17g < f = %.17g", what, (long long)i, Gl[i], f);
      if (lambda[i] > 64.0 * eps)
        CHECK(std::fabs(Gl[i] - f) <= tol, "%s: KKT: support %lld not tight (%.17g vs f = %.17g)", what, (long long)i,
              Gl[i], f);
    }
    CHECK(std::fabs(f - f_cpu) <= tol, "%s: objective %.17g, CPU kernel %.17g", what, f, f_cpu);
    // Unique minimisers: the CPU's lambda (the all-zero Gram: both take the uniform weights; equal
    // gradients: both keep the first, the lowest index among tied norms).
    const bool unique = c == MinNormCase::full_rank || c == MinNormCase::one_zero || c == MinNormCase::all_zero ||
                        c == MinNormCase::orthonormal || c == MinNormCase::equal || c == MinNormCase::huge;
    if (!unique) continue;
    for (int64_t i = 0; i < K; ++i)
      CHECK(std::fabs(lambda[i] - as_double(cpu[b * K + i])) <= 2.0 * eps + 1e-9,
            "%s: lambda[%lld] = %.17g, CPU kernel %.17g", what, (long long)i, lambda[i], as_double(cpu[b * K + i]));
  }
}

const int64_t kKs[] = {1, 2, 3, 7, 16, 33, 64};
// The Gram family's regimes: registers (K <= 8; cross_gram K <= 4, joint_gram K <= 4), 4 x 4
// tiles with lanes (up to 256 tile pairs), tiles owned per thread (above).
const int64_t kGramKs[] = {1, 2, 3, 4, 5, 7, 8, 9, 16, 32, 33, 64};
const int64_t kWidths[] = {1, 17, 4099};

template <class T>
void test_type() {
  for (const Layout layout : {Layout::one_block, Layout::flat_views, Layout::tiny_blocks, Layout::vector_heads})
    for (const int64_t K : kGramKs)
      for (const int64_t d : kWidths) {
        if (layout == Layout::tiny_blocks && d != 1) continue;  // its widths do not depend on d
        const bool all_ks = std::find(std::begin(kKs), std::end(kKs), K) != std::end(kKs);
        test_gram<T>(layout, K, d);
        test_moco_passes<T>(layout, K, d);
        if (!all_ks) continue;
        test_combine_into<T, T>(layout, K, d, false);
        test_combine_into<T, float>(layout, K, d, true);
      }
  for (const int64_t K : {1, 3, 9, 33}) {
    test_gram<T>(Layout::many_blocks, K, 1);
    test_moco_passes<T>(Layout::many_blocks, K, 1);
  }
  // Only empty blocks: the result is zero.
  for (const int64_t K : {2, 9}) {
    const Stack<T> empty = make_stack<T>(K, {0, 0, 0}, false, false);
    std::vector<double> ws = gram_workspace(K);
    std::vector<accum_t<T>> G = poisoned<accum_t<T>>(size_t(K * K));
    mk::gram_cuda<T>(empty.view(), nullptr, ws.data(), G.data(), stream);
    CHECK(std::all_of(G.begin(), G.end(), [](accum_t<T> x) { return x == accum_t<T>(0); }) && ticket_zero(ws),
          "gram %s of empty blocks K=%lld is not zero", type_name<T>(), (long long)K);
  }
  for (const int64_t K : {3, 8, 16, 33}) test_gram_grids<T>(Layout::vector_heads, K, 4099);
  // 1100 tiny blocks on 1..7 SMs: threads 0-2 alone have columns, several hundred of them, so the
  // register path's flushes (every 256 columns per thread) must come at the same step in every lane.
  for (const int64_t K : {3, 8}) test_gram_grids<T>(Layout::many_blocks, K, 1);
  for (const int64_t K : {1, 3, 64}) {
    test_combine_into<T, double>(Layout::flat_views, K, 17, true);
    test_combine_into<T, mk::half_t>(Layout::flat_views, K, 17, false);
    test_combine_into<T, mk::bf16_t>(Layout::one_block, K, 17, true);
  }
  test_combine_family<T>();
  for (const int64_t K : kKs) {
    for (const int64_t rows : {1, 5, 300}) test_project_simplex<T>(rows, K);
    for (const int64_t batch : {1, 70}) test_min_norm<T>(batch, K);
  }
  for (const int64_t K : {1, 2, 3, 4, 5, 8, 13, 31, 32, 33}) test_min_norm_cases<T>(K);
  test_min_norm<T>(3, 32);  // an odd batch: the second warp of the last CTA has no problem
  for (const int64_t C : {1, 3, 40})
    for (const int64_t D : {0, 1, 17, 4099}) test_fl_steps<T>(C, D);
  for (const int64_t C : {1, 33, 70})
    for (const int64_t D : {1, 17, 300}) test_weighted_mean<T>(C, D, false);
  test_weighted_mean<T>(5, 17, true);
  test_weighted_mean<T>(200, 4099, false);  // 7 groups x 17 column blocks: more items than CTAs
  test_weighted_mean<T>(1100, 3, false);    // 35 groups: the total's shares come in two rounds of 32
  std::printf("%s done\n", type_name<T>());
  std::fflush(stdout);
}

}  // namespace

int main() {
  test_type<float>();
  test_type<double>();
  test_type<mk::half_t>();
  test_type<mk::bf16_t>();
  // One long block: the products' CTAs stride over many slabs, the combine over many columns.
  test_gram<float>(Layout::one_block, 3, 100003);
  test_combine_into<float, float>(Layout::one_block, 3, 100003, false);
  test_moco_passes<float>(Layout::one_block, 33, 100003);
  test_gram<mk::bf16_t>(Layout::vector_heads, 8, 100003);
  // Hundreds of columns per thread: fp32 sums flushed into double mid-block, scalar and vector.
  test_gram_grids<float>(Layout::flat_views, 2, 300000);
  test_gram_grids<mk::half_t>(Layout::vector_heads, 5, 300000);
  test_gram<double>(Layout::one_block, 100, 300);  // 325 tile pairs: each thread owns pairs
  test_moco_passes<float>(Layout::vector_heads, 50, 1000);
  if (failures) std::printf("%d checks failed\n", failures);
  return failures ? 1 : 0;
}
