"""The official PyTorch code's speed and memory, for same-machine ratios with benchmarks/speed.py.

    python benchmarks/official_speed.py --repo PATH/TO/MoCE-IR [--variants s,base]
                                        [--cases eval256,eval512,train] [--runs 3] [--threads 2]
                                        [--train_shape 4x128]

PATH is a checkout of eduardzamfir/MoCE-IR (torch from requirements-convert.txt, plus einops;
fvcore, which the reference imports only for a FLOP table, is stubbed when absent). The cases
mirror speed.py's: eval at 1x3xSxS in eval mode without gradients (the official test path; its
dispatch skips unchosen experts), and one training step at 4x3x128x128 (AdamW 2e-4, weight decay
0.01, L1 + 0.1 FFT-L1 + 0.01 routing loss, complexity bias on, as the paper trains). Each case runs
in its own process so its peak resident memory is its own; times are medians of --runs after one
warm-up run. Machines of the same kind differ by 2x, which is why the speed targets are checked
against this script's figures on the machine that ran speed.py, not against figures from elsewhere.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import types

# The official MoCE-IR-S and MoCE-IR (its options.py defaults plus the paper's complexity bias).
CONFIGS = {
    "s": dict(dim=32),
    "base": dict(dim=48),
    # The small model of the demo and of benchmarks/denoise_like_for_like.py.
    "demo": dict(dim=16, num_blocks=[1, 2, 2, 2], num_dec_blocks=[1, 1, 1],
                 num_refinement_blocks=1),
}
COMMON = dict(num_blocks=[4, 6, 6, 8], num_dec_blocks=[2, 4, 4], levels=4, heads=[1, 2, 4, 8],
              num_refinement_blocks=4, topk=1, num_experts=4, rank=2, with_complexity=True,
              depth_type="constant", stage_depth=[1, 1, 1], rank_type="spread",
              complexity_scale="max")


def import_reference(repo: str):
  """The reference's ``net.moce_ir`` module from a checkout at ``repo``."""
  src = os.path.join(repo, "src")
  if not os.path.isfile(os.path.join(src, "net", "moce_ir.py")):
    raise SystemExit(f"--repo {repo}: no src/net/moce_ir.py there (expected a checkout of "
                     "eduardzamfir/MoCE-IR)")
  try:
    import fvcore.nn  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:  # only the reference's __main__ uses it
    fv = types.ModuleType("fvcore")
    fv.nn = types.ModuleType("fvcore.nn")
    fv.nn.FlopCountAnalysis = fv.nn.flop_count_table = None
    sys.modules.update({"fvcore": fv, "fvcore.nn": fv.nn})
  sys.path.insert(0, src)
  from net import moce_ir  # pylint: disable=import-outside-toplevel,import-error
  return moce_ir


def _case(repo: str, variant: str, case: str, runs: int, threads: int,
          train_shape: tuple[int, int]) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  moce_ir = import_reference(repo)
  net = moce_ir.MoCEIR(**{**COMMON, **CONFIGS[variant]})
  out = {"params": sum(p.numel() for p in net.parameters())}

  def median(fn):
    fn()
    ts = []
    for _ in range(runs):
      t = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]

  if case.startswith("eval"):
    size = int(case[4:])
    x = torch.rand(1, 3, size, size)
    net.eval()

    def run():
      with torch.inference_mode():
        net(x)
    out["eval_s"] = median(run)
  else:
    batch, size = train_shape
    x = torch.rand(batch, 3, size, size)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4, weight_decay=0.01)
    from utils.loss_utils import FFTLoss  # pylint: disable=import-outside-toplevel,import-error
    fft_l1 = FFTLoss(loss_weight=0.1)  # the reference's own

    def run():
      opt.zero_grad(set_to_none=True)
      y = net(x)
      loss = torch.nn.functional.l1_loss(y, x) + fft_l1(y, x) + 0.01 * net.total_loss
      loss.backward()
      opt.step()
    out["train_s"] = median(run)
  out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repo", required=True, help="checkout of eduardzamfir/MoCE-IR")
  ap.add_argument("--variants", default="s,base")
  ap.add_argument("--cases", default="eval256,eval512,train")
  ap.add_argument("--runs", type=int, default=3, help="timed runs per case, after one warm-up")
  ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  ap.add_argument("--train_shape", default="4x128",
                  help="BATCHxSIZE of the train case (the demo's is 8x64)")
  ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: VARIANT CASE
  args = ap.parse_args()
  batch, size = (int(v) for v in args.train_shape.split("x"))
  if args.one:
    print(json.dumps(_case(args.repo, *args.one, args.runs, args.threads, (batch, size))))
    return
  for variant in args.variants.split(","):
    if variant not in CONFIGS:
      raise SystemExit(f"--variants: {variant!r} is not one of {sorted(CONFIGS)}")
    for case in args.cases.split(","):
      r = subprocess.run([sys.executable, __file__, "--repo", args.repo, "--one", variant, case,
                          "--runs", str(args.runs), "--threads", str(args.threads),
                          "--train_shape", args.train_shape],
                         capture_output=True, text=True, check=False)
      if r.returncode != 0:
        print(f"official {variant} {case}: failed: {r.stderr.strip()[-600:]}", flush=True)
        continue
      res = json.loads(r.stdout.strip().splitlines()[-1])
      what = (f"train {batch}x3x{size}x{size}" if case == "train"
              else f"{case} (1x3x{case[4:]}x{case[4:]})")
      secs = res.get("train_s", res.get("eval_s"))
      print(f"official {variant} ({res['params']:,} params) {what}: {secs:.2f} s, "
            f"peak {res['peak_gb']:.2f} GB", flush=True)


if __name__ == "__main__":
  main()
