"""Dataset layouts: which files make a (degraded, clean) pair, for every task and benchmark.

The folder structure and pairing rules are those of the official MoCE-IR code
(inherited from PromptIR/AirNet), under one data root:

* training: ``denoising/{BSD400/*.jpg, WaterlooED/*.bmp}`` (clean only; noise is
  synthesised), ``deraining/RainTrainL/{rainy,gt}``, ``dehazing/RESIDE/part1..4``
  paired to ``dehazing/RESIDE/clear/<id>.jpg`` by the name before the first
  ``_``, ``deblurring/GoPro/crop/train/{input_crops,target_crops}``,
  ``llie/LOLv1/Train/{input,target}``;
* benchmarks: ``denoising/cBSD68/original_png`` (noise synthesised with a fixed
  seed per image), ``deraining/Rain100L/{rainy,gt}``,
  ``dehazing/SOTS/outdoor/{hazy,gt}`` (``<id>_<A>_<beta>.jpg`` -> ``<id>.png``),
  ``deblurring/GoPro/test/{input,target}``, ``llie/LOLv1/Test/{input,target}``;
* CDD11: ``cdd11/{train,test}/clear`` plus one folder per degradation
  (``low``, ``haze_rain``, ...), paired by identical file names.

Input/target folders pair by file name where the names agree and otherwise by
sorted order, as the official code does (RainTrainL names ``rain-N`` and
``norain-N``). Each pair records its task so evaluation can group by it.
Problems are reported with the expected path and the layout it belongs to.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

TASK_SETS = {
    "aio3": ("denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"),
    "aio5": ("denoise_15", "denoise_25", "denoise_50", "derain", "dehaze", "deblur", "lowlight"),
}
# Official per-epoch repeats of each training set (its sampling weights).
REPEATS = {"denoise_15": 3, "denoise_25": 3, "denoise_50": 3, "derain": 120, "dehaze": 1,
           "deblur": 5, "lowlight": 20, "cdd11": 2}
NOISE_SIGMA = {"denoise_15": 15.0, "denoise_25": 25.0, "denoise_50": 50.0}
CDD11_SUBSETS = ("single", "double", "triple", "all")


class LayoutError(ValueError):
  """A data folder that is missing, empty or does not pair up."""


@dataclasses.dataclass(frozen=True)
class TFDSImage:
  """One image of a tensorflow-datasets dataset, read through ``tfds.data_source``."""
  dataset: str
  split: str
  index: int
  data_dir: str | None = None
  key: str = "image"

  @property
  def name(self) -> str:
    return f"{self.dataset}/{self.split}/{self.index}"


@dataclasses.dataclass(frozen=True)
class Pair:
  clean: str | TFDSImage
  degraded: str | None  # None: synthesise the degradation named by `task` from `clean`
  task: str

  @property
  def name(self) -> str:
    if isinstance(self.clean, TFDSImage) and self.degraded is None:
      return self.clean.name
    return os.path.basename(self.degraded or self.clean)


def _folder(root: str, rel: str, layout: str) -> str:
  path = os.path.join(root, rel)
  if not os.path.isdir(path):
    raise LayoutError(f"missing folder {path} (expected by the {layout} layout under data root "
                      f"{root})")
  return path


def _files(folder: str, patterns: tuple[str, ...], layout: str) -> list[str]:
  files = sorted({f for p in patterns for f in glob.glob(os.path.join(folder, p))})
  if not files:
    raise LayoutError(f"{folder} has no images ({', '.join(patterns)}) for the {layout} layout")
  return files


def _digits(name: str) -> str:
  return "".join(re.findall(r"\d+", os.path.splitext(name)[0]))


def pair_folders(inputs: list[str], targets: list[str], layout: str) -> list[tuple[str, str]]:
  """Pairs by identical file name when the two folders agree, else by sorted order."""
  in_names = {os.path.basename(f): f for f in inputs}
  tg_names = {os.path.basename(f): f for f in targets}
  if set(in_names) == set(tg_names):
    return [(in_names[n], tg_names[n]) for n in sorted(in_names)]
  if len(inputs) != len(targets):
    in_keys = {_digits(os.path.basename(f)): os.path.basename(f) for f in inputs}
    tg_keys = {_digits(os.path.basename(f)): os.path.basename(f) for f in targets}
    lonely_in = sorted(in_keys[k] for k in set(in_keys) - set(tg_keys))
    lonely_tg = sorted(tg_keys[k] for k in set(tg_keys) - set(in_keys))
    raise LayoutError(
        f"{layout}: {len(inputs)} inputs in {os.path.dirname(inputs[0])} but {len(targets)} "
        f"targets in {os.path.dirname(targets[0])}; unmatched inputs: {lonely_in[:10]}, "
        f"unmatched targets: {lonely_tg[:10]}")
  return list(zip(inputs, targets))


def _paired(root, in_rel, tg_rel, task, layout, ext=("*.png",)):
  inputs = _files(_folder(root, in_rel, layout), ext, layout)
  targets = _files(_folder(root, tg_rel, layout), ext, layout)
  return [Pair(clean=t, degraded=i, task=task) for i, t in pair_folders(inputs, targets, layout)]


def _hazy_to_clean(hazy: list[str], clean_dir: str, clean_ext: str | None, layout: str):
  pairs, missing = [], []
  for h in hazy:
    stem, ext = os.path.splitext(os.path.basename(h))
    clean = os.path.join(clean_dir, stem.split("_")[0] + (clean_ext or ext))
    (pairs if os.path.isfile(clean) else missing).append((h, clean))
  if missing:
    raise LayoutError(f"{layout}: {len(missing)} hazy images have no clean image: "
                      + ", ".join(f"{os.path.basename(h)} -> {c}" for h, c in missing[:10]))
  return [Pair(clean=c, degraded=h, task="dehaze") for h, c in pairs]


def train_pairs(root: str, task: str) -> list[Pair]:
  """The official training set of ``task`` (each file once; see REPEATS for weights)."""
  layout = f"training '{task}'"
  if task in NOISE_SIGMA:
    folders = [("denoising/BSD400", ("*.jpg",)), ("denoising/WaterlooED", ("*.bmp",))]
    clean = [f for rel, pat in folders for f in _files(_folder(root, rel, layout), pat, layout)]
    return [Pair(clean=c, degraded=None, task=task) for c in clean]
  if task == "derain":
    return _paired(root, "deraining/RainTrainL/rainy", "deraining/RainTrainL/gt", task, layout)
  if task == "dehaze":
    hazy = [f for part in ("part1", "part2", "part3", "part4")
            for f in _files(_folder(root, f"dehazing/RESIDE/{part}", layout), ("*.jpg",), layout)]
    return _hazy_to_clean(hazy, _folder(root, "dehazing/RESIDE/clear", layout), None, layout)
  if task == "deblur":
    return _paired(root, "deblurring/GoPro/crop/train/input_crops",
                   "deblurring/GoPro/crop/train/target_crops", task, layout)
  if task == "lowlight":
    return _paired(root, "llie/LOLv1/Train/input", "llie/LOLv1/Train/target", task, layout)
  raise ValueError(f"unknown training task {task!r}; known: {sorted(REPEATS)}")


BENCHMARKS = ("denoise_15", "denoise_25", "denoise_50", "derain", "dehaze", "deblur", "lowlight")


def benchmark_pairs(root: str, benchmark: str) -> list[Pair]:
  """Test pairs of a benchmark, in a fixed (sorted) order."""
  layout = f"benchmark '{benchmark}'"
  if benchmark in NOISE_SIGMA:
    clean = _files(_folder(root, "denoising/cBSD68/original_png", layout), ("*.png",), layout)
    return [Pair(clean=c, degraded=None, task=benchmark) for c in clean]
  if benchmark == "derain":
    return _paired(root, "deraining/Rain100L/rainy", "deraining/Rain100L/gt", "derain", layout)
  if benchmark == "dehaze":
    hazy = _files(_folder(root, "dehazing/SOTS/outdoor/hazy", layout), ("*.jpg",), layout)
    return _hazy_to_clean(hazy, _folder(root, "dehazing/SOTS/outdoor/gt", layout), ".png", layout)
  if benchmark == "deblur":
    return _paired(root, "deblurring/GoPro/test/input", "deblurring/GoPro/test/target", "deblur",
                   layout)
  if benchmark == "lowlight":
    return _paired(root, "llie/LOLv1/Test/input", "llie/LOLv1/Test/target", "lowlight", layout)
  raise ValueError(f"unknown benchmark {benchmark!r}; known: {BENCHMARKS}")


def cdd11_pairs(root: str, split: str, subset: str = "all") -> list[Pair]:
  """CDD11 pairs: ``subset`` is single/double/triple/all or one degradation folder name."""
  if split not in ("train", "test"):
    raise ValueError(f"CDD11 split must be 'train' or 'test', got {split!r}")
  layout = f"CDD11 {split}"
  base = _folder(root, f"cdd11/{split}", layout)
  clean_dir = _folder(root, f"cdd11/{split}/clear", layout)
  folders = sorted(d for d in os.listdir(base)
                   if d != "clear" and os.path.isdir(os.path.join(base, d)))
  count = {"single": 1, "double": 2, "triple": 3}
  if subset in count:
    chosen = [d for d in folders if d.count("_") + 1 == count[subset]]
  elif subset == "all":
    chosen = folders
  elif subset in folders:
    chosen = [subset]
  else:
    raise LayoutError(f"{layout}: no degradation folder {subset!r} in {base}; found {folders} "
                      f"(or use one of {CDD11_SUBSETS})")
  if not chosen:
    raise LayoutError(f"{layout}: no '{subset}' degradation folders in {base}")
  pairs, missing = [], []
  for d in chosen:
    for f in _files(os.path.join(base, d), ("*.png",), layout):
      clean = os.path.join(clean_dir, os.path.basename(f))
      if os.path.isfile(clean):
        pairs.append(Pair(clean=clean, degraded=f, task=d))
      else:
        missing.append(f"{d}/{os.path.basename(f)}")
  if missing:
    raise LayoutError(f"{layout}: {len(missing)} degraded images have no clean image of the same "
                      f"name in {clean_dir}: {missing[:10]}")
  return pairs


def clean_folder(folder: str) -> list[str]:
  """Any folder of clean images, to be degraded on the fly."""
  layout = "clean image folder"
  if not os.path.isdir(folder):
    raise LayoutError(f"missing folder {folder} (a {layout})")
  return _files(folder, ("*.png", "*.jpg", "*.jpeg", "*.bmp", "*.tif", "*.tiff", "*.webp"), layout)


def tfds_images(dataset: str, split: str = "train", data_dir: str | None = None,
                key: str = "image") -> list[TFDSImage]:
  """Every image of a prepared TFDS dataset (no TensorFlow needed to read it)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    source = tfds.data_source(dataset, split=split, data_dir=data_dir)
  except Exception as e:  # TFDS raises several types for "not prepared here"
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise LayoutError(f"TFDS dataset {dataset!r} split {split!r} cannot be read from "
                      f"{data_dir or 'the default data_dir'} ({first_line}); prepare it first, "
                      "this project never downloads data") from e
  if len(source) == 0:
    raise LayoutError(f"TFDS dataset {dataset!r} split {split!r} is empty")
  if key not in source[0]:
    raise LayoutError(f"TFDS dataset {dataset!r} has no feature {key!r}; features: "
                      f"{sorted(source[0])}")
  return [TFDSImage(dataset, split, i, data_dir, key) for i in range(len(source))]
