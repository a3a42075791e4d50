"""Smoke run of the whole inference path on a photo shipped inside scikit-image.

    python -m moceir_jax.demo [--model_dir DIR] [--variant s] [--sigma 25] [--out DIR]

Adds Gaussian noise to scikit-image's astronaut photo, restores it with MoCE-IR
(random weights unless ``--model_dir`` names a converted or trained model) and
prints timing and which complexity expert each decoder block chose. Nothing is
downloaded.
"""

from __future__ import annotations

from moceir_jax import host

if __name__ == "__main__":
  host.reexec_with_fast_allocator()  # before JAX loads; see moceir_jax/host.py
  host.use_compilation_cache()

import os
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags; defined only when run as a program, so importing the
  module never claims flag names."""
  flags.DEFINE_string("model_dir", None, "Model directory (from moceir_jax.convert or training). "
                      "Default: randomly initialised weights of --variant.")
  flags.DEFINE_enum("variant", "s", ["s", "base", "tiny"], "Model size when no --model_dir.")
  flags.DEFINE_float("sigma", 25.0, "Gaussian noise level on the 0-255 scale.")
  flags.DEFINE_integer("size", 256, "Side of the centre crop of the photo.")
  flags.DEFINE_string("out", None, "If set, write clean/noisy/restored PNGs here.")


def psnr(a, b):
  mse = float(np.mean((np.clip(a, 0, 1) - b) ** 2))
  return 10 * np.log10(1.0 / max(mse, 1e-12))


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  from skimage import data  # pylint: disable=import-outside-toplevel

  from moceir_jax import checkpoint, inference  # pylint: disable=import-outside-toplevel
  from moceir_jax import model as model_lib  # pylint: disable=import-outside-toplevel

  if FLAGS.model_dir:
    model = checkpoint.load_model(FLAGS.model_dir)
    source = FLAGS.model_dir
  else:
    model = model_lib.create(model_lib.variant(FLAGS.variant), seed=0)
    source = f"random weights (variant {FLAGS.variant!r}; convert official weights for real output)"
  cfg = model.cfg
  print(f"MoCE-IR dim={cfg.dim}, {model_lib.param_count(model):,} parameters, from {source}")
  print(f"backend: {jax.default_backend()}, {jax.device_count()} device(s)")

  img = data.astronaut().astype(np.float32) / 255.0
  h, w = img.shape[:2]
  s = min(FLAGS.size, h, w)
  clean = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
  noisy = clean + np.random.default_rng(0).normal(0, FLAGS.sigma / 255.0, clean.shape)
  noisy = noisy.astype(np.float32)

  restorer = inference.Restorer(model)
  t = time.perf_counter()
  out = restorer(noisy)
  jax.block_until_ready(out.image)
  first = time.perf_counter() - t
  t = time.perf_counter()
  out = restorer(noisy)
  jax.block_until_ready(out.image)
  steady = time.perf_counter() - t
  restored = np.asarray(out.image)

  print(f"image {s}x{s}, sigma={FLAGS.sigma:g}: first call {first:.1f} s (compiles), "
        f"then {1e3 * steady:.0f} ms per image")
  print(f"PSNR noisy {psnr(noisy, clean):.2f} dB, restored {psnr(restored, clean):.2f} dB")
  print("routing (decoder block: expert [patch size], gate):")
  patches = [4 * 2 ** e for e in range(cfg.num_experts)]
  for name, idx in out.indices.items():
    idx = np.asarray(idx).tolist()
    gates = np.asarray(out.gates[name])
    chosen = ", ".join(f"e{e} [{patches[e]}px] {gates[e]:.2f}" for e in idx)
    print(f"  {name:<18} {chosen}")
  if FLAGS.out:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    os.makedirs(FLAGS.out, exist_ok=True)
    for name, arr in (("clean", clean), ("noisy", noisy), ("restored", restored)):
      path = os.path.join(FLAGS.out, f"{name}.png")
      tmp = path + ".tmp.png"
      Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(tmp)
      os.replace(tmp, path)
    print(f"wrote clean/noisy/restored PNGs to {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
