"""The native CPU kernels against the XLA formulations, their build cache and fallbacks."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moceir_jax import native, ops

RNG = np.random.default_rng(0)

needs_native = pytest.mark.skipif(not native.available(),
                                  reason="native kernels unavailable (no C++ compiler?)")


# Shapes that reach every code path: channel counts that are multiples of 8
# (register-window paths, 3x3 and 7x7) and others (tiled path); rows narrower
# and images shorter than the kernel; odd widths whose vector loop has a tail.
SHAPES = [
    ((2, 9, 11, 16), 3), ((2, 9, 11, 16), 7), ((3, 6, 10, 12), 3), ((1, 8, 13, 40), 7),
    ((2, 5, 7, 3), 3), ((1, 3, 2, 5), 7), ((2, 1, 9, 8), 3), ((1, 2, 3, 24), 7),
    ((1, 12, 37, 6), 7),
]


@needs_native
@pytest.mark.parametrize("shape,k", SHAPES)
def test_native_depthwise_equals_xla_forward_and_gradients(shape, k):
  x = jnp.asarray(RNG.normal(size=shape), jnp.float32)
  w = jnp.asarray(RNG.normal(size=(k, k, shape[-1])), jnp.float32)
  g = jnp.asarray(RNG.normal(size=shape), jnp.float32)

  def run(impl):
    fn = lambda x, w: jnp.sum(ops.depthwise_conv(x, w, impl=impl) * g)
    y = jax.jit(lambda x, w: ops.depthwise_conv(x, w, impl=impl))(x, w)
    return (y,) + jax.jit(jax.grad(fn, argnums=(0, 1)))(x, w)

  for ours, theirs in zip(run("native"), run("xla")):
    scale = float(jnp.max(jnp.abs(theirs))) or 1.0
    np.testing.assert_allclose(np.asarray(ours) / scale, np.asarray(theirs) / scale, atol=2e-6)


@needs_native
def test_native_kernel_gradient_is_per_image():
  x = jnp.asarray(RNG.normal(size=(3, 6, 8, 16)), jnp.float32)
  g = jnp.asarray(RNG.normal(size=(3, 6, 8, 16)), jnp.float32)
  per_image = jax.jit(lambda x, g: native.depthwise_kernel_grad(x, g, 3, 3))(x, g)
  assert per_image.shape == (3, 9, 16)
  for b in range(3):
    alone = jax.jit(lambda x, g: native.depthwise_kernel_grad(x, g, 3, 3))(x[b:b + 1], g[b:b + 1])
    np.testing.assert_array_equal(per_image[b], alone[0])  # same pieces, same order: exact


# LayerNorm: channel counts with and without an 8-wide tail, one channel, the
# model's widest level.
LN_SHAPES = [(2, 5, 7, 32), (1, 3, 4, 12), (2, 9, 3, 3), (1, 2, 2, 1), (1, 2, 3, 256)]


@needs_native
@pytest.mark.parametrize("shape", LN_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_native_layer_norm_equals_xla_forward_and_gradients(shape, with_bias):
  x = jnp.asarray(RNG.normal(size=shape) * 2 + 0.5, jnp.float32)
  w = jnp.asarray(RNG.normal(size=shape[-1:]), jnp.float32)
  b = jnp.asarray(RNG.normal(size=shape[-1:]), jnp.float32) if with_bias else None
  g = jnp.asarray(RNG.normal(size=shape), jnp.float32)
  argnums = (0, 1, 2) if with_bias else (0, 1)

  def run(impl):
    fn = lambda x, w, b: jnp.sum(ops.layer_norm(x, w, b, impl=impl) * g)
    y = jax.jit(lambda x, w, b: ops.layer_norm(x, w, b, impl=impl))(x, w, b)
    return (y,) + jax.jit(jax.grad(fn, argnums=argnums))(x, w, b)

  for ours, theirs in zip(run("native"), run("xla")):
    scale = float(jnp.max(jnp.abs(theirs))) or 1.0
    # A one-channel norm outputs its bias whatever x: its input gradient must be exactly 0.
    np.testing.assert_allclose(np.asarray(ours) / scale, np.asarray(theirs) / scale, atol=2e-6)


@needs_native
def test_native_layer_norm_weight_gradient_is_per_image():
  x = jnp.asarray(RNG.normal(size=(3, 20, 30, 16)), jnp.float32)  # 600 pixels: several pieces
  g = jnp.asarray(RNG.normal(size=x.shape), jnp.float32)
  w = jnp.asarray(RNG.normal(size=(16,)), jnp.float32)
  grad = jax.jit(lambda x, g: native.layer_norm_grad(x, g, w, 1e-5, False))
  dx, dw, db = grad(x, g)
  assert dx.shape == x.shape and dw.shape == db.shape == (3, 16)
  for b in range(3):
    alone = grad(x[b:b + 1], g[b:b + 1])
    for whole, one in zip((dx[b], dw[b], db[b]), alone):
      np.testing.assert_array_equal(whole, one[0])  # same pieces, same order: exact


# The gate's conv widths: multiples of 16 (smaller or odd widths take the XLA
# path); images with fewer rows than a piece, more rows than a piece (pieces
# recompute their edge rows), a single row and column, wide rows.
GATE_SHAPES = [(2, 9, 11, 32), (1, 5, 3, 16), (3, 37, 18, 128), (1, 1, 1, 16), (2, 2, 40, 64)]


@needs_native
@pytest.mark.parametrize("shape", GATE_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_native_gate_gradient_equals_the_xla_formulation(shape, with_bias):
  x = jnp.asarray(RNG.normal(size=shape) * 1.5, jnp.float32)
  k = jnp.asarray(RNG.normal(size=(3, 3, shape[-1])), jnp.float32)
  b = jnp.asarray(RNG.normal(size=shape[-1:]), jnp.float32) if with_bias else None
  g = jnp.asarray(RNG.normal(size=shape[:-1] + (shape[-1] // 2,)), jnp.float32)
  argnums = (0, 1, 2) if with_bias else (0, 1)

  def run(impl):
    gate = lambda x, k, b: ops.gated_gelu(ops.DepthwiseInput(x, k, b), impl)
    y = jax.jit(gate)(x, k, b)
    return (y,) + jax.jit(jax.grad(lambda *a: jnp.sum(gate(*a) * g), argnums=argnums))(x, k, b)

  native_run, xla_run = run("native"), run("shift")
  # The forward pass is the native conv followed by XLA's GELU, exactly.
  conv_then_gate = jax.jit(lambda x, k, b: ops.gated_gelu(ops.depthwise_conv(x, k, b, "native")))
  np.testing.assert_array_equal(native_run[0], conv_then_gate(x, k, b))
  for ours, theirs in zip(native_run, xla_run):
    scale = float(jnp.max(jnp.abs(theirs))) or 1.0
    np.testing.assert_allclose(np.asarray(ours) / scale, np.asarray(theirs) / scale, atol=2e-6)


@needs_native
def test_native_gate_gradient_is_per_image_and_checks_its_shapes():
  x = jnp.asarray(RNG.normal(size=(3, 40, 6, 32)), jnp.float32)  # 40 rows: three pieces
  g = jnp.asarray(RNG.normal(size=(3, 40, 6, 16)), jnp.float32)
  k = jnp.asarray(RNG.normal(size=(3, 3, 32)), jnp.float32)
  bias = jnp.asarray(RNG.normal(size=(32,)), jnp.float32)
  grad = jax.jit(native.gate_grad)
  whole = grad(x, g, k, bias)
  assert [a.shape for a in whole] == [x.shape, (3, 9, 32), (3, 32), g.shape]
  # its fourth result is the gate's output again
  forward = jax.jit(lambda x: ops.gated_gelu(ops.depthwise_conv(x, k, bias, "native")))(x)
  # (1 + erf(y) for y << 0 cancels: errors are relative to the largest output)
  scale = float(jnp.max(jnp.abs(forward)))
  np.testing.assert_allclose(whole[3] / scale, forward / scale, atol=1e-6)
  for b in range(3):
    for a, one in zip(whole, grad(x[b:b + 1], g[b:b + 1], k, bias)):
      np.testing.assert_array_equal(a[b], one[0])
  assert not native.supports_gate(x[..., :24], k[..., :24])  # 24 channels: the XLA path
  with pytest.raises(Exception, match="multiple of 16"):
    jax.jit(native.gate_grad)(x[..., :24], g[..., :12], k[..., :24], bias[:24])


# The attention's convs, whose output slices (q, k, v) are separate arrays:
# (input shape, kernel, slices), with images shorter than a piece of rows and
# rows narrower than the kernel.
SPLIT_CASES = [((2, 9, 11, 48), 3, 3), ((1, 6, 5, 32), 7, 2), ((2, 3, 2, 8), 3, 1),
               ((1, 10, 4, 24), 7, 3)]


@needs_native
@pytest.mark.parametrize("shape,k,n", SPLIT_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_native_split_conv_equals_the_packed_conv(shape, k, n, with_bias):
  x = jnp.asarray(RNG.normal(size=shape), jnp.float32)
  w = jnp.asarray(RNG.normal(size=(k, k, shape[-1])), jnp.float32)
  bias = jnp.asarray(RNG.normal(size=shape[-1:]), jnp.float32) if with_bias else None
  gs = [jnp.asarray(RNG.normal(size=shape[:-1] + (shape[-1] // n,)), jnp.float32)
        for _ in range(n)]
  ys = jax.jit(lambda x, w, b: native.depthwise_split_forward(x, w, b, n))(x, w, bias)
  packed = jax.jit(lambda x, w, b: ops.depthwise_conv(x, w, b, impl="native"))(x, w, bias)
  assert len(ys) == n
  np.testing.assert_array_equal(jnp.concatenate(ys, -1), packed)  # same sums, same order
  dx, dk, db = jax.jit(native.depthwise_split_grad)(x, w, gs)
  assert (dk.shape, db.shape) == ((shape[0], k * k, shape[-1]), (shape[0], shape[-1]))
  _, vjp = jax.vjp(lambda x, w, b: ops.depthwise_conv(x, w, b, impl="shift"), x, w,
                   jnp.zeros(shape[-1:]))
  for ours, theirs in zip((dx, dk.sum(0).reshape(w.shape), db.sum(0)),
                          vjp(jnp.concatenate(gs, -1))):
    scale = float(jnp.max(jnp.abs(theirs))) or 1.0
    np.testing.assert_allclose(np.asarray(ours) / scale, np.asarray(theirs) / scale, atol=2e-6)
  for b in range(shape[0]):  # per-image sums: an image alone gives the same bits
    alone = jax.jit(native.depthwise_split_grad)(x[b:b + 1], w, [g[b:b + 1] for g in gs])
    for a, one in zip((dx, dk, db), alone):
      np.testing.assert_array_equal(a[b], one[0])


@needs_native
@pytest.mark.parametrize("cross,heads", [(False, 2), (True, 1), (False, 8)])
def test_attention_on_native_split_convs_equals_the_shift_formulation(cross, heads):
  # The model's path (q, k, v as separate outputs of the native conv; "gram" form up
  # to 4 heads, per-head form beyond) against the XLA formulation.
  c = 16
  mk = lambda shape, k: ops.DepthwiseInput(
      jnp.asarray(RNG.normal(size=shape), jnp.float32),
      jnp.asarray(RNG.normal(size=(k, k, shape[-1])) / k, jnp.float32),
      jnp.asarray(RNG.normal(size=shape[-1:]), jnp.float32))
  operands = ((mk((2, 7, 9, c), 3), mk((2, 7, 9, 2 * c), 7)) if cross
              else (mk((2, 7, 9, 3 * c), 3),))
  assert all(native.supports_split(o.x, o.kernel, 2 if i else (1 if cross else 3))
             for i, o in enumerate(operands))
  t = jnp.asarray(RNG.uniform(0.5, 2.0, size=(heads,)), jnp.float32)
  g = jnp.asarray(RNG.normal(size=(2, 7, 9, c)), jnp.float32)

  def run(impl):
    fn = lambda o, t: ops.packed_channel_attention(o[0], o[1] if cross else None, t, heads,
                                                   impls=(impl, impl))
    y = jax.jit(fn)(operands, t)
    return [y] + jax.tree.leaves(jax.jit(jax.grad(lambda o, t: jnp.sum(fn(o, t) * g),
                                                  argnums=(0, 1)))(operands, t))

  for ours, theirs in zip(run("native"), run("shift")):
    scale = float(jnp.max(jnp.abs(theirs))) or 1.0
    np.testing.assert_allclose(np.asarray(ours) / scale, np.asarray(theirs) / scale, atol=1e-5)
  x, w = jnp.ones((1, 4, 4, 36), jnp.float32), jnp.ones((3, 3, 36), jnp.float32)
  assert not native.supports_split(x, w, 3)  # 12 channels a slice: the XLA path
  with pytest.raises(Exception, match="multiple of 8"):
    jax.jit(native.depthwise_split_forward, static_argnums=3)(x, w, None, 3)


@needs_native
def test_native_kernels_follow_a_batch_sharded_mesh():
  # Four simulated devices in a fresh process (the device count is fixed at start-up):
  # each device runs the kernels on its own images (no all-gather), and the results equal
  # one device's.
  script = textwrap.dedent("""
      import os, sys
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
      sys.path.insert(0, sys.argv[1])
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from moceir_jax import ops
      mesh = Mesh(np.array(jax.devices()), ("data",))
      rng = np.random.default_rng(0)
      x, g = (jnp.asarray(rng.normal(size=(8, 10, 12, 16)), jnp.float32) for _ in range(2))
      w = jnp.asarray(rng.normal(size=(7, 7, 16)), jnp.float32)
      ln_w = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
      gate_k = jnp.asarray(rng.normal(size=(3, 3, 16)), jnp.float32)
      qkv_k = jnp.asarray(rng.normal(size=(3, 3, 48)), jnp.float32)
      def loss(x, w, g):  # the native depthwise conv, LayerNorm, gate and split-conv gradients
        y = ops.depthwise_conv(x, w, impl="native")
        y = ops.layer_norm(y, ln_w * w[0, 0], w[1, 1], impl="native")
        a = ops.packed_channel_attention(
            ops.DepthwiseInput(jnp.concatenate([y, y * 2, -y], -1), qkv_k * jnp.tile(w[3, 3], 3), None),
            None, jnp.ones((2,)), 2, impls=("native",))
        y = ops.gated_gelu(ops.DepthwiseInput(y + a, gate_k * w[2, 2], None), "native")
        return jnp.sum(y * g[..., :8])
      grad = jax.value_and_grad(loss, argnums=(0, 1))
      data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
      sharded = jax.jit(grad, in_shardings=(data, rep, data)).lower(x, w, g).compile()
      assert "all-gather" not in sharded.as_text()
      (v1, (dx1, dw1)), (v0, (dx0, dw0)) = sharded(x, w, g), jax.jit(grad)(x, w, g)
      assert dx1.sharding.spec == P("data"), dx1.sharding
      np.testing.assert_allclose(v1, v0, rtol=1e-6)
      # (the attention's matmuls may tile differently for 2 and 8 images: not bit-exact;
      # each kernel's per-image exactness is tested on its own)
      np.testing.assert_allclose(dx1, dx0, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(dw1, dw0, rtol=1e-5, atol=1e-4)
      print("ok")
  """)
  r = subprocess.run([sys.executable, "-c", script, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))], capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_native_switch_off_selects_the_xla_formulation(monkeypatch):
  monkeypatch.setenv(native.ENV_SWITCH, "0")
  assert not native.available()
  assert ops.default_depthwise_impl() == "shift"
  x = jnp.ones((1, 4, 4, 3), jnp.float32)
  # "native" asked for explicitly still computes the right thing through the fallback
  np.testing.assert_allclose(ops.depthwise_conv(x, jnp.ones((3, 3, 3)), impl="native"),
                             ops.depthwise_conv(x, jnp.ones((3, 3, 3)), impl="shift"))


@needs_native
def test_build_is_cached_and_a_failed_build_names_the_source(tmp_path, monkeypatch):
  monkeypatch.setenv("MOCEIR_NATIVE_CACHE", str(tmp_path / "cache"))
  cxx = native._compiler()
  first = native._build(cxx)
  stamp = os.stat(first).st_mtime_ns
  assert native._build(cxx) == first and os.stat(first).st_mtime_ns == stamp  # no rebuild
  assert [p for p in os.listdir(tmp_path / "cache") if not p.endswith(".so")] == []

  broken = tmp_path / "broken-cxx"
  broken.write_text("#!/bin/sh\necho 'no such compiler feature' >&2\nexit 1\n")
  broken.chmod(0o755)
  monkeypatch.setenv("MOCEIR_NATIVE_CACHE", str(tmp_path / "other"))
  with pytest.raises(RuntimeError, match="depthwise.cc.*failed(.|\n)*no such compiler feature"):
    native._build(str(broken))
  assert os.listdir(tmp_path / "other") == []  # no half-written library left behind
