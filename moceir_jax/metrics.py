"""Image-quality metrics exactly as the paper reports them.

PSNR and SSIM on full RGB images in [0, 1] (outputs clipped first), SSIM with
Gaussian weights: the calls of ``skimage.metrics`` the official evaluation
makes, so numbers are comparable with published tables. Computed in float64.
"""

from __future__ import annotations

import numpy as np
from skimage import metrics as skm


def _check(pred, target):
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  if pred.shape != target.shape or pred.ndim != 3 or pred.shape[-1] != 3:
    raise ValueError(f"expected two HxWx3 images of the same size, got {pred.shape} and "
                     f"{target.shape}")
  return np.clip(pred, 0.0, 1.0), np.clip(target, 0.0, 1.0)


def psnr(pred, target) -> float:
  pred, target = _check(pred, target)
  return float(skm.peak_signal_noise_ratio(target, pred, data_range=1.0))


def ssim(pred, target) -> float:
  pred, target = _check(pred, target)
  if min(pred.shape[:2]) < 11:
    raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {pred.shape[:2]}")
  return float(skm.structural_similarity(target, pred, gaussian_weights=True, channel_axis=-1,
                                         data_range=1.0))
