"""Synthetic degradations, generated on the fly from clean images (NumPy, seeded).

Each degradation is a small frozen dataclass: its fields are its parameters
(fixed values or ``(low, high)`` ranges drawn per call) and calling it with a
clean HxWx3 float32 image in [0, 1] and a ``numpy.random.Generator`` returns
the degraded image, float32 in [0, 1]. They compose with :class:`Compose`
(CDD11-style mixtures such as low light + haze + rain). The data pipeline calls
them inside its workers with per-sample generators, so results are
reproducible for a seed whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Sequence, Union

import numpy as np
from PIL import Image
from scipy import ndimage

Range = Union[float, tuple[float, float]]


def _draw(rng: np.random.Generator, value: Range) -> float:
  if isinstance(value, (tuple, list)):
    lo, hi = value
    return float(rng.uniform(lo, hi))
  return float(value)


def _smooth_field(rng, h, w, scale: float) -> np.ndarray:
  """A smooth random field in [0, 1]: low-resolution noise upsampled."""
  gh, gw = max(2, int(h / scale) + 2), max(2, int(w / scale) + 2)
  coarse = rng.uniform(size=(gh, gw))
  field = ndimage.zoom(coarse, (h / (gh - 1), w / (gw - 1)), order=3, mode="nearest")[:h, :w]
  field = ndimage.gaussian_filter(field, sigma=max(scale / 4, 1))
  lo, hi = field.min(), field.max()
  return ((field - lo) / max(hi - lo, 1e-6)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class GaussianNoise:
  """Additive white Gaussian noise; ``sigma`` on the 0-255 scale, as the benchmarks state it.

  ``quantize`` rounds to 8 bits like the official pipeline, which adds the
  noise to uint8 images and stores the result as uint8.
  """
  sigma: Range = 25.0
  quantize: bool = True

  def __call__(self, img, rng):
    sigma = _draw(rng, self.sigma) / 255.0
    out = np.clip(img + rng.standard_normal(img.shape, dtype=np.float32) * sigma, 0.0, 1.0)
    return (np.round(out * 255) / 255).astype(np.float32) if self.quantize else out


@dataclasses.dataclass(frozen=True)
class Rain:
  """Rain streaks: sparse seeds smeared along a random angle by a blurred line kernel."""
  # Severity matches Rain100L: held-out inputs average 26 dB (the real test pairs: 26.8 dB).
  density: Range = (0.001, 0.005)  # fraction of pixels seeding a streak
  length: Range = (10.0, 30.0)  # streak length in pixels
  angle: Range = (-30.0, 30.0)  # degrees from vertical
  brightness: Range = (0.6, 0.9)
  width_blur: Range = (0.5, 1.0)  # Gaussian blur across the streak (px)

  def __call__(self, img, rng):
    h, w = img.shape[:2]
    seeds = (rng.uniform(size=(h, w)) < _draw(rng, self.density)).astype(np.float32)
    seeds *= rng.uniform(0.5, 1.0, size=(h, w)).astype(np.float32)
    kernel = _line_kernel(_draw(rng, self.length), _draw(rng, self.angle) + 90.0)
    streaks = ndimage.convolve(seeds, kernel, mode="wrap")
    streaks = ndimage.gaussian_filter(streaks, _draw(rng, self.width_blur))
    streaks = np.clip(streaks / max(streaks.max(), 1e-6), 0, 1) * _draw(rng, self.brightness)
    # screen blend: rain brightens, never darkens
    return (1.0 - (1.0 - img) * (1.0 - streaks[..., None])).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Haze:
  """Atmospheric scattering I = J*t + A*(1 - t), t = exp(-beta * depth).

  Depth is a smooth random field (haze thickens with distance), the airlight A
  a bright, slightly tinted grey.
  """
  # Severity near SOTS-outdoor's (the real test pairs: 18.3 dB): held-out inputs average
  # 16.5 dB, training crops 19 dB. Thicker haze (beta up to 1.8, inputs near 11 dB) leaves
  # too little of the scene to learn from in a CPU-sized budget.
  beta: Range = (0.2, 1.0)
  airlight: Range = (0.7, 1.0)
  tint: float = 0.05  # per-channel airlight variation
  depth_scale: float = 64.0  # spatial scale of depth variations (px)

  def __call__(self, img, rng):
    h, w = img.shape[:2]
    depth = 0.3 + 0.7 * _smooth_field(rng, h, w, self.depth_scale)
    t = np.exp(-_draw(rng, self.beta) * depth)[..., None]
    a = _draw(rng, self.airlight) + rng.uniform(-self.tint, self.tint, size=3)
    return np.clip(img * t + np.clip(a, 0, 1) * (1 - t), 0, 1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Blur:
  """Motion blur (a line kernel at a random angle) or defocus (a disk), chosen per call."""
  # Held-out inputs average 25.8 dB, GoPro's blurred inputs about 25.6 dB.
  motion_length: Range = (5.0, 15.0)
  defocus_radius: Range = (1.0, 3.0)
  p_motion: float = 0.7

  def __call__(self, img, rng):
    if rng.uniform() < self.p_motion:
      kernel = _line_kernel(_draw(rng, self.motion_length), rng.uniform(0, 180))
    else:
      kernel = _disk_kernel(_draw(rng, self.defocus_radius))
    out = np.stack([ndimage.convolve(img[..., c], kernel, mode="reflect") for c in range(3)], -1)
    return np.clip(out, 0, 1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LowLight:
  """Under-exposure: exposure scale and gamma, then shot and read noise of a sensor."""
  exposure: Range = (0.05, 0.3)
  gamma: Range = (1.2, 2.0)
  shot_noise: Range = (0.0, 0.02)  # std of Poisson-like noise at signal 1
  read_noise: Range = (0.0, 0.01)

  def __call__(self, img, rng):
    dark = _draw(rng, self.exposure) * np.power(img, _draw(rng, self.gamma))
    shot = _draw(rng, self.shot_noise)
    std = np.sqrt(shot ** 2 * dark + _draw(rng, self.read_noise) ** 2)
    noisy = dark + rng.standard_normal(img.shape, dtype=np.float32) * std
    return np.clip(noisy, 0, 1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class JPEG:
  """JPEG compression artefacts at a random quality (Pillow's encoder)."""
  quality: Range = (10.0, 40.0)

  def __call__(self, img, rng):
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
        buf, format="JPEG", quality=int(round(_draw(rng, self.quality))))
    buf.seek(0)
    with Image.open(buf) as im:
      return (np.asarray(im.convert("RGB"), np.float32) / 255.0)


@dataclasses.dataclass(frozen=True)
class Compose:
  """Applies degradations in order (e.g. low light, then haze, then rain)."""
  steps: tuple = ()

  def __call__(self, img, rng):
    for step in self.steps:
      img = step(img, rng)
    return img


def _line_kernel(length: float, angle_deg: float) -> np.ndarray:
  """Normalised kernel of a line of ``length`` px through the centre at ``angle_deg``."""
  size = int(np.ceil(length)) | 1
  k = np.zeros((size, size), np.float32)
  c = size // 2
  theta = np.deg2rad(angle_deg)
  for s in np.linspace(-length / 2, length / 2, num=max(2, int(length) * 3)):
    y, x = c - s * np.sin(theta), c + s * np.cos(theta)
    k[int(round(min(max(y, 0), size - 1))), int(round(min(max(x, 0), size - 1)))] = 1.0
  return k / k.sum()


def _disk_kernel(radius: float) -> np.ndarray:
  r = int(np.ceil(radius))
  yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
  k = (yy ** 2 + xx ** 2 <= radius ** 2).astype(np.float32)
  return k / k.sum()


# ----------------------------------------------------------------------------
# Named tasks: what the pipeline, evaluation and routing reports refer to.

TASKS: dict[str, object] = {
    "denoise_15": GaussianNoise(15.0),
    "denoise_25": GaussianNoise(25.0),
    "denoise_50": GaussianNoise(50.0),
    "derain": Rain(),
    "dehaze": Haze(),
    "deblur": Blur(),
    "lowlight": LowLight(),
    "jpeg": JPEG(),
    # CDD11-style mixtures
    "low_haze": Compose((LowLight(), Haze())),
    "low_rain": Compose((LowLight(), Rain())),
    "haze_rain": Compose((Haze(), Rain())),
    "low_haze_rain": Compose((LowLight(), Haze(), Rain())),
}


def get(name: str):
  if name not in TASKS:
    raise ValueError(f"unknown degradation {name!r}; known: {', '.join(TASKS)}")
  return TASKS[name]


def compose(names: Sequence[str]) -> Compose:
  return Compose(tuple(get(n) for n in names))
