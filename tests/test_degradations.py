"""Each synthetic degradation does what its name says, measurably, and is seeded."""

import numpy as np
import pytest
from skimage import data

from moceir_jax import degradations as D


@pytest.fixture(scope="module")
def photo():
  return (data.astronaut()[100:228, 150:278].astype(np.float32) / 255.0)


def _hf_energy(img):
  g = img.mean(-1)
  lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
  return float(np.mean(lap ** 2))


@pytest.mark.parametrize("sigma", [15.0, 25.0, 50.0])
def test_noise_std_matches_sigma(sigma):
  grey = np.full((256, 256, 3), 0.5, np.float32)  # mid-grey: almost no clipping
  out = D.GaussianNoise(sigma, quantize=False)(grey, np.random.default_rng(0))
  assert abs(np.std(out - grey) * 255 / sigma - 1) < 0.05
  q = D.GaussianNoise(sigma)(grey, np.random.default_rng(0))
  assert np.allclose(q * 255, np.round(q * 255), atol=1e-3)  # 8-bit values, like the reference
  assert abs(np.std(q - grey) * 255 / sigma - 1) < 0.05


def test_haze_lowers_contrast_and_lifts_darks(photo):
  out = D.Haze(beta=1.0)(photo, np.random.default_rng(1))
  assert out.std() < 0.8 * photo.std()
  dark = photo.mean(-1) < 0.15
  assert dark.any() and out[dark].mean() > photo[dark].mean() + 0.1


def test_blur_removes_high_frequencies(photo):
  for seed in range(4):  # motion and defocus kernels both
    out = D.Blur()(photo, np.random.default_rng(seed))
    assert _hf_energy(out) < 0.5 * _hf_energy(photo)


def test_low_light_darkens(photo):
  out = D.LowLight()(photo, np.random.default_rng(2))
  assert out.mean() < 0.4 * photo.mean()


def test_rain_adds_bright_streaks(photo):
  out = D.Rain()(photo, np.random.default_rng(3))
  assert np.all(out >= photo - 1e-6)
  assert out.mean() > photo.mean() + 0.005
  assert _hf_energy(out) > _hf_energy(photo)


def test_jpeg_changes_the_image_but_not_its_shape(photo):
  out = D.JPEG(quality=10)(photo, np.random.default_rng(0))
  assert out.shape == photo.shape and out.dtype == np.float32
  assert 0.005 < np.mean(np.abs(out - photo)) < 0.1


@pytest.mark.parametrize("name", sorted(D.TASKS))
def test_every_task_is_seeded_and_in_range(photo, name):
  deg = D.get(name)
  a = deg(photo, np.random.default_rng(7))
  b = deg(photo, np.random.default_rng(7))
  c = deg(photo, np.random.default_rng(8))
  assert a.shape == photo.shape and a.dtype == np.float32
  assert a.min() >= 0 and a.max() <= 1
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) or name == "jpeg"  # fixed-quality JPEG is deterministic


def test_mixtures_compose_their_parts(photo):
  mix = D.compose(["lowlight", "dehaze", "derain"])
  out = mix(photo, np.random.default_rng(0))
  assert out.mean() < photo.mean()  # low light dominates
  with pytest.raises(ValueError, match="unknown degradation 'fog'"):
    D.get("fog")
