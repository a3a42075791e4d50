// Depthwise 'same' convolution on NHWC float32 arrays for XLA:CPU, as XLA FFI
// handlers (see moceir_jax/native.py, which compiles and registers them).
//
// Why native code: XLA:CPU runs the depthwise convolutions of this model 5-10x
// below memory speed. Its grouped convolution is ~27x slower than shifted
// multiply-adds, and the shifted form's kernel gradient (a reduction per tap)
// becomes either per-tap passes over the whole tensor or a while loop of tiny
// calls. Here each output row is built from the input rows it needs while they
// are in cache, and the channel axis (contiguous in NHWC) is the vector axis.
//
// Work is split into fixed pieces (rows, or blocks of rows) that are handed out
// to the calling thread and the intra-op thread pool; results do not depend on
// how many threads take part. The kernel gradient is returned per image (the
// caller sums over the batch), so a batch split over devices adds exactly the
// per-image partials that one device adds.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using namespace moceir;  // NOLINT: the shared helpers

struct Dims {
  int64_t b, h, w, c;
  int64_t kh, kw;
};

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& x, int64_t kh, int64_t kw, int64_t kc,
                       Dims* d) {
  auto xs = x.dimensions();
  if (xs.size() != 4) return ffi::Error::InvalidArgument("depthwise: expected x of rank 4 (NHWC)");
  *d = Dims{xs[0], xs[1], xs[2], xs[3], kh, kw};
  if (kc != d->c || kh % 2 == 0 || kw % 2 == 0) {
    return ffi::Error::InvalidArgument("depthwise: kernel must be (odd, odd, C)");
  }
  return ffi::Error::Success();
}

// The channel axis is contiguous, so a row of the image is one run of W*C
// floats, and tap (i, j) of an output row reads input row h+i-ph shifted by
// (j-pw)*C floats. The inner loops therefore run over that flat index t in
// vectors of 16 floats, whatever C is: the tap's weights for the vector at t
// are k[i, j, (t + m) mod C], m < 16, read from the kernel tiled to a period L
// = lcm(C, 16). Pixels within pw of the row's ends (where some taps fall
// outside the image) take a plain loop.

int64_t Period(int64_t c) {
  int64_t a = c, b = kV;
  while (b) { int64_t t = a % b; a = b; b = t; }
  return c / a * kV;
}

// The kernel (KH*KW, C) tiled to (KH*KW, L).
std::vector<float> Tiled(const float* k, int64_t taps, int64_t C, int64_t L) {
  std::vector<float> out(taps * L);
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t l = 0; l < L; ++l) out[t * L + l] = k[t * C + l % C];
  return out;
}

// [lo, hi): the vector-aligned part of a row in which every tap is inside the image.
inline void Interior(const Dims& d, int64_t* lo, int64_t* hi) {
  const int64_t pw = d.kw / 2;
  *lo = std::min((pw * d.c + kV - 1) / kV * kV, d.w * d.c);
  *hi = std::max(*lo, (d.w - pw) * d.c / kV * kV);  // rows narrower than the kernel: hi = lo
}

inline void ForwardRow(const float* x, const float* k, const float* ktile, int64_t L, float* y,
                       const Dims& d, int64_t b, int64_t h) {
  const int64_t W = d.w, C = d.c, pw = d.kw / 2;
  const float* rows[64];  // input row of each tap row, or null outside the image
  for (int64_t i = 0; i < d.kh; ++i) {
    const int64_t hh = h + i - d.kh / 2;
    rows[i] = (hh < 0 || hh >= d.h) ? nullptr : x + (b * d.h + hh) * W * C;
  }
  float* yr = y + (b * d.h + h) * W * C;
  int64_t lo, hi;
  Interior(d, &lo, &hi);
  int64_t t = lo;
  for (; t + 4 * kV <= hi; t += 4 * kV) {
    Vec a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const int64_t p0 = t % L, p1 = (t + kV) % L, p2 = (t + 2 * kV) % L, p3 = (t + 3 * kV) % L;
    for (int64_t i = 0; i < d.kh; ++i) {
      if (!rows[i]) continue;
      for (int64_t j = 0; j < d.kw; ++j) {
        const float* xp = rows[i] + t + (j - pw) * C;
        const float* kp = ktile + (i * d.kw + j) * L;
        a0 += Load(xp) * Load(kp + p0);
        a1 += Load(xp + kV) * Load(kp + p1);
        a2 += Load(xp + 2 * kV) * Load(kp + p2);
        a3 += Load(xp + 3 * kV) * Load(kp + p3);
      }
    }
    Store(yr + t, a0);
    Store(yr + t + kV, a1);
    Store(yr + t + 2 * kV, a2);
    Store(yr + t + 3 * kV, a3);
  }
  for (; t + kV <= hi; t += kV) {
    Vec a = {};
    const int64_t ph = t % L;
    for (int64_t i = 0; i < d.kh; ++i) {
      if (!rows[i]) continue;
      for (int64_t j = 0; j < d.kw; ++j)
        a += Load(rows[i] + t + (j - pw) * C) * Load(ktile + (i * d.kw + j) * L + ph);
    }
    Store(yr + t, a);
  }
  // The rest of the row, element by element, with bounds on every tap.
  auto scalar = [&](int64_t from, int64_t to) {
    for (int64_t e = from; e < to; ++e) {
      const int64_t w = e / C, c = e % C;
      float a = 0.0f;
      for (int64_t i = 0; i < d.kh; ++i) {
        if (!rows[i]) continue;
        for (int64_t j = 0; j < d.kw; ++j) {
          const int64_t ww = w + j - pw;
          if (ww >= 0 && ww < W) a += rows[i][ww * C + c] * k[(i * d.kw + j) * C + c];
        }
      }
      yr[e] = a;
    }
  };
  scalar(0, lo);
  scalar(t, W * C);
}

// One output row for C a multiple of 8, per group of 8 channels and tap row:
// the tap row's KW weights stay in registers and the KW input vectors slide
// along the row, so a pixel costs one load of x and KW multiply-adds (plus
// the running sum's load and store). Taps are added in (i, j) order.
//
// x, k and y may be channel slices of wider arrays: pixel (b, h, w) of x is at
// x + ((b * H + h) * W + w) * xs, the weights of tap t at k + t * ks, and
// likewise y with ys (all three equal C for whole arrays).
template <int KW>
void ForwardRowVec8(const float* x, int64_t xs, const float* k, int64_t ks, float* y, int64_t ys,
                    const Dims& d, int64_t b, int64_t h) {
  const int64_t W = d.w, C = d.c, pw = KW / 2;
  float* yr = y + (b * d.h + h) * W * ys;
  for (int64_t cc = 0; cc < C; cc += 8) {
    bool first = true;
    for (int64_t i = 0; i < d.kh; ++i) {
      const int64_t hh = h + i - d.kh / 2;
      if (hh < 0 || hh >= d.h) continue;
      const float* xr = x + (b * d.h + hh) * W * xs + cc;
      Vec8 kv[KW], win[KW];
      for (int j = 0; j < KW; ++j) {
        kv[j] = Load8(k + (i * KW + j) * ks + cc);
        const int64_t ww = j - pw;
        win[j] = (ww >= 0 && ww < W) ? Load8(xr + ww * xs) : Vec8{};
      }
      for (int64_t w = 0; w < W; ++w) {
        Vec8 a = first ? Vec8{} : Load8(yr + w * ys + cc);
        for (int j = 0; j < KW; ++j) a += win[j] * kv[j];
        Store8(yr + w * ys + cc, a);
        for (int j = 0; j + 1 < KW; ++j) win[j] = win[j + 1];
        const int64_t next = w + 1 + pw;
        win[KW - 1] = next < W ? Load8(xr + next * xs) : Vec8{};
      }
      first = false;
    }
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y) {
  Dims d;
  auto ks = k.dimensions();
  if (ks.size() != 3) return ffi::Error::InvalidArgument("depthwise: kernel must be (KH,KW,C)");
  if (auto err = CheckShapes(x, ks[0], ks[1], ks[2], &d); err.failure()) return err;
  if (d.kh > 64) return ffi::Error::InvalidArgument("depthwise: kernel taller than 64 rows");
  const float* xd = x.typed_data();
  const float* kd = k.typed_data();
  float* yd = y->typed_data();
  const int64_t L = Period(d.c);
  const std::vector<float> ktile = Tiled(kd, d.kh * d.kw, d.c, L);
  auto row = [&](int64_t r) {
    const int64_t b = r / d.h, h = r % d.h;
    if (d.c % 8 == 0 && d.kw == 3) {
      ForwardRowVec8<3>(xd, d.c, kd, d.c, yd, d.c, d, b, h);
    } else if (d.c % 8 == 0 && d.kw == 7) {
      ForwardRowVec8<7>(xd, d.c, kd, d.c, yd, d.c, d, b, h);
    } else {
      ForwardRow(xd, kd, ktile.data(), L, yd, d, b, h);
    }
  };
  ParallelFor(pool, d.b * d.h, row);
  return ffi::Error::Success();
}

// Rows per piece of the kernel gradient: each piece sums into its own partial.
constexpr int64_t kGradRows = 4;


// Kernel gradient of one piece for C a multiple of 8, one tap row (i) and one
// group of 8 channels at a time: the KW input vectors a pixel's taps need slide
// along the row in registers, so each pixel costs one load of x, one of g and
// KW multiply-adds. Strides as in ForwardRowVec8; tap t's sums go to out + t * os.
template <int KW>
void GradPieceVec8(const float* x, int64_t xs, const float* g, int64_t gs, const Dims& d,
                   int64_t b, int64_t h0, int64_t h1, float* out, int64_t os) {
  const int64_t W = d.w, C = d.c, pw = KW / 2;
  for (int64_t cc = 0; cc < C; cc += 8) {
    for (int64_t i = 0; i < d.kh; ++i) {
      Vec8 acc[KW] = {};
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t hh = h + i - d.kh / 2;
        if (hh < 0 || hh >= d.h) continue;
        const float* xr = x + (b * d.h + hh) * W * xs + cc;
        const float* gr = g + (b * d.h + h) * W * gs + cc;
        Vec8 win[KW];  // win[j] = x[w + j - pw]
        for (int j = 0; j < KW; ++j) {
          const int64_t ww = j - pw;
          win[j] = (ww >= 0 && ww < W) ? Load8(xr + ww * xs) : Vec8{};
        }
        for (int64_t w = 0; w < W; ++w) {
          const Vec8 gv = Load8(gr + w * gs);
          for (int j = 0; j < KW; ++j) acc[j] += win[j] * gv;
          for (int j = 0; j + 1 < KW; ++j) win[j] = win[j + 1];
          const int64_t next = w + 1 + pw;
          win[KW - 1] = next < W ? Load8(xr + next * xs) : Vec8{};
        }
      }
      for (int j = 0; j < KW; ++j) __builtin_memcpy(out + (i * KW + j) * os + cc, &acc[j], 32);
    }
  }
}

// Any C: vectors over the flat row index with the sums tiled to the period L
// (see ForwardRow), plain sums near the row ends.
void GradPieceTiled(const float* x, const float* g, const Dims& d, int64_t b, int64_t h0,
                    int64_t h1, float* out /* (KH*KW, C) */) {
  const int64_t W = d.w, C = d.c, taps = d.kh * d.kw, pw = d.kw / 2;
  const int64_t L = Period(C);
  std::vector<float> vacc(taps * L, 0.0f);
  std::fill(out, out + taps * C, 0.0f);
  int64_t lo, hi;
  Interior(d, &lo, &hi);
  for (int64_t h = h0; h < h1; ++h) {
    const float* gr = g + (b * d.h + h) * W * C;
    for (int64_t i = 0; i < d.kh; ++i) {
      const int64_t hh = h + i - d.kh / 2;
      if (hh < 0 || hh >= d.h) continue;
      const float* xr = x + (b * d.h + hh) * W * C;
      for (int64_t j = 0; j < d.kw; ++j) {
        const int64_t dj = j - pw;
        float* va = vacc.data() + (i * d.kw + j) * L;
        for (int64_t t = lo, ph = lo % L; t < hi; t += kV) {
          float* ap = va + ph;
          Store(ap, Load(ap) + Load(xr + t + dj * C) * Load(gr + t));
          ph += kV;
          if (ph == L) ph = 0;
        }
        float* sa = out + (i * d.kw + j) * C;
        auto scalar = [&](int64_t from, int64_t to) {
          for (int64_t e = from; e < to; ++e) {
            const int64_t ww = e / C + dj;
            if (ww >= 0 && ww < W) sa[e % C] += xr[ww * C + e % C] * gr[e];
          }
        };
        scalar(0, lo);
        scalar(hi, W * C);
      }
    }
  }
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t l = 0; l < L; ++l) out[t * C + l % C] += vacc[t * L + l];
}

// dk[b, i, j, c] = sum over (h, w) of x[b, h+i-ph, w+j-pw, c] * g[b, h, w, c].
ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                      int64_t kh, int64_t kw, ffi::ResultBuffer<ffi::F32> dk) {
  Dims d;
  if (auto err = CheckShapes(x, kh, kw, x.dimensions()[3], &d); err.failure()) return err;
  const int64_t taps = d.kh * d.kw, C = d.c;
  const int64_t blocks = (d.h + kGradRows - 1) / kGradRows;
  std::vector<float> partial(d.b * blocks * taps * C);
  const float* xd = x.typed_data();
  const float* gd = g.typed_data();
  auto piece = [&](int64_t p) {
    const int64_t b = p / blocks, blk = p % blocks;
    const int64_t h0 = blk * kGradRows, h1 = std::min(d.h, h0 + kGradRows);
    float* out = partial.data() + p * taps * C;
    if (C % 8 == 0 && d.kw == 3) {
      GradPieceVec8<3>(xd, C, gd, C, d, b, h0, h1, out, C);
    } else if (C % 8 == 0 && d.kw == 7) {
      GradPieceVec8<7>(xd, C, gd, C, d, b, h0, h1, out, C);
    } else {
      GradPieceTiled(xd, gd, d, b, h0, h1, out);
    }
  };
  ParallelFor(pool, d.b * blocks, piece);
  // Per image, add the pieces in row order: independent of the thread count.
  float* out = dk->typed_data();
  for (int64_t b = 0; b < d.b; ++b) {
    float* o = out + b * taps * C;
    const float* first = partial.data() + b * blocks * taps * C;
    std::copy(first, first + taps * C, o);
    for (int64_t blk = 1; blk < blocks; ++blk) {
      const float* src = first + blk * taps * C;
      for (int64_t t = 0; t < taps * C; ++t) o[t] += src[t];
    }
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// The attention's depthwise convs, whose output is N channel slices (q, k, v):
// the forward pass writes each slice to its own array, with the bias, and the
// backward pass takes the slices' gradients as N arrays. Under XLA the slices
// were copies of the packed output going in and a concatenation of their
// gradients coming back, two full passes each way. The gradient also fuses
// the input, kernel and bias gradients: each piece of rows reads its x and g
// rows once while they are in cache. Widths per slice a multiple of 8 and
// kernels 3 or 7 wide only (the caller checks).

struct Split {
  Dims d;          // c: channels per slice
  int64_t total;   // channels of x (N * c)
  int64_t n;       // slices
};

ffi::Error CheckSplit(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& k, size_t n,
                      Split* s) {
  auto xs = x.dimensions();
  auto ks = k.dimensions();
  if (xs.size() != 4 || ks.size() != 3 || n == 0 || xs[3] % n != 0) {
    return ffi::Error::InvalidArgument("depthwise split: expected NHWC x, (KH,KW,C) kernel and "
                                       "a number of slices dividing C");
  }
  *s = Split{Dims{xs[0], xs[1], xs[2], xs[3] / static_cast<int64_t>(n), ks[0], ks[1]}, xs[3],
             static_cast<int64_t>(n)};
  if (ks[2] != xs[3] || s->d.c % 8 != 0 || ks[0] % 2 == 0 || ks[0] > 64 ||
      (ks[1] != 3 && ks[1] != 7)) {
    return ffi::Error::InvalidArgument("depthwise split: kernel must be (odd, 3 or 7, C) and "
                                       "the slices a multiple of 8 channels wide");
  }
  return ffi::Error::Success();
}

template <int KW>
void SplitForwardRow(const float* x, const float* k, const float* bias, float* y, const Split& s,
                     int64_t slice, int64_t b, int64_t h) {
  const int64_t off = slice * s.d.c, C = s.d.c;
  ForwardRowVec8<KW>(x + off, s.total, k + off, s.total, y, C, s.d, b, h);
  if (!bias) return;
  float* yr = y + (b * s.d.h + h) * s.d.w * C;
  for (int64_t w = 0; w < s.d.w; ++w)
    for (int64_t cc = 0; cc < C; cc += 8)
      Store8(yr + w * C + cc, Load8(yr + w * C + cc) + Load8(bias + off + cc));
}

// y_n = depthwise(x, k)[..., n C:(n+1) C] (+ bias), for the N results y_n.
ffi::Error SplitForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> bias, bool with_bias, ffi::RemainingRets ys) {
  Split s;
  if (auto err = CheckSplit(x, k, ys.size(), &s); err.failure()) return err;
  std::vector<float*> out(s.n);
  for (int64_t n = 0; n < s.n; ++n) {
    auto r = ys.get<ffi::Buffer<ffi::F32>>(n);
    if (r.has_error()) return r.error();
    out[n] = (*r)->typed_data();
  }
  const float* xd = x.typed_data();
  const float* kd = k.typed_data();
  const float* bd = with_bias ? bias.typed_data() : nullptr;
  auto row = [&](int64_t r) {
    const int64_t n = r % s.n, bh = r / s.n, b = bh / s.d.h, h = bh % s.d.h;
    if (s.d.kw == 3) {
      SplitForwardRow<3>(xd, kd, bd, out[n], s, n, b, h);
    } else {
      SplitForwardRow<7>(xd, kd, bd, out[n], s, n, b, h);
    }
  };
  ParallelFor(pool, s.d.b * s.d.h * s.n, row);
  return ffi::Error::Success();
}

// For the slices' gradients g_n: dx (the convolution of the g_n with the
// flipped kernel, into x's layout), and per image the kernel gradient
// (B, KH*KW, C) and the bias gradient (B, C), summed over pieces of rows in a
// fixed order.
ffi::Error SplitGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                     ffi::RemainingArgs gs, ffi::ResultBuffer<ffi::F32> dx,
                     ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> db) {
  Split s;
  if (auto err = CheckSplit(x, k, gs.size(), &s); err.failure()) return err;
  std::vector<const float*> g(s.n);
  for (int64_t n = 0; n < s.n; ++n) {
    auto a = gs.get<ffi::Buffer<ffi::F32>>(n);
    if (a.has_error()) return a.error();
    g[n] = a->typed_data();
  }
  const Dims& d = s.d;
  const int64_t taps = d.kh * d.kw, T = s.total, C = d.c;
  const float* kd = k.typed_data();
  std::vector<float> flipped(taps * T);
  for (int64_t t = 0; t < taps; ++t)
    std::copy(kd + (taps - 1 - t) * T, kd + (taps - t) * T, flipped.data() + t * T);
  const int64_t blocks = (d.h + kGradRows - 1) / kGradRows;
  const int64_t stride = (taps + 1) * T;  // a piece's kernel sums, then its bias sums
  std::vector<float> partial(d.b * blocks * stride);
  const float* xd = x.typed_data();
  float* dxd = dx->typed_data();
  auto piece = [&](int64_t p) {
    const int64_t b = p / blocks, blk = p % blocks;
    const int64_t h0 = blk * kGradRows, h1 = std::min(d.h, h0 + kGradRows);
    float* out = partial.data() + p * stride;
    for (int64_t n = 0; n < s.n; ++n) {
      const int64_t off = n * C;
      if (d.kw == 3) {
        GradPieceVec8<3>(xd + off, T, g[n], C, d, b, h0, h1, out + off, T);
      } else {
        GradPieceVec8<7>(xd + off, T, g[n], C, d, b, h0, h1, out + off, T);
      }
      for (int64_t cc = 0; cc < C; cc += 8) {
        Vec8 acc = {};
        for (int64_t h = h0; h < h1; ++h) {
          const float* gr = g[n] + (b * d.h + h) * d.w * C + cc;
          for (int64_t w = 0; w < d.w; ++w) acc += Load8(gr + w * C);
        }
        Store8(out + taps * T + off + cc, acc);
      }
      for (int64_t h = h0; h < h1; ++h) {
        if (d.kw == 3) {
          ForwardRowVec8<3>(g[n], C, flipped.data() + off, T, dxd + off, T, d, b, h);
        } else {
          ForwardRowVec8<7>(g[n], C, flipped.data() + off, T, dxd + off, T, d, b, h);
        }
      }
    }
  };
  ParallelFor(pool, d.b * blocks, piece);
  float* dkd = dk->typed_data();
  float* dbd = db->typed_data();
  for (int64_t b = 0; b < d.b; ++b) {
    std::vector<float> sum(partial.begin() + b * blocks * stride,
                           partial.begin() + (b * blocks + 1) * stride);
    for (int64_t blk = 1; blk < blocks; ++blk) {
      const float* src = partial.data() + (b * blocks + blk) * stride;
      for (int64_t t = 0; t < stride; ++t) sum[t] += src[t];
    }
    std::copy(sum.begin(), sum.begin() + taps * T, dkd + b * taps * T);
    std::copy(sum.begin() + taps * T, sum.end(), dbd + b * T);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoceirDepthwiseForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoceirDepthwiseKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoceirDepthwiseSplitForward, SplitForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("with_bias")
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoceirDepthwiseSplitGrad, SplitGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
