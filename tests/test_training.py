"""train.py / eval.py end to end: artefacts, device and process equivalence, kill and resume.

Every run is a real ``python train.py`` subprocess on the ``smoke`` config
(a two-level model, three synthetic tasks on the built-in photos). They share
a persistent compilation cache, so each distinct program compiles once, and
the tests that compare with the reference run share one xdist worker (pytest.ini
sets --dist loadgroup) so the reference run is made once.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import PROJECT
from moceir_jax import checkpoint
from moceir_jax import training
from moceir_jax.training import TimeBudget

STEPS = 6
COMMON = [f"--config.train.num_steps={STEPS}", "--config.checkpoint.every_steps=2"]
NO_QUICK_EVAL = ["--config.eval.every_steps=0"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  e = dict(os.environ)
  e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "jax_cache")
  e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = PROJECT
  return e


def _cmd(workdir, *extra):
  return [sys.executable, os.path.join(PROJECT, "train.py"),
          f"--config={os.path.join(PROJECT, 'configs', 'moceir.py')}:smoke",
          f"--workdir={workdir}", *COMMON, *extra]


def _train(env, workdir, *extra, devices=None):
  e = dict(env)
  if devices:
    e["XLA_FLAGS"] = (e.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  r = subprocess.run(_cmd(workdir, *extra), env=e, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r.stdout


def _losses(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      out[rec["step"]] = rec  # a resumed run repeats steps after its checkpoint: keep the last
  return out


def _params(workdir):
  model = checkpoint.load_model(os.path.join(workdir, "model"))
  return jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _assert_same_run(a_dir, b_dir):
  """Same losses at every step and same final parameters, to 1e-5."""
  a, b = _losses(a_dir), _losses(b_dir)
  for s in range(1, STEPS + 1):
    np.testing.assert_allclose(b[s]["loss"], a[s]["loss"], rtol=1e-5, atol=1e-6)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5),
                         _params(a_dir), _params(b_dir))


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  stdout = _train(env, workdir)
  return workdir, stdout


@pytest.mark.xdist_group("reference")
def test_run_leaves_config_checkpoints_logs_samples_and_model(reference):
  workdir, stdout = reference
  assert f"step {STEPS}/{STEPS}" in stdout and "steps/s" in stdout and "ETA" in stdout
  assert "l1 by task (restored/input): " in stdout
  assert f"per-task training curves: {os.path.join(workdir, 'task_l1.png')}" in stdout
  with Image.open(os.path.join(workdir, "task_l1.png")) as im:
    assert im.format == "PNG" and min(im.size) > 200
  assert "quick eval @ 4" in stdout
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["num_steps"] == STEPS
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  for rec in losses.values():
    assert {"loss", "l1", "fft", "psnr", "aux", "lr", "grad_norm"} <= set(rec)
    assert 5.0 < -rec["psnr"] < 60.0  # minus the batch's mean PSNR in dB
    total = rec["l1"] + 0.1 * rec["fft"] + 0.03 * rec["psnr"] + 0.01 * rec["aux"]
    assert rec["loss"] == pytest.approx(total, rel=1e-5)
    # log_every=1: the per-task window is this step's batch of 4, split by task
    counts = {k[len("images/"):]: v for k, v in rec.items() if k.startswith("images/")}
    assert set(counts) <= {"denoise_25", "derain", "dehaze"} and sum(counts.values()) == 4
    by_task = sum(rec[f"l1/{k}"] * n for k, n in counts.items()) / 4
    assert by_task == pytest.approx(rec["l1"], rel=1e-5)
    if "denoise_25" in counts:  # sigma 25/255 noise: mean |n| ~ 0.078 before clipping
      assert 0.04 < rec["input_l1/denoise_25"] < 0.09
  # kept: the last 2 (checkpoint.keep of smoke) of steps 2, 4 and the final 6
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
      "step_0000004.png", "step_0000006.png"]
  assert _params(workdir)  # the exported model directory loads


@pytest.mark.xdist_group("reference")
def test_eval_reports_benchmarks_heldout_sets_and_routing(reference, env, mini_root):
  workdir, _ = reference
  r = subprocess.run(
      [sys.executable, os.path.join(PROJECT, "eval.py"), f"--workdir={workdir}",
       f"--data_root={mini_root}", "--benchmarks=denoise_15,denoise_25,denoise_50,derain,dehaze",
       "--max_images=2", "--save_images"], env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  out = os.path.join(workdir, "eval")
  with open(os.path.join(out, "results.json")) as f:
    res = json.load(f)["results"]
  expected = {"denoise_15", "denoise_25", "denoise_50", "derain", "dehaze", "heldout/denoise_25",
              "heldout/derain", "heldout/dehaze"}
  assert set(res) == expected
  for name, r_ in res.items():
    assert r_["images"] == 2
    assert 5 < r_["psnr"] < 60 and 0 < r_["ssim"] <= 1
    for usage in r_["expert_usage"].values():
      assert sum(usage) == pytest.approx(1.0)
    assert 0 < r_["mean_compute_share"] <= 1
  # noisier input, lower input PSNR
  assert res["denoise_15"]["input_psnr"] > res["denoise_25"]["input_psnr"] > \
      res["denoise_50"]["input_psnr"]
  md = open(os.path.join(out, "results.md")).read()
  assert "| denoise_50 | 2 |" in md and "Expert selection" in md
  from PIL import Image
  for png in ("routing_heatmap.png", "samples.png"):
    with Image.open(os.path.join(out, png)) as im:
      assert im.size[0] > 100 and im.size[1] > 100
  assert len(os.listdir(os.path.join(out, "images", "denoise_25"))) == 2


@pytest.mark.xdist_group("reference")
def test_two_processes_of_two_devices_with_fsdp_train_like_one_device(reference, env, tmp_path):
  # Two processes (gloo on localhost), two devices each, FSDP: the batch and the larger
  # parameter/optimizer arrays split over 4 devices in 2 processes, against 1 device.
  ref, _ = reference
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  e = dict(env, XLA_FLAGS=(env.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=2").strip())
  procs = [subprocess.Popen(
      _cmd(str(tmp_path), *NO_QUICK_EVAL, f"--coordinator_address=localhost:{port}",
           "--num_processes=2", f"--process_id={i}", "--config.mesh.fsdp=True",
           "--config.mesh.fsdp_min_size=256"),
      env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-4000:]
  assert "2 processes" in outs[0] and "on 4 devices" in outs[0], outs[0][-2000:]
  _assert_same_run(ref, str(tmp_path))


@pytest.mark.xdist_group("reference")
def test_remat_on_two_devices_trains_like_one_device_without(reference, env, tmp_path):
  # Recomputed activations (tied to the incoming gradient, moceir_jax/repeat.py) under a
  # batch-sharded step with the native kernels' partitioning: the same run.
  ref, _ = reference
  out = _train(env, str(tmp_path), *NO_QUICK_EVAL, "--config.model.remat=True", devices=2)
  assert "on 2 devices" in out, out[-2000:]
  _assert_same_run(ref, str(tmp_path))


def _checkpoint_steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


@pytest.mark.xdist_group("reference")
def test_sigkill_and_sigterm_then_restart_end_bit_identical(reference, env, tmp_path):
  # One run interrupted twice: killed hard after its first checkpoint, resumed, stopped
  # with SIGTERM (which must save a checkpoint and exit 0), resumed again to the end.
  ref, _ = reference
  workdir = str(tmp_path)
  proc = subprocess.Popen(_cmd(workdir, *NO_QUICK_EVAL), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  first = os.path.join(workdir, "checkpoints", "2")  # appears when complete (atomic rename)
  deadline = time.time() + 600
  while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)  # steps 3-6, the next checkpoint and the export are left
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(workdir, "model")), "the run finished before the kill"

  proc = subprocess.Popen(_cmd(workdir, *NO_QUICK_EVAL), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step 3/"):
      proc.send_signal(signal.SIGTERM)
      break
  lines += proc.communicate(timeout=120)[0].splitlines()
  assert proc.returncode == 0, "".join(lines)[-3000:]
  assert any("resuming from checkpoint at step 2" in line for line in lines)
  assert not any("config differs" in line for line in lines), "".join(lines)
  assert 3 <= _checkpoint_steps(workdir)[-1] < STEPS, _checkpoint_steps(workdir)
  assert not os.path.exists(os.path.join(workdir, "model")), "SIGTERM did not stop the run"

  # A changed setting is named on resume (this one cannot change the result).
  stdout = _train(env, workdir, *NO_QUICK_EVAL, "--config.checkpoint.keep=4")
  assert "resuming from checkpoint at step" in stdout
  assert "config differs from the one this run started with" in stdout
  assert "checkpoint.keep: 2 -> 4" in stdout
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(x, y), _params(ref),
                         _params(workdir))


def test_demo_path_trains_evaluates_and_leaves_table_and_pictures(env, tmp_path):
  # The README's main job (configs/moceir.py:demo) at test size: the micro model, 2 steps.
  workdir = str(tmp_path)
  cmd = [sys.executable, os.path.join(PROJECT, "train.py"),
         f"--config={os.path.join(PROJECT, 'configs', 'moceir.py')}", f"--workdir={workdir}",
         "--config.model.dim=8", "--config.model.levels=2", "--config.model.heads=(1,2)",
         "--config.model.num_blocks=(1,1)", "--config.model.num_dec_blocks=(1,)",
         "--config.data.patch=32", "--config.train.time_budget_minutes=0.05",
         "--config.eval.every_steps=0", "--config.eval.heldout_crop=48"]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  # The demo's schedule is fitted to its time budget (here 3 s) after timing its first steps.
  found = re.findall(r"time budget 0.05 min at [0-9.]+ steps/s: training for (\d+) steps",
                     r.stdout)
  assert found, r.stdout[-3000:]
  total = int(found[-1])  # the refit's, when there was one
  assert total > TimeBudget.MEASURE_STEPS and f"step {total}/{total}" in r.stdout
  tasks = ["denoise_15", "denoise_25", "denoise_50", "derain", "dehaze", "deblur", "lowlight"]
  assert "| set | images | input PSNR" in r.stdout  # the table is printed
  md = open(os.path.join(workdir, "eval", "results.md")).read()
  for t in tasks:
    assert f"| heldout/{t} | 3 |" in md
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    res = json.load(f)["results"]
  assert sorted(res) == sorted(f"heldout/{t}" for t in tasks)
  from PIL import Image
  with Image.open(os.path.join(workdir, "eval", "samples.png")) as im:
    assert im.size[1] > 7 * 48  # one row per task
  with Image.open(os.path.join(workdir, "eval", "routing_heatmap.png")) as im:
    assert im.size[0] > 100


def test_task_curves_plot_each_task_and_skip_runs_without_them(tmp_path):
  from moceir_jax import visualize  # pylint: disable=import-outside-toplevel
  recs = [{"step": s, "loss": 1.0, "l1/derain": 0.05, "input_l1/derain": 0.03,
           "l1/lowlight": 0.3 / s, "input_l1/lowlight": 0.4} for s in (1, 2, 3)]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for r in recs + recs[1:]:  # a resumed run repeats steps 2 and 3
      f.write(json.dumps(r) + "\n")
  assert visualize.task_curves(recs, str(tmp_path / "direct.png")) == ["derain", "lowlight"]
  out = training.plot_task_curves(str(tmp_path))
  assert out == str(tmp_path / "task_l1.png")
  with Image.open(out) as im:
    assert im.format == "PNG"
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # written atomically
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
  os.remove(out)
  assert training.plot_task_curves(str(tmp_path)) is None and not os.path.exists(out)


def test_config_changes_name_every_changed_setting_and_nothing_else():
  cfg = ml_collections.ConfigDict(dict(train=dict(lr=1e-3, psnr_weight=0.03),
                                       data=dict(tasks=("denoise_25", "derain"))))
  saved = json.loads(cfg.to_json())  # as config.json holds it: tuples become lists
  assert training.config_changes(saved, cfg) == []
  assert training.config_changes(None, cfg) == []
  cfg.train.psnr_weight = 0.0
  cfg.data.tasks = ("denoise_25",)
  del saved["train"]["lr"]
  assert training.config_changes(saved, cfg) == [
      "data.tasks: ['denoise_25', 'derain'] -> ['denoise_25']",
      "train.lr: '(unset)' -> 0.001",
      "train.psnr_weight: 0.03 -> 0.0"]
