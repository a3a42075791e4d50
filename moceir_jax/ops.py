"""Numerical kernels of MoCE-IR as pure functions on NHWC arrays.

Everything here reproduces a PyTorch/NCHW operation of the reference bit-for-bit in
meaning (channel orders, padding sides, epsilons), while choosing a formulation that
XLA compiles well. Where the fastest formulation depends on the backend (depthwise
convolution: native CPU kernels, shifted multiply-adds, or XLA's grouped convolution),
all are kept and selected by ``default_depthwise_impl``; the tests hold them equal.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moceir_jax import native

LAYERNORM_EPS = 1e-5  # torch reference: sqrt(var_biased + 1e-5)
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize default


# Activation memory: under autodiff of GELU, LayerNorm and the channel attention
# XLA:CPU kept several full-size arrays per call for the backward pass (GELU's
# erfc and exp terms; the norm's statistics and weight broadcast to full size;
# the packed qkv array and q, k, v as copies). The hand-written gradients here
# keep only the inputs and recompute the cheap rest in the backward pass: a
# MoCE-IR-S train step's buffers at 4x128x128 went from 6.4 to 4.06 GB, and to
# 2.90 GB once the gate and the attention took the depthwise convs' operands
# (DepthwiseInput, below). Same functions; the tests hold the gradients equal
# to autodiff's.


def after_gradient(g, tree):
  """``tree``'s float arrays made to depend on the cotangent ``g``, values unchanged.

  XLA:CPU removes optimisation barriers, and its common-subexpression pass
  spots that a backward pass recomputes what the forward pass already has: it
  keeps the forward's values alive instead, and the saving is undone. Adding
  ``0 * g[0]`` (XLA does not fold a float multiply by zero) gives the
  recomputation inputs that exist only once the backward pass reaches it.
  Used by the hand-written gradients below and by ``repeat.late_checkpoint``.
  """
  floats = [x for x in jax.tree.leaves(g) if jnp.issubdtype(x.dtype, jnp.floating)]
  if not floats:
    return tree
  zero = 0 * floats[0].ravel()[0]

  def tie(x):
    return x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(tie, tree)


def _gelu(x):
  # The reference uses torch's exact (erf) GELU; jax.nn.gelu defaults to tanh.
  return jax.nn.gelu(x, approximate=False)


def _gelu_grad(x):
  # d/dx x*Phi(x) = Phi(x) + x*phi(x)
  cdf = 0.5 * jax.lax.erfc(-x * np.sqrt(0.5).astype(x.dtype))
  pdf = jnp.exp(-0.5 * x * x) * np.sqrt(0.5 / np.pi).astype(x.dtype)
  return cdf + x * pdf


@jax.custom_vjp
def gelu(x):
  return _gelu(x)


gelu.defvjp(lambda x: (_gelu(x), x), lambda x, g: (g * _gelu_grad(after_gradient(g, x)),))


def gated_gelu(h, impl: str | None = None):
  """GELU(first half of the channels) * second half: the GDFN's gate.

  ``h`` is an array, or a :class:`DepthwiseInput` to convolve first (with
  ``impl``), as the GDFN does: then the backward pass keeps the convolution's
  input instead of its output and convolves again (see _operand_gradient_op).
  """
  gate = _native_gate(h, impl)
  if gate is not None:
    return gate.apply()
  return _operand_gradient_op("gate", 0, (impl,), (h,), ())


def _native_gate(h, impl):
  """``h`` as a GateInput if the native gate kernels take it, else None."""
  if isinstance(h, DepthwiseInput) and (impl or default_depthwise_impl()) == "native":
    x, kernel, bias = h
    kernel = kernel.astype(x.dtype)
    if native.supports_gate(x, kernel):
      return GateInput(x, kernel, None if bias is None else bias.astype(x.dtype))
  return None


# On CPU the gate's gradient, conv included, is one native kernel
# (moceir_jax/native/gate.cc): it recomputes the conv, the GELU derivative and
# the conv's three gradients row by row in cache, where XLA:CPU made six passes
# over arrays of the FFN's full width. The forward pass is the XLA formulation
# (native conv, XLA's GELU), so forward results stay those the parity tests hold.
@jax.custom_vjp
def _gate_native(x, kernel, bias):
  return _gated_gelu(depthwise_conv(x, kernel, bias, impl="native"))


def _gate_native_fwd(x, kernel, bias):
  return _gate_native(x, kernel, bias), (x, kernel, bias)


def _gate_native_bwd(res, g):
  x, kernel, bias = res  # bias: None (an empty pytree) for the model's bias-free convs
  dx, dk, db, _ = native.gate_grad(x, g, kernel,
                                   jnp.zeros(x.shape[-1:], x.dtype) if bias is None else bias)
  # per image, added over the batch here
  return (dx, jnp.sum(dk, axis=0).reshape(kernel.shape),
          None if bias is None else jnp.sum(db, axis=0))


_gate_native.defvjp(_gate_native_fwd, _gate_native_bwd)


def _gated_gelu(h):
  h1, h2 = jnp.split(h, 2, axis=-1)
  return _gelu(h1) * h2


def _gated_gelu_bwd(h, g):
  h1, h2 = jnp.split(h, 2, axis=-1)
  return jnp.concatenate([g * h2 * _gelu_grad(h1), g * _gelu(h1)], axis=-1)


def acc_dtype(dtype):
  """Accumulation dtype: float32 for half types, else the dtype itself (float64 stays)."""
  return jnp.promote_types(dtype, jnp.float32)


def _ln_stats(x, eps):
  mu = jnp.mean(x, axis=-1, keepdims=True)
  xc = x - mu
  inv = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
  return mu, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_bias(x, weight, bias, eps):
  mu, inv = _ln_stats(x, eps)
  return (x - mu) * inv * weight + bias


# The backward passes keep only x and recompute the per-pixel statistics from
# it: kept, XLA:CPU stored them broadcast to the full (B, H, W, C) shape (two
# more full-size arrays per norm), and a reduction over C is cheap.


def _layer_norm_bias_fwd(x, weight, bias, eps):
  return _layer_norm_bias(x, weight, bias, eps), (x, weight)


def _layer_norm_bias_bwd(eps, res, g):
  x, weight = after_gradient(g, res)
  mu, inv = _ln_stats(x, eps)
  xhat = (x - mu) * inv
  gw = g * weight
  dx = inv * (gw - jnp.mean(gw, axis=-1, keepdims=True)
              - xhat * jnp.mean(gw * xhat, axis=-1, keepdims=True))
  axes = tuple(range(g.ndim - 1))
  return dx, jnp.sum(g * xhat, axis=axes), jnp.sum(g, axis=axes)


_layer_norm_bias.defvjp(_layer_norm_bias_fwd, _layer_norm_bias_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _layer_norm_bias_free(x, weight, eps):
  return x * _ln_stats(x, eps)[1] * weight


def _layer_norm_bias_free_fwd(x, weight, eps):
  return _layer_norm_bias_free(x, weight, eps), (x, weight)


def _layer_norm_bias_free_bwd(eps, res, g):
  # y = x*inv*w with inv = (var(x)+eps)^-1/2: dx = inv*(g*w - xhat*mean(g*w*x*inv)),
  # xhat the centred, normalised input (the mean leaves var, not the output).
  x, weight = after_gradient(g, res)
  mu, inv = _ln_stats(x, eps)
  gw = g * weight
  dx = inv * (gw - (x - mu) * inv * jnp.mean(gw * x * inv, axis=-1, keepdims=True))
  return dx, jnp.sum(g * x * inv, axis=tuple(range(g.ndim - 1)))


_layer_norm_bias_free.defvjp(_layer_norm_bias_free_fwd, _layer_norm_bias_free_bwd)


# On CPU, a native kernel (moceir_jax/native/layernorm.cc) reads a pixel's
# channels once for all the sums of the forward and backward passes, where
# XLA:CPU made ~9 passes over the tensor per gradient.
LAYERNORM_IMPLS = ("native", "xla")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm_native(x, weight, bias, eps, bias_free):
  return native.layer_norm_forward(x, weight, bias, eps, bias_free)


def _layer_norm_native_fwd(x, weight, bias, eps, bias_free):
  return _layer_norm_native(x, weight, bias, eps, bias_free), (x, weight)


def _layer_norm_native_bwd(eps, bias_free, res, g):
  x, weight = res
  dx, dw, db = native.layer_norm_grad(x, g, weight, eps, bias_free)
  return dx, jnp.sum(dw, axis=0), jnp.sum(db, axis=0)  # per image, added over the batch here


_layer_norm_native.defvjp(_layer_norm_native_fwd, _layer_norm_native_bwd)


def layer_norm(x, weight, bias=None, eps=LAYERNORM_EPS, impl: str | None = None):
  """LayerNorm over the channel (last) axis, computed in at least float32.

  ``bias=None`` is the reference's "BiasFree" variant, which divides by the
  standard deviation but does not subtract the mean from the output. ``impl``:
  "native" (CPU kernel; float32 NHWC, else falls back) or "xla"; by default
  native where available. The tests hold the two equal.
  """
  if impl not in (None,) + LAYERNORM_IMPLS:
    raise ValueError(f"unknown layer_norm impl {impl!r}; expected one of {LAYERNORM_IMPLS}")
  dtype = x.dtype
  acc = acc_dtype(dtype)
  x, weight = x.astype(acc), weight.astype(acc)
  if impl != "xla" and native.supports_layer_norm(x):
    b = jnp.zeros_like(weight) if bias is None else bias.astype(acc)
    return _layer_norm_native(x, weight, b, float(eps), bias is None).astype(dtype)
  if bias is None:
    y = _layer_norm_bias_free(x, weight, eps)
  else:
    y = _layer_norm_bias(x, weight, bias.astype(acc), eps)
  return y.astype(dtype)


# ----------------------------------------------------------------------------
# Depthwise convolution (groups == channels, stride 1, "same" zero padding).
# XLA:CPU's grouped convolution is ~27x slower than the same op written as
# shifted multiply-adds (../shared/docs/xla-cpu-notes.md), and native kernels
# (moceir_jax/native.py) are faster still, above all for the kernel gradient;
# on GPU/TPU the library kernels are the right choice. All give the torch result.
DEPTHWISE_IMPLS = ("native", "shift", "xla")


def default_depthwise_impl() -> str:
  if jax.default_backend() != "cpu":
    return "xla"
  return "native" if native.available() else "shift"


def _shift_sum(xp, kernel, h, w):
  kh, kw, _ = kernel.shape
  out = None
  for i in range(kh):
    for j in range(kw):
      term = xp[:, i:i + h, j:j + w, :] * kernel[i, j]
      out = term if out is None else out + term
  return out


def _pad_same(x, kh, kw):
  return jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))


@jax.custom_vjp
def _depthwise_shift(x, kernel):
  kh, kw, _ = kernel.shape
  return _shift_sum(_pad_same(x, kh, kw), kernel, x.shape[1], x.shape[2])


def _depthwise_shift_fwd(x, kernel):
  return _depthwise_shift(x, kernel), (x, kernel)


def _depthwise_shift_bwd(res, g):
  # Written out by hand because autodiff of the shifted slices produces a chain
  # of pads and dynamic-update-slices that XLA:CPU fuses poorly: the input
  # gradient is the same depthwise op with the flipped kernel, and the kernel
  # gradient is one reduction per tap.
  x, kernel = res
  kh, kw, _ = kernel.shape
  h, w = x.shape[1], x.shape[2]
  dx = _shift_sum(_pad_same(g, kh, kw), kernel[::-1, ::-1], h, w)
  xp = _pad_same(x, kh, kw)
  if kh * kw >= _FFT_KERNEL_GRAD_MIN_TAPS:
    dk = _kernel_grad_fft(xp, g, kh, kw)
  else:
    dk = _kernel_grad_blocked(xp, g, kh, kw)
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


# 7x7 kernels take their gradient as one FFT cross-correlation: as fast as the
# blocked sums below, and 49 taps of those made compile times 1.5-2x longer. Its
# rounding is relative to the largest tap, which is harmless here but not for
# 3x3 kernels, whose small taps Adam's normalised updates amplify (1-device and
# 4-device runs drifted 8e-5 apart in 6 steps with FFT 3x3 gradients).
_FFT_KERNEL_GRAD_MIN_TAPS = 25


def _kernel_grad_fft(xp, g, kh, kw):
  """sum_{b,h,w} xp[b, h+i, w+j, c] * g[b, h, w, c] for all taps (i, j), via FFT."""
  hp, wp = xp.shape[1], xp.shape[2]
  acc = acc_dtype(g.dtype)
  xt = jnp.transpose(xp.astype(acc), (0, 3, 1, 2))  # FFT over the two minor axes
  gt = jnp.transpose(g.astype(acc), (0, 3, 1, 2))
  spec = jnp.sum(jnp.fft.rfft2(xt) * jnp.conj(jnp.fft.rfft2(gt, s=(hp, wp))), axis=0)
  corr = jnp.fft.irfft2(spec, s=(hp, wp))  # (C, hp, wp); offsets < k never wrap
  return jnp.transpose(corr[:, :kh, :kw], (1, 2, 0)).reshape(kh * kw, -1)


# Budget of one block of the kernel-gradient loop: small enough that a block of
# input and output gradient stays in L2 while all taps read it.
_KERNEL_GRAD_BLOCK_BYTES = 1 << 19


def _kernel_grad_blocked(xp, g, kh, kw):
  """sum_{b,h,w} xp[b, h+i, w+j, c] * g[b, h, w, c] for every tap (i, j).

  Written as one reduction per tap over the whole tensor, XLA:CPU streams the
  tensors from memory once per tap (and materialises each shifted window
  first), which made these sums the largest cost of a training step. Looping
  over blocks of rows keeps a block in cache while all taps read it: 2-3x
  faster, and each tap's sum keeps its own relative precision. Sums are kept
  per image and added over the batch last, so a batch split over devices adds
  the same per-image partials as one device does.
  """
  b, h, w, c = g.shape
  acc = acc_dtype(g.dtype)
  row_bytes = b * (w + kw - 1) * c * jnp.dtype(acc).itemsize
  rows = max([r for r in range(1, h + 1) if h % r == 0 and r * row_bytes <= _KERNEL_GRAD_BLOCK_BYTES]
             or [1])

  def body(total, block):
    row = block * rows
    xb = jax.lax.dynamic_slice_in_dim(xp, row, rows + kh - 1, axis=1).astype(acc)
    gb = jax.lax.dynamic_slice_in_dim(g, row, rows, axis=1).astype(acc)
    taps = [jnp.sum(xb[:, i:i + rows, j:j + w] * gb, axis=(1, 2))
            for i in range(kh) for j in range(kw)]
    return total + jnp.stack(taps, axis=1), None

  total, _ = jax.lax.scan(body, jnp.zeros((b, kh * kw, c), acc), jnp.arange(h // rows))
  return jnp.sum(total, axis=0)


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


@jax.custom_vjp
def _depthwise_native(x, kernel):
  return native.depthwise_forward(x, kernel)


def _depthwise_native_fwd(x, kernel):
  return native.depthwise_forward(x, kernel), (x, kernel)


def _depthwise_native_bwd(res, g):
  # The input gradient is the same convolution with the flipped kernel; the
  # kernel gradient comes per image and is added over the batch here, as in
  # _kernel_grad_blocked.
  x, kernel = res
  kh, kw, _ = kernel.shape
  dx = native.depthwise_forward(g, kernel[::-1, ::-1])
  dk = jnp.sum(native.depthwise_kernel_grad(x, g, kh, kw), axis=0)
  return dx, dk.reshape(kernel.shape)


_depthwise_native.defvjp(_depthwise_native_fwd, _depthwise_native_bwd)


def depthwise_conv(x, kernel, bias=None, impl: str | None = None):
  """Depthwise 'same' convolution of NHWC ``x`` with a ``(kh, kw, C)`` kernel.

  Cross-correlation, as torch's Conv2d(groups=C, padding=k//2) computes it.
  """
  impl = impl or default_depthwise_impl()
  kh, kw, c = kernel.shape
  if kh % 2 == 0 or kw % 2 == 0:
    raise ValueError(f"depthwise_conv needs odd kernel sizes, got {kh}x{kw}")
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"unknown depthwise impl {impl!r}; expected one of {DEPTHWISE_IMPLS}")
  kernel = kernel.astype(x.dtype)
  if impl == "native" and not native.supports(x, kernel):
    impl = "shift"  # float32 only; other dtypes (and machines without a compiler) use XLA
  if impl == "native":
    y = _depthwise_native(x, kernel)
  elif impl == "shift":
    y = _depthwise_shift(x, kernel)
  elif impl == "xla":
    y = jax.lax.conv_general_dilated(
        x, kernel.reshape(kh, kw, 1, c), window_strides=(1, 1),
        padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


def conv2d(x, kernel, bias=None):
  """Dense 'same' convolution, NHWC input, HWIO kernel, stride 1."""
  kh, kw = kernel.shape[:2]
  y = jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(1, 1),
      padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


def _channel_matmul(x, kernel):
  return jnp.dot(x, kernel, precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def _channel_matmul_cpu(x, kernel):
  return _channel_matmul(x, kernel)


def _channel_matmul_cpu_fwd(x, kernel):
  return _channel_matmul(x, kernel), (x, kernel)


def _channel_matmul_cpu_bwd(res, g):
  # Autodiff's version lets XLA:CPU fuse the producer of ``g`` (typically a
  # depthwise conv's input gradient) into both consumers, once in the
  # transposed layout the weight-gradient dot asks for: the expensive producer
  # then runs twice, once with strided writes. Materialising ``g`` first costs
  # one copy and made the feed-forward block's backward pass up to 1.9x faster.
  x, kernel = res
  g = jax.lax.optimization_barrier(g)
  dx = jnp.dot(g, kernel.T, precision=jax.lax.Precision.HIGHEST)
  cin, cout = kernel.shape
  dk = jnp.dot(x.reshape(-1, cin).T, g.reshape(-1, cout), precision=jax.lax.Precision.HIGHEST)
  return dx, dk


_channel_matmul_cpu.defvjp(_channel_matmul_cpu_fwd, _channel_matmul_cpu_bwd)


def default_pointwise_impl() -> str:
  return "cpu" if jax.default_backend() == "cpu" else "xla"


class NormInput(NamedTuple):
  """A LayerNorm unapplied, for the 1x1 convs that normalise their input themselves.

  Every LayerNorm of the model feeds 1x1 convs only. Their weight gradient
  needs the normalised input: kept, it is one more array of the block's width
  per norm (2 of the ~14 widths a transformer block keeps for the backward
  pass), while the norm's input is kept anyway for the norm's own gradient.
  So on CPU the conv keeps the norm's input and normalises again in the
  backward pass (a native LayerNorm costs ~1% of a training step).
  """
  x: jax.Array
  weight: jax.Array
  bias: jax.Array | None = None

  def apply(self):
    return layer_norm(self.x, self.weight, self.bias)


@jax.custom_vjp
def _norm_matmul_cpu(norm, kernel):
  return _channel_matmul(norm.apply(), kernel)


def _norm_matmul_cpu_fwd(norm, kernel):
  return _norm_matmul_cpu(norm, kernel), (norm, kernel)


def _norm_matmul_cpu_bwd(res, g):
  norm, kernel = res  # normalise again only now (see after_gradient):
  if native.supports_layer_norm(norm.x):  # one custom call: tying its weight suffices
    norm = norm._replace(weight=after_gradient(g, norm.weight))
  else:
    norm = after_gradient(g, norm)
  h, norm_vjp = jax.vjp(NormInput.apply, norm)
  g = jax.lax.optimization_barrier(g)  # as in _channel_matmul_cpu_bwd
  dh = jnp.dot(g, kernel.T, precision=jax.lax.Precision.HIGHEST)
  cin, cout = kernel.shape
  dk = jnp.dot(h.reshape(-1, cin).T, g.reshape(-1, cout), precision=jax.lax.Precision.HIGHEST)
  return norm_vjp(dh)[0], dk


_norm_matmul_cpu.defvjp(_norm_matmul_cpu_fwd, _norm_matmul_cpu_bwd)


class GateInput(NamedTuple):
  """The GDFN's gate unapplied (native CPU kernels), for the 1x1 conv after it.

  That conv's weight gradient needs the gate's output, half the width of the
  gate's input, which the gate's own gradient keeps anyway: kept as well, it
  is one more array of 2.66x the block's width per feed-forward layer. So the
  conv keeps the gate's input only, and in its backward pass the gate's native
  gradient kernel, which recomputes the conv anyway, writes the gate's output
  again (MoCE-IR-S step buffers: 0.28 GB less). Made by :func:`gate_operands`.
  """
  x: jax.Array
  kernel: jax.Array
  bias: jax.Array | None = None

  def apply(self):
    return _gate_native(self.x, self.kernel, self.bias)


def gate_operands(h: DepthwiseInput, impl: str | None = None, pointwise_impl: str | None = None):
  """gated_gelu(h, impl), or a :class:`GateInput` for ``pointwise`` to apply when both
  the native gate and the CPU pointwise gradient are in use."""
  gate = _native_gate(h, impl)
  if gate is not None and (pointwise_impl or default_pointwise_impl()) == "cpu":
    return gate
  return gated_gelu(h, impl)


@jax.custom_vjp
def _gate_matmul_cpu(gate, kernel):
  # The barrier keeps the gate a pass of its own: fused into the matmul's operand,
  # XLA:CPU computed the GELU in the matmul's inner loops, over and over.
  return _channel_matmul(jax.lax.optimization_barrier(gate.apply()), kernel)


def _gate_matmul_cpu_fwd(gate, kernel):
  return _gate_matmul_cpu(gate, kernel), (gate, kernel)


def _gate_matmul_cpu_bwd(res, g):
  # The gate's gradient kernel gives the gate's output too, computed again from
  # the conv it recomputes anyway: the weight gradient's operand costs one write.
  (x, dw_kernel, bias), kernel = res
  g = jax.lax.optimization_barrier(g)  # as in _channel_matmul_cpu_bwd
  dh = jnp.dot(g, kernel.T, precision=jax.lax.Precision.HIGHEST)
  dx, ddw, db, h = native.gate_grad(x, dh, dw_kernel,
                                    jnp.zeros(x.shape[-1:], x.dtype) if bias is None else bias)
  cin, cout = kernel.shape
  dk = jnp.dot(h.reshape(-1, cin).T, g.reshape(-1, cout), precision=jax.lax.Precision.HIGHEST)
  return (GateInput(dx, jnp.sum(ddw, axis=0).reshape(dw_kernel.shape),
                    None if bias is None else jnp.sum(db, axis=0)), dk)


_gate_matmul_cpu.defvjp(_gate_matmul_cpu_fwd, _gate_matmul_cpu_bwd)


def pointwise(x, kernel, bias=None, impl: str | None = None):
  """1x1 convolution as a matmul over channels; kernel is (in, out).

  ``x`` is an array, a :class:`NormInput` (normalised first) or a
  :class:`GateInput` (gated first). ``impl`` "cpu"
  uses hand-written gradients tuned for XLA:CPU, "xla" plain autodiff; both
  compute the same numbers (tests hold them equal).
  """
  impl = impl or default_pointwise_impl()
  if impl not in ("cpu", "xla"):
    raise ValueError(f"unknown pointwise impl {impl!r}; expected 'cpu' or 'xla'")
  if isinstance(x, NormInput) and impl == "cpu":
    y = _norm_matmul_cpu(x, kernel.astype(x.x.dtype))
  elif isinstance(x, GateInput) and impl == "cpu":
    y = _gate_matmul_cpu(x, kernel.astype(x.x.dtype))
  else:
    x = x.apply() if isinstance(x, (NormInput, GateInput)) else x
    matmul = _channel_matmul_cpu if impl == "cpu" else _channel_matmul
    y = matmul(x, kernel.astype(x.dtype))
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


# ----------------------------------------------------------------------------
# Pixel (un)shuffle with torch's channel order: channel index = c*r*r + i*r + j.


def pixel_unshuffle(x, r: int = 2):
  b, h, w, c = x.shape
  if h % r or w % r:
    raise ValueError(f"pixel_unshuffle needs H and W divisible by {r}, got {h}x{w}")
  x = x.reshape(b, h // r, r, w // r, r, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)  # b, h', w', c, i, j
  return x.reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x, r: int = 2):
  b, h, w, c = x.shape
  co = c // (r * r)
  x = x.reshape(b, h, w, co, r, r)
  x = x.transpose(0, 1, 4, 2, 5, 3)  # b, h, i, w, j, c
  return x.reshape(b, h * r, w * r, co)


# ----------------------------------------------------------------------------
# Attention kernels.


def _l2_normalize_pixels(x):
  # F.normalize(dim=-1) over the flattened H*W axis: x / max(||x||, eps).
  xf = x.astype(acc_dtype(x.dtype))
  norm = jnp.sqrt(jnp.sum(xf * xf, axis=1, keepdims=True))
  return (x / jnp.maximum(norm, NORMALIZE_EPS).astype(x.dtype))


# Up to this many heads the attention runs as one Gram matrix over all channels
# with the off-head blocks masked (see channel_attention); beyond it, per head.
_GRAM_MAX_HEADS = 4


def channel_attention(q, k, v, temperature, num_heads: int, form: str | None = None):
  """Restormer's transposed (channel) attention, per head, on NHWC q/k/v.

  The reference reshapes to ``b head c (h w)``, L2-normalises q and k over
  pixels and attends over channels. Two formulations of the same function:

  * ``"gram"``: one Gram matrix q^T k over all channels, divided by the norms
    afterwards (normalize(q)^T normalize(k) = diag(1/|q|) q^T k diag(1/|k|)),
    with the entries between different heads masked out of the softmax, and
    the output as v times the block-diagonal attention. Every product is a
    plain matmul on the NHWC layout: no normalised copies of q and k and no
    transposes, which on XLA:CPU made the attention 1.5-2.5x faster. It does
    heads-times the matmul work of the per-head form, so it is chosen for up
    to ``_GRAM_MAX_HEADS`` heads.
  * ``"heads"``: per-head einsums on normalised q and k (XLA transposes the
    heads to the front).
  """
  b, h, w, c = q.shape
  d = c // num_heads
  form = form or ("gram" if num_heads <= _GRAM_MAX_HEADS else "heads")
  acc = acc_dtype(q.dtype)
  hi = jax.lax.Precision.HIGHEST
  if form == "gram":
    return _gram_forward(q, k, v, temperature, num_heads)[0]
  if form != "heads":
    raise ValueError(f"unknown channel attention form {form!r}; expected 'gram' or 'heads'")
  q = _l2_normalize_pixels(q.reshape(b, h * w, num_heads, d))
  k = _l2_normalize_pixels(k.reshape(b, h * w, num_heads, d))
  v = v.reshape(b, h * w, num_heads, d)
  attn = jnp.einsum("bpnc,bpnd->bncd", q, k, precision=hi)
  attn = attn.astype(acc) * temperature.reshape(1, num_heads, 1, 1)
  attn = jax.nn.softmax(attn, axis=-1).astype(v.dtype)
  out = jnp.einsum("bncd,bpnd->bpnc", attn, v, precision=hi)
  return out.reshape(b, h, w, c)


def _gram_forward(q, k, v, temperature, num_heads):
  """The "gram" form of channel_attention, plus the small arrays its gradient needs."""
  b, h, w, c = q.shape
  d = c // num_heads
  acc = acc_dtype(q.dtype)
  hi = jax.lax.Precision.HIGHEST
  qf, kf, vf = (t.reshape(b, h * w, c) for t in (q, k, v))
  gram = jnp.einsum("bpc,bpd->bcd", qf, kf, precision=hi).astype(acc)
  norm = lambda t: jnp.sqrt(jnp.sum(t.astype(acc) * t.astype(acc), axis=1))
  nq, nk = norm(qf), norm(kf)
  cosine = gram / (jnp.maximum(nq, NORMALIZE_EPS)[:, :, None]
                   * jnp.maximum(nk, NORMALIZE_EPS)[:, None, :])
  logits = cosine * jnp.repeat(temperature.astype(acc), d)[:, None]
  if num_heads > 1:
    head = np.arange(c) // d
    logits = jnp.where(jnp.asarray(head[:, None] == head[None, :]), logits, -jnp.inf)
  attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bpd,bcd->bpc", vf, attn, precision=hi).reshape(b, h, w, c)
  return out, (attn, cosine, nq, nk)


def _gram_backward(q, k, v, temperature, num_heads, small, g):
  attn, cosine, nq, nk = small
  b, h, w, c = q.shape
  d = c // num_heads
  acc = acc_dtype(q.dtype)
  hi = jax.lax.Precision.HIGHEST
  qf, kf, vf, gf = (t.reshape(b, h * w, c) for t in (q, k, v, g))
  dv = jnp.einsum("bpc,bcd->bpd", gf, attn, precision=hi)
  d_attn = jnp.einsum("bpc,bpd->bcd", gf, vf, precision=hi).astype(acc)
  a = attn.astype(acc)
  d_logits = a * (d_attn - jnp.sum(d_attn * a, axis=-1, keepdims=True))  # masked: a = 0
  d_temp = jnp.sum(d_logits * cosine, axis=(0, 2)).reshape(num_heads, d).sum(-1)
  d_cos = d_logits * jnp.repeat(temperature.astype(acc), d)[:, None]
  nq_c, nk_c = jnp.maximum(nq, NORMALIZE_EPS), jnp.maximum(nk, NORMALIZE_EPS)
  d_gram = d_cos / (nq_c[:, :, None] * nk_c[:, None, :])
  # cosine = gram / (nq nk): its norms' share, d|t|/dt = t/|t| where |t| > eps.
  dcs = d_cos * cosine
  scale = lambda dn, n: jnp.where(n > NORMALIZE_EPS, -dn / (jnp.maximum(n, NORMALIZE_EPS) ** 2),
                                  0)
  sq, sk = scale(jnp.sum(dcs, axis=2), nq), scale(jnp.sum(dcs, axis=1), nk)
  dq = (jnp.einsum("bpd,bcd->bpc", kf, d_gram.astype(q.dtype), precision=hi)
        + qf * sq[:, None, :].astype(q.dtype))
  dk = (jnp.einsum("bpc,bcd->bpd", qf, d_gram.astype(q.dtype), precision=hi)
        + kf * sk[:, None, :].astype(q.dtype))
  shape = (b, h, w, c)
  return (dq.reshape(shape), dk.reshape(shape), dv.reshape(shape),
          d_temp.astype(temperature.dtype))


# The layers' depthwise convs feed two ops only: the GDFN's gate and the
# channel attention. Under autodiff XLA:CPU kept, per attention layer, both the
# packed qkv array (to recompute slices of it in fused gradient kernels) and q,
# k and v as copies, and per layer the depthwise outputs, which hold 7 of the
# ~20 channel-widths a block keeps. The gradient below keeps only the convs'
# inputs (needed anyway for the kernel gradient), the attention's C x C arrays
# and the temperature, and convolves again in the backward pass: one depthwise
# forward per layer more, for about a third less activation memory. On CPU
# the attention's convs write q, k and v as separate arrays and take their
# gradients the same way (native/depthwise.cc): XLA's slices and concatenation
# of them were four extra passes per layer (~0.16 s of a MoCE-IR-S step, profiled).


class DepthwiseInput(NamedTuple):
  """The operands of a depthwise conv that an op below applies itself."""
  x: jax.Array
  kernel: jax.Array
  bias: jax.Array | None = None


def _value(item, impl):
  """An operand's value: a DepthwiseInput convolved, an array as itself."""
  return depthwise_conv(*item, impl=impl) if isinstance(item, DepthwiseInput) else item


# The channel slices each kind of op takes from each operand: the gate its one
# array, the self-attention q, k and v from one packed array, the cross
# attention q from one and k, v from the other.
_SLICES = {"gate": (1,), "self": (3,), "cross": (1, 2)}


def _native_split(item, impl, n):
  """Whether ``item`` is a DepthwiseInput whose n output slices a native kernel makes
  as separate arrays (and takes their gradients separately): see native/depthwise.cc."""
  return (isinstance(item, DepthwiseInput) and (impl or default_depthwise_impl()) == "native"
          and native.supports_split(item.x, item.kernel.astype(item.x.dtype), n))


def _split_conv(item, n):
  x, kernel, bias = item
  return native.depthwise_split_forward(x, kernel.astype(x.dtype),
                                        None if bias is None else bias.astype(x.dtype), n)


def _values(item, impl, n):
  """An operand's value as its n channel slices."""
  if _native_split(item, impl, n):
    return list(_split_conv(item, n))
  return jnp.split(_value(item, impl), n, axis=-1) if n > 1 else [_value(item, impl)]


def _produce(item, impl, n, g):
  """(the n slices, vjp from their n cotangents) of an operand in the backward pass,
  recomputed after the cotangent ``g`` (after_gradient)."""
  if _native_split(item, impl, n):
    # One custom call: tying its small kernel suffices to keep it apart from the forward's
    # (tying x cost a pass over the conv's input per layer).
    item = item._replace(kernel=after_gradient(g, item.kernel))
    def native_vjp(ds):
      dx, dk, db = native.depthwise_split_grad(item.x, item.kernel.astype(item.x.dtype), ds)
      # per image, added over the batch here
      return DepthwiseInput(dx, jnp.sum(dk, axis=0).reshape(item.kernel.shape).astype(
          item.kernel.dtype), None if item.bias is None else jnp.sum(db, 0).astype(item.bias.dtype))
    return _split_conv(item, n), native_vjp
  item = after_gradient(g, item)
  if not isinstance(item, DepthwiseInput):
    return _values(item, impl, n), lambda ds: jnp.concatenate(ds, axis=-1) if n > 1 else ds[0]
  hs, vjp = jax.vjp(lambda o: _values(o, impl, n), item)  # a None bias is an empty subtree
  return hs, lambda ds: vjp(list(ds))[0]


def _consume(kind, heads, hs, rest):
  """(output, the small arrays the gradient keeps) of the gate or the gram attention."""
  if kind == "gate":
    return _gated_gelu(hs[0]), ()
  return _gram_forward(*hs, rest[0], heads)


def _consume_bwd(kind, heads, hs, rest, small, g):
  if kind == "gate":
    return [_gated_gelu_bwd(hs[0], g)], ()
  dq, dk, dv, dt = _gram_backward(*hs, rest[0], heads, small, g)
  return [dq, dk, dv], (dt,)


def _all_values(kind, impls, operands):
  return [h for o, i, n in zip(operands, impls, _SLICES[kind]) for h in _values(o, i, n)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _operand_gradient_op(kind, heads, impls, operands, rest):
  """The gate ("gate") or the gram attention ("self": packed qkv; "cross": q, packed
  kv) of ``operands`` (arrays or DepthwiseInputs), ``rest`` = (temperature,) or ()."""
  return _consume(kind, heads, _all_values(kind, impls, operands), rest)[0]


def _operand_gradient_op_fwd(kind, heads, impls, operands, rest):
  out, small = _consume(kind, heads, _all_values(kind, impls, operands), rest)
  return out, (operands, rest, small)


def _operand_gradient_op_bwd(kind, heads, impls, res, g):
  operands, rest, small = res
  produced = [_produce(o, i, n, g) for o, i, n in zip(operands, impls, _SLICES[kind])]
  dhs, drest = _consume_bwd(kind, heads, [h for hs, _ in produced for h in hs], rest, small, g)
  grads, at = [], 0
  for (hs, vjp) in produced:
    grads.append(vjp(dhs[at:at + len(hs)]))
    at += len(hs)
  return tuple(grads), drest


_operand_gradient_op.defvjp(_operand_gradient_op_fwd, _operand_gradient_op_bwd)


def packed_channel_attention(q_or_qkv, kv, temperature, num_heads: int, form: str | None = None,
                             impls=(None, None)):
  """channel_attention on the layers' packed arrays: ``(qkv, None)`` or ``(q, kv)``.

  q, k and v are channel slices of the depthwise convs' outputs, in that
  order; each argument is the array or a :class:`DepthwiseInput` to convolve
  first (with ``impls``). The "gram" form (see channel_attention) runs with a
  gradient that keeps only the operands; the tests hold it equal to autodiff's.
  """
  form = form or ("gram" if num_heads <= _GRAM_MAX_HEADS else "heads")
  operands = (q_or_qkv,) if kv is None else (q_or_qkv, kv)
  kind = "self" if kv is None else "cross"
  impls = tuple(impls[:len(operands)])
  if form == "gram":
    return _operand_gradient_op(kind, num_heads, impls, operands, (temperature,))
  # (differentiated by autodiff: the slices of convs that have their own gradients)
  hs = [h for o, i, n in zip(operands, impls, _SLICES[kind])
        for h in jnp.split(_value(o, i), n, axis=-1)]
  return channel_attention(*hs, temperature, num_heads, form=form)


def fft_patch_product(q, k, patch: int):
  """irfft2(rfft2(q) * rfft2(k)) over non-overlapping ``patch``x``patch`` tiles.

  As the reference: q and k are zero padded at the bottom/right to a multiple of
  the patch, the spectra are multiplied without conjugation, FFTs run in (at least) float32
  with norm="backward", and the result is cropped back to H x W.
  """
  b, h, w, c = q.shape
  ph, pw = (-h) % patch, (-w) % patch
  pad = ((0, 0), (0, ph), (0, pw), (0, 0))
  hp, wp = (h + ph) // patch, (w + pw) // patch

  def tiles(x):
    x = jnp.pad(x.astype(acc_dtype(x.dtype)), pad)
    return x.reshape(b, hp, patch, wp, patch, c)

  qf = jnp.fft.rfft2(tiles(q), axes=(2, 4))
  kf = jnp.fft.rfft2(tiles(k), axes=(2, 4))
  out = jnp.fft.irfft2(qf * kf, s=(patch, patch), axes=(2, 4))
  out = out.reshape(b, hp * patch, wp * patch, c)[:, :h, :w, :]
  return out


def num_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


__all__ = [
    "acc_dtype", "after_gradient", "gelu", "gated_gelu", "packed_channel_attention", "layer_norm",
    "DepthwiseInput", "NormInput", "GateInput", "gate_operands",
    "depthwise_conv", "default_depthwise_impl", "conv2d",
    "pointwise", "default_pointwise_impl", "pixel_shuffle", "pixel_unshuffle", "channel_attention",
    "fft_patch_product", "num_params",
]
