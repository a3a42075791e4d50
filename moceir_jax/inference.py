"""Jitted inference on images of any size.

The network needs H and W to be multiples of ``2**(levels-1)``; :class:`Restorer`
pads by reflection at the bottom/right, runs the compiled model and crops back,
so callers never meet that limit. Routing is deterministic unless the model's
config asks for the official test-time noise, in which case a key is required.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moceir_jax import model as model_lib


def pad_to_multiple(x, multiple: int):
  """Pads NHWC ``x`` at the bottom/right to multiples of ``multiple``.

  Reflection keeps image statistics at the border (zeros would look like a dark
  frame to the router's global pooling). Images of 1 pixel along an axis cannot
  be reflected and are edge-padded instead.
  """
  h, w = x.shape[1], x.shape[2]
  ph, pw = (-h) % multiple, (-w) % multiple
  if not ph and not pw:
    return x
  xp = jnp if isinstance(x, jax.Array) else np

  def pad_axis(a, axis, n, size):
    if not n:
      return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, n)
    # reflect cannot add more than size-1 rows at once; repeat as needed
    while n > 0 and size > 1:
      step = min(n, size - 1)
      widths[axis] = (0, step)
      a = xp.pad(a, widths, mode="reflect")
      n -= step
      size += step
    if n > 0:
      widths[axis] = (0, n)
      a = xp.pad(a, widths, mode="edge")
    return a

  x = pad_axis(x, 1, ph, h)
  return pad_axis(x, 2, pw, w)


class Restored(NamedTuple):
  image: jax.Array  # (B, H, W, C) float32, not clipped
  indices: dict  # decoder block name -> (B, k) selected experts
  gates: dict  # decoder block name -> (B, E) gate values


class Restorer:
  """Compiled inference for one model; call it with NHWC float images in [0, 1]."""

  def __init__(self, model: model_lib.MoCEIR, dispatch: str = "sparse"):
    self.cfg = model.cfg
    self.dispatch = dispatch
    self.graphdef, self.state = nnx.split(model)
    self._run = jax.jit(self._forward)

  def _forward(self, state, x, key):
    model = nnx.merge(self.graphdef, state)
    out = model(x, train=False, noise_key=key, dispatch=self.dispatch)
    return (out.image, {k: v["indices"] for k, v in out.routing.items()},
            {k: v["gates"] for k, v in out.routing.items()})

  def __call__(self, x, key=None) -> Restored:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 3:
      return jax.tree_util.tree_map(lambda a: a[0], self(x[None], key))
    if x.ndim != 4 or x.shape[-1] != self.cfg.in_channels:
      raise ValueError(f"expected (B, H, W, {self.cfg.in_channels}) or (H, W, "
                       f"{self.cfg.in_channels}) input, got shape {x.shape}")
    if self.cfg.routing_noise == "always" and key is None:
      raise ValueError("this model adds routing noise at test time (routing_noise='always'); "
                       "pass a key")
    if self.cfg.routing_noise != "always":
      key = None
    h, w = x.shape[1], x.shape[2]
    image, indices, gates = self._run(self.state, pad_to_multiple(x, self.cfg.size_multiple), key)
    return Restored(image[:, :h, :w], indices, gates)
