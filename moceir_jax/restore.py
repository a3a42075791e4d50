"""Restore your own images with a MoCE-IR model.

    python -m moceir_jax.restore --checkpoint MODEL_DIR --input FILE|FOLDER|GLOB --output FOLDER

Any size and aspect ratio; grayscale, RGBA (alpha passed through), palette and
16-bit inputs; EXIF orientation respected; each result written atomically in
the input's format family and bit depth under the input's file name in
``--output`` (which must not be where an input lives: inputs are never
overwritten). ``.npy`` float arrays (HWC or NHWC) come back as ``.npy`` of the
same layout, neither clipped nor quantised. Large images are restored in
blended tiles that share one routing decision (see inference.Restorer). A file
that cannot be read is reported and skipped; the exit status is 1 if any was.
"""

from __future__ import annotations

from moceir_jax import host

if __name__ == "__main__":
  host.reexec_with_fast_allocator()  # before JAX loads; see moceir_jax/host.py
  host.use_compilation_cache()

import glob
import os
import sys
import time
from typing import Iterable

import numpy as np
from absl import app, flags

from moceir_jax import images

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags; defined only when run as a program, so importing the
  module never claims flag names."""
  flags.DEFINE_string("checkpoint", None, "Model directory (from moceir_jax.convert or training).")
  flags.DEFINE_string("workdir", None, "Training work directory; its exported model "
                      "(WORKDIR/model) is used.")
  flags.DEFINE_string("input", None, "An image, a folder of images, or a glob pattern.")
  flags.DEFINE_string("output", None, "Folder for the restored images.")
  flags.DEFINE_integer("tile", 512, "Tile side for large images (multiple of 8).")
  flags.DEFINE_integer("overlap", 32, "Overlap between tiles, in pixels.")
  flags.DEFINE_integer("tile_batch", 4, "Tiles run together per call.")


class InputError(ValueError):
  pass


def list_inputs(spec: str) -> list[str]:
  """Files named by a path, folder or glob; errors name what was looked at."""
  if os.path.isdir(spec):
    names = sorted(os.listdir(spec))
    files = [os.path.join(spec, n) for n in names
             if os.path.splitext(n)[1].lower() in images.SUPPORTED_EXTENSIONS
             and os.path.isfile(os.path.join(spec, n))]
    if not files:
      raise InputError(f"{spec}: folder has no images ({', '.join(images.SUPPORTED_EXTENSIONS)})")
    return files
  if os.path.isfile(spec):
    return [spec]
  if glob.has_magic(spec):
    files = sorted(f for f in glob.glob(spec) if os.path.isfile(f))
    if not files:
      raise InputError(f"{spec}: the pattern matches no files")
    return files
  raise InputError(f"{spec}: no such file or folder")


def output_path(src: str, out_dir: str) -> str:
  return os.path.join(out_dir, os.path.basename(src))


def restore_files(restorer, files: Iterable[str], out_dir: str, log=print) -> dict:
  """Restores ``files`` into ``out_dir``; returns per-file results and failures."""
  files = list(files)
  inputs = {os.path.realpath(f) for f in files}
  results, failures = {}, {}
  start = time.perf_counter()
  for n, src in enumerate(files, 1):
    dst = output_path(src, out_dir)
    if os.path.realpath(dst) in inputs:
      failures[src] = f"{dst}: refusing to overwrite an input; choose another --output"
      log(f"[{n}/{len(files)}] skipped {src}: {failures[src]}")
      continue
    t = time.perf_counter()
    try:
      array, info = images.read_image(src)
    except images.ImageError as e:
      failures[src] = str(e)
      log(f"[{n}/{len(files)}] skipped: {e}")
      continue
    batch = array if info.npy_batched else array[None]
    outs, routes = [], []
    for img in batch:
      res = restorer(img)
      outs.append(np.asarray(res.image))
      routes.append({k: np.asarray(v).tolist() for k, v in res.indices.items()})
    restored = np.stack(outs) if info.npy_batched else outs[0]
    images.write_image(dst, restored, info)
    results[src] = dict(output=dst, routing=routes)
    done = n
    rate = done / max(time.perf_counter() - start, 1e-9)
    eta = (len(files) - done) / rate
    h, w = array.shape[-3:-1]
    log(f"[{n}/{len(files)}] {os.path.basename(src)} {w}x{h} {time.perf_counter() - t:.1f}s "
        f"({rate:.2f} img/s, ETA {eta:.0f}s) experts {_route_summary(routes[0])}")
  return dict(results=results, failures=failures)


def _route_summary(route: dict) -> str:
  # "dec.0: 2 1 3 3 | dec.1: ..." : the top-1 expert of each block, level by level
  levels: dict[str, list[str]] = {}
  for name, idx in route.items():
    levels.setdefault(name.split(".2.layers")[0], []).append(
        "+".join(str(i) for i in np.ravel(idx)))
  return " | ".join(f"{lvl}: {' '.join(v)}" for lvl, v in levels.items())


def main(argv):
  del argv
  from moceir_jax import checkpoint, inference  # pylint: disable=import-outside-toplevel
  if bool(FLAGS.checkpoint) == bool(FLAGS.workdir):
    raise app.UsageError("give exactly one of --checkpoint and --workdir")
  if not FLAGS.input or not FLAGS.output:
    raise app.UsageError("--input and --output are required")
  model_dir = FLAGS.checkpoint or os.path.join(FLAGS.workdir, "model")
  try:
    files = list_inputs(FLAGS.input)
    model = checkpoint.load_model(model_dir)
  except (InputError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  restorer = inference.Restorer(model, tile=FLAGS.tile, overlap=FLAGS.overlap,
                                tile_batch=FLAGS.tile_batch)
  summary = restore_files(restorer, files, FLAGS.output)
  n_ok, n_bad = len(summary["results"]), len(summary["failures"])
  print(f"restored {n_ok} of {len(files)} file(s) into {FLAGS.output}"
        + (f"; {n_bad} skipped" if n_bad else ""))
  if n_bad:
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
