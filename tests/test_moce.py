"""Expert dispatch: sparse (expert-skipping) inference equals the dense training path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jit_forward, nhwc, reference_config, reference_file, reference_io
from moceir_jax import convert, moce
from moceir_jax import model as model_lib
from moceir_jax.layers import Init
from moceir_jax.moce import MoCELayer


def _reference_model(name):
  sd = convert.read_state_dict(reference_file(f"{name}_state_dict.npz"))
  cfg = model_lib.MoCEIRConfig.from_reference_kwargs(reference_config(name), routing_noise="off")
  return convert.convert_state_dict(sd, cfg)


@pytest.fixture(params=["unrolled", "looped"])
def sparse_loop(request, monkeypatch):
  """Runs a test through both forms of sparse dispatch (see moce.UNROLL_MAX_BATCH)."""
  if request.param == "looped":
    monkeypatch.setattr(moce, "UNROLL_MAX_BATCH", 1)
  return request.param


@pytest.mark.parametrize("name", ["tinyA", "tinyB"])
def test_sparse_equals_dense_on_batches_mixing_routes(name, sparse_loop):
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
def test_sparse_and_dense_gradients_agree(top_k, sparse_loop):
  # Training uses either dispatch (sparse on CPU, dense on accelerators); both
  # must give the gradients of the routed computation (zero for experts no
  # image selected). The router is steered by a one-hot frequency embedding so
  # the batch mixes experts by construction.
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


def test_training_dispatch_follows_config_and_backend():
  assert moce.default_train_dispatch() == ("sparse" if jax.default_backend() == "cpu" else "dense")
  with pytest.raises(ValueError, match="train_dispatch='spares' is not one of"):
    model_lib.MoCEIRConfig(train_dispatch="spares")
  # Both training dispatches give one loss on a whole (tiny) model.
  sd = convert.read_state_dict(reference_file("tinyA_state_dict.npz"))
  cfg = model_lib.MoCEIRConfig.from_reference_kwargs(reference_config("tinyA"), routing_noise="off")
  x = jnp.asarray(nhwc(reference_io("tinyA")["x_train"]))
  losses = []
  for dispatch in moce.DISPATCH_MODES:
    model = convert.convert_state_dict(sd, cfg.replace(train_dispatch=dispatch))
    out = nnx.jit(lambda m, x: m(x, train=True))(model, x)
    losses.append(float(jnp.mean(jnp.abs(out.image - x))))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
