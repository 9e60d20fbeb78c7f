// mmgen's hand-written CPU kernels, called from JAX through XLA's FFI (mmgen/nn/cpu_kernels.py
// compiles this file with the host's C++ compiler on first use and registers the handlers).
//
// Both kernels work on a channels-last 3D convolution with strides s, dilations d and zero
// padding (lo before, hi after each axis; a negative lo crops), float32, C_out a multiple of
// 8. With p = the input padded,
//
//   MmgenConv:            y[n, t, y, x, o] = sum_{a, b, c, i} p[n, t s_t + a d_t, y s_h + b d_h, x s_w + c d_w, i] w[a, b, c, i, o]
//   MmgenConvWeightGrad: dw[a, b, c, i, o] = sum_{n, t, y, x} p[n, t s_t + a d_t, y s_h + b d_h, x s_w + c d_w, i] dy[n, t, y, x, o]
//
// x [N, T, H, W, C_in] (unpadded: the padding is never written out, taps that fall on it are
// skipped), w and dw [K_t, K_h, K_w, C_in, C_out], y and dy [N, T', H', W', C_out]. The input
// gradient is MmgenConv of dy with the kernel flipped and other padding (cpu_kernels.py).
//
// XLA:CPU runs these as convolutions at 10-100 GFLOP/s on two cores (the weight gradient
// slowest: its batch is the contracted dimension, and XLA first copies both operands into a
// batch-innermost layout). Here every multiply-add is a 16-float vector of output channels
// (one AVX-512 register, two AVX2 registers) times one broadcast input value, into 16
// accumulator registers, over an output row (n, t, y) at a time. The rows are split in
// chunks over XLA's intra-op thread pool. The weight gradient sums each chunk into a dw of its
// own and adds the chunks' sums in chunk order, so its result does not depend on which thread
// took which chunk (it does on the number of threads, as the chunks do).
#include <algorithm>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Vectors of output channels: 16 floats (one AVX-512 register, or two AVX2 / four SSE
// registers on older CPUs) where C_out is a multiple of 16, else 8.
typedef float Vec16 __attribute__((vector_size(64)));
typedef float Vec8 __attribute__((vector_size(32)));
template <typename V>
constexpr int kLanes = sizeof(V) / sizeof(float);

// Calls f(V{}, std::integral_constant<int, kOutVecs>{}) with the vector type and the number
// of output-channel vectors per block (4, 2 or 1: the most that divide them) that C_out takes.
template <typename F>
void WithOutVectors(int64_t c_out, F&& f) {
  auto with = [&](auto vector) {
    const int64_t vecs = c_out / kLanes<decltype(vector)>;
    if (vecs % 4 == 0) f(vector, std::integral_constant<int, 4>{});
    else if (vecs % 2 == 0) f(vector, std::integral_constant<int, 2>{});
    else f(vector, std::integral_constant<int, 1>{});
  };
  if (c_out % 16 == 0) with(Vec16{});
  else with(Vec8{});
}

struct Geometry {
  int64_t n, t, h, w, c_in;  // the unpadded input
  int64_t t_out, h_out, w_out, c_out;
  int64_t k_t, k_h, k_w;
  int64_t stride_t, stride_h, stride_w;
  int64_t dilation_t, dilation_h, dilation_w;
  int64_t pad_t, pad_h, pad_w;  // padding before each axis (lo); after it is implied by the sizes
};

int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
int64_t CeilDiv(int64_t a, int64_t b) { return -FloorDiv(-a, b); }

// The output positions x in [begin, end) whose input column x s + first lies in [0, size).
std::pair<int64_t, int64_t> Inside(int64_t first, int64_t stride, int64_t size, int64_t out) {
  const int64_t begin = std::max<int64_t>(0, CeilDiv(-first, stride));
  const int64_t end = std::min<int64_t>(out, FloorDiv(size - 1 - first, stride) + 1);
  return {begin, std::max(begin, end)};
}

// The input rows an output row (n, t, y) reads: for each tap (a, b) whose frame and row are
// inside the input, where that row starts, and the offset of tap (a, b, 0) in the kernel.
struct TapRow {
  const float* x;
  int64_t tap;
};

void TapRows(const float* x, const Geometry& g, int64_t r, std::vector<TapRow>& rows) {
  rows.clear();
  const int64_t y = r % g.h_out, t = (r / g.h_out) % g.t_out, n = r / (g.h_out * g.t_out);
  for (int64_t a = 0; a < g.k_t; ++a) {
    const int64_t frame = t * g.stride_t + a * g.dilation_t - g.pad_t;
    if (frame < 0 || frame >= g.t) continue;
    for (int64_t b = 0; b < g.k_h; ++b) {
      const int64_t row = y * g.stride_h + b * g.dilation_h - g.pad_h;
      if (row < 0 || row >= g.h) continue;
      rows.push_back({x + ((n * g.t + frame) * g.h + row) * g.w * g.c_in, (a * g.k_h + b) * g.k_w});
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Weight gradient: for each output row (n, t, y) and tap (a, b, c), a small matrix product
// dw[a, b, c] += x_row^T dy_row of [C_in, W'] x [W', C_out] over the positions inside the input.

// acc[i][j] (input channel i of the block, output channels 16 j ... 16 j + 15) += sum_x x_row[x, i] dy_row[x, j].
template <typename V, int kIn, int kOutVecs>
inline void WeightGradBlock(const float* x_row, int64_t x_step, const float* dy_row, int64_t c_out,
                            int64_t positions, float* dw_block) {
  constexpr int kL = kLanes<V>;
  V acc[kIn][kOutVecs];
  for (int i = 0; i < kIn; ++i)
    for (int j = 0; j < kOutVecs; ++j) std::memcpy(&acc[i][j], dw_block + i * c_out + j * kL, sizeof(V));
  for (int64_t x = 0; x < positions; ++x) {
    V d[kOutVecs];
    for (int j = 0; j < kOutVecs; ++j) std::memcpy(&d[j], dy_row + x * c_out + j * kL, sizeof(V));
    const float* xv = x_row + x * x_step;
    for (int i = 0; i < kIn; ++i) {
      const float b = xv[i];
      for (int j = 0; j < kOutVecs; ++j) acc[i][j] += b * d[j];
    }
  }
  for (int i = 0; i < kIn; ++i)
    for (int j = 0; j < kOutVecs; ++j) std::memcpy(dw_block + i * c_out + j * kL, &acc[i][j], sizeof(V));
}

// One tap of one output row: 16 accumulator registers, (16 / kOutVecs) input channels by
// kOutVecs vectors of output channels at a time.
template <typename V, int kOutVecs>
void WeightGradRowTap(const float* x_row, const float* dy_row, int64_t positions, const Geometry& g,
                      float* dw_tap) {
  constexpr int kIn = 16 / kOutVecs;
  const int64_t x_step = g.stride_w * g.c_in;
  for (int64_t o = 0; o < g.c_out; o += kLanes<V> * kOutVecs) {
    int64_t i = 0;
    for (; i + kIn <= g.c_in; i += kIn)
      WeightGradBlock<V, kIn, kOutVecs>(x_row + i, x_step, dy_row + o, g.c_out, positions, dw_tap + i * g.c_out + o);
    // The remaining input channels in blocks of 8, 4, 2 and 1 (fewer than kIn).
    if constexpr (kIn > 8) {
      if (i + 8 <= g.c_in) {
        WeightGradBlock<V, 8, kOutVecs>(x_row + i, x_step, dy_row + o, g.c_out, positions, dw_tap + i * g.c_out + o);
        i += 8;
      }
    }
    if constexpr (kIn > 4) {
      if (i + 4 <= g.c_in) {
        WeightGradBlock<V, 4, kOutVecs>(x_row + i, x_step, dy_row + o, g.c_out, positions, dw_tap + i * g.c_out + o);
        i += 4;
      }
    }
    if constexpr (kIn > 2) {
      if (i + 2 <= g.c_in) {
        WeightGradBlock<V, 2, kOutVecs>(x_row + i, x_step, dy_row + o, g.c_out, positions, dw_tap + i * g.c_out + o);
        i += 2;
      }
    }
    for (; i < g.c_in; ++i)
      WeightGradBlock<V, 1, kOutVecs>(x_row + i, x_step, dy_row + o, g.c_out, positions, dw_tap + i * g.c_out + o);
  }
}

// Adds rows [first, last) of dy (row r = (n T' + t) H' + y) into dw.
template <typename V, int kOutVecs>
void WeightGradRows(const float* x, const float* dy, const Geometry& g, int64_t first, int64_t last, float* dw) {
  const int64_t tap_size = g.c_in * g.c_out;
  std::vector<TapRow> rows;
  for (int64_t r = first; r < last; ++r) {
    TapRows(x, g, r, rows);
    const float* dy_row = dy + r * g.w_out * g.c_out;
    for (const TapRow& row : rows) {
      for (int64_t c = 0; c < g.k_w; ++c) {
        const int64_t column = c * g.dilation_w - g.pad_w;  // of output position 0
        const auto [begin, end] = Inside(column, g.stride_w, g.w, g.w_out);
        if (begin == end) continue;
        const float* x_row = row.x + (begin * g.stride_w + column) * g.c_in;
        const float* dy_part = dy_row + begin * g.c_out;
        float* dw_tap = dw + (row.tap + c) * tap_size;
        WeightGradRowTap<V, kOutVecs>(x_row, dy_part, end - begin, g, dw_tap);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: each output row in blocks of kPos positions by kOutVecs vectors of output channels
// (16 accumulators), one weight vector times a broadcast input value per multiply-add.
// Blocks whose every tap is inside the input run unchecked; the positions near the row's ends
// (kEdge) skip the taps that fall on the padding one position at a time.

template <typename V, int kPos, int kOutVecs, bool kEdge>
inline void ConvBlock(const std::vector<TapRow>& rows, const float* w, const Geometry& g, int64_t x0, int64_t o0,
                      float* y_row) {
  static_assert(!kEdge || kPos == 1, "edge positions go one at a time");
  constexpr int kL = kLanes<V>;
  V acc[kPos][kOutVecs];
  for (int p = 0; p < kPos; ++p)
    for (int j = 0; j < kOutVecs; ++j) acc[p][j] = V{};
  const int64_t pos_step = g.stride_w * g.c_in, tap_size = g.c_in * g.c_out;
  for (const TapRow& row : rows) {
    for (int64_t c = 0; c < g.k_w; ++c) {
      const int64_t column = x0 * g.stride_w + c * g.dilation_w - g.pad_w;
      if (kEdge && (column < 0 || column >= g.w)) continue;
      const float* xs = row.x + column * g.c_in;
      const float* ws = w + (row.tap + c) * tap_size + o0;
      for (int64_t i = 0; i < g.c_in; ++i) {
        V wv[kOutVecs];
        for (int j = 0; j < kOutVecs; ++j) std::memcpy(&wv[j], ws + i * g.c_out + j * kL, sizeof(V));
        for (int p = 0; p < kPos; ++p) {
          const float v = xs[p * pos_step + i];
          for (int j = 0; j < kOutVecs; ++j) acc[p][j] += v * wv[j];
        }
      }
    }
  }
  for (int p = 0; p < kPos; ++p)
    for (int j = 0; j < kOutVecs; ++j) std::memcpy(y_row + (x0 + p) * g.c_out + o0 + j * kL, &acc[p][j], sizeof(V));
}

// One output row: the edges one position at a time, the inside in blocks of 16 / kOutVecs
// positions, then of 8, 4, 2 and 1.
template <typename V, int kOutVecs>
void ConvRow(const std::vector<TapRow>& rows, const float* w, const Geometry& g, float* y_row) {
  constexpr int kPos = 16 / kOutVecs;
  // Positions whose first and last taps are both inside the input.
  const int64_t last_tap = (g.k_w - 1) * g.dilation_w;
  int64_t begin = std::max<int64_t>(0, CeilDiv(g.pad_w, g.stride_w));
  int64_t end = std::min<int64_t>(g.w_out, FloorDiv(g.w - 1 + g.pad_w - last_tap, g.stride_w) + 1);
  if (end < begin) begin = end = 0;
  for (int64_t o = 0; o < g.c_out; o += kLanes<V> * kOutVecs) {
    for (int64_t x = 0; x < begin; ++x) ConvBlock<V, 1, kOutVecs, true>(rows, w, g, x, o, y_row);
    int64_t x = begin;
    for (; x + kPos <= end; x += kPos) ConvBlock<V, kPos, kOutVecs, false>(rows, w, g, x, o, y_row);
    if constexpr (kPos >= 8) { if (x + 8 <= end) { ConvBlock<V, 8, kOutVecs, false>(rows, w, g, x, o, y_row); x += 8; } }
    if constexpr (kPos >= 4) { if (x + 4 <= end) { ConvBlock<V, 4, kOutVecs, false>(rows, w, g, x, o, y_row); x += 4; } }
    if constexpr (kPos >= 2) { if (x + 2 <= end) { ConvBlock<V, 2, kOutVecs, false>(rows, w, g, x, o, y_row); x += 2; } }
    for (; x < end; ++x) ConvBlock<V, 1, kOutVecs, false>(rows, w, g, x, o, y_row);
    for (x = std::max(end, begin); x < g.w_out; ++x) ConvBlock<V, 1, kOutVecs, true>(rows, w, g, x, o, y_row);
  }
}

template <typename V, int kOutVecs>
void ConvRows(const float* x, const float* w, const Geometry& g, int64_t first, int64_t last, float* y) {
  std::vector<TapRow> rows;
  for (int64_t r = first; r < last; ++r) {
    TapRows(x, g, r, rows);
    ConvRow<V, kOutVecs>(rows, w, g, y + r * g.w_out * g.c_out);
  }
}

// ---------------------------------------------------------------------------------------------
// Threads.

// Runs rows(chunk, first, last) over chunks of chunk_rows rows on the calling thread and the
// thread pool's. A task that starts after every chunk is claimed returns at once (the
// shared_ptr keeps the state alive for it); the caller waits only for chunks in progress, so
// it finishes alone if the pool's threads are busy elsewhere.
struct Chunks {
  std::function<void(int64_t, int64_t, int64_t)> rows;
  int64_t total, chunk_rows, count;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mutex;
  std::condition_variable finished;
};

void TakeChunks(const std::shared_ptr<Chunks>& work) {
  int64_t mine = 0;
  for (int64_t chunk = work->next.fetch_add(1); chunk < work->count; chunk = work->next.fetch_add(1), ++mine) {
    const int64_t first = chunk * work->chunk_rows;
    work->rows(chunk, first, std::min(first + work->chunk_rows, work->total));
  }
  if (mine > 0 && work->done.fetch_add(mine) + mine == work->count) {
    std::lock_guard<std::mutex> lock(work->mutex);
    work->finished.notify_all();
  }
}

// About 8 chunks per thread (so a thread slowed by other work delays the end little), at
// most max_chunks.
int64_t ChunkRows(ffi::ThreadPool& pool, int64_t total, int64_t max_chunks) {
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  return std::max<int64_t>(1, total / std::max<int64_t>(1, std::min(threads * 8, max_chunks)));
}

void RunChunks(ffi::ThreadPool& pool, int64_t total, int64_t chunk_rows,
               std::function<void(int64_t, int64_t, int64_t)> rows) {
  auto work = std::make_shared<Chunks>();
  work->rows = std::move(rows);
  work->total = total;
  work->chunk_rows = chunk_rows;
  work->count = (total + chunk_rows - 1) / chunk_rows;
  const int64_t tasks = std::min<int64_t>(std::max<int64_t>(pool.num_threads() - 1, 0), work->count - 1);
  for (int64_t i = 0; i < tasks; ++i) pool.Schedule([work] { TakeChunks(work); });
  TakeChunks(work);
  std::unique_lock<std::mutex> lock(work->mutex);
  work->finished.wait(lock, [&] { return work->done.load() == work->count; });
}

// ---------------------------------------------------------------------------------------------
// GroupNorm + swish: y = swish(xhat scale + bias), xhat = (x - mean) / sqrt(var + eps), the
// statistics per slab (a sample's frame: S positions x C channels, contiguous) and group of
// C / G channels. Each slab is read from memory once forward (its 3 passes run from cache)
// and twice backward; XLA's forms make 5-8 passes over memory for the same.

// exp for a vector: 2^k e^r with k = round(x log2 e), |r| <= ln 2 / 2, e^r by a degree-6
// polynomial (relative error ~2e-7); x clamped to [-87, 88].
inline Vec16 Exp(Vec16 x) {
  typedef int32_t Int16 __attribute__((vector_size(64)));
  x = x < -87.0f ? Vec16{} - 87.0f : x;
  x = x > 88.0f ? Vec16{} + 88.0f : x;
  const Vec16 magic = Vec16{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec16 k = (x * 1.44269504f + magic) - magic;
  const Vec16 r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  Vec16 p = Vec16{} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const Int16 bits = (__builtin_convertvector(k, Int16) + 127) << 23;
  Vec16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline Vec16 Load(const float* p) { Vec16 v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void Store(float* p, Vec16 v) { std::memcpy(p, &v, sizeof(v)); }

// A slab is walked as 16-float vectors; vector k holds channels (16 k + lane) % C, so the
// per-channel parameters repeat every `period` = lcm(C, 16) / 16 vectors. The tail of a slab
// whose size is not a multiple of 16 goes element by element.
struct Slabs {
  int64_t count, size, c, groups, period;
  float eps;
  int64_t Channel(int64_t k, int lane) const { return (k % period * 16 + lane) % c; }
};

// Per-channel values laid out as the period's vectors.
void Spread(const Slabs& sl, const float* per_channel, float* spread) {
  for (int64_t i = 0; i < sl.period * 16; ++i) spread[i] = per_channel[i % sl.c];
}

// Per-channel sums of the period's vector accumulators (plus the scalar tail's) per group.
void GroupSums(const Slabs& sl, const float* spread_sums, const float* tail_sums, float* per_channel,
               float* per_group) {
  std::fill(per_channel, per_channel + sl.c, 0.0f);
  for (int64_t i = 0; i < sl.period * 16; ++i) per_channel[i % sl.c] += spread_sums[i];
  for (int64_t ch = 0; ch < sl.c; ++ch) per_channel[ch] += tail_sums[ch];
  const int64_t width = sl.c / sl.groups;
  for (int64_t g = 0; g < sl.groups; ++g) {
    per_group[g] = 0.0f;
    for (int64_t ch = g * width; ch < (g + 1) * width; ++ch) per_group[g] += per_channel[ch];
  }
}

inline float Sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

// Forward of slab b: y, and the group means and inverse standard deviations.
void GroupNormSwishSlab(const Slabs& sl, const float* x, const float* scale, const float* bias, float* y,
                        float* mean_out, float* inv_out) {
  const int64_t vecs = sl.size / 16, tail = vecs * 16, width = sl.c / sl.groups;
  const float count = static_cast<float>(sl.size / sl.c * width);
  std::vector<float> acc(sl.period * 16), tail_acc(sl.c), channel(sl.c), group(sl.groups);
  std::vector<float> mean_c(sl.c), p_mean(sl.period * 16), p_mul(sl.period * 16), p_add(sl.period * 16);
  for (int pass = 0; pass < 2; ++pass) {  // 0: means; 1: variances about them
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(tail_acc.begin(), tail_acc.end(), 0.0f);
    for (int64_t k = 0; k < vecs; ++k) {
      const int64_t j = k % sl.period * 16;
      Vec16 v = Load(x + k * 16);
      if (pass == 1) v = v - Load(p_mean.data() + j), v = v * v;
      Store(acc.data() + j, Load(acc.data() + j) + v);
    }
    for (int64_t e = tail; e < sl.size; ++e) {
      const float v = pass == 0 ? x[e] : x[e] - mean_c[e % sl.c];
      tail_acc[e % sl.c] += pass == 0 ? v : v * v;
    }
    GroupSums(sl, acc.data(), tail_acc.data(), channel.data(), group.data());
    for (int64_t g = 0; g < sl.groups; ++g) {
      if (pass == 0) mean_out[g] = group[g] / count;
      else inv_out[g] = 1.0f / std::sqrt(group[g] / count + sl.eps);
    }
    for (int64_t ch = 0; ch < sl.c; ++ch) mean_c[ch] = mean_out[ch / width];
    Spread(sl, mean_c.data(), p_mean.data());
  }
  // y = swish(x * mul + add): mul = inv scale, add = bias - mean inv scale, per channel.
  std::vector<float> mul_c(sl.c), add_c(sl.c);
  for (int64_t ch = 0; ch < sl.c; ++ch) {
    const float inv = inv_out[ch / width];
    mul_c[ch] = inv * scale[ch];
    add_c[ch] = bias[ch] - mean_c[ch] * inv * scale[ch];
  }
  Spread(sl, mul_c.data(), p_mul.data());
  Spread(sl, add_c.data(), p_add.data());
  for (int64_t k = 0; k < vecs; ++k) {
    const int64_t j = k % sl.period * 16;
    const Vec16 z = Load(x + k * 16) * Load(p_mul.data() + j) + Load(p_add.data() + j);
    Store(y + k * 16, z / (1.0f + Exp(-z)));
  }
  for (int64_t e = tail; e < sl.size; ++e) {
    const float z = x[e] * mul_c[e % sl.c] + add_c[e % sl.c];
    y[e] = z * Sigmoid(z);
  }
}

// Backward of slab b: dx, and its terms of dscale and dbias (added into d_scale, d_bias).
void GroupNormSwishGradSlab(const Slabs& sl, const float* x, const float* dy, const float* scale,
                            const float* bias, const float* mean, const float* inv, float* dx, float* d_scale,
                            float* d_bias, std::vector<float>& dxhat) {
  const int64_t vecs = sl.size / 16, tail = vecs * 16, width = sl.c / sl.groups, n = sl.period * 16;
  const float count = static_cast<float>(sl.size / sl.c * width);
  std::vector<float> mean_c(sl.c), inv_c(sl.c), p_mean(n), p_inv(n), p_scale(n), p_bias(n);
  for (int64_t ch = 0; ch < sl.c; ++ch) mean_c[ch] = mean[ch / width], inv_c[ch] = inv[ch / width];
  Spread(sl, mean_c.data(), p_mean.data());
  Spread(sl, inv_c.data(), p_inv.data());
  Spread(sl, scale, p_scale.data());
  Spread(sl, bias, p_bias.data());
  // Sums per channel: dscale (dz xhat), dbias (dz), dxhat, dxhat xhat.
  std::vector<float> sums[4], tails[4];
  for (int i = 0; i < 4; ++i) sums[i].assign(n, 0.0f), tails[i].assign(sl.c, 0.0f);
  dxhat.resize(sl.size);
  for (int64_t k = 0; k < vecs; ++k) {
    const int64_t j = k % sl.period * 16;
    const Vec16 xhat = (Load(x + k * 16) - Load(p_mean.data() + j)) * Load(p_inv.data() + j);
    const Vec16 z = xhat * Load(p_scale.data() + j) + Load(p_bias.data() + j);
    const Vec16 sig = 1.0f / (1.0f + Exp(-z));
    const Vec16 dz = Load(dy + k * 16) * sig * (1.0f + z * (1.0f - sig));
    const Vec16 dxh = dz * Load(p_scale.data() + j);
    Store(dxhat.data() + k * 16, dxh);
    const Vec16 terms[4] = {dz * xhat, dz, dxh, dxh * xhat};
    for (int i = 0; i < 4; ++i) Store(sums[i].data() + j, Load(sums[i].data() + j) + terms[i]);
  }
  for (int64_t e = tail; e < sl.size; ++e) {
    const int64_t ch = e % sl.c;
    const float xhat = (x[e] - mean_c[ch]) * inv_c[ch], z = xhat * scale[ch] + bias[ch], sig = Sigmoid(z);
    const float dz = dy[e] * sig * (1.0f + z * (1.0f - sig)), dxh = dz * scale[ch];
    dxhat[e] = dxh;
    tails[0][ch] += dz * xhat, tails[1][ch] += dz, tails[2][ch] += dxh, tails[3][ch] += dxh * xhat;
  }
  std::vector<float> channel(sl.c), m1(sl.groups), m2(sl.groups), unused(sl.groups);
  GroupSums(sl, sums[0].data(), tails[0].data(), channel.data(), unused.data());
  for (int64_t ch = 0; ch < sl.c; ++ch) d_scale[ch] += channel[ch];
  GroupSums(sl, sums[1].data(), tails[1].data(), channel.data(), unused.data());
  for (int64_t ch = 0; ch < sl.c; ++ch) d_bias[ch] += channel[ch];
  GroupSums(sl, sums[2].data(), tails[2].data(), channel.data(), m1.data());
  GroupSums(sl, sums[3].data(), tails[3].data(), channel.data(), m2.data());
  // dx = inv (dxhat - E[dxhat] - xhat E[dxhat xhat]), the expectations over the group.
  std::vector<float> m1_c(sl.c), m2_c(sl.c), p_m1(n), p_m2(n);
  for (int64_t ch = 0; ch < sl.c; ++ch) m1_c[ch] = m1[ch / width] / count, m2_c[ch] = m2[ch / width] / count;
  Spread(sl, m1_c.data(), p_m1.data());
  Spread(sl, m2_c.data(), p_m2.data());
  for (int64_t k = 0; k < vecs; ++k) {
    const int64_t j = k % sl.period * 16;
    const Vec16 xhat = (Load(x + k * 16) - Load(p_mean.data() + j)) * Load(p_inv.data() + j);
    Store(dx + k * 16, Load(p_inv.data() + j) *
                           (Load(dxhat.data() + k * 16) - Load(p_m1.data() + j) - xhat * Load(p_m2.data() + j)));
  }
  for (int64_t e = tail; e < sl.size; ++e) {
    const int64_t ch = e % sl.c;
    const float xhat = (x[e] - mean_c[ch]) * inv_c[ch];
    dx[e] = inv_c[ch] * (dxhat[e] - m1_c[ch] - xhat * m2_c[ch]);
  }
}

int64_t Gcd(int64_t a, int64_t b) { return b == 0 ? a : Gcd(b, a % b); }

// ---------------------------------------------------------------------------------------------
// The FFI handlers.

// The geometry of x [N, T, H, W, C_in], the kernel's [K_t, K_h, K_w, C_in, C_out] and the
// output's [N, T', H', W', C_out], checked: the output must cover exactly the padded input.
std::variant<Geometry, ffi::Error> MakeGeometry(const char* name, ffi::Span<const int64_t> x,
                                                ffi::Span<const int64_t> kernel, ffi::Span<const int64_t> out,
                                                ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilations,
                                                ffi::Span<const int64_t> padding) {
  const std::string where(name);
  if (x.size() != 5 || kernel.size() != 5 || out.size() != 5)
    return ffi::Error::InvalidArgument(where + ": the input, the kernel and the output must have 5 dimensions");
  if (strides.size() != 3 || dilations.size() != 3 || padding.size() != 6)
    return ffi::Error::InvalidArgument(where + ": 3 strides, 3 dilations and 6 paddings expected");
  const Geometry g{x[0], x[1], x[2], x[3], x[4], out[1], out[2], out[3], out[4], kernel[0], kernel[1], kernel[2],
                   strides[0], strides[1], strides[2], dilations[0], dilations[1], dilations[2],
                   padding[0], padding[2], padding[4]};
  if (out[0] != g.n || kernel[3] != g.c_in || kernel[4] != g.c_out)
    return ffi::Error::InvalidArgument(where + ": the shapes of the input, the kernel and the output do not match");
  if (g.c_out % 8 != 0) return ffi::Error::InvalidArgument(where + ": C_out is not a multiple of 8");
  const int64_t sizes[3] = {g.t, g.h, g.w}, outs[3] = {g.t_out, g.h_out, g.w_out}, taps[3] = {g.k_t, g.k_h, g.k_w};
  for (int a = 0; a < 3; ++a) {
    if (strides[a] < 1 || dilations[a] < 1) return ffi::Error::InvalidArgument(where + ": strides and dilations must be >= 1");
    const int64_t padded = sizes[a] + padding[2 * a] + padding[2 * a + 1], span = (taps[a] - 1) * dilations[a] + 1;
    if (outs[a] != (padded >= span ? (padded - span) / strides[a] + 1 : 0))
      return ffi::Error::InvalidArgument(where + ": the output's size does not match the padded input's");
  }
  return g;
}

ffi::Error ConvWeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                              ffi::ResultBuffer<ffi::F32> dw, ffi::Span<const int64_t> strides,
                              ffi::Span<const int64_t> dilations, ffi::Span<const int64_t> padding) {
  auto made = MakeGeometry("ConvWeightGrad", x.dimensions(), dw->dimensions(), dy.dimensions(), strides, dilations,
                           padding);
  if (auto* error = std::get_if<ffi::Error>(&made)) return std::move(*error);
  const Geometry g = std::get<Geometry>(made);
  const int64_t size = g.k_t * g.k_h * g.k_w * g.c_in * g.c_out, total = g.n * g.t_out * g.h_out;
  float* out = dw->typed_data();
  std::fill(out, out + size, 0.0f);
  if (total == 0 || g.w_out == 0) return ffi::Error::Success();
  // The chunks' copies of dw within 256 MB.
  const int64_t chunk_rows = ChunkRows(pool, total, std::max<int64_t>(1, (int64_t{64} << 20) / size));
  std::vector<std::vector<float>> partial((total + chunk_rows - 1) / chunk_rows);
  const float* xd = x.typed_data();
  const float* dyd = dy.typed_data();
  RunChunks(pool, total, chunk_rows, [&](int64_t chunk, int64_t first, int64_t last) {
    partial[chunk].assign(size, 0.0f);
    WithOutVectors(g.c_out, [&](auto vector, auto out_vecs) {
      WeightGradRows<decltype(vector), out_vecs>(xd, dyd, g, first, last, partial[chunk].data());
    });
  });
  for (const std::vector<float>& part : partial)
    for (int64_t i = 0; i < size; ++i) out[i] += part[i];
  return ffi::Error::Success();
}

ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
                    ffi::Span<const int64_t> dilations, ffi::Span<const int64_t> padding) {
  auto made = MakeGeometry("Conv", x.dimensions(), w.dimensions(), y->dimensions(), strides, dilations, padding);
  if (auto* error = std::get_if<ffi::Error>(&made)) return std::move(*error);
  const Geometry g = std::get<Geometry>(made);
  const int64_t total = g.n * g.t_out * g.h_out;
  if (total == 0 || g.w_out == 0) return ffi::Error::Success();
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  float* yd = y->typed_data();
  RunChunks(pool, total, ChunkRows(pool, total, total),
            [&](int64_t, int64_t first, int64_t last) {
              WithOutVectors(g.c_out, [&](auto vector, auto out_vecs) {
                ConvRows<decltype(vector), out_vecs>(xd, wd, g, first, last, yd);
              });
            });
  return ffi::Error::Success();
}

std::variant<Slabs, ffi::Error> MakeSlabs(const char* name, ffi::Span<const int64_t> x, int64_t slab_dims,
                                          int64_t groups, float eps) {
  const std::string where(name);
  if (slab_dims < 1 || static_cast<int64_t>(x.size()) < slab_dims + 1)
    return ffi::Error::InvalidArgument(where + ": x has fewer axes than a slab's");
  int64_t count = 1, size = 1;
  for (size_t a = 0; a < x.size(); ++a) (static_cast<int64_t>(a) < static_cast<int64_t>(x.size()) - slab_dims ? count : size) *= x[a];
  const int64_t c = x[x.size() - 1];
  if (groups < 1 || c % groups != 0) return ffi::Error::InvalidArgument(where + ": the channels do not split into the groups");
  return Slabs{count, size, c, groups, c / Gcd(c, 16), eps};
}

ffi::Error GroupNormSwishImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                              ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                              ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> inv, int64_t slab_dims,
                              int64_t groups, float epsilon) {
  auto made = MakeSlabs("GroupNormSwish", x.dimensions(), slab_dims, groups, epsilon);
  if (auto* error = std::get_if<ffi::Error>(&made)) return std::move(*error);
  const Slabs sl = std::get<Slabs>(made);
  const float *xd = x.typed_data(), *sd = scale.typed_data(), *bd = bias.typed_data();
  float *yd = y->typed_data(), *md = mean->typed_data(), *id = inv->typed_data();
  RunChunks(pool, sl.count, ChunkRows(pool, sl.count, sl.count), [&](int64_t, int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b)
      GroupNormSwishSlab(sl, xd + b * sl.size, sd, bd, yd + b * sl.size, md + b * sl.groups, id + b * sl.groups);
  });
  return ffi::Error::Success();
}

ffi::Error GroupNormSwishGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                  ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                                  ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> inv,
                                  ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> d_scale,
                                  ffi::ResultBuffer<ffi::F32> d_bias, int64_t slab_dims, int64_t groups) {
  auto made = MakeSlabs("GroupNormSwishGrad", x.dimensions(), slab_dims, groups, 0.0f);
  if (auto* error = std::get_if<ffi::Error>(&made)) return std::move(*error);
  const Slabs sl = std::get<Slabs>(made);
  const float *xd = x.typed_data(), *dyd = dy.typed_data(), *sd = scale.typed_data(), *bd = bias.typed_data();
  const float *md = mean.typed_data(), *id = inv.typed_data();
  float* dxd = dx->typed_data();
  const int64_t chunk_rows = ChunkRows(pool, sl.count, sl.count);
  const int64_t chunks = (sl.count + chunk_rows - 1) / chunk_rows;
  std::vector<std::vector<float>> partial(chunks);  // per chunk: dscale then dbias
  RunChunks(pool, sl.count, chunk_rows, [&](int64_t chunk, int64_t first, int64_t last) {
    std::vector<float>& sums = partial[chunk];
    sums.assign(2 * sl.c, 0.0f);
    std::vector<float> dxhat;
    for (int64_t b = first; b < last; ++b)
      GroupNormSwishGradSlab(sl, xd + b * sl.size, dyd + b * sl.size, sd, bd, md + b * sl.groups,
                             id + b * sl.groups, dxd + b * sl.size, sums.data(), sums.data() + sl.c, dxhat);
  });
  float *ds = d_scale->typed_data(), *db = d_bias->typed_data();
  std::fill(ds, ds + sl.c, 0.0f);
  std::fill(db, db + sl.c, 0.0f);
  for (const std::vector<float>& sums : partial)
    for (int64_t ch = 0; ch < sl.c; ++ch) ds[ch] += sums[ch], db[ch] += sums[sl.c + ch];
  return ffi::Error::Success();
}

}  // namespace

// Both convolution kernels: two float32 inputs, one output, the geometry as attributes.
auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<ffi::Span<const int64_t>>("strides")
      .Attr<ffi::Span<const int64_t>>("dilations")
      .Attr<ffi::Span<const int64_t>>("padding");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmgenConv, ConvImpl, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmgenConvWeightGrad, ConvWeightGradImpl, ConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmgenGroupNormSwish, GroupNormSwishImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("slab_dims")
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmgenGroupNormSwishGrad, GroupNormSwishGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("slab_dims")
                                  .Attr<int64_t>("groups"));
