"""Applies a run of identical blocks, as one ``lax.scan`` or unrolled, optionally rematerialised.

MoCE-IR-S has 42 transformer blocks in runs of 2-8 identical ones. Unrolled,
each block is its own copy of the same HLO; scanned, each run is traced and
compiled once. The parameters stay one module per block (the layout of the
official checkpoints and of ours): they are stacked inside the traced
function, and the stack's transpose hands each block its own gradient.

``remat`` keeps only each block's inputs and recomputes its activations in the
backward pass. Under scan that is ``jax.checkpoint`` (the loop orders the
recomputation); unrolled, ``late_checkpoint``: XLA:CPU removes the
optimisation barriers that keep a plain ``jax.checkpoint``'s recomputation
apart (none is left in the optimised program), the recomputation is merged back
into the forward pass, and nothing is freed.

Measured on XLA:CPU (2-core Xeon, tcmalloc, MoCE-IR-S train step at 4x128x128,
benchmarks/speed.py --model; temp = XLA's buffers for one step): unrolled
3.8 s/step, 7.9 GB temp, 8.9 GB peak; unrolled with remat 5.4 s, 1.0 GB temp,
2.8 GB peak; scanned with remat 5.5 s, 2.9 GB peak. Scanned alone earlier cost
more than it saved (AVX2 machine: 11.8 vs 10.5 s, 7.8 GB temp; compiles
slower). Remat of the full-resolution level only: 4.6 s, 6.1 GB peak; of the
two finest levels 5.0 s, 4.0 GB (the recomputation is dearest where the
activations are largest). Saving the matmul outputs (policy dots_saveable) kept
4.45 GB and was no faster than full remat within run-to-run noise (EPYC).
Hence both are off by default, and ``remat`` is the
option for training a model that does not otherwise fit in memory.
"""

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moceir_jax import ops


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _late(f, consts, args):
  return f(*args, *consts)


def _late_fwd(f, consts, args):
  return f(*args, *consts), (consts, args)


def _late_bwd(f, res, g):
  consts, args = _tie(res, g)
  _, vjp = jax.vjp(lambda c, a: f(*a, *c), consts, args)
  return vjp(g)


def _tie(res, g):
  """``res`` made to depend on the cotangent ``g`` (``ops.after_gradient``).

  Without it the recomputation from the saved inputs is merged back into the
  forward pass and nothing is freed. The parameters are tied too: tying only
  the activations (elementwise or per image, which a batch-sharded step could
  do without communication) kept what depends on the parameters alone,
  MoCE-IR-S 1.7 instead of 1.0 GB of buffers. On a mesh the one element is a
  scalar broadcast per block.
  """
  return ops.after_gradient(g, res)


_late.defvjp(_late_fwd, _late_bwd)


def late_checkpoint(f: Callable) -> Callable:
  """``jax.checkpoint(f)`` whose recomputation waits for the backward pass.

  Only the inputs are kept; the backward pass recomputes the activations when
  the cotangent arrives. Values ``f`` closes over that take part in
  differentiation are hoisted into explicit inputs (``jax.closure_convert``),
  so their gradients flow as under ``jax.checkpoint``.
  """
  def wrapped(*args):
    converted, consts = jax.closure_convert(f, *args)
    return _late(converted, tuple(consts), args)
  return wrapped


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

      def run(state, carry, x, graphdef=graphdef):
        return fn(nnx.merge(graphdef, state), carry, x)
      carry, y = late_checkpoint(run)(state, carry, x)
    else:  # a plain call: nothing to split or merge
      carry, y = fn(blk, carry, x)
    ys.append(y)
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
