"""Training losses of MoCE-IR: pixel L1 and the frequency-domain L1 of the paper."""

from __future__ import annotations

import jax.numpy as jnp


def l1(pred, target):
  return jnp.mean(jnp.abs(pred - target))


def fft_l1(pred, target):
  """L1 between the real FFT spectra (real and imaginary parts), as the reference.

  The reference takes ``torch.fft.rfft2`` over (H, W) of NCHW images, so the
  halved axis is W; the same here on NHWC, then the mean absolute difference
  over the stacked real/imaginary parts.
  """
  diff = jnp.fft.rfft2(pred.astype(jnp.float32), axes=(1, 2)) - jnp.fft.rfft2(
      target.astype(jnp.float32), axes=(1, 2))
  return 0.5 * (jnp.mean(jnp.abs(diff.real)) + jnp.mean(jnp.abs(diff.imag)))
