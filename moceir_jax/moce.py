"""Mixture of complexity experts: the experts, the router and its balance loss.

Two dispatch strategies compute the same function, with the same gradients
(a zero gate gives a zero gradient):

* ``dense``: every expert runs on the whole batch and is weighted by gates that
  are zero for unselected experts. One big op per expert and no control flow,
  which is what accelerators want (a conditional on GPU waits on the host).
* ``sparse``: each image runs only its selected expert(s), through a per-image
  ``lax.switch``. A switch on a traced index is a real branch in XLA, so on CPU
  unselected experts cost nothing, in inference or in training (any batch
  size; the reference's eval path is only correct for batch 1). Each branch is
  rematerialised: a differentiated switch keeps the residuals of every branch,
  taken or not, which cost more memory than dense; recomputing the one taken
  branch in the backward pass is cheap. Small batches are unrolled (one switch
  per image, which XLA schedules better than a loop); larger ones go through
  ``lax.map`` so the program does not grow with the batch.

Which one training uses is ``MoCEIRConfig.train_dispatch`` (by backend when
unset: sparse on CPU, dense elsewhere).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moceir_jax import layers, ops

DISPATCH_MODES = ("dense", "sparse")
# Up to this batch, sparse dispatch unrolls one switch per image; beyond, it
# loops (lax.map). MoCE-IR-S train step 4x128x128 on a 2-core EPYC: unrolled
# 5.5 s, looped 5.9 s, dense 6.2-6.7 s.
UNROLL_MAX_BATCH = 8


def default_train_dispatch() -> str:
  return "sparse" if jax.default_backend() == "cpu" else "dense"
RANK_TYPES = ("constant", "lin", "double", "exp", "fact", "spread")
COMPLEXITY_SCALES = ("max", "min", "none")


class Buffer(nnx.Variable):
  """Non-trainable state that is part of the checkpoint (torch ``register_buffer``)."""


def expert_ranks(dim: int, rank: int, num_experts: int, rank_type: str) -> list[int]:
  """Ranks of the experts of one adapter, as the reference's ``rank_type`` defines them."""
  if rank_type == "constant":
    return [rank] * num_experts
  if rank_type == "lin":
    return [rank + i for i in range(num_experts)]
  if rank_type == "double":
    return [rank + 2 * i for i in range(num_experts)]
  if rank_type == "exp":
    return [rank ** (i + 1) for i in range(num_experts)]
  if rank_type == "fact":
    return [math.factorial(rank + i) for i in range(num_experts)]
  if rank_type == "spread":
    # The paper's choice: [w/8, w/4, w/2, w] for four experts at width w.
    return [dim // 2 ** i for i in range(num_experts)][::-1]
  raise ValueError(f"unknown rank_type {rank_type!r}; expected one of {RANK_TYPES}")


def expert_patch_sizes(num_experts: int) -> list[int]:
  return [2 ** (i + 2) for i in range(num_experts)]  # 4, 8, 16, 32, ...


def complexity_weights(counts: Sequence[int], scale: str) -> np.ndarray:
  c = np.asarray(counts, np.float32)
  if scale == "max":
    return c / c.max()
  if scale == "min":
    return c / c.min()
  if scale == "none":
    return c
  raise ValueError(f"unknown complexity_scale {scale!r}; expected one of {COMPLEXITY_SCALES}")


class ComplexityExpert(nnx.Module):
  """A low-rank FFT-attention branch modulated by the shared attention features."""

  def __init__(self, dim: int, rank: int, patch: int, *, rngs: layers.Init, impl=None):
    self.down = layers.Pointwise(dim, rank, bias=False, rngs=rngs)
    self.gate = layers.Pointwise(dim, rank, bias=False, rngs=rngs)
    self.up = layers.Pointwise(rank, dim, bias=False, rngs=rngs)
    self.body = layers.FFTAttention(rank, patch, rngs=rngs, impl=impl)

  def __call__(self, x, shared):
    # The reference loops `depth` times over this but always from the original
    # input, so depth changes cost, not the result: computed once here.
    h = self.body(self.down(x)) * jax.nn.silu(self.gate(shared))
    return x + self.up(h)


def _normal_cdf(z):
  return 0.5 * (1.0 + jax.lax.erf(z / math.sqrt(2.0)))


def _cv_squared(v):
  # Coefficient of variation squared with the unbiased std, as torch's .std().
  return (jnp.std(v, ddof=1) / (jnp.mean(v) + 1e-8)) ** 2


class Router(nnx.Module):
  """Image-level top-k router biased toward cheap experts by its balance loss."""

  def __init__(self, dim: int, freq_dim: int, num_experts: int, top_k: int, complexity,
               *, use_complexity: bool, rngs: layers.Init):
    self.top_k = top_k
    self.num_experts = num_experts
    self.use_complexity = use_complexity
    self.noise_std = 1.0 / num_experts
    self.gate = layers.Linear(dim, num_experts, bias=False, rngs=rngs)
    self.freq_gate = layers.Linear(freq_dim, num_experts, bias=False, rngs=rngs)
    self.complexity = Buffer(jnp.asarray(complexity, jnp.float32))

  def __call__(self, x, freq_emb, *, train: bool, noise_key=None, override=None):
    """``override=(indices, values)`` imposes a routing decision made elsewhere
    (e.g. on a downscaled view of a whole image that is restored in tiles)."""
    acc = ops.acc_dtype(x.dtype)
    pooled = jnp.mean(x.astype(acc), axis=(1, 2))
    logits = self.gate(pooled) + self.freq_gate(freq_emb.astype(acc))
    noisy = logits
    if noise_key is not None:
      noisy = logits + jax.random.normal(noise_key, logits.shape, logits.dtype) * self.noise_std
    if override is None:
      values, indices = jax.lax.top_k(jax.nn.softmax(noisy, axis=-1), self.top_k)
    else:
      indices, values = override
      indices = jnp.broadcast_to(indices, (logits.shape[0], self.top_k)).astype(jnp.int32)
      values = jnp.broadcast_to(values, (logits.shape[0], self.top_k)).astype(logits.dtype)
    gates = jnp.sum(jax.nn.one_hot(indices, self.num_experts, dtype=values.dtype)
                    * values[..., None], axis=1)
    if train:
      aux = 0.5 * self._importance_loss(logits) + 0.5 * self._load_loss(logits, noisy, indices)
    else:
      aux = jnp.zeros((), logits.dtype)  # the reference reports no aux loss in eval
    info = dict(logits=logits, indices=indices, values=values, gates=gates, aux=aux)
    return gates, indices, values, aux, info

  def _importance_loss(self, logits):
    importance = jnp.sum(jax.nn.softmax(logits, axis=-1), axis=0)
    if self.use_complexity:
      importance = importance * self.complexity[...]
    return _cv_squared(importance)

  def _load_loss(self, logits, noisy, indices):
    # Probability that each expert would still be in the top-k under fresh
    # noise, given the k-th best noisy logit as the threshold to beat.
    kth = jnp.take_along_axis(noisy, indices[:, -1:], axis=-1)
    p = 1.0 - _normal_cdf((kth - logits) / self.noise_std)
    return _cv_squared(jnp.mean(p, axis=0))


class MoCELayer(nnx.Module):
  """The adapter branch of a decoder block: routed experts plus an output projection."""

  def __init__(self, dim: int, freq_dim: int, *, num_experts: int, top_k: int, rank: int,
               rank_type: str, with_complexity: bool, complexity_scale: str,
               rngs: layers.Init, impl=None):
    if not 1 <= top_k <= num_experts:
      raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    ranks = expert_ranks(dim, rank, num_experts, rank_type)
    if min(ranks) < 1:
      raise ValueError(f"expert ranks {ranks} at width {dim} must all be >= 1")
    self.ranks = tuple(ranks)
    self.patches = tuple(expert_patch_sizes(num_experts))
    self.experts = nnx.List([
        ComplexityExpert(dim, r, p, rngs=rngs, impl=impl) for r, p in zip(ranks, self.patches)
    ])
    self.proj_out = layers.Pointwise(dim, dim, bias=False, rngs=rngs)
    # The complexity bias is each expert's parameter count, as in the reference.
    counts = [sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(nnx.state(e, nnx.Param)))
              for e in self.experts]
    self.router = Router(dim, freq_dim, num_experts, top_k,
                         complexity_weights(counts, complexity_scale),
                         use_complexity=with_complexity, rngs=rngs)

  def __call__(self, x, freq_emb, shared, *, train: bool, noise_key=None, dispatch="dense",
               override=None):
    gates, indices, values, aux, info = self.router(x, freq_emb, train=train, noise_key=noise_key,
                                                    override=override)
    if dispatch == "dense":
      out = None
      for e, expert in enumerate(self.experts):
        term = gates[:, e, None, None, None].astype(x.dtype) * expert(x, shared)
        out = term if out is None else out + term
    elif dispatch == "sparse":
      out = self._sparse(x, shared, indices, values)
    else:
      raise ValueError(f"unknown dispatch {dispatch!r}; expected one of {DISPATCH_MODES}")
    return self.proj_out(out), info

  def _sparse(self, x, shared, indices, values):
    branches = [jax.checkpoint(lambda xb, sb, e=e: self.experts[e](xb, sb))
                for e in range(len(self.experts))]

    def one_image(xb, sb, idx, val):  # xb, sb: (1, H, W, C); idx, val: (k,)
      out = None
      for j in range(idx.shape[0]):
        term = val[j].astype(xb.dtype) * jax.lax.switch(idx[j], branches, xb, sb)
        out = term if out is None else out + term
      return out

    b = x.shape[0]
    if b <= UNROLL_MAX_BATCH:
      outs = [one_image(x[i:i + 1], shared[i:i + 1], indices[i], values[i]) for i in range(b)]
      return outs[0] if b == 1 else jnp.concatenate(outs, axis=0)
    return jax.lax.map(lambda a: one_image(a[0][None], a[1][None], a[2], a[3])[0],
                       (x, shared, indices, values))
