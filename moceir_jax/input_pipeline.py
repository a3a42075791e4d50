"""Grain input pipeline: mixed-task training batches and whole-image evaluation samples.

Training: one source per task (pairs from :mod:`moceir_jax.datasets`, or clean
images to degrade on the fly), each shuffled and repeated, mixed with per-task
weights (by default the official repeat factors times the set sizes), then
per-sample loading, aligned random crop, one of the 8 flips/rotations applied
to both images, and the task's synthetic degradation where the pair has no
degraded file. Every random choice comes from the per-sample generator Grain
derives from the seed and the sample's index, so batches are identical for any
number of worker processes, and the iterator state can be checkpointed and
restored to continue exactly. For multi-host training each process loads only its slice of every global
batch (``shard_index`` of ``shard_count``).

Elements are dicts of NumPy arrays: ``degraded`` and ``clean`` (B, P, P, 3)
float32 in [0, 1], ``task`` (B,) int32, an index into the task list, and
``skipped`` (B,) int32, unreadable files passed over (``on_error="skip"``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import zlib
from typing import Iterator, Sequence

import grain
import numpy as np
from absl import flags

from moceir_jax import datasets, degradations, images
from moceir_jax.padding import pad_to


@dataclasses.dataclass(frozen=True)
class TaskSource:
  """Pairs of one task and the weight with which it is sampled."""
  task: str
  pairs: tuple[datasets.Pair, ...]
  weight: float

  @classmethod
  def official(cls, task: str, pairs: Sequence[datasets.Pair]) -> "TaskSource":
    # The reference concatenates each set repeated REPEATS[task] times and
    # shuffles the lot, so a task is drawn with probability ∝ repeats × size.
    return cls(task, tuple(pairs), float(datasets.REPEATS.get(task, 1) * len(pairs)))


def random_crop(degraded: np.ndarray, clean: np.ndarray, patch: int, rng) -> tuple:
  """The same random patch of both images; images smaller than the patch are reflect-padded."""
  if degraded.shape != clean.shape:
    raise ValueError(f"degraded {degraded.shape} and clean {clean.shape} sizes differ")
  degraded, clean = pad_to(degraded, patch, patch), pad_to(clean, patch, patch)
  h, w = clean.shape[:2]
  y = int(rng.integers(0, h - patch + 1))
  x = int(rng.integers(0, w - patch + 1))
  return degraded[y:y + patch, x:x + patch], clean[y:y + patch, x:x + patch]


def flip_rotate(img: np.ndarray, mode: int) -> np.ndarray:
  """One of the 8 symmetries of the square (0 is the identity)."""
  if mode >= 4:
    img = img[:, ::-1]
  return np.rot90(img, k=mode % 4)


@functools.lru_cache(maxsize=8)
def _tfds_source(dataset: str, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds.data_source(dataset, split=split, data_dir=data_dir)


def read_clean(ref) -> np.ndarray:
  """A clean image, from a file path or a TFDS record, as HxWx3 float32 in [0, 1]."""
  if not isinstance(ref, datasets.TFDSImage):
    return images.read_image(ref)[0]
  img = np.asarray(_tfds_source(ref.dataset, ref.split, ref.data_dir)[ref.index][ref.key])
  if img.ndim == 2:
    img = img[..., None]
  if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
    raise images.ImageError(f"{ref.name}: expected an HxWx(1|3|4) image, got {img.shape}")
  scale = 65535.0 if img.dtype == np.uint16 else 255.0 if img.dtype == np.uint8 else 1.0
  img = img[..., :3].astype(np.float32) / scale
  return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


class DecodedCache:
  """Decoded images by file, the least recently used dropped beyond ``max_bytes``.

  A training sample is a 64-128 px crop of an image decoded whole: with the
  built-in photos (a dozen, ~40 MB decoded) decoding was most of the demo's
  pipeline time, which runs beside the train step on the same 2 cores: a batch
  of 8x64x64 over all seven tasks took 65 ms, 16 ms with the cache.
  Cached arrays are read-only, so no transform can alter what later samples
  see. With a large dataset the hit rate is low and the cache costs only its
  budget of memory per loading process.
  """

  def __init__(self, max_bytes: int):
    self.max_bytes, self.bytes = max_bytes, 0
    self.items: collections.OrderedDict = collections.OrderedDict()
    self.lock = threading.Lock()  # Grain's reader threads share one transform

  def __getstate__(self):  # a worker process starts with an empty cache of its own
    return {"max_bytes": self.max_bytes}

  def __setstate__(self, state):
    self.__init__(state["max_bytes"])

  def get(self, key, load) -> np.ndarray:
    with self.lock:
      hit = self.items.get(key)
      if hit is not None:
        self.items.move_to_end(key)
        return hit
    arr = load()  # outside the lock: other threads keep decoding other files
    if 0 < arr.nbytes <= self.max_bytes:
      arr.setflags(write=False)
      with self.lock:
        if key not in self.items:
          self.items[key] = arr
          self.bytes += arr.nbytes
        while self.bytes > self.max_bytes:
          _, old = self.items.popitem(last=False)
          self.bytes -= old.nbytes
    return arr


class _LoadSample:
  """Picklable per-sample transform (it runs inside worker processes)."""

  MAX_RETRIES = 10

  def __init__(self, sources: Sequence[TaskSource], patch: int, augment: bool, on_error: str,
               cache_bytes: int = 0, darken: tuple[float, float] = (0.0, 1.0)):
    self.task_ids = {s.task: i for i, s in enumerate(sources)}
    self.pairs = {s.task: s.pairs for s in sources}
    self.patch, self.augment, self.on_error = patch, augment, on_error
    self.darken_prob, self.darken_min = darken
    self.cache = DecodedCache(cache_bytes)

  def _read(self, pair):
    clean = self.cache.get(pair.clean, lambda: read_clean(pair.clean))
    degraded = clean if pair.degraded is None else self.cache.get(
        pair.degraded, lambda: images.read_image(pair.degraded)[0])
    if degraded.shape != clean.shape:
      raise images.ImageError(f"{pair.degraded}: size {degraded.shape[:2]} differs from its "
                              f"clean image {pair.clean} {clean.shape[:2]}")
    return degraded, clean

  def __call__(self, pair: datasets.Pair, rng: np.random.Generator):
    skipped = 0
    while True:
      try:
        degraded, clean = self._read(pair)
        break
      except images.ImageError as e:
        if self.on_error == "fail" or skipped >= self.MAX_RETRIES:
          raise
        # Skip: draw another sample of the same task from this sample's own
        # generator, so the stream stays deterministic.
        logging.warning("skipping unreadable sample: %s", e)
        skipped += 1
        candidates = self.pairs[pair.task]
        pair = candidates[int(rng.integers(0, len(candidates)))]
    degraded, clean = random_crop(degraded, clean, self.patch, rng)
    if self.augment:
      mode = int(rng.integers(0, 8))
      degraded, clean = flip_rotate(degraded, mode), flip_rotate(clean, mode)
    if pair.degraded is None:  # synthesise the task's degradation on the crop
      if self.darken_prob > 0 and "lowlight" not in pair.task and rng.uniform() < self.darken_prob:
        clean = clean * np.float32(rng.uniform(self.darken_min, 1.0))
      degraded = degradations.get(pair.task)(np.ascontiguousarray(clean), rng)
    return {"degraded": np.ascontiguousarray(degraded, np.float32),
            "clean": np.ascontiguousarray(clean, np.float32),
            "task": np.int32(self.task_ids[pair.task]),
            "skipped": np.int32(skipped)}


def train_dataset(sources: Sequence[TaskSource], *, batch_size: int, patch: int = 128,
                  seed: int = 0, shard_index: int = 0, shard_count: int = 1,
                  worker_count: int = 0, augment: bool = True,
                  on_error: str = "fail", cache_mb: int = 256,
                  darken: tuple[float, float] = (0.0, 1.0)) -> grain.IterDataset:
  """An infinite, deterministic stream of training batches for this process.

  ``batch_size`` is per process; process ``shard_index`` of ``shard_count``
  gets its slice of each global batch. ``on_error``: "fail" raises on an unreadable
  file (naming it); "skip" logs it and draws another sample of the same task;
  each batch's ``skipped`` entry counts the files passed over. ``cache_mb``:
  decoded images kept per loading process (see :class:`DecodedCache`; 0 = off).
  ``darken=(p, s)``: with probability p, a synthetic sample's clean crop is
  scaled by a factor drawn from [s, 1] before it is degraded (never for low
  light, whose target exposure is what the model learns to restore). With a
  handful of photos, dark images are otherwise nearly all low-light inputs, and
  a model learns to brighten every dark image it sees.
  """
  prob, low = darken
  if not (0.0 <= prob <= 1.0 and 0.0 < low <= 1.0):
    raise ValueError(f"darken=(probability {prob}, minimum scale {low}): expected a "
                     f"probability in [0, 1] and a scale in (0, 1]")
  if on_error not in ("fail", "skip"):
    raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
  if not sources:
    raise ValueError("no training sources")
  for s in sources:
    if not s.pairs:
      raise ValueError(f"task {s.task!r} has no samples")
    if any(p.degraded is None for p in s.pairs):
      degradations.get(s.task)  # fail now, not in a worker, on an unknown task name
  parts = [grain.MapDataset.source(list(s.pairs)).shuffle(seed=seed + 7919 * i).repeat()
           for i, s in enumerate(sources)]
  total = sum(s.weight for s in sources)
  mixed = grain.MapDataset.mix(parts, [s.weight / total for s in sources])
  ds = mixed.random_map(_LoadSample(sources, patch, augment, on_error, cache_mb << 20,
                                    (float(prob), float(low))), seed=seed)
  # Batches are formed before the workers, each worker building whole batches
  # that Grain interleaves back in order: identical batches for any number of
  # workers, and one transfer per batch. Sample i is drawn with its own
  # generator whichever process loads it, and process p takes the p-th slice
  # of every global batch (of shard_count * batch_size samples), so N
  # processes together see exactly the batches one process would.
  batched = ds.batch(batch_size, drop_remainder=True)[shard_index::shard_count]
  uses_tfds = any(isinstance(p.clean, datasets.TFDSImage) for s in sources for p in s.pairs)
  if uses_tfds and worker_count > 0:
    # Worker processes reading TFDS ArrayRecord files stalled after the first
    # batch in our tests (cause not yet known); read with threads instead,
    # which keeps the batches identical and does not hang.
    logging.warning("TFDS source: using %d reader threads instead of worker processes",
                    worker_count)
    return batched.to_iter_dataset(grain.ReadOptions(num_threads=worker_count))
  it = batched.to_iter_dataset()
  if worker_count > 0:
    # Grain's workers read its absl flags; outside an absl app (notebooks,
    # tests) they are unparsed, so accept their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def benchmark_noise_seed(path: str, sigma: float) -> int:
  """A fixed seed per test image and noise level (stable across runs and machines)."""
  return zlib.crc32(f"{path.rsplit('/', 1)[-1]}:{sigma:g}".encode())


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
  h, w = img.shape[:2]
  y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
  return img[y:y + size, x:x + size]


def eval_samples(pairs: Sequence[datasets.Pair], crop: int = 0) -> Iterator[dict]:
  """Images in the given (fixed) order: degraded, clean, name, task.

  Whole images, as benchmarks are scored; ``crop`` > 0 centre-crops clean
  images (before any synthetic degradation) to at most ``crop`` pixels a side.
  """
  for pair in pairs:
    clean = read_clean(pair.clean)
    if crop:
      clean = np.ascontiguousarray(centre_crop(clean, crop))
    if pair.degraded is None:
      sigma = datasets.NOISE_SIGMA.get(pair.task)
      deg = degradations.get(pair.task)
      rng = np.random.default_rng(benchmark_noise_seed(pair.name, sigma or 0.0))
      degraded = deg(clean, rng)
    else:
      degraded, _ = images.read_image(pair.degraded)
      if crop:
        degraded = np.ascontiguousarray(centre_crop(degraded, crop))
      if degraded.shape != clean.shape:
        raise images.ImageError(f"{pair.degraded}: size {degraded.shape[:2]} differs from its "
                                f"clean image {pair.clean} {clean.shape[:2]}")
    yield {"degraded": degraded, "clean": clean, "name": pair.name, "task": pair.task}


def official_sources(root: str, task_set: str) -> list[TaskSource]:
  """Training sources of the all-in-one settings (``aio3``/``aio5``) or CDD11 (``cdd11[:subset]``)."""
  if task_set.startswith("cdd11"):
    subset = task_set.split(":", 1)[1] if ":" in task_set else "all"
    pairs = datasets.cdd11_pairs(root, "train", subset)
    by_task: dict[str, list] = {}
    for p in pairs:
      by_task.setdefault(p.task, []).append(p)
    return [TaskSource(t, tuple(ps), float(datasets.REPEATS["cdd11"] * len(ps)))
            for t, ps in sorted(by_task.items())]
  if task_set not in datasets.TASK_SETS:
    raise ValueError(f"unknown task set {task_set!r}; expected one of "
                     f"{sorted(datasets.TASK_SETS)} or cdd11[:subset]")
  return [TaskSource.official(t, datasets.train_pairs(root, t))
          for t in datasets.TASK_SETS[task_set]]


def synthetic_sources(clean_paths: Sequence[str], tasks: Sequence[str],
                      weights: Sequence[float] | None = None) -> list[TaskSource]:
  """Every task synthesised from the same clean images (equal weights by default).

  Weights are scaled by the number of images, so they sum to the samples of
  one epoch (every image once per task at equal weights), as official ones do.
  """
  weights = weights or [1.0] * len(tasks)
  for t in tasks:
    degradations.get(t)
  return [TaskSource(t, tuple(datasets.Pair(clean=c, degraded=None, task=t) for c in clean_paths),
                     float(w) * len(clean_paths)) for t, w in zip(tasks, weights)]
