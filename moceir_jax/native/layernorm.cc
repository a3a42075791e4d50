// Channel LayerNorm on NHWC float32 arrays for XLA:CPU, forward and gradient,
// as XLA FFI handlers (see moceir_jax/native.py).
//
// Why native code: the norm is a reduction over the last, contiguous axis of
// a few dozen to a few hundred floats per pixel. XLA:CPU ran its gradient as
// ~9 separate fusions per norm (statistics, two per-pixel sums, the input
// gradient, the weight and bias sums over the image), each a pass over the
// full tensor: 0.4 s of a 4.3 s MoCE-IR-S training step. Here one pixel's
// channels are read once into cache and every sum is taken from there, so the
// gradient reads x and g once and writes dx once.
//
// The weight and bias gradients come per image (the caller sums over the
// batch), each image's pixels split into fixed pieces summed in order, so
// the results depend neither on the thread count nor on how a batch is split
// over devices.

#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

// No fused multiply-adds here: with them g*w - mean(g*w) is not exactly zero
// for one channel (the product is not rounded before the subtraction), and
// the gradient of a one-channel norm, which is the bias whatever its input,
// would be rounding noise times 1/sqrt(eps) instead of zero. The norm is
// limited by memory, not arithmetic.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace {

using namespace moceir;  // NOLINT: the shared helpers

// Pixels per piece of work (and per partial sum of the weight gradient).
constexpr int64_t kPixels = 256;

inline float HSum(Vec8 v) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// Sum over the C channels of f(c) for the 8-aligned part as vectors (fv) and
// the tail as scalars (fs).
template <typename FV, typename FS>
inline float ChannelSum(int64_t C, const FV& fv, const FS& fs) {
  const int64_t c8 = C / 8 * 8;
  Vec8 acc = {};
  for (int64_t c = 0; c < c8; c += 8) acc += fv(c);
  float s = HSum(acc);
  for (int64_t c = c8; c < C; ++c) s += fs(c);
  return s;
}

// Mean and 1/sqrt(biased variance + eps) of one pixel's channels: the
// variance from the centred values, as the XLA formulation computes it.
inline void Stats(const float* x, int64_t C, float eps, float* mu, float* inv) {
  const float m = ChannelSum(C, [&](int64_t c) { return Load8(x + c); },
                             [&](int64_t c) { return x[c]; }) / C;
  const Vec8 mv = Vec8{} + m;
  const float var = ChannelSum(
      C, [&](int64_t c) { Vec8 d = Load8(x + c) - mv; return d * d; },
      [&](int64_t c) { float d = x[c] - m; return d * d; }) / C;
  *mu = m;
  *inv = 1.0f / std::sqrt(var + eps);
}

struct Shape {
  int64_t b, pixels, c;
};

ffi::Error GetShape(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& w, Shape* s) {
  auto xs = x.dimensions();
  if (xs.size() < 2) return ffi::Error::InvalidArgument("layer_norm: expected x of rank >= 2");
  int64_t pixels = 1;
  for (size_t i = 1; i + 1 < xs.size(); ++i) pixels *= xs[i];
  *s = Shape{xs[0], pixels, xs[xs.size() - 1]};
  if (w.element_count() != s->c) {
    return ffi::Error::InvalidArgument("layer_norm: weight must have one entry per channel");
  }
  return ffi::Error::Success();
}

// y = (x - mean) * inv * w + b, or with bias_free: y = x * inv * w (the
// reference's BiasFree norm: the variance is centred, the output is not).
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> b, float eps, bool bias_free,
                   ffi::ResultBuffer<ffi::F32> y) {
  Shape s;
  if (auto err = GetShape(x, w, &s); err.failure()) return err;
  const int64_t C = s.c, n = s.b * s.pixels, c8 = C / 8 * 8;
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  const float* bd = b.typed_data();
  float* yd = y->typed_data();
  ParallelFor(pool, (n + kPixels - 1) / kPixels, [&](int64_t piece) {
    const int64_t end = std::min(n, (piece + 1) * kPixels);
    for (int64_t p = piece * kPixels; p < end; ++p) {
      const float* xp = xd + p * C;
      float* yp = yd + p * C;
      float mu, inv;
      Stats(xp, C, eps, &mu, &inv);
      const float shift = bias_free ? 0.0f : mu;
      const Vec8 sv = Vec8{} + shift, iv = Vec8{} + inv;
      for (int64_t c = 0; c < c8; c += 8) {
        Vec8 v = (Load8(xp + c) - sv) * iv * Load8(wd + c);
        if (!bias_free) v += Load8(bd + c);
        Store8(yp + c, v);
      }
      for (int64_t c = c8; c < C; ++c) {
        yp[c] = (xp[c] - shift) * inv * wd[c] + (bias_free ? 0.0f : bd[c]);
      }
    }
  });
  return ffi::Error::Success();
}

// dx, and per image dw = sum g * xhat, db = sum g (xhat = (x - mean) * inv; for
// bias_free the weight multiplies x * inv and there is no bias).
//   with bias: dx = inv * (g w - mean(g w) - xhat * mean(g w xhat))
//   bias_free: dx = inv * (g w - (x - mean) * inv * mean(g w x inv))
ffi::Error Grad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                ffi::Buffer<ffi::F32> g, float eps, bool bias_free,
                ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                ffi::ResultBuffer<ffi::F32> db) {
  Shape s;
  if (auto err = GetShape(x, w, &s); err.failure()) return err;
  const int64_t C = s.c, c8 = C / 8 * 8;
  const int64_t pieces = (s.pixels + kPixels - 1) / kPixels;
  std::vector<float> partial(s.b * pieces * 2 * C);
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  const float* gd = g.typed_data();
  float* dxd = dx->typed_data();
  ParallelFor(pool, s.b * pieces, [&](int64_t piece) {
    const int64_t img = piece / pieces, first = (piece % pieces) * kPixels;
    const int64_t end = std::min(s.pixels, first + kPixels);
    float* pw = partial.data() + piece * 2 * C;  // this piece's dw sums, then its db sums
    float* pb = pw + C;
    std::fill(pw, pw + 2 * C, 0.0f);
    for (int64_t q = first; q < end; ++q) {
      const int64_t p = img * s.pixels + q;
      const float* xp = xd + p * C;
      const float* gp = gd + p * C;
      float* dxp = dxd + p * C;
      float mu, inv;
      Stats(xp, C, eps, &mu, &inv);
      const float shift = bias_free ? 0.0f : mu;  // weight multiplies (x - shift) * inv
      const Vec8 mv = Vec8{} + mu, sv = Vec8{} + shift, iv = Vec8{} + inv;
      const float s1 = bias_free ? 0.0f : ChannelSum(
          C, [&](int64_t c) { return Load8(gp + c) * Load8(wd + c); },
          [&](int64_t c) { return gp[c] * wd[c]; }) / C;
      const float s2 = ChannelSum(
          C, [&](int64_t c) { return Load8(gp + c) * Load8(wd + c) * ((Load8(xp + c) - sv) * iv); },
          [&](int64_t c) { return gp[c] * wd[c] * ((xp[c] - shift) * inv); }) / C;
      const Vec8 s1v = Vec8{} + s1, s2v = Vec8{} + s2;
      for (int64_t c = 0; c < c8; c += 8) {
        const Vec8 gv = Load8(gp + c), xv = Load8(xp + c);
        const Vec8 xs = (xv - sv) * iv;                                   // what w multiplies
        const Vec8 xhat = (xv - mv) * iv;
        Store8(dxp + c, iv * (gv * Load8(wd + c) - s1v - xhat * s2v));
        Store8(pw + c, Load8(pw + c) + gv * xs);
        Store8(pb + c, Load8(pb + c) + gv);
      }
      for (int64_t c = c8; c < C; ++c) {
        const float xs = (xp[c] - shift) * inv, xhat = (xp[c] - mu) * inv;
        dxp[c] = inv * (gp[c] * wd[c] - s1 - xhat * s2);
        pw[c] += gp[c] * xs;
        pb[c] += gp[c];
      }
    }
  });
  // Per image, add the pieces in order.
  float* dwd = dw->typed_data();
  float* dbd = db->typed_data();
  for (int64_t img = 0; img < s.b; ++img) {
    float* ow = dwd + img * C;
    float* ob = dbd + img * C;
    std::fill(ow, ow + C, 0.0f);
    std::fill(ob, ob + C, 0.0f);
    for (int64_t piece = 0; piece < pieces; ++piece) {
      const float* src = partial.data() + (img * pieces + piece) * 2 * C;
      for (int64_t c = 0; c < C; ++c) {
        ow[c] += src[c];
        ob[c] += src[C + c];
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoceirLayerNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<bool>("bias_free")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoceirLayerNormGrad, Grad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<bool>("bias_free")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
