"""The on-disk model format: architecture as JSON plus parameters as an Orbax checkpoint.

A model directory holds ``model_config.json`` (a :class:`MoCEIRConfig`) and
``state/`` (the NNX state: parameters and buffers). Converted official weights
and exported training results use it; evaluation and restoration load it.
Writes go to a temporary sibling that is renamed into place, so an interrupted
save never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moceir_jax import model as model_lib

CONFIG_FILE = "model_config.json"
STATE_DIR = "state"


def _plain_state(model: model_lib.MoCEIR) -> dict:
  return nnx.to_pure_dict(nnx.state(model))


def save_model(directory: str, model: model_lib.MoCEIR) -> None:
  directory = os.path.abspath(directory)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory) + "-", dir=parent)
  try:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      f.write(model.cfg.to_json())
    state = jax.tree_util.tree_map(np.asarray, _plain_state(model))
    # One process writes a model directory; without this Orbax would wait at
    # a barrier for the other processes of a multi-process run.
    me = jax.process_index()
    only_me = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with ocp.StandardCheckpointer(multiprocessing_options=only_me) as ckptr:
      ckptr.save(os.path.join(tmp, STATE_DIR), state)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_config(directory: str) -> model_lib.MoCEIRConfig:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: not a model directory (no {CONFIG_FILE})")
  with open(path) as f:
    try:
      return model_lib.MoCEIRConfig.from_dict(json.load(f))
    except (ValueError, TypeError) as e:
      raise ValueError(f"{path}: {e}") from e


def load_model(directory: str, **config_overrides) -> model_lib.MoCEIR:
  """Loads a model directory; overrides may change run-time fields (dtype, routing_noise)."""
  cfg = load_config(directory).replace(**config_overrides)
  abstract = model_lib.abstract(cfg)
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _plain_state(abstract))
  with ocp.StandardCheckpointer() as ckptr:
    try:
      state = ckptr.restore(os.path.join(os.path.abspath(directory), STATE_DIR), target)
    except (ValueError, KeyError) as e:
      raise ValueError(f"{directory}: saved parameters do not fit its {CONFIG_FILE}: {e}") from e
  # Orbax restores what was saved even when the target disagrees; check here.
  bad = [f"{jax.tree_util.keystr(p)}: saved {tuple(a.shape)}, config needs {tuple(t.shape)}"
         for (p, a), t in zip(jax.tree_util.tree_leaves_with_path(state),
                              jax.tree_util.tree_leaves(target))
         if tuple(a.shape) != tuple(t.shape)]
  if bad:
    raise ValueError(f"{directory}: saved parameters do not fit its {CONFIG_FILE}: "
                     + "; ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))
  model = model_lib.create(cfg)
  graph_state = nnx.state(model)
  nnx.replace_by_pure_dict(graph_state, state)
  nnx.update(model, graph_state)
  return model


# ----------------------------------------------------------------------------
# Training checkpoints: DIR/checkpoints/<step>/{state, data, config}.
# state = parameters, optimizer state, step and RNG (Orbax, sharded arrays
# saved and restored in place); data = each process's input-iterator state
# (Grain); config = the run's configuration. Orbax writes each step to a
# temporary directory and renames it when complete, so a step directory that
# exists is whole: a kill at any moment leaves the previous one usable.

TRAIN_CHECKPOINTS = "checkpoints"


def training_manager(workdir: str, *, keep: int = 3, async_save: bool = True,
                     read_only: bool = False) -> ocp.CheckpointManager:
  import grain  # pylint: disable=import-outside-toplevel
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         enable_async_checkpointing=async_save,
                                         read_only=read_only)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), TRAIN_CHECKPOINTS), options=options,
      item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                         data=grain.checkpoint.CheckpointHandler(),
                         config=ocp.JsonCheckpointHandler()))


def save_training(manager: ocp.CheckpointManager, step: int, state, data_iterator, config: dict,
                  force: bool = False) -> bool:
  import grain  # pylint: disable=import-outside-toplevel
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
      config=ocp.args.JsonSave(config)), force=force)


def restore_training(manager: ocp.CheckpointManager, step: int, abstract_state,
                     data_iterator=None):
  """Restores ``state`` (shaped and sharded like ``abstract_state``) and, if given, the iterator."""
  import grain  # pylint: disable=import-outside-toplevel
  items = dict(state=ocp.args.StandardRestore(abstract_state))
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  where = os.path.join(str(manager.directory), str(step))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{where}: checkpoint does not fit this configuration "
                     f"(different model or optimizer?): {e}") from e
  bad = [f"{jax.tree_util.keystr(p)}: saved {tuple(a.shape)}, expected {tuple(t.shape)}"
         for (p, a), t in zip(jax.tree_util.tree_leaves_with_path(restored.state),
                              jax.tree_util.tree_leaves(abstract_state))
         if tuple(a.shape) != tuple(t.shape)]
  if bad:
    raise ValueError(f"{where}: checkpoint does not fit this configuration: "
                     + "; ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))
  return restored.state
