"""Reflection padding at the bottom/right, for NumPy and JAX arrays, HWC or NHWC."""

from __future__ import annotations

import numpy as np


def pad_to(x, height: int, width: int):
  """Pads ``x`` (..., H, W, C) at the bottom/right to at least ``height`` x ``width``.

  Reflection keeps image statistics at the border (zeros would look like a dark
  frame to a model's global pooling). It adds at most size-1 rows at a time, so
  it repeats as needed; 1-pixel axes are edge-padded instead.
  """
  if isinstance(x, np.ndarray):
    xp = np
  else:
    import jax.numpy as xp  # pylint: disable=import-outside-toplevel
  for axis, target in ((x.ndim - 3, height), (x.ndim - 2, width)):
    while x.shape[axis] < target:
      size = x.shape[axis]
      widths = [(0, 0)] * x.ndim
      widths[axis] = (0, min(target - size, max(size - 1, 0)) or target - size)
      x = xp.pad(x, widths, mode="reflect" if size > 1 else "edge")
  return x
