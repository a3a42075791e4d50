"""Training losses: pixel L1 and the frequency-domain L1 of the paper, and a PSNR loss."""

from __future__ import annotations

import math

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


def neg_psnr(pred, target, eps: float = 1e-8):
  """Minus the PSNR (dB, images in [0, 1]) of each image, averaged over the batch.

  NAFNet's and HINet's "PSNR loss". Its gradient on an image is that of its MSE
  divided by the MSE, so every image pulls with the same weight whatever its
  error: a blurred or rainy crop, whose input is already close to clean, counts
  as much as a dark or hazy one, and the average PSNR the benchmarks report is
  what is minimised. Under a mean absolute error the large errors of low light
  and haze dominate the batch and the model learns to shift every image.
  """
  mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)),
                 axis=tuple(range(1, pred.ndim)))
  return (10.0 / math.log(10.0)) * jnp.mean(jnp.log(mse + eps))
