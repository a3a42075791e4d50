"""Applies a run of identical blocks as one ``lax.scan``, optionally rematerialised.

MoCE-IR-S has 42 transformer blocks in runs of 2-8 identical ones. Unrolled,
each block is its own copy of the same HLO; scanned, each run is traced and
compiled once. The parameters stay one module per block (the layout of the
official checkpoints and of ours): they are stacked inside the traced
function, and the stack's transpose hands each block its own gradient.

``remat`` wraps each block in ``jax.checkpoint``: the backward pass recomputes
a block's activations from its input instead of keeping them.

Measured on XLA:CPU (2 cores, MoCE-IR-S train step at 4x128x128, see
benchmarks/speed.py --model; temp = XLA's buffers for one step): unrolled
10.5 s/step, 7.9 GB temp; scanned 11.8 s, 7.8 GB (the while loop costs more
than it saves, and compiles slower, 107 -> 132 s); unrolled with remat, nothing
is freed (XLA schedules the recomputation early; measured before the native
kernels: 11.5 s, same peak); scanned with remat 13.9 s, 1.0 GB temp, 3.0 GB
process peak (the compiler's). Hence both are off by default, and the pair is
the option for training a model that does not otherwise fit in memory.
"""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def apply(blocks: Sequence[nnx.Module], fn: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
          carry, xs=None, *, scan: bool = True, remat: bool = False):
  """``carry, y_i = fn(block_i, carry, x_i)`` over the blocks in order.

  ``xs`` is a pytree whose leaves have a leading axis of ``len(blocks)`` (or
  None); the ``y_i`` come back stacked the same way. ``fn`` must not mutate
  the blocks. Blocks that differ in structure are always applied unrolled.
  """
  blocks = list(blocks)
  if not blocks:
    raise ValueError("apply needs at least one block")

  def step(graphdef):
    def run(state, carry, x):
      return fn(nnx.merge(graphdef, state), carry, x)
    return jax.checkpoint(run) if remat else run

  def signature(split):  # a graphdef says nothing of shapes: Linear(4, 6) and Linear(6, 3) match
    g, state = split
    return g, jax.tree.structure(state), [(a.shape, a.dtype) for a in jax.tree.leaves(state)]

  if scan and len(blocks) > 1:
    splits = [nnx.split(b) for b in blocks]
    first = signature(splits[0])
    if all(signature(s) == first for s in splits[1:]):
      stacked = jax.tree.map(lambda *a: jnp.stack(a), *[s for _, s in splits])
      run = step(splits[0][0])
      return jax.lax.scan(lambda c, inp: run(inp[0], c, inp[1]), carry, (stacked, xs))

  ys = []
  for i, blk in enumerate(blocks):
    x = None if xs is None else jax.tree.map(lambda a, i=i: a[i], xs)
    if remat:
      graphdef, state = nnx.split(blk)
      carry, y = step(graphdef)(state, carry, x)
    else:  # a plain call: nothing to split or merge
      carry, y = fn(blk, carry, x)
    ys.append(y)
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
