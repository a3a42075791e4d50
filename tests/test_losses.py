"""Training losses against the reference's definitions."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nchw
from moceir_jax import losses

RNG = np.random.default_rng(0)


def test_fft_l1_equals_the_reference_fft_loss():
  torch = pytest.importorskip("torch")
  pred = RNG.normal(size=(2, 12, 10, 3)).astype(np.float32)
  target = RNG.normal(size=(2, 12, 10, 3)).astype(np.float32)

  def ref(p, t):  # utils/loss_utils.FFTLoss of the reference, on NCHW tensors
    pf, tf = torch.fft.rfft2(p), torch.fft.rfft2(t)
    pf = torch.stack([pf.real, pf.imag], dim=-1)
    tf = torch.stack([tf.real, tf.imag], dim=-1)
    return torch.nn.L1Loss()(pf, tf).item()

  expected = ref(torch.from_numpy(nchw(pred)), torch.from_numpy(nchw(target)))
  assert float(losses.fft_l1(jnp.asarray(pred), jnp.asarray(target))) == pytest.approx(
      expected, rel=1e-5)


def test_fft_l1_halves_the_width_axis_like_torch():
  # Independent of torch: numpy's rfft2 over (H, W) of NHWC arrays.
  pred = RNG.normal(size=(1, 8, 6, 2))
  target = np.zeros_like(pred)
  spec = np.fft.rfft2(pred, axes=(1, 2))
  expected = np.mean(np.abs(np.stack([spec.real, spec.imag], -1)))
  assert float(losses.fft_l1(jnp.asarray(pred), jnp.asarray(target))) == pytest.approx(
      expected, rel=1e-5)
  assert float(losses.l1(jnp.asarray(pred), jnp.asarray(target))) == pytest.approx(
      np.mean(np.abs(pred)), rel=1e-6)
