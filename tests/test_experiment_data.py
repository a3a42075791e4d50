"""Training sources and evaluation sets from a config."""

import os

import numpy as np
import pytest
from PIL import Image

from moceir_jax import datasets, experiment_data, input_pipeline
import ml_collections


def _data(**kw):
  d = ml_collections.ConfigDict(dict(task_set="synthetic", root="", clean="builtin",
                                     tasks=("denoise_25", "dehaze")))
  d.update(kw)
  return d


def test_builtin_photos_are_real_colour_images_and_heldout_is_disjoint():
  train, held = experiment_data.builtin_photos(), experiment_data.builtin_photos(heldout=True)
  assert len(train) >= 8 and len(held) >= 3
  assert not set(map(os.path.basename, train)) & set(map(os.path.basename, held))
  for path in train + held:
    with Image.open(path) as im:
      assert min(im.size) >= 256, path


def test_synthetic_sources_and_heldout_sets():
  sources = experiment_data.training_sources(_data())
  assert [s.task for s in sources] == ["denoise_25", "dehaze"]
  assert experiment_data.samples_per_epoch(sources) == 2 * len(experiment_data.builtin_photos())
  sets = experiment_data.heldout_sets(_data())
  assert sorted(sets) == ["heldout/dehaze", "heldout/denoise_25"]
  sample = next(input_pipeline.eval_samples(sets["heldout/dehaze"], crop=64))
  assert sample["clean"].shape == (64, 64, 3) and sample["degraded"].shape == (64, 64, 3)
  # fixed per image: the same held-out input every time
  again = next(input_pipeline.eval_samples(sets["heldout/dehaze"], crop=64))
  np.testing.assert_array_equal(sample["degraded"], again["degraded"])


def test_task_weights_set_the_mix_and_are_checked():
  sources = experiment_data.training_sources(_data(task_weights=(1.0, 3.0)))
  n = len(experiment_data.builtin_photos())
  assert [s.weight for s in sources] == [1.0 * n, 3.0 * n]
  assert [s.weight for s in experiment_data.training_sources(_data(task_weights=()))] == [n, n]
  with pytest.raises(ValueError, match=r"2 values for 3 tasks .*one weight per task"):
    experiment_data.training_sources(_data(tasks=("denoise_25", "dehaze", "derain"),
                                           task_weights=(1.0, 2.0)))
  with pytest.raises(ValueError, match=r"must be a number > 0, got \[0\.0\]"):
    experiment_data.training_sources(_data(task_weights=(1.0, 0.0)))


def test_folder_source_holds_out_every_tenth_image(tmp_path):
  for i in range(12):
    Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"{i:02d}.png")
  train = experiment_data.clean_images(str(tmp_path))
  held = experiment_data.clean_images(str(tmp_path), heldout=True)
  assert [os.path.basename(p) for p in held] == ["00.png", "10.png"]
  assert len(train) == 10 and not set(train) & set(held)


def test_official_task_sets_need_a_root_and_name_it(tmp_path):
  with pytest.raises(ValueError, match="set --config.data.root"):
    experiment_data.training_sources(_data(task_set="aio3"))
  with pytest.raises(datasets.LayoutError, match="denoising"):
    experiment_data.training_sources(_data(task_set="aio3", root=str(tmp_path)))


def test_benchmark_sets_from_the_mini_root(mini_root):
  sets = experiment_data.benchmark_sets(mini_root, ["denoise_50", "derain", "dehaze"])
  assert {k: len(v) for k, v in sets.items()} == {"denoise_50": 68, "derain": 2, "dehaze": 2}
