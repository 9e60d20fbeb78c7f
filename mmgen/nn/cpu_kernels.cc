// mmgen's hand-written CPU kernels, called from JAX through XLA's FFI (mmgen/nn/cpu_kernels.py
// compiles this file with the host's C++ compiler on first use and registers the handlers).
//
// Both kernels work on a channels-last 3D convolution of an already padded input, with
// strides (s) and dilations (d), float32, C_out a multiple of 16:
//
//   MmgenConv:            y[n, t, y, x, o] = sum_{a, b, c, i} x[n, t s_t + a d_t, y s_h + b d_h, x s_w + c d_w, i] w[a, b, c, i, o]
//   MmgenConvWeightGrad: dw[a, b, c, i, o] = sum_{n, t, y, x} x[n, t s_t + a d_t, y s_h + b d_h, x s_w + c d_w, i] dy[n, t, y, x, o]
//
// x [N, T, H, W, C_in], w and dw [K_t, K_h, K_w, C_in, C_out], y and dy [N, T', H', W', C_out].
// The input gradient is MmgenConv of the padded dy with the flipped kernel (cpu_kernels.py).
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
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 16 floats: one AVX-512 register, or two AVX2 / four SSE registers on older CPUs.
typedef float Vec __attribute__((vector_size(64)));
constexpr int kLanes = 16;

struct Geometry {
  int64_t n, t, h, w, c_in;  // padded input
  int64_t t_out, h_out, w_out, c_out;
  int64_t k_t, k_h, k_w;
  int64_t stride_t, stride_h, stride_w;
  int64_t dilation_t, dilation_h, dilation_w;
};

// ---------------------------------------------------------------------------------------------
// Weight gradient: for each output row (n, t, y) and tap (a, b, c), a small matrix product
// dw[a, b, c] += x_row^T dy_row of [C_in, W'] x [W', C_out].

// acc[i][j] (input channel i of the block, output channels 16 j ... 16 j + 15) += sum_x x_row[x, i] dy_row[x, j].
template <int kIn, int kOutVecs>
inline void WeightGradBlock(const float* x_row, int64_t x_step, const float* dy_row, int64_t c_out, int64_t w_out,
                  float* dw_block) {
  Vec acc[kIn][kOutVecs];
  for (int i = 0; i < kIn; ++i)
    for (int j = 0; j < kOutVecs; ++j) std::memcpy(&acc[i][j], dw_block + i * c_out + j * kLanes, sizeof(Vec));
  for (int64_t x = 0; x < w_out; ++x) {
    Vec d[kOutVecs];
    for (int j = 0; j < kOutVecs; ++j) std::memcpy(&d[j], dy_row + x * c_out + j * kLanes, sizeof(Vec));
    const float* xv = x_row + x * x_step;
    for (int i = 0; i < kIn; ++i) {
      const float b = xv[i];
      for (int j = 0; j < kOutVecs; ++j) acc[i][j] += b * d[j];
    }
  }
  for (int i = 0; i < kIn; ++i)
    for (int j = 0; j < kOutVecs; ++j) std::memcpy(dw_block + i * c_out + j * kLanes, &acc[i][j], sizeof(Vec));
}

// One tap of one output row: 16 accumulator registers, (16 / kOutVecs) input channels by
// kOutVecs vectors of output channels at a time.
template <int kOutVecs>
void WeightGradRowTap(const float* x_row, int64_t x_step, const float* dy_row, const Geometry& g, float* dw_tap) {
  constexpr int kIn = 16 / kOutVecs;
  for (int64_t o = 0; o < g.c_out; o += kLanes * kOutVecs) {
    int64_t i = 0;
    for (; i + kIn <= g.c_in; i += kIn)
      WeightGradBlock<kIn, kOutVecs>(x_row + i, x_step, dy_row + o, g.c_out, g.w_out, dw_tap + i * g.c_out + o);
    for (; i < g.c_in; ++i)
      WeightGradBlock<1, kOutVecs>(x_row + i, x_step, dy_row + o, g.c_out, g.w_out, dw_tap + i * g.c_out + o);
  }
}

// Adds rows [first, last) of dy (row r = (n T' + t) H' + y) into dw.
void WeightGradRows(const float* x, const float* dy, const Geometry& g, int64_t first, int64_t last, float* dw) {
  const int64_t vecs = g.c_out / kLanes;
  const int out_vecs = vecs % 4 == 0 ? 4 : vecs % 2 == 0 ? 2 : 1;
  const int64_t tap_size = g.c_in * g.c_out, x_step = g.stride_w * g.c_in;
  for (int64_t r = first; r < last; ++r) {
    const int64_t y = r % g.h_out, t = (r / g.h_out) % g.t_out, n = r / (g.h_out * g.t_out);
    const float* dy_row = dy + r * g.w_out * g.c_out;
    for (int64_t a = 0; a < g.k_t; ++a) {
      for (int64_t b = 0; b < g.k_h; ++b) {
        const int64_t frame = n * g.t + t * g.stride_t + a * g.dilation_t;
        const int64_t row = y * g.stride_h + b * g.dilation_h;
        const float* x_base = x + (frame * g.h + row) * g.w * g.c_in;
        for (int64_t c = 0; c < g.k_w; ++c) {
          const float* x_row = x_base + c * g.dilation_w * g.c_in;
          float* dw_tap = dw + ((a * g.k_h + b) * g.k_w + c) * tap_size;
          if (out_vecs == 4) WeightGradRowTap<4>(x_row, x_step, dy_row, g, dw_tap);
          else if (out_vecs == 2) WeightGradRowTap<2>(x_row, x_step, dy_row, g, dw_tap);
          else WeightGradRowTap<1>(x_row, x_step, dy_row, g, dw_tap);
        }
      }
    }
  }
}

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

std::optional<ffi::Error> CheckGeometry(const Geometry& g, const char* name) {
  if (g.c_out % kLanes != 0)
    return ffi::Error::InvalidArgument(std::string(name) + ": C_out is not a multiple of 16");
  if (g.t_out > 0 && g.h_out > 0 && g.w_out > 0 &&
      ((g.t_out - 1) * g.stride_t + (g.k_t - 1) * g.dilation_t >= g.t ||
       (g.h_out - 1) * g.stride_h + (g.k_h - 1) * g.dilation_h >= g.h ||
       (g.w_out - 1) * g.stride_w + (g.k_w - 1) * g.dilation_w >= g.w))
    return ffi::Error::InvalidArgument(std::string(name) + ": the output reads beyond the padded input");
  return std::nullopt;
}

ffi::Error ConvWeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                              ffi::ResultBuffer<ffi::F32> dw, int64_t stride_t, int64_t stride_h,
                              int64_t stride_w, int64_t dilation_t, int64_t dilation_h, int64_t dilation_w) {
  const auto xs = x.dimensions(), ds = dy.dimensions(), ws = dw->dimensions();
  if (xs.size() != 5 || ds.size() != 5 || ws.size() != 5)
    return ffi::Error::InvalidArgument("ConvWeightGrad: x, dy and dw must have 5 dimensions");
  const Geometry g{xs[0], xs[1], xs[2], xs[3], xs[4], ds[1], ds[2], ds[3], ds[4], ws[0], ws[1], ws[2],
                   stride_t, stride_h, stride_w, dilation_t, dilation_h, dilation_w};
  if (ds[0] != g.n || ws[3] != g.c_in || ws[4] != g.c_out)
    return ffi::Error::InvalidArgument("ConvWeightGrad: the shapes of x, dy and dw do not match");
  if (auto error = CheckGeometry(g, "ConvWeightGrad")) return *error;
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
    WeightGradRows(xd, dyd, g, first, last, partial[chunk].data());
  });
  for (const std::vector<float>& part : partial)
    for (int64_t i = 0; i < size; ++i) out[i] += part[i];
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Conv: the forward of the same convolution,
//
//   y[n, t, y, x, o] = sum_{a, b, c, i} x[n, t st + a dt, y sh + b dh, x sw + c dw, i] w[a, b, c, i, o]
//
// x [N, T, H, W, C_in] padded, w [K_t, K_h, K_w, C_in, C_out], y [N, T', H', W', C_out],
// float32, C_out a multiple of 16. Each output row is computed in blocks of kPos positions by
// kOutVecs vectors of output channels (16 accumulator registers), one weight vector times a
// broadcast input value per multiply-add; rows are independent, split over the thread pool.

template <int kPos, int kOutVecs>
inline void ConvBlock(const float* x_row, const float* w, const Geometry& g, int64_t x0, int64_t o0,
                      float* y_row) {
  Vec acc[kPos][kOutVecs];
  for (int p = 0; p < kPos; ++p)
    for (int j = 0; j < kOutVecs; ++j) acc[p][j] = Vec{};
  const int64_t frame_step = g.dilation_t * g.h * g.w * g.c_in, row_step = g.dilation_h * g.w * g.c_in;
  const int64_t pos_step = g.stride_w * g.c_in;
  for (int64_t a = 0; a < g.k_t; ++a) {
    for (int64_t b = 0; b < g.k_h; ++b) {
      for (int64_t c = 0; c < g.k_w; ++c) {
        const float* xs = x_row + a * frame_step + b * row_step + (x0 * g.stride_w + c * g.dilation_w) * g.c_in;
        const float* ws = w + ((a * g.k_h + b) * g.k_w + c) * g.c_in * g.c_out + o0;
        for (int64_t i = 0; i < g.c_in; ++i) {
          Vec wv[kOutVecs];
          for (int j = 0; j < kOutVecs; ++j) std::memcpy(&wv[j], ws + i * g.c_out + j * kLanes, sizeof(Vec));
          for (int p = 0; p < kPos; ++p) {
            const float v = xs[p * pos_step + i];
            for (int j = 0; j < kOutVecs; ++j) acc[p][j] += v * wv[j];
          }
        }
      }
    }
  }
  for (int p = 0; p < kPos; ++p)
    for (int j = 0; j < kOutVecs; ++j) std::memcpy(y_row + (x0 + p) * g.c_out + o0 + j * kLanes, &acc[p][j], sizeof(Vec));
}

// Positions [x0, w_out) of one row, in blocks of 16 / kOutVecs, then halves of that.
template <int kOutVecs>
void ConvRow(const float* x_row, const float* w, const Geometry& g, float* y_row) {
  constexpr int kPos = 16 / kOutVecs;
  for (int64_t o = 0; o < g.c_out; o += kLanes * kOutVecs) {
    int64_t x = 0;
    for (; x + kPos <= g.w_out; x += kPos) ConvBlock<kPos, kOutVecs>(x_row, w, g, x, o, y_row);
    if constexpr (kPos >= 8) { if (x + 8 <= g.w_out) { ConvBlock<8, kOutVecs>(x_row, w, g, x, o, y_row); x += 8; } }
    if constexpr (kPos >= 4) { if (x + 4 <= g.w_out) { ConvBlock<4, kOutVecs>(x_row, w, g, x, o, y_row); x += 4; } }
    if constexpr (kPos >= 2) { if (x + 2 <= g.w_out) { ConvBlock<2, kOutVecs>(x_row, w, g, x, o, y_row); x += 2; } }
    for (; x < g.w_out; ++x) ConvBlock<1, kOutVecs>(x_row, w, g, x, o, y_row);
  }
}

void ConvRows(const float* x, const float* w, const Geometry& g, int64_t first, int64_t last, float* y) {
  const int64_t vecs = g.c_out / kLanes;
  const int out_vecs = vecs % 4 == 0 ? 4 : vecs % 2 == 0 ? 2 : 1;
  for (int64_t r = first; r < last; ++r) {
    const int64_t row = r % g.h_out, t = (r / g.h_out) % g.t_out, n = r / (g.h_out * g.t_out);
    const float* x_row = x + ((n * g.t + t * g.stride_t) * g.h + row * g.stride_h) * g.w * g.c_in;
    float* y_row = y + r * g.w_out * g.c_out;
    if (out_vecs == 4) ConvRow<4>(x_row, w, g, y_row);
    else if (out_vecs == 2) ConvRow<2>(x_row, w, g, y_row);
    else ConvRow<1>(x_row, w, g, y_row);
  }
}

ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y, int64_t stride_t, int64_t stride_h, int64_t stride_w,
                    int64_t dilation_t, int64_t dilation_h, int64_t dilation_w) {
  const auto xs = x.dimensions(), ws = w.dimensions(), ys = y->dimensions();
  if (xs.size() != 5 || ws.size() != 5 || ys.size() != 5)
    return ffi::Error::InvalidArgument("Conv: x, w and y must have 5 dimensions");
  const Geometry g{xs[0], xs[1], xs[2], xs[3], xs[4], ys[1], ys[2], ys[3], ys[4], ws[0], ws[1], ws[2],
             stride_t, stride_h, stride_w, dilation_t, dilation_h, dilation_w};
  if (ys[0] != g.n || ws[3] != g.c_in || ws[4] != g.c_out)
    return ffi::Error::InvalidArgument("Conv: the shapes of x, w and y do not match");
  if (auto error = CheckGeometry(g, "Conv")) return *error;
  const int64_t total = g.n * g.t_out * g.h_out;
  if (total == 0 || g.w_out == 0) return ffi::Error::Success();
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  float* yd = y->typed_data();
  RunChunks(pool, total, ChunkRows(pool, total, total),
            [&](int64_t, int64_t first, int64_t last) { ConvRows(xd, wd, g, first, last, yd); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmgenConvWeightGrad, ConvWeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_t")
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("dilation_t")
                                  .Attr<int64_t>("dilation_h")
                                  .Attr<int64_t>("dilation_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmgenConv, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_t")
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("dilation_t")
                                  .Attr<int64_t>("dilation_h")
                                  .Attr<int64_t>("dilation_w"));
