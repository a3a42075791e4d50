"""Architecture, parameter counts, configuration errors and routing-noise behaviour."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jit_forward
from moceir_jax import model as model_lib
from moceir_jax.moce import MoCELayer


def test_parameter_counts_equal_the_official_models():
  assert model_lib.param_count(model_lib.moceir_s()) == 11_477_752
  assert model_lib.param_count(model_lib.moceir()) == 25_353_796


# Per-expert parameter counts of the official models (e0..e3, patch 4/8/16/32),
# decoder level by level (deepest first), as measured on the reference.
OFFICIAL_EXPERT_PARAMS = {
    "s": [[8976, 20000, 48192, 129152], [2696, 5904, 13856, 35904], [900, 1928, 4368, 10784]],
    "base": [[18840, 42288, 103008, 279744], [5388, 11928, 28464, 75360],
             [1686, 3660, 8472, 21552]],
}


@pytest.mark.parametrize("variant", ["s", "base"])
def test_expert_sizes_and_complexity_buffers(variant):
  model = model_lib.abstract(model_lib.variant(variant))
  expected = OFFICIAL_EXPERT_PARAMS[variant]
  total = 0
  for level, stage in enumerate(model.decoder):
    for block in stage.blocks:
      adapter: MoCELayer = block.adapter
      counts = [model_lib.param_count(e) for e in adapter.experts]
      assert counts == expected[level]
      assert adapter.patches == (4, 8, 16, 32)
      total += sum(counts)
  # the complexity bias is the experts' size relative to the largest
  concrete = model_lib.create(model_lib.variant(variant))
  for level, stage in enumerate(concrete.decoder):
    c = np.asarray(stage.blocks[0].adapter.router.complexity[...])
    np.testing.assert_allclose(c, np.asarray(expected[level]) / max(expected[level]), rtol=1e-6)
  assert total == {"s": 1_094_680, "base": 2_330_820}[variant]


@pytest.mark.parametrize("variant", ["s", "base"])
def test_full_size_shapes_without_compiling(variant):
  cfg = model_lib.variant(variant)
  graphdef, state = nnx.split(model_lib.abstract(cfg))
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)

  def fwd(state, x):
    out = nnx.merge(graphdef, state)(x, train=True, noise_key=jax.random.key(0), capture=True)
    return out.image, out.aux_loss, out.activations, out.routing

  image, aux, acts, routing = jax.eval_shape(fwd, state, x)
  d = cfg.dim
  assert image.shape == (2, 256, 256, 3) and aux.shape == ()
  assert acts["enc.0.0"].shape == (2, 256, 256, d)
  assert acts["latent"].shape == (2, 32, 32, 8 * d)
  assert acts["freq_embed"].shape == (2, 8 * d)
  assert list(routing) == cfg.block_names() and len(routing) == 10
  assert acts["dec.0.2.layers.3"].shape == (2, 64, 64, 4 * d)
  assert acts["dec.2.2.layers.1"].shape == (2, 256, 256, d)
  assert routing["dec.1.2.layers.0"]["indices"].shape == (2, 1)
  assert routing["dec.1.2.layers.0"]["gates"].shape == (2, 4)


def test_reference_layout_bookkeeping():
  cfg = model_lib.moceir_s()
  # num_dec_blocks is listed shallow-to-deep; heads reversed and offset by one
  assert cfg.decoder_layout() == [(128, 4, 4), (64, 2, 4), (32, 1, 2)]
  assert cfg.freq_dim == 256 and cfg.size_multiple == 8


@pytest.mark.parametrize("kw, message", [
    (dict(heads=(1, 2, 4)), "heads=(1, 2, 4) must have 4 entries"),
    (dict(num_dec_blocks=(1, 1)), "num_dec_blocks=(1, 1) must have 3 entries"),
    (dict(heads=(1, 3, 4, 8)), "width 16 is not divisible by its 3 attention heads"),
    (dict(top_k=5), "top_k=5 must be between 1 and num_experts=4"),
    (dict(routing_noise="eval"), "routing_noise='eval' is not one of"),
    (dict(rank_type="spred"), "rank_type='spred' is not one of"),
    (dict(dtype="float8"), "dtype='float8' is not one of"),
    (dict(depthwise_impl="cudnn"), "depthwise_impl='cudnn'"),
    (dict(out_channels=1), "in_channels must equal out_channels"),
    (dict(remat_levels=5), "remat_levels=5 must be between 0 and levels=4"),
])
def test_bad_configs_are_named(kw, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    model_lib.moceir_tiny(**kw)


def test_config_dict_round_trip_and_unknown_keys():
  cfg = model_lib.moceir_tiny(top_k=2, routing_noise="always")
  assert model_lib.MoCEIRConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match=r"unknown MoCEIRConfig keys \['topk'\]"):
    model_lib.MoCEIRConfig.from_dict({**cfg.to_dict(), "topk": 2})
  with pytest.raises(ValueError, match="unknown model variant 'large'"):
    model_lib.variant("large")


def test_size_and_key_errors():
  model = model_lib.create(model_lib.moceir_tiny())
  with pytest.raises(ValueError, match="36x52 is not a multiple of 8"):
    model(jnp.zeros((1, 36, 52, 3)))
  with pytest.raises(ValueError, match=r"expected input of shape \(B, H, W, 3\)"):
    model(jnp.zeros((1, 32, 32, 4)))
  with pytest.raises(ValueError, match="needs a noise_key when train=True"):
    model(jnp.zeros((1, 32, 32, 3)), train=True)
  always = model_lib.create(model_lib.moceir_tiny(routing_noise="always"))
  with pytest.raises(ValueError, match="needs a noise_key when train=False"):
    always(jnp.zeros((1, 32, 32, 3)))


@pytest.fixture(scope="module")
def small():
  cfg = model_lib.MoCEIRConfig(dim=8, levels=2, heads=(1, 2), num_blocks=(1, 1),
                               num_dec_blocks=(2,), num_refinement_blocks=1)
  return model_lib.create(cfg, seed=1)


def test_routing_noise_is_keyed_and_only_in_training_by_default(small):
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 16, 16, 3)), jnp.float32)
  train = jit_forward(small, train=True)
  a, b, c = train(x, jax.random.key(1)), train(x, jax.random.key(1)), train(x, jax.random.key(2))
  for name in small.cfg.block_names():
    np.testing.assert_array_equal(a.routing[name]["values"], b.routing[name]["values"])
    assert not np.allclose(a.routing[name]["values"], c.routing[name]["values"])
  # the first block's clean logits come before any noise has acted, so they do
  # not depend on the key (later blocks see features the noise has routed)
  first = small.cfg.block_names()[0]
  np.testing.assert_allclose(a.routing[first]["logits"], c.routing[first]["logits"], atol=1e-6)
  np.testing.assert_array_equal(a.image, b.image)
  assert float(a.aux_loss) > 0
  ev = jit_forward(small)(x)
  assert float(ev.aux_loss) == 0.0
  for name in small.cfg.block_names():  # eval: softmax of the clean logits
    np.testing.assert_allclose(ev.routing[name]["values"][:, 0],
                               jax.nn.softmax(ev.routing[name]["logits"]).max(-1), rtol=1e-6)


def test_official_eval_noise_switch(small):
  cfg = dataclasses.replace(small.cfg, routing_noise="always")
  noisy = model_lib.create(cfg, seed=1)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16, 16, 3)), jnp.float32)
  fwd = jit_forward(noisy)
  a, b = fwd(x, jax.random.key(0)), fwd(x, jax.random.key(5))
  name = cfg.block_names()[0]
  assert not np.allclose(a.routing[name]["values"], b.routing[name]["values"])


def test_bfloat16_compute_stays_close_to_float32(small):
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 16, 16, 3)), jnp.float32)
  ref = jit_forward(small, dispatch="dense")(x).image
  half = model_lib.create(small.cfg.replace(dtype="bfloat16"))
  nnx.update(half, nnx.state(small))
  out = jit_forward(half, dispatch="dense")(x).image
  assert out.dtype == jnp.float32
  err = float(jnp.max(jnp.abs(out - ref)))
  assert 0 < err < 0.1 * float(jnp.max(jnp.abs(ref - x)))
