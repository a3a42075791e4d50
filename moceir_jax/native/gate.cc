// The gradient of the feed-forward block's gate, GELU(y1) * y2 with
// y = depthwise3x3(x) + bias split into halves y1, y2 along the channels, as
// an XLA FFI handler for XLA:CPU (see moceir_jax/native.py): the input,
// kernel and bias gradients in one pass, and the gate's output again. (The forward pass stays the XLA
// formulation, so forward results are those the parity tests check.)
//
// Why native code: the training step keeps only x (the conv's input) for this
// op and recomputes y in the backward pass. Under XLA:CPU that recomputation,
// the GELU derivative (erfc, exp), the concatenation of the two halves'
// gradients, the conv's input gradient and its kernel gradient were 6 passes
// over arrays of the FFN's full width: ~0.8 s of a 4 s MoCE-IR-S step. Here a
// piece of rows streams through a ring of three rows of dy (the gradient at
// y): each dy row is computed from x and the incoming gradient once, and while
// it is in cache, gives its row of dx (the same 3x3 stencil with the flipped
// kernel) and its share of the kernel and bias gradients. x and g are read
// once, dx written once; nothing of the conv's width goes through memory.
//
// GELU is the exact (erf) form, as torch's default. erf is the rational
// approximation XLA:CPU itself uses for float32 (|error| ~1e-7), exp a
// degree-6 polynomial after range reduction.
//
// Pieces are fixed blocks of rows of one image (each recomputes the dy rows
// at its edges), and the kernel and bias gradients come per image, summed
// over a fixed order of pieces: results do not depend on the thread count or
// on how a batch is split over devices.

#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using namespace moceir;  // NOLINT: the shared helpers

typedef int32_t IVec8 __attribute__((vector_size(8 * sizeof(int32_t))));

inline Vec8 Splat(float v) { return Vec8{} + v; }
inline Vec8 Min(Vec8 a, Vec8 b) { return a < b ? a : b; }
inline Vec8 Max(Vec8 a, Vec8 b) { return a > b ? a : b; }

// exp(x), float32: x = n ln2 + r with |r| <= ln2/2, exp(r) by its Taylor
// polynomial to degree 6 (relative error < 2e-7 on that range), times 2^n
// built in the exponent bits.
inline Vec8 Exp(Vec8 x) {
  x = Max(Min(x, Splat(88.0f)), Splat(-87.0f));
  const Vec8 y = x * 1.44269504088896341f + 0.5f;
  Vec8 n = __builtin_convertvector(__builtin_convertvector(y, IVec8), Vec8);  // trunc(y)
  n += __builtin_convertvector(n > y, Vec8);  // floor(y): the mask is -1 where trunc rounded up
  const Vec8 r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 split in two for exactness
  Vec8 p = Splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const IVec8 bits = (__builtin_convertvector(n, IVec8) + 127) << 23;
  Vec8 scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// erf(x), float32: XLA:CPU's rational approximation on [-4, 4] (beyond, erf
// is +-1 to float precision).
inline Vec8 Erf(Vec8 x) {
  x = Max(Min(x, Splat(4.0f)), Splat(-4.0f));
  const Vec8 x2 = x * x;
  Vec8 p = Splat(-2.72614225801306e-10f);
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  Vec8 q = Splat(-1.45660718464996e-05f);
  q = q * x2 + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x * p / q;
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

struct Dims {
  int64_t b, h, w, c2, c;  // c2: conv channels; c = c2 / 2: output channels
};

// One row of a 3x3 'same' cross-correlation (plus bias if given) from three
// input rows (nullptr: a row outside the image, i.e. zeros), rows of W*C2
// floats with C2 a multiple of 8. Per group of 8 channels the 9 weights stay
// in registers and the 3x3 window slides along the row.
void StencilRow(const float* const rows[3], const float* k, const float* bias, int64_t W,
                int64_t C2, float* out) {
  for (int64_t cc = 0; cc < C2; cc += 8) {
    Vec8 kv[3][3];
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) kv[i][j] = Load8(k + (i * 3 + j) * C2 + cc);
    const Vec8 b0 = bias ? Load8(bias + cc) : Vec8{};
    Vec8 win[3][3];  // win[i][j] = row i at pixel w + j - 1
    for (int i = 0; i < 3; ++i) {
      win[i][0] = Vec8{};
      win[i][1] = rows[i] ? Load8(rows[i] + cc) : Vec8{};
      win[i][2] = rows[i] && W > 1 ? Load8(rows[i] + C2 + cc) : Vec8{};
    }
    for (int64_t w = 0; w < W; ++w) {
      Vec8 a = b0;
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) a += win[i][j] * kv[i][j];
      Store8(out + w * C2 + cc, a);
      const int64_t next = w + 2;
      for (int i = 0; i < 3; ++i) {
        win[i][0] = win[i][1];
        win[i][1] = win[i][2];
        win[i][2] = rows[i] && next < W ? Load8(rows[i] + next * C2 + cc) : Vec8{};
      }
    }
  }
}

// Input rows r-1, r, r+1 of image b (nullptr outside the image).
void InputRows(const float* x, const Dims& d, int64_t b, int64_t r, const float* rows[3]) {
  for (int i = 0; i < 3; ++i) {
    const int64_t hh = r + i - 1;
    rows[i] = (hh < 0 || hh >= d.h) ? nullptr : x + (b * d.h + hh) * d.w * d.c2;
  }
}

ffi::Error GetDims(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& k,
                   const ffi::Buffer<ffi::F32>& bias, Dims* d) {
  auto xs = x.dimensions();
  auto ks = k.dimensions();
  if (xs.size() != 4) return ffi::Error::InvalidArgument("gate: expected x of rank 4 (NHWC)");
  *d = Dims{xs[0], xs[1], xs[2], xs[3], xs[3] / 2};
  if (ks.size() != 3 || ks[0] != 3 || ks[1] != 3 || ks[2] != d->c2) {
    return ffi::Error::InvalidArgument("gate: kernel must be (3, 3, C)");
  }
  if (d->c2 % 16 != 0) return ffi::Error::InvalidArgument("gate: C must be a multiple of 16");
  if (bias.element_count() != d->c2) return ffi::Error::InvalidArgument("gate: bias must be (C,)");
  return ffi::Error::Success();
}

// In place: a row of y becomes the row of dy = d(GELU(y1) y2)/dy times g;
// the gate's output GELU(y1) y2 goes to ``out`` unless it is null.
void GateGradRow(float* y, const float* g, const Dims& d, float* out) {
  for (int64_t w = 0; w < d.w; ++w) {
    float* yp = y + w * d.c2;
    const float* gp = g + w * d.c;
    for (int64_t c = 0; c < d.c; c += 8) {
      const Vec8 a = Load8(yp + c), v = Load8(yp + d.c + c), gv = Load8(gp + c);
      const Vec8 cdf = 0.5f * (1.0f + Erf(a * kSqrtHalf));
      const Vec8 pdf = Exp(-0.5f * a * a) * kInvSqrt2Pi;
      if (out) Store8(out + w * d.c + c, a * cdf * v);
      Store8(yp + c, gv * v * (cdf + a * pdf));
      Store8(yp + d.c + c, gv * a * cdf);
    }
  }
}

constexpr int64_t kRows = 16;  // rows per piece of the gradient

ffi::Error Grad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> g,
                ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dk,
                ffi::ResultBuffer<ffi::F32> dbias, ffi::ResultBuffer<ffi::F32> out) {
  Dims d;
  if (auto err = GetDims(x, k, bias, &d); err.failure()) return err;
  const int64_t W = d.w, C2 = d.c2, row = W * C2;
  const int64_t blocks = (d.h + kRows - 1) / kRows;
  const int64_t sums = 10 * C2;  // 9 taps, then the bias
  std::vector<float> partial(d.b * blocks * sums);
  const float* xd = x.typed_data();
  const float* kd = k.typed_data();
  const float* bd = bias.typed_data();
  const float* gd = g.typed_data();
  float* dxd = dx->typed_data();
  float* outd = out->typed_data();
  std::vector<float> kflip(9 * C2);  // the input gradient's stencil: the kernel turned 180 degrees
  for (int t = 0; t < 9; ++t)
    std::copy(kd + (8 - t) * C2, kd + (9 - t) * C2, kflip.begin() + t * C2);

  ParallelFor(pool, d.b * blocks, [&](int64_t piece) {
    const int64_t b = piece / blocks, h0 = (piece % blocks) * kRows;
    const int64_t h1 = std::min(d.h, h0 + kRows);
    float* acc = partial.data() + piece * sums;
    std::fill(acc, acc + sums, 0.0f);
    std::vector<float> ring(3 * row);
    auto slot = [&](int64_t r) { return ring.data() + ((r + 3) % 3) * row; };
    auto dy_row = [&](int64_t r) -> const float* {
      return (r < 0 || r >= d.h) ? nullptr : slot(r);
    };
    for (int64_t r = h0 - 1; r <= h1; ++r) {
      if (r >= 0 && r < d.h) {  // dy row r into the ring
        const float* rows[3];
        InputRows(xd, d, b, r, rows);
        StencilRow(rows, kd, bd, W, C2, slot(r));
        // (the gate's output for this piece's own rows: the next 1x1 conv's
        // weight gradient needs it, see ops.GateInput)
        GateGradRow(slot(r), gd + (b * d.h + r) * W * d.c, d,
                    r >= h0 && r < h1 ? outd + (b * d.h + r) * W * d.c : nullptr);
      }
      const int64_t s = r - 1;  // its three dy rows are ready
      if (s < h0 || s >= h1) continue;
      const float* drows[3] = {dy_row(s - 1), dy_row(s), dy_row(s + 1)};
      StencilRow(drows, kflip.data(), nullptr, W, C2, dxd + (b * d.h + s) * row);
      // Kernel and bias gradients from dy row s and input rows s-1..s+1.
      const float* dys = dy_row(s);
      const float* xrows[3];
      InputRows(xd, d, b, s, xrows);
      for (int64_t cc = 0; cc < C2; cc += 8) {
        Vec8 tap[3][3] = {};
        Vec8 bsum = {};
        Vec8 win[3][3];
        for (int i = 0; i < 3; ++i) {
          win[i][0] = Vec8{};
          win[i][1] = xrows[i] ? Load8(xrows[i] + cc) : Vec8{};
          win[i][2] = xrows[i] && W > 1 ? Load8(xrows[i] + C2 + cc) : Vec8{};
        }
        for (int64_t w = 0; w < W; ++w) {
          const Vec8 gv = Load8(dys + w * C2 + cc);
          bsum += gv;
          for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j) tap[i][j] += win[i][j] * gv;
          const int64_t next = w + 2;
          for (int i = 0; i < 3; ++i) {
            win[i][0] = win[i][1];
            win[i][1] = win[i][2];
            win[i][2] = xrows[i] && next < W ? Load8(xrows[i] + next * C2 + cc) : Vec8{};
          }
        }
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 3; ++j) {
            float* a = acc + (i * 3 + j) * C2 + cc;
            Store8(a, Load8(a) + tap[i][j]);
          }
        Store8(acc + 9 * C2 + cc, Load8(acc + 9 * C2 + cc) + bsum);
      }
    }
  });
  // Per image, add the pieces in row order.
  float* dkd = dk->typed_data();
  float* dbd = dbias->typed_data();
  for (int64_t b = 0; b < d.b; ++b) {
    float* ok = dkd + b * 9 * C2;
    float* ob = dbd + b * C2;
    std::fill(ok, ok + 9 * C2, 0.0f);
    std::fill(ob, ob + C2, 0.0f);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const float* src = partial.data() + (b * blocks + blk) * sums;
      for (int64_t t = 0; t < 9 * C2; ++t) ok[t] += src[t];
      for (int64_t c = 0; c < C2; ++c) ob[c] += src[9 * C2 + c];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoceirGateGrad, Grad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
