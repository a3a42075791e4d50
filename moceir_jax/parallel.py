"""Devices, processes and shardings for data-parallel training.

One ``data`` mesh axis over every device of every process: the batch is split
along it; parameters and optimizer state are replicated, or (``fsdp``) large
arrays are split along it too and gathered by XLA where used. Each process
loads only its slice of the global batch and the pieces are assembled into
one global array, so the same code runs on one CPU, one GPU, a multi-GPU node
or a multi-host cluster.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process run, from explicit arguments or the environment.

  With no arguments, ``jax.distributed`` detects SLURM, Open MPI and Cloud TPU
  environments itself; on a lone machine without those it does nothing. On CPU,
  cross-process collectives use gloo.
  """
  explicit = coordinator_address is not None
  detected = any(v in os.environ for v in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                                           "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"))
  if not explicit and not detected:
    return
  if jax.config.jax_platforms in (None, "", "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def state_shardings(tree, mesh: Mesh, fsdp: bool = False, min_size: int = 2 ** 18):
  """Sharding per leaf: replicated, or with ``fsdp`` split on the largest divisible axis."""
  n = mesh.shape[DATA_AXIS]

  def one(x):
    shape = getattr(x, "shape", ())
    if not fsdp or n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
      return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
      if shape[axis] % n == 0:
        spec = [None] * len(shape)
        spec[axis] = DATA_AXIS
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree_util.tree_map(one, tree)


def local_batch_size(global_batch_size: int) -> int:
  """This process's share of the global batch (which must split evenly over devices)."""
  n_dev, n_proc = jax.device_count(), jax.process_count()
  if global_batch_size % n_dev:
    raise ValueError(f"train.global_batch_size={global_batch_size} is not divisible by the "
                     f"{n_dev} devices")
  return global_batch_size // n_proc


def global_batch(local: dict, mesh: Mesh) -> dict:
  """This process's slice of each array -> one global array sharded over ``data``."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
