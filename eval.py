"""Evaluates a training run: python eval.py --workdir DIR [--benchmarks ...] [--save_images].

Reads DIR/config.json and the newest checkpoint (or --model_dir, e.g. converted
official weights); writes PSNR/SSIM and routing reports to DIR/eval/.
"""

from moceir_jax import host

if __name__ == "__main__":
  host.reexec_with_fast_allocator()  # before JAX loads; see moceir_jax/host.py
  host.use_compilation_cache()

from absl import app, flags, logging

from moceir_jax import evaluation, training

_WORKDIR = flags.DEFINE_string("workdir", None, "A train.py work directory.", required=True)
_MODEL_DIR = flags.DEFINE_string("model_dir", None,
                                 "Evaluate this model directory (moceir_jax.convert output) "
                                 "instead of the newest checkpoint.")
_BENCHMARKS = flags.DEFINE_list("benchmarks", None,
                                "Benchmarks (default: the config's eval.benchmarks), e.g. "
                                "denoise_15,denoise_25,denoise_50,derain,dehaze,deblur,lowlight,"
                                "cdd11[:subset].")
_DATA_ROOT = flags.DEFINE_string("data_root", None, "Data root (default: the config's).")
_SAVE_IMAGES = flags.DEFINE_bool("save_images", False, "Write restored images to DIR/eval/images.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", None,
                                   "At most this many images per set (default: the config's).")
_OFFICIAL_NOISE = flags.DEFINE_bool("official_eval_noise", False,
                                    "Add router noise at test time, as the official code does.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  config = training.load_config(_WORKDIR.value)
  if _MAX_IMAGES.value is not None:
    config.eval.max_images = _MAX_IMAGES.value
  evaluation.evaluate(config, _WORKDIR.value, model_dir=_MODEL_DIR.value,
                      benchmarks=_BENCHMARKS.value, data_root=_DATA_ROOT.value,
                      save_images=_SAVE_IMAGES.value, official_noise=_OFFICIAL_NOISE.value)


if __name__ == "__main__":
  app.run(main)
