"""Training: optimizer, the jitted train step, and the resumable training loop.

``train_and_evaluate(config, workdir)`` composes the model, the input pipeline
and the evaluation code; the model itself knows nothing of them. The train
step is one pure, jitted function ``train_step(state, batch, rng)`` over a
mesh of all devices (batch sharded, state replicated or FSDP-sharded), with
the state donated. Everything a run needs to continue exactly where it stopped
(parameters, optimizer state, step, RNG, each process's data-iterator
position) is checkpointed; a restart resumes from the newest checkpoint and,
given the same devices, ends bit-identical to a run that was never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from moceir_jax import checkpoint, experiment_data, input_pipeline, losses, parallel
from moceir_jax import model as model_lib

CONFIG_FILE = "config.json"


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any  # nnx.State of the model's nnx.Param leaves
  opt_state: Any
  rng: jax.Array  # raw uint32 key data: the base key of every step's randomness


def model_config(config) -> model_lib.MoCEIRConfig:
  try:
    return model_lib.MoCEIRConfig.from_dict(dict(config.model.to_dict()))
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.model: {e}") from e


def validate(config) -> None:
  """Fails early, naming the field, on values that would fail later or silently mislead."""
  model_config(config)
  t, d = config.train, config.data
  problems = []
  if t.global_batch_size < 1:
    problems.append(f"train.global_batch_size={t.global_batch_size} must be >= 1")
  if t.num_steps <= 0 and t.num_epochs <= 0:
    problems.append("set train.num_steps > 0 or train.num_epochs > 0")
  if t.lr <= 0:
    problems.append(f"train.lr={t.lr} must be > 0")
  if d.patch % model_config(config).size_multiple:
    problems.append(f"data.patch={d.patch} must be a multiple of "
                    f"{model_config(config).size_multiple} (2**(levels-1))")
  if d.on_error not in ("fail", "skip"):
    problems.append(f"data.on_error={d.on_error!r} must be 'fail' or 'skip'")
  if config.checkpoint.every_steps < 1 or config.checkpoint.keep < 1:
    problems.append("checkpoint.every_steps and checkpoint.keep must be >= 1")
  if problems:
    raise ValueError("invalid config: " + "; ".join(problems))


def schedule_lengths(config, samples_per_epoch: int) -> tuple[int, int]:
  """(total steps, warm-up steps): explicit steps, or epochs of the reference."""
  t = config.train
  steps_per_epoch = max(1, samples_per_epoch // t.global_batch_size)
  total = t.num_steps if t.num_steps > 0 else t.num_epochs * steps_per_epoch
  warmup = t.warmup_steps if t.warmup_steps >= 0 else t.warmup_epochs * steps_per_epoch
  return int(total), int(min(warmup, total))


def make_optimizer(config, total_steps: int, warmup_steps: int):
  """AdamW with linear warm-up from 0 then cosine decay, as the reference's schedule."""
  t = config.train
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=t.end_lr)
  tx = optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay)
  if t.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
  return tx, schedule


def create_state(cfg: model_lib.MoCEIRConfig, tx, seed: int):
  """(graphdef, buffers, TrainState): the model split into its static and trained parts."""
  model = model_lib.create(cfg, seed=seed)
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(seed)))
  return graphdef, buffers, state


def make_train_step(graphdef, buffers, tx, schedule, weights: dict[str, float]):
  """The pure train step: (state, batch, rng) -> (new state, scalar metrics)."""

  def loss_fn(params, batch, rng):
    model = nnx.merge(graphdef, params, buffers)
    out = model(batch["degraded"], train=True, noise_key=rng, dispatch="dense")
    parts = {"l1": losses.l1(out.image, batch["clean"]),
             "fft": losses.fft_l1(out.image, batch["clean"]),
             "aux": out.aux_loss}
    total = sum(weights[k] * v for k, v in parts.items() if weights[k])
    return total, parts

  def train_step(state: TrainState, batch, rng):
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=loss, **parts, lr=schedule(state.step),
                   grad_norm=optax.global_norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def step_key(state_rng, step: int):
  return jax.random.fold_in(jax.random.wrap_key_data(state_rng), step)


def model_from_state(graphdef, buffers, params) -> model_lib.MoCEIR:
  """A model holding the given parameters, gathered to host memory on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  host = multihost_utils.process_allgather(params, tiled=True)
  return nnx.merge(graphdef, jax.tree_util.tree_map(jnp.asarray, host), buffers)


# ----------------------------------------------------------------------------
# Progress reporting.


class Reporter:
  """Progress lines, a metrics JSONL file and TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: str, total_steps: int, batch_size: int):
    self.active = jax.process_index() == 0
    self.total, self.batch_size = total_steps, batch_size
    self.t0, self.s0 = None, None
    self.writer = None
    if self.active:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def start(self, step: int):
    """Starts the clock (after the first, compiling, step)."""
    self.t0, self.s0 = time.perf_counter(), step

  def train(self, step: int, metrics: dict):
    if not self.active:
      return
    m = {k: float(v) for k, v in metrics.items()}
    elapsed = time.perf_counter() - self.t0
    rate = (step - self.s0) / elapsed if step > self.s0 else float("nan")
    eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
    print(f"step {step}/{self.total} | loss {m['loss']:.4f} (l1 {m['l1']:.4f} fft {m['fft']:.4f} "
          f"aux {m['aux']:.4f}) | lr {m['lr']:.2e} | {rate:.2f} steps/s "
          f"{rate * self.batch_size:.1f} img/s | ETA {_duration(eta)}", flush=True)
    self.jsonl.write(json.dumps(dict(step=step, **m, steps_per_s=rate)) + "\n")
    self.jsonl.flush()
    for k, v in m.items():
      self.writer.add_scalar(f"train/{k}", v, step)
    if rate == rate:
      self.writer.add_scalar("train/steps_per_s", rate, step)

  def scalars(self, step: int, values: dict, prefix: str):
    if self.active:
      for k, v in values.items():
        self.writer.add_scalar(f"{prefix}/{k}", v, step)
      self.writer.flush()

  def close(self):
    if self.active:
      self.writer.close()
      self.jsonl.close()


def _duration(seconds: float) -> str:
  if seconds != seconds or math.isinf(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------
# The loop.


def write_config(config, workdir: str) -> None:
  """The resolved config, so eval.py --workdir needs nothing else (atomic write)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(config.to_json(indent=1))
  os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir}: no {CONFIG_FILE}; is this a train.py work directory?")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (resuming from the newest checkpoint in ``workdir``); returns the last metrics."""
  from moceir_jax import evaluation  # pylint: disable=import-outside-toplevel
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  write_config(config, workdir)
  cfg = model_config(config)
  mesh = parallel.make_mesh()
  local_batch = parallel.local_batch_size(config.train.global_batch_size)

  sources = experiment_data.training_sources(config.data)
  total, warmup = schedule_lengths(config, experiment_data.samples_per_epoch(sources))
  tx, schedule = make_optimizer(config, total, warmup)
  weights = dict(l1=config.train.l1_weight, fft=config.train.fft_weight,
                 aux=config.train.aux_weight)
  graphdef, buffers, state = create_state(cfg, tx, config.seed)
  state_sh = parallel.state_shardings(state, mesh, config.mesh.fsdp, config.mesh.fsdp_min_size)
  state = jax.device_put(state, state_sh)
  buffers = jax.device_put(buffers, parallel.replicated(mesh))

  data = input_pipeline.train_dataset(
      sources, batch_size=local_batch, patch=config.data.patch, seed=config.seed,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      worker_count=config.data.worker_count, on_error=config.data.on_error)
  data_iter = iter(data)

  manager = checkpoint.training_manager(workdir, keep=config.checkpoint.keep,
                                        async_save=config.checkpoint.async_save)
  latest = manager.latest_step()
  if latest is not None:
    abstract = jax.tree_util.tree_map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, state_sh)
    state = checkpoint.restore_training(manager, latest, abstract, data_iter)
    logging.info("resumed from step %d", latest)
    if jax.process_index() == 0:
      print(f"resuming from checkpoint at step {latest}", flush=True)

  train_step = jax.jit(make_train_step(graphdef, buffers, tx, schedule, weights),
                       in_shardings=(state_sh, parallel.batch_sharding(mesh),
                                     parallel.replicated(mesh)),
                       out_shardings=(state_sh, parallel.replicated(mesh)),
                       donate_argnums=(0,))

  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  reporter = Reporter(workdir, total, config.train.global_batch_size)
  step = int(state.step)
  if jax.process_index() == 0:
    print(f"training {model_lib.param_count(cfg):,}-parameter MoCE-IR for {total} steps "
          f"(batch {config.train.global_batch_size} on {jax.device_count()} devices, "
          f"{jax.process_count()} processes) in {workdir}", flush=True)
  quick_sets = evaluation.quick_sets(config)
  metrics = {}
  first_step = step
  try:
    while step < total:
      batch = next(data_iter)
      batch = parallel.global_batch({k: batch[k] for k in ("degraded", "clean")}, mesh)
      state, metrics = train_step(state, batch, step_key(state.rng, step))
      step += 1
      if step == first_step + 1:  # rates exclude compilation
        jax.block_until_ready(metrics)
        reporter.start(step)
      if step % config.train.log_every == 0 or step == total:
        reporter.train(step, jax.device_get(metrics))
      if step % config.checkpoint.every_steps == 0 and step < total:
        checkpoint.save_training(manager, step, state, data_iter, config.to_dict())
      if quick_sets and (step % config.eval.every_steps == 0 or step == total):
        model = model_from_state(graphdef, buffers, state.params)
        scores = evaluation.quick_evaluate(model, quick_sets, config, workdir, step)
        reporter.scalars(step, scores, "quick_eval")
      if stop["signal"] is not None:
        logging.warning("signal %s: saving a checkpoint at step %d and stopping", stop["signal"],
                        step)
        break
    checkpoint.save_training(manager, step, state, data_iter, config.to_dict(), force=True)
    manager.wait_until_finished()
  finally:
    signal.signal(signal.SIGTERM, previous)
    reporter.close()
    manager.close()
  if stop["signal"] is not None:
    return jax.device_get(metrics)
  model = model_from_state(graphdef, buffers, state.params)
  if jax.process_index() == 0:
    checkpoint.save_model(os.path.join(workdir, "model"), model)
    print(f"done: {step} steps; model exported to {os.path.join(workdir, 'model')}", flush=True)
  if config.eval.at_end:
    evaluation.evaluate(config, workdir, model=model)
  return jax.device_get(metrics)
