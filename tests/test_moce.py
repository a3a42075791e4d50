"""Expert dispatch: sparse (expert-skipping) inference equals the dense training path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jit_forward, nhwc, reference_config, reference_file, reference_io
from moceir_jax import convert
from moceir_jax import model as model_lib
from moceir_jax.layers import Init
from moceir_jax.moce import MoCELayer


def _reference_model(name):
  sd = convert.read_state_dict(reference_file(f"{name}_state_dict.npz"))
  cfg = model_lib.MoCEIRConfig.from_reference_kwargs(reference_config(name), routing_noise="off")
  return convert.convert_state_dict(sd, cfg)


@pytest.mark.parametrize("name", ["tinyA", "tinyB"])
def test_sparse_equals_dense_on_batches_mixing_routes(name):
  # tinyA is top-1 and its two train samples take different experts at dec.2;
  # tinyB is top-2 with different expert pairs/orders per sample. A third
  # sample (the eval image, cropped) makes the batch larger than two.
  model = _reference_model(name)
  io = reference_io(name)
  x = np.concatenate([nhwc(io["x_train"]), nhwc(io["x_eval"])[:, :32, :32]], axis=0)
  x = jnp.asarray(x)
  dense = jit_forward(model, dispatch="dense")(x)
  sparse = jit_forward(model, dispatch="sparse")(x)
  routes = {n: np.asarray(r["indices"]) for n, r in dense.routing.items()}
  assert any(len({tuple(row) for row in r}) > 1 for r in routes.values()), routes
  for n in routes:
    np.testing.assert_array_equal(sparse.routing[n]["indices"], routes[n])
  np.testing.assert_allclose(sparse.image, dense.image, atol=1e-5, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_and_dense_gradients_agree(top_k):
  # Training uses dense dispatch; it must give the gradients of the sparse
  # computation (zero for experts no image selected). The router is steered by
  # a one-hot frequency embedding so the batch mixes experts by construction.
  layer = MoCELayer(8, 4, num_experts=4, top_k=top_k, rank=2, rank_type="spread",
                    with_complexity=True, complexity_scale="max", rngs=Init(0))
  layer.router.freq_gate.kernel.set_value(10 * jnp.eye(4))
  layer.router.gate.kernel.set_value(jnp.zeros((8, 4)))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 12, 12, 8)), jnp.float32)
  shared = jnp.asarray(rng.normal(size=(4, 12, 12, 8)), jnp.float32)
  chosen = [0, 2, 2, 1]
  freq = jax.nn.one_hot(jnp.asarray(chosen), 4)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, dispatch):
    out, info = nnx.merge(graphdef, params, rest)(x, freq, shared, train=True, dispatch=dispatch)
    return jnp.mean(out ** 2) + 0.01 * info["aux"], info["indices"]

  (ld, idx), gd = jax.jit(jax.value_and_grad(lambda p: loss(p, "dense"), has_aux=True))(params)
  (ls, _), gs = jax.jit(jax.value_and_grad(lambda p: loss(p, "sparse"), has_aux=True))(params)
  np.testing.assert_array_equal(np.asarray(idx)[:, 0], chosen)
  np.testing.assert_allclose(ls, ld, rtol=1e-6)
  flat_d, flat_s = dict(nnx.to_flat_state(gd)), dict(nnx.to_flat_state(gs))
  for path, g in flat_d.items():
    np.testing.assert_allclose(flat_s[path][...], g[...], atol=1e-6, rtol=1e-4, err_msg=str(path))
  used = set(np.asarray(idx).ravel().tolist())
  for e in range(4):
    grad_norm = float(jnp.abs(flat_d[("experts", e, "up", "kernel")][...]).max())
    assert (grad_norm > 0) == (e in used), (e, used, grad_norm)
