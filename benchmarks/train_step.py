"""Train-step time and peak memory of one variant at one batch shape.

    python benchmarks/train_step.py [--variant s] [--batch 1] [--size 128] [--runs 3]
                                    [--model train_dispatch=dense,remat_levels=2]

One jitted AdamW step (L1 + 0.01·aux, routing noise on, buffers donated), as
the median of --runs after one warm-up, plus compile time and the process's
peak resident memory. Random weights and inputs.
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moceir_jax import host  # pylint: disable=wrong-import-position

if __name__ == "__main__":
  host.reexec_with_fast_allocator()  # before JAX loads; see moceir_jax/host.py

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from moceir_jax import model as model_lib  # pylint: disable=wrong-import-position
from speed import parse_model_kw  # pylint: disable=wrong-import-position  # benchmarks/speed.py


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="s", choices=sorted(model_lib.VARIANTS))
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--size", type=int, default=128)
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--model", default="", help="model config overrides, e.g. train_dispatch=dense")
  args = ap.parse_args()

  model = model_lib.create(model_lib.variant(args.variant, **parse_model_kw(args.model)), seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optax.adamw(2e-4)
  opt_state = opt.init(params)
  x = jnp.asarray(np.random.default_rng(0).uniform(
      size=(args.batch, args.size, args.size, 3)).astype(np.float32))

  def step(params, opt_state, x, key):
    def loss_fn(p):
      out = nnx.merge(graphdef, p, rest)(x, train=True, noise_key=key)
      return jnp.mean(jnp.abs(out.image - x)) + 0.01 * out.aux_loss
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  t = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, opt_state, x, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t
  buffers_gb = compiled.memory_analysis().temp_size_in_bytes / 1e9
  params, opt_state, loss = compiled(params, opt_state, x, jax.random.key(0))
  jax.block_until_ready(loss)
  times = []
  for i in range(args.runs):
    t = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, x, jax.random.key(i + 1))
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t)
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
  print(f"{args.variant} {args.model or 'default'} train step "
        f"{args.batch}x3x{args.size}x{args.size}: compile "
        f"{compile_s:.0f} s, median {np.median(times):.2f} s "
        f"({args.batch / np.median(times):.2f} images/s), peak RSS {peak_gb:.1f} GB, "
        f"step buffers {buffers_gb:.2f} GB")


if __name__ == "__main__":
  main()
