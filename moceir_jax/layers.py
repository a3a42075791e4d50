"""Restormer-style building blocks of MoCE-IR as Flax NNX modules (NHWC).

Parameters are stored in the layouts the JAX kernels want (1x1 convs as (in, out)
matrices, depthwise kernels as (kh, kw, C), dense convs as HWIO); the converter
in :mod:`moceir_jax.convert` maps the PyTorch layouts onto them. Initialisation
follows torch's defaults (uniform in +-1/sqrt(fan_in)) so that training from
scratch behaves like the reference. It draws from a NumPy generator rather than
``nnx.Rngs``: a model has ~1300 parameter arrays, and one jax.random call per
array costs tens of seconds of dispatch and tracing, while NumPy takes
milliseconds and still works under ``nnx.eval_shape``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moceir_jax import ops


class Init:
  """Seeded source of initial parameter values."""

  def __init__(self, seed: int = 0):
    self.rng = np.random.default_rng(seed)

  def uniform(self, shape, fan_in: int):
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return jnp.asarray(self.rng.uniform(-bound, bound, size=shape).astype(np.float32))


class Pointwise(nnx.Module):
  """1x1 convolution (equivalently a Linear over channels)."""

  def __init__(self, cin: int, cout: int, *, bias: bool, rngs: Init):
    self.kernel = nnx.Param(rngs.uniform((cin, cout), cin))
    self.bias = nnx.Param(rngs.uniform((cout,), cin)) if bias else None

  def __call__(self, x):
    return ops.pointwise(x, self.kernel[...], None if self.bias is None else self.bias[...])


Linear = Pointwise  # same maths on (B, C) inputs; kept as a name for readability


class Conv(nnx.Module):
  """Dense kxk 'same' convolution."""

  def __init__(self, cin: int, cout: int, k: int = 3, *, bias: bool, rngs: Init):
    fan_in = cin * k * k
    self.kernel = nnx.Param(rngs.uniform((k, k, cin, cout), fan_in))
    self.bias = nnx.Param(rngs.uniform((cout,), fan_in)) if bias else None

  def __call__(self, x):
    return ops.conv2d(x, self.kernel[...], None if self.bias is None else self.bias[...])


class DepthwiseConv(nnx.Module):
  """kxk convolution with one filter per channel (torch groups=C)."""

  def __init__(self, c: int, k: int, *, bias: bool, rngs: Init, impl: str | None = None):
    self.impl = impl
    self.kernel = nnx.Param(rngs.uniform((k, k, c), k * k))
    self.bias = nnx.Param(rngs.uniform((c,), k * k)) if bias else None

  def __call__(self, x):
    return ops.depthwise_conv(*self.operands(x), impl=self.impl)

  def operands(self, x) -> ops.DepthwiseInput:
    """The conv unapplied, for the ops that convolve themselves (their gradient keeps
    the conv's input, not its output; see ops.DepthwiseInput)."""
    return ops.DepthwiseInput(x, self.kernel[...], None if self.bias is None else self.bias[...])


class LayerNorm(nnx.Module):
  """Channel LayerNorm; ``with_bias=False`` is the reference's BiasFree variant."""

  def __init__(self, c: int, *, with_bias: bool = True):
    self.weight = nnx.Param(jnp.ones((c,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((c,), jnp.float32)) if with_bias else None

  def __call__(self, x):
    return self.operands(x).apply()

  def operands(self, x) -> ops.NormInput:
    """The norm unapplied, for the 1x1 convs that normalise their input themselves
    (their gradient keeps the norm's input, not its output; see ops.NormInput)."""
    return ops.NormInput(x, self.weight[...], None if self.bias is None else self.bias[...])


class Attention(nnx.Module):
  """Multi-Dconv head transposed self-attention (MDTA)."""

  def __init__(self, dim: int, heads: int, *, bias: bool, rngs: Init, impl=None):
    if dim % heads:
      raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
    self.heads = heads
    self.temperature = nnx.Param(jnp.ones((heads,), jnp.float32))
    self.qkv = Pointwise(dim, 3 * dim, bias=bias, rngs=rngs)
    self.qkv_dw = DepthwiseConv(3 * dim, 3, bias=bias, rngs=rngs, impl=impl)
    self.proj_out = Pointwise(dim, dim, bias=bias, rngs=rngs)

  def __call__(self, x):
    out = ops.packed_channel_attention(self.qkv_dw.operands(self.qkv(x)), None,
                                       self.temperature[...], self.heads,
                                       impls=(self.qkv_dw.impl, None))
    return self.proj_out(out)


class CrossAttention(nnx.Module):
  """Channel attention with queries from ``x`` and keys/values from ``y``."""

  def __init__(self, dim: int, heads: int, *, bias: bool, rngs: Init, impl=None):
    if dim % heads:
      raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
    self.heads = heads
    self.temperature = nnx.Param(jnp.ones((heads,), jnp.float32))
    self.q = Pointwise(dim, dim, bias=bias, rngs=rngs)
    self.q_dw = DepthwiseConv(dim, 3, bias=bias, rngs=rngs, impl=impl)
    self.kv = Pointwise(dim, 2 * dim, bias=bias, rngs=rngs)
    self.kv_dw = DepthwiseConv(2 * dim, 7, bias=bias, rngs=rngs, impl=impl)
    self.proj_out = Pointwise(dim, dim, bias=bias, rngs=rngs)

  def __call__(self, x, y):
    out = ops.packed_channel_attention(self.q_dw.operands(self.q(x)),
                                       self.kv_dw.operands(self.kv(y)), self.temperature[...],
                                       self.heads, impls=(self.q_dw.impl, self.kv_dw.impl))
    return self.proj_out(out)


class FeedForward(nnx.Module):
  """Gated-Dconv feed-forward network (GDFN)."""

  def __init__(self, dim: int, expansion: float, *, bias: bool, rngs: Init, impl=None):
    hidden = int(dim * expansion)
    self.project_in = Pointwise(dim, 2 * hidden, bias=bias, rngs=rngs)
    self.dwconv = DepthwiseConv(2 * hidden, 3, bias=bias, rngs=rngs, impl=impl)
    self.project_out = Pointwise(hidden, dim, bias=bias, rngs=rngs)

  def __call__(self, x):
    # (on CPU the gate is applied by project_out, which then keeps only its input)
    return self.project_out(ops.gate_operands(self.dwconv.operands(self.project_in(x)),
                                              self.dwconv.impl))


class TransformerBlock(nnx.Module):
  """Encoder/latent/refinement block: pre-norm MDTA then pre-norm GDFN."""

  def __init__(self, dim: int, heads: int, expansion: float, *, bias: bool, ln_bias: bool,
               rngs: Init, impl=None):
    self.norm1 = LayerNorm(dim, with_bias=ln_bias)
    self.attn = Attention(dim, heads, bias=bias, rngs=rngs, impl=impl)
    self.norm2 = LayerNorm(dim, with_bias=ln_bias)
    self.ffn = FeedForward(dim, expansion, bias=bias, rngs=rngs, impl=impl)

  def __call__(self, x):
    x = x + self.attn(self.norm1.operands(x))
    return x + self.ffn(self.norm2.operands(x))


class FFTAttention(nnx.Module):
  """The complexity experts' body: attention as a product of patch spectra.

  The reference's ``kernel_size`` argument is ignored there (q uses 3x3 and kv
  7x7 depthwise convs whatever it says), so it is not an argument here.
  """

  def __init__(self, dim: int, patch: int, *, rngs: Init, impl=None):
    self.patch = patch
    self.q = Pointwise(dim, dim, bias=False, rngs=rngs)
    self.q_dw = DepthwiseConv(dim, 3, bias=True, rngs=rngs, impl=impl)
    self.kv = Pointwise(dim, 2 * dim, bias=False, rngs=rngs)
    self.kv_dw = DepthwiseConv(2 * dim, 7, bias=True, rngs=rngs, impl=impl)
    self.norm = LayerNorm(dim, with_bias=True)
    self.proj_out = Pointwise(dim, dim, bias=True, rngs=rngs)

  def __call__(self, x):
    q = self.q_dw(self.q(x))
    k, v = jnp.split(self.kv_dw(self.kv(x)), 2, axis=-1)
    out = ops.fft_patch_product(q, k, self.patch).astype(x.dtype)
    return self.proj_out(self.norm(out) * v)
