"""Trains MoCE-IR: python train.py --config configs/moceir.py[:MODEL[,TASKS]] --workdir DIR.

Resumes from the newest checkpoint in DIR. Multi-process runs (SLURM, Cloud
TPU, or --coordinator_address/--num_processes/--process_id) join with
jax.distributed before anything else touches the devices.
"""

from moceir_jax import host

if __name__ == "__main__":
  host.reexec_with_fast_allocator()  # before JAX loads; see moceir_jax/host.py
  host.use_compilation_cache()

from absl import app, flags, logging
from ml_collections import config_flags

from moceir_jax import parallel, training

_CONFIG = config_flags.DEFINE_config_file("config", "configs/moceir.py",
                                          "Training configuration file[:variant].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.",
                               required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process runs without SLURM/TPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
