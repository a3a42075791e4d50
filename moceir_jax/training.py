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
from flax import traverse_util

from moceir_jax import checkpoint, experiment_data, host, input_pipeline, losses, parallel
from moceir_jax import visualize
from moceir_jax import model as model_lib

CONFIG_FILE = "config.json"


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any  # nnx.State of the model's nnx.Param leaves
  opt_state: Any
  rng: jax.Array  # raw uint32 key data: the base key of every step's randomness
  # Length of the learning-rate schedule. Part of the state, not of the compiled
  # step, so a time-budgeted run can fix it after measuring its own speed, and a
  # resumed run continues the schedule it started.
  total_steps: jax.Array  # int32 scalar


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
  if t.time_budget_minutes < 0:
    problems.append(f"train.time_budget_minutes={t.time_budget_minutes} must be >= 0")
  if t.lr <= 0:
    problems.append(f"train.lr={t.lr} must be > 0")
  for name in ("l1_weight", "fft_weight", "psnr_weight", "aux_weight"):
    if not t[name] >= 0:  # a negative weight would maximise that loss
      problems.append(f"train.{name}={t[name]} must be >= 0")
  if d.patch % model_config(config).size_multiple:
    problems.append(f"data.patch={d.patch} must be a multiple of "
                    f"{model_config(config).size_multiple} (2**(levels-1))")
  if d.task_set == "synthetic":
    try:
      experiment_data.task_weights(d)
    except ValueError as e:
      problems.append(str(e))
  if not 0.0 <= d.darken_prob <= 1.0:
    problems.append(f"data.darken_prob={d.darken_prob} must be in [0, 1]")
  if not 0.0 < d.darken_min <= 1.0:
    problems.append(f"data.darken_min={d.darken_min} must be in (0, 1]")
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


def make_schedule(config, warmup_steps: int):
  """``lr(step, total_steps)``: linear warm-up from 0, then cosine decay to ``end_lr``.

  The reference's schedule (optax's warmup_cosine_decay_schedule), with the
  total a traced value so it can live in the train state.
  """
  t = config.train

  def lr(step, total_steps):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.float32(max(warmup_steps, 0))
    decay = jnp.maximum(jnp.asarray(total_steps, jnp.float32), warm + 1.0) - warm
    warmup_lr = t.lr * step / jnp.maximum(warm, 1.0)
    frac = jnp.clip((step - warm) / decay, 0.0, 1.0)
    cosine_lr = t.end_lr + (t.lr - t.end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(step < warm, warmup_lr, cosine_lr)

  return lr


def make_optimizer(config, warmup_steps: int):
  """(tx, lr): AdamW at unit rate, whose updates the train step scales by ``lr(step, total)``.

  optax's adamw multiplies both the Adam direction and the decoupled weight
  decay by the rate, so scaling its unit-rate updates is the same optimizer.
  """
  t = config.train
  tx = optax.adamw(1.0, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay)
  if t.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
  return tx, make_schedule(config, warmup_steps)


def create_state(cfg: model_lib.MoCEIRConfig, tx, seed: int, total_steps: int = 1):
  """(graphdef, buffers, TrainState): the model split into its static and trained parts."""
  model = model_lib.create(cfg, seed=seed)
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(seed)),
                     total_steps=jnp.asarray(total_steps, jnp.int32))
  return graphdef, buffers, state


def make_train_step(graphdef, buffers, tx, schedule, weights: dict[str, float],
                    num_tasks: int = 1):
  """The pure train step: (state, batch, rng) -> (new state, metrics).

  Besides scalars, the metrics hold ``task_l1``, ``task_input_l1`` and
  ``task_count`` (num_tasks,): the summed per-image L1 of the restoration and
  of the degraded input, and the number of images of each task in the batch
  (``batch["task"]``, all task 0 when absent). One mixed-task loss hides a task
  that stalls, or that the model makes worse than its input, while the others
  improve; the loop sums these over its logging window and reports each task.
  """

  def loss_fn(params, batch, rng):
    model = nnx.merge(graphdef, params, buffers)
    out = model(batch["degraded"], train=True, noise_key=rng)
    parts = {"l1": losses.l1(out.image, batch["clean"]),
             "fft": losses.fft_l1(out.image, batch["clean"]),
             "psnr": losses.neg_psnr(out.image, batch["clean"]),
             "aux": out.aux_loss}
    total = sum(weights[k] * v for k, v in parts.items() if weights[k])
    per_image = jnp.mean(jnp.abs(out.image - batch["clean"]), axis=(1, 2, 3))
    return total, (parts, per_image)

  def train_step(state: TrainState, batch, rng):
    (loss, (parts, per_image)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = schedule(state.step, state.total_steps)
    params = optax.apply_updates(state.params, jax.tree.map(lambda u: lr * u, updates))
    task = batch.get("task", jnp.zeros(per_image.shape, jnp.int32))
    by_task = lambda v: jax.ops.segment_sum(v, task, num_tasks)
    input_l1 = jnp.mean(jnp.abs(batch["degraded"] - batch["clean"]), axis=(1, 2, 3))
    metrics = dict(loss=loss, **parts, lr=lr, grad_norm=optax.global_norm(grads),
                   task_l1=by_task(per_image), task_input_l1=by_task(input_l1),
                   task_count=by_task(jnp.ones_like(per_image)))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


class TimeBudget:
  """Fits the schedule's length to a wall-clock budget, measured on this machine.

  Training speed differs several-fold between machines, so a fixed step count
  is minutes on one and an hour on another. With ``train.time_budget_minutes``
  the first steps are timed (after compilation, within the warm-up, whose
  learning rates do not depend on the total) and the total is set so that
  training ends when the budget does; it is fitted once more after about an
  eighth of the budget, since a dozen steps do not tell the run's rate (the
  12-minute denoising benchmark measured 2.2 steps/s over them, on batches
  prepared during compilation, then ran at 2.0 and overran by 1.5 minutes;
  with the refit: 1.82, then 1.99 steps/s, and it ended on time). The
  cosine's value barely moves at the refit (it is near its top). The total is
  stored in the train state, so a resumed run keeps it. Every process uses
  process 0's figures, and refits at the same step.
  """

  MEASURE_STEPS = 12
  REFIT_FRACTION = 8  # refit after 1/8 of the steps the first fit predicts

  def __init__(self, minutes: float, warmup_steps: int):
    self.seconds = 60.0 * minutes
    self.measure = max(1, min(self.MEASURE_STEPS, warmup_steps)) if warmup_steps else 4
    self.t0 = self.s0 = self.next_fit = None
    self.fits = 0
    self.rate = float("nan")

  def __bool__(self):
    return self.seconds > 0

  def start(self, step: int):
    self.t0, self.s0 = time.perf_counter(), step
    self.next_fit = step + self.measure

  def due(self, step: int) -> bool:
    return self.t0 is not None and self.fits < 2 and step == self.next_fit

  def total_steps(self, step: int) -> int:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    elapsed = time.perf_counter() - self.t0
    self.rate = (step - self.s0) / elapsed
    total = step + int(max(self.seconds - elapsed, 0.0) * self.rate)
    total = int(multihost_utils.broadcast_one_to_all(np.int32(total)))
    self.fits += 1
    # From the broadcast total, so every process picks the same step; a refit
    # over fewer steps than the first measurement would be no better than it.
    window = (total - step) // self.REFIT_FRACTION
    self.next_fit = step + window
    if window < self.measure:
      self.fits = 2
    return total


def step_key(state_rng, step: int):
  return jax.random.fold_in(jax.random.wrap_key_data(state_rng), step)


def compile_step(train_step, state, batch, key):
  """Compiles ahead of the first run, then hands the compiler's freed memory back to the OS,
  so that the step's buffers do not come on top of it (see :mod:`moceir_jax.host`).

  JAX's caches go first: the traced step and its lowering, and the small
  programs that initialisation ran one op at a time (0.4 GB for MoCE-IR-S; the
  compiled step is held here, and anything else recompiles when next used)."""
  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch, key).compile()
  jax.clear_caches()
  host.release_free_memory()
  if jax.process_index() == 0:
    rss = host.resident_bytes()
    print(f"train step compiled in {time.perf_counter() - t0:.0f} s"
          + (f"; {rss / 1e9:.1f} GB resident" if rss else "")
          + f"; allocator: {host.allocator_in_use()}", flush=True)
  return compiled


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

  def train(self, step: int, metrics: dict, tasks: dict | None = None):
    """A progress line; ``tasks``: name -> (mean L1 of the restoration, of the input,
    images) over the logging window."""
    if not self.active:
      return
    m = {k: float(v) for k, v in metrics.items()}
    elapsed = time.perf_counter() - self.t0
    rate = (step - self.s0) / elapsed if step > self.s0 else float("nan")
    eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
    print(f"step {step}/{self.total} | loss {m['loss']:.4f} (l1 {m['l1']:.4f} fft {m['fft']:.4f} "
          f"psnr {-m['psnr']:.2f} dB aux {m['aux']:.4f}) | lr {m['lr']:.2e} | {rate:.2f} steps/s "
          f"{rate * self.batch_size:.1f} img/s | ETA {_duration(eta)}", flush=True)
    tasks = tasks or {}
    if len(tasks) > 1:
      print("  l1 by task (restored/input): " + "  ".join(
          f"{k} {l1:.4f}/{l1_in:.4f}" for k, (l1, l1_in, _) in tasks.items()), flush=True)
    for k, (l1, l1_in, n) in tasks.items():
      m[f"l1/{k}"], m[f"input_l1/{k}"], m[f"images/{k}"] = l1, l1_in, n
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


def plot_task_curves(workdir: str) -> str | None:
  """``DIR/task_l1.png`` from ``DIR/metrics.jsonl`` (the last record of each step wins,
  as a resumed run repeats the steps after its checkpoint); None without per-task records."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return None
  by_step = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      by_step[rec["step"]] = rec
  records = [by_step[k] for k in sorted(by_step)]
  if not any(k.startswith("l1/") for r in records for k in r):
    return None
  out = os.path.join(workdir, "task_l1.png")
  visualize.task_curves(records, out)
  return out


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


def config_changes(previous: dict | None, config) -> list[str]:
  """``key: old -> new`` for every setting that differs from the run's saved config.

  A resumed run continues with the config it is given, whatever the checkpoint was
  trained with; shapes are checked on restore, but a changed loss weight, learning
  rate or task list would pass silently and make the run a mix of two recipes.
  """
  if previous is None:
    return []
  # Both sides as JSON values, so a tuple in the config equals the list it was saved as.
  old, new = (traverse_util.flatten_dict(json.loads(t), sep=".")
              for t in (json.dumps(previous), config.to_json()))
  unset = "(unset)"
  return [f"{k}: {old.get(k, unset)!r} -> {new.get(k, unset)!r}"
          for k in sorted(set(old) | set(new)) if old.get(k, unset) != new.get(k, unset)]


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
  previous = (load_config(workdir).to_dict()
              if os.path.isfile(os.path.join(workdir, CONFIG_FILE)) else None)
  write_config(config, workdir)
  cfg = model_config(config)
  mesh = parallel.make_mesh()
  local_batch = parallel.local_batch_size(config.train.global_batch_size)

  sources = experiment_data.training_sources(config.data)
  total, warmup = schedule_lengths(config, experiment_data.samples_per_epoch(sources))
  tx, schedule = make_optimizer(config, warmup)
  weights = dict(l1=config.train.l1_weight, fft=config.train.fft_weight,
                 psnr=config.train.psnr_weight, aux=config.train.aux_weight)
  graphdef, buffers, state = create_state(cfg, tx, config.seed, total)
  state_sh = parallel.state_shardings(state, mesh, config.mesh.fsdp, config.mesh.fsdp_min_size)
  state = jax.device_put(state, state_sh)
  buffers = jax.device_put(buffers, parallel.replicated(mesh))

  data = input_pipeline.train_dataset(
      sources, batch_size=local_batch, patch=config.data.patch, seed=config.seed,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      worker_count=config.data.worker_count, on_error=config.data.on_error,
      darken=(config.data.darken_prob, config.data.darken_min))
  data_iter = iter(data)

  manager = checkpoint.training_manager(workdir, keep=config.checkpoint.keep,
                                        async_save=config.checkpoint.async_save)
  latest = manager.latest_step()
  if latest is not None:
    abstract = jax.tree_util.tree_map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, state_sh)
    state = checkpoint.restore_training(manager, latest, abstract, data_iter)
    total = int(state.total_steps)  # the schedule this run started with (maybe time-budgeted)
    logging.info("resumed from step %d", latest)
    if jax.process_index() == 0:
      print(f"resuming from checkpoint at step {latest} of {total}", flush=True)
      changes = config_changes(previous, config)
      if changes:
        print(f"warning: the config differs from the one this run started with "
              f"({CONFIG_FILE}); continuing with the new values:\n  " + "\n  ".join(changes),
              flush=True)
  budget = TimeBudget(config.train.time_budget_minutes, warmup) if latest is None else None

  task_names = [s.task for s in sources]  # the pipeline's task ids index this list
  train_step = jax.jit(make_train_step(graphdef, buffers, tx, schedule, weights,
                                       len(task_names)),
                       in_shardings=(state_sh, parallel.batch_sharding(mesh),
                                     parallel.replicated(mesh)),
                       out_shardings=(state_sh, parallel.replicated(mesh)),
                       donate_argnums=(0,))

  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  reporter = Reporter(workdir, total, config.train.global_batch_size)
  step = int(state.step)
  if jax.process_index() == 0:
    devices, processes = jax.device_count(), jax.process_count()
    print(f"training {model_lib.param_count(cfg):,}-parameter MoCE-IR for {total} steps "
          f"(batch {config.train.global_batch_size} on {devices} device{'s' * (devices != 1)}, "
          f"{processes} process{'es' * (processes != 1)}) in {workdir}", flush=True)
  quick_sets = evaluation.quick_sets(config)
  metrics = {}
  window = None  # per task: summed restored and input L1, image count, since the last line
  first_step = step
  compiled = None
  try:
    while step < total:
      batch = next(data_iter)
      batch = parallel.global_batch({k: batch[k] for k in ("degraded", "clean", "task")}, mesh)
      key = step_key(state.rng, step)
      if compiled is None:
        compiled = compile_step(train_step, state, batch, key)
      state, metrics = compiled(state, batch, key)
      step += 1
      tasks = (metrics["task_l1"], metrics["task_input_l1"], metrics["task_count"])
      window = tasks if window is None else jax.tree.map(jnp.add, window, tasks)
      if step == first_step + 1:  # rates exclude compilation
        jax.block_until_ready(metrics)
        reporter.start(step)
        if budget:
          budget.start(step)
      if budget and budget.due(step):
        jax.block_until_ready(metrics)
        total = budget.total_steps(step)
        state = state.replace(total_steps=jax.device_put(jnp.asarray(total, jnp.int32),
                                                         state_sh.total_steps))
        reporter.total = total
        if jax.process_index() == 0:
          print(f"time budget {config.train.time_budget_minutes:g} min at {budget.rate:.2f} "
                f"steps/s: training for {total} steps", flush=True)
      if step % config.train.log_every == 0 or step == total:
        sums, input_sums, counts = jax.device_get(window)
        window = None
        scalars = {k: v for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
        reporter.train(step, scalars, {name: (float(l1 / n), float(l1_in / n), int(n))
                                       for name, l1, l1_in, n
                                       in zip(task_names, sums, input_sums, counts) if n})
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
    curves = plot_task_curves(workdir)
    if curves:
      print(f"per-task training curves: {curves}", flush=True)
  if config.eval.at_end:
    evaluation.evaluate(config, workdir, model=model)
  return jax.device_get(metrics)
