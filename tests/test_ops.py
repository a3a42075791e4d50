"""The NHWC kernels against direct NumPy transcriptions of the torch (NCHW) semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moceir_jax import native, ops

RNG = np.random.default_rng(0)


def _torch_depthwise_nchw(x, w, b=None):
  """torch Conv2d(groups=C, padding=k//2) on NCHW with weight (C, 1, kh, kw)."""
  n, c, h, wd = x.shape
  kh, kw = w.shape[2:]
  xp = np.pad(x, ((0, 0), (0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)))
  out = np.zeros_like(x)
  for i in range(kh):
    for j in range(kw):
      out += xp[:, :, i:i + h, j:j + wd] * w[None, :, 0, i, j, None, None]
  return out if b is None else out + b[None, :, None, None]


@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("impl", ["native", "shift", "xla"])
def test_depthwise_matches_torch_semantics(k, impl):
  x = RNG.normal(size=(2, 5, 9, 11)).astype(np.float32)
  w = RNG.normal(size=(5, 1, k, k)).astype(np.float32)
  b = RNG.normal(size=(5,)).astype(np.float32)
  ours = ops.depthwise_conv(jnp.asarray(x.transpose(0, 2, 3, 1)),
                            jnp.asarray(w[:, 0].transpose(1, 2, 0)), jnp.asarray(b), impl=impl)
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), _torch_depthwise_nchw(x, w, b),
                             atol=1e-5)


@pytest.mark.parametrize("k", [3, 7])
def test_depthwise_shift_gradients_equal_xla(k):
  # The shift form has a hand-written VJP; autodiff of XLA's grouped conv is the oracle.
  x = jnp.asarray(RNG.normal(size=(2, 6, 10, 4)), jnp.float32)
  w = jnp.asarray(RNG.normal(size=(k, k, 4)), jnp.float32)
  g = jnp.asarray(RNG.normal(size=(2, 6, 10, 4)), jnp.float32)

  def loss(impl):
    return lambda x, w: jnp.sum(ops.depthwise_conv(x, w, impl=impl) * g)

  dx_s, dw_s = jax.grad(loss("shift"), argnums=(0, 1))(x, w)
  dx_x, dw_x = jax.grad(loss("xla"), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(dx_s, dx_x, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(dw_s, dw_x, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("k", [3, 5])  # 5x5 = 25 taps is the first kernel on the FFT path
def test_depthwise_kernel_gradient_blocks_cover_every_row(k, monkeypatch):
  # A tiny block budget forces several row blocks per image (7 rows: blocks of one
  # row), so halo rows and block seams are exercised.
  monkeypatch.setattr(ops, "_KERNEL_GRAD_BLOCK_BYTES", 3 * 4 * 16 * 3 * 2)
  x = jnp.asarray(RNG.normal(size=(3, 7, 10, 3)), jnp.float32)
  w = jnp.asarray(RNG.normal(size=(k, k, 3)), jnp.float32)
  g = jnp.asarray(RNG.normal(size=(3, 7, 10, 3)), jnp.float32)

  def loss(impl):
    return lambda w: jnp.sum(ops.depthwise_conv(x, w, impl=impl) * g)

  np.testing.assert_allclose(jax.grad(loss("shift"))(w), jax.grad(loss("xla"))(w),
                             atol=1e-4, rtol=1e-5)


def test_pointwise_cpu_gradient_equals_autodiff():
  x = jnp.asarray(RNG.normal(size=(2, 5, 6, 4)), jnp.float32)
  w = jnp.asarray(RNG.normal(size=(4, 7)), jnp.float32)
  b = jnp.asarray(RNG.normal(size=(7,)), jnp.float32)
  g = jnp.asarray(RNG.normal(size=(2, 5, 6, 7)), jnp.float32)

  def loss(impl):
    return lambda x, w, b: jnp.sum(jnp.tanh(ops.pointwise(x, w, b, impl=impl)) * g)

  ours = jax.grad(loss("cpu"), argnums=(0, 1, 2))(x, w, b)
  ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(x, w, b)
  for a, r in zip(ours, ref):
    np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(ops.pointwise(x, w, b, impl="cpu"), ops.pointwise(x, w, b, impl="xla"))
  with pytest.raises(ValueError, match="unknown pointwise impl 'mkl'"):
    ops.pointwise(x, w, impl="mkl")


@pytest.mark.parametrize("with_bias", [True, False])
def test_pointwise_of_a_norm_equals_the_norm_then_the_conv(with_bias):
  # ops.NormInput: the conv normalises its input itself and again in the backward
  # pass (the CPU form keeps only the norm's input); the same function and gradients
  # as the norm applied first (plain autodiff, "xla"), float32 through the native norm.
  c = 16
  x = jnp.asarray(RNG.normal(size=(2, 5, 6, c)) * 2 + 1, jnp.float32)
  lw = jnp.asarray(RNG.normal(size=(c,)), jnp.float32)
  lb = jnp.asarray(RNG.normal(size=(c,)), jnp.float32) if with_bias else None
  w = jnp.asarray(RNG.normal(size=(c, 7)), jnp.float32)
  g = jnp.asarray(RNG.normal(size=(2, 5, 6, 7)), jnp.float32)
  argnums = (0, 1, 2, 3) if with_bias else (0, 1, 3)

  def loss(impl):
    return lambda x, lw, lb, w: jnp.sum(
        jnp.tanh(ops.pointwise(ops.NormInput(x, lw, lb), w, impl=impl)) * g)

  ours = jax.jit(jax.grad(loss("cpu"), argnums=argnums))(x, lw, lb, w)
  ref = jax.jit(jax.grad(loss("xla"), argnums=argnums))(x, lw, lb, w)
  for a, r in zip(ours, ref):
    np.testing.assert_allclose(a, r, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(ops.pointwise(ops.NormInput(x, lw, lb), w, impl="cpu"),
                             ops.pointwise(ops.layer_norm(x, lw, lb), w, impl="cpu"),
                             atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("with_bias", [True, False])
def test_pointwise_of_a_gate_equals_the_gate_then_the_conv(with_bias):
  # ops.GateInput: the conv after the GDFN's gate applies the gate itself and, in
  # the backward pass, takes the gate's output from the gate's gradient kernel.
  # Against the gate applied first through the shift formulation and autodiff.
  c2 = 32
  x = jnp.asarray(RNG.normal(size=(2, 19, 6, c2)), jnp.float32)  # 19 rows: two pieces
  k = jnp.asarray(RNG.normal(size=(3, 3, c2)) / 3, jnp.float32)
  b = jnp.asarray(RNG.normal(size=(c2,)), jnp.float32) if with_bias else None
  w = jnp.asarray(RNG.normal(size=(c2 // 2, 7)), jnp.float32)
  g = jnp.asarray(RNG.normal(size=(2, 19, 6, 7)), jnp.float32)
  gate = ops.gate_operands(ops.DepthwiseInput(x, k, b), "native", "cpu")
  assert isinstance(gate, ops.GateInput)
  plain = ops.gate_operands(ops.DepthwiseInput(x, k, b), "shift", "cpu")
  assert not isinstance(plain, ops.GateInput)
  # forward: exactly the gate then the conv
  np.testing.assert_array_equal(
      jax.jit(lambda x, k, b, w: ops.pointwise(ops.GateInput(x, k, b), w))(x, k, b, w),
      jax.jit(lambda x, k, b, w: ops.pointwise(
          ops.gated_gelu(ops.DepthwiseInput(x, k, b), "native"), w))(x, k, b, w))
  argnums = (0, 1, 2, 3) if with_bias else (0, 1, 3)
  ours = jax.jit(jax.grad(lambda x, k, b, w: jnp.sum(
      ops.pointwise(ops.GateInput(x, k, b), w) * g), argnums=argnums))(x, k, b, w)
  ref = jax.jit(jax.grad(lambda x, k, b, w: jnp.sum(ops.pointwise(
      ops.gated_gelu(ops.DepthwiseInput(x, k, b), "shift"), w, impl="xla") * g),
      argnums=argnums))(x, k, b, w)
  for a, r in zip(ours, ref):
    scale = float(jnp.max(jnp.abs(r)))
    np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(r) / scale, atol=2e-6)


def test_depthwise_rejects_even_kernels_and_unknown_impl():
  x = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match="odd kernel"):
    ops.depthwise_conv(x, jnp.zeros((2, 2, 2)))
  with pytest.raises(ValueError, match="unknown depthwise impl 'cudnn'"):
    ops.depthwise_conv(x, jnp.zeros((3, 3, 2)), impl="cudnn")


def test_pixel_unshuffle_uses_torch_channel_order():
  # torch.nn.PixelUnshuffle(2): out[c*4 + i*2 + j, y, x] = in[c, 2y+i, 2x+j]
  x = RNG.normal(size=(1, 3, 4, 6)).astype(np.float32)
  expected = np.zeros((1, 12, 2, 3), np.float32)
  for c in range(3):
    for i in range(2):
      for j in range(2):
        expected[0, c * 4 + i * 2 + j] = x[0, c, i::2, j::2]
  ours = ops.pixel_unshuffle(jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_array_equal(np.asarray(ours).transpose(0, 3, 1, 2), expected)
  back = ops.pixel_shuffle(ours)
  np.testing.assert_array_equal(np.asarray(back).transpose(0, 3, 1, 2), x)
  with pytest.raises(ValueError, match="divisible by 2"):
    ops.pixel_unshuffle(jnp.zeros((1, 3, 4, 1)))


def test_layer_norm_with_and_without_bias():
  x = RNG.normal(size=(2, 3, 4, 6)).astype(np.float32) * 3 + 1
  w = RNG.normal(size=(6,)).astype(np.float32)
  b = RNG.normal(size=(6,)).astype(np.float32)
  mu = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  np.testing.assert_allclose(ops.layer_norm(jnp.asarray(x), w, b),
                             (x - mu) / np.sqrt(var + 1e-5) * w + b, atol=1e-5)
  # BiasFree divides by the std but keeps the mean
  np.testing.assert_allclose(ops.layer_norm(jnp.asarray(x), w, None), x / np.sqrt(var + 1e-5) * w,
                             atol=1e-5)


def _plain_layer_norm(x, w, b, eps=1e-5):
  mu = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + eps) * w + b if b is not None else x / jnp.sqrt(var + eps) * w


@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_gradients_equal_autodiff_of_the_formula(with_bias):
  # The hand-written backward pass keeps less; it must give autodiff's numbers.
  with jax.enable_x64():
    x = jnp.asarray(RNG.normal(size=(2, 3, 4, 6)) * 3 + 1)
    w = jnp.asarray(RNG.normal(size=(6,)))
    b = jnp.asarray(RNG.normal(size=(6,))) if with_bias else None
    g = jnp.asarray(RNG.normal(size=(2, 3, 4, 6)))
    args = (x, w) + ((b,) if with_bias else ())
    ours = jax.grad(lambda *a: jnp.sum(jnp.tanh(ops.layer_norm(*a)) * g),
                    argnums=tuple(range(len(args))))(*args)
    ref = jax.grad(lambda x, w, b=None: jnp.sum(jnp.tanh(_plain_layer_norm(x, w, b)) * g),
                   argnums=tuple(range(len(args))))(*args)
    assert ours[0].dtype == jnp.float64
    for a, r in zip(ours, ref):
      np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)


def test_gelu_and_gated_gelu_gradients_equal_autodiff():
  with jax.enable_x64():
    h = jnp.asarray(RNG.normal(size=(2, 3, 5, 8)) * 2)
    g = jnp.asarray(RNG.normal(size=(2, 3, 5, 4)))
    plain_gelu = lambda t: jax.nn.gelu(t, approximate=False)
    np.testing.assert_allclose(jax.grad(lambda t: jnp.sum(ops.gelu(t) * h))(h),
                               jax.grad(lambda t: jnp.sum(plain_gelu(t) * h))(h), rtol=1e-12,
                               atol=1e-15)
    plain_gate = lambda t: plain_gelu(t[..., :4]) * t[..., 4:]
    np.testing.assert_allclose(ops.gated_gelu(h), plain_gate(h), rtol=1e-14)
    np.testing.assert_allclose(jax.grad(lambda t: jnp.sum(ops.gated_gelu(t) * g))(h),
                               jax.grad(lambda t: jnp.sum(plain_gate(t) * g))(h), rtol=1e-12,
                               atol=1e-14)


def test_gelu_is_exact_erf():
  x = jnp.linspace(-4, 4, 101)
  from scipy.special import erf  # pylint: disable=import-outside-toplevel
  np.testing.assert_allclose(ops.gelu(x), 0.5 * x * (1 + erf(np.asarray(x) / np.sqrt(2))),
                             atol=1e-6)


@pytest.mark.parametrize("patch", [4, 8])
def test_fft_patch_product_is_circular_convolution_per_tile(patch):
  # irfft2(rfft2(q) * rfft2(k)) on a zero-padded tile is the circular
  # convolution of the tiles; check it directly, including the bottom/right
  # padding of a size that is not a multiple of the patch.
  h, w, c = 10, 13, 2
  q = RNG.normal(size=(1, h, w, c)).astype(np.float32)
  k = RNG.normal(size=(1, h, w, c)).astype(np.float32)
  hp, wp = -(-h // patch) * patch, -(-w // patch) * patch
  qp = np.zeros((hp, wp, c)); qp[:h, :w] = q[0]
  kp = np.zeros((hp, wp, c)); kp[:h, :w] = k[0]
  expected = np.zeros((hp, wp, c))
  for ty in range(0, hp, patch):
    for tx in range(0, wp, patch):
      qt, kt = qp[ty:ty + patch, tx:tx + patch], kp[ty:ty + patch, tx:tx + patch]
      for y in range(patch):
        for x in range(patch):
          rolled = np.roll(np.roll(kt[::-1, ::-1], y + 1, axis=0), x + 1, axis=1)
          expected[ty + y, tx + x] = np.sum(qt * rolled, axis=(0, 1))
  ours = ops.fft_patch_product(jnp.asarray(q), jnp.asarray(k), patch)
  np.testing.assert_allclose(np.asarray(ours)[0], expected[:h, :w], atol=1e-4)


@pytest.mark.parametrize("form", ["gram", "heads"])
@pytest.mark.parametrize("heads", [1, 2])
def test_channel_attention_matches_reference_reshapes(form, heads):
  b, h, w, d = 2, 3, 5, 3
  c = heads * d
  q, k, v = (RNG.normal(size=(b, h, w, c)).astype(np.float32) for _ in range(3))
  t = RNG.normal(size=(heads,)).astype(np.float32)

  def ref(q, k, v):  # 'b (head c) h w -> b head c (h w)' in NumPy
    to = lambda a: a.transpose(0, 3, 1, 2).reshape(b, heads, d, h * w)
    q, k, v = to(q), to(k), to(v)
    q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    a = q @ k.transpose(0, 1, 3, 2) * t[None, :, None, None]
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return (a @ v).reshape(b, c, h, w).transpose(0, 2, 3, 1)

  np.testing.assert_allclose(ops.channel_attention(q, k, v, t, heads, form=form), ref(q, k, v),
                             atol=1e-5)


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
@pytest.mark.parametrize("cross", [False, True])
def test_packed_channel_attention_equals_autodiff_values_and_gradients(heads, cross):
  # The packed form's hand-written gradient against autodiff of the plain forms.
  with jax.enable_x64():
    c = 16
    a = jnp.asarray(RNG.normal(size=(2, 5, 6, c if cross else 3 * c)))
    kv = jnp.asarray(RNG.normal(size=(2, 5, 6, 2 * c))) if cross else None
    t = jnp.asarray(RNG.uniform(0.5, 2.0, size=(heads,)))
    g = jnp.asarray(RNG.normal(size=(2, 5, 6, c)))

    def plain(a, kv, t):
      q, k, v = (a, *jnp.split(kv, 2, axis=-1)) if cross else jnp.split(a, 3, axis=-1)
      return ops.channel_attention(q, k, v, t, heads, form="heads")

    args = (a, kv, t) if cross else (a, t)
    ours = lambda *x: ops.packed_channel_attention(x[0], x[1] if cross else None, x[-1], heads)
    ref = lambda *x: plain(x[0], x[1] if cross else None, x[-1])
    np.testing.assert_allclose(ours(*args), ref(*args), rtol=1e-12, atol=1e-13)
    argnums = tuple(range(len(args)))
    got = jax.grad(lambda *x: jnp.sum(ours(*x) * g), argnums=argnums)(*args)
    want = jax.grad(lambda *x: jnp.sum(ref(*x) * g), argnums=argnums)(*args)
    for x, y in zip(got, want):
      np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


def test_channel_attention_forms_have_equal_gradients():
  q, k, v = (jnp.asarray(RNG.normal(size=(2, 4, 6, 8)), jnp.float32) for _ in range(3))
  t = jnp.asarray([0.7, 1.3], jnp.float32)
  g = jnp.asarray(RNG.normal(size=(2, 4, 6, 8)), jnp.float32)
  grads = [jax.grad(lambda *a, f=f: jnp.sum(ops.channel_attention(*a, 2, form=f) * g),
                    argnums=(0, 1, 2, 3))(q, k, v, t) for f in ("gram", "heads")]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="channel attention form"):
    ops.channel_attention(q, k, v, t, 2, form="fast")


def _depthwise_operands(rng, shape, k, bias, dtype):
  c = shape[-1]
  return ops.DepthwiseInput(jnp.asarray(rng.normal(size=shape), dtype),
                            jnp.asarray(rng.normal(size=(k, k, c)) / k, dtype),
                            jnp.asarray(rng.normal(size=(c,)), dtype) if bias else None)


def _grads_of_operands(fn, operands, rest, g):
  """Gradients of sum(fn(operands, rest) * g) with respect to every array in both."""
  return jax.grad(lambda o, r: jnp.sum(fn(o, r) * g), argnums=(0, 1))(operands, rest)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["gate", "self1", "self2", "cross2", "self8"])
def test_ops_on_depthwise_operands_equal_autodiff_of_conv_then_op(kind, bias):
  # The gate and the attention given the depthwise conv's operands (their gradient
  # keeps the conv's input and convolves again) against autodiff of the plain
  # composition: XLA's grouped convolution, then the plain forms. "self8" takes the
  # per-head form, which convolves first and differentiates as usual.
  with jax.enable_x64():
    rng = np.random.default_rng(3)
    heads = int(kind[-1]) if kind != "gate" else 0
    c = 8
    plain_gelu = lambda t: jax.nn.gelu(t, approximate=False)
    conv = lambda o: ops.depthwise_conv(*o, impl="xla")
    if kind == "gate":
      operands = (_depthwise_operands(rng, (2, 6, 7, 2 * c), 3, bias, jnp.float64),)
      rest = ()
      ours = lambda o, r: ops.gated_gelu(o[0])
      h_split = lambda h: (h[..., :c], h[..., c:])
      ref = lambda o, r: (lambda a, b: plain_gelu(a) * b)(*h_split(conv(o[0])))
    elif kind.startswith("self"):
      operands = (_depthwise_operands(rng, (2, 6, 7, 3 * c), 3, bias, jnp.float64),)
      rest = (jnp.asarray(rng.uniform(0.5, 2.0, size=(heads,))),)
      ours = lambda o, r: ops.packed_channel_attention(o[0], None, r[0], heads)
      ref = lambda o, r: ops.channel_attention(*jnp.split(conv(o[0]), 3, -1), r[0], heads,
                                               form="heads")
    else:
      operands = (_depthwise_operands(rng, (2, 6, 7, c), 3, bias, jnp.float64),
                  _depthwise_operands(rng, (2, 6, 7, 2 * c), 7, bias, jnp.float64))
      rest = (jnp.asarray(rng.uniform(0.5, 2.0, size=(heads,))),)
      ours = lambda o, r: ops.packed_channel_attention(o[0], o[1], r[0], heads)
      ref = lambda o, r: ops.channel_attention(conv(o[0]), *jnp.split(conv(o[1]), 2, -1), r[0],
                                               heads, form="heads")
    g = jnp.asarray(rng.normal(size=(2, 6, 7, c)))
    np.testing.assert_allclose(ours(operands, rest), ref(operands, rest), rtol=1e-11, atol=1e-12)
    got = _grads_of_operands(ours, operands, rest, g)
    want = _grads_of_operands(ref, operands, rest, g)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert a.dtype == jnp.float64
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("impl", ops.DEPTHWISE_IMPLS)
def test_ops_on_depthwise_operands_float32_each_impl(impl):
  # The same in float32 through each depthwise formulation the backends pick
  # (native: this machine's compiled kernel, shift, xla).
  rng = np.random.default_rng(4)
  operands = (_depthwise_operands(rng, (2, 8, 8, 12), 3, True, jnp.float32),)
  rest = (jnp.asarray([0.8, 1.4], jnp.float32),)
  g = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  ours = lambda o, r: ops.packed_channel_attention(o[0], None, r[0], 2, impls=(impl,))
  ref = lambda o, r: ops.channel_attention(
      *jnp.split(ops.depthwise_conv(*o[0], impl="xla"), 3, -1), r[0], 2, form="heads")
  np.testing.assert_allclose(ours(operands, rest), ref(operands, rest), atol=2e-5)
  for a, b in zip(jax.tree.leaves(_grads_of_operands(ours, operands, rest, g)),
                  jax.tree.leaves(_grads_of_operands(ref, operands, rest, g))):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)
