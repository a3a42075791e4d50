"""Pictures of results: sample grids and routing heatmaps, written atomically as PNG."""

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
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

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
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
