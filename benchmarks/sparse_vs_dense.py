"""Expert-skipping (sparse) versus dense inference speed, side by side.

    python benchmarks/sparse_vs_dense.py [--variant s] [--size 256] [--batch 1] [--runs 5]

Prints compile time and the median latency of each dispatch after warm-up,
with random weights (speed does not depend on their values; routing does, so
the number of experts the sparse path actually ran is printed too).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from moceir_jax import model as model_lib  # pylint: disable=wrong-import-position


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="s", choices=sorted(model_lib.VARIANTS))
  ap.add_argument("--size", type=int, default=256)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--runs", type=int, default=5)
  args = ap.parse_args()

  cfg = model_lib.variant(args.variant)
  model = model_lib.create(cfg, seed=0)
  graphdef, state = nnx.split(model)
  x = jax.numpy.asarray(np.random.default_rng(0).uniform(
      size=(args.batch, args.size, args.size, 3)).astype(np.float32))
  print(f"{args.variant}: {model_lib.param_count(model):,} parameters, input "
        f"{args.batch}x3x{args.size}x{args.size}, backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s)")
  print(f"{'dispatch':<8} {'compile s':>10} {'median ms':>10} {'min ms':>8}")
  for dispatch in ("dense", "sparse"):
    fn = jax.jit(lambda s, x, d=dispatch: nnx.merge(graphdef, s)(x, dispatch=d))
    t = time.perf_counter()
    compiled = fn.lower(state, x).compile()
    compile_s = time.perf_counter() - t
    out = jax.block_until_ready(compiled(state, x))  # warm-up
    times = []
    for _ in range(args.runs):
      t = time.perf_counter()
      jax.block_until_ready(compiled(state, x))
      times.append(time.perf_counter() - t)
    print(f"{dispatch:<8} {compile_s:>10.1f} {1e3 * np.median(times):>10.1f} "
          f"{1e3 * np.min(times):>8.1f}")
  used = sorted({int(i) for r in out.routing.values() for i in np.asarray(r["indices"]).ravel()})
  print(f"experts selected across blocks: {used} (dense always runs all {cfg.num_experts})")


if __name__ == "__main__":
  main()
