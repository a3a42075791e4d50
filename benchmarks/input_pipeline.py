"""Input pipeline throughput: batches/s at batch 8, patch 128, for 0/2/4 worker processes.

    python benchmarks/input_pipeline.py [--data_root ../shared/data/mini_root]

Trains-style stream over CBSD68 clean images (from the data root if present,
else scikit-image's sample photos) with all five synthetic tasks.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # pylint: disable=wrong-import-position

from moceir_jax import datasets, input_pipeline  # pylint: disable=wrong-import-position


def _clean_images(root):
  folder = os.path.join(root or "", "denoising", "cBSD68", "original_png")
  if root and os.path.isdir(folder):
    return datasets.clean_folder(folder)
  from skimage import data  # pylint: disable=import-outside-toplevel
  tmp = tempfile.mkdtemp()
  for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left"):
    Image.fromarray(getattr(data, name)()).save(os.path.join(tmp, f"{name}.png"))
  return datasets.clean_folder(tmp)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data_root", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                      "shared", "data", "mini_root"))
  ap.add_argument("--batches", type=int, default=30)
  args = ap.parse_args()
  clean = _clean_images(args.data_root)
  tasks = ["denoise_15", "denoise_25", "denoise_50", "derain", "dehaze", "deblur", "lowlight"]
  sources = input_pipeline.synthetic_sources(clean, tasks)
  print(f"{len(clean)} clean images, tasks {tasks}, batch 8, patch 128")
  for workers in (0, 2, 4):
    it = iter(input_pipeline.train_dataset(sources, batch_size=8, patch=128, seed=0,
                                           worker_count=workers))
    next(it)  # start-up (worker processes)
    t = time.perf_counter()
    for _ in range(args.batches):
      batch = next(it)
    dt = time.perf_counter() - t
    print(f"workers={workers}: {args.batches / dt:6.2f} batches/s "
          f"({8 * args.batches / dt:6.1f} images/s), batch {batch['degraded'].shape}")


if __name__ == "__main__":
  main()
