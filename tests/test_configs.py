"""configs/moceir.py: variants, overrides and validation."""

import importlib.util
import os
import sys

import jax
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import PROJECT
from moceir_jax import model as model_lib
from moceir_jax import training

CONFIG_FILE = os.path.join(PROJECT, "configs", "moceir.py")


def _module():
  spec = importlib.util.spec_from_file_location("moceir_config", CONFIG_FILE)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_paper_recipe_is_the_default_for_model_sizes():
  c = _module().get_config("s,aio3")
  assert training.model_config(c) == model_lib.moceir_s()
  assert (c.train.lr, c.train.weight_decay, c.train.global_batch_size, c.data.patch) == (
      2e-4, 0.01, 32, 128)
  assert (c.train.warmup_epochs, c.train.num_epochs) == (15, 150)
  assert (c.train.l1_weight, c.train.fft_weight, c.train.aux_weight) == (1.0, 0.1, 0.01)
  assert c.train.psnr_weight == 0.0  # the PSNR loss is the demo's, not the paper's
  assert c.model.with_complexity
  assert tuple(c.eval.benchmarks) == ("denoise_15", "denoise_25", "denoise_50", "derain",
                                      "dehaze")
  assert training.model_config(_module().get_config("base,aio5")) == model_lib.moceir()
  assert _module().get_config("tiny,cdd11:single").data.task_set == "cdd11:single"
  assert _module().get_config().data.task_set == "synthetic"  # demo by default


def test_schedule_in_reference_epochs():
  c = _module().get_config("s")
  total, warmup = training.schedule_lengths(c, samples_per_epoch=3200)
  assert (total, warmup) == (150 * 100, 15 * 100)


@pytest.mark.parametrize("warmup,total,end_lr", [(15, 100, 0.0), (0, 50, 1e-5), (30, 31, 0.0)])
def test_schedule_is_optax_warmup_cosine_with_the_total_as_data(warmup, total, end_lr):
  c = _module().get_config("smoke")
  c.train.end_lr = end_lr
  lr = training.make_schedule(c, warmup)
  ref = optax.warmup_cosine_decay_schedule(0.0, c.train.lr, warmup, max(total, warmup + 1),
                                           end_value=end_lr)
  steps = np.arange(0, total + 5)
  np.testing.assert_allclose(jax.vmap(lambda s: lr(s, total))(steps), jax.vmap(ref)(steps),
                             rtol=1e-5, atol=1e-9)


def test_time_budget_sets_the_total_from_the_measured_rate_and_refits_once(monkeypatch):
  # start(), the first fit (12 steps in 6 s), the refit (25 steps in 20 s: slower than it began).
  clock = iter([100.0, 106.0, 120.0])
  monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
  budget = training.TimeBudget(minutes=1.0, warmup_steps=30)
  assert budget and not training.TimeBudget(0.0, 30)
  budget.start(1)
  assert not budget.due(12) and budget.due(1 + budget.MEASURE_STEPS)
  total = budget.total_steps(13)
  assert budget.rate == pytest.approx(2.0) and total == 13 + int(54 * 2.0)
  refit = 13 + (total - 13) // budget.REFIT_FRACTION
  assert [s for s in range(14, total) if budget.due(s)] == [refit]
  total = budget.total_steps(refit)
  assert budget.rate == pytest.approx((refit - 1) / 20.0)
  assert total == refit + int(40 * (refit - 1) / 20.0)  # ends when the minute does
  assert not any(budget.due(s) for s in range(refit, total + 1))  # fitted twice, no more


def test_time_budget_too_short_to_refit_fits_once(monkeypatch):
  clock = iter([0.0, 1.0])  # 4 steps in 1 s, a 3-second budget: 8 more steps in all
  monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
  budget = training.TimeBudget(minutes=0.05, warmup_steps=0)
  budget.start(1)
  total = budget.total_steps(1 + budget.measure)
  assert total == 5 + 8 and not any(budget.due(s) for s in range(5, total + 1))


def test_unknown_variant_and_task_set_are_named():
  mod = _module()
  with pytest.raises(ValueError, match="unknown model 'huge'"):
    mod.get_config("huge")
  with pytest.raises(ValueError, match="unknown task set 'aio4'"):
    mod.get_config("s,aio4")


def _parse(argv, monkeypatch):
  # config_flags reads the override flags from sys.argv, as in a real run.
  monkeypatch.setattr(sys, "argv", argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv)
  fv(argv)
  return fv.config


def test_overrides_typos_and_bad_values(monkeypatch):
  c = _parse(["prog", f"--config={CONFIG_FILE}:smoke", "--config.train.lr=0.5",
              "--config.model.num_blocks=(2,3)"], monkeypatch)
  assert c.train.lr == 0.5
  assert training.model_config(c).num_blocks == (2, 3)
  with pytest.raises(Exception, match="trian"):
    _parse(["prog", f"--config={CONFIG_FILE}:smoke", "--config.trian.lr=0.5"], monkeypatch)
  c = _module().get_config("smoke")
  c.data.patch = 31
  with pytest.raises(ValueError, match="data.patch=31 must be a multiple of 2"):
    training.validate(c)
  c = _module().get_config("smoke")
  c.model.rank_type = "cubic"
  with pytest.raises(ValueError, match="config.model: .*rank_type='cubic'"):
    training.validate(c)
  with pytest.raises(TypeError):
    c.train.lr = "fast"  # ml_collections type checking
  c = _parse(["prog", f"--config={CONFIG_FILE}:smoke", "--config.data.task_weights=(1,2)"],
             monkeypatch)
  assert tuple(c.data.task_weights) == (1, 2)
  with pytest.raises(ValueError, match=r"task_weights has 2 values for 3 tasks"):
    training.validate(c)  # smoke trains three tasks
  c = _module().get_config("smoke")
  c.train.psnr_weight = -0.03
  with pytest.raises(ValueError, match=r"train.psnr_weight=-0.03 must be >= 0"):
    training.validate(c)


def test_demo_trains_dense_experts_and_the_flag_switches_them(monkeypatch):
  # The demo's small experts gain nothing from being skipped and compile twice as long.
  assert training.model_config(_module().get_config("demo")).train_dispatch == "dense"
  assert training.model_config(_module().get_config("s")).train_dispatch is None  # by backend
  c = _parse(["prog", f"--config={CONFIG_FILE}:demo", "--config.model.train_dispatch=sparse"],
             monkeypatch)
  assert training.model_config(c).train_dispatch == "sparse"
  c.model.train_dispatch = "spares"
  with pytest.raises(ValueError, match="config.model: .*train_dispatch='spares' is not one of"):
    training.validate(c)


def test_darkening_is_off_by_default_and_checked():
  assert _module().get_config("s").data.darken_prob == 0.0  # the paper's recipe: off
  c = _module().get_config("smoke")
  c.data.darken_prob, c.data.darken_min = 1.5, 0.0
  with pytest.raises(ValueError, match=r"data.darken_prob=1.5 must be in \[0, 1\].*"
                                       r"data.darken_min=0.0 must be in \(0, 1\]"):
    training.validate(c)

