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


@needs_native
def test_native_kernels_follow_a_batch_sharded_mesh():
  # Four simulated devices in a fresh process (the device count is fixed at start-up):
  # each device convolves its own images (no all-gather), and the results equal one device's.
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
      loss = lambda x, w, g: jnp.sum(ops.depthwise_conv(x, w, impl="native") * g)
      grad = jax.value_and_grad(loss, argnums=(0, 1))
      data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
      sharded = jax.jit(grad, in_shardings=(data, rep, data)).lower(x, w, g).compile()
      assert "all-gather" not in sharded.as_text()
      (v1, (dx1, dw1)), (v0, (dx0, dw0)) = sharded(x, w, g), jax.jit(grad)(x, w, g)
      assert dx1.sharding.spec == P("data"), dx1.sharding
      np.testing.assert_allclose(v1, v0, rtol=1e-6)
      np.testing.assert_array_equal(dx1, dx0)
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
