"""benchmarks/: the parts of the scripts that decide what a figure means."""

import importlib.util
import os

import pytest

from conftest import PROJECT
from moceir_jax import model as model_lib
from moceir_jax import training


def _like_for_like():
  path = os.path.join(PROJECT, "benchmarks", "denoise_like_for_like.py")
  spec = importlib.util.spec_from_file_location("denoise_like_for_like", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_like_for_like_keeps_the_anchor_recipe_whatever_the_demo_adds():
  # The script starts from the demo config; the demo's own loss terms (its PSNR loss)
  # once leaked into the comparison with the official code's run.
  c = _like_for_like().recipe(12.0)
  training.validate(c)
  t = c.train
  assert (t.l1_weight, t.fft_weight, t.psnr_weight, t.aux_weight) == (1.0, 0.0, 0.0, 0.01)
  assert (t.lr, t.global_batch_size, c.data.patch) == (1e-3, 8, 64)
  assert tuple(c.data.tasks) == ("denoise_25",) and c.data.darken_prob == 0.0
  assert t.time_budget_minutes == 12.0
  assert training.model_config(c) == model_lib.moceir_demo(train_dispatch="dense")


def test_like_for_like_never_resumes_an_earlier_run(tmp_path):
  mod = _like_for_like()
  assert mod.fresh_run_dir(str(tmp_path), 12.0, overwrite=False) == str(tmp_path / "12min")
  old = tmp_path / "12min"
  (old / "checkpoints").mkdir(parents=True)
  (old / "metrics.jsonl").write_text("{}\n")
  with pytest.raises(SystemExit, match=r"12min already holds a run.*--overwrite"):
    mod.fresh_run_dir(str(tmp_path), 12.0, overwrite=False)
  assert mod.fresh_run_dir(str(tmp_path), 12.0, overwrite=True) == str(old)
  assert not old.exists()
  assert mod.fresh_run_dir(str(tmp_path), 2.5, overwrite=False) == str(tmp_path / "2.5min")
