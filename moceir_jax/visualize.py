"""Pictures of results: sample grids, routing heatmaps, per-task training curves (atomic PNGs)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def _save(img: Image.Image, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  img.save(tmp)
  os.replace(tmp, path)


def _pyplot():
  """pyplot on the file-only backend (no display needed); imported late, as it is slow."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save_figure(fig, path: str) -> None:
  plt = _pyplot()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def _centre(img: np.ndarray, size: int) -> np.ndarray:
  h, w = img.shape[:2]
  y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
  out = np.zeros((size, size, 3), np.float32)
  crop = img[y:y + size, x:x + size]
  out[:crop.shape[0], :crop.shape[1]] = crop
  return out


def sample_grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], path: str,
                columns: Sequence[str] = ("degraded", "restored", "clean"),
                tile: int = 192) -> None:
  """One row per (label, images); images are centre-cropped to ``tile`` pixels."""
  label_h, label_w, pad = 18, 110, 4
  width = label_w + len(columns) * (tile + pad)
  height = label_h + len(rows) * (tile + pad)
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for j, name in enumerate(columns):
    draw.text((label_w + j * (tile + pad) + 4, 3), name, fill=(0, 0, 0))
  for i, (label, imgs) in enumerate(rows):
    y = label_h + i * (tile + pad)
    draw.text((4, y + tile // 2 - 6), label[:18], fill=(0, 0, 0))
    for j, img in enumerate(imgs):
      arr = (np.clip(_centre(np.asarray(img, np.float32), tile), 0, 1) * 255 + 0.5)
      canvas.paste(Image.fromarray(arr.astype(np.uint8)), (label_w + j * (tile + pad), y))
  _save(canvas, path)


def routing_heatmap(usage: dict[str, dict[str, Sequence[float]]], path: str,
                    expert_labels: dict[str, Sequence[str]] | None = None,
                    title: str = "expert selection frequency") -> None:
  """Tasks x experts, one panel per decoder block: usage[task][block] = fractions per expert."""
  plt = _pyplot()

  tasks = list(usage)
  blocks = list(next(iter(usage.values())))
  fig, axes = plt.subplots(1, len(blocks), figsize=(2.2 + 1.6 * len(blocks), 0.9 + 0.42 *
                                                    len(tasks)), squeeze=False)
  for ax, block in zip(axes[0], blocks):
    grid = np.array([usage[t][block] for t in tasks], np.float64)
    ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    labels = (expert_labels or {}).get(block) or [f"e{e}" for e in range(grid.shape[1])]
    ax.set_xticks(range(grid.shape[1]), labels, fontsize=7)
    ax.set_yticks(range(len(tasks)), tasks if ax is axes[0][0] else [""] * len(tasks),
                  fontsize=7)
    ax.set_title(block, fontsize=8)
    for (r, c), v in np.ndenumerate(grid):
      ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
              color="white" if v < 0.6 else "black")
  fig.suptitle(title + " (%)", fontsize=9)
  _save_figure(fig, path)


def task_curves(records: Sequence[dict], path: str) -> list[str]:
  """Each task's training L1 relative to its degraded input's, against the step.

  ``records`` are metrics.jsonl lines holding ``l1/TASK`` and ``input_l1/TASK``.
  Below 1 the model improves on its input; a curve that climbs above 1 is a
  task the model is making worse. Returns the tasks plotted.
  """
  plt = _pyplot()
  from matplotlib.ticker import FormatStrFormatter  # pylint: disable=import-outside-toplevel

  tasks = sorted({k[len("l1/"):] for r in records for k in r if k.startswith("l1/")})
  fig, ax = plt.subplots(figsize=(7.6, 3.6))
  for task in tasks:
    pts = [(r["step"], r[f"l1/{task}"] / r[f"input_l1/{task}"]) for r in records
           if f"l1/{task}" in r and r.get(f"input_l1/{task}", 0) > 0]
    if pts:
      ax.plot(*zip(*pts), label=task, linewidth=1.2)
  ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
  ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
  ax.set_xlabel("step", fontsize=8)
  ax.set_ylabel("L1 restored / L1 input", fontsize=8)
  ax.set_title("training L1 per task, relative to the degraded input (< 1: better)", fontsize=9)
  ax.tick_params(labelsize=7)
  if tasks:
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
  _save_figure(fig, path)
  return tasks
