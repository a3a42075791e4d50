"""Tiled restoration of a large image: wall time and peak resident memory.

    python benchmarks/restore_large.py [--variant s] [--height 3000] [--width 4000] [--tile 512]

Memory is bounded by the tile, not the image: the figure printed is the peak
resident set size of this process (model, compiled code and one batch of tiles).
Random weights; speed and memory do not depend on their values.
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position

from moceir_jax import inference  # pylint: disable=wrong-import-position
from moceir_jax import model as model_lib  # pylint: disable=wrong-import-position


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="s", choices=sorted(model_lib.VARIANTS))
  ap.add_argument("--height", type=int, default=3000)
  ap.add_argument("--width", type=int, default=4000)
  ap.add_argument("--tile", type=int, default=512)
  ap.add_argument("--overlap", type=int, default=32)
  ap.add_argument("--tile_batch", type=int, default=1)
  args = ap.parse_args()
  model = model_lib.create(model_lib.variant(args.variant), seed=0)
  restorer = inference.Restorer(model, tile=args.tile, overlap=args.overlap,
                                tile_batch=args.tile_batch)
  x = np.random.default_rng(0).uniform(size=(args.height, args.width, 3)).astype(np.float32)
  tiles = (len(inference.tile_starts(args.height, args.tile, args.overlap))
           * len(inference.tile_starts(args.width, args.tile, args.overlap)))
  t = time.perf_counter()
  out = np.asarray(restorer(x).image)
  elapsed = time.perf_counter() - t
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
  print(f"{args.variant} {args.width}x{args.height}, {tiles} tiles of {args.tile} "
        f"(overlap {args.overlap}, batch {args.tile_batch}): {elapsed:.0f} s incl. compilation, "
        f"peak RSS {peak_gb:.2f} GB, output {out.shape} finite={bool(np.isfinite(out).all())}")


if __name__ == "__main__":
  main()
