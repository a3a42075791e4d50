"""Denoising, like for like with the official code's anchor run on the same CPU.

    python benchmarks/denoise_like_for_like.py --data_root ../shared/data/mini_root \
        [--minutes 12] [--workdir /tmp/denoise_lfl] [--overwrite]

The anchor (measured with the official PyTorch code on a 2-core machine): the
demo-size MoCE-IR (dim 16, blocks [1,2,2,2], decoder [1,1,1], 1 refinement
block; 1.16 M parameters) trained on sigma=25 noise alone, 64x64 crops of
scikit-image's photos, batch 8, AdamW 1e-3 with a cosine schedule, scored on
the first 20 CBSD68 images cropped to 320x480 (noisy input 20.53 dB): 27.40 dB
after 2 minutes, 28.18 after 6, 28.52 after 12 (1.9 steps/s).

This trains ours with the same model and recipe for the same wall-clock
minutes of training (``train.time_budget_minutes``: the first steps are timed
and the cosine schedule is fitted to end when the time does) and scores the
same crops. With ``--official_repo PATH`` (a checkout of eduardzamfir/MoCE-IR;
torch from requirements-convert.txt) it then trains the official model the
same way on this machine: the same batches from our pipeline, the same AdamW
settings, warm-up, cosine and time budget, its own forward pass, loss
(L1 + 0.01 routing loss) and eval mode (which keeps its routing noise), and
scores it on the same crops, so the comparison no longer rests on figures
from another machine.
"""

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
  from moceir_jax import host  # pylint: disable=wrong-import-position

  host.reexec_with_fast_allocator()
  host.use_compilation_cache()

import numpy as np  # pylint: disable=wrong-import-position

from configs import moceir as configs  # pylint: disable=wrong-import-position
from moceir_jax import checkpoint, datasets, degradations, experiment_data, input_pipeline, metrics, training  # pylint: disable=wrong-import-position
from moceir_jax.inference import Restorer  # pylint: disable=wrong-import-position

OFFICIAL = {2: 27.40, 6: 28.18, 12: 28.52}  # minutes -> dB, official code, the issue tracker's machine
CROP = (320, 480)
IMAGES = 20


def recipe(minutes: float):
  """The anchor's recipe on our demo configuration: sigma=25 only, L1 loss."""
  c = configs.get_config("demo")
  c.unlock()
  c.data.tasks = ("denoise_25",)
  c.train.time_budget_minutes = minutes
  c.train.warmup_steps = 30
  c.train.lr = 1e-3  # the anchor's rate (the demo's own is higher)
  # The anchor's loss: L1 plus the routing loss. Set in full, since the demo's own loss
  # terms change with its recipe (its PSNR loss leaked in here once).
  c.train.l1_weight, c.train.fft_weight, c.train.psnr_weight = 1.0, 0.0, 0.0
  c.train.aux_weight = 0.01
  c.train.log_every = 50
  c.checkpoint.every_steps = 1000
  c.eval.every_steps = 0  # no quick evaluations inside the budget
  c.eval.at_end = False
  c.lock()
  return c


def fresh_run_dir(workdir: str, minutes: float, overwrite: bool) -> str:
  """The run's directory, empty. Training resumes from any checkpoint it finds, which
  here would report a stale or half-old run as this one's time-budgeted result."""
  run_dir = os.path.join(workdir, f"{minutes:g}min")
  if os.path.isdir(run_dir) and os.listdir(run_dir):
    if not overwrite:
      raise SystemExit(f"{run_dir} already holds a run (training would resume it); "
                       "pass --overwrite to replace it or another --workdir")
    shutil.rmtree(run_dir)
  return run_dir


def crops(root: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """(name, noisy, clean): the first 20 CBSD68 images, centre-cropped to 320x480 (480x320 if
  portrait), with the seeded sigma=25 noise of our denoise_25 benchmark."""
  pairs = datasets.benchmark_pairs(root, "denoise_25")[:IMAGES]
  if len(pairs) < IMAGES:
    raise SystemExit(f"{root}: need {IMAGES} CBSD68 images, found {len(pairs)}")
  noise = degradations.get("denoise_25")
  out = []
  for pair in pairs:
    clean = input_pipeline.read_clean(pair.clean)
    h, w = CROP if clean.shape[1] >= clean.shape[0] else CROP[::-1]
    if clean.shape[0] < h or clean.shape[1] < w:
      raise SystemExit(f"{pair.clean}: {clean.shape[:2]} is smaller than the {h}x{w} crop")
    y, x = (clean.shape[0] - h) // 2, (clean.shape[1] - w) // 2
    clean = np.ascontiguousarray(clean[y:y + h, x:x + w])
    rng = np.random.default_rng(input_pipeline.benchmark_noise_seed(pair.name, 25.0))
    out.append((pair.name, noise(clean, rng), clean))
  return out


def train_official(repo: str, config, threads: int):
  """The official model trained with our recipe for the budget; returns (net, steps)."""
  import torch  # pylint: disable=import-outside-toplevel
  import official_speed  # pylint: disable=import-outside-toplevel  (this script's folder)
  torch.set_num_threads(threads)
  torch.manual_seed(config.seed)
  moce_ir = official_speed.import_reference(repo)
  net = moce_ir.MoCEIR(**{**official_speed.COMMON, **official_speed.CONFIGS["demo"]})
  net.train()
  t = config.train
  opt = torch.optim.AdamW(net.parameters(), lr=t.lr, betas=(t.b1, t.b2), eps=t.eps,
                          weight_decay=t.weight_decay)
  schedule = training.make_schedule(config, t.warmup_steps)
  sources = experiment_data.training_sources(config.data)
  data = iter(input_pipeline.train_dataset(sources, batch_size=t.global_batch_size,
                                           patch=config.data.patch, seed=config.seed))
  budget = training.TimeBudget(t.time_budget_minutes, t.warmup_steps)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  step, total, t0 = 0, 10 ** 9, time.perf_counter()
  while step < total:
    batch = next(data)
    for group in opt.param_groups:  # the warm-up's rates do not depend on the total
      group["lr"] = float(schedule(step, total))
    opt.zero_grad(set_to_none=True)
    out = net(nchw(batch["degraded"]))
    loss = torch.nn.functional.l1_loss(out, nchw(batch["clean"])) + t.aux_weight * net.total_loss
    loss.backward()
    opt.step()
    step += 1
    if step == 1:
      budget.start(step)
    if budget.due(step):
      total = budget.total_steps(step)
      print(f"official: {budget.rate:.2f} steps/s, training for {total} steps", flush=True)
    if step % t.log_every == 0:
      print(f"official step {step}/{total} | loss {loss.item():.4f} | "
            f"{step / (time.perf_counter() - t0):.2f} steps/s", flush=True)
  return net, step


def score(restore, test) -> tuple[float, float]:
  """Mean PSNR of the noisy crops and of ``restore(noisy)`` clipped to [0, 1]."""
  inp, out = [], []
  for _, noisy, clean in test:
    inp.append(metrics.psnr(noisy, clean))
    out.append(metrics.psnr(np.clip(restore(noisy), 0.0, 1.0), clean))
  return float(np.mean(inp)), float(np.mean(out))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data_root", required=True, help="holds denoising/cBSD68/original_png")
  ap.add_argument("--minutes", type=float, default=12.0, help="wall-clock training budget")
  ap.add_argument("--workdir", default="/tmp/denoise_like_for_like")
  ap.add_argument("--overwrite", action="store_true",
                  help="replace an earlier run in --workdir instead of refusing")
  ap.add_argument("--official_repo", help="also train the official code (a MoCE-IR checkout)")
  ap.add_argument("--threads", type=int, default=os.cpu_count(),
                  help="torch threads for the official run")
  args = ap.parse_args()
  test = crops(args.data_root)  # fail on a bad root before spending minutes

  run_dir = fresh_run_dir(args.workdir, args.minutes, args.overwrite)
  t0 = time.perf_counter()
  training.train_and_evaluate(recipe(args.minutes), run_dir)
  wall = time.perf_counter() - t0
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    steps = [json.loads(line)["step"] for line in f][-1]

  restorer = Restorer(checkpoint.load_model(os.path.join(run_dir, "model")), dispatch="sparse")
  noisy_db, ours_db = score(lambda x: np.asarray(restorer(x).image), test)
  ref = OFFICIAL.get(int(args.minutes)) if float(args.minutes).is_integer() else None
  ref_text = f" | official {ref:.2f} dB in the same minutes (issue tracker's machine)" if ref else ""
  print(f"\nCBSD68 sigma=25, {IMAGES} crops {CROP[0]}x{CROP[1]}: noisy {noisy_db:.2f} dB -> "
        f"ours {ours_db:.2f} dB after {steps} steps ({args.minutes:g} min budget, "
        f"{wall / 60:.1f} min with compilation){ref_text}", flush=True)
  if args.official_repo:
    import torch  # pylint: disable=import-outside-toplevel
    net, official_steps = train_official(args.official_repo, recipe(args.minutes), args.threads)
    net.eval()

    def official(x):
      with torch.inference_mode():
        y = net(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None])
      return y[0].numpy().transpose(1, 2, 0)
    print(f"official code, this machine: {score(official, test)[1]:.2f} dB after "
          f"{official_steps} steps ({args.minutes:g} min budget)", flush=True)


if __name__ == "__main__":
  main()
