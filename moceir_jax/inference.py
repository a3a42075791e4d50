"""Jitted inference on images of any size.

The network needs H and W to be multiples of ``2**(levels-1)``; :class:`Restorer`
pads by reflection at the bottom/right, runs the compiled model and crops back,
so callers never meet that limit. Routing is deterministic unless the model's
config asks for the official test-time noise, in which case a key is required.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moceir_jax import model as model_lib
from moceir_jax.padding import pad_to


def pad_to_multiple(x, multiple: int):
  """Pads NHWC ``x`` at the bottom/right to multiples of ``multiple`` (see :func:`pad_to`)."""
  h, w = x.shape[1], x.shape[2]
  return pad_to(x, -(-h // multiple) * multiple, -(-w // multiple) * multiple)


class Restored(NamedTuple):
  image: jax.Array  # (B, H, W, C) float32, not clipped
  indices: dict  # decoder block name -> (B, k) selected experts
  gates: dict  # decoder block name -> (B, E) gate values


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  """Start offsets of tiles of ``tile`` pixels covering ``size`` with at least ``overlap``."""
  if size <= tile:
    return [0]
  stride = tile - overlap
  starts = list(range(0, size - tile + 1, stride))
  if starts[-1] + tile < size:
    starts.append(size - tile)
  return starts


def blend_window(tile: int, overlap: int) -> np.ndarray:
  """(tile, tile) weights: 1 inside, a raised-cosine ramp over ``overlap`` pixels at the edges.

  Overlapping tiles are averaged with these weights, so seams fade smoothly;
  the ramp never reaches 0, so pixels seen by a single tile keep their value.
  """
  w = np.ones(tile, np.float32)
  if overlap > 0:
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap, dtype=np.float32) + 0.5) / overlap)
    w[:overlap] = ramp
    w[-overlap:] = np.minimum(w[-overlap:], ramp[::-1])
  return np.outer(w, w)


def bucket_size(n: int, multiple: int, bucket: int) -> int:
  """Pads sizes up to a multiple of ``bucket`` so mixed sizes share compilations."""
  step = max(multiple, bucket)
  return -(-n // step) * step


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(graphdef, dispatch, state, x, key, routing):
  # Module-level so every Restorer of the same architecture shares compilations.
  model = nnx.merge(graphdef, state)
  out = model(x, train=False, noise_key=key, dispatch=dispatch, routing=routing)
  return (out.image, {k: v["indices"] for k, v in out.routing.items()},
          {k: v["gates"] for k, v in out.routing.items()},
          {k: v["values"] for k, v in out.routing.items()})


class Restorer:
  """Compiled inference for one model; call it with NHWC/HWC float images in [0, 1].

  Images larger than ``tile`` (either side) are restored in overlapping tiles
  blended with :func:`blend_window`, so memory depends on the tile, not the
  image. Routing in MoCE-IR is a per-image decision, so all tiles share the
  decision the router makes on a downscaled view of the whole image (at most
  ``route_size`` pixels a side), as if the image had been restored whole.
  Smaller images are padded to ``bucket`` multiples: a folder of mixed sizes
  compiles once per bucket, not once per image.
  """

  def __init__(self, model: model_lib.MoCEIR, dispatch: str = "sparse", *, tile: int = 512,
               overlap: int = 32, tile_batch: int = 4, route_size: int = 512, bucket: int = 64):
    m = model.cfg.size_multiple
    if tile % m or tile <= 2 * overlap:
      raise ValueError(f"tile={tile} must be a multiple of {m} and larger than twice "
                       f"overlap={overlap}")
    self.cfg = model.cfg
    self.dispatch = dispatch
    self.tile, self.overlap, self.tile_batch = tile, overlap, tile_batch
    self.route_size, self.bucket = route_size, bucket
    self.graphdef, self.state = nnx.split(model)

  def _run(self, x, key, routing):
    return _forward(self.graphdef, self.dispatch, self.state, x, key, routing)

  def _key(self, key):
    if self.cfg.routing_noise == "always":
      if key is None:
        raise ValueError("this model adds routing noise at test time (routing_noise='always'); "
                         "pass a key")
      return key
    return None

  def _whole(self, x, key):
    h, w = x.shape[1], x.shape[2]
    m = self.cfg.size_multiple
    xp = pad_to(x, bucket_size(h, m, self.bucket), bucket_size(w, m, self.bucket))
    image, indices, gates, values = self._run(xp, key, None)
    return image[:, :h, :w], indices, gates, values

  def __call__(self, x, key=None) -> Restored:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 3:
      return jax.tree_util.tree_map(lambda a: a[0], self(x[None], key))
    if x.ndim != 4 or x.shape[-1] != self.cfg.in_channels:
      raise ValueError(f"expected (B, H, W, {self.cfg.in_channels}) or (H, W, "
                       f"{self.cfg.in_channels}) input, got shape {x.shape}")
    key = self._key(key)
    if x.shape[1] <= self.tile and x.shape[2] <= self.tile:
      image, indices, gates, _ = self._whole(x, key)
      return Restored(image, indices, gates)
    outs = [self._tiled(x[i], key) for i in range(x.shape[0])]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)

  def _tiled(self, x, key) -> Restored:
    """One (H, W, C) image larger than a tile."""
    h, w, _ = x.shape
    # the routing decision, on a view of the whole image
    scale = min(1.0, self.route_size / max(h, w))
    view = x[None]
    if scale < 1.0:
      shape = (1, max(1, round(h * scale)), max(1, round(w * scale)), x.shape[-1])
      view = jax.image.resize(view, shape, method="linear", antialias=True)
    _, indices, gates, values = self._whole(view, key)
    routing = {k: (indices[k][0], values[k][0]) for k in indices}
    # tiles with the decision imposed
    t, ov = self.tile, self.overlap
    big = pad_to(x[None], max(h, t), max(w, t))[0]  # images thinner than a tile
    hs, ws = big.shape[0], big.shape[1]
    corners = [(i, j) for i in tile_starts(hs, t, ov) for j in tile_starts(ws, t, ov)]
    window = blend_window(t, ov)[..., None]
    acc = np.zeros((hs, ws, x.shape[-1]), np.float32)
    weight = np.zeros((hs, ws, 1), np.float32)
    for b in range(0, len(corners), self.tile_batch):
      group = corners[b:b + self.tile_batch]
      batch = [big[i:i + t, j:j + t] for i, j in group]
      batch += [batch[-1]] * (self.tile_batch - len(batch))  # one static batch shape
      out, _, _, _ = self._run(jnp.stack(batch), key, routing)
      out = np.asarray(out)
      for n, (i, j) in enumerate(group):
        acc[i:i + t, j:j + t] += out[n] * window
        weight[i:i + t, j:j + t] += window
    image = jnp.asarray(acc[:h, :w] / weight[:h, :w])
    return Restored(image, {k: v[0] for k, v in indices.items()},
                    {k: v[0] for k, v in gates.items()})
