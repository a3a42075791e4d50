"""Evaluation: PSNR/SSIM per benchmark and how the router used the experts.

The paper's protocol: every test image restored whole (padded to the model's
size multiple and cropped back; never centre-cropped), clipped to [0, 1], PSNR
and SSIM on RGB (:mod:`moceir_jax.metrics`). Routing is deterministic by
default (the official code also adds router noise at test time; reproduce it
with ``official_noise``). Per benchmark and decoder block the report gives
how often each expert was chosen and the compute share: FLOPs of the chosen
experts relative to always running the largest one. Results go to
``DIR/eval/`` as JSON, a Markdown table, a routing heatmap and a sample grid.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moceir_jax import checkpoint, datasets, experiment_data, input_pipeline, metrics, visualize
from moceir_jax import images as images_lib
from moceir_jax import model as model_lib
from moceir_jax.inference import Restorer


# ----------------------------------------------------------------------------
# Expert cost.


def expert_flops(model: model_lib.MoCEIR, size: int = 64) -> dict[str, list[float]]:
  """XLA's FLOP count of each expert of each decoder block on a size x size input."""
  out, cache = {}, {}
  for i, stage in enumerate(model.decoder):
    for j, blk in enumerate(stage.blocks):
      name = f"dec.{i}.2.layers.{j}"
      width = blk.adapter.experts[0].down.kernel.shape[0]
      if width not in cache:
        x = jnp.zeros((1, size, size, width), jnp.float32)
        flops = []
        for expert in blk.adapter.experts:
          graphdef, state = nnx.split(expert)
          fn = jax.jit(lambda s, a, b, g=graphdef: nnx.merge(g, s)(a, b))
          cost = fn.lower(state, x, x).cost_analysis()
          cost = cost[0] if isinstance(cost, (list, tuple)) else cost
          flops.append(float(cost.get("flops", 0.0)))
        cache[width] = flops
      out[name] = cache[width]
  return out


# ----------------------------------------------------------------------------
# Quick evaluation during training (fixed held-out crops, one compile).


def quick_sets(config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """name -> (degraded, clean) stacks of fixed held-out crops: the first
  ``eval.quick_images`` of every evaluation set (held-out synthetic sets,
  and the benchmarks when a data root is set), centre-cropped to ``eval.quick_crop``."""
  if config.eval.every_steps <= 0:
    return {}
  from moceir_jax.padding import pad_to  # pylint: disable=import-outside-toplevel
  out = {}
  crop = config.eval.quick_crop
  for name, (pairs, _) in _sets(config, None, tuple(config.eval.benchmarks)).items():
    samples = list(input_pipeline.eval_samples(pairs[:config.eval.quick_images], crop=crop))
    deg = np.stack([pad_to(s["degraded"], crop, crop) for s in samples])
    clean = np.stack([pad_to(s["clean"], crop, crop) for s in samples])
    out[name] = (deg, clean)
  return out


def quick_evaluate(model, sets, config, workdir: str, step: int) -> dict[str, float]:
  """Mean PSNR per held-out task; writes DIR/samples/step_N.png (process 0)."""
  restorer = Restorer(model, dispatch="sparse", bucket=model.cfg.size_multiple,
                      tile=max(512, config.eval.quick_crop))
  scores, rows = {}, []
  for task, (deg, clean) in sets.items():
    restored = np.asarray(restorer(deg).image)
    scores[task] = float(np.mean([metrics.psnr(r, c) for r, c in zip(restored, clean)]))
    rows.append((task, (deg[0], restored[0], clean[0])))
  if jax.process_index() == 0:
    visualize.sample_grid(rows, os.path.join(workdir, "samples", f"step_{step:07d}.png"),
                          tile=min(192, config.eval.quick_crop))
    print(f"quick eval @ {step}: " + "  ".join(f"{t.removeprefix('heldout/')} {v:.2f}"
                                                 for t, v in scores.items())
          + f"  (mean {np.mean(list(scores.values())):.2f} dB)", flush=True)
  return scores


# ----------------------------------------------------------------------------
# Full evaluation.


def load_trained_model(workdir: str, config=None) -> model_lib.MoCEIR:
  """Parameters of the newest training checkpoint in ``workdir`` (else ``workdir/model``)."""
  from moceir_jax import training  # pylint: disable=import-outside-toplevel
  config = config or training.load_config(workdir)
  cfg = training.model_config(config)
  manager = checkpoint.training_manager(workdir, read_only=True)
  step = manager.latest_step() if os.path.isdir(manager.directory) else None
  if step is None:
    model_dir = os.path.join(workdir, "model")
    if os.path.isdir(model_dir):
      return checkpoint.load_model(model_dir)
    raise FileNotFoundError(f"{workdir}: no training checkpoint in checkpoints/ and no model/")
  tx, _ = training.make_optimizer(config, 0)
  graphdef, buffers, _ = training.create_state(cfg, tx, 0)
  shapes = jax.eval_shape(lambda: training.create_state(cfg, tx, 0)[2])
  state = checkpoint.restore_training(manager, step, shapes)
  manager.close()
  print(f"evaluating {workdir} at step {step}", flush=True)
  return nnx.merge(graphdef, state.params, buffers)


def _sets(config, data_root: str | None, benchmarks) -> dict[str, tuple[list, int]]:
  """name -> (pairs, crop)."""
  sets = {}
  root = data_root if data_root is not None else config.data.root
  if benchmarks and root:
    for name, pairs in experiment_data.benchmark_sets(root, benchmarks).items():
      sets[name] = (pairs, 0)
  if config.eval.heldout and config.data.task_set == "synthetic":
    for name, pairs in experiment_data.heldout_sets(config.data).items():
      sets[name] = (pairs, config.eval.heldout_crop)
  n = config.eval.max_images
  return {k: (pairs[:n] if n > 0 else pairs, crop) for k, (pairs, crop) in sets.items()}


def evaluate_set(restorer: Restorer, pairs, crop: int, flops: dict[str, list[float]],
                 key=None, save_dir: str | None = None) -> dict[str, Any]:
  """Scores of one test set: input and output PSNR/SSIM, expert usage, compute share."""
  rows = []
  usage = {b: np.zeros(len(f)) for b, f in flops.items()}
  share = {b: [] for b in flops}
  first = None
  for i, sample in enumerate(input_pipeline.eval_samples(pairs, crop=crop)):
    k = None if key is None else jax.random.fold_in(key, i)
    out = restorer(sample["degraded"], k)
    restored = np.clip(np.asarray(out.image), 0.0, 1.0)
    rows.append(dict(name=sample["name"],
                     input_psnr=metrics.psnr(sample["degraded"], sample["clean"]),
                     input_ssim=metrics.ssim(sample["degraded"], sample["clean"]),
                     psnr=metrics.psnr(restored, sample["clean"]),
                     ssim=metrics.ssim(restored, sample["clean"]),
                     experts={b: np.asarray(v).tolist() for b, v in out.indices.items()}))
    for b, idx in out.indices.items():
      chosen = np.atleast_1d(np.asarray(idx))
      usage[b][chosen] += 1.0 / len(chosen)
      share[b].append(sum(flops[b][c] for c in chosen) / max(flops[b]))
    if first is None:
      first = (sample["degraded"], restored, sample["clean"])
    if save_dir is not None:
      path = os.path.join(save_dir, os.path.splitext(sample["name"].replace("/", "_"))[0] + ".png")
      os.makedirs(save_dir, exist_ok=True)
      images_lib.write_image(path, restored, images_lib.ImageInfo(path=path, kind="image"))
  n = len(rows)
  summary = {k: float(np.mean([r[k] for r in rows])) for k in
             ("input_psnr", "input_ssim", "psnr", "ssim")}
  summary["images"] = n
  summary["expert_usage"] = {b: (u / max(n, 1)).tolist() for b, u in usage.items()}
  summary["compute_share"] = {b: float(np.mean(s)) for b, s in share.items()}
  summary["mean_compute_share"] = float(np.mean(list(summary["compute_share"].values())))
  summary["per_image"] = rows
  return summary, first


def markdown_table(results: dict[str, dict]) -> str:
  lines = ["| set | images | input PSNR | input SSIM | PSNR | SSIM | compute share |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['images']} | {r['input_psnr']:.2f} | {r['input_ssim']:.4f} | "
                 f"{r['psnr']:.2f} | {r['ssim']:.4f} | {100 * r['mean_compute_share']:.0f}% |")
  return "\n".join(lines)


def routing_table(results: dict[str, dict]) -> str:
  blocks = list(next(iter(results.values()))["expert_usage"])
  lines = ["| set | " + " | ".join(blocks) + " |", "|---|" + "---|" * len(blocks)]
  for name, r in results.items():
    cells = ["/".join(f"{100 * v:.0f}" for v in r["expert_usage"][b]) for b in blocks]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def evaluate(config, workdir: str, *, model: model_lib.MoCEIR | None = None,
             model_dir: str | None = None, benchmarks=None, data_root: str | None = None,
             save_images: bool | None = None, official_noise: bool | None = None,
             seed: int = 0) -> dict[str, dict]:
  """Evaluates every configured set; writes DIR/eval/{results.json,results.md,*.png}."""
  benchmarks = tuple(config.eval.benchmarks if benchmarks is None else benchmarks)
  save_images = config.eval.save_images if save_images is None else save_images
  official_noise = config.eval.official_noise if official_noise is None else official_noise
  if model is None:
    model = checkpoint.load_model(model_dir) if model_dir else load_trained_model(workdir, config)
  if official_noise:
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, state)  # a copy: the caller's model keeps its config
    model.cfg = model.cfg.replace(routing_noise="always")
  sets = _sets(config, data_root, benchmarks)
  if not sets:
    raise ValueError("nothing to evaluate: set --config.data.root (or --data_root) for "
                     f"benchmarks {list(benchmarks)}, or train on synthetic tasks for held-out sets")
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  restorer = Restorer(model, dispatch="sparse", bucket=16 if config.eval.tile == 0 else 64,
                      tile=config.eval.tile or 4096)
  flops = expert_flops(model)
  key = jax.random.key(seed) if official_noise else None
  results, samples = {}, []
  for name, (pairs, crop) in sets.items():
    summary, first = evaluate_set(
        restorer, pairs, crop, flops, key=key,
        save_dir=os.path.join(out_dir, "images", name.replace("/", "_")) if save_images else None)
    results[name] = summary
    samples.append((name, first))
    print(f"{name}: {summary['images']} images, PSNR {summary['input_psnr']:.2f} -> "
          f"{summary['psnr']:.2f} dB, SSIM {summary['input_ssim']:.4f} -> {summary['ssim']:.4f}",
          flush=True)
  if jax.process_index() == 0:
    _write(out_dir, results, samples, flops, model.cfg)
  return results


def _write(out_dir, results, samples, flops, cfg) -> None:
  summary = {k: {kk: vv for kk, vv in v.items() if kk != "per_image"} for k, v in results.items()}
  payload = dict(results=results, expert_flops=flops,
                 expert_patch_sizes=[2 ** (i + 2) for i in range(cfg.num_experts)])
  tmp = os.path.join(out_dir, "results.json.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1)
  os.replace(tmp, os.path.join(out_dir, "results.json"))
  md = ("## Restoration\n\n" + markdown_table(summary) + "\n\n## Expert selection (% of images, "
        "experts smallest to largest)\n\n" + routing_table(summary) + "\n")
  tmp = os.path.join(out_dir, "results.md.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(md)
  os.replace(tmp, os.path.join(out_dir, "results.md"))
  print("\n" + md, flush=True)
  usage = {name: r["expert_usage"] for name, r in summary.items()}
  labels = {b: [f"{p}px" for p in payload["expert_patch_sizes"]] for b in flops}
  visualize.routing_heatmap(usage, os.path.join(out_dir, "routing_heatmap.png"), labels)
  visualize.sample_grid(samples, os.path.join(out_dir, "samples.png"))
