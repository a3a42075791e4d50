"""Scanned and rematerialised blocks compute what the unrolled blocks compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moceir_jax import layers, repeat
from moceir_jax import model as model_lib


def _affine_blocks(widths):
  rngs = layers.Init(0)
  return [layers.Linear(a, b, bias=True, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]


@pytest.mark.parametrize("scan,remat", [(True, False), (True, True), (False, True)])
def test_apply_matches_a_python_loop_with_xs_and_ys(scan, remat):
  blocks = _affine_blocks([4] * 4)  # three identical blocks
  xs = jnp.arange(3.0)

  def fn(blk, h, x, scale):  # scale: a closed-over value whose gradient must flow
    h = jnp.tanh(blk(h)) * x * scale
    return h, jnp.sum(h)

  def loss(model_state, h0):
    mods = nnx.merge(*model_state)
    scale = 1.0 + jnp.mean(h0 ** 2)
    out, ys = repeat.apply(mods, lambda b, h, x: fn(b, h, x, scale), h0, xs,
                           scan=scan, remat=remat)
    return jnp.sum(out ** 2) + jnp.sum(ys)

  def loss_loop(model_state, h0):
    h, ys = h0, []
    scale = 1.0 + jnp.mean(h0 ** 2)
    for i, blk in enumerate(nnx.merge(*model_state)):
      h, y = fn(blk, h, xs[i], scale)
      ys.append(y)
    return jnp.sum(h ** 2) + jnp.sum(jnp.stack(ys))

  model_state = nnx.split(nnx.List(blocks))
  h0 = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
  got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(model_state, h0)
  want = jax.jit(jax.value_and_grad(loss_loop, argnums=(0, 1)))(model_state, h0)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert any(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(got[1]))


def test_unrolled_remat_keeps_only_the_block_inputs():
  # XLA:CPU merges a plain jax.checkpoint's recomputation back into the forward
  # pass; ours must actually free each block's intermediates.
  blocks = _affine_blocks([256] * 13)  # twelve blocks, each with a few 2 MB intermediates

  def fn(blk, h, _):
    a = jnp.tanh(blk(h))
    return jnp.cos(blk(jnp.sin(a) * h)) + h, None

  def temp_bytes(remat):
    def loss(model_state, h0):
      return jnp.sum(repeat.apply(nnx.merge(*model_state), fn, h0, scan=False, remat=remat)[0])
    h0 = jnp.zeros((2048, 256))
    compiled = jax.jit(jax.grad(loss)).lower(nnx.split(nnx.List(blocks)), h0).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  kept, recomputed = temp_bytes(False), temp_bytes(True)
  assert recomputed < 0.5 * kept, (kept, recomputed)


def test_blocks_of_different_shapes_run_unrolled():
  blocks = _affine_blocks([4, 6, 3])  # not stackable: must still run, in order
  h, ys = repeat.apply(blocks, lambda b, h, _: (b(h), h.shape[-1]), jnp.ones((1, 4)))
  assert h.shape == (1, 3)
  np.testing.assert_array_equal(ys, [4, 6])
  with pytest.raises(ValueError, match="at least one block"):
    repeat.apply([], lambda b, h, _: (h, None), jnp.ones(1))


def _micro(**kw):
  return model_lib.moceir_micro(num_blocks=(2, 2), num_dec_blocks=(2,),
                                num_refinement_blocks=2, **kw)


def test_scanned_model_equals_unrolled_model_in_training_and_eval():
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
  key = jax.random.key(2)
  ref = model_lib.create(_micro(scan_blocks=False))
  state = nnx.state(ref)

  def loss_and_grads(cfg):
    graphdef = nnx.graphdef(model_lib.create(cfg))

    def loss(s):
      o = nnx.merge(graphdef, s)(x, train=True, noise_key=key)
      return jnp.mean(jnp.abs(o.image - x)) + 0.01 * o.aux_loss, o.routing

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(state)

  (l0, r0), g0 = loss_and_grads(_micro(scan_blocks=False))
  for cfg in (_micro(scan_blocks=True, remat=True), _micro(scan_blocks=False, remat=True),
              _micro(scan_blocks=False, remat_levels=1)):
    (l1, r1), g1 = loss_and_grads(cfg)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert sorted(r1) == sorted(r0) == ["dec.0.2.layers.0", "dec.0.2.layers.1"]
    for name in r0:
      np.testing.assert_array_equal(r1[name]["indices"], r0[name]["indices"])

  # Eval with an imposed routing and captured activations: same names, same values.
  routing = {n: (np.array([i % 4]), np.array([1.0])) for i, n in enumerate(r0)}
  outs = []
  for cfg in (_micro(scan_blocks=False), _micro(scan_blocks=True)):
    graphdef = nnx.graphdef(model_lib.create(cfg))
    outs.append(jax.jit(lambda s, g=graphdef: nnx.merge(g, s)(x, capture=True,
                                                              routing=routing))(state))
  assert sorted(outs[0].activations) == sorted(outs[1].activations)
  for name in outs[0].activations:
    np.testing.assert_allclose(outs[1].activations[name], outs[0].activations[name],
                               rtol=1e-5, atol=1e-6)
  for name, (idx, _) in routing.items():
    np.testing.assert_array_equal(outs[1].routing[name]["indices"][:, 0], [idx[0]] * 2)


def test_remat_levels_frees_the_full_resolution_activations():
  # Only the top level is rematerialised; at 64x64 it holds most of the
  # activations, so the compiled gradient needs markedly less scratch memory.
  x = jnp.zeros((2, 64, 64, 3))

  def temp_bytes(cfg):
    graphdef, state = nnx.split(model_lib.create(cfg))

    def loss(s):
      o = nnx.merge(graphdef, s)(x, train=True, noise_key=jax.random.key(0), dispatch="dense")
      return jnp.mean(jnp.abs(o.image - x))

    compiled = jax.jit(jax.grad(loss)).lower(state).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  none, top = temp_bytes(_micro()), temp_bytes(_micro(remat_levels=1))
  everything = temp_bytes(_micro(remat=True))
  assert top < 0.75 * none, (none, top)
  assert everything <= top, (top, everything)
