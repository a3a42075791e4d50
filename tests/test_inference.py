"""Inference on any image size, and the model directory format."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jit_forward
from moceir_jax import checkpoint, inference
from moceir_jax import model as model_lib


@pytest.fixture(scope="module")
def tiny():
  return model_lib.create(model_lib.moceir_tiny(), seed=0)


def test_pad_to_multiple_reflects_at_bottom_right():
  x = np.arange(2 * 5 * 3 * 1, dtype=np.float32).reshape(2, 5, 3, 1)
  p = inference.pad_to_multiple(x, 4)
  assert p.shape == (2, 8, 4, 1)
  np.testing.assert_array_equal(p[:, :5, :3], x)
  np.testing.assert_array_equal(p[:, 5:, :3], x[:, [3, 2, 1]])  # reflect, edge not repeated
  np.testing.assert_array_equal(p[:, :5, 3], x[:, :, 1])
  assert inference.pad_to_multiple(x[:, :4, :2], 2) is not None


def test_pad_handles_images_smaller_than_the_padding():
  one = np.full((1, 1, 1, 3), 0.25, np.float32)
  p = inference.pad_to_multiple(one, 8)
  assert p.shape == (1, 8, 8, 3) and np.all(p == 0.25)
  two = np.asarray([[[[0.0]], [[1.0]]]], np.float32)  # 2x1
  p = inference.pad_to_multiple(two, 8)
  assert p.shape == (1, 8, 8, 1)
  np.testing.assert_array_equal(p[0, :, 0, 0], [0, 1, 0, 1, 0, 1, 0, 1])


def test_restorer_any_size_equals_padded_model(tiny):
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(37, 91, 3)).astype(np.float32)
  restorer = inference.Restorer(tiny)
  out = restorer(x)
  assert out.image.shape == (37, 91, 3)
  # padded by reflection to the size bucket (64) that shares compilations
  padded = inference.pad_to(x[None], 64, 128)
  direct = jit_forward(tiny)(jnp.asarray(padded))
  np.testing.assert_allclose(out.image, direct.image[0, :37, :91], atol=1e-6)
  for name in tiny.cfg.block_names():
    np.testing.assert_array_equal(out.indices[name], direct.routing[name]["indices"][0])
  tiny_img = restorer(np.full((1, 1, 3), 0.5, np.float32))
  assert tiny_img.image.shape == (1, 1, 3) and np.isfinite(tiny_img.image).all()
  with pytest.raises(ValueError, match=r"got shape \(4, 4\)"):
    restorer(np.zeros((4, 4), np.float32))


def test_model_directory_round_trip(tmp_path, tiny):
  path = str(tmp_path / "model")
  checkpoint.save_model(path, tiny)
  assert sorted(os.listdir(tmp_path)) == ["model"]
  loaded = checkpoint.load_model(path)
  assert loaded.cfg == tiny.cfg
  ours = dict(nnx.to_flat_state(nnx.state(tiny)))
  for p, v in nnx.to_flat_state(nnx.state(loaded)):
    np.testing.assert_array_equal(v[...], ours[p][...])
  # run-time fields can be overridden at load time
  assert checkpoint.load_model(path, routing_noise="always").cfg.routing_noise == "always"


def test_model_directory_errors(tmp_path, tiny):
  with pytest.raises(FileNotFoundError, match="not a model directory"):
    checkpoint.load_model(str(tmp_path))
  path = str(tmp_path / "model")
  checkpoint.save_model(path, tiny)
  cfg_file = os.path.join(path, checkpoint.CONFIG_FILE)
  with open(cfg_file, "w") as f:  # claims a wider model than the saved weights
    f.write(tiny.cfg.replace(dim=16).to_json())
  with pytest.raises(ValueError, match="do not fit"):
    checkpoint.load_model(path)
  with open(cfg_file, "w") as f:
    f.write('{"dim": 8, "depth": 3}')
  with pytest.raises(ValueError, match=r"model_config.json: unknown MoCEIRConfig keys \['depth'\]"):
    checkpoint.load_model(path)
