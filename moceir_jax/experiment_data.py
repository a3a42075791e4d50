"""The data side of an experiment: training sources and evaluation sets from a config.

Turns ``config.data`` / ``config.eval`` into the objects of
:mod:`moceir_jax.input_pipeline` and :mod:`moceir_jax.datasets`, including the
built-in photographs that ship inside installed packages (so the demo needs
no download). Knows nothing of the model.
"""

from __future__ import annotations

import os
from typing import Sequence

from moceir_jax import datasets, input_pipeline

# Real colour photographs inside the scikit-image and matplotlib wheels. The
# held-out ones share no scene with the training ones (motorcycle_right, the
# stereo twin of motorcycle_left, is left out for that reason).
_BUILTIN_TRAIN = (
    ("skimage", "astronaut.png"), ("skimage", "chelsea.png"), ("skimage", "coffee.png"),
    ("skimage", "motorcycle_left.png"), ("skimage", "hubble_deep_field.jpg"),
    ("skimage", "ihc.png"), ("skimage", "retina.jpg"), ("skimage", "grass.png"),
    ("skimage", "gravel.png"), ("skimage", "brick.png"), ("skimage", "camera.png"),
)
_BUILTIN_HELDOUT = (
    ("skimage", "rocket.jpg"), ("matplotlib", "grace_hopper.jpg"), ("skimage", "coins.png"),
)


def _package_file(package: str, name: str) -> str:
  if package == "skimage":
    import skimage.data  # pylint: disable=import-outside-toplevel
    folder = os.path.dirname(skimage.data.__file__)
  else:
    import matplotlib  # pylint: disable=import-outside-toplevel
    folder = os.path.join(matplotlib.get_data_path(), "sample_data")
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise datasets.LayoutError(f"built-in photo {name} is missing from the installed {package} "
                               f"package (expected {path}); reinstall requirements.txt")
  return path


def builtin_photos(heldout: bool = False) -> list[str]:
  return [_package_file(p, n) for p, n in (_BUILTIN_HELDOUT if heldout else _BUILTIN_TRAIN)]


def clean_images(spec: str, heldout: bool = False) -> list:
  """Clean images named by ``spec``: "builtin", a folder, or "tfds:NAME[/SPLIT]".

  A folder or TFDS split is split deterministically: every tenth image (at
  least one) is held out for evaluation and never trained on.
  """
  if spec == "builtin":
    return builtin_photos(heldout)
  if spec.startswith("tfds:"):
    name, _, split = spec[len("tfds:"):].partition("/")
    refs = datasets.tfds_images(name, split or "train")
  else:
    refs = datasets.clean_folder(spec)
  if len(refs) < 2:
    raise datasets.LayoutError(f"{spec}: need at least 2 clean images (one is held out), "
                               f"found {len(refs)}")
  held = set(range(0, len(refs), 10))
  return [r for i, r in enumerate(refs) if (i in held) == heldout]


def task_weights(data) -> list[float] | None:
  """``data.task_weights`` checked against ``data.tasks`` (None = equal weights)."""
  weights = tuple(data.get("task_weights", ()) or ())
  if not weights:
    return None
  if len(weights) != len(data.tasks):
    raise ValueError(f"data.task_weights has {len(weights)} values for {len(data.tasks)} tasks "
                     f"{tuple(data.tasks)}; give one weight per task, in that order")
  bad = [w for w in weights if not isinstance(w, (int, float)) or not w > 0]
  if bad:
    raise ValueError(f"data.task_weights={weights}: every weight must be a number > 0, got {bad}")
  return [float(w) for w in weights]


def training_sources(data) -> list[input_pipeline.TaskSource]:
  if data.task_set == "synthetic":
    return input_pipeline.synthetic_sources(clean_images(data.clean), list(data.tasks),
                                            task_weights(data))
  if not data.root:
    raise ValueError(f"data.task_set={data.task_set!r} reads the official datasets: set "
                     "--config.data.root=DIR (or use data.task_set=synthetic)")
  return input_pipeline.official_sources(data.root, data.task_set)


def samples_per_epoch(sources: Sequence[input_pipeline.TaskSource]) -> int:
  """Training pairs in one epoch of the reference (each set times its repeats)."""
  return int(round(sum(s.weight for s in sources)))


def heldout_sets(data) -> dict[str, list[datasets.Pair]]:
  """One held-out synthetic set per training task, on images never trained on."""
  refs = clean_images(data.clean, heldout=True)
  return {f"heldout/{t}": [datasets.Pair(clean=r, degraded=None, task=t) for r in refs]
          for t in data.tasks}


def benchmark_sets(root: str, benchmarks: Sequence[str]) -> dict[str, list[datasets.Pair]]:
  """Benchmark name -> test pairs; ``cdd11`` expands to one set per CDD11 degradation."""
  out = {}
  for name in benchmarks:
    if name == "cdd11" or name.startswith("cdd11:"):
      subset = name.split(":", 1)[1] if ":" in name else "all"
      for p in datasets.cdd11_pairs(root, "test", subset):
        out.setdefault(f"cdd11/{p.task}", []).append(p)
    else:
      out[name] = datasets.benchmark_pairs(root, name)
  return out
