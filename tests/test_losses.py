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


def test_neg_psnr_is_minus_the_mean_psnr_the_benchmarks_report():
  from moceir_jax import metrics
  clean = RNG.uniform(0.2, 0.8, size=(3, 16, 16, 3)).astype(np.float32)
  pred = clean + RNG.normal(0.0, 1.0, size=clean.shape).astype(np.float32) * np.array(
      [0.01, 0.05, 0.2], np.float32)[:, None, None, None]
  pred = np.clip(pred, 0.0, 1.0)
  expected = -np.mean([metrics.psnr(p, c) for p, c in zip(pred, clean)])
  assert float(losses.neg_psnr(jnp.asarray(pred), jnp.asarray(clean))) == pytest.approx(
      expected, abs=1e-3)


def test_neg_psnr_weighs_every_image_alike_whatever_its_error():
  # The point of the loss: an image 10x further from clean gets a 10x smaller
  # gradient, so its total pull (gradient . error) is the same. The errors are
  # large enough (MSE >= 1e-2) that the loss's eps (1e-8) stays out of the
  # comparison, and drawn from their own generator so test order cannot move them.
  import jax
  clean = jnp.zeros((2, 8, 8, 3))
  err = np.random.default_rng(5).normal(size=(1, 8, 8, 3)).astype(np.float32)
  pred = jnp.concatenate([0.1 * err, 1.0 * err])
  g = jax.grad(losses.neg_psnr)(pred, clean)
  pull = jnp.sum(g * pred, axis=(1, 2, 3))
  assert float(pull[0]) == pytest.approx(float(pull[1]), rel=1e-4)
  assert float(jnp.abs(g[0]).sum()) == pytest.approx(10 * float(jnp.abs(g[1]).sum()), rel=1e-4)
  l1_grad = jax.grad(losses.l1)(pred, clean)  # L1 by contrast pulls the far image 10x harder
  assert float(jnp.sum(l1_grad[1] * pred[1])) == pytest.approx(
      10 * float(jnp.sum(l1_grad[0] * pred[0])), rel=1e-4)
